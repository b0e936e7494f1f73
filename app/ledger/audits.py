"""Audit reports of model versions, as the worker records them."""

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.ledger.clock import utcnow
from app.ledger.errors import NotFound, StateConflict
from app.ledger.tables import Audit, ModelVersion

RUNNING, DONE = "running", "done"


def latest_audit(session: Session, version_id: int) -> Audit | None:
    return session.scalars(
        select(Audit).where(Audit.version_id == version_id).order_by(Audit.id.desc()).limit(1)
    ).first()


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
