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

import math

import torch
import torch.nn.functional as F


def soft_kl(student: torch.Tensor, teacher_logp: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, C], [B, C] -> [B]: ``T² · KL(p ‖ softmax(student / T))`` per row."""
    logq = F.log_softmax(student / temperature, dim=-1)
    kl = F.kl_div(logq, teacher_logp, reduction="none", log_target=True).sum(dim=-1)
    return temperature**2 * kl


DIVERGENCES = ("forward", "reverse", "jsd")


def divergence(logp: torch.Tensor, logq: torch.Tensor, kind: str = "forward") -> torch.Tensor:
    """[N, C], [N, C] log-probabilities of the teacher (p) and the student (q) -> [N] ``D(p, q)``: ``forward``
    KL(p ‖ q) (Hinton's), ``reverse`` KL(q ‖ p) (mode-seeking) or ``jsd`` (½ KL(p ‖ m) + ½ KL(q ‖ m), m the
    mean of p and q)."""
    def kl(loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:
        a = loga.exp()
        return torch.where(a > 0, a * (loga - logb), torch.zeros_like(a)).sum(dim=-1)

    if kind == "forward":
        return kl(logp, logq)
    if kind == "reverse":
        return kl(logq, logp)
    if kind == "jsd":
        logm = torch.logaddexp(logp, logq) - math.log(2)
        return 0.5 * kl(logp, logm) + 0.5 * kl(logq, logm)
    raise ValueError(f"unknown divergence {kind!r}; divergences: {', '.join(DIVERGENCES)}")


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


def mix(soft: torch.Tensor, hard: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """The mean over rows of ``α·soft + (1 − α)·hard`` on labeled rows and ``soft`` alone on unlabeled ones."""
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
    return mix(soft, hard_ce_mixed(student, labels, labels2, lam), labels, alpha)


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
    return mix(logit_mse(student, teacher_logits), hard_ce_mixed(student, labels, labels2, lam), labels, alpha)


# --- sparse targets ---------------------------------------------------------------------------------------
# A top-k row keeps the k largest ensemble values ``head`` [B, k] (row-centred log space, the dense store's
# ``logits`` restricted to the classes ``index`` [B, k]) and ``tail`` [B], the log-sum-exp of the C − k values
# it drops: at T = 1 the head's probabilities and the tail's total mass are exact. How the tail's mass is
# shared among its classes is lost; at T ≠ 1 it is taken as spread evenly over them (``tail_at``), an
# approximation that is exact at T = 1 and when the dropped classes were equally likely.
# A sampled row keeps ``index`` [B, k]: k classes drawn with replacement from the teacher's distribution at
# the temperature it was sampled at (Anshumann et al., 2025). −Σ (count/k)·log q is an unbiased estimate of
# the cross-entropy H(p, q), so its gradient is an unbiased estimate of the dense soft term's; it differs from
# KL(p ‖ q) by the teacher's entropy, a constant the student cannot change.


def tail_at(tail: torch.Tensor, num_tail: int, temperature: float) -> torch.Tensor:
    """[B] log-mass of the ``num_tail`` dropped classes at temperature T, their mass spread evenly:
    ``log n + (tail − log n) / T`` (exactly ``tail`` at T = 1; −inf when nothing was dropped)."""
    if num_tail <= 0:
        return torch.full_like(tail, float("-inf"))
    log_n = math.log(num_tail)
    return log_n + (tail - log_n) / temperature


def topk_teacher_logp(index: torch.Tensor, head: torch.Tensor, tail: torch.Tensor, num_classes: int,
                      temperature: float) -> torch.Tensor:
    """[B, k], [B, k], [B] -> [B, C] teacher log-probabilities at T with the tail spread evenly over the
    C − k classes outside the head ("spread"); with k = C it is the dense ``log_softmax(logits / T)``."""
    dtype = torch.promote_types(tail.dtype, torch.float32)
    n_tail = num_classes - index.shape[-1]
    if n_tail > 0:
        each = tail_at(tail.to(dtype), n_tail, temperature) - math.log(n_tail)
        full = each[:, None].expand(-1, num_classes).clone()
    else:
        full = torch.full((head.shape[0], num_classes), float("-inf"), dtype=dtype, device=head.device)
    full.scatter_(1, index.long(), head.to(dtype) / temperature)
    return F.log_softmax(full, dim=-1)


def bucket_logps(student: torch.Tensor, index: torch.Tensor, head: torch.Tensor, tail: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, C] student logits and a top-k store's [N, k] classes, [N, k] values and [N] tail log-sum-exp ->
    the teacher's and the student's log-probabilities over k + 1 buckets at T ([N, k + 1] each): the kept
    classes one by one, then everything else as one bucket ("other", Megatron's "ghost token"), for teacher
    and student alike, so no assumption is made about how the tail's mass is shared."""
    c, k = student.shape[-1], index.shape[-1]
    dtype = torch.promote_types(student.dtype, torch.float32)
    logq = F.log_softmax(student.to(dtype) / temperature, dim=-1)
    logq_head = logq.gather(-1, index.long())
    if k < c:
        logq_other = torch.log1p(-torch.exp(torch.logsumexp(logq_head, dim=-1)).clamp(max=1 - 1e-7))
    else:
        logq_other = torch.full_like(logq_head[:, 0], float("-inf"))
    tail_t = tail_at(tail.to(dtype), c - k, temperature)
    logp = F.log_softmax(torch.cat([head.to(dtype) / temperature, tail_t[:, None]], dim=-1), dim=-1)
    return logp, torch.cat([logq_head, logq_other[:, None]], dim=-1)


def sampled_ce(student: torch.Tensor, index: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B] ``T² · (−1/k) Σ_j log q(index_j)``: the sampled estimate of ``T² · H(p, q)``, unbiased when the k
    classes were drawn from the teacher's distribution at this T (duplicates count as often as drawn)."""
    logq = F.log_softmax(student.to(torch.promote_types(student.dtype, torch.float32)) / temperature, dim=-1)
    return -temperature**2 * logq.gather(1, index.long()).mean(dim=-1)


# --- hints (FitNets) ---------------------------------------------------------------------------------------
def hint_loss(regressed: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FitNets' hint loss ``½·‖r(v) − u‖²`` per row, averaged over the layer's values (so layers of any size
    weigh alike) and over rows: ``regressed`` is the regressor's output on the student's guided layer,
    ``target`` the teacher's stored hint features, same shape [B, ...]."""
    if regressed.shape != target.shape:
        raise ValueError(f"hint: the regressor gives {tuple(regressed.shape)}, the stored features are "
                         f"{tuple(target.shape)}")
    d = regressed.float() - target.float()
    return 0.5 * (d * d).flatten(1).mean(dim=1).mean()
