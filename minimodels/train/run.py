"""A whole run from a config: data + tokenizer, model, Trainer, plot, sample — everything in one folder.

    <output.dir>/config.yaml      the resolved config (re-running from it reproduces the run)
    <output.dir>/tokenizer.json   the tokenizer trained on the train split
    <output.dir>/metrics.jsonl    one JSON object per event, each with "step"; the last one of a finished
                                  run() holds wall_time_s (the whole call) and train_time_s (Trainer.fit)
    <output.dir>/checkpoints/     step_XXXXXXXX/{model.safetensors, trainer.pt}
    <output.dir>/loss.png         loss curves (and <metric>.png for metrics logged as shares, e.g. MoE expert load)
    <output.dir>/<name>.png       the task's pictures, e.g. reconstructions.png (the VQ-VAE's originals above reconstructions)
    <output.dir>/sample.txt       a text sample from the final model
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

try:
    import fcntl  # POSIX file locks
except ImportError:  # Windows: runs are not locked
    fcntl = None

from minimodels.config import ConfigError, ExperimentConfig, load_config, save_config
from minimodels.data import TASKS, Tokenizer, build_task
from minimodels.data.text_to_image import ImageTokens
from minimodels.models import build_model
from minimodels.models.inherit import Inheritance
from minimodels.moe.parallel import expert_shards
from minimodels.protocols import TrainedModel
from minimodels.schema import to_dict
from minimodels.train.checkpoint import (RunFolderError, checkpoint_dirs, latest_checkpoint, load_pretrained, load_weights,
                                         set_aside)
from minimodels.train.device import resolve_device
from minimodels.train.distributed import World, close_world, init_world
from minimodels.train.metrics import MetricsLog
from minimodels.train.plot import plot_image_rows, plot_metrics, plot_shares
from minimodels.train.trainer import Trainer

RUN_FILES = ("config.yaml", "tokenizer.json", "metrics.jsonl", "loss.png", "sample.txt", "checkpoints")


def prepare(cfg: ExperimentConfig, run_dir: Path):
    """Build the task (corpus + tokenizer) and fill what the model config takes from the data (vocab_size)."""
    fill_backbone(cfg)
    seq_len = cfg.data.seq_len or getattr(cfg.model, "block_size", None)
    if seq_len is None and TASKS[cfg.data.task].needs_seq_len:  # kb_probe builds its own
        raise ConfigError(f"data.seq_len: must be set for model.arch={cfg.model.arch} (it has no block_size)")
    image_tokenizer = load_image_tokenizer(cfg.data.image_tokenizer) if cfg.data.image_tokenizer else None
    task = build_task(cfg.data, seq_len, run_dir / "tokenizer.json", image_tokenizer)
    for key, value in task.model_overrides().items():
        have = getattr(cfg.model, key, None)
        if have is None:
            cfg.model = dataclasses.replace(cfg.model, **{key: value})
        elif key == "num_prompt_tokens" and have != value:  # P-tuning: one prompt vector per pseudo token
            raise ConfigError(f"model.{key}: {have}, but data.template has {value} pseudo tokens; null takes the data's")
        elif have < value:  # a token id / label / relation >= have: IndexError
            what = {"vocab_size": "tokens in the tokenizer", "num_labels": "classes of the task"}.get(key, "relations")
            raise ConfigError(f"model.{key}: {have} is less than the data's {value} {what}; null takes the data's")
    return task


def load_image_tokenizer(source: str | Path):
    """data.image_tokenizer: the VQ-VAE of a trained vqvae run, in eval mode on the CPU (it encodes the pictures
    once before training, and decodes the drawn ones)."""
    source = Path(source)
    if not (source / "config.yaml").is_file() or latest_checkpoint(source) is None:
        raise ConfigError(f"data.image_tokenizer: {source} is not a trained run folder "
                          f"(train it first: python scripts/train.py configs/vqvae.yaml)")
    cfg, model, _ = load_run(source, "cpu")
    if cfg.model.arch != "vqvae":
        raise ConfigError(f"data.image_tokenizer: {source} is a {cfg.model.arch} run, not a vqvae one")
    return model


def load_drawing_run(run_dir: str | Path, device: str = "auto"):
    """A text_to_image (CogView) run, to draw with: (config, GPT in eval mode, tokenizer, its VQ-VAE, the layout of
    its examples, data/text_to_image.py's ImageTokens)."""
    cfg, model, tok = load_run(run_dir, device)
    if cfg.data.task != "text_to_image":
        raise ConfigError(f"{run_dir}: needs a text_to_image run (configs/cogview.yaml), got data.task {cfg.data.task}")
    image_tokenizer = load_image_tokenizer(cfg.data.image_tokenizer)
    return cfg, model, tok, image_tokenizer, ImageTokens.build(tok, image_tokenizer, cfg.data.seq_len or cfg.model.block_size)


def load_clip_run(run_dir: str | Path, device: str = "auto"):
    """A BriVL / CLIP run on the shapes (configs/clip.yaml), to search or rerank with: (config, model in eval mode,
    tokenizer)."""
    cfg, model, tok = load_run(run_dir, device)
    if cfg.model.arch != "brivl" or cfg.data.source != "shapes":
        raise ConfigError(f"{run_dir}: needs a brivl run on data.source shapes (configs/clip.yaml), got "
                          f"{cfg.model.arch} on {cfg.data.source}")
    return cfg, model, tok


def fill_backbone(cfg: ExperimentConfig) -> None:
    """P-tuning drives the LM of its model.init_from run: a null model.backbone becomes that run's model section."""
    if cfg.model.arch != "ptuning" or cfg.model.backbone is not None:
        return
    path = Path(cfg.model.init_from) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"model.init_from: {path} not found (train the backbone first, e.g. configs/kb_bert.yaml)")
    cfg.model = dataclasses.replace(cfg.model, backbone=to_dict(load_config(path))["model"])


def run(cfg: ExperimentConfig, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """Train according to `cfg`; with `resume`, continue from the latest checkpoint in output.dir.
    Under torchrun every process calls this; rank 0 writes the run folder and prints."""
    world = init_world(cfg.train.distributed.backend)
    try:
        with training_in(Path(cfg.output.dir), world.main):
            return run_in_world(cfg, world, resume, overwrite, quiet or not world.main)
    finally:
        close_world(world)


@contextmanager
def training_in(run_dir: Path, main: bool):
    """Hold an exclusive lock on run_dir/.lock while this process (the main one) trains there: a second run into the
    same folder, such as reproduce.py retraining a run it finds unfinished (it overwrites), stops with an error
    instead of deleting the files a live run is writing. The OS drops the lock when the process ends, however."""
    if not main or fcntl is None:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"output.dir: {run_dir} is in use, another process is training in it; wait for it to "
                              "end or pick another output.dir=...") from None
        yield


def run_in_world(cfg: ExperimentConfig, world: World, resume: bool, overwrite: bool, quiet: bool) -> dict:
    start = time.perf_counter()
    resolve_device(cfg.train.device, world)  # a device this machine lacks stops the run before the data is read
    run_dir = Path(cfg.output.dir)
    ckpt = latest_checkpoint(run_dir)
    if resume and ckpt is None:
        raise ConfigError(f"{run_dir}: nothing to resume, no checkpoint in {run_dir / 'checkpoints'}")
    if resume and not (run_dir / "tokenizer.json").is_file():  # a new one might number the tokens differently
        raise RunFolderError(f"{run_dir / 'tokenizer.json'}: missing; the checkpoints were trained with it")
    if not resume and ckpt is not None and not overwrite:
        raise ConfigError(f"output.dir: {run_dir} already holds a run ({ckpt.name}); continue it with "
                          f"--resume {run_dir}, pick another output.dir=..., or pass --overwrite")
    if not resume and world.main:
        # a fresh run replaces the files of an overwritten run, or of one that died before its first checkpoint
        # (checkpoints/ then holds nothing to resume, at most set-aside ones, which stay)
        stale = [run_dir / name for name in RUN_FILES if (run_dir / name).exists() and (overwrite or name != "checkpoints")]
        if ckpt is None and stale:
            print(f"note: {run_dir} holds {', '.join(p.name for p in stale)} of a run without a checkpoint to resume; "
                  "starting over, its tokenizer.json is not reused", file=sys.stderr)
        for path in stale + (list(run_dir.glob("*.png")) if overwrite else []):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)

    random.seed(cfg.train.seed)
    if not world.main:
        world.barrier()  # rank 0 first: it extracts the corpus and trains the tokenizer, the others load them
    task = prepare(cfg, run_dir)
    if world.main:
        world.barrier()
    torch.manual_seed(cfg.train.seed)
    try:
        model = build_model(cfg.model)
    except ValueError as e:  # e.g. "model.moe.num_experts: 6 experts cannot be split evenly over 4 processes"
        raise ConfigError(str(e)) from None
    if not resume:
        for name, source in init_sources(model):
            init_from_run(model.get_submodule(name), Path(source), run_dir, quiet)
    if world.main:
        save_config(cfg, run_dir / "config.yaml")
    objective = None  # the training steps call the model itself, or with train.teacher the model with its teacher
    if cfg.train.teacher:
        teacher = load_teacher(Path(cfg.train.teacher.run), run_dir, cfg.train.device, world)
        objective = Inheritance(model, teacher, cfg.train.teacher)
    trainer = Trainer(model, task, cfg.train, run_dir, quiet=quiet, world=world, objective=objective)
    if resume:
        ckpt = load_intact(trainer, run_dir)
        if not quiet:
            print(f"resumed {run_dir} from {ckpt.name} (step {trainer.step} of {cfg.train.max_steps})")
    else:
        baseline = task.unigram_baseline()
        if baseline and world.main:  # what a model that ignores context scores, logged as step 0 for comparison
            MetricsLog(run_dir / "metrics.jsonl").write(step=0, **{f"unigram_{k}": v for k, v in baseline.items()})
        if not quiet:
            n = sum(p.numel() for p in model.parameters())
            frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
            trained = f" ({n - frozen:,} trained)" if frozen else ""  # P-tuning: the LM is frozen
            print(f"{cfg.model.arch}: {n / 1e6:.2f}M parameters{trained}, {len(task.train)} train / {len(task.val)} val examples, "
                  f"device {trainer.device}, dtype {str(trainer.dtype).removeprefix('torch.')} -> {run_dir}"
                  + (f", {world.size} processes x batch {cfg.train.batch_size}" if world.size > 1 else ""))
            if baseline:
                print("unigram baseline: " + "  ".join(f"{k} {v:.4f}" for k, v in baseline.items()))
    fit_start = time.perf_counter()
    metrics = trainer.fit()
    train_time = time.perf_counter() - fit_start
    text = None
    # the sample (None when the task has none): rank 0, or every process when the model is spread over them
    if cfg.output.sample_tokens > 0 and (world.main or trainer.parallel.collective_forward):
        text = task.sample(model, cfg.output.sample_prompt, cfg.output.sample_tokens,
                           generator=torch.Generator(trainer.device).manual_seed(cfg.train.seed))
    # the task's pictures (the VQ-VAE's reconstructions): rank 0, or every process when the model is sharded
    pictures = task.pictures(model) if cfg.output.plot and (world.main or trainer.parallel.collective_forward) else {}
    if not world.main:
        return metrics
    if cfg.output.plot:
        plot_metrics(run_dir)
        plot_shares(run_dir)
        for name, rows in pictures.items():
            plot_image_rows(rows, run_dir / f"{name}.png")
    if text is not None:
        (run_dir / "sample.txt").write_text(text)
        if not quiet:
            print(f"--- sample ---\n{text}\n--------------")
    MetricsLog(run_dir / "metrics.jsonl", after_step=trainer.step).write(
        step=trainer.step, wall_time_s=round(time.perf_counter() - start, 1), train_time_s=round(train_time, 1))
    if not quiet:
        print("final: " + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + f"  (run folder: {run_dir})")
    return metrics


def load_intact(trainer: Trainer, run_dir: Path) -> Path:
    """Resume `trainer` from the newest checkpoint that reads; unreadable newer ones are set aside (*.damaged),
    saying so."""
    damaged = []
    for ckpt in reversed(checkpoint_dirs(run_dir)):
        try:
            trainer.load(ckpt)
        except RunFolderError as e:
            damaged.append((ckpt, e))
            continue
        for bad, e in damaged if trainer.world.main else []:
            set_aside(bad, "damaged")
            print(f"note: {e}; set aside {bad.name}.damaged, resuming from {ckpt.name}", file=sys.stderr)
        return ckpt
    raise RunFolderError(f"{damaged[0][1]}; no older checkpoint in {run_dir / 'checkpoints'} to resume from")


def init_sources(model: TrainedModel) -> list[tuple[str, str]]:
    """(submodule name, pretraining run folder) pairs to start from: the parts a model names in
    `pretrained_parts()`, by default the whole model (name "") from model.init_from (BriVL: its BERT from
    model.text.init_from; P-tuning: its frozen LM from model.init_from)."""
    return [(name, source) for name, source in model.pretrained_parts().items() if source]


def init_from_run(model, source: Path, run_dir: Path, quiet: bool = False) -> None:
    """Start from the weights of the pretraining run `source` (model.init_from, or a part's): same tokenizer, same
    shapes wherever parameter names match; heads the pretrained model lacks keep their initialisation. An MoE
    layer where `source` has a dense FFN starts with that FFN in every expert and a fresh router (upcycled)."""
    ckpt = latest_checkpoint(source)
    if ckpt is None:
        raise ConfigError(f"model.init_from: {source} holds no checkpoint (train that run first)")
    check_same_tokenizer(source, run_dir, "model.init_from")
    try:
        new, dropped, upcycled = load_pretrained(model, ckpt, expert_shards(model))
    except ValueError as e:
        raise ConfigError(f"model.init_from: {e} (the model sections must match {source}/config.yaml)") from None
    if not quiet:
        print(f"initialised from {ckpt}" + (f"; upcycled (the dense FFN copied into every expert): "
                                            f"{', '.join(upcycled)}" if upcycled else "")
              + (f"; new: {', '.join(new)}" if new else "")
              + (f"; not used: {', '.join(dropped)}" if dropped else ""))


def check_same_tokenizer(source: Path, run_dir: Path, key: str) -> None:
    """A run whose weights we use (key: the YAML key naming it) must share this run's tokenizer."""
    if not (source / "tokenizer.json").is_file():
        raise ConfigError(f"{key}: {source}/tokenizer.json not found (is {source} a run folder?)")
    theirs, ours = Tokenizer.load(source / "tokenizer.json"), Tokenizer.load(run_dir / "tokenizer.json")
    if theirs.backend.get_vocab(with_added_tokens=True) != ours.backend.get_vocab(with_added_tokens=True):
        raise ConfigError(f"{key}: {source}/tokenizer.json is not this run's tokenizer "
                          f"(set data.tokenizer: {source}/tokenizer.json)")


def load_teacher(source: Path, run_dir: Path, device: str, world: World):
    """train.teacher.run as a frozen model in eval mode, on this process's device."""
    if latest_checkpoint(source) is None:
        raise ConfigError(f"train.teacher.run: {source} holds no checkpoint (train the teacher first)")
    check_same_tokenizer(source, run_dir, "train.teacher.run")
    _, teacher, _ = load_run(source, str(resolve_device(device, world)))
    return teacher.requires_grad_(False)


def load_run(run_dir: str | Path, device: str = "auto", overrides: list[str] = ()):
    """Load a finished (or interrupted) run for inference: (config, model in eval mode, tokenizer) on `device`
    (a script's --device)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml", overrides)
    fill_backbone(cfg)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise ConfigError(f"{run_dir}: no checkpoint in {run_dir / 'checkpoints'}")
    dev = resolve_device(device, key="--device")
    model = build_model(cfg.model)
    load_weights(model, ckpt)
    model.to(dev).eval()
    return cfg, model, Tokenizer.load(run_dir / "tokenizer.json")
