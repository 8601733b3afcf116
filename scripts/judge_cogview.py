"""The automatic judge of a CogView run: do its pictures show what their captions say?

    python scripts/judge_cogview.py runs/cogview --clip runs/clip [--per-group 50] [--samples 8] [--json]

The captions: of the held-out gallery's (data/shapes.py), the first --per-group that name a colour-shape pair never
seen in training (UNSEEN: red triangle, green circle, blue diamond, yellow square) and the first --per-group that
name none (seen). The run draws --samples pictures for each (temperature 1 among all the image codes, --seed), and
the scene parser (data/scene_parser.py) reads every picture back into objects. Per group (seen, unseen, all):

    true         the share of the drawn pictures whose parsed scene the caption is true of (`is_true_of`)
    reranked     the share of captions true of their best picture by the CLIP run's score (CogView's reranking)
    any          the share of captions true of at least one of their pictures: what a perfect reranker reaches
    r_precision  CLIP R-precision: the share of drawn pictures whose own caption the CLIP run scores highest among
                 all the judged captions (chance: 1 / their number)

and the same true / r_precision for the gallery's own pictures of those captions: the judge's ceiling (the parser
misreads a few pictures, and a caption can be true of another caption's picture too). The CLIP run reads the
region boxes of a picture off its parsed scene. --json prints the numbers as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch import Tensor

from minimodels.cli import guarded

GENERATE_BATCH = 256  # pictures drawn at once


def judged(true: Tensor, sim: Tensor, unseen: Tensor) -> dict[str, dict[str, float]]:
    """true (C, N) bool: caption c is true of its picture n; sim (C, N, C): the CLIP score of picture (c, n) against
    every caption; unseen (C,) bool: caption c names an UNSEEN pair -> {seen, unseen, all: {metric: share}}
    (the metrics of the module docstring, and the group's number of captions)."""
    C = len(true)
    own = sim.diagonal(dim1=0, dim2=2).T  # (C, N): each picture's score against its own caption
    reranked = true.gather(1, own.argmax(1, keepdim=True))[:, 0]  # (C,) true of the best-scoring picture
    first = sim.argmax(2) == torch.arange(C)[:, None]  # (C, N) the own caption scores highest
    per_caption = {"true": true.float().mean(1), "reranked": reranked.float(), "any": true.any(1).float(),
                   "r_precision": first.float().mean(1)}
    groups = {"seen": ~unseen, "unseen": unseen, "all": torch.ones_like(unseen)}
    return {g: {"captions": int(m.sum())} | {k: v[m].mean().item() for k, v in per_caption.items()}
            for g, m in groups.items()}


def table(n: dict) -> str:
    """The judged numbers as the README's markdown table, a line per group."""
    lines = [f"| captions | true of a picture | of the best of {n['samples']} by CLIP | of any of {n['samples']} | "
             f"CLIP R-precision (among {n['captions']}) | gallery pictures: true / R-precision |",
             "|---|---:|---:|---:|---:|---:|"]
    for group in ("seen", "unseen", "all"):
        d, g = n["drawn"][group], n["gallery"][group]
        lines.append(f"| {group} ({d['captions']}) | {d['true']:.3f} | **{d['reranked']:.3f}** | {d['any']:.3f} | "
                     f"{d['r_precision']:.3f} | {g['true']:.3f} / {g['r_precision']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a run folder of configs/cogview.yaml")
    ap.add_argument("--clip", required=True, help="a run folder of configs/clip.yaml (or brivl.yaml): the reranker")
    ap.add_argument("--per-group", type=int, default=50, help="captions naming an UNSEEN pair, and as many naming none")
    ap.add_argument("--samples", type=int, default=8, help="pictures drawn per caption")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object instead")
    a = ap.parse_args(argv)

    def go():
        from minimodels.config import need
        from minimodels.data.scene_parser import parse_scene
        from minimodels.data.shapes import UNSEEN, gallery_split, is_true_of
        from minimodels.data.text_to_image import clip_similarity
        from minimodels.train.run import load_clip_run, load_drawing_run

        start = time.perf_counter()
        need(a.per_group > 0, "--per-group", f"must be positive, got {a.per_group}")
        need(a.samples > 0, "--samples", f"must be positive, got {a.samples}")
        _, model, tok, image_tokenizer, layout = load_drawing_run(a.run_dir, a.device)
        clip_cfg, clip, clip_tok = load_clip_run(a.clip, a.device)
        gallery = gallery_split()
        names_unseen = [any((p.colour, p.shape) in UNSEEN for p in c.phrases) for c in gallery.captions]
        groups = [[i for i, u in enumerate(names_unseen) if u == unseen][:a.per_group] for unseen in (False, True)]
        need(min(map(len, groups)) == a.per_group, "--per-group", f"the gallery has {len(groups[0])} captions naming "
             f"no UNSEEN pair and {len(groups[1])} naming one, fewer than {a.per_group}")
        picked = groups[0] + groups[1]
        unseen = torch.tensor(names_unseen)[picked]  # (C,)
        captions = [gallery.captions[i] for i in picked]
        texts, C = [c.text for c in captions], len(picked)

        def judge(images: Tensor, n: int) -> dict:
            """images (C * n, 3, H, W) uint8, n pictures per caption, caption by caption -> judged()."""
            scenes = [parse_scene(image) for image in images]
            true = torch.tensor([is_true_of(captions[i // n], s) for i, s in enumerate(scenes)]).view(C, n)
            sim = clip_similarity(clip, clip_tok, clip_cfg.data.seq_len, images, scenes, texts)  # (C * n, C)
            return judged(true, sim.view(C, n, C), unseen)

        ids = [caption for caption in tok.encode_batch(texts) for _ in range(a.samples)]  # each caption N times
        generator = torch.Generator(next(model.parameters()).device).manual_seed(a.seed)
        drawn = torch.cat([layout.generate(model, image_tokenizer, ids[i:i + GENERATE_BATCH], generator=generator)
                           for i in range(0, len(ids), GENERATE_BATCH)])  # (C * N, 3, H, W)
        numbers = {"captions": C, "samples": a.samples, "drawn": judge(drawn, a.samples),
                   "gallery": judge(gallery.images[picked], 1),
                   "r_precision_chance": 1 / C, "seconds": time.perf_counter() - start}
        if a.json:
            print(json.dumps(numbers))
        else:
            print(table(numbers))
            print(f"\nR-precision chance {1 / C:.3f}; judged in {numbers['seconds']:.0f} s")

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
