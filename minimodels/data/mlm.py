"""Masked language modelling, BERT's pretraining task (Devlin et al. 2018, section 3.1 and appendix A.1).

Of the non-special tokens of each sequence, mask_prob (15%) are selected for prediction; a selected token is
replaced by [MASK] 80% of the time, by a random token 10% of the time and left unchanged 10% of the time,
so that the model cannot tell which visible tokens it will be asked about. The loss covers the selected
positions only (labels are -100 elsewhere).

Whole-word masking (the later "BERT-wwm" release): a word is a token plus the "##" pieces that follow it,
and words are selected as a whole, so the model never sees half of a word it must predict.

Examples are windows of the token stream (documents separated by [SEP]) with [CLS] in front; packing across
document boundaries follows RoBERTa's FULL-SENTENCES input (Liu et al. 2019), which drops next-sentence
prediction.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from minimodels.data.config import DataConfig
from minimodels.data.collate import IGNORE_INDEX, pad_right
from minimodels.data.corpus import DataError
from minimodels.data.tasks import TokenWindows, encode_stream, window_splits
from minimodels.data.tokenizer import Tokenizer
from minimodels.protocols import Generation, TextTask
from minimodels.schema import ConfigError


class MLMCollator:
    """Batches for masked LM: `input_ids` (B, T) with the selected tokens corrupted, `padding_mask` (B, T)
    (1 = real token, 0 = padding) and `labels` (B, T): the original token where selected, -100 elsewhere.

    Per sequence exactly max(1, round(mask_prob * n)) of its n non-special tokens are selected (as in BERT's
    create_pretraining_data.py); with whole_word_mask, words are taken in random order while they still fit
    in that budget (at least one word). All randomness comes from the `generator` argument."""

    def __init__(self, tokenizer: Tokenizer, mask_prob: float = 0.15, whole_word_mask: bool = False):
        if tokenizer.mask_id is None:
            raise DataError(f"data.tokenizer: masked LM needs a [MASK] token (use wordpiece), got {tokenizer.kind!r}")
        self.pad_id, self.mask_id = tokenizer.pad_id, tokenizer.mask_id
        self.mask_prob, self.whole_word_mask = mask_prob, whole_word_mask
        vocab = tokenizer.backend.get_vocab(with_added_tokens=True)  # token -> id
        self.is_special = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)  # (V,)
        self.is_special[sorted(tokenizer.special_ids)] = True
        self.is_piece = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)  # (V,) "##" continuation pieces
        self.is_piece[[i for tok, i in vocab.items() if tok.startswith("##")]] = True
        self.random_ids = (~self.is_special).nonzero().squeeze(1)  # replacements: any non-special token

    def __call__(self, examples: list, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        ids, real = pad_right(examples, self.pad_id)  # (B, T), (B, T)
        selected = self.select(ids, generator)  # (B, T) bool
        # 80% [MASK], 10% a random token, 10% unchanged (appendix A.1)
        u = torch.rand(ids.shape, generator=generator)  # (B, T)
        random_tokens = self.random_ids[torch.randint(len(self.random_ids), ids.shape, generator=generator)]
        inputs = torch.where(selected & (u < 0.8), self.mask_id, ids)
        inputs = torch.where(selected & (u >= 0.8) & (u < 0.9), random_tokens, inputs)
        labels = ids.masked_fill(~selected, IGNORE_INDEX)
        return {"input_ids": inputs, "padding_mask": real.long(), "labels": labels}

    def select(self, ids: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, T) bool: the positions to predict. Special tokens (incl. [PAD], [CLS], [SEP]) are never selected.

        Token masking is whole-word masking where every word is one token, so both run the same steps:
        number the words of each row, shuffle them, and keep the longest shuffled prefix that fits the budget."""
        eligible = ~self.is_special[ids]  # (B, T)
        start = eligible.clone()  # (B, T) True where a word starts
        if self.whole_word_mask:  # a "##" piece continues the word before it (unless that is a special token)
            start[:, 1:] &= ~(self.is_piece[ids[:, 1:]] & eligible[:, :-1])
        word = (start.cumsum(dim=1) - 1).clamp(min=0)  # (B, T) index of each token's word within its row
        n_words = start.sum(dim=1)  # (B,)
        B, T = ids.shape
        word_len = torch.zeros(B, T, dtype=torch.long).scatter_add_(1, word, eligible.long())  # (B, W=T)
        budget = (self.mask_prob * eligible.sum(dim=1)).round().long().clamp(min=1)  # (B,) tokens to select

        # shuffle the words of each row: random priorities, padding words (index >= n_words) last
        priority = torch.rand(B, T, generator=generator).masked_fill(torch.arange(T) >= n_words[:, None], 2.0)
        order = priority.argsort(dim=1)  # (B, W) word indices in shuffled order
        taken = word_len.gather(1, order).cumsum(dim=1)  # (B, W) tokens covered by the first k shuffled words
        keep = taken <= budget[:, None]  # (B, W) in shuffled order
        keep[:, 0] = n_words > 0  # at least one word per row, even if it is longer than the budget
        word_selected = torch.zeros_like(keep).scatter_(1, order, keep)  # (B, W) back in word order
        return eligible & word_selected.gather(1, word)  # (B, T)


class ClsWindows:
    """Examples = [CLS] + a window of seq_len - 1 tokens of the stream (see TokenWindows)."""

    def __init__(self, windows: TokenWindows, cls_id: int):
        self.windows, self.cls_id = windows, cls_id

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> Tensor:
        window = self.windows[operator.index(i)]  # (T - 1,)
        return torch.cat([torch.tensor([self.cls_id]), window])  # (T,)


class MaskedLMTask(TextTask):
    """BERT pretraining: masked LM on windows of the corpus. Metrics over the selected positions:
    val_loss (nats per predicted token) and val_mlm_acc (share predicted exactly). Validation batches are
    masked with a fixed generator per batch (trainer.val_batches), so every evaluation masks the same tokens."""

    archs = ("bert",)  # the model.arch values whose forward takes these batches (checked by load_config)

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]], seq_len: int, cfg: DataConfig | None = None):
        cfg = cfg or DataConfig()
        if tokenizer.kind != "wordpiece":
            raise DataError(f"data.tokenizer: the masked_lm task needs wordpiece ([CLS], [SEP], [MASK]), got {tokenizer.kind!r}")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.train_stream, _ = encode_stream(tokenizer, corpus["train"])  # [SEP] after every document
        self.val_stream, _ = encode_stream(tokenizer, corpus["val"])
        train, val = window_splits(self.train_stream, self.val_stream, seq_len - 1)  # [CLS] makes seq_len
        self.train, self.val = ClsWindows(train, tokenizer.cls_id), ClsWindows(val, tokenizer.cls_id)
        self.collate = MLMCollator(tokenizer, cfg.mask_prob, cfg.whole_word_mask)

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """Loss and accuracy at the selected positions, recomputed from the model's scores there: BERT's
        `out.masked_logits` (N, V)."""
        nats, correct, count = 0.0, 0, 0
        for batch in batches:
            out = model(**batch)
            selected = batch["labels"] != IGNORE_INDEX  # (B, T)
            scores, targets = out.masked_logits.float(), batch["labels"][selected]  # (N, V), (N,)
            nats += F.cross_entropy(scores, targets, reduction="sum").item()
            correct += int((scores.argmax(dim=-1) == targets).sum())
            count += len(targets)
        if count == 0:
            raise ValueError("evaluate got no batches (or no selected tokens)")
        return {"val_loss": nats / count, "val_mlm_acc": correct / count}

    def unigram_baseline(self) -> dict[str, float]:
        """A model that ignores context: every non-special val token scored by the train unigram distribution
        (add-one smoothed), and accuracy of always predicting the most frequent train token. Masking picks
        tokens uniformly, so this is the expected score at the selected positions."""
        special = torch.tensor(sorted(self.tokenizer.special_ids))
        train = self.train_stream[~torch.isin(self.train_stream, special)].long()
        val = self.val_stream[~torch.isin(self.val_stream, special)].long()
        counts = torch.bincount(train, minlength=self.tokenizer.vocab_size).double() + 1  # (V,) add-one
        counts[special] = 0  # special tokens are never targets
        log_p = counts.log() - counts.sum().log()  # (V,)
        return {"val_loss": -log_p[val].mean().item(), "val_mlm_acc": (val == counts.argmax()).double().mean().item()}

    @staticmethod
    @torch.no_grad()
    def generate(model, tokenizer: Tokenizer, request: Generation) -> str:
        """BERT (head mlm) fills each [MASK] of the prompt with one token: one line per [MASK] with its
        request.top_k (default 5) likeliest candidates and their probabilities."""
        request.no_beams()
        if model.config.head != "mlm":
            raise ConfigError(f"generate: this BERT run has model.head={model.config.head!r}; only an mlm head fills masks")
        if tokenizer.mask_id is None:
            raise ConfigError("generate: the run's tokenizer has no [MASK] token")
        ids = [tokenizer.cls_id] + tokenizer.encode(request.prompt) + [tokenizer.sep_id]  # as the MLM task builds inputs
        if len(ids) > model.config.block_size:
            raise ConfigError(f"--prompt is {len(ids)} tokens, longer than model.block_size={model.config.block_size}")
        masked = [t for t, i in enumerate(ids) if i == tokenizer.mask_id]
        if not masked:
            raise ConfigError("--prompt has no [MASK] to fill, e.g. --prompt \"Return the [MASK] of the list.\"")
        device = next(model.parameters()).device
        probs = model(torch.tensor([ids], device=device)).logits[0].float().softmax(-1)  # (T, V)
        lines = []
        for n, t in enumerate(masked):
            p, cand = probs[t].topk(request.top_k or 5)
            lines.append(f"[MASK] {n + 1}: " + "  ".join(f"{tokenizer.decode([c])!r} {q:.3f}"
                                                       for c, q in zip(cand.tolist(), p.tolist())))
        return "\n".join(lines)
