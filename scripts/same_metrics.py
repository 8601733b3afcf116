"""Does a change keep behaviour? The same seed must log the same metrics.jsonl before and after it.

    OMP_NUM_THREADS=1 python scripts/same_metrics.py --base f4cec39 [gpt bert ...]

Trains each named config, made tiny as tests/tiny.py makes it (fp32, CPU, 4 steps, one shared tokenizer per
config), twice: with the code at git revision --base (`git archive` into a temporary folder) and with this working
tree, each run in its own process with its own tree's configs/ and minimodels/ on PYTHONPATH. Then it compares the
two metrics.jsonl line by line, byte for byte, leaving out the timings (keys ending in _s: tokens_per_s, time_s,
wall_time_s, train_time_s). The row `inherit` is configs/gpt.yaml with train.teacher.run set to that side's tiny gpt
run. Prints one row per config: config | identical | the first differing line and field. A tree whose YAML
still names the width n_embd gets the tiny width as n_embd.

Both sides run with this process's environment: PyTorch's float sums may change with the thread count, so set
OMP_NUM_THREADS (1 above) for both.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from tiny import N_SCENES, Runs, write_docs

from minimodels.data import shapes

ROWS = ("gpt", "bert", "t5", "switch_gpt", "brivl", "ptuning_gpt", "glm", "inherit")  # issue 19's list
# scripts/train.py in a process that first cuts the shapes world to N_SCENES train scenes, as the tests do
TRAIN = (f"import sys; from minimodels.data import shapes; shapes.N_TRAIN = {N_SCENES}; "
         "from minimodels.cli import train_main; sys.exit(train_main())")


class RunsIn(Runs):
    """Tiny runs trained by the code of the checkout `tree`, each in its own process."""

    def __init__(self, tree: Path, root: Path, docs: Path, tokenizers: Path):
        super().__init__(root, docs, tokenizers)
        self.tree = tree

    def train(self, name: str, out: Path, overrides: list[str]) -> None:
        if "n_embd:" in (self.tree / "configs" / f"{name}.yaml").read_text():  # a tree from before n_embd -> d_model
            overrides = [o.replace("d_model=", "n_embd=") for o in overrides]
        r = subprocess.run([sys.executable, "-c", TRAIN, f"configs/{name}.yaml", *overrides, f"output.dir={out}",
                            "--quiet"], cwd=self.tree, env={**os.environ, "PYTHONPATH": str(self.tree)},
                           capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"{self.tree}: configs/{name}.yaml: {(r.stderr.strip().splitlines() or ['?'])[-1]}")

    def row(self, name: str) -> Path:
        """The run folder of row `name` (a config, or inherit)."""
        if name == "inherit":
            return self.trained("gpt", f"train.teacher.run={self.trained('gpt')}")
        return self.trained(name)


def untimed(out: Path) -> list[str]:
    """metrics.jsonl's lines without the keys ending in _s, as JSON text (floats written exactly, in key order)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.dumps({k: v for k, v in json.loads(line).items() if not k.endswith("_s")}) for line in lines]


def first_difference(a: list[str], b: list[str]) -> str:
    """Where two logs first differ: 'line N: key' (or the line counts), '' when they are the same."""
    for i, (x, y) in enumerate(zip(a, b), 1):
        if x != y:
            x, y = json.loads(x), json.loads(y)
            key = next((k for k in [*x, *y] if x.get(k, None) != y.get(k, None)), "?")
            return f"line {i}: {key} ({x.get(key)} vs {y.get(key)})"
    return "" if len(a) == len(b) else f"{len(a)} vs {len(b)} lines"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", default=list(ROWS), help=f"configs/<name>.yaml or inherit (default: {ROWS})")
    p.add_argument("--base", required=True, help="the git revision to compare with, e.g. main or f4cec39")
    a = p.parse_args()
    os.chdir(ROOT)  # the tokenizers are trained here, from configs/<name>.yaml
    shapes.N_TRAIN = N_SCENES  # on the captions of these scenes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_tree = tmp / "base"
        base_tree.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.base], capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(base_tree)], input=archive, check=True)
        docs = write_docs(tmp / "docstrings.jsonl")
        sides = [RunsIn(tree, tmp / label, docs, tmp / "tokenizers") for label, tree in (("a", base_tree), ("b", ROOT))]
        for side in sides:
            side.root.mkdir()
        print(f"{'config':<12} | identical | first differing field ({a.base} vs working tree)")
        for name in a.names:
            try:
                base, work = (untimed(side.row(name)) for side in sides)
                diff = first_difference(base, work)
            except RuntimeError as e:
                diff = f"did not run: {e}"
            print(f"{name:<12} | {'yes' if not diff else 'no':<9} | {diff}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
