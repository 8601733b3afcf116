"""Search the held-out gallery of a BriVL / CLIP run by text:

    python scripts/search.py runs/brivl "a red triangle" [--top 8] [--out grid.png]

The two towers never look at each other, so the gallery's 600 images are embedded once and cached in
<run>/gallery_embeddings.pt (with the name of the checkpoint they came from); a query then costs one pass
of the text tower and one matrix product. Prints the top matches with their captions — marked "yes" when
the query (read with the caption grammar) is true of the image, "no" when it is not — and writes a PNG grid.
"""

import argparse
import sys
import textwrap
from pathlib import Path

import torch

from minimodels.cli import guarded


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Search a BriVL run's held-out gallery by text.")
    p.add_argument("run_dir", help="a run folder of configs/brivl.yaml or configs/clip.yaml")
    p.add_argument("query", help='e.g. "a red triangle above a blue circle"')
    p.add_argument("--top", type=int, default=8, help="matches to show")
    p.add_argument("--out", help="PNG grid of the matches (default: <run_dir>/search.png)")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)

    def go():
        from minimodels.config import ConfigError
        from minimodels.data.shapes import gallery_split, image_batch, is_true_of, parse_caption, text_batch
        from minimodels.train.checkpoint import latest_checkpoint
        from minimodels.train.run import load_clip_run

        cfg, model, tok = load_clip_run(a.run_dir, a.device)
        if not a.query.strip() or a.top < 1:
            raise ConfigError("search needs a non-empty query and --top >= 1")
        device = next(model.parameters()).device
        gallery = gallery_split()
        cache, ckpt = Path(a.run_dir) / "gallery_embeddings.pt", latest_checkpoint(a.run_dir).name
        saved = torch.load(cache, weights_only=True) if cache.is_file() else {}
        if saved.get("checkpoint") != ckpt or len(saved["embeddings"]) != len(gallery.scenes):
            with torch.no_grad():
                batch = image_batch(gallery.images, gallery.scenes)
                emb = model.embed_images(**{k: v.to(device) for k, v in batch.items()}).cpu()  # (N, D)
            torch.save({"checkpoint": ckpt, "embeddings": emb}, cache)
            print(f"embedded the {len(emb)} gallery images once -> {cache}")
        image = torch.load(cache, weights_only=True)["embeddings"]  # (N, D)

        unknown = [w for w in tok.backend.encode(a.query).tokens if w == "[UNK]"]
        if unknown:
            print(f"note: {len(unknown)} word(s) of the query are outside the vocabulary and read as [UNK]")
        with torch.no_grad():
            text = model.embed_texts(**{k: v.to(device) for k, v in text_batch(tok, [a.query], cfg.data.seq_len).items()})
        scores = (image @ text.cpu().T).squeeze(1)  # (N,) cosine similarity
        top = scores.topk(min(a.top, len(scores)))
        try:
            query = parse_caption(a.query)
            true = [is_true_of(query, s) for s in gallery.scenes]
            print(f'"{a.query}" is true of {sum(true)} of the {len(true)} gallery images')
        except ValueError:
            true = None
            print(f'"{a.query}" is outside the caption grammar: matches are not checked')
        rows = []
        for rank, (score, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            mark = "" if true is None else ("yes" if true[i] else "no ")
            rows.append((i, score, mark))
            print(f"{rank:3d}  {score:.3f}  {mark:3s}  #{i:<4d} {gallery.captions[i].text}")
        out = Path(a.out) if a.out else Path(a.run_dir) / "search.png"
        draw_grid(rows, gallery, a.query, out)
        print(f"grid -> {out}")

    return guarded(go)


def draw_grid(rows, gallery, query: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(rows))
    n_rows = (len(rows) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(2.6 * cols, 3.3 * n_rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (i, score, mark) in zip(axes.flat, rows):
        ax.imshow(gallery.images[i].permute(1, 2, 0).numpy(), interpolation="nearest")
        caption = "\n".join(textwrap.wrap(gallery.captions[i].text, 28))
        ax.set_title(f"{score:.3f} {mark}\n{caption}", fontsize=7, color="black" if mark != "no " else "firebrick")
    fig.suptitle(f'"{query}"', fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
