"""The API under TestClient, once on SQLite and once on the real PostgreSQL."""

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from app.ledger.db import make_engine, session_scope
from app.ledger.keys import SCOPES, create_key
from app.ledger.samples import SampleRecord, register_samples
from app.ledger.tables import Base, Split
from app.main import create_app
from app.settings import Settings

SAMPLES = [f"toy-{i:03d}" for i in range(40)]


@dataclass
class Api:
    client: TestClient
    engine: Engine
    keys: dict[str, str]  # scope (or "all") -> key
    enqueued: list[int] = field(default_factory=list)

    def headers(self, scope: str = "all") -> dict[str, str]:
        return {"X-API-Key": self.keys[scope]}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest) -> str:
    if request.param == "sqlite":
        url: str = request.getfixturevalue("sqlite_url")
        return url
    url = request.getfixturevalue("postgres_url")
    _truncate_all(url)  # the PostgreSQL database is shared by the session's tests
    return url


def _truncate_all(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as connection:
        names = ", ".join(table.name for table in Base.metadata.sorted_tables)
        connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    engine.dispose()


@pytest.fixture
def api(db_url: str, tmp_path: Path) -> Iterator[Api]:
    engine = make_engine(db_url)
    with session_scope(engine) as session:
        register_samples(
            session,
            "toy",
            [SampleRecord(sid, Split.train, i % 3, f"{i:064x}") for i, sid in enumerate(SAMPLES)],
        )
        keys = {scope: create_key(session, scope, [scope], actor="test") for scope in SCOPES}
        keys["all"] = create_key(session, "all", list(SCOPES), actor="test")
    enqueued: list[int] = []
    settings = Settings(database_url=db_url, home=tmp_path / "home")
    app = create_app(settings, engine, enqueue=enqueued.append)
    with TestClient(app) as client:
        yield Api(client, engine, keys, enqueued)
    engine.dispose()
