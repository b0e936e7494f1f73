"""Held jobs in the ledger (held → approved or rejected, the lineage a promotion hold keeps),
the task that records a hold, and the order in which a lineage's jobs start."""

from collections.abc import Iterator
from functools import partial
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from app.dispatch import in_process_runner
from app.ledger.errors import StateConflict
from app.ledger.jobs import (
    ClaimOutcome,
    approve_job,
    first_in_line,
    get_job,
    hold_job,
    reject_job,
    requests_of_job,
    succeed_job,
    sweep_stale_jobs,
)
from app.ledger.provenance import (
    DeltaRecord,
    create_run,
    mark_rolled_back,
    record_steps,
    rolled_back_steps,
)
from app.ledger.samples import samples_by_id
from app.ledger.tables import (
    AuditEvent,
    HoldStage,
    Job,
    JobKind,
    JobState,
    RequestState,
    SampleState,
    VersionState,
)
from app.ledger.versions import create_version
from app.settings import Settings
from tests.unit.test_jobs import claim, new_job, unlearn_job
from worker import pipeline
from worker.pipeline import JobHeld
from worker.tasks import execute_job

OPS = "key:9:ops"


def held(session: Session, stage: HoldStage = HoldStage.screening) -> int:
    """An unlearn job that its first attempt held at ``stage``."""
    job_id = unlearn_job(session)
    assert claim(session, job_id) is ClaimOutcome.claimed
    hold_job(session, job_id, 1, stage=stage, reason="too much", screening={"held": True})
    session.commit()
    return job_id


def events(session: Session, action: str) -> list[AuditEvent]:
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action)))


def test_a_held_job_waits_with_its_requests_open_and_costs_no_attempt(session: Session) -> None:
    job_id = held(session)
    job = get_job(session, job_id)
    assert (job.state, job.hold_stage, job.hold_reason) == (
        JobState.held,
        HoldStage.screening,
        "too much",
    )
    assert (job.attempts, job.max_attempts, job.screening) == (1, 4, {"held": True})
    assert {r.state for r in requests_of_job(session, job_id)} == {RequestState.processing}
    assert claim(session, job_id) is ClaimOutcome.busy  # a message does not run it
    assert sweep_stale_jobs(session, requeue_after_seconds=0).resend == []  # nor the sweeper
    (event,) = events(session, "jobs.hold")
    assert event.details == {"stage": "screening", "reason": "too much"}


def test_approve_queues_a_held_job_with_its_stage_approved(session: Session) -> None:
    job_id = held(session)
    job = approve_job(session, job_id, actor=OPS, reason="a legal request, reviewed")
    session.commit()
    assert (job.state, job.approved_stages) == (JobState.queued, ["screening"])
    (event,) = events(session, "jobs.approve")
    assert (event.actor, event.details["reason"]) == (OPS, "a legal request, reviewed")
    with pytest.raises(StateConflict, match="not held"):
        approve_job(session, job_id, actor=OPS, reason="again")
    assert claim(session, job_id) is ClaimOutcome.claimed


def test_reject_fails_a_held_job_and_its_requests_with_the_reason(session: Session) -> None:
    job_id = held(session)
    job = reject_job(session, job_id, actor=OPS, reason="a hostile burst")
    session.commit()
    assert job.state is JobState.failed and job.error is not None
    assert "a hostile burst" in job.error and "too much" in job.error
    requests = requests_of_job(session, job_id)
    assert {r.state for r in requests} == {RequestState.failed}
    assert all(r.error == job.error for r in requests)
    samples = samples_by_id(session, [r.sample_id for r in requests])
    assert {s.state for s in samples.values()} == {SampleState.active}  # nothing was erased
    assert [e.actor for e in events(session, "jobs.reject")] == [OPS]
    with pytest.raises(StateConflict, match="not held"):
        reject_job(session, job_id, actor=OPS, reason="again")


def test_a_promotion_hold_keeps_its_lineage_a_screening_hold_does_not(session: Session) -> None:
    held(session, HoldStage.screening)
    after_screening = new_job(session)
    assert claim(session, after_screening) is ClaimOutcome.claimed
    succeed_job(session, after_screening, 1)
    session.commit()

    promotion = held(session, HoldStage.promotion)
    waiting = new_job(session)
    assert claim(session, waiting) is ClaimOutcome.busy
    reject_job(session, promotion, actor=OPS, reason="below the floor")
    session.commit()
    assert claim(session, waiting) is ClaimOutcome.claimed


def test_rejecting_a_promotion_hold_rejects_the_candidate_and_frees_its_steps(
    session: Session,
) -> None:
    job_id = held(session, HoldStage.promotion)
    run = create_run(
        session, kind="train", dataset="toy", architecture="toy", hyperparameters={}, seed=0,
        store_prefix="runs/1",
    )  # fmt: skip
    record_steps(session, run.id, [], [DeltaRecord(0, "k", "0" * 64, "fp32", 1, [])])
    candidate = create_version(
        session, method="amnesiac", state=VersionState.auditing, job_id=job_id
    )
    mark_rolled_back(session, [(run.id, 0)], candidate.id)
    session.commit()

    reject_job(session, job_id, actor=OPS, reason="below the floor")
    session.commit()
    session.refresh(candidate)
    assert candidate.state is VersionState.rejected
    assert rolled_back_steps(session, [candidate.id]) == set()  # a later candidate may take them


def test_the_oldest_queued_job_of_a_lineage_is_first_in_line(session: Session) -> None:
    older, newer = new_job(session), new_job(session)
    elsewhere = new_job(session, lineage="shard-2")
    assert first_in_line(session, newer) == older
    assert first_in_line(session, older) == older
    assert first_in_line(session, elsewhere) == elsewhere
    assert claim(session, older) is ClaimOutcome.claimed
    assert first_in_line(session, newer) == newer  # nothing queued is older now


@pytest.fixture
def settings(sqlite_url: str) -> Settings:
    return Settings(
        database_url=sqlite_url,
        allow_test_faults=True,
        heartbeat_seconds=0.05,
        lease_seconds=5,
        requeue_after_seconds=3600,
    )


@pytest.fixture
def runner(settings: Settings, engine: Engine) -> Iterator[Any]:
    with in_process_runner(partial(execute_job, settings=settings, engine=engine)) as running:
        yield running


def start_order(session: Session, *job_ids: int) -> list[int]:
    query = select(Job).where(Job.id.in_(job_ids)).execution_options(populate_existing=True)
    jobs = list(session.scalars(query))
    assert {job.state for job in jobs} == {JobState.succeeded}
    return [job.id for job in sorted(jobs, key=lambda job: job.started_at or 0)]


def test_a_message_for_a_newer_job_runs_the_older_one_first(
    session: Session, settings: Settings, engine: Engine, runner: Any
) -> None:
    """As after a broker restart: the older job's message was lost, the newer one's arrives."""
    older = new_job(session, test_fault={"mode": "sleep", "seconds": 0})
    newer = new_job(session, test_fault={"mode": "sleep", "seconds": 0})
    execute_job(newer, settings=settings, engine=engine)
    assert get_job(session, older).state is JobState.succeeded
    runner.drain(timeout=10)  # the older job handed the lineage over to the newer one
    assert start_order(session, older, newer) == [older, newer]


def test_a_held_job_is_recorded_by_the_task_and_hands_its_lineage_over(
    session: Session,
    settings: Settings,
    engine: Engine,
    runner: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def hold(_session: Session, job: Job, *_args: Any) -> str:
        if job.params.get("hold"):
            raise JobHeld(HoldStage.screening, "too much", {"held": True})
        return "ran"

    monkeypatch.setitem(pipeline.HANDLERS, JobKind.train, hold)
    first = new_job(session, hold=True)
    second = new_job(session)
    assert execute_job(first, settings=settings, engine=engine) == "held"
    runner.drain(timeout=10)
    job = get_job(session, first)
    assert (job.state, job.hold_reason, job.screening) == (
        JobState.held,
        "too much",
        {"held": True},
    )
    assert get_job(session, second).state is JobState.succeeded
