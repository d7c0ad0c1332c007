"""Stores written by earlier releases open, verify, hold what this release computes for the same job, and
train: a version-1 store (tests/data/v1_store, made at commit 347da8d; it also resumes as version 1) and
top-k and sampled stores made before target forms became modules (tests/data/v2_sparse_stores, ef80d1b)."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pytest

from storage import StoreWriter, open_store
from teacher_service.generate import generate

from .conftest import DARKSTORE, ROOT, cli_env, job

V1 = ROOT / "tests" / "data" / "v1_store"


@pytest.fixture
def v1(tmp_path):
    shutil.copytree(V1, tmp_path / "v1")
    return tmp_path / "v1"


def test_a_v1_store_opens_verifies_and_holds_what_this_release_computes(v1, tmp_path):
    r = open_store(v1 / "store")
    assert r.meta.schema_version == 1 and r.meta.checksums is None and r.complete
    r.verify()
    old = r.read_all(members=True)
    spec = job(v1 / "teachers" / "ensemble.yaml", v1 / "transfer.npz", chunk_rows=16, keep_members=True)
    new_w = generate(spec, tmp_path / "v2")
    assert new_w.meta.schema_version == 2 and new_w.meta.job_key == r.meta.job_key  # the same job, by identity
    new = open_store(new_w.path).read_all(members=True)
    for field in ("logits", "members", "labels", "index"):
        same_values(getattr(old, field), getattr(new, field), field)
    assert r.accuracy() == open_store(new_w.path).accuracy()

    # the same job pointed at the v1 store resumes it (nothing to do) and leaves it version 1
    again = StoreWriter.open_or_create(v1 / "store", new_w.meta)
    assert again.meta.schema_version == 1 and again.pending_chunks() == []


def same_values(old: np.ndarray, new: np.ndarray, name: str) -> None:
    """What a stored release computed against what this release computes: integer fields exactly; float fields
    within a few units in the last place (the stored files were written on another CPU, and torch's reductions
    vectorise by CPU, so the last bit of a float32 sum may differ)."""
    assert old.dtype == new.dtype, name
    if np.issubdtype(new.dtype, np.floating):
        np.testing.assert_array_max_ulp(old, new, maxulp=4)
    else:
        np.testing.assert_array_equal(old, new, err_msg=name)


def test_a_v1_store_inspects_and_trains_from_the_cli(v1, tmp_path):
    p = subprocess.run([*DARKSTORE, "inspect", str(v1 / "store"), "--verify", "--json"], env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["rows"] == 40
    p = subprocess.run([*DARKSTORE, "train", "--store", str(v1 / "store"), "--data", str(v1 / "transfer.npz"),
                        "--student", "mlp", "--arch-kwargs", '{"in_features": 64, "hidden": [8]}', "--epochs", "1",
                        "--batch-size", "8", "--out", str(tmp_path / "run")], env=cli_env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final"]["rows"] > 0


SPARSE = ROOT / "tests" / "data" / "v2_sparse_stores"


@pytest.mark.parametrize("name, targets", [("topk", "topk:2"), ("sampled", "sampled:3")])
def test_sparse_stores_of_the_previous_release_verify_and_hold_what_this_release_computes(name, targets, tmp_path):
    r = open_store(SPARSE / name)
    assert r.meta.schema_version == 2 and r.meta.sequence is None and r.complete
    r.verify()
    new = open_store(generate(job(SPARSE / "teachers" / "ensemble.yaml", SPARSE / "transfer.npz", chunk_rows=16,
                                  targets=targets), tmp_path / name).path)
    assert new.meta.job_key == r.meta.job_key
    for f in new.meta.checksums:
        same_values(r.read_field(f), new.read_field(f), f)


def test_a_top_k_store_of_the_previous_release_trains(tmp_path):
    shutil.copytree(SPARSE, tmp_path / "v2")
    p = subprocess.run([*DARKSTORE, "train", "--store", str(tmp_path / "v2" / "topk"), "--data",
                        str(tmp_path / "v2" / "transfer.npz"), "--student", "mlp", "--arch-kwargs",
                        '{"in_features": 64, "hidden": [8]}', "--epochs", "1", "--batch-size", "8", "--out",
                        str(tmp_path / "run")], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["final"]["rows"] > 0
