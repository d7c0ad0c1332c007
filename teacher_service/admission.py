"""Submit-time checks with a bounded cost.

A submit hashes the teachers' weights, fingerprints the transfer set, then loads every
teacher on the CPU and probes it on two samples, so that bad input is a 4xx at submit
rather than a failed job later. That work is bounded:

* **static limits** on the spec (input sizes) and a parameter count taken on the
  ``meta`` device — no weight is allocated for an oversized architecture;
* in the API, each check runs in a **child process** forked from a forkserver that
  has torch preloaded (tens of milliseconds), with an address-space limit
  (``submit_memory_bytes``) and a deadline (``submit_timeout``). A check that runs
  over is killed and answered 422; nothing it loaded stays in the API's memory. The
  forkserver never imports from the working directory (``PYTHONSAFEPATH``), so a folder
  there named like one of darkstore's packages cannot shadow it;
* at most ``submit_checks`` checks run at once, in the API and inline alike: a submit
  beyond them waits ``submit_queue_timeout`` seconds for a slot, then is answered 503
  with ``Retry-After`` (:class:`~teacher_service.errors.CheckersBusyError`).

A submit made through the broker (``submit_via_celery``) is checked in the Celery pool
process itself, with the static limits only: a forkserver child pickles its parent's
identity, and billiard's (Celery's multiprocessing) refuses to be pickled. A daemonic
caller, which may not have children, checks inline too.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import threading
import traceback
from typing import Any, Callable

from darkstore.errors import DarkstoreError, SpecError
from darkstore.paths import children_skip_working_directory
from darkstore.transfer import open_transfer_set
from storage import StoreMeta
from teacher_service.errors import CheckerFailedError, CheckersBusyError, EngineRefusedError, LimitExceededError

from .generate import prepare
from .prepared import identify
from .settings import Settings, engine_base
from .spec import JobSpec

_PRELOAD = ["torch", "torchvision", "teacher_service.generate", "teacher_service.jobs"]


def check_spec(spec: JobSpec, settings: Settings) -> None:
    """Limits that need no file: input sizes."""
    side = settings.max_input_side
    sizes = []
    for field in ("size", "short_side", "crop"):
        if getattr(spec.data, field, None) is not None:
            sizes.append((f"data {field}", getattr(spec.data, field)))
    for m in spec.teachers.members:
        for field in ("resize", "short_side", "crop"):
            if getattr(m.preprocess, field) is not None:
                sizes.append((f"teacher {m.label!r} preprocess {field}", getattr(m.preprocess, field)))
    for what, v in sizes:
        vals = [v] if isinstance(v, int) else list(v)
        if any(x < 1 or x > side for x in vals):
            raise LimitExceededError(f"{what} {v} is outside 1..{side} pixels (DARKSTORE_MAX_INPUT_SIDE)")
    for m in spec.teachers.members:
        if m.engine is not None and m.engine.url is None:
            raise EngineRefusedError(f"teacher {m.label!r}: the service runs no engine in its own processes "
                                     "(engine_args); serve the model with vLLM and give its url, listed in "
                                     "DARKSTORE_ENGINE_URLS")
        if m.engine is not None and engine_base(m.engine.url) not in settings.engine_urls:
            raise EngineRefusedError(f"teacher {m.label!r}: this service calls no engine at {m.engine.url}; the "
                                     f"operator lists the allowed servers in DARKSTORE_ENGINE_URLS "
                                     f"({', '.join(settings.engine_urls) or 'none now'})")


def admit(spec: JobSpec, settings: Settings, known: Callable[[str], bool] | None) -> tuple[str, StoreMeta | None]:
    """The job's key and, unless ``known(key)`` says the job exists already, its store metadata: every
    teacher loaded on the CPU (within the parameter budget) and probed on two samples."""
    data = open_transfer_set(spec.data, allow_code=settings.allow_code, roots=settings.roots,
                             fingerprints=settings.fingerprints, prompts=spec.responses and spec.responses.n)
    key = identify(spec, allow_code=settings.allow_code, roots=settings.roots, data=data)
    if known is not None and known(key):
        return key, None  # not one forward pass for a job that exists
    meta = prepare(spec, device="cpu", allow_code=settings.allow_code, roots=settings.roots, data=data,
                   max_params=settings.max_teacher_params).meta
    if meta.job_key != key:  # a weight file changed between hashing and loading
        raise SpecError("the teachers changed while the job was being submitted; submit again")
    return key, meta


def _child(conn, fn: Callable, args: tuple, memory: int) -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        with open("/proc/self/statm") as f:  # what is mapped already (torch's libraries) is not the check's cost
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = mapped + memory
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    except (OSError, ValueError):
        pass
    try:
        result: Any = ("ok", fn(*args))
    except DarkstoreError as exc:
        result = ("error", type(exc), str(exc))
    except MemoryError:
        result = ("error", LimitExceededError, "checking the job needed more than the submit memory limit "
                  "(DARKSTORE_SUBMIT_MEMORY_BYTES)")
    except Exception as exc:  # noqa: BLE001 — a malformed file can raise anything; the client gets a 422
        result = ("error", SpecError, f"checking the job failed: {type(exc).__name__}: {exc}")
        traceback.print_exc()
    try:
        conn.send(result)
    except Exception as exc:  # noqa: BLE001 — an unpicklable result or error
        conn.send(("error", SpecError, f"checking the job failed: {type(exc).__name__}: {exc}"))
    conn.close()


def _can_start_checker() -> bool:
    """Whether this process can start a forkserver child: not a daemon, not a Celery (billiard) pool process."""
    me = multiprocessing.current_process()
    return not me.daemon and not type(me).__module__.startswith("billiard")


class Admission:
    """Runs the submit-time checks: in a bounded child process, or inline where that is impossible."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.isolated = settings.submit_isolation and _can_start_checker()
        self._ctx = None
        self._slots = threading.BoundedSemaphore(settings.submit_checks)

    def _context(self):
        if self._ctx is None:
            children_skip_working_directory()  # before the forkserver starts: it inherits the environment
            self._ctx = multiprocessing.get_context("forkserver")
            self._ctx.set_forkserver_preload(_PRELOAD)
        return self._ctx

    def run(self, fn: Callable, *args: Any) -> Any:
        if not self.isolated:
            return fn(*args)
        ctx = self._context()
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(child, fn, args, self.settings.submit_memory_bytes), daemon=True)
        proc.start()
        child.close()
        try:
            if not parent.poll(self.settings.submit_timeout):
                raise LimitExceededError(
                    f"checking the job took longer than {self.settings.submit_timeout:g} s (DARKSTORE_SUBMIT_TIMEOUT)"
                    "; a special file, a huge transfer set or very large teachers?")
            try:
                result = parent.recv()
            except EOFError:
                proc.join(timeout=10)
                raise _death(proc.exitcode) from None
        finally:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)
            parent.close()
        if result[0] == "ok":
            return result[1]
        _, cls, message = result
        raise cls(message)

    def admit(self, spec: JobSpec, known: Callable[[str], bool] | None) -> tuple[str, StoreMeta | None]:
        """See :func:`admit`; ``known`` must be picklable (a bound method of a JobBook is). At most
        ``submit_checks`` run at once."""
        check_spec(spec, self.settings)
        wait = self.settings.submit_queue_timeout
        if not self._slots.acquire(timeout=wait):
            raise CheckersBusyError(
                f"{self.settings.submit_checks} submit-time checks are running and none finished within {wait:g} s "
                "(DARKSTORE_SUBMIT_CHECKS); submit again shortly", retry_after=max(1.0, wait))
        try:
            return self.run(admit, spec, self.settings, known)
        finally:
            self._slots.release()


def _death(exitcode: int | None) -> DarkstoreError:
    """Why a checker died without answering: killed by the kernel (memory), or a fault of the server's."""
    if exitcode == -signal.SIGKILL:
        return LimitExceededError("the check of this job was killed (SIGKILL), most likely out of memory; the "
                                  "limit is DARKSTORE_SUBMIT_MEMORY_BYTES")
    if exitcode is not None and exitcode < 0:
        how = f"signal {signal.Signals(-exitcode).name}"
    else:
        how = f"exit code {exitcode}"
    return CheckerFailedError(f"the service could not check this job: its checker process ended ({how}) before "
                              "answering; the API log has its traceback")


__all__ = ["Admission", "check_spec"]
