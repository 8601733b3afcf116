"""Downstream text-to-text tasks for T5 on the stdlib docstrings: a docstring in, a short text out.

T5 casts every task as text in, text out (Raffel et al. 2019, section 2.4), classification included: the
model writes the label. Both tasks come from the default corpus with no download and split by source file
exactly as the pretraining corpus does (`split_records` with the same data.val_fraction), so the val
docstrings were never seen in pretraining. Val docstrings whose exact text also occurs in a train file
(posixpath.py and ntpath.py share some) are dropped, so none can be answered from memory.

docstring_to_package (configs/t5_finetune.yaml): which stdlib package is this docstring from?

    input:   Return the next item from the asynchronous generator.
    target:  asyncio

  BERT's fine-tuning task (data/package_classification.py, the same 8 packages) written as text to text,
  so the two models can be compared on one task. It is learnable in minutes: the words of a docstring
  ("coroutine", "header", "widget") say a lot about its package.

docstring_to_name: the name of the function, method or class the docstring documents (the last part of the
qualified name, "JSONDecoder.decode" -> "decode"); module docstrings are skipped.

    input:   Return true if the object is a frame object. ...
    target:  isframe

  The harder task: only ~13% of the names appear verbatim in their docstring and ~24% of the val names
  occur in train at all, so it needs the meaning of the words. Measured here, the T5 of configs/t5.yaml
  reached 1.8% exact match after 1200 fine-tuning steps from scratch, below the 2.7% of always answering
  `__init__`: too hard for a few CPU minutes, so it is not the default.

Inputs longer than data.seq_len tokens are cut (eos is kept at the end). Metrics: val_loss and val_acc per
target token (teacher forced), and val_exact_match: the share of val docstrings whose greedy output is the
target exactly.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from minimodels.data.config import DataConfig
from minimodels.data.collate import IGNORE_INDEX
from minimodels.data.corpus import DataError, split_records, stdlib_records
from minimodels.data.package_classification import choose_packages, package_of
from minimodels.data.span_corruption import SpanCorruptionTask, collate_pairs
from minimodels.data.tokenizer import Tokenizer
from minimodels.protocols import TextTask


class DocstringToTextTask(TextTask):
    """Examples are (input ids, target ids) pairs of a docstring and `target(record)`; records for which
    `target` returns None are skipped. Subclasses define `target`."""

    archs = ("t5",)  # the model.arch values whose forward takes these batches (checked by load_config)

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]] | None, seq_len: int, cfg: DataConfig | None = None):
        cfg = cfg or DataConfig()
        if cfg.source != "stdlib":
            raise DataError(f"data.source: task {type(self).__name__} needs the stdlib docstrings (source: stdlib), got {cfg.source!r}")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        split = split_records(stdlib_records(), cfg.val_fraction)  # the corpus's split by source file
        self.choose_targets(split)
        seen = {r["text"] for r in split["train"]}
        self.train = self._pairs(split["train"])
        self.val = self._pairs([r for r in split["val"] if r["text"] not in seen])
        if not self.train or not self.val:
            raise DataError(f"data.val_fraction: {cfg.val_fraction} leaves no train or no val examples")
        self.max_target_len = max(len(t) for _, t in self.val)  # eos included: the longest output to generate

    def choose_targets(self, split: dict[str, list[dict]]) -> None:
        """Look at the split before `target` is called (e.g. to pick the classes)."""

    def target(self, record: dict) -> str | None:
        raise NotImplementedError

    def _pairs(self, records: list[dict]) -> list[tuple[Tensor, Tensor]]:
        eos = self.tokenizer.eos_id
        records = [r for r in records if self.target(r) is not None]
        docs = self.tokenizer.encode_batch([r["text"] for r in records])
        targets = self.tokenizer.encode_batch([self.target(r) for r in records])
        return [(torch.tensor(d[: self.seq_len - 1] + [eos]), torch.tensor(t + [eos])) for d, t in zip(docs, targets)]

    def collate(self, examples: list[tuple[Tensor, Tensor]], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return collate_pairs([x for x, _ in examples], [y for _, y in examples], self.tokenizer.pad_id)

    generate = staticmethod(SpanCorruptionTask.generate)  # T5 writes the output for a prompt alike after either task

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """Loss and token accuracy from one teacher-forced pass; exact match from greedy decoding of the same
        batches (so train.eval_batches caps the generation cost too)."""
        nats, correct, tokens, exact, examples = 0.0, 0, 0, 0, 0
        for batch in batches:
            labels = batch["labels"]  # (B, T): target + eos, -100 after
            logits = model(**batch).logits.float()  # (B, T, V)
            real = labels != IGNORE_INDEX
            nats += F.cross_entropy(logits[real], labels[real], reduction="sum").double().item()
            correct += int((logits.argmax(dim=-1)[real] == labels[real]).sum())
            tokens += int(real.sum())
            out = model.generate(batch["input_ids"], batch["padding_mask"], max_new_tokens=self.max_target_len,
                                 eos_token_id=self.tokenizer.eos_id)  # (B, 1 + n), starts with the decoder start token
            for b in range(len(labels)):
                exact += self._until_eos(out[b, 1:].tolist()) == self._until_eos(labels[b].tolist())
            examples += len(labels)
        if examples == 0:
            raise ValueError("evaluate got no batches")
        return {"val_loss": nats / tokens, "val_acc": correct / tokens, "val_exact_match": exact / examples}

    def _until_eos(self, ids: list[int]) -> list[int]:
        eos = self.tokenizer.eos_id
        return ids[: ids.index(eos)] if eos in ids else ids

    @torch.no_grad()
    def sample(self, model, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> str:
        """The model's answer for the docstring `prompt`, or for 8 val docstrings next to the true answers."""
        eos, device = self.tokenizer.eos_id, next(model.parameters()).device
        if prompt:
            pairs = [(torch.tensor(self.tokenizer.encode(prompt)[: self.seq_len - 1] + [eos]), None)]
        else:
            pairs = [self.val[i] for i in range(0, len(self.val), max(1, len(self.val) // 8))][:8]
        lines = []
        for x, y in pairs:
            out = model.generate(x[None].to(device), max_new_tokens=min(max_new_tokens, 32), eos_token_id=eos,
                                 temperature=temperature, top_k=top_k, generator=generator)
            first_line = self.tokenizer.decode(x.tolist()).strip().splitlines()[0][:70]
            guess = self.tokenizer.decode(self._until_eos(out[0, 1:].tolist()))
            truth = "" if y is None else f"   (true: {self.tokenizer.decode(self._until_eos(y.tolist()))})"
            lines.append(f"{first_line!r} -> {guess}{truth}")
        return "\n".join(lines)


class DocstringToPackageTask(DocstringToTextTask):
    """Target: the top-level package of the docstring's file, among the packages BERT's task uses."""

    def choose_targets(self, split: dict[str, list[dict]]) -> None:
        self.packages = set(choose_packages(split))  # packages with enough docstrings on both sides of the split

    def target(self, record: dict) -> str | None:
        package = package_of(record["path"])
        return package if package in self.packages else None


class DocstringToNameTask(DocstringToTextTask):
    """Target: the last component of the documented object's name; module docstrings are skipped."""

    def target(self, record: dict) -> str | None:
        return record["name"].split(".")[-1] if record["name"] else None
