"""The append-only audit trail: every mutation writes one event, in the transaction of the
mutation it records (the caller commits both or neither)."""

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
