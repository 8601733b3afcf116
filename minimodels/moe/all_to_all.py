"""Expert parallelism (FastMoE, He et al. 2021, section 3; GShard, Lepikhin et al. 2020): the E experts of a
layer are split over the W processes of a torch.distributed group, E / W each, while the gate is replicated.
Every process routes its own tokens, then one all-to-all sends each token slot to the process holding its
expert and a second one brings the expert's output back:

    process r:  slots sorted by global expert id   (N_r, d)   counts (E,) = (W, E/W): slots for each process
        all-to-all  ->  the slots all processes sent to my E/W experts, grouped by sender   (M_r, d)
        regroup by my expert, run each of my experts once on its slice, undo the regrouping
        all-to-all  ->  back to the sender, in the order it sent them   (N_r, d)

Capacity is counted per process (on its own T tokens), as GShard does per group, so routing and drops on
a process are exactly those of the single-process layer on the same tokens; the tests hold it to that.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
    """all_to_all_single: send in_splits[j] rows of x (in order) to process j, receive out_splits[i] rows
    from process i, concatenated in process order. Uneven splits are fine (gloo and nccl)."""
    out = x.new_empty((sum(out_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits)
    return out


class AllToAll(torch.autograd.Function):
    """`exchange` with a gradient: the gradient of a row goes back the way the row came."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits):
        ctx.splits = out_splits, in_splits
        return exchange(x, out_splits, in_splits)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return exchange(grad, in_splits, out_splits), None, None


def run_experts_parallel(local_experts: int, x_slots: torch.Tensor, counts: list[int], run_local) -> torch.Tensor:
    """x_slots (N, d) sorted by global expert id with counts[e] slots for expert e (E ints); this process holds
    local_experts = E / W experts. run_local(x, local_counts) runs them on slots grouped by local expert.
    Returns the outputs (N, d) in x_slots' order and dtype."""
    world = dist.get_world_size()
    send = torch.tensor(counts).view(world, -1)  # (W, E/W): slots I send to each process's experts
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv.view(-1), send.view(-1))  # (W, E/W): slots each process sends to my experts
    send_rows, recv_rows = send.sum(1).tolist(), recv.sum(1).tolist()
    x_recv = AllToAll.apply(x_slots, recv_rows, send_rows)  # (M, d), grouped by sender, then by my expert
    # regroup by my expert: row i belongs to local expert expert_of[i]
    expert_of = torch.arange(local_experts).repeat(world).repeat_interleave(recv.view(-1))  # (M,)
    order = expert_of.argsort(stable=True).to(x_slots.device)  # (M,)
    y_sorted = run_local(x_recv[order], recv.sum(0).tolist()).to(x_slots.dtype)  # (M, d)
    y_recv = torch.empty_like(y_sorted).index_copy(0, order, y_sorted)  # back to the received order
    return AllToAll.apply(y_recv, send_rows, recv_rows)  # (N, d): every slot home again
