"""Optional methods of a model, declared once with their defaults; the trainer calls them directly.

A model subclasses the protocol (`class BriVL(nn.Module, TrainedModel)`) and overrides only what it needs,
so every call site is a plain method call a student can grep, never a `hasattr` check.
"""

from __future__ import annotations

from typing import Protocol


class TrainedModel(Protocol):
    """What the trainer may ask of any model it trains, beyond `forward(**batch)`."""

    def after_optimizer_step(self) -> None:
        """Called by the trainer once per optimizer step, after the step (so after all train.grad_accum
        micro-batches), on the plain model (not its DDP wrapper), on every process. BriVL moves its momentum
        towers towards the freshly updated query towers here. Default: nothing."""
        return None
