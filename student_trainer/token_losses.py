"""Per-token distillation losses for language-model students, as pure tensor functions.

A sequence store keeps, at every position of every row, the teachers' distribution over the next token in
one *form* (:mod:`storage.forms`): ``dense`` (every token's value), ``topk`` (the K largest values, their
tokens and the log-sum-exp of the rest) or ``sampled`` (K tokens drawn from the distribution at one T). At a
position with a loss, with ``p`` the teachers' distribution at T and ``q = softmax(student / T)``:

``α · T² · D(p, q) + (1 − α) · CE(student, next token)``

averaged over the positions that carry a loss (the stored loss mask: padding and prompts carry none). ``D``:

===========  =======================================================  =====================================
divergence   D(p, q)                                                  forms
===========  =======================================================  =====================================
``forward``  KL(p ‖ q) (Hinton's)                                     all (sampled: its unbiased estimate)
``reverse``  KL(q ‖ p) (mode-seeking)                                 dense, top-k
``jsd``      ½ KL(p ‖ m) + ½ KL(q ‖ m), m = ½ (p + q)                  dense, top-k
===========  =======================================================  =====================================

A top-k store is read one of two ways (``topk_loss``): ``bucket`` compares the K kept tokens one by one and
everything else as one bucket, for teacher and student alike (no assumption about how the tail's mass is
shared; Megatron's "ghost token"); ``spread`` spreads the tail's mass evenly over the tokens left out and
compares whole distributions. A sampled store gives ``−(1/K) Σ log q(token_j)``: an unbiased estimate of the
cross-entropy H(p, q), whose gradient is the forward KL's (Anshumann et al., 2025).

Memory: the student's logits over positions × vocabulary are made a slice of positions at a time
(:func:`sliced_loss`); where more than one slice is needed, each slice's logits are recomputed in the
backward pass instead of kept, so memory holds one slice's, whatever the vocabulary and the length.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import losses

DIVERGENCES = ("forward", "reverse", "jsd")
#: the most float32 student logits one slice of positions holds (the loss's working set is a few times this)
SLICE_BYTES = 32 << 20


def divergence(logp: torch.Tensor, logq: torch.Tensor, kind: str) -> torch.Tensor:
    """[N, C], [N, C] log-probabilities of the teacher (p) and the student (q) -> [N] ``D(p, q)``."""
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


def bucket_logps(student: torch.Tensor, index: torch.Tensor, head: torch.Tensor, tail: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, V] student logits and a top-k store's [N, K] tokens, [N, K] values and [N] tail log-sum-exp ->
    the teacher's and the student's log-probabilities over K + 1 buckets at T ([N, K + 1] each): the kept
    tokens one by one, then everything else."""
    v, k = student.shape[-1], index.shape[-1]
    logq = F.log_softmax(student / temperature, dim=-1)
    logq_head = logq.gather(-1, index.long())
    if k < v:
        logq_other = torch.log1p(-torch.exp(torch.logsumexp(logq_head, dim=-1)).clamp(max=1 - 1e-7))
    else:
        logq_other = torch.full_like(logq_head[:, 0], float("-inf"))
    tail_t = losses.tail_at(tail.to(student.dtype), v - k, temperature)
    logp = F.log_softmax(torch.cat([head.to(student.dtype) / temperature, tail_t[:, None]], dim=-1), dim=-1)
    return logp, torch.cat([logq_head, logq_other[:, None]], dim=-1)


def soft_term(student: torch.Tensor, targets: dict[str, torch.Tensor], *, form: str, temperature: float,
              kind: str = "forward", teacher_logp: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> torch.Tensor:
    """[N] ``T² · D(p, q)`` at N positions. ``form``: ``dense`` (``targets["logits"]`` [N, V], turned into the
    teacher's log-probabilities at T by ``teacher_logp``, the store's re-temperature plan), ``topk-bucket``,
    ``topk-spread`` (``topk_index``, ``head`` as floats, ``tail_lse``) or ``sampled`` (``sample_index``)."""
    t = temperature
    if form == "sampled":
        if kind != "forward":
            raise ValueError("sampled targets estimate the forward KL only (a sample says nothing of log p)")
        return losses.sampled_ce(student, targets["sample_index"], t)
    if form == "topk-bucket":
        logp, logq = bucket_logps(student, targets["topk_index"], targets["head"], targets["tail_lse"], t)
    else:
        if form == "topk-spread":
            logp = losses.topk_teacher_logp(targets["topk_index"], targets["head"], targets["tail_lse"],
                                            student.shape[-1], t)
        elif form == "dense":
            logp = teacher_logp(targets["logits"])
        else:
            raise ValueError(f"unknown per-token target form {form!r}")
        logq = F.log_softmax(student / t, dim=-1)
    return t * t * divergence(logp, logq, kind)


def position_losses(student: torch.Tensor, labels: torch.Tensor, targets: dict[str, torch.Tensor], *, form: str,
                    temperature: float, alpha: float, kind: str = "forward",
                    teacher_logp: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """[N, V] student logits (float32 or wider), [N] next tokens -> [N] ``α · T² · D(p, q) + (1 − α) · CE`` per position
    (every position given carries a loss; :func:`sliced_loss` picks them)."""
    hard = F.cross_entropy(student, labels, reduction="none")
    if alpha == 0:
        return hard
    soft = soft_term(student, targets, form=form, temperature=temperature, kind=kind, teacher_logp=teacher_logp)
    return soft if alpha == 1 else alpha * soft + (1 - alpha) * hard


def slice_positions(vocab: int, slice_bytes: int = SLICE_BYTES) -> int:
    """Positions in one slice: as many as ``slice_bytes`` of float32 logits over ``vocab`` tokens hold."""
    return max(1, slice_bytes // (4 * vocab))


def sliced_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                targets: dict[str, torch.Tensor], *, vocab: int, slice_bytes: int = SLICE_BYTES,
                **options) -> torch.Tensor:
    """The mean of :func:`position_losses` over the positions with a loss (``labels`` ≥ 0).

    ``hidden`` [B, L, H]: the student's hidden states; ``head`` maps [n, H] to [n, V] logits; ``labels``
    [B, L] the next tokens (−1: no loss); ``targets`` the stored per-position fields [B, L, ...]. Positions
    without a loss are dropped before the head runs. Where the positions' logits exceed ``slice_bytes`` they
    are made a slice at a time, each slice recomputed in the backward pass (activation checkpointing)."""
    keep = (labels >= 0).flatten().nonzero().squeeze(1)
    n = len(keep)
    if n == 0:
        return hidden.sum() * 0.0  # no position carries a loss: a zero that still reaches every parameter
    h = hidden.flatten(0, 1).index_select(0, keep)
    y = labels.flatten().index_select(0, keep)
    t = {k: v.flatten(0, 1).index_select(0, keep) for k, v in targets.items()}

    def part(h_s: torch.Tensor, y_s: torch.Tensor, t_s: dict[str, torch.Tensor]) -> torch.Tensor:
        z = head(h_s)
        return position_losses(z.to(torch.promote_types(z.dtype, torch.float32)), y_s, t_s, **options).sum()

    step = slice_positions(vocab, slice_bytes)
    if n <= step:
        return part(h, y, t) / n
    total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
    for a in range(0, n, step):
        b = min(n, a + step)
        total = total + checkpoint(part, h[a:b], y[a:b], {k: v[a:b] for k, v in t.items()}, use_reentrant=False)
    return total / n
