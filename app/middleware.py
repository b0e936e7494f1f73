"""Gives every HTTP request an ID: bound into the structlog context, echoed as X-Request-ID, and
logged once with the outcome, so one call's log lines (and the jobs it queues) can be found."""

import re
import time
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "X-Request-ID"
_HEADER_NAME = REQUEST_ID_HEADER.lower().encode("latin-1")
# A caller's ID is kept only when it is short and plain: it ends up in every log line.
_ACCEPTABLE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Polled every few seconds by probes and Prometheus: logged at debug level only.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
log = structlog.get_logger("lethe.http")


def request_id_of(scope: Scope) -> str:
    """The caller's X-Request-ID if it is acceptable, else a new one."""
    for name, value in scope["headers"]:  # ASGI header names are lower-case
        if name == _HEADER_NAME:
            offered: str = value.decode("latin-1")
            if _ACCEPTABLE_ID.match(offered):
                return offered
            break
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware), so the bound context reaches the route's thread.
    On every call's path, so it stays lean: a raw header scan, the context bound and reset
    without a context manager, the header appended to the raw list."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(scope)
        header = (_HEADER_NAME, request_id.encode("latin-1"))
        status = 500  # what the client gets if the app fails before it answers
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = message.get("headers", ())
                message["headers"] = [
                    *(h for h in headers if h[0].lower() != _HEADER_NAME),
                    header,
                ]
            await send(message)

        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            emit = log.debug if scope["path"] in PROBE_PATHS else log.info
            emit(
                "http.request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 1),
            )
            structlog.contextvars.reset_contextvars(**tokens)
