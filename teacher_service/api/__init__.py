"""The HTTP API (FastAPI). Served by ``darkstore serve`` (uvicorn).

The same routes front both engines: Celery workers (``DARKSTORE_BROKER_URL`` set)
or the in-process runner (``serve --local``, no Redis). Routes live in one router
per resource (``routes/``) and reach the settings, the job manager and the token
check through named dependencies (``deps``). Every error a request can cause
answers 4xx with ``{"error": <kind>, "detail": <message>}`` (``errors``).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

import darkstore

from ..jobs import JobManager
from ..settings import Settings
from . import errors
from .errors import ErrorBody, Redactor
from .middleware import BodyLimit
from .routes import docs, jobs, ops, stores
from .routes.jobs import JobList

log = logging.getLogger(__name__)


def make_manager(settings: Settings) -> JobManager:
    if settings.use_celery:
        from ..celery_app import CeleryManager

        return CeleryManager(settings)
    from ..jobs import LocalRunner

    return LocalRunner(settings)


def create_app(settings: Settings | None = None, manager: JobManager | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        m = app.state.manager = manager or make_manager(settings)
        log.info("darkstore API: %s engine, home %s, data roots %s", m.mode, settings.home,
                 ", ".join(map(str, settings.roots)))
        if manager is None:
            m.start()
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
        docs_url=None, redoc_url=None, openapi_url=None,  # served by routes.docs, behind the token
    )
    app.state.settings = settings
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    errors.install(app, Redactor([*settings.roots, settings.home]))
    for r in (jobs.router, stores.router, ops.router, docs.router):
        app.include_router(r)
    return app


__all__ = ["create_app", "make_manager", "ErrorBody", "JobList"]
