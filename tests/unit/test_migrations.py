"""The schema exists only through migrations: upgrade, check and a round trip on both databases."""

import pytest
from sqlalchemy import inspect

from app.ledger import migrate
from app.ledger.db import make_engine
from app.ledger.tables import Base


def _round_trip(url: str) -> None:
    migrate.upgrade(url)
    migrate.check(url)  # raises if the tables in code and the migrations disagree
    migrate.downgrade(url, "base")
    engine = make_engine(url)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    migrate.upgrade(url)
    migrate.check(url)
    engine = make_engine(url)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_round_trip_on_sqlite(sqlite_url: str) -> None:
    _round_trip(sqlite_url)


@pytest.mark.postgres
def test_round_trip_on_postgres(postgres_url: str) -> None:
    _round_trip(postgres_url)
