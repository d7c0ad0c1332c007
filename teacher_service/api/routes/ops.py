"""Operations: health, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
import darkstore

from ...jobs import STATES
from ...wire import Health, Readiness
from ..deps import ManagerDep, TokenRequired
from ..errors import responses

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> Health:
    return Health(status="ok", version=darkstore.__version__)


@router.get("/readyz", response_model=Readiness, summary="The broker (or local runner) is reachable",
            responses={503: {"model": Readiness, "description": "not ready: the broker is unreachable"}})
def readyz(m: ManagerDep):
    ok, info = m.ready()
    body = Readiness(status="ready" if ok else "unavailable", **info)
    return JSONResponse(body.model_dump(exclude_none=True), status_code=200 if ok else 503)


@router.get("/metrics", dependencies=[TokenRequired], response_class=Response,
            summary="Prometheus metrics: jobs by state, rows written, rows per second",
            responses={200: {"description": "Prometheus text exposition format",
                             "content": {"text/plain": {"schema": {"type": "string"}}}}, **responses(401)})
def metrics(m: ManagerDep) -> Response:
    """From the job index in memory: no store is opened, whatever the number of jobs."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from prometheus_client.core import CollectorRegistry, GaugeMetricFamily

    from ...jobs import make_view

    class Jobs:
        def collect(self):
            counts, rows = m.book.totals()
            by_state = GaugeMetricFamily("darkstore_jobs", "jobs by state", labels=["state"])
            for s in STATES:
                by_state.add_metric([s], counts[s])
            yield by_state
            yield GaugeMetricFamily("darkstore_rows_written", "rows committed across all job stores", value=rows)
            running = [make_view(r, r.progress()).rows_per_second or 0.0 for r in m.page("running", 10**9)[0]]
            yield GaugeMetricFamily("darkstore_rows_per_second", "throughput summed over running jobs",
                                    value=sum(running))
            ok, info = m.ready()
            yield GaugeMetricFamily("darkstore_broker_up", "1 when the broker (or local runner) is reachable",
                                    value=1.0 if ok else 0.0)
            if "queued_tasks" in info:
                yield GaugeMetricFamily("darkstore_queued_tasks", "chunk-range tasks waiting in the queue",
                                        value=info["queued_tasks"])

    registry = CollectorRegistry()
    registry.register(Jobs())
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
