"""Every shipped config (configs/*.yaml), tiny and in fp32 on the CPU, under the combinations the trainer
promises to keep exact:

1. killed after step 3 of 4 (before the step-4 checkpoint) and resumed: the uninterrupted run's metrics.jsonl
   and final weights, bit for bit;
2. train.grad_accum=2 with batch b: the losses of one batch of 2b (within 1e-6) where the loss is a mean over
   independent examples; contrastive and MoE losses depend on the micro-batch as a whole, and their rows
   assert what the trainer does with them instead;
3. 2 processes (torchrun, gloo) with batch b: the losses of 1 process with batch 2b (within 1e-4), under DDP
   and under FSDP2, or a one-line refusal;
4. train.compile=true: the eager run's training losses (within 1e-4; slow, Inductor compiles C++).

Fine-tuning and P-tuning configs start from a tiny pretraining run made first. The default run covers rows 1
and 2 for gpt, bert, t5, brivl, switch_gpt and vqvae; the rest is slow: python -m pytest -m slow tests/test_combinations.py
"""

import shutil
from pathlib import Path

import pytest
import torch
from conftest import events, losses, train, train_script, weights
from tiny import N_SCENES, TINY, B, Runs, write_docs

from minimodels.config import load_config
from minimodels.data import shapes
from minimodels.models import build_model
from minimodels.train import Trainer
from minimodels.train.checkpoint import checkpoint_dirs
from minimodels.train.run import prepare, run

CONFIGS = sorted(p.stem for p in Path("configs").glob("*.yaml"))
DEFAULT = ("gpt", "bert", "t5", "brivl", "switch_gpt", "vqvae")  # in the default run; the others are slow
HALF = (f"train.batch_size={B}", "train.eval_batches=2")  # evaluation batches are batch_size long: the same 2B

# Evaluation collates the val split in batches of train.batch_size, each with its own generator: random collators
# (MLM masks, T5 spans, GLM blanks) mask the val split otherwise with batch b than with 2b, so these rows compare
# the training losses only (training draws per optimizer step, whatever the micro-batches: test_train.py).
RANDOM_VAL = {"bert", "kb_bert", "switch_bert", "t5", "glm", "glm_records", "bert_records", "t5_records"}
# dropout masks come from each forward's own draws
DROPOUT = {name: ("model.dropout=0.0",) for name in ("bert_finetune", "glm_finetune", "fewshot_pet", "fewshot_finetune")}
CONTRASTIVE = {"clip", "brivl"}  # the negatives are the micro-batch's (and the queue's) other items
SWITCH = {"switch_gpt", "switch_bert"}  # capacity, the load-balancing loss and the router's jitter per micro-batch
BATCH_FREE_ROUTING = ("model.moe.capacity_factor=null", "model.moe.aux_loss_coef=0", "model.moe.jitter=0")


def rows(names, marks=lambda name: ()):
    """pytest params for `names`, slow unless in DEFAULT, plus marks(name)."""
    return [pytest.param(n, marks=[*marks(n), *([] if n in DEFAULT else [pytest.mark.slow])], id=n) for n in names]


class Killed(Exception):
    """What a test raises in place of a training step, as if the process had been killed before it."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs on a small file of stdlib docstrings (tasks that read any text) and N_SCENES train scenes (shapes)."""
    docs = write_docs(tmp_path_factory.mktemp("docs") / "docstrings.jsonl")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(shapes, "N_TRAIN", N_SCENES)
        yield Runs(tmp_path_factory.mktemp("runs"), docs)


def logged(out):
    """metrics.jsonl without the timings (tokens_per_s and other keys ending in _s), which no two runs share."""
    return [{k: v for k, v in e.items() if not k.endswith("_s")} for e in events(out)]


def assert_same_scores(out, reference, tol, evaluations: bool = True, unlike: tuple = ()):
    """The same steps logged, the same training losses and (evaluations=True) evaluations but the keys `unlike`
    within `tol` (relative too: val_ppl is exp(val_loss)). MoE routing metrics are each micro-batch's (or
    process's) own and not compared."""
    scores = [[{"step": e["step"], "loss": e["loss"]} if "loss" in e else {k: v for k, v in e.items() if k not in unlike}
               for e in logged(o) if "loss" in e or evaluations] for o in (out, reference)]
    assert [e.keys() for e in scores[0]] == [e.keys() for e in scores[1]]
    for x, y in zip(*scores):
        assert x == pytest.approx(y, rel=tol, abs=tol)


def test_every_shipped_config_has_a_row():
    assert sorted(TINY) == CONFIGS


WORDPIECE = ("tokenizers' WordPiece trainer numbers the ## pieces in the iteration order of a Rust HashMap, which "
             "differs from one training to the next, and breaks ties between equally frequent merges by those ids "
             "(on the kb corpus 6 of the 2,048 tokens differ too): two runs of a wordpiece config start from "
             "different token ids")


@pytest.mark.parametrize("name", ["gpt", pytest.param("bert", marks=pytest.mark.xfail(strict=True, reason=WORDPIECE))])
def test_a_config_run_twice_trains_the_same(name, runs, tmp_path):
    """README: a run's config.yaml reproduces the run. Two runs that each train their tokenizer (data.tokenizer
    as shipped: bpe for gpt, wordpiece for bert) log the same losses and evaluations."""
    kind = load_config(f"configs/{name}.yaml").data.tokenizer
    for out in ("a", "b"):
        run(runs.config(name, tmp_path / out, f"data.tokenizer={kind}"), quiet=True)
    assert logged(tmp_path / "a") == logged(tmp_path / "b")


# ------------------------------------------------------------------------------------------ 1. kill and resume
@pytest.mark.parametrize("name", rows(CONFIGS))
def test_a_killed_run_resumes_to_the_uninterrupted_run(name, runs, tmp_path, monkeypatch):
    """Killed after step 3 (logged, not saved), resumed from the step-2 checkpoint: the same metrics.jsonl
    (losses, routing metrics, evaluations) and bit-identical final weights."""
    full = runs.trained(name)
    out = tmp_path / name
    train_step = Trainer.train_step

    def killed_after_step_3(trainer):
        if trainer.step == 3:
            raise Killed
        return train_step(trainer)

    monkeypatch.setattr(Trainer, "train_step", killed_after_step_3)
    with pytest.raises(Killed):
        run(runs.config(name, out), quiet=True)
    monkeypatch.undo()
    assert [c.name for c in checkpoint_dirs(out)] == ["step_00000002"]
    assert max(e["step"] for e in events(out)) == 3
    run(load_config(out / "config.yaml"), resume=True, quiet=True)  # what --resume does
    assert logged(out) == logged(full)
    a, b = weights(out), weights(full)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ------------------------------------------------------------------------------------ 2. gradient accumulation
MOE_ROUND_OFF = 1e-5  # how far round-off moves an MoE config's losses in 4 steps (the next test)


@pytest.mark.parametrize("name", rows(sorted(set(CONFIGS) - CONTRASTIVE)))
def test_grad_accum_2_with_batch_b_equals_one_batch_of_2b(name, runs):
    """The same training losses and evaluations for 4 steps (without dropout). MoE configs with routing that does
    not depend on the micro-batch: dropless, no load-balancing loss, no jitter (the z-loss is a mean over tokens)."""
    exact = [*(BATCH_FREE_ROUTING if name in SWITCH else ()), *DROPOUT.get(name, ())]
    # MoE: a different summation order moves a router logit by round-off, and AdamW turns that into ~1e-5 by step 3
    assert_same_scores(runs.trained(name, *HALF, "train.grad_accum=2", *exact), runs.trained(name, *exact),
                       MOE_ROUND_OFF if name in SWITCH else 1e-6, evaluations=name not in RANDOM_VAL)


@pytest.mark.parametrize("name", rows(sorted(SWITCH)))
def test_grad_accum_with_capacity_and_balancing_loss_trains_on_each_micro_batch(name, runs):
    """As shipped, an expert's capacity, the load-balancing loss and the jitter are per micro-batch: accumulating
    2 x b trains (every step logged, finite, with its routing metrics) and differs from one batch of 2b."""
    one = losses(runs.trained(name))
    accumulated = runs.trained(name, *HALF, "train.grad_accum=2")
    steps = [e for e in events(accumulated) if "loss" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(e["loss"])) and "moe_block0_load" in e for e in steps)
    # more than round-off moves them (by 5.9e-5 for switch_bert at one thread, 1e-4 or more at two)
    assert max(abs(x - y) for x, y in zip(losses(accumulated), one)) > 2 * MOE_ROUND_OFF


@pytest.mark.parametrize("name", rows(sorted(CONTRASTIVE)))
def test_grad_accum_of_contrastive_towers_is_the_mean_of_micro_batch_losses(name, runs, tmp_path):
    """The negatives are each micro-batch's own (and, for BriVL, the queue's, which micro-batch 1 finds holding
    micro-batch 0's keys): step 1 logs the mean of the initial model's losses on micro-batches 0 and 1 in turn,
    not the loss of one batch of 2b."""
    accumulated = runs.trained(name, *HALF, "train.grad_accum=2")
    cfg = load_config(accumulated / "config.yaml")
    task = prepare(cfg, accumulated)
    torch.manual_seed(cfg.train.seed)  # the initial weights, as run() draws them
    model = build_model(cfg.model).train()
    trainer = Trainer(model, task, cfg.train, tmp_path, quiet=True)
    micro = [model(**trainer.train_batch(i)).loss.item() for i in range(2)]
    accumulated_losses = losses(accumulated)
    assert accumulated_losses[0] == pytest.approx(sum(micro) / 2, rel=0, abs=1e-6)
    assert abs(accumulated_losses[0] - losses(runs.trained(name))[0]) > 1e-3
    assert all(torch.isfinite(torch.tensor(accumulated_losses)))


# ------------------------------------------------------------------------------------------ 3. two processes
def torchrun_rows():
    return [pytest.param(name, fsdp, id=f"{name}-{'fsdp' if fsdp else 'ddp'}", marks=pytest.mark.slow)
            for name in CONFIGS for fsdp in (False, True)]


@pytest.mark.parametrize("name,fsdp", torchrun_rows())
def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(name, fsdp, runs, tmp_path):
    """torchrun --standalone --nproc_per_node 2 (gloo, one thread each) with batch b: one process's losses and
    evaluations with batch 2b within 1e-4, under DDP and under FSDP2 (MoE: with routing that does not depend on
    the batch, see test_grad_accum_2_with_batch_b_equals_one_batch_of_2b; capacity counts each process's tokens)."""
    overrides = runs.overrides(name, *(BATCH_FREE_ROUTING if name in SWITCH else ()), *DROPOUT.get(name, ()),
                               f"train.distributed.fsdp={str(fsdp).lower()}")
    train(f"configs/{name}.yaml", tmp_path / "two", *overrides, *HALF, nproc=2)
    train(f"configs/{name}.yaml", tmp_path / "one", *overrides)  # the shapes configs' 20,000 scenes, as "two"
    # contrastive val_loss scores each val batch (of train.batch_size) against its own negatives; recall does not
    assert_same_scores(tmp_path / "two", tmp_path / "one", 1e-4, evaluations=name not in RANDOM_VAL,
                       unlike=("val_loss",) if name in CONTRASTIVE else ())


def refused(*args):
    """The stderr of scripts/train.py *args on 2 processes, which must stop with one line (exit code 2)."""
    r = train_script(*args, nproc=2)
    assert r.returncode != 0 and "exitcode  : 2" in r.stderr, r.stderr[-3000:]
    return r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SWITCH))
def test_fsdp_with_expert_parallelism_is_refused_in_one_line(name, runs, tmp_path):
    stderr = refused(f"configs/{name}.yaml", *runs.overrides(name, "train.distributed.fsdp=true",
                                                            "model.moe.expert_parallel=true"), f"output.dir={tmp_path}")
    assert "error: train.distributed.fsdp: not combined with model.moe.expert_parallel yet\n" in stderr


@pytest.mark.slow
def test_a_one_process_checkpoint_does_not_resume_under_fsdp(runs, tmp_path):
    """README: FSDP checkpoints resume anywhere, a DDP or one-process checkpoint does not resume under FSDP."""
    out = tmp_path / "gpt"
    shutil.copytree(runs.trained("gpt", *HALF), out)  # a copy: resuming rewrites config.yaml before it stops
    stderr = refused("--resume", str(out), "train.distributed.fsdp=true")
    assert f"error: {checkpoint_dirs(out)[-1]}: resuming under FSDP needs a checkpoint written under FSDP\n" in stderr


@pytest.mark.slow  # Inductor compiles C++ for every config: minutes with an empty compile cache
@pytest.mark.parametrize("name", CONFIGS)
def test_compiled_training_gives_the_eager_losses(name, runs, tmp_path):
    """train.compile=true: the compiled steps' training losses are the eager steps', up to float round-off (Inductor
    fuses and reorders). Random draws inside the model differ when compiled, so dropout and jitter are off."""
    no_random = [*DROPOUT.get(name, ()), *(("model.moe.jitter=0",) if name in SWITCH else ())]
    reference = tmp_path / "eager"
    runs.train(name, reference, runs.overrides(name, *no_random))
    runs.train(name, tmp_path / "compiled", runs.overrides(name, *no_random, "train.compile=true"))
    assert_same_scores(tmp_path / "compiled", reference, 1e-4, evaluations=False)
