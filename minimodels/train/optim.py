"""AdamW with decay / no-decay parameter groups (optionally with Adafactor's relative step size), and a
linear-warmup + cosine-decay schedule."""

from __future__ import annotations

import math

import torch

from minimodels.config import TrainConfig


class RelativeAdamW(torch.optim.AdamW):
    """AdamW whose step for each tensor W is multiplied by max(RMS(W), 1e-3): Adafactor's relative step size
    (Shazeer & Stern 2018, section 8), the optimizer T5 was trained with, here on top of Adam's moments as
    nanoT5 (Nawrot 2023) does to pre-train T5 in PyTorch.

        W <- W + max(RMS(W), eps2) * AdamWStep(W),   RMS(W) = sqrt(mean(W^2)),  eps2 = 1e-3

    Adam's step is about lr in every coordinate whatever the tensor's scale, so a tensor initialised with
    std 1 (T5's embedding) moves 1/16 as fast, relative to its size, as one with std 1/16 (T5's 256-wide
    matrices). Scaling by RMS(W) makes every tensor move by about lr of its own size: hence the larger lr
    (nanoT5 uses 2e-2)."""

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        before = [p.clone() for p in params]
        loss = super().step(closure)
        for p, w in zip(params, before):
            rms = w.float().pow(2).mean().sqrt().clamp(min=1e-3)
            p.copy_(w + (p - w) * rms)  # the AdamW step (decay included), rescaled
        return loss


OPTIMIZERS = {"adamw": torch.optim.AdamW, "relative_adamw": RelativeAdamW}


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, fused: bool = False) -> torch.optim.AdamW:
    """Weight decay on every tensor with dim >= 2 — matrices and all embeddings (tokens, positions, segments,
    P-tuning's prompts), as nanoGPT does; none on biases and norm gains (dim < 2).
    fused: PyTorch's fused AdamW, one kernel over all tensors; the default on CPU loops over the tensors
    (`python scripts/bench_train.py` prints both step times for the model it benchmarks)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return OPTIMIZERS[cfg.optimizer](groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr at `step` (counted from 0): linear warmup to 1, then cosine decay to cfg.min_lr_ratio.

        warmup:  (step + 1) / warmup_steps  for step < warmup_steps (1 / warmup_steps at step 0, 1 at warmup_steps - 1)
        decay:   r + (1 - r) * (1 + cos(pi * progress)) / 2,  progress = (step - warmup_steps) / (max_steps - warmup_steps)
                 clipped to [0, 1] (1 at step warmup_steps, r from step max_steps on)
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    r = cfg.min_lr_ratio
    return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
