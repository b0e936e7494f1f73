"""Ledger operations: membership both ways, guarded transitions, alias history, keys."""

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, NullPool, create_engine, func, select, text
from sqlalchemy.exc import DataError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from app.ledger.db import StatementPool, make_engine, open_session, session_scope
from app.ledger.errors import Invalid, NotFound, StateConflict
from app.ledger.filing import Filed, Intake, file_requests
from app.ledger.keys import create_key, find_active_key, hash_key, list_keys
from app.ledger.provenance import (
    DeltaRecord,
    create_run,
    mark_rolled_back,
    record_steps,
    release_rollbacks,
    rolled_back_steps,
    samples_in_step,
    steps_of_samples,
)
from app.ledger.requests import get_request, transition_requests
from app.ledger.samples import SampleRecord, register_samples, set_sample_state
from app.ledger.tables import (
    AuditEvent,
    DeletionRequest,
    RequestState,
    SampleState,
    Split,
    VersionState,
)
from app.ledger.versions import alias_history, alias_target, create_version, promote


def seed(session: Session, n: int = 6) -> list[str]:
    ids = [f"s{i}" for i in range(n)]
    register_samples(session, "toy", [SampleRecord(i, Split.train, 0, "0" * 64) for i in ids])
    return ids


def test_register_is_rerunnable(session: Session) -> None:
    seed(session)
    assert register_samples(session, "toy", [SampleRecord("s0", Split.train, 0, "0" * 64)]) == 0


def test_membership_both_ways(session: Session) -> None:
    ids = seed(session)
    run = create_run(
        session,
        kind="train",
        dataset="toy",
        architecture="x",
        hyperparameters={},
        seed=0,
        store_prefix="runs/1",
    )
    record_steps(session, run.id, [(0, ids[:3]), (1, ids[3:]), (2, [ids[0], ids[0], ids[5]])])
    assert steps_of_samples(session, ["s0", "s4"]) == {
        "s0": [(run.id, 0), (run.id, 2)],
        "s4": [(run.id, 1)],
    }
    assert samples_in_step(session, run.id, 2) == ["s0", "s5"]


def test_rollback_claims_a_step_once(session: Session) -> None:
    ids = seed(session)
    run = create_run(
        session,
        kind="train",
        dataset="toy",
        architecture="x",
        hyperparameters={},
        seed=0,
        store_prefix="runs/1",
    )
    deltas = [DeltaRecord(s, f"d/{s}", "0" * 64, "fp32", 4, ["w"]) for s in range(2)]
    record_steps(session, run.id, [(0, ids[:3]), (1, ids[3:])], deltas)
    v2 = create_version(session, method="amnesiac", state=VersionState.candidate)
    mark_rolled_back(session, [(run.id, 0)], v2.id)
    with pytest.raises(StateConflict):
        mark_rolled_back(session, [(run.id, 0)], v2.id)
    assert rolled_back_steps(session, [v2.id]) == {(run.id, 0)}
    assert release_rollbacks(session, v2.id) == 1
    assert rolled_back_steps(session, [v2.id]) == set()


def test_guarded_request_transitions(session: Session) -> None:
    seed(session)
    (filed,) = file_requests(session, ["s1"], actor="t", note=None, deadline_days=30)
    request_id = filed.request.id
    with pytest.raises(StateConflict, match="not completed"):
        transition_requests(session, [request_id], RequestState.completed, RequestState.failed)
    session.rollback()
    transition_requests(session, [request_id], RequestState.pending, RequestState.processing)
    session.commit()
    assert get_request(session, request_id).state is RequestState.processing


def test_guarded_sample_transitions(session: Session) -> None:
    seed(session)
    set_sample_state(session, ["s1", "s2"], SampleState.active, SampleState.forgetting)
    with pytest.raises(StateConflict):
        set_sample_state(session, ["s2", "s3"], SampleState.forgetting, SampleState.forgotten)


def test_alias_moves_keep_history(session: Session) -> None:
    v1 = create_version(session, method="train", state=VersionState.candidate)
    v2 = create_version(session, method="amnesiac", state=VersionState.candidate, parent_id=v1.id)
    promote(session, v1, moved_by="t", reason="first")
    promote(session, v2, moved_by="t", reason="second")
    target = alias_target(session)
    assert target is not None and target.version == "v2"
    history = alias_history(session)
    assert [(h.version_id, h.ended_at is None) for h in history] == [(v2.id, True), (v1.id, False)]
    assert v1.state is VersionState.retired
    rejected = create_version(session, method="relabel", state=VersionState.rejected)
    with pytest.raises(StateConflict):
        promote(session, rejected, moved_by="t", reason="no")


def test_keys_are_stored_hashed(session: Session) -> None:
    key = create_key(session, "ops", ["status:read"], actor="t")
    stored = list_keys(session)[0]
    assert stored.key_sha256 == hash_key(key) and key not in stored.key_sha256
    assert find_active_key(session, key) is not None
    with pytest.raises(Invalid):
        create_key(session, "bad", ["root"], actor="t")


@pytest.fixture
def pg_engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    yield engine
    engine.dispose()


def pg_samples(engine: Engine, n: int) -> list[str]:
    ids = [f"pg-{uuid.uuid4().hex[:12]}" for _ in range(n)]
    with session_scope(engine) as session:
        register_samples(session, "pg", [SampleRecord(i, Split.train, 0, "0" * 64) for i in ids])
    return ids


def forget_events(engine: Engine, sample_id: str) -> int:
    query = select(func.count()).where(
        AuditEvent.action == "forget.request", AuditEvent.target == sample_id
    )
    with open_session(engine) as session:
        return session.scalar(query) or 0


@pytest.mark.postgres
@pytest.mark.parametrize("path", ["intake", "session"])
def test_filing_on_postgres_files_finds_and_refuses_unknown(pg_engine: Engine, path: str) -> None:
    """The statement, awaited (the API) or in a session (the worker, the CLI): filed with its
    event, found again, 404 for an unknown sample, a failed request not live."""
    sample, other = pg_samples(pg_engine, 2)

    async def with_intake(sample_ids: list[str], note: str | None) -> list[Filed]:
        intake = Intake.of(pg_engine, 3.0)
        try:
            return await intake.file(sample_ids, actor="t", note=note, deadline_days=30)
        finally:
            await intake.close()

    def file(sample_ids: list[str], note: str | None = None) -> list[Filed]:
        if path == "intake":
            return asyncio.run(with_intake(sample_ids, note))
        with open_session(pg_engine) as session:
            return file_requests(session, sample_ids, actor="t", note=note, deadline_days=30)

    (first,) = file([sample], "n")
    (again,) = file([sample])
    with pytest.raises(NotFound, match="-unknown"):
        file([other, f"{other}-unknown"])
    assert first.created and first.request.state is RequestState.pending
    assert not again.created
    assert again.request == first.request
    assert again.request.deadline - again.request.received_at == timedelta(days=30)
    assert forget_events(pg_engine, sample) == 1
    assert forget_events(pg_engine, other) == 0  # all or nothing
    with session_scope(pg_engine) as session:
        row = session.get(DeletionRequest, first.request.id)
        assert row is not None and row.requester_note == "n" and row.requested_by == "t"
        transition_requests(session, [row.id], RequestState.pending, RequestState.failed)
    retried, known = file([sample, other])
    assert retried.created and retried.request.id != first.request.id  # failed is not live
    assert known.created and forget_events(pg_engine, other) == 1
    assert forget_events(pg_engine, sample) == 2


@pytest.mark.postgres
def test_file_request_that_loses_a_race_returns_the_winner(pg_engine: Engine) -> None:
    """A concurrent insert for the same sample commits while this statement waits on the
    unique index: the statement files nothing and runs again to read the winner back; a
    sample of the same call that it did file is still reported as created."""
    sample, alone = pg_samples(pg_engine, 2)
    results: list[list[Filed]] = []

    def file_both() -> None:
        intake = Intake(pg_engine, StatementPool(pg_engine, 1, 3.0))
        results.append(
            asyncio.run(intake.file([sample, alone], actor="l", note=None, deadline_days=30))
        )

    with pg_engine.connect() as winner:
        winner.execute(
            text(
                "INSERT INTO deletion_requests (id, sample_id, received_at, updated_at, deadline,"
                " state, requested_by) VALUES (:id, :s, now(), now(), now(), 'pending', 'w')"
            ),
            {"id": f"won-{sample}", "s": sample},
        )  # not yet committed: the loser's insert waits for it on the unique index
        loser = threading.Thread(target=file_both)
        loser.start()
        time.sleep(0.5)
        assert not results  # still waiting
        winner.commit()
    loser.join(10)
    ((lost, won),) = results
    assert not lost.created and lost.request.id == f"won-{sample}"
    assert won.created and won.request.sample_id == alone
    assert forget_events(pg_engine, sample) == 0  # the loser recorded nothing for it
    assert forget_events(pg_engine, alone) == 1


@pytest.mark.postgres
def test_a_statement_survives_a_restarted_server(pg_engine: Engine, postgres_url: str) -> None:
    """Pooled connections whose backends died (a restarted server) are dropped and the
    statement runs again on a new one: the caller sees no error."""
    first, second = pg_samples(pg_engine, 2)

    async def scenario() -> tuple[set[int], set[int], Filed]:
        statements = StatementPool(pg_engine, 2, 3.0)
        intake = Intake(pg_engine, statements)
        try:
            await intake.file([first], actor="t", note=None, deadline_days=30)
            pid_query = "SELECT pg_backend_pid() FROM pg_sleep(0.1)"
            both = await asyncio.gather(*(statements.run(pid_query, {}) for _ in range(2)))
            dead = {pid for ((pid,),) in both}  # both connections, now idle in the pool
            for pid in dead:
                _terminate(postgres_url, pid)
            await asyncio.sleep(0.1)
            (filed,) = await intake.file([second], actor="t", note=None, deadline_days=30)
            again = await asyncio.gather(*(statements.run(pid_query, {}) for _ in range(2)))
            return dead, {pid for ((pid,),) in again}, filed
        finally:
            await statements.close()

    dead, alive, filed = asyncio.run(scenario())
    assert len(dead) == 2 and filed.created and not dead & alive
    assert forget_events(pg_engine, first) == forget_events(pg_engine, second) == 1


@pytest.mark.postgres
def test_statement_errors_are_sqlalchemys_and_slots_are_bounded(pg_engine: Engine) -> None:
    """A value PostgreSQL refuses is SQLAlchemy's DataError (the API's 422) and leaves the
    connection usable; a statement that finds no free connection in time is a pool timeout
    (the API's 503)."""

    async def scenario() -> None:
        statements = StatementPool(pg_engine, 1, 0.3)
        try:
            with pytest.raises(DataError):
                await statements.run("SELECT %(v)s::text", {"v": "nul\x00byte"})
            assert await statements.run("SELECT 1", {}) == [(1,)]
            sleeper = asyncio.create_task(statements.run("SELECT pg_sleep(1)", {}))
            await asyncio.sleep(0.1)
            with pytest.raises(PoolTimeout):
                await statements.run("SELECT 1", {})
            await sleeper
        finally:
            await statements.close()

    asyncio.run(scenario())


def _terminate(postgres_url: str, pid: int) -> None:
    killer = create_engine(postgres_url, poolclass=NullPool)
    with killer.connect() as connection:
        connection.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
        connection.commit()
    killer.dispose()


@pytest.mark.postgres
def test_a_connection_idle_for_long_is_checked_before_use(postgres_url: str) -> None:
    """ping_after_idle: an idle connection is pinged and replaced if dead; one in steady use is
    not pinged, so its death shows when it is used (and the pool is renewed)."""
    for idle_after, reused_dead in ((0.0, False), (3600.0, True)):
        engine = make_engine(postgres_url, ping_after_idle=idle_after)
        try:
            with engine.connect() as connection:
                pid = connection.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            _terminate(postgres_url, pid)
            time.sleep(0.1)
            if reused_dead:
                with pytest.raises(OperationalError), engine.connect() as connection:
                    connection.exec_driver_sql("SELECT 1")
            with engine.connect() as connection:
                assert connection.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
        finally:
            engine.dispose()
