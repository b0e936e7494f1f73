"""Hands a committed job to the worker by task name: ``app`` never imports the worker's code.

With a broker (``LETHE_BROKER_URL``) the job ID goes to Celery with ``send_task``. Without one
(embedded mode) it goes to the in-process runner that the embedded launcher installed. A failed
hand-off loses nothing: the job row is the outbox, and the scheduler's sweeper sends it again,
at once when the broker lost its messages (``broker_lost_messages``).
"""

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from app.ledger.clock import utcnow
from app.log_context import task_headers
from app.settings import Settings, get_settings

RUN_JOB_TASK = "lethe.run_job"
# A key the scheduler keeps in the broker: gone means the broker lost everything it held (a
# restart without persistence, a flush, a new server), the queued jobs' messages with it.
BROKER_MARK = "lethe:broker-mark"
log = logging.getLogger(__name__)


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    """Shared by this client and the worker's Celery app, so both address the same Redis keys."""
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_seconds}
    if settings.broker_key_prefix:
        options["global_keyprefix"] = settings.broker_key_prefix
    return options


def enqueue_job(job_id: int, settings: Settings | None = None) -> None:
    """Call after the transaction that created or re-queued the job has committed."""
    settings = settings or get_settings()
    if settings.broker_url:
        _send_to_broker(job_id, settings)
    elif _runner is not None:
        _runner.submit(job_id)
    else:
        log.warning("no broker and no in-process runner: job %s waits in the ledger", job_id)


@lru_cache
def _client(broker_url: str, transport_options: tuple[tuple[str, Any], ...]) -> Celery:
    client = Celery("lethe-client", broker=broker_url, set_as_current=False)
    client.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_transport_options=dict(transport_options),
        broker_connection_timeout=2,
    )
    return client


def _send_to_broker(job_id: int, settings: Settings) -> None:
    options = tuple(sorted(broker_transport_options(settings).items()))
    try:
        _client(settings.broker_url, options).send_task(
            RUN_JOB_TASK,
            args=[job_id],
            queue=settings.gpu_queue,
            headers=task_headers(),  # the HTTP request's ID, for the job's log lines
            # Short: the caller (an HTTP request, the scheduler) must not hang on a dead broker.
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except (KombuError, RedisError, OSError) as error:
        log.warning("broker unavailable, job %s waits for the sweeper: %r", job_id, error)


@dataclass(frozen=True)
class LiveProgress:
    attempt: int
    percent: int
    detail: dict[str, Any] | None


class RunningHere:
    """The job attempts that run in this process, with the progress they last reported.

    In embedded mode the API, the scheduler and the jobs share one process and one SQLite
    ledger, whose only write lock a job's transaction holds until it commits: its heartbeats
    wait for that commit. Here the scheduler learns which jobs are alive and the API what they
    are doing, from the process that runs them. Elsewhere (Celery) it lists the pool process's
    own job, which nobody asks about."""

    def __init__(self) -> None:
        self._jobs: dict[int, LiveProgress] = {}
        self._lock = threading.Lock()

    def start(self, job_id: int, attempt: int) -> None:
        with self._lock:
            self._jobs[job_id] = LiveProgress(attempt, 0, None)

    def end(self, job_id: int) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def report(self, job_id: int, percent: int, detail: dict[str, Any] | None) -> None:
        with self._lock:
            live = self._jobs.get(job_id)
            if live is not None:
                self._jobs[job_id] = LiveProgress(live.attempt, percent, detail)

    def attempts(self) -> set[tuple[int, int]]:
        """(job, attempt) pairs running now."""
        with self._lock:
            return {(job_id, live.attempt) for job_id, live in self._jobs.items()}

    def progress(self, job_id: int, attempt: int) -> LiveProgress | None:
        with self._lock:
            live = self._jobs.get(job_id)
        return live if live is not None and live.attempt == attempt else None


running_here = RunningHere()


@lru_cache
def _redis(broker_url: str) -> redis.Redis:
    return redis.Redis.from_url(broker_url, socket_connect_timeout=2, socket_timeout=2)


def broker_lost_messages(settings: Settings) -> bool:
    """True once each time the broker comes back without its memory, the first time this
    deployment meets its broker included: the mark is set when absent, so only one of several
    schedulers sees it missing. False without a broker, or while it is unreachable."""
    if not settings.broker_url:
        return False
    mark = f"{settings.broker_key_prefix}{BROKER_MARK}"
    try:
        return bool(_redis(settings.broker_url).set(mark, utcnow().isoformat(), nx=True))
    except RedisError as error:
        log.warning("broker unavailable; its messages are checked once it answers: %r", error)
        return False


class InProcessRunner:
    """Embedded mode's broker and worker: runs job IDs on threads of this process with the same
    function the Celery task calls. One thread by default, like one GPU worker."""

    def __init__(self, run: Callable[[int], object], threads: int = 1) -> None:
        self._run = run
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="lethe-job")
        self._pending: set[Future[object]] = set()
        self._lock = threading.Lock()

    def submit(self, job_id: int) -> None:
        future = self._executor.submit(self._run, job_id)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future: Future[object]) -> None:
        with self._lock:
            self._pending.discard(future)
        if future.exception() is not None:
            log.error("in-process job failed", exc_info=future.exception())

    def drain(self, timeout: float) -> None:
        """Waits until every job submitted so far, and every job those submitted, has run."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                pending = set(self._pending)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} in-process job(s) still running")
            wait(pending, timeout=max(0.0, deadline - time.monotonic()))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


_runner: InProcessRunner | None = None


@contextmanager
def in_process_runner(run: Callable[[int], object], threads: int = 1) -> Iterator[InProcessRunner]:
    """Installs a runner for ``enqueue_job`` while the block runs (embedded mode, unit tests)."""
    global _runner
    if _runner is not None:
        raise RuntimeError("an in-process runner is already installed")
    runner = InProcessRunner(run, threads)
    _runner = runner
    try:
        yield runner
    finally:
        _runner = None
        runner.shutdown()
