"""Deletion requests: file them (one sample or many), read one, list them.

Filing answers with a receipt (the request's identity and state); what became of a request
(its job, error and certificate) is read with status:read, never learnt by filing it again.
"""

from collections.abc import Callable, Coroutine, Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.convertors import Convertor, register_url_convertor

from app.api.deps import (
    API_KEY_HEADER,
    FORGET_WRITE,
    AuditReader,
    ForgetWriter,
    SessionDep,
    SettingsDep,
    StatusReader,
    admit,
    cached_principal,
    intake,
)
from app.api.errors import PROBLEM_RESPONSES, Problem
from app.api.idempotent import (
    IDEMPOTENCY_KEY_HEADER,
    IdempotencyKeyHeader,
    answer_once,
    json_answer,
)
from app.api.jobs import job_summary
from app.artifacts import ObjectStore
from app.certificates import certificate_key
from app.ledger.clock import utcnow
from app.ledger.filing import Filed, UnknownSamples
from app.ledger.requests import RequestView, get_request, list_requests, request_views
from app.ledger.tables import OPEN_REQUEST_STATES, DeletionRequest, RequestState
from app.ratelimit import RateLimiter
from app.schemas import (
    ForgetBody,
    ForgetManyBody,
    ForgetManyOut,
    ForgetReceipt,
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


def receipt_out(filed: Filed) -> ForgetReceipt:
    receipt = filed.request
    return ForgetReceipt(
        request_id=receipt.id,
        sample_id=receipt.sample_id,
        state=receipt.state.value,
        received_at=receipt.received_at,
        deadline=receipt.deadline,
        links={"self": f"/forget/requests/{receipt.id}"},
    )


async def _file(
    request: Request, principal: Principal, sample_ids: list[str], note: str | None
) -> list[Filed]:
    """Files the requests; a key that names too many unknown samples (each 404 tells it that a
    sample does not exist) is refused for a while (429)."""
    limiter: RateLimiter = request.app.state.rate_limiter
    refused_for = limiter.probing(principal.key_id)
    if refused_for:
        raise _probing(refused_for)
    settings: Settings = request.app.state.settings
    try:
        return await intake(request).file(
            sample_ids,
            actor=principal.actor,
            note=note,
            deadline_days=settings.deletion_deadline_days,
        )
    except UnknownSamples as unknown:
        refused_for = await limiter.count_unknown_samples(principal.key_id, len(unknown.sample_ids))
        if refused_for:
            raise _probing(refused_for) from unknown
        raise


def _probing(retry_after: int) -> Problem:
    return Problem(
        429,
        f"this API key named too many unknown samples; retry in {retry_after} s",
        {"Retry-After": str(retry_after)},
    )


async def forget_sample(
    sample_id: Annotated[str, Path(description="The sample's stable ID")],
    request: Request,
    principal: ForgetWriter,
    idempotency_key: IdempotencyKeyHeader = None,
    body: ForgetBody | None = None,
) -> Response:
    """Records a deletion request durably before answering 202; a repeat answers 200 with it.
    The answer is the request's identity and state; its job and certificate need status:read."""
    validate_sample_id(sample_id)
    note = body.note if body else None

    async def produce() -> tuple[int, BaseModel]:
        (filed,) = await _file(request, principal, [sample_id], note)
        return (202 if filed.created else 200), receipt_out(filed)

    return await answer_once(
        request,
        principal,
        idempotency_key,
        {"sample_id": sample_id, "note": note},
        produce,
        ForgetReceipt,
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
                    await admit(request, principal)
                    sample_id = validate_sample_id(request.path_params["sample_id"])
                    (filed,) = await _file(request, principal, [sample_id], None)
                    return json_answer(receipt_out(filed), 202 if filed.created else 200)
            return await solve_and_run(request)  # the body read above is kept for it

        return handler


router.add_api_route(
    "/{sample_id:sample_id}",
    forget_sample,
    methods=["POST"],
    status_code=202,
    response_model=ForgetReceipt,
    responses={200: {"model": ForgetReceipt, "description": "The sample's existing request"}},
    route_class_override=_ForgetSampleRoute,
)


@router.post(
    "",
    status_code=202,
    response_model=ForgetManyOut,
    responses={200: {"model": ForgetManyOut, "description": "Every sample already had one"}},
)
async def forget_samples(
    body: ForgetManyBody,
    request: Request,
    settings: SettingsDep,
    principal: ForgetWriter,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """One data subject, many samples: all are recorded, or none (an unknown ID fails all)."""
    if len(body.sample_ids) > settings.batch_max_sample_ids:
        raise Problem(
            413,
            f"at most {settings.batch_max_sample_ids} sample IDs per call, "
            f"got {len(body.sample_ids)}",
        )
    for sample_id in body.sample_ids:
        validate_sample_id(sample_id)

    async def produce() -> tuple[int, BaseModel]:
        filed = await _file(request, principal, body.sample_ids, body.note)
        created = sum(f.created for f in filed)
        out = ForgetManyOut(requests=[receipt_out(f) for f in filed], created=created)
        return (202 if created else 200), out

    return await answer_once(request, principal, idempotency_key, body, produce, ForgetManyOut)


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
