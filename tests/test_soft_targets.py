"""The library API for your own loop (student_trainer.api, exported as darkstore.SoftTargets) and the examples
that use it."""

from __future__ import annotations

import json
import math
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


@pytest.fixture(scope="module")
def lm_store(lm_kit, tmp_path_factory):
    from teacher_service.spec import JobSpec

    root = tmp_path_factory.mktemp("soft-lm")
    return generate(JobSpec.from_file(lm_kit["job"](root / "job.yaml", targets="topk:8")), root / "store").path


def test_a_language_models_store_gives_per_token_targets_and_loss(lm_store):
    """Token batches as a Trainer sees them; the loss from logits, from the dict and from hidden states and
    the head are one number: the mean over positions with a loss of the top-k bucket KL mixed with CE, from
    its definition in float64 (the stored values decoded)."""
    from darkstore.gpt import GPT
    from storage.forms import form_of

    targets = SoftTargets(lm_store)
    assert targets.temperature == 1.0 and "exact at T=1" in targets.describe()
    train_rows, eval_rows = targets.split(0.1)
    batch = next(targets.loader(train_rows, batch_size=8, seed=1).epoch(1))
    torch.manual_seed(0)
    model = GPT(512, block_size=32, n_layer=1, n_head=2, n_embd=16).double()
    hidden = model.hidden(batch.x)
    logits = model.head(hidden)
    got = targets.loss(logits, batch, alpha=0.5).detach()
    assert torch.equal(got, targets.loss(logits, targets.fields(batch), alpha=0.5).detach())
    assert math.isclose(float(targets.loss_from_hidden(hidden, model.head, batch, alpha=0.5).detach()), float(got),
                        rel_tol=1e-12)
    keep = batch.labels >= 0
    s, y = logits[keep], batch.labels[keep]
    idx = batch.sparse["topk_index"][keep].long()
    head = form_of(targets.meta).head({"topk_logits": batch.sparse["topk_logits"][keep]}, targets.meta).double()
    tail = batch.sparse["tail_lse"][keep].double()
    p = torch.softmax(torch.cat([head, tail[:, None]], -1), -1)
    q_head = torch.softmax(s, -1).gather(1, idx)
    q = torch.cat([q_head, 1 - q_head.sum(-1, keepdim=True)], -1)
    kl = (p * (p.log() - q.log())).sum(-1)
    ce = torch.nn.functional.cross_entropy(s, y, reduction="none")
    assert math.isclose(float(got), float((0.5 * kl + 0.5 * ce).mean().detach()), rel_tol=1e-9)
    assert targets.teacher_argmax(batch).shape == batch.labels.shape


def test_the_hugging_face_trainer_example_distills_a_language_model(lm_store):
    """examples/hf_trainer_lm.py as users run it: a transformers Trainer with darkstore's batches and loss (the
    soft term alone, α = 1) ends far closer to the teachers on held-out positions than it started (these
    teachers are random, so their agreement says little; their KL does)."""
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_trainer_lm.py"), "--store", str(lm_store),
                        "--max-steps", "60", "--alpha", "1"], env=cli_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["kl_after"] < out["kl_before"] / 4, out
