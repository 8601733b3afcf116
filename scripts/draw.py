"""Draw pictures for a caption with a CogView run (configs/cogview.yaml):

    python scripts/draw.py runs/cogview --prompt "a small red circle above a big blue box" --num-samples 8 --out grid.png
    python scripts/draw.py runs/cogview --prompt "a red circle" --num-samples 16 --rerank runs/clip --keep 4

The GPT writes the picture's tokens after the caption and [BOI], drawn only among the image codes (temperature,
top-k), and the run's VQ-VAE (data.image_tokenizer) decodes them; the pictures go into one PNG, one row of
--per-row. Says whether the prompt is a caption of the shapes grammar the model was trained on.

--rerank RUN (CogView reranks its samples): a trained BriVL / CLIP run (configs/clip.yaml) scores each picture
against the prompt (cosine similarity, the image tower's region boxes read off the picture by the scene parser);
the grid then shows the pictures best first, the --keep best only if given. Each picture's score is printed, with
whether the prompt is true of the scene the parser reads off it.
"""

import argparse
import math
import sys
from pathlib import Path

from minimodels.cli import guarded


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Draw pictures for a caption with a text_to_image (CogView) run.")
    p.add_argument("run_dir", help="a run folder of configs/cogview.yaml")
    p.add_argument("--prompt", required=True, help='the caption, e.g. "a small red circle above a big blue box"')
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="draw among the k likeliest image codes")
    p.add_argument("--rerank", metavar="RUN", help="a BriVL / CLIP run folder (configs/clip.yaml): order the pictures "
                   "by its score against the prompt, best first")
    p.add_argument("--keep", type=int, default=None, help="with --rerank: keep only the best KEEP pictures")
    p.add_argument("--per-row", type=int, default=8, help="pictures in a row of the grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="the PNG (default: <run_dir>/draw.png)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)

    def go():
        import torch

        from minimodels.config import need
        from minimodels.data.scene_parser import parse_scene
        from minimodels.data.shapes import is_true_of, parse_caption
        from minimodels.data.text_to_image import clip_similarity
        from minimodels.train.plot import plot_image_rows
        from minimodels.train.run import load_clip_run, load_drawing_run

        need(a.num_samples > 0, "--num-samples", f"must be positive, got {a.num_samples}")
        need(0 <= a.temperature < math.inf, "--temperature", f"must be >= 0 (0: greedy), got {a.temperature}")
        need(a.top_k is None or a.top_k > 0, "--top-k", f"must be positive, got {a.top_k}")
        need(a.keep is None or (a.rerank and 0 < a.keep <= a.num_samples), "--keep",
             f"needs --rerank and 1 .. --num-samples ({a.num_samples}), got {a.keep}")
        need(a.per_row > 0, "--per-row", f"must be positive, got {a.per_row}")
        _, model, tok, image_tokenizer, layout = load_drawing_run(a.run_dir, a.device)
        caption = tok.encode(a.prompt)
        need(len(caption) <= layout.text_len, "--prompt",
             f"is {len(caption)} tokens, more than the {layout.text_len} caption positions of {a.run_dir}")
        try:
            parsed = parse_caption(a.prompt)
        except ValueError:
            parsed = None
            print(f'note: "{a.prompt}" is outside the caption grammar the model was trained on')
        generator = torch.Generator(next(model.parameters()).device).manual_seed(a.seed)
        images = layout.generate(model, image_tokenizer, [caption] * a.num_samples, a.temperature,
                                 a.top_k, generator)  # (N, 3, H, W) uint8
        label = "samples"
        if a.rerank:
            clip_cfg, clip, clip_tok = load_clip_run(a.rerank, a.device)
            scenes = [parse_scene(image) for image in images]
            scores = clip_similarity(clip, clip_tok, clip_cfg.data.seq_len, images, scenes, [a.prompt])[:, 0]  # (N,)
            order = scores.argsort(descending=True)[:a.keep]  # best first
            for rank, i in enumerate(order.tolist(), 1):
                true = "" if parsed is None else ("  true" if is_true_of(parsed, scenes[i]) else "  false")
                print(f"{rank:3d}  {scores[i]:.3f}  sample {i + 1}{true}")
            images, label = images[order], "best"
        rows = [(f"{label} {i + 1}-{min(i + a.per_row, len(images))}", images[i:i + a.per_row])
                for i in range(0, len(images), a.per_row)]
        out = Path(a.out) if a.out else Path(a.run_dir) / "draw.png"
        plot_image_rows(rows, out, title=f'"{a.prompt}"')
        print(f"{len(images)} pictures -> {out}")

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
