"""Deletion requests: file them (one sample or many), read one, list them."""

import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session
from starlette.convertors import Convertor, register_url_convertor

from app.api.deps import ForgetWriter, SessionDep, SettingsDep, StatusReader
from app.api.errors import PROBLEM_RESPONSES, Problem
from app.ledger import idempotency
from app.ledger.clock import as_utc, utcnow
from app.ledger.jobs import jobs_by_id
from app.ledger.requests import Filed, file_requests, get_request, list_requests
from app.ledger.tables import OPEN_REQUEST_STATES, DeletionRequest, RequestState
from app.ledger.versions import version_names
from app.schemas import (
    ForgetBody,
    ForgetManyBody,
    ForgetManyOut,
    ForgetRequestOut,
    JobSummary,
    RequestPage,
)
from app.security import Principal
from app.settings import Settings

router = APIRouter(prefix="/forget", tags=["forget"], responses=PROBLEM_RESPONSES)


class AnySampleId(Convertor[str]):
    """Matches everything, newlines included, so that a bad ID reaches validation (422)."""

    regex = "(?s:.+)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("sample_id", AnySampleId())

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Same key and body replay the first answer; another body gets 422",
    ),
]


def validate_sample_id(sample_id: str) -> str:
    """1 to 128 printable characters, no path separators or control characters."""
    if not 1 <= len(sample_id) <= 128:
        raise Problem(422, f"sample_id must be 1 to 128 characters, got {len(sample_id)}")
    if "/" in sample_id or "\\" in sample_id:
        raise Problem(422, "sample_id must not contain a path separator ('/' or '\\')")
    if not sample_id.isprintable():
        raise Problem(422, "sample_id must contain only printable characters")
    return sample_id


def present(session: Session, requests: Sequence[DeletionRequest]) -> list[ForgetRequestOut]:
    jobs = jobs_by_id(session, {r.job_id for r in requests if r.job_id is not None})
    versions = version_names(
        session, {r.completed_version_id for r in requests if r.completed_version_id is not None}
    )
    now = utcnow()
    out = []
    for r in requests:
        job = jobs.get(r.job_id) if r.job_id is not None else None
        links = {"self": f"/forget/requests/{r.id}"}
        version = versions.get(r.completed_version_id) if r.completed_version_id else None
        if version:
            links["audit"] = f"/audit/{version}"
        if r.certificate is not None:
            links["certificate"] = f"/forget/requests/{r.id}/certificate"
        out.append(
            ForgetRequestOut(
                request_id=r.id,
                sample_id=r.sample_id,
                state=r.state.value,
                received_at=as_utc(r.received_at),
                deadline=as_utc(r.deadline),
                updated_at=as_utc(r.updated_at),
                completed_at=as_utc(r.completed_at) if r.completed_at else None,
                overdue=r.state in OPEN_REQUEST_STATES and as_utc(r.deadline) < now,
                job=(
                    JobSummary(
                        id=job.id,
                        kind=job.kind.value,
                        state=job.state.value,
                        progress=job.progress,
                        attempts=job.attempts,
                        method=job.method,
                        error=job.error,
                    )
                    if job
                    else None
                ),
                completed_in_version=version,
                error=r.error,
                certificate=r.certificate,
                links=links,
            )
        )
    return out


def _request_hash(request: Request, body: Any) -> str:
    canonical = json.dumps(jsonable_encoder(body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{request.method} {request.url.path} {canonical}".encode()).hexdigest()


def _answer_once(
    *,
    session: Session,
    settings: Settings,
    principal: Principal,
    request: Request,
    idempotency_key: str | None,
    body: Any,
    produce: Callable[[], tuple[int, dict[str, Any]]],
) -> JSONResponse:
    """Runs ``produce`` at most once per Idempotency-Key; replays its answer afterwards."""
    if idempotency_key is None:
        status, payload = produce()
        return JSONResponse(payload, status_code=status)
    stored = idempotency.begin(
        session,
        api_key_id=principal.key_id,
        key=idempotency_key,
        request_hash=_request_hash(request, body),
        ttl=timedelta(hours=settings.idempotency_key_ttl_hours),
        stale_after=timedelta(seconds=settings.idempotency_stale_seconds),
    )
    if stored is not None:
        return JSONResponse(
            stored.body, status_code=stored.status_code, headers={"Idempotent-Replayed": "true"}
        )
    try:
        status, payload = produce()
    except BaseException:
        session.rollback()
        idempotency.release(session, api_key_id=principal.key_id, key=idempotency_key)
        raise
    idempotency.complete(
        session, api_key_id=principal.key_id, key=idempotency_key, status_code=status, body=payload
    )
    return JSONResponse(payload, status_code=status)


def _file(
    session: Session,
    settings: Settings,
    principal: Principal,
    sample_ids: list[str],
    note: str | None,
) -> list[Filed]:
    return file_requests(
        session,
        sample_ids,
        actor=principal.actor,
        note=note,
        deadline_days=settings.deletion_deadline_days,
    )


@router.post(
    "/{sample_id:sample_id}",
    status_code=202,
    response_model=ForgetRequestOut,
    responses={200: {"model": ForgetRequestOut, "description": "The sample's existing request"}},
)
def forget_sample(
    sample_id: Annotated[str, Path(description="The sample's stable ID")],
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: ForgetWriter,
    idempotency_key: IdempotencyKeyHeader = None,
    body: ForgetBody | None = None,
) -> Response:
    """Records a deletion request durably before answering 202; a repeat answers 200 with it."""
    validate_sample_id(sample_id)
    note = body.note if body else None

    def produce() -> tuple[int, dict[str, Any]]:
        (filed,) = _file(session, settings, principal, [sample_id], note)
        (out,) = present(session, [filed.request])
        return (202 if filed.created else 200), out.model_dump(mode="json")

    return _answer_once(
        session=session,
        settings=settings,
        principal=principal,
        request=request,
        idempotency_key=idempotency_key,
        body={"sample_id": sample_id, "note": note},
        produce=produce,
    )


@router.post(
    "",
    status_code=202,
    response_model=ForgetManyOut,
    responses={200: {"model": ForgetManyOut, "description": "Every sample already had one"}},
)
def forget_samples(
    body: ForgetManyBody,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    principal: ForgetWriter,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """One data subject, many samples: all are recorded, or none (an unknown ID fails all)."""
    for sample_id in body.sample_ids:
        validate_sample_id(sample_id)

    def produce() -> tuple[int, dict[str, Any]]:
        filed = _file(session, settings, principal, body.sample_ids, body.note)
        created = sum(f.created for f in filed)
        out = ForgetManyOut(requests=present(session, [f.request for f in filed]), created=created)
        return (202 if created else 200), out.model_dump(mode="json")

    return _answer_once(
        session=session,
        settings=settings,
        principal=principal,
        request=request,
        idempotency_key=idempotency_key,
        body=body,
        produce=produce,
    )


@router.get("/requests", response_model=RequestPage)
def list_forget_requests(
    session: SessionDep,
    settings: SettingsDep,
    _principal: StatusReader,
    state: RequestState | None = None,
    overdue: bool | None = None,
    sample_id: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> RequestPage:
    rows, next_cursor = list_requests(
        session,
        state=state,
        overdue=overdue,
        sample_id=sample_id,
        limit=min(limit, settings.page_size_max),
        cursor=cursor,
    )
    return RequestPage(items=present(session, rows), next_cursor=next_cursor)


@router.get("/requests/{request_id}", response_model=ForgetRequestOut)
def read_forget_request(
    request_id: Annotated[str, Path(max_length=64)], session: SessionDep, _p: StatusReader
) -> ForgetRequestOut:
    (out,) = present(session, [get_request(session, request_id)])
    return out


@router.get("/requests/{request_id}/certificate")
def read_certificate(
    request_id: Annotated[str, Path(max_length=64)], session: SessionDep, _p: StatusReader
) -> dict[str, Any]:
    """The erasure certificate, once the request is completed."""
    certificate = get_request(session, request_id).certificate
    if certificate is None:
        raise Problem(404, f"request {request_id} has no certificate yet")
    return certificate
