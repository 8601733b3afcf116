"""Multi-head scaled dot-product attention (Vaswani et al. 2017, section 3.2).

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + B + M) V

B is an optional additive position bias (T5's relative position bias), M the mask: 0 where a query may
attend a key, -inf where it may not (padding, future positions in a decoder).

Two implementations of the same equation live side by side:
- `manual_attention`: the equation written out; the one to read and step through.
- `F.scaled_dot_product_attention` (SDPA): PyTorch's fused kernel.
`impl="auto"` picks by measurement (`python scripts/bench_train.py --block-size N --batch-size 4096/N`):
on CPU in bf16 the manual path was faster up to ~256 keys (1.4x at 64, 1.24x at 128, even at 256) and
slower beyond (0.7x at 512); in fp32 SDPA wins.

One module, three uses: bidirectional self-attention (BERT, the T5 encoder), causal self-attention with a
KV cache (GPT, the T5 decoder) and cross-attention (the T5 decoder attending to the encoder output).

The cache: every attention call returns the keys and values it attended to as a `KV`; a block bundles its
self-attention's and cross-attention's into a `LayerCache`, and a model's `cache` is a list of them, one per
block. Fed back in (`cache=`), they are the positions before the new ones: earlier tokens while decoding,
or P-tuning v2's trainable prefixes (minimodels/models/ptuning.py).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class KV(NamedTuple):
    """The keys and values of one attention layer, per head."""

    k: torch.Tensor  # (B, nh, T_k, hs)
    v: torch.Tensor  # (B, nh, T_k, hs)


class LayerCache(NamedTuple):
    """What one block keeps between decoding steps; a model's cache is a list of them, one per block."""

    self_kv: KV  # self-attention: keys and values of the T_past positions before the new ones, each (B, nh, T_past, hs)
    cross_kv: KV | None = None  # a decoder block's cross-attention: those of the encoder output, each (B, nh, S, hs)

    @property
    def length(self) -> int:
        """T_past, the number of positions in the cache."""
        return self.self_kv.k.size(2)

    def select(self, rows: torch.Tensor) -> LayerCache:
        """The cache of batch rows `rows` (B',): beam search keeps, for each beam, the cache of the beam it extends."""
        cross = None if self.cross_kv is None else KV(self.cross_kv.k[rows], self.cross_kv.v[rows])
        return LayerCache(KV(self.self_kv.k[rows], self.self_kv.v[rows]), cross)


def causal_mask(t_q: int, t_k: int, device=None) -> torch.Tensor:
    """(t_q, t_k) bool, True where query i may attend key j. Queries are the LAST t_q of t_k
    positions (the first t_k - t_q are cached), so query i sits at absolute position i + t_k - t_q."""
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


def manual_attention(q, k, v, mask=None, bias=None, dropout_p=0.0, scale=None):
    """q (B, nh, Tq, hs), k/v (B, nh, Tk, hs); mask bool broadcastable to (B, nh, Tq, Tk), True = attend;
    bias float broadcastable to (B, nh, Tq, Tk), added to the scores; scale defaults to 1/sqrt(hs)."""
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    (B, nh, Tq, hs), Tk = q.shape, k.size(-2)
    q3, k3 = q.reshape(B * nh, Tq, hs), k.reshape(B * nh, Tk, hs)  # (B*nh, Tq, hs), (B*nh, Tk, hs)
    if mask is None and bias is None:
        scores = torch.bmm(q3, k3.transpose(1, 2)) * scale  # (B*nh, Tq, Tk)
    else:
        # B + M as one additive term: the bias, and -inf where the mask says no
        extra = torch.zeros((), dtype=q.dtype, device=q.device) if bias is None else bias.to(q.dtype)
        if mask is not None:
            extra = extra.masked_fill(~mask, float("-inf"))
        if extra.dim() > 2:  # per batch or head: (B*nh, Tq, Tk); a (Tq, Tk) term broadcasts as it is
            extra = extra.expand(B, nh, Tq, Tk).reshape(B * nh, Tq, Tk)
        scores = torch.baddbmm(extra, q3, k3.transpose(1, 2), alpha=scale)  # Q K^T * scale + B + M, one kernel
    att = F.softmax(scores, dim=-1)
    if dropout_p > 0:
        att = F.dropout(att, p=dropout_p)
    return torch.bmm(att, v.reshape(B * nh, Tk, hs)).view(B, nh, Tq, hs)  # (B, nh, Tq, hs)


def attention(q, k, v, mask=None, bias=None, causal=False, dropout_p=0.0, scale=None, impl="auto"):
    """Scaled dot-product attention with an optional causal constraint, boolean mask and additive bias."""
    t_q, t_k = q.size(-2), k.size(-2)
    if impl == "auto":
        impl = "manual" if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and t_k <= 256) else "sdpa"
    if impl == "sdpa" and mask is None and bias is None and (not causal or t_q == t_k):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and t_q > 1, scale=scale)
    if causal:
        cm = causal_mask(t_q, t_k, q.device)
        mask = cm if mask is None else mask & cm
    if impl == "sdpa":
        if bias is not None:  # SDPA takes one float mask: the bias with -inf where the bool mask says no
            mask = bias.to(q.dtype) if mask is None else bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if impl != "manual":
        raise ValueError(f"attention impl must be auto, manual or sdpa, got {impl!r}")
    return manual_attention(q, k, v, mask, bias, dropout_p, scale)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: self-attention (fused Q/K/V projection) or, with cross=True, cross-attention
    (queries from x, keys and values from `memory`, the encoder output).

    d_head defaults to d_model / n_head (T5 allows another head size); scaled=False drops the
    1/sqrt(d_head) factor (T5 folds it into the initialisation of W_Q)."""

    def __init__(self, d_model: int, n_head: int, d_head: int | None = None, bias: bool = True, dropout: float = 0.0,
                 causal: bool = False, cross: bool = False, scaled: bool = True, impl: str = "auto"):
        super().__init__()
        if d_head is None:
            if d_model % n_head:
                raise ValueError(f"d_model={d_model} is not divisible by n_head={n_head}")
            d_head = d_model // n_head
        self.n_head, self.causal, self.cross, self.impl, self.dropout = n_head, causal, cross, impl, dropout
        self.scale = None if scaled else 1.0
        inner = n_head * d_head
        if cross:
            self.q = nn.Linear(d_model, inner, bias=bias)  # W_Q, applied to the decoder stream
            self.kv = nn.Linear(d_model, 2 * inner, bias=bias)  # W_K, W_V stacked, applied to the encoder output
        else:
            self.qkv = nn.Linear(d_model, 3 * inner, bias=bias)  # W_Q, W_K, W_V stacked
        self.proj = nn.Linear(inner, d_model, bias=bias)  # W_O
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x, memory=None, padding_mask=None, position_bias=None, cache: KV | None = None, attn_mask=None):
        """x (B, T, C). Self-attention: padding_mask (B, T_past + T) bool, True = real token; cache the KV of
        the T_past earlier positions. Cross-attention: memory (B, S, C), padding_mask (B, S); cache the KV of
        memory returned by an earlier call (memory is not needed again).
        position_bias broadcastable to (B, nh, T, Tk). attn_mask (B, T, Tk) bool, True = query t may attend
        key j: a mask of any pattern (GLM's, half bidirectional and half causal), combined with the others.
        Returns (y (B, T, C), the KV attended to: the cache and this call's, each (B, nh, Tk, hs))."""
        if self.cross:
            q = rearrange(self.q(x), "b t (h d) -> b h t d", h=self.n_head)  # (B, nh, T, hs)
            if cache is not None:
                k, v = cache  # the encoder output does not change while decoding
            else:
                k, v = rearrange(self.kv(memory), "b s (two h d) -> two b h s d", two=2, h=self.n_head)  # each (B, nh, S, hs)
        else:
            # head_i = Attention(X W_Q^i, X W_K^i, X W_V^i) for all heads at once
            q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.n_head)  # each (B, nh, T, hs)
            if cache is not None:
                k = torch.cat([cache.k, k], dim=2)  # (B, nh, T_past + T, hs)
                v = torch.cat([cache.v, v], dim=2)
        mask = None if padding_mask is None else padding_mask[:, None, None, :]  # (B, 1, 1, Tk)
        if attn_mask is not None:
            mask = attn_mask[:, None] if mask is None else mask & attn_mask[:, None]  # (B, 1, T, Tk)
        p = self.dropout if self.training else 0.0
        y = attention(q, k, v, mask=mask, bias=position_bias, causal=self.causal, dropout_p=p, scale=self.scale,
                      impl=self.impl)  # (B, nh, T, hs)
        # MultiHead(X) = Concat(head_1, ..., head_h) W_O
        y = rearrange(y, "b h t d -> b t (h d)")  # (B, T, nh * hs)
        return self.resid_dropout(self.proj(y)), KV(k, v)
