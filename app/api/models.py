"""Model versions, their lineage, the serving alias and the operator's overrides."""

from typing import Annotated

from fastapi import APIRouter, Path, Query
from sqlalchemy.orm import Session

from app.api.deps import ModelsAdmin, SessionDep, StatusReader
from app.api.errors import PROBLEM_RESPONSES, Problem
from app.ledger.clock import as_utc
from app.ledger.erasure import purged_rows
from app.ledger.provenance import lineage
from app.ledger.tables import ModelVersion
from app.ledger.versions import (
    alias_history,
    alias_target,
    get_version,
    list_versions,
    promote,
    retire,
    version_names,
)
from app.schemas import (
    AliasMove,
    ModelPage,
    ModelVersionDetail,
    ModelVersionOut,
    OperatorDecision,
    ServingOut,
)

router = APIRouter(prefix="/models", tags=["models"], responses=PROBLEM_RESPONSES)
VersionName = Annotated[str, Path(pattern=r"^v[0-9]{1,9}$", description="e.g. v3")]


def present(session: Session, version: ModelVersion) -> ModelVersionOut:
    parent = version_names(session, {version.parent_id}) if version.parent_id else {}
    links = {"self": f"/models/{version.version}", "audit": f"/audit/{version.version}"}
    if version.weights_purged_at is not None and version.weights_key is not None:
        purges = purged_rows(session, keys=[version.weights_key])
        if purges and purges[0].request_ids:  # the erasure that purged them, by its first request
            links["purged_by"] = f"/forget/requests/{purges[0].request_ids[0]}/certificate"
    return ModelVersionOut(
        version=version.version,
        parent=parent.get(version.parent_id) if version.parent_id else None,
        run_id=version.run_id,
        method=version.method,
        state=version.state.value,
        weights_sha256=version.weights_sha256,
        weights_purged=version.weights_purged_at is not None,
        details=version.details,
        created_at=as_utc(version.created_at),
        promoted_at=as_utc(version.promoted_at) if version.promoted_at else None,
        links=links,
    )


@router.get("", response_model=ModelPage)
def list_models(
    session: SessionDep,
    _p: StatusReader,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,12}$")] = None,
) -> ModelPage:
    rows = list_versions(session, limit=limit + 1, after_id=int(cursor) if cursor else None)
    next_cursor = str(rows[limit - 1].id) if len(rows) > limit else None
    return ModelPage(items=[present(session, v) for v in rows[:limit]], next_cursor=next_cursor)


@router.get("/serving", response_model=ServingOut)
def serving(session: SessionDep, _p: StatusReader) -> ServingOut:
    current = alias_target(session)
    history = alias_history(session)
    names = version_names(session, {h.version_id for h in history})
    return ServingOut(
        version=present(session, current) if current else None,
        history=[
            AliasMove(
                version=names[h.version_id],
                started_at=as_utc(h.started_at),
                ended_at=as_utc(h.ended_at) if h.ended_at else None,
                moved_by=h.moved_by,
                reason=h.reason,
            )
            for h in history
        ],
    )


@router.get("/{version}", response_model=ModelVersionDetail)
def read_model(version: VersionName, session: SessionDep, _p: StatusReader) -> ModelVersionDetail:
    found = get_version(session, version)
    chain = [v.version for v in lineage(session, found.id)]
    return ModelVersionDetail(**present(session, found).model_dump(), lineage=chain)


@router.post("/{version}/promote", response_model=ModelVersionOut)
def promote_model(
    version: VersionName, body: OperatorDecision, session: SessionDep, principal: ModelsAdmin
) -> ModelVersionOut:
    """Operator override: serve this version now, whatever its audit said. The reason is kept."""
    found = get_version(session, version)
    if found.weights_purged_at is not None:
        raise Problem(409, f"version {version}'s weights were purged; it cannot serve again")
    promote(session, found, moved_by=principal.actor, reason=body.reason)
    session.commit()
    return present(session, found)


@router.post("/{version}/retire", response_model=ModelVersionOut)
def retire_model(
    version: VersionName, body: OperatorDecision, session: SessionDep, principal: ModelsAdmin
) -> ModelVersionOut:
    found = get_version(session, version)
    retire(session, found, moved_by=principal.actor, reason=body.reason)
    session.commit()
    return present(session, found)
