"""Jobs: records on disk plus an in-process runner (the embedded default, no Redis).

A job's id comes from its identity (teachers by weight hash, data by fingerprint,
options), so submitting the same job twice returns the first one and never runs
the teachers again. Progress is read from the store's commit marks; the record
only holds what the store cannot: state, error, timestamps. A runner restarted
over the same folder requeues the jobs that were queued or running.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Sequence

from pydantic import BaseModel

from darkstore.data import open_transfer_set
from darkstore.models import sha256_file
from darkstore.paths import resolve
from storage import open_store
from storage.errors import DarkstoreError, StoreNotFoundError, WeightsNotFoundError

from .generate import Cancelled, generate
from .spec import JobSpec

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: tuple[State, ...] = ("queued", "running")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class JobRecord(BaseModel):
    id: str
    job_key: str
    state: State
    spec: dict[str, Any]
    store: str
    error: str | None = None
    created_at: str
    updated_at: str
    started_at: str | None = None
    finished_at: str | None = None


class JobStatus(BaseModel):
    record: JobRecord
    rows_total: int | None = None
    rows_done: int = 0
    chunks_total: int | None = None
    chunks_done: int = 0


def identify(spec: JobSpec, *, allow_code: bool = False, roots: Sequence[str | Path] | None = None) -> str:
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
    data = open_transfer_set(spec.data, allow_code=allow_code, roots=roots)
    return spec.job_key(hashes, data.fingerprint)


class JobBook:
    """Job records as small JSON files, written atomically."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        (self.root / "stores").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, job_id: str) -> Path:
        if not job_id.isalnum():
            raise StoreNotFoundError(f"no job {job_id!r}")
        return self.root / "jobs" / f"{job_id}.json"

    def get(self, job_id: str) -> JobRecord:
        p = self._path(job_id)
        if not p.is_file():
            raise StoreNotFoundError(f"no job {job_id!r}")
        return JobRecord.model_validate_json(p.read_text())

    def put(self, rec: JobRecord) -> JobRecord:
        p = self._path(rec.id)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}")
        tmp.write_text(rec.model_dump_json(indent=1))
        os.replace(tmp, p)
        return rec

    def update(self, job_id: str, **changes: Any) -> JobRecord:
        with self._lock:
            rec = self.get(job_id)
            return self.put(rec.model_copy(update={**changes, "updated_at": _now()}))

    def all(self) -> list[JobRecord]:
        recs = [JobRecord.model_validate_json(p.read_text()) for p in (self.root / "jobs").glob("*.json")]
        return sorted(recs, key=lambda r: r.created_at)

    def status(self, job_id: str) -> JobStatus:
        rec = self.get(job_id)
        try:
            r = open_store(rec.store, allow_incomplete=True)
        except StoreNotFoundError:
            return JobStatus(record=rec)
        return JobStatus(record=rec, rows_total=r.meta.num_rows, rows_done=r.rows_done,
                         chunks_total=r.meta.n_chunks, chunks_done=int(r.done.sum()))


class LocalRunner:
    """Runs jobs in a background thread of this process: `darkstore serve --local`'s engine."""

    def __init__(self, root: str | Path, *, device: str = "cpu", batch_size: int = 256, allow_code: bool = False,
                 roots: Sequence[str | Path] | None = None, requeue: bool = True):
        self.book = JobBook(root)
        self.device, self.batch_size, self.allow_code, self.roots = device, batch_size, allow_code, roots
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="darkstore-job")
        self._futures: dict[str, Future] = {}
        self._stop: set[str] = set()
        self._lock = threading.Lock()
        if requeue:
            for rec in self.book.all():
                if rec.state in ACTIVE:
                    self.book.update(rec.id, state="queued")
                    self._enqueue(rec.id)

    def submit(self, spec: JobSpec) -> tuple[JobRecord, bool]:
        """Returns (record, created). The same job submitted again returns the existing record;
        a failed or cancelled one is resumed rather than duplicated."""
        key = identify(spec, allow_code=self.allow_code, roots=self.roots)
        job_id = key[:24]
        with self._lock:
            try:
                rec = self.book.get(job_id)
            except StoreNotFoundError:
                now = _now()
                rec = self.book.put(JobRecord(id=job_id, job_key=key, state="queued", spec=spec.model_dump(mode="json"),
                                              store=str(self.book.root / "stores" / job_id), created_at=now,
                                              updated_at=now))
                self._enqueue(job_id)
                return rec, True
        if rec.state in ("failed", "cancelled"):
            rec = self.resume(job_id)
        return rec, False

    def resume(self, job_id: str) -> JobRecord:
        rec = self.book.get(job_id)
        if rec.state in ACTIVE or rec.state == "succeeded":
            return rec
        rec = self.book.update(job_id, state="queued", error=None)
        self._enqueue(job_id)
        return rec

    def cancel(self, job_id: str) -> JobRecord:
        rec = self.book.get(job_id)
        if rec.state not in ACTIVE:
            return rec
        with self._lock:
            self._stop.add(job_id)
            fut = self._futures.get(job_id)
            if fut is not None and fut.cancel():  # still waiting in the queue
                self._stop.discard(job_id)
                return self.book.update(job_id, state="cancelled", finished_at=_now())
        return rec

    def wait(self, job_id: str, timeout: float = 600.0) -> JobRecord:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rec = self.book.get(job_id)
            if rec.state not in ACTIVE and job_id not in self._stop:
                return rec
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} still {self.book.get(job_id).state} after {timeout} s")

    def shutdown(self) -> None:
        with self._lock:
            self._stop.update(self._futures)
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _enqueue(self, job_id: str) -> None:
        self._futures[job_id] = self._pool.submit(self._run, job_id)

    def _run(self, job_id: str) -> None:
        self.book.update(job_id, state="running", started_at=_now())
        rec = self.book.get(job_id)
        try:
            spec = JobSpec.model_validate(rec.spec)
            generate(spec, rec.store, device=self.device, batch_size=self.batch_size, allow_code=self.allow_code,
                     roots=self.roots, should_stop=lambda: job_id in self._stop)
        except Cancelled:
            self.book.update(job_id, state="cancelled", finished_at=_now())
        except DarkstoreError as exc:
            self.book.update(job_id, state="failed", error=str(exc), finished_at=_now())
        except Exception as exc:  # noqa: BLE001 — a job must end in a state, never vanish
            self.book.update(job_id, state="failed", error=f"{type(exc).__name__}: {exc}", finished_at=_now())
        else:
            self.book.update(job_id, state="succeeded", finished_at=_now())
        finally:
            with self._lock:
                self._stop.discard(job_id)
                self._futures.pop(job_id, None)


__all__ = ["JobBook", "JobRecord", "JobStatus", "LocalRunner", "identify"]
