"""Deletion requests: create (at most one live request per sample), read, list, transition."""

import base64
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.ledger.clock import as_utc, utcnow
from app.ledger.db import affected_rows
from app.ledger.errors import Invalid, NotFound, StateConflict
from app.ledger.events import record_event
from app.ledger.tables import (
    LIVE_REQUEST_STATES,
    OPEN_REQUEST_STATES,
    DeletionRequest,
    RequestState,
    Sample,
)


@dataclass(frozen=True)
class Filed:
    request: DeletionRequest
    created: bool


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
