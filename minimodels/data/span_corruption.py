"""Span corruption: T5's pre-training objective (Raffel et al. 2019, sections 3.1.4 and 3.3.4).

About 15% of the tokens of a window are dropped, in spans of mean length 3. Each dropped span is replaced
by one sentinel token in the input; the target lists each sentinel followed by the tokens it stands for:

    original:  Thank you for inviting me to your party last week .
    inputs:    Thank you <extra_id_0> me to your party <extra_id_1> week . <eos>
    targets:   <extra_id_0> for inviting <extra_id_1> last <eos>

Where the spans fall follows T5's `random_spans_noise_mask`: round(L * noise_density) noise tokens in
round(noise / mean_span_length) spans; the noise tokens and the kept tokens are each cut into that many
non-empty runs at random, and the runs alternate, kept first: keep_0 noise_0 keep_1 noise_1 ... (so, as
in T5's code, a window never starts with a span and always ends with one).
The targets are short (about L * 0.15 + spans + 1 tokens), which is what makes this objective cheap.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from minimodels.data.config import DataConfig
from minimodels.data.collate import IGNORE_INDEX, pad_right
from minimodels.data.tasks import SAMPLES_APART, encode_stream, window_splits
from minimodels.data.tokenizer import Tokenizer
from minimodels.protocols import Generation, TextTask

SENTINEL = "<extra_id_{}>"  # T5's names for the sentinel tokens; <extra_id_0> marks the first span


def noise_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, spans) for a window of `length` tokens: at least one of each, and at least one kept token."""
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(round(num_noise / mean_span_length), 1)
    return num_noise, num_spans


def random_segmentation(num_items: int, num_segments: int, generator: torch.Generator | None = None) -> list[int]:
    """Cut num_items in a row into num_segments non-empty runs, uniformly at random: choose num_segments - 1
    of the num_items - 1 gaps between items as cut points. Returns the run lengths (they sum to num_items)."""
    cuts = torch.randperm(num_items - 1, generator=generator)[: num_segments - 1].sort().values + 1
    edges = [0, *cuts.tolist(), num_items]
    return [b - a for a, b in zip(edges, edges[1:])]


def random_spans(length: int, noise_density: float, mean_span_length: float,
                 generator: torch.Generator | None = None) -> list[tuple[int, int]]:
    """The window as alternating runs [(kept_0, noise_0), (kept_1, noise_1), ...]; every run non-empty."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_span_length)
    noise = random_segmentation(num_noise, num_spans, generator)
    kept = random_segmentation(length - num_noise, num_spans, generator)
    return list(zip(kept, noise))


def collate_pairs(inputs: list[Tensor], targets: list[Tensor], pad_id: int) -> dict[str, Tensor]:
    """(input, target) sequences -> input_ids (B, S) padded with pad_id, padding_mask (B, S) True on real
    tokens, labels (B, T) padded with -100. The model builds its decoder input from the labels."""
    input_ids, padding_mask = pad_right(inputs, pad_id)  # (B, S), (B, S)
    labels, _ = pad_right(targets, IGNORE_INDEX)  # (B, T)
    return {"input_ids": input_ids, "padding_mask": padding_mask, "labels": labels}


class SpanCorruptionCollator:
    """Token windows -> span-corrupted encoder inputs and decoder targets, all randomness from `generator`."""

    def __init__(self, sentinel_ids: list[int], eos_id: int, pad_id: int, noise_density: float = 0.15,
                 mean_span_length: float = 3.0):
        self.sentinel_ids, self.eos_id, self.pad_id = sentinel_ids, eos_id, pad_id
        self.noise_density, self.mean_span_length = noise_density, mean_span_length

    def corrupt(self, tokens: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """tokens (L,) -> (inputs, targets): span i becomes sentinel i in the inputs, and "sentinel i, the
        span" in the targets; both end with eos."""
        spans = random_spans(len(tokens), self.noise_density, self.mean_span_length, generator)
        if len(spans) > len(self.sentinel_ids):
            raise ValueError(f"a window of {len(tokens)} tokens makes {len(spans)} spans but the tokenizer has only "
                             f"{len(self.sentinel_ids)} sentinels (data.seq_len is larger than the task was built for)")
        eos = tokens.new_tensor([self.eos_id])
        inputs, targets, pos = [], [], 0
        for i, (kept, noise) in enumerate(spans):
            sentinel = tokens.new_tensor([self.sentinel_ids[i]])
            inputs += [tokens[pos : pos + kept], sentinel]
            targets += [sentinel, tokens[pos + kept : pos + kept + noise]]
            pos += kept + noise
        return torch.cat(inputs + [eos]), torch.cat(targets + [eos])

    def __call__(self, examples: list[Tensor], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        pairs = [self.corrupt(torch.as_tensor(e, dtype=torch.long), generator) for e in examples]
        return collate_pairs([p[0] for p in pairs], [p[1] for p in pairs], self.pad_id)


class SpanCorruptionTask(TextTask):
    """Pre-training an encoder-decoder: windows of `seq_len` tokens of the text, span-corrupted per batch.

    Metrics: val_loss (nats per target token) and val_acc (share of target tokens that are the argmax,
    with the true previous tokens fed to the decoder); val_span_acc is val_acc on the dropped tokens only
    (without sentinels and eos, which are predictable from the format alone) and val_span_loss the loss on
    them: the numbers to compare with BERT's masked-LM accuracy. Validation is deterministic: the Trainer collates
    val batch k with a generator seeded k, so every evaluation corrupts the same spans."""

    archs = ("t5",)  # the model.arch values whose forward takes these batches (checked by load_config)

    def __init__(self, tokenizer: Tokenizer, corpus: dict[str, list[str]], seq_len: int, cfg: DataConfig | None = None):
        cfg = cfg or DataConfig()
        self.tokenizer, self.seq_len = tokenizer, seq_len
        # the sentinels become part of the vocabulary (the tokenizer is saved after the task is built)
        _, max_spans = noise_counts(seq_len, cfg.noise_density, cfg.mean_span_length)
        self.sentinel_ids = tokenizer.add_special_tokens([SENTINEL.format(i) for i in range(max_spans)])
        self.train_stream, _ = encode_stream(tokenizer, corpus["train"])
        self.val_stream, _ = encode_stream(tokenizer, corpus["val"])
        self.train, self.val = window_splits(self.train_stream, self.val_stream, seq_len)
        self.collate = SpanCorruptionCollator(self.sentinel_ids, tokenizer.eos_id, tokenizer.pad_id,
                                              cfg.noise_density, cfg.mean_span_length)

    @torch.no_grad()
    def evaluate(self, model, batches: Iterable[dict[str, Tensor]]) -> dict[str, float]:
        """Target-token loss and accuracy, recomputed from the logits (the model's loss could hold extra terms)."""
        format_ids = torch.tensor(self.sentinel_ids + [self.tokenizer.eos_id])
        sums = {"all": [0.0, 0, 0], "span": [0.0, 0, 0]}  # nats, correct, tokens
        for batch in batches:
            logits = model(**batch).logits.float()  # (B, T, V): position t predicts labels[:, t]
            labels = batch["labels"]
            real = labels != IGNORE_INDEX  # (B, T)
            span = real & ~torch.isin(labels, format_ids.to(labels.device))  # (B, T) dropped tokens only
            nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")  # (B, T), 0 at -100
            hit = logits.argmax(dim=-1) == labels  # (B, T)
            for key, where in (("all", real), ("span", span)):
                sums[key][0] += nll[where].double().sum().item()
                sums[key][1] += int(hit[where].sum())
                sums[key][2] += int(where.sum())
        if sums["all"][2] == 0:
            raise ValueError("evaluate got no batches (or no targets)")
        (nats, correct, tokens), (span_nats, span_correct, span_tokens) = sums["all"], sums["span"]
        return {"val_loss": nats / tokens, "val_acc": correct / tokens,
                "val_span_loss": span_nats / max(span_tokens, 1), "val_span_acc": span_correct / max(span_tokens, 1)}

    @torch.no_grad()
    def sample(self, model, prompt: str, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> str:
        """Corrupt `prompt` (or the first val window) and show the model's fill-in next to the true one."""
        tokens = torch.tensor(self.tokenizer.encode(prompt)) if prompt else self.val[0]
        inputs, targets = self.collate.corrupt(tokens, torch.Generator().manual_seed(0))
        device = next(model.parameters()).device
        out = model.generate(inputs[None].to(device), max_new_tokens=min(max_new_tokens, 2 * len(targets)),
                             eos_token_id=self.tokenizer.eos_id, temperature=temperature, top_k=top_k, generator=generator)

        def show(ids: list[int]) -> str:  # sentinels and eos visible, padding dropped
            return self.tokenizer.decode([i for i in ids if i != self.tokenizer.pad_id], skip_special_tokens=False)

        return f"input:  {show(inputs.tolist())}\nmodel:  {show(out[0].tolist())}\ntarget: {show(targets.tolist())}"

    @staticmethod
    def generate(model, tokenizer: Tokenizer, request: Generation) -> str:
        """T5 writes the output for the prompt as its input (sentinels like <extra_id_0> mark blanks): greedy,
        sampled or by beam search; the output's sentinels and eos are shown, the padding after eos is not."""
        ids = tokenizer.encode(request.prompt) + [tokenizer.eos_id]  # the encoder input ends with eos, as in training
        idx = torch.tensor([ids], device=next(model.parameters()).device)  # (1, T)
        texts = []
        for _ in range(request.num_samples):
            out = model.generate(idx, max_new_tokens=request.max_new_tokens, num_beams=request.num_beams,
                                 eos_token_id=tokenizer.eos_id, temperature=request.temperature, top_k=request.top_k,
                                 top_p=request.top_p, use_cache=request.use_cache, generator=request.generator)
            out_ids = out[0, 1:].tolist()  # (1, 1 + n): the start token (pad), then the output
            out_ids = out_ids[: out_ids.index(tokenizer.eos_id) + 1] if tokenizer.eos_id in out_ids else out_ids
            texts.append(tokenizer.decode(out_ids, skip_special_tokens=False))
        return SAMPLES_APART.join(texts)
