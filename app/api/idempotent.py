"""Idempotency-Key (IETF draft semantics) for the calls that record something: the same key and
body replay the first answer, another body is refused (422), a retry while the first is still
being handled conflicts (409). Answers that recorded nothing release the key."""

import hashlib
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Any

from fastapi import Header, Request, Response
from fastapi.encoders import jsonable_encoder
from pydantic import BaseModel
from sqlalchemy import Engine
from starlette.concurrency import run_in_threadpool

from app.ledger import idempotency
from app.ledger.db import open_session
from app.security import Principal
from app.settings import Settings

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


def json_answer(model: BaseModel, status: int, headers: dict[str, str] | None = None) -> Response:
    # Serialised once, with no response-model validation after it.
    return Response(
        model.model_dump_json(), status_code=status, headers=headers, media_type="application/json"
    )


def _request_hash(request: Request, body: Any) -> str:
    canonical = json.dumps(jsonable_encoder(body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{request.method} {request.url.path} {canonical}".encode()).hexdigest()


def _in_session(engine: Engine, operation: Callable[..., Any], **arguments: Any) -> Any:
    with open_session(engine) as session:
        return operation(session, **arguments)


async def answer_once(
    request: Request,
    principal: Principal,
    idempotency_key: str | None,
    body: Any,
    produce: Callable[[], Awaitable[tuple[int, BaseModel]]],
    answer: type[BaseModel],
) -> Response:
    """Runs ``produce`` at most once per Idempotency-Key; replays its answer afterwards, as
    ``answer`` (so that a replay never says more than the call answers today)."""
    if idempotency_key is None:
        status, out = await produce()
        return json_answer(out, status)
    engine: Engine = request.app.state.engine
    settings: Settings = request.app.state.settings
    claim = {"api_key_id": principal.key_id, "key": idempotency_key}
    stored = await run_in_threadpool(
        _in_session,
        engine,
        idempotency.begin,
        **claim,
        request_hash=_request_hash(request, body),
        ttl=timedelta(hours=settings.idempotency_key_ttl_hours),
        stale_after=timedelta(seconds=settings.idempotency_stale_seconds),
    )
    if stored is not None:
        replay = answer.model_validate(stored.body)
        return json_answer(replay, stored.status_code, {"Idempotent-Replayed": "true"})
    try:
        status, out = await produce()
    except BaseException:
        await run_in_threadpool(_in_session, engine, idempotency.release, **claim)
        raise
    await run_in_threadpool(
        _in_session,
        engine,
        idempotency.complete,
        **claim,
        status_code=status,
        body=out.model_dump(mode="json"),
    )
    return json_answer(out, status)
