"""Expert parallelism for a whole model: every MoE layer keeps E / W of its experts on each of the W processes
(the token exchange between them is minimodels/moe/all_to_all.py). The models' experts are stacked (one
(E, ...) tensor per weight), so a process holds rows of each; checkpoints store the whole tensors."""

from __future__ import annotations

import torch

from minimodels.moe.layer import MoE


def shard_experts(model: torch.nn.Module) -> None:
    """Expert parallelism for a whole model: every MoE layer keeps only this process's experts. Called on a
    fully built and initialised model, so that all processes start as slices of one and the same model."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.shard()


def expert_shards(model: torch.nn.Module) -> dict[str, slice]:
    """The parameters that live on this process only, as {name: the rows of the whole model's tensor this
    process holds}: each MoE layer's stacked expert weights (E, ...), of which process 1 of 2 with 8 experts
    holds rows 4..7, `blocks.1.ffn.experts.fc.weight` -> slice(4, 8). Empty without sharded MoE layers.
    Checkpoints store the whole tensors (the processes' rows concatenated in rank order)."""
    shards = {}
    for prefix, module in model.named_modules():
        if isinstance(module, MoE) and module.local_experts < module.num_experts:
            rows = slice(module.first_expert, module.first_expert + module.local_experts)
            shards.update({f"{prefix}.experts.{name}": rows for name, _ in module.experts.named_parameters()})
    return shards


def localize(state: dict[str, torch.Tensor], shards: dict[str, slice]) -> dict[str, torch.Tensor]:
    """A whole model's tensors -> the ones this process holds: its rows of each sharded one."""
    return {name: t[shards[name]] if name in shards else t for name, t in state.items()}
