"""What a gate decides, as plain values: the `Routing` dataclass, expert capacity, and the two aux losses.

A gate scores T tokens against E experts and picks k expert slots per token. Everything downstream (the
MoE layer, the reference loop, a user's unit test) reads only the `Routing` it returns:

    choice       (T, k)  expert of each token's i-th choice, as the router chose it (before capacity)
    expert_index (T, k)  the same, with -1 where that slot was dropped because its expert was full
    weight       (T, k)  how much that expert's output counts for the token, 0 where dropped

Capacity (Switch Transformer, Fedus et al. 2021, eq. 3, with k slots per token):

    capacity = ceil(capacity_factor * T * k / E)      token slots one expert processes at most

Slots beyond it are dropped: the token's output for that slot is 0, so the block's residual carries it.
A gate's aux_loss counts `choice`, what the router asked for, not what capacity let through (as Mesh
TensorFlow's Switch and GShard do): for topk, switch and expert_choice r.aux_loss is
load_balancing_loss(r.probs, r.choice, E); gshard counts first choices only, r.choice[:, :1]; noisy_topk
has a loss of its own (see NoisyTopKGate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """The routing decisions of one MoE layer for T tokens and E experts."""

    choice: torch.Tensor  # (T, k) long: expert of each token's i-th choice before capacity (-1: the gate skipped it)
    expert_index: torch.Tensor  # (T, k) long: `choice` with -1 where the slot was dropped (its expert was full)
    weight: torch.Tensor  # (T, k) float32: combine weights, 0 where dropped
    probs: torch.Tensor  # (T, E) float32: the router's softmax
    logits: torch.Tensor  # (T, E) float32: the router's logits (the ones the choice was made from)
    tokens_per_expert: torch.Tensor  # (E,) long: token slots each expert actually processes
    capacity: int | None  # token slots per expert, None when dropless
    aux_loss: torch.Tensor  # scalar load-balancing loss of `choice` (before drops), 1.0 for perfectly uniform routing
    z_loss: torch.Tensor  # scalar router z-loss


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float | None) -> int | None:
    """ceil(capacity_factor * num_tokens * k / num_experts) token slots per expert; None (dropless) when
    capacity_factor is None. With capacity_factor = 1 and perfectly balanced routing nothing is dropped."""
    if capacity_factor is None:
        return None
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0 or None (dropless), got {capacity_factor}")
    return math.ceil(capacity_factor * num_tokens * k / num_experts)


def drop_overflow(choice: torch.Tensor, num_experts: int, capacity: int | None) -> torch.Tensor:
    """choice (T, k) expert ids (-1 = already dropped) -> the same with -1 where an expert is over capacity.

    Slots queue up choice-major: every token's first choice in position order, then every second choice,
    and so on (GShard, Lepikhin et al. 2020, Algorithm 1), so a first choice is never displaced by a second.
    """
    if capacity is None:
        return choice
    T, k = choice.shape
    queue = choice.t().reshape(-1)  # (k*T,) first choices of tokens 0..T-1, then second choices, ...
    onehot = F.one_hot(queue.clamp(min=0), num_experts) * (queue >= 0).unsqueeze(1)  # (k*T, E)
    place = (onehot.cumsum(0) * onehot).sum(1)  # (k*T,) 1-based place in its expert's queue, 0 if dropped
    kept = queue.masked_fill(place > capacity, -1)
    return kept.view(k, T).t()  # (T, k)


def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4-6), extended to k choices per token:

        loss = E * sum_i f_i * P_i
        f_i  = share of the routed slots in expert_index (T, k) that chose expert i   (entries -1 ignored)
        P_i  = mean over tokens of probs[:, i]                                         (probs (T, E))

    Both f and P sum to 1, so perfectly uniform routing (f_i = P_i = 1/E) gives exactly 1.0 for every k;
    for k = 1 this is Switch's E * sum_i f_i * P_i. f counts integer choices, so the gradient reaches the
    router only through P.
    """
    routed = expert_index[expert_index >= 0]
    counts = torch.bincount(routed, minlength=num_experts).to(probs.dtype)  # (E,)
    f = counts / counts.sum().clamp(min=1)
    P = probs.mean(0)  # (E,)
    return num_experts * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """The router z-loss of ST-MoE (Zoph et al. 2022): mean over tokens of logsumexp(logits)^2, logits (T, E).
    It keeps router logits small, which keeps the float32 softmax away from round-off."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def token_choice_routing(logits: torch.Tensor, probs: torch.Tensor, choice: torch.Tensor, weight: torch.Tensor,
                         capacity_factor: float | None, aux_loss: torch.Tensor) -> Routing:
    """Finish the routing of a gate where tokens choose experts: drop the slots over capacity (None =
    dropless), zero their weights, count each expert's tokens. choice and weight (T, k); logits and probs (T, E)."""
    (T, k), num_experts = choice.shape, logits.shape[1]
    capacity = expert_capacity(T, num_experts, k, capacity_factor)
    expert_index = drop_overflow(choice, num_experts, capacity)  # (T, k)
    weight = weight.masked_fill(expert_index < 0, 0.0)
    tokens_per_expert = torch.bincount(expert_index[expert_index >= 0], minlength=num_experts)  # (E,)
    return Routing(choice, expert_index, weight, probs, logits, tokens_per_expert, capacity, aux_loss,
                   router_z_loss(logits))
