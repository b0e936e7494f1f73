"""A hostile client's view: the service as an operator runs it (uvicorn with `lethe serve`'s
HTTP protocol, on a fresh PostgreSQL database, its rate limits counted in the real Redis under
a key prefix of its own), and raw sockets where httpx would be too polite."""

import secrets
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx
import pytest

from app.ledger.db import make_engine, session_scope
from app.ledger.keys import create_key
from app.ledger.samples import SampleRecord, register_samples
from app.ledger.tables import Split
from tests.conftest import POSTGRES_ADMIN_URL
from tests.integration.conftest import require_services
from tests.integration.servers import Server, fresh_postgres_database, service_env, uvicorn_server
from tests.integration.stack import REDIS_URL, delete_keys

SAMPLES = [f"sec-{i:03d}" for i in range(200)]
pytestmark = pytest.mark.integration


@dataclass
class Ledger:
    url: str
    keys: dict[str, str]  # "write" (forget:write only), "read" (status:read), "all"


@dataclass
class Service:
    server: Server
    ledger: Ledger
    redis_prefix: str
    client: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        self.client = httpx.Client(base_url=self.server.base_url, timeout=10)

    def headers(self, key: str = "all") -> dict[str, str]:
        return {"X-API-Key": self.ledger.keys[key]}

    def connect(self) -> socket.socket:
        host, port = self.server.base_url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        return sock

    def rss_bytes(self) -> int:
        """Resident memory of the (single) server process."""
        status = Path(f"/proc/{self.server.process.pid}/status").read_text()
        (line,) = [row for row in status.splitlines() if row.startswith("VmRSS:")]
        return int(line.split()[1]) * 1024


class Serve(Protocol):
    def __call__(self, *, workers: int = 1, **settings: str) -> AbstractContextManager[Service]: ...


@pytest.fixture(scope="module")
def ledger() -> Iterator[Ledger]:
    require_services()
    with fresh_postgres_database(POSTGRES_ADMIN_URL, prefix="lethe_sec") as url:
        engine = make_engine(url)
        with session_scope(engine) as session:
            register_samples(
                session, "sec", [SampleRecord(s, Split.train, 0, "0" * 64) for s in SAMPLES]
            )
            keys = {
                "write": create_key(session, "write", ["forget:write"], actor="test"),
                "read": create_key(session, "read", ["status:read"], actor="test"),
                "all": create_key(
                    session,
                    "all",
                    ["forget:write", "status:read", "audit:read", "models:admin"],
                    actor="test",
                ),
            }
        engine.dispose()
        yield Ledger(url, keys)


@pytest.fixture(scope="module")
def serve(ledger: Ledger, tmp_path_factory: pytest.TempPathFactory) -> Serve:
    """Starts the service with these settings (LETHE_ names, lower case, without the prefix)."""

    @contextmanager
    def started(*, workers: int = 1, **settings: str) -> Iterator[Service]:
        prefix = f"lethe-sec-{uuid.uuid4().hex[:10]}:"
        env = service_env(
            ledger.url,
            secrets.token_urlsafe(16),
            tmp_path_factory.mktemp("home"),
            rate_limit_storage_url=REDIS_URL,
            broker_key_prefix=prefix,
            **settings,
        )
        try:
            with uvicorn_server(env, workers=workers) as server:
                service = Service(server, ledger, prefix)
                try:
                    yield service
                finally:
                    service.client.close()
        finally:
            delete_keys(REDIS_URL, prefix)

    return started


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP/1.1 answer with a Content-Length, read off a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before an answer: {data!r}")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(int(status_line.split()[1]), headers, body)


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """True when the server closes the connection within ``within`` seconds."""
    sock.settimeout(within)
    deadline = time.monotonic() + within
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return False
