"""Can a model learn to copy what the text restates? A probe of why GLM fills fewer blanks than GPT (README, GLM).

Every sequence is x SEP x: n random tokens (vocabulary 64), a separator, the same n tokens again, so every token
is restated at a fixed distance. A model that has learned to copy predicts a restated token with loss ~0; one that
has not sits at ln 64 = 4.16. Same size for all (2 blocks, width 128, 4 heads), AdamW at lr 1e-3, fp32, one thread:

    gpt             GPT on x SEP x, scored on the second half (each token copies the one n + 1 back)
    gpt_shift       GPT on x F SEP x, F = 0..8 random tokens: the distance varies, the copy must be found by
                    content (an induction head)
    glm_suffix      GLM with the whole second half as one blank ([gMASK]-like): Part B writes x after Part A x SEP
    glm_single      GLM with one-token blanks (data.noise_density of the tokens): Part A's positions stay those of
                    the text, and each blank is restated n + 1 away in Part A
    glm_spans       GLM's [MASK] blanks, span lengths ~ Poisson(3) (data/blank_infilling.py mask_spans): the text
                    after a span moves left in Part A, and a token inside a span is at position p1 + p2 - 1
    glm_spans_text  as glm_spans, but Part A keeps the text's positions ([M] and its span at the span's start)

The printed loss is on the restated tokens of the step's batch (GLM: Part B targets but [eop]), before the step.

    python scripts/copy_probe.py                                    # every variant, 1000 steps
    python scripts/copy_probe.py glm_single --density 0.45 --batch 96
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from minimodels.data.blank_infilling import blank_infill, mask_spans, place_spans
from minimodels.data.collate import IGNORE_INDEX, pad_right
from minimodels.models.glm import GLM, GLMConfig
from minimodels.models.gpt import GPT, GPTConfig

VARIANTS = ("gpt", "gpt_shift", "glm_suffix", "glm_single", "glm_spans", "glm_spans_text")
N, V, MAX_FILL = 16, 64, 8  # restated tokens, vocabulary, most filler tokens (gpt_shift)
SEP, MASK, SOP, EOP = V, V + 1, V + 2, V + 3


def glm_example(row: torch.Tensor, variant: str, density: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    if variant == "glm_suffix":
        spans = [(N + 1, 2 * N + 1)]
    elif variant == "glm_single":
        spans = place_spans(len(row), [1] * max(1, round(density * len(row))), g)
    else:
        spans = mask_spans(len(row), density, 3.0, g)
    ex = blank_infill(row, spans, [MASK] * len(spans), torch.randperm(len(spans), generator=g).tolist(), SOP, EOP)
    if variant == "glm_spans_text":  # Part A keeps the text's positions: [M] (and Part B's p1) at its span's start
        kept, pos = [], 0
        for start, end in spans:
            kept += [*range(pos, start), start]
            pos = end
        kept += range(pos, len(row))
        A = int(ex["part_a_len"])
        start_of = dict(zip((ex["input_ids"][:A] == MASK).nonzero().squeeze(1).tolist(), (s for s, _ in spans)))
        ex["position_ids"] = torch.tensor(kept + [start_of[int(p)] for p in ex["position_ids"][A:]])
    return ex


def batch(variant: str, size: int, density: float, g: torch.Generator):
    """(model inputs, labels (B, T) with only the restated tokens kept, all labels (B, T) the model trains on)."""
    x = torch.randint(0, V, (size, N), generator=g)  # (B, N)
    if variant.startswith("glm"):
        rows = [glm_example(torch.cat([r, r.new_tensor([SEP]), r]), variant, density, g) for r in x]
        keys = ("input_ids", "position_ids", "block_position_ids")
        inputs = {k: pad_right([r[k] for r in rows], 0)[0] for k in keys}  # (B, T) each
        inputs["part_a_len"] = torch.cat([r["part_a_len"] for r in rows])  # (B,)
        labels = pad_right([r["labels"] for r in rows], IGNORE_INDEX)[0]  # (B, T)
        return inputs, labels.masked_fill(labels == EOP, IGNORE_INDEX), labels
    T = 2 * N + 1 + MAX_FILL
    ids, labels = torch.zeros(size, T, dtype=torch.long), torch.full((size, T), IGNORE_INDEX)
    for b in range(size):
        fill = int(torch.randint(0, MAX_FILL + 1, (1,), generator=g)) if variant == "gpt_shift" else 0
        row = torch.cat([x[b], torch.randint(0, V, (fill,), generator=g), x.new_tensor([SEP]), x[b]])
        ids[b, :len(row)] = row
        labels[b, len(row) - N - 1:len(row) - 1] = x[b]  # position t predicts row[t + 1]: the second copy
    return {"input_ids": ids}, labels, labels


def probe(variant: str, steps: int, density: float, size: int, every: int) -> tuple[list[float], float]:
    """Train one variant; the restated-token loss every `every` steps, and the restated targets per step."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    shape = dict(vocab_size=V + 4, block_size=2 * N + 3 + MAX_FILL, n_layer=2, n_head=4, d_model=128)
    model = GLM(GLMConfig(**shape)) if variant.startswith("glm") else GPT(GPTConfig(**shape))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses, targets = [], 0
    for step in range(steps + 1):
        inputs, restated, labels = batch(variant, size, density, g)
        logits = model(**inputs).logits  # (B, T, V + 4); logits[:, t] scores labels[:, t]
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
        if step % every == 0:
            losses.append(F.cross_entropy(logits.flatten(0, 1), restated.flatten(), ignore_index=IGNORE_INDEX).item())
            print(f"  {variant} step {step}: {losses[-1]:.3f}", flush=True)
        targets += int((restated != IGNORE_INDEX).sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses, targets / (steps + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", help=f"any of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--density", type=float, default=0.15, help="share of the text blanked (glm_single, glm_spans*)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--every", type=int, default=250, help="print the loss every this many steps")
    args = parser.parse_args()
    # not choices=: Python 3.11's argparse rejects an empty nargs="*" list against them
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    rows = [(v, *probe(v, args.steps, args.density, args.batch, args.every)) for v in args.variants or VARIANTS]
    marks = range(0, args.steps + 1, args.every)
    print(f"\nrestated-token loss (nats; ln {V} = {torch.log(torch.tensor(float(V))):.2f} is guessing), "
          f"batch {args.batch}, density {args.density}\n")
    print("| variant | restated targets / step | " + " | ".join(f"step {s}" for s in marks) + " |")
    print("|---|---:|" + "---:|" * len(marks))
    for variant, losses, per_step in rows:
        print(f"| {variant} | {per_step:.0f} | " + " | ".join(f"{x:.3f}" for x in losses) + " |")


if __name__ == "__main__":
    torch.set_num_threads(1)  # the docstring's numbers: one thread
    main()
