"""Few-shot learning on the docstring-package task: 32 labelled docstrings (4 per package), several seeds.

    python scripts/fewshot.py runs/bert [--seeds 4] [--examples 32] [--runs-dir runs/fewshot] [--json] [key=value ...]

From a BERT pretrained with its MLM head (configs/bert.yaml), scored on the whole val split of
configs/bert_finetune.yaml (data/package_classification.py):
- majority: always the most frequent package of the whole train split;
- manual prompt, zero-shot: the pretrained MLM head fills "<docstring> It is from the [MASK] package." with each
  package's name (PackagePromptTask), untrained: PET's zero-shot baseline;
- PET: the same pattern and names, the whole BERT fine-tuned on the few examples (data.task package_prompt);
- P-tuning: the BERT frozen, a continuous prompt [3, subject, 3, mask, 3] trained on them (package_ptuning);
- fine-tuning: a new classifier on [CLS], the whole BERT trained on them (package_classification).
Seed k draws its own class-balanced examples (data.few_shot_seed=k) and seeds training (train.seed=k); each
method trains METHODS' steps into <runs-dir>/<method>_seed<k>. The table: val accuracy (%) per seed, and the mean
± the sample standard deviation over the seeds. key=value overrides apply to every run (train.max_steps=20).
--json prints the accuracies (shares) and training seconds as one JSON object instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from minimodels.cli import guarded
from minimodels.config import ConfigError, load_config, to_dict
from minimodels.data.package_classification import PackagePromptTask
from minimodels.train.device import autocast, resolve_dtype, to_device
from minimodels.train.run import load_run, run
from minimodels.train.trainer import val_batches

STEPS = 100  # each method, batch 16 = 50 passes over 32 examples
TRAIN = {"max_steps": STEPS, "batch_size": 16, "warmup_steps": 10, "weight_decay": 0.01, "betas": [0.9, 0.98],
         "eval_interval": STEPS, "save_interval": STEPS, "log_interval": 10}
METHODS = {  # name: (row label, data.task, what changes in the pretrained BERT's model section, train settings)
    "pet": ("PET: manual pattern, BERT fine-tuned", "package_prompt", {"head": "mlm", "dropout": 0.1}, {"lr": 1e-4}),
    "ptuning": ("P-tuning: frozen BERT, trained prompt", "package_ptuning", None, {"lr": 3e-3, "weight_decay": 0.0}),
    "finetune": ("fine-tuning: [CLS] classifier", "package_classification", {"head": "classify", "dropout": 0.1},
                 {"lr": 1e-4}),
}


def method_config(method: str, pretrained: Path, examples: int, seed: int, out: Path, overrides: list[str]):
    """The experiment of `method` on `examples` train docstrings drawn with `seed`, starting from `pretrained`."""
    _, task, model_changes, train = METHODS[method]
    lm = to_dict(load_config(pretrained / "config.yaml"))["model"]
    model = {"arch": "ptuning", "init_from": str(pretrained)} if model_changes is None else \
        lm | model_changes | {"init_from": str(pretrained)}
    data = {"source": "stdlib", "task": task, "tokenizer": str(pretrained / "tokenizer.json"), "seq_len": lm["block_size"],
            "train_examples": examples, "few_shot_seed": seed}
    return load_config(None, overrides, base={"model": model, "data": data, "train": TRAIN | train | {"seed": seed},
                                              "output": {"dir": str(out), "sample_tokens": 0}})


@torch.no_grad()
def zero_shot(pretrained: Path, cfg) -> tuple[float, float, int]:
    """The pretrained BERT on the manual pattern of `cfg` (the PET runs' data section), untrained: val accuracy;
    and the majority baseline of the whole train split, and the number of val docstrings."""
    _, model, tokenizer = load_run(pretrained, cfg.train.device)
    device = next(model.parameters()).device
    task = PackagePromptTask(tokenizer, {}, cfg.data.seq_len, dataclasses.replace(cfg.data, train_examples=None))
    with autocast(device, resolve_dtype(cfg.train.dtype, device)):
        acc = task.evaluate(model, (to_device(b, device) for b in val_batches(task, cfg.train.batch_size)))["val_acc"]
    return acc, task.unigram_baseline()["val_acc"], len(task.val)


def spread(values: list[float]) -> str:
    """"mean ± sample std" in percent (just the mean for one value)."""
    mean = f"{100 * statistics.mean(values):.1f}"
    return mean if len(values) < 2 else f"{mean} ± {100 * statistics.stdev(values):.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a BERT pretraining run folder (head mlm), e.g. runs/bert")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides for every run")
    ap.add_argument("--seeds", type=int, default=4, help="seeds 0 .. N-1: each its own examples and training")
    ap.add_argument("--examples", type=int, default=32, help="labelled train docstrings (a multiple of the packages)")
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/fewshot"))
    ap.add_argument("--json", action="store_true", help="print the numbers as one JSON object instead")
    args = ap.parse_intermixed_args()
    pretrained = Path(args.run)
    if not (pretrained / "config.yaml").is_file():
        raise ConfigError(f"{pretrained}: config.yaml not found (pretrain first: python scripts/train.py configs/bert.yaml)")
    lm = load_config(pretrained / "config.yaml").model
    if lm.arch != "bert" or lm.head != "mlm":
        raise ConfigError(f"{pretrained}: is a {lm.arch} run{f' with head {lm.head}' if lm.arch == 'bert' else ''}; "
                          f"few-shot prompting needs a BERT pretrained with its MLM head (configs/bert.yaml)")
    if args.seeds < 1:
        raise ConfigError(f"--seeds: must be at least 1, got {args.seeds}")

    acc, seconds = {m: [] for m in METHODS}, {m: [] for m in METHODS}
    for seed in range(args.seeds):
        for method in METHODS:
            cfg = method_config(method, pretrained, args.examples, seed, args.runs_dir / f"{method}_seed{seed}", args.overrides)
            start = time.perf_counter()
            acc[method].append(run(cfg, overwrite=True, quiet=True)["val_acc"])
            seconds[method].append(round(time.perf_counter() - start, 1))
            print(f"seed {seed} {method}: val_acc {acc[method][-1]:.3f} ({seconds[method][-1]} s)", file=sys.stderr)
    pet = method_config("pet", pretrained, args.examples, 0, args.runs_dir / "pet_seed0", args.overrides)
    zero, majority, n_val = zero_shot(pretrained, pet)
    if args.json:
        print(json.dumps({"examples": args.examples, "val_examples": n_val, "majority": majority, "zero_shot": zero,
                          "val_acc": acc, "train_seconds": seconds}))
        return
    print(f"{pretrained}: {args.examples} train docstrings per seed, the same number of each package; "
          f"val accuracy (%) on {n_val} val docstrings\n")
    print("| method | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean ± std |")
    print("|---|" + "---:|" * (args.seeds + 1))
    print("| majority (whole train split) |" + " |" * args.seeds + f" {100 * majority:.1f} |")
    print("| manual prompt, zero-shot |" + " |" * args.seeds + f" {100 * zero:.1f} |")
    for method, (label, *_) in METHODS.items():
        print(f"| {label} | " + " | ".join(f"{100 * a:.1f}" for a in acc[method]) + f" | {spread(acc[method])} |")


if __name__ == "__main__":
    sys.exit(guarded(main))
