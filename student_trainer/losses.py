"""Distillation losses as pure tensor functions (the torchtune ``kd_losses`` habit).

Shapes: ``student`` [B, C] logits; ``teacher_logp`` [B, C] teacher log-probabilities
at temperature T (from :mod:`student_trainer.retemper`); ``labels`` [B] int64,
−1 where unlabeled. Every loss returns a scalar: the mean over rows.

Per row, with ``p = softmax(teacher/T)`` and ``q = softmax(student/T)``:

- labeled:   ``α · T² · KL(p ‖ q) + (1 − α) · CE(student, y)``
- unlabeled: ``T² · KL(p ‖ q)`` — the soft term alone, at full weight.

The ``T²`` keeps the soft term's gradient on the same scale as the hard term's
when T changes (Hinton, Vinyals & Dean, 2015): ``∂[T²·KL]/∂s = T · (q − p)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_kl(student: torch.Tensor, teacher_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, C], [B, C] -> [B]: ``T² · KL(p ‖ softmax(student / T))`` per row."""
    logq = F.log_softmax(student / temperature, dim=-1)
    kl = F.kl_div(logq, teacher_logp, reduction="none", log_target=True).sum(dim=-1)
    return temperature**2 * kl


def hard_ce(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, C], [B] -> [B]: cross-entropy with the hard label, 0 where unlabeled (−1)."""
    return F.cross_entropy(student, labels.clamp(min=0), reduction="none") * (labels >= 0)


def hard_ce_mixed(student: torch.Tensor, labels: torch.Tensor, labels2: torch.Tensor | None,
                  lam: torch.Tensor | None) -> torch.Tensor:
    """[B] hard term of a mixed view (mixup/cutmix): ``λ·CE(y) + (1 − λ)·CE(y₂)``; rows with
    λ = 1 (or no partner label) are plain ``CE(y)``."""
    ce = hard_ce(student, labels)
    if labels2 is None or lam is None:
        return ce
    lam = lam.to(ce.dtype)
    return torch.where(labels2 >= 0, lam * ce + (1 - lam) * hard_ce(student, labels2), ce)


def _mix(soft: torch.Tensor, hard: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    labeled = labels >= 0
    per_row = torch.where(labeled, alpha * soft + (1 - alpha) * hard, soft)
    return per_row.mean()


def kd_loss(
    student: torch.Tensor, teacher_logp: torch.Tensor, labels: torch.Tensor, *, temperature: float, alpha: float,
    labels2: torch.Tensor | None = None, lam: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton's loss: ``α·T²·KL(p‖q) + (1−α)·CE`` on labeled rows, the soft term alone on unlabeled rows.
    With ``labels2``/``lam`` (mixed views) the CE is :func:`hard_ce_mixed`."""
    soft = soft_kl(student, teacher_logp, temperature)
    return _mix(soft, hard_ce_mixed(student, labels, labels2, lam), labels, alpha)


def logit_mse(student: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """[B, C], [B, C] -> [B]: mean squared difference of the mean-centred logits
    (Ba & Caruana's logit matching; centring removes the free shift of logits)."""
    s = student - student.mean(dim=-1, keepdim=True)
    t = teacher_logits - teacher_logits.mean(dim=-1, keepdim=True)
    return ((s - t) ** 2).mean(dim=-1)


def logit_mse_loss(
    student: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, *, alpha: float,
    labels2: torch.Tensor | None = None, lam: torch.Tensor | None = None,
) -> torch.Tensor:
    """``α·MSE(logits) + (1−α)·CE`` on labeled rows, the MSE alone on unlabeled rows."""
    return _mix(logit_mse(student, teacher_logits), hard_ce_mixed(student, labels, labels2, lam), labels, alpha)
