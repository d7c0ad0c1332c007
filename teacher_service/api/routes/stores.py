"""/v1/stores: what a job's store holds."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query

from storage import open_store
from storage.errors import StoreNotFoundError

from ..deps import ManagerDep, TokenRequired
from ...wire import StoreSummary
from ..errors import responses
from .jobs import JobId

router = APIRouter(prefix="/v1/stores", tags=["stores"], dependencies=[TokenRequired])


@router.get("/{job_id}", response_model=StoreSummary, summary="Summarise a job's store: shape, size, teachers, completeness, accuracies",
            responses=responses(401, 404, 409, 422))
def store_summary(job_id: JobId, m: ManagerDep,
                  verify: bool = Query(False, description="also read every committed chunk and check it against its "
                                                          "checksum: a damaged chunk answers 409 naming chunk and field")
                  ) -> dict[str, Any]:
    rec = m.book.get(job_id)
    if not m.book.store_present(rec):
        raise StoreNotFoundError(f"job {job_id}'s store is gone: submit the job again to recompute it")
    reader = open_store(rec.store, allow_incomplete=True)
    if verify:
        reader.verify()
    return {**reader.summary(), "verified": verify}
