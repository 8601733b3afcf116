"""YAML -> typed dataclasses, with dotted command-line overrides and one-line errors.

An experiment is one YAML file with four sections:

    model:  {arch: gpt, n_layer: 4, ...}   # fields of the model's own config dataclass
    data:   {source: stdlib, tokenizer: bpe, ...}
    train:  {max_steps: 1000, lr: 3e-3, ...}
    output: {dir: runs/gpt, ...}

`load_config("configs/gpt.yaml", ["train.max_steps=200"])` returns an `ExperimentConfig`.
Every problem raises `ConfigError` whose message names the file and the key, e.g.
"configs/gpt.yaml: unknown key model.n_layers — did you mean model.n_layer?".
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the file and the key."""


def need(ok: bool, key: str, problem: str, where: str = "") -> None:
    """Raise ConfigError "<where>: <key>: <problem>" unless `ok` (key: a YAML key or a command-line option)."""
    if not ok:
        raise ConfigError(f"{where}: {key}: {problem}" if where else f"{key}: {problem}")


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # what train.device and --device accept


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" (docstrings of this Python's stdlib), a .txt/.json/.jsonl file or folder, or a HF dataset name
    hf_subset: str | None = None  # configuration name of a Hugging Face dataset (e.g. wikitext-2-raw-v1)
    text_field: str = "text"  # field holding the text in JSON / Hugging Face records
    task: str = "causal_lm"  # which collator/task turns text into batches (minimodels/data/__init__.py TASKS)
    tokenizer: str = "bpe"  # char | bpe (byte-level BPE) | wordpiece, or a trained tokenizer.json to reuse (runs/bert/tokenizer.json)
    vocab_size: int = 4096  # target vocabulary size for bpe / wordpiece (char: ignored)
    seq_len: int | None = None  # tokens per training example; null = model.block_size
    random_offset: bool = False  # causal_lm: cut each train window at a new random offset every time it is drawn
    val_fraction: float = 0.1  # share of source files (or documents) held out for validation
    mask_prob: float = 0.15  # masked LM: share of non-special tokens selected for prediction (BERT)
    whole_word_mask: bool = False  # masked LM: select whole words (all their ## pieces) instead of single tokens
    noise_density: float = 0.15  # span corruption: share of tokens dropped into the targets (T5; GLM [MASK])
    mean_span_length: float = 3.0  # span corruption: mean length of a dropped span (GLM [MASK]: Poisson mean)
    infill_mix: dict | None = None  # GLM blank infilling: share of examples per blank kind {mask, smask, gmask}; null = {mask: 1}
    kb_documents: int = 16  # source kb: documents about each subject in the pretraining corpus (each fact phrased anew)
    template: list | None = None  # P-tuning (kb_probe): prompt, e.g. [3, subject, 3, mask, 3]; null = that (GPT: [3, subject, 3])


@dataclass
class DistributedConfig:
    backend: str = "auto"  # auto (nccl on CUDA, else gloo) | gloo | nccl; used only under torchrun
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (FSDP2) instead of DDP


@dataclass
class TeacherConfig:
    run: str  # a trained (smaller) model's run folder with this run's tokenizer, e.g. runs/gpt
    alpha: float = 1.0  # the teacher's share of the loss at step 0 (minimodels/models/inherit.py)
    decay_steps: int | None = None  # alpha decays linearly to 0 over this many steps; null = constant alpha
    temperature: float = 2.0  # T: both distributions are softened by T before the KL


@dataclass
class TrainConfig:
    max_steps: int = 1000  # optimizer steps
    seed: int = 1337  # seeds model init, data order and dropout
    batch_size: int = 32  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "adamw"  # adamw | relative_adamw (steps scaled by each tensor's RMS, as Adafactor; for T5)
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup: step s (from 0) runs at lr * (s + 1) / warmup_steps
    weight_decay: float = 0.1  # AdamW decay on every tensor of 2+ dims (matrices, all embeddings, prompts), not biases or norms
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (auto: cuda, else mps, else cpu)
    dtype: str = "auto"  # auto (bf16 where supported) | bf16 | fp32 | fp16 (CUDA only)
    eval_interval: int = 250  # evaluate every N steps (and at the end)
    eval_batches: int | None = None  # cap on validation batches per evaluation; null = the whole split
    log_interval: int = 10  # write a train event to metrics.jsonl every N steps
    save_interval: int = 500  # checkpoint every N steps (and at the end)
    keep_last: int = 2  # checkpoints kept on disk
    compile: bool = False  # torch.compile the model (costs ~15 s on first call)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # options for torchrun (README)
    teacher: TeacherConfig | None = None  # knowledge inheritance: distil from this trained run; null = off


@dataclass
class OutputConfig:
    dir: str = "runs/gpt"  # the run folder
    sample_prompt: str = ""  # prompt for the sample printed at the end of training
    sample_tokens: int = 200  # tokens in that sample (0 = no sample)
    plot: bool = True  # write loss.png into the run folder


@dataclass
class ExperimentConfig:
    model: Any  # the model's own config dataclass, chosen by model.arch
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# --------------------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> ExperimentConfig:
    """Read YAML `path` (or start from dict `base`), apply `key.sub=value` overrides, type-check, validate."""
    where = str(path) if path is not None else "config"
    raw = base if base is not None else read_yaml(path)
    for item in overrides:
        apply_override(raw, item, where)
    cfg = parse(raw, where)
    validate(cfg, where)
    return cfg


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


def parse(raw: dict, where: str) -> ExperimentConfig:
    from minimodels.models import MODEL_CONFIGS  # name -> config dataclass (imported late: config is imported by models)

    sections = {f.name for f in dataclasses.fields(ExperimentConfig)}
    check_keys(raw, sections, "", where)
    model_raw = raw.get("model") or {}
    if not isinstance(model_raw, dict):
        raise ConfigError(f"{where}: model: expected a mapping, got {type(model_raw).__name__}")
    arch = model_raw.get("arch")
    if arch is None:
        raise ConfigError(f"{where}: missing required key model.arch (one of: {', '.join(MODEL_CONFIGS)})")
    if arch not in MODEL_CONFIGS:
        raise ConfigError(f"{where}: model.arch: unknown model '{arch}'{suggest(str(arch), MODEL_CONFIGS)}")
    return ExperimentConfig(
        model=build(MODEL_CONFIGS[arch], model_raw, "model", where),
        data=build(DataConfig, raw.get("data") or {}, "data", where),
        train=build(TrainConfig, raw.get("train") or {}, "train", where),
        output=build(OutputConfig, raw.get("output") or {}, "output", where),
    )


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


def check_keys(raw: dict, valid, prefix: str, where: str) -> None:
    for k in raw:
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


# --------------------------------------------------------------------------- validation


def validate(cfg: ExperimentConfig, where: str) -> None:
    from minimodels.data import TASKS  # data.task -> task class (imported late: data imports config)

    t, d, o = cfg.train, cfg.data, cfg.output

    def check(ok: bool, key: str, problem: str) -> None:
        need(ok, key, problem, where)

    try:
        cfg.model.validate()
    except ValueError as e:  # the model config names its own key, e.g. "model.n_embd: ..."
        raise ConfigError(f"{where}: {e}") from None
    for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "log_interval", "save_interval", "keep_last"):
        check(getattr(t, name) > 0, f"train.{name}", f"must be positive, got {getattr(t, name)}")
    check(t.seed >= 0, "train.seed", f"must be >= 0, got {t.seed}")
    check(t.lr > 0 and math.isfinite(t.lr), "train.lr", f"learning rate must be positive, got {t.lr}")
    check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    check(t.optimizer in ("adamw", "relative_adamw"), "train.optimizer",
          f"must be adamw or relative_adamw, got {t.optimizer!r}")
    check(0 <= t.weight_decay < math.inf, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    check(0 <= t.grad_clip < math.inf, "train.grad_clip", f"must be >= 0 (0: no clipping), got {t.grad_clip}")
    check(all(0 <= b < 1 for b in t.betas), "train.betas", f"each beta must be in [0, 1), got {list(t.betas)}")
    check(DEVICE.fullmatch(t.device) is not None, "train.device",
          f"must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}")
    check(t.dtype in ("auto", "bf16", "fp32", "fp16"), "train.dtype", f"must be auto, bf16, fp32 or fp16, got {t.dtype!r}")
    check(t.eval_batches is None or t.eval_batches > 0, "train.eval_batches", "must be positive or null")
    if t.teacher is not None:
        check(cfg.model.arch in ("gpt", "bert"), "train.teacher",
              f"knowledge inheritance compares a GPT's or BERT's token scores; model.arch is {cfg.model.arch!r}")
        check(0 <= t.teacher.alpha <= 1, "train.teacher.alpha", f"must be in [0, 1], got {t.teacher.alpha}")
        check(0 < t.teacher.temperature < math.inf, "train.teacher.temperature",
              f"must be positive, got {t.teacher.temperature}")
        check(t.teacher.decay_steps is None or t.teacher.decay_steps > 0, "train.teacher.decay_steps",
              f"must be positive or null (constant alpha), got {t.teacher.decay_steps}")
    check(t.distributed.backend in ("auto", "gloo", "nccl"), "train.distributed.backend",
          f"must be auto, gloo or nccl, got {t.distributed.backend!r}")
    check(d.task in TASKS, "data.task", f"unknown task {d.task!r}{suggest(d.task, TASKS)}")
    archs = TASKS[d.task].archs
    fitting = [name for name, task in TASKS.items() if cfg.model.arch in task.archs]
    check(cfg.model.arch in archs, "data.task", f"{d.task} makes batches for model.arch {' or '.join(archs)}, "
          f"not {cfg.model.arch} (which trains on {' or '.join(fitting)})")
    check(d.source != "", "data.source", "must name stdlib, a generated world, a file or folder, or a dataset")
    check(d.text_field != "", "data.text_field", "must name the field holding the text")
    check(d.tokenizer in ("char", "bpe", "wordpiece") or d.tokenizer.endswith(".json"), "data.tokenizer",
          f"must be char, bpe, wordpiece or a path to a tokenizer.json, got {d.tokenizer!r}")
    check(0 < d.mask_prob < 1, "data.mask_prob", f"must be in (0, 1), got {d.mask_prob}")
    check(0 < d.noise_density < 1, "data.noise_density", f"must be in (0, 1), got {d.noise_density}")
    check(1 <= d.mean_span_length < math.inf, "data.mean_span_length", f"must be >= 1, got {d.mean_span_length}")
    check(d.vocab_size > 0, "data.vocab_size", f"must be positive, got {d.vocab_size}")
    check(0 < d.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {d.val_fraction}")
    check(not d.random_offset or d.task == "causal_lm", "data.random_offset",
          f"only data.task causal_lm cuts its windows at random offsets, not {d.task}")
    check(d.kb_documents > 0, "data.kb_documents", f"must be positive, got {d.kb_documents}")
    block_size = getattr(cfg.model, "block_size", None)
    if d.seq_len is not None:
        check(d.seq_len > 1, "data.seq_len", f"must be at least 2, got {d.seq_len}")
        if block_size is not None:
            check(d.seq_len <= block_size, "data.seq_len",
                  f"{d.seq_len} is longer than model.block_size={block_size} supports")
    elif block_size is not None:  # the examples are block_size tokens long
        check(block_size > 1, "model.block_size",
              f"must be at least 2 (with data.seq_len null an example is block_size tokens), got {block_size}")
    check(o.dir != "", "output.dir", "must name the run folder")
    check(o.sample_tokens >= 0, "output.sample_tokens", f"must be >= 0 (0: no sample), got {o.sample_tokens}")
    folder = Path(o.dir)
    for p in [folder, *folder.parents]:  # the run folder and the folders it will be created in
        check(not p.exists() or p.is_dir(), "output.dir", f"{p} is a file, not a folder")


# --------------------------------------------------------------------------- writing


def to_dict(cfg: ExperimentConfig) -> dict:
    """Plain dict (lists for tuples) with model.arch first, ready for yaml.safe_dump."""

    def plain(x):
        if isinstance(x, (tuple, list)):
            return [plain(v) for v in x]
        if dataclasses.is_dataclass(x):  # a nested section, e.g. model.moe
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x)}
        return x

    out = {}
    for section in ("model", "data", "train", "output"):
        obj = getattr(cfg, section)
        out[section] = {f.name: plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    return out


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
