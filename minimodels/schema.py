"""YAML mappings -> typed dataclasses, with one-line errors that name the file and the key.

The machinery under `minimodels.config.load_config`, and under any section a model reads on its own (P-tuning's
backbone): `read_yaml` refuses duplicate keys, `apply_override` applies one `key.sub=value`, `build` checks every
key and value of a mapping against a dataclass's type hints; `to_dict` turns a config back into YAML data. Imports
nothing of minimodels.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the file and the key."""


def need(ok: bool, key: str, problem: str, where: str = "") -> None:
    """Raise ConfigError "<where>: <key>: <problem>" unless `ok` (key: a YAML key or a command-line option)."""
    if not ok:
        raise ConfigError(f"{where}: {key}: {problem}" if where else f"{key}: {problem}")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML would keep the last one)."""

    def construct_mapping(self, node, deep=False):
        first = {}  # key -> its line (1-based)
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # a list or mapping as key: SafeLoader refuses it
                continue
            key = self.construct_object(key_node)
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {first[key]})", key_node.start_mark)
            first[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a config file (a run folder's is {path / 'config.yaml'})")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with sections model/data/train/output, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict, item: str, where: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as YAML (so 3e-4, true, [1, 2] work)."""
    if "=" not in item:
        raise ConfigError(f"{where}: override '{item}' must look like key.sub=value")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: override {key}: {part} is not a section")
    node[parts[-1]] = value


def build(cls: type, raw: Any, prefix: str, where: str):
    """Instantiate dataclass `cls` from dict `raw`, checking every key and every value's type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(raw, fields, prefix + ".", where)
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}"
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in raw:
            if required:
                raise ConfigError(f"{where}: missing required key {key}")
            continue
        kwargs[name] = convert(raw[name], hints[name], key, where)
    return cls(**kwargs)


RENAMED = {"n_embd": "d_model"}  # old key -> its name now (a run's config.yaml or a YAML written before)


def check_keys(raw: dict, valid, prefix: str, where: str) -> None:
    for k in raw:
        if k in RENAMED and RENAMED[k] in valid:
            raise ConfigError(f"{where}: {prefix}{k}: renamed to {prefix}{RENAMED[k]}")
        if k not in valid:
            full = [prefix + v for v in valid]
            raise ConfigError(f"{where}: unknown key {prefix}{k}{suggest(prefix + str(k), full)}")


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" — did you mean {close[0]}?" if close else f" (valid: {', '.join(o.split('.')[-1] for o in options)})"


def convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against type hint `tp` (int, float, str, bool, X | None, tuple[float, float], a nested
    config dataclass given as a mapping)."""
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key, where)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return convert(value, inner, key, where)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: {key}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(convert(v, a, key, where) for v, a in zip(value, args))
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, str):  # PyYAML reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (str, bool, list, dict) and isinstance(value, tp):
        return value
    if tp is Any:
        return value
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"{where}: {key}: expected {name}, got {value!r} ({type(value).__name__})")


def to_dict(cfg: Any) -> Any:
    """A config as plain YAML data: dataclasses become dicts in field order (so model.arch comes first), tuples
    lists; ready for yaml.safe_dump."""
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if dataclasses.is_dataclass(cfg):  # the experiment, a section, or a nested one such as model.moe
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    return cfg
