"""Redraw a run's loss curves: python scripts/plot.py runs/gpt [out.png]"""

import sys

from minimodels.train.plot import plot_metrics

if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    print(plot_metrics(*sys.argv[1:]))
