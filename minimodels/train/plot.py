"""loss.png from metrics.jsonl: training loss and validation loss against steps."""

from __future__ import annotations

import json
from pathlib import Path


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
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
