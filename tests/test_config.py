"""Config: typed loading, overrides, one-line errors that name the file and the key."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minimodels.config import ConfigError, load_config, save_config, to_dict


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD = """
model: {arch: gpt, n_layer: 2, n_embd: 64, n_head: 4, block_size: 64}
data: {tokenizer: char}
train: {max_steps: 10, lr: 1e-3, betas: [0.9, 0.99]}
output: {dir: runs/x}
"""


def test_load_types_and_defaults(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert cfg.model.n_layer == 2 and cfg.train.max_steps == 10
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)  # YAML reads "1e-3" as a string
    assert cfg.train.betas == (0.9, 0.99)
    assert cfg.train.seed == 1337 and cfg.data.tokenizer == "char" and cfg.output.dir == "runs/x"


def test_overrides_convert_types(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["train.max_steps=200", "model.n_layer=3", "output.dir=runs/tiny",
                                              "train.lr=3e-4", "train.compile=true", "train.seed=7"])
    assert (cfg.train.max_steps, cfg.model.n_layer, cfg.output.dir) == (200, 3, "runs/tiny")
    assert cfg.train.lr == 3e-4 and cfg.train.compile is True and cfg.train.seed == 7


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, GOOD), ["model.vocab_size=77"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg and to_dict(again) == to_dict(cfg)
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text())["model"]["arch"] == "gpt"


@pytest.mark.parametrize("overrides, fragment", [
    (["model.n_layers=3"], "unknown key model.n_layers — did you mean model.n_layer?"),
    (["train.max_step=3"], "did you mean train.max_steps?"),
    (["trian.max_steps=3"], "unknown key trian — did you mean train?"),
    (["model.n_layer=two"], "model.n_layer: expected int, got 'two'"),
    (["train.lr=fast"], "train.lr: expected float"),
    (["train.lr=0"], "train.lr: learning rate must be positive"),
    (["train.lr=-1e-3"], "train.lr: learning rate must be positive"),
    (["train.max_steps=0"], "train.max_steps: must be positive"),
    (["train.max_steps=true"], "train.max_steps: expected int"),
    (["data.seq_len=128"], "data.seq_len: 128 is longer than model.block_size=64 supports"),
    (["model.n_head=5"], "model.n_embd: 64 is not divisible by model.n_head=5"),
    (["model.arch=gtp"], "model.arch: unknown model 'gtp' — did you mean gpt?"),
    (["train.dtype=fp8"], "train.dtype: must be auto, bf16, fp32 or fp16"),
    (["model.ffn=moo"], "model.ffn: unknown feed-forward"),
    (["train.betas=[0.9]"], "train.betas: expected a list of 2 numbers"),
    (["model.n_layer"], "must look like key.sub=value"),
])
def test_bad_values_name_file_and_key(tmp_path, overrides, fragment):
    path = write(tmp_path, GOOD)
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    msg = str(e.value)
    assert fragment in msg and str(path) in msg and "\n" not in msg


def test_missing_required_arch(tmp_path):
    path = write(tmp_path, "model: {n_layer: 2}\n")
    with pytest.raises(ConfigError, match=r"exp.yaml: missing required key model.arch"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = write(tmp_path, "model: {arch: gpt\ntrain: [", "bad.yaml")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line \d+, column \d+\)"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"list.yaml: expected a mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))


def test_cli_error_is_one_line_exit_2(tmp_path):
    path = write(tmp_path, GOOD)
    r = subprocess.run([sys.executable, "scripts/train.py", str(path), "model.n_layers=3"],
                       capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {path}: unknown key model.n_layers — did you mean model.n_layer?"
    r = subprocess.run([sys.executable, "scripts/train.py", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert r.returncode == 2 and "missing.yaml: config file not found" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("path", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_builds_its_model(path):
    import dataclasses

    from minimodels.models import build_model

    from minimodels.config import to_dict

    cfg = load_config(path)
    filled = {k: v for k, v in dict(vocab_size=128, num_labels=8).items() if hasattr(cfg.model, k)}
    if cfg.model.arch == "ptuning":  # its backbone is the run of configs/<name>.yaml, e.g. runs/kb_bert
        backbone = to_dict(load_config(Path("configs") / f"{Path(cfg.model.init_from).name}.yaml"))["model"]
        filled = dict(backbone={**backbone, "vocab_size": 128}, num_relations=10, num_prompt_tokens=6)
    model = build_model(dataclasses.replace(cfg.model, **filled))
    assert sum(p.numel() for p in model.parameters()) > 0
