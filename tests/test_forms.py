"""The training side of the target forms (student_trainer/forms.py): each form's soft term for classes against
float64 references, and a quantised top-k store of classes read as the float store of the same teachers is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from darkstore.errors import SpecError
from storage import open_store
from storage.forms import FORMS
from student_trainer import losses
from student_trainer.api import SoftTargets
from student_trainer.forms import LOSSES, SoftTerm, soft_term
from student_trainer.retemper import Retemper
from teacher_service.generate import generate

from .conftest import MEMBERS, job, make_arrays, make_ensemble

C, K, STEP = 7, 4, 0.0625


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_every_storage_form_has_a_training_side():
    assert LOSSES.keys() == FORMS.keys()


@pytest.mark.parametrize("topk_loss", ["bucket", "spread"])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_topk_with_every_class_is_hintons_dense_loss(T, topk_loss):
    """A top-k row that keeps every class is the dense row: the class students' loss (soft term, then the hard
    term mixed in, unlabeled rows soft only) equals Hinton's loss written in float64."""
    rng = np.random.default_rng(0)
    s, t, y = rng.normal(0, 3, (16, C)), rng.normal(0, 5, (16, C)), rng.integers(0, C, 16)
    y[[2, 7]] = -1
    idx = np.argsort(-t, axis=1)
    head = np.take_along_axis(t, idx, 1) - t.max(1, keepdims=True)
    term = SoftTerm(FORMS["topk"], LOSSES["topk"], None, Retemper(T, "geometric", True), topk_loss)
    st = torch.from_numpy(s)
    got = losses.mix(term(st, {"index": torch.from_numpy(idx), "head": torch.from_numpy(head),
                               "tail": torch.full((16,), -np.inf, dtype=torch.float64)}),
                     losses.hard_ce(st, torch.from_numpy(y)), torch.from_numpy(y), 0.7)
    logp, logq = np_log_softmax(t / T), np_log_softmax(s / T)
    soft = T**2 * (np.exp(logp) * (logp - logq)).sum(-1)
    ce = -np_log_softmax(s)[np.arange(16), np.maximum(y, 0)]
    assert float(got) == pytest.approx(np.where(y >= 0, 0.7 * soft + 0.3 * ce, soft).mean(), rel=1e-9)


def test_a_divergence_the_form_cannot_give_is_refused_in_one_line():
    meta = type("Meta", (), {"target_form": "sampled", "targets": "sampled:8"})()
    with pytest.raises(SpecError, match="forward KL only"):
        soft_term(meta, Retemper(1.0, "sampled", True), divergence="reverse")
    meta.target_form = "topk"
    with pytest.raises(SpecError, match="topk_loss"):
        soft_term(meta, Retemper(1.0, "topk", True), topk_loss="even")


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    """The same teachers over the same rows, as top-k of classes with float values and with quantised ones."""
    tmp = tmp_path_factory.mktemp("forms")
    ens = make_ensemble(tmp / "teachers", [dict(m, num_classes=C) for m in MEMBERS[:2]], num_classes=C)
    data = make_arrays(tmp / "x.npz", n=96, classes=C)
    out = {}
    for name, step in (("float", 0.0), ("quantised", STEP)):
        spec = job(ens, data, chunk_rows=32, dtype="float32", targets={"form": "topk", "k": K, "step": step})
        out[name] = open_store(generate(spec, tmp / name).path)
    return out


def _first_batch(targets: SoftTargets):
    return next(iter(targets.loader(batch_size=96, shuffle=False).epoch(0)))


@pytest.mark.parametrize("topk_loss", ["bucket", "spread"])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_a_quantised_class_store_trains_as_the_float_store(two_stores, T, topk_loss):
    """On the same batch, the loss from the quantised store is the float store's within what the quantisation
    allows: each kept value is off by at most step/2, or clipped 255 steps below its row's largest, so the loss
    moves by at most Σ |∂loss/∂value| · (that allowance) (to first order; the margin covers the second). Raw
    uint8 counts read as values would be far outside."""
    fl, qu = (SoftTargets(two_stores[n], temperature=T) for n in ("float", "quantised"))
    assert qu.meta.targets.quantised and not fl.meta.targets.quantised
    bf, bq = _first_batch(fl), _first_batch(qu)
    torch.testing.assert_close(bf.rows, bq.rows)
    assert bq.sparse["topk_logits"].dtype == torch.uint8
    head_f = FORMS["topk"].decode(bf.stored(), fl.meta)["head"].double()
    head_q = FORMS["topk"].decode(bq.stored(), qu.meta)["head"].double()
    allowance = STEP / 2 + (-255 * STEP - head_f).clamp_min(0)  # the rounding, and the clipping far down
    assert bool(((head_q - head_f).abs() <= allowance + 1e-6).all())

    student = torch.randn(len(bf.labels), C, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got_q = qu.loss(student, bq, alpha=1.0, topk_loss=topk_loss)
    term = soft_term(fl.meta, fl.plan, topk_loss=topk_loss)
    decoded = {k: v.double() for k, v in term.decode(bf.stored()).items()}
    head = decoded["head"].clone().requires_grad_(True)
    got_f = term(student, {**decoded, "head": head}).mean()
    (grad,) = torch.autograd.grad(got_f, head)
    bound = 1.5 * float((grad.abs() * allowance).sum()) + 1e-6
    assert abs(float(got_q) - float(got_f.detach())) <= bound
    assert float(fl.loss(student, bf, alpha=1.0, topk_loss=topk_loss)) == pytest.approx(float(got_f.detach()), rel=1e-5)
