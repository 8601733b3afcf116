"""Draw pictures for a caption with a CogView run (configs/cogview.yaml):

    python scripts/draw.py runs/cogview --prompt "a small red circle above a big blue box" --num-samples 8 --out grid.png

The GPT writes the picture's tokens after the caption and [BOI], drawn only among the image codes (temperature,
top-k), and the run's VQ-VAE (data.image_tokenizer) decodes them; the pictures go into one PNG, one row of
--per-row. Says whether the prompt is a caption of the shapes grammar the model was trained on.
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
    p.add_argument("--per-row", type=int, default=8, help="pictures in a row of the grid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="the PNG (default: <run_dir>/draw.png)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)

    def go():
        import torch

        from minimodels.config import ConfigError, need
        from minimodels.data.shapes import parse_caption
        from minimodels.data.text_to_image import ImageTokens
        from minimodels.train.plot import plot_image_rows
        from minimodels.train.run import load_image_tokenizer, load_run

        need(a.num_samples > 0, "--num-samples", f"must be positive, got {a.num_samples}")
        need(0 <= a.temperature < math.inf, "--temperature", f"must be >= 0 (0: greedy), got {a.temperature}")
        need(a.top_k is None or a.top_k > 0, "--top-k", f"must be positive, got {a.top_k}")
        need(a.per_row > 0, "--per-row", f"must be positive, got {a.per_row}")
        cfg, model, tok = load_run(a.run_dir, a.device)
        if cfg.data.task != "text_to_image":
            raise ConfigError(f"{a.run_dir}: draw needs a text_to_image run (configs/cogview.yaml), got data.task {cfg.data.task}")
        image_tokenizer = load_image_tokenizer(cfg.data.image_tokenizer)
        layout = ImageTokens.build(tok, image_tokenizer, cfg.data.seq_len or cfg.model.block_size)
        caption = tok.encode(a.prompt)
        need(len(caption) <= layout.text_len, "--prompt",
             f"is {len(caption)} tokens, more than the {layout.text_len} caption positions of {a.run_dir}")
        try:
            parse_caption(a.prompt)
        except ValueError:
            print(f'note: "{a.prompt}" is outside the caption grammar the model was trained on')
        generator = torch.Generator(next(model.parameters()).device).manual_seed(a.seed)
        images = layout.generate(model, image_tokenizer, [caption] * a.num_samples, a.temperature,
                                 a.top_k, generator)  # (N, 3, H, W) uint8
        rows = [(f"{i + 1}-{min(i + a.per_row, len(images))}", images[i:i + a.per_row])
                for i in range(0, len(images), a.per_row)]
        out = Path(a.out) if a.out else Path(a.run_dir) / "draw.png"
        plot_image_rows(rows, out, title=f'"{a.prompt}"')
        print(f"{len(images)} pictures -> {out}")

    return guarded(go)


if __name__ == "__main__":
    sys.exit(main())
