"""Hinton, Vinyals & Dean's generalist + specialists, combined into one distribution per row.

A *specialist* m predicts a subset S_m of the classes plus one "dustbin" class for everything else. For a
row, the specialists whose subsets meet the generalist's top-n classes are *active*, and the combined
distribution q over all C classes minimises

    KL(p_g ‖ q) + Σ_{m active} KL(p_m ‖ q_m),     q_m = (q[S_m], Σ_{k ∉ S_m} q[k])

(the paper's eq. in section 5.1; q_m is q seen through specialist m's classes and its dustbin). Dropping
the terms that do not depend on q, this maximises Σ_t w_t log q(A_t): a weighted log-likelihood of "coarse"
observations, each a set of classes A_t (a single class, or a dustbin's complement) with weight w_t — the
generalist's and every active specialist's probabilities. It is concave in q on the simplex, and the EM
update for such coarse observations,

    q_k ← (1/W) Σ_t w_t · [k ∈ A_t] · q_k / q(A_t),     W = Σ_t w_t = 1 + #active,

increases it at every step and converges to the maximum (the generalist's term keeps every q_k with
p_g[k] > 0 away from zero). :func:`combine_specialists` runs it batched on the device; the tests check the
result against an independent float64 minimisation of the same objective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from darkstore.errors import SpecError
from storage.forms import form_of


@dataclass(frozen=True)
class SpecialistSets:
    """The specialists' class subsets, laid out for batched work: ``index`` [L] every specialist's classes
    concatenated, ``owner`` [L] which specialist each belongs to, ``sizes`` [S]."""

    index: torch.Tensor
    owner: torch.Tensor
    sizes: torch.Tensor
    num_classes: int

    @classmethod
    def of(cls, subsets: Sequence[Sequence[int]], num_classes: int,
           device: str | torch.device = "cpu") -> "SpecialistSets":
        if not subsets:
            raise ValueError("no specialists")
        for m, s in enumerate(subsets):
            if len(s) < 1 or len(set(s)) != len(s):
                raise ValueError(f"specialist {m}: its classes must be distinct and at least one")
            if min(s) < 0 or max(s) >= num_classes:
                raise ValueError(f"specialist {m}: classes must lie in [0, {num_classes})")
            if len(s) >= num_classes:
                raise ValueError(f"specialist {m} covers every class: its dustbin would be empty")
        index = torch.tensor([k for s in subsets for k in s], dtype=torch.int64, device=device)
        owner = torch.tensor([m for m, s in enumerate(subsets) for _ in s], dtype=torch.int64, device=device)
        sizes = torch.tensor([len(s) for s in subsets], dtype=torch.int64, device=device)
        return cls(index, owner, sizes, num_classes)

    @property
    def count(self) -> int:
        return len(self.sizes)

    def to(self, device: str | torch.device) -> "SpecialistSets":
        return SpecialistSets(self.index.to(device), self.owner.to(device), self.sizes.to(device), self.num_classes)


def active_specialists(p_generalist: torch.Tensor, sets: SpecialistSets, top_n: int) -> torch.Tensor:
    """[B, S] bool: the specialists whose classes meet the generalist's ``top_n`` most probable classes."""
    top = p_generalist.topk(min(top_n, p_generalist.shape[-1]), dim=-1).indices  # [B, n]
    in_top = torch.zeros_like(p_generalist, dtype=torch.bool).scatter_(1, top, True)  # [B, C]
    hit = in_top[:, sets.index].to(torch.int64)  # [B, L]
    counts = torch.zeros(len(p_generalist), sets.count, dtype=torch.int64, device=p_generalist.device)
    counts.index_add_(1, sets.owner, hit)
    return counts > 0


def combine_specialists(p_generalist: torch.Tensor, p_specialists: Sequence[torch.Tensor], sets: SpecialistSets,
                        active: torch.Tensor, *, iterations: int = 500, tol: float = 1e-7) -> torch.Tensor:
    """[B, C] the combined distribution q (probabilities; see the module's docstring).

    ``p_generalist`` [B, C] the generalist's probabilities; ``p_specialists[m]`` [B, |S_m| + 1] specialist m's,
    its dustbin last; ``active`` [B, S] which specialists take part in each row (a row with none is the
    generalist's own distribution). Runs EM until no probability moves by more than ``tol`` (relative to the
    row's largest) or ``iterations`` steps, in the inputs' dtype, on their device."""
    b, c = p_generalist.shape
    if c != sets.num_classes or len(p_specialists) != sets.count:
        raise ValueError(f"{c} generalist classes and {len(p_specialists)} specialists do not match the sets "
                         f"({sets.num_classes} classes, {sets.count} specialists)")
    dtype = p_generalist.dtype
    act = active.to(dtype)  # [B, S]
    # in-subset probabilities of every specialist, concatenated like sets.index: [B, L]; dustbins [B, S]
    p_in = torch.cat([p[:, :-1] for p in p_specialists], dim=1)
    dust = torch.stack([p[:, -1] for p in p_specialists], dim=1)
    # the single-class observations: the generalist's, and each active specialist's own classes
    a = p_generalist.clone()
    a.index_add_(1, sets.index, p_in * act[:, sets.owner])
    weight = 1.0 + act.sum(1, keepdim=True)  # [B, 1] Σ_t w_t
    d = dust * act  # [B, S] the dustbins' weights (0 where inactive)
    q = (a / weight).clamp_min(torch.finfo(dtype).tiny)
    q = q / q.sum(1, keepdim=True)
    if not bool(d.gt(0).any()):
        return q
    for _ in range(iterations):
        inside = torch.zeros(b, sets.count, dtype=dtype, device=q.device)
        inside.index_add_(1, sets.owner, q[:, sets.index])
        outside = (1.0 - inside).clamp_min(torch.finfo(dtype).tiny)  # q(complement of S_m)
        r = d / outside  # [B, S]: each dustbin's weight per unit of the mass it covers
        r_in = torch.zeros_like(q).index_add_(1, sets.index, r[:, sets.owner])  # Σ over specialists holding k
        new = (a + q * (r.sum(1, keepdim=True) - r_in)) / weight
        new = new / new.sum(1, keepdim=True)
        moved = float(((new - q).abs().amax(1) / new.amax(1)).max())
        q = new
        if moved <= tol:
            break
    return q


def objective(q: torch.Tensor, p_generalist: torch.Tensor, p_specialists: Sequence[torch.Tensor],
              sets: SpecialistSets, active: torch.Tensor) -> torch.Tensor:
    """[B] KL(p_g ‖ q) + Σ_active KL(p_m ‖ q_m), the quantity :func:`combine_specialists` minimises."""
    def kl(p: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - r.clamp_min(1e-300).log()), 0).sum(1)

    total = kl(p_generalist, q)
    start = 0
    for m, p in enumerate(p_specialists):
        idx = sets.index[start:start + int(sets.sizes[m])]
        start += int(sets.sizes[m])
        q_in = q[:, idx]
        q_m = torch.cat([q_in, (1 - q_in.sum(1, keepdim=True)).clamp_min(0)], dim=1)
        total = total + active[:, m].to(q.dtype) * kl(p, q_m)
    return total


# --- planning: which classes each specialist takes --------------------------------------------------------
@dataclass
class Plan:
    """Specialists' class subsets from a generalist's store (:func:`plan_specialists`)."""

    store: str
    job_key: str
    num_classes: int
    class_names: list[str] | None
    seed: int
    subsets: list[list[int]]  # one per specialist, sorted, at least ``min_size`` classes each
    uncovered: list[int]  # classes no specialist takes (clusters smaller than min_size)
    confused: list[dict]  # the most confused pairs: classes, how often one is the other's runner-up

    def name(self, k: int) -> str:
        return self.class_names[k] if self.class_names else str(k)

    def to_json(self) -> dict:
        return {
            "generalist_store": self.store, "generalist_job_key": self.job_key, "num_classes": self.num_classes,
            "method": "k-means (seeded) on the columns of the correlation matrix of the generalist's predicted "
                      "distributions",
            "seed": self.seed,
            "specialists": [{"name": f"specialist-{i}", "classes": s, "class_names": [self.name(k) for k in s],
                             "size": len(s)} for i, s in enumerate(self.subsets)],
            "uncovered": self.uncovered, "confused_pairs": self.confused,
        }


def prediction_covariance(chunks) -> tuple[np.ndarray, np.ndarray]:
    """(covariance [C, C], runner-up counts [C, C]) of the generalist's predicted distributions (softmax of
    the stored logits, float64), accumulated chunk by chunk: no more than one chunk and two C×C sums in
    memory. ``runner_up[i, j]`` counts rows whose top class is i and second is j."""
    n, s1, s2, runner = 0, None, None, None
    for logits in chunks:
        z = np.asarray(logits, dtype=np.float64)
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        if s1 is None:
            c = p.shape[1]
            s1, s2, runner = np.zeros(c), np.zeros((c, c)), np.zeros((c, c), dtype=np.int64)
        n += len(p)
        s1 += p.sum(0)
        s2 += p.T @ p
        top2 = np.argsort(-p, axis=1)[:, :2]
        np.add.at(runner, (top2[:, 0], top2[:, 1]), 1)
    if not n:
        raise ValueError("the store has no committed rows")
    mean = s1 / n
    return s2 / n - np.outer(mean, mean), runner


def plan_specialists(reader, num: int, *, seed: int = 0, min_size: int = 2, pairs: int = 10) -> Plan:
    """Cluster the classes the generalist confuses (Hinton et al. 2015, section 5: K-means on the columns of
    the covariance matrix of the generalist's predictions, here normalised to correlations) into ``num``
    groups; each group of at least ``min_size`` classes is one specialist's subset. Deterministic for a seed."""
    from sklearn.cluster import KMeans

    meta = reader.meta
    if not form_of(meta).every_class:
        raise SpecError(f"{reader.path} keeps {meta.targets} targets: planning needs a dense generalist store")
    c = meta.num_classes
    if not 1 <= num <= c:
        raise SpecError(f"--num {num}: between 1 and the store's {c} classes")
    cov, runner = prediction_covariance(ch.logits for ch in reader.iter_chunks())
    # the columns as correlations: raw covariance columns are dominated by each class's own variance (the
    # diagonal), so k-means would group classes by how often they are predicted, not by whom they are confused
    # with (measured on a planted structure: covariance columns merge groups, correlation columns recover them)
    sd = np.sqrt(np.clip(np.diag(cov), 1e-300, None))
    labels = KMeans(n_clusters=num, random_state=seed, n_init=10).fit_predict(cov / np.outer(sd, sd))
    groups = sorted((sorted(np.flatnonzero(labels == g).tolist()) for g in range(num)), key=lambda s: (-len(s), s))
    subsets = [s for s in groups if len(s) >= min_size and len(s) < c]
    covered = {k for s in subsets for k in s}
    sym = runner + runner.T
    iu = np.triu_indices(c, 1)
    order = np.argsort(-sym[iu], kind="stable")[:pairs]
    confused = [{"classes": [int(iu[0][i]), int(iu[1][i])], "runner_up_rows": int(sym[iu][i]),
                 "covariance": float(cov[iu[0][i], iu[1][i]])} for i in order if sym[iu][i] > 0]
    return Plan(str(reader.path), meta.job_key, c, meta.class_names, seed, subsets,
                sorted(set(range(c)) - covered), confused)


__all__ = ["Plan", "SpecialistSets", "active_specialists", "combine_specialists", "objective", "plan_specialists",
           "prediction_covariance"]
