"""What crosses the HTTP API: the response bodies the routes declare and the client returns, one definition
for both (no FastAPI import here: the client and the CLI load it without the server)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from .jobs import JobView


class JobList(BaseModel):
    """One page of jobs, newest first; ``total`` counts every job that matches."""

    items: list[JobView]
    total: int
    limit: int
    offset: int


class Submitted(BaseModel):
    """The answer to a submit: the job, and whether this submit created it (False: the same teachers, data
    and options were already submitted, and this is that job)."""

    job: JobView
    created: bool

    @property
    def id(self) -> str:
        return self.job.id


class JobEvent(BaseModel):
    """One line of a job's event log: when, what (``dispatched``, ``task_started``, ``chunk_committed``,
    ``reconciled`` …) and the event's own fields (worker, chunk, attempt …)."""

    model_config = ConfigDict(extra="allow")
    time: str
    event: str

    @property
    def fields(self) -> dict[str, Any]:
        """The event's own fields (beyond time and event)."""
        return dict(self.model_extra or {})

    def __getitem__(self, key: str) -> Any:
        """``e["chunk"]`` as ``e.chunk``: an event's fields depend on its kind, so mapping access reads well."""
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None


class StoreSummary(BaseModel):
    """What a job's store holds (``GET /v1/stores/{id}``): its shape, progress, size and provenance. The
    fields named here are always present; the rest (teachers, transfer set, views, features …) come as the
    reader summarises them."""

    model_config = ConfigDict(extra="allow")
    path: str
    rows: int
    classes: int
    dtype: str
    chunks: int
    chunks_done: int
    rows_done: int
    complete: bool
    disk_bytes: int
    job_key: str
    verified: bool = False


class Health(BaseModel):
    status: str
    version: str


class Readiness(BaseModel):
    status: str
    mode: str
    broker: str | None = None
    queued_tasks: int | None = None


__all__ = ["Health", "JobEvent", "JobList", "Readiness", "StoreSummary", "Submitted"]
