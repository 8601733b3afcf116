"""LAMA-style probing table of a P-tuning run: manual prompts vs the trained prompt, P@1 on held-out subjects.

    python scripts/probe.py runs/ptuning_bert [--device cpu] [--json]

For every relation of the synthetic knowledge base (minimodels/data/kb.py), on the held-out half of its
subjects: the majority baseline (always the most frequent object among the other half's facts), the P@1 of
each manual prompt (best and mean), the P@1 of the corpus's own phrasings used as prompts (how much the LM
knows when asked in words it was trained on; object-first phrasings are skipped for a causal LM), and
P-tuning's. The last row averages over relations (macro average, as LAMA reports). "best manual" picks
each relation's best prompt on the held-out subjects themselves, so it is an optimistic number.
--json prints the same shares (0..1) as one JSON object: {"relations": {name: {column: share}}, "mean": {...}}.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

import torch

from minimodels.cli import guarded
from minimodels.config import ConfigError
from minimodels.data.kb import RELATIONS, KBProbeTask, manual_template
from minimodels.train.device import autocast, resolve_dtype, to_device
from minimodels.train.run import load_run


def p_at_1(model, task, examples, score, device, dtype, batch_size: int = 256) -> float:
    """Share of `examples` whose object is the top token of `score(batch)` (B, V)."""
    hits = 0
    for i in range(0, len(examples), batch_size):
        batch = to_device(task.collate(examples[i:i + batch_size]), device)
        with autocast(device, dtype):
            logits = score(batch)  # (B, V)
        hits += int((logits.argmax(-1) == batch["labels"].max(dim=1).values).sum())
    return hits / len(examples)


def corpus_prompts(relation, causal: bool) -> list[str]:
    """The corpus's phrasings of `relation` as cloze prompts ({o} -> [MASK]); for a causal LM only those
    with the object after the subject."""
    prompts = [t.replace("{o}", "[MASK]") for t in relation.corpus]
    return [p for p in prompts if not causal or p.index("{s}") < p.index("[MASK]")]


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a P-tuning run folder, e.g. runs/ptuning_bert")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object instead")
    args = ap.parse_args()
    cfg, model, tokenizer = load_run(args.run, args.device)
    if cfg.model.arch != "ptuning":
        raise ConfigError(f"{args.run}: is a {cfg.model.arch} run; probe.py prints a ptuning run's table")
    device = next(model.parameters()).device
    dtype = resolve_dtype("auto", device)
    task = KBProbeTask(tokenizer, cfg=cfg.data)
    causal = task.causal
    manual_score = lambda b: model.score(b["input_ids"], b["labels"], b["padding_mask"]).logits  # noqa: E731
    ptuned_score = lambda b: model(**b).logits  # noqa: E731

    columns = ["majority", "best manual", "mean manual", "corpus phrasing", "P-tuning"]
    rows = {}  # relation -> (held-out subjects, P@1 per column)
    for i, r in enumerate(RELATIONS):
        test = task.examples(task.template, "test", [i])
        counts = Counter(task.kb.facts[r.name][s] for s in task.kb.probe_split[r.name]["train"])
        majority = sum(e.object == counts.most_common(1)[0][0] for e in test) / len(test)
        manual = [p_at_1(model, task, task.examples(manual_template(t, causal), "test", [i]), manual_score, device, dtype)
                  for t in r.manual]
        corpus = [p_at_1(model, task, task.examples(manual_template(t, causal), "test", [i]), manual_score, device, dtype)
                  for t in corpus_prompts(r, causal)]
        ptuned = p_at_1(model, task, test, ptuned_score, device, dtype)
        rows[r.name] = (len(test), [majority, max(manual), sum(manual) / len(manual), max(corpus), ptuned])
    mean = [sum(col) / len(col) for col in zip(*(row for _, row in rows.values()))]
    if args.json:
        key = lambda c: c.lower().replace(" ", "_").replace("-", "")  # noqa: E731  "P-tuning" -> "ptuning"
        print(json.dumps({"relations": {r: dict(zip(map(key, columns), row)) for r, (_, row) in rows.items()},
                          "mean": dict(zip(map(key, columns), mean))}))
        return
    print(f"{args.run}: {'GPT' if causal else 'BERT'} backbone {cfg.model.init_from}, template {task.template}, "
          f"encoder {cfg.model.encoder}{' + deep prefixes' if cfg.model.deep else ''}, "
          f"{model.num_trainable():,} trainable parameters ({model.num_trainable() // len(RELATIONS):,} per relation)\n")
    header = ["relation", "test subjects"] + columns
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, (n, row) in rows.items():
        print(f"| {name} | {n} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
    print("| **mean over relations** | | " + " | ".join(f"**{100 * v:.1f}**" for v in mean) + " |")


if __name__ == "__main__":
    sys.exit(guarded(main))
