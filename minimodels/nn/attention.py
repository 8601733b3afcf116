"""Multi-head scaled dot-product attention (Vaswani et al. 2017, section 3.2).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + mask) V

Two implementations of the same equation live side by side:
- `manual_attention`: the equation written out; the one to read and step through.
- `F.scaled_dot_product_attention` (SDPA): PyTorch's fused kernel.
`impl="auto"` picks by measurement (`python scripts/bench_train.py --block-size N --batch-size 4096/N`):
on CPU in bf16 the manual path was faster up to ~256 keys (1.4x at 64, 1.24x at 128, even at 256) and
slower beyond (0.7x at 512); in fp32 SDPA wins.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, nh, T_past, hs)


def causal_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """(t_q, t_k) bool, True where query i may attend key j. Queries are the LAST t_q of t_k
    positions (the first t_k - t_q are cached), so query i sits at absolute position i + t_k - t_q."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def manual_attention(q, k, v, mask=None, dropout_p=0.0):
    """q (B, nh, Tq, hs), k/v (B, nh, Tk, hs), mask bool broadcastable to (B, nh, Tq, Tk), True = attend."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    att = F.softmax(scores, dim=-1)
    if dropout_p > 0:
        att = F.dropout(att, p=dropout_p)
    return att @ v  # (B, nh, Tq, hs)


def attention(q, k, v, mask=None, causal=False, dropout_p=0.0, impl="auto"):
    """Scaled dot-product attention with an optional causal constraint and a boolean mask."""
    t_q, t_k = q.size(-2), k.size(-2)
    if impl == "auto":
        impl = "manual" if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and t_k <= 256) else "sdpa"
    if impl == "sdpa" and mask is None and (not causal or t_q == t_k):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and t_q > 1)
    if causal:
        cm = causal_mask(t_q, t_k, q.device)
        mask = cm if mask is None else mask & cm
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if impl != "manual":
        raise ValueError(f"attention impl must be auto, manual or sdpa, got {impl!r}")
    return manual_attention(q, k, v, mask, dropout_p)


class MultiHeadSelfAttention(nn.Module):
    """Self-attention with fused Q/K/V projection, optional causal mask, padding mask and KV cache."""

    def __init__(self, d_model: int, n_head: int, bias: bool = True, dropout: float = 0.0,
                 causal: bool = False, impl: str = "auto"):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
        self.n_head, self.causal, self.impl, self.dropout = n_head, causal, impl, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)  # W_Q, W_K, W_V stacked
        self.proj = nn.Linear(d_model, d_model, bias=bias)  # W_O
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, padding_mask=None, past_kv: KVCache | None = None, use_cache: bool = False):
        """x (B, T, C); padding_mask (B, T_total) bool, True = real token. Returns (y (B, T, C), cache or None)."""
        # head_i = Attention(X W_Q^i, X W_K^i, X W_V^i) for all heads at once
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)  # each (B, nh, T, hs)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # (B, nh, T_past + T, hs)
            v = torch.cat([past_kv[1], v], dim=2)
        mask = None if padding_mask is None else padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask=mask, causal=self.causal, dropout_p=p, impl=self.impl)  # (B, nh, T, hs)
        # MultiHead(X) = Concat(head_1, ..., head_h) W_O
        y = rearrange(y, "b h t d -> b t (h d)")  # (B, T, C)
        return self.resid_dropout(self.proj(y)), ((k, v) if use_cache else None)
