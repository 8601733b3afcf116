"""Few distinct shapes for matmuls whose row count changes every step.

On CPU a bf16 matmul of a shape not seen before builds (JIT-compiles) a new oneDNN kernel and maps fresh memory
for it; a shape seen before reuses the cached kernel (`ONEDNN_VERBOSE=all` prints create:cache_miss, then
cache_hit). Some row counts change at every step: the positions BERT and GLM score (the masked ones, the Part B
targets), the token slots each expert of an MoE layer gets. Rounding such a count up to one of a few sizes and
padding the rows with zeros keeps the kernels cached. Measured on an Intel Xeon with AMX, 2 threads, bf16: one
grouped matmul of 8 experts over ~4000 rows 6.9 ms with fresh counts at every call against 1.6 ms with padded
ones; Switch-GPT's training step 0.40x -> 0.71x the dense model's speed (`scripts/bench_train.py
configs/switch_gpt.yaml --dtypes bf16`); a BERT training step (configs/bert.yaml's size, a fresh 15% mask at every
step, one-off A/B) 194 -> 153 ms, as fast as with one mask repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def padded_size(n: int) -> int:
    """n rounded up to a multiple of 2^(b - 4), b = n's bit length: below 16 n itself, then 8 sizes per
    doubling (16, 18, ..., 30, 32, 36, ..., 60, 64, 72, ...), less than 1/8 more than n."""
    step = 1 << max(0, n.bit_length() - 4)
    return -(-n // step) * step


def pad_rows(x: torch.Tensor, value=0) -> torch.Tensor:
    """x (n, ...) with rows of `value` appended up to padded_size(n) rows."""
    extra = padded_size(len(x)) - len(x)
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, extra), value=value)
