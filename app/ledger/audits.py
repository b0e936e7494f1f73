"""Audit reports of model versions, as the worker records them."""

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.ledger.clock import utcnow
from app.ledger.errors import NotFound, StateConflict
from app.ledger.tables import Audit, Job, JobState, ModelVersion

RUNNING: Literal["running"] = "running"
DONE: Literal["done"] = "done"


def latest_audit(session: Session, version_id: int) -> Audit | None:
    return session.scalars(
        select(Audit).where(Audit.version_id == version_id).order_by(Audit.id.desc()).limit(1)
    ).first()


@dataclass(frozen=True)
class AuditState:
    """Where a version's audit stands: ``done``, ``running`` (a job audits it now),
    ``pending`` (a queued or running job will) or ``not-audited`` (nothing will), with why."""

    state: "StateName"
    audit: Audit | None
    reason: str | None = None


StateName = Literal["pending", "running", "done", "not-audited"]
NOT_AUDITED: StateName = "not-audited"
_LIVE_JOB = (JobState.queued, JobState.running)


def audit_state(session: Session, version: ModelVersion) -> AuditState:
    audit = latest_audit(session, version.id)
    if audit is not None and audit.state == DONE:
        return AuditState(DONE, audit)
    if audit is not None:
        job = session.get(Job, audit.job_id) if audit.job_id else None
        if job is None or job.state in _LIVE_JOB:
            return AuditState(RUNNING, audit)
        return AuditState(
            NOT_AUDITED,
            audit,
            f"its audit stopped unfinished: job {job.id} ended {job.state.value}",
        )
    job = session.get(Job, version.job_id) if version.job_id else None
    if job is not None and job.state in _LIVE_JOB:
        return AuditState("pending", None, f"job {job.id} ({job.state.value}) will audit it")
    if job is None:
        reason = "no audit was recorded for it and no job will audit it (made outside a job)"
    else:
        reason = f"no audit was recorded for it and its job {job.id} ended {job.state.value}"
    return AuditState(NOT_AUDITED, None, reason)


def measured_test_accuracy(session: Session, version: ModelVersion) -> float | None:
    """The version's test accuracy as last measured: by its training, or by its latest audit
    (as the candidate); None when neither measured it."""
    trained = version.details.get("test_accuracy")
    if trained is not None:
        return float(trained)
    audit = latest_audit(session, version.id)
    measured = audit.metrics.get("utility", {}).get("test", {}).get("candidate") if audit else None
    return None if measured is None else float(measured)


def finished_audits_of_method(
    session: Session, method: str, limit: int = 20
) -> list[tuple[ModelVersion, Audit]]:
    """The newest finished audits of versions that ``method`` made, with their versions."""
    rows = session.execute(
        select(ModelVersion, Audit)
        .join(Audit, Audit.version_id == ModelVersion.id)
        .where(ModelVersion.method == method, Audit.state == DONE)
        .order_by(Audit.id.desc())
        .limit(limit)
    )
    return [(version, audit) for version, audit in rows]


def create_audit(session: Session, version_id: int, job_id: int | None = None) -> Audit:
    """A running audit: ``GET /audit/{version}`` answers 202 until it is finished."""
    audit = Audit(version_id=version_id, job_id=job_id, state=RUNNING)
    session.add(audit)
    session.flush()
    return audit


def finish_audit(
    session: Session,
    audit_id: int,
    *,
    metrics: dict[str, Any],
    decision: str,
    thresholds: dict[str, Any],
    reasons: list[Any],
    artifacts: dict[str, str],
    report_key: str,
) -> Audit:
    """Records the figures and the gate decision; an audit is finished once."""
    audit = session.get(Audit, audit_id)
    if audit is None:
        raise NotFound(f"unknown audit {audit_id}")
    if audit.state != RUNNING:
        raise StateConflict(f"audit {audit_id} is already {audit.state}")
    audit.metrics, audit.decision, audit.thresholds = metrics, decision, thresholds
    audit.reasons, audit.artifacts, audit.report_key = reasons, artifacts, report_key
    audit.state, audit.finished_at = DONE, utcnow()
    session.flush()
    return audit
