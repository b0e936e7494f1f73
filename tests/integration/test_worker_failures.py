"""Jobs survive what production does to them: a worker killed with SIGKILL, a pool process that
dies, a job that always crashes, Redis restarted under load, and a burst of requests.

Real PostgreSQL, real Redis and real ``celery worker`` / ``lethe scheduler`` processes. Slow or
crashing jobs come from the real training handler or from ``test_fault`` params, which only
processes started with ``LETHE_ALLOW_TEST_FAULTS=1`` honour.
"""

import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.dispatch import enqueue_job
from app.ledger.db import session_scope
from app.ledger.filing import file_requests
from app.ledger.jobs import (
    approve_job,
    coalesce_pending_requests,
    create_job,
    get_job,
    requests_of_job,
)
from app.ledger.requests import list_requests
from app.ledger.samples import SampleRecord, register_samples, sample_ids
from app.ledger.tables import (
    DeletionRequest,
    JobKind,
    JobState,
    ModelVersion,
    RequestState,
    Split,
    StepDelta,
    TrainingRun,
    VersionState,
)
from tests.integration.stack import Stack, pool_processes, private_redis, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.postgres]

FINISHED = (JobState.succeeded, JobState.failed, JobState.dead)


def new_job(stack: Stack, kind: JobKind = JobKind.train, **params: Any) -> int:
    with session_scope(stack.engine) as session:
        job_id = create_job(session, kind, actor="test", params=params, max_attempts=3).id
    enqueue_job(job_id, stack.settings)  # after commit, as the API does
    return job_id


def job_state(stack: Stack, job_id: int) -> tuple[JobState, int, int]:
    with session_scope(stack.engine) as session:
        job = get_job(session, job_id)
        return job.state, job.attempts, job.progress


def approve_held(stack: Stack, job_ids: list[int]) -> int:
    """The operator's part: a job the gate held (exact retraining failing a rule by chance,
    which on one machine's training happens every time for the same samples) is approved and
    sent again; the faults under test are not the gate's. Returns the approvals."""
    with session_scope(stack.engine) as session:
        held = [j for j in job_ids if get_job(session, j).state is JobState.held]
        for job_id in held:
            approve_job(session, job_id, actor="test", reason="the gate is not under test")
    for job_id in held:
        enqueue_job(job_id, stack.settings)
    return len(held)


def wait_finished(stack: Stack, job_ids: list[int], timeout: float) -> int:
    """Until every job is finished, approving those held; returns the approvals."""
    approvals = 0

    def finished() -> bool:
        nonlocal approvals
        approvals += approve_held(stack, job_ids)
        return all(job_state(stack, j)[0] in FINISHED for j in job_ids)

    try:
        wait_for(finished, timeout, "the jobs")
    except TimeoutError as error:
        states = {j: job_state(stack, j) for j in job_ids}
        raise AssertionError(f"{error}: {states}\n{stack.logs()}") from error
    return approvals


def wait_running(stack: Stack, job_id: int, timeout: float = 90) -> None:
    """Until the job is running and has reported progress, i.e. is mid-work."""

    def mid_work() -> bool:
        state, _attempts, progress = job_state(stack, job_id)
        return state is JobState.running and progress > 0

    wait_for(mid_work, timeout, f"job {job_id} to be mid-work")


def file(session: Session, count: int) -> None:
    ids = [f"it-{uuid.uuid4().hex[:10]}" for _ in range(count)]
    register_samples(session, "it", [SampleRecord(i, Split.train, 0, "0" * 64) for i in ids])
    for sample_id in ids:  # one commit each, as separate POSTs would
        file_requests(session, [sample_id], actor="test", note=None, deadline_days=30)


def train_params() -> dict[str, Any]:
    """A real training run on the bundled digits, long enough to be killed halfway."""
    return {"dataset": "digits", "epochs": 2, "batch_size": 64, "prepare_audits": False}


def assert_trained_once(stack: Stack, job_id: int) -> None:
    """The killed attempt left nothing in the ledger: one run and one version, from the job."""
    with session_scope(stack.engine) as session:
        versions = session.scalars(select(ModelVersion).where(ModelVersion.job_id == job_id))
        assert len(list(versions)) == 1
        runs = session.scalars(select(TrainingRun))
        assert [run.finished_at is not None for run in runs] == [True]


def start_training(stack: Stack) -> int:
    return new_job(stack, JobKind.train, **train_params())


def start_unlearning(stack: Stack) -> int:
    """A trained model, then three requests coalesced into one unlearn job. The audit's cached
    models are not built yet, so the job runs long enough to be killed halfway."""
    wait_finished(stack, [start_training(stack)], timeout=180)
    with session_scope(stack.engine) as session:
        for sample_id in sample_ids(session, "digits", Split.train)[:3]:
            file_requests(session, [sample_id], actor="test", note=None, deadline_days=30)
        job = coalesce_pending_requests(
            session, window_seconds=0, max_requests=10, max_attempts=3, actor="test"
        )
        assert job is not None
        job_id = job.id
    enqueue_job(job_id, stack.settings)
    return job_id


def assert_unlearned_once(stack: Stack, job_id: int) -> None:
    """One promoted version from the job, its requests certified, and invariant 2: every step
    delta subtracted once, by the serving version only (the killed attempt's claims are gone)."""
    with session_scope(stack.engine) as session:
        versions = session.scalars(select(ModelVersion).where(ModelVersion.job_id == job_id))
        *rejected, version = versions.all()  # rungs of the ladder that failed their audit
        assert version.state is VersionState.serving
        assert {v.state for v in rejected} <= {VersionState.rejected}
        methods = [v.method for v in rejected]
        assert len(methods) == len(set(methods))  # a retry does not climb a rung twice
        requests = requests_of_job(session, job_id)
        assert {r.state for r in requests} == {RequestState.completed}
        assert all(r.certificate is not None for r in requests)
        claimed = session.execute(
            select(StepDelta.run_id, StepDelta.step, StepDelta.rolled_back_in).where(
                StepDelta.rolled_back_in.is_not(None)
            )
        ).all()
        assert {holder for _run, _step, holder in claimed} <= {version.id}
        recorded = version.details.get("rolled_back_steps", [])
        assert sorted([run, step] for run, step, _holder in claimed) == sorted(recorded)


# Each kind of job the kill test covers: how to start one, and the check that its effect
# happened exactly once.
KILLABLE_JOBS: dict[str, tuple[Callable[[Stack], int], Callable[[Stack, int], None]]] = {
    "train": (start_training, assert_trained_once),
    "unlearn": (start_unlearning, assert_unlearned_once),
}


@pytest.mark.parametrize("kind", sorted(KILLABLE_JOBS))
def test_worker_killed_mid_job_finishes_on_attempt_two_after_restart(
    stack: Stack, kind: str
) -> None:
    start_job, assert_effect_once = KILLABLE_JOBS[kind]
    stack.start_scheduler()  # its sweeper notices the lost lease
    worker = stack.start_worker()
    job_id = start_job(stack)
    wait_running(stack, job_id)
    worker.kill()  # SIGKILL to the parent and its pool process: nothing is acknowledged
    assert job_state(stack, job_id)[:2] == (JobState.running, 1)
    stack.start_worker()
    approvals = wait_finished(stack, [job_id], timeout=180)
    assert job_state(stack, job_id) == (JobState.succeeded, 2 + approvals, 100)
    assert_effect_once(stack, job_id)


def test_pool_process_killed_mid_job_is_requeued_without_the_sweeper(stack: Stack) -> None:
    """Only the child dies: the parent releases the lease and Celery requeues the message."""
    worker = stack.start_worker()
    job_id = new_job(stack, test_fault={"mode": "sleep", "seconds": 3})
    wait_running(stack, job_id)
    (child,) = pool_processes(worker)
    os.kill(child, signal.SIGKILL)
    wait_finished(stack, [job_id], timeout=60)
    assert job_state(stack, job_id) == (JobState.succeeded, 2, 100)


def test_a_job_that_always_crashes_ends_dead_with_its_requests_failed(stack: Stack) -> None:
    stack.start_worker()
    with session_scope(stack.engine) as session:
        file(session, 1)  # a job of several requests would be split, one job each
        job = coalesce_pending_requests(
            session,
            window_seconds=0,
            max_requests=10,
            max_attempts=3,
            actor="test",
            params={"test_fault": {"mode": "crash"}},  # os._exit in the pool process
        )
        assert job is not None
        job_id = job.id
    enqueue_job(job_id, stack.settings)
    wait_finished(stack, [job_id], timeout=90)
    assert job_state(stack, job_id)[:2] == (JobState.dead, 3)
    time.sleep(2)  # no endless requeue: nothing runs it again
    assert job_state(stack, job_id)[:2] == (JobState.dead, 3)
    with session_scope(stack.engine) as session:
        failed, _cursor = list_requests(session, state=RequestState.failed)
        assert {r.id for r in failed} == {r.id for r in requests_of_job(session, job_id)}
        for request in failed:  # the operator sees why
            assert request.error is not None and "gave up after 3 attempt(s)" in request.error
            assert "WorkerLostError" in request.error


def test_redis_restarted_mid_flight_every_accepted_job_completes(stack: Stack) -> None:
    with private_redis(stack) as restart_redis:
        stack.start_scheduler()
        stack.start_worker()
        job_ids = [new_job(stack, test_fault={"mode": "sleep", "seconds": 2}) for _ in range(3)]
        wait_running(stack, job_ids[0])
        restart_redis()  # the queued messages and the unacknowledged one are gone
        wait_finished(stack, job_ids, timeout=120)
        assert {job_state(stack, j)[0] for j in job_ids} == {JobState.succeeded}


def test_redis_restarted_mid_unlearning_every_accepted_request_completes(stack: Stack) -> None:
    with private_redis(stack) as restart_redis:
        stack.start_scheduler()
        stack.start_worker()
        wait_finished(stack, [start_training(stack)], timeout=180)
        with session_scope(stack.engine) as session:
            ids = sample_ids(session, "digits", Split.train)[:3]
        with session_scope(stack.engine) as session:
            filed = file_requests(session, ids, actor="test", note=None, deadline_days=30)
            accepted = [f.request.id for f in filed]

        def request_rows() -> list[DeletionRequest]:
            with session_scope(stack.engine) as session:
                rows = session.scalars(
                    select(DeletionRequest).where(DeletionRequest.id.in_(accepted))
                )
                return list(rows)

        wait_for(lambda: all(r.job_id for r in request_rows()), 30, "the scheduler")
        (job_id,) = {r.job_id for r in request_rows()}
        wait_running(stack, int(job_id))  # building the audit's models: a long job
        restart_redis()  # the unacknowledged message is gone with the broker's memory

        def certified() -> bool:
            approve_held(stack, [int(job_id)])
            return all(r.certificate is not None for r in request_rows())

        wait_for(certified, 300, "every accepted request to complete")
        assert {r.state for r in request_rows()} == {RequestState.completed}


def test_a_burst_of_requests_coalesces_into_few_jobs(stack: Stack) -> None:
    stack.start_scheduler()
    started = time.monotonic()
    with session_scope(stack.engine) as session:
        file(session, 40)
    burst = time.monotonic() - started

    def all_taken() -> bool:
        with session_scope(stack.engine) as session:
            pending = select(func.count()).where(DeletionRequest.state == RequestState.pending)
            return session.scalar(pending) == 0

    wait_for(all_taken, 30, "the scheduler to take every request")
    with session_scope(stack.engine) as session:
        requests = session.scalars(select(DeletionRequest)).all()
        assert {r.state for r in requests} == {RequestState.processing}
        jobs = {r.job_id for r in requests}
    # Jobs are made more than a window apart, and the last within a window and a tick (two
    # intervals, allowing for a slow tick) of the last request: 40 requests, one or two jobs.
    settings = stack.settings
    slack = 2 * settings.scheduler_interval_seconds
    most = 1 + (burst + slack) / settings.coalesce_window_seconds
    assert 1 <= len(jobs) <= int(most), f"{len(jobs)} jobs for a burst of {burst:.2f}s"
