"""What a teacher adds to a training step (knowledge inheritance, minimodels/models/inherit.py), printed as a
markdown table: a student's training step alone, the same step with its teacher (`Inheritance`, alpha = 1), and
the teacher's forward pass alone.

    python scripts/bench_inherit.py                      # README: configs/gpt.yaml as teacher, width 384 as student
    python scripts/bench_inherit.py configs/bert.yaml    # the same for BERT
    python scripts/bench_inherit.py configs/gpt.yaml train.batch_size=8 --student model.d_model=512 model.n_head=8

The teacher is the config with its overrides, the student the same with --student's overrides on top; both are
randomly initialised (a step costs the same whatever the weights) and trained on one batch of random tokens
shaped like the task's (scripts/bench_train.py). The three are interleaved round by round in one process at one
thread, each timed by that thread's CPU time (time.thread_time), under bf16 autocast and with freed memory kept
as the trainer does (MINIMODELS_REUSE_MEMORY=0: glibc's defaults): an A/B of whole steps, not a profile, whose
shares for memory-bound operators are far off what removing them saves on a shared machine. A teacher's
forward pass cannot cost less than its share of FLOPs, about (2 x teacher parameters) / (6 x student
parameters) of a step (counted here by torch's FlopCounterMode); the table prints that floor beside the
measured cost.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_train import BATCHES, step_flops
from minimodels.config import load_config
from minimodels.models import build_model
from minimodels.models.inherit import Inheritance, TeacherConfig, first_rows
from minimodels.train.memory import reuse_freed_memory


def build(config: Path, overrides: list[str]):
    """The model of `config` with `overrides` (random weights, no dropout) and its config."""
    cfg = load_config(config, overrides)
    cfg.model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or cfg.data.vocab_size, dropout=0.0,
                                    init_from=None)
    return build_model(cfg.model), cfg


def timed(fn) -> float:
    """fn()'s CPU time on this thread, in seconds."""
    t0 = time.thread_time()
    fn()
    return time.thread_time() - t0


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", type=Path, default=root / "configs" / "gpt.yaml", help="the teacher")
    p.add_argument("overrides", nargs="*", help="dotted overrides for teacher and student, e.g. train.batch_size=8")
    p.add_argument("--student", nargs="+", default=["model.d_model=384", "model.n_head=6"],
                   help="dotted overrides that make the student out of the teacher's config")
    p.add_argument("--rows", type=float, default=1.0, help="train.teacher.rows: the share of the batch the teacher scores")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds of one step each")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing")
    args = p.parse_intermixed_args()
    torch.set_num_threads(1)
    reuse_freed_memory()

    torch.manual_seed(0)
    teacher, cfg = build(args.config, args.overrides)
    student, student_cfg = build(args.config, args.overrides + args.student)
    if cfg.model.arch not in ("gpt", "bert"):
        raise SystemExit(f"error: {args.config}: model.arch={cfg.model.arch!r}; train.teacher takes gpt or bert")
    batch = BATCHES[cfg.model.arch](student_cfg, torch.Generator().manual_seed(0))
    objective = Inheritance(student.train(), teacher, TeacherConfig(run="", alpha=1.0, rows=args.rows))  # the teacher on every step
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=True)  # the trainer's optimizer

    def train_step(model) -> None:  # the trainer's step: bf16 autocast forward, backward, AdamW
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def teacher_forward() -> None:  # what Inheritance runs beside the student
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            teacher(**first_rows(batch, args.rows))

    steps = {"student alone": lambda: train_step(student), "student + teacher": lambda: train_step(objective),
             "teacher forward alone": teacher_forward}
    names, times = list(steps), {name: [] for name in steps}
    for r in range(args.warmup + args.rounds):
        for name in names[r % 3:] + names[:r % 3]:  # rotate who goes first
            seconds = timed(steps[name])
            if r >= args.warmup:
                times[name].append(seconds)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        teacher(**first_rows(batch, args.rows))
    floor = counter.get_total_flops() / step_flops(student, batch)
    n_params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in (("teacher", teacher), ("student", student))}
    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items())
    print(f"## What a teacher adds to a training step (torch {torch.__version__}, 1 thread, CPU time, bf16 autocast)\n")
    print(f"{args.config} {' '.join(args.overrides)}: teacher {n_params['teacher']:.2f}M parameters, student "
          f"({' '.join(args.student)}) {n_params['student']:.2f}M; batch {shapes}; median of {args.rounds} "
          f"interleaved rounds after {args.warmup} warm-up rounds; the teacher scores {args.rows:.0%} of the rows\n")
    print("| step | ms | share of a student step |\n|---|---:|---:|")
    for name in names:
        print(f"| {name} | {ms[name]:.0f} | {ms[name] / ms['student alone']:.0%} |")
    added = ms["student + teacher"] - ms["student alone"]
    print(f"| added by the teacher (forward + KL) | {added:.0f} | {added / ms['student alone']:.0%} |")
    print(f"\n- FLOPs of the teacher's forward / FLOPs of a student step: {floor:.0%} (the floor of the added share)")


if __name__ == "__main__":
    main()
