"""Jobs: the outbox rows the worker claims, heartbeats and finishes.

State machine: queued → running → succeeded | failed | dead, and running → queued when an attempt
is lost or crashes while attempts remain. Every transition is a compare-and-set. ``attempts``
counts claims and doubles as a fencing token: a worker may only heartbeat or finish the attempt it
claimed, so a holder that lost its lease cannot overwrite the attempt that replaced it.

running → held when the screen or the accuracy floor stops an unlearn job for an operator;
held → queued (approve: the stage is not screened again) or held → failed (reject, with the
operator's reason). A job held at promotion keeps its lineage, like a running one: its candidate
is the lineage's next version, and a version promoted meanwhile would be lost on approval.
"""

import enum
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from app.ledger.clock import as_utc, utcnow
from app.ledger.db import affected_rows
from app.ledger.errors import NotFound, StateConflict
from app.ledger.events import record_event
from app.ledger.provenance import release_rollbacks
from app.ledger.requests import transition_requests
from app.ledger.samples import set_sample_state
from app.ledger.tables import (
    DeletionRequest,
    HoldStage,
    Job,
    JobKind,
    JobState,
    RequestState,
    SampleState,
    VersionState,
)
from app.ledger.versions import transition_version, versions_of_job

DEFAULT_LINEAGE = "serving"
FINISHED_STATES = (JobState.succeeded, JobState.failed, JobState.dead)
# First key of the two-key advisory lock, so that lineage locks cannot collide with other locks.
_LINEAGE_LOCK_SPACE = 0x1E7E
_ACTOR = "worker"


class ClaimOutcome(enum.StrEnum):
    claimed = "claimed"
    finished = "finished"  # already terminal: the task returns early
    busy = "busy"  # a live attempt holds it, or its lineage: the sweeper sends it again later
    dead = "dead"  # no attempts left: this claim buried it


@dataclass(frozen=True)
class Claim:
    outcome: ClaimOutcome
    job: Job


@dataclass(frozen=True)
class Sweep:
    resend: list[int]  # jobs to hand to the broker again, after commit
    dead: list[int]


def create_job(
    session: Session,
    kind: JobKind,
    *,
    actor: str,
    params: dict[str, Any] | None = None,
    max_attempts: int = 3,
    lineage: str = DEFAULT_LINEAGE,
) -> Job:
    """Adds a queued job; the caller commits, then hands its ID to ``app.dispatch.enqueue_job``."""
    job = Job(
        kind=kind,
        state=JobState.queued,
        lineage=lineage,
        params=params or {},
        max_attempts=max_attempts,
        enqueued_at=utcnow(),
    )
    session.add(job)
    session.flush()
    record_event(session, actor=actor, action=f"jobs.{kind.value}", target=f"job:{job.id}")
    return job


def get_job(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise NotFound(f"unknown job {job_id}")
    return job


def list_jobs(
    session: Session, *, state: JobState | None = None, limit: int = 50, after_id: int | None = None
) -> list[Job]:
    """Newest first, keyset-paginated on the ID."""
    query = select(Job).order_by(Job.id.desc()).limit(limit)
    if state is not None:
        query = query.where(Job.state == state)
    if after_id is not None:
        query = query.where(Job.id < after_id)
    return list(session.scalars(query))


def jobs_by_id(session: Session, job_ids: set[int]) -> dict[int, Job]:
    if not job_ids:
        return {}
    return {job.id: job for job in session.scalars(select(Job).where(Job.id.in_(job_ids)))}


def requests_of_job(session: Session, job_id: int) -> list[DeletionRequest]:
    return list(
        session.scalars(
            select(DeletionRequest)
            .where(DeletionRequest.job_id == job_id)
            .order_by(DeletionRequest.received_at, DeletionRequest.id)
            .execution_options(populate_existing=True)
        )
    )


def _cas(session: Session, job_id: int, *conditions: ColumnElement[bool], **values: Any) -> bool:
    statement = update(Job).where(Job.id == job_id, *conditions).values(**values)
    result = session.execute(statement.execution_options(synchronize_session=False))
    return affected_rows(result) == 1


def _held_by(attempt: int) -> ColumnElement[bool]:
    return (Job.state == JobState.running) & (Job.attempts == attempt)


def _claimable(now: datetime) -> ColumnElement[bool]:
    """Queued, or running under a lease nobody renewed: its holder is presumed dead."""
    return or_(
        Job.state == JobState.queued,
        (Job.state == JobState.running) & (Job.lease_until < now),
    )


def _lineage_free_for(job_id: int) -> ColumnElement[bool]:
    other = aliased(Job)
    holds_lineage = (other.state == JobState.running) | (
        (other.state == JobState.held) & (other.hold_stage == HoldStage.promotion)
    )
    return ~exists().where(other.lineage == Job.lineage, holds_lineage, other.id != job_id)


def _lock_lineage_of(session: Session, job_id: int) -> None:
    """Serialises claims within a lineage until commit; SQLite serialises every writer anyway."""
    if session.get_bind().dialect.name != "postgresql":
        return
    lineage = session.scalar(select(Job.lineage).where(Job.id == job_id))
    if lineage is not None:
        key = func.hashtext(lineage)
        session.execute(select(func.pg_advisory_xact_lock(_LINEAGE_LOCK_SPACE, key)))


def claim_job(session: Session, job_id: int, *, lease_seconds: float) -> Claim:
    """Queued (or running with an expired lease) → running, at most one per lineage.

    The caller commits at once, so that the claim and its lease are visible to everyone.
    """
    _lock_lineage_of(session, job_id)
    now = utcnow()
    claimed = _cas(
        session,
        job_id,
        Job.attempts < Job.max_attempts,
        _claimable(now),
        _lineage_free_for(job_id),
        state=JobState.running,
        attempts=Job.attempts + 1,
        started_at=now,
        heartbeat_at=now,
        lease_until=now + timedelta(seconds=lease_seconds),
        progress=0,
        progress_detail=None,
    )
    job = get_job(session, job_id)
    if claimed:
        return Claim(ClaimOutcome.claimed, job)
    if job.state in FINISHED_STATES:
        return Claim(ClaimOutcome.finished, job)
    exhausted = Job.attempts >= Job.max_attempts
    if _bury(
        session,
        job,
        f"gave up after {job.attempts} attempt(s); last: {job.error}",
        exhausted,
        _claimable(now),
    ):
        return Claim(ClaimOutcome.dead, get_job(session, job_id))
    return Claim(ClaimOutcome.busy, job)


def heartbeat(
    session: Session,
    job_id: int,
    attempt: int,
    *,
    lease_seconds: float,
    progress: int | None = None,
    detail: dict[str, Any] | None = None,
) -> bool:
    """Renews the lease (and records progress 0-100 with what the job is doing); False when
    this attempt no longer holds it."""
    now = utcnow()
    values: dict[str, Any] = {
        "heartbeat_at": now,
        "lease_until": now + timedelta(seconds=lease_seconds),
    }
    if progress is not None:
        values["progress"] = max(0, min(100, progress))
    if detail is not None:
        values["progress_detail"] = detail
    return _cas(session, job_id, _held_by(attempt), **values)


def holds(session: Session, job_id: int, attempt: int) -> bool:
    """Whether ``attempt`` still holds the job: it runs, and no later attempt claimed it."""
    held = select(Job.id).where(Job.id == job_id, _held_by(attempt))
    return session.scalar(held) is not None


def succeed_job(session: Session, job_id: int, attempt: int, *, method: str | None = None) -> None:
    values: dict[str, Any] = {"progress": 100, "error": None}
    if method is not None:
        values["method"] = method
    if not _cas(session, job_id, _held_by(attempt), **_terminal(JobState.succeeded), **values):
        raise StateConflict(f"attempt {attempt} of job {job_id} no longer holds it")
    record_event(session, actor=_ACTOR, action="jobs.succeeded", target=f"job:{job_id}")


def fail_job(session: Session, job_id: int, attempt: int, error: str) -> None:
    """A failure that retrying cannot fix: the job and its open requests end ``failed``."""
    job = get_job(session, job_id)
    if not _close(session, job, JobState.failed, error, _held_by(attempt)):
        raise StateConflict(f"attempt {attempt} of job {job_id} no longer holds it")


def fail_attempt(session: Session, job_id: int, attempt: int, error: str) -> JobState:
    """A crashed attempt: back to ``queued`` while attempts remain (the caller re-sends it after
    commit), else ``dead`` with its open requests ``failed``."""
    job = get_job(session, job_id)
    if _bury(session, job, error, _held_by(attempt), Job.attempts >= Job.max_attempts):
        return JobState.dead
    requeued = _cas(
        session,
        job_id,
        _held_by(attempt),
        state=JobState.queued,
        error=error,
        lease_until=None,
        progress_detail=None,
        enqueued_at=utcnow(),
    )
    if not requeued:
        raise StateConflict(f"attempt {attempt} of job {job_id} no longer holds it")
    return JobState.queued


def release_lease(session: Session, job_id: int, reason: str) -> bool:
    """Expires the lease of a running job whose process is known to be gone (the Celery parent
    saw its pool child die), so the redelivered message may claim it without waiting."""
    running = Job.state == JobState.running
    return _cas(session, job_id, running, lease_until=utcnow(), error=f"attempt lost: {reason}")


def next_queued_in_lineage(session: Session, job_id: int) -> int | None:
    """The oldest job waiting for the lineage of ``job_id``: a claim refused it while that lineage
    was busy, so whoever frees the lineage sends it again."""
    lineage = select(Job.lineage).where(Job.id == job_id).scalar_subquery()
    waiting = select(Job.id).where(Job.lineage == lineage, Job.state == JobState.queued)
    return session.scalar(waiting.order_by(Job.id).limit(1))


def first_in_line(session: Session, job_id: int) -> int:
    """The job to run when a message asks for ``job_id``: the oldest queued job of its lineage
    if that one is older, so jobs start in the order they were made (their requests' order)
    even when an old job's message was lost and newer messages arrive first. The newer job waits
    for the older one to hand the lineage over."""
    oldest = next_queued_in_lineage(session, job_id)
    return oldest if oldest is not None and oldest < job_id else job_id


def sweep_stale_jobs(
    session: Session,
    *,
    requeue_after_seconds: float,
    running_here: Collection[tuple[int, int]] = (),
) -> Sweep:
    """Lost attempts (lease expired) go back to queued, or dead without attempts left; queued jobs
    that no worker took within ``requeue_after_seconds`` are due to be sent again.

    ``running_here``: (job, attempt) pairs that run in the caller's own process (embedded mode),
    alive whatever their lease says: their heartbeat may wait on the job's own SQLite lock."""
    now = utcnow()
    resend: list[int] = []
    dead: list[int] = []
    expired = (Job.state == JobState.running) & (Job.lease_until < now)
    for job in _lock_rows(session, expired):
        if (job.id, job.attempts) in running_here:
            continue
        error = f"attempt {job.attempts} lost: lease expired"
        if _bury(session, job, error, expired, Job.attempts >= Job.max_attempts):
            dead.append(job.id)
        elif _cas(
            session,
            job.id,
            expired,
            state=JobState.queued,
            error=error,
            lease_until=None,
            progress_detail=None,
            enqueued_at=now,
        ):
            resend.append(job.id)
    cutoff = now - timedelta(seconds=requeue_after_seconds)
    waiting = (Job.state == JobState.queued) & or_(
        Job.enqueued_at.is_(None), Job.enqueued_at < cutoff
    )
    for job in _lock_rows(session, waiting):
        if _cas(session, job.id, waiting, enqueued_at=now):
            resend.append(job.id)
    return Sweep(resend=resend, dead=dead)


def _lock_rows(session: Session, condition: ColumnElement[bool]) -> list[Job]:
    # SKIP LOCKED: several schedulers can sweep at once without waiting on each other's rows.
    query = select(Job).where(condition).order_by(Job.id).with_for_update(skip_locked=True)
    return list(session.scalars(query))


def coalesce_pending_requests(
    session: Session,
    *,
    window_seconds: float,
    max_requests: int,
    max_attempts: int,
    actor: str,
    params: dict[str, Any] | None = None,
) -> Job | None:
    """Once the oldest pending request has waited ``window_seconds``, moves the pending requests
    (oldest first, at most ``max_requests``) into one new unlearn job: requests → processing with
    its ID, their samples → forgetting. The caller commits, then enqueues the job."""
    oldest = session.scalar(
        select(func.min(DeletionRequest.received_at)).where(
            DeletionRequest.state == RequestState.pending
        )
    )
    if oldest is None or as_utc(oldest) > utcnow() - timedelta(seconds=window_seconds):
        return None
    batch = list(
        session.scalars(
            select(DeletionRequest)
            .where(DeletionRequest.state == RequestState.pending)
            .order_by(DeletionRequest.received_at, DeletionRequest.id)
            .limit(max_requests)
            .with_for_update(skip_locked=True)
        )
    )
    if not batch:
        return None
    job = create_job(
        session, JobKind.unlearn, actor=actor, params=params, max_attempts=max_attempts
    )
    transition_requests(
        session, [r.id for r in batch], RequestState.pending, RequestState.processing, job_id=job.id
    )
    set_sample_state(
        session, [r.sample_id for r in batch], SampleState.active, SampleState.forgetting
    )
    return job


def record_screening(session: Session, job_id: int, screening: dict[str, Any]) -> None:
    """The screen a job passed. Written in a transaction of its own, never in the job's: the
    job's would lock the job's row until its end, and the heartbeat could not renew the lease."""
    _cas(session, job_id, screening=screening)


def hold_job(
    session: Session,
    job_id: int,
    attempt: int,
    *,
    stage: HoldStage,
    reason: str,
    screening: dict[str, Any] | None = None,
) -> None:
    """running → held for an operator. The attempt did not fail, so it costs none of the job's
    attempts; the requests stay processing (open: their deadlines still count)."""
    values: dict[str, Any] = {"hold_stage": stage, "hold_reason": reason}
    if screening is not None:
        values["screening"] = screening
    held = _cas(
        session,
        job_id,
        _held_by(attempt),
        state=JobState.held,
        lease_until=None,
        max_attempts=Job.max_attempts + 1,
        **values,
    )
    if not held:
        raise StateConflict(f"attempt {attempt} of job {job_id} no longer holds it")
    record_event(
        session,
        actor=_ACTOR,
        action="jobs.hold",
        target=f"job:{job_id}",
        outcome="held",
        details={"stage": stage.value, "reason": reason[-1000:]},
    )


def _held_job(session: Session, job_id: int) -> Job:
    job = get_job(session, job_id)
    if job.state is not JobState.held or job.hold_stage is None:
        raise StateConflict(f"job {job_id} is {job.state.value}, not held: nothing to decide")
    return job


def approve_job(session: Session, job_id: int, *, actor: str, reason: str) -> Job:
    """held → queued; the stage it was held at is not checked again for this job. The caller
    commits, then enqueues the job."""
    job = _held_job(session, job_id)
    stage = job.hold_stage
    assert stage is not None  # _held_job
    approved = _cas(
        session,
        job_id,
        Job.state == JobState.held,
        state=JobState.queued,
        enqueued_at=utcnow(),
        approved_stages=[*job.approved_stages, stage.value],
    )
    if not approved:
        raise StateConflict(f"job {job_id} was decided concurrently")
    record_event(
        session,
        actor=actor,
        action="jobs.approve",
        target=f"job:{job_id}",
        details={"stage": stage.value, "reason": reason, "hold_reason": job.hold_reason},
    )
    return get_job(session, job_id)


def reject_job(session: Session, job_id: int, *, actor: str, reason: str) -> Job:
    """held → failed: the job's open requests fail with the operator's reason (their samples are
    active again: nothing was erased) and a candidate held at promotion is rejected. The caller
    commits, then enqueues ``next_queued_in_lineage``: the lineage is free again."""
    job = _held_job(session, job_id)
    stage = job.hold_stage
    assert stage is not None  # _held_job
    for candidate in versions_of_job(session, job_id):
        if candidate.state is VersionState.auditing:  # audited, held at the floor
            transition_version(session, candidate, {VersionState.auditing}, VersionState.rejected)
            release_rollbacks(session, candidate.id)
    error = f"rejected by {actor}: {reason} (held at {stage.value}: {job.hold_reason})"
    held = Job.state == JobState.held
    if not _close(session, job, JobState.failed, error, held, actor=actor, split_requests=False):
        raise StateConflict(f"job {job_id} was decided concurrently")
    record_event(
        session,
        actor=actor,
        action="jobs.reject",
        target=f"job:{job_id}",
        details={"stage": stage.value, "reason": reason, "hold_reason": job.hold_reason},
    )
    return get_job(session, job_id)


def _terminal(state: JobState) -> dict[str, Any]:
    return {"state": state, "finished_at": utcnow(), "lease_until": None, "progress_detail": None}


def _bury(session: Session, job: Job, error: str, *conditions: ColumnElement[bool]) -> bool:
    """→ dead where ``conditions`` hold: a failure an operator sees, never an endless requeue."""
    return _close(session, job, JobState.dead, error, *conditions)


def _close(
    session: Session,
    job: Job,
    state: JobState,
    error: str,
    *conditions: ColumnElement[bool],
    actor: str = _ACTOR,
    split_requests: bool = True,
) -> bool:
    """→ ``state`` where ``conditions`` hold. A failure of several open requests splits them
    into jobs of their own (one request's failure never fails the others), unless the failure is
    a decision about all of them (an operator's rejection)."""
    if not _cas(session, job.id, *conditions, **_terminal(state), error=error):
        return False
    split = _split_open_requests(session, job) if split_requests else []
    if split:
        error = f"{error}; its requests go on alone, in jobs {', '.join(map(str, split))}"
        _cas(session, job.id, error=error)
    else:
        _fail_open_requests(session, job.id, error)
    record_event(
        session,
        actor=actor,
        action=f"jobs.{state.value}",
        target=f"job:{job.id}",
        outcome="error",
        details={"error": error[-1000:]},
    )
    return True


def _split_open_requests(session: Session, job: Job) -> list[int]:
    """A failed unlearn job of several open requests becomes one job per request, so that one
    request's failure never fails the others: each gets its own outcome and reason. The new jobs
    are left unsent (``enqueued_at`` empty): the scheduler's next sweep sends them."""
    open_requests = [
        r for r in requests_of_job(session, job.id) if r.state is RequestState.processing
    ]
    if job.kind is not JobKind.unlearn or len(open_requests) < 2:
        return []
    split = []
    for request in open_requests:
        alone = create_job(
            session,
            JobKind.unlearn,
            actor=_ACTOR,
            params=job.params,
            max_attempts=job.max_attempts,
            lineage=job.lineage,
        )
        alone.enqueued_at = None
        request.job_id = alone.id
        split.append(alone.id)
    session.flush()
    return split


def _fail_open_requests(session: Session, job_id: int, error: str) -> None:
    """The job's requests end ``failed`` (visible, re-requestable); their samples are active again
    because nothing was erased."""
    open_requests = [
        r for r in requests_of_job(session, job_id) if r.state is RequestState.processing
    ]
    if not open_requests:
        return
    transition_requests(
        session,
        [r.id for r in open_requests],
        RequestState.processing,
        RequestState.failed,
        error=error,
    )
    set_sample_state(
        session, [r.sample_id for r in open_requests], SampleState.forgetting, SampleState.active
    )
