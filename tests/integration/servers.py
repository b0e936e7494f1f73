"""Real server processes for integration tests and benchmarks: a fresh PostgreSQL database and a
uvicorn process running the service, started the way an operator starts them.

Import what you need (``from tests.integration.servers import ...``); nothing here is a fixture,
so the helpers serve pytest and the scripts under ``bench/`` alike.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import text

from app.ledger import migrate
from app.ledger.db import make_engine
from app.server import HTTP_PROTOCOL

PROJECT_ROOT = Path(__file__).resolve().parents[2]
APP_FACTORY = "app.main:create_app"


@contextmanager
def fresh_postgres_database(admin_url: str, prefix: str = "lethe_it") -> Iterator[str]:
    """A new database next to ``admin_url``'s, migrated to head, dropped (forcibly) on exit."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = make_engine(admin_url).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = admin_url.rsplit("/", 1)[0] + f"/{name}"
        migrate.upgrade(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Server:
    """A service process in its own process group (so that its workers die with it)."""

    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL to the whole group: no shutdown hook, no flush, as in a crash."""
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def wait_until_healthy(server: Server, timeout: float = 30.0) -> None:
    """Polls GET /healthz until it answers 200; fails early, with the log, if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.process.returncode}:\n{server.log_tail()}"
            )
        try:
            if httpx.get(f"{server.base_url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(0.1)
    server.kill()
    raise TimeoutError(
        f"no answer from {server.base_url}/healthz in {timeout}s:\n{server.log_tail()}"
    )


def service_env(database_url: str, api_key: str, home: Path, **extra: str) -> dict[str, str]:
    """The environment an operator would set: ledger URL, bootstrap key, a private home folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    env |= {
        "LETHE_DATABASE_URL": database_url,
        "LETHE_BOOTSTRAP_API_KEY": api_key,
        "LETHE_HOME": str(home),
    }
    return env | {f"LETHE_{k.upper()}": v for k, v in extra.items()}


@contextmanager
def uvicorn_server(
    env: Mapping[str, str],
    *,
    workers: int = 1,
    factory: str = APP_FACTORY,
    startup_timeout: float = 30.0,
) -> Iterator[Server]:
    """Runs ``uvicorn <factory> --factory`` on a free loopback port until the block exits."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        factory,
        "--factory",
        "--host=127.0.0.1",
        f"--port={port}",
        f"--workers={workers}",
        f"--http={HTTP_PROTOCOL}",  # as `lethe serve` runs it
        "--log-level=warning",
        "--no-access-log",
    ]
    with tempfile.NamedTemporaryFile(prefix="uvicorn-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(process, f"http://127.0.0.1:{port}", Path(log.name))
    try:
        wait_until_healthy(server, startup_timeout)
        yield server
    finally:
        server.stop()
        server.log_path.unlink(missing_ok=True)
