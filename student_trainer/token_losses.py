"""Per-token distillation losses for language-model students, as pure tensor functions.

A sequence store keeps, at every position of every row, the teachers' distribution over the next token in
one *form* (:mod:`storage.forms`): ``dense`` (every token's value), ``topk`` (the K largest values, their
tokens and the log-sum-exp of the rest) or ``sampled`` (K tokens drawn from the distribution at one T). At a
position with a loss, with ``p`` the teachers' distribution at T and ``q = softmax(student / T)``:

``α · T² · D(p, q) + (1 − α) · CE(student, next token)``

averaged over the positions that carry a loss (the stored loss mask: padding and prompts carry none). The
soft term is the store's form's (:mod:`.forms`, the same for classes and tokens). ``D``:

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

from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .forms import SoftTerm

#: the most float32 student logits one slice of positions holds (the loss's working set is a few times this)
SLICE_BYTES = 32 << 20


def position_losses(student: torch.Tensor, labels: torch.Tensor, targets: dict[str, torch.Tensor], *,
                    soft: SoftTerm | None, alpha: float) -> torch.Tensor:
    """[N, V] student logits (float32 or wider), [N] next tokens, the decoded targets [N, ...] -> [N]
    ``α · T² · D(p, q) + (1 − α) · CE`` per position, ``soft`` the run's soft term (:mod:`.forms`; every
    position given carries a loss: :func:`sliced_loss` picks them)."""
    hard = F.cross_entropy(student, labels, reduction="none")
    if alpha == 0:
        return hard
    term = soft(student, targets)
    return term if alpha == 1 else alpha * term + (1 - alpha) * hard


def slice_positions(vocab: int, slice_bytes: int = SLICE_BYTES) -> int:
    """Positions in one slice: as many as ``slice_bytes`` of float32 logits over ``vocab`` tokens hold."""
    return max(1, slice_bytes // (4 * vocab))


def sliced_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                targets: dict[str, torch.Tensor], *, vocab: int, slice_bytes: int = SLICE_BYTES,
                **options) -> torch.Tensor:
    """The mean of :func:`position_losses` over the positions with a loss (``labels`` ≥ 0).

    ``hidden`` [B, L, H]: the student's hidden states; ``head`` maps [n, H] to [n, V] logits; ``labels``
    [B, L] the next tokens (−1: no loss); ``targets`` the decoded per-position targets [B, L, ...]. Positions
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
