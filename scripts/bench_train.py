"""Training throughput of our GPT vs transformers' GPT2LMHeadModel, printed as a markdown table.

    python scripts/bench_train.py                            # model size from configs/gpt.yaml
    python scripts/bench_train.py --n-layer 2 --rounds 3     # smaller / quicker

One step = forward + backward + AdamW step on a (batch, seq_len) batch of random tokens. For each dtype
(fp32, and bf16 = torch.autocast on fp32 weights) three models of the same size and weights are timed:
ours with attn_impl=sdpa, ours with attn_impl=manual, and HF GPT-2. Their steps are interleaved round
by round (A B C, B C A, ...) so that a noisy shared machine slows all of them alike; we report medians.

    MFU = achieved FLOP/s / peak FLOP/s   (model FLOPs utilisation, PaLM appendix B)
    achieved = GPT.flops_per_token(seq_len) * tokens/s   (the same FLOPs are counted for the HF model)
    peak = best (n x n) @ (n x n) matmul in that dtype, measured in this run
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import yaml

from minimodels.hf import gpt_to_hf
from minimodels.models.gpt import GPT, GPTConfig

DEFAULTS = dict(n_layer=4, n_embd=256, n_head=4, block_size=256, vocab_size=4096, batch_size=16)  # CLI flags too
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def size_from_config(path: Path) -> dict:
    """The model size and batch size of a YAML config (model.*, train.batch_size), else DEFAULTS."""
    size = dict(DEFAULTS, activation="gelu")  # exact GELU: HF's "gelu" is the same F.gelu kernel
    if path.exists():
        cfg = yaml.safe_load(path.read_text())
        model = cfg.get("model", {})
        size.update({k: model[k] for k in ("n_layer", "n_embd", "n_head", "block_size") if model.get(k)})
        size["vocab_size"] = model.get("vocab_size") or cfg.get("data", {}).get("vocab_size") or size["vocab_size"]
        size["batch_size"] = cfg.get("train", {}).get("batch_size", size["batch_size"])
        size["activation"] = model.get("activation", "gelu")
    return size


def matmul_peak(dtype: torch.dtype, sizes=(2048, 3072, 4096), repeats: int = 3) -> float:
    """Best FLOP/s of a square matmul C = A B (2 n^3 FLOPs) over a few sizes."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def train_step(model, opt, ids: torch.Tensor, dtype: torch.dtype) -> float:
    """One forward + backward + AdamW step; returns its wall time in seconds. Both models take the same call."""
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss  # labels are shifted inside both models
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=root / "configs" / "gpt.yaml", help="read the default size here")
    for name in DEFAULTS:
        p.add_argument("--" + name.replace("_", "-"), type=int, help="override the config's value")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default block_size)")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds; each model runs --steps per round")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model and dtype before timing")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="HF attn_implementation")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    size = size_from_config(args.config)
    size.update({k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None})
    seq_len = args.seq_len or size["block_size"]
    config = dict(vocab_size=size["vocab_size"], block_size=size["block_size"], n_layer=size["n_layer"],
                  n_head=size["n_head"], n_embd=size["n_embd"], activation=size["activation"], dropout=0.0)
    models = {f"ours ({impl})": GPT(GPTConfig(**config, attn_impl=impl)) for impl in ("sdpa", "manual")}
    models[f"HF GPT2LMHeadModel ({args.hf_attn})"] = gpt_to_hf(models["ours (sdpa)"], attn_implementation=args.hf_attn)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    for m in models.values():
        m.train()
    flops_per_token = models["ours (sdpa)"].flops_per_token(seq_len)
    tokens_per_step = size["batch_size"] * seq_len
    ids = torch.randint(0, size["vocab_size"], (size["batch_size"], seq_len))

    dtypes = {d: DTYPES[d] for d in args.dtypes.split(",")}
    peak = {d: matmul_peak(dt) for d, dt in dtypes.items()}
    step_times = {(d, name): [] for d in dtypes for name in models}
    names = list(models)
    for d, dtype in dtypes.items():
        for name in names:
            for _ in range(args.warmup):
                train_step(models[name], opts[name], ids, dtype)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                step_times[d, name] += [train_step(models[name], opts[name], ids, dtype) for _ in range(args.steps)]
    peak = {d: max(peak[d], matmul_peak(dt)) for d, dt in dtypes.items()}  # again at the end: keep the best

    import transformers

    print(f"## GPT training throughput (torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{args.threads} threads, {os.cpu_count()} CPUs)\n")
    print(f"n_layer={size['n_layer']} n_embd={size['n_embd']} n_head={size['n_head']} vocab={size['vocab_size']} "
          f"batch={size['batch_size']} seq_len={seq_len}; {flops_per_token / 1e6:.1f} MFLOP/token; median of "
          f"{args.rounds} x {args.steps} steps after {args.warmup} warm-up steps\n")
    print("| dtype | model | ms / step | tokens / s | GFLOP/s | matmul peak GFLOP/s | MFU | speed vs HF |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for d in dtypes:
        median = {name: statistics.median(step_times[d, name]) for name in names}
        for name in names:
            achieved = flops_per_token * tokens_per_step / median[name]
            print(f"| {d} | {name} | {1e3 * median[name]:.0f} | {tokens_per_step / median[name]:,.0f} | "
                  f"{achieved / 1e9:.1f} | {peak[d] / 1e9:.0f} | {achieved / peak[d]:.1%} | "
                  f"{median[names[-1]] / median[name]:.2f}x |")
    print()
    for d in dtypes:
        ratio = statistics.median(step_times[d, "ours (sdpa)"]) / statistics.median(step_times[d, "ours (manual)"])
        print(f"- {d}: manual attention is {ratio:.2f}x the speed of sdpa "
              f"(> 1: manual faster) -> fastest here: {'manual' if ratio > 1 else 'sdpa'}")


if __name__ == "__main__":
    main()
