"""A stack of real service processes for integration tests and benchmarks: a fresh PostgreSQL
database, this run's own slice of the real Redis (a key prefix and a queue name), and real
``celery worker`` and ``lethe scheduler`` processes, started, killed and restarted the way an
operator's would be. Nothing here is a fixture (see conftest.py), so ``bench/`` uses it too.
"""

import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from sqlalchemy import Engine

from app.ledger.db import make_engine
from app.settings import Settings
from tests.conftest import POSTGRES_ADMIN_URL
from tests.integration.servers import (
    PROJECT_ROOT,
    Server,
    free_port,
    fresh_postgres_database,
    service_env,
)

REDIS_URL = os.environ.get("LETHE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# Short enough for tests; the invariants between them are those of production.
TIMINGS = {
    "lease_seconds": "5",
    "heartbeat_seconds": "0.5",
    "scheduler_interval_seconds": "0.5",
    "requeue_after_seconds": "4",
    "coalesce_window_seconds": "1",
    "task_time_limit_seconds": "120",
    "visibility_timeout_seconds": "150",
    "job_max_attempts": "3",
}


def redis_unavailable(url: str) -> str | None:
    """None when reachable, else the reason (shown in the skip message)."""
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
        return None
    except redis.RedisError as error:
        return f"Redis not reachable at {url}: {error.__class__.__name__}"


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def pool_processes(worker: Server) -> list[int]:
    children = Path(f"/proc/{worker.process.pid}/task/{worker.process.pid}/children")
    return [int(pid) for pid in children.read_text().split()]


@dataclass
class Stack:
    """One test's ledger, broker slice and service processes."""

    env: dict[str, str]
    engine: Engine
    home: Path
    processes: list[Server] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        """The same settings the processes read, for calls made from the test process."""
        prefixed = {k.removeprefix("LETHE_").lower(): v for k, v in self.env.items()}
        return Settings.model_validate(
            {k: v for k, v in prefixed.items() if k in Settings.model_fields}
        )

    def start_worker(self) -> Server:
        command = [
            sys.executable, "-m", "celery", "-A", "worker.celery_app:celery_app", "worker",
            "--loglevel=INFO", f"--queues={self.env['LETHE_GPU_QUEUE']}",
            f"--hostname=lethe-test-{uuid.uuid4().hex[:6]}@%h",
            "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        worker = self._start("worker", command)
        wait_for(lambda: "ready." in worker.log_path.read_text(errors="replace"), 60, "the worker")
        return worker

    def start_scheduler(self) -> Server:
        return self._start("scheduler", [sys.executable, "-m", "worker.cli", "scheduler"])

    def _start(self, name: str, command: list[str]) -> Server:
        log_path = self.home / f"{name}-{len(self.processes)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command,
                cwd=PROJECT_ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a kill takes its pool processes too
            )
        server = Server(process, base_url="", log_path=log_path)
        self.processes.append(server)
        return server

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path.name}\n{p.log_tail(30)}" for p in self.processes)


@contextmanager
def open_stack(home: Path, admin_url: str = POSTGRES_ADMIN_URL, **settings: str) -> Iterator[Stack]:
    """A fresh database and a Redis key prefix and queue of its own, for processes started in
    ``home``; ``settings`` override the short test timings."""
    run = uuid.uuid4().hex[:10]
    prefix = f"lethe-test-{run}:"
    # A database per stack: the scheduler coalesces every pending request it can see.
    with fresh_postgres_database(admin_url, prefix="lethe_jobs") as database_url:
        env = service_env(
            database_url,
            secrets.token_urlsafe(16),
            home,
            broker_url=REDIS_URL,
            broker_key_prefix=prefix,
            gpu_queue=f"lethe-test-{run}",
            allow_test_faults="1",
            **(TIMINGS | settings),
        )
        env |= {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # share the CPU cores politely
        engine = make_engine(database_url)
        stack = Stack(env, engine, home)
        try:
            yield stack
        finally:
            for process in stack.processes:
                process.kill()
            engine.dispose()
            delete_keys(env["LETHE_BROKER_URL"], prefix)


def delete_keys(url: str, prefix: str) -> None:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
    except redis.RedisError:
        pass  # a private Redis that a test already stopped


@contextmanager
def private_redis(stack: Stack) -> Iterator[Callable[[], None]]:
    """A Redis of this test's own, so that restarting it disturbs nobody else's tests; yields a
    function that restarts it empty (no persistence), as a crashed broker comes back."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    command = [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", str(stack.home)]  # fmt: skip
    stack.env["LETHE_BROKER_URL"] = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis(port=port, socket_connect_timeout=1)
    running: list[Server] = []

    def start() -> None:
        process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL)
        running.append(Server(process, base_url="", log_path=stack.home / "redis.log"))
        stack.processes.append(running[-1])  # killed with the rest at teardown
        wait_for(lambda: _pings(client), 10, "redis-server")

    def restart() -> None:
        running[-1].kill()
        start()

    start()
    yield restart


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
