"""Thin tasks: take a job ID, claim the job in the ledger, run its handler, record the outcome.

Delivery is at least once (late acks, redelivery, the sweeper's re-sends); the ledger makes the
effect once: a finished job returns early, a job held by a live attempt is left alone.
"""

import logging
import threading
import traceback
from types import TracebackType
from typing import Any

from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]
from billiard.exceptions import Terminated, WorkerLostError
from celery import Task
from celery.worker.request import Request
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from app.dispatch import RUN_JOB_TASK, enqueue_job, running_here
from app.ledger.db import get_engine, held_by_another_writer, session_scope
from app.ledger.errors import StateConflict
from app.ledger.jobs import (
    FINISHED_STATES,
    ClaimOutcome,
    claim_job,
    fail_attempt,
    fail_job,
    first_in_line,
    get_job,
    heartbeat,
    hold_job,
    holds,
    next_queued_in_lineage,
    release_lease,
    succeed_job,
)
from app.ledger.tables import JobState
from app.log_context import TASK_REQUEST_ID, task_log_context
from app.settings import Settings, get_settings
from worker.celery_app import celery_app
from worker.pipeline import JobFailed, JobHeld, run_job
from worker.progress import Pace, Step

log = logging.getLogger(__name__)
# How a job's pool process ends without recording anything (SystemExit: billiard reports the
# child's exit before Celery turns it into a WorkerLostError).
WORKER_GONE = (WorkerLostError, Terminated, SystemExit)


class LeaseLost(Exception):
    """The lease ran out and another attempt may own the job: this one must stop."""


class Heartbeat:
    """Renews the attempt's lease on a thread and writes the progress the handler reports (the
    percentage and the phase, with the phase's time left).

    Only this thread writes, so a handler never waits on the database to report progress. The
    attempt is also registered in ``running_here`` while it runs: in embedded mode the job's
    own SQLite transaction holds off these writes until it commits, and the scheduler and the
    API of this process learn from there that it is alive and what it is doing.
    """

    def __init__(self, engine: Engine, job_id: int, attempt: int, settings: Settings) -> None:
        self._engine = engine
        self._job_id = job_id
        self._attempt = attempt
        self._settings = settings
        self._latest: tuple[int | None, dict[str, Any] | None] = (None, None)
        self._pace = Pace()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> "Heartbeat":
        running_here.start(self._job_id, self._attempt)
        self._thread.start()
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()
        running_here.end(self._job_id)

    def progress(self, percent: int, step: Step | None = None, /) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"job {self._job_id} attempt {self._attempt} lost its lease")
        detail = self._pace.detail(step) if step is not None and step.said else self._latest[1]
        self._latest = (percent, detail)
        running_here.report(self._job_id, percent, detail)
        self._wake.set()

    def _beat(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._settings.heartbeat_seconds)
            self._wake.clear()
            if self._stop.is_set():
                return
            progress, detail = self._latest
            try:
                with session_scope(self._engine) as session:
                    held = heartbeat(
                        session,
                        self._job_id,
                        self._attempt,
                        lease_seconds=self._settings.lease_seconds,
                        progress=progress,
                        detail=detail,
                    )
            except SQLAlchemyError as error:
                if held_by_another_writer(error):
                    log.debug("heartbeat of job %s waits for the job's commit", self._job_id)
                else:
                    log.warning("heartbeat of job %s failed; retrying", self._job_id, exc_info=True)
                continue
            if not held:
                self.lost.set()
                return


def execute_job(
    job_id: int, *, settings: Settings | None = None, engine: Engine | None = None
) -> str:
    """The body of the Celery task and of the in-process runner. Returns what happened."""
    settings = settings or get_settings()
    engine = engine or get_engine()
    with session_scope(engine) as session:
        # The lineage's oldest queued job runs first (its message may be lost). JobRequest only
        # knows the message's job: if the pool process dies running the older one, that job's
        # lease runs out and the sweeper sends it again.
        first = first_in_line(session, job_id)
        if first != job_id:
            log.info("job %s waits: job %s of its lineage is older and runs first", job_id, first)
        claim = claim_job(session, first, lease_seconds=settings.lease_seconds)
    if claim.outcome is not ClaimOutcome.claimed:
        log.info("job %s not run: %s", first, claim.outcome.value)
        if claim.outcome is ClaimOutcome.dead:
            _hand_over_lineage(engine, first, settings)
        return claim.outcome.value
    log.info("job %s (%s) attempt %s started", first, claim.job.kind, claim.job.attempts)
    outcome = _run_claimed(engine, first, claim.job.attempts, settings)
    log.info("job %s attempt %s ended %s", first, claim.job.attempts, outcome.value)
    if outcome in (*FINISHED_STATES, JobState.held):
        _hand_over_lineage(engine, first, settings)
    return outcome.value


def _run_claimed(engine: Engine, job_id: int, attempt: int, settings: Settings) -> JobState:
    with Heartbeat(engine, job_id, attempt, settings) as beat:
        try:
            with session_scope(engine) as session:
                job = get_job(session, job_id)
                method = run_job(session, job, beat.progress, settings=settings)
                succeed_job(session, job_id, attempt, method=method)
            return JobState.succeeded
        except LeaseLost:
            return _lease_lost(job_id, attempt)
        except StateConflict as error:
            if not _still_holds(engine, job_id, attempt):
                return _lease_lost(job_id, attempt)  # the attempt that replaced it moved on
            # A real conflict: the ledger changed under the job (e.g. an operator's override).
            return _record_failure(engine, job_id, attempt, error, settings, retryable=True)
        except JobHeld as held:
            return _record_hold(engine, job_id, attempt, held)
        except (JobFailed, NotImplementedError) as error:
            return _record_failure(engine, job_id, attempt, error, settings, retryable=False)
        except Exception as error:  # any crash of the handler costs one attempt
            return _record_failure(engine, job_id, attempt, error, settings, retryable=True)


def _lease_lost(job_id: int, attempt: int) -> JobState:
    log.warning("job %s attempt %s lost its lease; its outcome is dropped", job_id, attempt)
    return JobState.running  # by the attempt that replaced this one


def _still_holds(engine: Engine, job_id: int, attempt: int) -> bool:
    with session_scope(engine) as session:
        return holds(session, job_id, attempt)


def _hand_over_lineage(engine: Engine, job_id: int, settings: Settings) -> None:
    with session_scope(engine) as session:
        successor = next_queued_in_lineage(session, job_id)
    if successor is not None:
        enqueue_job(successor, settings)


def _record_hold(engine: Engine, job_id: int, attempt: int, held: JobHeld) -> JobState:
    log.warning("job %s attempt %s %s", job_id, attempt, held)
    try:
        with session_scope(engine) as session:
            hold_job(
                session,
                job_id,
                attempt,
                stage=held.stage,
                reason=held.reason,
                screening=held.screening,
            )
    except StateConflict:
        log.warning("job %s attempt %s lost its lease; its hold is dropped", job_id, attempt)
        return JobState.running
    return JobState.held


def _record_failure(
    engine: Engine,
    job_id: int,
    attempt: int,
    error: BaseException,
    settings: Settings,
    *,
    retryable: bool,
) -> JobState:
    message = "".join(traceback.format_exception_only(error)).strip()
    log.error("job %s attempt %s failed: %s", job_id, attempt, message, exc_info=error)
    try:
        with session_scope(engine) as session:
            if not retryable:
                fail_job(session, job_id, attempt, message)
                return JobState.failed
            state = fail_attempt(session, job_id, attempt, message)
    except StateConflict:  # the lease ran out meanwhile: the next attempt owns the job
        return _lease_lost(job_id, attempt)
    if state is JobState.queued:
        enqueue_job(job_id, settings)  # after commit, as always
    return state


class JobRequest(Request):
    """Runs in the worker's parent process. When a pool process dies mid-job (SIGKILL, OOM, hard
    time limit) the job's lease is expired at once, so the message Celery requeues (or the
    sweeper's re-send) can claim the next attempt without waiting for the lease to run out."""

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> None:
        exception = _unwrapped(exc_info.exception)
        if isinstance(exception, WORKER_GONE):
            _release_lost_job(self.args, repr(exception))
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if not soft:
            _release_lost_job(self.args, f"hard time limit ({timeout}s) exceeded")


def _unwrapped(exception: BaseException) -> BaseException:
    return exception.exc if isinstance(exception, ExceptionWithTraceback) else exception


def _release_lost_job(args: Any, reason: str) -> None:
    try:
        with session_scope() as session:
            release_lease(session, int(args[0]), reason)
    except (SQLAlchemyError, IndexError, TypeError, ValueError):
        # The lease then simply runs out and the sweeper recovers the job.
        log.warning("could not release the lease of a lost job %r", args, exc_info=True)


class JobTask(Task[[int], str]):
    Request = "worker.tasks:JobRequest"


@celery_app.task(name=RUN_JOB_TASK, base=JobTask, bind=True)
def run_job_task(self: JobTask, job_id: int) -> str:
    with task_log_context(job_id, self.request.get(TASK_REQUEST_ID)):
        return execute_job(job_id)
