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
model: {arch: gpt, n_layer: 2, d_model: 64, n_head: 4, block_size: 64}
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
    (["model.n_head=5"], "model.d_model: 64 is not divisible by model.n_head=5"),
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


@pytest.mark.parametrize("sparse, dense", [("switch_gpt", "gpt"), ("switch_bert", "bert")])
def test_a_moe_config_is_its_dense_twin_plus_experts(sparse, dense):
    """The README compares each MoE config with its dense config at equal steps and data: the resolved configs
    may differ only in model.moe and output.dir (switch_gpt.yaml once lacked gpt.yaml's data.random_offset)."""
    a, b = (to_dict(load_config(Path("configs") / f"{name}.yaml")) for name in (sparse, dense))
    assert a["model"].pop("moe") is not None and b["model"].pop("moe") is None
    del a["output"]["dir"], b["output"]["dir"]
    assert a == b


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


# (config, override, the key the one-line error names); "{tmp}" is a fresh folder holding a file "afile"
RULES = [
    ("gpt", "model.d_ff=-5", "model.d_ff"),
    ("gpt", "model.d_ff=0", "model.d_ff"),  # 0 must not silently mean 4 * d_model
    ("gpt", "model.block_size=1", "model.block_size"),  # a one-token window has nothing to predict
    ("gpt", "model.norm_eps=-1", "model.norm_eps"),
    ("gpt", "model.norm_eps=0", "model.norm_eps"),
    ("gpt", "model.d_model=0", "model.d_model"),
    ("gpt", "model.n_head=3", "model.d_model"),
    ("gpt", "model.dropout=1", "model.dropout"),
    ("gpt", "model.vocab_size=0", "model.vocab_size"),
    ("gpt", "model.attn_impl=fast", "model.attn_impl"),
    ("gpt", "model.activation=tanh", "model.activation"),
    ("gpt", "data.task=masked_lm", "data.task"),  # a GPT cannot read MLM batches
    ("gpt", "data.task=causal", "data.task"),
    ("gpt", "data.seq_len=1", "data.seq_len"),
    ("gpt", "data.mask_prob=1", "data.mask_prob"),
    ("gpt", "data.noise_density=0", "data.noise_density"),
    ("gpt", "data.mean_span_length=0.5", "data.mean_span_length"),
    ("gpt", "data.vocab_size=0", "data.vocab_size"),
    ("gpt", "data.val_fraction=1", "data.val_fraction"),
    ("gpt", "data.kb_documents=0", "data.kb_documents"),
    ("gpt", "data.tokenizer=sentencepiece", "data.tokenizer"),
    ("gpt", "data.source=''", "data.source"),
    ("gpt", "data.text_field=''", "data.text_field"),
    ("gpt", "train.device=banana", "train.device"),
    ("gpt", "train.device=cuda:x", "train.device"),
    ("gpt", "train.seed=-1", "train.seed"),
    ("gpt", "train.batch_size=0", "train.batch_size"),
    ("gpt", "train.grad_accum=0", "train.grad_accum"),
    ("gpt", "train.keep_last=0", "train.keep_last"),
    ("gpt", "train.lr=nan", "train.lr"),
    ("gpt", "train.min_lr_ratio=2", "train.min_lr_ratio"),
    ("gpt", "train.warmup_steps=-1", "train.warmup_steps"),
    ("gpt", "train.weight_decay=-0.1", "train.weight_decay"),
    ("gpt", "train.grad_clip=-1", "train.grad_clip"),
    ("gpt", "train.betas=[0.9, 1.0]", "train.betas"),
    ("gpt", "train.optimizer=sgd", "train.optimizer"),
    ("gpt", "train.eval_batches=0", "train.eval_batches"),
    ("gpt", "train.distributed.backend=mpi", "train.distributed.backend"),
    ("gpt", "train.teacher={run: runs/x, alpha: 2}", "train.teacher.alpha"),
    ("gpt", "train.teacher={run: runs/x, temperature: 0}", "train.teacher.temperature"),
    ("gpt", "output.dir={tmp}/afile", "output.dir"),
    ("gpt", "output.dir={tmp}/afile/run", "output.dir"),
    ("gpt", "output.dir=''", "output.dir"),
    ("gpt", "output.sample_tokens=-1", "output.sample_tokens"),
    ("bert", "data.task=causal_lm", "data.task"),  # trained, then crashed in evaluation
    ("bert", "model.type_vocab_size=0", "model.type_vocab_size"),
    ("bert", "model.d_ff=0", "model.d_ff"),
    ("bert", "model.norm_eps=0", "model.norm_eps"),
    ("bert", "model.head=lm", "model.head"),
    ("bert", "model.block_size=1", "model.block_size"),
    ("t5", "data.task=masked_lm", "data.task"),
    ("t5", "model.max_distance=16", "model.max_distance"),  # num_buckets 32: the exact buckets reach 16
    ("t5", "model.pad_token_id=-1", "model.pad_token_id"),
    ("t5", "model.d_ff=0", "model.d_ff"),
    ("t5", "model.num_buckets=2", "model.num_buckets"),
    ("t5", "model.norm_eps=-1e-6", "model.norm_eps"),
    ("glm", "data.task=span_corruption", "data.task"),
    ("glm", "model.d_ff=0", "model.d_ff"),
    ("glm", "model.norm_eps=0", "model.norm_eps"),
    ("glm", "model.n_layer=0", "model.n_layer"),
    ("cogview", "data.image_tokenizer=null", "data.image_tokenizer"),  # text_to_image needs a VQ-VAE run
    ("gpt", "data.image_tokenizer=runs/vqvae", "data.image_tokenizer"),  # no other task reads image tokens
]


@pytest.mark.parametrize("config, override, key", RULES, ids=[f"{c}:{o}" for c, o, _ in RULES])
def test_each_rule_stops_with_one_line_naming_its_key(tmp_path, config, override, key):
    (tmp_path / "afile").write_text("")
    path = Path("configs") / f"{config}.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(path, [override.replace("{tmp}", str(tmp_path))])
    msg = str(e.value)
    assert msg.startswith(f"{path}: {key}: ") and "\n" not in msg, msg



@pytest.mark.parametrize("config, section", [("gpt", "model"), ("brivl", "model.text")])
def test_a_yaml_saying_n_embd_stops_with_one_line_naming_d_model(tmp_path, config, section):
    """The width is d_model: a YAML written before the rename (or a run's config.yaml) names the new key."""
    raw = yaml.safe_load((Path("configs") / f"{config}.yaml").read_text())
    mapping = raw["model"] if section == "model" else raw["model"]["text"]
    mapping["n_embd"] = mapping.pop("d_model")
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError) as e:
        load_config(old)
    assert str(e.value) == f"{old}: {section}.n_embd: renamed to {section}.d_model"

def test_every_task_trains_the_archs_it_names(tmp_path):
    """Each shipped config pairs an arch with a task that names it; every other arch is refused for that task."""
    from minimodels.data import TASKS
    from minimodels.models import MODEL_CONFIGS

    for path in sorted(Path("configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.model.arch in TASKS[cfg.data.task].archs
    archs = {arch for task in TASKS.values() for arch in task.archs}
    assert archs == set(MODEL_CONFIGS)  # every model trains on some task
    with pytest.raises(ConfigError, match=r"gpt.yaml: data.task: image_text makes batches for model.arch brivl, "
                                          r"not gpt \(which trains on causal_lm or text_to_image\)"):
        load_config("configs/gpt.yaml", ["data.task=image_text"])


def test_duplicate_yaml_keys_are_refused_with_their_lines(tmp_path):
    path = write(tmp_path, "model: {arch: gpt}\ntrain:\n  lr: 1e-3\n  max_steps: 10\n  lr: 3e-3\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(e.value) == f"{path}: not valid YAML (line 5, column 3): duplicate key 'lr' (first on line 3)"
    with pytest.raises(ConfigError, match=r"line 3, column 1\): duplicate key 'model' \(first on line 1\)"):
        load_config(write(tmp_path, "model: {arch: gpt}\ntrain: {}\nmodel: {arch: bert}\n"))


def test_a_folder_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert str(e.value) == f"{tmp_path}: is a folder, not a config file (a run folder's is {tmp_path / 'config.yaml'})"
