"""The audit report of a model version, as the worker recorded it.

The ledger is authoritative for what an erasure purged: a report (and the report.json the worker
stored) may name an artifact that is gone; it is then listed under ``purged_artifacts`` with
the certificates that purged it, and fetching it answers 410 Gone.
"""

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import JSONResponse, Response
from sqlalchemy.orm import Session

from app.api.deps import AuditReader, SessionDep, SettingsDep
from app.api.errors import PROBLEM_RESPONSES, Problem
from app.artifacts import read_artifact
from app.ledger.audits import DONE, NOT_AUDITED, audit_state
from app.ledger.clock import as_utc
from app.ledger.erasure import purged_rows
from app.ledger.tables import Audit, PurgedArtifact
from app.ledger.versions import get_version
from app.schemas import AuditOut, ProblemDetail, PurgedArtifactOut

router = APIRouter(prefix="/audit", tags=["audit"], responses=PROBLEM_RESPONSES)
VersionName = Annotated[str, Path(pattern=r"^v[0-9]{1,9}$")]


def certificate_links(row: PurgedArtifact) -> list[str]:
    return [f"/forget/requests/{request_id}/certificate" for request_id in row.request_ids]


def purged_artifacts(session: Session, audit: Audit) -> dict[str, PurgedArtifactOut]:
    """The audit's artifacts an erasure purged, by name."""
    rows = {
        row.key: PurgedArtifactOut(
            key=row.key, purged_at=as_utc(row.purged_at), certificates=certificate_links(row)
        )
        for row in purged_rows(session, keys=list(audit.artifacts.values()))
        if row.purged_at is not None
    }
    return {name: rows[key] for name, key in audit.artifacts.items() if key in rows}


@router.get(
    "/{model_version}",
    response_model=AuditOut,
    responses={202: {"model": AuditOut, "description": "The audit is pending or running"}},
)
def read_audit(model_version: VersionName, session: SessionDep, _p: AuditReader) -> JSONResponse:
    """The report; 202 only while a job will audit the version or is auditing it, and 200 with
    ``state: not-audited`` and the reason when none will."""
    version = get_version(session, model_version)
    status = audit_state(session, version)
    audit = status.audit
    if audit is None or status.state != DONE:
        unfinished = AuditOut(
            version=model_version,
            state=status.state,
            reason=status.reason,
            decision=None,
            thresholds={},
            reasons=[],
            metrics={},
            artifacts={},
            created_at=as_utc(audit.created_at) if audit else None,
            finished_at=None,
        )
        code = 200 if status.state == NOT_AUDITED else 202
        return JSONResponse(unfinished.model_dump(mode="json"), status_code=code)
    purged = purged_artifacts(session, audit)
    report = AuditOut(
        version=model_version,
        state="done",
        decision=audit.decision,
        thresholds=audit.thresholds,
        reasons=audit.reasons,
        metrics=audit.metrics,
        artifacts={
            name: f"/audit/{model_version}/artifacts/{name}"
            for name in audit.artifacts
            if name not in purged
        },
        purged_artifacts=purged,
        created_at=as_utc(audit.created_at),
        finished_at=as_utc(audit.finished_at) if audit.finished_at else None,
    )
    return JSONResponse(report.model_dump(mode="json"))


@router.get(
    "/{model_version}/artifacts/{name}",
    response_class=Response,
    responses={410: {"model": ProblemDetail, "description": "An erasure purged it"}},
)
def read_audit_artifact(
    model_version: VersionName,
    name: Annotated[str, Path(pattern=r"^[A-Za-z0-9_.-]{1,128}$")],
    session: SessionDep,
    settings: SettingsDep,
    _p: AuditReader,
) -> Response:
    """A plot or image of the audit (PNG), or another file the report names."""
    version = get_version(session, model_version)
    status = audit_state(session, version)
    audit = status.audit
    if audit is None or name not in audit.artifacts:
        raise Problem(404, f"version {model_version}'s audit has no artifact {name!r}")
    purged = purged_artifacts(session, audit).get(name)
    if purged is not None:
        raise Problem(
            410,
            f"{name} was purged by an erasure (it derived from erased samples); "
            "see the certificates",
            certificates=purged.certificates,
        )
    content, media_type = read_artifact(settings.resolved_store_url, audit.artifacts[name])
    return Response(content, media_type=media_type)
