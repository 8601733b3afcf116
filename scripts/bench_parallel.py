"""Training throughput in one process or several, and the share of the step spent in expert parallelism's
all-to-all, printed as one markdown table row per run (rank 0 prints).

    OMP_NUM_THREADS=2 python scripts/bench_parallel.py configs/gpt.yaml
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 scripts/bench_parallel.py configs/gpt.yaml train.batch_size=16
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 scripts/bench_parallel.py configs/switch_gpt.yaml \\
        train.batch_size=16 model.moe.expert_parallel=true

It runs the ordinary Trainer's steps (no evaluation, no checkpoints; the tokenizer goes to --run-dir): --warmup
untimed steps, then --steps timed ones. The all-to-all time is measured by wrapping
minimodels.moe.all_to_all.exchange (the token exchange, forward and backward) with a timer in this script.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import minimodels.moe.all_to_all as all_to_all
from minimodels.config import load_config
from minimodels.models import build_model
from minimodels.train.distributed import close_world, init_world
from minimodels.train.run import prepare
from minimodels.train.trainer import Trainer

exchange_seconds = 0.0
untimed_exchange = all_to_all.exchange


def timed_exchange(*args):
    global exchange_seconds
    start = time.perf_counter()
    out = untimed_exchange(*args)
    exchange_seconds += time.perf_counter() - start
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--run-dir", default="runs/bench_parallel", help="where the tokenizer is written")
    a = p.parse_args()
    global exchange_seconds
    all_to_all.exchange = timed_exchange
    cfg = load_config(a.config, a.overrides)
    world = init_world(cfg.train.distributed.backend)
    run_dir = Path(a.run_dir)
    if not world.main:
        world.barrier()  # rank 0 first: it trains the tokenizer, the others load it (as train.py does)
    task = prepare(cfg, run_dir)
    if world.main:
        world.barrier()
    torch.manual_seed(cfg.train.seed)
    trainer = Trainer(build_model(cfg.model), task, cfg.train, run_dir, quiet=True, world=world)
    for _ in range(a.warmup):
        trainer.train_step()
    world.barrier()
    exchange_seconds, tokens, start = 0.0, 0, time.perf_counter()
    for _ in range(a.steps):
        tokens += trainer.train_step()["tokens"]
    seconds = time.perf_counter() - start
    (share,) = world.sum([exchange_seconds / seconds / world.size])  # mean over processes
    if world.main:
        print(f"| {a.config} {' '.join(a.overrides)} | {world.size} x {torch.get_num_threads()} | "
              f"{cfg.train.batch_size} | {1e3 * seconds / a.steps:.0f} | {tokens / seconds:,.0f} | {100 * share:.1f}% |")
    close_world(world)


if __name__ == "__main__":
    main()
