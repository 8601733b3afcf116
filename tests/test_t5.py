"""T5: parity with Hugging Face (v1.0 and v1.1), generation (greedy, beam, cache), relative position buckets,
cross-attention cache, span corruption, attention directions, and a tiny pretrain -> finetune run."""

import math
import os
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub: HF models are built from configs

import pytest
import torch
import torch.nn.functional as F

from minimodels.config import DataConfig, load_config
from minimodels.models.t5 import T5, T5Config
from minimodels.nn import KV, MultiHeadAttention, PreLNBlock, RelativePositionBias, RMSNorm, build_ffn, relative_position_bucket

V = 64  # vocabulary of the small test models


def tiny_t5(**kw) -> T5:
    torch.manual_seed(0)
    config = dict(vocab_size=V, d_model=32, n_layer=2, n_head=4, d_ff=48, num_buckets=8, max_distance=16)
    return T5(T5Config(**{**config, **kw})).eval()


def batch(seed=1, B=2, S=12, T=7):
    """Encoder ids with the second row padded after 8 tokens, and labels with the second row's tail ignored."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 8:] = 0
    ids[1, 8:] = 0
    labels = torch.randint(2, V, (B, T), generator=g)
    labels[1, 5:] = -100
    return ids, mask, labels


# ---------------------------------------------------------------------------------------------- Hugging Face parity
VERSIONS = {  # HF config options of the two T5 versions (v1.1: different head width and decoder depth too)
    "v1.0": {},
    "v1.1": {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False, "d_kv": 12},
}


def hf_t5(version: str, **kw):
    """A randomly initialised T5ForConditionalGeneration; every weight perturbed so no norm gain is 1.
    v1.1 gets its own LM head (transformers 5.x ties it to the embedding even when told not to)."""
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0,
                  relative_attention_num_buckets=8, relative_attention_max_distance=16)
    torch.manual_seed(0)
    hf = transformers.T5ForConditionalGeneration(transformers.T5Config(**{**config, **VERSIONS[version], **kw})).eval()
    with torch.no_grad():
        if version == "v1.1":
            hf.lm_head.weight = torch.nn.Parameter(torch.randn(V, 32) * 32**-0.5)
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
@pytest.mark.parametrize("version, hf_kw", [("v1.0", {}), ("v1.1", {}), ("v1.1", {"num_decoder_layers": 3})])
def test_logits_and_loss_match_hf(version, hf_kw, impl):
    from minimodels.hf import t5_from_hf, t5_to_hf

    hf = hf_t5(version, **hf_kw)
    model = t5_from_hf(hf, attn_impl=impl)
    assert model.config.tie_weights == (version == "v1.0")
    assert model.config.ffn == ("gated" if version == "v1.1" else "mlp")
    ids, mask, labels = batch()
    decoder_ids = model.shift_right(labels)
    with torch.no_grad():
        ours = model(ids, padding_mask=mask, labels=labels)
        theirs = hf(input_ids=ids, attention_mask=mask, labels=labels)
        real = labels != -100  # compare where the decoder reads real tokens
        assert (ours.logits - theirs.logits)[real].abs().max() <= 1e-5
        torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=1e-5)
        # the encoder output agrees at real positions
        enc = hf.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        assert (ours.encoder_hidden_states - enc)[mask.bool()].abs().max() <= 1e-5
        # explicit decoder inputs give the same logits as labels shifted inside
        assert torch.equal(model(ids, padding_mask=mask, decoder_input_ids=decoder_ids).logits, ours.logits)
        # round trip back to transformers: the very same weights, so the very same logits
        back = t5_to_hf(model)
        assert torch.equal(back(input_ids=ids, attention_mask=mask, labels=labels).logits, theirs.logits)


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_greedy_and_beam_generation_match_hf(version):
    from minimodels.hf import t5_from_hf

    hf = hf_t5(version)
    model = t5_from_hf(hf)
    ids, mask, _ = batch(seed=5)
    # pick as eos a token row 0 produces early, so sequences finish at different steps and get padded
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    eos = int(free[0, 3])
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    ours = model.generate(ids, padding_mask=mask, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(ours, expected)
    assert (ours[0, 5:] == 0).all()  # padded after eos
    # beam search without eos: the num_beams best by summed log-probability, as in HF
    expected = hf.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False,
                           eos_token_id=None, length_penalty=0.0)
    assert torch.equal(model.generate(ids, padding_mask=mask, max_new_tokens=8, num_beams=3, length_penalty=0.0), expected)


def test_from_hf_rejects_what_we_do_not_implement():
    from minimodels.hf import t5_from_hf

    with pytest.raises(ValueError, match="feed_forward_proj"):
        t5_from_hf(hf_t5("v1.0", feed_forward_proj="gated-silu"))
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        t5_from_hf(hf_t5("v1.0", decoder_start_token_id=3))


def test_init_follows_t5():
    """HF's T5 initialisation (factor 1): std 1 embeddings, W_Q std (d_model d_head)^-1/2, W_K/W_V d_model^-1/2."""
    model = T5(T5Config(vocab_size=4000, d_model=256, n_layer=1, n_head=4, d_ff=1024))
    attn = model.encoder.blocks[0].attn
    checks = {"embedding": (model.tok_emb.weight, 1.0), "W_Q": (attn.qkv.weight[:256], (256 * 64) ** -0.5),
              "W_K, W_V": (attn.qkv.weight[256:], 256**-0.5), "W_O": (attn.proj.weight, 256**-0.5),
              "W_2": (model.encoder.blocks[0].ffn.proj.weight, 1024**-0.5),
              "cross W_Q": (model.decoder.blocks[0].cross_attn.q.weight, (256 * 64) ** -0.5)}
    for name, (w, std) in checks.items():
        assert abs(w.std().item() / std - 1) < 0.05, name


# ---------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("tie", [True, False])
def test_cached_decoding_equals_uncached(tie):
    model = tiny_t5(tie_weights=tie)
    ids, mask, labels = batch()
    with torch.no_grad():
        memory, _ = model.encode(ids, mask)
        full, _, _ = model.decode(model.shift_right(labels), memory, mask)
        first, cache, _ = model.decode(model.shift_right(labels)[:, :3], memory, mask, use_cache=True)
        assert cache[0].length == 3 and cache[0].cross_kv.k.size(2) == ids.size(1)  # 3 decoder tokens, S encoder ones
        rest, _, _ = model.decode(model.shift_right(labels)[:, 3:], memory, mask, cache=cache)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=0, atol=1e-5)
    greedy = [model.generate(ids, mask, max_new_tokens=12, use_cache=c) for c in (True, False)]
    assert greedy[0].shape == (2, 13) and torch.equal(greedy[0], greedy[1])
    sampled = [model.generate(ids, mask, max_new_tokens=12, temperature=1.0, top_k=10, use_cache=c,
                              generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])


def sequence_log_prob(model, ids, mask, out):
    """sum_t log P(y_t | y_<t, x) of the generated tokens out[:, 1:], teacher forced."""
    with torch.no_grad():
        logp = F.log_softmax(model(ids, padding_mask=mask, decoder_input_ids=out[:, :-1]).logits.float(), -1)
    return logp.gather(-1, out[:, 1:, None]).squeeze(-1).sum(-1)  # (B,)


def test_beam_search_one_beam_is_greedy_and_more_beams_score_higher():
    model = tiny_t5()
    ids, mask, _ = batch(seed=7, B=4)
    mask[2:, 5:] = 0
    greedy = model.generate(ids, mask, max_new_tokens=10)
    assert torch.equal(model.beam_search(ids, mask, max_new_tokens=10, num_beams=1), greedy)
    beam = model.generate(ids, mask, max_new_tokens=10, num_beams=4, length_penalty=0.0)
    assert not torch.equal(beam, greedy)  # otherwise the comparison below says nothing
    assert (sequence_log_prob(model, ids, mask, beam) >= sequence_log_prob(model, ids, mask, greedy) - 1e-5).all()


def test_beam_search_with_a_beam_per_token_is_exhaustive_over_two_steps():
    """With num_beams = vocab size every 1-token prefix survives, so after 2 steps the best beam is the most
    probable of all V^2 two-token outputs."""
    model = tiny_t5(vocab_size=10)
    ids = torch.randint(1, 10, (3, 6), generator=torch.Generator().manual_seed(0))
    best = model.beam_search(ids, max_new_tokens=2, num_beams=10, length_penalty=0.0)
    pairs = torch.cartesian_prod(torch.arange(10), torch.arange(10))  # (100, 2)
    for b in range(3):
        out = torch.cat([torch.zeros(100, 1, dtype=torch.long), pairs], 1)  # (100, 3) start token + 2 tokens
        scores = sequence_log_prob(model, ids[b:b + 1].expand(100, -1), None, out)
        assert torch.equal(best[b], out[scores.argmax()])


def test_beam_search_stops_at_eos_and_pads():
    model = tiny_t5()
    ids, mask, _ = batch(seed=2)
    free = model.generate(ids, mask, max_new_tokens=6, num_beams=3)
    eos = int(free[0, 2])
    out = model.generate(ids, mask, max_new_tokens=6, num_beams=3, eos_token_id=eos)
    for row in out.tolist():
        if eos in row[1:]:
            assert all(t == 0 for t in row[row.index(eos, 1) + 1:])


# ---------------------------------------------------------------------------------------------- attention structure
def test_encoder_padding_is_invisible():
    """Extra padding on the encoder input changes nothing at real positions, nor the decoder's logits."""
    model = tiny_t5()
    ids, _, labels = batch()
    ids = ids[:1, :8]
    padded = torch.cat([ids, torch.full((1, 5), 7)], 1)  # padding with a non-pad id: only the mask may hide it
    mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 5)], 1).long()
    with torch.no_grad():
        a, b = model(ids, labels=labels[:1]), model(padded, padding_mask=mask, labels=labels[:1])
    torch.testing.assert_close(b.encoder_hidden_states[:, :8], a.encoder_hidden_states, rtol=0, atol=1e-5)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=1e-5)


def test_information_flow_directions():
    model = tiny_t5()
    ids, _, labels = batch()
    ids, dec = ids[:1], model.shift_right(labels[:1])
    with torch.no_grad():
        base = model(ids, decoder_input_ids=dec)
        t = 6
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % V
        out = model(changed, decoder_input_ids=dec)
        enc_change = (out.encoder_hidden_states - base.encoder_hidden_states).abs().amax(-1)[0]  # (S,)
        assert (enc_change[:t] > 1e-4).all() and (enc_change[t:] > 1e-4).all()  # the encoder sees both ways
        assert ((out.logits - base.logits).abs().amax(-1) > 1e-4).all()  # every decoder position reads the encoder
        for t in (0, 3, 6):
            changed = dec.clone()
            changed[0, t] = (changed[0, t] + 1) % V
            logits = model(ids, decoder_input_ids=changed).logits
            torch.testing.assert_close(logits[:, :t], base.logits[:, :t], rtol=0, atol=0)  # never the future
            assert ((logits[:, t:] - base.logits[:, t:]).abs().amax(-1) > 1e-4).all()


# ---------------------------------------------------------------------------------------------- shared nn pieces
# (j - i, bucket) worked out by hand from section 2.1's scheme with 32 buckets and max_distance 128.
# Bidirectional: 16 buckets per direction, 8 exact; a distance d >= 8 goes to 8 + floor(8 log(d/8) / log(16)),
# and keys to the right add 16. Causal: 32 buckets, 16 exact; d >= 16 -> 16 + floor(16 log(d/16) / log(8)).
BIDIRECTIONAL = [(0, 0), (-1, 1), (-7, 7), (-8, 8), (-12, 9), (-20, 10), (-40, 12), (-90, 14), (-127, 15), (-1000, 15),
                 (1, 17), (7, 23), (8, 24), (20, 26), (500, 31)]
CAUSAL = [(0, 0), (3, 0), (100, 0), (-1, 1), (-15, 15), (-16, 16), (-20, 17), (-50, 24), (-100, 30), (-127, 31), (-1000, 31)]


@pytest.mark.parametrize("bidirectional, table", [(True, BIDIRECTIONAL), (False, CAUSAL)])
def test_relative_position_buckets_hand_computed(bidirectional, table):
    rel = torch.tensor([r for r, _ in table])
    assert relative_position_bucket(rel, bidirectional, 32, 128).tolist() == [b for _, b in table]


@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_buckets_match_hf(bidirectional):
    transformers = pytest.importorskip("transformers")
    rel = torch.arange(-300, 301)
    for n, d in ((32, 128), (8, 16)):
        expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(rel, bidirectional, n, d)
        assert torch.equal(relative_position_bucket(rel, bidirectional, n, d), expected)


def test_relative_position_bias_with_a_cache_is_the_last_rows():
    torch.manual_seed(0)
    bias = RelativePositionBias(n_head=2, bidirectional=False, num_buckets=8, max_distance=16)
    full = bias(7, 7)  # (1, nh, 7, 7)
    assert full.shape == (1, 2, 7, 7)
    torch.testing.assert_close(bias(2, 7), full[:, :, 5:])


def test_cross_attention_cache():
    """Cross-attention computes k, v of the memory once; later calls reuse them without the memory."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 2, cross=True, bias=False).eval()
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 16)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    y, (k, v) = attn(x, memory=memory, padding_mask=mask)
    assert k.shape == v.shape == (2, 2, 5, 8)
    y_cached, kv = attn(x, memory=None, padding_mask=mask, cache=KV(k, v))
    assert torch.equal(y_cached, y) and kv.k is k  # the cache does not grow
    memory2 = memory.clone()
    memory2[1, 3:] = 100.0  # padded memory positions are never attended
    torch.testing.assert_close(attn(x, memory=memory2, padding_mask=mask)[0], y)
    # a decoder block's LayerCache: self-attention's keys and values grow by one per step, cross-attention's stay
    block = PreLNBlock(MultiHeadAttention(16, 2, bias=False, causal=True, scaled=False),
                       build_ffn("mlp", 16, 32, "relu", 0.0, False), partial(RMSNorm, 16),
                       cross_attn=MultiHeadAttention(16, 2, bias=False, cross=True, scaled=False)).eval()
    _, cache, _ = block(x, memory=memory, memory_padding_mask=mask)
    _, cache2, _ = block(torch.randn(2, 1, 16), memory=None, memory_padding_mask=mask, cache=cache)
    sizes = lambda c: [t.size(2) for t in (*c.self_kv, *c.cross_kv)]  # noqa: E731
    assert sizes(cache) == [3, 3, 5, 5] and sizes(cache2) == [4, 4, 5, 5]


# ---------------------------------------------------------------------------------------------- span corruption
SENTINELS = list(range(1000, 1100))
EOS = 1


def reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    """Undo span corruption: put each span of the targets back in place of its sentinel in the inputs."""
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, current = {}, None
    for t in targets[:-1]:
        if t in SENTINELS:
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in inputs[:-1]:
        out += spans[t] if t in SENTINELS else [t]
    return out


def test_span_corruption_reconstructs_exactly_with_sentinels_in_order():
    from minimodels.data.span_corruption import SpanCorruptionCollator

    collator = SpanCorruptionCollator(SENTINELS, EOS, 0)
    g = torch.Generator().manual_seed(0)
    for length in (2, 3, 10, 57, 128, 300):
        for _ in range(20):
            tokens = torch.randint(2, 900, (length,), generator=g)
            inputs, targets = (t.tolist() for t in collator.corrupt(tokens, g))
            assert reconstruct(inputs, targets) == tokens.tolist()
            in_sentinels = [t for t in inputs if t in SENTINELS]
            assert in_sentinels == SENTINELS[:len(in_sentinels)] == [t for t in targets if t in SENTINELS]
            assert targets[0] == SENTINELS[0]  # the targets start with the first span
            assert len(targets) - len(in_sentinels) - 1 == round(length * 0.15) or length < 7  # the noise count


def test_span_corruption_statistics():
    """Over many windows of varied lengths: 15% noise, mean span length 3, span lengths that vary, noise
    spread evenly inside the window (as in T5, a window starts with kept tokens and ends with a span), and
    everything reproducible from the generator."""
    from minimodels.data.span_corruption import SpanCorruptionCollator, random_spans

    g = torch.Generator().manual_seed(0)
    noise = total = spans = 0
    quarter_2 = quarter_3 = 0  # noise tokens in the 2nd and 3rd quarter of the windows
    lengths = set()
    for _ in range(400):
        L = int(torch.randint(50, 400, (1,), generator=g))
        runs = random_spans(L, 0.15, 3.0, g)
        assert sum(k + n for k, n in runs) == L and all(k > 0 and n > 0 for k, n in runs)
        pos = 0
        for kept, n in runs:
            pos += kept
            quarter_2 += sum(1 for p in range(pos, pos + n) if L // 4 <= p < L // 2)
            quarter_3 += sum(1 for p in range(pos, pos + n) if L // 2 <= p < 3 * L // 4)
            pos += n
            lengths.add(n)
        noise, total, spans = noise + sum(n for _, n in runs), total + L, spans + len(runs)
    assert abs(noise / total - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.15
    assert abs(quarter_2 / quarter_3 - 1) < 0.1
    assert len(lengths) >= 5  # not all spans of length 3
    collator = SpanCorruptionCollator(SENTINELS, EOS, 0)
    tokens = [torch.arange(2, 102), torch.arange(2, 60)]
    a, b = (collator(tokens, torch.Generator().manual_seed(s)) for s in (1, 1))
    c = collator(tokens, torch.Generator().manual_seed(2))
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].shape == a["padding_mask"].shape and a["padding_mask"][1].sum() < a["padding_mask"][0].sum()
    assert (a["labels"][1] == -100).any() and not (a["labels"][0] == -100).any()


def small_corpus():
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()
    g = torch.Generator().manual_seed(0)
    docs = [" ".join(words[i] for i in torch.randint(0, len(words), (40,), generator=g).tolist()) for _ in range(60)]
    return {"train": docs[:50], "val": docs[50:]}


def test_span_corruption_task_adds_sentinels_and_evaluates_deterministically():
    from minimodels.data.span_corruption import SpanCorruptionTask
    from minimodels.data.tokenizer import train_tokenizer
    from minimodels.train.trainer import val_batches

    tok = train_tokenizer("char", small_corpus()["train"], 0)
    before = tok.vocab_size
    task = SpanCorruptionTask(tok, small_corpus(), 64, DataConfig(noise_density=0.15, mean_span_length=3.0))
    assert tok.vocab_size == before + 3  # round(round(64 * 0.15) / 3) = 3 spans at most
    assert tok.decode([task.sentinel_ids[0]], skip_special_tokens=False) == "<extra_id_0>"
    assert task.model_overrides() == {"vocab_size": tok.vocab_size}
    model = tiny_t5(vocab_size=tok.vocab_size)
    first, second = (task.evaluate(model, val_batches(task, 4)) for _ in range(2))
    assert first == second and set(first) == {"val_loss", "val_acc", "val_span_loss", "val_span_acc"}
    assert abs(first["val_loss"] - math.log(tok.vocab_size)) < 2.0  # an untrained model: about uniform


def test_docstring_tasks_split_by_file_and_targets():
    from minimodels.data.corpus import split_records, stdlib_records
    from minimodels.data.docstring_to_text import DocstringToNameTask, DocstringToPackageTask
    from minimodels.data.tokenizer import train_tokenizer

    split = split_records(stdlib_records(), 0.1)
    tok = train_tokenizer("char", [r["text"] + r["name"] + r["path"] for r in split["train"][:2000]], 0)
    for cls in (DocstringToNameTask, DocstringToPackageTask):
        task = cls(tok, None, 48, DataConfig())
        train_inputs = {tuple(x.tolist()) for x, _ in task.train}
        assert len(task.val) > 300 and all(len(x) <= 48 and x[-1] == tok.eos_id for x, _ in task.val)
        # no val docstring is also a train docstring (up to the first 47 tokens)
        assert sum(tuple(x.tolist()) in train_inputs for x, _ in task.val) <= 0.02 * len(task.val)
        targets = {tok.decode(y.tolist()) for _, y in task.train}
        if cls is DocstringToNameTask:
            assert "__init__" in targets and not any("." in t for t in targets)
        else:
            assert targets == task.packages and len(targets) >= 2
    with pytest.raises(Exception, match="data.source"):
        DocstringToNameTask(tok, None, 48, DataConfig(source="some/file.txt"))


# ---------------------------------------------------------------------------------------------- config and e2e
def test_config_errors_name_the_key():
    from minimodels.config import ConfigError

    base = {"model": {"arch": "t5"}, "data": {"task": "span_corruption", "seq_len": 64}}
    for key, value, match in [("ffn", "moe", "model.ffn"), ("d_model", 30, "model.d_model"),
                              ("activation", "tanh", "model.activation"), ("num_buckets", 2, "model.num_buckets")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, [f"model.{key}={value}"], base={k: dict(v) for k, v in base.items()})
    assert load_config("configs/t5.yaml").model.arch == "t5"
    finetune = load_config("configs/t5_finetune.yaml")
    assert finetune.model.init_from == "runs/t5" and finetune.data.tokenizer == "runs/t5/tokenizer.json"


def test_tiny_pretrain_then_finetune(tmp_path):
    """span corruption -> docstring_to_name through run(), a few steps each; the fine-tune starts from the
    pretrained weights and reuses the tokenizer with its sentinels."""
    from minimodels.data import Tokenizer
    from minimodels.train.run import run

    model = ["model.d_model=32", "model.n_layer=1", "model.n_head=2", "model.d_ff=64"]
    train = ["train.max_steps=3", "train.batch_size=8", "train.eval_batches=1", "train.device=cpu", "output.sample_tokens=8"]
    pre = tmp_path / "t5"
    metrics = run(load_config("configs/t5.yaml", model + train + ["data.tokenizer=char", "data.seq_len=32",
                                                                   f"output.dir={pre}"]), quiet=True)
    assert set(metrics) == {"val_loss", "val_acc", "val_span_loss", "val_span_acc"} and math.isfinite(metrics["val_loss"])
    assert "<extra_id_0>" in (pre / "sample.txt").read_text()
    fine = tmp_path / "t5_finetune"
    # lr 1e-9: after 3 steps the weights are still the pretrained ones, if init_from loaded them
    metrics = run(load_config("configs/t5_finetune.yaml", model + train + ["train.lr=1e-9",
        f"model.init_from={pre}", f"data.tokenizer={pre / 'tokenizer.json'}", "data.seq_len=32", f"output.dir={fine}"]),
        quiet=True)
    assert set(metrics) == {"val_loss", "val_acc", "val_exact_match"} and 0 <= metrics["val_exact_match"] <= 1
    vocab = Tokenizer.load(fine / "tokenizer.json").backend.get_vocab(with_added_tokens=True)
    assert vocab == Tokenizer.load(pre / "tokenizer.json").backend.get_vocab(with_added_tokens=True)
    assert "(true: " in (fine / "sample.txt").read_text()
    from minimodels.train.checkpoint import latest_checkpoint
    from safetensors.torch import load_file

    before, after = (load_file(str(latest_checkpoint(d) / "model.safetensors")) for d in (pre, fine))
    assert before.keys() == after.keys()
    assert all((before[k] - after[k]).abs().max() < 1e-6 for k in before)


def test_span_accuracy_counts_only_the_dropped_tokens():
    """A model that knows the format (sentinels, eos) but none of the dropped tokens: val_acc is the share of
    format tokens among the targets, val_span_acc is 0."""
    from types import SimpleNamespace

    from minimodels.data.span_corruption import SpanCorruptionTask
    from minimodels.data.tokenizer import train_tokenizer
    from minimodels.train.trainer import val_batches

    tok = train_tokenizer("char", small_corpus()["train"], 0)
    task = SpanCorruptionTask(tok, small_corpus(), 64, DataConfig())
    format_ids = torch.tensor(task.sentinel_ids + [tok.eos_id])

    def format_only(labels, **batch):
        guess = torch.where(torch.isin(labels, format_ids), labels, tok.eos_id + 1)  # wrong on every dropped token
        guess = guess.clamp(min=0)  # -100 -> 0, ignored anyway
        return SimpleNamespace(logits=torch.nn.functional.one_hot(guess, tok.vocab_size).float() * 10)

    batches = list(val_batches(task, 4))
    labels = torch.cat([b["labels"][b["labels"] != -100] for b in batches])
    metrics = task.evaluate(format_only, batches)
    assert metrics["val_span_acc"] == 0.0
    assert metrics["val_acc"] == pytest.approx(torch.isin(labels, format_ids).float().mean().item())
