"""Shared building blocks: attention, feed-forward, norms, positions, blocks, sampling, gathering over processes.

GPT, BERT, T5 and GLM are four arrangements of these parts:
    GPT   learned positions + PreLNBlock(causal)                                     + tied LM head
    GLM   two learned positions (2D) + PreLNBlock(half bidirectional, half causal)   + tied LM head
    BERT  learned positions + segments + PostLNBlock(bidirectional)                  + MLM / NSP / classifier heads
    T5    relative position bias + PreLNBlock(bidirectional, RMSNorm)  -> encoder
                             + PreLNBlock(causal, cross-attention, RMSNorm) -> decoder + LM head
"""

from minimodels.nn.attention import KV, LayerCache, MultiHeadAttention, attention, causal_mask, manual_attention
from minimodels.nn.block import PostLNBlock, PreLNBlock, check_block_options
from minimodels.nn.feedforward import ACTIVATIONS, FFN_KINDS, MLP, GatedMLP, Groups, StackedLinear, build_ffn
from minimodels.nn.init import normal_init
from minimodels.nn.loss import cross_entropy
from minimodels.nn.gather import all_gather_no_grad, all_gather_with_grad, rank_and_size
from minimodels.nn.norm import RMSNorm
from minimodels.nn.position import RelativePositionBias, relative_position_bucket
from minimodels.nn.sampling import sample_next
from minimodels.nn.shapes import pad_rows, padded_size

__all__ = ["KV", "LayerCache", "MultiHeadAttention", "attention", "causal_mask", "manual_attention", "PostLNBlock",
           "PreLNBlock", "check_block_options", "ACTIVATIONS", "FFN_KINDS", "MLP", "GatedMLP", "Groups", "StackedLinear", "build_ffn", "RMSNorm",
           "RelativePositionBias", "relative_position_bucket", "sample_next",
           "all_gather_no_grad", "all_gather_with_grad", "rank_and_size", "normal_init", "cross_entropy", "pad_rows", "padded_size"]
