"""Speed of our MoE layer against three other ways to compute the same thing, printed as a markdown table.

    python scripts/bench_moe.py --threads 1
    python scripts/bench_moe.py --threads 1 --experts 64 --dtypes bf16 --rounds 7
    python scripts/bench_moe.py --threads 1 --clock cpu      # on a machine other jobs share (see bench_train.py)

One step = forward + backward of one layer on T tokens (x (T, d_model) in float32 and, as inside a network,
needing a gradient; bf16 = torch.autocast on float32 weights, as training runs it), gradients set to None
after each step as the trainer's zero_grad does.
Every variant but the floor routes with the same dropless TopKGate(k) and runs the same experts
(MLP d_model -> d_ff -> d_model, GELU, equal weights), so only the dispatch differs:

    ours        MoE: sort the token slots by expert, run all experts on their contiguous slices with stacked
                (E, ...) weights: in fp32 one grouped matmul per weight (torch's grouped_mm), in bf16 the groups
                padded to equal sizes and one bmm per weight (minimodels/moe/layer.py group_sizes)
    list        the same sort-and-split dispatch over a list of E separate MLP modules, one at a time (what
                MoE does with custom experts)
    masked      the per-expert loop of Hugging Face's Switch sparse MLP over that list: for every expert a
                boolean mask over all tokens, a gather, the expert, and an index_add back
    per-token   moe_reference, the loop over tokens the tests use; timed on the first --loop-tokens
                tokens only (one step per round) and scaled by T / loop_tokens
    dense       one MLP d_model -> k * d_ff -> d_model: the same active FLOPs per token, no router
    floor       the experts' matmuls alone: the k * T token slots split evenly over E experts with stacked
                (E, d_model, d_ff) weights, two batched matmuls, no router, no permutation: what no dispatch
                of these experts can beat (the same FLOPs as dense, but E experts' weights to read and
                their gradients to write)
    floor, bf16 weights
                (bf16 only) the floor with its weights stored in bf16, so nothing is cast: floor minus this is
                what autocast's casts of the E experts' fp32 weights, and of their gradients back, cost

Variants run interleaved, in a rotating order, round after round, so a noisy shared machine slows all of
them alike; each entry is the median over rounds of the mean step time within a round.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from minimodels.moe import MoE, TopKGate, moe_reference
from minimodels.nn import MLP
from minimodels.train.memory import reuse_freed_memory

from bench_train import CLOCKS, pick_clock  # (scripts/ is on sys.path when a script runs)

clock = CLOCKS["wall"]  # main() sets it from --clock


def masked_loop(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Hugging Face's SwitchTransformersExperts.forward, with our gate: one mask per expert."""
    routing = moe.gate(x)
    y = torch.zeros_like(x)
    hit = (torch.bincount(routing.expert_index[routing.expert_index >= 0], minlength=len(moe.experts)) > 0).nonzero()
    for e in hit.flatten().tolist():
        token, slot = torch.where(routing.expert_index == e)  # (n,), (n,)
        out = moe.experts[e](x[token]) * routing.weight[token, slot, None]
        y.index_add_(0, token, out.to(x.dtype))
    return y


class BalancedExperts(torch.nn.Module):
    """The floor: E experts as stacked weights, each given exactly its share of the token slots."""

    def __init__(self, E: int, d_model: int, d_ff: int):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(E, d_model, d_ff) * d_model ** -0.5)  # (E, d_model, d_ff)
        self.b1 = torch.nn.Parameter(torch.zeros(E, 1, d_ff))
        self.w2 = torch.nn.Parameter(torch.randn(E, d_ff, d_model) * d_ff ** -0.5)  # (E, d_ff, d_model)
        self.b2 = torch.nn.Parameter(torch.zeros(E, 1, d_model))

    def forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        E = self.w1.shape[0]
        slots = x.repeat(k, 1).view(E, -1, x.shape[-1])  # (E, k*T/E, d_model)
        h = torch.nn.functional.gelu(torch.baddbmm(self.b1, slots, self.w1))  # (E, k*T/E, d_ff)
        return torch.baddbmm(self.b2, h, self.w2).view(k, -1, x.shape[-1]).sum(0)  # (T, d_model)


def step_fn(variant: str, moe: MoE, listed: MoE, dense: MLP, floor: BalancedExperts, floor16: BalancedExperts,
            x: torch.Tensor, x16: torch.Tensor, grad: torch.Tensor, dtype: str, loop_tokens: int):
    params = [*moe.parameters(), *listed.parameters(), *dense.parameters(), *floor.parameters(),
              *floor16.parameters(), x, x16]
    k = moe.gate.k

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            if variant == "ours":
                y, g = moe(x)[0], grad
            elif variant == "list":
                y, g = listed(x)[0], grad
            elif variant == "masked":
                y, g = masked_loop(listed, x), grad
            elif variant == "dense":
                y, g = dense(x), grad
            elif variant == "floor":
                y, g = floor(x, k), grad
            elif variant == "floor16":
                y, g = floor16(x16, k), grad
            else:  # per-token
                y, g = moe_reference(moe, x[:loop_tokens])[0], grad[:loop_tokens]
        y.backward(g.to(y.dtype))
        for p in params:
            p.grad = None
    return step


def bench(E: int, k: int, dtype: str, args) -> dict[str, float]:
    """Median milliseconds per step of each variant (per-token: scaled to all T tokens)."""
    torch.manual_seed(0)
    moe = MoE(args.d_model, E, TopKGate(args.d_model, E, k=k), d_ff=args.d_ff)
    listed = MoE(args.d_model, E, moe.gate, expert=lambda: MLP(args.d_model, args.d_ff))  # the same gate
    listed.experts.load_state_dict({f"{e}.{name}": t[e] for name, t in moe.experts.state_dict().items() for e in range(E)})
    dense = MLP(args.d_model, k * args.d_ff)
    if (k * args.tokens) % E:
        raise SystemExit(f"error: --tokens {args.tokens} x k={k} slots do not split evenly over E={E} experts")
    floor = BalancedExperts(E, args.d_model, args.d_ff)
    floor16 = copy.deepcopy(floor).bfloat16()
    x = torch.randn(args.tokens, args.d_model, requires_grad=True)  # as inside a network: x needs a gradient
    x16 = x.detach().bfloat16().requires_grad_()
    grad = torch.randn(args.tokens, args.d_model)
    variants = ["ours", "list", "masked", "dense", "floor"] + (["floor16"] if dtype == "bf16" else []) + ["per-token"]
    steps = {v: step_fn(v, moe, listed, dense, floor, floor16, x, x16, grad, dtype, args.loop_tokens) for v in variants}
    for step in steps.values():  # warm-up
        step()
    times = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            reps = 1 if v == "per-token" else args.reps
            start = clock()
            for _ in range(reps):
                steps[v]()
            times[v].append((clock() - start) / reps)
    ms = {v: statistics.median(t) * 1e3 for v, t in times.items()}
    ms["per-token"] *= args.tokens / args.loop_tokens
    return ms


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the table shows medians")
    parser.add_argument("--reps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS), help="wall time, or the CPU time of the "
                        "timing thread (needs --threads 1; robust when other jobs share the machine)")
    parser.add_argument("--loop-tokens", type=int, default=128, help="tokens the per-token loop is timed on")
    args = parser.parse_args()
    global clock
    clock = pick_clock(args.clock, args.threads)
    if args.threads:
        torch.set_num_threads(args.threads)
    reuse_freed_memory()  # as the trainer does (MINIMODELS_REUSE_MEMORY=0: glibc's defaults)
    print(f"T={args.tokens} d_model={args.d_model} d_ff={args.d_ff}, forward+backward, "
          f"threads={torch.get_num_threads()}, {args.clock} clock, median of {args.rounds} rounds; "
          f"per-token loop timed on {args.loop_tokens} tokens and scaled\n")
    print("| dtype | E | k | ours ms | list ms | masked ms | dense ms | floor ms | floor, bf16 weights ms | per-token ms "
          "| list / ours | masked / ours | ours / dense | floor / dense | ours / floor | per-token / ours |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        for E in args.experts:
            for k in args.top_k:
                ms = bench(E, k, dtype, args)
                floor16 = f"{ms['floor16']:.1f}" if "floor16" in ms else "–"
                print(f"| {dtype} | {E} | {k} | {ms['ours']:.1f} | {ms['list']:.1f} | {ms['masked']:.1f} | "
                      f"{ms['dense']:.1f} | {ms['floor']:.1f} | {floor16} | {ms['per-token']:.0f} | {ms['list'] / ms['ours']:.2f}x | "
                      f"{ms['masked'] / ms['ours']:.2f}x | "
                      f"{ms['ours'] / ms['dense']:.2f}x | {ms['floor'] / ms['dense']:.2f}x | {ms['ours'] / ms['floor']:.2f}x | "
                      f"{ms['per-token'] / ms['ours']:.0f}x |", flush=True)


if __name__ == "__main__":
    main()
