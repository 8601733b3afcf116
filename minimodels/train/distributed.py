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

Expert parallelism (model.moe.expert_parallel, minimodels/moe/parallel.py): each process holds only its
share of every MoE layer's experts. DDP leaves those parameters alone, their gradients are divided by N as
DDP divides the others, the gradient norm counts every process's experts, and checkpoints gather them so that
model.safetensors is the whole model.

`Parallel` does all of this for the trainer, called the same way for every model and every world.
Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for a world of one.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from minimodels.config import ConfigError
from minimodels.moe.parallel import expert_shards
from minimodels.train.checkpoint import load_weights, read_weights


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


class Parallel:
    """How the model is spread over the processes, and what training does about it: alone (every method the
    plain one-process case), DDP, FSDP2 (train.distributed.fsdp) or expert shards."""

    def __init__(self, model: torch.nn.Module, world: World, fsdp: bool):
        self.model, self.world = model, world
        # parameters this process alone holds (expert shards): {name: its rows of the whole model's tensor}
        self.shards = expert_shards(model)
        self.fsdp, self.ddp = world.size > 1 and fsdp, None
        if self.fsdp:
            if self.shards:
                raise ConfigError("train.distributed.fsdp: not combined with model.moe.expert_parallel yet")
            shard_fully(model)  # in place: parameters become DTensors holding 1/N each

    @property
    def collective_forward(self) -> bool:
        """Does every process have to take part in each forward pass (FSDP gathers, experts all-to-all)?"""
        return self.fsdp or bool(self.shards)

    def wrap(self, objective: torch.nn.Module) -> torch.nn.Module:
        """What the training steps call: `objective` (the model, or a module holding it), under DDP when several
        processes hold whole copies. DDP broadcasts rank 0's weights at start and all-reduces (averages) gradients in
        backward, except for the expert shards, which differ from process to process."""
        if self.world.size > 1 and not self.fsdp:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(objective, list(expert_shards(objective)))
            self.ddp = objective = DistributedDataParallel(objective)
        return objective

    def gradient_sync(self, last: bool):
        """Context for one micro-batch's backward: DDP and FSDP reduce the gradients only in the last one."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
        return self.ddp.no_sync() if self.ddp and not last else contextlib.nullcontext()

    @torch.no_grad()
    def finish_gradients(self) -> None:
        """After the last backward: an expert shard's gradient already sums every process's tokens (they came by
        all-to-all); divide it by N as DDP does for the others, so that it is the gradient of the mean loss too."""
        for name, p in self.model.named_parameters():
            if name in self.shards and p.grad is not None:
                p.grad /= self.world.size

    @torch.no_grad()
    def clip_gradients(self, max_norm: float) -> float:
        """Returns norm, the L2 norm of the whole model's gradient; with max_norm > 0 scales all gradients by
        min(1, max_norm / norm). With expert shards that norm counts every process's experts, so all processes scale alike."""
        if not self.shards:
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            whole = norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP: norm of the shards' norms
            # torch's clip_grad_norm_ multiplies every gradient by min(1, max_norm / (norm + 1e-6)) even when that
            # is 1, a pass over all gradients at every step though most steps do not clip; skipping it changes no number
            if max_norm > 0 and max_norm / (whole + 1e-6) < 1:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
            return float(whole)
        grads = [(name in self.shards, p.grad) for name, p in self.model.named_parameters() if p.grad is not None]
        shared = sum(float(g.float().square().sum()) for local, g in grads if not local)
        (sharded,) = self.world.sum([sum(float(g.float().square().sum()) for local, g in grads if local)])
        norm = (shared + sharded) ** 0.5
        scale = max_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
        if max_norm > 0 and scale < 1:  # max_norm 0: measure the norm, clip nothing
            for _, g in grads:
                g.mul_(scale)
        return norm

    @torch.no_grad()
    def finite_state(self, optimizer: torch.optim.Optimizer) -> bool:
        """Are all weights, buffers and `optimizer` states finite, on every process? Each sums the part it holds in
        float64, which is finite exactly when every element is (and on CPU 4x cheaper than isfinite)."""
        tensors = list(self.model.state_dict().values())
        tensors += [t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if t.is_floating_point()]
        (total,) = self.world.sum([sum(float(t.sum(dtype=torch.float64)) for t in local)])
        return math.isfinite(total)

    def gather(self, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict, dict]:
        """(weights, optimizer state, extra trainer state) for a checkpoint; every process must call this. weights:
        the whole model's tensors (FSDP's gathered to rank 0; with expert shards every process's rows of the experts'
        stacked tensors concatenated), or None when the model's own state_dict is the whole model."""
        weights, optimizer_state, extra = None, optimizer.state_dict(), {}
        if self.fsdp:  # whole tensors to rank 0; the optimizer state keyed by parameter name
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(self.model, options=full)
            optimizer_state = get_optimizer_state_dict(self.model, optimizer, options=full)
            extra["optimizer_by_name"] = True
        if self.shards:
            mine = {n: p.detach().cpu() for n, p in self.model.named_parameters() if n in self.shards}
            weights = {n: t for n, t in self.model.state_dict().items() if n not in self.shards}
            parts = self.world.gather(mine)  # in rank order: the rows of the whole tensors, in order
            weights.update({n: torch.cat([part[n] for part in parts]) for n in mine})
            extra["optimizer_per_rank"] = self.world.gather(optimizer_state)  # experts' moments differ
        return weights, optimizer_state, extra

    def load(self, ckpt: str | Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load checkpoint `ckpt` into the model and `optimizer`; `state` is its trainer state (written by a run
        alone, under DDP, FSDP or with expert shards: see gather)."""
        by_name = state.get("optimizer_by_name", False)  # written under FSDP
        if self.fsdp and not by_name:
            raise ConfigError(f"{ckpt}: resuming under FSDP needs a checkpoint written under FSDP")
        if self.fsdp:
            set_model_state_dict(self.model, read_weights(ckpt), options=StateDictOptions(full_state_dict=True))
        else:
            load_weights(self.model, ckpt, self.shards)
        if by_name:  # whole tensors by parameter name: loads under FSDP, DDP or in one process alike
            set_optimizer_state_dict(self.model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        elif self.shards or "optimizer_per_rank" in state:
            if len(state.get("optimizer_per_rank", [])) != self.world.size or not self.shards:
                raise ConfigError(f"{ckpt}: an expert-parallel checkpoint resumes only with expert parallelism "
                                  f"over as many processes as wrote it ({len(state.get('optimizer_per_rank', []))})"
                                  "; its model.safetensors loads anywhere (generate, model.init_from)")
            optimizer.load_state_dict(state["optimizer_per_rank"][self.world.rank])
        else:
            optimizer.load_state_dict(state["optimizer"])
