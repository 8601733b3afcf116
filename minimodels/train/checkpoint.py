"""Checkpoints: one folder per step, written atomically (temp folder + rename), keep the last N.

    <run>/checkpoints/step_00000500/model.safetensors   model weights (safetensors)
    <run>/checkpoints/step_00000500/trainer.pt          optimizer, scheduler, step, RNG states, data position

A checkpoint found unreadable or poisoned (its weights give a non-finite loss) is renamed
step_00000500.damaged / step_00000500.nonfinite: kept on disk, no longer a checkpoint.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, save_model

from minimodels.moe.config import upcycle
from minimodels.moe.parallel import localize


class RunFolderError(RuntimeError):
    """A file of a run folder is missing, truncated or corrupt; the message names it."""


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run (folders step_<8 digits>), oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())


def checkpoint_step(ckpt: Path) -> int:
    return int(ckpt.name[5:])


def set_aside(ckpt: Path, why: str) -> Path:
    """Rename checkpoint folder `ckpt` to <name>.<why> (damaged, nonfinite): kept, but no longer resumed from."""
    target = ckpt.with_name(f"{ckpt.name}.{why}")
    shutil.rmtree(target, ignore_errors=True)  # set aside before, at the same step
    os.replace(ckpt, target)
    return target


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, trainer_state: dict, keep_last: int,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write model.safetensors (the model's weights, or `weights`: the whole model's tensors gathered from the
    processes of an expert-parallel run) and trainer.pt."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if weights is None:
        save_model(model, str(tmp / "model.safetensors"))
    else:
        save_file(stored_once(weights, model), str(tmp / "model.safetensors"))
    torch.save(trainer_state, tmp / "trainer.pt")
    if final.exists():  # re-saving the same step (e.g. the final step after resume)
        shutil.rmtree(final)
    os.replace(tmp, final)  # atomic: a reader sees the old set of checkpoints or the new one, never half a folder
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def stored_once(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Tied weights (GPT's lm_head.weight is tok_emb.weight) under one name only, as safetensors requires:
    the alphabetically first, the one safetensors' save_model keeps."""
    names_of = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    aliases = {name for names in names_of.values() for name in sorted(names)[1:]}
    return {name: t.contiguous() for name, t in state.items() if name not in aliases}


def unreadable(path: Path, error: Exception) -> RunFolderError:
    reason = str(error).split(". ")[0]  # torch.load goes on for several sentences
    return RunFolderError(f"{path}: missing, truncated or corrupt ({reason})")


def read_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's model.safetensors, by name."""
    path = Path(ckpt) / "model.safetensors"
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise unreadable(path, e) from None


def load_weights(model: torch.nn.Module, ckpt: str | Path, shards: dict[str, slice] | None = None) -> None:
    """Load model.safetensors into `model`, which must fit it exactly. shards (expert parallelism,
    moe/parallel.py expert_shards): the file holds the whole model; this process takes its own experts from it."""
    missing, unexpected, _ = load_pretrained(model, ckpt, shards)  # upcycling leaves the routers missing
    if missing or unexpected:
        raise ValueError(f"{ckpt}/model.safetensors does not fit this model: missing {missing}, unexpected {unexpected}")


def load_trainer_state(ckpt: str | Path) -> dict:
    path = Path(ckpt) / "trainer.pt"
    try:
        return torch.load(path, weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as e:
        raise unreadable(path, e) from None


def load_pretrained(model: torch.nn.Module, ckpt: str | Path, shards: dict[str, slice] | None = None
                    ) -> tuple[list[str], list[str], list[str]]:
    """Copy the weights of checkpoint `ckpt` into `model` wherever the names match (fine-tuning from a
    pretrained run); an MoE layer of `model` that is a dense FFN in the checkpoint gets that FFN in every
    expert (sparse upcycling, minimodels/moe/config.py upcycle). Returns (new, dropped, upcycled):
    parameters of `model` the checkpoint does not have (a fresh classifier head, the routers of upcycled
    layers keep their initialisation), checkpoint tensors `model` has no place for (e.g. the MLM head) and
    the upcycled MoE layers. A name present in both with different shapes raises ValueError naming it.
    shards: see load_weights."""
    state, upcycled = upcycle(read_weights(ckpt), model)
    state = localize(state, shards or {})
    own = model.state_dict()
    for name, tensor in state.items():
        if name in own and own[name].shape != tensor.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} in {ckpt} but {tuple(own[name].shape)} in this model")
    matched = {name: t for name, t in state.items() if name in own}
    if not matched:
        raise ValueError(f"no parameter name of {ckpt} matches this model (is it the same model.arch?)")
    model.load_state_dict(matched, strict=False)
    loaded = {own[name].data_ptr() for name in matched}  # tied weights are saved once: count them as loaded
    new = [name for name, t in own.items() if name not in matched and t.data_ptr() not in loaded]
    dropped = [name for name in state if name not in own]
    return new, dropped, upcycled
