"""/v1/jobs: submit, list, show, cancel, resume, events."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response

from ...jobs import MAX_ID_LENGTH, JobView, State
from ...spec import JobSpec
from ...wire import JobEvent, JobList
from ..deps import ManagerDep, TokenRequired
from ..errors import responses

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[TokenRequired])
JobId = Annotated[str, Path(description="the job's id (24 hex digits)", max_length=MAX_ID_LENGTH)]


@router.post("", response_model=JobView, status_code=201,
             summary="Submit a job (or get the identical one already submitted)",
             responses={200: {"model": JobView, "description": "the same job was already submitted"},
                        **responses(401, 403, 404, 409, 413, 422, 500, 503)})
def submit(spec: JobSpec, response: Response, m: ManagerDep,
           adopt: Annotated[str | None, Query(description="a complete store of this very job inside the data roots "
                                              "(made by `darkstore generate`): verified and copied in as the job's "
                                              "store, finished at once, no teacher run", max_length=4096)] = None
           ) -> JobView:
    """The body is the whole job: ``teachers`` (an ensemble spec) and ``data`` (a transfer-set spec) are inline
    JSON objects, not names of YAML files (``darkstore submit job.yaml`` reads such files and sends them inline).
    Relative paths inside them resolve against the first data root; every path must stay inside the roots.
    Teachers are checked (safely, within the submit-time limits) before anything is queued; at most
    ``DARKSTORE_SUBMIT_CHECKS`` checks run at once, and a submit that finds no free slot in time is answered
    503 with ``Retry-After``. With ``?adopt=PATH`` a store that `darkstore generate` already made for this job
    (same teachers by weight hash, same transfer set, same options) becomes the job's store after a full
    verify, instead of running the teachers again."""
    view, created = m.submit(spec, adopt=adopt)
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/jobs/{view.id}"
    return view


@router.get("", response_model=JobList, summary="List jobs, newest first", responses=responses(401, 422))
def list_jobs(m: ManagerDep, state: Annotated[State | None, Query(description="only jobs in this state")] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50, offset: Annotated[int, Query(ge=0)] = 0) -> Response:
    """From the job index: O(page) whatever the number of jobs (finished jobs' views are rendered once)."""
    page, total = m.page(state, limit, offset)
    items = b",".join(m.book.view_json(r) for r in page)
    body = b'{"items":[%s],"total":%d,"limit":%d,"offset":%d}' % (items, total, limit, offset)
    return Response(body, media_type="application/json")


@router.get("/{job_id}", response_model=JobView, summary="A job's state, progress, throughput and ETA",
            responses=responses(401, 404, 422))
def get_job(job_id: JobId, m: ManagerDep) -> JobView:
    return m.get(job_id)


@router.delete("/{job_id}", response_model=JobView,
               summary="Cancel a job (committed chunks stay; resume continues from them)",
               responses=responses(401, 404, 422))
def cancel_job(job_id: JobId, m: ManagerDep) -> JobView:
    return m.cancel(job_id)


@router.post("/{job_id}/resume", response_model=JobView,
             summary="Resume a cancelled or failed job over its uncommitted chunks",
             responses=responses(401, 404, 409, 422, 503))
def resume_job(job_id: JobId, m: ManagerDep) -> JobView:
    return m.resume(job_id)


@router.get("/{job_id}/events", response_model=list[JobEvent], summary="The job's event log: dispatches, tasks started and finished (by which "
            "worker), chunk commits, reconciliations", responses=responses(401, 404, 422))
def job_events(job_id: JobId, m: ManagerDep) -> list[dict[str, Any]]:
    return m.book.events(job_id)
