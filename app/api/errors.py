"""Every error leaves as application/problem+json (RFC 9457), with a reason a caller can act on."""

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.ledger.errors import Invalid, LedgerError, NotFound, StateConflict
from app.schemas import ProblemDetail
from app.settings import get_settings

PROBLEM_JSON = "application/problem+json"
log = structlog.get_logger()


class Problem(Exception):
    """Raised by routes for an error with a specific status and explanation."""

    def __init__(
        self,
        status: int,
        detail: str,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers
        self.extra = extra  # more members of the problem document


def problem(
    status: int, detail: str, instance: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """An RFC 9457 answer; ``instance`` is the path that was called."""
    body = {
        "type": "about:blank",
        "title": HTTPStatus(status).phrase,
        "status": status,
        "detail": detail,
        "instance": instance,
        **extra,
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def problem_response(
    request: Request,
    status: int,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    return problem(status, detail, request.url.path, headers, **extra)


LEDGER_STATUS: dict[type[LedgerError], int] = {NotFound: 404, StateConflict: 409, Invalid: 422}

# The errors any authenticated resource may answer; its router documents them all at once.
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ProblemDetail, "description": description}
    for status, description in {
        400: "The body could not be parsed (not UTF-8 JSON), or X-API-Key or Idempotency-Key "
        "was sent twice",
        401: "Missing, invalid or revoked X-API-Key",
        403: "The API key lacks the scope this call needs",
        404: "No such resource",
        408: "The body did not arrive in time (LETHE_BODY_TIMEOUT_SECONDS)",
        409: "The resource's state, or a concurrent request, forbids it",
        413: "The body, or the list of sample IDs, is larger than this service accepts",
        422: "Malformed input; `errors` names each invalid field",
        429: "A rate limit was reached; retry after Retry-After seconds",
        503: "The ledger database is unavailable; retry after Retry-After seconds",
    }.items()
}


def _problem_media_types(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents every model as application/json; error answers are problem+json."""
    for path in schema["paths"].values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status[0] in "45" and "application/json" in content:
                    content[PROBLEM_JSON] = content.pop("application/json")
    return schema


def _document_errors_as_problem_json(app: FastAPI) -> None:
    generate = app.openapi  # caches its schema in app.openapi_schema, so this edits it once

    def openapi() -> dict[str, Any]:
        return app.openapi_schema or _problem_media_types(generate())

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    _document_errors_as_problem_json(app)

    @app.exception_handler(Problem)
    async def _problem(request: Request, error: Problem) -> JSONResponse:
        return problem_response(
            request, error.status, error.detail, headers=error.headers, **error.extra
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        detail = (
            error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).phrase
        )
        return problem_response(request, error.status_code, detail, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in error.errors()
        ]
        reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors)
        return problem_response(request, 422, reasons or "invalid request", errors=errors)

    @app.exception_handler(LedgerError)
    async def _ledger(request: Request, error: LedgerError) -> JSONResponse:
        status = next((s for kind, s in LEDGER_STATUS.items() if isinstance(error, kind)), 400)
        return problem_response(request, status, str(error))

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, error: DataError) -> JSONResponse:
        # The database refused a value the caller sent (a NUL character, an out-of-range number):
        # bad input, not an outage, so 422 rather than a 503 that invites retrying it.
        reason = str(error.orig).splitlines()[0] if error.orig else "invalid value"
        return problem_response(request, 422, f"the ledger cannot hold a value sent: {reason}")

    async def _database_down(request: Request, error: Exception) -> JSONResponse:
        # The ledger is unreachable: nothing was recorded, so the caller must retry, never 202.
        log.warning("database unavailable", error=str(error).splitlines()[0])
        retry = str(get_settings().retry_after_seconds)
        return problem_response(
            request,
            503,
            "the ledger database is unavailable; retry later",
            headers={"Retry-After": retry},
        )

    for error_type in (OperationalError, PoolTimeout, DBAPIError):
        app.add_exception_handler(error_type, _database_down)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unhandled error", path=request.url.path)
        return problem_response(request, 500, "internal error; it has been logged")
