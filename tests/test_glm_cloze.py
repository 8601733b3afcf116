"""GLM fine-tuned as a cloze (data/package_classification.py PackageClozeTask): the examples share BERT's split and
classes, the batched class scores equal one GLM run per class, a class's segment never sees another's, a tiny
pretrain-then-fine-tune run, and config errors that name the key."""

import copy

import pytest
import torch
import torch.nn.functional as F

from minimodels.config import ConfigError, DataConfig, load_config
from minimodels.data import train_tokenizer
from minimodels.data.blank_infilling import blank_infill
from minimodels.data.corpus import DataError, stdlib_docstrings
from minimodels.data.package_classification import PackageClassificationTask, PackageClozeTask, cloze_part_b
from minimodels.models.glm import GLM, GLMConfig
from minimodels.train.checkpoint import latest_checkpoint
from minimodels.train.run import run


@pytest.fixture(scope="module")
def bpe():
    """A small byte-level BPE: most package names take several pieces (multi-token verbalizers)."""
    return train_tokenizer("bpe", stdlib_docstrings(0.1)["train"][:300], 400)


@pytest.fixture(scope="module")
def task(bpe):
    return PackageClozeTask(bpe, {}, 48, DataConfig(tokenizer="bpe"))


def tiny_glm(task) -> GLM:
    torch.manual_seed(0)
    return GLM(GLMConfig(vocab_size=task.tokenizer.vocab_size, block_size=48, n_layer=2, n_head=2, d_model=32)).eval()


def test_examples_share_berts_split_and_classes_and_end_with_the_pattern(task, bpe):
    wordpiece = train_tokenizer("wordpiece", stdlib_docstrings(0.1)["train"][:300], 400)
    bert = PackageClassificationTask(wordpiece, {}, 48, DataConfig(tokenizer="wordpiece"))
    assert task.classes == bert.classes and task.files == bert.files
    assert [y for _, y in task.val] == [y for _, y in bert.val] and task.unigram_baseline() == bert.unigram_baseline()
    pattern = bpe.encode(PackageClozeTask.PATTERN)
    assert all(len(x) <= 48 and x[-len(pattern):].tolist() == pattern for x, _ in task.train + task.val)
    assert max(map(len, task.verbalizers)) >= 3 and [bpe.decode(v) for v in task.verbalizers] == [" " + c for c in task.classes]


def test_batch_layout_one_segment_per_class_at_the_blank(task):
    batch = task.collate(task.val[:3])
    ids, sop, eop = task.ids, task.ids["sop"], task.ids["eop"]
    for b in range(3):
        A = int(batch["part_a_len"][b])
        blank = int((batch["input_ids"][b, :A] == ids["mask"]).nonzero())
        real = batch["labels"][b] != -100
        assert (batch["segment_ids"][b, :A] == 0).all() and not real[:A].any()
        for c, v in enumerate(task.verbalizers):
            at = (batch["segment_ids"][b] == c + 1).nonzero().squeeze(1)  # (len(v) + 1,)
            assert batch["input_ids"][b, at].tolist() == [sop] + v and batch["labels"][b, at].tolist() == v + [eop]
            assert (batch["position_ids"][b, at] == blank).all()
            assert batch["block_position_ids"][b, at].tolist() == list(range(1, len(v) + 2))
    assert batch["class_labels"].tolist() == [y for _, y in task.val[:3]]


def test_class_scores_equal_one_glm_run_per_class(task):
    """The batched scores (all classes as segments of one Part B, rows padded) equal, for every row and class, the
    sum of log P over v(c) [eop] from a GLM run on that docstring alone with the one blank filled by v(c), laid out
    by blank_infill as in pretraining."""
    model, rows = tiny_glm(task), [task.train[i] for i in (0, 7, 100)]
    batch = task.collate(rows)
    out = model(**batch)
    for b, (part_a, _) in enumerate(rows):
        blank = int((part_a == task.ids["mask"]).nonzero())
        for c, v in enumerate(task.verbalizers):
            filled = torch.cat([part_a[:blank], torch.tensor(v), part_a[blank + 1:]])  # the text with the name in
            r = blank_infill(filled, [(blank, blank + len(v))], [task.ids["mask"]], [0], task.ids["sop"], task.ids["eop"])
            assert torch.equal(r["input_ids"][: len(part_a)], part_a)
            logits = model(r["input_ids"][None], r["position_ids"][None], r["block_position_ids"][None],
                           r["part_a_len"]).logits[0]  # (T, V)
            target = r["labels"] != -100
            naive = logits[target].log_softmax(-1).gather(1, r["labels"][target][:, None]).sum()
            torch.testing.assert_close(out.class_scores[b, c], naive, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.class_scores, batch["class_labels"]))
    metrics = task.evaluate(model, [batch])
    assert metrics["val_loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert metrics["val_acc"] == (out.class_scores.argmax(-1) == batch["class_labels"]).float().mean().item()


def test_a_class_segment_never_sees_another_class(task):
    """Replace class 2's verbalizer: its score moves, the other classes' scores do not."""
    model, rows = tiny_glm(task), task.val[:4]
    before = model(**task.collate(rows)).class_scores
    verbalizers = list(task.verbalizers)
    verbalizers[2] = task.tokenizer.encode(" somethingelse")
    changed = copy.copy(task)
    changed.part_b = cloze_part_b(verbalizers, task.ids["sop"], task.ids["eop"])
    after = model(**changed.collate(rows)).class_scores
    others = [c for c in range(len(task.classes)) if c != 2]
    torch.testing.assert_close(after[:, others], before[:, others], atol=1e-5, rtol=1e-5)
    assert (after[:, 2] - before[:, 2]).abs().min() > 1e-2


def tiny(out, config, *overrides):
    return load_config(config, [
        "model.block_size=48", "model.n_layer=1", "model.n_head=2", "model.d_model=32", "train.max_steps=2",
        "train.batch_size=4", "train.eval_interval=2", "train.eval_batches=1", "train.save_interval=2",
        "train.device=cpu", "train.dtype=fp32", "output.sample_tokens=0", "output.plot=false", f"output.dir={out}",
        *overrides])


def test_pretrain_then_finetune_as_a_cloze_end_to_end(tmp_path):
    from safetensors.torch import load_file

    pre = tmp_path / "glm"
    run(tiny(pre, "configs/glm.yaml", "data.vocab_size=300"), quiet=True)
    out = tmp_path / "ft"
    metrics = run(tiny(out, "configs/glm_finetune.yaml", f"model.init_from={pre}", f"data.tokenizer={pre}/tokenizer.json",
                       "train.lr=1.0e-12"), quiet=True)  # a learning rate of ~0: the fine-tuned weights stay the pretrained
    assert {"val_loss", "val_acc"} <= metrics.keys() and 0 <= metrics["val_acc"] <= 1
    a, b = load_file(latest_checkpoint(pre) / "model.safetensors"), load_file(latest_checkpoint(out) / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # the plain GLM, no new head
    assert "unigram_val_acc" in (out / "metrics.jsonl").read_text()  # the majority baseline, logged at step 0


def test_config_errors_name_the_key(bpe):
    with pytest.raises(ConfigError, match="data.task: package_cloze makes batches for model.arch glm, not bert"):
        load_config("configs/bert_finetune.yaml", ["data.task=package_cloze"])
    with pytest.raises(ConfigError, match="data.task: package_classification makes batches for model.arch bert, not glm"):
        load_config("configs/glm_finetune.yaml", ["data.task=package_classification"])
    wordpiece = train_tokenizer("wordpiece", ["Return the sum of the list."] * 20, 100)
    with pytest.raises(DataError, match="data.tokenizer: package_cloze"):
        PackageClozeTask(wordpiece, {}, 48, DataConfig(tokenizer="wordpiece"))
    with pytest.raises(DataError, match="data.seq_len: 8 leaves no room"):
        PackageClozeTask(bpe, {}, 8, DataConfig(tokenizer="bpe"))
    with pytest.raises(DataError, match="data.source: package_cloze"):
        PackageClozeTask(bpe, {}, 48, DataConfig(tokenizer="bpe", source="kb"))
