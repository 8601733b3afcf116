"""Training throughput of our GPT / BERT / T5 against the Hugging Face model of the same size and weights,
printed as a markdown table.

    python scripts/bench_train.py                                   # GPT at the size of configs/gpt.yaml
    python scripts/bench_train.py configs/bert.yaml                 # BERT vs BertForMaskedLM
    python scripts/bench_train.py configs/t5.yaml --rounds 4        # T5 vs T5ForConditionalGeneration
    python scripts/bench_train.py configs/gpt.yaml model.n_layer=2 train.batch_size=8   # dotted overrides
    python scripts/bench_train.py configs/switch_gpt.yaml --dtypes bf16 # Switch-GPT vs its dense twin
    python scripts/bench_train.py --threads 1 --clock cpu               # on a machine other jobs share
    python scripts/bench_train.py --dtypes bf16 --compile               # and ours under torch.compile

A config with `model.moe` (Switch-GPT, Switch-BERT, ...) is timed against its dense twin, the same config with
`model.moe: null` (same width, same FLOPs per token but the router), instead of a Hugging Face model:
"speed vs dense" is the sparse model's tokens/s over the dense one's.
`--clock cpu` times each step by the CPU time of the thread running it (one thread only), so time the
process spends waiting for a core taken by another job does not count; memory traffic of other jobs still
slows it, so compare rows of one run, not runs.

The model size and batch come from the config (vocab_size from data.vocab_size when the model leaves it
null). One step = forward + backward + AdamW step (fused, as the trainer's) on a batch of random tokens
shaped like the task's: GPT (batch, seq_len) next-token prediction; BERT (batch, seq_len) with 15% of positions as MLM targets;
T5 (batch, seq_len) encoder input and (batch, seq_len * noise_density + ...) targets as span corruption
makes them. For each dtype (fp32, and bf16 = torch.autocast on fp32 weights) three models are timed: ours
with attn_impl=sdpa, ours with attn_impl=manual, and the HF model. Their steps are interleaved round by
round (A B C, B C A, ...) so that a noisy shared machine slows all of them alike; we report medians.

    MFU = achieved FLOP/s / peak FLOP/s   (model FLOPs utilisation, PaLM appendix B)
    achieved = FLOPs of one step of that model (counted by torch's FlopCounterMode: every matmul and
               attention, forward and backward) / step time
For GPT a fourth model is timed: `nanoGPT-style`, the same GPT written the way compact reference implementations
such as karpathy's nanoGPT write it (below; our parameter names, so it loads our weights, and the bench checks that
it computes our loss before timing it).
Each model's own FLOPs are counted: our BERT scores only the ~15% masked positions with the MLM head (as
BERT's own pretraining code does) while BertForMaskedLM scores all of them, so it does more work for the
same loss. "speed vs HF" compares time per step, i.e. per training example, which is what a user waits for.
    peak = best (n x n) @ (n x n) matmul in that dtype, measured in this run
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from minimodels.config import load_config
from minimodels.models import build_model
from minimodels.train.device import compile_model
from minimodels.train.memory import reuse_freed_memory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gpt_batch(cfg, g):
    B, T = cfg.train.batch_size, cfg.data.seq_len or cfg.model.block_size
    ids = torch.randint(0, cfg.model.vocab_size, (B, T), generator=g)
    return {"input_ids": ids, "labels": ids}  # both models shift the labels inside


def bert_batch(cfg, g):
    B, T = cfg.train.batch_size, cfg.data.seq_len or cfg.model.block_size
    ids = torch.randint(0, cfg.model.vocab_size, (B, T), generator=g)
    selected = torch.rand(B, T, generator=g) < cfg.data.mask_prob
    return {"input_ids": ids, "padding_mask": torch.ones(B, T, dtype=torch.long), "labels": ids.masked_fill(~selected, -100)}


def t5_batch(cfg, g):
    B, T = cfg.train.batch_size, cfg.data.seq_len
    spans = max(1, round(T * cfg.data.noise_density / cfg.data.mean_span_length))
    t_out = round(T * cfg.data.noise_density) + spans + 1  # dropped tokens + one sentinel per span + eos
    ids = torch.randint(0, cfg.model.vocab_size, (B, T), generator=g)
    return {"input_ids": ids, "padding_mask": torch.ones(B, T, dtype=torch.long),
            "labels": torch.randint(0, cfg.model.vocab_size, (B, t_out), generator=g)}


def to_hf(model, attn: str):
    """The Hugging Face model with our model's weights (transformers is imported inside minimodels.hf)."""
    from minimodels import hf

    return getattr(hf, f"{model.config.arch}_to_hf")(model, attn_implementation=attn)  # gpt_to_hf, bert_to_hf, t5_to_hf


class NanoGPTStyle(nn.Module):
    """GPT-2 as a compact reference implementation writes it (nanoGPT's model.py, written here from the GPT-2
    paper's description): pre-LN blocks, one Linear for Q, K and V, torch's scaled_dot_product_attention with
    is_causal, a 4x GELU MLP, tied embeddings, and F.cross_entropy over all (B T, V) logits under autocast. No
    chunked loss, no manual bf16 attention, no padding tricks: the baseline our GPT's speed-ups are measured
    from. Bench only; the parameter names are our GPT's."""

    def __init__(self, c):
        super().__init__()
        self.n_head = c.n_head
        self.tok_emb, self.pos_emb = nn.Embedding(c.vocab_size, c.d_model), nn.Embedding(c.block_size, c.d_model)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(c.d_model), ln2=nn.LayerNorm(c.d_model),
            attn=nn.ModuleDict(dict(qkv=nn.Linear(c.d_model, 3 * c.d_model), proj=nn.Linear(c.d_model, c.d_model))),
            ffn=nn.ModuleDict(dict(fc=nn.Linear(c.d_model, 4 * c.d_model), proj=nn.Linear(4 * c.d_model, c.d_model)))))
            for _ in range(c.n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(c.d_model), nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def attention(self, attn, h):  # (B, T, C) -> (B, T, C)
        B, T, C = h.shape
        q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs) each
                   for z in attn["qkv"](h).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return attn["proj"](y.transpose(1, 2).reshape(B, T, C))

    def forward(self, input_ids, labels):
        x = self.tok_emb(input_ids) + self.pos_emb(torch.arange(input_ids.size(1)))  # (B, T, C)
        for b in self.blocks:
            x = x + self.attention(b["attn"], b["ln1"](x))
            x = x + b["ffn"]["proj"](F.gelu(b["ffn"]["fc"](b["ln2"](x))))
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T): position t predicts token t + 1
        return SimpleNamespace(logits=logits, loss=F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


BATCHES = {"gpt": gpt_batch, "bert": bert_batch, "t5": t5_batch}  # model.arch -> random batch shaped like its task


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}  # --clock of bench_train.py and bench_moe.py
clock = CLOCKS["wall"]  # main() sets it from --clock


def pick_clock(name: str, threads: int):
    """The timer for --clock `name`: wall time, or the CPU time of the calling thread, which only measures a
    step when that one thread runs it."""
    if name == "cpu" and threads != 1:
        raise SystemExit("error: --clock cpu counts one thread's CPU time: it needs --threads 1")
    return CLOCKS[name]


def matmul_peak(dtype: torch.dtype, sizes=(2048, 3072, 4096), repeats: int = 3) -> float:
    """Best FLOP/s of a square matmul C = A B (2 n^3 FLOPs) over a few sizes."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        for _ in range(repeats):
            t0 = clock()
            a @ b
            best = max(best, 2 * n**3 / (clock() - t0))
    return best


def train_step(model, opt, batch: dict, dtype: torch.dtype) -> float:
    """One forward + backward + AdamW step; returns its time in seconds (by `clock`). All models take the
    same call."""
    t0 = clock()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return clock() - t0


def adamw_step_ms(model, rounds: int = 20) -> dict[str, float]:
    """Median time of one AdamW step over the model's parameters (random gradients), fused and not."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    opts = {"fused": torch.optim.AdamW(params, fused=True), "per-tensor loop": torch.optim.AdamW(params, foreach=False)}
    times = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            t0 = clock()
            opt.step()
            times[name].append(clock() - t0)
    return {name: 1e3 * statistics.median(t[2:]) for name, t in times.items()}


@register_flop_formula(torch.ops.aten._grouped_mm)
def grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """The stacked MoE experts' matmuls (FlopCounterMode has no formula for them): (M, K) @ (E, K, N) groups
    the M rows, (M, K) @ (K, N) the K columns; either way 2 M K N."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[-1]


def step_flops(model, batch: dict) -> int:
    """FLOPs of one forward + backward, counted op by op (fp32, so no kernel choice depends on dtype)."""
    with FlopCounterMode(display=False) as counter:
        model(**batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", type=Path, default=root / "configs" / "gpt.yaml", help="model size and batch")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_layer=2 train.batch_size=8")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds; each model runs --steps per round")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model and dtype before timing")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--clock", default="wall", choices=list(CLOCKS), help="wall time, or the CPU time of the "
                   "timing thread (needs --threads 1; robust when other jobs share the machine)")
    p.add_argument("--dtypes", default="fp32,bf16", help="comma-separated subset of fp32,bf16")
    p.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "eager"], help="HF attn_implementation")
    p.add_argument("--peak-sizes", default="2048,3072,4096", help="matrix sizes n for the (n x n) matmul peak")
    p.add_argument("--compile", action="store_true", help="also time a copy of ours (manual; the sparse model for "
                   "a config with model.moe) under torch.compile, as train.compile=true runs it; the warm-up steps "
                   "compile it (about a minute per dtype on CPU with an empty compile cache)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print the N operators taking the most time in bf16 steps of ours (manual)")
    args = p.parse_intermixed_args()
    global clock
    clock = pick_clock(args.clock, args.threads)
    torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the trainer does (MINIMODELS_REUSE_MEMORY=0: glibc's defaults)

    cfg = load_config(args.config, args.overrides)
    arch = cfg.model.arch
    if arch not in BATCHES:
        raise SystemExit(f"error: {args.config}: model.arch={arch!r} has no benchmark (valid: {', '.join(BATCHES)})")
    cfg.model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or cfg.data.vocab_size, dropout=0.0,
                                    init_from=None)
    batch = BATCHES[arch](cfg, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    if cfg.model.moe is None:  # ours with either attention against Hugging Face's model with our weights
        models = {f"ours ({impl})": build_model(dataclasses.replace(cfg.model, attn_impl=impl)) for impl in ("sdpa", "manual")}
        models["ours (manual)"].load_state_dict(models["ours (sdpa)"].state_dict())
        m = cfg.model
        if arch == "gpt" and (m.ffn, m.activation, m.bias, m.tie_weights, m.d_ff or 4 * m.d_model, m.norm_eps) == (
                "mlp", "gelu", True, True, 4 * m.d_model, 1e-5):  # the GPT-2 that NanoGPTStyle writes
            models["nanoGPT-style"] = NanoGPTStyle(cfg.model)
            models["nanoGPT-style"].load_state_dict(models["ours (sdpa)"].state_dict())
            with torch.no_grad():
                ours, nano = (models[n](**batch).loss.item() for n in ("ours (sdpa)", "nanoGPT-style"))
            if abs(ours - nano) > 1e-4:
                raise SystemExit(f"error: nanoGPT-style loss {nano:.6f} != ours {ours:.6f}: not the same model")
        reference = to_hf(models["ours (sdpa)"], args.hf_attn)
        ref_name = f"HF {type(reference).__name__} ({reference.config._attn_implementation})"
    else:  # the sparse model against its dense twin, both with the attention `auto` picks
        models = {f"ours, {cfg.model.moe.num_experts} experts ({cfg.model.moe.gate})": build_model(cfg.model)}
        reference, ref_name = build_model(dataclasses.replace(cfg.model, moe=None)), "ours, dense twin"
    models[ref_name] = reference
    compiled = {}
    if args.compile:
        base = "ours (manual)" if "ours (manual)" in models else next(iter(models))
        twin = build_model(models[base].config)
        twin.load_state_dict(models[base].state_dict())
        compiled[f"{base}, compiled"] = (compile_model(twin), base)  # as train.compile=true does
    # the trainer's optimizer for every model (minimodels/train/optim.py): fused AdamW
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for name, m in models.items()}
    for m in models.values():
        m.train()
    flops = {name: step_flops(m, batch) for name, m in models.items()}
    for name, (m, base) in compiled.items():  # the same model: its FLOPs are its base's
        models[name], flops[name] = m, flops[base]
        opts[name] = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
        m.train()
    tokens = batch["input_ids"].numel() + (batch["labels"].numel() if arch == "t5" else 0)  # T5: encoder + decoder tokens

    dtypes = {d: DTYPES[d] for d in args.dtypes.split(",")}
    sizes = tuple(int(n) for n in args.peak_sizes.split(","))
    peak = {d: matmul_peak(dt, sizes) for d, dt in dtypes.items()}
    step_times = {(d, name): [] for d in dtypes for name in models}
    names = list(models)
    for d, dtype in dtypes.items():
        for name in names:
            for _ in range(args.warmup):
                train_step(models[name], opts[name], batch, dtype)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate who goes first
                step_times[d, name] += [train_step(models[name], opts[name], batch, dtype) for _ in range(args.steps)]
    peak = {d: max(peak[d], matmul_peak(dt, sizes)) for d, dt in dtypes.items()}  # again at the end: keep the best

    shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in batch.items())
    versions = f"torch {torch.__version__}" + ("" if cfg.model.moe else f", transformers {version('transformers')}")
    print(f"## {arch.upper()} training throughput ({versions}, {args.threads} threads, {os.cpu_count()} CPUs, "
          f"{args.clock} clock)\n")
    print(f"{args.config} {' '.join(args.overrides)}: {sum(p.numel() for p in models[names[0]].parameters()) / 1e6:.2f}M "
          f"parameters; batch {shapes}; {flops[names[0]] / 1e9:.1f} GFLOP/step (ours), {flops[ref_name] / 1e9:.1f} ({ref_name}); median of {args.rounds} x {args.steps} steps "
          f"after {args.warmup} warm-up steps\n")
    print(f"| dtype | model | ms / step | tokens / s | GFLOP/s | matmul peak GFLOP/s | MFU | speed vs {'dense' if cfg.model.moe else 'HF'} |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for d in dtypes:
        median = {name: statistics.median(step_times[d, name]) for name in names}
        for name in names:
            achieved = flops[name] / median[name]
            print(f"| {d} | {name} | {1e3 * median[name]:.0f} | {tokens / median[name]:,.0f} | "
                  f"{achieved / 1e9:.1f} | {peak[d] / 1e9:.0f} | {achieved / peak[d]:.1%} | "
                  f"{median[ref_name] / median[name]:.2f}x |")
    print()
    for d in dtypes if cfg.model.moe is None else ():
        ratio = statistics.median(step_times[d, "ours (sdpa)"]) / statistics.median(step_times[d, "ours (manual)"])
        print(f"- {d}: manual attention is {ratio:.2f}x the speed of sdpa "
              f"(> 1: manual faster) -> fastest here: {'manual' if ratio > 1 else 'sdpa'}")
    adamw = adamw_step_ms(models[names[0]])
    print(f"- AdamW step over our model's parameters: " + ", ".join(f"{k} {v:.1f} ms" for k, v in adamw.items()))
    if args.profile:
        name = "ours (manual)" if "ours (manual)" in models else names[0]  # or the sparse model
        print_profile(models[name], opts[name], batch, args.profile)


def print_profile(model, opt, batch: dict, rows: int, steps: int = 4) -> None:
    """Where a bf16 training step spends its time: the operators with the most self time over `steps` steps,
    as a share of the step (matmuls: aten::mm, addmm, bmm; the rest is what a faster step must remove).
    Use it to find candidates and an A/B of steps to size them: for memory-bound operators the profiler's share
    can be far above what removing them saves (the GPT step's cross-entropy: ~19% of the profile here, while
    a step with a free stand-in loss was 4.5% faster in a one-off A/B, 1 thread, CPU time)."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(steps):
            train_step(model, opt, batch, torch.bfloat16)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\n| operator (bf16 step of {model.config.arch}) | ms / step | share |\n|---|---:|---:|")
    for e in events[:rows]:
        print(f"| {e.key} | {e.self_cpu_time_total / 1e3 / steps:.1f} | {e.self_cpu_time_total / total:.1%} |")


if __name__ == "__main__":
    main()
