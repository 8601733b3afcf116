"""YAML -> typed dataclasses, with dotted command-line overrides and one-line errors.

An experiment is one YAML file with four sections:

    model:  {arch: gpt, n_layer: 4, ...}   # fields of the model's own config dataclass (minimodels/models/)
    data:   {source: stdlib, tokenizer: bpe, ...}   # DataConfig (minimodels/data/config.py)
    train:  {max_steps: 1000, lr: 3e-3, ...}
    output: {dir: runs/gpt, ...}

`load_config("configs/gpt.yaml", ["train.max_steps=200"])` returns an `ExperimentConfig`.
Every problem raises `ConfigError` whose message names the file and the key, e.g.
"configs/gpt.yaml: unknown key model.n_layers — did you mean model.n_layer?". Each section checks its own
values (`validate()`); `validate` below adds the file and checks what one section asks of another.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from minimodels.data import TASKS, DataConfig
from minimodels.models import MODEL_CONFIGS
from minimodels.models.inherit import TeacherConfig
from minimodels.schema import ConfigError, apply_override, build, check_keys, need, read_yaml, suggest, to_dict

DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # what train.device and --device accept


@dataclass
class DistributedConfig:
    backend: str = "auto"  # auto (nccl on CUDA, else gloo) | gloo | nccl; used only under torchrun
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the processes (FSDP2) instead of DDP


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
    compile: bool = False  # torch.compile the model (its first step compiles: ~50 s on 1 CPU thread, see README)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)  # options for torchrun (README)
    teacher: TeacherConfig | None = None  # knowledge inheritance: distil from this trained run; null = off

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_interval", "log_interval", "save_interval", "keep_last"):
            need(getattr(self, name) > 0, f"train.{name}", f"must be positive, got {getattr(self, name)}")
        need(self.seed >= 0, "train.seed", f"must be >= 0, got {self.seed}")
        need(self.lr > 0 and math.isfinite(self.lr), "train.lr", f"learning rate must be positive, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        need(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        need(self.optimizer in ("adamw", "relative_adamw"), "train.optimizer",
             f"must be adamw or relative_adamw, got {self.optimizer!r}")
        need(0 <= self.weight_decay < math.inf, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        need(0 <= self.grad_clip < math.inf, "train.grad_clip", f"must be >= 0 (0: no clipping), got {self.grad_clip}")
        need(all(0 <= b < 1 for b in self.betas), "train.betas", f"each beta must be in [0, 1), got {list(self.betas)}")
        need(DEVICE.fullmatch(self.device) is not None, "train.device",
             f"must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        need(self.dtype in ("auto", "bf16", "fp32", "fp16"), "train.dtype",
             f"must be auto, bf16, fp32 or fp16, got {self.dtype!r}")
        need(self.eval_batches is None or self.eval_batches > 0, "train.eval_batches", "must be positive or null")
        need(self.distributed.backend in ("auto", "gloo", "nccl"), "train.distributed.backend",
             f"must be auto, gloo or nccl, got {self.distributed.backend!r}")


@dataclass
class OutputConfig:
    dir: str = "runs/gpt"  # the run folder
    sample_prompt: str = ""  # prompt for the sample printed at the end of training
    sample_tokens: int = 200  # tokens in that sample (0 = no sample)
    plot: bool = True  # write loss.png into the run folder

    def validate(self) -> None:
        need(self.dir != "", "output.dir", "must name the run folder")
        need(self.sample_tokens >= 0, "output.sample_tokens", f"must be >= 0 (0: no sample), got {self.sample_tokens}")
        folder = Path(self.dir)
        for p in [folder, *folder.parents]:  # the run folder and the folders it will be created in
            need(not p.exists() or p.is_dir(), "output.dir", f"{p} is a file, not a folder")


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


def parse(raw: dict, where: str) -> ExperimentConfig:
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


# --------------------------------------------------------------------------- validation


def validate(cfg: ExperimentConfig, where: str) -> None:
    """Each section's own checks, then what one section asks of another."""
    m, t, d = cfg.model, cfg.train, cfg.data

    def check(ok: bool, key: str, problem: str) -> None:
        need(ok, key, problem, where)

    def check_section(section, *context) -> None:
        try:
            section.validate(*context)
        except ValueError as e:  # the section names its own key, e.g. "model.d_model: ..."
            raise ConfigError(f"{where}: {e}") from None

    check_section(m)
    check_section(t)
    if t.teacher is not None:  # its options and the student it can teach
        check_section(t.teacher, m.arch)
    check(d.task in TASKS, "data.task", f"unknown task {d.task!r}{suggest(d.task, TASKS)}")
    archs = TASKS[d.task].archs
    fitting = [name for name, task in TASKS.items() if m.arch in task.archs]
    check(m.arch in archs, "data.task", f"{d.task} makes batches for model.arch {' or '.join(archs)}, "
          f"not {m.arch} (which trains on {' or '.join(fitting)})")
    check_section(d)
    block_size = getattr(m, "block_size", None)
    if block_size is not None and d.seq_len is not None:
        check(d.seq_len <= block_size, "data.seq_len", f"{d.seq_len} is longer than model.block_size={block_size} supports")
    elif block_size is not None:  # the examples are block_size tokens long
        check(block_size > 1, "model.block_size",
              f"must be at least 2 (with data.seq_len null an example is block_size tokens), got {block_size}")
    check_section(cfg.output)


# --------------------------------------------------------------------------- writing


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
