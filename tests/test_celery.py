"""The distributed service with real parts: redis-server on a free loopback port, the API under
uvicorn, and Celery workers as separate processes (prefork pool, not eager mode)."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from storage import open_store
from teacher_service.client import ApiError, DarkstoreClient
from teacher_service.settings import Settings

from .conftest import DARKSTORE, cli_env, make_arrays, make_ensemble
from .procs import Api, Redis, Worker, free_port, service_env

pytestmark = pytest.mark.slow
N, CHUNK = 600, 25  # 24 chunks; 3 chunks per task: 8 tasks per job


def spec_for(counter: Path, delay: float, **options) -> dict:
    """Two teachers: a small CNN from safetensors, and a slow factory MLP that counts its forward passes."""
    return {
        "teachers": {"num_classes": 5, "members": [
            {"name": "cnn", "arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 4},
             "weights": "teachers/t0.safetensors"},
            {"name": "slow", "factory": "tests.factories:slow_mlp",
             "arch_kwargs": {"delay": delay, "counter": str(counter)}},
        ]},
        "data": {"kind": "arrays", "path": "transfer.npz"},
        "chunk_rows": CHUNK,
        **options,
    }


def make_site(tmp: Path) -> dict:
    """A data root (one teacher, the transfer set) and the reference store: `darkstore generate` on the same
    spec as the first test's job."""
    root = tmp / "data"
    root.mkdir()
    make_ensemble(root / "teachers", [{"arch": "small_cnn", "arch_kwargs": {"in_channels": 1, "width": 4}}])
    make_arrays(root / "transfer.npz", n=N)
    counter = tmp / "forwards"
    (root / "job.yaml").write_text(yaml.safe_dump(spec_for(counter, 0.1)))
    subprocess.run([*DARKSTORE, "generate", "--job", str(root / "job.yaml"), "--out", str(tmp / "reference"),
                    "--allow-code", "--batch-size", str(CHUNK)], env=cli_env(), check=True, timeout=300)
    return {"tmp": tmp, "root": root, "counter": counter, "ref": open_store(tmp / "reference").read_all()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    site = make_site(tmp_path_factory.mktemp("celery"))
    tmp, root = site["tmp"], site["root"]
    redis = Redis(tmp)
    settings = dict(home=tmp / "home", data_roots=root, broker_url=redis.url, allow_code=True, device="cpu",
                    batch_size=CHUNK, chunks_per_task=3, task_time_limit=5, visibility_timeout=6,
                    redelivery_check_interval=1)
    env = service_env(**settings)
    procs = {"redis": redis}
    try:
        procs["api"] = Api(env, tmp / "api.log")
        procs["a"] = Worker(env, tmp / "worker-a.log", "a")
        procs["b"] = Worker(env, tmp / "worker-b.log", "b")
        yield {**site, "env": env, "procs": procs, "settings": Settings(**settings)}
    finally:
        for p in reversed(list(procs.values())):
            p.stop()


def forwards(c) -> int:
    return len(c["counter"].read_bytes()) if c["counter"].exists() else 0


def api(c) -> DarkstoreClient:
    return DarkstoreClient(c["procs"]["api"].url, timeout=60)


def wait_chunks(client: DarkstoreClient, job_id: str, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while client.job(job_id).progress.chunks_done < n:
        assert time.monotonic() < deadline, f"fewer than {n} chunks after {timeout} s"
        time.sleep(0.02)


def running_task(client: DarkstoreClient, job_id: str, worker: str | None = None, timeout: float = 60) -> dict:
    """The event of a task that has started (on ``worker``, if given) and not finished yet."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, f"no task running on {worker or 'any worker'} after {timeout} s"
        evs = client.events(job_id)
        finished = {e["task_id"] for e in evs if e["event"] == "task_finished"}
        running = [e for e in evs if e["event"] == "task_started" and e["task_id"] not in finished
                   and (worker is None or e["worker"] == worker)]
        if running:
            return running[-1]
        time.sleep(0.02)


def same_as_reference(c, store: str) -> None:
    """The same targets for every sample; rows in the same order too when it is the same job (a job with
    other options has another key, so another seeded row order)."""
    got, ref = open_store(store), c["ref"]
    rows = got.read_all()
    if got.meta.job_key == open_store(c["tmp"] / "reference").meta.job_key:
        np.testing.assert_array_equal(rows.index, ref.index)
    a, b = np.argsort(rows.index), np.argsort(ref.index)
    np.testing.assert_array_equal(rows.logits[a], ref.logits[b])
    np.testing.assert_array_equal(rows.labels[a], ref.labels[b])
    np.testing.assert_array_equal(rows.index[a], ref.index[b])


def test_two_workers_share_a_job_and_match_generate(cluster):
    c = cluster
    with api(c) as client:
        sub = client.submit(spec_for(c["counter"], 0.1))
        view, created = sub.job, sub.created
        assert created
        done = client.wait(view.id, timeout=120)
        assert done.state == "succeeded", done.error
        assert done.progress.chunks_done == done.progress.chunks_total == 24
        events = client.events(view.id)
    same_as_reference(c, done.store)
    got, ref = open_store(done.store), open_store(c["tmp"] / "reference")
    assert got.meta.job_key == ref.meta.job_key
    np.testing.assert_array_equal(got.group["stats"][:], ref.group["stats"][:])
    committed = [e for e in events if e["event"] == "chunk_committed"]
    assert sorted(e["chunk"] for e in committed) == list(range(24))  # each chunk committed exactly once
    assert {e["worker"] for e in committed} == {"a@localhost", "b@localhost"}  # both workers took part
    started = [e for e in events if e["event"] == "task_started"]
    loads = [e for e in events if e["event"] == "ensemble_loaded"]
    assert len(started) == 8 and len(loads) == 2  # the ensemble loaded once per worker process, then reused
    assert len({e["pid"] for e in loads}) == 2


def test_identical_submit_runs_no_forward_pass_changed_option_does(cluster):
    c = cluster
    with api(c) as client:
        first = client.submit(spec_for(c["counter"], 0.1)).job
        assert client.wait(first.id, timeout=120).state == "succeeded"
        n = forwards(c)
        events = len(client.events(first.id))
        sub = client.submit(spec_for(c["counter"], 0.1))
        again, created = sub.job, sub.created
        assert not created and again.id == first.id and again.state == "succeeded"
        time.sleep(0.5)
        assert forwards(c) == n  # not one forward pass: not even the submit-time probe
        assert len(client.events(first.id)) == events  # nothing dispatched
        sub = client.submit(spec_for(c["counter"], 0.1, keep_members=True))
        other, created = sub.job, sub.created
        assert created and other.id != first.id
        assert client.wait(other.id, timeout=120).state == "succeeded"
        assert forwards(c) >= n + 24
    same_as_reference(c, other.store)


def test_cancel_keeps_committed_chunks_and_resume_finishes(cluster):
    c = cluster
    with api(c) as client:
        view = client.submit(spec_for(c["counter"], 0.25)).job
        wait_chunks(client, view.id, 3)
        cancelled = client.cancel(view.id)
        assert cancelled.state == "cancelled"
        # workers stop at their next chunk boundary; then nothing moves
        time.sleep(1.5)
        before = client.job(view.id).progress.chunks_done
        time.sleep(1.0)
        after = client.job(view.id)
        assert after.state == "cancelled" and after.progress.chunks_done == before < 24
        kept = open_store(view.store, allow_incomplete=True)
        done_chunks = kept.finished_chunks()
        kept_logits = {i: kept.read_chunk(i).logits for i in done_chunks}

        resumed = client.resume(view.id)
        assert resumed.state in ("queued", "running") and resumed.attempt == 2
        final = client.wait(view.id, timeout=120)
        assert final.state == "succeeded" and final.progress.chunks_done == 24
        events = client.events(view.id)
    r = open_store(view.store)
    for i, z in kept_logits.items():
        np.testing.assert_array_equal(r.read_chunk(i).logits, z)
    same_as_reference(c, view.store)
    # the second attempt computed only what the first had not committed
    second = [e["chunk"] for e in events if e["event"] == "chunk_committed" and e["attempt"] == 2]
    assert sorted(second) == sorted(set(range(24)) - set(done_chunks))


def test_api_restart_mid_job_keeps_the_right_state(cluster):
    c = cluster
    old = c["procs"]["api"]
    with api(c) as client:
        view = client.submit(spec_for(c["counter"], 0.2)).job
        wait_chunks(client, view.id, 2)
    old.kill(signal.SIGKILL)  # the API dies; the workers go on
    time.sleep(1.0)
    c["procs"]["api"] = new = Api(c["env"], c["tmp"] / "api2.log", port=old.port)
    with DarkstoreClient(new.url, timeout=60) as client:
        v = client.job(view.id)
        assert v.state in ("running", "succeeded") and v.progress.chunks_done >= 2
        assert v.state == "succeeded" or v.rows_per_second is not None
        final = client.wait(view.id, timeout=120)
        assert final.state == "succeeded", final.error
    same_as_reference(c, view.store)


def test_direct_celery_submission(cluster):
    """Python clients can submit through the broker alone, no HTTP."""
    from teacher_service.celery_app import submit_via_celery

    c = cluster
    spec = spec_for(c["counter"], 0.01, dtype="float32")
    view, created = submit_via_celery(spec, c["settings"], timeout=60)
    assert created and view.state in ("queued", "running", "succeeded")
    again, created = submit_via_celery(spec, c["settings"], timeout=60)
    assert not created and again.id == view.id
    with api(c) as client:
        assert client.wait(view.id, timeout=120).state == "succeeded"
    bad = spec_for(c["counter"], 0.01)
    bad["data"]["path"] = "../../etc/hostname"
    from darkstore.errors import PathOutsideRootsError

    with pytest.raises(PathOutsideRootsError, match="outside the data roots"):
        submit_via_celery(bad, c["settings"], timeout=60)


def test_a_responses_job_on_two_workers_matches_generate(cluster, chat_kit):
    """Teachers writing responses, submitted through the broker alone: the workers share its chunks and write
    the bytes `darkstore generate` writes."""
    import shutil

    from teacher_service.celery_app import submit_via_celery

    c = cluster
    proj = c["root"] / "chat"
    shutil.copytree(chat_kit["root"], proj)
    job = chat_kit["job"](proj / "job.yaml", members=chat_kit["members"][:1], at=None, chunk_rows=2,
                          responses={"max_new_tokens": 10, "n": 2, "seed": 2})
    local = subprocess.run([*DARKSTORE, "generate", "--job", str(job), "--out", str(c["tmp"] / "chat-local")],
                           env=cli_env(), capture_output=True, text=True, timeout=180)
    assert local.returncode == 0, local.stderr
    body = yaml.safe_load(job.read_text())
    body["data"]["root"], body["data"]["tokenizer"] = "chat/p.jsonl", "chat/tok"
    body["teachers"]["members"][0]["weights"] = "chat/" + body["teachers"]["members"][0]["weights"]
    view, created = submit_via_celery(body, c["settings"], timeout=60)
    assert created
    with api(c) as client:
        done = client.wait(view.id, timeout=180)
        assert done.state == "succeeded", done.error
        committed = [e for e in client.events(view.id) if e["event"] == "chunk_committed"]
    assert sorted(e["chunk"] for e in committed) == list(range(12))
    a, b = open_store(done.store), open_store(c["tmp"] / "chat-local")
    assert done.progress.tokens_written == int(b.group["stats"][:][:, 0].sum())  # counted as workers commit
    assert a.meta.job_key == b.meta.job_key
    for name in ("tokens", "loss_mask", "finish", "topk_index", "topk_logits", "tail_lse"):
        np.testing.assert_array_equal(a.read_field(name), b.read_field(name), err_msg=name)


def test_soft_time_limit_requeues_the_rest_of_a_range_or_fails_clearly(cluster):
    """Soft limit 4.5 s: a 3-chunk task at 2 s per chunk commits 2 chunks, then hands the third back
    to the queue; a single chunk longer than the limit fails the job with advice instead of looping."""
    c = cluster
    make_arrays(c["root"] / "small.npz", n=3 * CHUNK, seed=1)
    with api(c) as client:
        slow = spec_for(c["counter"], 2.0, data={"kind": "arrays", "path": "small.npz"})
        view = client.submit(slow).job
        done = client.wait(view.id, timeout=60)
        assert done.state == "succeeded", done.error
        events = client.events(view.id)
        split = [e for e in events if e["event"] == "task_split"]
        assert split and all(e["chunks"] and e["chunks"][-1] == 2 and len(e["chunks"]) < 3 for e in split)
        assert sorted(e["chunk"] for e in events if e["event"] == "chunk_committed") == [0, 1, 2]
        r = open_store(done.store)
        r.verify()
        assert r.complete

        hopeless = spec_for(c["counter"], 5.0, data={"kind": "arrays", "path": "small.npz"})
        view = client.submit(hopeless).job
        failed = client.wait(view.id, timeout=60)
        assert failed.state == "failed" and "smaller chunk_rows" in failed.error
        assert failed.progress.chunks_done == 0


def test_pool_process_killed_mid_task_is_requeued(cluster):
    """Only the pool process dies (OOM killer, segfault): the worker's main process survives, starts a
    new pool process, and with task_reject_on_worker_lost the task goes back to the queue and runs again
    (about 3.5 s later here, before the 6 s visibility timeout could have applied)."""
    import os

    c = cluster
    with api(c) as client:
        view = client.submit(spec_for(c["counter"], 0.35)).job
        victim = running_task(client, view.id)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        final = client.wait(view.id, timeout=120)
        assert final.state == "succeeded", final.error
        events = client.events(view.id)
    same_as_reference(c, view.store)
    runs = [e for e in events if e["event"] == "task_started" and e["task_id"] == victim["task_id"]]
    assert len(runs) == 2 and runs[1]["pid"] != victim["pid"], runs
    assert c["procs"]["a"].alive() and c["procs"]["b"].alive()  # the workers themselves survive
    assert time.monotonic() - killed_at < 60


def test_worker_killed_mid_job_the_range_is_redelivered(cluster):
    c = cluster
    a = c["procs"]["a"]
    with api(c) as client:
        view = client.submit(spec_for(c["counter"], 0.3)).job
        victim = running_task(client, view.id, worker="a@localhost")
        a.kill(signal.SIGKILL)  # the worker and its pool child, mid-task
        committed_at_kill = set(open_store(view.store, allow_incomplete=True).finished_chunks())
        final = client.wait(view.id, timeout=120)
        assert final.state == "succeeded", final.error
        assert final.progress.chunks_done == 24
        events = client.events(view.id)
    same_as_reference(c, view.store)
    runs = [e for e in events if e["event"] == "task_started" and e["task_id"] == victim["task_id"]]
    assert len(runs) == 2, runs  # the killed range really ran again…
    assert runs[0]["worker"] == "a@localhost" and not runs[0]["redelivered"]
    assert runs[1]["worker"] == "b@localhost" and runs[1]["redelivered"]
    redone = {e["chunk"] for e in events if e["event"] == "chunk_committed" and e["worker"]
              == "b@localhost" and e["chunk"] in victim["chunks"]}
    assert redone and redone == set(victim["chunks"]) - committed_at_kill  # …computing what was not yet committed
    # bring a second worker back for whatever runs next
    c["procs"]["a"] = Worker(c["env"], c["tmp"] / "worker-a2.log", "a")


def test_broker_down_gives_503_and_keeps_the_job(cluster, tmp_path):
    c = cluster
    env = dict(c["env"])
    env["DARKSTORE_BROKER_URL"] = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    env["DARKSTORE_HOME"] = str(tmp_path / "home")
    down = Api(env, tmp_path / "api.log")
    try:
        r = httpx.get(down.url + "/readyz")
        assert r.status_code == 503 and "unreachable" in r.json()["broker"]
        with DarkstoreClient(down.url, timeout=60) as client:
            with pytest.raises(ApiError) as e:
                client.submit(spec_for(c["counter"], 0.05))
            assert e.value.status == 503 and "resume" in e.value.detail
            page = client.jobs()
            assert page.total == 1 and page.items[0].state == "queued"  # recorded, waiting for a resume
    finally:
        down.stop()
    r = httpx.get(c["procs"]["api"].url + "/readyz").json()
    assert r["status"] == "ready" and r["broker"] == "ok"
    metrics = httpx.get(c["procs"]["api"].url + "/metrics").text
    assert "darkstore_queued_tasks" in metrics and "darkstore_broker_up 1.0" in metrics
