"""A small Python client for the HTTP API (httpx).

    from teacher_service.client import DarkstoreClient
    with DarkstoreClient("http://127.0.0.1:8000", token="…") as c:
        sub = c.submit("job.yaml")             # a JobSpec, a dict, or a spec file path -> Submitted
        print(sub.created)                     # False: the same job was already submitted
        job = c.wait(sub.id)                   # polls until succeeded / failed / cancelled -> JobView
        print(c.store(job.id).rows_done)       # StoreSummary; c.jobs() -> JobList, c.events(id) -> [JobEvent]

Errors the API answers come back as :class:`ApiError` with the HTTP status and message.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from darkstore.specfile import load_spec_file
from darkstore.errors import DarkstoreError

from .jobs import ACTIVE, JobView
from .settings import Settings
from .spec import JobSpec
from .wire import Health, JobEvent, JobList, Readiness, StoreSummary, Submitted


class ApiError(DarkstoreError):
    """The API refused a request; ``status`` is the HTTP status, ``kind`` the error kind."""

    def __init__(self, status: int, kind: str, detail: str, retry_after: float | None = None):
        super().__init__(f"{detail} (HTTP {status} {kind})")
        self.status, self.kind, self.detail, self.retry_after = status, kind, detail, retry_after


class ServiceUnreachableError(DarkstoreError, ConnectionError):
    """Nothing answers at the API's address."""


def load_job_file(path: str | Path, data_root: str | Path | None = None) -> dict[str, Any]:
    """A job spec file as the API expects it, read by the rule ``generate`` follows: a relative path is
    relative to the file that holds it (the job file, or an ensemble or data spec file it names, which are
    read in). The service resolves relative paths against its first data root, so they are sent relative
    to ``data_root``: where that root is as seen from here (default: the job file's folder). A path outside
    it is refused here, before anything is sent."""
    path = Path(path)
    raw = load_spec_file(path)
    if not isinstance(raw, dict):
        raise DarkstoreError(f"{path} must hold a mapping (a job spec), not {type(raw).__name__}")
    job = inline_job(raw, path.parent)
    if data_root is None:
        return job
    home, root = path.parent.resolve(), Path(data_root).expanduser().resolve()

    def to_root(p: str, what: str) -> str:
        if Path(p).is_absolute():
            return p  # the service checks it against its roots
        where = (home / p).resolve()
        if not where.is_relative_to(root):
            raise DarkstoreError(f"{what} {p!r} (relative to {path}) lies outside the data root {root}: the "
                                 "service could not reach it; move it under the root or give --data-root")
        return str(where.relative_to(root))

    return _map_paths(job, to_root)


def inline_job(raw: dict[str, Any], base: str | Path = ".") -> dict[str, Any]:
    """A job spec mapping with ``teachers:``/``data:`` given as spec file names (relative to ``base``) read in,
    the relative paths inside such a file made relative to ``base`` as they were to the file, and a bare
    ``data:`` path turned into a data spec; a new dict, the argument is left as it was."""
    raw = dict(raw)
    for key in ("teachers", "data"):
        ref = raw.get(key)
        if isinstance(ref, (str, Path)) and Path(ref).suffix in (".yaml", ".yml", ".json"):
            doc = load_spec_file(Path(base) / ref)
            folder = Path(ref).parent  # the file's folder, relative to base
            raw[key] = _map_paths({key: doc}, lambda p, _: p if Path(p).is_absolute() else
                                  os.path.normpath(folder / p))[key]
        elif key == "data" and isinstance(ref, (str, Path)):
            kind = "arrays" if Path(ref).suffix in (".npz", ".npy") else "image_folder"
            raw[key] = {"kind": kind, ("path" if kind == "arrays" else "root"): str(ref)}
    return raw


def _map_paths(job: dict[str, Any], fn: Callable[[str, str], str]) -> dict[str, Any]:
    """``job`` with ``fn(path, what)`` applied to every file path it names (members' weights, the data's
    path or root): a new dict."""
    from darkstore.data import PATH_FIELDS

    job = dict(job)
    teachers = job.get("teachers")
    if isinstance(teachers, dict) and isinstance(teachers.get("members"), list):
        members = [_map_member(m, fn) for m in teachers["members"]]
        job["teachers"] = {**teachers, "members": members}
    data = job.get("data")
    if isinstance(data, dict):
        for field in PATH_FIELDS.get(data.get("kind", "arrays"), ()):
            if isinstance(data.get(field), str):
                data = {**data, field: fn(data[field], f"data {field}")}
        job["data"] = data
    return job


def _map_member(m: Any, fn: Callable[[str, str], str]) -> Any:
    if not isinstance(m, dict):
        return m
    who = f"teacher {m.get('name') or m.get('arch')!r}"
    return {**m, **{key: fn(m[key], f"{who} {key}") for key in ("weights", "tokenizer") if isinstance(m.get(key), str)}}


class DarkstoreClient:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 600.0,
                 settings: Settings | None = None):
        if url is None or token is None:
            settings = settings or Settings()
            url = url or settings.api_url
            token = token or (settings.token.get_secret_value() if settings.token else None)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def __enter__(self) -> "DarkstoreClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, **kw) -> httpx.Response:
        try:
            r = self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise ServiceUnreachableError(
                f"cannot reach the darkstore API at {self.url} ({type(exc).__name__}: {exc}); "
                "start it with `darkstore serve` or set DARKSTORE_API_URL"
            ) from exc
        if r.status_code >= 400:
            try:
                body = r.json()
                kind, detail = body.get("error", "HTTPError"), body.get("detail", r.text)
            except ValueError:
                kind, detail = "HTTPError", r.text[:500]
            try:
                retry_after = float(r.headers["Retry-After"])
            except (KeyError, ValueError):
                retry_after = None
            raise ApiError(r.status_code, kind, str(detail), retry_after)
        return r

    # -- jobs -------------------------------------------------------------------------
    def submit(self, spec: JobSpec | dict | str | Path, *, data_root: str | Path | None = None,
               adopt: str | None = None, busy_retries: int = 3) -> Submitted:
        """Submit a job: a :class:`JobSpec`, a mapping (``teachers:``/``data:`` may name spec files, read
        relative to the working directory) or a spec file (its paths relative to the files that hold them,
        sent relative to ``data_root``, the service's data root as seen from here: :func:`load_job_file`).
        ``created`` is False when the same job already existed (nothing is recomputed). While the service's
        check slots are busy (503 with Retry-After) the submit is tried again after the time it names,
        ``busy_retries`` times. ``adopt``: a finished store of this job, as the service sees it (relative to its
        first data root), taken as the job's store instead of running the teachers."""
        if isinstance(spec, (str, Path)):
            body = load_job_file(spec, data_root)
        elif isinstance(spec, JobSpec):
            body = spec.model_dump(mode="json")
        else:
            body = inline_job(spec)
        for attempt in range(busy_retries + 1):
            try:
                r = self._call("POST", "/v1/jobs", json=body, params={"adopt": adopt} if adopt else None)
                break
            except ApiError as exc:
                if exc.kind != "CheckersBusyError" or attempt == busy_retries:
                    raise
                time.sleep(exc.retry_after or 1.0)
        return Submitted(job=JobView.model_validate(r.json()), created=r.status_code == 201)

    def job(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("GET", f"/v1/jobs/{job_id}").json())

    def jobs(self, state: str | None = None, limit: int = 50, offset: int = 0) -> JobList:
        """One page of jobs, newest first (``.items``; ``.total`` counts them all)."""
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        return JobList.model_validate(self._call("GET", "/v1/jobs", params=params).json())

    def cancel(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("DELETE", f"/v1/jobs/{job_id}").json())

    def resume(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("POST", f"/v1/jobs/{job_id}/resume").json())

    def events(self, job_id: str) -> list[JobEvent]:
        return [JobEvent.model_validate(e) for e in self._call("GET", f"/v1/jobs/{job_id}/events").json()]

    def store(self, job_id: str, *, verify: bool = False) -> StoreSummary:
        """The store's summary; ``verify`` also reads every committed chunk and checks it (409 names a bad one)."""
        params = {"verify": "true"} if verify else None
        return StoreSummary.model_validate(self._call("GET", f"/v1/stores/{job_id}", params=params).json())

    def health(self) -> Health:
        return Health.model_validate(self._call("GET", "/healthz").json())

    def ready(self) -> Readiness:
        """Raises :class:`ApiError` (503) while the broker is unreachable."""
        return Readiness.model_validate(self._call("GET", "/readyz").json())

    def wait(self, job_id: str, *, timeout: float | None = None, poll: float = 0.5,
             on_progress: Callable[[JobView], None] | None = None) -> JobView:
        """Poll until the job leaves queued/running; returns its final view."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            view = self.job(job_id)
            if on_progress:
                on_progress(view)
            if view.state not in ACTIVE:
                return view
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {view.state} after {timeout} s")
            time.sleep(poll)


__all__ = ["ApiError", "DarkstoreClient", "Health", "JobEvent", "JobList", "JobView", "Readiness",
           "ServiceUnreachableError", "StoreSummary", "Submitted", "inline_job", "load_job_file"]
