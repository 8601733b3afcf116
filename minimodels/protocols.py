"""What the run and the trainer may ask of a model and a task, declared once with defaults.

A class subclasses its protocol (`class BriVL(nn.Module, TrainedModel)`, `class MaskedLMTask(TextTask)`) and
overrides only what it needs, so every call site is a plain method call a student can grep, never a
`hasattr` check. (A block's feed-forward module has its own, nn/feedforward.py FeedForward.)
"""

from __future__ import annotations

from typing import ClassVar, Protocol

import torch


class TrainedModel(Protocol):
    """What the trainer and the run may ask of any model they train, beyond `forward(**batch)`, whose output has
    `loss` and `metrics` (a dict of detached scalar or 1-D tensors to log, or None)."""

    def begin_step(self, step: int) -> None:
        """Called by the trainer before the forward passes of optimizer step `step` (0-based, counted from the
        start of the run, also after a resume), on the module whose forward the training steps call. Knowledge
        inheritance (minimodels/models/inherit.py) follows its alpha schedule with it. Default: nothing."""
        return None

    def after_optimizer_step(self) -> None:
        """Called by the trainer once per optimizer step, after the step (so after all train.grad_accum
        micro-batches), on the plain model (not its DDP wrapper), on every process. BriVL moves its momentum
        towers towards the freshly updated query towers here. Default: nothing."""
        return None

    def pretrained_parts(self) -> dict[str, str | None]:
        """{submodule name: pretraining run folder or None} that the run loads before training
        (minimodels/train/run.py init_sources). Default: the whole model ("") from model.init_from; BriVL
        names its text tower, P-tuning its frozen LM."""
        return {"": self.config.init_from}


class TextTask(Protocol):
    """What the run asks of a task (minimodels/data/) beyond train, val, collate, evaluate and model_overrides
    (minimodels/data/tasks.py describes that contract). A task subclasses it (`class LMTask(TextTask)`) and
    overrides what differs from the defaults."""

    needs_seq_len: ClassVar[bool] = True  # examples are windows of data.seq_len (or model.block_size) tokens

    def unigram_baseline(self) -> dict[str, float]:
        """What a model that ignores context scores on the val split (logged as step 0). Default: {} (none)."""
        return {}

    def sample(self, model, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> str | None:
        """A text sample from `model` for `prompt` (written to sample.txt at the end of a run). Default: None
        (the task has no sample)."""
        return None
