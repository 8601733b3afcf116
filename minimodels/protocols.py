"""What the run and the trainer may ask of a model and a task, declared once with defaults.

A class subclasses its protocol (`class BriVL(nn.Module, TrainedModel)`, `class MaskedLMTask(TextTask)`) and
overrides only what it needs, so every call site is a plain method call a student can grep, never a
`hasattr` check. (A block's feed-forward module has its own, nn/feedforward.py FeedForward.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from minimodels.schema import ConfigError


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


@dataclass
class Generation:
    """What `minimodels generate` hands the run's task: the prompt and the command line's options, checked."""

    run_dir: str  # the run folder (a refusal may name it in the command it suggests instead)
    prompt: str = ""  # the text to continue, translate or fill, as the task reads it
    max_new_tokens: int = 100  # GLM: per blank
    temperature: float = 0.8  # 0 = greedy
    top_k: int | None = None  # sample among the k likeliest tokens; BERT: the candidates shown
    top_p: float | None = None  # sample among the likeliest tokens that make up this share of the probability
    num_beams: int = 1  # T5: beam search with this many beams
    num_samples: int = 1  # texts written, one after another from the same generator
    use_cache: bool = True  # False: recompute the whole context every step
    generator: torch.Generator | None = None  # seeded by --seed, on the model's device

    def no_beams(self) -> None:
        """Refuse --num-beams > 1: only T5's tasks search with beams."""
        if self.num_beams > 1:
            raise ConfigError(f"--num-beams {self.num_beams}: beam search is for T5 runs")


class TextTask(Protocol):
    """What a run and `minimodels generate` ask of a task (minimodels/data/), beyond train, val, collate and
    evaluate. A task subclasses it (`class LMTask(TextTask)`) and overrides what differs from the defaults."""

    tokenizer: Any  # the run's Tokenizer (minimodels/data/tokenizer.py)
    needs_seq_len: ClassVar[bool] = True  # examples are windows of data.seq_len (or model.block_size) tokens

    def model_overrides(self) -> dict:
        """Model config values the data decides, used where the YAML leaves them null. Default: the vocabulary size."""
        return {"vocab_size": self.tokenizer.vocab_size}

    def pictures(self, model) -> dict[str, list[tuple[str, Any]]]:
        """Pictures of what the trained model does, which a run draws into <output.dir>/<name>.png (output.plot):
        {name: [(row label, images (N, 3, H, W) uint8), ...]}, one row of images per entry. Default: none."""
        return {}

    @staticmethod
    def generate(model, tokenizer, request: Generation) -> str:
        """`minimodels generate`: what the run's model writes for request.prompt, as printed. A static method:
        generate loads a run's model and tokenizer, not its corpus, so there is no task object.
        Default: refuse (ConfigError), for a model that writes no text."""
        raise ConfigError(f"generate: a {model.config.arch} run writes no text")

    def unigram_baseline(self) -> dict[str, float]:
        """What a model that ignores context scores on the val split (logged as step 0). Default: {} (none)."""
        return {}

    def sample(self, model, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> str | None:
        """A text sample from `model` for `prompt` (written to sample.txt at the end of a run). Default: None
        (the task has no sample)."""
        return None
