"""How errors leave the API: one JSON shape, one status per kind of error, no server paths."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from darkstore.errors import (
    CodeNotAllowedError,
    DarkstoreError,
    DataError,
    DataNotFoundError,
    PathOutsideRootsError,
    SpecError,
    UnsafeWeightsError,
    WeightsError,
    WeightsNotFoundError,
)
from storage.errors import (
    IncompleteStoreError,
    NonFiniteLogitsError,
    SchemaError,
    StoreAccessError,
    StoreExistsError,
    StoreNotFoundError,
    StoreURLError,
    TransferSetMismatchError,
)

from ..errors import CheckerFailedError, CheckersBusyError, EngineMismatchError, EngineRefusedError, LimitExceededError

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    error: str = Field(description="error kind, e.g. PathOutsideRootsError")
    detail: str = Field(description="what went wrong, for a human")
    errors: list[dict[str, Any]] | None = Field(None, description="per-field problems of an invalid body")


# HTTP status for each kind of error a request can cause (first match wins)
STATUS: list[tuple[type[Exception], int]] = [
    (StoreAccessError, 503),  # the store's object storage cannot be reached
    (CheckersBusyError, 503),  # every submit-time check slot is taken: Retry-After
    (CheckerFailedError, 500),  # the server's own checker process failed
    (PathOutsideRootsError, 403),
    (CodeNotAllowedError, 403),
    (StoreExistsError, 409),
    (IncompleteStoreError, 409),
    (StoreNotFoundError, 404),  # includes JobNotFoundError
    (UnsafeWeightsError, 422),
    (WeightsNotFoundError, 422),
    (DataNotFoundError, 422),
    (DataError, 422),
    (WeightsError, 422),
    (SpecError, 422),
    (TransferSetMismatchError, 422),
    (NonFiniteLogitsError, 422),
    (LimitExceededError, 422),
    (EngineRefusedError, 422),  # an engine not allowed, or one that cannot serve the job as asked
    (EngineMismatchError, 422),
    (StoreURLError, 422),
    (SchemaError, 409),
]

TEXT = {400: "bad request", 401: "missing or wrong bearer token", 403: "a path outside the data roots, or code "
        "the operator did not allow", 404: "no such job or store", 409: "conflicts with the store's state",
        413: "request body too large", 422: "invalid spec, missing or unsafe weights, unreadable data, or over a "
        "submit-time limit", 500: "the server failed (its log has the details)", 503: "the broker or the stores' "
        "object storage is unreachable, or every submit-time check slot is busy (see Retry-After)"}


def status_of(exc: Exception) -> int:
    if isinstance(exc, ConnectionError):  # BrokerUnavailableError
        return 503
    return next((code for cls, code in STATUS if isinstance(exc, cls)), 400)


def responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for the error codes a route can answer."""
    return {c: {"model": ErrorBody, "description": TEXT[c]} for c in codes}


class Redactor:
    """Shows paths the way the client gave them: server folders (data roots, home) are cut from messages,
    so ``/srv/data/teachers/a.pt`` reads ``teachers/a.pt`` again, as it was submitted."""

    def __init__(self, folders: Sequence[Path]):
        forms = set()
        for f in folders:
            for p in (Path(f), Path(f).expanduser().absolute(), Path(f).expanduser().resolve()):
                forms.add(str(p).rstrip(os.sep))
        self.forms = sorted((f for f in forms if f and f != os.sep), key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for f in self.forms:
            text = text.replace(f + os.sep, "").replace(f, ".")
        return text


def body(kind: str, detail: str, status: int, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse(ErrorBody(error=kind, detail=detail, **extra).model_dump(exclude_none=True),
                        status_code=status, headers=headers)


def install(app: FastAPI, redact: Redactor) -> None:
    """Every error a request can cause answers ``{"error", "detail"}`` with its status."""

    @app.exception_handler(DarkstoreError)
    async def darkstore_error(request: Request, exc: DarkstoreError):
        retry = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(max(1, round(retry)))} if retry is not None else None
        return body(type(exc).__name__, redact(str(exc)), status_of(exc), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": redact(str(e.get("msg", ""))), "type": e.get("type", "")}
                  for e in exc.errors()]
        lines = "; ".join(f"{'.'.join(map(str, e['loc'][1:] or e['loc']))}: {e['msg']}" for e in errors[:10])
        more = f" (and {len(errors) - 10} more)" if len(errors) > 10 else ""
        return body("InvalidRequest", f"invalid request: {lines}{more}", 422, errors=errors)

    @app.exception_handler(ValidationError)
    async def invalid_inside(request: Request, exc: ValidationError):
        return body("SpecError", redact(f"invalid spec: {exc}"), 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 400:  # FastAPI could not decode the body (not UTF-8, not JSON): an invalid request
            return body("InvalidRequest", f"invalid request: {exc.detail} (send a UTF-8 JSON object)", 422)
        kind = {401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return body(kind, str(exc.detail), exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # a bug: say so, in JSON, log it, reveal nothing
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return body("InternalError", f"internal error ({type(exc).__name__}); the server log has the details", 500)
