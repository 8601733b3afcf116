"""Several processes on PyTorch's own engine: `torchrun --nproc_per_node=N scripts/train.py configs/x.yaml`.

torchrun starts N copies of the script and tells each, in environment variables, who it is:

    RANK        this process, 0 .. WORLD_SIZE - 1     (rank 0 logs, shows the progress bar, writes the run folder)
    WORLD_SIZE  how many processes train together
    LOCAL_RANK  this process on its machine          (picks the GPU: cuda:LOCAL_RANK)

Data parallelism (DDP): every process holds the whole model and reads its own share of each batch; after
backward, DDP averages the gradients over processes (an all-reduce), so every copy takes the same step.
With train.batch_size = b per process, N processes train exactly like one process with batch N*b. A loss
over the batch as a whole (contrastive negatives, momentum queues) gathers what it compares with from the
other processes inside the model (minimodels/nn/gather.py, used by BriVL / CLIP).

Fully sharded data parallelism (train.distributed.fsdp, FSDP2's `fully_shard`): each process keeps only
1/N of every parameter, gradient and optimizer state; a block's parameters are gathered just before it runs
and freed after, so a model N times larger than one process's memory trains. The arithmetic is DDP's.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0  # this process
    size: int = 1  # number of processes
    local_rank: int = 0  # this process on its machine

    @property
    def main(self) -> bool:
        """Rank 0: the one process that logs and writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Sum each number over all processes (an all-reduce); a world of one returns them unchanged."""
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)  # gloo reduces CPU tensors; float64 keeps counts and loss sums exact
        return t.tolist()

    def gather(self, obj) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every process."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out


def init_world(backend: str = "auto") -> World:
    """Join the process group torchrun set up (backend auto: nccl when CUDA is available, else gloo), or
    return a world of one when not started by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend)
    return world


def close_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard_fully(model: torch.nn.Module) -> None:
    """FSDP2: every transformer block is one unit of gathering (PreLNBlock / PostLNBlock, whatever the model),
    the rest of the model (embeddings, heads, norms) the root unit."""
    from torch.distributed.fsdp import fully_shard

    from minimodels.nn import PostLNBlock, PreLNBlock

    for module in model.modules():
        if isinstance(module, (PreLNBlock, PostLNBlock)):
            fully_shard(module)
    fully_shard(model)
