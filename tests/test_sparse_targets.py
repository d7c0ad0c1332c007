"""Sparse targets in the store: top-k with the tail's mass, and seeded samples, written by generation and
checked against the dense store of the same teachers (float64 references where values are compared)."""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import numpy as np
import torch
import pytest

from storage import open_store
from storage.schema import TargetsRecord
from darkstore.errors import SpecError
from storage.forms import FORMS
from teacher_service.generate import generate

from .conftest import DARKSTORE, MEMBERS, cli_env, job, make_arrays, make_ensemble

C = 7


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sparse")
    ens = make_ensemble(tmp / "teachers", [dict(m, num_classes=C) for m in MEMBERS[:2]], num_classes=C)
    data = make_arrays(tmp / "x.npz", n=150, classes=C)
    dense = generate(job(ens, data, chunk_rows=64, dtype="float32"), tmp / "dense")
    return {"tmp": tmp, "ens": ens, "data": data, "dense": open_store(dense.path).read_field("logits")}


@pytest.mark.parametrize("spelling, want", [
    ("dense", TargetsRecord()),
    ("topk:5", TargetsRecord(form="topk", k=5)),
    ("sampled:32", TargetsRecord(form="sampled", k=32, temperature=1.0, seed=0)),
    ("sampled:32@4", TargetsRecord(form="sampled", k=32, temperature=4.0, seed=0)),
])
def test_target_spellings(spelling, want):
    got = TargetsRecord.model_validate(spelling)
    assert got == want and TargetsRecord.model_validate(str(got)) == got


@pytest.mark.parametrize("bad", ["topk", "topk:0", "topk:x", "sparse:4", "topk:4@2", "dense:3"])
def test_bad_target_spellings_are_refused(bad):
    with pytest.raises(ValueError):
        TargetsRecord.model_validate(bad)


def test_topk_store_holds_the_dense_head_and_the_tails_mass(made, tmp_path):
    k = 3
    w = generate(job(made["ens"], made["data"], chunk_rows=64, dtype="float32", targets=f"topk:{k}"), tmp_path / "s")
    r = open_store(w.path)
    assert str(r.meta.targets) == "topk:3" and r.meta.checksums == ["topk_logits", "topk_index", "tail_lse",
                                                                     "labels", "index"]
    r.verify()
    dense = made["dense"].astype(np.float64)
    got = r.read(np.arange(150), ["topk_logits", "topk_index", "tail_lse"])
    want_idx = np.argsort(-dense, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(got["topk_index"], want_idx)
    np.testing.assert_array_equal(got["topk_logits"], made["dense"][np.arange(150)[:, None], want_idx])
    rest = np.ones_like(dense, dtype=bool)
    np.put_along_axis(rest, want_idx, False, 1)
    want_tail = np.log(np.where(rest, np.exp(dense), 0).sum(1))
    np.testing.assert_allclose(got["tail_lse"], want_tail, rtol=1e-5, atol=1e-5)
    # the head and the tail carry all the mass: probabilities at T = 1 sum to 1
    z = np.concatenate([got["topk_logits"].astype(np.float64), got["tail_lse"][:, None].astype(np.float64)], 1)
    np.testing.assert_allclose(np.exp(z).sum(1), np.exp(dense).sum(1), rtol=1e-5)
    assert r.summary()["raw_bytes_per_row"] == (4 + 4) * k + 4 + 16
    assert w.meta.job_key != open_store(made["tmp"] / "dense").meta.job_key  # another job


def test_sampled_store_draws_from_the_tempered_distribution_reproducibly(made, tmp_path):
    k, T = 4000, 2.0
    spec = job(made["ens"], made["data"], chunk_rows=64, dtype="float32", targets=f"sampled:{k}@{T}")
    a = open_store(generate(spec, tmp_path / "a").path).read_field("sample_index")
    b = open_store(generate(spec, tmp_path / "b").path).read_field("sample_index")
    np.testing.assert_array_equal(a, b)  # seeded: the same job writes the same samples
    assert (np.diff(a, axis=1) >= 0).all()  # sorted per row
    p = np.exp(made["dense"].astype(np.float64) / T)
    p /= p.sum(1, keepdims=True)
    freq = np.stack([np.bincount(row, minlength=C) for row in a]) / k
    se = np.sqrt(p * (1 - p) / k)
    assert (np.abs(freq - p) <= 5 * se + 3 / k).all()  # + a few draws: the normal bound fails for rare classes


def _draw(p: np.ndarray, chunk: int) -> np.ndarray:
    form = FORMS["sampled"]
    meta = SimpleNamespace(targets=TargetsRecord(form="sampled", k=20000, seed=3))
    ell = torch.log(torch.from_numpy(p)).float()
    return form.encode(ell, meta, form.draws(meta, chunk, (len(p),)))["sample_index"].numpy()


def test_draw_samples_inverts_each_rows_cdf():
    p = np.array([[0.0, 1.0, 0.0], [0.5, 0.0, 0.5], [0.2, 0.3, 0.5]])
    idx = _draw(p, chunk=0)
    assert set(idx[0]) == {1} and set(idx[1]) <= {0, 2}  # never a class of probability 0
    np.testing.assert_allclose(np.bincount(idx[2], minlength=3) / 20000, p[2], atol=0.015)
    other = _draw(p, chunk=1)
    assert not np.array_equal(idx[2], other[2])  # each chunk its own stream


def test_topk_of_every_class_is_refused(made, tmp_path):
    with pytest.raises(SpecError, match="ask for dense"):
        generate(job(made["ens"], made["data"], targets=f"topk:{C}"), tmp_path / "all")


@pytest.mark.parametrize("options, says", [
    ({"keep_members": True, "targets": "topk:3"}, "keep members in a dense store"),
    ({"keep_members": True, "targets": "sampled:4"}, "keep members in a dense store"),
    ({"combine": "arithmetic", "temperature": 2.0, "targets": "topk:3"}, "use temperature 1"),
    ({"combine": "arithmetic", "temperature": 2.0, "targets": "sampled:4"}, "write sampled:4@2"),
])
def test_sparse_targets_refuse_options_they_cannot_honour(made, options, says):
    with pytest.raises(ValueError, match=says):
        job(made["ens"], made["data"], **options)


def test_sparse_refusals_reach_the_cli_as_one_error_and_make_no_store(made, tmp_path):
    p = subprocess.run([*DARKSTORE, "generate", "--teachers", str(made["ens"]), "--data", str(made["data"]),
                        "--out", str(tmp_path / "s"), "--targets", "topk:3", "--keep-members"], env=cli_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "keep members in a dense store" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "s").exists()


def test_arithmetic_means_sparsify_at_their_own_temperature(made, tmp_path):
    """top-k of an arithmetic mean mixed at T = 1 holds the dense arithmetic store's head and tail; samples of
    one mixed at T = 2 are drawn from the arithmetic mean at T = 2 (float64 reference from the dense store)."""
    from student_trainer.retemper import plan

    dense1 = open_store(generate(job(made["ens"], made["data"], chunk_rows=64, dtype="float32", combine="arithmetic"),
                                 tmp_path / "d1").path).read_field("logits").astype(np.float64)
    r = open_store(generate(job(made["ens"], made["data"], chunk_rows=64, dtype="float32", combine="arithmetic",
                                targets="topk:3"), tmp_path / "t").path)
    got = r.read(np.arange(150), ["topk_logits", "topk_index", "tail_lse"])
    idx = np.argsort(-dense1, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(got["topk_index"], idx)
    np.testing.assert_allclose(got["topk_logits"], np.take_along_axis(dense1, idx, 1), rtol=1e-5, atol=1e-5)
    p1 = np.exp(dense1) / np.exp(dense1).sum(1, keepdims=True)  # the arithmetic mean at T = 1
    tail_mass = 1 - np.take_along_axis(p1, idx, 1).sum(1)
    head_lse = np.log(np.exp(dense1).sum(1))
    np.testing.assert_allclose(got["tail_lse"] - head_lse, np.log(tail_mass), rtol=1e-4, atol=1e-4)
    assert plan(r.meta, 1.0).exact and not plan(r.meta, 4.0).exact

    k, T = 4000, 2.0
    dense2 = open_store(generate(job(made["ens"], made["data"], chunk_rows=64, dtype="float32", combine="arithmetic",
                                     temperature=T), tmp_path / "d2").path).read_field("logits").astype(np.float64)
    a = open_store(generate(job(made["ens"], made["data"], chunk_rows=64, combine="arithmetic", temperature=T,
                                targets=f"sampled:{k}@{T}"), tmp_path / "s").path).read_field("sample_index")
    p = np.exp(dense2 / T)
    p /= p.sum(1, keepdims=True)
    freq = np.stack([np.bincount(row, minlength=C) for row in a]) / k
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / k) + 3 / k).all()


FIELDS = {"topk:3": ("topk_logits", "topk_index", "tail_lse"), "sampled:16": ("sample_index",)}


@pytest.mark.parametrize("targets", list(FIELDS))
@pytest.mark.parametrize("views", [False, True])
def test_sparse_batches_carry_their_rows_targets_across_chunks_shards_and_a_resume(made, tmp_path, targets, views):
    from student_trainer.loader import make_loader

    extra = {"augment": {"views": 2, "ops": [{"op": "hflip"}]}} if views else {}
    r = open_store(generate(job(made["ens"], made["data"], chunk_rows=32, targets=targets, **extra),
                            tmp_path / "s").path)
    n = r.meta.num_rows
    want = r.read(np.arange(n), FIELDS[targets])
    seen = []
    for rank in range(2):  # two DDP ranks share the rows; 7 does not divide the 32-row chunks
        loader = make_loader(r, np.arange(n), batch_size=7, seed=3, rank=rank, world_size=2)
        batches = iter(loader.epoch(1))
        first = [next(batches) for _ in range(3)]
        state = loader.state_dict()
        resumed = make_loader(r, np.arange(n), batch_size=7, seed=3, rank=rank, world_size=2)
        resumed.load_state_dict(state)
        for b in first + list(resumed.epoch(1)):
            assert b.logits is None and set(b.sparse) == set(FIELDS[targets])
            rows = b.rows.numpy()
            for name in FIELDS[targets]:
                np.testing.assert_array_equal(b.sparse[name].numpy(), want[name][rows], err_msg=name)
            seen.append(rows)
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(n))  # every row once, across ranks


def train_cli(store, out, *extra):
    return subprocess.run([*DARKSTORE, "train", "--store", str(store), "--student", "mlp", "--arch-kwargs",
                           '{"in_features": 64, "hidden": [16]}', "--out", str(out), "--epochs", "3",
                           "--batch-size", "16", *extra], env=cli_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("targets, extra", [
    ("topk:2", ["--topk-loss", "bucket", "--temperature", "1"]),
    ("topk:2", ["--topk-loss", "spread", "--temperature", "4"]),
    ("sampled:32", ["--temperature", "1"]),
])
def test_students_train_from_sparse_stores_through_the_cli(made, tmp_path, targets, extra):
    out = tmp_path / "s"
    p = subprocess.run([*DARKSTORE, "generate", "--teachers", str(made["ens"]), "--data", str(made["data"]),
                        "--out", str(out), "--targets", targets, "--chunk-rows", "64"], env=cli_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    p = subprocess.run([*DARKSTORE, "inspect", str(out), "--verify", "--json"], env=cli_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["targets"] == str(TargetsRecord.model_validate(targets))
    p = train_cli(out, tmp_path / "run", *extra)
    assert p.returncode == 0, p.stderr
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["final"]["rows"] > 0 and np.isfinite(s["final"]["nll"])
    assert s["retemper"]["mode"] == targets.split(":")[0]
    approximate = extra[-1] == "4"
    assert s["retemper"]["exact"] == (not approximate)
    if approximate:
        assert "APPROXIMATE" in p.stderr  # the trainer says the tail is approximated at T != 1


def test_sampled_targets_refuse_another_temperature_and_mse(made, tmp_path):
    out = tmp_path / "s"
    generate(job(made["ens"], made["data"], chunk_rows=64, targets="sampled:8@2"), out)
    p = train_cli(out, tmp_path / "run", "--temperature", "4")
    assert p.returncode == 2 and "sampled at T=2" in p.stderr and "Traceback" not in p.stderr
    p = train_cli(out, tmp_path / "run2", "--temperature", "2", "--loss", "mse")
    assert p.returncode == 2 and "needs dense targets" in p.stderr


@pytest.mark.parametrize("v,k", [(2048, 32), (2053, 8), (512, 8), (3000, 128), (64, 8), (40, 39)])
def test_two_round_top_k_gives_the_top_k_with_ties_and_minus_infinity(v, k):
    """top_k equals torch.topk as sets of values, and its positions hold those values, on rows with ties,
    −inf entries and a length that is not a multiple of the block count."""
    from storage.forms.topk import top_k

    g = torch.Generator().manual_seed(v + k)
    x = torch.randn(6, 7, v, generator=g, dtype=torch.float64).float()
    x[0] = torch.round(x[0] * 2) / 2  # many ties
    x[1, :, ::3] = float("-inf")
    values, idx = top_k(x, k)
    want = x.topk(k, dim=-1).values
    assert torch.equal(values.sort(-1, descending=True).values, want)
    assert torch.equal(x.gather(-1, idx), values)
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all()  # no position twice
