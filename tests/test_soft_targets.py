"""The library API for your own loop (student_trainer.api, exported as darkstore.SoftTargets) and the examples
that use it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from darkstore import SoftTargets
from storage import open_store
from teacher_service.generate import generate

from .conftest import MEMBERS, ROOT, cli_env, job, make_arrays, make_ensemble


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soft")
    arrays = make_arrays(tmp / "x.npz", n=400)
    ens = make_ensemble(tmp / "t", MEMBERS)
    dense = generate(job(ens, arrays, chunk_rows=100, dtype="float32"), tmp / "dense").path
    mixed = generate(job(ens, arrays, chunk_rows=100, augment={"views": 2, "ops": [{"op": "hflip"},
                                                                                {"op": "mixup", "alpha": 0.4}]}),
                     tmp / "views").path
    return {"dense": dense, "views": mixed, "arrays": arrays}


def _reference_loss(student: torch.Tensor, stored: torch.Tensor, labels: torch.Tensor, T: float, alpha: float):
    """Hinton's loss from its definition, in float64: α·T²·KL(softmax(z/T) ‖ softmax(s/T)) + (1−α)·CE on labeled
    rows, the soft term alone on unlabeled ones, averaged over the batch (a geometric-mean store's logits are
    the ensemble's logits up to a shift)."""
    s, z = student.double(), stored.double()
    p = torch.softmax(z / T, -1)
    kl = (p * (torch.log_softmax(z / T, -1) - torch.log_softmax(s / T, -1))).sum(-1) * T * T
    ce = torch.nn.functional.cross_entropy(s, labels.clamp(min=0), reduction="none")
    per_row = torch.where(labels >= 0, alpha * kl + (1 - alpha) * ce, kl)
    return per_row.mean()


def test_loss_is_hintons_against_the_stored_targets_in_float64(stores):
    targets = SoftTargets(stores["dense"], temperature=3.0)
    assert "exact" in targets.describe()
    batch = next(iter(targets.loader(batch_size=64, seed=1).epoch(1)))
    student = torch.randn(len(batch), targets.num_classes, generator=torch.Generator().manual_seed(0))
    for alpha in (0.0, 0.5, 1.0):
        got = targets.loss(student, batch, alpha=alpha)
        ref = _reference_loss(student, batch.logits, batch.labels, 3.0, alpha)
        assert abs(float(got) - float(ref)) < 1e-5 * max(1.0, abs(float(ref))), alpha
    # the same batches the trainer's loader yields for that seed; the targets are the store's rows
    rows = batch.rows.numpy()
    np.testing.assert_array_equal(batch.logits.numpy(), open_store(stores["dense"]).read_all().logits[rows])
    tr, ev = targets.split(0.25)
    assert len(np.intersect1d(tr, ev)) == 0 and len(tr) + len(ev) == 400


def test_a_views_store_gives_mixed_batches_and_their_loss(stores):
    targets = SoftTargets(stores["views"], temperature=2.0)
    batches = list(targets.loader(batch_size=50, seed=0).epoch(1))
    assert sum(len(b) for b in batches) == 800 and any(bool((b.mix_labels >= 0).any()) for b in batches)
    b = batches[0]
    loss = targets.loss(torch.zeros(len(b), targets.num_classes, requires_grad=True), b, alpha=0.7)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    with pytest.raises(Exception, match="transfer set"):  # the inputs must be the store's own
        SoftTargets(stores["dense"], data=make_arrays(Path(stores["arrays"]).parent / "other.npz", n=400, seed=9))


@pytest.mark.parametrize("example", ["custom_loop.py", "accelerate_loop.py"])
def test_the_bring_your_own_loop_examples_learn_the_teachers(stores, example):
    """The README's examples, run as users run them: the student ends up agreeing with the teachers far more
    than it did at initialisation."""
    if example.startswith("accelerate"):
        pytest.importorskip("accelerate")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / example), "--store", str(stores["dense"]),
                        "--epochs", "15"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["agreement_after"] > out["agreement_before"] + 0.2, out
