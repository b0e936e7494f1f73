"""Deletion requests: create (at most one live request per sample), read, list, transition."""

import base64
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, and_, bindparam, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.ledger.clock import as_utc, utcnow
from app.ledger.db import StatementPool, affected_rows, open_session
from app.ledger.errors import Invalid, NotFound, StateConflict
from app.ledger.events import record_event
from app.ledger.tables import (
    LIVE_REQUEST_STATES,
    OPEN_REQUEST_STATES,
    DeletionRequest,
    Job,
    RequestState,
    Sample,
)
from app.ledger.versions import version_names


@dataclass(frozen=True)
class Filed:
    request: DeletionRequest
    created: bool


@dataclass(frozen=True, slots=True)
class JobView:
    id: int
    kind: str
    state: str
    progress: int
    attempts: int
    method: str | None
    error: str | None
    progress_detail: dict[str, Any] | None = None  # (POST /forget's one statement reads none)
    hold_stage: str | None = None
    hold_reason: str | None = None
    approved_stages: tuple[str, ...] = ()

    @classmethod
    def of(cls, job: Job) -> "JobView":
        return cls(
            job.id,
            job.kind.value,
            job.state.value,
            job.progress,
            job.attempts,
            job.method,
            job.error,
            job.progress_detail,
            job.hold_stage.value if job.hold_stage else None,
            job.hold_reason,
            tuple(job.approved_stages),
        )


@dataclass(frozen=True, slots=True)
class RequestView:
    """A deletion request as its caller sees it, with its job and the model version that
    completed it: plain values, detached from any session."""

    id: str
    sample_id: str
    state: RequestState
    received_at: datetime
    deadline: datetime
    updated_at: datetime
    completed_at: datetime | None
    error: str | None
    certificate: dict[str, Any] | None
    job: JobView | None
    completed_in_version: str | None


@dataclass(frozen=True, slots=True)
class FiledView:
    request: RequestView
    created: bool


def request_views(session: Session, requests: Sequence[DeletionRequest]) -> list[RequestView]:
    """Each request with its job and completing version (two lookups in all, only if needed)."""
    job_ids = {r.job_id for r in requests if r.job_id is not None}
    jobs = (
        {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(job_ids)))}
        if job_ids
        else {}
    )  # app.ledger.jobs imports this module, so not its jobs_by_id
    versions = version_names(
        session, {r.completed_version_id for r in requests if r.completed_version_id is not None}
    )
    views = []
    for r in requests:
        job = jobs.get(r.job_id) if r.job_id is not None else None
        views.append(
            RequestView(
                id=r.id,
                sample_id=r.sample_id,
                state=r.state,
                received_at=as_utc(r.received_at),
                deadline=as_utc(r.deadline),
                updated_at=as_utc(r.updated_at),
                completed_at=as_utc(r.completed_at) if r.completed_at else None,
                error=r.error,
                certificate=r.certificate,
                job=JobView.of(job) if job else None,
                completed_in_version=(
                    versions.get(r.completed_version_id) if r.completed_version_id else None
                ),
            )
        )
    return views


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


def _live_requests(
    session: Session, sample_ids: Sequence[str]
) -> dict[str, DeletionRequest | None]:
    """Every known sample among ``sample_ids``, with its live request or None: one query for
    both checks (before, one per sample plus one for all), on the path of every POST /forget."""
    rows = session.execute(_KNOWN_WITH_LIVE_REQUEST, {"sample_ids": list(sample_ids)})
    return {sample_id: request for sample_id, request in rows}


def file_requests(
    session: Session,
    sample_ids: Sequence[str],
    *,
    actor: str,
    note: str | None,
    deadline_days: int,
) -> list[Filed]:
    """Records a deletion request for every sample that has no live one, and commits.

    All-or-nothing: an unknown sample fails the whole call before anything is written. A sample
    whose request is open or completed gets that request back, never a second one; a concurrent
    duplicate loses the race on the partial unique index and is answered the same way.
    """
    unique_ids = list(dict.fromkeys(sample_ids))
    for _attempt in range(3):
        known = _live_requests(session, unique_ids)
        missing = [sid for sid in unique_ids if sid not in known]
        if missing:
            raise NotFound(f"unknown sample(s): {', '.join(missing[:10])}")
        existing = {sid: known[sid] for sid in unique_ids}
        now = utcnow()
        new = [
            DeletionRequest(
                id=str(uuid.uuid4()),
                sample_id=sid,
                received_at=now,
                updated_at=now,
                deadline=now + timedelta(days=deadline_days),
                state=RequestState.pending,
                requester_note=note,
                requested_by=actor,
            )
            for sid, found in existing.items()
            if found is None
        ]
        session.add_all(new)
        for request in new:
            record_event(
                session,
                actor=actor,
                action="forget.request",
                target=request.sample_id,
                details={"request_id": request.id},
            )
        try:
            session.commit()
        except IntegrityError:
            session.rollback()  # another transaction filed one of them first: read it back
            continue
        created = {r.sample_id: r for r in new}
        return [
            Filed(created[sid], True) if sid in created else Filed(found, False)  # type: ignore[arg-type]
            for sid, found in existing.items()
        ]
    raise StateConflict("could not file the requests after repeated concurrent conflicts")


_LIVE_STATES_SQL = ", ".join(f"'{state.value}'" for state in LIVE_REQUEST_STATES)

# POST /forget/{sample_id} on PostgreSQL: the same rules as file_requests for one sample, as one
# statement run in autocommit, so one round trip files the request and its audit event in one
# transaction (or finds the live request, with its job and version, or finds no sample at all).
# No row: unknown sample. created = 1: filed now. created = 0 with a request: the live one.
# created = 0 without one: a concurrent POST filed it after this statement's snapshot was taken
# (the insert met its row on the partial unique index): run again to read it back.
# Prepared by psycopg after a few runs on a connection: PostgreSQL plans it once per connection.
_FILE_ONE_POSTGRES = f"""
WITH sample AS (
    SELECT sample_id FROM samples WHERE sample_id = %(sample_id)s
), live AS (
    SELECT id, state, received_at, deadline, updated_at, completed_at, error, certificate,
        job_id, completed_version_id
    FROM deletion_requests
    WHERE sample_id = %(sample_id)s AND state IN ({_LIVE_STATES_SQL})
), filed AS (
    INSERT INTO deletion_requests
        (id, sample_id, received_at, updated_at, deadline, state, requester_note, requested_by)
    SELECT %(id)s, sample_id, %(now)s, %(now)s, %(deadline)s, %(state)s, %(note)s, %(actor)s
    FROM sample
    WHERE NOT EXISTS (SELECT FROM live)
    ON CONFLICT (sample_id) WHERE state IN ({_LIVE_STATES_SQL}) DO NOTHING
    RETURNING id
), event AS (
    INSERT INTO audit_events (at, actor, action, target, outcome, details)
    SELECT %(now)s, %(actor)s, 'forget.request', %(sample_id)s, 'ok', %(details)s::json
    FROM filed
)
SELECT (SELECT count(*) FROM filed) AS created,
    live.id, live.state, live.received_at, live.deadline, live.updated_at, live.completed_at,
    live.error, live.certificate,
    job.id, job.kind, job.state, job.progress, job.attempts, job.method, job.error,
    version.version
FROM sample
LEFT JOIN live ON true
LEFT JOIN jobs AS job ON job.id = live.job_id
LEFT JOIN model_versions AS version ON version.id = live.completed_version_id
"""


def file_request(
    engine: Engine, sample_id: str, *, actor: str, note: str | None, deadline_days: int
) -> FiledView:
    """file_requests for one sample, answered as a view (the API's path on SQLite)."""
    with open_session(engine) as session:
        (filed,) = file_requests(
            session, [sample_id], actor=actor, note=note, deadline_days=deadline_days
        )
        (view,) = request_views(session, [filed.request])
        return FiledView(view, filed.created)


async def file_request_in_one_statement(
    statements: StatementPool,
    sample_id: str,
    *,
    actor: str,
    note: str | None,
    deadline_days: int,
) -> FiledView:
    """file_request on PostgreSQL: one statement, one round trip, awaited on the event loop."""
    for _attempt in range(3):
        now = utcnow()
        request_id = str(uuid.uuid4())
        deadline = now + timedelta(days=deadline_days)
        rows = await statements.run(
            _FILE_ONE_POSTGRES,
            {
                "sample_id": sample_id,
                "id": request_id,
                "now": now,
                "deadline": deadline,
                "state": RequestState.pending.value,
                "note": note,
                "actor": actor,
                "details": json.dumps({"request_id": request_id}),
            },
        )
        if not rows:
            raise NotFound(f"unknown sample(s): {sample_id}")
        created, rid, state, received, due, updated, completed, error, certificate, *rest = rows[0]
        job, version = rest[:7], rest[7]
        if created:
            view = RequestView(
                id=request_id,
                sample_id=sample_id,
                state=RequestState.pending,
                received_at=now,
                deadline=deadline,
                updated_at=now,
                completed_at=None,
                error=None,
                certificate=None,
                job=None,
                completed_in_version=None,
            )
            return FiledView(view, True)
        if rid is None:
            continue  # lost the race to a concurrent POST: read its request back
        view = RequestView(
            id=rid,
            sample_id=sample_id,
            state=RequestState(state),
            received_at=as_utc(received),
            deadline=as_utc(due),
            updated_at=as_utc(updated),
            completed_at=as_utc(completed) if completed else None,
            error=error,
            certificate=certificate,
            job=JobView(*job) if job[0] is not None else None,
            completed_in_version=version,
        )
        return FiledView(view, False)
    raise StateConflict("could not file the request after repeated concurrent conflicts")


def get_request(session: Session, request_id: str) -> DeletionRequest:
    request = session.get(DeletionRequest, request_id)
    if request is None:
        raise NotFound(f"unknown deletion request {request_id!r}")
    return request


def encode_cursor(request: DeletionRequest) -> str:
    raw = f"{as_utc(request.received_at).isoformat()}|{request.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        received, request_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(received), request_id
    except (ValueError, UnicodeDecodeError) as error:
        raise Invalid("malformed cursor") from error


def list_requests(
    session: Session,
    *,
    state: RequestState | None = None,
    overdue: bool | None = None,
    sample_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[DeletionRequest], str | None]:
    """Newest first, keyset-paginated on (received_at, id)."""
    query = select(DeletionRequest)
    if state is not None:
        query = query.where(DeletionRequest.state == state)
    if sample_id is not None:
        query = query.where(DeletionRequest.sample_id == sample_id)
    if overdue is not None:
        late = and_(
            DeletionRequest.state.in_(OPEN_REQUEST_STATES), DeletionRequest.deadline < utcnow()
        )
        query = query.where(late if overdue else ~late)
    if cursor:
        received, request_id = _decode_cursor(cursor)
        query = query.where(
            or_(
                DeletionRequest.received_at < received,
                and_(DeletionRequest.received_at == received, DeletionRequest.id < request_id),
            )
        )
    rows = list(
        session.scalars(
            query.order_by(DeletionRequest.received_at.desc(), DeletionRequest.id.desc()).limit(
                limit + 1
            )
        )
    )
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def transition_requests(
    session: Session,
    request_ids: Sequence[str],
    expected: RequestState,
    new: RequestState,
    **values: object,
) -> None:
    """Compare-and-set: every request must be in ``expected``, or none moves and this raises."""
    now = utcnow()
    if new is RequestState.completed:
        values.setdefault("completed_at", now)
    changed = affected_rows(
        session.execute(
            update(DeletionRequest)
            .where(DeletionRequest.id.in_(request_ids), DeletionRequest.state == expected)
            .values(state=new, updated_at=now, **values)
            .execution_options(synchronize_session=False)
        )
    )
    if changed != len(set(request_ids)):
        raise StateConflict(
            f"{len(set(request_ids)) - changed} request(s) not {expected.value}; "
            f"none moved to {new.value}"
        )


def attach_certificate(session: Session, request_id: str, certificate: dict[str, object]) -> None:
    """The erasure certificate of a completed request, written once."""
    changed = affected_rows(
        session.execute(
            update(DeletionRequest)
            .where(
                DeletionRequest.id == request_id,
                DeletionRequest.state == RequestState.completed,
                DeletionRequest.certificate.is_(None),
            )
            .values(certificate=certificate, updated_at=utcnow())
            .execution_options(synchronize_session=False)
        )
    )
    if changed != 1:
        raise StateConflict(f"request {request_id} is not completed or already has a certificate")
