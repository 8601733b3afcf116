"""Telling a Transformer where each token is.

Attention by itself ignores order, so position enters in one of two ways:
- learned absolute positions (GPT, BERT): a vector per position added to the token embedding,
  `nn.Embedding(block_size, d_model)` in the models themselves;
- relative position bias (T5, Raffel et al. 2019, section 2.1): a learned scalar per head and per
  *distance bucket* added to the attention scores, B[h, i, j] = b_h(bucket(j - i)). It is computed once per
  forward in the first layer and shared by all layers of the stack.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """Map distances j - i (key minus query) to bucket ids in [0, num_buckets).

    Bidirectional (encoder): half of the buckets for keys after the query, half for keys before it.
    Causal (decoder): keys after the query cannot be seen, so they all share bucket 0 and every bucket
    describes a distance into the past. Within each direction, half of the buckets hold the exact
    distances 0 .. n/2 - 1; the other half grow logarithmically up to max_distance, beyond which all
    distances share the last bucket.
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket += (relative_position > 0).long() * num_buckets  # keys to the right get the upper half
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)  # how far back the key is; future keys -> 0
    max_exact = num_buckets // 2
    # log-spaced: bucket = max_exact + log(d / max_exact) / log(max_distance / max_exact) * (n - max_exact)
    log_bucket = max_exact + (
        torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    log_bucket = log_bucket.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """B (1, nh, Tq, Tk): one learned scalar per head for each distance bucket."""

    def __init__(self, n_head: int, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128):
        super().__init__()
        self.bidirectional, self.num_buckets, self.max_distance = bidirectional, num_buckets, max_distance
        self.bias = nn.Embedding(num_buckets, n_head)  # b_h(bucket)

    def forward(self, t_q: int, t_k: int, device=None) -> torch.Tensor:
        """Queries are the last t_q of t_k positions (as with a KV cache: query i is at t_k - t_q + i)."""
        query_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]  # (Tq, 1)
        key_pos = torch.arange(t_k, device=device)[None, :]  # (1, Tk)
        buckets = relative_position_bucket(key_pos - query_pos, self.bidirectional, self.num_buckets, self.max_distance)
        return self.bias(buckets).permute(2, 0, 1).unsqueeze(0)  # (Tq, Tk, nh) -> (1, nh, Tq, Tk)
