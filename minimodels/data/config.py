"""The data section of an experiment: where the text comes from, how it is tokenized, which task batches it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from minimodels.schema import need

FEW_SHOT_TASKS = ("package_classification", "package_cloze", "package_prompt", "package_ptuning")  # data.train_examples


@dataclass
class DataConfig:
    source: str = "stdlib"  # "stdlib" (docstrings of this Python's stdlib), "stdlib_code" (its .py files),
    # a .txt/.json/.jsonl file or folder, or a HF dataset name (minimodels/data/corpus.py)
    hf_subset: str | None = None  # configuration name of a Hugging Face dataset (e.g. wikitext-2-raw-v1)
    text_field: str = "text"  # field holding the text in JSON / Hugging Face records
    task: str = "causal_lm"  # which collator/task turns text into batches (minimodels/data/__init__.py TASKS)
    tokenizer: str = "bpe"  # char | bpe (byte-level BPE) | wordpiece, or a trained tokenizer.json to reuse (runs/bert/tokenizer.json)
    vocab_size: int = 4096  # target vocabulary size for bpe / wordpiece (char: ignored)
    seq_len: int | None = None  # tokens per training example; null = model.block_size
    random_offset: bool = False  # causal_lm: cut each train window at a new random offset every time it is drawn
    val_fraction: float = 0.1  # share of source files (or documents) held out for validation
    mask_prob: float = 0.15  # masked LM: share of non-special tokens selected for prediction (BERT)
    whole_word_mask: bool = False  # masked LM: select whole words (all their ## pieces) instead of single tokens
    noise_density: float = 0.15  # span corruption: share of tokens dropped into the targets (T5; GLM [MASK])
    mean_span_length: float = 3.0  # span corruption: mean length of a dropped span (GLM [MASK]: Poisson mean)
    infill_mix: dict | None = None  # GLM blank infilling: share of examples per blank kind {mask, smask, gmask}; null = {mask: 1}
    kb_documents: int = 16  # source kb: documents about each subject in the pretraining corpus (each fact phrased anew)
    image_tokenizer: str | None = None  # text_to_image: a trained VQ-VAE run folder (runs/vqvae) that turns pictures into tokens
    template: list | None = None  # prompt of kb_probe and the package cloze (subject = the docstring), e.g. [3, subject, 3, mask, 3]; null = the task's
    train_examples: int | None = None  # package tasks: keep this many train examples, as many of each class (few-shot); null = all
    few_shot_seed: int = 0  # which train_examples are kept (a seeded draw per class)

    def validate(self) -> None:
        """Raise ConfigError "data.<key>: <problem>" for the first bad value (load_config adds the file)."""
        need(self.source != "", "data.source", "must name stdlib, a generated world, a file or folder, or a dataset")
        need(self.text_field != "", "data.text_field", "must name the field holding the text")
        need(self.tokenizer in ("char", "bpe", "wordpiece") or self.tokenizer.endswith(".json"), "data.tokenizer",
             f"must be char, bpe, wordpiece or a path to a tokenizer.json, got {self.tokenizer!r}")
        need(0 < self.mask_prob < 1, "data.mask_prob", f"must be in (0, 1), got {self.mask_prob}")
        need(0 < self.noise_density < 1, "data.noise_density", f"must be in (0, 1), got {self.noise_density}")
        need(1 <= self.mean_span_length < math.inf, "data.mean_span_length", f"must be >= 1, got {self.mean_span_length}")
        need(self.vocab_size > 0, "data.vocab_size", f"must be positive, got {self.vocab_size}")
        need(0 < self.val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        need(not self.random_offset or self.task == "causal_lm", "data.random_offset",
             f"only data.task causal_lm cuts its windows at random offsets, not {self.task}")
        need((self.image_tokenizer is not None) == (self.task == "text_to_image"), "data.image_tokenizer",
             "must name a trained VQ-VAE run folder (runs/vqvae) for data.task text_to_image" if self.image_tokenizer is None
             else f"only data.task text_to_image reads image tokens, not {self.task}")
        need(self.kb_documents > 0, "data.kb_documents", f"must be positive, got {self.kb_documents}")
        need(self.train_examples is None or self.train_examples > 0, "data.train_examples",
             f"must be positive or null (all), got {self.train_examples}")
        need(self.train_examples is None or self.task in FEW_SHOT_TASKS, "data.train_examples",
             f"only the docstring-package tasks ({', '.join(FEW_SHOT_TASKS)}) keep a few-shot subset, not {self.task}")
        need(self.few_shot_seed >= 0, "data.few_shot_seed", f"must be >= 0, got {self.few_shot_seed}")
        need(self.seq_len is None or self.seq_len > 1, "data.seq_len", f"must be at least 2, got {self.seq_len}")
