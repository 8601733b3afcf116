"""Expert parallelism for a whole model: every MoE layer keeps E / W of its experts on each of the W processes
(the token exchange between them is minimodels/moe/all_to_all.py). Checkpoints store the whole model, so each
process names its experts by their place in the whole model."""

from __future__ import annotations

import torch

from minimodels.moe.layer import MoE


def shard_experts(model: torch.nn.Module) -> None:
    """Expert parallelism for a whole model: every MoE layer keeps only this process's experts. Called on a
    fully built and initialised model, so that all processes start as slices of one and the same model."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.shard()


def expert_shards(model: torch.nn.Module) -> dict[str, str]:
    """The parameters that live on this process only, as {name in this model: name in the whole model}:
    `blocks.1.ffn.experts.0.fc.weight` on process 1 of 2 with 8 experts is `blocks.1.ffn.experts.4.fc.weight`.
    Empty without sharded MoE layers. Checkpoints store the whole model under the second names."""
    names = {}
    for prefix, module in model.named_modules():
        if isinstance(module, MoE) and len(module.experts) < module.num_experts:
            for name, _ in module.experts.named_parameters():
                i, rest = name.split(".", 1)
                names[f"{prefix}.experts.{name}"] = f"{prefix}.experts.{int(i) + module.first_expert}.{rest}"
    return names


def localize(state: dict[str, torch.Tensor], shards: dict[str, str]) -> dict[str, torch.Tensor]:
    """A whole model's tensors (checkpoint names) -> the ones this process holds, under its own names."""
    local = {whole: own for own, whole in shards.items()}
    sharded = {own[:own.index(".experts.") + len(".experts.")] for own in shards}  # "blocks.1.ffn.experts."
    return {local.get(name, name): t for name, t in state.items()
            if name in local or not any(name.startswith(prefix) for prefix in sharded)}
