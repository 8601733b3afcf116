"""Faults, as a user meets them through scripts/train.py and scripts/generate.py: nothing lost, nothing poisoned.

A diverging run never checkpoints non-finite weights and names a checkpoint that resumes; a damaged run folder
(truncated weights, missing or truncated trainer.pt, corrupt tokenizer.json, a cut-short metrics.jsonl) either
resumes from the newest intact checkpoint, saying so, or stops with one line naming the file and exit code 2.
"""

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minimodels.data import Tokenizer
from minimodels.train.checkpoint import RunFolderError, checkpoint_dirs
from minimodels.train.metrics import MetricsLog

CONFIG = """
model: {arch: gpt, block_size: 32, n_layer: 1, n_head: 2, d_model: 32}
data: {source: %s, tokenizer: bpe, vocab_size: 300}
train: {max_steps: 4, batch_size: 4, lr: 1.0e-2, warmup_steps: 0, device: cpu, dtype: fp32,
        eval_interval: 2, save_interval: 1, keep_last: 10, log_interval: 1, eval_batches: 2}
output: {dir: %s, sample_tokens: 0, plot: false}
"""


def sh(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


def one_line_error(r, code=2) -> str:
    """The process stopped with `code` and printed exactly one line, "error: ...", which is returned."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == code and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    return lines[0]


def truncate(path, keep=0.5):
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * keep)])


def finite_checkpoint(ckpt) -> bool:
    """Weights and optimizer state of a checkpoint all finite."""
    weights = list(load_file(ckpt / "model.safetensors").values())
    state = torch.load(ckpt / "trainer.pt", weights_only=True)["optimizer"]["state"]
    moments = [t for s in state.values() for t in s.values() if torch.is_tensor(t)]
    return all(torch.isfinite(t).all() for t in weights + moments)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """A tiny GPT config on a folder of text (bpe tokenizer); output.dir is given on the command line."""
    root = tmp_path_factory.mktemp("faults")
    (root / "docs").mkdir()
    for i in range(6):
        (root / "docs" / f"doc{i}.txt").write_text(f"The quick brown fox {i} jumps over the lazy dog. " * 30)
    (root / "tiny.yaml").write_text(CONFIG % (root / "docs", root / "unused"))
    return root / "tiny.yaml"


@pytest.fixture(scope="module")
def healthy(config):
    """A finished 4-step run with a checkpoint at every step."""
    out = config.parent / "healthy"
    r = sh("scripts/train.py", str(config), f"output.dir={out}", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [c.name for c in checkpoint_dirs(out)] == [f"step_{i:08d}" for i in range(1, 5)]
    return out


@pytest.fixture
def copy(healthy, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(healthy, out)
    return out


def test_a_diverging_run_checkpoints_nothing_non_finite_and_names_a_checkpoint_that_resumes(config, tmp_path):
    out = tmp_path / "run"
    r = sh("scripts/train.py", str(config), f"output.dir={out}", "train.lr=1e2", "train.weight_decay=1.0",
           "train.max_steps=8", "--quiet")
    line = one_line_error(r, code=1)
    named = re.search(r"last good checkpoint: (\S+)", line).group(1)
    assert named != "none" and checkpoint_dirs(out)[-1] == type(out)(named), line
    assert all(finite_checkpoint(c) for c in checkpoint_dirs(out))
    # the checkpoint whose weights gave the non-finite loss or gradient is kept, but no longer resumed from
    set_aside = list((out / "checkpoints").glob("*.nonfinite"))
    assert len(set_aside) == 1 and set_aside[0].name in line
    r = sh("scripts/train.py", "--resume", str(out), "train.lr=1e-3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed {out} from {type(out)(named).name}" in r.stdout
    losses = [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert checkpoint_dirs(out)[-1].name == "step_00000008" and finite_checkpoint(checkpoint_dirs(out)[-1])


def test_resume_passes_over_damaged_checkpoints_and_says_so(copy):
    ckpt = {c.name: c for c in checkpoint_dirs(copy)}
    damaged = [ckpt["step_00000004"] / "model.safetensors", ckpt["step_00000003"] / "trainer.pt",
               ckpt["step_00000002"] / "trainer.pt"]
    truncate(damaged[0])
    damaged[1].unlink()
    truncate(damaged[2])
    r = sh("scripts/train.py", "--resume", str(copy), "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    notes = r.stderr.strip().splitlines()
    assert len(notes) == 3 and all(str(path) in note and "resuming from step_00000001" in note
                                   for path, note in zip(damaged, notes)), r.stderr
    # the damaged ones are kept aside; the run went on from step 1 and wrote steps 2-4 anew
    assert sorted(p.name for p in (copy / "checkpoints").glob("*.damaged")) == [f"step_0000000{i}.damaged" for i in (2, 3, 4)]
    assert [c.name for c in checkpoint_dirs(copy)] == [f"step_{i:08d}" for i in range(1, 5)]
    assert all(finite_checkpoint(c) for c in checkpoint_dirs(copy))


def test_damaged_weights_stop_generate_and_a_resume_without_an_intact_checkpoint(copy):
    weights = checkpoint_dirs(copy)[-1] / "model.safetensors"
    truncate(weights)
    assert str(weights) in one_line_error(sh("scripts/generate.py", str(copy), "--max-new-tokens", "3"))
    for c in checkpoint_dirs(copy)[:-1]:
        (c / "trainer.pt").unlink()
    line = one_line_error(sh("scripts/train.py", "--resume", str(copy), "--quiet"))
    assert str(weights) in line and "no older checkpoint" in line
    assert not list((copy / "checkpoints").glob("*.damaged"))  # nothing set aside when nothing resumes


@pytest.mark.parametrize("script", ["generate", "resume"])
def test_a_corrupt_tokenizer_stops_with_one_line(copy, script):
    tokenizer = copy / "tokenizer.json"
    truncate(tokenizer)
    args = [str(copy), "--max-new-tokens", "3"] if script == "generate" else ["--resume", str(copy), "--quiet"]
    r = sh(f"scripts/{'generate' if script == 'generate' else 'train'}.py", *args)
    assert str(tokenizer) in one_line_error(r)


def test_resume_refuses_to_train_a_new_tokenizer(copy):
    from minimodels.config import load_config
    from minimodels.train.run import run

    (copy / "tokenizer.json").unlink()
    with pytest.raises(RunFolderError, match="tokenizer.json: missing; the checkpoints were trained with it"):
        run(load_config(copy / "config.yaml", [f"output.dir={copy}"]), resume=True, quiet=True)


def test_resume_drops_a_cut_short_last_line_of_metrics(copy):
    metrics = copy / "metrics.jsonl"
    events = metrics.read_text()
    metrics.write_text(events + '{"step": 5, "lo')
    r = sh("scripts/train.py", "--resume", str(copy), "train.max_steps=6", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(metrics) in r.stderr and "cut short" in r.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]  # every line is JSON
    assert metrics.read_text().startswith(events) and max(steps) == 6


def test_metrics_log_rewrites_atomically_and_refuses_a_corrupt_middle_line(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    text = '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'
    path.write_text(text)

    def crash(*args):
        raise OSError("disk full")

    with monkeypatch.context() as m:  # a crash while rewriting leaves the old file whole
        m.setattr("minimodels.train.metrics.os.replace", crash)
        with pytest.raises(OSError):
            MetricsLog(path, after_step=1)
    assert path.read_text() == text
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.5}\n')
    with pytest.raises(RunFolderError, match=f"{path}: line 1 is not JSON"):
        MetricsLog(path, after_step=2)


def test_a_run_that_died_before_its_first_checkpoint_is_started_over(copy, config):
    """Its tokenizer.json is not reused: the new run trains one with the new data.vocab_size."""
    shutil.rmtree(copy / "checkpoints")
    assert Tokenizer.load(copy / "tokenizer.json").vocab_size != 280
    r = sh("scripts/train.py", str(config), f"output.dir={copy}", "data.vocab_size=280", "train.max_steps=1", "--quiet")
    assert r.returncode == 0, r.stderr[-2000:]
    assert str(copy) in r.stderr and "tokenizer.json is not reused" in r.stderr
    assert Tokenizer.load(copy / "tokenizer.json").vocab_size == 280
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(0) == 1 and max(steps) == 1  # one unigram baseline, then the new run's events
