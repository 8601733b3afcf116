"""minimodels/nn/shapes.py: row counts rounded up to a few sizes, rows padded."""

import torch

from minimodels.nn import pad_rows, padded_size


def test_padded_sizes_are_few_and_waste_less_than_an_eighth():
    sizes = [padded_size(n) for n in range(4097)]
    assert sizes[:16] == list(range(16))  # small groups (generation: one token per step) are never padded
    assert all(n <= p < n + max(1, n / 8) for n, p in enumerate(sizes))
    assert len(set(sizes[513:1025])) == 8  # 8 sizes per doubling (576, 640, ..., 1024): a handful of kernels to build


def test_pad_rows_appends_rows_of_the_value():
    labels = torch.arange(20)
    padded = pad_rows(labels, value=-100)  # 20 -> 20 (a size already)
    assert torch.equal(padded, labels)
    x = torch.randn(17, 3)
    padded = pad_rows(x)  # 17 -> 18
    assert padded.shape == (18, 3) and torch.equal(padded[:17], x) and (padded[17] == 0).all()
    assert torch.equal(pad_rows(torch.arange(17), value=-100)[-1], torch.tensor(-100))
