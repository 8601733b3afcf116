"""The Trainer: gradient accumulation, exact resume, clear stop on a non-finite loss, the run folder."""

import dataclasses
import json
import math
import shutil
import typing
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

from minimodels.config import ConfigError, TrainConfig, load_config
from minimodels.models import GPT, GPTConfig
from minimodels.protocols import TextTask, TrainedModel
from minimodels.train import Trainer, TrainingError
from minimodels.train.checkpoint import checkpoint_dirs
from minimodels.train.run import run, training_in


class RandomLMTask:
    """n random token windows; the smallest thing the Trainer can train on."""

    def __init__(self, n=32, seq_len=16, vocab=50, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.train = list(torch.randint(0, vocab, (n, seq_len), generator=g))
        self.val = self.train[:8]

    def collate(self, examples, generator):
        x = torch.stack(examples)
        return {"input_ids": x, "labels": x.clone()}

    def evaluate(self, model, batches):
        losses = [model(**b).loss for b in batches]
        return {"val_loss": float(sum(losses) / len(losses))}


def tiny_gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, d_model=32, **kw))


def train_cfg(**kw):
    base = dict(max_steps=2, batch_size=8, lr=1e-2, warmup_steps=0, device="cpu", dtype="fp32", seed=3,
                eval_interval=1000, save_interval=1000, log_interval=1)
    base.update(kw)
    return TrainConfig(**base)


def test_grad_accumulation_matches_big_batch(tmp_path):
    """k micro-batches of size b give the same update as one batch of k*b (same examples, fp32).

    The update is checked with plain SGD (update = -grad): Adam divides by sqrt(v), which turns float
    rounding in near-zero gradients into differences of order lr, whatever the accumulation does."""
    task = RandomLMTask()
    big = Trainer(tiny_gpt(), task, train_cfg(batch_size=8, grad_accum=1), tmp_path / "a", quiet=True)
    small = Trainer(tiny_gpt(), task, train_cfg(batch_size=2, grad_accum=4), tmp_path / "b", quiet=True)
    for t in (big, small):
        t.optimizer = torch.optim.SGD(t.model.parameters(), lr=1.0)
        t.scheduler = torch.optim.lr_scheduler.LambdaLR(t.optimizer, lambda step: 1.0)
    # the first 8 examples of the epoch's permutation are the same for both
    assert torch.equal(big.train_batch(0)["input_ids"], torch.cat([small.train_batch(i)["input_ids"] for i in range(4)]))
    before = [p.detach().clone() for p in big.model.parameters()]
    lb, ls = big.train_step()["loss"], small.train_step()["loss"]
    assert abs(lb - ls) < 1e-6
    for (name, p), q, p0 in zip(big.model.named_parameters(), small.model.parameters(), before):
        assert (p - p0).abs().max() > 0, name  # the step did something
        assert torch.allclose(p, q, atol=1e-6, rtol=0), name


# Slow on CPU: Inductor compiles C++ kernels with gcc. At 1 thread on a shared 2-core machine the CPU case took
# 138 s with an empty compile cache (TORCHINDUCTOR_CACHE_DIR) and 23 s with a warm one.
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), pytest.param("cuda", marks=pytest.mark.cuda)])
def test_compiled_training_steps_equal_the_eager_ones(tmp_path, device):
    """train.compile=true: the training steps run a torch.compile'd model (Inductor, fp32) and give the eager
    steps' losses and updates, up to float round-off. Plain SGD, as above: Adam would blow round-off up to ~lr."""
    torch._dynamo.reset()  # compile afresh, and count only this test's graphs below
    torch._dynamo.utils.counters.clear()
    task, runs = RandomLMTask(), []
    for i, compile in enumerate((False, True, True)):  # the second compiled run loads the first's cached graphs
        torch._dynamo.reset()
        t = Trainer(tiny_gpt(), task, train_cfg(compile=compile, device=device), tmp_path / str(i), quiet=True)
        t.optimizer = torch.optim.SGD(t.model.parameters(), lr=1.0)
        t.scheduler = torch.optim.lr_scheduler.LambdaLR(t.optimizer, lambda step: 1.0)
        runs.append((t, [t.train_step()["loss"] for _ in range(2)]))
    (eager, eager_losses), *compiled_runs = runs
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # the compiled trainer's steps were compiled
    for compiled, compiled_losses in compiled_runs:
        assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
        for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=1e-5, msg=name)


class Reads(torch.Tensor):
    """A tensor that counts how often it, or anything computed from it, is read on the host."""

    count = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__bool__):
            cls.count += 1
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("grad_accum", [1, 4])
def test_the_losses_of_a_step_are_read_on_the_host_once_whatever_the_accumulation(tmp_path, grad_accum):
    """No host synchronisation per micro-batch: the losses stay on the device until the last backward of the step."""
    @dataclass
    class Out:
        loss: torch.Tensor
        metrics: dict | None = None

    class Counted(torch.nn.Module, TrainedModel):
        def __init__(self):
            super().__init__()
            self.gpt = tiny_gpt()

        def forward(self, **batch):
            return Out(self.gpt(**batch).loss.as_subclass(Reads))

    t = Trainer(Counted(), RandomLMTask(), train_cfg(batch_size=8 // grad_accum, grad_accum=grad_accum), tmp_path, quiet=True)
    Reads.count = 0
    loss = t.train_step()["loss"]
    assert Reads.count == 1 and math.isfinite(loss)


def test_each_process_gets_its_rows_of_the_one_process_batch_random_collator_included(tmp_path):
    """Rank r of 2 with batch 4 gets rows 4r .. 4r + 3 of what one process with batch 8 collates, with the same
    random draws, and so does each micro-batch under gradient accumulation (train_batch needs no process group:
    only the world's rank and size)."""
    from minimodels.train.distributed import World

    class RandomMaskTask(RandomLMTask):
        def collate(self, examples, generator):
            x = torch.stack(examples)
            return {"input_ids": x, "labels": x.masked_fill(torch.rand(x.shape, generator=generator) < 0.5, -100)}

    one = Trainer(tiny_gpt(), RandomMaskTask(), train_cfg(batch_size=8), tmp_path / "one", quiet=True)
    two = Trainer(tiny_gpt(), RandomMaskTask(), train_cfg(batch_size=4), tmp_path / "two", quiet=True)
    for index in (0, 5):  # the second epoch: another permutation
        whole = one.train_batch(index)
        for rank in (0, 1):
            two.world = World(rank=rank, size=2)
            part = two.train_batch(index)
            assert part.keys() == whole.keys()
            assert all(torch.equal(part[k], whole[k][4 * rank:4 * rank + 4]) for k in whole)
    # with train.grad_accum=2 micro-batch j of rank r holds rows (2 j + r) 2 .. + 2 of the step's batch of 8
    four = Trainer(tiny_gpt(), RandomMaskTask(), train_cfg(batch_size=2, grad_accum=2), tmp_path / "four", quiet=True)
    for step in (0, 5):
        whole = one.train_batch(step)
        for rank in (0, 1):
            four.world = World(rank=rank, size=2)
            for j in (0, 1):
                part, rows = four.train_batch(2 * step + j), slice((2 * j + rank) * 2, (2 * j + rank) * 2 + 2)
                assert all(torch.equal(part[k], whole[k][rows]) for k in whole)


def test_accumulation_weights_by_targets(tmp_path):
    """Micro-batches with different numbers of targets are weighted by their targets, not equally."""
    from minimodels.train.trainer import count_targets

    assert count_targets({"input_ids": torch.zeros(2, 4), "labels": torch.tensor([[1, 2, -100, -100], [1, 2, 3, 4]])}) == 6
    assert count_targets({"pixels": torch.zeros(5, 3)}) == 5


def test_non_finite_loss_stops_with_step_and_checkpoint(tmp_path):
    @dataclass
    class Out:
        loss: torch.Tensor
        metrics: dict | None = None

    class Exploding(torch.nn.Module, TrainedModel):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))
            self.calls = 0

        def forward(self, input_ids, labels):
            self.calls += 1
            return Out(self.w.sum() * (float("nan") if self.calls >= 3 else 1.0))

    t = Trainer(Exploding(), RandomLMTask(), train_cfg(max_steps=5, save_interval=1), tmp_path, quiet=True)
    # the weights of step 2 gave the nan: their checkpoint is set aside, step 1 is the last good one
    with pytest.raises(TrainingError, match=r"loss is nan at step 3 \(.* step_00000002.nonfinite\); "
                                            r"last good checkpoint: .*step_00000001 "):
        t.fit()
    assert [c.name for c in checkpoint_dirs(tmp_path)] == ["step_00000001"]
    assert (tmp_path / "checkpoints" / "step_00000002.nonfinite" / "model.safetensors").is_file()


@pytest.mark.parametrize("poison", ["weight", "optimizer"])
def test_non_finite_weights_or_optimizer_state_are_never_saved(tmp_path, poison):
    t = Trainer(tiny_gpt(), RandomLMTask(), train_cfg(max_steps=1), tmp_path, quiet=True)
    t.fit()  # saves step 1
    with torch.no_grad():
        if poison == "weight":
            next(t.model.parameters())[0] = float("inf")
        else:
            next(iter(t.optimizer.state.values()))["exp_avg_sq"].fill_(float("nan"))
    t.step += 1
    with pytest.raises(TrainingError, match=r"non-finite weights or optimizer state after step 2, not saved; "
                                            r"last good checkpoint: .*step_00000001 "):
        t.save()
    assert [c.name for c in checkpoint_dirs(tmp_path)] == ["step_00000001"]


def test_a_non_finite_gradient_stops_before_the_update(tmp_path):
    """A finite loss whose gradient is not: the weights stay as they were (clipping on or off)."""
    for clip in (1.0, 0.0):
        t = Trainer(tiny_gpt(), RandomLMTask(), train_cfg(grad_clip=clip), tmp_path / str(clip), quiet=True)
        t.model.tok_emb.weight.register_hook(lambda g: g * float("inf"))
        before = [p.detach().clone() for p in t.model.parameters()]
        with pytest.raises(TrainingError, match="gradient norm is (nan|inf) at step 1; last good checkpoint: none"):
            t.train_step()
        assert all(torch.equal(p, q) for p, q in zip(t.model.parameters(), before))


def test_fp16_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="train.dtype: fp16 is only supported on CUDA"):
        Trainer(tiny_gpt(), RandomLMTask(), train_cfg(dtype="fp16"), "unused", quiet=True)


CONFIG = """
model: {arch: gpt, block_size: 32, n_layer: 2, n_head: 2, d_model: 32, dropout: 0.1}
data: {source: %s, tokenizer: char}
train: {max_steps: 8, batch_size: 4, lr: 1.0e-2, warmup_steps: 2, device: cpu, dtype: fp32,
        eval_interval: 4, save_interval: 4, keep_last: 5, log_interval: 1}
output: {dir: %s, sample_tokens: 20, sample_prompt: "The "}
"""


@pytest.fixture
def text_source(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(6):
        (folder / f"doc{i}.txt").write_text(f"The quick brown fox {i} jumps over the lazy dog. " * 30)
    return folder


def test_resume_is_bit_exact(tmp_path, text_source):
    """N steps straight == N/2 steps, stop, resume to N: same losses, same final weights (CPU fp32, dropout on)."""
    a = tmp_path / "a"
    (tmp_path / "exp.yaml").write_text(CONFIG % (text_source, a))
    run(load_config(tmp_path / "exp.yaml"), quiet=True)
    files = {p.name for p in a.iterdir()}
    assert {"config.yaml", "tokenizer.json", "metrics.jsonl", "loss.png", "sample.txt", "checkpoints"} <= files
    # an interrupted copy: it died after the step-4 checkpoint, having logged a few more steps
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(checkpoint_dirs(b)[-1])
    assert checkpoint_dirs(b)[-1].name == "step_00000004"
    cfg_b = load_config(b / "config.yaml", [f"output.dir={b}"])
    run(cfg_b, resume=True, quiet=True)
    events_a = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    events_b = [json.loads(x) for x in (b / "metrics.jsonl").read_text().splitlines()]
    clock = {"tokens_per_s", "time_s", "wall_time_s", "train_time_s"}
    strip = lambda evs: [{k: v for k, v in e.items() if k not in clock} for e in evs]
    assert [e["step"] for e in events_b if "loss" in e] == list(range(1, 9))
    assert strip(events_a) == strip(events_b)
    wa = load_file(checkpoint_dirs(a)[-1] / "model.safetensors")
    wb = load_file(checkpoint_dirs(b)[-1] / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_time_s_counts_the_training_steps_not_the_evaluations(tmp_path, text_source, monkeypatch):
    """Each evaluation here sleeps 1 s; the steps of this tiny model take milliseconds. time_s leaves the sleeps out
    (runs evaluated at different intervals compare), the run's train_time_s keeps them."""
    import time

    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate", lambda self: (time.sleep(1.0), evaluate(self))[1])
    out = tmp_path / "run"
    (tmp_path / "exp.yaml").write_text(CONFIG % (text_source, out))
    run(load_config(tmp_path / "exp.yaml", ["train.eval_interval=2", "output.sample_tokens=0"]), quiet=True)
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    times = [e["time_s"] for e in events if "val_loss" in e]
    assert len(times) == 4 and times[-1] < 1.0, times  # 4 evaluations, 4 s asleep, none of it counted
    assert events[-1]["train_time_s"] >= 4.0


def test_resume_extends_a_finished_run_and_refuses_to_clobber(tmp_path, text_source):
    from minimodels.config import ConfigError

    out = tmp_path / "run"
    (tmp_path / "exp.yaml").write_text(CONFIG % (text_source, out))
    run(load_config(tmp_path / "exp.yaml"), quiet=True)
    with pytest.raises(ConfigError, match="already holds a run .* --resume"):
        run(load_config(tmp_path / "exp.yaml"), quiet=True)
    run(load_config(out / "config.yaml", ["train.max_steps=12"]), resume=True, quiet=True)
    assert checkpoint_dirs(out)[-1].name == "step_00000012"
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(e["step"] for e in events) == 12
    # each run() ends with its wall time and training time; evaluations carry the training time until then
    ends = [e for e in events if "wall_time_s" in e]
    assert [e["step"] for e in ends] == [8, 12] and events[-1] is ends[-1]
    evals = [e["time_s"] for e in events if "val_loss" in e]
    assert len(evals) == 3 and evals[0] <= evals[1]  # steps 4 and 8; then 12, counted from the resume
    assert all(e["wall_time_s"] >= e["train_time_s"] >= t >= 0 for e, t in zip(ends, evals[1:]))
    # while a run trains in the folder (here: the lock it holds), even --overwrite stops and deletes nothing
    with training_in(out, main=True):
        with pytest.raises(ConfigError, match="is in use, another process is training in it"):
            run(load_config(out / "config.yaml"), overwrite=True, quiet=True)
    assert checkpoint_dirs(out)[-1].name == "step_00000012"
    run(load_config(out / "config.yaml", ["train.max_steps=4"]), overwrite=True, quiet=True)  # unlocked again
    assert checkpoint_dirs(out)[-1].name == "step_00000004"



@pytest.mark.parametrize("scale", [3.0, 1e-6])  # RMS 3, and an RMS below the 1e-3 floor
def test_relative_adamw_step_is_the_adamw_step_times_the_rms(scale):
    """train.optimizer=relative_adamw: each tensor's AdamW step (weight decay included) times max(RMS(W), 1e-3)."""
    from minimodels.train.optim import build_optimizer

    torch.manual_seed(0)
    w = torch.randn(6, 5) * scale
    models = [torch.nn.Linear(5, 6, bias=False) for _ in range(2)]
    opts = []
    for m, name in zip(models, ("relative_adamw", "adamw")):
        m.weight.data.copy_(w)
        opts.append(build_optimizer(m, TrainConfig(optimizer=name, lr=0.1, weight_decay=0.5)))
    g = torch.randn(6, 5)
    for m, opt in zip(models, opts):
        m.weight.grad = g.clone()
        opt.step()
    rms = max(w.pow(2).mean().sqrt().item(), 1e-3)
    torch.testing.assert_close(models[0].weight - w, (models[1].weight - w) * rms, rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match="train.optimizer"):
        load_config("configs/gpt.yaml", ["train.optimizer=adam"])


def test_lr_factor_at_the_warmup_edges_and_the_end():
    """Step s (from 0) of the warmup runs at (s + 1) / warmup_steps, the first step after it at 1, and the cosine
    ends at min_lr_ratio at max_steps (and stays there)."""
    from minimodels.train.optim import lr_factor

    cfg = train_cfg(warmup_steps=10, max_steps=50, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == 1 / cfg.warmup_steps
    assert lr_factor(cfg.warmup_steps - 1, cfg) == 1.0
    assert lr_factor(cfg.warmup_steps, cfg) == 1.0
    assert lr_factor(cfg.max_steps, cfg) == pytest.approx(cfg.min_lr_ratio)
    assert lr_factor(cfg.max_steps + 5, cfg) == pytest.approx(cfg.min_lr_ratio)
    halfway = (cfg.warmup_steps + cfg.max_steps) // 2
    assert lr_factor(halfway, cfg) == pytest.approx((1 + cfg.min_lr_ratio) / 2)


def test_no_two_seeds_share_an_epoch_order():
    """The order of an epoch is a function of the pair (seed, epoch): seed 1337 at epoch 1000 is not seed 1338 at
    epoch 0 (as seed * 1000 + epoch made it), and no two pairs of a grid draw the same permutation."""
    from minimodels.train.trainer import data_order

    n = 50
    assert not torch.equal(data_order(1337, 1000, n), data_order(1338, 0, n))
    orders = {tuple(data_order(seed, epoch, n).tolist()) for seed in range(1330, 1340) for epoch in range(1001)}
    assert len(orders) == 10 * 1001
    assert torch.equal(data_order(7, 3, n), data_order(7, 3, n))
    assert sorted(data_order(7, 3, n).tolist()) == list(range(n))


def test_batch_larger_than_the_data_names_train_batch_size(tmp_path):
    task = RandomLMTask(n=4)
    with pytest.raises(ConfigError, match=r"^train.batch_size: 8 x 1 processes is larger than the 4 training examples$"):
        Trainer(tiny_gpt(), task, train_cfg(batch_size=8), tmp_path, quiet=True)


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("name", ["cuda", "cuda:1", "mps"])
def test_a_device_this_machine_lacks_names_the_key(name):
    from minimodels.train.device import resolve_device

    with pytest.raises(ConfigError, match=rf"^--device: {name}: this machine has no"):
        resolve_device(name, key="--device")
    assert resolve_device("auto") == torch.device("cpu")


def test_a_vocab_smaller_than_the_tokenizer_names_model_vocab_size(tmp_path, text_source):
    from minimodels.train.run import prepare

    (tmp_path / "exp.yaml").write_text(CONFIG % (text_source, tmp_path / "run"))
    cfg = load_config(tmp_path / "exp.yaml")
    vocab = prepare(cfg, tmp_path).tokenizer.vocab_size  # null: filled from the tokenizer
    assert cfg.model.vocab_size == vocab
    cfg = load_config(tmp_path / "exp.yaml", [f"model.vocab_size={vocab - 1}"])
    with pytest.raises(ConfigError, match=rf"^model.vocab_size: {vocab - 1} is less than the data's {vocab} tokens"):
        prepare(cfg, tmp_path)
    cfg = load_config(tmp_path / "exp.yaml", [f"model.vocab_size={vocab}"])
    assert prepare(cfg, tmp_path).tokenizer.vocab_size == cfg.model.vocab_size


def test_every_model_and_task_has_the_optional_methods_the_run_calls():
    """The trainer and the run call model.begin_step(), model.after_optimizer_step(), model.pretrained_parts(),
    task.unigram_baseline() and task.sample() directly: every model in the table subclasses TrainedModel, every
    task TextTask, and their outputs carry metrics."""
    from minimodels.data import TASKS
    from minimodels.models import MODELS

    assert all(TrainedModel in cls.__mro__ for _, cls in MODELS.values())
    assert all(TextTask in cls.__mro__ for cls in TASKS.values())
    outputs = [typing.get_type_hints(cls.forward)["return"] for _, cls in MODELS.values()]
    assert all("metrics" in {f.name for f in dataclasses.fields(out)} for out in outputs)
