"""Model versions, their states, and the aliases that point at them (with append-only history)."""

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.ledger.clock import utcnow
from app.ledger.db import affected_rows
from app.ledger.errors import NotFound, StateConflict
from app.ledger.events import record_event
from app.ledger.tables import AliasHistory, ModelVersion, VersionState

SERVING = "serving"


def next_version_name(session: Session) -> str:
    count = session.scalar(select(func.count()).select_from(ModelVersion)) or 0
    return f"v{count + 1}"


def create_version(
    session: Session,
    *,
    method: str,
    state: VersionState,
    parent_id: int | None = None,
    run_id: int | None = None,
    job_id: int | None = None,
    details: dict[str, Any] | None = None,
) -> ModelVersion:
    version = ModelVersion(
        version=next_version_name(session),
        method=method,
        state=state,
        parent_id=parent_id,
        run_id=run_id,
        job_id=job_id,
        details=details or {},
    )
    session.add(version)
    session.flush()
    return version


def get_version(session: Session, version: str) -> ModelVersion:
    found = session.scalars(select(ModelVersion).where(ModelVersion.version == version)).first()
    if found is None:
        raise NotFound(f"unknown model version {version!r}")
    return found


def list_versions(
    session: Session, *, limit: int = 50, after_id: int | None = None
) -> list[ModelVersion]:
    query = select(ModelVersion).order_by(ModelVersion.id.desc()).limit(limit)
    if after_id is not None:
        query = query.where(ModelVersion.id < after_id)
    return list(session.scalars(query))


def transition_version(
    session: Session, version: ModelVersion, expected: set[VersionState], new: VersionState
) -> None:
    """Compare-and-set on the version's state."""
    changed = affected_rows(
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.id == version.id, ModelVersion.state.in_(expected))
            .values(state=new)
            .execution_options(synchronize_session=False)
        )
    )
    if changed != 1:
        allowed = ", ".join(sorted(s.value for s in expected))
        raise StateConflict(
            f"version {version.version} is {version.state.value}; only {allowed} can become "
            f"{new.value}"
        )
    session.refresh(version)


def alias_target(session: Session, alias: str = SERVING) -> ModelVersion | None:
    row = session.scalars(
        select(AliasHistory).where(AliasHistory.alias == alias, AliasHistory.ended_at.is_(None))
    ).first()
    return session.get(ModelVersion, row.version_id) if row else None


def alias_history(session: Session, alias: str = SERVING, limit: int = 100) -> list[AliasHistory]:
    return list(
        session.scalars(
            select(AliasHistory)
            .where(AliasHistory.alias == alias)
            .order_by(AliasHistory.id.desc())
            .limit(limit)
        )
    )


PROMOTABLE = {VersionState.candidate, VersionState.auditing, VersionState.retired}


def promote(session: Session, version: ModelVersion, *, moved_by: str, reason: str) -> None:
    """Moves the serving alias to ``version``; the version it leaves becomes retired."""
    previous = alias_target(session)
    if previous is not None and previous.id == version.id:
        raise StateConflict(f"version {version.version} is already serving")
    transition_version(session, version, PROMOTABLE, VersionState.serving)
    now = utcnow()
    if previous is not None:
        session.execute(
            update(AliasHistory)
            .where(AliasHistory.alias == SERVING, AliasHistory.ended_at.is_(None))
            .values(ended_at=now)
            .execution_options(synchronize_session=False)
        )
        transition_version(session, previous, {VersionState.serving}, VersionState.retired)
    session.add(
        AliasHistory(
            alias=SERVING, version_id=version.id, started_at=now, moved_by=moved_by, reason=reason
        )
    )
    version.promoted_at = now
    record_event(
        session,
        actor=moved_by,
        action="models.promote",
        target=version.version,
        details={"reason": reason, "previous": previous.version if previous else None},
    )


def retire(session: Session, version: ModelVersion, *, moved_by: str, reason: str) -> None:
    """Takes a version out of consideration. The serving version cannot be retired directly:
    promote another one instead, so that something always serves."""
    if version.state is VersionState.serving:
        raise StateConflict(
            f"version {version.version} is serving; promote another version to replace it"
        )
    transition_version(
        session,
        version,
        {VersionState.candidate, VersionState.auditing, VersionState.rejected},
        VersionState.retired,
    )
    record_event(
        session,
        actor=moved_by,
        action="models.retire",
        target=version.version,
        details={"reason": reason},
    )


def version_names(session: Session, version_ids: set[int]) -> dict[int, str]:
    if not version_ids:
        return {}
    rows = session.execute(
        select(ModelVersion.id, ModelVersion.version).where(ModelVersion.id.in_(version_ids))
    )
    return {version_id: name for version_id, name in rows}


def versions_of_job(session: Session, job_id: int) -> list[ModelVersion]:
    return list(
        session.scalars(
            select(ModelVersion).where(ModelVersion.job_id == job_id).order_by(ModelVersion.id)
        )
    )


def mark_weights_purged(session: Session, version: ModelVersion) -> None:
    """The weights object is gone from the store; the ledger keeps its key and sha256."""
    version.weights_purged_at = utcnow()
    session.flush()
