"""Learning parity with a reference: train two models from the same init on the same batches, as the trainer does."""

import torch

from minimodels.config import TrainConfig
from minimodels.train.optim import build_optimizer


def loss_curve(model: torch.nn.Module, forward, batches: list) -> list[float]:
    """The loss at each step of training `model` on `batches` with the trainer's AdamW groups and gradient
    clipping (TrainConfig's defaults); forward(batch) returns an output with .loss."""
    cfg = TrainConfig()
    opt, curve = build_optimizer(model, cfg), []
    for batch in batches:
        loss = forward(batch).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        curve.append(loss.item())
    return curve
