"""A broker that loses its messages (a Redis that keeps nothing on disk, restarted) delays no
job by more than seconds, and jobs start in the order they were made whichever message arrives
first. Real PostgreSQL, a private ``redis-server`` restarted by the test (never the machine's
shared one), real ``celery worker`` and ``lethe scheduler`` processes. ``requeue_after_seconds``
is the production default, 300 s: the sweep that waits that long is not what sends them."""

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from app.dispatch import BROKER_MARK, enqueue_job
from app.ledger.clock import as_utc, utcnow
from app.ledger.db import session_scope
from app.ledger.jobs import create_job
from app.ledger.tables import Job, JobKind
from tests.integration.conftest import require_services
from tests.integration.stack import Stack, open_stack, private_redis
from tests.integration.test_worker_failures import wait_finished, wait_running
from worker import scheduler

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.postgres]

REQUEUE_AFTER = 300.0  # the default of LETHE_REQUEUE_AFTER_SECONDS
PROMPT = 60.0  # seconds from the broker's return to the first start: generous, and << 300


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    require_services()
    with open_stack(tmp_path, requeue_after_seconds=str(REQUEUE_AFTER)) as opened:
        yield opened


def sleeper(stack: Stack, seconds: float, lineage: str = "serving") -> int:
    """A job that only sleeps (a test fault), sent to the broker after commit."""
    with session_scope(stack.engine) as session:
        fault = {"test_fault": {"mode": "sleep", "seconds": seconds}}
        job_id = create_job(session, JobKind.train, actor="test", params=fault, lineage=lineage).id
    enqueue_job(job_id, stack.settings)
    return job_id


def starts(stack: Stack, job_ids: list[int]) -> dict[int, datetime]:
    with session_scope(stack.engine) as session:
        jobs = session.scalars(select(Job).where(Job.id.in_(job_ids)))
        return {job.id: as_utc(job.started_at) for job in jobs if job.started_at is not None}


def test_queued_jobs_are_sent_again_seconds_after_the_broker_returns(stack: Stack) -> None:
    with private_redis(stack) as restart_redis:
        stack.start_scheduler()
        stack.start_worker()  # one pool process
        # Occupies the worker, in a lineage of its own: its end hands nothing over to the others.
        blocker = sleeper(stack, 3, lineage="blocker")
        queued = [sleeper(stack, 0.2) for _ in range(3)]
        wait_running(stack, blocker)
        restart_redis()  # the queued jobs' messages are gone
        back = utcnow()
        wait_finished(stack, queued, timeout=REQUEUE_AFTER / 2)
        started = starts(stack, queued)
        delay = (min(started.values()) - back).total_seconds()
        print(f"first job started {delay:.1f} s after the broker returned")
        assert delay < PROMPT
        assert sorted(queued, key=started.__getitem__) == queued


def test_jobs_start_in_the_order_they_were_made_whichever_message_arrives_first(
    stack: Stack,
) -> None:
    """No scheduler: only the newest job's message reaches the worker, which runs the older
    ones first; each hands the lineage over to the next."""
    with private_redis(stack) as restart_redis:
        stack.start_worker()
        blocker = sleeper(stack, 3, lineage="blocker")
        older = [sleeper(stack, 0.2) for _ in range(3)]
        wait_running(stack, blocker)
        restart_redis()  # the older jobs' messages are gone
        newer = sleeper(stack, 0.2)  # sent to the broker that came back
        wait_finished(stack, [*older, newer], timeout=REQUEUE_AFTER / 2)
        started = starts(stack, [*older, newer])
        assert sorted(started, key=started.__getitem__) == [*older, newer]


def test_the_scheduler_sends_every_queued_job_at_once_when_the_mark_is_gone(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheduler's tick alone, against the machine's Redis under this stack's own key
    prefix: only the stack's mark is deleted, as a restart without persistence would."""
    with session_scope(stack.engine) as session:
        queued = [create_job(session, JobKind.train, actor="test").id for _ in range(3)]
    sent: list[int] = []
    monkeypatch.setattr(scheduler, "enqueue_job", lambda job_id, _settings: sent.append(job_id))
    settings = stack.settings

    scheduler.tick(settings, stack.engine)  # this broker was never marked: all are sent
    assert sent == queued
    sent.clear()
    scheduler.tick(settings, stack.engine)  # marked: the queued jobs wait for the sweep
    assert sent == []
    mark = f"{settings.broker_key_prefix}{BROKER_MARK}"
    assert redis.Redis.from_url(settings.broker_url).delete(mark) == 1
    scheduler.tick(settings, stack.engine)
    assert sent == queued  # oldest first
