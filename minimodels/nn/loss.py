"""The language-model loss: cross-entropy of N scored positions over a vocabulary of V tokens.

    L = 1/N sum_i -log softmax(z_i)[y_i] = 1/N sum_i (lse_i - z_i[y_i]),    lse_i = log sum_j exp z_ij
    dL/dz_i = (softmax(z_i) - onehot(y_i)) / N = (exp(z_i - lse_i) - onehot(y_i)) / N

It gives F.cross_entropy(logits.float(), targets)'s value and gradient (to ~1e-7, fp32 arithmetic), but does
not copy the (N, V) logits to fp32 as a whole: it works through them in chunks of rows small enough to stay in
the CPU's cache (64 rows of a 4096-token vocabulary, 1 MB in fp32), so each element is read from memory once
going forward and once going backward, and the gradient is written straight in the logits' dtype (bf16 under
autocast). The GPT training step at the main job's size, (4096, 4096) bf16 logits, on 2 cores of an Intel Xeon
with AMX (`python scripts/bench_train.py --dtypes bf16`): 186 ms with F.cross_entropy(logits.float()), 176 ms
with this. On a GPU the logits are one chunk.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 18  # logits per chunk: 256K elements = 1 MB in fp32, fits a core's L2 cache


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, ignore_index):
        keep = targets != ignore_index  # (N,) the scored positions
        y = targets.masked_fill(~keep, 0)  # (N,) an index that exists where the target is ignored
        rows = logits.size(0) if logits.is_cuda else max(1, CHUNK_ELEMENTS // logits.size(1))
        lse = torch.cat([torch.logsumexp(z.float(), dim=-1) for z in logits.split(rows)])  # (N,) lse_i, fp32
        picked = logits.gather(1, y[:, None]).squeeze(1).float()  # (N,) z_i[y_i]
        n = keep.sum()
        ctx.save_for_backward(logits, y, keep, lse, n)
        ctx.rows = rows
        return torch.where(keep, lse - picked, 0.0).sum() / n  # 0 / 0 = nan when nothing is scored, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        logits, y, keep, lse, n = ctx.saved_tensors
        grad = torch.empty_like(logits)  # (N, V) in the logits' dtype
        scale = (grad_loss / n) * keep  # (N,) 1/N per scored row, 0 per ignored row
        for z, g, l, t, s in zip(logits.split(ctx.rows), grad.split(ctx.rows), lse.split(ctx.rows), y.split(ctx.rows),
                                 scale.split(ctx.rows)):
            p = (z.float() - l[:, None]).exp_()  # softmax(z_i) = exp(z_i - lse_i), (rows, V) fp32, a new tensor
            p.scatter_add_(1, t[:, None], torch.full_like(l[:, None], -1.0))  # - onehot(y_i)
            g.copy_(p.mul_(s[:, None]))  # / N, written in the logits' dtype
        return grad, None, None


# Eager under torch.compile (a graph break): traced, the loop over the chunks made the compiled configs/gpt.yaml
# training step slower than the eager one (247 against 189 ms, bf16, 2 AMX threads, one-off probe); left eager, the
# compiled step is faster: 177 against 189 ms (`python scripts/bench_train.py --dtypes bf16 --compile`).
@torch.compiler.disable
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy (nats) of logits (..., V) against targets (...), skipping targets == ignore_index;
    computed in fp32 whatever the logits' dtype. Pass the logits unflattened: the flattening view is made here,
    outside a compiled graph, which then returns the logits alone (a graph returning the logits and a view of them
    crashed in torch 2.13 when loaded from the AOTAutograd cache, which minimodels/train/device.py compile_model
    now turns off)."""
    if logits.dim() < 2 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: expects logits (..., V) and targets (...) of the same leading shape, got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    return _CrossEntropy.apply(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index)
