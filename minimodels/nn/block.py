"""Transformer blocks: attention + feed-forward, each wrapped in a residual connection and a norm.

Where the norm sits is the one real difference between the two kinds:

    post-LN (original Transformer, BERT):      x = LN(x + Attention(x));   x = LN(x + FFN(x))
    pre-LN  (GPT-2, T5):                       x = x + Attention(LN(x));   x = x + FFN(LN(x))

Pre-LN keeps an un-normalised residual path from input to output, which trains stably without a long
warm-up (Xiong et al. 2020). A decoder block of an encoder-decoder (T5) adds cross-attention between
the two: x = x + CrossAttention(LN(x), encoder output).

The feed-forward is any module: a dense FFN (minimodels/nn/feedforward.py) returns y, a mixture of experts
(minimodels/moe) returns (y, routing). Blocks return that routing (None for a dense FFN) next to x, so the
model can collect every MoE layer's routing decisions as plain values.
"""

from __future__ import annotations

import torch.nn as nn

from minimodels.nn.attention import KVCache, MultiHeadAttention
from minimodels.nn.feedforward import ACTIVATIONS, FFN_KINDS, FeedForward
from minimodels.nn.norm import build_norm

ATTN_IMPLS = ("auto", "manual", "sdpa")


def feed_forward(ffn: FeedForward, x, padding_mask=None, dropless: bool = False):
    """ffn(x) as (y, routing): routing is the MoE layer's Routing, or None for a dense FFN. A module that
    routes tokens (routes_tokens = True, the MoE layer) also gets the padding mask (padding is not routed)
    and dropless (route without capacity)."""
    out = ffn(x, padding_mask=padding_mask, dropless=dropless) if ffn.routes_tokens else ffn(x)
    return out if isinstance(out, tuple) else (out, None)


def check_block_options(config) -> None:
    """Validate the block options every model config shares (attn_impl, ffn, activation, dropout, norm_eps),
    naming the YAML key in the error."""
    if config.attn_impl not in ATTN_IMPLS:
        raise ValueError(f"model.attn_impl: must be one of {', '.join(ATTN_IMPLS)}, got {config.attn_impl!r}")
    if config.ffn not in FFN_KINDS:
        raise ValueError(f"model.ffn: unknown feed-forward {config.ffn!r} (valid: {', '.join(FFN_KINDS)})")
    if config.activation not in ACTIVATIONS:
        raise ValueError(f"model.activation: must be one of {', '.join(ACTIVATIONS)}, got {config.activation!r}")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"model.dropout: must be in [0, 1), got {config.dropout}")
    if not config.norm_eps > 0:  # x / sqrt(var + eps): eps <= 0 turns a constant (or any) row nan
        raise ValueError(f"model.norm_eps: must be positive, got {config.norm_eps}")


class PreLNBlock(nn.Module):
    """Pre-LN block (GPT-2, Radford et al. 2019, section 2.3; T5 with norm="rms"):

        x = x + Attention(LN(x))
        x = x + CrossAttention(LN(x), memory)     only when cross_attention=True
        x = x + FFN(LN(x))
    """

    def __init__(self, d_model: int, n_head: int, ffn: nn.Module, bias: bool = True, dropout: float = 0.0,
                 causal: bool = True, cross_attention: bool = False, norm: str = "layer", norm_eps: float = 1e-5,
                 d_head: int | None = None, scaled: bool = True, attn_impl: str = "auto"):
        super().__init__()
        attn = dict(d_head=d_head, bias=bias, dropout=dropout, scaled=scaled, impl=attn_impl)
        self.ln1 = build_norm(norm, d_model, norm_eps, bias)
        self.attn = MultiHeadAttention(d_model, n_head, causal=causal, **attn)
        self.ln_cross = build_norm(norm, d_model, norm_eps, bias) if cross_attention else None
        self.cross_attn = MultiHeadAttention(d_model, n_head, cross=True, **attn) if cross_attention else None
        self.ln2 = build_norm(norm, d_model, norm_eps, bias)
        self.ffn = ffn

    def forward(self, x, padding_mask=None, position_bias=None, memory=None, memory_mask=None,
                past_kv: KVCache | None = None, use_cache: bool = False, attn_mask=None, dropless: bool = False):
        """x (B, T, C); memory (B, S, C) and memory_mask (B, S) for cross-attention; attn_mask (B, T, Tk) a full
        self-attention mask (GLM). The cache of a layer is (k, v) of self-attention, followed by (k, v) of
        cross-attention in a decoder block. dropless: an MoE feed-forward routes without capacity."""
        a, present = self.attn(self.ln1(x), padding_mask=padding_mask, position_bias=position_bias,
                               past_kv=past_kv[:2] if past_kv else None, use_cache=use_cache, attn_mask=attn_mask)
        x = x + a
        if self.cross_attn is not None:
            a, cross = self.cross_attn(self.ln_cross(x), memory=memory, padding_mask=memory_mask,
                                       past_kv=past_kv[2:] if past_kv else None, use_cache=use_cache)
            x = x + a
            present = present + cross if use_cache else None
        y, routing = feed_forward(self.ffn, self.ln2(x), padding_mask, dropless)
        x = x + y
        return x, present, routing  # (B, T, C), cache or None, Routing or None


class PostLNBlock(nn.Module):
    """Post-LN block (Vaswani et al. 2017, section 3.1; BERT):

        x = LN(x + Attention(x))
        x = LN(x + FFN(x))
    """

    def __init__(self, d_model: int, n_head: int, ffn: nn.Module, bias: bool = True, dropout: float = 0.0,
                 causal: bool = False, norm_eps: float = 1e-12, attn_impl: str = "auto"):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_head, bias=bias, dropout=dropout, causal=causal, impl=attn_impl)
        self.ln1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.ffn = ffn
        self.ln2 = nn.LayerNorm(d_model, eps=norm_eps)

    def forward(self, x, padding_mask=None, prefix_kv: KVCache | None = None):
        """x (B, T, C), padding_mask (B, T) bool, True = real token. prefix_kv: (k, v), each (B, nh, P, hs),
        keys and values attended to before the sequence's own (P-tuning v2); then padding_mask is (B, P + T).
        Returns (B, T, C) and the routing (or None)."""
        x = self.ln1(x + self.attn(x, padding_mask=padding_mask, past_kv=prefix_kv)[0])
        if prefix_kv is not None:
            padding_mask = padding_mask[:, prefix_kv[0].size(2):]  # (B, T): the FFN routes the sequence's own tokens
        y, routing = feed_forward(self.ffn, x, padding_mask)
        return self.ln2(x + y), routing
