"""API keys: only their SHA-256 is stored; the key itself is shown once, at creation."""

import hashlib
import secrets
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.ledger.clock import utcnow
from app.ledger.errors import Invalid, NotFound
from app.ledger.events import record_event
from app.ledger.tables import ApiKey

SCOPES = ("forget:write", "status:read", "audit:read", "models:admin")
KEY_PREFIX = "lethe_"


def hash_key(key: str) -> str:
    # Keys carry 256 bits of randomness, so a plain hash is not brute-forceable.
    return hashlib.sha256(key.encode()).hexdigest()


def _check_scopes(scopes: Sequence[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise Invalid(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {unknown}")
    return sorted(set(scopes))


def create_key(session: Session, name: str, scopes: Sequence[str], *, actor: str) -> str:
    """Returns the new key; the ledger keeps only its hash."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    register_key(session, name, key, scopes, actor=actor)
    return key


def replace_key(session: Session, name: str, scopes: Sequence[str], *, actor: str) -> str:
    """Revokes every active key of this name and creates its successor: each ``lethe demo``
    run's key replaces the last run's, so that keys with every scope do not pile up."""
    active = select(ApiKey.id).where(ApiKey.name == name, ApiKey.revoked_at.is_(None))
    for key_id in session.scalars(active).all():
        revoke_key(session, key_id, actor=actor)
    return create_key(session, name, scopes, actor=actor)


def register_key(
    session: Session, name: str, key: str, scopes: Sequence[str], *, actor: str
) -> ApiKey:
    """Registers a key the operator chose (the demo's bootstrap key); idempotent."""
    digest = hash_key(key)
    existing = session.scalars(select(ApiKey).where(ApiKey.key_sha256 == digest)).first()
    if existing is not None:
        return existing
    api_key = ApiKey(name=name, prefix=key[:10], key_sha256=digest, scopes=_check_scopes(scopes))
    session.add(api_key)
    session.flush()
    record_event(
        session,
        actor=actor,
        action="keys.create",
        target=f"key:{api_key.id}",
        details={"name": name, "scopes": api_key.scopes},
    )
    return api_key


def find_active_key(session: Session, key: str) -> ApiKey | None:
    return session.scalars(
        select(ApiKey).where(ApiKey.key_sha256 == hash_key(key), ApiKey.revoked_at.is_(None))
    ).first()


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, key_id: int, *, actor: str) -> None:
    api_key = session.get(ApiKey, key_id)
    if api_key is None:
        raise NotFound(f"unknown API key id {key_id}")
    api_key.revoked_at = utcnow()
    record_event(session, actor=actor, action="keys.revoke", target=f"key:{key_id}")
