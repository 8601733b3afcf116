"""The one training loop. It knows nothing about which model it trains:

    model.begin_step(step)
    batch = task.collate([task.train[i] for i in indices], generator)   # a dict of tensors
    out = model(**batch)                                                 # any output with .loss
    out.loss.backward(); optimizer.step(); model.after_optimizer_step()

where begin_step and after_optimizer_step are the model's optional methods (minimodels/protocols.py; no-ops
unless a model overrides them, as BriVL does for its momentum towers), and evaluation metrics come from
`task.evaluate(model, batches) -> dict[str, float]`. An output also carries `metrics`, None or a dict of
detached scalar or 1-D tensors about that forward pass (an MoE model's routing statistics); the trainer
averages them over the steps between two log lines and writes them there. The training steps may call
another module than the model, holding it (`objective`, e.g. minimodels/models/inherit.py); evaluation and
checkpoints use the model.

Determinism: the order of training examples is a function of (seed, epoch) and the collator's random
generator a function of (seed, optimizer step), so the data position is a single integer and a
resumed run sees exactly the batches an uninterrupted run would have seen.

Under torchrun (minimodels/train/distributed.py) the model is wrapped in DDP (or sharded by FSDP2 with
train.distributed.fsdp) and each process takes its rows of an optimizer step's batch of
grad_accum * world_size * b examples (train_batch), so N processes with batch b see exactly the examples (and
the collator's random choices) one process with batch N*b would; rank 0 alone logs and writes checkpoints. A loss that compares
the examples of a batch with each other (contrastive negatives) gathers the other processes' examples
itself (BriVL, minimodels/nn/gather.py). How the model is spread over the processes (DDP, FSDP2, a model's
own shards) is Parallel's business (minimodels/train/distributed.py), called the same way for every model.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minimodels.config import ConfigError, TrainConfig
from minimodels.protocols import TextTask
from minimodels.train.checkpoint import (checkpoint_dirs, checkpoint_step, load_trainer_state, rng_state, save_checkpoint,
                                         set_aside, set_rng_state)
from minimodels.train.device import autocast, compile_model, resolve_device, resolve_dtype, to_device
from minimodels.train.distributed import Parallel, World
from minimodels.train.memory import reuse_freed_memory
from minimodels.train.metrics import Mean, MetricsLog
from minimodels.train.optim import build_optimizer, build_scheduler, lr_factor


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and what to do."""


def data_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """(n,) the order of the training examples in `epoch`: a permutation drawn by numpy's PCG64 seeded with the
    pair (seed, epoch) itself (SeedSequence hashes both into its 128-bit state). Folding the pair into one
    integer seed would let pairs collide: seed * K + epoch repeats after K epochs, and torch's generator keeps
    only 32 bits of a seed."""
    return torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))


def collate_generator(seed: int, step: int) -> torch.Generator:
    """The generator a random collator draws with for optimizer step `step`: seeded from the pair (seed, step)
    through numpy's SeedSequence (as data_order), so no two pairs share a seed by construction."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, step]).generate_state(1)[0]))


class Trainer:
    """Trains `model` on `task`; the training steps call `objective` (default: the model), a module whose
    forward(**batch) returns an output with loss and metrics and whose parameters are the model's."""

    def __init__(self, model: torch.nn.Module, task: TextTask, cfg: TrainConfig, run_dir: str | Path, quiet: bool = False,
                 world: World | None = None, objective: torch.nn.Module | None = None):
        reuse_freed_memory()  # keep freed blocks mapped: no page faults for the next step's tensors (memory.py)
        self.world = world or World()
        self.task, self.cfg, self.run_dir = task, cfg, Path(run_dir)
        self.quiet = quiet or not self.world.main  # only rank 0 prints
        self.device = resolve_device(cfg.device, self.world)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.model = model.to(self.device)  # the plain model: evaluation, checkpoints
        self.objective = objective or self.model  # what the training steps call
        self.parallel = Parallel(self.model, self.world, cfg.distributed.fsdp)
        trained = self.parallel.wrap(self.objective)
        self.forward = compile_model(trained) if cfg.compile else trained
        # fused AdamW: one kernel for all tensors; on CPU ~3x faster than the per-tensor loop (bench_train.py)
        self.optimizer = build_optimizer(self.model, cfg, fused=self.device.type in ("cpu", "cuda"))
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.dtype == torch.float16)
        self.step = 0  # optimizer steps done
        self.position = 0  # micro-batches consumed
        if len(task.train) < cfg.batch_size * self.world.size:
            raise ConfigError(f"train.batch_size: {cfg.batch_size} x {self.world.size} processes is larger than the "
                              f"{len(task.train)} training examples")
        self._epoch, self._order = -1, None
        self._collated = (-1, {})  # (step, the whole step's collated batch)

    # ------------------------------------------------------------------ data
    def train_batch(self, index: int) -> dict:
        """This process's part of micro-batch number `index`. The examples of an epoch are a permutation seeded by
        (seed, epoch), cut into the batches of one optimizer step: grad_accum x world_size x batch_size examples.
        Every process collates the whole step's batch with the generator one process with one micro-batch would
        use, and micro-batch j of rank r keeps rows (j N + r) b .. (j N + r + 1) b. So random collators (masks,
        spans, sampled captions) draw for each example what one process with batch k N b draws."""
        k, n_proc, bs = self.cfg.grad_accum, self.world.size, self.cfg.batch_size
        step, j = divmod(index, k)
        if self._collated[0] != step:
            n = len(self.task.train)
            epoch, i = divmod(step, n // (k * n_proc * bs))  # the last incomplete batch of an epoch is dropped
            if epoch != self._epoch:
                self._epoch = epoch
                self._order = data_order(self.cfg.seed, epoch, n)
            start = i * k * n_proc * bs
            examples = [self.task.train[e] for e in self._order[start:start + k * n_proc * bs].tolist()]
            self._collated = (step, self.task.collate(examples, collate_generator(self.cfg.seed, step)))
        first = (j * n_proc + self.world.rank) * bs
        mine = slice(first, first + bs)  # every collated tensor is batch-first
        return {key: v[mine] if torch.is_tensor(v) else v for key, v in self._collated[1].items()}

    # ------------------------------------------------------------------ steps
    def train_step(self) -> dict:
        """One optimizer step over grad_accum micro-batches. Returns {"loss", "lr", "tokens", "metrics"}, where
        metrics holds the micro-batch mean of each entry of the outputs' `metrics` (tensors, no host sync)."""
        self.model.train()
        self.objective.begin_step(self.step)
        batches = [self.train_batch(self.position + i) for i in range(self.cfg.grad_accum)]
        self.position += self.cfg.grad_accum
        # Gradient accumulation: weight each micro-batch's mean loss by its share of the targets (over all
        # processes), so that k micro-batches of b examples on N processes give the gradient of one batch of
        # N*k*b when the loss is a mean over targets each scored on its own (LM, MLM, classification). A
        # contrastive loss scores each example against its own micro-batch: there it is the gradient of the
        # mean of the k micro-batch losses (minimodels/models/brivl.py). DDP divides the summed gradients by
        # N, hence the factor world.size.
        counts = [count_targets(b) for b in batches]  # on the host, before the copy to the device: no sync
        tokens = sum(b["input_ids"].numel() if "input_ids" in b else c for b, c in zip(batches, counts))
        total, tokens = self.world.sum([sum(counts), tokens])
        losses, metrics = [], {}
        for j, (batch, count) in enumerate(zip(batches, counts)):
            with self.parallel.gradient_sync(last=j == len(batches) - 1):
                with autocast(self.device, self.dtype):
                    out = self.forward(**to_device(batch, self.device))
                loss = out.loss * (count * self.world.size / total)
                self.scaler.scale(loss).backward()
            losses.append(loss.detach())  # read once after the last backward, not per micro-batch
            for k, v in (out.metrics or {}).items():  # this process's own
                metrics[k] = metrics.get(k, 0) + v.detach().float() / len(batches)
        (loss_sum,) = self.world.sum([sum(x / self.world.size for x in torch.stack(losses).tolist())])
        self.parallel.finish_gradients()
        if not math.isfinite(loss_sum):
            raise self.diverged(f"loss is {loss_sum} at step {self.step + 1}")
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self.parallel.clip_gradients(self.cfg.grad_clip)
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():  # fp16's scaler skips such steps itself
            raise self.diverged(f"gradient norm is {grad_norm} at step {self.step + 1}")
        lr = self.scheduler.get_last_lr()[0]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_optimizer_step()  # e.g. BriVL's momentum towers follow the updated weights
        self.step += 1
        return {"loss": loss_sum, "lr": lr, "tokens": int(tokens), "metrics": metrics}

    def diverged(self, what: str) -> TrainingError:
        """The error for non-finite weights after step self.step, or a non-finite loss or gradient that they give at
        step self.step + 1: a checkpoint of step self.step, if any, is set aside (*.nonfinite), and the newest
        checkpoint before it is the last good one (its next step's loss and gradient were finite)."""
        poisoned = [c for c in checkpoint_dirs(self.run_dir) if checkpoint_step(c) == self.step]
        if poisoned:
            what += f" (the weights of step {self.step} give it: their checkpoint is set aside as {poisoned[0].name}.nonfinite)"
            if self.world.main:
                set_aside(poisoned[0], "nonfinite")
        last = ([c for c in checkpoint_dirs(self.run_dir) if checkpoint_step(c) < self.step] or ["none"])[-1]
        return TrainingError(f"{what}; last good checkpoint: {last} "
                             "(lower train.lr or raise train.warmup_steps, then --resume)")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """task.evaluate on the whole val split, on every process (each gets the same numbers)."""
        self.model.eval()
        with autocast(self.device, self.dtype):
            batches = (to_device(b, self.device) for b in val_batches(self.task, self.cfg.batch_size, self.cfg.eval_batches))
            metrics = self.task.evaluate(self.model, batches)
        self.model.train()
        return {k: float(v) for k, v in metrics.items()}

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        """Write a checkpoint (rank 0; every process must call this: RNG states and the parts of the model other
        processes hold are gathered). model.safetensors always holds the whole model."""
        if not self.parallel.finite_state(self.optimizer):
            raise self.diverged(f"non-finite weights or optimizer state after step {self.step}, not saved")
        rngs = self.world.gather(rng_state())
        weights, optimizer, extra = self.parallel.gather(self.optimizer)
        if not self.world.main:
            return None
        state = {
            "step": self.step,
            "data_position": self.position,
            "optimizer": optimizer,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs[0],
            "rng_per_rank": rngs,  # dropout and random collators differ per process
            **extra,
        }
        return save_checkpoint(self.run_dir, self.step, self.model, state, self.cfg.keep_last, weights)

    def load(self, ckpt: str | Path) -> None:
        """Resume from checkpoint `ckpt`: weights, optimizer, schedule, step, data position and RNG states."""
        state = load_trainer_state(ckpt)
        self.parallel.load(ckpt, self.optimizer, state)
        self.scheduler.load_state_dict(state["scheduler"])
        # The schedule follows the current config, so train.lr / train.max_steps may change on resume.
        self.scheduler.base_lrs = [self.cfg.lr] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(state["step"], self.cfg)
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.position = state["step"], state["data_position"]
        rngs = state.get("rng_per_rank", [state["rng"]])
        set_rng_state(rngs[self.world.rank] if len(rngs) == self.world.size else state["rng"])

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train from self.step to cfg.max_steps, evaluating, logging and checkpointing. Returns the last eval.
        Each evaluation's event in metrics.jsonl also holds time_s, the seconds spent in training steps until then
        (evaluations and checkpoints not counted, so that runs evaluated at different intervals compare); tok_s and
        tokens_per_s count the same seconds."""
        cfg = self.cfg
        log = MetricsLog(self.run_dir / "metrics.jsonl", after_step=self.step) if self.world.main else None
        tty = sys.stderr.isatty()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=self.quiet, dynamic_ncols=True,
                   mininterval=0.5 if tty else 30, desc="train", unit="step")
        last_eval, train_s, tokens, since_log = {}, 0.0, 0, Mean()
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            m = self.train_step()
            train_s += time.perf_counter() - t0
            tokens += m["tokens"]
            since_log.add(m["metrics"])
            tok_s = tokens / train_s
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if self.step % cfg.log_interval == 0:
                averaged = since_log.pop()
                if log:
                    log.write(step=self.step, loss=m["loss"], lr=m["lr"], tokens_per_s=round(tok_s, 1), **averaged)
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                last_eval = self.evaluate()
                if log:  # time_s: this call's seconds in training steps (a resumed run counts from the resume)
                    log.write(step=self.step, **last_eval, time_s=round(train_s, 1))
                if not self.quiet:
                    bar.write(f"step {self.step}: " + "  ".join(f"{k} {v:.4f}" for k, v in last_eval.items()))
            if self.step % cfg.save_interval == 0 or self.step == cfg.max_steps:
                self.save()
        bar.close()
        if not last_eval:  # resumed a finished run without new steps
            last_eval = self.evaluate()
        return last_eval


def val_batches(task, batch_size: int, max_batches: int | None = None):
    """Validation batches in split order, batch k = task.val[k*B : (k+1)*B] (tasks rely on this order to
    know what was evaluated); each collated with a fixed generator, so random collators repeat exactly."""
    n = len(task.val)
    n_batches = math.ceil(n / batch_size) if max_batches is None else min(math.ceil(n / batch_size), max_batches)
    for k in range(n_batches):
        examples = [task.val[j] for j in range(k * batch_size, min(n, (k + 1) * batch_size))]
        yield task.collate(examples, torch.Generator().manual_seed(k))


def count_targets(batch: dict) -> int:
    """Number of supervised positions in a batch: labels != -100 if there are labels, else the batch size."""
    if "labels" in batch:
        return int((batch["labels"] != -100).sum())
    return len(next(iter(batch.values())))
