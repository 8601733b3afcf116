"""Position-wise feed-forward networks (Vaswani et al. 2017, eq. 2):

    MLP:    FFN(x) = act(x W_1 + b_1) W_2 + b_2                  GPT, BERT (GELU), original T5 (ReLU, no bias)
    gated:  FFN(x) = (act(x W_g) * (x W_1)) W_2                  T5 v1.1 (gated-GELU; Shazeer 2020, "GLU variants")

Models build their feed-forward through `build_ffn(kind, ...)`, so a config can swap the module
(`model.ffn: mlp | gated`); `model.moe` turns the FFN of some blocks into a mixture of experts whose
experts are E of this module (minimodels/moe/config.py).

E experts of one kind live in one module built with num_experts=E: every weight gets a leading E dimension
(StackedLinear), and forward(x, groups) runs the rows of x grouped by expert, group e through expert e, with
one grouped matmul per weight (torch's grouped_mm) instead of E small ones.
"""

from __future__ import annotations

import math
from functools import partial
from typing import ClassVar, NamedTuple, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": F.gelu,  # exact, with erf
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's "gelu_new", T5 v1.1's gated-gelu
    "relu": F.relu,
}


def _activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class FeedForward(Protocol):
    """A block's feed-forward module (minimodels/nn/block.py feed_forward): forward(x) -> y, or, for a module that
    routes tokens (a mixture of experts, minimodels/moe/layer.py), forward(x, padding_mask, dropless) -> (y, routing)."""

    routes_tokens: ClassVar[bool] = False


class Groups(NamedTuple):
    """N rows grouped by expert, counts[e] rows of expert e in a row: offs (E,) int32, the end of each group
    (grouped_mm's offsets), expert (N,), each row's expert, and size, the rows of every group when all groups
    have the same number of rows (then the rows are an (E, size, d) batch), else 0."""

    offs: torch.Tensor
    expert: torch.Tensor
    size: int = 0

    @staticmethod
    def of(counts: list[int], device: torch.device | str = "cpu") -> Groups:
        size = counts[0] if counts and counts[0] > 0 and counts.count(counts[0]) == len(counts) else 0
        counts = torch.tensor(counts, device=device)  # (E,)
        expert = torch.repeat_interleave(torch.arange(len(counts), device=device), counts)  # (N,)
        return Groups(counts.cumsum(0).to(torch.int32), expert, size)


class GroupedLinear(torch.autograd.Function):
    """E linear layers on rows grouped by layer: y_n = x_n W_e^T + b_e for each row n of group e. grouped_mm
    does all E matmuls in one call (on CPU a loop in C++); its own backward fails in float32 on CPU, so this one
    computes both gradients with it too. Groups of equal size are one batched matmul (bmm) instead, faster on
    CPU: in a one-off probe (8 experts of 256 -> 1024 -> 256, forward and backward matmuls, bf16, 2 AMX threads)
    6.2 ms against 10.5 ms for the same 3840 rows grouped, and still 8.7 against 10.3 ms when the equal groups
    hold 1.33x the rows (minimodels/moe/layer.py group_sizes decides). x (N, d_in), weight (E, d_out, d_in),
    bias (E, d_out) or None, all of one dtype -> y (N, d_out). A group without rows gets a zero weight gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: Groups):
        ctx.save_for_backward(x, weight, groups.offs, groups.expert)
        ctx.has_bias, ctx.size = bias is not None, groups.size
        if groups.size:  # (E, size, d_in) @ (E, d_in, d_out) + b_e
            x3 = x.view(len(weight), groups.size, -1)  # (E, size, d_in)
            w3 = weight.transpose(1, 2)  # (E, d_in, d_out)
            y = torch.bmm(x3, w3) if bias is None else torch.baddbmm(bias[:, None], x3, w3)
            return y.view(len(x), -1)  # (N, d_out)
        y = F.grouped_mm(x, weight.transpose(1, 2), offs=groups.offs)  # (N, d_out)
        return y if bias is None else y.add_(bias.index_select(0, groups.expert))

    @staticmethod
    def backward(ctx, grad):  # (N, d_out)
        x, weight, offs, expert = ctx.saved_tensors
        if ctx.size:
            g3 = grad.contiguous().view(len(weight), ctx.size, -1)  # (E, size, d_out)
            x3 = x.view(len(weight), ctx.size, -1)  # (E, size, d_in)
            grad_bias = g3.sum(1) if ctx.has_bias else None  # (E, d_out)
            return torch.bmm(g3, weight).view_as(x), torch.bmm(g3.transpose(1, 2), x3), grad_bias, None
        # grouped_mm refuses the zero strides of an expanded gradient (that of a sum), empty ones too
        grad = grad.contiguous() if grad.numel() else grad.new_zeros(grad.shape)
        grad_x = F.grouped_mm(grad, weight, offs=offs)  # (N, d_in)
        grad_weight = F.grouped_mm(grad.t(), x, offs=offs)  # (E, d_out, d_in): group e's rows only
        grad_bias = grad.new_zeros(weight.shape[:2]).index_add_(0, expert, grad) if ctx.has_bias else None  # (E, d_out)
        return grad_x, grad_weight, grad_bias, None


class StackedLinear(nn.Module):
    """E linear layers d_in -> d_out in one weight (E, d_out, d_in) and bias (E, d_out), each initialised as
    nn.Linear's. forward(x, groups): x (N, d_in) grouped by layer -> (N, d_out), in the weights' dtype, or under
    autocast in the autocast dtype, x and the weights cast to it as autocast does for nn.Linear."""

    def __init__(self, num_experts: int, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        bound = 1 / math.sqrt(d_in)  # nn.Linear's U(-1/sqrt(d_in), 1/sqrt(d_in)), weights and biases alike
        self.weight = nn.Parameter(torch.empty(num_experts, d_out, d_in).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_experts, d_out).uniform_(-bound, bound)) if bias else None

    # eager under torch.compile: in torch 2.13 grouped_mm's shape function (what the compiler traces with) accepts
    # only bf16, so a float32 model with experts failed to compile
    @torch.compiler.disable
    def forward(self, x: torch.Tensor, groups: Groups) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.weight.dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        return GroupedLinear.apply(x.to(dtype), self.weight.to(dtype), bias, groups)

    def keep(self, first: int, count: int) -> None:
        """Keep only layers first .. first + count - 1 (expert parallelism: this process's experts)."""
        self.weight = nn.Parameter(self.weight.detach()[first:first + count].clone())
        if self.bias is not None:
            self.bias = nn.Parameter(self.bias.detach()[first:first + count].clone())


def linear_layer(d_in: int, d_out: int, bias: bool, num_experts: int | None) -> nn.Module:
    return nn.Linear(d_in, d_out, bias=bias) if num_experts is None else StackedLinear(num_experts, d_in, d_out, bias)


class MLP(nn.Module, FeedForward):
    """Two linear layers with an activation between: d_model -> d_ff -> d_model. num_experts = E: E of them
    (experts of an MoE layer), each weight stacked (StackedLinear); forward(x, groups) then runs group e of
    x's rows through MLP e."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0, bias: bool = True,
                 num_experts: int | None = None):
        super().__init__()
        linear = partial(linear_layer, bias=bias, num_experts=num_experts)
        self.act = _activation(activation)
        self.fc = linear(d_model, d_ff)  # W_1
        self.proj = linear(d_ff, d_model)  # W_2
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, *groups):  # (B, T, d_model) -> (B, T, d_model); experts: (N, d_model), Groups
        return self.dropout(self.proj(self.act(self.fc(x, *groups)), *groups))


class GatedMLP(nn.Module, FeedForward):
    """A gated linear unit: the activated gate x W_g multiplies the linear path x W_1 element-wise.
    num_experts: as in MLP."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu_tanh", dropout: float = 0.0, bias: bool = False,
                 num_experts: int | None = None):
        super().__init__()
        linear = partial(linear_layer, bias=bias, num_experts=num_experts)
        self.act = _activation(activation)
        self.gate = linear(d_model, d_ff)  # W_g (T5's wi_0)
        self.fc = linear(d_model, d_ff)  # W_1 (T5's wi_1)
        self.proj = linear(d_ff, d_model)  # W_2 (T5's wo)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, *groups):  # (B, T, d_model) -> (B, T, d_model); experts: (N, d_model), Groups
        return self.dropout(self.proj(self.act(self.gate(x, *groups)) * self.fc(x, *groups), *groups))


FFN_KINDS = {"mlp": MLP, "gated": GatedMLP}  # name -> constructor(d_model, d_ff, activation, dropout, bias, num_experts)


def build_ffn(kind: str, d_model: int, d_ff: int, activation: str, dropout: float, bias: bool,
              num_experts: int | None = None) -> nn.Module:
    """The feed-forward of kind `kind`; num_experts: E of them stacked, the experts of an MoE layer."""
    if kind not in FFN_KINDS:
        raise ValueError(f"model.ffn: unknown feed-forward '{kind}' (valid: {', '.join(FFN_KINDS)})")
    return FFN_KINDS[kind](d_model, d_ff, activation, dropout, bias, num_experts)
