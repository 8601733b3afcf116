"""BERT: parity with Hugging Face, masking statistics, padding and direction, the fine-tuning task, init_from."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the hub: HF models are built from configs

import math

import pytest
import torch

from minimodels.config import ConfigError, DataConfig, load_config
from minimodels.data.corpus import in_val, stdlib_docstrings
from minimodels.data.mlm import MaskedLMTask, MLMCollator
from minimodels.data.package_classification import PackageClassificationTask, package_of
from minimodels.data.tokenizer import train_tokenizer
from minimodels.models.bert import BERT, BERTConfig
from minimodels.train.checkpoint import latest_checkpoint
from minimodels.train.run import run
from minimodels.train.trainer import val_batches
from reference import loss_curve


def tiny_bert(impl="auto", **kw) -> BERT:
    torch.manual_seed(0)
    config = dict(vocab_size=60, block_size=16, n_layer=2, n_head=4, d_model=32, dropout=0.0, attn_impl=impl)
    return BERT(BERTConfig(**{**config, **kw})).eval()


def padded_batch(vocab=60, T=12, seed=1):
    """ids (3, T), padding_mask with rows of length T, 8 and 3, token types 0/1 (segments A then B)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, T), generator=g)
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, 8:], mask[2, 3:] = 0, 0
    types = (torch.arange(T) >= T // 2).long().expand(3, T) * mask
    return ids, mask, types


# ---------------------------------------------------------------------------------------------- Hugging Face parity
def hf_bert(cls_name, **kw):
    """A randomly initialised HF BERT; every weight, bias and LayerNorm gain perturbed so none is 0 or 1."""
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=16, type_vocab_size=2)
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name)(transformers.BertConfig(**{**config, **kw})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return hf


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_parity_with_hf_masked_lm(impl):
    from minimodels.hf import bert_from_hf

    hf = hf_bert("BertForMaskedLM")
    model = bert_from_hf(hf, attn_impl=impl)
    ids, mask, types = padded_batch()
    real = mask.bool()
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(2)) > 0.3, -100)
    labels[~real] = -100
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels)
        ours = model(ids, padding_mask=mask, token_type_ids=types)
        ours_loss = model(ids, padding_mask=mask, token_type_ids=types, labels=labels)
    assert ours.logits.shape == theirs.logits.shape == (3, 12, 60)
    assert (ours.logits - theirs.logits)[real].abs().max() <= 1e-5  # padded positions' outputs are meaningless
    assert abs(ours_loss.loss.item() - theirs.loss.item()) <= 1e-5
    # the fast path scores only the labelled positions, in row-major order
    torch.testing.assert_close(ours_loss.masked_logits, ours.logits[labels != -100], rtol=0, atol=1e-5)
    assert ours_loss.logits is None


def test_bert_learns_exactly_like_hf_masked_lm():
    """Logit parity does not prove learning parity: the same init (copied from HF), the trainer's AdamW groups and
    gradient clipping, the same 30 padded batches with ~30% of the real positions labelled. Our BERT and
    BertForMaskedLM have the same loss at every step (fp32), so the backward pass, the tied MLM head scoring only
    the labelled positions and the decay groups learn as the reference does."""
    from minimodels.hf import bert_from_hf

    hf = hf_bert("BertForMaskedLM", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
    model = bert_from_hf(hf).train()
    batches = []
    for seed in range(30):
        ids, mask, types = padded_batch(seed=10 + seed)
        # id 0 is [PAD] only in the padding, as in our data: HF's word embedding has padding_idx 0 (no gradient to
        # that row from the lookup), ours has none, and the two differ when 0 is also a real token
        ids = ids.clamp(min=1).masked_fill(mask == 0, 0)
        labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) > 0.3, -100)
        batches.append((ids, mask, types, labels.masked_fill(mask == 0, -100)))
    ours = torch.tensor(loss_curve(model, lambda b: model(b[0], padding_mask=b[1], token_type_ids=b[2], labels=b[3]), batches))
    theirs = torch.tensor(loss_curve(hf, lambda b: hf(input_ids=b[0], attention_mask=b[1], token_type_ids=b[2], labels=b[3]), batches))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ours[-5:].mean() < ours[:5].mean() - 0.5  # it learned: the curves compared are not flat


def test_parity_with_hf_bert_model_pooled_output():
    from minimodels.hf import bert_from_hf

    hf = hf_bert("BertModel", hidden_act="gelu_new")
    model = bert_from_hf(hf)
    assert model.config.head == "pooler" and model.config.activation == "gelu_tanh"
    ids, mask, types = padded_batch()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        ours = model(ids, padding_mask=mask, token_type_ids=types)
    assert (ours.hidden_states - theirs.last_hidden_state)[mask.bool()].abs().max() <= 1e-5
    assert (ours.pooled - theirs.pooler_output).abs().max() <= 1e-5
    assert ours.logits is None


def test_encoder_only_bert_round_trips_through_a_bert_model_without_pooler():
    from minimodels.hf import bert_from_hf, bert_to_hf

    model = tiny_bert(head="none")
    hf = bert_to_hf(model)
    assert type(hf).__name__ == "BertModel" and hf.pooler is None
    back = bert_from_hf(hf)
    assert back.config.head == "none" and back.state_dict().keys() == model.state_dict().keys()
    ids, mask, types = padded_batch()
    with torch.no_grad():
        theirs, ours = hf(input_ids=ids, attention_mask=mask, token_type_ids=types), back(ids, mask, types)
    assert (ours.hidden_states - theirs.last_hidden_state)[mask.bool()].abs().max() <= 1e-5 and ours.pooled is None


@pytest.mark.parametrize("cls_name", ["BertForPreTraining", "BertForSequenceClassification"])
def test_nsp_and_classifier_heads_match_hf_and_round_trip(cls_name):
    from minimodels.hf import bert_from_hf, bert_to_hf

    hf = hf_bert(cls_name, num_labels=5)
    model = bert_from_hf(hf)
    ids, mask, types = padded_batch()
    with torch.no_grad():
        theirs, ours = hf(input_ids=ids, attention_mask=mask, token_type_ids=types), model(ids, mask, types)
    if cls_name == "BertForPreTraining":
        assert (ours.nsp_logits - theirs.seq_relationship_logits).abs().max() <= 1e-5
        assert (ours.logits - theirs.prediction_logits)[mask.bool()].abs().max() <= 1e-5
    else:
        assert ours.logits.shape == (3, 5) and (ours.logits - theirs.logits).abs().max() <= 1e-5
    back = bert_to_hf(model)
    assert type(back).__name__ == cls_name
    ref = hf.state_dict()
    assert back.state_dict().keys() == ref.keys()
    assert all(torch.equal(t, ref[k]) for k, t in back.state_dict().items())


def test_nsp_loss_adds_to_mlm_loss():
    model = tiny_bert(nsp=True)
    ids, mask, types = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    nsp = torch.tensor([0, 1, 1])
    with torch.no_grad():
        mlm = model(ids, mask, types, labels=labels)
        both = model(ids, mask, types, labels=labels, next_sentence_label=nsp)
    expected = mlm.loss + torch.nn.functional.cross_entropy(mlm.nsp_logits, nsp)
    torch.testing.assert_close(both.loss, expected)


# ---------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("impl", ["manual", "sdpa"])
def test_padding_never_changes_real_positions(impl):
    model = tiny_bert(impl, head="pooler")
    ids, mask, types = padded_batch()
    other_ids = torch.where(mask.bool(), ids, (ids + 7) % 60)  # new tokens and segments at padded positions only
    other_types = torch.where(mask.bool(), types, 1 - types)
    with torch.no_grad():
        a = model(ids, mask, types)
        b = model(other_ids, mask, other_types)
    real = mask.bool()
    torch.testing.assert_close(a.hidden_states[real], b.hidden_states[real], rtol=0, atol=1e-6)
    torch.testing.assert_close(a.pooled, b.pooled, rtol=0, atol=1e-6)
    assert (a.hidden_states[~real] - b.hidden_states[~real]).abs().max() > 1e-3  # the test can see a change


def test_attention_is_bidirectional():
    model = tiny_bert(head="none")
    ids = torch.randint(0, 60, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = model(ids).hidden_states
        for t in (0, 7, 15):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % 60
            per_position = (model(changed).hidden_states - base).abs().amax(dim=(0, 2))  # (T,)
            assert (per_position > 1e-4).all(), f"some position ignored token {t}"


# ---------------------------------------------------------------------------------------------- heads, config
def test_classification_head_trains():
    model = tiny_bert(head="classify", num_labels=3).train()
    ids, mask, types = padded_batch()
    labels = torch.tensor([0, 2, 1])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(ids, mask, labels=labels)
        assert out.logits.shape == (3, 3)
        losses.append(out.loss.item())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.1 * losses[0], losses


def test_heads_are_built_only_when_used_and_bad_configs_name_the_key():
    names = lambda m: {n.split(".")[0] for n, _ in m.named_parameters()}
    assert {"mlm"} <= names(tiny_bert()) and not {"pooler", "classifier", "nsp_head"} & names(tiny_bert())
    assert {"pooler", "classifier"} <= names(tiny_bert(head="classify", num_labels=2)) - {"mlm"}
    assert "pooler" in names(tiny_bert(head="pooler")) and names(tiny_bert(head="none")) == names(tiny_bert()) - {"mlm"}
    assert tiny_bert().mlm.bias.shape == (60,)
    for kw, key in [(dict(head="seq2seq"), "model.head"), (dict(head="classify", nsp=True), "model.nsp"),
                    (dict(d_model=30), "model.d_model"), (dict(head="classify"), "model.num_labels")]:
        with pytest.raises(ValueError, match=key):
            tiny_bert(**kw)
    with pytest.raises(ValueError, match=r"labels: model.head=classify expects"):
        tiny_bert(head="classify", num_labels=2)(torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels: model.head=none"):
        tiny_bert(head="none")(torch.zeros(2, 4, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))


# ---------------------------------------------------------------------------------------------- masking
@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer("wordpiece", stdlib_docstrings()["train"][:3000], 1000)


def mlm_batch(tok, n=256, T=64, seed=0):
    """[CLS] + token windows of random lengths, so that batches carry [SEP] inside and padding at the end."""
    stream = torch.tensor(sum((tok.encode(d) + [tok.sep_id] for d in stdlib_docstrings()["val"]), []))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(T // 4, T, (n,), generator=g).tolist()
    return [torch.cat([torch.tensor([tok.cls_id]), stream[i * T: i * T + L - 1]]) for i, L in enumerate(lengths)]


def test_mlm_masking_statistics(wordpiece):
    tok = wordpiece
    examples = mlm_batch(tok)
    collate = MLMCollator(tok, mask_prob=0.15)
    batch = collate(examples, torch.Generator().manual_seed(0))
    orig = torch.nn.utils.rnn.pad_sequence(examples, batch_first=True, padding_value=tok.pad_id)
    real = batch["padding_mask"].bool()
    assert torch.equal(real, orig != tok.pad_id) and torch.equal(batch["padding_mask"].sum(1), torch.tensor(list(map(len, examples))))
    selected = batch["labels"] != -100
    special = torch.isin(orig, torch.tensor(sorted(tok.special_ids)))
    assert not (selected & special).any() and not (selected & ~real).any()  # never special tokens or padding
    assert torch.equal(batch["labels"][selected], orig[selected])  # labels = the original token where selected
    assert torch.equal(batch["input_ids"][~selected], orig[~selected])  # everything else untouched
    eligible = (~special).sum(1)
    assert torch.equal(selected.sum(1), (0.15 * eligible).round().long().clamp(min=1))  # 15% of every row, exactly
    n = int(selected.sum())
    inputs = batch["input_ids"][selected]
    masked = (inputs == tok.mask_id).float().mean().item()
    replaced = ((inputs != tok.mask_id) & (inputs != orig[selected])).float().mean().item()
    kept = (inputs == orig[selected]).float().mean().item()
    sd = lambda p: 4 * math.sqrt(p * (1 - p) / n)  # 4 standard deviations
    assert n > 1200 and abs(masked - 0.8) < sd(0.8) and abs(replaced - 0.1) < sd(0.1) and abs(kept - 0.1) < sd(0.1) + 0.01
    assert not torch.isin(inputs[inputs != tok.mask_id], torch.tensor(sorted(tok.special_ids))).any()
    # all randomness comes from the generator
    again = collate(examples, torch.Generator().manual_seed(0))
    other = collate(examples, torch.Generator().manual_seed(1))
    assert all(torch.equal(batch[k], again[k]) for k in batch) and not torch.equal(batch["labels"], other["labels"])


def test_whole_word_masking_selects_all_pieces_of_a_word(wordpiece):
    tok = wordpiece
    examples = mlm_batch(tok, seed=1)
    batch = MLMCollator(tok, mask_prob=0.15, whole_word_mask=True)(examples, torch.Generator().manual_seed(0))
    orig = torch.nn.utils.rnn.pad_sequence(examples, batch_first=True, padding_value=tok.pad_id)
    selected = batch["labels"] != -100
    vocab = {i: t for t, i in tok.backend.get_vocab().items()}
    is_piece = torch.tensor([[vocab[int(i)].startswith("##") for i in row] for row in orig])
    special = torch.isin(orig, torch.tensor(sorted(tok.special_ids)))
    continues = is_piece[:, 1:] & ~special[:, :-1]  # token t+1 continues the word of token t
    assert continues.sum() > 100  # the batch does contain multi-piece words
    assert torch.equal(selected[:, 1:][continues], selected[:, :-1][continues])  # a word is selected whole
    assert not (selected & special).any()
    share = selected.sum().item() / (~special).sum().item()
    assert 0.12 < share <= 0.16, share  # words are taken while they fit the 15% budget


def test_masked_lm_task_examples_and_deterministic_eval(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(f"The quick brown fox {i} jumps over the lazy dog.\n\nAnother paragraph {i}.\n" * 20)
    from minimodels.data import build_task

    cfg = DataConfig(source=str(folder), task="masked_lm", tokenizer="wordpiece", vocab_size=200, val_fraction=0.3)
    task = build_task(cfg, 16, tmp_path / "tokenizer.json")
    tok = task.tokenizer
    assert all(len(task.train[i]) == 16 and task.train[i][0] == tok.cls_id for i in range(len(task.train)))
    assert (task.train_stream == tok.sep_id).sum() > 0  # documents are separated by [SEP]
    model = BERT(BERTConfig(**task.model_overrides(), block_size=16, n_layer=1, n_head=2, d_model=16)).eval()
    runs = [task.evaluate(model, val_batches(task, 4)) for _ in range(2)]
    assert runs[0] == runs[1] and 0 <= runs[0]["val_mlm_acc"] <= 1 and runs[0]["val_loss"] > 0
    assert math.isfinite(task.unigram_baseline()["val_loss"])
    with pytest.raises(ValueError, match="data.tokenizer"):
        MaskedLMTask(train_tokenizer("char", ["abc"], 10), {"train": ["abc"], "val": ["abc"]}, 4)


# ---------------------------------------------------------------------------------------------- fine-tuning task
def test_package_task_splits_by_file(wordpiece):
    task = PackageClassificationTask(wordpiece, {}, 64, DataConfig(tokenizer="wordpiece"))
    assert 8 <= len(task.classes) <= 20 and task.classes == sorted(task.classes)
    assert not set(task.files["train"]) & set(task.files["val"])
    assert all(in_val(f, 0.1) for f in task.files["val"]) and not any(in_val(f, 0.1) for f in task.files["train"])
    assert {package_of(f) for f in task.files["val"]} == set(task.classes)
    for split in (task.train, task.val):
        ids, labels = zip(*split)
        assert all(0 <= y < len(task.classes) for y in labels) and set(labels) == set(range(len(task.classes)))
        assert all(x[0] == wordpiece.cls_id and x[-1] == wordpiece.sep_id and 3 <= len(x) <= 64 for x in ids)
    batch = task.collate(task.val[:5])
    assert batch["input_ids"].shape == batch["padding_mask"].shape and batch["labels"].shape == (5,)
    assert task.model_overrides() == {"vocab_size": wordpiece.vocab_size, "num_labels": len(task.classes)}
    assert 0 < task.unigram_baseline()["val_acc"] < 0.5  # the majority class is far from everything


# ---------------------------------------------------------------------------------------------- runs, init_from
def tiny_cfg(out, *overrides):
    base = {
        "model": {"arch": "bert", "block_size": 32, "n_layer": 1, "n_head": 2, "d_model": 32, "dropout": 0.0},
        "data": {"task": "masked_lm", "tokenizer": "wordpiece", "vocab_size": 1000},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1.0e-3, "warmup_steps": 0, "device": "cpu", "dtype": "fp32",
                  "eval_interval": 3, "eval_batches": 2, "save_interval": 3, "log_interval": 1},
        "output": {"dir": str(out), "sample_tokens": 0, "plot": False},
    }
    return load_config(None, list(overrides), base=base)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("bert") / "pre"
    metrics = run(tiny_cfg(out), quiet=True)
    assert {"val_loss", "val_mlm_acc"} <= metrics.keys()
    return out


FINETUNE = ("model.head=classify", "data.task=package_classification", "train.eval_batches=1")


def test_pretrain_then_finetune_end_to_end(pretrained, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ft"
    cfg = tiny_cfg(out, *FINETUNE, f"model.init_from={pretrained}", f"data.tokenizer={pretrained}/tokenizer.json",
                   "train.lr=1.0e-12")  # a learning rate of ~0: the encoder must still hold the pretrained weights
    metrics = run(cfg, quiet=True)
    assert {"val_loss", "val_acc"} <= metrics.keys() and 0 <= metrics["val_acc"] <= 1
    pre = load_file(latest_checkpoint(pretrained) / "model.safetensors")
    ft = load_file(latest_checkpoint(out) / "model.safetensors")
    assert "classifier.weight" in ft and "mlm.bias" in pre and "mlm.bias" not in ft
    shared = [k for k in ft if k in pre]
    assert "blocks.0.attn.qkv.weight" in shared
    assert all(torch.allclose(ft[k], pre[k], atol=1e-6) for k in shared)
    events = (out / "metrics.jsonl").read_text()
    assert "unigram_val_acc" in events  # the majority baseline is logged at step 0


def test_init_from_errors(pretrained, tmp_path):
    with pytest.raises(ConfigError, match="model.init_from: .* holds no checkpoint"):
        run(tiny_cfg(tmp_path / "a", *FINETUNE, f"model.init_from={tmp_path / 'missing'}"), quiet=True)
    with pytest.raises(ConfigError, match="model.init_from: .*not this run's tokenizer"):
        run(tiny_cfg(tmp_path / "b", *FINETUNE, f"model.init_from={pretrained}", "data.vocab_size=700"), quiet=True)
    with pytest.raises(ConfigError, match=r"model.init_from: .*shape"):
        run(tiny_cfg(tmp_path / "c", *FINETUNE, f"model.init_from={pretrained}", f"data.tokenizer={pretrained}/tokenizer.json",
                     "model.d_model=64"), quiet=True)
