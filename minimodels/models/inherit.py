"""Knowledge inheritance (Qin et al. 2021): train a larger model while it distils from a smaller, trained one.

The student learns from the data and, early on, from the teacher's predictions; the teacher's share
alpha_t decays so that the student is soon on its own and can outgrow its teacher:

    L = (1 - alpha_t) L_self + alpha_t T^2 KL(p_teacher^T || p_student^T)      p^T = softmax(logits / T)
    alpha_t = alpha (1 - t / decay_steps) for t < decay_steps, then 0          (constant alpha: decay_steps null)

T^2 keeps the gradient of the softened KL on the scale of L_self (Hinton et al. 2015). The KL is taken
at the positions that have a target: a masked LM's labelled positions (`out.masked_logits`), or a causal
LM's positions t whose next token t + 1 has a label. The teacher is any finished run with the same
tokenizer (`train.teacher.run`); it runs in eval mode without gradients.

`Inheritance(student, teacher, cfg)` is what the trainer's training steps call instead of the student
(minimodels/train/run.py builds it): its output is the student's, with `loss` = L above and alpha_t and the KL
in `metrics`. Evaluation and checkpoints use the student itself, so a run with a teacher writes the
checkpoints of a run without one.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from minimodels.models.bert import BERTOutput
from minimodels.protocols import TrainedModel


def alpha_at(step: int, cfg) -> float:
    """alpha_t for optimizer step `step` (0-based); cfg: train.teacher (minimodels/config.py TeacherConfig)."""
    if cfg.decay_steps is None:
        return cfg.alpha
    return cfg.alpha * max(0.0, 1.0 - step / cfg.decay_steps)


def target_logits(out, batch: dict) -> torch.Tensor:
    """(N, V): the scores at the N positions that have a target, in row-major order."""
    if isinstance(out, BERTOutput):  # BERT already scored only its labelled positions
        return out.masked_logits
    labels = batch["labels"]
    if labels.dim() != 2 or out.logits.dim() != 3:
        raise ValueError("train.teacher: needs a language model's per-token logits (B, T, V) and labels (B, T)")
    has_target = labels[:, 1:] != -100  # (B, T-1): position t predicts token t + 1 (-100: no label)
    return out.logits[:, :-1][has_target]  # (N, V)


def inheritance_loss(student_out, teacher_out, batch: dict, alpha: float, temperature: float):
    """(L, KL): the mixed loss above, and the KL term alone (nats per target position)."""
    s = target_logits(student_out, batch).float() / temperature  # (N, V)
    t = target_logits(teacher_out, batch).float() / temperature  # (N, V)
    if s.shape != t.shape:
        raise ValueError(f"train.teacher: the teacher scores {tuple(t.shape)} where the student scores {tuple(s.shape)}")
    # KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v)), averaged over the N positions
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
    return (1 - alpha) * student_out.loss + alpha * temperature**2 * kl, kl.detach()


class Inheritance(nn.Module, TrainedModel):
    """The student with a frozen teacher beside it: forward(**batch) returns the student's output with loss
    (1 - alpha_t) L_self + alpha_t T^2 KL and metrics inherit_alpha (and inherit_kl while alpha_t > 0; once
    alpha_t has decayed to 0 the teacher no longer runs). Its parameters are the student's, under "student.";
    the trainer tells it the step (begin_step), which sets alpha_t. cfg: train.teacher (config.py TeacherConfig)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg):
        super().__init__()
        self.student, self.cfg, self.alpha = student, cfg, alpha_at(0, cfg)
        # a tuple, not a submodule: the teacher is not trained, synchronised by DDP or saved in checkpoints
        self.teacher = (teacher.requires_grad_(False).eval(),)

    def begin_step(self, step: int) -> None:
        self.alpha = alpha_at(step, self.cfg)

    def forward(self, **batch):
        out, metrics = self.student(**batch), {}
        if self.alpha > 0:  # L = (1 - a) L_self + a T^2 KL(teacher || student)
            with torch.no_grad():
                teacher_out = self.teacher[0](**batch)
            loss, metrics["inherit_kl"] = inheritance_loss(out, teacher_out, batch, self.alpha, self.cfg.temperature)
            out = dataclasses.replace(out, loss=loss)
        metrics["inherit_alpha"] = torch.tensor(self.alpha)
        return dataclasses.replace(out, metrics={**metrics, **(out.metrics or {})})
