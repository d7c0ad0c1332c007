"""What engines' top-K log-probabilities become in a store: the tail's mass, an ensemble's combination over
the tokens the members returned, and a chunk's statistics.

**One member.** The K returned log-probabilities are the head, exactly; the tail's mass is
``log1p(-Σ exp(logp))`` in float64. The engine computes in float32, so its K values sum to 1 only within
about K · 2⁻²⁴: a tail below :func:`tail_floor` is not resolved and is stored at the floor (counted per chunk
in ``engine_counts``).

**Several members.** Each member returns its own top-K set S_j; only their union U is known. For a token of U
that member j did not return, its log-probability is at most the smallest one it returned and, spread evenly,
its tail's mass over the V − K tokens it left out: the estimate is the smaller of the two. Then

- where every member returned a token, its combined value is exact (the geometric mean of the members'
  log-probabilities, or the log of the mean of their probabilities);
- where some member did not, the combined value uses that member's estimate: an upper bound of the member's
  value, replaced by its even share (counted per chunk in ``engine_counts``);
- the tokens outside U take each member's even share; with the tokens of U that were not kept they make the
  tail. The arithmetic mean's tail mass is exact up to those estimates; the geometric mean's is an estimate.

The label's combined value is exact (every member returns the actual next token), so the ensemble's NLL is
exact up to its normaliser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import logsumexp


def tail_floor(k: int) -> float:
    """log of the smallest tail mass that K float32 log-probabilities resolve: K · 2⁻²⁴."""
    return math.log(max(k, 1) * 2.0 ** -24)


def tail_mass(logp: np.ndarray, floor: float) -> tuple[np.ndarray, int]:
    """[...] log of 1 − Σ exp(logp) over the last axis, computed stably, at least ``floor``; and how many were
    below it."""
    total = np.exp(logp).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        tail = np.log1p(-np.minimum(total, 1.0))
    low = ~(tail >= floor)
    return np.where(low, floor, tail), int(low.sum())


@dataclass
class Combined:
    """Positions' kept entries (``idx``, ``head`` [n, K]) and ``tail`` [n], in the same log space; the label's
    value ``label`` [n] and the log-sum-exp of everything ``log_z`` [n] (for the statistics); and the counts of
    floored tails and estimated kept entries."""

    idx: np.ndarray
    head: np.ndarray
    tail: np.ndarray
    label: np.ndarray
    log_z: np.ndarray
    floored: int = 0
    estimated: int = 0


def combine_members(ids: list[np.ndarray], logp: list[np.ndarray], labels: list[np.ndarray], *, vocab: int,
                    k: int, rule: str) -> Combined:
    """The members' top-K answers at n positions (``ids``/``logp`` [n, K] each, ``labels`` [n] each) as the
    ensemble's K kept entries and tail (see the module's docstring)."""
    floor = tail_floor(k)
    tails = []
    floored = 0
    for lp in logp:
        t, f = tail_mass(lp, floor)
        tails.append(t)
        floored += f
    if len(ids) == 1:
        return Combined(ids[0], logp[0], tails[0], labels[0], np.zeros(len(labels[0])), floored)
    estimates = np.stack([np.minimum(lp.min(1), t - math.log(max(vocab - k, 1))) for lp, t in zip(logp, tails)])
    cand, values, known = _union_values(ids, logp, estimates, vocab)
    dup = _duplicates(cand)
    out = _outside(known, dup, tails, estimates, vocab, rule)
    ell = _mean(values, rule)
    ell[dup] = -np.inf
    keep = np.argpartition(-ell, k - 1, axis=1)[:, :k]
    head = np.take_along_axis(ell, keep, 1)
    rest = ell.copy()
    np.put_along_axis(rest, keep, -np.inf, 1)
    tail = logsumexp(np.concatenate([rest, out[:, None]], 1), axis=1)
    low = ~(tail - logsumexp(np.concatenate([ell, out[:, None]], 1), axis=1) >= floor)
    log_z = logsumexp(np.concatenate([ell, out[:, None]], 1), axis=1)
    tail = np.where(low, log_z + floor, tail)
    estimated = int((~np.take_along_axis(known.all(0), keep, 1)).sum())
    label = _mean(np.stack(labels)[:, :, None], rule)[:, 0]
    return Combined(np.take_along_axis(cand, keep, 1), head, tail, label, log_z, floored + int(low.sum()), estimated)


def _union_values(ids, logp, estimates, vocab):
    """[n, M·K] every member's returned tokens side by side, and [M, n, M·K] each member's log-probability of
    each of them: returned, or its estimate ``estimates`` [M, n]; with whether it was returned."""
    n, k = ids[0].shape
    cand = np.concatenate(ids, axis=1)
    rows = np.arange(n)[:, None]
    values = np.empty((len(ids), n, cand.shape[1]))
    known = np.empty(values.shape, dtype=bool)
    for j, (i_j, lp_j, estimate) in enumerate(zip(ids, logp, estimates)):
        order = np.argsort(i_j, axis=1)
        keys = (rows * vocab + np.take_along_axis(i_j, order, 1)).ravel()
        sorted_lp = np.take_along_axis(lp_j, order, 1).ravel()
        q = rows * vocab + cand
        at = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        known[j] = keys[at] == q
        values[j] = np.where(known[j], sorted_lp[at], estimate[:, None])
    return cand, values, known


def _duplicates(cand: np.ndarray) -> np.ndarray:
    """[n, M·K] True at every repeat of a token already listed earlier in its row."""
    order = np.argsort(cand, axis=1, kind="stable")
    s = np.take_along_axis(cand, order, 1)
    repeat = np.zeros(cand.shape, dtype=bool)
    repeat[:, 1:] = s[:, 1:] == s[:, :-1]
    dup = np.zeros(cand.shape, dtype=bool)
    np.put_along_axis(dup, order, repeat, 1)
    return dup


def _mean(values: np.ndarray, rule: str) -> np.ndarray:
    """The members' combination of log-probabilities [M, ...]: the mean (geometric) or the log of the mean
    probability (arithmetic)."""
    if rule == "arithmetic":
        return logsumexp(values, axis=0) - math.log(len(values))
    return values.mean(0)


def _outside(known, dup, tails, estimates, vocab, rule) -> np.ndarray:
    """[n] the log-sum-exp of the combined values of the tokens outside the union U: each takes every member's
    estimate (geometric); or each member's tail less its estimates for the tokens of U it did not return, the
    rest of its mass, averaged (arithmetic)."""
    with np.errstate(divide="ignore"):
        log_out = np.log(np.maximum(vocab - (~dup).sum(1), 0).astype(np.float64))
    if rule != "arithmetic":
        return estimates.mean(0) + log_out
    unknown = ((~known) & ~dup[None]).sum(2)  # [M, n]
    with np.errstate(divide="ignore", invalid="ignore"):
        left = np.log(np.maximum(np.exp(np.stack(tails)) - unknown * np.exp(estimates), 0.0))
    return logsumexp(left, axis=0) - math.log(len(estimates))
