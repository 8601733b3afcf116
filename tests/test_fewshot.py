"""Few-shot on the docstring-package task (data/package_classification.py): the class-balanced subset of
data.train_examples, BERT's cloze with a verbalizer (PackagePromptTask, bert.py verbalizer_scores), P-tuning on
it over a frozen BERT (PackagePTuningTask), and scripts/reproduce.py's few-shot row end to end on a tiny BERT."""

import dataclasses
import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script

from minimodels.config import ConfigError, DataConfig, load_config
from minimodels.data import train_tokenizer
from minimodels.data.corpus import DataError, stdlib_docstrings
from minimodels.data.package_classification import PackageClassificationTask, PackagePromptTask, PackagePTuningTask
from minimodels.models.bert import BERT, BERTConfig
from minimodels.models.ptuning import PTuning, PTuningConfig
from minimodels.train.checkpoint import read_weights
from minimodels.train.run import run
from tiny import write_docs


@pytest.fixture(scope="module")
def wordpiece():
    """A small WordPiece: most package names take several pieces (a multi-token verbalizer)."""
    return train_tokenizer("wordpiece", stdlib_docstrings(0.1)["train"][:300], 400)


def classification(tokenizer, **data):
    return PackageClassificationTask(tokenizer, {}, 48, DataConfig(tokenizer="wordpiece", task="package_classification", **data))


def test_few_shot_subset_is_balanced_seeded_and_part_of_train(wordpiece):
    full = classification(wordpiece)
    C = len(full.classes)
    rows = {(tuple(x.tolist()), y): i for i, (x, y) in enumerate(full.train)}
    subsets = {}
    for seed in (0, 1):
        task = classification(wordpiece, train_examples=2 * C, few_shot_seed=seed)
        assert Counter(y for _, y in task.train) == {c: 2 for c in range(C)}
        at = [rows[tuple(x.tolist()), y] for x, y in task.train]  # each one a train example, kept in split order
        assert at == sorted(set(at))
        assert [(x.tolist(), y) for x, y in task.val] == [(x.tolist(), y) for x, y in full.val]  # val: the whole split
        subsets[seed] = at
    again = classification(wordpiece, train_examples=2 * C, few_shot_seed=0)
    assert [rows[tuple(x.tolist()), y] for x, y in again.train] == subsets[0] != subsets[1]


def test_few_shot_errors_name_the_key(wordpiece):
    C = len(classification(wordpiece).classes)
    with pytest.raises(DataError, match=f"data.train_examples: {C + 1} is not a multiple of the {C} classes"):
        classification(wordpiece, train_examples=C + 1)
    with pytest.raises(DataError, match=f"data.train_examples: {10_000 * C} keeps 10000 of each class, but"):
        classification(wordpiece, train_examples=10_000 * C)
    with pytest.raises(ConfigError, match="data.train_examples: must be positive or null"):
        load_config("configs/bert_finetune.yaml", ["data.train_examples=0"])
    with pytest.raises(ConfigError, match="data.train_examples: only the docstring-package tasks"):
        load_config("configs/bert.yaml", ["data.train_examples=32"])
    with pytest.raises(ConfigError, match="data.few_shot_seed: must be >= 0"):
        load_config("configs/bert_finetune.yaml", ["data.few_shot_seed=-1"])


@pytest.fixture(scope="module")
def prompt_task(wordpiece):
    return PackagePromptTask(wordpiece, {}, 48, DataConfig(tokenizer="wordpiece", task="package_prompt"))


def test_pattern_blanks_and_verbalizers(prompt_task, wordpiece):
    task = prompt_task
    K = task.verbalizers.size(1)
    names = [wordpiece.decode([t for t in v.tolist() if t != -100]) for v in task.verbalizers]
    assert names == task.classes and K >= 3  # the names, as word pieces padded with -100
    pattern_end = wordpiece.encode("It is from the")
    for e in task.train[:20] + task.val[:20]:
        ids = e.input_ids.tolist()
        assert len(ids) <= 48 and ids[0] == wordpiece.cls_id and ids[-1] == wordpiece.sep_id
        blanks = e.blanks.tolist()
        assert blanks == [i for i, t in enumerate(ids) if t == wordpiece.mask_id] and len(blanks) == K
        assert ids[blanks[0] - len(pattern_end):blanks[0]] == pattern_end  # "... It is from the [MASK] x K package ."
        assert (e.prompt_index == -1).all()  # a manual pattern: no pseudo tokens


def test_cloze_scores_equal_a_naive_recomputation_from_the_mlm_logits(prompt_task):
    """class_scores[b, c] = the mean over the pieces of c's name of log P(piece k at blank k), read off the MLM
    head's logits at every position of the pattern, one class and one piece at a time."""
    torch.manual_seed(0)
    model = BERT(BERTConfig(vocab_size=prompt_task.tokenizer.vocab_size, block_size=48, n_layer=2, n_head=2,
                            d_model=32, dropout=0.0)).eval()
    batch = prompt_task.collate([prompt_task.train[i] for i in (0, 7, 100)])
    out = model(**batch)
    logits = model(batch["input_ids"], batch["padding_mask"]).logits  # (B, T, V), every position
    for b in range(3):
        blanks = (batch["input_ids"][b] == prompt_task.tokenizer.mask_id).nonzero().squeeze(1).tolist()
        for c, name in enumerate(prompt_task.classes):
            pieces = prompt_task.tokenizer.encode(name)
            naive = sum(logits[b, blanks[k]].log_softmax(-1)[p] for k, p in enumerate(pieces)) / len(pieces)
            torch.testing.assert_close(out.class_scores[b, c], naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.class_scores, batch["class_labels"]))
    metrics = prompt_task.evaluate(model, [batch])
    assert metrics["val_loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert metrics["val_acc"] == (out.class_scores.argmax(-1) == batch["class_labels"]).float().mean().item()
    classifier = BERT(BERTConfig(vocab_size=model.config.vocab_size, block_size=48, n_layer=1, n_head=2, d_model=32,
                                 head="classify", num_labels=len(prompt_task.classes)))
    with pytest.raises(ValueError, match="blanks: a cloze is scored by the MLM head; needs model.head=mlm"):
        classifier(**batch)


def test_pattern_errors_name_the_key(wordpiece):
    with pytest.raises(DataError, match="data.template: .*a manual pattern has no pseudo tokens"):
        PackagePromptTask(wordpiece, {}, 48, DataConfig(tokenizer="wordpiece", template=[2, "subject", "mask"]))
    with pytest.raises(DataError, match="data.template: .*P-tuning trains pseudo tokens"):
        PackagePTuningTask(wordpiece, {}, 48, DataConfig(tokenizer="wordpiece", template=["subject", "mask"]))
    with pytest.raises(DataError, match="data.seq_len: 8 leaves no room for a docstring"):
        PackagePromptTask(wordpiece, {}, 8, DataConfig(tokenizer="wordpiece"))
    with pytest.raises(DataError, match="data.tokenizer: the package cloze fills BERT's"):
        PackagePromptTask(train_tokenizer("bpe", ["Return the sum."] * 20, 300), {}, 48, DataConfig(tokenizer="bpe"))
    with pytest.raises(ConfigError, match="data.task: package_prompt makes batches for model.arch bert, not glm"):
        load_config("configs/glm_finetune.yaml", ["data.task=package_prompt"])


# --------------------------------------------------------------------------- on a tiny pretrained BERT

TINY = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.block_size=48", "data.vocab_size=400",
        "train.max_steps=2", "train.batch_size=8", "train.device=cpu", "train.dtype=fp32", "output.plot=false"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A BERT pretrained (MLM head) for 2 steps on 400 docstrings, as a run folder."""
    root = tmp_path_factory.mktemp("fewshot")
    out = root / "bert"
    run(load_config("configs/bert.yaml", TINY + [f"data.source={write_docs(root / 'docs.jsonl')}",
                                                  f"output.dir={out}"]), quiet=True)
    return out


def ptuned(pretrained, out, *overrides):
    """P-tuning on the package cloze over the tiny pretrained BERT, 2 steps, a checkpoint after each."""
    cfg = load_config("configs/fewshot_ptuning.yaml", [
        f"model.init_from={pretrained}", f"data.tokenizer={pretrained}/tokenizer.json", "data.seq_len=48",
        "data.train_examples=16", "train.max_steps=2", "train.batch_size=8", "train.save_interval=1",
        "train.eval_interval=2", "train.device=cpu", "train.dtype=fp32", "output.plot=false", f"output.dir={out}",
        *overrides])
    metrics = run(cfg, quiet=True)
    assert 0 <= metrics["val_acc"] <= 1
    return [read_weights(out / "checkpoints" / f"step_0000000{k}") for k in (1, 2)]


def test_ptuning_on_the_cloze_keeps_the_bert_frozen_while_the_prompt_trains(pretrained, tmp_path):
    before = read_weights(pretrained / "checkpoints" / "step_00000002")
    step1, step2 = ptuned(pretrained, tmp_path / "pt")
    for key, tensor in before.items():  # the BERT is bit-identical after each step
        assert torch.equal(step1[f"backbone.{key}"], tensor) and torch.equal(step2[f"backbone.{key}"], tensor), key
    prompts = [k for k in step2 if not k.startswith("backbone.")]
    assert prompts and all(k.startswith("prompts.0.") for k in prompts)  # one prompt: the task has one "relation"
    assert any(not torch.equal(step1[k], step2[k]) for k in prompts)  # and the prompt trains


def test_ptuning_with_tune_lm_trains_the_bert_too_with_its_dropout_on(pretrained, tmp_path):
    """model.tune_lm: the BERT's embeddings, blocks and MLM head move with the prompt, and the BERT trains in
    train mode (dropout on) with every weight trainable; frozen (the default), it stays in eval mode."""
    before = read_weights(pretrained / "checkpoints" / "step_00000002")
    step1, step2 = ptuned(pretrained, tmp_path / "tuned", "model.tune_lm=true", "train.lr=1e-3")
    moved = {key for key, tensor in before.items() if not torch.equal(step2[f"backbone.{key}"], tensor)}
    assert moved and {k.split(".")[0] for k in moved} >= {"tok_emb", "blocks", "mlm"}
    assert any(not torch.equal(step1[k], step2[k]) for k in step2 if k.startswith("prompts.0."))
    model = PTuning(PTuningConfig(tune_lm=True, num_relations=1, num_prompt_tokens=9,
                                  backbone=load_config(pretrained / "config.yaml").model.__dict__ | {"dropout": 0.1}))
    assert model.train().backbone.training and all(p.requires_grad for p in model.backbone.parameters())
    frozen = PTuning(dataclasses.replace(model.config, tune_lm=False))
    assert not frozen.train().backbone.training and not any(p.requires_grad for p in frozen.backbone.parameters())


def test_reproduce_fewshot_trains_every_method_and_seed_then_prints_the_table(tmp_path, capsys):
    """scripts/reproduce.py fewshot on a tiny BERT (2 steps each, 16 train docstrings): every run keeps its seed's
    own class-balanced draw, the JSON and the table agree, and a second call reuses every run."""
    reproduce = load_script("reproduce")
    methods = list(reproduce.FEW_SHOT)
    small = ["model.n_layer=1", "model.n_head=2", "model.d_model=32", "model.block_size=48"]
    tiny = ["train.max_steps=2", "train.eval_interval=2", "train.save_interval=2", "train.eval_batches=2",
            "train.batch_size=8", "train.device=cpu", "train.dtype=fp32", "output.plot=false", "--runs-dir", str(tmp_path),
            *(f"bert:{o}" for o in [*small, "data.vocab_size=400", f"data.source={write_docs(tmp_path / 'docs.jsonl')}"])]
    for seed in reproduce.FEW_SHOT_SEEDS:
        tiny += [f"fewshot_{m}_seed{seed}:{o}" for m in ("ptuning", "ptuning_tuned")
                 for o in ("data.seq_len=48", "data.train_examples=16")]
        tiny += [f"fewshot_{m}_seed{seed}:{o}" for m in ("pet", "finetune") for o in [*small, "data.train_examples=16"]]
    assert reproduce.main(["fewshot", *tiny, "--json"]) == 0
    out, err = capsys.readouterr()
    numbers = json.loads(out)
    assert list(numbers["val_acc"]) == methods and numbers["examples"] == 16
    for method, accs in numbers["val_acc"].items():
        assert len(accs) == 4 and all(0 <= a <= 1 for a in accs)
        for seed in reproduce.FEW_SHOT_SEEDS:
            data = load_config(tmp_path / f"fewshot_{method}_seed{seed}" / "config.yaml").data
            assert (data.train_examples, data.few_shot_seed) == (16, seed)
    assert 0 <= numbers["zero_shot"] <= 1 and 0 < numbers["majority"] < 1
    assert reproduce.main(["fewshot", *tiny]) == 0
    out = capsys.readouterr().out
    assert "training" not in out  # every run reused
    rows = {cells[0]: cells[1:] for line in out.splitlines()[2:] if line.startswith("| ") and "---" not in line
            for cells in [[c.strip() for c in line.split("|")[1:-1]]]}
    assert rows["majority (whole train split)"] == [""] * 4 + [f"{100 * numbers['majority']:.1f}"]
    assert rows["manual prompt, zero-shot"] == [""] * 4 + [f"{100 * numbers['zero_shot']:.1f}"]
    for method, (label, *_) in reproduce.FEW_SHOT.items():
        accs = numbers["val_acc"][method]
        assert rows[label] == [f"{100 * a:.1f}" for a in accs] + [reproduce.spread(accs)]
