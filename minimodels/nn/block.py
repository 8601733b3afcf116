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

from typing import Callable

import torch.nn as nn

from minimodels.nn.attention import LayerCache, MultiHeadAttention
from minimodels.nn.feedforward import ACTIVATIONS, FFN_KINDS, FeedForward

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
    """Pre-LN block (GPT-2, Radford et al. 2019, section 2.3; T5 with RMSNorm):

        x = x + Attention(LN(x))
        x = x + CrossAttention(LN(x), memory)     only with cross_attn (a decoder block of T5)
        x = x + FFN(LN(x))

    The caller builds the parts: attn and cross_attn (MultiHeadAttention, which holds every attention option),
    ffn (a dense FFN or an MoE layer), and norm, which makes one norm layer per call (LayerNorm or RMSNorm).
    """

    def __init__(self, attn: MultiHeadAttention, ffn: nn.Module, norm: Callable[[], nn.Module],
                 cross_attn: MultiHeadAttention | None = None):
        super().__init__()
        self.ln1 = norm()
        self.attn = attn
        self.ln_cross = norm() if cross_attn is not None else None
        self.cross_attn = cross_attn
        self.ln2 = norm()
        self.ffn = ffn

    def forward(self, x, padding_mask=None, attn_mask=None, position_bias=None, memory=None, memory_padding_mask=None,
                cache: LayerCache | None = None, dropless: bool = False):
        """x (B, T, C). Self-attention: padding_mask (B, T_past + T) bool, True = real token; attn_mask
        (B, T, T_past + T) bool, True = query t may see key j (see MultiHeadAttention); position_bias
        (1, nh, T, T_past + T) added to the scores (T5). Cross-attention: memory (B, S, C), the encoder output, and
        memory_padding_mask (B, S) bool, True = the encoder's real token. cache: this block's
        LayerCache from earlier steps. dropless: an MoE feed-forward routes without capacity.
        Returns x (B, T, C), the LayerCache with this call's positions added, and the routing (or None)."""
        a, self_kv = self.attn(self.ln1(x), padding_mask=padding_mask, position_bias=position_bias,
                               cache=None if cache is None else cache.self_kv, attn_mask=attn_mask)
        x = x + a
        cross_kv = None
        if self.cross_attn is not None:
            a, cross_kv = self.cross_attn(self.ln_cross(x), memory=memory, padding_mask=memory_padding_mask,
                                          cache=None if cache is None else cache.cross_kv)
            x = x + a
        y, routing = feed_forward(self.ffn, self.ln2(x), padding_mask, dropless)
        x = x + y
        return x, LayerCache(self_kv, cross_kv), routing


class PostLNBlock(nn.Module):
    """Post-LN block (Vaswani et al. 2017, section 3.1; BERT):

        x = LN(x + Attention(x))
        x = LN(x + FFN(x))

    The caller builds the parts, as for PreLNBlock.
    """

    def __init__(self, attn: MultiHeadAttention, ffn: nn.Module, norm: Callable[[], nn.Module]):
        super().__init__()
        self.attn = attn
        self.ln1 = norm()
        self.ffn = ffn
        self.ln2 = norm()

    def forward(self, x, padding_mask=None, cache: LayerCache | None = None):
        """x (B, T, C), padding_mask (B, T) bool, True = real token. cache: P keys and values attended to before
        the sequence's own, each (B, nh, P, hs) (P-tuning v2's prefixes); then padding_mask is (B, P + T).
        Returns (B, T, C) and the routing (or None)."""
        x = self.ln1(x + self.attn(x, padding_mask=padding_mask, cache=None if cache is None else cache.self_kv)[0])
        if cache is not None:
            padding_mask = padding_mask[:, cache.length:]  # (B, T): the FFN routes the sequence's own tokens
        y, routing = feed_forward(self.ffn, x, padding_mask)
        return self.ln2(x + y), routing
