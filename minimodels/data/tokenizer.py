"""A thin wrapper around a Hugging Face `tokenizers.Tokenizer`, in three kinds:

- char       every distinct character of the training text is one token (a WordLevel model over
             single characters); characters never seen in training become <|unk|>;
- bpe        byte-level BPE as in GPT-2: text -> UTF-8 bytes -> merges; any text round-trips exactly;
- wordpiece  BERT's tokenizer: lowercase, strip accents, split on whitespace and punctuation, then
             WordPiece sub-words marked with "##".

Every kind has a padding token and an end-of-document token (`eos`, placed after every document of
the token stream). wordpiece uses BERT's names and adds [UNK] [CLS] [MASK]; its [SEP] is the `eos`.

A tokenizer is saved as one standard `tokenizer.json`; the kind is read back from the model type in it
(WordLevel = char, BPE = bpe, WordPiece = wordpiece), so no extra file is needed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from minimodels.data.corpus import DataError

# role -> token text, per kind. The order is the order of their ids: 0, 1, 2, ...
SPECIAL_TOKENS = {
    "char": {"pad": "<|pad|>", "eos": "<|endoftext|>", "unk": "<|unk|>"},
    "bpe": {"pad": "<|pad|>", "eos": "<|endoftext|>"},
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "eos": "[SEP]", "mask": "[MASK]"},
}
KIND_OF_MODEL = {"WordLevel": "char", "BPE": "bpe", "WordPiece": "wordpiece"}


class Tokenizer:
    """`encode` text to token ids and `decode` them back; knows the ids of its special tokens."""

    def __init__(self, backend: HFTokenizer, kind: str):
        self.backend = backend  # the Hugging Face tokenizer doing the work (offsets, batching, ...)
        self.kind = kind

    # ---- special tokens

    def token_id(self, role: str) -> int | None:
        """Id of the special token playing `role` (pad, eos, unk, cls, mask), None if this kind has none."""
        text = SPECIAL_TOKENS[self.kind].get(role)
        return None if text is None else self.backend.token_to_id(text)

    @property
    def pad_id(self) -> int:
        return self.token_id("pad")

    @property
    def eos_id(self) -> int:
        return self.token_id("eos")

    @property
    def mask_id(self) -> int | None:
        return self.token_id("mask")

    @property
    def cls_id(self) -> int | None:
        return self.token_id("cls")

    @property
    def sep_id(self) -> int | None:  # BERT's separator; only wordpiece has one (it is also its eos)
        return self.eos_id if self.kind == "wordpiece" else None

    @property
    def special_ids(self) -> set[int]:
        """Ids of all special tokens, including ones added later with `add_special_tokens`."""
        return {i for i, tok in self.backend.get_added_tokens_decoder().items() if tok.special}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def add_special_tokens(self, tokens: list[str]) -> list[int]:
        """Append special tokens (e.g. T5's <extra_id_0>...) to the vocabulary; returns their ids.
        They are never split by `encode` and are dropped by `decode` by default."""
        self.backend.add_special_tokens(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    # ---- text <-> ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no special tokens are added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):  # a tensor
            ids = ids.tolist()
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- files

    def save(self, path: str | Path) -> None:
        """Write one standard tokenizer.json (loadable by `tokenizers` and `transformers` too), atomically:
        a reader (another process of a torchrun job) sees the old file or the new one, never half of one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self.backend.save(str(tmp))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        if not Path(path).is_file():
            raise DataError(f"{path}: tokenizer file not found")
        try:
            backend = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise DataError(f"{path}: not a readable tokenizer.json, truncated or corrupt ({e})") from None
        model_type = json.loads(backend.to_str())["model"]["type"]
        if model_type not in KIND_OF_MODEL:
            raise ValueError(f"{path}: unsupported tokenizer model {model_type} (expected {', '.join(KIND_OF_MODEL)})")
        return cls(backend, KIND_OF_MODEL[model_type])

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def train_tokenizer(kind: str, texts: list[str], vocab_size: int) -> Tokenizer:
    """Learn a `kind` tokenizer from `texts`. `vocab_size` (special tokens included) is the target
    for bpe and wordpiece; char ignores it and keeps every character it sees."""
    specials = list(SPECIAL_TOKENS[kind].values()) if kind in SPECIAL_TOKENS else []
    if kind == "char":
        backend = HFTokenizer(models.WordLevel(unk_token="<|unk|>"))
        # every single character (newlines too: [\s\S] matches anything) is its own "word"
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()  # join the characters back without spaces
        trainer = trainers.WordLevelTrainer(vocab_size=10**9, min_frequency=1, special_tokens=specials, show_progress=False)
    elif kind == "bpe":
        backend = HFTokenizer(models.BPE())
        # text -> bytes, each byte shown as a printable character ("Ġ" is the space byte);
        # split into word-like chunks with GPT-2's regex; no prefix space, so decoding is exact
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no text is unknown
            show_progress=False,
        )
    elif kind == "wordpiece":
        backend = HFTokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##"))
        # NFD splits "é" into "e" + accent, StripAccents drops the accent
        backend.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # whitespace and punctuation
        backend.decoder = decoders.WordPiece(prefix="##")
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials, continuing_subword_prefix="##", show_progress=False
        )
    else:
        raise DataError(f"data.tokenizer: unknown kind {kind!r} (valid: {', '.join(SPECIAL_TOKENS)})")
    backend.train_from_iterator(texts, trainer, length=len(texts))
    return Tokenizer(backend, kind)
