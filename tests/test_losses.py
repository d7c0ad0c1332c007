"""Losses against float64 references written independently in NumPy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from student_trainer import losses


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def reference_kd(s, t_logits, y, T, alpha):
    """Per row: labeled α·T²·Σp(log p − log q) + (1−α)·(−log softmax(s)_y); unlabeled: the soft term."""
    logp, logq = np_log_softmax(t_logits / T), np_log_softmax(s / T)
    soft = T**2 * (np.exp(logp) * (logp - logq)).sum(-1)
    ce = -np_log_softmax(s)[np.arange(len(y)), np.maximum(y, 0)]
    per_row = np.where(y >= 0, alpha * soft + (1 - alpha) * ce, soft)
    return per_row.mean()


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    s = rng.normal(0, 3, (16, 10))
    t = rng.normal(0, 5, (16, 10))
    y = rng.integers(0, 10, 16)
    y[[2, 7, 11]] = -1  # unlabeled rows
    return s, t, y


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_kd_loss_matches_float64_reference(batch, T, alpha):
    s, t, y = batch
    tlogp = torch.log_softmax(torch.tensor(t) / T, dim=-1)
    got = losses.kd_loss(torch.tensor(s), tlogp, torch.tensor(y), temperature=T, alpha=alpha)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(float(got), reference_kd(s, t, y, T, alpha), rtol=1e-12)
    got32 = losses.kd_loss(torch.tensor(s).float(), tlogp.float(), torch.tensor(y), temperature=T, alpha=alpha)
    np.testing.assert_allclose(float(got32), reference_kd(s, t, y, T, alpha), rtol=2e-5)


@pytest.mark.parametrize("T", [1.0, 3.0, 8.0])
def test_soft_gradient_is_hintons_form(batch, T):
    """∂/∂s_i of the soft cross-entropy C = KL(p‖q) is (q_i − p_i)/T (Hinton et al. 2015, eq. 2);
    with the T² factor the loss uses, T·(q_i − p_i)."""
    s, t, _ = batch
    st = torch.tensor(s, requires_grad=True)
    tlogp = torch.log_softmax(torch.tensor(t) / T, dim=-1)
    (losses.soft_kl(st, tlogp, T) / T**2).sum().backward()
    p, q = np.exp(np_log_softmax(t / T)), np.exp(np_log_softmax(s / T))
    np.testing.assert_allclose(st.grad.numpy(), (q - p) / T, rtol=1e-10, atol=1e-14)
    st.grad = None
    losses.soft_kl(st, tlogp, T).sum().backward()
    np.testing.assert_allclose(st.grad.numpy(), T * (q - p), rtol=1e-10, atol=1e-14)


def test_high_temperature_soft_gradient_approaches_logit_matching(batch):
    """Hinton's limit: at high T with zero-mean logits, (q−p)/T ≈ (s − t)/(N·T²)."""
    s, t, _ = batch
    s, t = s - s.mean(-1, keepdims=True), t - t.mean(-1, keepdims=True)
    T = 1000.0
    p, q = np.exp(np_log_softmax(t / T)), np.exp(np_log_softmax(s / T))
    approx = (s - t) / (10 * T**2)
    np.testing.assert_allclose((q - p) / T, approx, rtol=0, atol=1e-2 * np.abs(approx).max())


@pytest.mark.parametrize("alpha", [0.0, 0.7, 1.0])
def test_logit_mse_matches_reference(batch, alpha):
    s, t, y = batch
    sc, tc = s - s.mean(-1, keepdims=True), t - t.mean(-1, keepdims=True)
    mse = ((sc - tc) ** 2).mean(-1)
    ce = -np_log_softmax(s)[np.arange(len(y)), np.maximum(y, 0)]
    ref = np.where(y >= 0, alpha * mse + (1 - alpha) * ce, mse).mean()
    got = losses.logit_mse_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=alpha)
    np.testing.assert_allclose(float(got), ref, rtol=1e-12)


def test_shift_of_teacher_logits_does_not_change_losses(batch):
    s, t, y = batch
    a = losses.logit_mse_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=1.0)
    b = losses.logit_mse_loss(torch.tensor(s), torch.tensor(t + 17.0), torch.tensor(y), alpha=1.0)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-12)


# --- sparse targets -------------------------------------------------------------------------------------------
def np_topk(t, k):
    """float64 reference of what a top-k store keeps: the k largest row-centred values, their classes, and the
    log-sum-exp of the rest."""
    t = t - t.max(-1, keepdims=True)
    idx = np.argsort(-t, axis=-1, kind="stable")[:, :k]
    head = np.take_along_axis(t, idx, -1)
    rest = np.ones_like(t, dtype=bool)
    np.put_along_axis(rest, idx, False, -1)
    tail = np.log(np.where(rest, np.exp(t), 0).sum(-1)) if k < t.shape[1] else np.full(len(t), -np.inf)
    return idx, head, tail


def reference_spread(idx, head, tail, c, T):
    """Teacher log-probs at T, the tail's mass spread evenly over the dropped classes, in float64."""
    n = c - idx.shape[1]
    full = np.full((len(head), c), (np.log(n) + (tail - np.log(n)) / T - np.log(n))[:, None] if n else -np.inf)
    np.put_along_axis(full, idx, head / T, -1)
    return np_log_softmax(full)


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_topk_spread_targets_match_float64_and_are_exact_at_t1(batch, T, k):
    s, t, y = batch
    idx, head, tail = np_topk(t, k)
    got = losses.topk_teacher_logp(torch.from_numpy(idx), torch.from_numpy(head), torch.from_numpy(tail), 10, T)
    want = reference_spread(idx, head, tail, 10, T)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12, atol=1e-12)
    if T == 1.0:  # at T = 1 the head's probabilities and the tail's total mass are the dense ones exactly
        dense = np_log_softmax(t)
        np.testing.assert_allclose(np.take_along_axis(got.numpy(), idx, -1), np.take_along_axis(dense, idx, -1),
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(np.exp(got.numpy()).sum(-1), 1.0, rtol=1e-12)


def reference_bucket(s, idx, head, tail, T):
    c, k = s.shape[1], idx.shape[1]
    logq = np_log_softmax(s / T)
    qh = np.take_along_axis(np.exp(logq), idx, -1)
    q = np.concatenate([qh, 1 - qh.sum(-1, keepdims=True)], -1)
    n = c - k
    t_tail = np.log(n) + (tail - np.log(n)) / T
    p = np.exp(np_log_softmax(np.concatenate([head / T, t_tail[:, None]], -1)))
    return T**2 * (p * (np.log(p) - np.log(q))).sum(-1)


@pytest.mark.parametrize("T", [1.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 9])
def test_topk_bucket_kl_matches_float64(batch, T, k):
    s, t, _ = batch
    idx, head, tail = np_topk(t, k)
    logp, logq = losses.bucket_logps(torch.from_numpy(s), torch.from_numpy(idx), torch.from_numpy(head),
                                     torch.from_numpy(tail), T)
    got = T**2 * losses.divergence(logp, logq)
    np.testing.assert_allclose(got.numpy(), reference_bucket(s, idx, head, tail, T), rtol=1e-9, atol=1e-12)


def test_sampled_ce_matches_float64_and_counts_duplicates():
    rng = np.random.default_rng(1)
    s = rng.normal(0, 2, (5, 7))
    idx = rng.integers(0, 7, (5, 6))
    idx[0] = [3, 3, 3, 1, 1, 0]
    T = 2.0
    logq = np_log_softmax(s / T)
    want = -T**2 * np.take_along_axis(logq, idx, -1).mean(-1)
    got = losses.sampled_ce(torch.from_numpy(s), torch.from_numpy(idx), T)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    counts = np.bincount(idx[0], minlength=7) / 6
    assert want[0] == pytest.approx(-T**2 * (counts * logq[0]).sum(), rel=1e-12)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_sampled_soft_gradient_is_unbiased(T):
    """E[∂ sampled_ce / ∂s] = ∂ [T²·KL(p ‖ q)] / ∂s = T·(q − p) when the samples come from p at T: checked with
    many samples against the exact dense gradient, within Monte-Carlo error."""
    rng = np.random.default_rng(2)
    s = torch.from_numpy(rng.normal(0, 2, (4, 6))).requires_grad_(True)
    t = torch.from_numpy(rng.normal(0, 3, (4, 6)))
    p = torch.softmax(t / T, -1)
    g = torch.Generator().manual_seed(0)
    n = 200_000
    idx = torch.multinomial(p, n, replacement=True, generator=g)
    losses.sampled_ce(s, idx, T).sum().backward()
    exact = T * (torch.softmax(s.detach() / T, -1) - p)
    se = T * torch.sqrt(p * (1 - p) / n)  # the standard error of each coordinate
    assert (torch.abs(s.grad - exact) <= 5 * se + 1e-12).all(), (s.grad - exact) / se
