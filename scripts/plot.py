"""Redraw a run's plots: python scripts/plot.py runs/gpt [loss.png]
(loss curves, and for metrics logged as shares, e.g. an MoE model's expert load, one PNG each)"""

import sys

from minimodels.cli import guarded
from minimodels.train.plot import plot_metrics, plot_shares


def main() -> None:
    print(plot_metrics(*sys.argv[1:]))
    for path in plot_shares(sys.argv[1]):
        print(path)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    sys.exit(guarded(main))
