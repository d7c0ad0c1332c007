"""Self-healing for Celery jobs: tickets, leases and a reconciler.

Celery's at-least-once delivery brings a lost task back only after the broker's
visibility timeout (hours), and a broker that restarts without persistence loses
its queue outright. So the service keeps its own account, in the broker's Redis:

* a **ticket** per dispatched chunk-range task (``darkstore:tickets:<job>`` hash:
  task id → attempt, chunks, queued_at, started). Tickets live in the same Redis
  as the queue, so they are lost together with it, never one without the other;
* a **lease** per running task (``darkstore:lease:<task id>``, a key with a TTL of
  ``lease_ttl`` seconds), renewed by a heartbeat thread in the process that runs it.
  A task that cannot renew its lease stops at its next chunk boundary.

The **reconciler** (a background thread of the API, one at a time across replicas
by a Redis lock) compares, every ``reconcile_interval`` seconds, each active job's
desired state (every chunk committed, read from the store's commit marks) with the
actual one: chunks that no live task holds and no queued task will compute are
dispatched again, under new tickets. A chunk is held by a ticket that has started
and whose lease is alive, or by a queued ticket, unless the queue has been empty for
longer than ``lease_ttl`` (then the message is gone: a broker restarted without
persistence, or a worker that died holding a message it had not started).

A superseded task that turns up later (a redelivered message) finds its ticket gone
and skips; a duplicate that slips through only recomputes identical bytes. So after
any crash — worker, pool process, broker, API — a job finishes by itself within
about ``lease_ttl + reconcile_interval`` seconds of the failed part coming back.

The reconciler also re-reads the commit marks into the job record, logs a
``chunk_committed`` event (``recovered: true``) for any commit whose process died
before logging it, and marks a job whose store vanished as failed.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import redis

from .jobs import ACTIVE, JobBook, JobRecord, _ts

log = logging.getLogger(__name__)
PREFIX = "darkstore"

_CLAIM = """
local t = redis.call('HGET', KEYS[1], ARGV[1])
if not t then return 0 end
local d = cjson.decode(t)
d['started'] = true
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(d))
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_REQUEUE = """
local t = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
if not t then return 0 end
local d = cjson.decode(t)
d['started'] = false
d['queued_at'] = tonumber(ARGV[2])
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(d))
return 1
"""


@dataclass
class Ticket:
    task_id: str
    attempt: int
    chunks: list[int]
    queued_at: float
    started: bool = False


class Ledger:
    """Tickets and leases, in the broker's Redis."""

    def __init__(self, url: str, lease_ttl: float, queue: str):
        self.r = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        self.ttl_ms = int(lease_ttl * 1000)
        self.queue = queue
        self._claim = self.r.register_script(_CLAIM)
        self._renew = self.r.register_script(_RENEW)
        self._requeue = self.r.register_script(_REQUEUE)

    @staticmethod
    def _tickets(job_id: str) -> str:
        return f"{PREFIX}:tickets:{job_id}"

    @staticmethod
    def _lease(task_id: str) -> str:
        return f"{PREFIX}:lease:{task_id}"

    def add(self, job_id: str, attempt: int, chunks: Sequence[int]) -> str:
        task_id = str(uuid.uuid4())
        body = {"attempt": attempt, "chunks": [int(c) for c in chunks], "queued_at": time.time(), "started": False}
        self.r.hset(self._tickets(job_id), task_id, json.dumps(body))
        return task_id

    def claim(self, job_id: str, task_id: str, holder: str) -> bool:
        """Mark a ticket started and take its lease; False when the ticket is gone (superseded)."""
        return bool(self._claim(keys=[self._tickets(job_id), self._lease(task_id)],
                                args=[task_id, holder, self.ttl_ms]))

    def renew(self, task_id: str, holder: str) -> bool:
        return bool(self._renew(keys=[self._lease(task_id)], args=[holder, self.ttl_ms]))

    def requeue(self, job_id: str, task_id: str) -> None:
        """The task goes back to the queue (Celery retry): queued again, lease dropped."""
        self._requeue(keys=[self._tickets(job_id), self._lease(task_id)], args=[task_id, time.time()])

    def finish(self, job_id: str, task_id: str) -> None:
        pipe = self.r.pipeline()
        pipe.hdel(self._tickets(job_id), task_id)
        pipe.delete(self._lease(task_id))
        pipe.execute()

    def drop(self, job_id: str, task_ids: Sequence[str] | None = None) -> None:
        if task_ids is None:
            self.r.delete(self._tickets(job_id))
        elif task_ids:
            self.r.hdel(self._tickets(job_id), *task_ids)

    def tickets(self, job_id: str) -> list[Ticket]:
        out = []
        for k, v in self.r.hgetall(self._tickets(job_id)).items():
            d = json.loads(v)
            out.append(Ticket(k.decode(), int(d["attempt"]), [int(c) for c in d["chunks"] or []],
                              float(d["queued_at"]), bool(d["started"])))
        return out

    def alive(self, task_ids: Sequence[str]) -> set[str]:
        if not task_ids:
            return set()
        vals = self.r.mget([self._lease(t) for t in task_ids])
        return {t for t, v in zip(task_ids, vals) if v is not None}

    def queue_length(self) -> int:
        return int(self.r.llen(self.queue))

    def try_lock(self, name: str, holder: str, ttl: float) -> bool:
        key = f"{PREFIX}:lock:{name}"
        if self.r.set(key, holder, nx=True, px=int(ttl * 1000)):
            return True
        if self.r.get(key) == holder.encode():  # ours: extend
            self.r.pexpire(key, int(ttl * 1000))
            return True
        return False


class Lease:
    """Keeps a task's lease alive from a heartbeat thread; ``lost`` is set when it cannot."""

    def __init__(self, ledger: Ledger, task_id: str, holder: str):
        self.ledger, self.task_id, self.holder = ledger, task_id, holder
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="darkstore-lease", daemon=True)

    def _beat(self) -> None:
        ttl = self.ledger.ttl_ms / 1000
        last_ok = time.monotonic()
        while not self._stop.wait(ttl / 3):
            try:
                if not self.ledger.renew(self.task_id, self.holder):
                    log.warning("task %s lost its lease (expired or taken over): stopping at the next chunk",
                                self.task_id)
                    self.lost.set()
                    return
                last_ok = time.monotonic()
            except redis.RedisError as exc:
                if time.monotonic() - last_ok > ttl:
                    log.warning("task %s cannot renew its lease (%s): stopping at the next chunk", self.task_id, exc)
                    self.lost.set()
                    return

    def __enter__(self) -> "Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class Reconciler:
    """Brings every active job back to "all chunks computed or held by a live task"."""

    def __init__(self, book: JobBook, ledger: Ledger, dispatch: Callable[[JobRecord, list[int]], int], *,
                 lease_ttl: float, interval: float):
        self.book, self.ledger, self.dispatch = book, ledger, dispatch
        self.lease_ttl, self.interval = lease_ttl, interval
        self.holder = f"reconciler-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._empty_since: float | None = None
        self._unlogged: dict[str, set[int]] = {}  # commits seen without an event, by job
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one pass ---------------------------------------------------------------------
    def run_once(self) -> list[dict[str, Any]]:
        """One reconciliation pass; returns what it re-dispatched (for logs and tests)."""
        if not self.ledger.try_lock("reconciler", self.holder, ttl=max(3 * self.interval, self.lease_ttl)):
            return []
        now = time.time()
        if self.ledger.queue_length() == 0:
            self._empty_since = self._empty_since or now
        else:
            self._empty_since = None
        actions = []
        for rec in [r for r in self.book.all() if r.state in ACTIVE]:
            try:
                action = self._job(rec, now)
            except redis.RedisError:
                raise
            except Exception:  # noqa: BLE001 — one bad job must not stop the others from healing
                log.exception("reconciling job %s failed", rec.id)
                continue
            if action:
                actions.append(action)
        return actions

    def _job(self, rec: JobRecord, now: float) -> dict[str, Any] | None:
        rec, mask = self.book.sync(rec.id)
        if mask is None or rec.state not in ACTIVE:
            self.ledger.drop(rec.id)
            self._unlogged.pop(rec.id, None)
            return None
        self._backfill(rec, mask)
        # a job recorded a moment ago whose submitter is still handing its tasks out has no dispatch time (nor all
        # its tickets) yet: count from its creation, or this pass would dispatch every chunk a second time
        dispatched = _ts(rec.dispatched_at) or _ts(rec.created_at) or 0.0
        if now - dispatched < self.lease_ttl:  # just handed out: let the tasks start
            return None
        tickets = self.ledger.tickets(rec.id)
        stale = [t.task_id for t in tickets if t.attempt != rec.attempt]
        current = [t for t in tickets if t.attempt == rec.attempt]
        alive = self.ledger.alive([t.task_id for t in current if t.started])
        queue_gone = self._empty_since is not None and now - self._empty_since > self.lease_ttl
        held, dead = set(), []
        for t in current:
            if t.started and t.task_id not in alive:
                dead.append(t)  # its process died (or lost the broker) mid-task
            elif not t.started and queue_gone and t.queued_at < self._empty_since:
                dead.append(t)  # its message is no longer anywhere a worker will find it
            else:
                held.update(t.chunks)
        pending = {int(i) for i in (~mask).nonzero()[0]}
        missing = sorted(pending - held)
        self.ledger.drop(rec.id, stale)
        if not missing:
            return None
        self.ledger.drop(rec.id, [t.task_id for t in dead])
        tasks = self.dispatch(rec, missing)
        reason = ("lease expired" if any(t.started for t in dead) else "message lost" if dead
                  else "no task holds them")
        action = {"job": rec.id, "attempt": rec.attempt, "chunks": missing, "tasks": tasks, "reason": reason,
                  "dead_tasks": [t.task_id for t in dead]}
        self.book.log_event(rec.id, "reconciled", **{k: v for k, v in action.items() if k != "job"})
        log.warning("job %s: re-dispatched %d chunk(s) in %d task(s): %s", rec.id, len(missing), tasks, reason)
        return action

    def _backfill(self, rec: JobRecord, mask) -> None:
        """Log commits that have no event yet — after they stayed unlogged for a whole pass, so a
        worker that is about to log its own commit is not raced."""
        logged = {e.get("chunk") for e in self.book.events(rec.id) if e["event"] == "chunk_committed"}
        unlogged = {int(i) for i in mask.nonzero()[0]} - logged
        for i in sorted(unlogged & self._unlogged.get(rec.id, set())):
            start = i * rec.chunk_rows
            self.book.log_event(rec.id, "chunk_committed", attempt=rec.attempt, chunk=i,
                                rows=min(rec.chunk_rows, rec.num_rows - start), worker="reconciler",
                                pid=os.getpid(), recovered=True)
            unlogged.discard(i)
        self._unlogged[rec.id] = unlogged

    # -- the loop ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="darkstore-reconciler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except redis.RedisError as exc:
                log.info("reconciler: broker unreachable (%s); trying again in %s s", exc, self.interval)
            except Exception:  # noqa: BLE001
                log.exception("reconciler pass failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)


__all__ = ["Ledger", "Lease", "Reconciler", "Ticket"]
