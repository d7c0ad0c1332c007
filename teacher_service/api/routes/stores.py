"""/v1/stores: what a job's store holds."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from storage import open_store
from storage.errors import StoreNotFoundError

from ..deps import ManagerDep, TokenRequired
from ..errors import responses
from .jobs import JobId

router = APIRouter(prefix="/v1/stores", tags=["stores"], dependencies=[TokenRequired])


@router.get("/{job_id}", summary="Summarise a job's store: shape, size, teachers, completeness, accuracies",
            responses=responses(401, 404, 409, 422))
def store_summary(job_id: JobId, m: ManagerDep) -> dict[str, Any]:
    rec = m.book.get(job_id)
    if not m.book.store_present(rec):
        raise StoreNotFoundError(f"job {job_id}'s store is gone: submit the job again to recompute it")
    return open_store(rec.store, allow_incomplete=True).summary()
