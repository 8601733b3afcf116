"""Redraw a run's plots: python scripts/plot.py runs/gpt [loss.png]
(loss curves, and for metrics logged as shares, e.g. an MoE model's expert load, one PNG each)"""

import sys

from minimodels.train.plot import plot_metrics, plot_shares

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    print(plot_metrics(*sys.argv[1:]))
    for path in plot_shares(sys.argv[1]):
        print(path)
