"""Carries the HTTP request's ID into Celery tasks, so a job's log lines name the call behind it.

Sender (``app.dispatch``): ``send_task(..., headers=task_headers())``.
Task (``worker.tasks``): ``with task_log_context(job_id, self.request.get(TASK_REQUEST_ID)): ...``
Celery copies custom message headers onto the task's ``request``, hence ``request.get``.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import structlog

TASK_REQUEST_ID = "lethe_request_id"


def task_headers() -> dict[str, str]:
    """Message headers for a task sent from here: the request ID bound in this context, if any."""
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    return {TASK_REQUEST_ID: str(request_id)} if request_id else {}


@contextmanager
def task_log_context(job_id: int, request_id: str | None) -> Iterator[None]:
    """Binds the job ID (and the originating request ID) to every log line of the task's body."""
    origin = {"request_id": request_id} if request_id else {}
    with structlog.contextvars.bound_contextvars(job_id=job_id, **origin):
        yield
