"""Combine ensemble members' logits into one target, in log space.

Pure tensor functions. ``z`` is ``[M, B, C]`` (members, rows, classes).

- geometric: ``ℓ = mean_m z_m``. ``softmax(ℓ / T)`` is the renormalised geometric
  mean of the members' tempered distributions at *every* T.
- arithmetic: ``ℓ = T_gen · log mean_m softmax(z_m / T_gen)``. ``softmax(ℓ / T_gen)``
  is the arithmetic mean of the members' distributions at ``T_gen`` exactly; at
  another T it is only a sharpening of it.

- specialists: a generalist and specialists on the classes it confuses (Hinton et al., 2015),
  ``ℓ = log q`` with q the distribution closest to all of them (:func:`specialists`); exact at T = 1.

All results are row-centred (row max subtracted): softmax is shift-invariant and
centred logits fit float16 best.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch


def centre(x: torch.Tensor) -> torch.Tensor:
    """Subtract each row's max over the last dimension."""
    return x - x.amax(dim=-1, keepdim=True)


def geometric(z: torch.Tensor) -> torch.Tensor:
    """[M, B, C] -> [B, C]: mean of member logits, row-centred."""
    return centre(z.mean(dim=0))


def arithmetic(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """[M, B, C] -> [B, C]: ``T · log mean_m softmax(z_m / T)``, row-centred."""
    logp = torch.log_softmax(z / temperature, dim=-1)
    return centre(temperature * (torch.logsumexp(logp, dim=0) - math.log(z.shape[0])))


def specialists(z: torch.Tensor, record: Any, names: Sequence[str]) -> torch.Tensor:
    """[M, B, C] -> [B, C]: the generalist (its logits) and specialists (their log-probabilities spread over
    the C classes, :class:`~teacher_service.prepared.Ensemble`) combined as in Hinton et al. (2015), section 5:
    ``log q``, q minimising KL(p_g ‖ q) + Σ_active KL(p_m ‖ q_m) (:mod:`teacher_service.specialists`), in
    float64 on the device, row-centred."""
    from .specialists import SpecialistSets, active_specialists, combine_specialists

    at = {n: i for i, n in enumerate(names)}
    zz = z.double()
    p_g = torch.softmax(zz[at[record.generalist]], dim=-1)
    sets = SpecialistSets.of([s.classes for s in record.specialists], z.shape[-1], device=z.device)
    p_s = []
    for s in record.specialists:
        logp = torch.log_softmax(zz[at[s.name]], dim=-1)  # already normalised; again against rounding
        inside = logp[:, s.classes].exp()
        p_s.append(torch.cat([inside, (1.0 - inside.sum(1, keepdim=True)).clamp_min(0.0)], dim=1))
    q = combine_specialists(p_g, p_s, sets, active_specialists(p_g, sets, record.top_n), tol=1e-9)
    return centre(torch.log(q.clamp_min(1e-300))).float()


def combine(z: torch.Tensor, rule: str, temperature: float, record: Any = None,
            names: Sequence[str] = ()) -> torch.Tensor:
    if rule == "geometric":
        return geometric(z)
    if rule == "arithmetic":
        return arithmetic(z, temperature)
    if rule == "specialists":
        return specialists(z, record, names)
    raise ValueError(f"unknown combine rule {rule!r}")
