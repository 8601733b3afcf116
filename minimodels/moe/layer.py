"""The mixture-of-experts layer (FastMoE, He et al. 2021; Switch Transformer, Fedus et al. 2021):

    y_t = sum_j weight[t, j] * expert_{expert_index[t, j]}(x_t)         (Switch eq. 2, Shazeer eq. 1)

A gate (minimodels/moe/gates.py) fills expert_index and weight. The built-in experts are E FFNs stacked in one
module (minimodels/nn/feedforward.py, an MLP or GatedMLP built with num_experts=E), which runs all of them in
one grouped matmul per weight; any other nn.Module mapping (n, d_model) to (n, d_model) can be an expert too,
and then each runs on its own (the same stages, step 3 a loop). The fast dispatch runs in four stages:

    1. route       gate(x) -> Routing
    2. permute     gather the kept token slots, sorted by expert, into one (N, d_model) tensor; in bf16 each
                   expert's group padded to one of a few sizes (pad_groups: new bf16 shapes are slow) with slots
                   of weight 0, whose outputs step 4 drops
    3. experts     each expert runs once, on its contiguous slice (stacked: all in one grouped matmul, or one
                   bmm when pad_groups made the groups equal)
    4. combine     scale each slot by its weight and add it back to its token's row

Expert parallelism (expert_parallel=True, minimodels/moe/all_to_all.py) slots in between 2 and 3 (an
all-to-all sends each slice to the process holding its expert) and between 3 and 4 (the way back).
`moe_reference` below is the per-token loop the tests hold the fast path to.

Why stacked (E, d_out, d_in) expert weights and torch's grouped_mm (scripts/bench_moe.py, rows "ours" and
"list"; 1 thread, CPU clock, T=4096, d_model 256, d_ff 1024, E=64, top-1, forward+backward, freed memory kept
for reuse as the trainer does, minimodels/train/memory.py): 151 ms against 168 ms for the same dispatch over 64
separate MLPs in fp32 (1.11x), 112 against 152 ms under bf16 autocast (1.36x, where the equal groups run as one
bmm, group_sizes below); at E = 8 and 32 within a few percent either way. In fp32 the matmuls are the same both
ways: on CPU grouped_mm loops over the groups in C++, one matmul each. What goes is the work around them: per
expert two linear layers, an activation, autocast's casts of four small weights and the backward nodes of
all that, against a dozen operations for all experts together (each weight bank cast once per forward). Two
details matter: the bias is added with index_select and its gradient summed with index_add (an indexed
gather's backward cost as much as the gain in bf16), and the backward is our own (grouped_mm's fails in
float32 on CPU). Before freed memory was kept, stacked weights lost to the list: the 64 MB stacked gradient
was mapped fresh and page-faulted in on every step.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from minimodels.moe.gates import build_gate
from minimodels.moe.all_to_all import run_experts_parallel
from minimodels.moe.routing import Routing
from minimodels.nn.feedforward import MLP, FeedForward, GatedMLP, Groups, StackedLinear
from minimodels.nn.shapes import padded_size


def build_experts(expert, num_experts: int, d_model: int, d_ff: int | None) -> nn.Module:
    """expert: None (d_ff required: MLP(d_model, d_ff) with GELU and biases, as GPT's FFN, num_experts of them
    stacked), an MLP or GatedMLP built with num_experts (stacked, used as it is), or, each expert then its
    own module in an nn.ModuleList: an nn.Module (deep-copied, so all experts start equal), a callable
    returning a fresh module, or a list of num_experts modules (heterogeneous experts)."""
    if d_ff is not None and expert is not None:
        raise ValueError("MoE: d_ff sizes the built-in FFN experts; leave it None when passing expert")
    if expert is None:
        if d_ff is None:
            raise ValueError("MoE: d_ff is required for the built-in FFN experts (expert=None)")
        return MLP(d_model, d_ff, num_experts=num_experts)
    if isinstance(expert, (MLP, GatedMLP)) and isinstance(expert.fc, StackedLinear):
        if len(expert.fc.weight) != num_experts:
            raise ValueError(f"MoE: stacked experts hold {len(expert.fc.weight)} experts, num_experts={num_experts}")
        return expert
    if isinstance(expert, nn.Module):
        return nn.ModuleList(copy.deepcopy(expert) for _ in range(num_experts))
    if isinstance(expert, (list, tuple)):
        if len(expert) != num_experts:
            raise ValueError(f"MoE: a list of experts needs num_experts={num_experts} modules, got {len(expert)}")
        return nn.ModuleList(expert)
    if callable(expert):
        return nn.ModuleList(expert() for _ in range(num_experts))
    raise TypeError(f"MoE: expert must be None, an nn.Module, a callable or a list of modules, got {type(expert)}")


class MoE(nn.Module, FeedForward):
    """A mixture-of-experts feed-forward layer.

    gate: a name for build_gate ("topk", "noisy_topk", "switch", "gshard", "expert_choice") built with
    k and gate_options (e.g. capacity_factor), or a gate module. expert, d_ff: see build_experts.
    forward(x) takes x (..., d_model) and returns (y, routing): y shaped like x and typed like the experts'
    outputs, as a dense FFN's (bf16 under bf16 autocast, whatever x's dtype: the combine then moves half the
    bytes), routing for the T = x.numel() // d_model tokens in x's row-major order, which is also their capacity
    priority (with a padding_mask: for the real tokens only, in the same order).
    A token whose slots were all dropped gets y = 0, so a residual block passes it through unchanged.

    expert_parallel: call `shard()` at the end of construction (see there).
    """

    def __init__(self, d_model: int, num_experts: int, gate: str | nn.Module = "switch", expert=None,
                 d_ff: int | None = None, k: int | None = None, expert_parallel: bool = False, **gate_options):
        super().__init__()
        if isinstance(gate, str):
            gate = build_gate(gate, d_model, num_experts, k, **gate_options)
        elif k is not None or gate_options:
            raise ValueError("MoE: k and gate options configure a gate built by name; a gate module has its own")
        if gate.num_experts != num_experts:
            raise ValueError(f"MoE: the gate routes to {gate.num_experts} experts, num_experts={num_experts}")
        self.gate = gate
        self.experts = build_experts(expert, num_experts, d_model, d_ff)
        self.stacked = not isinstance(self.experts, nn.ModuleList)  # one module for all, or one module each
        # this process holds experts first_expert .. first_expert + local_experts - 1 (all without shard())
        self.num_experts, self.first_expert, self.local_experts = num_experts, 0, num_experts
        if expert_parallel:
            self.shard()

    def shard(self) -> None:
        """Expert parallelism: keep only this process's experts, rank * E/W .. (rank + 1) * E/W - 1 of the W
        processes in the torch.distributed world (all of them in a world of one). The gate stays whole and
        must stay equal on all processes (DDP keeps it so); tokens travel to their expert by all-to-all.
        Every process builds all experts first, so with the same seed the shards are slices of one model."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if self.num_experts % world:
            raise ValueError(f"model.moe.num_experts: {self.num_experts} experts cannot be split evenly over "
                             f"{world} processes for expert parallelism")
        self.local_experts = self.num_experts // world
        self.first_expert = torch.distributed.get_rank() * self.local_experts if world > 1 else 0
        if self.stacked:
            for layer in self.experts.modules():
                if isinstance(layer, StackedLinear):
                    layer.keep(self.first_expert, self.local_experts)
        else:
            self.experts = self.experts[self.first_expert:self.first_expert + self.local_experts]

    routes_tokens = True  # blocks pass it the padding mask (minimodels/nn/block.py feed_forward)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None, dropless: bool = False
                ) -> tuple[torch.Tensor, Routing]:
        """padding_mask (x's shape without d_model, True = real token): padding is not routed, so it takes no
        expert capacity from real tokens; it gets y = 0, and the routing covers the real tokens only.
        dropless: keep every slot the gate chose, whatever the capacity (GPT's generate, see there)."""
        tokens = x.reshape(-1, x.shape[-1])  # (T, d_model)
        if padding_mask is None:
            y, routing = self.route_and_run(tokens, dropless)
        else:
            real = padding_mask.reshape(-1, 1).bool()  # (T, 1)
            y_real, routing = self.route_and_run(tokens[real[:, 0]], dropless)  # (T_real, d_model)
            y = y_real.new_zeros(tokens.shape).masked_scatter(real, y_real)  # (T, d_model), 0 at padding
        return y.view(x.shape), routing

    def route_and_run(self, tokens: torch.Tensor, dropless: bool = False) -> tuple[torch.Tensor, Routing]:
        """tokens (T, d_model) -> (y (T, d_model), routing): the four stages."""
        T = tokens.shape[0]
        routing = self.gate(tokens, dropless)  # 1. route
        # 2. permute: (N,), (N,), E group sizes; experts computing in bf16/fp16 get padded groups, stacked ones equal
        # groups (group_sizes); in fp32 the groups stay as routed
        low_precision = torch.is_autocast_enabled(tokens.device.type) or tokens.dtype in (torch.bfloat16, torch.float16)
        slot_token, slot_weight, counts = sort_slots(routing)
        if low_precision:
            slot_token, slot_weight, counts = pad_groups(slot_token, slot_weight, counts, T, self.stacked)
        # (N, d_model); a padding slot (token T) reads row T - 1, its output is dropped. index_select's backward is
        # an index_add, 2x faster than tokens[i]'s
        x_slots = tokens.index_select(0, slot_token.clamp(max=T - 1))
        if self.local_experts < self.num_experts:  # 3. experts: (N, d_model), sharded over processes
            y_slots = run_experts_parallel(self.local_experts, x_slots, counts, self.run_experts)
        else:
            y_slots = self.run_experts(x_slots, counts)
        # 4. combine: y_t = sum over t's slots of weight * expert output (the padding slots' weight is 0)
        y_slots = y_slots * slot_weight.to(y_slots.dtype).unsqueeze(1)  # (N, d_model), the experts' dtype
        y = y_slots.new_zeros(T + 1, y_slots.shape[1]).index_add(0, slot_token, y_slots)  # (T + 1, d_model)
        return y[:T], routing  # row T, the padding slots' sum, dropped

    def run_experts(self, x_slots: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x_slots (N, d_model) sorted by expert, counts[i] rows for this process's expert i -> outputs (N, d_model).
        An expert without tokens runs on its empty slice, so every parameter takes part in every step (its
        gradient is zero then): data-parallel training (DDP) expects each parameter to get a gradient."""
        if self.stacked:  # all experts in one grouped matmul per weight
            return self.experts(x_slots, Groups.of(counts, x_slots.device))
        return torch.cat([expert(x) for expert, x in zip(self.experts, x_slots.split(counts))])  # (N, d_model)

    def expert(self, i: int):
        """This process's expert i (expert first_expert + i) as a function (n, d_model) -> (n, d_model)."""
        if not self.stacked:
            return self.experts[i]
        return lambda x: self.experts(x, Groups.of([len(x) if j == i else 0 for j in range(self.local_experts)], x.device))


def sort_slots(routing: Routing) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The kept token slots, sorted by expert (ties in token order): their token index (N,), their
    weight (N,), and the number of slots of each expert as a list of E ints, the dispatch's one host sync."""
    T, k = routing.expert_index.shape
    order = routing.expert_index.reshape(-1).argsort(stable=True)  # (T*k,) dropped (-1) first, then by expert
    counts = routing.tokens_per_expert.tolist()
    kept = order[order.numel() - sum(counts):]  # (N,) slot s belongs to token s // k, its choice s % k
    return kept // k, routing.weight.reshape(-1)[kept], counts


def pad_groups(slot_token: torch.Tensor, slot_weight: torch.Tensor, counts: list[int], pad_token: int,
               batched: bool = False) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Round each expert's number of slots up to a size from a short list (group_sizes), filling the gap with
    slots of token pad_token (one past the last token) and weight 0. Why: on CPU a bf16 matmul of a new shape is
    slow (minimodels/nn/shapes.py); Switch-GPT's training step (`scripts/bench_train.py configs/switch_gpt.yaml
    --dtypes bf16`, 2 AMX cores) went from 0.40x to 0.71x the dense model's speed with per-group sizes, to
    0.79x with equal ones (one bmm). fp32 matmuls have no such cost, so route_and_run pads only in bf16/fp16: the
    stacked experts' fp32 forward and backward on 4096 token slots with fresh random group sizes at every step
    were 2-7% slower padded in every run of a one-off A/B (2 AMX threads; E = 64: 88.8-94.3 ms against 86.9-89.1
    as routed, E = 8: 64.0-66.8 against 59.4-61.3), about the 3% more rows the padding adds.
    The padding changes no output or gradient: the caller runs a padding slot on a real token's row and adds 0 x
    its output to row pad_token, which it drops; the gradient coming back through the slot is 0, so it adds
    exactly 0 to that token's gradient and to the experts'."""
    padded = group_sizes(counts, batched)
    if padded == counts:
        return slot_token, slot_weight, counts
    # slot i of expert e moves from position i to position i + (padded start of e - unpadded start of e)
    gap = torch.tensor(padded) - torch.tensor(counts)  # (E,) padding slots after each expert's group
    shift = gap.cumsum(0) - gap  # (E,) padding slots before it
    dest = (torch.arange(len(slot_token)) + shift.repeat_interleave(torch.tensor(counts))).to(slot_token.device)  # (N,)
    token = slot_token.new_full((sum(padded),), pad_token).index_copy(0, dest, slot_token)  # (N_padded,)
    weight = slot_weight.new_zeros(sum(padded)).index_copy(0, dest, slot_weight)  # (N_padded,)
    return token, weight, padded


def group_sizes(counts: list[int], batched: bool = False) -> list[int]:
    """The padded size of each expert's group: padded_size of its count; with batched (stacked experts under bf16,
    which run groups of equal size as one bmm, minimodels/nn/feedforward.py GroupedLinear) every group as large as
    the largest, when that is at least 16 rows and adds at most half the rows. In bf16 the batched matmul was
    faster than the grouped one even with a third more rows; in fp32, where the matmuls are compute-bound, the
    extra rows cost what they add (a one-off A/B: the "ours" row of `python scripts/bench_moe.py --threads 1 --clock
    cpu --experts 64 8 --top-k 1` with `batched` forced each way, 1 AMX core: batched / grouped 119 / 139 ms in bf16
    at E = 64 and 44 / 54 ms at E = 8; in fp32 201 / 159 ms and 125 / 117 ms)."""
    padded = [padded_size(c) for c in counts]
    largest = max(padded, default=0)
    if batched and largest >= 16 and len(counts) * largest <= 1.5 * sum(padded):
        return [largest] * len(counts)
    return padded


def moe_reference(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
    """The slow, obvious MoE: route with moe.gate, then loop over tokens and their slots. Same contract
    as moe(x); the tests hold the fast dispatch to it. Needs every expert in this process (not sharded)."""
    if moe.local_experts < moe.num_experts:
        raise ValueError("moe_reference: this MoE holds only its process's experts (expert parallelism)")
    tokens = x.reshape(-1, x.shape[-1])  # (T, d_model)
    routing = moe.gate(tokens)
    rows = []
    for t in range(tokens.shape[0]):
        y_t = torch.zeros_like(tokens[t])  # (d_model,)
        for e, w in zip(routing.expert_index[t].tolist(), routing.weight[t]):
            if e >= 0:  # -1: dropped slot, adds nothing
                y_t = y_t + w * moe.expert(e)(tokens[t:t + 1])[0]
        rows.append(y_t)
    return torch.stack(rows).view(x.shape), routing
