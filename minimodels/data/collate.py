"""Collators: a list of examples -> one batch, a dict of tensors that is passed as `model(**batch)`.

Every collator is called as `collator(examples, generator)`. The `torch.Generator` is the trainer's
data generator: collators that draw random numbers (BERT's masking, T5's span corruption) must draw
them from it, so that a resumed run sees exactly the same batches. Deterministic collators ignore it.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100  # label value that F.cross_entropy(ignore_index=-100) skips (Hugging Face convention)


def pad_right(examples: list, value: int) -> tuple[Tensor, Tensor]:
    """Stack 1-D sequences of different lengths into (B, T), T = the longest, padding on the right.
    Returns the padded ids (B, T) and a bool mask (B, T) that is True on real tokens."""
    seqs = [torch.as_tensor(e, dtype=torch.long) for e in examples]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), value, dtype=torch.long)  # (B, T)
    real = torch.zeros((len(seqs), T), dtype=torch.bool)  # (B, T)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        real[b, : len(s)] = True
    return ids, real


def crop_windows(examples: list[Tensor], window: int, generator: torch.Generator | None) -> list[Tensor]:
    """data.random_offset: a window of `window` tokens from each example at a uniformly random offset. The model
    sees the same text each epoch cut at new places (as nanoGPT's random batches do), not the same windows again."""
    out = []
    for x in examples:
        start = int(torch.randint(len(x) - window + 1, (1,), generator=generator)) if len(x) > window else 0
        out.append(x[start:start + window])
    return out


class CausalLMCollator:
    """Batches for next-token prediction: `input_ids` (B, T) and `labels` (B, T).

    labels == input_ids except -100 at padding. The model shifts them itself: logits[:, t] is scored
    against labels[:, t + 1]. No attention mask is needed: padding is only ever on the right, and a
    causal model never lets a real token attend to a later (padded) position.
    """

    def __init__(self, pad_id: int, window: int | None = None):
        self.pad_id = pad_id
        self.window = window  # data.random_offset: examples longer than this are cropped at a random offset

    def __call__(self, examples: list, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        if self.window is not None:
            examples = crop_windows(examples, self.window, generator)
        input_ids, real = pad_right(examples, self.pad_id)  # (B, T), (B, T)
        labels = input_ids.masked_fill(~real, IGNORE_INDEX)  # (B, T)
        return {"input_ids": input_ids, "labels": labels}
