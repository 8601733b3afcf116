"""Helpers shared by the test files that train whole runs: scripts/train.py under plain python or torchrun,
and what a run folder holds (its final weights, its logged losses). Tests marked `cuda` are skipped without a GPU."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minimodels.train.checkpoint import checkpoint_dirs

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/<name>.py as a module (registered in sys.modules, where dataclasses look their module up), to call
    its functions or main(argv) in this process."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a CUDA GPU: on a machine without one they are skipped."""
    if not torch.cuda.is_available():
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))


def train_script(*args, nproc=1) -> subprocess.CompletedProcess:
    """scripts/train.py *args --quiet as a user runs it: plain python, or torchrun --standalone with nproc
    processes of one thread each."""
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    f"--nproc_per_node={nproc}"]
    return subprocess.run(launcher + ["scripts/train.py", *args, "--quiet"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def train(config, out, *overrides, nproc=1, resume=False):
    """Train `config` into `out` (or resume `out`) with train_script; it must succeed."""
    args = ["--resume", str(out)] if resume else [str(config), f"output.dir={out}"]
    r = train_script(*args, *overrides, nproc=nproc)
    assert r.returncode == 0, r.stderr[-3000:]


def weights(out, step=None):
    ckpt = checkpoint_dirs(out)[-1] if step is None else out / "checkpoints" / f"step_{step:08d}"
    return load_file(str(ckpt / "model.safetensors"))


def assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def events(out):
    """The events of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out):
    """The training loss of every logged step."""
    return [e["loss"] for e in events(out) if "loss" in e]
