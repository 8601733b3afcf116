"""Position-wise feed-forward networks (Vaswani et al. 2017, eq. 2):

    MLP:    FFN(x) = act(x W_1 + b_1) W_2 + b_2                  GPT, BERT (GELU), original T5 (ReLU, no bias)
    gated:  FFN(x) = (act(x W_g) * (x W_1)) W_2                  T5 v1.1 (gated-GELU; Shazeer 2020, "GLU variants")

Models build their feed-forward through `build_ffn(kind, ...)`, so a config can swap the module
(`model.ffn: mlp | gated`); `model.moe` turns the FFN of some blocks into a mixture of experts whose
experts are copies of this module (minimodels/moe/config.py).
"""

from __future__ import annotations

from typing import ClassVar, Protocol

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


class MLP(nn.Module, FeedForward):
    """Two linear layers with an activation between: d_model -> d_ff -> d_model."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.act = _activation(activation)
        self.fc = nn.Linear(d_model, d_ff, bias=bias)  # W_1
        self.proj = nn.Linear(d_ff, d_model, bias=bias)  # W_2
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # (B, T, d_model) -> (B, T, d_model)
        return self.dropout(self.proj(self.act(self.fc(x))))


class GatedMLP(nn.Module, FeedForward):
    """A gated linear unit: the activated gate x W_g multiplies the linear path x W_1 element-wise."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu_tanh", dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.act = _activation(activation)
        self.gate = nn.Linear(d_model, d_ff, bias=bias)  # W_g (T5's wi_0)
        self.fc = nn.Linear(d_model, d_ff, bias=bias)  # W_1 (T5's wi_1)
        self.proj = nn.Linear(d_ff, d_model, bias=bias)  # W_2 (T5's wo)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):  # (B, T, d_model) -> (B, T, d_model)
        return self.dropout(self.proj(self.act(self.gate(x)) * self.fc(x)))


FFN_KINDS = {"mlp": MLP, "gated": GatedMLP}  # name -> constructor(d_model, d_ff, activation, dropout, bias)


def build_ffn(kind: str, d_model: int, d_ff: int, activation: str, dropout: float, bias: bool) -> nn.Module:
    if kind not in FFN_KINDS:
        raise ValueError(f"model.ffn: unknown feed-forward '{kind}' (valid: {', '.join(FFN_KINDS)})")
    return FFN_KINDS[kind](d_model, d_ff, activation, dropout, bias)
