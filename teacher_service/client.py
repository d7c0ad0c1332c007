"""A small Python client for the HTTP API (httpx).

    from teacher_service.client import DarkstoreClient
    with DarkstoreClient("http://127.0.0.1:8000", token="…") as c:
        job, created = c.submit(spec)          # a JobSpec, a dict, or a spec file path
        job = c.wait(job.id)                   # polls until succeeded / failed / cancelled

Errors the API answers come back as :class:`ApiError` with the HTTP status and message.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import httpx

from darkstore.specfile import load_spec_file
from darkstore.errors import DarkstoreError

from .jobs import ACTIVE, JobView
from .settings import Settings
from .spec import JobSpec


class ApiError(DarkstoreError):
    """The API refused a request; ``status`` is the HTTP status, ``kind`` the error kind."""

    def __init__(self, status: int, kind: str, detail: str):
        super().__init__(f"{detail} (HTTP {status} {kind})")
        self.status, self.kind, self.detail = status, kind, detail


class ServiceUnreachableError(DarkstoreError, ConnectionError):
    """Nothing answers at the API's address."""


def load_job_file(path: str | Path) -> dict[str, Any]:
    """A job spec file as the API expects it: ``teachers:``/``data:`` given as file names are inlined.

    Paths inside stay as written: the *server* resolves relative ones against its first data root."""
    path = Path(path)
    raw = load_spec_file(path)
    if not isinstance(raw, dict):
        raise DarkstoreError(f"{path} must hold a mapping (a job spec), not {type(raw).__name__}")
    for key in ("teachers", "data"):
        ref = raw.get(key)
        if isinstance(ref, str) and Path(ref).suffix in (".yaml", ".yml", ".json"):
            raw[key] = load_spec_file(path.parent / ref)
        elif key == "data" and isinstance(ref, str):
            kind = "arrays" if Path(ref).suffix in (".npz", ".npy") else "image_folder"
            raw[key] = {"kind": kind, ("path" if kind == "arrays" else "root"): ref}
    return raw


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
            raise ApiError(r.status_code, kind, str(detail))
        return r

    # -- jobs -------------------------------------------------------------------------
    def submit(self, spec: JobSpec | dict | str | Path) -> tuple[JobView, bool]:
        """Returns (job, created): created is False when the same job already existed."""
        if isinstance(spec, (str, Path)):
            body = load_job_file(spec)
        elif isinstance(spec, JobSpec):
            body = spec.model_dump(mode="json")
        else:
            body = spec
        r = self._call("POST", "/v1/jobs", json=body)
        return JobView.model_validate(r.json()), r.status_code == 201

    def job(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("GET", f"/v1/jobs/{job_id}").json())

    def jobs(self, state: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[JobView], int]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if state:
            params["state"] = state
        body = self._call("GET", "/v1/jobs", params=params).json()
        return [JobView.model_validate(v) for v in body["items"]], body["total"]

    def cancel(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("DELETE", f"/v1/jobs/{job_id}").json())

    def resume(self, job_id: str) -> JobView:
        return JobView.model_validate(self._call("POST", f"/v1/jobs/{job_id}/resume").json())

    def events(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/v1/jobs/{job_id}/events").json()

    def store(self, job_id: str, *, verify: bool = False) -> dict[str, Any]:
        """The store's summary; ``verify`` also reads every committed chunk and checks it (409 names a bad one)."""
        return self._call("GET", f"/v1/stores/{job_id}", params={"verify": "true"} if verify else None).json()

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/healthz").json()

    def ready(self) -> dict[str, Any]:
        return self._call("GET", "/readyz").json()

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


__all__ = ["ApiError", "DarkstoreClient", "ServiceUnreachableError", "load_job_file"]
