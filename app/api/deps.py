"""Dependencies shared by the routes: the ledger session and the caller's API key."""

from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import APIKeyHeader
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.api.errors import Problem
from app.ledger.db import open_session
from app.ledger.filing import Intake
from app.ratelimit import RateLimiter
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


def intake(request: Request) -> Intake:
    """The app's intake for its ledger (made on first use, per engine: tests swap engines)."""
    state = request.app.state
    engine: Engine = state.engine
    intakes: dict[Engine, Intake] = state.intakes
    found = intakes.get(engine)
    if found is None:
        settings: Settings = state.settings
        found = intakes[engine] = Intake.of(engine, settings.db_connect_timeout_seconds)
    return found


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def cached_principal(request: Request, key: str, scope: str) -> Principal | None:
    """The key's principal when its verdict is cached and grants ``scope``; else None, and the
    caller goes through ``require(scope)``, which looks the key up or refuses it."""
    verifier: KeyVerifier = request.app.state.key_verifier
    hit, principal = verifier.cached(key)
    return principal if hit and principal is not None and scope in principal.scopes else None


def _rate_limited(what: str, retry_after: int) -> Problem:
    return Problem(429, f"{what}; retry in {retry_after} s", {"Retry-After": str(retry_after)})


async def authenticate(request: Request, key: str) -> Principal:
    """The key's principal, or 401. Unknown keys are counted per client address: past the
    limit, a key not already verified is refused (429) without a database lookup."""
    state = request.app.state
    verifier: KeyVerifier = state.key_verifier
    limiter: RateLimiter = state.rate_limiter
    failures = limiter.limits.failed_auth_per_address
    address = client_address(request)
    hit, principal = verifier.cached(key)
    if not hit:
        retry = await limiter.exhausted(failures, "failed-auth", address)
        if retry:
            raise _rate_limited("too many unknown or revoked API keys from this address", retry)
        principal = await run_in_threadpool(verifier.verify, key)
    if principal is None:
        await limiter.hit(failures, "failed-auth", address)
        raise Problem(401, "invalid or revoked API key", {"WWW-Authenticate": "ApiKey"})
    return principal


async def admit(request: Request, principal: Principal) -> None:
    """Counts the call against its key's rate limit; 429 past it."""
    limiter: RateLimiter = request.app.state.rate_limiter
    retry = await limiter.hit(limiter.limits.per_key, "key", str(principal.key_id))
    if retry:
        raise _rate_limited(f"this API key made more than {limiter.limits.per_key} calls", retry)


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    # async: a cached key is checked on the event loop; only a lookup goes to a thread.
    async def check(
        request: Request, key: Annotated[str | None, Security(api_key_header)]
    ) -> Principal:
        if not key:
            raise Problem(401, "missing X-API-Key header", {"WWW-Authenticate": "ApiKey"})
        principal = await authenticate(request, key)
        await admit(request, principal)
        if scope not in principal.scopes:
            raise Problem(403, f"this API key lacks the {scope!r} scope")
        return principal

    return check


ForgetWriter = Annotated[Principal, Depends(require(FORGET_WRITE))]
StatusReader = Annotated[Principal, Depends(require("status:read"))]
AuditReader = Annotated[Principal, Depends(require("audit:read"))]
ModelsAdmin = Annotated[Principal, Depends(require("models:admin"))]
