"""GPT: causality, KV cache, parity with Hugging Face GPT-2, attention kernels, sampling, overfitting."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub: HF models are built from configs

import pytest
import torch
import torch.nn.functional as F

from minimodels.models.gpt import GPT, GPTConfig
from minimodels.nn import attention, sample_next


def tiny_gpt(attn_impl="auto", **kw) -> GPT:
    torch.manual_seed(0)
    config = dict(vocab_size=50, block_size=16, n_layer=2, n_head=4, d_model=32, attn_impl=attn_impl)
    return GPT(GPTConfig(**{**config, **kw})).eval()


# ---------------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_changing_a_token_only_changes_later_logits(impl):
    model = tiny_gpt(impl)
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits  # (B, T, V)
        for t in (0, 5, 15):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % 50
            out = model(changed).logits
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-6)  # the past never sees the future
            per_position = (out[:, t:] - base[:, t:]).abs().amax(dim=(0, 2))  # (T - t,)
            assert (per_position > 1e-4).all(), f"position >= {t} ignored token {t}"


# ---------------------------------------------------------------------------------------------- KV cache
def test_cached_forward_matches_full_forward():
    model = tiny_gpt()
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :7], use_cache=True)
        step = model(ids[:, 7:], cache=out.cache)  # 5 new tokens on top of 7 cached
    torch.testing.assert_close(step.logits, full[:, 7:], rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_generation_with_and_without_cache_is_identical(impl):
    model = tiny_gpt(impl)
    prompt = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(2))
    # 5 + 30 tokens > block_size = 16: the window slides for the last 19 steps
    greedy = [model.generate(prompt, 30, temperature=0, use_cache=c) for c in (True, False)]
    assert greedy[0].shape == (3, 35)
    assert torch.equal(greedy[0], greedy[1])
    sampled = [model.generate(prompt, 30, top_k=10, use_cache=c, generator=torch.Generator().manual_seed(3))
               for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])


def test_generate_feeds_the_newest_token_until_the_window_slides_then_the_whole_window():
    """As generate's docstring says: the prompt once, then one token per step while the context fits in
    block_size; past it, every step re-encodes the last block_size tokens."""
    model = tiny_gpt()
    fed = []  # tokens of each forward pass
    model.tok_emb.register_forward_hook(lambda module, args, out: fed.append(args[0].size(1)))
    T, n, bs = 5, 15, model.config.block_size
    model.generate(torch.randint(0, 50, (2, T)), n, temperature=0)
    cached = bs - T  # steps until the context holds block_size tokens
    assert fed == [T] + [1] * cached + [bs] * (n - 1 - cached)


# ---------------------------------------------------------------------------------------------- Hugging Face parity
def hf_gpt2(**kw):
    """A randomly initialised GPT2LMHeadModel; every weight, bias and LayerNorm gain perturbed so none is 0 or 1."""
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**config, **kw})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
@pytest.mark.parametrize("hf_kw", [{}, {"tie_word_embeddings": False, "activation_function": "gelu", "n_inner": 96}])
def test_parity_with_hf_gpt2(impl, hf_kw):
    from minimodels.hf import gpt_from_hf, gpt_to_hf

    hf = hf_gpt2(**hf_kw)
    model = gpt_from_hf(hf, attn_impl=impl)
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[0, 3], labels[1, :8] = -100, -100
    with torch.no_grad():
        ours, theirs = model(ids, labels=labels), hf(ids, labels=labels)
        assert (ours.logits - theirs.logits).abs().max() <= 1e-5
        torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-5)
        # round trip back to transformers: the very same weights, so the very same logits
        assert torch.equal(gpt_to_hf(model)(ids).logits, theirs.logits)
    # greedy decoding; no eos token, so HF generates exactly max_new_tokens and needs no pad token
    prompt = ids[:, :6]
    expected = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False)
    assert torch.equal(model.generate(prompt, 20, temperature=0), expected)


def test_position_ids_match_hf_gpt2_and_are_checked_against_block_size():
    """Explicit position_ids (B, T), a different start per row (as after a cache of prefixes, not tokens)."""
    from minimodels.hf import gpt_from_hf

    hf = hf_gpt2()
    model = gpt_from_hf(hf)
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(5))
    position_ids = torch.stack([torch.arange(10), torch.arange(22, 32)])  # (B, T)
    with torch.no_grad():
        ours, theirs = model(ids, position_ids=position_ids).logits, hf(ids, position_ids=position_ids).logits
        assert (ours - theirs).abs().max() <= 1e-5
        assert (ours[1] - model(ids[1:]).logits[0]).abs().max() > 1e-3  # row 1 is not at the default 0..T-1
    with pytest.raises(ValueError, match="position_ids: reach 32; model.block_size=32"):
        model(ids, position_ids=position_ids + 1)


def test_from_hf_and_local_checkpoint(tmp_path):
    from minimodels.hf import gpt_from_hf, load_hf_gpt2

    hf = hf_gpt2()
    ids = torch.randint(0, 100, (1, 10))
    hf.save_pretrained(tmp_path)
    for model in (gpt_from_hf(hf), load_hf_gpt2(str(tmp_path))):
        with torch.no_grad():
            assert (model(ids).logits - hf(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize("option, value", [("scale_attn_by_inverse_layer_idx", True), ("reorder_and_upcast_attn", True),
                                           ("scale_attn_weights", False), ("activation_function", "silu")])
def test_unsupported_hf_options_are_named(option, value):
    from minimodels.hf import gpt_from_hf

    with pytest.raises(ValueError, match=option):
        gpt_from_hf(hf_gpt2(**{option: value}))


def test_to_hf_requires_biases():
    pytest.importorskip("transformers")
    from minimodels.hf import gpt_to_hf

    with pytest.raises(ValueError, match="bias"):
        gpt_to_hf(tiny_gpt(bias=False))


# ---------------------------------------------------------------------------------------------- attention kernels
def qkv(t_q, t_k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, t, 16, generator=g).to(dtype) for t in (t_q, t_k, t_k)]  # (B, nh, T, hs)


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [True, False])
@pytest.mark.parametrize("t_q, t_k", [(10, 10), (3, 10), (1, 10)])  # t_q < t_k: queries after a KV cache
def test_manual_and_sdpa_attention_agree(dtype, atol, causal, padded, t_q, t_k):
    q, k, v = qkv(t_q, t_k, dtype)
    mask = None
    if padded:  # right padding: the last keys of the first sequence are padding; key 0 is always real
        mask = torch.ones(2, t_k, dtype=torch.bool)
        mask[0, -3:] = False
        mask = mask[:, None, None, :]  # (B, 1, 1, Tk)
    manual = attention(q, k, v, mask=mask, causal=causal, impl="manual")
    sdpa = attention(q, k, v, mask=mask, causal=causal, impl="sdpa")
    assert manual.shape == (2, 4, t_q, 16)
    torch.testing.assert_close(manual.float(), sdpa.float(), rtol=0, atol=atol)


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_causal_mask_offset_matches_last_rows_of_full_attention(impl):
    """Queries at the end of a cached sequence see exactly what they would see in the full sequence."""
    q, k, v = qkv(10, 10, torch.float32)
    full = attention(q, k, v, causal=True, impl=impl)  # (B, nh, 10, hs)
    last = attention(q[:, :, -3:], k, v, causal=True, impl=impl)  # (B, nh, 3, hs)
    torch.testing.assert_close(last, full[:, :, -3:], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- sampling
def test_top_k_and_top_p_only_sample_allowed_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 30, generator=g).repeat(500, 1)  # (2000, V): 500 draws for each of 4 distributions
    probs = F.softmax(logits, dim=-1)

    top5 = torch.topk(logits, 5, dim=-1).indices  # (N, 5)
    picked = sample_next(logits, top_k=5, generator=g)  # (N, 1)
    assert (picked == top5).any(dim=-1).all()

    # nucleus: the smallest prefix of tokens sorted by probability whose mass reaches p
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    n_keep = (sorted_probs.cumsum(-1) < 0.7).sum(-1, keepdim=True) + 1  # (N, 1)
    allowed = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, torch.arange(30) < n_keep)
    picked = sample_next(logits, top_p=0.7, generator=g)
    assert allowed.gather(-1, picked).all()
    assert len(picked.unique()) > 4  # it samples: more than one token per distribution shows up

    picked = sample_next(logits, top_k=5, top_p=0.7, generator=g)  # both filters at once
    assert ((picked == top5).any(dim=-1) & allowed.gather(-1, picked).squeeze(-1)).all()

    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1, keepdim=True))


# ---------------------------------------------------------------------------------------------- training
def test_tiny_gpt_overfits_one_batch():
    model = tiny_gpt(vocab_size=64, block_size=32, d_model=64).train()
    batch = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for step in range(200):
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if loss.item() < 0.05:
            break
    assert loss.item() < 0.1, f"loss {loss.item():.3f} after {step + 1} steps"
