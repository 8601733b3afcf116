"""The one training loop. It knows nothing about which model it trains:

    batch = task.collate([task.train[i] for i in indices], generator)   # a dict of tensors
    out = model(**batch)                                                 # any output with .loss
    out.loss.backward(); optimizer.step(); model.after_optimizer_step()

where after_optimizer_step is the one optional model method (minimodels/protocols.py; a no-op unless the
model overrides it, as BriVL does for its momentum towers), and evaluation metrics come from
`task.evaluate(model, batches) -> dict[str, float]`. An output may also
carry `metrics`, a dict of detached scalar or 1-D tensors about that forward pass (an MoE model's routing
statistics); the trainer averages them over the steps between two log lines and writes them there.
With train.teacher (knowledge inheritance, minimodels/train/inherit.py) a frozen teacher model sees the
same batch and the loss becomes (1 - alpha_t) out.loss + alpha_t T^2 KL(teacher || student), as long as
alpha_t > 0; after that the teacher is not run.

Determinism: the order of training examples is a function of (seed, epoch) and the collator's random
generator a function of (seed, optimizer step), so the data position is a single integer and a
resumed run sees exactly the batches an uninterrupted run would have seen.

Under torchrun (minimodels/train/distributed.py) the model is wrapped in DDP (or sharded by FSDP2 with
train.distributed.fsdp) and each process takes its rows of an optimizer step's batch of
grad_accum * world_size * b examples (train_batch), so N processes with batch b see exactly the examples (and
the collator's random choices) one process with batch N*b would; rank 0 alone logs and writes checkpoints. A loss that compares
the examples of a batch with each other (contrastive negatives) gathers the other processes' examples
itself (BriVL, minimodels/nn/gather.py).
With expert parallelism (model.moe.expert_parallel) each process holds only its share of the experts: DDP
leaves those parameters alone, and checkpoints gather them so that model.safetensors is the whole model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from minimodels.config import DEVICE, ConfigError, TrainConfig, need
from minimodels.moe.parallel import expert_shards
from minimodels.train.checkpoint import (RunFolderError, checkpoint_dirs, checkpoint_step, load_trainer_state,
                                         load_weights, read_weights, rng_state, save_checkpoint, set_aside, set_rng_state)
from minimodels.train.distributed import World, shard_fully
from minimodels.train.inherit import alpha_at, inheritance_loss
from minimodels.train.memory import reuse_freed_memory
from minimodels.train.optim import build_optimizer, build_scheduler, lr_factor


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and what to do."""


def resolve_device(name: str, world: World | None = None, key: str = "train.device") -> torch.device:
    """auto: CUDA, else MPS, else CPU. Under torchrun, "auto" and "cuda" mean this process's GPU, cuda:LOCAL_RANK.
    A name this machine cannot serve raises ConfigError naming `key` (train.device, or a script's --device)."""
    need(DEVICE.fullmatch(name) is not None, key, f"must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device("cuda", world.local_rank if world else 0) if name == "cuda" else torch.device(name)
    if device.type == "cuda":
        need(torch.cuda.is_available(), key, f"{name}: this machine has no CUDA GPU (try auto or cpu)")
        need((device.index or 0) < torch.cuda.device_count(), key,
             f"{device}: this machine has {torch.cuda.device_count()} CUDA GPUs (counting from cuda:0)")
    need(device.type != "mps" or torch.backends.mps.is_available(), key, "mps: this machine has no MPS (Apple GPU)")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CPU (about 4x the fp32 matmul rate on AVX-512 bf16 cores) and on CUDA when supported."""
    if name == "auto":
        if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float32
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(f"train.dtype: fp16 is only supported on CUDA (on CPU it is ~1000x slower); device is {device}")
    return {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed precision: weights stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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
    def __init__(self, model: torch.nn.Module, task, cfg: TrainConfig, run_dir: str | Path, quiet: bool = False,
                 world: World | None = None, teacher: torch.nn.Module | None = None):
        reuse_freed_memory()  # keep freed blocks mapped: no page faults for the next step's tensors (memory.py)
        self.world = world or World()
        self.task, self.cfg, self.run_dir = task, cfg, Path(run_dir)
        self.quiet = quiet or not self.world.main  # only rank 0 prints
        self.device = resolve_device(cfg.device, self.world)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.model = model.to(self.device)  # the plain model: evaluation, checkpoints
        self.teacher = teacher  # train.teacher: a trained model to distil from (minimodels/train/inherit.py), frozen
        # parameters this process alone holds (expert shards): {own name: name in the whole model}
        self.shards = expert_shards(self.model)
        self.ddp, self.fsdp = None, self.world.size > 1 and cfg.distributed.fsdp
        if self.fsdp:
            if self.shards:
                raise ConfigError("train.distributed.fsdp: not combined with model.moe.expert_parallel yet")
            shard_fully(self.model)  # in place: parameters become DTensors holding 1/N each
        elif self.world.size > 1:
            # DDP broadcasts rank 0's weights at start and all-reduces (averages) gradients in backward,
            # except for the expert shards, which differ from process to process
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self.model, list(self.shards))
            self.ddp = DistributedDataParallel(self.model)
        trained = self.ddp or self.model
        self.forward = torch.compile(trained) if cfg.compile else trained
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
        batches = [to_device(self.train_batch(self.position + i), self.device) for i in range(self.cfg.grad_accum)]
        self.position += self.cfg.grad_accum
        # Gradient accumulation: weight each micro-batch's mean loss by its share of the targets (over all
        # processes), so that k micro-batches of b examples on N processes give the gradient of one batch of
        # N*k*b when the loss is a mean over targets each scored on its own (LM, MLM, classification). A
        # contrastive loss scores each example against its own micro-batch: there it is the gradient of the
        # mean of the k micro-batch losses (minimodels/models/brivl.py). DDP divides the summed gradients by
        # N, hence the factor world.size.
        counts = [count_targets(b) for b in batches]
        tokens = sum(b["input_ids"].numel() if "input_ids" in b else c for b, c in zip(batches, counts))
        total, tokens = self.world.sum([sum(counts), tokens])
        loss_sum, metrics = 0.0, {}
        for j, (batch, count) in enumerate(zip(batches, counts)):
            last = j == len(batches) - 1  # DDP / FSDP reduce the gradients only in the last backward
            if self.fsdp:
                self.model.set_requires_gradient_sync(last)
            with self.ddp.no_sync() if self.ddp and not last else contextlib.nullcontext():
                with autocast(self.device, self.dtype):
                    out = self.forward(**batch)
                    loss = out.loss
                    alpha = alpha_at(self.step, self.cfg.teacher) if self.teacher is not None else 0.0
                    if alpha > 0:  # knowledge inheritance: (1 - a) L_self + a T^2 KL(teacher || student)
                        with torch.no_grad():  # once alpha has decayed to 0 the teacher no longer runs
                            teacher_out = self.teacher(**batch)
                        loss, kl = inheritance_loss(out, teacher_out, batch, alpha, self.cfg.teacher.temperature)
                        metrics["inherit_kl"] = metrics.get("inherit_kl", 0) + kl / len(batches)
                    if self.teacher is not None:
                        metrics["inherit_alpha"] = torch.tensor(alpha)
                loss = loss * (count * self.world.size / total)
                self.scaler.scale(loss).backward()
            loss_sum += loss.item() / self.world.size
            for k, v in (getattr(out, "metrics", None) or {}).items():  # this process's own
                metrics[k] = metrics.get(k, 0) + v.detach().float() / len(batches)
        (loss_sum,) = self.world.sum([loss_sum])
        # An expert shard's gradient already sums every process's tokens (they came by all-to-all): divide
        # by N as DDP does for the others, so that it is the gradient of the mean loss too.
        for name, p in self.model.named_parameters():
            if name in self.shards and p.grad is not None:
                p.grad /= self.world.size
        if not math.isfinite(loss_sum):
            raise self.diverged(f"loss is {loss_sum} at step {self.step + 1}")
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
        grad_norm = self.clip_gradients()
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

    @torch.no_grad()
    def clip_gradients(self) -> float:
        """Returns norm, the L2 norm of the whole model's gradient; with train.grad_clip > 0 scales all gradients by
        min(1, grad_clip / norm). With expert shards that norm counts every process's experts, so all processes scale alike."""
        if not self.shards:
            params = [p for p in self.model.parameters() if p.grad is not None]
            norm = (torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip) if self.cfg.grad_clip > 0
                    else torch.nn.utils.get_total_norm([p.grad for p in params]))
            return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)  # FSDP: norm of the shards' norms
        grads = [(name in self.shards, p.grad) for name, p in self.model.named_parameters() if p.grad is not None]
        shared = sum(float(g.float().square().sum()) for local, g in grads if not local)
        (sharded,) = self.world.sum([sum(float(g.float().square().sum()) for local, g in grads if local)])
        norm = (shared + sharded) ** 0.5
        scale = self.cfg.grad_clip / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
        if self.cfg.grad_clip > 0 and scale < 1:  # grad_clip 0: measure the norm, clip nothing
            for _, g in grads:
                g.mul_(scale)
        return norm

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
        """Write a checkpoint (rank 0; every process must call this: RNG states, expert shards and FSDP's
        parameter shards are gathered). model.safetensors always holds the whole model."""
        if not self.finite_state():
            raise self.diverged(f"non-finite weights or optimizer state after step {self.step}, not saved")
        rngs = self.world.gather(rng_state())
        weights, optimizer, extra = None, None, {}
        if self.fsdp:  # whole tensors to rank 0; the optimizer state keyed by parameter name
            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            weights = get_model_state_dict(self.model, options=full)
            optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=full)
            extra["optimizer_by_name"] = True
        if self.shards:  # every process's experts under their names in the whole model
            mine = {self.shards[n]: p.detach().cpu() for n, p in self.model.named_parameters() if n in self.shards}
            weights = {n: t for n, t in self.model.state_dict().items() if n not in self.shards}
            for part in self.world.gather(mine):
                weights.update(part)
            extra["optimizer_per_rank"] = self.world.gather(self.optimizer.state_dict())  # experts' moments differ
        if not self.world.main:
            return None
        state = {
            "step": self.step,
            "data_position": self.position,
            "optimizer": optimizer or self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rngs[0],
            "rng_per_rank": rngs,  # dropout and random collators differ per process
            **extra,
        }
        return save_checkpoint(self.run_dir, self.step, self.model, state, self.cfg.keep_last, weights)

    @torch.no_grad()
    def finite_state(self) -> bool:
        """Are all weights, buffers and optimizer states finite, on every process? Each sums the part it holds in
        float64, which is finite exactly when every element is (and on CPU 4x cheaper than isfinite)."""
        tensors = list(self.model.state_dict().values())
        tensors += [t for state in self.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
        local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if t.is_floating_point()]
        (total,) = self.world.sum([sum(float(t.sum(dtype=torch.float64)) for t in local)])
        return math.isfinite(total)

    def load(self, ckpt: str | Path) -> None:
        state = load_trainer_state(ckpt)
        by_name = state.get("optimizer_by_name", False)  # written under FSDP
        if self.fsdp and not by_name:
            raise ConfigError(f"{ckpt}: resuming under FSDP needs a checkpoint written under FSDP")
        if self.fsdp:
            set_model_state_dict(self.model, read_weights(ckpt), options=StateDictOptions(full_state_dict=True))
        else:
            load_weights(self.model, ckpt, self.shards)
        if by_name:  # whole tensors by parameter name: loads under FSDP, DDP or in one process alike
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        elif self.shards or "optimizer_per_rank" in state:
            if len(state.get("optimizer_per_rank", [])) != self.world.size or not self.shards:
                raise ConfigError(f"{ckpt}: an expert-parallel checkpoint resumes only with expert parallelism "
                                  f"over as many processes as wrote it ({len(state.get('optimizer_per_rank', []))})"
                                  "; its model.safetensors loads anywhere (generate, model.init_from)")
            self.optimizer.load_state_dict(state["optimizer_per_rank"][self.world.rank])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
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
        Each evaluation's event in metrics.jsonl also holds time_s, the training time until then."""
        cfg = self.cfg
        log = MetricsLog(self.run_dir / "metrics.jsonl", after_step=self.step) if self.world.main else None
        tty = sys.stderr.isatty()
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=self.quiet, dynamic_ncols=True,
                   mininterval=0.5 if tty else 30, desc="train", unit="step")
        last_eval, t0, tokens, since_log = {}, time.perf_counter(), 0, Mean()
        while self.step < cfg.max_steps:
            m = self.train_step()
            tokens += m["tokens"]
            since_log.add(m["metrics"])
            tok_s = tokens / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
            if self.step % cfg.log_interval == 0:
                averaged = since_log.pop()
                if log:
                    log.write(step=self.step, loss=m["loss"], lr=m["lr"], tokens_per_s=round(tok_s, 1), **averaged)
            if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                last_eval = self.evaluate()
                if log:  # time_s: seconds since this call began training (a resumed run counts from the resume)
                    log.write(step=self.step, **last_eval, time_s=round(time.perf_counter() - t0, 1))
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


class Mean:
    """Running means of dicts of tensors: add() per step, pop() -> {name: float or list of floats} and reset."""

    def __init__(self):
        self.sums, self.n = {}, 0

    def add(self, values: dict) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.n += 1

    def pop(self) -> dict:
        out = {k: [round(x, 6) for x in (v / self.n).tolist()] if v.dim() else round(float(v / self.n), 6)
               for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out


class MetricsLog:
    """metrics.jsonl: one JSON object per event, each with "step". On resume, events after the
    checkpoint's step (written by the interrupted run) are dropped so the file tells one story, and so is a
    last line cut short by the interruption (saying so); the file is rewritten atomically (temp file + rename)."""

    def __init__(self, path: Path, after_step: int = 0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            lines, keep = [line for line in path.read_text().splitlines() if line], []
            for n, line in enumerate(lines, 1):
                try:
                    if json.loads(line)["step"] <= after_step:
                        keep.append(line)
                except json.JSONDecodeError:
                    if n < len(lines):
                        raise RunFolderError(f"{path}: line {n} is not JSON (only a cut-short last line is dropped)") from None
                    print(f"note: {path}: dropped its last line, cut short: {line[:40]!r}", file=sys.stderr)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, path)

    def write(self, **event) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(event) + "\n")
