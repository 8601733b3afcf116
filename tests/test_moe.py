"""Mixture of experts: fast dispatch vs the per-token loop, aux losses in closed form, capacity and drop
order, jitter, GShard random routing, expert choice, heterogeneous experts, bf16, parity with HF Switch,
model.moe from YAML, dropless generation, sparse upcycling from a dense run."""

import math
import os
import unittest.mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub: HF modules are built from configs

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minimodels.moe import (GATES, ExpertChoiceGate, GShardGate, MoE, MoEConfig, SwitchGate, TopKGate, build_gate,
                            check_gate, load_balancing_loss, moe_reference, router_z_loss)
from minimodels.moe.gates import jitter_noise
from minimodels.moe.routing import drop_overflow
from minimodels.moe.layer import group_sizes
from minimodels.nn import MLP, GatedMLP, Groups, StackedLinear

D, D_FF, E = 8, 16, 4


def grads(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, zeros for parameters that got none."""
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in module.named_parameters()}


def forward_backward(moe: MoE, x: torch.Tensor, impl, router_losses: bool = True):
    """(y, routing, x.grad, parameter grads) of a loss on y (+ aux_loss + z_loss); seeded so that random
    gates (noise, jitter, random routing) draw the same numbers in both implementations."""
    moe.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(0)
    y, routing = impl(moe, x)
    loss = (y * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).sum()
    (loss + routing.aux_loss + routing.z_loss if router_losses else loss).backward()
    return y, routing, x.grad, grads(moe)


fast = lambda moe, x: moe(x)  # noqa: E731


# ---------------------------------------------------------------------------------------------- dispatch
@pytest.mark.parametrize("gate,options", [("topk", dict(k=1)), ("switch", dict(capacity_factor=None)),
                                          ("expert_choice", dict(capacity_factor=1.0))])
def test_one_expert_equals_the_dense_ffn(gate, options):
    torch.manual_seed(0)
    moe = MoE(D, 1, gate, d_ff=D_FF, **options).train()
    dense = MLP(D, D_FF)
    dense.load_state_dict({name: t[0] for name, t in moe.experts.state_dict().items()})  # stacked: (1, ...)
    x = torch.randn(3, 5, D)
    y, routing, x_grad, moe_grads = forward_backward(moe, x, fast, router_losses=False)
    assert (routing.weight == 1).all() and (routing.expert_index == 0).all()
    xd = x.clone().requires_grad_()
    yd = dense(xd)
    (yd * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    torch.testing.assert_close(y, yd, rtol=0, atol=1e-6)
    torch.testing.assert_close(x_grad, xd.grad, rtol=0, atol=1e-6)
    for name, g in grads(dense).items():
        torch.testing.assert_close(moe_grads[f"experts.{name}"][0], g, rtol=0, atol=1e-6)


DISPATCH_CASES = [  # (gate, options, drops expected); every gate, k in {1, 2}, with and without capacity drops
    ("topk", dict(k=1), False), ("topk", dict(k=1, capacity_factor=0.5), True),
    ("topk", dict(k=2), False), ("topk", dict(k=2, capacity_factor=0.5), True),
    ("noisy_topk", dict(k=1), False), ("noisy_topk", dict(k=1, capacity_factor=0.5), True),
    ("noisy_topk", dict(k=2), False), ("noisy_topk", dict(k=2, capacity_factor=0.5), True),
    ("switch", dict(capacity_factor=None), False), ("switch", dict(capacity_factor=0.5), True),
    ("gshard", dict(capacity_factor=None, random_routing=False), False), ("gshard", dict(capacity_factor=0.5), True),
    ("expert_choice", dict(capacity_factor=1.0), True), ("expert_choice", dict(capacity_factor=2.0), True),
]


@pytest.mark.parametrize("gate,options,drops", DISPATCH_CASES, ids=[f"{g}-{o}" for g, o, _ in DISPATCH_CASES])
def test_fast_dispatch_equals_the_per_token_reference(gate, options, drops):
    torch.manual_seed(0)
    moe = MoE(D, E, gate, d_ff=D_FF, **options).train()  # training mode: noise, jitter, random routing active
    x = torch.randn(2, 12, D)
    y, routing, x_grad, param_grads = forward_backward(moe, x, fast)
    y_ref, routing_ref, x_grad_ref, param_grads_ref = forward_backward(moe, x, moe_reference)
    assert torch.equal(routing.expert_index, routing_ref.expert_index)
    assert bool((routing.expert_index < 0).any()) == drops
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(x_grad, x_grad_ref, rtol=0, atol=1e-5)
    for name, g in param_grads.items():
        torch.testing.assert_close(g, param_grads_ref[name], rtol=0, atol=1e-5, msg=name)
    assert param_grads["gate.router.weight"].abs().max() > 1e-4  # the router learns from this loss


@pytest.mark.parametrize("expert,dtype", [("stacked", "fp32"), ("stacked", "bf16"), ("list", "fp32"), ("list", "bf16")])
@pytest.mark.parametrize("gate,options", [("switch", dict(capacity_factor=1.0)), ("topk", dict(k=2))])
def test_padded_expert_groups_change_no_output_or_gradient(monkeypatch, expert, dtype, gate, options):
    """With ~50 slots per expert, experts computing in bf16 run on groups padded to group_sizes (pad_groups;
    stacked experts: all to the largest, one bmm), in fp32 on the groups as routed: the outputs and gradients
    equal the per-token reference either way."""
    torch.manual_seed(0)
    moe = MoE(D, E, gate, d_ff=D_FF if expert == "stacked" else None,
              expert=None if expert == "stacked" else (lambda: MLP(D, D_FF)), **options).train()
    seen = []
    run_experts = moe.run_experts
    monkeypatch.setattr(moe, "run_experts", lambda x, counts: seen.append((len(x), counts)) or run_experts(x, counts))
    x = torch.randn(2, 100, D)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        y, routing, x_grad, param_grads = forward_backward(moe, x, fast)
        y_ref, _, x_grad_ref, param_grads_ref = forward_backward(moe, x, moe_reference)
    real = routing.tokens_per_expert.tolist()
    (rows, counts), = seen
    if dtype == "fp32":  # no padding: a new matmul shape costs nothing extra in fp32 (pad_groups)
        assert counts == real and rows == sum(real)
    else:
        batched = expert == "stacked"
        assert counts == group_sizes(real, batched) and sum(counts) == rows > sum(real)
        assert (len(set(counts)) == 1) == batched  # stacked in bf16: one bmm over equal groups
    pairs = {"y": (y.float(), y_ref.float()), "x.grad": (x_grad, x_grad_ref),
             **{name: (g, param_grads_ref[name]) for name, g in param_grads.items()}}
    # bf16: sums rounded in another order, 2% of the largest entry (a list's nn.Linear experts: 5%, up to 4% seen);
    # misrouted padding would be off by the order of the entries themselves
    share = 1e-5 if dtype == "fp32" else 2e-2 if expert == "stacked" else 5e-2
    for name, (got, want) in pairs.items():
        atol = share if dtype == "fp32" else share * want.abs().max().item()
        torch.testing.assert_close(got, want, rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------- losses
@pytest.mark.parametrize("k", [1, 2])
def test_aux_loss_is_one_for_uniform_routing_and_larger_when_imbalanced(k):
    T = 16
    probs = torch.full((T, E), 1 / E)
    uniform = torch.stack([(torch.arange(T) + j) % E for j in range(k)], dim=1)  # (T, k): each expert T*k/E times
    assert load_balancing_loss(probs, uniform, E).item() == 1.0
    skewed_probs = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(T, E)
    to_first = torch.stack([torch.full((T,), j) for j in range(k)], dim=1)  # every token to experts 0..k-1
    assert load_balancing_loss(skewed_probs, to_first, E).item() > 1.5
    assert load_balancing_loss(skewed_probs, uniform, E).item() == pytest.approx(1.0)  # balanced choices: sum P = 1


def test_aux_loss_gradient_is_closed_form_and_reaches_the_router_only_through_probs():
    T = 10
    probs = torch.rand(T, E).softmax(-1).requires_grad_()
    index = torch.tensor([[0, 1], [0, 2], [0, -1], [3, 0], [1, 2], [0, 1], [2, 3], [0, 1], [1, -1], [0, 3]])
    load_balancing_loss(probs, index, E).backward()
    f = torch.bincount(index[index >= 0], minlength=E) / 18  # 18 routed slots
    torch.testing.assert_close(probs.grad, (E * f / T).expand(T, E))  # d/dP_ti of E sum_i f_i mean_t P_ti

    gate = TopKGate(D, E, k=2)
    routing = gate(torch.randn(T, D))
    via_probs = torch.autograd.grad(routing.aux_loss, routing.probs, retain_graph=True)[0]
    chained = torch.autograd.grad(routing.probs, gate.router.weight, via_probs, retain_graph=True)[0]
    direct = torch.autograd.grad(routing.aux_loss, gate.router.weight)[0]
    torch.testing.assert_close(direct, chained, rtol=0, atol=1e-7)
    assert direct.abs().max() > 1e-4


@pytest.mark.parametrize("gate", [TopKGate(D, E, k=2, capacity_factor=0.5), SwitchGate(D, E, capacity_factor=0.5),
                                  GShardGate(D, E, capacity_factor=0.5)], ids=["topk", "switch", "gshard"])
def test_aux_loss_counts_the_choices_before_capacity_drops(gate):
    logits = torch.randn(24, E, generator=torch.Generator().manual_seed(0)) + torch.tensor([2.0, 0, 0, 0])
    r = gate.train().route(logits)  # most tokens prefer expert 0, which overflows
    assert (r.expert_index < 0).any()
    assert torch.equal(r.expert_index, drop_overflow(r.choice, E, r.capacity))
    counted = r.choice[:, :1] if isinstance(gate, GShardGate) else r.choice  # GShard counts first choices
    assert torch.equal(load_balancing_loss(r.probs, counted, E), r.aux_loss)
    assert abs(load_balancing_loss(r.probs, r.expert_index, E) - r.aux_loss) > 0.1  # after the drops: another number


def test_z_loss_of_zero_logits_is_log_e_squared():
    torch.testing.assert_close(router_z_loss(torch.zeros(7, E)), torch.tensor(math.log(E) ** 2))
    gate = SwitchGate(D, 8)
    nn.init.zeros_(gate.router.weight)
    torch.testing.assert_close(gate(torch.randn(5, D)).z_loss, torch.tensor(math.log(8) ** 2))


# ---------------------------------------------------------------------------------------------- capacity
def test_overflowing_expert_keeps_exactly_capacity_tokens_in_position_order():
    T = 16
    moe = MoE(D, E, SwitchGate(D, E, capacity_factor=1.0, jitter=0.0), d_ff=D_FF).train()
    with torch.no_grad():
        moe.gate.router.weight.zero_()
        moe.gate.router.weight[0] = 1.0  # x > 0 below: expert 0 has the largest logit for every token
    x = torch.rand(T, D) + 0.1
    y, routing = moe(x)
    assert routing.capacity == math.ceil(1.0 * T * 1 / E) == 4
    assert routing.tokens_per_expert.tolist() == [4, 0, 0, 0]
    assert routing.expert_index[:, 0].tolist() == [0] * 4 + [-1] * 12
    assert (routing.weight[4:] == 0).all() and (routing.weight[:4] > 0).all()
    block = x + y  # a residual block: dropped tokens pass through unchanged
    assert torch.equal(block[4:], x[4:])
    assert (y[:4].abs().sum(1) > 0).all()


def test_capacity_factor_null_is_dropless_in_training_and_eval():
    logits = torch.tensor([[1.0, 0, 0, 0]]).expand(16, E)  # every token prefers expert 0
    for capacity_factor, eval_drops in [(None, False), (1.25, True)]:  # eval_capacity_factor: 2.0 in both
        gate = build_gate("switch", D, E, **MoEConfig(num_experts=E, capacity_factor=capacity_factor).gate_options())
        assert bool((gate.train().route(logits).expert_index < 0).any()) == (capacity_factor is not None)
        routing = gate.eval().route(logits)
        assert bool((routing.expert_index < 0).any()) == eval_drops
        assert (routing.capacity is None) == (not eval_drops)
        assert (gate.route(logits, dropless=True).expert_index == 0).all()  # dropless=True: none dropped either way


def test_every_first_choice_comes_before_any_second_choice():
    gate = TopKGate(2, 2, k=2, capacity_factor=0.5)  # capacity = ceil(0.5 * 8 * 2 / 2) = 4
    logits = torch.tensor([[0.0, 1.0]] * 4 + [[1.0, 0.0]] * 4)  # (8, 2)
    routing = gate.route(logits)  # tokens 0-3 choose (1, 0), tokens 4-7 choose (0, 1)
    # expert 0 is full with the first choices of tokens 4-7 before it sees the second choices of tokens 0-3
    assert routing.capacity == 4
    assert routing.expert_index.tolist() == [[1, -1]] * 4 + [[0, -1]] * 4
    assert routing.tokens_per_expert.tolist() == [4, 4]
    # and within one choice, earlier positions win
    assert drop_overflow(torch.tensor([[2], [2], [1], [2]]), 3, 2).flatten().tolist() == [2, 2, 1, -1]


# ---------------------------------------------------------------------------------------------- gates
class Recorder(nn.Module):
    """An expert that remembers what it was given."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(D, D)

    def forward(self, x):
        self.seen = x
        return self.linear(x)


def test_jitter_only_in_training_and_only_on_the_routers_copy():
    torch.manual_seed(0)
    moe = MoE(D, E, SwitchGate(D, E, capacity_factor=None, jitter=0.5), expert=[Recorder() for _ in range(E)])
    x = torch.randn(32, D)
    original = x.clone()
    with torch.no_grad():
        clean_logits = moe.gate.router(x)
        _, routing = moe.train()(x)
        assert not torch.allclose(routing.logits, clean_logits, atol=1e-3)  # the router saw jittered x
        for e, expert in enumerate(moe.experts):
            assert torch.equal(expert.seen, original[routing.expert_index[:, 0] == e])  # the experts saw x itself
        moe.eval()
        (y1, r1), (y2, r2) = moe(x), moe(x)
    assert torch.equal(y1, y2) and torch.equal(r1.logits, r2.logits)
    torch.testing.assert_close(r1.logits, clean_logits, rtol=0, atol=1e-6)



def test_jitter_noise_is_uniform_on_256_even_steps_across_the_interval():
    torch.manual_seed(0)
    x = torch.empty(300, 257)  # a size that is not a multiple of the 8 values per draw
    u = jitter_noise(x, 0.01)
    assert u.shape == x.shape and u.dtype == torch.float32
    levels = u.unique()
    assert len(levels) == 256 and levels.min() == pytest.approx(0.99) and levels.max() == pytest.approx(1.01)
    torch.testing.assert_close(levels.diff(), torch.full((255,), 0.02 / 255), rtol=0, atol=1e-6)  # even steps
    counts = torch.bincount(((u - 0.99) / (0.02 / 255)).round().long().flatten(), minlength=256).float()
    assert counts.std() / counts.mean() < 0.1  # each level ~300 times: uniform
    assert u.mean().item() == pytest.approx(1.0, abs=2e-4) and u.std().item() == pytest.approx(0.01 / math.sqrt(3), rel=0.02)
    torch.manual_seed(0)
    assert torch.equal(jitter_noise(x, 0.01), u)  # the global seed decides it

def test_gshard_keeps_the_second_expert_with_probability_two_g2():
    torch.manual_seed(0)
    gate = GShardGate(16, 8, capacity_factor=None)
    x = torch.randn(20000, 16) * 2
    with torch.no_grad():
        routing = gate.train()(x)
    top2 = routing.probs.topk(2, dim=-1).values  # (T, 2)
    keep_rate = (2 * top2[:, 1] / top2.sum(-1)).clamp(max=1)  # min(1, 2 g2), g2 renormalised over the two
    kept = (routing.expert_index[:, 1] >= 0).float()
    assert (routing.expert_index[:, 0] >= 0).all()
    for part in keep_rate.argsort().chunk(4):  # quartiles of the keep rate: 0.x to ~1.0
        q, k = keep_rate[part], kept[part]
        se = (q * (1 - q)).sum().sqrt() / len(part)  # standard error of the mean of Bernoulli(q)
        assert abs(k.mean() - q.mean()) < 4 * se + 1e-3, (k.mean(), q.mean())
    assert (gate.eval()(x).expert_index >= 0).all()  # eval: both experts, deterministically


def test_expert_choice_gives_every_expert_exactly_c_tokens():
    torch.manual_seed(0)
    T, gate = 30, ExpertChoiceGate(D, E, capacity_factor=1.5)
    with torch.no_grad():
        routing = gate(torch.randn(T, D))
    C = math.ceil(1.5 * T / E)
    assert routing.capacity == C == 12
    assert routing.tokens_per_expert.tolist() == [C] * E
    for e in range(E):
        tokens = (routing.expert_index == e).nonzero()[:, 0]
        assert set(tokens.tolist()) == set(routing.probs[:, e].topk(C).indices.tolist())
    picked = routing.expert_index >= 0
    chosen_probs = routing.probs.gather(1, routing.expert_index.clamp(min=0))  # (T, k_max)
    torch.testing.assert_close(routing.weight[picked], chosen_probs[picked])
    assert (routing.weight[~picked] == 0).all()
    assert routing.aux_loss.item() == pytest.approx(1.0)


def test_build_gate_checks_k_against_the_gate():
    assert build_gate("topk", D, E, k=3).k == 3
    with pytest.raises(ValueError, match="model.moe.top_k"):
        build_gate("switch", D, E, k=2)
    with pytest.raises(ValueError, match="model.moe.gate"):
        build_gate("top2", D, E)


def test_check_gate_names_the_key():
    with pytest.raises(ValueError, match="model.moe.top_k: gate 'noisy_topk' .* 1 <= k <= 1"):
        check_gate("noisy_topk", 2, 2)  # the load estimator needs a (k+1)-th expert
    with pytest.raises(ValueError, match="model.moe.top_k: gate 'topk' .* 1 <= k <= 4"):
        check_gate("topk", E, 0)
    with pytest.raises(ValueError, match="model.moe.num_experts: gate 'gshard'"):
        check_gate("gshard", 1)
    with pytest.raises(ValueError, match="model.moe.top_k"):
        TopKGate(D, E, k=5)  # the constructors check through it too


def test_validating_a_moe_config_draws_nothing_from_the_global_rng():
    state = torch.get_rng_state()
    for gate in GATES:
        MoEConfig(num_experts=E, gate=gate).validate()
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------- experts
@pytest.mark.parametrize("kind", [MLP, GatedMLP])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("counts", [[3, 0, 5, 1], [4, 4, 4, 4]], ids=["grouped_mm", "bmm"])
def test_stacked_experts_equal_each_expert_on_its_rows_with_gradients(kind, dtype, counts):
    """An FFN built with num_experts (one grouped matmul per weight, or one bmm for groups of equal size) == a
    loop of F.linear over each expert's weight slices on its rows, output and gradients; in [3, 0, 5, 1] expert 1
    gets no rows (zero gradient)."""
    torch.manual_seed(0)
    assert Groups.of(counts).size == (4 if counts == [4, 4, 4, 4] else 0)
    stacked = kind(D, D_FF, bias=True, num_experts=E)
    x = torch.randn(sum(counts), D, requires_grad=True)
    w = {name: p.detach().clone().requires_grad_() for name, p in stacked.named_parameters()}  # (E, ...) each
    grad = torch.randn(sum(counts), D)

    def loop(x):  # expert e: its own slices of every weight, its own rows
        layer = lambda h, name, e: F.linear(h, w[f"{name}.weight"][e], w[f"{name}.bias"][e])  # noqa: E731
        outs = []
        for e, rows in enumerate(x.split(counts)):
            if kind is MLP:
                outs.append(layer(stacked.act(layer(rows, "fc", e)), "proj", e))
            else:
                outs.append(layer(stacked.act(layer(rows, "gate", e)) * layer(rows, "fc", e), "proj", e))
        return torch.cat(outs)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        y = stacked(x, Groups.of(counts))
        y_loop = loop(x)
    assert y.dtype == y_loop.dtype == (torch.bfloat16 if dtype == "bf16" else torch.float32)
    y.backward(grad.to(y.dtype))
    x_grad, x.grad = x.grad, None
    y_loop.backward(grad.to(y.dtype))
    tol = dict(rtol=0, atol=1e-6) if dtype == "fp32" else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, y_loop, **tol)
    torch.testing.assert_close(x_grad, x.grad, **tol)
    for name, p in stacked.named_parameters():
        torch.testing.assert_close(p.grad, w[name].grad, **tol, msg=name)
        if counts[1] == 0:
            assert not p.grad[1].any(), name  # expert 1 had no rows


def test_stacked_experts_run_on_no_rows_at_all():
    stacked = MLP(D, D_FF, num_experts=E)
    x = torch.zeros(0, D, requires_grad=True)
    y = stacked(x, Groups.of([0] * E))
    y.sum().backward()
    assert y.shape == (0, D) and all(not p.grad.any() for p in stacked.parameters())


def test_a_stacked_linear_starts_like_nn_linear():
    """Each expert's weight and bias ~ U(-1/sqrt(d_in), 1/sqrt(d_in)), as nn.Linear's."""
    torch.manual_seed(0)
    d_in, d_out = 64, 48
    layer = StackedLinear(32, d_in, d_out)
    bound = d_in ** -0.5
    for p in (layer.weight, layer.bias):
        assert p.abs().max() <= bound and p.min() < -0.99 * bound and p.max() > 0.99 * bound
        assert p.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # the uniform's std
    assert layer.weight.shape == (32, d_out, d_in) and layer.bias.shape == (32, d_out)


def test_custom_experts_run_one_by_one_and_the_built_in_ones_stacked():
    assert isinstance(MoE(D, E, "topk", d_ff=D_FF).experts.fc, StackedLinear)
    assert isinstance(MoE(D, E, "topk", expert=lambda: MLP(D, D_FF)).experts, nn.ModuleList)
    with pytest.raises(ValueError, match="MoE: stacked experts hold 3 experts, num_experts=4"):
        MoE(D, E, "topk", expert=MLP(D, D_FF, num_experts=3))


def test_heterogeneous_experts_train_and_each_gets_gradients():
    torch.manual_seed(0)
    experts = [MLP(D, 4), MLP(D, 32, activation="relu"), GatedMLP(D, 16), nn.Sequential(nn.Linear(D, D), nn.Tanh())]
    moe = MoE(D, E, "topk", expert=experts, k=2)
    x, target = torch.randn(64, D), torch.randn(64, D)
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    losses = []
    for step in range(30):
        y, routing = moe(x)
        loss = (y - target).square().mean() + 0.01 * routing.aux_loss
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert (routing.tokens_per_expert > 0).all()
            for e, expert in enumerate(moe.experts):
                assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in expert.parameters()), e
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# ---------------------------------------------------------------------------------------------- precision
def test_bf16_autocast_routes_in_float32_and_returns_the_experts_dtype_as_a_dense_ffn_does():
    torch.manual_seed(0)
    moe = MoE(D, E, "gshard", d_ff=D_FF).eval()
    x = torch.randn(10, D)
    with torch.no_grad():
        y_fp32, routing_fp32 = moe(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, routing = moe(x)
            y_bf16, routing_bf16 = moe(x.bfloat16())
            y_dense = MLP(D, D_FF)(x)
    assert y_fp32.dtype == torch.float32 and y.dtype == y_bf16.dtype == y_dense.dtype == torch.bfloat16
    for r in (routing, routing_bf16):
        assert r.logits.dtype == r.probs.dtype == r.weight.dtype == torch.float32
    assert torch.equal(routing.logits, routing_fp32.logits)  # the router did not run in bf16


# ---------------------------------------------------------------------------------------------- HF parity
@pytest.mark.parametrize("capacity", [None, 3])
def test_parity_with_hf_switch_sparse_mlp(capacity):
    st = pytest.importorskip("transformers.models.switch_transformers.modeling_switch_transformers")
    from transformers import SwitchTransformersConfig

    torch.manual_seed(0)
    B, S = (1, 16) if capacity else (2, 8)  # HF counts capacity per sequence, we per batch: B = 1 when it drops
    config = SwitchTransformersConfig(d_model=D, d_ff=D_FF, num_experts=E, expert_capacity=capacity or B * S,
                                      router_jitter_noise=0.0, dropout_rate=0.0, dense_act_fn="relu")
    hf = st.SwitchTransformersSparseMLP(config).eval()
    factor = capacity * E / (B * S) if capacity else None  # ceil(factor * T / E) = capacity
    moe = MoE(D, E, SwitchGate(D, E, eval_capacity_factor=factor),
              expert=MLP(D, D_FF, activation="relu", bias=False, num_experts=E)).eval()
    with torch.no_grad():
        moe.gate.router.weight.copy_(hf.router.classifier.weight)
        for e in range(E):  # the stacked weights: expert e's in row e
            moe.experts.fc.weight[e].copy_(hf.experts[f"expert_{e}"].wi.weight)
            moe.experts.proj.weight[e].copy_(hf.experts[f"expert_{e}"].wo.weight)
        x = torch.randn(B, S, D)
        y, routing = moe(x)
        y_hf = hf(x)
    assert routing.capacity == capacity
    assert bool((routing.expert_index < 0).any()) == (capacity is not None)
    torch.testing.assert_close(y, y_hf, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- in the models
def tiny(arch: str, moe: dict | None = None, **kw):
    """A tiny GPT, BERT (mlm) or T5 with model.moe = moe."""
    from minimodels.models import BERT, GPT, T5, BERTConfig, GPTConfig, T5Config
    from minimodels.moe import MoEConfig

    moe = MoEConfig(**moe) if moe is not None else None
    torch.manual_seed(0)
    if arch == "gpt":
        return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=4, n_head=2, d_model=16, moe=moe, **kw))
    if arch == "bert":
        return BERT(BERTConfig(vocab_size=50, block_size=16, n_layer=4, n_head=2, d_model=16, dropout=0.0, moe=moe, **kw))
    return T5(T5Config(vocab_size=50, d_model=16, n_layer=4, n_head=2, d_ff=32, moe=moe, **kw))


def batch(arch: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (2, 12), generator=g)
    labels = ids.clone()
    if arch == "bert":
        labels[:, ::2] = -100
    return {"input_ids": ids, "labels": labels}


@pytest.mark.parametrize("arch", ["gpt", "bert", "t5"])
def test_moe_blocks_and_the_model_loss_is_the_mean_of_each_layers_own_losses(arch):
    moe = dict(num_experts=4, gate="topk", top_k=2, every=2, capacity_factor=None, aux_loss_coef=0.25,
               z_loss_coef=0.125)  # dropless, so the aux loss can be recomputed from expert_index below
    model = tiny(arch, moe)
    stacks = [model.encoder.blocks, model.decoder.blocks] if arch == "t5" else [model.blocks]
    for blocks in stacks:  # every other block, starting with block 1 (Switch, HF's sparse_step = 2)
        assert [isinstance(b.ffn, MoE) for b in blocks] == [False, True, False, True]
    out = model(**batch(arch))
    assert len(out.routings) == 2 * len(stacks)
    # the same weights without the MoE losses give the task loss alone
    plain = tiny(arch, {**moe, "aux_loss_coef": 0.0, "z_loss_coef": 0.0})
    plain.load_state_dict(model.state_dict())
    task_loss = plain(**batch(arch)).loss
    aux = [load_balancing_loss(r.probs, r.expert_index, 4) for r in out.routings]  # each layer on its own
    z = [router_z_loss(r.logits) for r in out.routings]
    expected = task_loss + 0.25 * torch.stack(aux).mean() + 0.125 * torch.stack(z).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    # pooling all layers' routings into one loss is a different (wrong) number
    pooled = load_balancing_loss(torch.cat([r.probs for r in out.routings]),
                                 torch.cat([r.expert_index for r in out.routings]), 4)
    assert abs(pooled - torch.stack(aux).mean()) > 1e-4
    names = [k.removesuffix("_load") for k in out.metrics if k.endswith("_load")]
    assert len(names) == len(out.routings)
    for name, r in zip(names, out.routings):
        assert out.metrics[f"{name}_aux_loss"] == r.aux_loss
        torch.testing.assert_close(out.metrics[f"{name}_load"].sum(), torch.tensor(1.0))
        assert 0 < out.metrics[f"{name}_load_entropy"] <= 1
    out.loss.backward()
    for name, p in model.named_parameters():
        if "router" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["gpt", "bert", "t5"])
def test_a_one_expert_moe_model_equals_the_dense_model(arch):
    """num_experts 1, dropless, no aux losses: the same logits and loss as the dense model with those weights."""
    moe = tiny(arch, dict(num_experts=1, every=1, capacity_factor=None, eval_capacity_factor=None,
                          aux_loss_coef=0.0, z_loss_coef=0.0)).eval()
    dense = tiny(arch).eval()
    weights = {k.replace("ffn.experts.", "ffn."): v[0] if ".experts." in k else v  # stacked experts: (1, ...)
               for k, v in moe.state_dict().items() if "router" not in k}
    dense.load_state_dict(weights)
    a, b = moe(**batch(arch)), dense(**batch(arch))
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.logits if arch != "bert" else a.masked_logits,
                               b.logits if arch != "bert" else b.masked_logits, rtol=0, atol=1e-5)


def test_switch_gpt_generates_the_same_with_and_without_the_kv_cache():
    """Generation routes dropless, so a cached one-token step is the uncached pass's last position even
    with an eval capacity that drops tokens in a forward pass."""
    model = tiny("gpt", dict(num_experts=4, eval_capacity_factor=0.25)).eval()
    with torch.no_grad():  # large experts, so that a dropped token changes the next token (at init it would not)
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.mul_(20)
    prompt = batch("gpt")["input_ids"][:, :4]
    ids = model.generate(prompt, 8, top_k=1)
    assert torch.equal(ids, model.generate(prompt, 8, top_k=1, use_cache=False))
    with torch.no_grad():
        assert all((r.expert_index < 0).any() for r in model(ids).routings)  # this capacity drops tokens
        cache = model(ids[:, :-1], use_cache=True, dropless=True).cache
        step = model(ids[:, -1:], cache=cache, use_cache=True, dropless=True).logits[:, -1]  # (B, V)
        torch.testing.assert_close(step, model(ids, dropless=True).logits[:, -1], rtol=0, atol=1e-5)
        assert not torch.allclose(model(ids, dropless=True).logits, model(ids).logits, atol=1e-3)  # the drops matter


def test_switch_t5_generates_the_same_with_and_without_the_kv_cache():
    """T5's generate and beam search route dropless too: with an eval capacity that drops tokens in a forward
    pass, cached and uncached decoding agree."""
    model = tiny("t5", dict(num_experts=4, every=1, eval_capacity_factor=0.25)).eval()
    with torch.no_grad():  # large experts, so that a dropped token changes the next token
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.mul_(20)
    ids = batch("t5")["input_ids"]
    out = model.generate(ids, max_new_tokens=6)
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, use_cache=False))
    with torch.no_grad():
        dropped = model(input_ids=ids, decoder_input_ids=out).routings
        assert any((r.expert_index < 0).any() for r in dropped)  # this capacity drops tokens in a forward pass
        memory, _ = model.encode(ids, dropless=True)
        cache = model.decode(out[:, :-1], memory, use_cache=True, dropless=True)[1]
        step = model.decode(out[:, -1:], memory, cache=cache, use_cache=True, dropless=True)[0][:, -1]
        torch.testing.assert_close(step, model.decode(out, memory, dropless=True)[0][:, -1], rtol=0, atol=1e-5)
        assert not torch.allclose(step, model.decode(out, memory)[0][:, -1], atol=1e-3)  # with the drops it would differ


def test_model_moe_config_errors_name_the_key(tmp_path):
    from minimodels.config import ConfigError, load_config, save_config

    cfg = load_config("configs/gpt.yaml", ["model.moe.num_experts=4", "model.moe.gate=gshard"])
    assert cfg.model.moe.num_experts == 4 and cfg.model.moe.gate == "gshard"
    save_config(cfg, tmp_path / "config.yaml")  # the nested section survives the run folder's config.yaml
    assert load_config(tmp_path / "config.yaml").model.moe == cfg.model.moe
    for override, message in [("model.moe.num_expert=4", "unknown key model.moe.num_expert — did you mean model.moe.num_experts"),
                              ("model.moe.gate=top2", "model.moe.gate: unknown gate 'top2'"),
                              ("model.moe.top_k=2", "model.moe.top_k: gate 'switch' sends each token to 1 expert"),
                              ("model.moe.capacity_factor=0", "model.moe.capacity_factor: must be > 0"),
                              ("model.moe.jitter=1.0", r"model.moe.jitter: must be in \[0, 1\)"),
                              ("model.moe.d_ff=0", "model.moe.d_ff: must be positive or null"),
                              ("model.moe.random_routing=maybe", "model.moe.random_routing: expected bool"),
                              ("model.moe.gate=expert_choice", "model.moe.gate: expert_choice .* causal"),
                              ("model.moe.every=x", "model.moe.every: expected int")]:
        with pytest.raises(ConfigError, match=message):
            load_config("configs/gpt.yaml", [override])


def test_yaml_sets_the_experts_width_the_switch_jitter_and_gshards_random_routing():
    from minimodels.config import load_config
    from minimodels.models import build_model

    common = ["model.vocab_size=50", "model.block_size=16", "model.n_layer=2", "model.d_model=16", "model.n_head=2",
              "model.moe.num_experts=4", "model.moe.capacity_factor=null"]
    switch = build_model(load_config("configs/gpt.yaml", common + ["model.moe.d_ff=24", "model.moe.jitter=0.2"]).model)
    assert switch.blocks[1].ffn.gate.jitter == 0.2
    assert switch.blocks[1].ffn.experts.fc.weight.shape == (4, 24, 16)  # (E, d_ff, d_model)
    assert switch.blocks[0].ffn.fc.out_features == 64  # a dense block keeps the model's width, 4 * d_model
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    for random_routing in (True, False):
        model = build_model(load_config("configs/gpt.yaml", common + [
            "model.moe.gate=gshard", f"model.moe.random_routing={str(random_routing).lower()}"]).model)
        with torch.no_grad():  # a router far from uniform: g2 well below 1/2, so 2 g2 < 1 skips some seconds
            model.blocks[1].ffn.gate.router.weight.mul_(50)
        torch.manual_seed(0)
        routing = model.blocks[1].ffn.gate.train()(x)
        assert bool((routing.expert_index[:, 1] < 0).any()) == random_routing  # second experts skipped or kept


def test_export_of_an_moe_model_to_hf_is_refused():
    from minimodels.hf import gpt_to_hf

    with pytest.raises(ValueError, match="model.moe: .* cannot be exported to GPT-2"):
        gpt_to_hf(tiny("gpt", dict(num_experts=4)))


def test_training_logs_routing_metrics_and_draws_the_expert_load(tmp_path):
    """The generic metrics path: the trainer averages out.metrics between log lines; run() draws vectors."""
    import json

    from minimodels.config import load_config
    from minimodels.train.run import run

    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(f"The quick brown fox {i} jumps over the lazy dog. " * 20)
    out = tmp_path / "run"
    cfg = load_config("configs/gpt.yaml", [
        f"data.source={folder}", "data.tokenizer=char", "model.block_size=32", "model.n_layer=2", "model.d_model=16",
        "model.n_head=2", "model.moe.num_experts=4", "train.max_steps=4", "train.batch_size=4", "train.log_interval=2",
        "train.eval_interval=4", "train.device=cpu", "output.sample_tokens=0", f"output.dir={out}"])
    run(cfg, quiet=True)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [e for e in events if "loss" in e]
    assert [e["step"] for e in train] == [2, 4]
    for e in train:
        assert {"moe_aux_loss", "moe_z_loss", "moe_block1_dropped", "moe_block1_load_entropy"} <= e.keys()
        assert len(e["moe_block1_load"]) == 4 and abs(sum(e["moe_block1_load"]) - 1) < 1e-4
        assert e["moe_aux_loss"] >= 1.0 - 1e-4  # 1.0 is perfect balance; this seeded tiny run stays above it
    assert (out / "moe_block1_load.png").stat().st_size > 0


@pytest.mark.parametrize("arch", ["bert", "t5"])
def test_padding_takes_no_expert_capacity(arch):
    """With drops, padding that took expert slots would displace real tokens: changing the padding (its ids,
    its amount) must not change the outputs at real positions, as for the dense models."""
    model = tiny(arch, dict(num_experts=4, every=1, capacity_factor=0.5, eval_capacity_factor=0.5)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # row 0 has 5 padding positions
    longer = torch.cat([ids, torch.randint(1, 50, (2, 4), generator=g)], dim=1)  # 4 more padding positions
    longer_mask = torch.cat([mask, torch.zeros(2, 4, dtype=mask.dtype)], dim=1)
    other = longer.masked_fill(~longer_mask.bool(), 7)  # other ids at the padding
    if arch == "bert":
        a = model(ids, padding_mask=mask).hidden_states
        b = model(other, padding_mask=longer_mask).hidden_states
    else:
        a = model.encode(ids, mask)[0]
        b = model.encode(other, longer_mask)[0]
    real = mask.bool()
    torch.testing.assert_close(a[real], b[:, :12][real], rtol=0, atol=1e-5)
    assert model(ids, padding_mask=mask, **({"labels": ids} if arch == "t5" else {})).routings[0].expert_index.shape[0] == int(mask.sum())


# ---------------------------------------------------------------------------------------------- upcycling
def dense_checkpoint(folder, arch: str = "gpt") -> nn.Module:
    """A dense tiny model saved as folder/model.safetensors (what load_pretrained reads)."""
    from safetensors.torch import save_model

    dense = tiny(arch)
    with torch.no_grad():  # a trained-looking FFN: no zero biases, no two blocks alike
        for name, p in dense.named_parameters():
            if ".ffn." in name:
                p.add_(0.1 * torch.randn_like(p))
    folder.mkdir(exist_ok=True)
    save_model(dense, str(folder / "model.safetensors"))
    return dense.eval()


@pytest.mark.parametrize("arch", ["gpt", "bert", "t5"])
def test_upcycling_copies_the_dense_ffn_into_every_expert_and_keeps_a_fresh_router(arch, tmp_path):
    import re

    from minimodels.train.checkpoint import load_pretrained

    dense = dense_checkpoint(tmp_path, arch)
    model = tiny(arch, dict(num_experts=4))
    fresh_routers = {n: p.clone() for n, p in model.named_parameters() if ".gate." in n}
    new, dropped, upcycled = load_pretrained(model, tmp_path)
    assert upcycled == [n for n, m in model.named_modules() if isinstance(m, MoE)] and len(upcycled) >= 2
    assert new == list(fresh_routers) and dropped == []
    assert all(torch.equal(model.get_parameter(n), p) for n, p in fresh_routers.items())
    dense_state = dense.state_dict()
    for name, t in model.state_dict().items():  # experts: their layer's dense FFN; all else: the dense run's
        if ".gate." not in name:
            expected = dense_state[name.replace(".experts.", ".")]
            assert torch.equal(t, expected.expand(4, *expected.shape) if ".experts." in name else expected), name


def test_an_upcycled_switch_layer_outputs_the_router_probability_times_the_dense_ffn(tmp_path):
    from minimodels.train.checkpoint import load_pretrained

    dense = dense_checkpoint(tmp_path)
    model = tiny("gpt", dict(num_experts=4, capacity_factor=None)).eval()
    load_pretrained(model, tmp_path)
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        for i in (1, 3):
            moe, ffn = model.blocks[i].ffn, dense.blocks[i].ffn
            y, routing = moe(x)  # Switch: y_t = p_t * FFN(x_t), token by token, p_t < 1 the router's probability
            torch.testing.assert_close(y.view(-1, 16), routing.weight * ffn(x).view(-1, 16), rtol=0, atol=1e-6)
            assert (routing.weight < 1).all() and len(set(routing.expert_index.flatten().tolist())) > 1


def test_an_upcycled_top1_gpt_whose_gate_weight_is_one_has_the_dense_logits(tmp_path):
    """topk with k = 1 weights the chosen expert by a softmax over one logit, exactly 1: upcycling is then
    the dense model, whatever the fresh router chooses."""
    from minimodels.train.checkpoint import load_pretrained

    dense = dense_checkpoint(tmp_path)
    model = tiny("gpt", dict(num_experts=4, gate="topk", top_k=1, capacity_factor=None)).eval()
    load_pretrained(model, tmp_path)
    with torch.no_grad():
        out, expected = model(**batch("gpt")), dense(**batch("gpt"))
    assert len(set(torch.cat([r.expert_index for r in out.routings]).flatten().tolist())) > 1  # several experts ran
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=1e-5)


def test_upcycling_gives_each_expert_parallel_process_its_experts(tmp_path):
    """A process of expert parallelism (here: rank 1 of 2, as MoE.shard makes it) loads its own experts."""
    from minimodels.moe.parallel import expert_shards
    from minimodels.train.checkpoint import load_pretrained

    dense = dense_checkpoint(tmp_path)
    model = tiny("gpt", dict(num_experts=4))
    with unittest.mock.patch("torch.distributed.is_initialized", return_value=True), \
            unittest.mock.patch("torch.distributed.get_world_size", return_value=2), \
            unittest.mock.patch("torch.distributed.get_rank", return_value=1):
        for i in (1, 3):
            model.blocks[i].ffn.shard()
    new, dropped, upcycled = load_pretrained(model, tmp_path, expert_shards(model))
    assert new == ["blocks.1.ffn.gate.router.weight", "blocks.3.ffn.gate.router.weight"] and not dropped
    for i in (1, 3):
        assert model.blocks[i].ffn.first_expert == model.blocks[i].ffn.local_experts == 2
        for n, t in model.blocks[i].ffn.experts.state_dict().items():  # (2, ...): experts 2 and 3
            assert len(t) == 2 and all(torch.equal(row, dense.blocks[i].ffn.state_dict()[n]) for row in t), n


def test_init_from_a_dense_run_says_what_it_upcycled(tmp_path, capsys):
    from minimodels.data.tokenizer import train_tokenizer
    from minimodels.train.checkpoint import save_checkpoint
    from minimodels.train.run import init_from_run

    tok = train_tokenizer("char", ["upcycling"], 0)
    for run_dir in ("dense", "switch"):
        tok.save(tmp_path / run_dir / "tokenizer.json")
    save_checkpoint(tmp_path / "dense", 1, tiny("gpt"), {}, keep_last=1)
    init_from_run(tiny("gpt", dict(num_experts=4)), tmp_path / "dense", tmp_path / "switch")
    printed = capsys.readouterr().out
    assert "upcycled (the dense FFN copied into every expert): blocks.1.ffn, blocks.3.ffn" in printed
    assert "new: blocks.1.ffn.gate.router.weight, blocks.3.ffn.gate.router.weight" in printed
    assert "not used" not in printed


def test_only_a_gate_whose_weight_is_a_probability_gets_a_gradient_from_the_loss():
    """README (gates compared in training): top-1 of the naive topk gate weighs its expert by exactly 1, so without
    the aux and z losses its router gets no gradient; the switch gate weighs by p and does."""
    grads = {}
    for gate in ("topk", "switch"):
        model = tiny("gpt", dict(num_experts=4, gate=gate, top_k=1 if gate == "topk" else None, capacity_factor=None,
                                 aux_loss_coef=0.0, z_loss_coef=0.0, jitter=0.0))
        model(**batch("gpt")).loss.backward()
        grads[gate] = model.blocks[1].ffn.gate.router.weight.grad
    assert grads["topk"] is None or grads["topk"].abs().max() == 0
    assert grads["switch"].abs().max() > 1e-6


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_layer_compiles_and_computes_what_it_computes_eagerly(dtype):
    """torch.compile (dynamo and AOT autograd; Inductor's C++ is the slow tests' business): the stacked experts run
    eagerly inside the compiled layer (grouped_mm's traced shape function takes only bf16 in torch 2.13)."""
    torch.manual_seed(0)
    moe = MoE(D, E, "topk", d_ff=D_FF, k=2).train()
    x = torch.randn(2, 30, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
        y_eager = moe(x)[0]
        (grad_eager,) = torch.autograd.grad(y_eager.float().square().sum(), x)
        torch._dynamo.reset()
        y = torch.compile(moe, backend="aot_eager")(x)[0]
        (grad,) = torch.autograd.grad(y.float().square().sum(), x)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(grad, grad_eager)
