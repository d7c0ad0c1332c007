"""Self-healing (teacher_service/reconcile.py) with real processes and real faults: a worker's whole
process group SIGKILLed, Redis SIGKILLed with and without persistence, the API SIGKILLed — each time the
job finishes by itself, with no resume, a store byte-identical to `darkstore generate`'s, and an event log
with every commit. Celery's own redelivery is pushed out of reach (visibility timeout one hour), so only
the reconciler can be what finishes the job."""

from __future__ import annotations

import os
import shutil
import signal
import time
from datetime import datetime
from pathlib import Path

import numpy as np

import pytest

from storage import open_store
from teacher_service.client import DarkstoreClient

from .procs import Api, Redis, Worker, service_env
from .test_celery import CHUNK, N, make_site, running_task, same_as_reference, spec_for, wait_chunks

pytestmark = pytest.mark.slow
LEASE, INTERVAL = 2.0, 0.5
# after the failed part is back: lease expiry + one pass + a worker picking the task up, with slack
BOUND = LEASE + 2 * INTERVAL + 10


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("reconcile"))


class Cluster:
    """redis + API + one worker, with the reconciler's clock turned up."""

    def __init__(self, site, name: str, persist: bool = False, **settings: object):
        self.tmp = site["tmp"] / name
        self.tmp.mkdir()
        self.redis = Redis(self.tmp, persist=persist)
        self.env = service_env(home=self.tmp / "home", data_roots=site["root"], broker_url=self.redis.url,
                               allow_code=True, device="cpu", batch_size=CHUNK, chunks_per_task=3,
                               task_time_limit=600, visibility_timeout=3600, lease_ttl=LEASE,
                               reconcile_interval=INTERVAL, **settings)
        self.api = Api(self.env, self.tmp / "api.log")
        self.worker = Worker(self.env, self.tmp / "worker.log", "w")

    def client(self) -> DarkstoreClient:
        return DarkstoreClient(self.api.url, timeout=60)

    def stop(self) -> None:
        for p in (self.worker, self.api, self.redis):
            p.stop()


@pytest.fixture
def cluster(site, request):
    made = []

    def make(persist: bool = False, **settings: object) -> Cluster:
        made.append(Cluster(site, request.node.name, persist, **settings))
        return made[-1]

    yield make
    for c in made:
        c.stop()


def finished_by_itself(site, client: DarkstoreClient, job_id: str, since: float, reason: str | None) -> None:
    """The job succeeds with no resume call; a reconciliation (giving ``reason``, when one is required)
    happened within the bound; the store equals the reference; every chunk's commit is in the event log."""
    final = client.wait(job_id, timeout=120)
    assert final.state == "succeeded", final.error
    events = client.events(job_id)
    assert not [e for e in events if e.event == "resumed"]
    healed = [e for e in events if e.event == "reconciled"]
    if reason is not None:
        assert healed and any(reason in e.reason for e in healed), healed
    for e in healed:
        at = datetime.fromisoformat(e.time).timestamp()
        assert at - since <= BOUND + 1, f"reconciled {at - since:.1f} s after the failed part came back"
    same_as_reference(site, final.store)
    committed = {e.chunk for e in events if e.event == "chunk_committed"}
    assert committed == set(range(N // CHUNK))
    assert final.attempt == 1  # the same attempt, healed: nobody resumed it


def test_worker_group_killed_and_restarted(site, cluster):
    c = cluster()
    with c.client() as client:
        view = client.submit(spec_for(site["counter"], 0.3)).job
        victim = running_task(client, view.id)
        c.worker.kill(signal.SIGKILL)  # the worker and its pool child, mid-task
        c.worker = Worker(c.env, c.tmp / "worker2.log", "w")
        back = time.time()
        finished_by_itself(site, client, view.id, back, "lease expired")
        events = client.events(view.id)
    # the killed range was recomputed under a new ticket; no task ran it twice at once
    reconciled = [e for e in events if e.event == "reconciled"]
    assert victim["task_id"] in reconciled[0].dead_tasks


@pytest.mark.parametrize("persist", [False, True], ids=["no-persistence", "append-only-file"])
def test_redis_killed_and_restarted(site, cluster, persist):
    c = cluster(persist)
    with c.client() as client:
        view = client.submit(spec_for(site["counter"], 0.3)).job
        wait_chunks(client, view.id, 3)
        c.redis.kill(signal.SIGKILL)
        time.sleep(1.0)  # the worker notices the broker is gone
        c.redis = c.redis.restart()
        back = time.time()
        # without persistence the queue and the tickets are gone: only a re-dispatch can finish the job;
        # with it, the queue survives and a task cut off by the outage (if any) is re-dispatched
        finished_by_itself(site, client, view.id, back, None if persist else "no task holds them")


def test_api_and_worker_killed_while_the_api_is_down(site, cluster):
    """The API (and its reconciler) dies; the worker dies too while no reconciler runs. The API comes
    back; the job finishes by itself."""
    c = cluster()
    with c.client() as client:
        view = client.submit(spec_for(site["counter"], 0.3)).job
        running_task(client, view.id)
    port = c.api.port
    c.api.kill(signal.SIGKILL)
    c.worker.kill(signal.SIGKILL)
    c.worker = Worker(c.env, c.tmp / "worker2.log", "w")
    c.api = Api(c.env, c.tmp / "api2.log", port=port)
    back = time.time()
    with c.client() as client:
        finished_by_itself(site, client, view.id, back, "lease expired")


def test_a_job_whose_store_vanished_is_failed_not_succeeded(site, cluster):
    c = cluster()
    with c.client() as client:
        view = client.submit(spec_for(site["counter"], 0.0)).job
        assert client.wait(view.id, timeout=120).state == "succeeded"
        shutil.rmtree(view.store)
        lost = client.job(view.id)
        assert lost.state == "failed" and "submit the job again" in lost.error
        items = client.jobs().items
        assert [v.state for v in items if v.id == view.id] == ["failed"]
        again = client.submit(spec_for(site["counter"], 0.0)).job  # recomputes it
        assert again.id == view.id
        assert client.wait(view.id, timeout=120).state == "succeeded"
    same_as_reference(site, view.store)


# --- one reconcile pass, driven step by step (no workers): which chunks it hands out again and why ------

def _fresh_job(tmp_path, book, *, created_ago: float, dispatched_ago: float | None):
    """A queued job with its (empty) store, recorded ``created_ago`` seconds ago, as the submitter writes it
    before handing its tasks out; ``dispatched_ago``: when they were handed out (None: not yet)."""
    from datetime import timedelta, timezone

    from storage.writer import StoreWriter
    from teacher_service.generate import prepare
    from teacher_service.jobs import JobRecord

    from .conftest import MEMBERS, job, make_arrays, make_ensemble

    spec = job(make_ensemble(tmp_path / "t", MEMBERS[1:]),
               make_arrays(tmp_path / "x.npz", n=100), chunk_rows=20)
    meta = prepare(spec).meta
    job_id = meta.job_key[:24]
    writer = StoreWriter.open_or_create(book.store_path(job_id), meta)
    stamp = lambda ago: (datetime.now(timezone.utc) - timedelta(seconds=ago)).isoformat()  # noqa: E731
    rec = JobRecord(id=job_id, job_key=meta.job_key, state="queued", spec=spec.model_dump(mode="json"),
                    store=book.store_path(job_id), created_at=stamp(created_ago), updated_at=stamp(0),
                    dispatched_at=None if dispatched_ago is None else stamp(dispatched_ago),
                    num_rows=meta.num_rows, chunk_rows=meta.chunk_rows)
    return book.put(rec.with_mask(writer.done_mask()))


@pytest.mark.parametrize("created_ago, dispatched_ago, tickets, expect", [
    (0.0, None, False, None),  # recorded, tasks not handed out yet: the race once seen in CI
    (0.0, 0.0, True, None),  # handed out a moment ago
    (10.0, None, False, "no task holds them"),  # recorded long ago and never handed out: the submitter died
    (10.0, 10.0, False, "no task holds them"),  # handed out long ago, no ticket left anywhere
    (10.0, 10.0, True, None),  # handed out long ago, still queued: held while the queue is not lost
], ids=["just-recorded", "just-dispatched", "never-dispatched", "tickets-gone", "queued"])
def test_a_reconcile_pass_hands_out_only_chunks_nobody_holds(tmp_path, created_ago, dispatched_ago, tickets, expect):
    from teacher_service.jobs import JobBook
    from teacher_service.reconcile import Ledger, Reconciler

    from .procs import Redis

    server = Redis(tmp_path)
    try:
        book = JobBook(tmp_path / "home")
        ledger = Ledger(server.url, lease_ttl=LEASE, queue="darkstore")
        rec = _fresh_job(tmp_path, book, created_ago=created_ago, dispatched_ago=dispatched_ago)
        if tickets:
            for chunks in ([0, 1, 2], [3, 4]):
                ledger.add(rec.id, rec.attempt, chunks)
            ledger.r.rpush("darkstore", b"message")  # the broker still holds their messages
        sent = []
        reconciler = Reconciler(book, ledger, lambda r, chunks: sent.append((r.id, chunks)) or 1,
                                lease_ttl=LEASE, interval=INTERVAL)
        actions = reconciler.run_once()
        if expect is None:
            assert actions == [] and sent == []
            assert not [e for e in book.events(rec.id) if e["event"] == "reconciled"]
        else:
            assert sent == [(rec.id, [0, 1, 2, 3, 4])]
            assert [a["reason"] for a in actions] == [expect]
            assert [e["reason"] for e in book.events(rec.id) if e["event"] == "reconciled"] == [expect]
    finally:
        server.stop()


def _children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is ``pid``."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_pool_process_decodes_and_writes_in_child_processes_and_they_die_with_it(site, cluster, tmp_path):
    """Celery's prefork pool processes are daemons, which Python forbids children: darkstore's stop being
    daemons, so a task decodes its inputs in DataLoader workers and writes its chunks in writer processes.
    SIGKILL that pool process mid-task: its children exit too (nothing left running), and the job still finishes
    by itself with the store `generate` makes."""
    from teacher_service.generate import generate
    from teacher_service.spec import JobSpec

    seen = tmp_path / "decoded-by"
    seen.mkdir()
    spec = spec_for(site["counter"], 0.3, data={"kind": "factory", "factory": "tests.factories:pid_recording",
                                                "kwargs": {"n": N, "folder": str(seen)}})
    c = cluster(loader_workers=2, writer_processes=True)
    with c.client() as client:
        view = client.submit(spec).job
        pool = running_task(client, view.id)["pid"]
        wait_chunks(client, view.id, 1)
        children = _children(pool)
        decoders = {int(p.name.split("-")[0]) for p in seen.iterdir() if int(p.name.split("-")[1]) == pool}
        assert len(decoders) >= 2, "the task decoded its inputs inline, not in DataLoader workers"
        writers = children - decoders
        assert writers, f"no writer process among the pool process's children {children}"
        os.kill(pool, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in children):
            assert time.monotonic() < deadline, f"children of the killed pool process still run: " \
                                                f"{[p for p in children if _alive(p)]}"
            time.sleep(0.1)
        final = client.wait(view.id, timeout=120)
    assert final.state == "succeeded", final.error
    ref = generate(JobSpec.model_validate(spec).rebased(site["root"]), tmp_path / "ref", allow_code=True,
                   batch_size=CHUNK).path
    a, b = open_store(final.store).read_all(), open_store(ref).read_all()
    np.testing.assert_array_equal(a.index, b.index)
    np.testing.assert_array_equal(a.logits, b.logits)
