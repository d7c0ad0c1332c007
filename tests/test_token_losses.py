"""Per-token losses (student_trainer/token_losses.py) against float64 references written from their
definitions, and the sliced loss against the same loss computed whole: values and gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from storage.forms import FORMS
from student_trainer import losses
from student_trainer import token_losses as tl
from student_trainer.forms import LOSSES, SoftTerm
from student_trainer.retemper import Retemper

N, V, K = 12, 40, 6


def _softmax64(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _d64(p: np.ndarray, q: np.ndarray, kind: str) -> np.ndarray:
    def kl(a, b):
        return np.where(a > 0, a * (np.log(np.where(a > 0, a, 1)) - np.log(b)), 0).sum(-1)

    if kind == "forward":
        return kl(p, q)
    if kind == "reverse":
        return kl(q, p)
    m = (p + q) / 2
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def soft(form: str, t: float, *, topk_loss: str = "bucket", kind: str = "forward") -> SoftTerm:
    """A soft term of ``form`` at T = ``t`` (a dense store of a geometric mean: re-tempered exactly)."""
    return SoftTerm(FORMS[form], LOSSES[form], None, Retemper(t, "geometric", True), topk_loss, kind)


@pytest.fixture
def case():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(N, V, generator=g) * 2
    teacher = torch.randn(N, V, generator=g) * 3
    labels = torch.randint(V, (N,), generator=g)
    return student, teacher, labels


def _topk(teacher: torch.Tensor):
    """A top-k store's fields of ``teacher`` at T = 1: kept tokens (ascending), their centred values, the tail."""
    vals, idx = teacher.topk(K, dim=-1)
    idx, order = idx.sort(-1)
    vals = vals.gather(-1, order)
    hi = vals.amax(-1, keepdim=True)
    rest = teacher.scatter(-1, idx, float("-inf"))
    return {"index": idx, "head": vals - hi, "tail": torch.logsumexp(rest, -1) - hi[:, 0]}


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_dense_divergences_match_float64(case, kind):
    student, teacher, labels = case
    t, alpha = 2.0, 0.7
    got = tl.position_losses(student, labels, {"logits": teacher}, soft=soft("dense", t, kind=kind), alpha=alpha)
    s64, z64 = student.double().numpy(), teacher.double().numpy()
    p, q = _softmax64(z64 / t), _softmax64(s64 / t)
    ce = -np.log(_softmax64(s64)[np.arange(N), labels.numpy()])
    want = alpha * t * t * _d64(p, q, kind) + (1 - alpha) * ce
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_topk_bucket_is_the_divergence_over_the_kept_tokens_and_one_bucket(case, kind):
    """At T = 1 the buckets of a top-k store are exact: the divergence between the teacher's and the
    student's K + 1 bucket probabilities, computed from the whole distributions in float64."""
    student, teacher, labels = case
    got = soft("topk", 1.0, kind=kind)(student, _topk(teacher))
    p, q = _softmax64(teacher.double().numpy()), _softmax64(student.double().numpy())
    idx = _topk(teacher)["index"].numpy()

    def buckets(d):
        head = np.take_along_axis(d, idx, -1)
        return np.concatenate([head, 1 - head.sum(-1, keepdims=True)], -1)

    np.testing.assert_allclose(got.double().numpy(), _d64(buckets(p), buckets(q), kind), rtol=1e-4, atol=1e-6)


def test_topk_spread_and_sampled_match_their_definitions(case):
    student, teacher, labels = case
    t = 1.5
    f = _topk(teacher)
    got = soft("topk", t, topk_loss="spread")(student, f)
    z = teacher.double().numpy()
    kept = np.zeros_like(z, dtype=bool)
    np.put_along_axis(kept, f["index"].numpy(), True, -1)
    hi = np.where(kept, z, -np.inf).max(-1, keepdims=True)
    tail = np.log(np.where(kept, 0, np.exp(z - hi)).sum(-1, keepdims=True))  # the tail's mass at T = 1
    each = np.log(V - K) + (tail - np.log(V - K)) / t - np.log(V - K)  # spread evenly at T
    full = np.where(kept, (z - hi) / t, each)
    want = t * t * _d64(_softmax64(full), _softmax64(student.double().numpy() / t), "forward")
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-6)

    samples = torch.randint(V, (N, 8), generator=torch.Generator().manual_seed(1))
    got = soft("sampled", t)(student, {"index": samples})
    logq = np.log(_softmax64(student.double().numpy() / t))
    want = -t * t * np.take_along_axis(logq, samples.numpy(), -1).mean(-1)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-5)
    with pytest.raises(ValueError, match="forward KL only"):
        soft("sampled", t, kind="jsd")(student, {"index": samples})


def test_the_sliced_loss_equals_the_whole_one_and_ignores_positions_without_a_loss():
    """Many slices (each recomputed in the backward pass) give the loss and the gradients of one slice; a
    position without a loss changes nothing whatever its targets; a batch without one gives a zero that
    still reaches the parameters."""
    g = torch.Generator().manual_seed(2)
    b, length, h = 3, 10, 8
    hidden = torch.randn(b, length, h, generator=g, dtype=torch.float64)
    weight = torch.randn(V, h, generator=g, dtype=torch.float64)
    labels = torch.randint(V, (b, length), generator=g)
    labels[0, :4] = -1
    labels[2, 7:] = -1
    teacher = torch.randn(b, length, V, generator=g, dtype=torch.float64)
    targets = {k: v.unflatten(0, (b, length)) for k, v in _topk(teacher.flatten(0, 1)).items()}
    opts = {"soft": soft("topk", 1.0), "alpha": 0.5}

    def run(slice_bytes: int, tg: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hd, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = tl.sliced_loss(hd, lambda x: x @ w.t(), labels, tg, vocab=V, slice_bytes=slice_bytes, **opts)
        loss.backward()
        return loss.detach(), hd.grad, w.grad

    whole = run(1 << 30, targets)
    sliced = run(4 * V * 5, targets)  # 5 positions a slice: 5 slices for the 21 positions with a loss
    for a, c in zip(whole, sliced):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    moved = {k: v.clone() for k, v in targets.items()}
    moved["tail"][0, :4] += 5.0  # positions without a loss
    assert float(run(1 << 30, moved)[0]) == float(whole[0])
    n = int((labels >= 0).sum())
    per = tl.position_losses((hidden.flatten(0, 1) @ weight.t())[labels.flatten() >= 0], labels[labels >= 0],
                             {k: v[labels >= 0] for k, v in targets.items()}, **opts)
    assert math.isclose(float(whole[0]), float(per.sum()) / n, rel_tol=1e-12)

    none = torch.full_like(labels, -1)
    hd = hidden.clone().requires_grad_()
    zero = tl.sliced_loss(hd, lambda x: x @ weight.t(), none, targets, vocab=V, **opts)
    zero.backward()
    assert float(zero.detach()) == 0.0 and hd.grad is not None and float(hd.grad.abs().sum()) == 0.0
