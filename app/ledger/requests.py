"""Deletion requests: read, list, transition (filing them is app.ledger.filing)."""

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app.ledger.clock import as_utc, utcnow
from app.ledger.db import affected_rows
from app.ledger.errors import Invalid, NotFound, StateConflict
from app.ledger.tables import (
    OPEN_REQUEST_STATES,
    DeletionRequest,
    Job,
    RequestState,
)
from app.ledger.versions import version_names


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
