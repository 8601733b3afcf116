"""Gates: who decides which expert sees which token. Each is an nn.Module called as `gate(x)` with
x (T, d_model), returning a `Routing` (minimodels/moe/routing.py). `gate(x)` computes the router logits
(T, E) and hands them to `gate.route(logits)` (noisy_topk: `route(logits, noise_std)`), which makes every
decision; a test can call `route` with logits of its choosing. With dropless=True (an argument of both)
capacity is ignored: every choice is kept.

    TopKGate          FastMoE's naive gate: top-k logits, softmax over the k chosen      tokens choose
    NoisyTopKGate     Shazeer et al. 2017: top-k of logits + trainable Gaussian noise    tokens choose
    SwitchGate        Fedus et al. 2021: top-1, weight = full-softmax probability         tokens choose
    GShardGate        Lepikhin et al. 2020: top-2, second expert kept at random           tokens choose
    ExpertChoiceGate  Zhou et al. 2022: each expert takes its top-C tokens                experts choose

Every router is one bias-free linear layer W_g (d_model -> E), run in float32 with autocast off even in a
bf16 run ("selective precision", Switch section 2.4): the softmax over experts is where round-off hurts.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimodels.moe.routing import Routing, load_balancing_loss, router_z_loss, token_choice_routing


DEFAULT_K = 2  # experts per token of topk and noisy_topk unless k (model.moe.top_k) says otherwise


def router_logits(router: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x (T, d_model) -> logits x W_g (T, E) in float32, with autocast off."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), router.weight.float())


class TopKGate(nn.Module):
    """FastMoE's NaiveGate: each token takes its k highest-scoring experts, weighted by a softmax over just
    those k logits. No balancing pressure of its own beyond `aux_loss`; dropless unless capacity_factor is set."""

    def __init__(self, d_model: int, num_experts: int, k: int = DEFAULT_K, capacity_factor: float | None = None):
        super().__init__()
        check_gate("topk", num_experts, k)
        self.num_experts, self.k, self.capacity_factor = num_experts, k, capacity_factor
        self.router = nn.Linear(d_model, num_experts, bias=False)  # W_g

    def forward(self, x: torch.Tensor, dropless: bool = False) -> Routing:
        return self.route(router_logits(self.router, x), dropless)

    def route(self, logits: torch.Tensor, dropless: bool = False) -> Routing:
        """The routing of T tokens with router logits (T, E)."""
        top_logits, choice = logits.topk(self.k, dim=-1)  # (T, k)
        probs = logits.softmax(-1)
        aux_loss = load_balancing_loss(probs, choice, self.num_experts)
        capacity_factor = None if dropless else self.capacity_factor
        return token_choice_routing(logits, probs, choice, top_logits.softmax(-1), capacity_factor, aux_loss)


class NoisyTopKGate(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017, section 2.1 and appendix A). In training, Gaussian noise with
    a learned, per-token scale is added to the logits before top-k; the softmax runs over the k kept.

    aux_loss combines the paper's two balancing losses, each a squared coefficient of variation over experts:
        importance_i = sum over tokens of the gate value G(x)_i                     (eq. 6)
        load_i       = sum over tokens of P(x, i), the probability that expert i
                       stays in the top k under a fresh draw of noise               (appendix A, eq. 8-10)
    With the population variance, CV(v)^2 = E * sum_i (v_i / sum v)^2 - 1, so we report
        aux_loss = ((1 + CV(importance)^2) + (1 + CV(load)^2)) / 2
                 = E/2 * (sum_i (importance_i / sum importance)^2 + sum_i (load_i / sum load)^2)
    which is exactly 1.0 for uniform routing (never lower) and has the paper's gradient with w = 1/2 each.
    `logits` and `probs` in the Routing are of the noisy logits H(x) the choice was made from.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = DEFAULT_K, capacity_factor: float | None = None):
        super().__init__()
        check_gate("noisy_topk", num_experts, k)
        self.num_experts, self.k, self.capacity_factor = num_experts, k, capacity_factor
        self.router = nn.Linear(d_model, num_experts, bias=False)  # W_g
        self.noise = nn.Linear(d_model, num_experts, bias=False)  # W_noise

    def forward(self, x: torch.Tensor, dropless: bool = False) -> Routing:
        clean = router_logits(self.router, x)  # (T, E) x W_g
        noise_std = F.softplus(router_logits(self.noise, x))  # (T, E) Softplus(x W_noise)
        return self.route(clean, noise_std, dropless)

    def route(self, clean: torch.Tensor, noise_std: torch.Tensor, dropless: bool = False) -> Routing:
        """The routing of T tokens with clean router logits x W_g (T, E) and noise scales (T, E)."""
        (T, E), k = clean.shape, self.k
        # eq. 4: H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i), in training only
        noisy = clean + torch.randn_like(clean) * noise_std if self.training else clean
        top, top_index = noisy.topk(k + 1, dim=-1)  # (T, k+1): the (k+1)-th is needed for the load below
        choice = top_index[:, :k]  # (T, k)
        weight = top[:, :k].softmax(-1)  # eq. 3, 5: G(x) = Softmax(KeepTopK(H(x), k))
        # eq. 6: Importance(X) = sum_x G(x)
        importance = torch.zeros_like(clean).scatter(1, choice, weight).sum(0)  # (E,)
        # eq. 8-9: P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / Softplus((x W_noise)_i)), where the
        # k-th largest of H(x) without i is the (k+1)-th overall if i is in the top k, else the k-th
        in_top_k = torch.zeros_like(clean, dtype=torch.bool).scatter(1, choice, True)  # (T, E)
        threshold = torch.where(in_top_k, top[:, k:k + 1], top[:, k - 1:k])  # (T, E)
        load = torch.special.ndtr((clean - threshold) / noise_std).sum(0)  # (E,) eq. 10: Load(X)_i = sum_x P(x, i)
        aux_loss = E / 2 * ((importance / importance.sum()).square().sum() + (load / load.sum()).square().sum())
        capacity_factor = None if dropless else self.capacity_factor
        return token_choice_routing(noisy, noisy.softmax(-1), choice, weight, capacity_factor, aux_loss)


def jitter_noise(x: torch.Tensor, jitter: float) -> torch.Tensor:
    """Noise ~ U(1 - jitter, 1 + jitter) shaped like x (float32), in 256 even steps: each random byte is one value,
    eight from one 64-bit draw of the generator. Why: uniform_ draws 32 bits per value, one after another; for
    Switch-GPT's (4096, 256) router input that took 2.8 ms against 0.8 ms this way (2 AMX cores, one-off probe),
    about 2% of its training step for its two MoE blocks. 256 levels of a +-1% jitter are 0.008% apart."""
    n = x.numel()
    words = torch.randint(-2**63, 2**63 - 1, ((n + 7) // 8,), dtype=torch.int64, device=x.device)  # (ceil(n/8),)
    u = words.view(torch.uint8)[:n].view(x.shape).float()  # (..., d) integers 0..255
    return u.mul_(2 * jitter / 255).add_(1 - jitter)


class SwitchGate(nn.Module):
    """Switch routing (Fedus et al. 2021, section 2.1): each token goes to its single most probable expert,
    weighted by that expert's full-softmax probability p_i(x) (eq. 1-2), so the task loss trains the router.

    Capacity: capacity_factor in training, eval_capacity_factor in eval (section 2.2); capacity_factor None
    is dropless in both. Jitter (section 2.4): in training the router's copy of x is multiplied by noise
    ~ U(1 - jitter, 1 + jitter); the experts always receive the exact x.
    """

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float | None = 1.25,
                 eval_capacity_factor: float | None = 2.0, jitter: float = 0.01):
        super().__init__()
        self.num_experts, self.jitter = num_experts, jitter
        self.capacity_factor, self.eval_capacity_factor = capacity_factor, eval_capacity_factor
        self.router = nn.Linear(d_model, num_experts, bias=False)  # W_r

    def forward(self, x: torch.Tensor, dropless: bool = False) -> Routing:
        x_router = x.float()  # a copy for the router: jitter never reaches the experts
        if self.training and self.jitter > 0:
            x_router = x_router * jitter_noise(x_router, self.jitter)
        return self.route(router_logits(self.router, x_router), dropless)

    def route(self, logits: torch.Tensor, dropless: bool = False) -> Routing:
        """The routing of T tokens with router logits (T, E)."""
        probs = logits.softmax(-1)  # eq. 1: p_i(x)
        weight, choice = probs.max(dim=-1, keepdim=True)  # (T, 1) each
        aux_loss = load_balancing_loss(probs, choice, self.num_experts)  # eq. 4, on the choices before drops
        # section 2.2: the eval factor in eval mode, unless capacity_factor None makes the gate dropless in both
        factor = self.capacity_factor if self.training or self.capacity_factor is None else self.eval_capacity_factor
        return token_choice_routing(logits, probs, choice, weight, None if dropless else factor, aux_loss)


class GShardGate(nn.Module):
    """Top-2 gating of GShard (Lepikhin et al. 2020, Algorithm 1). The two weights are the two largest
    probabilities renormalised to sum to 1: g1 + g2 = 1, so g2 <= 1/2. With random_routing, in training
    the second expert is kept with probability min(1, 2 g2) (= 2 g2), decided before capacity; a dropped
    second expert leaves the first with weight g1. aux_loss counts first choices only, as GShard's c_e."""

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float | None = 1.0,
                 random_routing: bool = True):
        super().__init__()
        check_gate("gshard", num_experts)
        self.num_experts, self.capacity_factor, self.random_routing = num_experts, capacity_factor, random_routing
        self.router = nn.Linear(d_model, num_experts, bias=False)  # W_g

    def forward(self, x: torch.Tensor, dropless: bool = False) -> Routing:
        return self.route(router_logits(self.router, x), dropless)

    def route(self, logits: torch.Tensor, dropless: bool = False) -> Routing:
        """The routing of T tokens with router logits (T, E)."""
        probs = logits.softmax(-1)
        top, choice = probs.topk(2, dim=-1)  # (T, 2)
        weight = top / top.sum(-1, keepdim=True)  # g1, g2 renormalised over the two
        aux_loss = load_balancing_loss(probs, choice[:, :1], self.num_experts)
        if self.training and self.random_routing:
            keep_second = torch.rand_like(weight[:, 1]) < 2 * weight[:, 1]  # (T,)
            choice = torch.stack([choice[:, 0], choice[:, 1].masked_fill(~keep_second, -1)], dim=1)  # (T, 2)
        capacity_factor = None if dropless else self.capacity_factor
        return token_choice_routing(logits, probs, choice, weight, capacity_factor, aux_loss)


class ExpertChoiceGate(nn.Module):
    """Expert-choice routing (Zhou et al. 2022, section 3.1): experts choose tokens. With S = Softmax(X W_g)
    (T, E), expert i takes the C tokens with the highest S[:, i] and weights them by S:

        C = min(T, ceil(capacity_factor * T / E))     capacity_factor = average experts per token

    Every expert is exactly full and balance needs no loss: aux_loss = load_balancing_loss(...) is 1.0 up to
    round-off, with no gradient (f_i = 1/E, so it equals sum_i P_i = 1). A token may get several experts or none.
    Routing fields: expert_index (T, k_max) lists each token's experts by decreasing probability, where
    k_max is the most experts any token got, padded with -1 (weight 0); tokens_per_expert is C everywhere.
    Choosing needs all T tokens at once, so this gate cannot decode autoregressively, nor route dropless.
    """

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float = 2.0):
        super().__init__()
        if capacity_factor <= 0:
            raise ValueError(f"ExpertChoiceGate: capacity_factor must be > 0, got {capacity_factor}")
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.router = nn.Linear(d_model, num_experts, bias=False)  # W_g

    def forward(self, x: torch.Tensor, dropless: bool = False) -> Routing:
        return self.route(router_logits(self.router, x), dropless)

    def route(self, logits: torch.Tensor, dropless: bool = False) -> Routing:
        """The routing of T tokens with router logits (T, E)."""
        if dropless:
            raise ValueError("ExpertChoiceGate: experts choose C tokens each; there is no dropless expert choice")
        (T, E), device = logits.shape, logits.device
        probs = logits.softmax(-1)  # S
        C = min(T, math.ceil(self.capacity_factor * T / E))
        tokens = probs.t().topk(C, dim=-1).indices  # (E, C): I = TopK(S^T, C)
        chosen = torch.zeros(E, T, dtype=torch.bool, device=device).scatter(1, tokens, True).t()  # (T, E)
        k_max = int(chosen.sum(1).max())  # host sync: the width of expert_index
        score, expert_index = probs.masked_fill(~chosen, -1.0).topk(k_max, dim=-1)  # (T, k_max)
        expert_index = expert_index.masked_fill(score < 0, -1)
        weight = probs.gather(1, expert_index.clamp(min=0)).masked_fill(score < 0, 0.0)  # (T, k_max)
        tokens_per_expert = torch.full((E,), C, dtype=torch.long, device=device)
        aux_loss = load_balancing_loss(probs, expert_index, E)
        return Routing(expert_index, expert_index, weight, probs, logits, tokens_per_expert, C, aux_loss,
                       router_z_loss(logits))


GATES = {"topk": TopKGate, "noisy_topk": NoisyTopKGate, "switch": SwitchGate, "gshard": GShardGate,
         "expert_choice": ExpertChoiceGate}
FIXED_K = {"switch": 1, "gshard": 2}  # gates whose number of experts per token is part of their definition


def check_gate(name: str, num_experts: int, k: int | None = None) -> None:
    """Raise ValueError, naming the model.moe key, where the gate `name` cannot send each token to k experts
    (None: the gate's default) of num_experts. Builds nothing, so it draws nothing from the global RNG."""
    if name not in GATES:
        raise ValueError(f"model.moe.gate: unknown gate {name!r} (valid: {', '.join(GATES)})")
    if name == "expert_choice":
        if k is not None:
            raise ValueError("model.moe.top_k: expert_choice has no top_k; each expert takes "
                             "ceil(capacity_factor * T / E) tokens")
        return
    if name in FIXED_K and k not in (None, FIXED_K[name]):
        raise ValueError(f"model.moe.top_k: gate {name!r} sends each token to {FIXED_K[name]} expert(s), got {k}")
    k = FIXED_K.get(name, DEFAULT_K if k is None else k)
    most = num_experts - 1 if name == "noisy_topk" else num_experts  # noisy: the load compares with the (k+1)-th
    if not 1 <= k <= most:
        key = "model.moe.num_experts" if name in FIXED_K else "model.moe.top_k"
        raise ValueError(f"{key}: gate {name!r} sends each token to k = {k} of num_experts = {num_experts} "
                         f"experts; it needs 1 <= k <= {most}")


def build_gate(name: str, d_model: int, num_experts: int, k: int | None = None, **options) -> nn.Module:
    """The gate named `name` (a key of GATES). k: experts per token, for "topk" and "noisy_topk"; for
    "switch" (1) and "gshard" (2) it may only repeat the fixed value; "expert_choice" takes none (its
    capacity_factor sets the average experts per token). options go to the gate's constructor, e.g.
    capacity_factor (None = dropless), jitter, random_routing."""
    check_gate(name, num_experts, k)
    if k is not None and name not in FIXED_K:
        options["k"] = k
    return GATES[name](d_model, num_experts, **options)
