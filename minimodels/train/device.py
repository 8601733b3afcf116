"""Where and in which precision a run computes: train.device and train.dtype resolved for this machine, autocast,
and moving a batch there."""

from __future__ import annotations

import contextlib

import torch

from minimodels.config import DEVICE, ConfigError, need
from minimodels.train.distributed import World


def resolve_device(name: str, world: World | None = None, key: str = "train.device") -> torch.device:
    """auto: CUDA, else MPS, else CPU. Under torchrun, "auto" and "cuda" mean this process's GPU, cuda:LOCAL_RANK.
    A name this machine cannot serve raises ConfigError naming `key` (train.device, or a script's --device)."""
    need(DEVICE.fullmatch(name) is not None, key, f"must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device("cuda", world.local_rank if world else 0) if name == "cuda" else torch.device(name)
    if device.type == "cuda":
        need(torch.cuda.is_available(), key, f"{name}: this machine has no CUDA GPU (try auto or cpu)")
        need((device.index or 0) < torch.cuda.device_count(), key,
             f"{device}: this machine has {torch.cuda.device_count()} CUDA GPUs (counting from cuda:0)")
    need(device.type != "mps" or torch.backends.mps.is_available(), key, "mps: this machine has no MPS (Apple GPU)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CPU (about 4x the fp32 matmul rate on AVX-512 bf16 cores) and on CUDA when supported."""
    if name == "auto":
        if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float32
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.dtype: fp16 is only supported on CUDA (on CPU it is ~1000x slower); device is {device}")
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: weights stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device`. To a GPU they go from pinned (page-locked) host memory with
    non_blocking=True, so the copy overlaps the GPU's work; from pageable memory CUDA copies synchronously."""
    if device.type != "cuda":
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def compile_model(module: torch.nn.Module) -> torch.nn.Module:
    """torch.compile(module) as train.compile=true runs it, without AOTAutograd's on-disk cache: in torch 2.13 a
    graph loaded from that cache whose outputs alias each other (the VQ-VAE codebook's) is replayed with garbage
    shapes and crashes the step, on every run after the first (tests/test_combinations.py, compiled rows, run
    twice). Inductor's own cache still spares the C++ compile of a graph seen before."""
    import torch._functorch.config

    torch._functorch.config.enable_autograd_cache = False
    return torch.compile(module)
