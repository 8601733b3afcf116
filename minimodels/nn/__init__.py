"""Shared building blocks: attention, feed-forward, blocks, sampling."""

from minimodels.nn.attention import MultiHeadSelfAttention, attention, causal_mask, manual_attention
from minimodels.nn.block import PreLNBlock
from minimodels.nn.feedforward import FFN_KINDS, MLP, build_ffn
from minimodels.nn.sampling import sample_next

__all__ = ["MultiHeadSelfAttention", "attention", "causal_mask", "manual_attention", "PreLNBlock",
           "FFN_KINDS", "MLP", "build_ffn", "sample_next"]
