"""Train a model from a YAML config: python scripts/train.py configs/gpt.yaml [key=value ...] [--resume RUN_DIR]"""

import sys

from minimodels.cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
