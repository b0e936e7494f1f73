"""The audit report of a model version, as the worker recorded it."""

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse, Response

from app.api.deps import AuditReader, SessionDep, SettingsDep
from app.api.errors import PROBLEM_RESPONSES, Problem
from app.artifacts import read_artifact
from app.ledger.audits import latest_audit
from app.ledger.clock import as_utc
from app.ledger.versions import get_version
from app.schemas import AuditOut

router = APIRouter(prefix="/audit", tags=["audit"], responses=PROBLEM_RESPONSES)


@router.get(
    "/{model_version}",
    response_model=AuditOut,
    responses={202: {"model": AuditOut, "description": "The audit has not finished yet"}},
)
def read_audit(
    model_version: Annotated[str, Path(pattern=r"^v[0-9]{1,9}$")],
    session: SessionDep,
    _p: AuditReader,
) -> JSONResponse:
    version = get_version(session, model_version)
    audit = latest_audit(session, version.id)
    if audit is None or audit.state != "done":
        pending = AuditOut(
            version=model_version,
            state="running" if audit else "pending",
            decision=None,
            thresholds={},
            reasons=[],
            metrics={},
            artifacts={},
            created_at=as_utc(audit.created_at) if audit else None,
            finished_at=None,
        )
        return JSONResponse(pending.model_dump(mode="json"), status_code=202)
    report = AuditOut(
        version=model_version,
        state="done",
        decision=audit.decision,
        thresholds=audit.thresholds,
        reasons=audit.reasons,
        metrics=audit.metrics,
        artifacts={name: f"/audit/{model_version}/artifacts/{name}" for name in audit.artifacts},
        created_at=as_utc(audit.created_at),
        finished_at=as_utc(audit.finished_at) if audit.finished_at else None,
    )
    return JSONResponse(report.model_dump(mode="json"))


@router.get("/{model_version}/artifacts/{name}", response_class=Response)
def read_audit_artifact(
    model_version: Annotated[str, Path(pattern=r"^v[0-9]{1,9}$")],
    name: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,128}$")],
    session: SessionDep,
    settings: SettingsDep,
    _p: AuditReader,
) -> Response:
    """A plot or image of the audit (PNG), or another file the report names."""
    version = get_version(session, model_version)
    audit = latest_audit(session, version.id)
    if audit is None or name not in audit.artifacts:
        raise Problem(404, f"version {model_version}'s audit has no artifact {name!r}")
    content, media_type = read_artifact(settings.resolved_store_url, audit.artifacts[name])
    return Response(content, media_type=media_type)
