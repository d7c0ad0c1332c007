"""Named dependencies of the routes: the settings, the job manager, the bearer token."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..jobs import JobManager
from ..settings import Settings

bearer = HTTPBearer(auto_error=False, description="DARKSTORE_TOKEN, when the operator sets one")


# These are async because they take no time: a sync dependency costs each request a trip through the thread
# pool, and under concurrent requests those trips queue for the interpreter lock.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_manager(request: Request) -> JobManager:
    return request.app.state.manager


SettingsDep = Annotated[Settings, Depends(get_settings)]
ManagerDep = Annotated[JobManager, Depends(get_manager)]


async def require_token(settings: SettingsDep,
                        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """With ``DARKSTORE_TOKEN`` set, every route but /healthz and /readyz needs ``Authorization: Bearer <token>``."""
    if settings.token is None:
        return
    want = settings.token.get_secret_value()
    if creds is None or not secrets.compare_digest(creds.credentials.encode(), want.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            detail="missing bearer token" if creds is None else "wrong bearer token",
                            headers={"WWW-Authenticate": "Bearer"})


TokenRequired = Depends(require_token)
