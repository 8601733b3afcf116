"""Autoregressive blank infilling: GLM's pretraining objective (Du et al. 2021, sections 2.1 and 2.3).

Spans of a text are blanked out; the model reads the text with blanks (Part A) and writes the spans
(Part B), each after a start token [sop] and followed by an end token [eop]:

    text      x1 x2 x3 x4 x5 x6                  spans {x3} and {x5, x6}, Part B order: {x5, x6}, {x3}
    inputs    x1 x2 [M] x4 [M] | [S] x5 x6 [S] x3
    p1        0  1  2   3  4   | 4   4  4  2   2     position in Part A; a span takes its blank's position
    p2        0  0  0   0  0   | 1   2  3  1   2     0 in Part A; 1, 2, ... inside a span
    labels    -  -  -   -  -   | x5  x6 [E] x3 [E]   the loss covers Part B only

(The paper numbers positions from 1; here they index an embedding table, so they start at 0.) The spans go
to Part B in a random order, so the model learns every dependency between them, as permutation LMs do.

Three kinds of blanks, each with its own mask token; `data.infill_mix` says how often each is drawn:
- [MASK]  short spans: lengths ~ Poisson(data.mean_span_length), drawn until data.noise_density (15%) of the
          tokens are covered (the last span is cut to meet that exactly); understanding, like BERT;
- [sMASK] whole sentences, drawn until 15% of the tokens are covered (GLM_Sent, for seq2seq-like tasks);
- [gMASK] one suffix of 50%-100% of the text (GLM_Doc): the model learns to write long text after a prefix.
The model (minimodels/models/glm.py) does not care which: the kinds differ only in where the spans fall.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from minimodels.data.config import DataConfig
from minimodels.data.collate import IGNORE_INDEX, pad_right
from minimodels.data.corpus import DataError
from minimodels.data.tasks import SAMPLES_APART, encode_stream, window_splits
from minimodels.data.tokenizer import Tokenizer
from minimodels.protocols import Generation, TextTask

MASK_TOKENS = {"mask": "[MASK]", "smask": "[sMASK]", "gmask": "[gMASK]"}  # blank kind -> its token
SOP, EOP = "[sop]", "[eop]"  # start and end of a span in Part B


def special_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Ids of GLM's tokens in a tokenizer that has them (after BlankInfillingTask added them): the three
    mask kinds, "sop" and "eop". A clear error for a tokenizer of another run."""
    names = {**MASK_TOKENS, "sop": SOP, "eop": EOP}
    ids = {kind: tokenizer.backend.token_to_id(text) for kind, text in names.items()}
    missing = [names[k] for k, i in ids.items() if i is None]
    if missing:
        raise DataError(f"tokenizer: has no GLM tokens {', '.join(missing)} (it was not built by a blank_infilling run)")
    return ids


# --------------------------------------------------------------------------- one example


def blank_infill(tokens: Tensor, spans: list[tuple[int, int]], mask_ids: list[int], order: list[int],
                 sop_id: int, eop_id: int) -> dict[str, Tensor]:
    """Cut `tokens` (L,) into Part A and Part B (the table in the module docstring).

    spans: [(start, end), ...] sorted and not overlapping, each blanked by the token in mask_ids (one per span);
    order: the order of the spans in Part B (a permutation of range(len(spans))).
    Returns input_ids, position_ids, block_position_ids, labels, each (len A + len B,), and part_a_len (1,)."""
    part_a, blank_at, pos = [], [], 0  # blank_at[i] = position of span i's mask token in Part A
    for (start, end), mask_id in zip(spans, mask_ids):
        part_a.append(tokens[pos:start])
        blank_at.append(sum(len(p) for p in part_a))
        part_a.append(tokens.new_tensor([mask_id]))
        pos = end
    part_a = torch.cat(part_a + [tokens[pos:]])  # (A,)
    A = len(part_a)
    ids, p1, p2, labels = [part_a], [torch.arange(A)], [torch.zeros(A, dtype=torch.long)], [torch.full((A,), IGNORE_INDEX)]
    for i in order:
        span = tokens[spans[i][0]:spans[i][1]]  # (n,)
        n = len(span)
        ids.append(torch.cat([span.new_tensor([sop_id]), span]))  # [sop] x_1 .. x_n
        labels.append(torch.cat([span, span.new_tensor([eop_id])]))  # x_1 .. x_n [eop]
        p1.append(torch.full((n + 1,), blank_at[i]))
        p2.append(torch.arange(1, n + 2))
    return {"input_ids": torch.cat(ids), "position_ids": torch.cat(p1), "block_position_ids": torch.cat(p2),
            "labels": torch.cat(labels), "part_a_len": torch.tensor([A])}


# --------------------------------------------------------------------------- where the blanks fall


def place_spans(length: int, lengths: list[int], generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """Put spans of the given lengths into a text of `length` tokens, in that order, uniformly at random
    among the placements that keep at least one token between neighbouring spans. Needs
    sum(lengths) + len(lengths) - 1 <= length."""
    n, kept = len(lengths), length - sum(lengths)
    extra = kept - (n - 1)  # kept tokens free to go anywhere once every inner gap has its one token
    if extra < 0:
        raise ValueError(f"{n} spans of {sum(lengths)} tokens do not fit in {length} tokens with gaps between them")
    # stars and bars: n bars among extra + n slots cut the extra tokens into n + 1 gaps
    bars = torch.randperm(extra + n, generator=generator)[:n].sort().values.tolist()
    gaps = [b - a - 1 for a, b in zip([-1] + bars, bars + [extra + n])]  # (n + 1,) they sum to extra
    spans, pos = [], 0
    for i, span_len in enumerate(lengths):
        pos += gaps[i] + (i > 0)  # inner gaps get their one token back
        spans.append((pos, pos + span_len))
        pos += span_len
    return spans


def mask_spans(length: int, density: float, mean_span_length: float, generator: torch.Generator | None = None):
    """[MASK] blanks: span lengths ~ Poisson(mean_span_length) (at least 1) until round(density * length)
    tokens are covered, then placed at random."""
    budget = min(max(round(density * length), 1), length - 1)
    lengths = []
    while sum(lengths) < budget:
        n = int(torch.poisson(torch.tensor([float(mean_span_length)]), generator=generator).clamp(min=1))
        lengths.append(min(n, budget - sum(lengths)))
    return place_spans(length, lengths, generator)


def sentence_spans(sentence_end: Tensor, blankable: Tensor, density: float,
                   generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """[sMASK] blanks: whole sentences, taken in random order until density of the L tokens are covered.
    sentence_end (L,) bool marks the last token of each sentence (the text's last token ends one too);
    a sentence is blanked only if all its tokens are blankable (L,) (not a document break) and it has 2 tokens
    to half the text (a lone token between a full stop and a break is whitespace). Returns [] when no sentence
    qualifies (the caller falls back to [MASK] blanks)."""
    L = len(sentence_end)
    ends = sentence_end[:-1].nonzero().squeeze(1).tolist() + [L - 1]
    starts = [0] + [e + 1 for e in ends[:-1]]
    candidates = [(s, e + 1) for s, e in zip(starts, ends) if 2 <= e + 1 - s <= L // 2 and bool(blankable[s:e + 1].all())]
    chosen, covered = [], 0
    for i in torch.randperm(len(candidates), generator=generator).tolist():
        if covered >= density * L:
            break
        chosen.append(candidates[i])
        covered += candidates[i][1] - candidates[i][0]
    return sorted(chosen)


def sentence_ends(tokenizer: Tokenizer) -> tuple[Tensor, Tensor]:
    """Per token id (V,): does its text end a sentence (ends in . ! or ?), does it start a new word (starts with
    whitespace). A token ends a sentence when it ends in . ! ? and the next token starts a word; the document
    break (eos) is a sentence of its own."""
    texts = [tokenizer.decode([i], skip_special_tokens=False) for i in range(tokenizer.vocab_size)]
    is_end = torch.tensor([t.rstrip().endswith((".", "!", "?")) for t in texts])  # (V,)
    starts_word = torch.tensor([t[:1].isspace() for t in texts])  # (V,)
    is_end[tokenizer.eos_id] = starts_word[tokenizer.eos_id] = True
    return is_end, starts_word


def gmask_span(length: int, generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """[gMASK] blank: one suffix whose length is uniform over 50%-100% of the text."""
    n = int(torch.randint(math.ceil(length / 2), length + 1, (1,), generator=generator))
    return [(length - n, length)]


# --------------------------------------------------------------------------- batches


class BlankInfillingCollator:
    """Token windows -> GLM batches: per example a blank kind drawn by `mix`, its spans, a random Part B order.
    The batch: input_ids (B, T) right-padded with pad_id, position_ids and block_position_ids (B, T) padded
    with 0, labels (B, T) padded with -100, part_a_len (B,). All randomness from `generator`."""

    def __init__(self, ids: dict[str, int], pad_id: int, eos_id: int, sentence_tables: tuple[Tensor, Tensor],
                 mix: dict[str, float], density: float = 0.15, mean_span_length: float = 3.0):
        self.ids, self.pad_id, self.eos_id = ids, pad_id, eos_id
        self.is_end, self.starts_word = sentence_tables  # (V,) each, from sentence_ends(tokenizer)
        self.kinds, self.weights = list(mix), torch.tensor([float(w) for w in mix.values()])
        self.density, self.mean_span_length = density, mean_span_length

    def infill(self, tokens: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        kind = self.kinds[int(torch.multinomial(self.weights, 1, generator=generator))]
        spans = []
        if kind == "smask":
            ends = self.is_end[tokens] & F.pad(self.starts_word[tokens[1:]], (0, 1), value=True)  # (L,)
            ends[:-1] |= tokens[1:] == self.eos_id  # the document break is a sentence of its own
            spans = sentence_spans(ends, tokens != self.eos_id, self.density, generator)
        elif kind == "gmask":
            spans = gmask_span(len(tokens), generator)
        if not spans:  # [MASK], or no sentence to blank
            kind, spans = "mask", mask_spans(len(tokens), self.density, self.mean_span_length, generator)
        order = torch.randperm(len(spans), generator=generator).tolist()
        return blank_infill(tokens, spans, [self.ids[kind]] * len(spans), order, self.ids["sop"], self.ids["eop"])

    def __call__(self, examples: list[Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        rows = [self.infill(torch.as_tensor(e, dtype=torch.long), generator) for e in examples]
        input_ids, _ = pad_right([r["input_ids"] for r in rows], self.pad_id)  # (B, T)
        labels, _ = pad_right([r["labels"] for r in rows], IGNORE_INDEX)  # (B, T)
        position_ids, _ = pad_right([r["position_ids"] for r in rows], 0)  # (B, T)
        block_position_ids, _ = pad_right([r["block_position_ids"] for r in rows], 0)  # (B, T)
        return {"input_ids": input_ids, "position_ids": position_ids, "block_position_ids": block_position_ids,
                "part_a_len": torch.cat([r["part_a_len"] for r in rows]), "labels": labels}


# --------------------------------------------------------------------------- texts with blanks, for generation


def encode_blanks(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Part A for a text written with blanks ("Return the [MASK] of the list.") and the positions of its blanks.
    A space before a blank is left to the fill (byte-level BPE words carry their leading space, so the spans
    seen in training start with it). A text without a blank gets [gMASK] at the end: continue it."""
    ids = special_ids(tokenizer)
    for token in MASK_TOKENS.values():
        text = text.replace(" " + token, token)
    part_a = tokenizer.encode(text)
    blanks = [i for i, t in enumerate(part_a) if t in {ids[k] for k in MASK_TOKENS}]
    if not blanks:
        part_a, blanks = part_a + [ids["gmask"]], [len(part_a)]
    return part_a, blanks


def show_fills(tokenizer: Tokenizer, part_a: list[int], blanks: list[int], fills: list[list[int]]) -> str:
    """The text of Part A with each blank replaced by its fill, marked «like this»."""
    pieces, pos = [], 0
    for blank, fill in zip(blanks, fills):
        pieces += [tokenizer.decode(part_a[pos:blank]), "«" + tokenizer.decode(fill) + "»"]
        pos = blank + 1
    return "".join(pieces + [tokenizer.decode(part_a[pos:])])


@torch.no_grad()
def fill_blanks(model, tokenizer: Tokenizer, part_a: list[int], blanks: list[int], max_new_tokens: int,
                temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> list[list[int]]:
    """The tokens a GLM (minimodels/models/glm.py) writes into each blank of Part A (see encode_blanks)."""
    if len(part_a) > model.config.block_size:
        raise DataError(f"the text is {len(part_a)} tokens long, more than model.block_size={model.config.block_size}")
    ids = special_ids(tokenizer)
    device = next(model.parameters()).device
    return model.generate(torch.tensor([part_a], device=device), blanks, ids["sop"], ids["eop"], max_new_tokens,
                          temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)


# --------------------------------------------------------------------------- the task


class BlankInfillingTask(TextTask):
    """GLM pretraining: windows of `seq_len` tokens of the text, blanked anew in every batch.

    Metrics over the Part B targets (span tokens and [eop]): val_loss (nats per target) and val_acc (share that
    are the argmax, with the true earlier tokens fed), and val_span_acc over the span tokens alone. Validation is
    deterministic: the Trainer collates val batch k with a generator seeded k, so every evaluation blanks the same
    spans."""

    archs = ("glm",)  # the model.arch values whose forward takes these batches (checked by load_config)

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]], seq_len: int, cfg: DataConfig | None = None):
        cfg = cfg or DataConfig()
        if tokenizer.kind not in ("bpe", "char"):
            raise DataError(f"data.tokenizer: blank infilling writes text back with its spaces; use bpe or char, "
                            f"got {tokenizer.kind!r}")
        mix = cfg.infill_mix if cfg.infill_mix is not None else {"mask": 1.0}
        bad = [k for k in mix if k not in MASK_TOKENS]
        if bad or not mix or any(not isinstance(w, (int, float)) or w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise DataError(f"data.infill_mix: expected weights >= 0 (not all 0) for {', '.join(MASK_TOKENS)}, got {mix}")
        self.tokenizer, self.seq_len = tokenizer, seq_len
        tokenizer.add_special_tokens([*MASK_TOKENS.values(), SOP, EOP])  # saved with the run's tokenizer
        self.ids = special_ids(tokenizer)
        self.train_stream, _ = encode_stream(tokenizer, corpus["train"])
        self.val_stream, _ = encode_stream(tokenizer, corpus["val"])
        self.train, self.val = window_splits(self.train_stream, self.val_stream, seq_len)
        self.collate = BlankInfillingCollator(self.ids, tokenizer.pad_id, tokenizer.eos_id, sentence_ends(tokenizer),
                                              mix, cfg.noise_density, cfg.mean_span_length)

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """Loss and accuracy on the Part B targets, recomputed from their logits (`masked_logits`); val_span_acc
        leaves out the [eop] targets (about a quarter of them with [MASK] blanks, and the easiest)."""
        nats, correct, count, span_correct, span_count = 0.0, 0, 0, 0, 0
        for batch in batches:
            target = batch["labels"] != IGNORE_INDEX  # (B, T)
            scores, labels = model(**batch).masked_logits.float(), batch["labels"][target]  # (N, V), (N,)
            nats += F.cross_entropy(scores, labels, reduction="sum").item()
            hit, span = scores.argmax(dim=-1) == labels, labels != self.ids["eop"]  # (N,) each
            correct, count = correct + int(hit.sum()), count + len(labels)
            span_correct, span_count = span_correct + int(hit[span].sum()), span_count + int(span.sum())
        if count == 0:
            raise ValueError("evaluate got no batches (or no targets)")
        return {"val_loss": nats / count, "val_acc": correct / count, "val_span_acc": span_correct / max(span_count, 1)}

    @torch.no_grad()
    def sample(self, model, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> str:
        """Fill the blanks of `prompt` (e.g. "Return the [MASK] of the list."; without a blank: continue it), or
        blank the first val window with [MASK] spans and show the model's fills next to the true text."""
        if prompt:
            part_a, blanks = encode_blanks(self.tokenizer, prompt)
        else:
            tokens = self.val[0]  # (L,)
            spans = mask_spans(len(tokens), self.collate.density, self.collate.mean_span_length,
                               torch.Generator().manual_seed(0))
            part_a = blank_infill(tokens, spans, [self.ids["mask"]] * len(spans), [], 0, 0)["input_ids"].tolist()
            blanks = [i for i, t in enumerate(part_a) if t == self.ids["mask"]]
        fills = fill_blanks(model, self.tokenizer, part_a, blanks, max_new_tokens, temperature, top_k, generator=generator)
        filled = show_fills(self.tokenizer, part_a, blanks, fills)
        if prompt:
            return filled
        truth = show_fills(self.tokenizer, part_a, blanks, [tokens[a:b].tolist() for a, b in spans])
        return f"model:  {filled}\ntarget: {truth}"

    @staticmethod
    def generate(model, tokenizer: Tokenizer, request: Generation) -> str:
        """GLM fills each [MASK] / [sMASK] / [gMASK] of the prompt with up to request.max_new_tokens tokens
        (without a blank: continues the text)."""
        request.no_beams()
        part_a, blanks = encode_blanks(tokenizer, request.prompt)
        texts = []
        for _ in range(request.num_samples):
            fills = fill_blanks(model, tokenizer, part_a, blanks, request.max_new_tokens, request.temperature,
                                request.top_k, request.top_p, request.generator)
            texts.append(show_fills(tokenizer, part_a, blanks, fills))
        return SAMPLES_APART.join(texts)
