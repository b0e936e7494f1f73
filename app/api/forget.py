"""Deletion requests: file them (one sample or many), read one, list them."""

import asyncio
import contextvars
import hashlib
import json
from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.convertors import Convertor, register_url_convertor

from app.api.deps import (
    API_KEY_HEADER,
    FORGET_WRITE,
    AuditReader,
    ForgetWriter,
    SessionDep,
    SettingsDep,
    StatusReader,
    cached_principal,
    statement_pool,
)
from app.api.errors import PROBLEM_RESPONSES, Problem
from app.api.jobs import job_summary
from app.artifacts import ObjectStore
from app.certificates import certificate_key
from app.ledger import idempotency
from app.ledger.clock import utcnow
from app.ledger.db import open_session
from app.ledger.requests import (
    Filed,
    RequestView,
    file_request,
    file_request_in_one_statement,
    file_requests,
    get_request,
    list_requests,
    request_views,
)
from app.ledger.tables import OPEN_REQUEST_STATES, DeletionRequest, RequestState
from app.schemas import (
    ForgetBody,
    ForgetManyBody,
    ForgetManyOut,
    ForgetRequestOut,
    RequestPage,
    VerificationOut,
)
from app.security import Principal
from app.settings import Settings
from app.verification import verify_erasure

router = APIRouter(prefix="/forget", tags=["forget"], responses=PROBLEM_RESPONSES)


class AnySampleId(Convertor[str]):
    """Matches everything, newlines included, so that a bad ID reaches validation (422)."""

    regex = "(?s:.+)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("sample_id", AnySampleId())

IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=IDEMPOTENCY_KEY_HEADER,
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


def request_out(view: RequestView, now: datetime) -> ForgetRequestOut:
    links = {"self": f"/forget/requests/{view.id}"}
    if view.completed_in_version:
        links["audit"] = f"/audit/{view.completed_in_version}"
    if view.certificate is not None:
        links["certificate"] = f"/forget/requests/{view.id}/certificate"
    job = view.job
    return ForgetRequestOut(
        request_id=view.id,
        sample_id=view.sample_id,
        state=view.state.value,
        received_at=view.received_at,
        deadline=view.deadline,
        updated_at=view.updated_at,
        completed_at=view.completed_at,
        overdue=view.state in OPEN_REQUEST_STATES and view.deadline < now,
        job=job_summary(job) if job else None,
        completed_in_version=view.completed_in_version,
        error=view.error,
        certificate=view.certificate,
        links=links,
    )


def present(session: Session, requests: Sequence[DeletionRequest]) -> list[ForgetRequestOut]:
    now = utcnow()
    return [request_out(view, now) for view in request_views(session, requests)]


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


async def _file_one(
    request: Request, sample_id: str, principal: Principal, note: str | None
) -> Response:
    """Files (or finds) the sample's request; the answer is serialised once, with no
    response-model validation after it. On PostgreSQL one statement awaited on the event loop;
    elsewhere (SQLite) file_requests on a thread."""
    state = request.app.state
    settings: Settings = state.settings
    statements = statement_pool(request)
    if statements is not None:
        filed = await file_request_in_one_statement(
            statements,
            sample_id,
            actor=principal.actor,
            note=note,
            deadline_days=settings.deletion_deadline_days,
        )
    else:
        call = partial(
            file_request,
            state.engine,
            sample_id,
            actor=principal.actor,
            note=note,
            deadline_days=settings.deletion_deadline_days,
        )
        filed = await asyncio.get_running_loop().run_in_executor(
            None, contextvars.copy_context().run, call
        )
    return Response(
        request_out(filed.request, utcnow()).model_dump_json(),
        status_code=202 if filed.created else 200,
        media_type="application/json",
    )


async def forget_sample(
    sample_id: Annotated[str, Path(description="The sample's stable ID")],
    request: Request,
    principal: ForgetWriter,
    idempotency_key: IdempotencyKeyHeader = None,
    body: ForgetBody | None = None,
) -> Response:
    """Records a deletion request durably before answering 202; a repeat answers 200 with it."""
    validate_sample_id(sample_id)
    note = body.note if body else None
    if idempotency_key is None:
        return await _file_one(request, sample_id, principal, note)
    state = request.app.state
    return await run_in_threadpool(
        _forget_sample_once,
        state.engine,
        state.settings,
        principal,
        request,
        idempotency_key,
        sample_id,
        note,
    )


def _forget_sample_once(
    engine: Engine,
    settings: Settings,
    principal: Principal,
    request: Request,
    idempotency_key: str,
    sample_id: str,
    note: str | None,
) -> Response:
    """POST /forget/{sample_id} with an Idempotency-Key: in a thread, with its own session."""
    with open_session(engine) as session:

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


class _ForgetSampleRoute(APIRoute):
    """POST /forget/{sample_id}, the busiest call, in its plainest form answered without
    FastAPI's dependency solving (a third of the call's CPU): no body, no Idempotency-Key, and
    an X-API-Key whose verdict is cached and grants forget:write. Anything else (a body, a key,
    a key to look up or to refuse) goes to forget_sample itself, so validation, documentation
    and errors are FastAPI's; the checks made here are the ones forget_sample makes.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        solve_and_run = super().get_route_handler()

        async def handler(request: Request) -> Response:
            headers = request.headers
            key = headers.get(API_KEY_HEADER)
            if key and IDEMPOTENCY_KEY_HEADER not in headers and not await request.body():
                principal = cached_principal(request, key, FORGET_WRITE)
                if principal is not None:
                    sample_id = validate_sample_id(request.path_params["sample_id"])
                    return await _file_one(request, sample_id, principal, None)
            return await solve_and_run(request)  # the body read above is kept for it

        return handler


router.add_api_route(
    "/{sample_id:sample_id}",
    forget_sample,
    methods=["POST"],
    status_code=202,
    response_model=ForgetRequestOut,
    responses={200: {"model": ForgetRequestOut, "description": "The sample's existing request"}},
    route_class_override=_ForgetSampleRoute,
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


@router.get("/requests/{request_id}/verification", response_model=VerificationOut)
def verify_request_erasure(
    request_id: Annotated[str, Path(max_length=64)],
    session: SessionDep,
    settings: SettingsDep,
    _p: AuditReader,
) -> VerificationOut:
    """The certificate re-checked against the store now (`lethe verify-erasure`): its signature,
    every object it lists gone, nothing derived from the sample left. 409 before it exists."""
    result = verify_erasure(
        session,
        ObjectStore(settings.resolved_store_url),
        request_id,
        certificate_key(settings.resolved_certificate_key_file),
    )
    return VerificationOut.model_validate(result, from_attributes=True)


@router.get("/requests/{request_id}/certificate")
def read_certificate(
    request_id: Annotated[str, Path(max_length=64)], session: SessionDep, _p: StatusReader
) -> dict[str, Any]:
    """The erasure certificate, once the request is completed."""
    certificate = get_request(session, request_id).certificate
    if certificate is None:
        raise Problem(404, f"request {request_id} has no certificate yet")
    return certificate
