"""Shared fixtures: every test database is built by the Alembic migrations, never create_all."""

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from app.ledger import migrate
from app.ledger.db import make_engine, open_session
from tests.integration.servers import free_port
from tests.lethe_cli import lethe

POSTGRES_ADMIN_URL = os.environ.get(
    "LETHE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    migrate.upgrade(url)
    return url


@pytest.fixture
def engine(sqlite_url: str) -> Iterator[Engine]:
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with open_session(engine) as session:
        yield session


def postgres_available() -> str | None:
    """None when reachable, else the reason (shown in the skip message)."""
    try:
        admin = make_engine(POSTGRES_ADMIN_URL)
        with admin.connect() as connection:
            connection.execute(text("SELECT 1"))
        admin.dispose()
        return None
    except Exception as error:  # any failure to connect means: skip, visibly
        return f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {error.__class__.__name__}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh database on the real PostgreSQL, migrated to head, dropped afterwards."""
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    name = f"lethe_test_{uuid.uuid4().hex[:12]}"
    admin = make_engine(POSTGRES_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    migrate.upgrade(url)
    yield url
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@dataclass(frozen=True)
class DemoRun:
    home: Path  # its ledger and store: real training, real deletions, purged artifacts
    result: subprocess.CompletedProcess[str]


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> DemoRun:
    """``lethe demo --no-serve`` once for the session (about a minute and a half on 2 cores):
    its output for the demo's test, its home for the dashboard's. Copy the home to change it."""
    home = tmp_path_factory.mktemp("demo")
    return DemoRun(home, lethe(home, "demo", "--no-serve", "--port", str(free_port())))
