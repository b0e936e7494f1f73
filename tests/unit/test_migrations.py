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


def _ledger_at_the_first_revision_with_data(url: str) -> None:
    """A ledger as the first release left it: samples, a run, its steps, a version, a request."""
    migrate.upgrade(url, "0001")
    engine = make_engine(url)
    with engine.begin() as connection:
        statements = [
            "INSERT INTO samples (sample_id, dataset, split, label, content_sha256, state, "
            "created_at) VALUES ('d-1', 'digits', 'train', 3, 'ab', 'active', '2026-11-01')",
            "INSERT INTO training_runs (id, kind, dataset, architecture, hyperparameters, seed, "
            "num_steps, store_prefix, created_at) VALUES (1, 'train', 'digits', 'small-cnn', "
            "'{}', 0, 1, 'runs/1', '2026-11-01')",
            "INSERT INTO step_membership (run_id, step, sample_id) VALUES (1, 0, 'd-1')",
            "INSERT INTO jobs (id, kind, state, lineage, params, attempts, max_attempts, "
            "progress, created_at) VALUES (1, 'train', 'succeeded', 'serving', '{}', 1, 3, 100, "
            "'2026-11-01')",
            "INSERT INTO deletion_requests (id, sample_id, received_at, deadline, state, "
            "updated_at, requested_by) VALUES ('r-1', 'd-1', '2026-11-02', '2026-12-02', "
            "'pending', '2026-11-02', 'key:1')",
        ]
        for statement in statements:
            connection.exec_driver_sql(statement)
    engine.dispose()


def test_a_ledger_holding_data_upgrades_to_the_head_on_sqlite(sqlite_url: str) -> None:
    """SQLite alters a table by copying it; rows of other tables refer to ``samples``. On a
    fresh database the suite's fixtures never see that: here the first release's ledger, with
    data, is upgraded, and every row and reference survives."""
    migrate.downgrade(sqlite_url, "base")
    _ledger_at_the_first_revision_with_data(sqlite_url)
    migrate.upgrade(sqlite_url)
    migrate.check(sqlite_url)
    engine = make_engine(sqlite_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT count(*) FROM step_membership").scalar() == 1
        assert connection.exec_driver_sql("SELECT state FROM deletion_requests").scalar() == (
            "pending"
        )
        assert connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall() == []
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # on again
    engine.dispose()
