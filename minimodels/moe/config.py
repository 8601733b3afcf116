"""How a model uses the MoE layer: the `model.moe` config section, which blocks get an MoE feed-forward,
and how the layers' routings become the model's extra loss and logged metrics.

    model:
      moe: {num_experts: 8, gate: switch, every: 2}    # Switch Transformer: every other FFN is an MoE

A model with `moe` set builds each block's feed-forward with `build_block_ffn`, collects the Routing of
every MoE layer from its blocks (name -> Routing, in block order) and finishes with `add_moe_loss`:

    loss = task loss + aux_loss_coef * mean_l aux_loss_l + z_loss_coef * mean_l z_loss_l

Each layer's aux loss is computed on that layer's own routing and then averaged over layers (Switch,
section 2.2) — never one loss over the routings of all layers pooled, which would let layers with
opposite imbalances cancel out.

`upcycle` starts an MoE model from a dense run (sparse upcycling): `model.init_from` uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from minimodels.moe.gates import check_gate
from minimodels.moe.layer import MoE
from minimodels.moe.routing import Routing


@dataclass
class MoEConfig:
    num_experts: int = 8  # experts per MoE layer
    gate: str = "switch"  # topk | noisy_topk | switch | gshard | expert_choice (minimodels/moe/gates.py)
    top_k: int | None = None  # experts per token for topk / noisy_topk (default 2); switch is 1, gshard 2
    every: int = 2  # block i gets an MoE FFN when i % every == 1 (1 = all blocks; 2 = blocks 1, 3, ... as Switch)
    d_ff: int | None = None  # hidden width of each expert FFN; null = the model's own FFN width
    capacity_factor: float | None = 1.25  # token slots per expert = ceil(factor * T * k / E); null = dropless, eval too
    eval_capacity_factor: float | None = 2.0  # switch only: the factor in eval mode (when capacity_factor is set)
    jitter: float = 0.01  # switch only: in training the router sees x * U(1 - jitter, 1 + jitter); 0 = off
    random_routing: bool = True  # gshard only: in training keep the second expert with probability min(1, 2 g2)
    aux_loss_coef: float = 0.01  # weight of the mean load-balancing loss (Switch: alpha = 0.01)
    z_loss_coef: float = 0.001  # weight of the mean router z-loss (ST-MoE: 0.001)
    expert_parallel: bool = False  # under torchrun: shard each layer's experts over the processes (done by build_model)

    def validate(self, causal: bool = False) -> None:
        """causal: the model has a causal stack (GPT, T5's decoder), which expert choice cannot serve."""
        if self.num_experts < 1:
            raise ValueError(f"model.moe.num_experts: must be positive, got {self.num_experts}")
        check_gate(self.gate, self.num_experts, self.top_k)  # a known gate, top_k fits it
        if self.every < 1:
            raise ValueError(f"model.moe.every: must be positive, got {self.every}")
        if self.d_ff is not None and self.d_ff <= 0:
            raise ValueError(f"model.moe.d_ff: must be positive or null (the model's FFN width), got {self.d_ff}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"model.moe.jitter: must be in [0, 1), got {self.jitter}")
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"model.moe.{name}: must be > 0 or null (dropless), got {value}")
        if self.gate == "expert_choice" and causal:
            raise ValueError("model.moe.gate: expert_choice picks tokens by looking at the whole batch, future "
                             "tokens included, so a causal model cannot use it (use it in BERT)")
        if self.gate == "expert_choice" and self.capacity_factor is None:
            raise ValueError("model.moe.capacity_factor: expert_choice needs one (it is the average experts per token)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.moe.{name}: must be >= 0, got {getattr(self, name)}")

    def gate_options(self) -> dict:
        """Constructor options of the configured gate."""
        if self.gate == "switch":
            return dict(capacity_factor=self.capacity_factor, eval_capacity_factor=self.eval_capacity_factor,
                        jitter=self.jitter)
        if self.gate == "gshard":
            return dict(capacity_factor=self.capacity_factor, random_routing=self.random_routing)
        return dict(capacity_factor=self.capacity_factor)


def is_moe_block(config: MoEConfig | None, i: int) -> bool:
    """Whether block i (0-based) has an MoE feed-forward: i % every == 1, or every block when every = 1
    (the rule of Hugging Face's Switch Transformers, so blocks 1, 3, 5, ... with every = 2)."""
    return config is not None and (config.every == 1 or i % config.every == 1)


def build_block_ffn(config: MoEConfig | None, i: int, d_model: int, d_ff: int,
                    make_ffn: Callable[..., nn.Module]) -> nn.Module:
    """The feed-forward of block i: make_ffn(d_ff), the model's dense FFN of hidden width d_ff, or, in an
    MoE block, an MoE whose experts are make_ffn(width, num_experts): num_experts fresh FFNs of that kind
    stacked in one module (minimodels/nn/feedforward.py), of width config.d_ff or d_ff."""
    if not is_moe_block(config, i):
        return make_ffn(d_ff)
    return MoE(d_model, config.num_experts, config.gate, expert=make_ffn(config.d_ff or d_ff, config.num_experts),
               k=config.top_k, **config.gate_options())


def add_moe_loss(config: MoEConfig | None, routings: dict[str, Routing], loss: torch.Tensor | None
                 ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor] | None]:
    """Add the MoE layers' loss to the model's `loss` (None without labels stays None) and say what to log.
    routings: layer name -> Routing of the model's MoE layers; with none, returns (loss, None).

    loss + aux_loss_coef * mean over layers of aux_loss + z_loss_coef * mean over layers of z_loss.
    metrics, detached: moe_aux_loss and moe_z_loss (those two means), and for each layer <name>:
        <name>_aux_loss, <name>_z_loss   the layer's own losses (aux_loss: 1.0 = perfectly balanced)
        <name>_dropped                   share of token slots dropped (-1 in expert_index; GShard's skipped
                                         second choices and expert choice's padding count too)
        <name>_load_entropy              entropy of the share of slots each expert processed, over ln E:
                                         1.0 = every expert equally loaded, 0 = one expert takes all
        <name>_load                      (E,) that share, per expert
    """
    if not routings:
        return loss, None
    aux = torch.stack([r.aux_loss for r in routings.values()]).mean()
    z = torch.stack([r.z_loss for r in routings.values()]).mean()
    if loss is not None:
        loss = loss + config.aux_loss_coef * aux + config.z_loss_coef * z
    metrics = {"moe_aux_loss": aux.detach(), "moe_z_loss": z.detach()}
    for name, r in routings.items():
        load = r.tokens_per_expert.float() / r.tokens_per_expert.sum().clamp(min=1)  # (E,)
        entropy = -(load * load.clamp(min=1e-12).log()).sum() / math.log(max(len(load), 2))
        metrics.update({f"{name}_aux_loss": r.aux_loss.detach(), f"{name}_z_loss": r.z_loss.detach(),
                        f"{name}_dropped": (r.expert_index < 0).float().mean(), f"{name}_load_entropy": entropy,
                        f"{name}_load": load})
    return loss, metrics


def upcycle(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Sparse upcycling (Komatsuzaki et al. 2022, section 3.1): an MoE layer of `model` whose place a dense
    checkpoint fills with a dense FFN starts with that FFN copied into every one of its experts; its router
    keeps its fresh initialisation. state: the checkpoint's tensors by name. Returns the tensors with each
    such `<layer>.<name>` (shape s) replaced by `<layer>.experts.<name>` (num_experts, *s), the stacked experts'
    name and shape in the whole model (an expert-parallel process takes its rows from it), and the names of
    the upcycled layers.
    Layers the checkpoint holds as MoE layers already, or not at all, are left as they are."""
    state, upcycled = dict(state), []
    for prefix, module in model.named_modules():
        if not isinstance(module, MoE):
            continue
        dense = [name.removeprefix(prefix + ".") for name in state if name.startswith(prefix + ".")]
        if not dense or any(name.startswith(("experts.", "gate.")) for name in dense):
            continue
        for name in dense:
            tensor = state.pop(f"{prefix}.{name}")
            state[f"{prefix}.experts.{name}"] = tensor.expand(module.num_experts, *tensor.shape)
        upcycled.append(prefix)
    return state, upcycled
