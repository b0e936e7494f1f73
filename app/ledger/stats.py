"""Figures for dashboards: counts by state, time to erasure, the oldest open request, overdue."""

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.ledger.clock import as_utc, utcnow
from app.ledger.tables import (
    OPEN_REQUEST_STATES,
    Audit,
    DeletionRequest,
    Job,
    JobState,
    ModelVersion,
    RequestState,
)


@dataclass(frozen=True)
class LedgerStats:
    requests_by_state: dict[str, int]
    jobs_by_state: dict[str, int]
    versions_by_state: dict[str, int]
    time_to_erasure_p50_s: float | None
    time_to_erasure_p95_s: float | None
    oldest_open_received_at: datetime | None
    overdue: int


def _counts(session: Session, column: object) -> dict[str, int]:
    rows = session.execute(select(column, func.count()).group_by(column))  # type: ignore[call-overload]
    return {state.value: count for state, count in rows}


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def ledger_stats(session: Session) -> LedgerStats:
    completed = session.execute(
        select(DeletionRequest.received_at, DeletionRequest.completed_at).where(
            DeletionRequest.state == RequestState.completed,
            DeletionRequest.completed_at.is_not(None),
        )
    )
    durations = sorted(
        (as_utc(done) - as_utc(received)).total_seconds()
        for received, done in completed
        if done is not None
    )
    open_filter = DeletionRequest.state.in_(OPEN_REQUEST_STATES)
    oldest = session.scalar(select(func.min(DeletionRequest.received_at)).where(open_filter))
    overdue = session.scalar(
        select(func.count()).where(open_filter, DeletionRequest.deadline < utcnow())
    )
    return LedgerStats(
        requests_by_state=_counts(session, DeletionRequest.state),
        jobs_by_state=_counts(session, Job.state),
        versions_by_state=_counts(session, ModelVersion.state),
        time_to_erasure_p50_s=_percentile(durations, 0.50),
        time_to_erasure_p95_s=_percentile(durations, 0.95),
        oldest_open_received_at=as_utc(oldest) if oldest is not None else None,
        overdue=overdue or 0,
    )


def audit_decisions(session: Session) -> dict[str, int]:
    """Finished audits by gate decision (e.g. pass, fail)."""
    rows = session.execute(
        select(Audit.decision, func.count()).where(Audit.state == "done").group_by(Audit.decision)
    )
    return {decision or "none": count for decision, count in rows}


def held_jobs_by_stage(session: Session) -> dict[str, int]:
    """Jobs waiting for an operator, by the stage that held them (screening, promotion)."""
    rows = session.execute(
        select(Job.hold_stage, func.count())
        .where(Job.state == JobState.held)
        .group_by(Job.hold_stage)
    )
    return {stage.value: count for stage, count in rows if stage is not None}
