"""Knowledge inheritance (Qin et al. 2021): train a larger model while it distils from a smaller, trained one.

The student learns from the data and, early on, from the teacher's predictions; the teacher's share
alpha_t decays so that the student is soon on its own and can outgrow its teacher:

    L = (1 - alpha_t) L_self + alpha_t T^2 KL(p_teacher^T || p_student^T)      p^T = softmax(logits / T)
    alpha_t = alpha (1 - t / decay_steps) for t < decay_steps, then 0          (constant alpha: decay_steps null)

T^2 keeps the gradient of the softened KL on the scale of L_self (Hinton et al. 2015). The KL is taken
at the positions that have a target: a masked LM's labelled positions (`out.masked_logits`), or a causal
LM's positions t whose next token t + 1 has a label. The teacher is any finished run with the same
tokenizer (`train.teacher.run`); it runs in eval mode without gradients.

What the teacher costs is its forward pass and the KL over (positions, vocabulary) scores, on every step while
alpha_t > 0. `train.teacher.rows` < 1 has the teacher score only the first share of each batch's rows (of each
micro-batch, on each process: gradient accumulation and torchrun see the same share of every batch); the KL is
averaged over their target positions, L_self over the whole batch, and alpha_t is scaled by the share s of the
batch's target positions the teacher scored: L = (1 - s alpha_t) L_self + s alpha_t T^2 KL. Both costs scale with
the rows: for a width-256 teacher of a width-384 GPT (scripts/bench_inherit.py, one thread) the teacher added 37%
to a student step at rows 1 and 20% at 0.5 (its forward alone 21% and 12%; the rest is the KL and its gradient).

`Inheritance(student, teacher, cfg)` is what the trainer's training steps call instead of the student
(minimodels/train/run.py builds it): its output is the student's, with `loss` = L above and alpha_t and the KL
in `metrics`. Evaluation and checkpoints use the student itself, so a run with a teacher writes the
checkpoints of a run without one.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimodels.models.bert import BERTOutput
from minimodels.protocols import TrainedModel
from minimodels.schema import need

ARCHS = ("gpt", "bert")  # the students: a language model's token scores (target_logits)


@dataclass
class TeacherConfig:
    run: str  # a trained (smaller) model's run folder with this run's tokenizer, e.g. runs/gpt
    alpha: float = 1.0  # the teacher's share of the loss at step 0
    decay_steps: int | None = None  # alpha decays linearly to 0 over this many steps; null = constant alpha
    temperature: float = 2.0  # T: both distributions are softened by T before the KL
    rows: float = 1.0  # the share of each batch's rows (its first ones) the teacher scores; alpha is scaled by the
    # share of the target positions they hold (inheritance_loss)

    def validate(self, arch: str) -> None:
        """Check train.teacher for a student of model.arch `arch`."""
        need(arch in ARCHS, "train.teacher",
             f"knowledge inheritance compares a GPT's or BERT's token scores; model.arch is {arch!r}")
        need(0 <= self.alpha <= 1, "train.teacher.alpha", f"must be in [0, 1], got {self.alpha}")
        need(0 < self.temperature < math.inf, "train.teacher.temperature", f"must be positive, got {self.temperature}")
        need(0 < self.rows <= 1, "train.teacher.rows", f"must be in (0, 1], got {self.rows}")
        need(self.decay_steps is None or self.decay_steps > 0, "train.teacher.decay_steps",
             f"must be positive or null (constant alpha), got {self.decay_steps}")


def alpha_at(step: int, cfg) -> float:
    """alpha_t for optimizer step `step` (0-based); cfg: train.teacher (TeacherConfig)."""
    if cfg.decay_steps is None:
        return cfg.alpha
    return cfg.alpha * max(0.0, 1.0 - step / cfg.decay_steps)


def target_logits(out, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, V) scores and (M,) which of them have a target: a causal LM's logits at every position (B * T rows in
    row-major order; position t has a target if token t + 1 has a label), a masked LM's at its labelled positions.
    Views of the output, not copies: rows without a target get weight 0 in the KL instead of a boolean-mask copy
    of the (B, T, V) logits (and its backward, which scatters the gradient into zeros of that size)."""
    if isinstance(out, BERTOutput):  # BERT already scored only its labelled positions
        return out.masked_logits, torch.ones(len(out.masked_logits), dtype=torch.bool, device=out.masked_logits.device)
    labels = batch["labels"]
    if labels.dim() != 2 or out.logits.dim() != 3:
        raise ValueError("train.teacher: needs a language model's per-token logits (B, T, V) and labels (B, T)")
    has_target = F.pad(labels[:, 1:] != -100, (0, 1))  # (B, T): position t predicts token t + 1 (-100: no label)
    return out.logits.flatten(0, 1), has_target.flatten()  # (B * T, V), (B * T,)


def first_rows(batch: dict, share: float) -> dict:
    """The batch's first max(1, round(share * B)) rows: what the teacher scores (train.teacher.rows)."""
    n = max(1, round(share * len(batch["input_ids"])))
    return {k: v[:n] for k, v in batch.items()}  # (n, ...) views


# scores per chunk of SoftenedKL: 16 rows of a 4096-token vocabulary. KL forward + backward over (4096, 4096) bf16
# scores, one thread, in a one-off probe: 63 ms in chunks of 16 rows, 75 ms in chunks of 64, 99 ms of 256
KL_CHUNK_ELEMENTS = 1 << 16


class SoftenedKL(torch.autograd.Function):
    """sum_r w_r KL(p_t,r || p_s,r) with p = softmax(scores / T) over the vocabulary, in fp32 whatever the scores'
    dtype; the gradient reaches the student's scores s only. Its backward is the closed form

        dKL(p_t || p_s) / ds_v = (p_s(v) - p_t(v)) / T

    computed once in forward and kept in the scores' dtype, instead of autograd keeping and walking back through
    the graph of the (M, V) temporaries (log-softmax, exp, difference, product); tests/test_inherit.py checks it
    against autograd through F.kl_div. As minimodels/nn/loss.py does for the cross-entropy, it works through the
    rows in chunks small enough to stay in the CPU's cache: the fp32 temporaries are (16, V), not (M, V)."""

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
        rows = len(s) if s.is_cuda else max(1, KL_CHUNK_ELEMENTS // s.size(1))
        ps_minus_pt = torch.empty_like(s)  # (M, V), the scores' dtype
        kl = torch.empty(len(s), device=s.device)  # (M,) fp32
        for s_c, t_c, g_c, kl_c in zip(s.split(rows), t.split(rows), ps_minus_pt.split(rows), kl.split(rows)):
            # log softmax(z / T) in fp32: one fused pass from the scores' dtype when T = 1
            log_ps, log_pt = (F.log_softmax(z if temperature == 1 else z.float() / temperature, dim=-1,
                                            dtype=torch.float32) for z in (s_c, t_c))  # (rows, V) each
            p_t = log_pt.exp()
            # KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))
            kl_c.copy_(torch.linalg.vecdot(p_t, log_pt.sub_(log_ps)))
            g_c.copy_(log_ps.exp_().sub_(p_t))  # p_s - p_t
        ctx.save_for_backward(ps_minus_pt, weight)
        ctx.temperature = temperature
        return (weight * kl).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ps_minus_pt, weight = ctx.saved_tensors  # (M, V), (M,)
        row_scale = grad * weight / ctx.temperature  # (M,): d(sum_r w_r KL_r) / dKL_r times 1 / T
        return ps_minus_pt * row_scale[:, None].to(ps_minus_pt.dtype), None, None, None


@torch.compiler.disable  # eager under torch.compile, as minimodels/nn/loss.py's cross_entropy (its loop over chunks)
def softened_kl(s: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    return SoftenedKL.apply(s, t, weight, temperature)


def inheritance_loss(student_out, teacher_out, batch: dict, alpha: float, temperature: float):
    """(L, KL): the mixed loss above, and the KL term alone (nats per target position). The teacher may have scored
    only the batch's first rows (train.teacher.rows): the KL is then averaged over their target positions, which are
    the first of the student's scores (both in row-major order), and alpha is scaled by their share s of the batch's
    target positions, so each position weighs the same as with rows 1 and the data keeps the rest of the loss:

        L = (1 - s alpha_t) L_self + s alpha_t T^2 KL_rows

    (with alpha weighting the KL of a quarter of the rows against all of the data, alpha = 1 trained the student on
    a quarter of its batch: a width-384 GPT fell behind its scratch twin, 5.041 against 5.010 at step 300.)"""
    t, _ = target_logits(teacher_out, batch)  # (M', V), M' <= M
    s, has_target = target_logits(student_out, batch)  # (M, V), (M,)
    share = has_target[:len(t)].sum() / has_target.sum().clamp(min=1)  # s: the teacher's share of the targets
    s, has_target = s[:len(t)], has_target[:len(t)]  # (M', V), (M',)
    if s.shape != t.shape:
        raise ValueError(f"train.teacher: the teacher scores {tuple(t.shape)} where the student scores {tuple(s.shape)}")
    kl = softened_kl(s, t, has_target / has_target.sum().clamp(min=1), temperature)  # mean over the target positions
    a = alpha * share
    return (1 - a) * student_out.loss + a * temperature**2 * kl, kl.detach()


class Inheritance(nn.Module, TrainedModel):
    """The student with a frozen teacher beside it: forward(**batch) returns the student's output with loss
    (1 - alpha_t) L_self + alpha_t T^2 KL and metrics inherit_alpha (and inherit_kl while alpha_t > 0; once
    alpha_t has decayed to 0 the teacher no longer runs). The teacher scores the batch's first cfg.rows of its rows.
    Its parameters are the student's, under "student."; the trainer tells it the step (begin_step), which sets
    alpha_t. cfg: train.teacher (TeacherConfig)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__()
        self.student, self.cfg, self.alpha = student, cfg, alpha_at(0, cfg)
        # a tuple, not a submodule: the teacher is not trained, synchronised by DDP or saved in checkpoints
        self.teacher = (teacher.requires_grad_(False).eval(),)

    def begin_step(self, step: int) -> None:
        self.alpha = alpha_at(step, self.cfg)

    def forward(self, **batch):
        out, metrics = self.student(**batch), {}
        if self.alpha > 0:  # L = (1 - s alpha_t) L_self + s alpha_t T^2 KL(teacher || student), inheritance_loss
            with torch.no_grad():
                teacher_batch = first_rows(batch, self.cfg.rows)
                if self.teacher[0].config.arch == "gpt":  # a causal LM's logits need no labels, which would add its loss
                    teacher_batch.pop("labels", None)
                teacher_out = self.teacher[0](**teacher_batch)
            loss, metrics["inherit_kl"] = inheritance_loss(out, teacher_out, batch, self.alpha, self.cfg.temperature)
            out = dataclasses.replace(out, loss=loss)
        metrics["inherit_alpha"] = torch.tensor(self.alpha)
        return dataclasses.replace(out, metrics={**metrics, **(out.metrics or {})})
