"""Jobs: records on disk, the submit/cancel/resume logic, and the in-process runner.

A job's id comes from its identity (teachers by weight hash, data by fingerprint,
options), so submitting the same job twice returns the first one and never runs
a teacher again. Progress is read from the store's commit marks; the record only
holds what the store cannot: state, error, timestamps and the *attempt* number.

Every dispatch (submit, resume) starts a new attempt; work carrying an older
attempt number stops at its next chunk boundary. Cancelling therefore never
needs to reach a worker: the worker reads the record between chunks.

:class:`JobManager` does everything but running chunks. :class:`LocalRunner`
runs them in a background thread of this process (``darkstore serve --local``,
no Redis); ``teacher_service.celery_app.CeleryManager`` sends them to workers.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

from pydantic import BaseModel, Field

from darkstore.data import open_transfer_set
from darkstore.models import sha256_file
from darkstore.paths import resolve
from storage import StoreWriter, open_store
from storage.errors import DarkstoreError, SchemaError, StoreNotFoundError, WeightsNotFoundError

from .generate import Cancelled, PreparedJob, prepare, run_chunks
from .settings import Settings
from .spec import JobSpec

log = logging.getLogger(__name__)

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: tuple[State, ...] = ("queued", "running", "succeeded", "failed", "cancelled")
ACTIVE: tuple[State, ...] = ("queued", "running")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _ts(s: str | None) -> float | None:
    return datetime.fromisoformat(s).timestamp() if s else None


class JobNotFoundError(StoreNotFoundError):
    """No job with this id."""


class JobRecord(BaseModel):
    id: str
    job_key: str
    state: State
    spec: dict[str, Any]
    store: str
    error: str | None = None
    attempt: int = 1
    rows_at_start: int = Field(0, description="rows already committed when this attempt started")
    created_at: str
    updated_at: str
    started_at: str | None = None
    finished_at: str | None = None


class Progress(BaseModel):
    rows_done: int = 0
    rows_total: int | None = None
    chunks_done: int = 0
    chunks_total: int | None = None
    fraction: float = 0.0


class JobView(BaseModel):
    """What the API answers about a job: the record plus progress read from the store."""

    id: str
    state: State
    store: str
    error: str | None
    attempt: int
    progress: Progress
    rows_per_second: float | None = Field(None, description="this attempt's throughput")
    eta_seconds: float | None = None
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    job_key: str
    spec: dict[str, Any]


def identify(spec: JobSpec, *, allow_code: bool = False, roots: Sequence[str | Path] | None = None,
             data=None) -> str:
    """The job key without loading any model: weight files are hashed, the data fingerprinted."""
    hashes = []
    for m in spec.teachers.members:
        if m.weights is None:
            hashes.append(None)
            continue
        path = resolve(m.weights, roots=roots)
        if not path.is_file():
            raise WeightsNotFoundError(f"weights of {m.label!r} not found: {path}")
        hashes.append(sha256_file(path))
    data = data or open_transfer_set(spec.data, allow_code=allow_code, roots=roots)
    return spec.job_key(hashes, data.fingerprint)


class JobBook:
    """Job records as small JSON files (written atomically, updated under a file lock, so
    the API and any number of worker processes can share them), plus an event log per job."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        (self.root / "stores").mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str, suffix: str = ".json") -> Path:
        if not job_id or not job_id.isalnum():
            raise JobNotFoundError(f"no job {job_id!r}")
        return self.root / "jobs" / f"{job_id}{suffix}"

    def store_path(self, job_id: str) -> Path:
        return self.root / "stores" / job_id

    @contextlib.contextmanager
    def lock(self, job_id: str) -> Iterator[None]:
        """An exclusive lock on one job across threads and processes (flock)."""
        with open(self._path(job_id, ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def find(self, job_id: str) -> JobRecord | None:
        p = self._path(job_id)
        try:
            return JobRecord.model_validate_json(p.read_text())
        except FileNotFoundError:
            return None

    def get(self, job_id: str) -> JobRecord:
        rec = self.find(job_id)
        if rec is None:
            raise JobNotFoundError(f"no job {job_id!r}")
        return rec

    def put(self, rec: JobRecord) -> JobRecord:
        p = self._path(rec.id)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}")
        tmp.write_text(rec.model_dump_json(indent=1))
        os.replace(tmp, p)
        return rec

    def update(self, job_id: str, when: Callable[[JobRecord], bool] | None = None, **changes: Any) -> JobRecord:
        """Change a record under the lock; with ``when``, only if it holds for the current record."""
        with self.lock(job_id):
            rec = self.get(job_id)
            if when is not None and not when(rec):
                return rec
            return self.put(rec.model_copy(update={**changes, "updated_at": _now()}))

    def all(self) -> list[JobRecord]:
        recs = []
        for p in (self.root / "jobs").glob("*.json"):
            try:
                recs.append(JobRecord.model_validate_json(p.read_text()))
            except (OSError, ValueError):  # half-deleted or foreign file: not a job
                continue
        return sorted(recs, key=lambda r: r.created_at)

    # -- events -------------------------------------------------------------------
    def log_event(self, job_id: str, event: str, **fields: Any) -> None:
        """Append one JSON line (a single O_APPEND write: lines from many processes never interleave)."""
        line = json.dumps({"time": _now(), "event": event, **fields}, separators=(",", ":")) + "\n"
        fd = os.open(self._path(job_id, ".events.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        self.get(job_id)
        p = self._path(job_id, ".events.jsonl")
        if not p.exists():
            return []
        return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]

    # -- derived state ------------------------------------------------------------------
    def progress(self, rec: JobRecord) -> tuple[Progress, bool]:
        try:
            r = open_store(rec.store, allow_incomplete=True)
        except (StoreNotFoundError, SchemaError):
            return Progress(), False
        total, done = r.meta.num_rows, r.rows_done
        p = Progress(rows_done=done, rows_total=total, chunks_done=int(r.done.sum()), chunks_total=r.meta.n_chunks,
                     fraction=done / total if total else 1.0)
        return p, r.complete

    def view(self, job_id: str) -> JobView:
        rec = self.get(job_id)
        prog, complete = self.progress(rec)
        if complete and rec.state in ACTIVE:  # completion is read from the commit marks
            rec = self.update(job_id, when=lambda r: r.state in ACTIVE, state="succeeded", error=None,
                              finished_at=_now())
        return make_view(rec, prog)


def make_view(rec: JobRecord, prog: Progress) -> JobView:
    rate = eta = None
    start = _ts(rec.started_at)
    if start is not None and prog.rows_total is not None:
        end = _ts(rec.finished_at) if rec.state not in ACTIVE and rec.finished_at else time.time()
        rows = prog.rows_done - rec.rows_at_start
        if end > start and rows > 0:
            rate = rows / (end - start)
            if rec.state in ACTIVE:
                eta = (prog.rows_total - prog.rows_done) / rate
    return JobView(id=rec.id, state=rec.state, store=rec.store, error=rec.error, attempt=rec.attempt, progress=prog,
                   rows_per_second=rate, eta_seconds=eta, created_at=rec.created_at, updated_at=rec.updated_at,
                   started_at=rec.started_at, finished_at=rec.finished_at, job_key=rec.job_key, spec=rec.spec)


class JobManager:
    """Submit, cancel, resume, list: everything but running chunks (see :meth:`_dispatch`)."""

    mode = "abstract"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.book = JobBook(settings.home)

    # -- the API's verbs ----------------------------------------------------------------
    def submit(self, spec: JobSpec) -> tuple[JobView, bool]:
        """Returns (view, created). The same job submitted again returns the existing one without
        running any teacher; a failed or cancelled one is resumed rather than duplicated."""
        s = self.settings
        spec = spec.rebased(s.roots[0])  # relative paths in a request: against the first data root
        data = open_transfer_set(spec.data, allow_code=s.allow_code, roots=s.roots)
        key = identify(spec, allow_code=s.allow_code, roots=s.roots, data=data)
        job_id = key[:24]
        with self.book.lock(job_id):
            rec = self.book.find(job_id)
            if rec is not None and Path(rec.store).exists():
                existing = rec
            else:
                existing = None
                # loads every teacher on the CPU: unsafe or broken weights fail here, as a 4xx
                job = prepare(spec, device="cpu", allow_code=s.allow_code, roots=s.roots, data=data)
                if job.meta.job_key != key:  # a weight file changed between hashing and loading
                    raise SchemaError("the teachers changed while the job was being submitted; submit again")
                store = self.book.store_path(job_id)
                StoreWriter.open_or_create(store, job.meta)
                now = _now()
                rec = self.book.put(JobRecord(id=job_id, job_key=key, state="queued",
                                              spec=spec.model_dump(mode="json"), store=str(store),
                                              attempt=(rec.attempt + 1) if rec else 1, created_at=now,
                                              updated_at=now))
                self.book.log_event(job_id, "submitted", attempt=rec.attempt)
        if existing is None:
            self._dispatch(rec)
            return self.book.view(job_id), True
        if existing.state in ("failed", "cancelled"):
            return self.resume(job_id), False
        return self.book.view(job_id), False

    def cancel(self, job_id: str) -> JobView:
        """Stop a queued or running job at its next chunk boundary; committed chunks stay."""
        rec = self.book.update(job_id, when=lambda r: r.state in ACTIVE, state="cancelled", finished_at=_now())
        if rec.state == "cancelled":
            self.book.log_event(job_id, "cancelled", attempt=rec.attempt)
            self._cancelled(rec)
        return self.book.view(job_id)

    def resume(self, job_id: str) -> JobView:
        """Start a new attempt over the chunks not yet committed. A finished job is left alone;
        an active one is re-dispatched (its older tasks stop at their next chunk)."""
        view = self.book.view(job_id)
        if view.state == "succeeded":
            return view
        rows = view.progress.rows_done
        rec = self.book.update(job_id, when=lambda r: r.state != "succeeded", state="queued", error=None,
                               attempt=view.attempt + 1, rows_at_start=rows, started_at=None, finished_at=None)
        self.book.log_event(job_id, "resumed", attempt=rec.attempt, rows_done=rows)
        self._dispatch(rec)
        return self.book.view(job_id)

    def get(self, job_id: str) -> JobView:
        return self.book.view(job_id)

    def list(self, state: State | None = None, limit: int = 50, offset: int = 0) -> tuple[list[JobView], int]:
        recs = [r for r in self.book.all() if state is None or r.state == state]
        recs.reverse()  # newest first
        page = recs[offset:offset + limit]
        return [self.book.view(r.id) for r in page], len(recs)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return True, {"mode": self.mode}

    def close(self) -> None:
        pass

    # -- what subclasses provide ----------------------------------------------------------
    def _dispatch(self, rec: JobRecord) -> None:
        raise NotImplementedError

    def _cancelled(self, rec: JobRecord) -> None:
        pass


# --- running chunks: the same code for the local runner and Celery workers -----------------
class EnsembleCache:
    """Prepared jobs (teachers loaded on the device, data opened) kept per process, by job key."""

    def __init__(self, size: int = 1):
        self.size = size
        self._items: OrderedDict[str, PreparedJob] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, rec: JobRecord, settings: Settings, on_load: Callable[[float], None] | None = None) -> PreparedJob:
        with self._lock:
            job = self._items.get(rec.job_key)
            if job is not None:
                self._items.move_to_end(rec.job_key)
                return job
            t0 = time.perf_counter()
            spec = JobSpec.model_validate(rec.spec)
            job = prepare(spec, device=settings.resolved_device(), allow_code=settings.allow_code, roots=settings.roots)
            if job.meta.job_key != rec.job_key:
                raise SchemaError(
                    f"job {rec.id}: the teachers' weights or the transfer set changed since the job was submitted "
                    f"(job key {job.meta.job_key[:12]}…, store {rec.job_key[:12]}…); nothing was written"
                )
            self._items[rec.job_key] = job
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            if on_load:
                on_load(time.perf_counter() - t0)
            return job


def run_job_chunks(book: JobBook, settings: Settings, cache: EnsembleCache, job_id: str, attempt: int,
                   chunks: Sequence[int], *, worker: str, stop: Callable[[], bool] = lambda: False,
                   **event_fields: Any) -> str:
    """Compute ``chunks`` of one attempt of a job; returns how it ended: done, stale, cancelled.

    Raises what generation raises (DarkstoreError for bad input); the caller decides
    whether that fails the job or is retried."""
    rec = book.get(job_id)
    if rec.attempt != attempt or rec.state not in ACTIVE:
        book.log_event(job_id, "task_skipped", attempt=attempt, chunks=list(chunks), worker=worker, pid=os.getpid(),
                       reason=f"job is {rec.state}, attempt {rec.attempt}")
        return "stale"
    book.update(job_id, when=lambda r: r.attempt == attempt and r.state == "queued", state="running",
                started_at=_now())
    book.log_event(job_id, "task_started", attempt=attempt, chunks=list(chunks), worker=worker, pid=os.getpid(),
                   **event_fields)

    def loaded(seconds: float) -> None:
        book.log_event(job_id, "ensemble_loaded", worker=worker, pid=os.getpid(), seconds=round(seconds, 3))

    job = cache.get(rec, settings, on_load=loaded)
    writer = StoreWriter(rec.store)

    def stale() -> bool:
        if stop():
            return True
        r = book.get(job_id)
        return r.attempt != attempt or r.state not in ACTIVE

    def committed(i: int, rows: int) -> None:
        book.log_event(job_id, "chunk_committed", attempt=attempt, chunk=i, rows=rows, worker=worker, pid=os.getpid())

    try:
        rows = run_chunks(job, writer, chunks, batch_size=settings.batch_size, num_workers=settings.loader_workers,
                          on_chunk=committed, should_stop=stale)
    except Cancelled:
        book.log_event(job_id, "task_stopped", attempt=attempt, chunks=list(chunks), worker=worker, pid=os.getpid())
        return "cancelled"
    book.log_event(job_id, "task_finished", attempt=attempt, chunks=list(chunks), rows=rows, worker=worker,
                   pid=os.getpid())
    book.view(job_id)  # marks the job succeeded when this was the last chunk
    return "done"


def fail_job(book: JobBook, job_id: str, attempt: int, error: str) -> None:
    rec = book.update(job_id, when=lambda r: r.attempt == attempt and r.state in ACTIVE, state="failed", error=error,
                      finished_at=_now())
    book.log_event(job_id, "failed", attempt=attempt, error=error, state=rec.state)


class LocalRunner(JobManager):
    """Runs jobs one after another in a background thread: ``darkstore serve --local``'s engine.

    A runner started over a folder with queued or running jobs (the process died, or
    was restarted) picks them up again."""

    mode = "local"

    def __init__(self, settings: Settings | None = None, *, requeue: bool = True, **overrides: Any):
        settings = settings or Settings(**overrides)
        super().__init__(settings)
        self.cache = EnsembleCache(settings.ensemble_cache)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="darkstore-job")
        self._futures: dict[str, Future] = {}
        self._closing = False
        if requeue:
            for rec in self.book.all():
                if rec.state in ACTIVE:
                    self.book.log_event(rec.id, "requeued", attempt=rec.attempt)
                    self._dispatch(rec)

    def _dispatch(self, rec: JobRecord) -> None:
        self._futures[rec.id] = self._pool.submit(self._run, rec.id, rec.attempt)

    def _cancelled(self, rec: JobRecord) -> None:
        fut = self._futures.get(rec.id)
        if fut is not None:
            fut.cancel()  # not started yet: it never will be

    def _run(self, job_id: str, attempt: int) -> None:
        try:
            pending = StoreWriter(self.book.get(job_id).store).pending_chunks()
            run_job_chunks(self.book, self.settings, self.cache, job_id, attempt, pending, worker="local",
                           stop=lambda: self._closing)
        except DarkstoreError as exc:
            fail_job(self.book, job_id, attempt, str(exc))
        except Exception as exc:  # noqa: BLE001 — a job must end in a state, never vanish
            log.exception("job %s failed", job_id)
            fail_job(self.book, job_id, attempt, f"{type(exc).__name__}: {exc}")

    def wait(self, job_id: str, timeout: float = 600.0) -> JobView:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.book.view(job_id)
            fut = self._futures.get(job_id)
            if view.state not in ACTIVE and (fut is None or fut.done()):
                return view
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} still {self.book.get(job_id).state} after {timeout} s")

    def close(self) -> None:
        """Stop after the current chunk; unfinished jobs stay queued/running and resume on the next start."""
        self._closing = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    shutdown = close


__all__ = ["ACTIVE", "STATES", "JobBook", "JobManager", "JobNotFoundError", "JobRecord", "JobView", "LocalRunner",
           "Progress", "identify", "run_job_chunks", "fail_job", "EnsembleCache"]
