"""The job state machine in the ledger, the scheduler's tick, and jobs run by the in-process runner.

SQLite by default; the claims that depend on PostgreSQL locking run on the real server too.
"""

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, event, select, update
from sqlalchemy.orm import Session

from app.dispatch import enqueue_job, in_process_runner
from app.ledger.clock import utcnow
from app.ledger.db import make_engine, session_scope
from app.ledger.errors import StateConflict
from app.ledger.filing import file_requests
from app.ledger.jobs import (
    ClaimOutcome,
    claim_job,
    coalesce_pending_requests,
    create_job,
    fail_attempt,
    fail_job,
    get_job,
    heartbeat,
    release_lease,
    requests_of_job,
    succeed_job,
    sweep_stale_jobs,
)
from app.ledger.keys import create_key
from app.ledger.samples import SampleRecord, register_samples
from app.ledger.tables import Job, JobKind, JobState, RequestState, Sample, SampleState, Split
from app.ledger.versions import alias_target
from app.main import create_app
from app.settings import Settings
from worker.scheduler import embedded_services, run_scheduler, tick
from worker.tasks import Heartbeat, execute_job

LEASE = 60.0
BUSY_TIMEOUT_500MS = "PRAGMA busy_timeout=500"


def new_job(session: Session, lineage: str = "serving", **params: Any) -> int:
    job = create_job(session, JobKind.train, actor="test", params=params, lineage=lineage)
    session.commit()
    return job.id


def expire_lease(session: Session, job_id: int) -> None:
    """As if the holder stopped heartbeating a while ago."""
    past = utcnow() - timedelta(seconds=1)
    session.execute(update(Job).where(Job.id == job_id).values(lease_until=past))
    session.commit()


def file(session: Session, count: int) -> list[str]:
    ids = [f"s{uuid.uuid4().hex[:8]}" for _ in range(count)]
    register_samples(session, "toy", [SampleRecord(i, Split.train, 0, "0" * 64) for i in ids])
    filed = file_requests(session, ids, actor="test", note=None, deadline_days=30)
    return [f.request.id for f in filed]


def unlearn_job(session: Session, requests: int = 3, **params: Any) -> int:
    file(session, requests)
    job = coalesce_pending_requests(
        session, window_seconds=0, max_requests=100, max_attempts=3, actor="test", params=params
    )
    assert job is not None
    session.commit()
    return job.id


def claim(session: Session, job_id: int) -> ClaimOutcome:
    outcome = claim_job(session, job_id, lease_seconds=LEASE).outcome
    session.commit()
    return outcome


def test_claim_runs_a_job_once_and_a_finished_job_returns_early(session: Session) -> None:
    job_id = new_job(session)
    assert claim(session, job_id) is ClaimOutcome.claimed
    job = get_job(session, job_id)
    assert (job.state, job.attempts) == (JobState.running, 1)
    assert job.lease_until is not None and job.heartbeat_at is not None
    assert claim(session, job_id) is ClaimOutcome.busy  # a duplicate delivery while it runs
    succeed_job(session, job_id, 1, method="m")
    session.commit()
    assert claim(session, job_id) is ClaimOutcome.finished
    job = get_job(session, job_id)
    assert (job.state, job.progress, job.method, job.attempts) == (JobState.succeeded, 100, "m", 1)


def test_one_running_job_per_lineage(session: Session) -> None:
    first, second = new_job(session), new_job(session)
    other_lineage = new_job(session, lineage="shard-2")
    assert claim(session, first) is ClaimOutcome.claimed
    assert claim(session, second) is ClaimOutcome.busy
    assert claim(session, other_lineage) is ClaimOutcome.claimed
    succeed_job(session, first, 1)
    session.commit()
    assert claim(session, second) is ClaimOutcome.claimed


def test_an_expired_lease_can_be_claimed_and_fences_the_old_attempt(session: Session) -> None:
    job_id = new_job(session)
    claim(session, job_id)
    expire_lease(session, job_id)
    assert claim(session, job_id) is ClaimOutcome.claimed
    assert get_job(session, job_id).attempts == 2
    assert not heartbeat(session, job_id, 1, lease_seconds=LEASE)  # the lost attempt
    with pytest.raises(StateConflict):
        succeed_job(session, job_id, 1)
    session.rollback()
    assert heartbeat(session, job_id, 2, lease_seconds=LEASE, progress=140)
    session.commit()
    assert get_job(session, job_id).progress == 100  # clamped to 0-100


def test_release_lease_lets_the_redelivery_claim_at_once(session: Session) -> None:
    job_id = new_job(session)
    claim(session, job_id)
    assert release_lease(session, job_id, "WorkerLostError()")
    session.commit()
    assert get_job(session, job_id).error == "attempt lost: WorkerLostError()"
    assert claim(session, job_id) is ClaimOutcome.claimed


def test_a_crashing_job_is_requeued_then_dead_with_its_requests_failed(session: Session) -> None:
    job_id = unlearn_job(session, requests=1)
    for attempt in (1, 2):
        claim(session, job_id)
        assert fail_attempt(session, job_id, attempt, "boom") is JobState.queued
        session.commit()
    claim(session, job_id)
    assert fail_attempt(session, job_id, 3, "boom") is JobState.dead
    session.commit()
    job = get_job(session, job_id)
    assert (job.state, job.attempts, job.error) == (JobState.dead, 3, "boom")
    assert claim(session, job_id) is ClaimOutcome.finished
    assert_requests_failed(session, job_id, "boom")


def assert_requests_failed(session: Session, job_id: int, error: str) -> None:
    requests = requests_of_job(session, job_id)
    assert requests and {(r.state, r.error) for r in requests} == {(RequestState.failed, error)}
    states = session.scalars(
        select(Sample.state).where(Sample.sample_id.in_([r.sample_id for r in requests]))
    )
    assert set(states) == {SampleState.active}  # nothing was erased


def test_a_permanent_failure_ends_failed_at_once(session: Session) -> None:
    job_id = unlearn_job(session, requests=1)
    claim(session, job_id)
    fail_job(session, job_id, 1, "cannot")
    session.commit()
    assert get_job(session, job_id).state is JobState.failed
    assert_requests_failed(session, job_id, "cannot")


@pytest.mark.parametrize("ending", ["failed", "dead"])
def test_a_failed_job_of_several_requests_is_split_one_job_each(
    session: Session, ending: str
) -> None:
    """One request's failure never fails the others: each goes on in a job of its own (sent by
    the next sweep), to its own outcome; a job of one request fails as before."""
    job_id = unlearn_job(session, requests=3)
    filed = {r.id for r in requests_of_job(session, job_id)}
    claim(session, job_id)
    if ending == "failed":
        fail_job(session, job_id, 1, "cannot")
    else:
        session.execute(update(Job).where(Job.id == job_id).values(max_attempts=1))
        assert fail_attempt(session, job_id, 1, "boom") is JobState.dead
    session.commit()
    job = get_job(session, job_id)
    assert job.state is JobState(ending) and "go on alone, in jobs" in str(job.error)
    assert requests_of_job(session, job_id) == []
    split = session.scalars(select(Job).where(Job.id != job_id)).all()
    assert [len(requests_of_job(session, j.id)) for j in split] == [1, 1, 1]
    assert {r.id for j in split for r in requests_of_job(session, j.id)} == filed
    assert {(j.state, j.enqueued_at) for j in split} == {(JobState.queued, None)}
    assert {r.state for j in split for r in requests_of_job(session, j.id)} == {
        RequestState.processing
    }
    assert set(sweep_stale_jobs(session, requeue_after_seconds=300).resend) == {j.id for j in split}


def test_sweep_requeues_lost_attempts_buries_exhausted_ones_and_resends_stale(
    session: Session,
) -> None:
    lost, exhausted, stale, fresh = (new_job(session, lineage=f"l{i}") for i in range(4))
    for job_id in (lost, exhausted):
        claim(session, job_id)
        expire_lease(session, job_id)
    session.execute(update(Job).where(Job.id == exhausted).values(max_attempts=1))
    session.execute(update(Job).where(Job.id == stale).values(enqueued_at=None))
    session.commit()
    sweep = sweep_stale_jobs(session, requeue_after_seconds=30)
    session.commit()
    assert (sorted(sweep.resend), sweep.dead) == ([lost, stale], [exhausted])
    assert get_job(session, lost).state is JobState.queued
    assert get_job(session, exhausted).state is JobState.dead
    assert get_job(session, fresh).state is JobState.queued
    assert sweep_stale_jobs(session, requeue_after_seconds=30).resend == []


def test_sweep_leaves_alone_the_attempts_that_run_in_its_own_process(session: Session) -> None:
    here, elsewhere = new_job(session, lineage="a"), new_job(session, lineage="b")
    for job_id in (here, elsewhere):
        claim(session, job_id)
        expire_lease(session, job_id)
    sweep = sweep_stale_jobs(session, requeue_after_seconds=30, running_here={(here, 1)})
    session.commit()
    assert sweep.resend == [elsewhere]
    assert get_job(session, here).state is JobState.running


def test_claiming_an_exhausted_lost_job_buries_it(session: Session) -> None:
    job_id = new_job(session)
    session.execute(update(Job).where(Job.id == job_id).values(max_attempts=1))
    session.commit()
    claim(session, job_id)
    expire_lease(session, job_id)
    assert claim(session, job_id) is ClaimOutcome.dead
    assert get_job(session, job_id).state is JobState.dead


def test_coalescing_waits_for_the_window_then_takes_the_burst(session: Session) -> None:
    request_ids = file(session, 25)
    kwargs: dict[str, Any] = {"max_requests": 100, "max_attempts": 3, "actor": "test"}
    assert coalesce_pending_requests(session, window_seconds=3600, **kwargs) is None
    job = coalesce_pending_requests(session, window_seconds=0, **kwargs)
    session.commit()
    assert job is not None and job.kind is JobKind.unlearn
    requests = requests_of_job(session, job.id)
    assert sorted(r.id for r in requests) == sorted(request_ids)
    assert {r.state for r in requests} == {RequestState.processing}
    samples = [r.sample_id for r in requests]
    states = session.scalars(select(Sample.state).where(Sample.sample_id.in_(samples)))
    assert set(states) == {SampleState.forgetting}
    assert coalesce_pending_requests(session, window_seconds=0, **kwargs) is None


def test_coalescing_caps_the_batch(session: Session) -> None:
    file(session, 5)
    kwargs: dict[str, Any] = {"window_seconds": 0, "max_attempts": 3, "actor": "test"}
    first = coalesce_pending_requests(session, max_requests=3, **kwargs)
    second = coalesce_pending_requests(session, max_requests=3, **kwargs)
    assert first is not None and second is not None
    assert [len(requests_of_job(session, j.id)) for j in (first, second)] == [3, 2]


@pytest.fixture
def settings(sqlite_url: str) -> Settings:
    return Settings(
        database_url=sqlite_url,
        allow_test_faults=True,
        heartbeat_seconds=0.05,
        lease_seconds=5,
        coalesce_window_seconds=0,
        requeue_after_seconds=3600,
    )


@pytest.fixture
def run_in_process(settings: Settings, engine: Engine) -> Iterator[Any]:
    with in_process_runner(partial(execute_job, settings=settings, engine=engine)) as runner:
        yield runner


def test_in_process_runner_runs_the_task_and_records_progress(
    session: Session, settings: Settings, engine: Engine, run_in_process: Any
) -> None:
    job_id = new_job(session, test_fault={"mode": "sleep", "seconds": 0.3})
    seen: set[int] = set()
    finished = threading.Event()

    def watch() -> None:
        with session_scope(engine) as watcher:
            while not finished.is_set():
                seen.add(get_job(watcher, job_id).progress)

    watcher = threading.Thread(target=watch)
    watcher.start()
    run_in_process.submit(job_id)
    run_in_process.drain(timeout=10)
    finished.set()
    watcher.join()
    job = get_job(session, job_id)
    assert (job.state, job.progress, job.method, job.attempts) == (
        JobState.succeeded,
        100,
        "test-sleep",
        1,
    )
    assert any(0 < p < 100 for p in seen)  # the heartbeat wrote progress while it ran


def test_a_heartbeat_held_off_by_the_jobs_own_sqlite_lock_is_not_a_warning(
    session: Session, settings: Settings, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = new_job(session)
    impatient = create_engine(sqlite_url, connect_args={"timeout": 0.01})
    writer = impatient.raw_connection()  # as the job's transaction: the one write lock
    writer.execute("BEGIN IMMEDIATE")
    caplog.set_level(logging.DEBUG, logger="worker.tasks")
    with Heartbeat(impatient, job_id, 1, settings):
        time.sleep(0.3)
    writer.close()  # rolls back
    records = [r for r in caplog.records if r.name == "worker.tasks"]
    assert records and all(r.levelno == logging.DEBUG for r in records)
    assert "waits for the job's commit" in records[0].getMessage()


def test_an_embedded_job_holding_the_ledger_past_its_lease_runs_on_and_shows_progress(
    session: Session, settings: Settings, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Embedded mode: the job's transaction holds SQLite's only write lock (committing once
    halfway, as between rungs), so its heartbeats wait; its lease runs out many times over.
    Scaled down: a 3 s job, a 0.2 s lease and a 0.5 s busy timeout (30 s in production)."""
    settings = settings.model_copy(
        update={"lease_seconds": 0.2, "heartbeat_seconds": 0.05, "scheduler_interval_seconds": 0.05}
    )
    engine = make_engine(sqlite_url)
    event.listen(engine, "connect", lambda connection, _: connection.execute(BUSY_TIMEOUT_500MS))
    fault = {"mode": "sleep", "seconds": 3, "hold_ledger": True}
    job_id = new_job(session, test_fault=fault)
    key = create_key(session, "reader", ["status:read"], actor="test")
    session.commit()
    caplog.set_level(logging.INFO)
    seen: list[dict[str, Any]] = []
    app = create_app(settings, engine)  # the API of the same process, as in `lethe demo`
    logging.getLogger().addHandler(caplog.handler)  # create_app replaced the root's handlers
    with embedded_services(settings, engine), TestClient(app) as client:
        enqueue_job(job_id, settings)
        while not seen or seen[-1]["state"] not in ("succeeded", "failed", "dead"):
            answer = client.get(f"/jobs/{job_id}", headers={"X-API-Key": key})
            seen.append(answer.json()["job"])
            time.sleep(0.05)
    job = get_job(session, job_id)
    assert (job.state, job.attempts, job.error) == (JobState.succeeded, 1, None)
    running = [j for j in seen if j["state"] == "running"]
    assert any(0 < j["progress"] < 100 for j in running)  # while the job held the ledger
    shown = [j["progress_detail"] for j in running if j["progress_detail"]]
    assert shown and {d["phase"] for d in shown} == {"sleeping"}
    assert {d["unit"] for d in shown} == {"ticks"} and max(d["done"] for d in shown) > 1
    assert any(d["left_seconds"] is not None and d["left_seconds"] > 0 for d in shown)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]  # no "database is locked", no traceback
    waits = [r.getMessage() for r in caplog.records if r.name == "worker.scheduler"]
    assert not waits  # the sweep never tried to take the running job from its attempt
    engine.dispose()


def test_a_conflict_in_the_ledger_is_reported_as_such_not_as_a_lost_lease(
    session: Session, settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = unlearn_job(session, test_fault={"mode": "conflict"})
    assert execute_job(job_id, settings=settings, engine=engine) == "queued"  # costs an attempt
    job = get_job(session, job_id)
    assert job.error is not None and "StateConflict: test fault: a row changed" in job.error
    assert "test fault: a row changed" in caplog.text
    assert "lost its lease" not in caplog.text


def test_a_scheduler_tick_held_off_by_a_jobs_sqlite_lock_is_one_quiet_line(
    session: Session, settings: Settings, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    file(session, 1)  # a pending request: the tick would write a job for it
    session.commit()
    impatient = create_engine(sqlite_url, connect_args={"timeout": 0.01})
    writer = impatient.raw_connection()  # as a running job's transaction: the one write lock
    writer.execute("BEGIN IMMEDIATE")
    caplog.set_level(logging.INFO, logger="worker.scheduler")
    stop = threading.Event()
    scheduler = threading.Thread(target=run_scheduler, args=(settings, impatient, stop))
    scheduler.start()
    wait_until(lambda: bool(caplog.records))
    stop.set()
    scheduler.join()
    writer.close()  # rolls back
    assert {(r.levelno, r.exc_info) for r in caplog.records} == {(logging.INFO, None)}
    assert "waits for a running job's commit" in caplog.records[0].getMessage()


def test_a_raising_job_is_retried_by_the_task_until_dead(
    session: Session, settings: Settings, engine: Engine, run_in_process: Any
) -> None:
    job_id = unlearn_job(session, requests=1, test_fault={"mode": "raise"})
    execute_job(job_id, settings=settings, engine=engine)
    run_in_process.drain(timeout=10)  # the task re-enqueued attempts 2 and 3 itself
    job = get_job(session, job_id)
    assert (job.state, job.attempts) == (JobState.dead, 3)
    assert_requests_failed(session, job_id, "RuntimeError: test fault: raise")


def test_a_failing_job_is_not_retried(session: Session, settings: Settings, engine: Engine) -> None:
    job_id = unlearn_job(session, requests=1, test_fault={"mode": "fail"})
    assert execute_job(job_id, settings=settings, engine=engine) == "failed"
    assert (get_job(session, job_id).state, get_job(session, job_id).attempts) == (
        JobState.failed,
        1,
    )


def test_test_faults_are_ignored_unless_enabled(
    session: Session, settings: Settings, engine: Engine
) -> None:
    # The real handler runs instead, and fails at once: cifar10 is read from a folder not given.
    job_id = new_job(session, dataset="cifar10", test_fault={"mode": "sleep", "seconds": 0})
    production = settings.model_copy(update={"allow_test_faults": False})
    assert execute_job(job_id, settings=production, engine=engine) == "failed"
    assert get_job(session, job_id).method != "test-sleep"


def test_the_scheduler_coalesces_and_enqueues_after_commit(
    session: Session, settings: Settings, engine: Engine
) -> None:
    file(session, 4)
    visible_when_sent: list[JobState] = []

    def receive(job_id: int) -> None:  # another connection, as a worker would read it
        with session_scope(engine) as worker_session:
            visible_when_sent.append(get_job(worker_session, job_id).state)

    with in_process_runner(receive) as runner:
        done = tick(settings, engine)
        runner.drain(timeout=10)
    assert done.coalesced is not None and visible_when_sent == [JobState.queued]


def test_an_attempt_that_lost_its_lease_stops_and_records_nothing(
    session: Session, settings: Settings, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    job_id = new_job(session, test_fault={"mode": "sleep", "seconds": 2})
    with in_process_runner(partial(execute_job, settings=settings, engine=engine)) as runner:
        runner.submit(job_id)
        wait_until(lambda: get_job(session, job_id).progress > 0)
        expire_lease(session, job_id)  # as if its heartbeats had stopped reaching the database
        assert claim(session, job_id) is ClaimOutcome.claimed  # another worker's attempt 2
        runner.drain(timeout=10)
    job = get_job(session, job_id)
    assert (job.state, job.attempts, job.method) == (JobState.running, 2, None)
    assert f"job {job_id} attempt 1 lost its lease" in caplog.text


def test_a_job_refused_for_a_busy_lineage_is_sent_again_when_it_frees(
    session: Session, settings: Settings, engine: Engine
) -> None:
    first = new_job(session, test_fault={"mode": "sleep", "seconds": 0.5})
    second = new_job(session, test_fault={"mode": "sleep", "seconds": 0})
    run = partial(execute_job, settings=settings, engine=engine)
    with in_process_runner(run, threads=2) as runner:  # two workers, one lineage
        runner.submit(first)
        wait_until(lambda: get_job(session, first).state is JobState.running)
        assert execute_job(second, settings=settings, engine=engine) == "busy"
        runner.drain(timeout=10)  # no sweeper here: the first job's worker hands over
    assert get_job(session, second).state is JobState.succeeded


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_embedded_services_run_sent_jobs_and_sweep_unsent_ones(
    session: Session, settings: Settings, engine: Engine
) -> None:
    settings = settings.model_copy(
        update={"requeue_after_seconds": 0.2, "scheduler_interval_seconds": 0.05}
    )
    sent = new_job(session, test_fault={"mode": "sleep", "seconds": 0})
    unsent = new_job(session, test_fault={"mode": "sleep", "seconds": 0})  # died before sending
    with embedded_services(settings, engine):
        enqueue_job(sent, settings)
        wait_until(
            lambda: {get_job(session, j).state for j in (sent, unsent)} == {JobState.succeeded}
        )


@pytest.mark.postgres
def test_concurrent_claims_in_one_lineage_let_one_through(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    lineage = f"l-{uuid.uuid4().hex[:8]}"
    with session_scope(engine) as session:
        job_ids = [new_job(session, lineage=lineage) for _ in range(6)]
    barrier = threading.Barrier(len(job_ids))
    outcomes: list[ClaimOutcome] = []

    def race(job_id: int) -> None:
        barrier.wait()
        with session_scope(engine) as session:
            outcomes.append(claim_job(session, job_id, lease_seconds=LEASE).outcome)

    threads = [threading.Thread(target=race, args=(j,)) for j in job_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.dispose()
    assert sorted(outcomes) == sorted([ClaimOutcome.claimed] + [ClaimOutcome.busy] * 5)


@pytest.mark.postgres
def test_concurrent_sweeps_take_disjoint_rows(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    with session_scope(engine) as session:
        job_ids = {new_job(session, lineage=f"l-{uuid.uuid4().hex[:8]}") for _ in range(40)}
        session.execute(update(Job).where(Job.id.in_(job_ids)).values(enqueued_at=None))
    barrier = threading.Barrier(2)
    resent: list[list[int]] = []

    def sweep() -> None:
        with session_scope(engine) as session:
            barrier.wait()
            resent.append(sweep_stale_jobs(session, requeue_after_seconds=3600).resend)

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.dispose()
    ours = [set(r) & job_ids for r in resent]
    assert not ours[0] & ours[1] and ours[0] | ours[1] == job_ids


@pytest.mark.slow
def test_a_train_job_trains_a_serving_version_with_provenance(
    session: Session, settings: Settings, engine: Engine, tmp_path: Any
) -> None:
    settings = settings.model_copy(update={"store_url": str(tmp_path / "store")})
    job_id = new_job(session, dataset="digits", epochs=1, batch_size=64)
    assert execute_job(job_id, settings=settings, engine=engine) == "succeeded"
    job = get_job(session, job_id)
    assert (job.method, job.progress, job.attempts) == ("train", 100, 1)
    serving = alias_target(session)
    assert serving is not None and serving.job_id == job_id and serving.run_id is not None


def test_enqueue_to_a_dead_broker_returns_and_leaves_the_job_to_the_sweeper(
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = time.monotonic()
    enqueue_job(1, Settings(broker_url="redis://127.0.0.1:1/0"))  # nothing listens there
    assert time.monotonic() - started < 10
    assert "waits for the sweeper" in caplog.text
