"""Fine-tuning tasks for BERT and GLM: which standard-library package does this docstring come from?

Each stdlib docstring is labelled by the top-level package of its file ("asyncio/tasks.py" -> asyncio).
The split is the pretraining corpus's own split, by source file (`split_records` with data.val_fraction),
so no file is in both splits and the val docstrings were never seen in pretraining either.

Only packages (folders of several files) can have docstrings on both sides of a split by file: a one-file
module lands wholly in train or wholly in val. The classes are the packages with at least MIN_TRAIN train
and MIN_VAL val docstrings, the MAX_CLASSES largest by train count; with the default val_fraction 0.1 on
CPython 3.11 that is 8 packages, from asyncio to unittest.

package_classification, for BERT (section 4.1 of the BERT paper): [CLS] docstring [SEP], truncated to seq_len
tokens; the classifier reads the pooled [CLS] vector.
package_cloze, for GLM (section 2.3 of the GLM paper): the same split, classes and labels, the docstring followed
by "This is from the [MASK] package." and each class scored as the fill of the blank (PackageClozeTask).
package_prompt, for BERT's MLM head (PET, Schick & Schuetze 2021): the docstring in a pattern with blanks, each class
scored by its name's word pieces there (PackagePromptTask); package_ptuning: the same with a P-tuning template.

Few-shot: data.train_examples keeps that many train examples, the same number of each class, drawn with
data.few_shot_seed (`few_shot`); val stays the whole split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from minimodels.data.blank_infilling import EOP, MASK_TOKENS, SOP, BlankInfillingTask, special_ids
from minimodels.data.config import DataConfig
from minimodels.data.collate import IGNORE_INDEX, pad_right
from minimodels.data.corpus import DataError, split_records, stdlib_records
from minimodels.data.kb import check_template, fill_template, num_pseudo
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


def few_shot(examples: list, n: int, seed: int, classes: list[str]) -> list:
    """n of the (example, label) pairs, n / len(classes) of each class, drawn by a generator seeded with `seed`;
    in their order in `examples`. n must be a multiple of the classes, each class must have that many."""
    per_class, left = divmod(n, len(classes))
    if left:
        raise DataError(f"data.train_examples: {n} is not a multiple of the {len(classes)} classes "
                        f"(a class-balanced subset keeps as many of each)")
    generator, keep = torch.Generator().manual_seed(seed), []
    for label, name in enumerate(classes):
        of_class = [i for i, (_, y) in enumerate(examples) if y == label]
        if len(of_class) < per_class:
            raise DataError(f"data.train_examples: {n} keeps {per_class} of each class, but {name} has "
                            f"{len(of_class)} train examples")
        keep += [of_class[i] for i in torch.randperm(len(of_class), generator=generator)[:per_class].tolist()]
    return [examples[i] for i in sorted(keep)]


def package_examples(cfg: DataConfig, task: str, tokenizer: Tokenizer, wrap: Callable[[list[int]], list[int]]):
    """The classes (see the module docstring), the files of each split, and the (token ids (T,), label) examples
    of each split: wrap(the docstring's token ids); train only data.train_examples of them (few_shot) if set.
    task: the data.task asking, for the error messages."""
    if cfg.source != "stdlib":
        raise DataError(f"data.source: {task} labels stdlib docstrings by file; needs stdlib, got {cfg.source!r}")
    split = split_records(stdlib_records(), cfg.val_fraction)  # the same split as the pretraining corpus
    classes = choose_packages(split)
    if len(classes) < 2:
        raise DataError(f"data.val_fraction: with {cfg.val_fraction} fewer than 2 packages have {MIN_TRAIN} train "
                        f"and {MIN_VAL} val docstrings")
    label_of = {name: i for i, name in enumerate(classes)}
    files, examples = {}, {}
    for name, records in split.items():
        records = [r for r in records if package_of(r["path"]) in label_of]
        files[name] = sorted({r["path"] for r in records})
        ids = tokenizer.encode_batch([r["text"] for r in records])
        examples[name] = [(torch.tensor(wrap(x)), label_of[package_of(r["path"])]) for x, r in zip(ids, records)]
    if cfg.train_examples is not None:
        examples["train"] = few_shot(examples["train"], cfg.train_examples, cfg.few_shot_seed, classes)
    return classes, files, examples


def class_metrics(scored: Iterable[tuple[Tensor, Tensor]]) -> dict[str, float]:
    """val_loss (mean cross-entropy) and val_acc over (scores (B, num_classes), labels (B,)) batches."""
    nats, correct, count = 0.0, 0, 0
    for scores, labels in scored:
        scores = scores.float()
        nats += F.cross_entropy(scores, labels, reduction="sum").item()
        correct += int((scores.argmax(dim=-1) == labels).sum())
        count += len(labels)
    if count == 0:
        raise ValueError("evaluate got no batches")
    return {"val_loss": nats / count, "val_acc": correct / count}


def majority_baseline(train: list, val: list, num_classes: int) -> dict[str, float]:
    """A model that ignores the text, from (example, label) pairs: val labels scored by the train class
    frequencies, and the accuracy of always answering the most frequent train class (the majority baseline)."""
    counts = torch.bincount(torch.tensor([y for _, y in train]), minlength=num_classes).double()
    labels = torch.tensor([y for _, y in val])
    log_p = counts.log() - counts.sum().log()  # (num_classes,)
    return {"val_loss": -log_p[labels].mean().item(), "val_acc": (labels == counts.argmax()).double().mean().item()}


def cloze_part_b(verbalizers: list[list[int]], sop_id: int, eop_id: int) -> dict[str, Tensor]:
    """Part B of a cloze that scores every class, the same in every row but for p1 (the blank's position):
    segment c + 1 = [sop] v(c), its targets v(c) [eop], p2 = 1 .. len(v(c)) + 1. Each value (S,)."""
    return {
        "input_ids": torch.tensor([t for v in verbalizers for t in [sop_id] + v]),
        "labels": torch.tensor([t for v in verbalizers for t in v + [eop_id]]),
        "block_position_ids": torch.cat([torch.arange(1, len(v) + 2) for v in verbalizers]),
        "segment_ids": torch.cat([torch.full((len(v) + 1,), c + 1) for c, v in enumerate(verbalizers)]),
    }


class PackageClassificationTask(TextTask):
    """Sequence classification of stdlib docstrings by package. Examples are (token ids (T,), label);
    batches carry input_ids (B, T), padding_mask (B, T) and labels (B,). Metrics: val_loss, val_acc."""

    archs = ("bert",)  # the model.arch values whose forward takes these batches (checked by load_config)

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]], seq_len: int, cfg: DataConfig | None = None):
        cfg = cfg or DataConfig()
        if tokenizer.kind != "wordpiece":
            raise DataError(f"data.tokenizer: package_classification needs wordpiece ([CLS], [SEP]), got {tokenizer.kind!r}")
        if seq_len < 3:
            raise DataError(f"data.seq_len: must be at least 3 ([CLS], a token, [SEP]), got {seq_len}")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        self.classes, self.files, examples = package_examples(
            cfg, "package_classification", tokenizer, lambda x: [tokenizer.cls_id] + x[: seq_len - 2] + [tokenizer.sep_id])
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
        return class_metrics((model(**batch).logits, batch["labels"]) for batch in batches)

    def unigram_baseline(self) -> dict[str, float]:
        return majority_baseline(self.train, self.val, len(self.classes))


class PackageClozeTask(TextTask):
    """The same classification for GLM, as a cloze (section 2.3 of the GLM paper; minimodels/models/glm.py):

        Part A   <docstring, cut to fit>\n\nThis is from the[MASK] package.
        Part B   [sop] v(asyncio)  [sop] v(distutils)  ...  one segment per class, each at the blank's position
        labels         v(asyncio) [eop]  v(distutils) [eop] ...

    The verbalizer v(c) is the package's name as the run's BPE spells it after a space (" multiprocessing" ->
    " multi" "proces" "sing"), since byte-level BPE words carry their leading space and a blank's fill starts with
    it (data/blank_infilling.py encode_blanks). score(c) = log P(v(c) [eop] | Part A): the probability GLM gives
    v(c) as the whole fill, not as the start of a longer one: the [eop] is a target, as in pretraining and in GLM's
    own multi-token cloze code. The loss is the cross-entropy of the classes' scores.

    The pattern: a sentence of its own after the docstring, plain English ending in the blank's word "package"
    so the fill is one name; it is short and goes after the docstring so truncation never cuts it.
    All classes are scored in one pass, as separate segments of one Part B: a segment attends to Part A and
    causally to itself only (segment_ids), which costs Part A once per example instead of once per class.

    Examples are (Part A ids (A,), label); batches carry input_ids, position_ids, block_position_ids, labels,
    segment_ids (B, T), part_a_len and class_labels (B,). Every row has the same targets, so the trainer's
    gradient accumulation (weighting micro-batches by their targets) weights them by examples. Metrics:
    val_loss, val_acc."""

    archs = ("glm",)  # the model.arch values whose forward takes these batches (checked by load_config)
    PATTERN = "\n\nThis is from the" + MASK_TOKENS["mask"] + " package."  # after the docstring

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]], seq_len: int, cfg: DataConfig | None = None):
        cfg = cfg or DataConfig()
        if tokenizer.kind not in ("bpe", "char"):
            raise DataError(f"data.tokenizer: package_cloze spells package names as GLM does; use the bpe (or char) "
                            f"tokenizer of the GLM run, got {tokenizer.kind!r}")
        tokenizer.add_special_tokens([*MASK_TOKENS.values(), SOP, EOP])  # already there in a GLM run's tokenizer
        self.tokenizer, self.ids = tokenizer, special_ids(tokenizer)
        pattern = tokenizer.encode(self.PATTERN)
        if seq_len <= len(pattern):
            raise DataError(f"data.seq_len: {seq_len} leaves no room for a docstring before the {len(pattern)} tokens "
                            f"of the pattern {self.PATTERN!r}")
        self.classes, self.files, examples = package_examples(
            cfg, "package_cloze", tokenizer, lambda x: x[: seq_len - len(pattern)] + pattern)
        self.train, self.val = examples["train"], examples["val"]
        self.verbalizers = [tokenizer.encode(" " + name) for name in self.classes]
        self.part_b = cloze_part_b(self.verbalizers, self.ids["sop"], self.ids["eop"])

    def collate(self, examples: list, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        rows, S = [], len(self.part_b["input_ids"])
        for part_a, _ in examples:
            A = len(part_a)
            blank = int((part_a == self.ids["mask"]).nonzero()[-1])  # the pattern's [MASK], the last one
            rows.append({"input_ids": torch.cat([part_a, self.part_b["input_ids"]]),
                         "position_ids": torch.cat([torch.arange(A), torch.full((S,), blank)]),
                         "block_position_ids": torch.cat([torch.zeros(A, dtype=torch.long), self.part_b["block_position_ids"]]),
                         "labels": torch.cat([torch.full((A,), IGNORE_INDEX), self.part_b["labels"]]),
                         "segment_ids": torch.cat([torch.zeros(A, dtype=torch.long), self.part_b["segment_ids"]])})
        pad = {"input_ids": self.tokenizer.pad_id, "labels": IGNORE_INDEX}
        batch = {k: pad_right([r[k] for r in rows], pad.get(k, 0))[0] for k in rows[0]}  # each (B, T)
        batch["part_a_len"] = torch.tensor([len(part_a) for part_a, _ in examples])  # (B,)
        batch["class_labels"] = torch.tensor([label for _, label in examples])  # (B,)
        return batch

    generate = staticmethod(BlankInfillingTask.generate)  # the fine-tuned GLM still fills the blanks of a prompt

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """Mean cross-entropy and accuracy over the val docstrings, from `out.class_scores` (B, num_classes)."""
        return class_metrics((model(**batch).class_scores, batch["class_labels"]) for batch in batches)

    def unigram_baseline(self) -> dict[str, float]:
        return majority_baseline(self.train, self.val, len(self.classes))


@dataclass
class PromptExample:
    input_ids: Tensor  # (T,) [CLS] the pattern around the docstring [SEP]
    prompt_index: Tensor  # (T,) k at pseudo token [P_k], else -1 (everywhere in a manual pattern)
    blanks: Tensor  # (K,) the positions of the K [MASK] tokens
    label: int  # the package's class id


class PackagePromptTask(TextTask):
    """The same classification for BERT's MLM head, as a cloze with a verbalizer (PET, Schick & Schuetze 2021):

        [CLS] <docstring, cut to fit> It is from the [MASK] [MASK] package . [SEP]

    The verbalizer v(c) is the package's name in word pieces ("multiprocessing" -> "multiprocess" "##ing"). The
    pattern has K blanks, K = the most pieces of any name, and class c is scored by the mean log-probability of its
    pieces, piece k at blank k, all in one pass (minimodels/models/bert.py verbalizer_scores): PET's one-pass
    multi-token scoring, averaged rather than summed so that a name is not ranked down for having two pieces.
    Untrained, the pretrained MLM head scores the names (zero-shot); PET fine-tunes the whole BERT on the
    cross-entropy of the scores (without PET's auxiliary MLM loss and distillation).

    data.template is the pattern in kb.py's template form: "subject" the docstring, "mask" the K blanks, other
    strings words; null = TEMPLATE. Examples are PromptExample; batches carry input_ids, padding_mask (B, T),
    blanks (B, K), verbalizers (B, num_classes, K) (-100 after a name's last piece; the same in every row, so
    that the trainer can cut a batch by rows) and class_labels (B,). Metrics: val_loss, val_acc."""

    archs = ("bert",)  # the model.arch values whose forward takes these batches (checked by load_config)
    TEMPLATE = ["subject", "It is from the", "mask", "package ."]  # the manual pattern
    ptuning = False  # the template has trainable pseudo tokens (PackagePTuningTask)

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]], seq_len: int, cfg: DataConfig | None = None):
        cfg = cfg or DataConfig()
        if tokenizer.kind != "wordpiece":
            raise DataError(f"data.tokenizer: the package cloze fills BERT's [MASK] with word pieces; needs the "
                            f"wordpiece tokenizer of a BERT run, got {tokenizer.kind!r}")
        self.tokenizer = tokenizer
        self.template = cfg.template if cfg.template is not None else self.TEMPLATE
        check_template(self.template, causal=False)
        if (num_pseudo(self.template) > 0) != self.ptuning:
            raise DataError(f"data.template: {self.template!r}: " + (
                "P-tuning trains pseudo tokens; give some (ints), e.g. [3, subject, 3, mask, 3]" if self.ptuning else
                "a manual pattern has no pseudo tokens (ints); P-tuning's templates are for data.task package_ptuning"))
        self.classes, self.files, examples = package_examples(cfg, cfg.task, tokenizer, lambda x: x)
        names = [tokenizer.encode(name) for name in self.classes]
        if len(set(map(tuple, names))) < len(names) or any(tokenizer.token_id("unk") in v for v in names):
            raise DataError(f"data.tokenizer: the package names {self.classes} need distinct word pieces, without [UNK]")
        K = max(map(len, names))
        self.verbalizers = torch.tensor([v + [IGNORE_INDEX] * (K - len(v)) for v in names])  # (num_classes, K)
        room = seq_len - len(self.fill([], K)[0])  # docstring tokens that fit around the pattern
        if room < 1:
            raise DataError(f"data.seq_len: {seq_len} leaves no room for a docstring in the {seq_len - room} tokens "
                            f"of the pattern {self.template}")
        self.train, self.val = ([PromptExample(*map(torch.tensor, self.fill(x[:room].tolist(), K)), label)
                                 for x, label in examples[split]] for split in ("train", "val"))

    def fill(self, docstring: list[int], K: int) -> tuple[list[int], list[int], list[int]]:
        """input_ids, prompt_index (T,) of the template around `docstring` (token ids), and the K blanks' positions."""
        ids, index, labels = fill_template(self.template, docstring, [self.tokenizer.mask_id] * K, self.tokenizer)
        return ids, index, [t for t, y in enumerate(labels) if y != IGNORE_INDEX]  # the blanks are the labelled places

    generate = staticmethod(MaskedLMTask.generate)  # BERT still fills the [MASK]s of a prompt

    def collate(self, examples: list[PromptExample], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        ids, real = pad_right([e.input_ids for e in examples], self.tokenizer.pad_id)  # (B, T), (B, T)
        return {"input_ids": ids, "padding_mask": real.long(), "blanks": torch.stack([e.blanks for e in examples]),
                "verbalizers": self.verbalizers.expand(len(examples), -1, -1),  # (B, num_classes, K)
                "class_labels": torch.tensor([e.label for e in examples])}

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """Mean cross-entropy and accuracy over the val docstrings, from `out.class_scores` (B, num_classes)."""
        return class_metrics((model(**batch).class_scores, batch["class_labels"]) for batch in batches)

    def unigram_baseline(self) -> dict[str, float]:
        return majority_baseline([(e, e.label) for e in self.train], [(e, e.label) for e in self.val], len(self.classes))


class PackagePTuningTask(PackagePromptTask):
    """P-tuning on the package cloze (model.arch ptuning over a pretrained BERT, minimodels/models/ptuning.py): the
    cloze of PackagePromptTask in a template with trainable pseudo tokens, default TEMPLATE; one prompt (relation 0)
    for every docstring. Batches add prompt_index (B, T) and relation (B,)."""

    archs = ("ptuning",)
    TEMPLATE = [3, "subject", 3, "mask", 3]
    ptuning = True
    generate = staticmethod(TextTask.generate)  # refused: the run scores classes, it writes no text

    def model_overrides(self) -> dict:
        return {"num_relations": 1, "num_prompt_tokens": num_pseudo(self.template)}

    def collate(self, examples: list[PromptExample], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        return super().collate(examples) | {"prompt_index": pad_right([e.prompt_index for e in examples], -1)[0],
                                            "relation": torch.zeros(len(examples), dtype=torch.long)}
