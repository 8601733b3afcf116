"""Tasks: what the model-agnostic Trainer needs to know about the data of one experiment.

A task holds the tokenizer, the train and val example sequences, the collator that turns examples into
batches, and the metrics: `evaluate` (val loss, bits per character, ...) and `sample` (text from the model).

The Trainer's side of the contract:
- `task.train[i]` / `task.val[i]` are single examples; the Trainer picks train indices in a shuffled
  order and collates them with `task.collate(examples, generator)`;
- validation batches are collated from `task.val` in index order, batch k = examples [k*B, (k+1)*B):
  `minimodels.train.trainer.val_batches` yields exactly these. `evaluate` may stop early (a cap on eval batches), but
  it relies on this order to know which windows — and so how many characters — it has seen;
- `evaluate` is called under torch.no_grad(), autocast and model.eval(), with batches on the device.
- `archs` names the model.arch values whose forward takes the task's batches; load_config refuses others.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from minimodels.config import DataConfig
from minimodels.data.collate import IGNORE_INDEX, CausalLMCollator
from minimodels.data.corpus import DataError
from minimodels.data.tokenizer import Tokenizer
from minimodels.protocols import TextTask


# --------------------------------------------------------------------------- token streams


def encode_stream(tokenizer: Tokenizer, docs: list[str]) -> tuple[Tensor, Tensor]:
    """All documents as one 1-D token stream, the eos token after every document.

    Returns `ids` (N,) and `chars` (N,): how many characters of the text each token accounts for.
    Token i is charged the characters from the end of token i-1 to its own end (offsets into the
    original text); a token that shares a character with the one before it (byte-level BPE splits
    "é" into two byte tokens) gets 0. eos counts as 1 character (the document break) plus any
    whitespace left after the last token. So chars.sum() == sum(len(doc) + 1 for doc in docs) exactly.
    """
    eos = tokenizer.eos_id

    def tokenize(batch: dict) -> dict:
        ids, chars = [], []
        encodings = tokenizer.backend.encode_batch(batch["text"], add_special_tokens=False)
        for text, enc in zip(batch["text"], encodings):
            counts, covered = [], 0  # covered = characters of `text` accounted for so far
            for _, end in enc.offsets:
                counts.append(max(end - covered, 0))
                covered = max(covered, end)
            ids.append(enc.ids + [eos])
            chars.append(counts + [1 + len(text) - covered])
        return {"ids": ids, "chars": chars}

    # a datasets.Dataset holds the documents and maps the tokenizer over them in batches of 1000;
    # keep_in_memory: nothing is written to the Hugging Face cache folder
    ds = datasets.Dataset.from_dict({"text": docs})
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # under a second: a bar would only clutter the training log
    try:
        ds = ds.map(tokenize, batched=True, remove_columns=["text"], keep_in_memory=True)
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()

    # ds.data is the underlying Arrow table; flatten() concatenates the per-document lists into one
    def column(name: str) -> Tensor:
        return torch.tensor(np.asarray(ds.data.column(name).combine_chunks().flatten()), dtype=torch.int32)

    return column("ids"), column("chars")  # int32: half the memory of int64; examples convert to long


class TokenWindows:
    """Non-overlapping windows of `seq_len` tokens over a token stream: example i = stream[i*T : (i+1)*T].

    keep_last=False (train): only full windows, len = len(stream) // seq_len.
    keep_last=True (val): the windows cover the whole stream; the last one may be shorter (but has at
    least 2 tokens, since a window's first token is never predicted).
    slack=S (train with data.random_offset): example i is stream[i*T : (i+1)*T + S], S extra tokens from which
    `crop_windows` cuts a window of T at a random offset each time the example is drawn.
    """

    def __init__(self, stream: Tensor, seq_len: int, keep_last: bool = False, slack: int = 0):
        self.stream, self.seq_len, self.slack = stream, seq_len, slack
        n = (len(stream) - slack) // seq_len
        if keep_last and len(stream) - n * seq_len >= 2:
            n += 1
        self.n = n

    def bounds(self, i: int) -> tuple[int, int]:
        start = i * self.seq_len
        return start, min(start + self.seq_len + self.slack, len(self.stream))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        i = operator.index(i)  # accepts int, numpy int or a 0-d integer tensor
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range (0..{self.n - 1})")
        start, end = self.bounds(i)
        return self.stream[start:end].long()  # (T,)


def window_splits(train_stream: Tensor, val_stream: Tensor, window: int, random_offset: bool = False
                  ) -> tuple[TokenWindows, TokenWindows]:
    """Train windows (full ones only) and val windows (covering the whole stream) of `window` tokens; a train
    split shorter than one window is an error naming data.seq_len. random_offset: each train example carries
    window - 1 tokens of slack for `crop_windows` (val windows stay fixed, so evaluations compare)."""
    train = TokenWindows(train_stream, window, slack=window - 1 if random_offset else 0)
    if len(train) == 0:
        raise DataError(f"data.seq_len: the train split has {len(train_stream)} tokens, "
                        f"fewer than one window of {window} tokens")
    return train, TokenWindows(val_stream, window, keep_last=True)


# --------------------------------------------------------------------------- causal language modelling


class LMTask(TextTask):
    """Causal language modelling: predict every next token of the text.

    Metrics: val_loss (nats per token), val_ppl = exp(val_loss) and val_bpc (bits per character),
    which — unlike the loss — can be compared between tokenizers.
    """

    archs = ("gpt",)  # the model.arch values whose forward takes these batches (checked by load_config)

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]], seq_len: int, cfg: DataConfig | None = None):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.train_stream, _ = encode_stream(tokenizer, corpus["train"])
        self.val_stream, self.val_chars = encode_stream(tokenizer, corpus["val"])
        random_offset = cfg is not None and cfg.random_offset
        self.train, self.val = window_splits(self.train_stream, self.val_stream, seq_len, random_offset)
        # characters covered by the predicted tokens 1..T-1 of each val window
        self.val_window_chars = [int(self.val_chars[s + 1 : e].sum()) for s, e in map(self.val.bounds, range(len(self.val)))]
        self.collate = CausalLMCollator(tokenizer.pad_id, window=seq_len if random_offset else None)

    def model_overrides(self) -> dict:
        """Model config values the data decides (used where the YAML leaves them null)."""
        return {"vocab_size": self.tokenizer.vocab_size}

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """Token-weighted mean loss over the val batches, and bits per character.

        The loss is recomputed from `out.logits` (B, T, V) rather than read from `out.loss`, because
        a model's loss may include auxiliary terms (e.g. the MoE load-balancing loss)."""
        nats, tokens, windows = 0.0, 0, 0
        for batch in batches:
            out = model(**batch)
            logits = out.logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
            targets = batch["labels"][:, 1:]  # (B, T-1)
            losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
            nats += losses.double().sum().item()  # (B*(T-1),) -> summed in float64; ignored positions are 0
            tokens += int((targets != IGNORE_INDEX).sum())
            windows += batch["input_ids"].shape[0]
        if windows == 0:
            raise ValueError("evaluate got no batches")
        if windows > len(self.val):
            raise ValueError(f"evaluate saw {windows} windows but the val split has only {len(self.val)}")
        chars = sum(self.val_window_chars[:windows])
        val_loss = nats / tokens
        ppl = math.exp(val_loss) if val_loss < 700 else math.inf  # a float overflows above e^709
        return {"val_loss": val_loss, "val_bpc": nats / math.log(2) / chars, "val_ppl": ppl}

    def unigram_baseline(self) -> dict[str, float]:
        """What a model that ignores context scores: see `unigram_baseline` below."""
        return unigram_baseline(self.train_stream, self.val_stream, int(self.val_chars.sum()), self.tokenizer.vocab_size)

    @torch.no_grad()
    def sample(self, model, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int | None = 50,
               generator: torch.Generator | None = None) -> str:
        """Continue `prompt` (or, if empty, start a new document) and return prompt + continuation.
        Document breaks in the output show as the eos token's text, e.g. <|endoftext|>."""
        ids = self.tokenizer.encode(prompt) if prompt else [self.tokenizer.eos_id]
        block_size = model.config.block_size
        if len(ids) > block_size:
            raise ValueError(f"the prompt is {len(ids)} tokens long, more than model.block_size={block_size}")
        idx = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)  # (1, T)
        was_training = model.training
        model.eval()
        out = model.generate(idx, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
        model.train(was_training)
        out_ids = out[0].tolist()  # (T + max_new_tokens,)
        if not prompt:
            out_ids = out_ids[1:]  # drop the eos we started from
        return self.tokenizer.decode(out_ids, skip_special_tokens=False)


def unigram_baseline(train_stream: Tensor, val_stream: Tensor, val_chars: int, vocab_size: int) -> dict[str, float]:
    """Cross-entropy of every val token under the train unigram distribution, add-one smoothed:
    p(v) = (count_train(v) + 1) / (N_train + V). Returned in nats per token and bits per character."""
    counts = torch.bincount(train_stream.long(), minlength=vocab_size).double() + 1  # (V,)
    log_p = counts.log() - counts.sum().log()  # (V,)
    nats = -log_p[val_stream.long()].sum().item()
    val_loss = nats / len(val_stream)
    return {"val_loss": val_loss, "val_bpc": nats / math.log(2) / val_chars, "val_ppl": math.exp(val_loss)}
