"""Normalisation layers.

LayerNorm (Ba et al. 2016) — GPT and BERT:  y = (x - mean(x)) / sqrt(var(x) + eps) * g + b
RMSNorm (Zhang & Sennrich 2019) — T5:       y = x / sqrt(mean(x^2) + eps) * g
RMSNorm drops the mean and the bias: it only rescales each vector to unit root-mean-square.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class RMSNorm(nn.Module):
    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))  # g

    def forward(self, x):  # (..., d_model) -> (..., d_model)
        # computed in float32 even under bf16 autocast: squares of bf16 values lose too many digits
        rms_inv = torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)  # 1 / sqrt(mean(x^2) + eps)
        return (x.float() * rms_inv).to(x.dtype) * self.weight

