"""Engines' top-K answers as a store keeps them (teacher_service.engines.capture), against the dense float64
distributions the answers are cut from."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import log_softmax, logsumexp

from teacher_service.engines.capture import combine_members, tail_floor, tail_mass

V, K, N = 300, 16, 64


def dense(seed: int, scale: float = 3.0) -> np.ndarray:
    """[N, V] float64 log-probabilities of a peaked distribution."""
    return log_softmax(np.random.default_rng(seed).normal(0, scale, (N, V)), axis=-1)


def answer(lp: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What an engine returns of ``lp``: the top-K ids and values, most likely first, and the labels' values."""
    ids = np.argsort(-lp, axis=1)[:, :K]
    return ids, np.take_along_axis(lp, ids, 1), lp[np.arange(N), labels]


@pytest.fixture
def labels():
    return np.random.default_rng(9).integers(0, V, N)


def test_one_member_keeps_its_values_and_the_exact_tail(labels):
    lp = dense(0)
    ids, top, lab = answer(lp, labels)
    c = combine_members([ids], [top], [lab], vocab=V, k=K, rule="geometric")
    assert np.array_equal(c.idx, ids) and np.array_equal(c.head, top)
    rest = lp.copy()
    np.put_along_axis(rest, ids, -np.inf, 1)
    np.testing.assert_allclose(c.tail, logsumexp(rest, axis=1), rtol=0, atol=1e-9)
    assert np.array_equal(c.label, lab) and c.floored == 0 and c.estimated == 0


def test_a_tail_below_float32_resolution_is_floored_and_counted():
    k = 4
    lp = np.log(np.array([[0.5, 0.25, 0.125, 0.125 - 1e-9], [0.4, 0.3, 0.2, 0.05]]))
    tail, floored = tail_mass(lp, tail_floor(k))
    assert floored == 1
    assert tail[0] == tail_floor(k) == pytest.approx(math.log(4 * 2.0 ** -24))
    assert tail[1] == pytest.approx(math.log(0.05), abs=1e-12)


@pytest.mark.parametrize("rule", ["geometric", "arithmetic"])
def test_identical_members_combine_to_the_member_exactly(rule, labels):
    lp = dense(1)
    a = answer(lp, labels)
    one = combine_members([a[0]], [a[1]], [a[2]], vocab=V, k=K, rule=rule)
    two = combine_members([a[0], a[0]], [a[1], a[1]], [a[2], a[2]], vocab=V, k=K, rule=rule)
    order = np.argsort(two.idx, 1)
    assert np.array_equal(np.take_along_axis(two.idx, order, 1), np.sort(one.idx, 1))
    np.testing.assert_allclose(np.take_along_axis(two.head, order, 1),
                               np.take_along_axis(one.head, np.argsort(one.idx, 1), 1), atol=1e-12)
    np.testing.assert_allclose(two.tail - two.log_z, one.tail, atol=1e-9)  # normalised alike
    assert two.estimated == 0


@pytest.mark.parametrize("rule", ["geometric", "arithmetic"])
def test_two_members_are_exact_where_both_returned_a_token_and_bounded_elsewhere(rule, labels):
    lps = [dense(2), 0.7 * dense(2) + 0.3 * dense(3)]  # related teachers: their top-K sets overlap in part
    lps = [log_softmax(x, axis=-1) for x in lps]
    answers = [answer(x, labels) for x in lps]
    c = combine_members(*(list(x) for x in zip(*answers)), vocab=V, k=K, rule=rule)
    truth = (np.mean(lps, 0) if rule == "geometric" else logsumexp(np.stack(lps), axis=0) - math.log(2))
    sets = [set(map(int, row)) for row in answers[0][0]], [set(map(int, row)) for row in answers[1][0]]
    exact = estimated = 0
    for p in range(N):
        for t, v in zip(c.idx[p], c.head[p]):
            if int(t) in sets[0][p] and int(t) in sets[1][p]:
                assert v == pytest.approx(truth[p, t], abs=1e-12)
                exact += 1
            else:
                # the estimate of the member that did not return t is at most its smallest returned value, and
                # so is the member's true value: both sides bounded by the same number
                bound = np.mean([lps[j][p, t] if int(t) in sets[j][p] else answers[j][1][p, -1] for j in (0, 1)]) \
                    if rule == "geometric" else \
                    logsumexp([lps[j][p, t] if int(t) in sets[j][p] else answers[j][1][p, -1] for j in (0, 1)]) \
                    - math.log(2)
                assert v <= bound + 1e-12 and truth[p, t] <= bound + 1e-12
                estimated += 1
    assert exact > 0 and estimated > 0 and c.estimated == estimated
    np.testing.assert_allclose(c.label, truth[np.arange(N), labels], atol=1e-12)  # labels are always returned
    if rule == "arithmetic":  # the mean of normalised members: its mass is 1 whatever the estimates
        np.testing.assert_allclose(c.log_z, 0.0, atol=1e-9)


@pytest.mark.parametrize("rule", ["geometric", "arithmetic"])
def test_local_members_alone_combine_exactly(rule, labels):
    """Local members give every token's value: their combination is the dense one, tail included."""
    lps = [dense(4), dense(5)]
    c = combine_members([], [], [], vocab=V, k=K, rule=rule, dense=lps,
                        dense_labels=[x[np.arange(N), labels] for x in lps])
    truth = (np.mean(lps, 0) if rule == "geometric" else logsumexp(np.stack(lps), axis=0) - math.log(2))
    top = np.argsort(-truth, 1)[:, :K]
    assert np.array_equal(np.sort(c.idx, 1), np.sort(top, 1)) and c.estimated == 0
    np.testing.assert_allclose(c.head, np.take_along_axis(truth, c.idx, 1), atol=1e-12)
    rest = truth.copy()
    np.put_along_axis(rest, top, -np.inf, 1)
    np.testing.assert_allclose(c.tail, logsumexp(rest, axis=1), atol=1e-9)
    np.testing.assert_allclose(c.log_z, logsumexp(truth, axis=1), atol=1e-9)


@pytest.mark.parametrize("rule", ["geometric", "arithmetic"])
def test_an_engine_beside_a_local_member_is_exact_on_what_both_know(rule, labels):
    lp_engine, lp_local = dense(6), dense(7)
    ids, top, lab = answer(lp_engine, labels)
    c = combine_members([ids], [top], [lab], vocab=V, k=K, rule=rule, dense=[lp_local],
                        dense_labels=[lp_local[np.arange(N), labels]])
    truth = (np.mean([lp_engine, lp_local], 0) if rule == "geometric" else
             logsumexp(np.stack([lp_engine, lp_local]), axis=0) - math.log(2))
    returned = np.zeros((N, V), dtype=bool)
    np.put_along_axis(returned, ids, True, 1)
    exact = np.take_along_axis(returned, c.idx, 1)  # kept tokens the engine returned: every value known
    assert exact.any() and c.estimated == int((~exact).sum())
    np.testing.assert_allclose(c.head[exact], np.take_along_axis(truth, c.idx, 1)[exact], atol=1e-12)
    np.testing.assert_allclose(c.label, truth[np.arange(N), labels], atol=1e-12)
    if rule == "arithmetic":
        np.testing.assert_allclose(c.log_z, 0.0, atol=1e-9)
