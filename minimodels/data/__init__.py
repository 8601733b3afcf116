"""Data: corpora, tokenizers, collators and tasks.

`build_task(cfg.data, seq_len, run_dir / "tokenizer.json")` is all the Trainer and the scripts need:
it loads the corpus, trains (or reloads) the tokenizer and returns a task object with `train`, `val`,
`collate`, `evaluate`, `sample` (see tasks.py for the contract).
"""

from __future__ import annotations

from pathlib import Path

from minimodels.data.config import DataConfig
from minimodels.data.blank_infilling import BlankInfillingTask
from minimodels.data.corpus import GENERATED, DataError, load_corpus
from minimodels.data.docstring_to_text import DocstringToNameTask, DocstringToPackageTask
from minimodels.data.kb import KBProbeTask, kb_corpus
from minimodels.data.mlm import MaskedLMTask
from minimodels.data.package_classification import (PackageClassificationTask, PackageClozeTask, PackagePromptTask,
                                                    PackagePTuningTask)
from minimodels.data.reconstruction import ImageReconstructionTask
from minimodels.data.records import records_corpus
from minimodels.data.shapes import ShapesRetrievalTask, shapes_corpus
from minimodels.data.span_corruption import SpanCorruptionTask
from minimodels.data.tasks import LMTask
from minimodels.data.text_to_image import TextToImageTask
from minimodels.data.tokenizer import Tokenizer, train_tokenizer

TASKS = {"causal_lm": LMTask}  # data.task -> task class
TASKS["masked_lm"] = MaskedLMTask  # BERT pretraining
TASKS["package_classification"] = PackageClassificationTask  # BERT fine-tuning
TASKS["package_cloze"] = PackageClozeTask  # GLM fine-tuning: the same classes as a blank to fill
TASKS["package_prompt"] = PackagePromptTask  # BERT's MLM head: the same classes as words in blanks (PET)
TASKS["package_ptuning"] = PackagePTuningTask  # P-tuning a frozen BERT on that cloze
TASKS["span_corruption"] = SpanCorruptionTask  # T5 pretraining
TASKS["docstring_to_package"] = DocstringToPackageTask  # T5 fine-tuning
TASKS["docstring_to_name"] = DocstringToNameTask  # T5 fine-tuning (harder)
TASKS["kb_probe"] = KBProbeTask  # P-tuning: LAMA-style probing of a model pretrained on data.source kb
GENERATED["kb"] = kb_corpus  # the synthetic knowledge base's facts as text (minimodels/data/kb.py)
TASKS["image_text"] = ShapesRetrievalTask  # BriVL / CLIP: image-caption retrieval
GENERATED["shapes"] = shapes_corpus  # captions of procedurally drawn scenes (data/shapes.py)
TASKS["blank_infilling"] = BlankInfillingTask  # GLM pretraining
TASKS["image_reconstruction"] = ImageReconstructionTask  # VQ-VAE: the shapes pictures alone (data/reconstruction.py)
TASKS["text_to_image"] = TextToImageTask  # CogView: a GPT writes a picture's VQ-VAE tokens after its caption
GENERATED["records"] = records_corpus  # order records whose blanks the text on both sides decides (data/records.py)

__all__ = ["DataConfig", "DataError", "LMTask", "Tokenizer", "build_task", "load_corpus", "train_tokenizer"]


def build_task(data_cfg: DataConfig, seq_len: int | None, tokenizer_path: str | Path, image_tokenizer=None):
    """The task for `data_cfg`, with examples of `seq_len` tokens. image_tokenizer: the trained VQ-VAE of
    data.image_tokenizer (the run loads it), handed to the one task that reads image tokens, text_to_image.

    If `tokenizer_path` exists (a resumed run, or generating from a saved run) that tokenizer is
    reused; else if `data.tokenizer` names a tokenizer.json (fine-tuning reuses the pretraining run's)
    that one is loaded; otherwise one is trained on the train split only. The task may add special
    tokens (T5's sentinels), so the tokenizer is saved to `tokenizer_path` after the task is built."""
    corpus = load_corpus(data_cfg)
    tokenizer_path = Path(tokenizer_path)
    if tokenizer_path.is_file():
        tokenizer = Tokenizer.load(tokenizer_path)
        if not data_cfg.tokenizer.endswith(".json") and tokenizer.kind != data_cfg.tokenizer:
            raise DataError(f"data.tokenizer: is {data_cfg.tokenizer!r} but {tokenizer_path} holds a {tokenizer.kind!r} tokenizer")
    elif data_cfg.tokenizer.endswith(".json"):
        if not Path(data_cfg.tokenizer).is_file():
            raise DataError(f"data.tokenizer: tokenizer file {data_cfg.tokenizer} not found (train that run first)")
        tokenizer = Tokenizer.load(data_cfg.tokenizer)
    else:
        tokenizer = train_tokenizer(data_cfg.tokenizer, corpus["train"], data_cfg.vocab_size)
    if data_cfg.image_tokenizer is None:
        task = TASKS[data_cfg.task](tokenizer, corpus, seq_len, data_cfg)
    else:  # data.task text_to_image (load_config checks)
        task = TASKS[data_cfg.task](tokenizer, corpus, seq_len, data_cfg, image_tokenizer)
    tokenizer.save(tokenizer_path)
    return task
