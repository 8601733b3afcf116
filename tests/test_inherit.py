"""Knowledge inheritance (minimodels/models/inherit.py): the alpha schedule, the loss, and train.teacher end to end."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import events, train
from minimodels.config import ConfigError, TeacherConfig, load_config
from minimodels.models.bert import BERTOutput
from minimodels.models.gpt import GPT, GPTConfig, GPTOutput
from minimodels.models.inherit import Inheritance, SoftenedKL, alpha_at, inheritance_loss, softened_kl, target_logits
from minimodels.train.checkpoint import latest_checkpoint, read_weights, stored_once
from minimodels.train.run import load_run, run

TINY = ["model.n_layer=1", "model.n_head=2", "model.block_size=32", "train.batch_size=4", "train.eval_batches=1",
        "data.tokenizer=char", "output.sample_tokens=0", "train.warmup_steps=0"]


def test_alpha_decays_linearly_to_zero_or_stays_constant():
    decaying = TeacherConfig(run="r", alpha=0.8, decay_steps=10)
    assert [alpha_at(s, decaying) for s in (0, 5, 10, 20)] == [0.8, 0.4, 0.0, 0.0]
    assert alpha_at(1000, TeacherConfig(run="r", alpha=0.3)) == 0.3


def test_loss_mixes_self_loss_and_softened_kl_at_target_positions():
    torch.manual_seed(0)
    labels = torch.tensor([[5, 6, -100, -100], [1, 2, 3, 4]])  # (B, T): row 0 is padded after 2 tokens
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)  # (B, T, V)
    student, teacher = GPTOutput(logits=s, loss=torch.tensor(2.5)), GPTOutput(logits=t)
    batch = {"labels": labels}
    # a causal LM: position t is scored against label t + 1 -> rows (0, 0), (1, 0), (1, 1), (1, 2)
    expected_rows = torch.stack([s[0, 0], s[1, 0], s[1, 1], s[1, 2]])
    rows, has_target = target_logits(student, batch)
    torch.testing.assert_close(rows[has_target], expected_rows)
    T = 2.0
    p_t = torch.softmax(torch.stack([t[0, 0], t[1, 0], t[1, 1], t[1, 2]]) / T, -1)
    log_p_s = torch.log_softmax(expected_rows / T, -1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()  # KL(teacher || student), averaged over the 4 positions
    loss, got_kl = inheritance_loss(student, teacher, batch, alpha=0.25, temperature=T)
    torch.testing.assert_close(got_kl, kl)
    torch.testing.assert_close(loss, 0.75 * 2.5 + 0.25 * T**2 * kl)
    same, zero = inheritance_loss(student, GPTOutput(logits=s), batch, 1.0, T)
    assert zero.abs() < 1e-6 and same.abs() < 1e-5  # a teacher that agrees adds nothing
    # a masked LM's scores at its labelled positions are used as they are
    bert = BERTOutput(logits=None, masked_logits=expected_rows, loss=torch.tensor(1.0))
    torch.testing.assert_close(inheritance_loss(bert, BERTOutput(logits=None, masked_logits=p_t.log() * T), batch, 1.0, T)[1], kl)


def test_teacher_scores_a_share_of_the_rows_and_the_kl_averages_over_them():
    """train.teacher.rows: 0.5 of a batch of 4 -> the teacher sees rows 0-1 only; L = (1 - s a) L_self(all 4 rows) +
    s a T^2 KL averaged over the target positions of rows 0-1 (the student's own scores of those rows), s = their
    share of the batch's target positions (11 of 25). A causal teacher gets no labels (it would compute a loss)."""
    torch.manual_seed(0)
    student, teacher = (GPT(GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, d_model=d)) for d in (16, 8))
    seen = []
    teacher.register_forward_pre_hook(lambda _, args, kwargs: seen.append((kwargs["input_ids"].shape, "labels" in kwargs)),
                                      with_kwargs=True)
    ids = torch.randint(0, 11, (4, 8))
    labels = ids.clone()
    labels[1, 5:] = -100  # row 1 ends early: its positions 4-7 have no next token
    objective = Inheritance(student, teacher, TeacherConfig(run="r", alpha=0.4, temperature=2.0, rows=0.5))
    got = objective(input_ids=ids, labels=labels)
    assert seen == [((2, 8), False)]
    s, t = student(input_ids=ids, labels=labels), teacher(input_ids=ids[:2])
    has_target = labels[:2, 1:] != -100  # (2, 7): position p of row r predicts token p + 1
    p_t = F.softmax(t.logits[:2, :-1][has_target] / 2.0, -1)
    log_p_s = F.log_softmax(s.logits[:2, :-1][has_target] / 2.0, -1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    torch.testing.assert_close(got.metrics["inherit_kl"], kl)
    share = has_target.sum() / (labels[:, 1:] != -100).sum()
    assert share == 11 / 25  # rows 0-1 hold 7 + 4 of the batch's 7 + 4 + 7 + 7 target positions
    torch.testing.assert_close(got.loss, (1 - 0.4 * share) * s.loss + 0.4 * share * 4.0 * kl)
    # a masked LM: the teacher's labelled positions in its rows are the student's first ones
    rows = torch.randn(5, 11)
    bert = BERTOutput(logits=None, masked_logits=rows, loss=torch.tensor(1.0))
    p_t = F.softmax(rows[:2].flip(0) / 2.0, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(rows[:2] / 2.0, -1))).sum(-1).mean()
    teacher_out = BERTOutput(logits=None, masked_logits=rows[:2].flip(0))
    torch.testing.assert_close(inheritance_loss(bert, teacher_out, {}, 1.0, 2.0)[1], kl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1.0, 1.7])  # T = 1 takes the fused path from the scores' dtype
def test_softened_kl_gradient_is_autograds_through_kl_div(dtype, T):
    """SoftenedKL's closed-form backward (p_s - p_t) / T gives the gradient autograd gives through F.kl_div, in the
    scores' dtype; a row with weight 0 gets none, and the teacher's scores get none."""
    torch.manual_seed(0)
    s, t = (3 * torch.randn(6, 11)).to(dtype), (3 * torch.randn(6, 11)).to(dtype)  # (M, V)
    weight = torch.tensor([0.5, 0.0, 0.25, 0.25, 0.0, 0.0])
    s_ref = s.float().clone().requires_grad_(True)
    rows = F.kl_div(F.log_softmax(s_ref / T, -1), F.log_softmax(t.float() / T, -1), log_target=True, reduction="none")
    ((rows.sum(-1) * weight).sum() * 3.0).backward()
    s_got, t_got = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    (SoftenedKL.apply(s_got, t_got, weight, T) * 3.0).backward()
    assert s_got.grad.dtype == dtype and t_got.grad is None
    torch.testing.assert_close(s_got.grad, s_ref.grad.to(dtype))
    assert s_got.grad[weight == 0].abs().max() == 0 and s_got.grad[weight > 0].abs().max() > 0


def test_torch_compile_runs_the_chunked_kl_eagerly():
    """As the cross-entropy (tests/test_loss.py): under torch.compile the KL's loop over chunks is not traced."""
    def kl(s, t):
        return softened_kl(torch.tanh(s), t, torch.full((4,), 0.25), 1.0)

    explained = torch._dynamo.explain(kl)(torch.randn(4, 9), torch.randn(4, 9))
    traced = "".join(g.code for g in explained.graphs)
    assert "tanh" in traced and "log_softmax" not in traced
    assert any("softened_kl" in r.reason for r in explained.break_reasons)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "gpt_small"
    run(load_config("configs/gpt.yaml", TINY + ["model.d_model=16", "train.max_steps=3", f"output.dir={out}"]), quiet=True)
    return out


def test_student_trains_with_a_teacher_that_stays_frozen(teacher, tmp_path):
    before = read_weights(latest_checkpoint(teacher))
    out = tmp_path / "student"
    cfg = load_config("configs/gpt.yaml", TINY + [
        "model.d_model=32", "train.max_steps=4", "train.log_interval=1", f"output.dir={out}",
        f"data.tokenizer={teacher}/tokenizer.json", f"train.teacher={{run: {teacher}, alpha: 0.5, decay_steps: 2}}"])
    metrics = run(cfg, quiet=True)
    assert math.isfinite(metrics["val_loss"])
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [(e["step"], e["inherit_alpha"], e.get("inherit_kl")) for e in events if "inherit_alpha" in e]
    assert [(step, alpha) for step, alpha, _ in logged] == [(1, 0.5), (2, 0.25), (3, 0.0), (4, 0.0)]
    kls = [kl for _, _, kl in logged]
    assert kls[0] > 0 and kls[1] > 0 and kls[2:] == [None, None]  # once alpha is 0 the teacher does not run
    after = read_weights(latest_checkpoint(teacher))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_teacher_errors_name_the_key(teacher, tmp_path):
    with pytest.raises(ConfigError, match="train.teacher.alpha: must be in"):
        load_config("configs/gpt.yaml", [f"train.teacher={{run: {teacher}, alpha: 2}}"])
    with pytest.raises(ConfigError, match=r"train.teacher.rows: must be in \(0, 1\], got 0"):
        load_config("configs/gpt.yaml", [f"train.teacher={{run: {teacher}, rows: 0}}"])
    with pytest.raises(ConfigError, match="missing required key train.teacher.run"):
        load_config("configs/gpt.yaml", ["train.teacher={alpha: 0.5}"])
    with pytest.raises(ConfigError, match="train.teacher: knowledge inheritance .* model.arch is 'glm'"):
        load_config("configs/glm.yaml", [f"train.teacher={{run: {teacher}}}"])
    bpe = load_config("configs/gpt.yaml", TINY + ["data.tokenizer=bpe", "data.vocab_size=300", "train.max_steps=1",
                                                    f"output.dir={tmp_path / 'bpe'}", f"train.teacher={{run: {teacher}}}"])
    with pytest.raises(ConfigError, match="train.teacher.run: .*is not this run's tokenizer"):
        run(bpe, quiet=True)
    nothing = load_config("configs/gpt.yaml", TINY + ["train.max_steps=1", f"output.dir={tmp_path / 'x'}",
                                                        f"train.teacher={{run: {tmp_path / 'none'}}}"])
    with pytest.raises(ConfigError, match="train.teacher.run: .* holds no checkpoint"):
        run(nothing, quiet=True)


def test_a_run_with_a_teacher_checkpoints_the_student_alone_and_resumes_on_its_alpha_schedule(teacher, tmp_path):
    """The teacher is in no checkpoint: model.safetensors holds exactly the student's state_dict keys (a run with a
    teacher resumes, loads and fine-tunes as one without), and a resumed run picks alpha_t up at its step."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    overrides = TINY + ["model.d_model=32", "train.max_steps=4", "train.save_interval=2", "train.log_interval=1",
                        f"data.tokenizer={teacher}/tokenizer.json", f"train.teacher={{run: {teacher}, alpha: 0.6, decay_steps: 3}}"]
    run(load_config("configs/gpt.yaml", overrides + [f"output.dir={full}"]), quiet=True)
    _, student, _ = load_run(full, "cpu")  # builds a plain GPT and loads the checkpoint into it strictly
    assert read_weights(latest_checkpoint(full)).keys() == stored_once(student.state_dict(), student).keys()
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")  # stopped after the step-2 checkpoint
    run(load_config(resumed / "config.yaml", [f"output.dir={resumed}"]), resume=True, quiet=True)
    a, b = read_weights(latest_checkpoint(full)), read_weights(latest_checkpoint(resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [[(e["step"], e["inherit_alpha"], e.get("inherit_kl")) for e in events(out) if "inherit_alpha" in e]
              for out in (full, resumed)]
    assert logged[0] == logged[1] and [alpha for _, alpha, _ in logged[0]] == pytest.approx([0.6, 0.4, 0.2, 0.0])


@pytest.mark.parametrize("nproc", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_teacher_under_accumulation_and_torchrun_trains_like_one_batch(teacher, tmp_path, nproc):
    """2 micro-batches (gradient accumulation) or 2 processes (torchrun, gloo) of b rows log the losses of one batch
    of 2b (the KL is a mean over target positions, as many in each half), and accumulation its KLs too (torchrun
    logs rank 0's own KL, as it does MoE routing metrics); with train.teacher.rows 0.5 each micro-batch's teacher
    scores its own first row, and the run trains (the test above checks which rows)."""
    common = TINY + ["model.d_model=32", "train.max_steps=3", "train.log_interval=1", "train.device=cpu",
                     "train.dtype=fp32", f"data.tokenizer={teacher}/tokenizer.json"]
    split = ["train.batch_size=2", "train.grad_accum=2"] if nproc == 1 else ["train.batch_size=2"]

    def logged(rows: float, *overrides) -> list:
        out = tmp_path / f"rows{rows}_{len(overrides)}"
        args = [*common, *overrides, f"train.teacher={{run: {teacher}, alpha: 0.6, rows: {rows}}}"]
        if nproc > 1 and overrides:
            train("configs/gpt.yaml", out, *args, nproc=nproc)
        else:
            run(load_config("configs/gpt.yaml", args + [f"output.dir={out}"]), quiet=True)
        return [(e["loss"], e["inherit_kl"]) for e in events(out) if "loss" in e]

    one, halves = logged(1.0), logged(1.0, *split)
    compared = slice(None) if nproc == 1 else slice(1)  # (loss, KL), or the loss alone
    assert len(one) == 3 and all(x[compared] == pytest.approx(y[compared], rel=1e-5, abs=1e-6) for x, y in zip(halves, one))
    halves = logged(0.5, *split)
    assert len(halves) == 3 and all(math.isfinite(loss) and kl > 0 for loss, kl in halves)
