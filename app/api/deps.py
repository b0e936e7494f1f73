"""Dependencies shared by the routes: the ledger session and the caller's API key."""

from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.api.errors import Problem
from app.ledger.db import StatementPool, open_session
from app.security import KeyVerifier, Principal
from app.settings import Settings

API_KEY_HEADER = "X-API-Key"
FORGET_WRITE = "forget:write"
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)


def get_session(request: Request) -> Iterator[Session]:
    # Routes commit explicitly before they answer; anything left uncommitted is rolled back.
    with open_session(request.app.state.engine) as session:
        yield session


async def get_settings_dep(request: Request) -> Settings:  # async: no thread hop
    settings: Settings = request.app.state.settings
    return settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings_dep)]


# Connections per process for statements awaited on the event loop (POST /forget/{sample_id}).
# Few serve best: on 2 cores, 2 to 8 gave ~1,800 req/s with p99 under 25 ms (8: ~50 ms), 20 gave
# ~1,700 req/s with p99 80 to 90 ms (docs/benchmarks/forget.md).
STATEMENT_CONNECTIONS = 4


def statement_pool(request: Request) -> StatementPool | None:
    """The app's statement connections to its ledger (made on first use); None unless the
    ledger is PostgreSQL."""
    state = request.app.state
    engine: Engine = state.engine
    if engine.dialect.name != "postgresql":
        return None
    pools: dict[Engine, StatementPool] = state.statement_pools
    pool = pools.get(engine)
    if pool is None:
        settings: Settings = state.settings
        pool = pools[engine] = StatementPool(
            engine, STATEMENT_CONNECTIONS, settings.db_connect_timeout_seconds
        )
    return pool


def cached_principal(request: Request, key: str, scope: str) -> Principal | None:
    """The key's principal when its verdict is cached and grants ``scope``; else None, and the
    caller goes through ``require(scope)``, which looks the key up or refuses it."""
    verifier: KeyVerifier = request.app.state.key_verifier
    hit, principal = verifier.cached(key)
    return principal if hit and principal is not None and scope in principal.scopes else None


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    # async: a cached key is checked on the event loop; only a lookup goes to a thread.
    async def check(
        request: Request, key: Annotated[str | None, Security(api_key_header)]
    ) -> Principal:
        if not key:
            raise Problem(401, "missing X-API-Key header", {"WWW-Authenticate": "ApiKey"})
        verifier: KeyVerifier = request.app.state.key_verifier
        hit, principal = verifier.cached(key)
        if not hit:
            principal = await run_in_threadpool(verifier.verify, key)
        if principal is None:
            raise Problem(401, "invalid or revoked API key", {"WWW-Authenticate": "ApiKey"})
        if scope not in principal.scopes:
            raise Problem(403, f"this API key lacks the {scope!r} scope")
        return principal

    return check


ForgetWriter = Annotated[Principal, Depends(require(FORGET_WRITE))]
StatusReader = Annotated[Principal, Depends(require("status:read"))]
AuditReader = Annotated[Principal, Depends(require("audit:read"))]
ModelsAdmin = Annotated[Principal, Depends(require("models:admin"))]
