"""Transformer blocks built from attention + feed-forward + norms."""

from __future__ import annotations

import torch.nn as nn

from minimodels.nn.attention import KVCache, MultiHeadSelfAttention


class PreLNBlock(nn.Module):
    """Pre-LN residual block (GPT-2, Radford et al. 2019, section 2.3):

        x = x + Attention(LN(x))
        x = x + FFN(LN(x))
    """

    def __init__(self, d_model: int, n_head: int, ffn: nn.Module, bias: bool = True, dropout: float = 0.0,
                 causal: bool = True, attn_impl: str = "auto", norm_eps: float = 1e-5):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model, eps=norm_eps, bias=bias)
        self.attn = MultiHeadSelfAttention(d_model, n_head, bias=bias, dropout=dropout, causal=causal, impl=attn_impl)
        self.ln2 = nn.LayerNorm(d_model, eps=norm_eps, bias=bias)
        self.ffn = ffn

    def forward(self, x, padding_mask=None, past_kv: KVCache | None = None, use_cache: bool = False):
        a, present = self.attn(self.ln1(x), padding_mask=padding_mask, past_kv=past_kv, use_cache=use_cache)
        x = x + a
        x = x + self.ffn(self.ln2(x))
        return x, present  # (B, T, C), cache or None
