"""Sample from a trained run: python scripts/generate.py runs/gpt --prompt "Return the" --top-k 50"""

import sys

from minimodels.cli import generate_main

if __name__ == "__main__":
    sys.exit(generate_main())
