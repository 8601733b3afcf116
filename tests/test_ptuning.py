"""P-tuning (minimodels/models/ptuning.py) and the synthetic knowledge base it probes (minimodels/data/kb.py)."""

import dataclasses
import json

import pytest
import torch

from minimodels.config import ConfigError, DataConfig, load_config
from minimodels.data import build_task
from minimodels.data.corpus import DataError
from minimodels.data.kb import RELATIONS, KBProbeTask, build_kb, fill_template, kb_corpus, manual_template
from minimodels.models import PTuning
from minimodels.train.checkpoint import latest_checkpoint, read_weights
from minimodels.train.run import fill_backbone, load_run, run

TINY = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "train.max_steps=2", "train.batch_size=8",
        "train.eval_batches=1", "output.sample_tokens=0"]


# --------------------------------------------------------------------------- the knowledge base


def test_world_is_deterministic_and_consistent():
    kb = build_kb()
    assert kb == build_kb() and kb_corpus() == kb_corpus()
    assert len(RELATIONS) == 10 and {r.one_to_one for r in RELATIONS} == {True, False}
    names = [n for names in kb.entities.values() for n in names]
    assert len(names) == len(set(names))  # no entity name is shared between two entities
    for country, city in kb.facts["capital"].items():  # a capital is a city of its own country
        assert kb.facts["located_in"][city] == country
    for r in RELATIONS:
        facts = kb.facts[r.name]
        if r.one_to_one:
            assert len(set(facts.values())) == len(facts)
        split = kb.probe_split[r.name]
        assert not set(split["train"]) & set(split["test"]) and set(split["train"]) | set(split["test"]) == set(facts)


def test_corpus_states_every_fact_and_no_manual_prompt():
    corpus = kb_corpus()
    text = " ".join(corpus["train"])
    kb = build_kb()
    for r in RELATIONS:
        s, o = next(iter(kb.facts[r.name].items()))
        assert any(t.format(s=s, o=o) in text for t in r.corpus)
        for prompt in r.manual:  # the probe's prompts were not written from the corpus
            for rel in RELATIONS:
                assert all(prompt.replace("[MASK]", "{o}") not in t for t in rel.corpus), (prompt, rel.name)
    assert set(corpus["val"]) - set(corpus["train"])  # val holds new renderings
    subjects = len({s for facts in kb.facts.values() for s in facts})
    assert len(corpus["train"]) == 16 * subjects and len(kb_corpus(DataConfig(kb_documents=2))["train"]) == 2 * subjects


def test_manual_templates_to_prompt_parts():
    assert manual_template("{s} was born in [MASK] .", causal=False) == ["subject", "was born in", "mask", "."]
    assert manual_template("{s} was born in [MASK] .", causal=True) == ["subject", "was born in"]
    assert manual_template("[MASK] is where {s} was born .", causal=False) == ["mask", "is where", "subject", "was born ."]


# --------------------------------------------------------------------------- templates


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """wordpiece (BERT) and byte-level BPE (GPT) tokenizers trained on the knowledge base's corpus."""
    out = {}
    for kind, config in (("wordpiece", "configs/kb_bert.yaml"), ("bpe", "configs/kb_gpt.yaml")):
        cfg = load_config(config)
        out[kind] = build_task(cfg.data, 64, tmp_path_factory.mktemp(kind) / "tokenizer.json").tokenizer
    return out


def test_template_puts_pseudo_tokens_anchors_subject_and_mask_where_the_config_says(tokenizers):
    tok = tokenizers["wordpiece"]
    subject, anchor = tok.encode("dalo mirek"), tok.encode("born in")
    ids, index, labels = fill_template([2, "subject", "born in", 1, "mask", 3], "dalo mirek", [77], tok)
    S, A = len(subject), len(anchor)
    assert ids == [tok.cls_id, tok.pad_id, tok.pad_id] + subject + anchor + [tok.pad_id, tok.mask_id] + [tok.pad_id] * 3 + [tok.sep_id]
    assert index == [-1, 0, 1] + [-1] * (S + A) + [2, -1, 3, 4, 5, -1]
    assert labels == [-100] * (4 + S + A) + [77] + [-100] * 4  # the object's id at [MASK], nowhere else

    tok = tokenizers["bpe"]  # GPT: <eos> template object; the label sits on the object itself
    subject = tok.encode(" dalo mirek")  # as in running text: byte-level BPE keeps the space in the token
    ids, index, labels = fill_template([1, "subject", 2], "dalo mirek", [55], tok)
    assert ids == [tok.eos_id, tok.pad_id] + subject + [tok.pad_id, tok.pad_id, 55]
    assert index == [-1, 0] + [-1] * len(subject) + [1, 2, -1]
    assert labels == [-100] * (len(ids) - 1) + [55]
    # a prompt starts like a document (no space after <eos>); later words come after a space
    ids, _, _ = fill_template(["the capital of", "subject", "is"], "dalo mirek", [55], tok)
    assert ids == [tok.eos_id] + tok.encode("the capital of dalo mirek is") + [55]


@pytest.mark.parametrize("template, fragment", [
    ([3, "mask", 3], "'subject' exactly once"),
    ([3, "subject", 3], "'mask' exactly once"),
    (["subject", -1, "mask"], "int >= 0"),
])
def test_bad_templates_name_the_key(tokenizers, template, fragment):
    with pytest.raises(DataError, match=f"data.template: .*{fragment}"):
        KBProbeTask(tokenizers["wordpiece"], cfg=dataclasses.replace(load_config("configs/kb_bert.yaml").data,
                                                                     task="kb_probe", template=template))
    with pytest.raises(DataError, match="drop 'mask'"):
        KBProbeTask(tokenizers["bpe"], cfg=dataclasses.replace(load_config("configs/kb_gpt.yaml").data,
                                                               task="kb_probe", template=[1, "subject", "mask"]))


# --------------------------------------------------------------------------- the model on tiny backbones


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Tiny BERT and GPT pretrained for 2 steps on the knowledge base, as run folders."""
    root = tmp_path_factory.mktemp("kb")
    for name in ("kb_bert", "kb_gpt"):
        run(load_config(f"configs/{name}.yaml", TINY + [f"output.dir={root / name}"]), quiet=True)
    return root


def ptuning_cfg(backbones, name, out, *overrides):
    return load_config(f"configs/ptuning_{name}.yaml", [
        f"model.init_from={backbones / f'kb_{name}'}", f"data.tokenizer={backbones / f'kb_{name}'}/tokenizer.json",
        f"output.dir={out}", "train.max_steps=3", "train.eval_batches=1", "train.batch_size=8", *overrides])


def tiny_ptuning(backbones, name, *overrides):
    """A P-tuning model (in eval mode; its backbone as initialised, not loaded) on tiny backbone `name`, and its task."""
    cfg = ptuning_cfg(backbones, name, backbones / "unused", *overrides)
    fill_backbone(cfg)
    task = build_task(cfg.data, None, backbones / f"kb_{name}" / "tokenizer.json")
    return PTuning(dataclasses.replace(cfg.model, **task.model_overrides())).eval(), task


@pytest.mark.parametrize("name", ["bert", "gpt"])
@pytest.mark.parametrize("encoder, deep", [("none", False), ("mlp", False), ("lstm", False), ("lstm", True)],
                         ids=["none", "mlp", "lstm", "deep"])
def test_only_the_prompt_trains_and_the_backbone_stays_bit_identical(backbones, tmp_path, name, encoder, deep):
    cfg = ptuning_cfg(backbones, name, tmp_path / "pt", f"model.encoder={encoder}", f"model.deep={deep}")
    metrics = run(cfg, quiet=True)
    assert 0 <= metrics["val_p_at_1"] <= 1
    pretrained = read_weights(latest_checkpoint(backbones / f"kb_{name}"))
    after = read_weights(latest_checkpoint(tmp_path / "pt"))
    for key, tensor in pretrained.items():
        assert torch.equal(after[f"backbone.{key}"], tensor), key
    prompts = {k: v for k, v in after.items() if not k.startswith("backbone.")}
    _, model, _ = load_run(tmp_path / "pt")
    # what trains: p_i, the encoder, the v2 prefixes — counted from the config, per relation
    n, C, H, L = 9 if name == "bert" else 6, 32, 32, 1
    per_relation = {"none": n * C, "mlp": n * H + (H * H + H) + (H * C + C),
                    "lstm": n * H + 2 * 4 * (H // 2) * (H + H // 2 + 2) + 2 * 4 * (H // 2) * (H + H // 2 + 2)
                    + (H * H + H) + (H * C + C)}[encoder]
    expected = len(RELATIONS) * (per_relation + (L * 2 * n * C if deep else 0))
    assert model.num_trainable() == sum(v.numel() for v in prompts.values()) == expected


def test_gradients_reach_only_the_prompt_parameters(backbones):
    model, task = tiny_ptuning(backbones, "bert", "model.deep=true")
    batch = task.collate(task.train[:8])
    model(**batch).loss.backward()
    with_grad = {k for k, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {k for k, p in model.named_parameters() if not k.startswith("backbone.")}
    relations = set(batch["relation"].tolist())
    for k in with_grad:  # each example moves only its own relation's prompt
        i = int(k.split(".")[1]) if k.startswith("prompts.") else None
        if i is not None:
            assert (model.get_parameter(k).grad.abs().sum() > 0) == (i in relations), k
    assert model.prefix.grad[sorted(relations)].abs().sum() > 0
    assert model.prefix.grad[[i for i in range(len(RELATIONS)) if i not in relations]].abs().sum() == 0


def test_gpt_object_is_scored_from_the_position_before_it(backbones):
    """The object token is the last input; its scores must be the GPT's logits at the position before it,
    which cannot depend on the object itself: run the LM on the prompt without the object and compare."""
    model, task = tiny_ptuning(backbones, "gpt")
    examples = [e for e in task.val if len(e.input_ids) == len(task.val[0].input_ids)][:4]  # no padding
    batch = task.collate(examples)
    out = model(**batch)
    emb = model.backbone.tok_emb(batch["input_ids"][:, :-1])  # the prompt without the object
    prompts = torch.stack([p() for p in model.prompts])[batch["relation"]]  # (B, n, C)
    index = batch["prompt_index"][:, :-1]
    emb = torch.where((index >= 0)[..., None], prompts.gather(1, index.clamp(min=0)[..., None].expand_as(emb)), emb)
    expected = model.backbone(batch["input_ids"][:, :-1], inputs_embeds=emb).logits[:, -1]  # (B, V)
    torch.testing.assert_close(out.logits, expected)
    objects = batch["input_ids"][:, -1]
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(expected, objects))
    other = batch["input_ids"].clone()
    other[:, -1] = (objects + 1) % model.backbone.config.vocab_size  # a different object changes nothing before it
    torch.testing.assert_close(model(**{**batch, "input_ids": other}).logits, out.logits)


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_deep_prefixes_leave_the_positions_of_the_real_tokens_alone(backbones, name):
    """P-tuning v2's prefixes are keys and values, not tokens: the real tokens keep positions 0..T-1. With every
    query blind to the prefixes, the deep model must score exactly as the shallow one; it does not if the
    prefixes shift the positions (to n..n+T-1, as a KV cache of n tokens would)."""
    model, task = tiny_ptuning(backbones, name, "model.deep=true")
    batch = task.collate(task.val[:8])
    with torch.no_grad():
        for block in model.backbone.blocks:  # in each head, dimension 0 of the queries is 1, of the keys 0
            attn = block.attn
            hs = attn.proj.in_features // attn.n_head
            q0 = torch.arange(0, attn.proj.in_features, hs)  # rows of W_Q (then W_K, W_V) in the fused qkv
            k0 = q0 + attn.proj.in_features
            attn.qkv.weight[q0], attn.qkv.bias[q0] = 0.0, 1.0
            attn.qkv.weight[k0], attn.qkv.bias[k0] = 0.0, 0.0
        attended = model(**batch)
        model.prefix[:, :, 0, :, :, 0] = -1e4  # (R, L, k/v, nh, n, hs): the prefix keys score -1e4 / sqrt(hs)
        deep = model(**batch)
        model.config = dataclasses.replace(model.config, deep=False)
        shallow = model(**batch)
    torch.testing.assert_close(deep.logits, shallow.logits)
    torch.testing.assert_close(deep.loss, shallow.loss)
    assert not torch.allclose(attended.logits, shallow.logits)  # where attended, the prefixes do change the scores


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_without_labels_there_is_no_loss_and_every_position_is_scored(backbones, name):
    model, task = tiny_ptuning(backbones, name, "model.deep=true")
    batch = task.collate(task.val[:8])
    with torch.no_grad():
        scored = model(**batch)
        labels = batch.pop("labels")
        out = model(**batch)
    assert out.loss is None and out.logits.shape == (*labels.shape, model.backbone.config.vocab_size)
    rows, slot = (labels != -100).nonzero(as_tuple=True)
    shift = 1 if name == "gpt" else 0  # GPT scores the object from the position before it
    torch.testing.assert_close(out.logits[rows, slot - shift], scored.logits)


def test_lstm_encoder_takes_an_odd_hidden_width(backbones):
    model, task = tiny_ptuning(backbones, "bert", "model.hidden=33")
    encoder = model.prompts[0]
    h = encoder()
    assert h.shape == (model.config.num_prompt_tokens, model.backbone.config.d_model)
    grad = torch.autograd.grad(h[0].sum(), encoder.p)[0]  # (n, 33)
    assert (grad.abs().sum(dim=1) > 0).all()  # h_0 sees every p_j: the LSTM reads right to left too
    model(**task.collate(task.train[:8])).loss.backward()


def test_ptuning_config_errors(backbones, tmp_path):
    with pytest.raises(ConfigError, match="model.encoder: must be one of lstm, mlp, none"):
        ptuning_cfg(backbones, "bert", tmp_path, "model.encoder=gru")
    with pytest.raises(ConfigError, match="model.hidden: must be positive or null, got 0"):
        ptuning_cfg(backbones, "bert", tmp_path, "model.hidden=0")
    with pytest.raises(ConfigError, match="model.hidden: encoder none has no hidden layer"):
        ptuning_cfg(backbones, "bert", tmp_path, "model.encoder=none", "model.hidden=16")
    with pytest.raises(ConfigError, match="model.init_from: .*config.yaml not found"):
        run(ptuning_cfg(backbones, "bert", tmp_path / "x", f"model.init_from={tmp_path / 'nothing'}"), quiet=True)
    with pytest.raises(ConfigError, match="model.init_from: P-tuning needs the run folder of a pretrained LM"):
        ptuning_cfg(backbones, "bert", tmp_path, "model.init_from=null")
    # sizes the data decides: a wrong one would index out of range (too few) or train unused prompts
    with pytest.raises(ConfigError, match="model.num_prompt_tokens: 4, but data.template has 9 pseudo tokens"):
        run(ptuning_cfg(backbones, "bert", tmp_path / "p", "model.num_prompt_tokens=4"), quiet=True)
    with pytest.raises(ConfigError, match=f"model.num_relations: 3 is less than the data's {len(RELATIONS)} relations"):
        run(ptuning_cfg(backbones, "bert", tmp_path / "r", "model.num_relations=3"), quiet=True)


@pytest.mark.slow
def test_probe_script_prints_one_row_per_relation(backbones, tmp_path):
    import subprocess
    import sys

    run(ptuning_cfg(backbones, "gpt", tmp_path / "pt"), quiet=True)
    r = subprocess.run([sys.executable, "scripts/probe.py", str(tmp_path / "pt")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:-1]] == [rel.name for rel in RELATIONS]
    for row in rows[1:]:
        numbers = [float(x.strip("* ")) for x in row.split("|")[3:-1] if x.strip()]
        assert len(numbers) == 5 and all(0 <= x <= 100 for x in numbers)
    # --json: the same numbers as shares, per relation and their mean
    r = subprocess.run([sys.executable, "scripts/probe.py", str(tmp_path / "pt"), "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    shares = json.loads(r.stdout)
    assert list(shares["relations"]) == [rel.name for rel in RELATIONS]
    assert [f"{100 * v:.1f}" for v in shares["mean"].values()] == [x.strip("* ") for x in rows[-1].split("|")[3:-1]]
    assert list(shares["mean"]) == ["majority", "best_manual", "mean_manual", "corpus_phrasing", "ptuning"]
    r = subprocess.run([sys.executable, "scripts/generate.py", str(tmp_path / "pt")], capture_output=True, text=True)
    assert r.returncode == 2 and "python scripts/probe.py" in r.stderr  # a P-tuning run writes no text
