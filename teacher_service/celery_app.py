"""The Celery side: one place configures the app; a job becomes chunk-range tasks.

Delivery is at-least-once. ``task_acks_late`` + ``task_reject_on_worker_lost`` put
a task back in the queue when its worker dies; Redis hands an unacknowledged task
to another worker after ``visibility_timeout`` (longer than any task, checked by
:class:`~teacher_service.settings.Settings`). A redelivered range only computes
chunks without a commit mark, and rewriting a chunk writes identical bytes, so
duplicates cost time, never correctness.

Workers: ``darkstore worker`` (= ``celery -A teacher_service.celery_app worker -Q darkstore``).
Each worker process loads an ensemble once and keeps it for the job's next tasks.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import redis

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from storage import StoreWriter
from darkstore.errors import DarkstoreError, error_class

from .jobs import EnsembleCache, JobBook, JobManager, JobRecord, JobView, _now, fail_job, run_job_chunks
from .reconcile import Lease, Ledger, Reconciler
from .settings import Settings
from .spec import JobSpec

log = logging.getLogger(__name__)
QUEUE = "darkstore"
RUN_CHUNKS = "darkstore.run_chunks"
SUBMIT = "darkstore.submit"


class BrokerUnavailableError(DarkstoreError, ConnectionError):
    """The Redis broker cannot be reached."""


def make_celery(settings: Settings) -> Celery:
    """The Celery app for ``settings``: the only place Celery is configured."""
    app = Celery("darkstore", broker=settings.broker_url, backend=settings.broker_url)
    app.conf.update(
        # at-least-once delivery
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": settings.redelivery_check_interval,
            "unacked_restore_throttle": 1,
        },
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout},
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=settings.soft_time_limit,
        # routing: every darkstore task on one queue that any worker may take
        task_default_queue=QUEUE,
        task_routes={RUN_CHUNKS: {"queue": QUEUE}, SUBMIT: {"queue": QUEUE}},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # progress lives in the store; only `submit` returns a value
        result_expires=24 * 3600,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        worker_hijack_root_logger=True,
    )
    return app


def send_ranges(app: Celery, ledger: Ledger, job_id: str, attempt: int, chunks: Sequence[int], per_task: int) -> int:
    """Send ``chunks`` as tasks of at most ``per_task`` chunks, each with its ticket; returns the task count."""
    ranges = [list(chunks[i:i + per_task]) for i in range(0, len(chunks), per_task)]
    for r in ranges:
        task_id = ledger.add(job_id, attempt, r)
        app.send_task(RUN_CHUNKS, args=(job_id, attempt, r), task_id=task_id, queue=QUEUE, ignore_result=True)
    return len(ranges)


class CeleryManager(JobManager):
    """Jobs dispatched to Celery workers as chunk-range tasks, kept alive by a :class:`Reconciler`."""

    mode = "celery"

    def __init__(self, settings: Settings, app: Celery | None = None):
        if not settings.broker_url:
            raise DarkstoreError("the Celery job API needs DARKSTORE_BROKER_URL (or run `darkstore serve --local`)")
        super().__init__(settings)
        self.app = app or make_celery(settings)
        self.ledger = Ledger(settings.broker_url, settings.lease_ttl, QUEUE)
        self.reconciler = Reconciler(self.book, self.ledger, self.send, lease_ttl=settings.lease_ttl,
                                     interval=settings.reconcile_interval)

    def start(self) -> None:
        self.reconciler.start()

    def close(self) -> None:
        self.reconciler.stop()

    def send(self, rec: JobRecord, chunks: Sequence[int]) -> int:
        self.book.update(rec.id, dispatched_at=_now())
        return send_ranges(self.app, self.ledger, rec.id, rec.attempt, chunks, self.settings.chunks_per_task)

    def _dispatch(self, rec: JobRecord) -> None:
        pending = StoreWriter(rec.store).pending_chunks()
        try:
            tasks = self.send(rec, pending)
        except (OperationalError, ConnectionError, OSError, redis.RedisError) as exc:
            self.book.log_event(rec.id, "dispatch_failed", attempt=rec.attempt, error=str(exc))
            raise BrokerUnavailableError(
                f"job {rec.id} is recorded but the broker is unreachable ({type(exc).__name__}); it is dispatched "
                f"by itself once the broker is back (or POST /v1/jobs/{rec.id}/resume)"
            ) from exc
        self.book.log_event(rec.id, "dispatched", attempt=rec.attempt, tasks=tasks, chunks=len(pending))
        if not pending:
            self.book.sync(rec.id)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        try:
            client = redis.Redis.from_url(self.settings.broker_url, socket_connect_timeout=2, socket_timeout=2)
            client.ping()
            queued = int(client.llen(QUEUE))
        except redis.RedisError as exc:
            return False, {"mode": self.mode, "broker": f"unreachable: {exc}"}
        return True, {"mode": self.mode, "broker": "ok", "queued_tasks": queued}


def submit_via_celery(spec: JobSpec | dict, settings: Settings | None = None, timeout: float = 600.0
                      ) -> tuple[JobView, bool]:
    """Submit a job through the broker alone (no HTTP): a worker validates, records and dispatches it.
    Returns (view, created) like ``POST /v1/jobs``; raises the same errors."""
    settings = settings or Settings()
    body = spec.model_dump(mode="json") if isinstance(spec, JobSpec) else spec
    result = make_celery(settings).send_task(SUBMIT, args=(body,), queue=QUEUE)
    try:
        out = result.get(timeout=timeout)
    finally:
        result.forget()
    if "error" in out:
        raise error_class(out["error"])(out["detail"])
    return JobView.model_validate(out["job"]), bool(out["created"])


# --- the worker side -------------------------------------------------------------------
settings = Settings()
app = make_celery(settings)
_book: JobBook | None = None
_ledger: Ledger | None = None
_cache = EnsembleCache(settings.ensemble_cache)


def _get_book() -> JobBook:
    global _book
    if _book is None:
        _book = JobBook(settings.home, settings.store_root)
    return _book


def _get_ledger() -> Ledger:
    global _ledger
    if _ledger is None:
        _ledger = Ledger(settings.broker_url, settings.lease_ttl, QUEUE)
    return _ledger


@worker_process_init.connect
def _may_start_processes(**_: Any) -> None:
    """A prefork pool process is a daemon, and Python refuses a daemon children; but a job's inputs are
    decoded by DataLoader worker processes, its chunks written by writer processes on CUDA, and a
    submit through the broker is checked in a bounded child. So the pool process stops being a daemon.
    What a daemon's flag guarded still holds: DataLoader workers end when their parent does (torch's
    watchdog), writer processes too (their own watchdog, in ``generate``), and the submit checker is a
    daemon child killed at its deadline."""
    import multiprocessing

    multiprocessing.current_process().daemon = False


@worker_process_init.connect
def _one_gpu_per_process(**_: Any) -> None:
    """With ``--concurrency N`` on a machine with G GPUs, pool process i uses ``cuda:(i mod G)``:
    one worker container can drive every GPU of its host."""
    global settings
    if settings.device not in ("auto", "cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        return
    from billiard.process import current_process

    index = int(getattr(current_process(), "index", 0) or 0)
    device = f"cuda:{index % torch.cuda.device_count()}"
    torch.cuda.set_device(device)
    settings = settings.model_copy(update={"device": device})
    log.info("pool process %d uses %s", index, device)


@app.task(name=RUN_CHUNKS, bind=True)
def run_chunks_task(self, job_id: str, attempt: int, chunks: list[int]) -> str:
    """Compute one range of a job's chunks under a lease; skipped when the job moved on (cancelled, resumed,
    failed) or when the reconciler gave the range to another task (this one's ticket is gone)."""
    book, ledger, req = _get_book(), _get_ledger(), self.request
    worker = req.hostname or "worker"
    holder = f"{worker}:{os.getpid()}"
    fields = {"task_id": req.id, "redelivered": bool((req.delivery_info or {}).get("redelivered")),
              "retries": req.retries}
    try:
        claimed = ledger.claim(job_id, req.id, holder)
    except redis.RedisError as exc:  # the reconciler re-dispatches the range once the broker is back
        book.log_event(job_id, "task_skipped", attempt=attempt, chunks=chunks, worker=worker, pid=os.getpid(),
                       reason=f"broker unreachable: {type(exc).__name__}", **fields)
        return "stale"
    if not claimed:
        book.log_event(job_id, "task_skipped", attempt=attempt, chunks=chunks, worker=worker, pid=os.getpid(),
                       reason="superseded: its chunks were dispatched again", **fields)
        return "stale"
    outcome = "failed"
    try:
        with Lease(ledger, req.id, holder) as lease:
            outcome = run_job_chunks(book, settings, _cache, job_id, attempt, chunks, worker=worker,
                                     stop=lease.lost.is_set, **fields)
        return outcome
    except SoftTimeLimitExceeded:
        rec = book.get(job_id)
        pending = set(StoreWriter(rec.store).pending_chunks())
        rest = [c for c in chunks if c in pending]
        if len(rest) == len(chunks):  # not even one chunk fits the limit: retrying would loop forever
            fail_job(book, job_id, attempt, f"one chunk of {rec.spec.get('chunk_rows')} rows takes longer than the "
                     f"task soft time limit ({settings.soft_time_limit} s); submit with smaller chunk_rows or raise "
                     "DARKSTORE_TASK_TIME_LIMIT")
            return "failed"
        send_ranges(self.app, ledger, job_id, attempt, rest, len(rest))
        book.log_event(job_id, "task_split", attempt=attempt, chunks=rest, pid=os.getpid())
        return "split"
    except DarkstoreError as exc:
        fail_job(book, job_id, attempt, str(exc))
        return "failed"
    except Exception as exc:  # noqa: BLE001 — transient (I/O, CUDA OOM): Celery's own retry, then fail
        if req.retries < settings.max_retries:
            book.log_event(job_id, "task_retry", attempt=attempt, chunks=chunks, error=f"{type(exc).__name__}: {exc}",
                           pid=os.getpid())
            outcome = "retry"
            ledger.requeue(job_id, req.id)
            raise self.retry(exc=exc, countdown=min(60, 2 ** req.retries), max_retries=settings.max_retries)
        log.exception("job %s chunks %s failed", job_id, chunks)
        fail_job(book, job_id, attempt, f"{type(exc).__name__}: {exc} (after {req.retries} retries)")
        return "failed"
    finally:
        if outcome != "retry":
            try:
                ledger.finish(job_id, req.id)
            except redis.RedisError:  # the broker is gone: its tickets with it
                pass


@app.task(name=SUBMIT, bind=True, ignore_result=False, acks_late=False)
def submit_task(self, spec: dict) -> dict:
    """``POST /v1/jobs`` through the broker: for Python clients that talk to Celery directly."""
    try:
        view, created = CeleryManager(settings, app=self.app).submit(JobSpec.model_validate(spec))
    except ValidationError as exc:
        return {"error": "SpecError", "detail": f"invalid job spec: {exc}"}
    except DarkstoreError as exc:
        return {"error": type(exc).__name__, "detail": str(exc)}
    return {"created": created, "job": view.model_dump(mode="json")}


__all__ = ["QUEUE", "BrokerUnavailableError", "CeleryManager", "app", "make_celery", "submit_via_celery"]
