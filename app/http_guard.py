"""What every HTTP call meets before a route (and so before its API key is checked): headers
that must be unambiguous, a rate limit per client address, a body that is small enough and
arrives in time; and the security headers of every answer.

Pure ASGI (no BaseHTTPMiddleware), lean on the busy path: one scan of the request headers, and
a body only for the calls that send one. The request head's own limits (its size, how long it
may take) are the HTTP server's: see app.server.
"""

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import problem
from app.middleware import PROBE_PATHS
from app.ratelimit import RateLimiter
from app.settings import Settings

SINGLE_HEADERS = {b"x-api-key": "X-API-Key", b"idempotency-key": "Idempotency-Key"}
# nginx's "client closed request": a call the client gave up is its doing, not a server error.
CLIENT_CLOSED_REQUEST = 499
CLOSE = {"Connection": "close"}  # a body left unread or half-sent: the connection cannot go on


class ClientGone(Exception):
    """The client disconnected before its body had arrived."""


class TooLarge(Exception):
    """A body sent without Content-Length grew past the limit."""


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings, limiter: RateLimiter) -> None:
        self.app = app
        self.max_body = settings.max_body_bytes
        self.body_timeout = settings.body_timeout_seconds
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen: dict[bytes, int] = {}
        length, chunked = 0, False
        for name, value in scope["headers"]:  # ASGI header names are lower-case
            if name in SINGLE_HEADERS:
                seen[name] = seen.get(name, 0) + 1
            elif name == b"content-length":
                length = int(value)  # the server has checked it is a number
            elif name == b"transfer-encoding":
                chunked = True
        path = scope["path"]
        for name, count in seen.items():
            if count > 1:
                detail = f"send {SINGLE_HEADERS[name]} once; it was sent {count} times"
                await problem(400, detail, path)(scope, receive, send)
                return
        if path not in PROBE_PATHS:
            client = scope.get("client")
            address = client[0] if client else "unknown"
            retry = await self.limiter.hit(self.limiter.limits.per_address, "address", address)
            if retry:
                detail = f"this address made more than {self.limiter.limits.per_address} calls"
                headers = {"Retry-After": str(retry)}
                await problem(429, f"{detail}; retry in {retry} s", path, headers)(
                    scope, receive, send
                )
                return
        if length > self.max_body:
            detail = f"the body is {length} bytes; at most {self.max_body} are accepted"
            await problem(413, detail, path, CLOSE)(scope, receive, send)
            return
        if length or chunked:
            try:
                body = await self._read_body(receive)
            except ClientGone:
                await _client_gone(send)
                return
            except TooLarge:
                detail = f"the body is larger than the {self.max_body} bytes accepted"
                await problem(413, detail, path, CLOSE)(scope, receive, send)
                return
            except TimeoutError:
                detail = f"the body did not arrive within {self.body_timeout:g} s"
                await problem(408, detail, path, CLOSE)(scope, receive, send)
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(self.body_timeout):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone
                chunk: bytes = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    raise TooLarge
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body read, for the app; then the server's own messages (a disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


async def _client_gone(send: Send) -> None:
    # The server drops an answer to a closed connection; the log and the metrics see its status.
    await send({"type": "http.response.start", "status": CLIENT_CLOSED_REQUEST, "headers": []})
    await send({"type": "http.response.body", "body": b""})


# Every answer: no MIME sniffing, no framing, no referrer.
ALWAYS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
# Every answer but an HTML page (the dashboard sets its own policy; /docs loads Swagger UI from
# its CDN): nothing to load or run, and nothing kept in a cache (answers carry certificates,
# request states, audit figures).
NOT_HTML = (
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
    (b"cache-control", b"no-store"),
)


class SecurityHeaders:
    """Adds the headers above to each answer, unless the answer sets them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                html = any(
                    name.lower() == b"content-type" and value.startswith(b"text/html")
                    for name, value in headers
                )
                wanted = ALWAYS if html else ALWAYS + NOT_HTML
                headers.extend(h for h in wanted if h[0] not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)
