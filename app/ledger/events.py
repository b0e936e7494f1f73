"""The append-only audit trail: every mutation writes one event in its own transaction."""

from typing import Any

from sqlalchemy.orm import Session

from app.ledger.tables import AuditEvent


def record_event(
    session: Session,
    *,
    actor: str,
    action: str,
    target: str,
    outcome: str = "ok",
    details: dict[str, Any] | None = None,
) -> None:
    session.add(
        AuditEvent(
            actor=actor, action=action, target=target, outcome=outcome, details=details or {}
        )
    )
