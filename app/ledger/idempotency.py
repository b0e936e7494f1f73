"""Idempotency keys (IETF draft semantics): same key and body replay the first answer, another
body is refused (422), a retry while the first is still being handled conflicts (409)."""

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.ledger.clock import as_utc, utcnow
from app.ledger.errors import Invalid, StateConflict
from app.ledger.tables import IdempotencyKey


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    body: dict[str, Any]


def begin(
    session: Session,
    *,
    api_key_id: int,
    key: str,
    request_hash: str,
    ttl: timedelta,
    stale_after: timedelta,
) -> StoredResponse | None:
    """Claims the key (committed) and returns None, or returns the stored answer to replay."""
    now = utcnow()
    row = _find(session, api_key_id, key)
    if row is not None:
        expired = as_utc(row.created_at) < now - ttl
        abandoned = row.completed_at is None and as_utc(row.created_at) < now - stale_after
        if not (expired or abandoned):
            return _answer_for(row, request_hash)
        session.delete(row)
        session.flush()
    session.add(IdempotencyKey(api_key_id=api_key_id, key=key, request_hash=request_hash))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()  # a concurrent request claimed it between our read and our insert
        row = _find(session, api_key_id, key)
        if row is None:
            raise StateConflict("idempotency key is being reused concurrently") from None
        return _answer_for(row, request_hash)
    return None


def _answer_for(row: IdempotencyKey, request_hash: str) -> StoredResponse:
    if row.request_hash != request_hash:
        raise Invalid("Idempotency-Key was already used with a different request")
    if row.completed_at is None or row.status_code is None or row.response_body is None:
        raise StateConflict("a request with this Idempotency-Key is still being processed")
    return StoredResponse(row.status_code, row.response_body)


def _find(session: Session, api_key_id: int, key: str) -> IdempotencyKey | None:
    return session.scalars(
        select(IdempotencyKey).where(
            IdempotencyKey.api_key_id == api_key_id, IdempotencyKey.key == key
        )
    ).first()


def complete(
    session: Session, *, api_key_id: int, key: str, status_code: int, body: dict[str, Any]
) -> None:
    row = _find(session, api_key_id, key)
    if row is not None:
        row.status_code = status_code
        row.response_body = body
        row.completed_at = utcnow()
        session.commit()


def release(session: Session, *, api_key_id: int, key: str) -> None:
    """Forgets a claim whose request failed in a retryable way (e.g. the database went away)."""
    session.execute(
        delete(IdempotencyKey).where(
            IdempotencyKey.api_key_id == api_key_id,
            IdempotencyKey.key == key,
            IdempotencyKey.completed_at.is_(None),
        )
    )
    session.commit()
