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

**Local members beside engines.** A teacher run by darkstore gives every token's value. The candidates are then
the engines' returned tokens and the top K of the local members' own combination (a token no engine returned
ranks by that), and the tokens outside them take the local members' exact values beside the engines' estimates.
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
                    k: int, rule: str, dense: list[np.ndarray] = (), dense_labels: list[np.ndarray] = ()
                    ) -> Combined:
    """The members' answers at n positions as the ensemble's K kept entries and tail (see the module's
    docstring): engines' top-K (``ids``/``logp`` [n, K] each, ``labels`` [n] each), and local members' whole
    log-probabilities ``dense`` [n, V] each (exact at every token; ``dense_labels`` [n] each)."""
    floor = tail_floor(k)
    tails, floored = [], 0
    for lp in logp:
        t, f = tail_mass(lp, floor)
        tails.append(t)
        floored += f
    if len(ids) == 1 and not dense:
        return Combined(ids[0], logp[0], tails[0], labels[0], np.zeros(len(labels[0])), floored)
    if dense:  # a token no engine returned ranks by the local members' combination: its top K are candidates
        ids = [*ids, np.argpartition(-_mean(np.stack(dense), rule), k - 1, axis=1)[:, :k]]
    estimates = np.stack([np.minimum(lp.min(1), t - math.log(max(vocab - k, 1))) for lp, t in zip(logp, tails)]) \
        if logp else np.zeros((0, len(ids[0])))
    cand, values, known = _union_values(ids[:len(logp)], logp, estimates, vocab, np.concatenate(ids, axis=1))
    values = np.concatenate([values, [np.take_along_axis(d, cand, 1) for d in dense]]) if dense else values
    known = np.concatenate([known, np.ones((len(dense), *cand.shape), dtype=bool)]) if dense else known
    dup = _duplicates(cand)
    out = _outside(known[:len(logp)], dup, tails, estimates, vocab, rule, dense, cand)
    ell = _mean(values, rule)
    ell[dup] = -np.inf
    keep = np.argpartition(-ell, k - 1, axis=1)[:, :k]
    head = np.take_along_axis(ell, keep, 1)
    rest = ell.copy()
    np.put_along_axis(rest, keep, -np.inf, 1)
    tail = logsumexp(np.concatenate([rest, out[:, None]], 1), axis=1)
    log_z = logsumexp(np.concatenate([ell, out[:, None]], 1), axis=1)
    low = ~(tail - log_z >= floor)
    tail = np.where(low, log_z + floor, tail)
    estimated = int((~np.take_along_axis(known.all(0), keep, 1)).sum())
    label = _mean(np.stack([*labels, *dense_labels])[:, :, None], rule)[:, 0]
    return Combined(np.take_along_axis(cand, keep, 1), head, tail, label, log_z, floored + int(low.sum()), estimated)


def _union_values(ids, logp, estimates, vocab, cand):
    """[M, n, C] each engine member's log-probability of each candidate token ``cand`` [n, C]: returned, or its
    estimate ``estimates`` [M, n]; with whether it was returned."""
    n = len(cand)
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
    """[n, C] True at every repeat of a token already listed earlier in its row."""
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


def _outside(known, dup, tails, estimates, vocab, rule, dense, cand) -> np.ndarray:
    """[n] the log-sum-exp of the combined values of the tokens outside the union U. Geometric: each such token
    takes every engine's estimate and every local member's own value. Arithmetic: each engine's tail less its
    estimates for the tokens of U it did not return (the rest of its mass), and each local member's mass
    outside U, averaged."""
    m = len(estimates) + len(dense)
    if dense:
        outside = [d.copy() for d in dense]
        for o in outside:
            np.put_along_axis(o, cand, -np.inf, 1)
    if rule != "arithmetic":
        if dense:
            return estimates.sum(0) / m + logsumexp(sum(outside) / m, axis=1)
        with np.errstate(divide="ignore"):
            return estimates.mean(0) + np.log(np.maximum(vocab - (~dup).sum(1), 0).astype(np.float64))
    unknown = ((~known) & ~dup[None]).sum(2)  # [engines, n]
    with np.errstate(divide="ignore", invalid="ignore"):
        left = [np.log(np.maximum(np.exp(t) - u * np.exp(e), 0.0)) for t, u, e in zip(tails, unknown, estimates)]
    return logsumexp(np.stack([*left, *(logsumexp(o, axis=1) for o in outside)] if dense else left), axis=0) \
        - math.log(m)
