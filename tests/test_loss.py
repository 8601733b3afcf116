"""minimodels/nn/loss.py: the chunked cross-entropy gives F.cross_entropy(logits.float())'s value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from minimodels.nn import loss as loss_module
from minimodels.nn import cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [7 * 50, 1 << 18])  # 7 rows per chunk (the last one short), or one chunk
def test_value_and_gradient_match_fp32_cross_entropy(monkeypatch, dtype, chunk_elements):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(45, 50, generator=g)).to(dtype).requires_grad_()
    targets = torch.randint(0, 50, (45,), generator=g)
    targets[::4] = -100  # ignored positions: no loss, zero gradient
    expected = F.cross_entropy(logits.float(), targets, ignore_index=-100)
    (expected_grad,) = torch.autograd.grad(0.3 * expected, logits)
    got = cross_entropy(logits, targets)
    (got_grad,) = torch.autograd.grad(0.3 * got, logits)
    assert got.dtype == torch.float32 and got_grad.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    tolerance = {torch.float32: 1e-7, torch.bfloat16: 1e-5}[dtype]  # bf16: both round the same fp32 gradient
    torch.testing.assert_close(got_grad.float(), expected_grad.float(), rtol=0, atol=tolerance)
    assert (got_grad[::4] == 0).all()


def test_fp32_logits_are_not_modified():
    logits = torch.randn(6, 10, requires_grad=True)
    before = logits.detach().clone()
    cross_entropy(logits, torch.arange(6)).backward()
    assert torch.equal(logits.detach(), before)


def test_nothing_scored_gives_nan_like_torch():
    logits = torch.randn(3, 5)
    targets = torch.full((3,), -100)
    assert cross_entropy(logits, targets).isnan() and F.cross_entropy(logits, targets).isnan()


def test_shapes_are_checked_and_leading_dimensions_flattened():
    with pytest.raises(ValueError, match=r"logits \(\.\.\., V\) and targets \(\.\.\.\) of the same leading shape, got \(2, 3, 5\) and \(2,\)"):
        cross_entropy(torch.randn(2, 3, 5), torch.zeros(2, dtype=torch.long))
    logits, targets = torch.randn(2, 3, 5), torch.randint(0, 5, (2, 3))
    torch.testing.assert_close(cross_entropy(logits, targets), F.cross_entropy(logits.flatten(0, 1), targets.flatten()))


def test_torch_compile_runs_the_chunked_loss_eagerly():
    """Under torch.compile the loss is a graph break (its loop over chunks traced made the compiled step slower);
    the model around it is still traced, and the loss and its gradient are the eager ones."""
    def lm_loss(h, w, targets):
        return cross_entropy(torch.tanh(h) @ w, targets)

    h, w, targets = torch.randn(40, 16), torch.randn(16, 50, requires_grad=True), torch.randint(0, 50, (40,))
    explained = torch._dynamo.explain(lm_loss)(h, w, targets)
    traced = "".join(g.code for g in explained.graphs)
    assert "tanh" in traced and "logsumexp" not in traced  # the model part traced, the loss not
    assert any("cross_entropy" in r.reason for r in explained.break_reasons)
    torch._dynamo.reset()
    eager = lm_loss(h, w, targets)
    (grad,) = torch.autograd.grad(eager, w)
    compiled = torch.compile(lm_loss, backend="aot_eager")(h, w, targets)  # traced by dynamo and AOT autograd, no C++
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(torch.autograd.grad(compiled, w)[0], grad)
