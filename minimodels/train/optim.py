"""AdamW with decay / no-decay parameter groups, and a linear-warmup + cosine-decay schedule."""

from __future__ import annotations

import math

import torch

from minimodels.config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """Weight decay on matrices and embeddings (dim >= 2); none on biases and norm gains (dim < 2)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at `step`: linear warmup to 1, then cosine decay to cfg.min_lr_ratio.

        warmup:  step / warmup_steps
        decay:   r + (1 - r) * (1 + cos(pi * progress)) / 2,  progress in [0, 1]
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    r = cfg.min_lr_ratio
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
