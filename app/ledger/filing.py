"""Filing deletion requests: the one definition of the rules every POST /forget follows.

A call names samples; all must be known or none is filed (unknown samples). A sample whose
request is open or completed (live) gets that request back, never a second one; the others get
a new pending request with its deadline, and an audit event, in one transaction. A request
filed concurrently by another call wins the race on the partial unique index; the attempt then
runs again with the same drafted request IDs, so that a request this call did file is still
reported as created. The filer sees a receipt: the request's identity and state, nothing else.

The rules' values (IDs, times, deadline, event) are drafted and settled here in Python for
every backend. The attempt itself is one statement per sample on PostgreSQL (one round trip for
the usual call, awaited on the event loop by the API, or run in a session; a call for several
samples runs it once per sample in one transaction), and the ORM on SQLite, which has no
data-modifying CTEs.
"""

import asyncio
import contextvars
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from sqlalchemy import Engine, and_, bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.ledger.clock import as_utc, utcnow
from app.ledger.db import StatementPool, open_session
from app.ledger.errors import NotFound, StateConflict
from app.ledger.events import record_event
from app.ledger.tables import LIVE_REQUEST_STATES, DeletionRequest, RequestState, Sample

FILING_ACTION = "forget.request"
ATTEMPTS = 3  # a race is lost at most once per concurrent filer; three is plenty


class UnknownSamples(NotFound):
    def __init__(self, sample_ids: list[str]) -> None:
        super().__init__(f"unknown sample(s): {', '.join(sample_ids[:10])}")
        self.sample_ids = sample_ids


@dataclass(frozen=True, slots=True)
class Receipt:
    """A filed request as its filer sees it: identity and state (no job, no certificate)."""

    id: str
    sample_id: str
    state: RequestState
    received_at: datetime
    deadline: datetime

    @classmethod
    def of(cls, request: DeletionRequest) -> "Receipt":
        return cls(
            request.id,
            request.sample_id,
            request.state,
            as_utc(request.received_at),
            as_utc(request.deadline),
        )


@dataclass(frozen=True, slots=True)
class Filed:
    request: Receipt
    created: bool


@dataclass(frozen=True)
class Draft:
    """What one call would file: a request ID per distinct sample (in the order asked), the
    time and the deadline."""

    proposed: dict[str, str]  # sample ID -> the ID its new request would get
    now: datetime
    deadline: datetime
    actor: str
    note: str | None

    @property
    def sample_ids(self) -> list[str]:
        return list(self.proposed)

    @staticmethod
    def event_details(request_id: str) -> dict[str, Any]:
        return {"request_id": request_id}


def draft(sample_ids: Sequence[str], *, actor: str, note: str | None, deadline_days: int) -> Draft:
    now = utcnow()
    return Draft(
        proposed={sid: str(uuid.uuid4()) for sid in dict.fromkeys(sample_ids)},
        now=now,
        deadline=now + timedelta(days=deadline_days),
        actor=actor,
        note=note,
    )


# Every known sample with its live request after an attempt (None: a concurrent filer's
# request is not visible yet); a sample missing from it is unknown.
Found = dict[str, Receipt | None]


def settle(plan: Draft, found: Found) -> list[Filed] | None:
    """The call's answer, in the order asked; None when a lost race needs another attempt."""
    missing = [sid for sid in plan.sample_ids if sid not in found]
    if missing:
        raise UnknownSamples(missing)
    receipts = [found[sid] for sid in plan.sample_ids]
    if any(receipt is None for receipt in receipts):
        return None
    return [Filed(r, r.id == plan.proposed[r.sample_id]) for r in receipts if r is not None]


def _too_many_races() -> StateConflict:
    return StateConflict("could not file the requests after repeated concurrent conflicts")


_LIVE_STATES_SQL = ", ".join(f"'{state.value}'" for state in LIVE_REQUEST_STATES)

# The attempt on PostgreSQL for one sample, in one statement (one round trip, one transaction):
# the sample, its live request (from the statement's snapshot), the drafted request and its
# event inserted when there is none, and the live request read back (the one just filed, or the
# one found). No row: an unknown sample. A row without a request: a request filed concurrently
# after the snapshot stopped the insert on the partial unique index. A call for several samples
# runs it once per sample in one transaction. Prepared by psycopg after a few runs.
_FILE_ONE_POSTGRES = f"""
WITH sample AS (
    SELECT sample_id FROM samples WHERE sample_id = %(sample_id)s
), live AS (
    SELECT id, state, received_at, deadline FROM deletion_requests
    WHERE sample_id = %(sample_id)s AND state IN ({_LIVE_STATES_SQL})
), filed AS (
    INSERT INTO deletion_requests
        (id, sample_id, received_at, updated_at, deadline, state, requester_note, requested_by)
    SELECT %(id)s, sample_id, %(now)s, %(now)s, %(deadline)s, %(state)s, %(note)s, %(actor)s
    FROM sample
    WHERE NOT EXISTS (SELECT FROM live)
    ON CONFLICT (sample_id) WHERE state IN ({_LIVE_STATES_SQL}) DO NOTHING
    RETURNING id, state, received_at, deadline
), event AS (
    INSERT INTO audit_events (at, actor, action, target, outcome, details)
    SELECT %(now)s, %(actor)s, %(action)s, %(sample_id)s, 'ok', %(details)s::json
    FROM filed
)
SELECT coalesce(filed.id, live.id), coalesce(filed.state, live.state),
    coalesce(filed.received_at, live.received_at), coalesce(filed.deadline, live.deadline)
FROM sample
LEFT JOIN live ON true
LEFT JOIN filed ON true
"""


def _statement_parameters(plan: Draft, sample_id: str) -> dict[str, Any]:
    request_id = plan.proposed[sample_id]
    return {
        "sample_id": sample_id,
        "id": request_id,
        "details": json.dumps(plan.event_details(request_id)),
        "now": plan.now,
        "deadline": plan.deadline,
        "state": RequestState.pending.value,
        "note": plan.note,
        "actor": plan.actor,
        "action": FILING_ACTION,
    }


def _found(sample_id: str, rows: Sequence[Sequence[Any]], found: Found) -> None:
    """Notes what the statement for ``sample_id`` returned (nothing for an unknown sample)."""
    if rows:
        request_id, state, received, due = rows[0]
        found[sample_id] = (
            Receipt(request_id, sample_id, RequestState(state), as_utc(received), as_utc(due))
            if request_id is not None
            else None
        )


# Built once: composing it per call cost about as much CPU as running it.
_KNOWN_WITH_LIVE_REQUEST = (
    select(Sample.sample_id, DeletionRequest)
    .outerjoin(
        DeletionRequest,
        and_(
            DeletionRequest.sample_id == Sample.sample_id,
            DeletionRequest.state.in_(LIVE_REQUEST_STATES),
        ),
    )
    .where(Sample.sample_id.in_(bindparam("sample_ids", expanding=True)))
)


def _attempt_with_orm(session: Session, plan: Draft) -> Found:
    """The attempt on SQLite (one writer at a time: a race shows as an IntegrityError)."""
    rows = session.execute(_KNOWN_WITH_LIVE_REQUEST, {"sample_ids": plan.sample_ids})
    known: dict[str, DeletionRequest | None] = {sid: request for sid, request in rows}
    if len(known) < len(plan.sample_ids):
        return {sid: None for sid in known}  # unknown samples: nothing is written
    new = [
        DeletionRequest(
            id=plan.proposed[sid],
            sample_id=sid,
            received_at=plan.now,
            updated_at=plan.now,
            deadline=plan.deadline,
            state=RequestState.pending,
            requester_note=plan.note,
            requested_by=plan.actor,
        )
        for sid, request in known.items()
        if request is None
    ]
    session.add_all(new)
    for request in new:
        record_event(
            session,
            actor=plan.actor,
            action=FILING_ACTION,
            target=request.sample_id,
            details=plan.event_details(request.id),
        )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()  # another transaction filed one of them first
        return {sid: None for sid in known}
    filed = {request.sample_id: request for request in new}
    return {sid: Receipt.of(request or filed[sid]) for sid, request in known.items()}


def _attempt_in_session(session: Session, plan: Draft) -> Found:
    if session.get_bind().dialect.name != "postgresql":
        return _attempt_with_orm(session, plan)
    connection = session.connection()
    found: Found = {}
    for sid in plan.sample_ids:
        rows = connection.exec_driver_sql(_FILE_ONE_POSTGRES, _statement_parameters(plan, sid))
        _found(sid, rows.all(), found)
    if len(found) < len(plan.sample_ids):
        session.rollback()  # all or nothing
    else:
        session.commit()
    return found


def file_requests(
    session: Session,
    sample_ids: Sequence[str],
    *,
    actor: str,
    note: str | None,
    deadline_days: int,
) -> list[Filed]:
    """Files a request for every sample that has no live one, and commits (see the module)."""
    plan = draft(sample_ids, actor=actor, note=note, deadline_days=deadline_days)
    for _attempt in range(ATTEMPTS):
        filed = settle(plan, _attempt_in_session(session, plan))
        if filed is not None:
            return filed
    raise _too_many_races()


class Intake:
    """file_requests for the API, awaited: on PostgreSQL the statement runs on the event loop
    over a few connections of its own (no thread hop, no ORM); elsewhere in a thread."""

    # Few connections serve best: on 2 cores, 2 to 8 gave ~1,800 req/s with p99 under 25 ms
    # (8: ~50 ms), 20 gave ~1,700 req/s with p99 80 to 90 ms (docs/benchmarks/forget.md).
    CONNECTIONS = 4

    def __init__(self, engine: Engine, statements: StatementPool | None) -> None:
        self._engine = engine
        self._statements = statements

    @classmethod
    def of(cls, engine: Engine, connect_timeout: float) -> "Intake":
        postgres = engine.dialect.name == "postgresql"
        return cls(
            engine,
            StatementPool(engine, cls.CONNECTIONS, connect_timeout) if postgres else None,
        )

    async def file(
        self, sample_ids: Sequence[str], *, actor: str, note: str | None, deadline_days: int
    ) -> list[Filed]:
        if self._statements is None:
            call = partial(
                self._file_in_session,
                sample_ids,
                actor=actor,
                note=note,
                deadline_days=deadline_days,
            )
            return await asyncio.get_running_loop().run_in_executor(
                None, contextvars.copy_context().run, call
            )
        plan = draft(sample_ids, actor=actor, note=note, deadline_days=deadline_days)
        for _attempt in range(ATTEMPTS):
            filed = settle(plan, await self._attempt(self._statements, plan))
            if filed is not None:
                return filed
        raise _too_many_races()

    @staticmethod
    async def _attempt(statements: StatementPool, plan: Draft) -> Found:
        found: Found = {}
        if len(plan.proposed) == 1:  # the usual call: the statement alone, in autocommit
            (sid,) = plan.proposed
            _found(
                sid,
                await statements.run(_FILE_ONE_POSTGRES, _statement_parameters(plan, sid)),
                found,
            )
            return found
        async with statements.transaction() as run:
            for sid in plan.sample_ids:
                _found(sid, await run(_FILE_ONE_POSTGRES, _statement_parameters(plan, sid)), found)
            if len(found) < len(plan.sample_ids):
                raise UnknownSamples([sid for sid in plan.sample_ids if sid not in found])
        return found

    def _file_in_session(
        self, sample_ids: Sequence[str], *, actor: str, note: str | None, deadline_days: int
    ) -> list[Filed]:
        with open_session(self._engine) as session:
            return file_requests(
                session, sample_ids, actor=actor, note=note, deadline_days=deadline_days
            )

    async def close(self) -> None:
        if self._statements is not None:
            await self._statements.close()
