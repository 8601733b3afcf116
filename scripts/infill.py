"""Fill held-out blanks: GLM and T5 (length unknown), BERT (told the length, and not), GPT (left context only).

    python scripts/infill.py runs/glm runs/bert runs/gpt [--blanks 500] [--seed 0] [--json]
    python scripts/infill.py runs/glm_records runs/bert_records runs/t5_records runs/gpt_records   # both sides decide

Where the blanks come from depends on the runs' data.source (the same for all of them):
- stdlib: the validation split of the docstrings (whole source files no run trained on). Each docstring, cut to
  its first --chars characters, gets at most one blank: 1, 2 or 3 consecutive words (letters only, separated by
  single spaces, after at least 3 words of left context);
- records (minimodels/data/records.py): one blank per held-out order record, a whole field value of 1-4 words.
  The record's summary, right of the blank, restates it, and nothing left of it does: a model that sees both
  sides can copy it; one that sees only the left can at best guess (the "left-only chance" printed).

Then each run fills every blank, greedily:
- glm   Part A = the text with one [MASK]; it writes tokens until [eop]: it is not told how long the blank is;
- t5    the text with one sentinel, as in span corruption; it writes the span until the next sentinel or eos:
        not told the length either;
- bert  told: the blank becomes as many [MASK] tokens as the answer has word pieces; each is its own argmax.
        Not told (a second row, "(not told)"): the usual way to ask a masked LM for an answer of unknown length
        (multi-token cloze probing): for every k = 1 .. K, k [MASK] tokens, each its own argmax, and the k whose
        fill has the highest mean log-probability per piece wins; K = the most word pieces of any answer of
        the benchmark (--max-masks to set it);
- gpt   the text before the blank (after a document break); it writes as many tokens as the answer has.

A fill is an exact match when it equals the blanked words, compared lowercased and without whitespace (BERT's
tokenizer lowercases and spaces out punctuation). "answer bits/char" scores the true answer instead, fed to the
model (teacher-forced): -log2 P(its tokens) per character, which compares across tokenizers (BERT's is a
pseudo-likelihood: each piece given the others masked; GLM's leaves out [eop] and T5's the sentinel after the
span, as the others are told the length; none for BERT not told, whose fills are scored as BERT told's).
Blanks whose text does not fit into every run's block_size are skipped (the count is printed). Each run may
use its own tokenizer. --json prints the table as one JSON object instead: {"blanks": n, "left_only_chance":
p (records only), "runs": {run: {"arch", "knows_length", "exact_match": {"1", "2", ..., "all"},
"answer_bits_per_char"}}}, a BERT run twice: as "<run>" (told) and "<run> (not told)".
"""

from __future__ import annotations

import argparse
import functools
import itertools
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
from minimodels.data.records import held_out_blanks, left_only_chance
from minimodels.data.span_corruption import SENTINEL
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


def fill_bert_not_told(model, tok, before: str, after: str, answer: str, device, max_masks: int) -> tuple[str, None] | None:
    """(the fill of the k in 1..max_masks [MASK] tokens whose argmax pieces have the highest mean log-probability,
    None): not told the length, it is scored by its fill only."""
    left, right = [tok.cls_id] + tok.encode(before), tok.encode(after) + [tok.sep_id]
    if len(left) + max_masks + len(right) > model.config.block_size:
        return None
    best, fill = -math.inf, ""
    for k in range(1, max_masks + 1):
        logits = model(torch.tensor([left + [tok.mask_id] * k + right], device=device)).logits[0, len(left):len(left) + k]
        top = logits.float().log_softmax(-1).max(-1)  # (k,) each piece's argmax and its log-probability
        if top.values.mean().item() > best:
            best, fill = top.values.mean().item(), tok.decode(top.indices.tolist())
    return fill, None


def fill_t5(model, tok, before: str, after: str, answer: str, device) -> tuple[str, float]:
    """(what the decoder writes for the one sentinel until the next sentinel or eos; nats of the true answer fed as
    the span after the sentinel). T5's relative positions have no longest input."""
    sentinel = tok.backend.token_to_id(SENTINEL.format(0))
    span = tok.encode(" " + answer)
    ids = torch.tensor([tok.encode(before) + [sentinel] + tok.encode(after) + [tok.eos_id]], device=device)
    out = model.generate(ids, max_new_tokens=32, eos_token_id=tok.eos_id)[0, 1:].tolist()  # without the start token
    out = out[1:] if out[:1] == [sentinel] else out
    special = tok.special_ids  # eos, pad and the sentinels
    fill = list(itertools.takewhile(lambda t: t not in special, out))
    logits = model(input_ids=ids, labels=torch.tensor([[sentinel] + span], device=device)).logits[0, 1:]  # (n, V)
    return tok.decode(fill), nats(logits, span)


def fill_gpt(model, tok, before: str, after: str, answer: str, device) -> tuple[str, float] | None:
    """(as many greedy tokens as the answer has after the left context; nats of the true answer there)."""
    span = tok.encode(" " + answer)
    ids = [tok.eos_id] + tok.encode(before)
    if len(ids) + len(span) > model.config.block_size:
        return None
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens=len(span), temperature=0.0)
    logits = model(torch.tensor([ids + span[:-1]], device=device)).logits[0, len(ids) - 1:]  # (n, V)
    return tok.decode(out[0, len(ids):].tolist()), nats(logits, span)


# arch -> the rows of the table its run gives: (suffix of the run's name, fill function, told the length)
FILL = {"glm": [("", fill_glm, False)], "t5": [("", fill_t5, False)], "gpt": [("", fill_gpt, True)],
        "bert": [("", fill_bert, True), (" (not told)", fill_bert_not_told, False)]}


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="run folders of GLM, T5, BERT (head mlm) or GPT runs")
    ap.add_argument("--blanks", type=int, default=500, help="how many blanks (one per held-out document)")
    ap.add_argument("--chars", type=int, default=300, help="stdlib: each docstring is cut to this many characters")
    ap.add_argument("--max-masks", type=int, default=None,
                    help="BERT not told the length tries 1..this many [MASK] (default: the most pieces of any answer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--examples", type=int, default=5, help="print this many blanks with every run's fill")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print the table as one JSON object instead")
    args = ap.parse_args()
    for option, value in (("--blanks", args.blanks), ("--chars", args.chars), ("--max-masks", args.max_masks or 1)):
        need(value > 0, option, f"must be positive, got {value}")
    need(args.examples >= 0, "--examples", f"must be >= 0, got {args.examples}")
    runs = {}
    for path in args.runs:
        cfg, model, tok = load_run(path, args.device)
        if cfg.model.arch not in FILL:
            raise ConfigError(f"{path} is a {cfg.model.arch} run; this script fills blanks with {', '.join(FILL)}")
        runs[path] = (cfg, model, tok)
    data_cfg = next(iter(runs.values()))[0].data
    sources = {cfg.data.source for cfg, _, _ in runs.values()}
    if len(sources) > 1:
        raise ConfigError(f"the runs were trained on different data.source values ({', '.join(sorted(sources))}); "
                          "blanks come from one")
    if data_cfg.source == "records":
        blanks = held_out_blanks(args.blanks, args.seed)
    else:
        blanks = make_blanks(load_corpus(data_cfg)["val"], args.blanks, args.chars, args.seed)

    rows = {}  # row name -> (run, arch, fill function, told the length)
    for path, (cfg, _, tok) in runs.items():
        for suffix, fill, told in FILL[cfg.model.arch]:
            if fill is fill_bert_not_told:
                fill = functools.partial(fill, max_masks=args.max_masks or max(len(tok.encode(a)) for _, a, _ in blanks))
            rows[path + suffix] = (path, cfg.model.arch, fill, told)
    fills = defaultdict(dict)  # blank index -> row -> fill text
    answer_nats = defaultdict(dict)  # blank index -> row -> -log P(the true answer), teacher-forced (or None)
    skipped = set()
    for name, (path, _, fill, _) in rows.items():
        _, model, tok = runs[path]
        device = next(model.parameters()).device
        for i, (before, answer, after) in enumerate(blanks):
            out = fill(model, tok, before, after, answer, device)
            if out is None:
                skipped.add(i)
            else:
                fills[i][name], answer_nats[i][name] = out
    kept = [i for i in range(len(blanks)) if i not in skipped]
    if not kept:
        raise ConfigError(f"--chars: none of the {len(blanks)} blanks fits into every run's block_size (try a smaller --chars)")
    sizes = sorted({len(blanks[i][1].split()) for i in kept})
    by_size = {str(k): [i for i in kept if len(blanks[i][1].split()) == k] for k in sizes} | {"all": kept}
    results = {}  # row -> its numbers
    for name, (_, arch, _, told) in rows.items():
        em = {k: sum(normal(fills[i][name]) == normal(blanks[i][1]) for i in idx) / len(idx) for k, idx in by_size.items()}
        scored = answer_nats[kept[0]][name] is not None
        bits = sum(answer_nats[i][name] for i in kept) / math.log(2) / sum(len(blanks[i][1]) for i in kept) if scored else None
        results[name] = {"arch": arch, "knows_length": told, "exact_match": em, "answer_bits_per_char": bits}
    chance = {"left_only_chance": left_only_chance([blanks[i] for i in kept])} if data_cfg.source == "records" else {}
    if args.json:
        print(json.dumps({"blanks": len(kept), **chance, "runs": results}))
        return
    print(f"{len(kept)} blanks in {len(kept)} held-out documents ({len(skipped)} skipped: longer than a block_size); "
          f"source {data_cfg.source}, val split\n")
    for i in kept[:args.examples]:
        before, answer, after = blanks[i]
        print(f"...{before[-60:]} [{answer}] {after[:40]}...".replace("\n", " "))
        for name in rows:
            print(f"    {name}: {fills[i][name]!r}")
    print()
    header = (["run", "arch", "knows the length"] + [f"EM {k} word{'s' * (k > 1)}" for k in sizes]
              + ["EM all", "answer bits/char"])
    table = [[name, r["arch"], "yes" if r["knows_length"] else "no"]
             + [f"{em:.3f} ({len(by_size[k])})" if k != "all" else f"{em:.3f}" for k, em in r["exact_match"].items()]
             + ["-" if r["answer_bits_per_char"] is None else f"{r['answer_bits_per_char']:.3f}"]
             for name, r in results.items()]
    widths = [max(len(str(r[c])) for r in table + [header]) for c in range(len(header))]
    for r in [header] + table:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    if chance:
        print(f"\nleft-only chance (the best guess without the right context): {chance['left_only_chance']:.4f}")
    print()
    for name, r in results.items():
        if not r["knows_length"]:
            same = sum(len(fills[i][name].split()) == len(blanks[i][1].split()) for i in kept) / len(kept)
            print(f"{name} wrote as many words as the blank had in {same:.1%} of the blanks (it was not told)")


if __name__ == "__main__":
    sys.exit(guarded(main))
