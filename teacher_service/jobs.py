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

import base64
import contextlib
import functools
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

import numpy as np
from pydantic import BaseModel, Field

from darkstore.paths import resolve
from storage import StoreMeta, StoreWriter, copy_store, open_store
from storage.location import Location
from darkstore.errors import DarkstoreError, SpecError
from storage.errors import SchemaError, StoreAccessError, StoreNotFoundError

from .admission import Admission
from .generate import prepare, run_chunks
from .prepared import Cancelled, PreparedJob, identify
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


class Progress(BaseModel):
    rows_done: int = 0
    rows_total: int | None = None
    chunks_done: int = 0
    chunks_total: int | None = None
    fraction: float = 0.0
    tokens_done: int | None = Field(None, description="a language-model job: token positions committed")
    tokens_total: int | None = Field(None, description="a language-model job: token positions in all")
    tokens_written: int | None = Field(None, description="a job whose teachers write responses: the tokens written "
                                       "into the committed chunks")


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
    dispatched_at: str | None = Field(None, description="when this attempt's tasks were last handed out")
    # progress, kept here so that a job's view never opens its store (the store's commit marks stay the
    # truth: workers set a bit per commit, the reconciler re-reads the marks of active jobs)
    num_rows: int | None = None
    chunk_rows: int | None = None
    positions_per_row: int | None = Field(None, description="a language-model job: token positions per row")
    tokens_written: int | None = Field(None, description="a job whose teachers write responses: the tokens written "
                                       "into the committed chunks (None: another job)")
    committed: str = Field("", description="commit bitmap: base64 of numpy.packbits over the chunks")

    @property
    def n_chunks(self) -> int | None:
        if self.num_rows is None or not self.chunk_rows:
            return None
        return -(-self.num_rows // self.chunk_rows)

    def committed_mask(self) -> np.ndarray:
        n = self.n_chunks or 0
        if not self.committed:
            return np.zeros(n, dtype=bool)
        bits = np.unpackbits(np.frombuffer(base64.b64decode(self.committed), dtype=np.uint8))[:n]
        return bits.astype(bool)

    def with_mask(self, mask: np.ndarray) -> "JobRecord":
        return self.model_copy(update={"committed": base64.b64encode(np.packbits(mask.astype(np.uint8))).decode()})

    def progress(self) -> Progress:
        n = self.n_chunks
        if n is None:
            return Progress()
        mask = self.committed_mask()
        done = int(mask.sum())
        last_rows = self.num_rows - (n - 1) * self.chunk_rows
        rows = done * self.chunk_rows - (self.chunk_rows - last_rows if n and mask[-1] else 0)
        per = self.positions_per_row
        return Progress(rows_done=rows, rows_total=self.num_rows, chunks_done=done, chunks_total=n,
                        fraction=rows / self.num_rows if self.num_rows else 1.0,
                        tokens_done=rows * per if per else None, tokens_total=self.num_rows * per if per else None,
                        tokens_written=self.tokens_written)


class JobView(BaseModel):
    """What the API answers about a job: the record plus progress read from the store."""

    id: str
    state: State
    store: str
    error: str | None
    attempt: int
    progress: Progress
    rows_per_second: float | None = Field(None, description="this attempt's throughput")
    tokens_per_second: float | None = Field(None, description="a language-model job: this attempt's throughput in "
                                            "token positions (a job writing responses: in tokens written)")
    eta_seconds: float | None = None
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    job_key: str
    spec: dict[str, Any]




MAX_ID_LENGTH = 64


class JobBook:
    """Job records as small JSON files (written atomically, updated under a file lock, so
    the API and any number of worker processes can share them), plus an event log per job.

    Listing reads an in-process index: the folder is re-scanned at most every
    ``index_ttl`` seconds and only files whose size or mtime changed are parsed again,
    so a page of jobs costs O(page), whatever the number of jobs."""

    def __init__(self, root: str | Path, store_root: str | None = None, index_ttl: float = 0.25):
        self.root = Path(root).expanduser().resolve()
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self.stores = Location.parse(store_root).absolute() if store_root else Location.parse(self.root / "stores")
        if self.stores.local is not None:
            self.stores.local.mkdir(parents=True, exist_ok=True)
        self.index_ttl = index_ttl
        self._index: dict[str, tuple[tuple[int, int], JobRecord]] = {}
        self._ordered: list[JobRecord] | None = None
        self._scanned_at = -1e9
        self._index_lock = threading.Lock()
        self._rendered: dict[str, tuple[str, bytes]] = {}  # finished jobs' views as JSON, by id and updated_at
        self._totals: tuple[list[JobRecord], dict[str, int], int] | None = None

    def _path(self, job_id: str, suffix: str = ".json") -> Path:
        if not job_id or len(job_id) > MAX_ID_LENGTH or not job_id.isascii() or not job_id.isalnum():
            raise JobNotFoundError(f"no job {job_id[:MAX_ID_LENGTH]!r}")
        return self.root / "jobs" / f"{job_id}{suffix}"

    def store_path(self, job_id: str) -> str:
        """Where the job's store lives: ``<store root>/<job id>``, a local path or a URL."""
        return str(self.stores.child(job_id))

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
        with self._index_lock:  # this process sees its own writes at once
            st = p.stat()
            self._index[p.name] = ((st.st_mtime_ns, st.st_size), rec)
            self._ordered = None
        return rec

    def update(self, job_id: str, when: Callable[[JobRecord], bool] | None = None, **changes: Any) -> JobRecord:
        """Change a record under the lock; with ``when``, only if it holds for the current record."""
        with self.lock(job_id):
            rec = self.get(job_id)
            if when is not None and not when(rec):
                return rec
            return self.put(rec.model_copy(update={**changes, "updated_at": _now()}))

    def all(self) -> list[JobRecord]:
        """Every record, oldest first, from the index (at most ``index_ttl`` seconds old)."""
        with self._index_lock:
            if time.monotonic() - self._scanned_at > self.index_ttl:
                self._rescan()
            if self._ordered is None:
                self._ordered = sorted((rec for _, rec in self._index.values()), key=lambda r: r.created_at)
            return self._ordered

    def _rescan(self) -> None:
        seen = set()
        with os.scandir(self.root / "jobs") as it:
            for entry in it:
                name = entry.name
                if not name.endswith(".json") or name.startswith("."):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                seen.add(name)
                sig = (st.st_mtime_ns, st.st_size)
                cached = self._index.get(name)
                if cached is not None and cached[0] == sig:
                    continue
                try:
                    self._index[name] = (sig, JobRecord.model_validate_json(Path(entry.path).read_text()))
                except (OSError, ValueError):  # half-written or foreign file: not a job
                    continue
                self._ordered = None
        for gone in set(self._index) - seen:
            del self._index[gone]
            self._ordered = None
        self._scanned_at = time.monotonic()

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

    # -- progress -------------------------------------------------------------------
    def mark_committed(self, job_id: str, chunk: int, written: int | None = None) -> JobRecord:
        """Record one commit (``written``: the tokens its responses hold); the commit of the last chunk marks
        an active job succeeded."""
        with self.lock(job_id):
            rec = self.get(job_id)
            if rec.n_chunks is None:
                return rec  # a record from before progress was kept: the next sync fills it in
            mask = rec.committed_mask()
            changes: dict[str, Any] = {"updated_at": _now()}
            if written is not None and not mask[chunk]:
                changes["tokens_written"] = (rec.tokens_written or 0) + written
            mask[chunk] = True
            if mask.all() and rec.state in ACTIVE:
                changes.update(state="succeeded", error=None, finished_at=_now())
            return self.put(rec.with_mask(mask).model_copy(update=changes))

    def sync(self, job_id: str) -> tuple[JobRecord, np.ndarray | None]:
        """Re-read the store's commit marks (the truth) into the record. Returns the record and the
        marks, or ``None`` for the marks when the store is gone (the job is then marked failed)."""
        rec = self.get(job_id)
        try:
            r = open_store(rec.store, allow_incomplete=True)
        except StoreAccessError:
            raise  # unreachable for now (credentials, network): not a lost store
        except (StoreNotFoundError, SchemaError, OSError) as exc:
            return self._lost(rec, exc), None
        mask = r.done
        with self.lock(job_id):
            rec = self.get(job_id)
            changes: dict[str, Any] = {}
            if mask.all() and rec.state in ACTIVE:
                changes.update(state="succeeded", error=None, finished_at=_now())
            if (rec.num_rows, rec.chunk_rows) != (r.meta.num_rows, r.meta.chunk_rows) or \
                    not np.array_equal(rec.committed_mask(), mask) or changes:
                rec = rec.model_copy(update={"num_rows": r.meta.num_rows, "chunk_rows": r.meta.chunk_rows,
                                             "positions_per_row": _positions(r.meta),
                                             "tokens_written": _written(r.meta, r.group, mask)})
                rec = self.put(rec.with_mask(mask).model_copy(update={**changes, "updated_at": _now()}))
        return rec, mask

    def _lost(self, rec: JobRecord, why: Exception | str) -> JobRecord:
        if rec.state == "failed":
            return rec
        error = (f"the job's store is gone or unreadable ({type(why).__name__ if isinstance(why, Exception) else why});"
                 " it may have been deleted: submit the job again to recompute it")
        rec = self.update(rec.id, when=lambda r: r.state != "failed", state="failed", error=error,
                          finished_at=_now())
        self.log_event(rec.id, "store_lost", attempt=rec.attempt)
        return rec

    def store_present(self, rec: JobRecord) -> bool:
        return Location.parse(rec.store).exists("zarr.json")

    def has_store(self, key: str) -> bool:
        """Whether the job with this key exists with its store."""
        rec = self.find(key[:24])
        return rec is not None and self.store_present(rec)

    # -- derived state ------------------------------------------------------------------
    def view_json(self, rec: JobRecord) -> bytes:
        """A job's view as JSON; a finished job's is rendered once per change of its record (listing a page
        costs a stat per job, not a model per job)."""
        if rec.state in ACTIVE or rec.n_chunks is None or not self.store_present(rec):
            return self.view(rec.id, rec).model_dump_json().encode()
        hit = self._rendered.get(rec.id)
        if hit is None or hit[0] != rec.updated_at:
            hit = (rec.updated_at, self.view(rec.id, rec).model_dump_json().encode())
            self._rendered[rec.id] = hit
        return hit[1]

    def totals(self) -> tuple[dict[str, int], int]:
        """Jobs by state and rows committed over all jobs: computed again only when a record changed."""
        recs = self.all()
        if self._totals is None or self._totals[0] is not recs:
            counts = dict.fromkeys(STATES, 0)
            for r in recs:
                counts[r.state] += 1
            self._totals = (recs, counts, sum(r.progress().rows_done for r in recs))
        return self._totals[1], self._totals[2]

    def view(self, job_id: str, rec: JobRecord | None = None) -> JobView:
        """What the API answers: the record (progress included) — the store is only stat'ed."""
        rec = rec or self.get(job_id)
        if rec.n_chunks is None:  # a record written before progress was kept: fill it in once
            rec, _ = self.sync(job_id)
        elif rec.state != "failed" and not self.store_present(rec):
            rec = self._lost(rec, "no zarr.json")
        return make_view(rec, rec.progress())


def job_exists(home: str, store_root: str | None, key: str) -> bool:
    """Whether the job with this key exists with its store (picklable, for the submit-time check)."""
    return JobBook(home, store_root).has_store(key)


def _positions(meta: StoreMeta) -> int | None:
    """Target positions per row where the job's work is counted in them (None: in rows, a row of classes or a
    written response)."""
    unit, per, _ = meta.kind.progress(meta)
    return per if unit == "tokens" else None


def _written(meta: StoreMeta, group, mask: np.ndarray) -> int | None:
    """Tokens written into the committed chunks of a store whose teachers write responses (None: another)."""
    return int(group["stats"][:][mask][:, 0].sum()) if meta.kind.progress(meta)[2] else None


def _token_rate(rate: float | None, rec: JobRecord, prog: Progress) -> float | None:
    """Tokens a second: positions, or tokens written at the mean written per committed row so far."""
    if not rate:
        return None
    if rec.tokens_written is not None:
        return rate * rec.tokens_written / prog.rows_done if prog.rows_done else None
    return rate * rec.positions_per_row if rec.positions_per_row else None


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
                   rows_per_second=rate, eta_seconds=eta,
                   tokens_per_second=_token_rate(rate, rec, prog),
                   created_at=rec.created_at, updated_at=rec.updated_at,
                   started_at=rec.started_at, finished_at=rec.finished_at, job_key=rec.job_key, spec=rec.spec)


class JobManager:
    """Submit, cancel, resume, list: everything but running chunks (see :meth:`_dispatch`)."""

    mode = "abstract"

    def __init__(self, settings: Settings):
        self.settings = settings
        self.book = JobBook(settings.home, settings.store_root)
        self.admission = Admission(settings)

    # -- the API's verbs ----------------------------------------------------------------
    def submit(self, spec: JobSpec, adopt: str | None = None) -> tuple[JobView, bool]:
        """Returns (view, created). The same job submitted again returns the existing one without
        running any teacher; a failed or cancelled one is resumed rather than duplicated. ``adopt``: a complete
        store of this very job inside the data roots (made by `darkstore generate`), verified and copied in as
        the job's store instead of running the teachers."""
        spec = spec.rebased(self.settings.roots[0])  # relative paths in a request: against the first data root
        key, meta = self.admission.admit(spec, functools.partial(job_exists, str(self.book.root), self.settings.store_root))
        job_id = key[:24]
        with self.book.lock(job_id):
            rec = self.book.find(job_id)
            if rec is not None and self.book.store_present(rec):
                existing = rec
            else:
                existing = None
                if adopt is not None:
                    rec = self._adopt(spec, key, adopt, rec)
                    return self.book.view(rec.id), True
                if meta is None:  # deleted between the check and now: check it in full
                    _, meta = self.admission.admit(spec, None)
                store = self.book.store_path(job_id)
                writer = StoreWriter.open_or_create(store, meta)
                now = _now()
                rec = JobRecord(id=job_id, job_key=key, state="queued", spec=spec.model_dump(mode="json"),
                                store=store, attempt=(rec.attempt + 1) if rec else 1, created_at=now,
                                updated_at=now, num_rows=meta.num_rows, chunk_rows=meta.chunk_rows,
                                positions_per_row=_positions(meta),
                                tokens_written=_written(meta, writer.group, writer.done_mask()))
                rec = self.book.put(rec.with_mask(writer.done_mask()))
                self.book.log_event(job_id, "submitted", attempt=rec.attempt)
        if existing is None:
            self._dispatch(rec)
            return self.book.view(job_id), True
        if existing.state in ("failed", "cancelled"):
            return self.resume(job_id), False
        return self.book.view(job_id), False

    def _adopt(self, spec: JobSpec, key: str, path: str, prior: JobRecord | None) -> JobRecord:
        """Take a finished store of this job as its store: it must lie in the data roots, be complete, hold this
        job (the same key: teachers by weight hash, data fingerprint, options) and pass a full verify (every
        chunk's checksum). It is copied into the store root, verified again there, and the job is finished."""
        src = resolve(path, base_dir=self.settings.roots[0], roots=self.settings.roots)
        reader = open_store(src)  # refuses an incomplete store
        if reader.meta.job_key != key:
            raise SpecError(f"the store {path} holds another job (key {reader.meta.job_key[:12]}…, this job's is "
                            f"{key[:12]}…): its teachers' weights, its transfer set or its options differ")
        reader.verify()
        dest = Location.parse(self.book.store_path(key[:24]))
        if dest.exists():
            dest.remove()  # an adoption cut short before its record was written
        copy_store(src, dest)
        open_store(dest).verify()
        now = _now()
        rec = JobRecord(id=key[:24], job_key=key, state="succeeded", spec=spec.model_dump(mode="json"),
                        store=str(dest), attempt=(prior.attempt + 1) if prior else 1, created_at=now, updated_at=now,
                        started_at=now, finished_at=now, num_rows=reader.meta.num_rows,
                        chunk_rows=reader.meta.chunk_rows, positions_per_row=_positions(reader.meta),
                        tokens_written=_written(reader.meta, reader.group, reader.done))
        rec = self.book.put(rec.with_mask(np.ones(reader.meta.n_chunks, dtype=bool)))
        self.book.log_event(rec.id, "adopted", attempt=rec.attempt, source=path)
        return rec

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
        if not self.book.store_present(self.book.get(job_id)):
            raise StoreNotFoundError(f"job {job_id}'s store is gone: submit the job again to recompute it")
        rows = view.progress.rows_done
        rec = self.book.update(job_id, when=lambda r: r.state != "succeeded", state="queued", error=None,
                               attempt=view.attempt + 1, rows_at_start=rows, started_at=None, finished_at=None)
        self.book.log_event(job_id, "resumed", attempt=rec.attempt, rows_done=rows)
        self._dispatch(rec)
        return self.book.view(job_id)

    def get(self, job_id: str) -> JobView:
        return self.book.view(job_id)

    def page(self, state: State | None = None, limit: int = 50, offset: int = 0) -> tuple[list[JobRecord], int]:
        """One page of records, newest first, and the number of jobs (in ``state``): from the index."""
        recs = self.book.all()
        if state is not None:
            recs = [r for r in recs if r.state == state]
        stop = len(recs) - offset
        return recs[max(0, stop - limit):max(0, stop)][::-1], len(recs)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        return True, {"mode": self.mode}

    def start(self) -> None:
        """Background work of a long-running manager (the API's): nothing here."""

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
            job = prepare(spec, device=settings.resolved_device(), allow_code=settings.allow_code, roots=settings.roots,
                          fingerprints=settings.fingerprints)
            if job.meta.job_key != rec.job_key:
                raise SchemaError(
                    f"job {rec.id}: the teachers' weights or the transfer set changed since the job was submitted "
                    f"(job key {job.meta.job_key[:12]}…, store {rec.job_key[:12]}…); nothing was written"
                )
            self._items[rec.job_key] = job
            while len(self._items) > self.size:
                self._items.popitem(last=False)[1].close()
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
        written = int(writer.group["stats"][i, 0]) if writer.meta.kind.progress(writer.meta)[2] else None
        book.mark_committed(job_id, i, written)  # the last commit marks the job succeeded

    try:
        rows = run_chunks(job, writer, chunks, batch_size=settings.batch_size, num_workers=settings.loader_workers,
                          on_chunk=committed, should_stop=stale, writer_processes=settings.writer_processes)
    except Cancelled:
        book.log_event(job_id, "task_stopped", attempt=attempt, chunks=list(chunks), worker=worker, pid=os.getpid())
        return "cancelled"
    book.log_event(job_id, "task_finished", attempt=attempt, chunks=list(chunks), rows=rows, worker=worker,
                   pid=os.getpid())
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
            rec, mask = self.book.sync(job_id)  # a commit the last process did not record counts too
            if mask is None or rec.state not in ACTIVE:
                return
            pending = [int(i) for i in (~mask).nonzero()[0]]
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
