"""Plots from metrics.jsonl: loss.png (training and validation loss against steps), and one PNG per
vector-valued metric, drawn as stacked shares over training (an MoE layer's load per expert: moe_block1_load.png);
and rows of pictures a task hands over (the VQ-VAE's originals above reconstructions: reconstructions.png)."""

from __future__ import annotations

import json
from pathlib import Path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    return plt


def read_events(run_dir: Path) -> list[dict]:
    """The events of <run_dir>/metrics.jsonl, one dict per line. A last line cut short (a process killed while
    writing it) is left out; any other line that is not JSON, or a missing file, is a RunFolderError."""
    from minimodels.train.checkpoint import RunFolderError  # (checkpoint.py imports torch; plotting does not need it)

    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunFolderError(f"{path}: not found (is {run_dir} a run folder?)")
    lines = path.read_text().splitlines()
    events = []
    for i, line in enumerate(lines):
        try:
            events.append(json.loads(line)) if line.strip() else None
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise RunFolderError(f"{path}: line {i + 1} is not JSON") from None
    return events


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    plt = pyplot()
    run_dir = Path(run_dir)
    events = read_events(run_dir)
    train = [(e["step"], e["loss"]) for e in events if "loss" in e]
    val = [(e["step"], e["val_loss"]) for e in events if "val_loss" in e]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train), label="train loss", alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    unigram = [e["unigram_val_loss"] for e in events if "unigram_val_loss" in e]
    if unigram:
        ax.axhline(unigram[-1], color="gray", linestyle="--", label="unigram baseline (val)")
    title = run_dir.name
    bpc = [e["val_bpc"] for e in events if "val_bpc" in e]
    if bpc:
        title += f" — final val_bpc {bpc[-1]:.3f}"
    ax.set(xlabel="step", ylabel="loss (nats per token)", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else run_dir / "loss.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_shares(run_dir: str | Path) -> list[Path]:
    """<name>.png for every metric logged as a list (shares of a whole, e.g. the share of token slots each
    expert of an MoE layer processed): the shares stacked against steps, one band per entry."""
    plt = pyplot()
    run_dir = Path(run_dir)
    events = read_events(run_dir)
    names = dict.fromkeys(k for e in events for k, v in e.items() if isinstance(v, list))
    paths = []
    for name in names:
        steps, rows = zip(*[(e["step"], e[name]) for e in events if name in e])
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.stackplot(steps, list(zip(*rows)), labels=[str(i) for i in range(len(rows[0]))], alpha=0.85)
        ax.set(xlabel="step", ylabel="share", title=f"{run_dir.name} — {name} (one band per entry, e.g. expert)",
               xlim=(steps[0], steps[-1]), ylim=(0, 1))
        if len(rows[0]) <= 16:
            ax.legend(loc="center left", bbox_to_anchor=(1, 0.5), fontsize="small")
        fig.tight_layout()
        fig.savefig(run_dir / f"{name}.png", dpi=110)
        plt.close(fig)
        paths.append(run_dir / f"{name}.png")
    return paths


def plot_image_rows(rows, out: str | Path, title: str | None = None) -> Path:
    """rows: [(label, images (N, 3, H, W) uint8), ...] -> a PNG with one row of N images per entry, labelled,
    under `title` if given."""
    plt = pyplot()
    cols = max(len(images) for _, images in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.2 * cols, 1.4 * len(rows)), squeeze=False)
    for (label, images), row in zip(rows, axes):
        for i, ax in enumerate(row):
            if i < len(images):
                ax.imshow(images[i].permute(1, 2, 0).numpy(), interpolation="nearest")  # (H, W, 3)
            ax.set(xticks=[], yticks=[])
            ax.axis("on" if i < len(images) else "off")
        row[0].set_ylabel(label)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
