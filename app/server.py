"""The HTTP server's side of the limits met before authentication: how large a request's line
and headers may be, and how long they may take to arrive.

uvicorn bounds neither with httptools (its `h11_max_incomplete_event_size` is h11's only, and
its keep-alive timeout starts only after a first answer), so a client could hold a connection
open forever, or fill memory, with a request head that never ends. GuardedHttpToolsProtocol is
uvicorn's httptools protocol with both bounds; `lethe serve`, the demo and the tests run it
(`uvicorn --http app.server:GuardedHttpToolsProtocol`).
"""

import asyncio
from http import HTTPStatus
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.api.errors import problem
from app.settings import get_settings

HTTP_PROTOCOL = "app.server:GuardedHttpToolsProtocol"


def refusal(status: int, detail: str) -> bytes:
    """A whole problem+json answer that closes the connection, written with no app involved."""
    answer = problem(status, detail, "", {"Connection": "close"})
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode("latin-1")]
    head += [name + b": " + value for name, value in answer.raw_headers]
    return b"\r\n".join([*head, b"", answer.body])


def _head_too_large(limit: int) -> ASGIApp:
    async def answer(scope: Scope, receive: Receive, send: Send) -> None:
        detail = f"the request's line and headers exceed {limit} bytes"
        await problem(431, detail, scope["path"], {"Connection": "close"})(scope, receive, send)

    return answer


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """From a connection's start, or a request's first byte, its line and headers must arrive
    within LETHE_HEADER_TIMEOUT_SECONDS (else 408) and within LETHE_MAX_HEADER_BYTES (else
    431); either way the connection is closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self._head_timeout = settings.header_timeout_seconds
        self._max_head = settings.max_header_bytes
        self._head_deadline: asyncio.TimerHandle | None = None
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_arrived()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_deadline is not None:  # still reading a head: bytes so far
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self._refuse(431, f"the request's line and headers exceed {self._max_head} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_deadline is None:  # a later request on a kept-alive connection
            self._expect_head()

    def on_headers_complete(self) -> None:
        self._head_arrived()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size <= self._max_head:
            super().on_headers_complete()
            return
        # A head that arrived whole in one read: answered 431 in its place, as uvicorn answers
        # 503 in the place of the app when its concurrency limit is reached.
        app, self.app = self.app, _head_too_large(self._max_head)
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def _expect_head(self) -> None:
        self._head_bytes = 0
        self._head_deadline = self.loop.call_later(self._head_timeout, self._head_too_slow)

    def _head_arrived(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        self._refuse(408, f"the request's headers did not arrive within {self._head_timeout:g} s")

    def _refuse(self, status: int, detail: str) -> None:
        self._head_arrived()
        if not self.transport.is_closing():
            self.transport.write(refusal(status, detail))
            self.transport.close()
