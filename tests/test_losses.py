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
