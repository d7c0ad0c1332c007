"""The HTTP API (FastAPI). Served by ``darkstore serve`` (uvicorn).

The same routes front both engines: Celery workers (``DARKSTORE_BROKER_URL`` set)
or the in-process runner (``serve --local``, no Redis). Every error a request can
cause answers 4xx with ``{"error": <kind>, "detail": <message>}``.
"""


import logging
import secrets
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import darkstore
from storage import errors as E
from storage import open_store

from .jobs import STATES, JobManager, JobView, State
from .settings import Settings
from .spec import JobSpec

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    error: str = Field(description="error kind, e.g. PathOutsideRootsError")
    detail: str = Field(description="what went wrong, for a human")
    errors: list[dict[str, Any]] | None = Field(None, description="per-field problems of an invalid body")


class JobList(BaseModel):
    items: list[JobView]
    total: int
    limit: int
    offset: int


class Health(BaseModel):
    status: str
    version: str


class Readiness(BaseModel):
    status: str
    mode: str
    broker: str | None = None
    queued_tasks: int | None = None


# HTTP status for each kind of error a request can cause
STATUS: list[tuple[type[Exception], int]] = [
    (E.PathOutsideRootsError, 403),
    (E.CodeNotAllowedError, 403),
    (E.StoreExistsError, 409),
    (E.IncompleteStoreError, 409),
    (E.StoreNotFoundError, 404),  # includes JobNotFoundError
    (E.UnsafeWeightsError, 422),
    (E.WeightsNotFoundError, 422),
    (E.DataNotFoundError, 422),
    (E.WeightsError, 422),
    (E.SpecError, 422),
    (E.TransferSetMismatchError, 422),
    (E.NonFiniteLogitsError, 422),
    (E.SchemaError, 409),
]


def status_of(exc: Exception) -> int:
    if isinstance(exc, ConnectionError):  # BrokerUnavailableError
        return 503
    return next((code for cls, code in STATUS if isinstance(exc, cls)), 400)


def _responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "bad request", 401: "missing or wrong bearer token", 403: "a path outside the data roots, or code "
            "the operator did not allow", 404: "no such job or store", 409: "conflicts with the store's state",
            413: "request body too large", 422: "invalid spec, missing or unsafe weights, unreadable data",
            503: "the broker is unreachable"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, whether or not they declare a length."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        # read the body (at most `limit` bytes, chunked or not) before the app sees it, then replay it
        parts, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return  # the client went away
            parts.append(msg.get("body", b""))
            seen += len(parts[-1])
            if seen > self.limit:
                return await self._refuse(send)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(parts), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = ErrorBody(error="BodyTooLarge", detail=f"request body over {self.limit} bytes").model_dump_json(
            exclude_none=True).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def make_manager(settings: Settings) -> JobManager:
    if settings.use_celery:
        from .celery_app import CeleryManager

        return CeleryManager(settings)
    from .jobs import LocalRunner

    return LocalRunner(settings)


def create_app(settings: Settings | None = None, manager: JobManager | None = None) -> FastAPI:
    settings = settings or Settings()
    state: dict[str, JobManager] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["manager"] = manager or make_manager(settings)
        m = state["manager"]
        log.info("darkstore API: %s engine, home %s, data roots %s", m.mode, settings.home,
                 ", ".join(map(str, settings.roots)))
        try:
            yield
        finally:
            if manager is None:
                m.close()

    app = FastAPI(
        title="darkstore teacher service",
        version=darkstore.__version__,
        description="Run a teacher ensemble once over a transfer set into a chunked Zarr store of soft targets. "
        "Jobs are identified by their teachers' weight hashes, the transfer set's fingerprint and the options: "
        "submitting the same job twice returns the first.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    bearer = HTTPBearer(auto_error=False, description="DARKSTORE_TOKEN, when the operator sets one")

    def auth(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if settings.token is None:
            return
        want = settings.token.get_secret_value()
        if creds is None or not secrets.compare_digest(creds.credentials.encode(), want.encode()):
            raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                                detail="missing bearer token" if creds is None else "wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    def mgr() -> JobManager:
        return state["manager"]

    Manager = Annotated[JobManager, Depends(mgr)]
    guarded = [Depends(auth)]

    # -- errors: always JSON, always a clear message ----------------------------------------
    @app.exception_handler(E.DarkstoreError)
    async def darkstore_error(request: Request, exc: E.DarkstoreError):
        return JSONResponse(ErrorBody(error=type(exc).__name__, detail=str(exc)).model_dump(exclude_none=True),
                            status_code=status_of(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        lines = "; ".join(f"{'.'.join(map(str, e['loc'][1:] or e['loc']))}: {e['msg']}" for e in errors[:10])
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        return JSONResponse(ErrorBody(error="InvalidRequest", detail=f"invalid request: {lines}{more}",
                                      errors=errors).model_dump(exclude_none=True), status_code=422)

    @app.exception_handler(ValidationError)
    async def invalid_inside(request: Request, exc: ValidationError):
        return JSONResponse(ErrorBody(error="SpecError", detail=f"invalid spec: {exc}").model_dump(exclude_none=True),
                            status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: say so, in JSON, and log it
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return JSONResponse(ErrorBody(error="InternalError", detail=f"{type(exc).__name__}: {exc}").model_dump(
            exclude_none=True), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = {401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return JSONResponse(ErrorBody(error=kind, detail=str(exc.detail)).model_dump(exclude_none=True),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    # -- jobs ------------------------------------------------------------------------------
    @app.post("/v1/jobs", response_model=JobView, status_code=201, dependencies=guarded, tags=["jobs"],
              summary="Submit a job (or get the identical one already submitted)",
              responses={200: {"model": JobView, "description": "the same job was already submitted"},
                         **_responses(401, 403, 413, 422, 503)})
    def submit(spec: JobSpec, response: Response, m: Manager) -> JobView:
        """Relative paths resolve against the first data root; every path must stay inside the roots.
        Teachers are loaded (safely) on the API's CPU once, to check them before anything is queued."""
        view, created = m.submit(spec)
        response.status_code = 201 if created else 200
        response.headers["Location"] = f"/v1/jobs/{view.id}"
        return view

    @app.get("/v1/jobs", response_model=JobList, dependencies=guarded, tags=["jobs"], summary="List jobs, newest first",
             responses=_responses(401, 422))
    def list_jobs(m: Manager, state: Annotated[State | None, Query(description="only jobs in this state")] = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0)] = 0) -> JobList:
        items, total = m.list(state, limit, offset)
        return JobList(items=items, total=total, limit=limit, offset=offset)

    @app.get("/v1/jobs/{job_id}", response_model=JobView, dependencies=guarded, tags=["jobs"],
             summary="A job's state, progress, throughput and ETA", responses=_responses(401, 404))
    def get_job(job_id: str, m: Manager) -> JobView:
        return m.get(job_id)

    @app.delete("/v1/jobs/{job_id}", response_model=JobView, dependencies=guarded, tags=["jobs"],
                summary="Cancel a job (committed chunks stay; resume continues from them)",
                responses=_responses(401, 404))
    def cancel_job(job_id: str, m: Manager) -> JobView:
        return m.cancel(job_id)

    @app.post("/v1/jobs/{job_id}/resume", response_model=JobView, dependencies=guarded, tags=["jobs"],
              summary="Resume a cancelled or failed job over its uncommitted chunks",
              responses=_responses(401, 404, 422, 503))
    def resume_job(job_id: str, m: Manager) -> JobView:
        return m.resume(job_id)

    @app.get("/v1/jobs/{job_id}/events", dependencies=guarded, tags=["jobs"],
             summary="The job's event log: dispatches, tasks started and finished (by which worker), chunk commits",
             responses=_responses(401, 404))
    def job_events(job_id: str, m: Manager) -> list[dict[str, Any]]:
        return m.book.events(job_id)

    @app.get("/v1/stores/{job_id}", dependencies=guarded, tags=["stores"],
             summary="Summarise a job's store: shape, size, teachers, completeness, accuracies",
             responses=_responses(401, 404))
    def store_summary(job_id: str, m: Manager) -> dict[str, Any]:
        rec = m.book.get(job_id)
        return open_store(rec.store, allow_incomplete=True).summary()

    # -- operations ------------------------------------------------------------------------
    @app.get("/healthz", response_model=Health, tags=["ops"], summary="The process is up")
    def healthz() -> Health:
        return Health(status="ok", version=darkstore.__version__)

    @app.get("/readyz", response_model=Readiness, tags=["ops"], summary="The broker (or local runner) is reachable",
             responses={503: {"model": Readiness, "description": "not ready: the broker is unreachable"}})
    def readyz(m: Manager):
        ok, info = m.ready()
        body = Readiness(status="ready" if ok else "unavailable", **info)
        return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=guarded, tags=["ops"], response_class=PlainTextResponse,
             summary="Prometheus metrics: jobs by state, rows written, rows per second",
             responses=_responses(401))
    def metrics(m: Manager) -> PlainTextResponse:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from prometheus_client.core import CollectorRegistry, GaugeMetricFamily

        class Jobs:
            def collect(self):
                views = [m.book.view(r.id) for r in m.book.all()]
                by_state = GaugeMetricFamily("darkstore_jobs", "jobs by state", labels=["state"])
                for s in STATES:
                    by_state.add_metric([s], sum(v.state == s for v in views))
                yield by_state
                yield GaugeMetricFamily("darkstore_rows_written", "rows committed across all job stores",
                                        value=sum(v.progress.rows_done for v in views))
                yield GaugeMetricFamily("darkstore_rows_per_second", "throughput summed over running jobs",
                                        value=sum(v.rows_per_second or 0.0 for v in views if v.state == "running"))
                ok, info = m.ready()
                yield GaugeMetricFamily("darkstore_broker_up", "1 when the broker (or local runner) is reachable",
                                        value=1.0 if ok else 0.0)
                if "queued_tasks" in info:
                    yield GaugeMetricFamily("darkstore_queued_tasks", "chunk-range tasks waiting in the queue",
                                            value=info["queued_tasks"])

        registry = CollectorRegistry()
        registry.register(Jobs())
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


__all__ = ["create_app", "make_manager", "ErrorBody", "JobList"]
