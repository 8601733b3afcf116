"""A fine-tuning task for BERT: which standard-library package does this docstring come from?

Each stdlib docstring is labelled by the top-level package of its file ("asyncio/tasks.py" -> asyncio).
The split is the pretraining corpus's own split, by source file (`split_records` with data.val_fraction),
so no file is in both splits and the val docstrings were never seen in pretraining either.

Only packages (folders of several files) can have docstrings on both sides of a split by file: a one-file
module lands wholly in train or wholly in val. The classes are the packages with at least MIN_TRAIN train
and MIN_VAL val docstrings, the MAX_CLASSES largest by train count; with the default val_fraction 0.1 on
CPython 3.11 that is 8 packages, from asyncio to unittest.

Examples (section 4.1 of the BERT paper): [CLS] docstring [SEP], truncated to seq_len tokens; the classifier
reads the pooled [CLS] vector.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from minimodels.data.config import DataConfig
from minimodels.data.collate import pad_right
from minimodels.data.corpus import DataError, split_records, stdlib_records
from minimodels.data.mlm import MaskedLMTask
from minimodels.data.tokenizer import Tokenizer
from minimodels.protocols import TextTask

MIN_TRAIN = 50  # docstrings a package needs in train ...
MIN_VAL = 20  # ... and in val, for a usable class
MAX_CLASSES = 20


def package_of(path: str) -> str:
    """Top-level package or module of a stdlib file: "email/mime/text.py" -> "email", "json.py" -> "json"."""
    return path.split("/")[0].removesuffix(".py")


def choose_packages(split: dict[str, list[dict]]) -> list[str]:
    """The class names, sorted (so label ids do not depend on counts): see the module docstring."""
    train = Counter(package_of(r["path"]) for r in split["train"])
    val = Counter(package_of(r["path"]) for r in split["val"])
    usable = [p for p in train if train[p] >= MIN_TRAIN and val[p] >= MIN_VAL]
    return sorted(sorted(usable, key=lambda p: (-train[p], p))[:MAX_CLASSES])


class PackageClassificationTask(TextTask):
    """Sequence classification of stdlib docstrings by package. Examples are (token ids (T,), label);
    batches carry input_ids (B, T), padding_mask (B, T) and labels (B,). Metrics: val_loss, val_acc."""

    archs = ("bert",)  # the model.arch values whose forward takes these batches (checked by load_config)

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]], seq_len: int, cfg: DataConfig | None = None):
        cfg = cfg or DataConfig()
        if cfg.source != "stdlib":
            raise DataError(f"data.source: package_classification labels stdlib docstrings by file; needs stdlib, got {cfg.source!r}")
        if tokenizer.kind != "wordpiece":
            raise DataError(f"data.tokenizer: package_classification needs wordpiece ([CLS], [SEP]), got {tokenizer.kind!r}")
        if seq_len < 3:
            raise DataError(f"data.seq_len: must be at least 3 ([CLS], a token, [SEP]), got {seq_len}")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        split = split_records(stdlib_records(), cfg.val_fraction)  # the same split as the pretraining corpus
        self.classes = choose_packages(split)
        if len(self.classes) < 2:
            raise DataError(f"data.val_fraction: with {cfg.val_fraction} fewer than 2 packages have {MIN_TRAIN} train "
                            f"and {MIN_VAL} val docstrings")
        label_of = {name: i for i, name in enumerate(self.classes)}
        self.files, examples = {}, {}
        for name, records in split.items():
            records = [r for r in records if package_of(r["path"]) in label_of]
            self.files[name] = sorted({r["path"] for r in records})
            ids = tokenizer.encode_batch([r["text"] for r in records])
            examples[name] = [
                (torch.tensor([tokenizer.cls_id] + x[: seq_len - 2] + [tokenizer.sep_id]), label_of[package_of(r["path"])])
                for x, r in zip(ids, records)
            ]
        self.train, self.val = examples["train"], examples["val"]

    def model_overrides(self) -> dict:
        return {"vocab_size": self.tokenizer.vocab_size, "num_labels": len(self.classes)}

    generate = staticmethod(MaskedLMTask.generate)  # a BERT run's [MASK] fill (refused: this head classifies)

    def collate(self, examples: list, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        ids, real = pad_right([ids for ids, _ in examples], self.tokenizer.pad_id)  # (B, T), (B, T)
        labels = torch.tensor([label for _, label in examples])  # (B,)
        return {"input_ids": ids, "padding_mask": real.long(), "labels": labels}

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """Mean cross-entropy and accuracy over the val docstrings, from `out.logits` (B, num_labels)."""
        nats, correct, count = 0.0, 0, 0
        for batch in batches:
            logits = model(**batch).logits.float()  # (B, num_labels)
            nats += F.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
            count += len(batch["labels"])
        if count == 0:
            raise ValueError("evaluate got no batches")
        return {"val_loss": nats / count, "val_acc": correct / count}

    def unigram_baseline(self) -> dict[str, float]:
        """A model that ignores the text: val labels scored by the train class frequencies, and the accuracy
        of always answering the most frequent train class (the majority baseline)."""
        train = torch.bincount(torch.tensor([y for _, y in self.train]), minlength=len(self.classes)).double()
        val = torch.tensor([y for _, y in self.val])
        log_p = train.log() - train.sum().log()  # (num_labels,)
        return {"val_loss": -log_p[val].mean().item(), "val_acc": (val == train.argmax()).double().mean().item()}
