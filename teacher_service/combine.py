"""Combine ensemble members' logits into one target, in log space.

Pure tensor functions. ``z`` is ``[M, B, C]`` (members, rows, classes).

- geometric: ``ℓ = mean_m z_m``. ``softmax(ℓ / T)`` is the renormalised geometric
  mean of the members' tempered distributions at *every* T.
- arithmetic: ``ℓ = T_gen · log mean_m softmax(z_m / T_gen)``. ``softmax(ℓ / T_gen)``
  is the arithmetic mean of the members' distributions at ``T_gen`` exactly; at
  another T it is only a sharpening of it.

Both results are row-centred (row max subtracted): softmax is shift-invariant and
centred logits fit float16 best.
"""

from __future__ import annotations

import math

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


def combine(z: torch.Tensor, rule: str, temperature: float) -> torch.Tensor:
    if rule == "geometric":
        return geometric(z)
    if rule == "arithmetic":
        return arithmetic(z, temperature)
    raise ValueError(f"unknown combine rule {rule!r}")
