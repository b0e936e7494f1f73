"""Liveness and readiness. Readiness checks the ledger database and, when configured, the broker."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(request: Request) -> str:
    try:
        with request.app.state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        return "ok"
    except Exception as error:  # any failure means not ready; the reason is reported
        return f"unavailable: {error.__class__.__name__}"


def _check_broker(request: Request) -> str:
    url = request.app.state.settings.broker_url
    if not url:
        return "embedded"
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2).ping()
        return "ok"
    except Exception as error:  # any failure means not ready; the reason is reported
        return f"unavailable: {error.__class__.__name__}"


@router.get("/readyz", responses={503: {"description": "The database or the broker is down"}})
def readyz(request: Request) -> JSONResponse:
    checks: dict[str, Any] = {
        "database": _check_database(request),
        "broker": _check_broker(request),
    }
    ready = all(v in ("ok", "embedded") for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status_code=200 if ready else 503,
        headers=None
        if ready
        else {"Retry-After": str(request.app.state.settings.retry_after_seconds)},
    )
