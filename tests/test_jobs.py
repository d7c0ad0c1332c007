"""The in-process job runner: dedup, cancel/resume, restart — the engine under `serve --local`."""

from __future__ import annotations

import time

import numpy as np
import pytest

from storage import open_store
from darkstore.errors import WeightsNotFoundError
from teacher_service import prepared as gen_mod
from teacher_service.generate import generate
from teacher_service.jobs import LocalRunner
from teacher_service.settings import Settings

from .conftest import job, make_arrays, make_ensemble


@pytest.fixture
def forwards(monkeypatch):
    """Count teacher forward passes."""
    calls = {"n": 0}
    orig = gen_mod.Ensemble.forward

    def counted(self, x, rows, **kw):
        calls["n"] += 1
        return orig(self, x, rows, **kw)

    monkeypatch.setattr(gen_mod.Ensemble, "forward", counted)
    return calls


def runner_at(tmp_path, **kw) -> LocalRunner:
    return LocalRunner(Settings(home=tmp_path / "svc", data_roots=[tmp_path], **kw))


def test_same_job_twice_runs_teachers_once(tmp_path, ensemble, arrays, forwards):
    runner = runner_at(tmp_path)
    try:
        rec, created = runner.submit(job(ensemble, arrays, chunk_rows=64))
        assert created and runner.wait(rec.id).state == "succeeded"
        n = forwards["n"]
        assert n > 0
        again, created = runner.submit(job(ensemble, arrays, chunk_rows=64))
        assert not created and again.id == rec.id and again.state == "succeeded"
        assert forwards["n"] == n  # no forward pass for the duplicate
        other, created = runner.submit(job(ensemble, arrays, chunk_rows=64, dtype="float32"))
        assert created and other.id != rec.id
        assert runner.wait(other.id).state == "succeeded"
        st = runner.get(rec.id).progress
        assert st.rows_done == st.rows_total == 300 and st.chunks_done == st.chunks_total == 5
    finally:
        runner.shutdown()


def test_cancel_keeps_committed_chunks_and_resume_finishes(tmp_path):
    data = make_arrays(tmp_path / "d.npz", n=3000)
    ens = make_ensemble(tmp_path / "t", [{"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 48}}])
    spec = job(ens, data, chunk_rows=50)
    runner = runner_at(tmp_path, batch_size=50)
    try:
        rec, _ = runner.submit(spec)
        deadline = time.monotonic() + 60
        while runner.get(rec.id).progress.chunks_done < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        runner.cancel(rec.id)
        assert runner.wait(rec.id).state == "cancelled"
        st = runner.get(rec.id).progress
        assert 2 <= st.chunks_done < st.chunks_total
        kept = open_store(rec.store, allow_incomplete=True).read_all().logits
        runner.resume(rec.id)
        assert runner.wait(rec.id).state == "succeeded"
        final = open_store(rec.store).read_all().logits
        np.testing.assert_array_equal(final[: len(kept)], kept)
        ref = generate(spec, tmp_path / "ref", batch_size=50)
        np.testing.assert_array_equal(final, open_store(ref.path).read_all().logits)
    finally:
        runner.shutdown()


def test_restarted_runner_requeues_unfinished_jobs(tmp_path, ensemble, arrays):
    first = runner_at(tmp_path)
    rec, _ = first.submit(job(ensemble, arrays, chunk_rows=64))
    first.wait(rec.id)
    first.shutdown()
    first.book.update(rec.id, state="running")  # as if the process died mid-job
    second = runner_at(tmp_path)
    try:
        assert second.wait(rec.id).state == "succeeded"
    finally:
        second.shutdown()


def test_failures_are_recorded_not_lost(tmp_path, ensemble):
    rng = np.random.default_rng(0)
    x = rng.random((100, 1, 8, 8), dtype=np.float32)
    x[42] = np.nan
    np.savez(tmp_path / "nan.npz", x=x, y=rng.integers(0, 5, 100))
    runner = runner_at(tmp_path)
    try:
        rec, _ = runner.submit(job(ensemble, tmp_path / "nan.npz"))
        done = runner.wait(rec.id)
        assert done.state == "failed" and "samples 42 " in done.error
        assert not open_store(rec.store, allow_incomplete=True).complete
        with pytest.raises(WeightsNotFoundError):
            spec = job(ensemble, tmp_path / "nan.npz")
            (ensemble.parent / "t0.safetensors").unlink()
            runner.submit(spec)
    finally:
        runner.shutdown()
