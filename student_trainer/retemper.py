"""Re-temperature stored targets on the fly, and say whether it is exact.

=====================  ==============  =========================================
store                  T at training   target used                    exact?
=====================  ==============  =========================================
geometric              any             softmax(ℓ / T)                 yes
arithmetic             T == T_gen      softmax(ℓ / T)                 yes
arithmetic + members   any             mean_m softmax(z_m / T)        yes
arithmetic             T != T_gen      softmax(ℓ / T)                 no: a sharpened
                                                                       (T<T_gen) or flattened
                                                                       arithmetic mean
=====================  ==============  =========================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from storage import StoreMeta
from storage.forms import form_of


@dataclass(frozen=True)
class Retemper:
    temperature: float
    mode: str  # "geometric" | "arithmetic@T_gen" | "arithmetic-members" | "arithmetic-approx" | "topk" | "sampled"
    #            | "specialists" | "unused" (an objective that reads no targets)
    exact: bool
    note: str = ""  # sparse targets: what the form keeps

    @property
    def needs_members(self) -> bool:
        return self.mode == "arithmetic-members"

    def __call__(self, logits: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher log-probabilities at ``temperature``: logits [B, C] (members [B, M, C]) -> [B, C]."""
        t = self.temperature
        if self.needs_members:
            if members is None:
                raise ValueError("exact arithmetic re-temperature needs the members' logits")
            logp = torch.log_softmax(members.float() / t, dim=-1)
            return torch.logsumexp(logp, dim=1) - math.log(members.shape[1])
        return torch.log_softmax(logits.float() / t, dim=-1)

    def describe(self) -> str:
        if self.note:  # what a sparse form, specialists or an unused plan give, in their words
            return self.note
        return {
            "geometric": f"geometric mean re-tempered to T={self.temperature:g}: exact",
            "arithmetic@T_gen": f"arithmetic mean at its generation temperature T={self.temperature:g}: exact",
            "arithmetic-members": f"arithmetic mean re-mixed from stored members at T={self.temperature:g}: exact",
            "arithmetic-approx": (
                f"APPROXIMATE: arithmetic-mean store re-tempered to T={self.temperature:g} without members; "
                "this is a sharpened/flattened mean, not mean_m softmax(z_m/T). Generate with --keep-members "
                "or at this temperature for exact targets"
            ),
        }[self.mode]


def unused(temperature: float) -> Retemper:
    """The plan of a run whose objective never reads the stored targets (hard labels only)."""
    return Retemper(temperature, "unused", True, "the stored targets are not used (hard labels only)")


def plan(meta: StoreMeta, temperature: float, *, use_members: bool | None = None) -> Retemper:
    """Choose the most exact re-temperature the store allows (sparse stores: say what their form gives)."""
    said = form_of(meta).retemper(meta, temperature)
    if said is not None:  # a sparse form says what it gives at this T
        return Retemper(temperature, meta.target_form, said[0], said[1])
    if meta.specialist_of is not None:
        exact = math.isclose(temperature, 1.0)
        return Retemper(temperature, "specialists", exact, (
            "the generalist's distribution collapsed onto the specialist's classes and dustbin at T=1: exact"
            if exact else
            f"APPROXIMATE: the generalist's distribution was collapsed onto the specialist's classes at T=1; at "
            f"T={temperature:g} the collapsed distribution is re-tempered, which is not the collapse of the "
            "generalist's softened distribution"))
    if meta.combine == "geometric":
        return Retemper(temperature, "geometric", True)
    if meta.combine == "specialists":
        exact = math.isclose(temperature, 1.0)
        n = len(meta.specialists.specialists) if meta.specialists else 0
        return Retemper(temperature, "specialists", exact, (
            f"the generalist and {n} specialists combined at T=1 (the distribution closest to all of them): exact"
            if exact else
            f"APPROXIMATE: the generalist and {n} specialists were combined at T=1; at T={temperature:g} the "
            "combined distribution is raised to the power 1/T and renormalised, which is not the combination of "
            "softened members (each member's softened output would need its own store)"))
    if math.isclose(temperature, meta.temperature, rel_tol=1e-9):
        return Retemper(temperature, "arithmetic@T_gen", True)
    if meta.keep_members and use_members is not False:
        return Retemper(temperature, "arithmetic-members", True)
    return Retemper(temperature, "arithmetic-approx", False)
