"""Fill blanks in held-out docstrings: GLM (length unknown) vs BERT (told the length) vs GPT (left context only).

    python scripts/infill.py runs/glm runs/bert runs/gpt [--blanks 500] [--seed 0] [--json]

The blanks come from the validation split of the stdlib docstrings (whole source files no run trained on).
Each docstring, cut to its first --chars characters, gets at most one blank: 1, 2 or 3 consecutive words
(letters only, separated by single spaces, after at least 3 words of left context). Then each run fills it:

- glm   Part A = the text with one [MASK]; it writes tokens until [eop]: it is not told how long the blank is;
- bert  the blank becomes as many [MASK] tokens as the answer has word pieces; each is its own argmax;
- gpt   the text before the blank (after a document break); it writes as many tokens as the answer has.

A fill is an exact match when it equals the blanked words, compared lowercased and without whitespace (BERT's
tokenizer lowercases and spaces out punctuation). All fills are greedy. "answer bits/char" scores the true answer
instead, fed to the model (teacher-forced): -log2 P(its tokens) per character, which compares across tokenizers
(BERT's is a pseudo-likelihood: each piece given the others masked; GLM's leaves out [eop], as the others are
told the length). Blanks whose text does not fit into every run's block_size are skipped (the count is
printed). Each run may use its own tokenizer. --json prints the table as one JSON object instead:
{"blanks": n, "runs": {run: {"arch", "knows_length", "exact_match": {"1", "2", "3", "all"}, "answer_bits_per_char"}}}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

from minimodels.cli import guarded
from minimodels.config import ConfigError, need
from minimodels.data import load_corpus
from minimodels.data.blank_infilling import special_ids
from minimodels.train.run import load_run

WORD = re.compile(r"[A-Za-z]+")


def make_blanks(docs: list[str], n: int, chars: int, seed: int) -> list[tuple[str, str, str]]:
    """Up to n (before, answer, after) triples, one per docstring: text == before + " " + answer + after."""
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    blanks = []
    for i in order:
        text = docs[i][:chars]
        words = list(WORD.finditer(text))  # maximal runs of letters
        k = rng.choice((1, 2, 3))
        candidates = []
        for j in range(3, len(words) - k + 1):  # at least 3 words of left context
            a, b = words[j].start(), words[j + k - 1].end()
            whole = text[a - 1] == " " and b < len(text) and not (text[b].isalnum() or text[b] == "_")  # not foo_bar, x2
            if whole and re.fullmatch(r"[A-Za-z]+( [A-Za-z]+)*", text[a:b]):
                candidates.append((a, b))
        if candidates:
            a, b = rng.choice(candidates)
            blanks.append((text[:a - 1], text[a:b], text[b:]))
        if len(blanks) == n:
            break
    return blanks


def normal(text: str) -> str:
    return "".join(text.split()).lower()


def nats(logits: torch.Tensor, targets: list[int]) -> float:
    """-sum log P(targets), logits (n, V) scoring them in order."""
    return F.cross_entropy(logits.float(), torch.tensor(targets, device=logits.device), reduction="sum").item()


def fill_glm(model, tok, before: str, after: str, answer: str, device) -> tuple[str, float] | None:
    """(the fill, nats of the true answer's tokens with [sop] + answer fed as Part B), or None if too long."""
    ids = special_ids(tok)
    left, span = tok.encode(before), tok.encode(" " + answer)
    blank, part_a = len(left), left + [ids["mask"]] + tok.encode(after)
    if len(part_a) > model.config.block_size:
        return None
    fill = model.generate(torch.tensor([part_a], device=device), [blank], ids["sop"], ids["eop"], 32)[0]
    A, n = len(part_a), len(span)
    as_tensor = lambda v: torch.tensor([v], device=device)  # noqa: E731
    logits = model(as_tensor(part_a + [ids["sop"]] + span[:-1]), as_tensor(list(range(A)) + [blank] * n),
                   as_tensor([0] * A + list(range(1, n + 1))), as_tensor(A)).logits[0, A:]  # (n, V)
    return tok.decode(fill), nats(logits, span)


def fill_bert(model, tok, before: str, after: str, answer: str, device) -> tuple[str, float] | None:
    """(the argmax at each of the answer's word pieces, each [MASK]; nats of the true pieces there)."""
    span = tok.encode(answer)
    ids = [tok.cls_id] + tok.encode(before) + [tok.mask_id] * len(span) + tok.encode(after) + [tok.sep_id]
    if len(ids) > model.config.block_size:
        return None
    logits = model(torch.tensor([ids], device=device)).logits[0]  # (T, V)
    at = [t for t, i in enumerate(ids) if i == tok.mask_id]
    return tok.decode(logits[at].argmax(-1).tolist()), nats(logits[at], span)


def fill_gpt(model, tok, before: str, after: str, answer: str, device) -> tuple[str, float] | None:
    """(as many greedy tokens as the answer has after the left context; nats of the true answer there)."""
    span = tok.encode(" " + answer)
    ids = [tok.eos_id] + tok.encode(before)
    if len(ids) + len(span) > model.config.block_size:
        return None
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens=len(span), temperature=0.0)
    logits = model(torch.tensor([ids + span[:-1]], device=device)).logits[0, len(ids) - 1:]  # (n, V)
    return tok.decode(out[0, len(ids):].tolist()), nats(logits, span)


FILL = {"glm": fill_glm, "bert": fill_bert, "gpt": fill_gpt}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders of GLM, BERT (head mlm) or GPT runs")
    ap.add_argument("--blanks", type=int, default=500, help="how many blanks (one per docstring)")
    ap.add_argument("--chars", type=int, default=300, help="each docstring is cut to this many characters")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=5, help="print this many blanks with every run's fill")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print the table as one JSON object instead")
    args = ap.parse_args()
    for option, value in (("--blanks", args.blanks), ("--chars", args.chars)):
        need(value > 0, option, f"must be positive, got {value}")
    need(args.examples >= 0, "--examples", f"must be >= 0, got {args.examples}")
    runs = {}
    for path in args.runs:
        cfg, model, tok = load_run(path, args.device)
        if cfg.model.arch not in FILL:
            raise ConfigError(f"{path} is a {cfg.model.arch} run; this script fills blanks with {', '.join(FILL)}")
        runs[path] = (cfg, model, tok)
    data_cfg = next(iter(runs.values()))[0].data
    docs = load_corpus(data_cfg)["val"]
    blanks = make_blanks(docs, args.blanks, args.chars, args.seed)

    fills = defaultdict(dict)  # blank index -> run -> fill text
    answer_nats = defaultdict(dict)  # blank index -> run -> -log P(the true answer), teacher-forced
    skipped = set()
    for path, (cfg, model, tok) in runs.items():
        device = next(model.parameters()).device
        for i, (before, answer, after) in enumerate(blanks):
            out = FILL[cfg.model.arch](model, tok, before, after, answer, device)
            if out is None:
                skipped.add(i)
            else:
                fills[i][path], answer_nats[i][path] = out
    kept = [i for i in range(len(blanks)) if i not in skipped]
    if not kept:
        raise ConfigError(f"--chars: none of the {len(blanks)} blanks fits into every run's block_size (try a smaller --chars)")
    sizes = sorted({len(blanks[i][1].split()) for i in kept})
    by_size = {str(k): [i for i in kept if len(blanks[i][1].split()) == k] for k in sizes} | {"all": kept}
    results = {}  # run -> its row of the table
    for path, (cfg, _, _) in runs.items():
        em = {k: sum(normal(fills[i][path]) == normal(blanks[i][1]) for i in idx) / len(idx) for k, idx in by_size.items()}
        bits = sum(answer_nats[i][path] for i in kept) / math.log(2) / sum(len(blanks[i][1]) for i in kept)
        results[path] = {"arch": cfg.model.arch, "knows_length": cfg.model.arch != "glm", "exact_match": em,
                         "answer_bits_per_char": bits}
    if args.json:
        print(json.dumps({"blanks": len(kept), "runs": results}))
        return
    print(f"{len(kept)} blanks in {len(kept)} held-out docstrings ({len(skipped)} skipped: longer than a block_size); "
          f"source {data_cfg.source}, val split\n")
    for i in kept[:args.examples]:
        before, answer, after = blanks[i]
        print(f"...{before[-60:]} [{answer}] {after[:40]}...".replace("\n", " "))
        for path in runs:
            print(f"    {path}: {fills[i][path]!r}")
    print()
    header = (["run", "arch", "knows the length"] + [f"EM {k} word{'s' * (k > 1)}" for k in sizes]
              + ["EM all", "answer bits/char"])
    rows = [[path, r["arch"], "yes" if r["knows_length"] else "no"]
            + [f"{em:.3f} ({len(by_size[k])})" if k != "all" else f"{em:.3f}" for k, em in r["exact_match"].items()]
            + [f"{r['answer_bits_per_char']:.3f}"] for path, r in results.items()]
    widths = [max(len(str(r[c])) for r in rows + [header]) for c in range(len(header))]
    for r in [header] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    for path, (cfg, _, _) in runs.items():
        if cfg.model.arch == "glm":
            same = sum(len(fills[i][path].split()) == len(blanks[i][1].split()) for i in kept) / max(len(kept), 1)
            print(f"\n{path} wrote as many words as the blank had in {same:.1%} of the blanks (it was not told)")


if __name__ == "__main__":
    sys.exit(guarded(main))
