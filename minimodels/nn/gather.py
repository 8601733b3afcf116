"""Gathering a tensor from every process of torch.distributed, for losses that compare each example with
the whole global batch (contrastive negatives, momentum keys). Every process passes a tensor of the same
shape (B, ...); the result is (W*B, ...), rank 0's rows first, then rank 1's, ..., the order in which one
process holding the whole global batch sees them (the trainer gives rank r the r-th slice). Without
torch.distributed, or with one process, both functions return x itself.

all_gather_with_grad lets gradients through: if process r computes a loss L_r from the gathered tensor, the
backward hands x on process r the sum over all processes s of dL_s/dx_r (an all-reduce of the gathered
gradient, then r's own rows). So with L = 1/W sum_r L_r, and DDP averaging parameter gradients over the W
processes, every process ends with dL/dtheta, as one process computing L would (open_clip's gather with
gradients and local loss; Radford et al. 2021 shard the similarity matrix the same way).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """x (B, ...) on each of W processes -> (W*B, ...) in rank order; no gradient."""
    parts = [torch.empty_like(x) for _ in range(rank_and_size()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class AllGather(torch.autograd.Function):
    """gather_rows with a gradient: each process gets the gradient of every process's loss for its rows."""

    @staticmethod
    def forward(ctx, x):
        return gather_rows(x)

    @staticmethod
    def backward(ctx, grad):
        rank, size = rank_and_size()
        grad = grad.contiguous().clone()  # (W*B, ...)
        dist.all_reduce(grad)  # row j: sum over processes s of dL_s / d(row j)
        return grad.chunk(size)[rank]  # (B, ...) my rows


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """x (B, ...) -> (W*B, ...) in rank order, differentiable (see the module docstring); x when W = 1."""
    return x if rank_and_size()[1] == 1 else AllGather.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """x (B, ...) -> (W*B, ...) in rank order, without gradient (MoCo's concat_all_gather); x when W = 1."""
    return x if rank_and_size()[1] == 1 else gather_rows(x)
