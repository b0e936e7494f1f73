"""The scheduler: coalesces pending deletion requests into unlearn jobs and sweeps stale jobs.

Each tick commits first and enqueues after, so a crash in between loses nothing: the next tick's
sweep sends whatever is still queued. Several schedulers may run at once (rows are taken with
``FOR UPDATE SKIP LOCKED``). Torch-free, like the API: ``lethe scheduler`` runs it.
"""

import argparse
import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import FrameType

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from app.dispatch import broker_lost_messages, enqueue_job, in_process_runner, running_here
from app.ledger.db import get_engine, held_by_another_writer, session_scope
from app.ledger.errors import LedgerError
from app.ledger.jobs import coalesce_pending_requests, sweep_stale_jobs
from app.logging import configure_logging
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tick:
    coalesced: int | None  # the new unlearn job, if any
    resent: list[int]
    dead: list[int]


def tick(settings: Settings, engine: Engine) -> Tick:
    # A broker that lost its memory lost every queued job's message: all are sent again now,
    # not once they have waited requeue_after_seconds.
    requeue_after = 0.0 if broker_lost_messages(settings) else settings.requeue_after_seconds
    with session_scope(engine) as session:
        job = coalesce_pending_requests(
            session,
            window_seconds=settings.coalesce_window_seconds,
            max_requests=settings.coalesce_max_requests,
            max_attempts=settings.job_max_attempts,
            actor="scheduler",
        )
        coalesced = job.id if job is not None else None
    with session_scope(engine) as session:
        sweep = sweep_stale_jobs(
            session, requeue_after_seconds=requeue_after, running_here=running_here.attempts()
        )
    for job_id in sorted({*sweep.resend, *([coalesced] if coalesced else [])}):  # oldest first
        enqueue_job(job_id, settings)
    return Tick(coalesced, sweep.resend, sweep.dead)


def run_scheduler(settings: Settings, engine: Engine, stop: threading.Event) -> None:
    """Ticks every ``scheduler_interval_seconds`` until ``stop`` is set."""
    while not stop.is_set():
        try:
            done = tick(settings, engine)
        except SQLAlchemyError as error:
            if held_by_another_writer(error):  # embedded mode: a job's transaction holds SQLite
                log.info("scheduler tick waits for a running job's commit; the next tick retries")
            else:  # the database is down
                log.exception("scheduler tick failed; the next tick retries")
        except LedgerError:  # a row changed under it
            log.exception("scheduler tick failed; the next tick retries")
        else:
            if done.coalesced or done.resent or done.dead:
                log.info("scheduler: %s", done)
        stop.wait(settings.scheduler_interval_seconds)


@contextmanager
def embedded_services(settings: Settings, engine: Engine) -> Iterator[None]:
    """Embedded mode (no broker): an in-process job runner and the scheduler on threads."""
    from worker.celery_app import check_timings
    from worker.tasks import execute_job  # the same function the Celery task runs

    check_timings(settings)
    stop = threading.Event()
    run = partial(execute_job, settings=settings, engine=engine)
    with in_process_runner(run):
        scheduler = threading.Thread(
            target=run_scheduler, args=(settings, engine, stop), name="lethe-scheduler", daemon=True
        )
        scheduler.start()
        try:
            yield
        finally:
            stop.set()
            scheduler.join()


def add_scheduler_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    scheduler = commands.add_parser(
        "scheduler",
        help="coalesce deletion requests into jobs and re-send stale jobs",
        description="Every LETHE_SCHEDULER_INTERVAL_SECONDS: batches the pending deletion "
        "requests of a window (LETHE_COALESCE_WINDOW_SECONDS) into one unlearn job, sends it "
        "to the broker (LETHE_BROKER_URL), and re-sends the jobs that were lost or never taken. "
        "Runs until SIGTERM or Ctrl-C; several may run at once.",
    )
    scheduler.set_defaults(handler=_scheduler_command)


def _scheduler_command(_args: argparse.Namespace) -> None:
    configure_logging()
    stop = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    run_scheduler(get_settings(), get_engine(), stop)
