"""Dependencies shared by the routes: the ledger session and the caller's API key."""

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader
from sqlalchemy.orm import Session

from app.api.errors import Problem
from app.ledger.db import open_session
from app.security import KeyVerifier, Principal
from app.settings import Settings

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def get_session(request: Request) -> Iterator[Session]:
    # Routes commit explicitly before they answer; anything left uncommitted is rolled back.
    with open_session(request.app.state.engine) as session:
        yield session


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


def require(scope: str) -> Callable[..., Principal]:
    def check(request: Request, key: Annotated[str | None, Security(api_key_header)]) -> Principal:
        if not key:
            raise Problem(401, "missing X-API-Key header", {"WWW-Authenticate": "ApiKey"})
        verifier: KeyVerifier = request.app.state.key_verifier
        principal = verifier.verify(key)
        if principal is None:
            raise Problem(401, "invalid or revoked API key", {"WWW-Authenticate": "ApiKey"})
        if scope not in principal.scopes:
            raise Problem(403, f"this API key lacks the {scope!r} scope")
        return principal

    return check


ForgetWriter = Annotated[Principal, Depends(require("forget:write"))]
StatusReader = Annotated[Principal, Depends(require("status:read"))]
AuditReader = Annotated[Principal, Depends(require("audit:read"))]
ModelsAdmin = Annotated[Principal, Depends(require("models:admin"))]
