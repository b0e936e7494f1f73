"""Training as a job, the state of any job (the worker writes its progress there), and the
operator's decision on a held job."""

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request

from app.api.deps import ModelsAdmin, SessionDep, StatusReader
from app.api.errors import PROBLEM_RESPONSES
from app.dispatch import running_here
from app.ledger.jobs import (
    approve_job,
    create_job,
    get_job,
    list_jobs,
    next_queued_in_lineage,
    reject_job,
)
from app.ledger.requests import JobView
from app.ledger.tables import Job, JobKind, JobState
from app.schemas import JobOut, JobPage, JobStep, JobSummary, OperatorDecision, TrainBody

router = APIRouter(tags=["jobs"], responses=PROBLEM_RESPONSES)
JobId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def job_summary(view: JobView) -> JobSummary:
    """The job as the ledger records it; for an attempt that runs in this process (embedded
    mode), the progress it last reported, which its heartbeat may not have written yet."""
    summary = JobSummary.model_validate(view, from_attributes=True)
    live = running_here.progress(view.id, view.attempts) if view.state == JobState.running else None
    if live is None:
        return summary
    detail = JobStep.model_validate(live.detail) if live.detail else summary.progress_detail
    return summary.model_copy(update={"progress": live.percent, "progress_detail": detail})


def present(job: Job) -> JobOut:
    return JobOut(
        job=job_summary(JobView.of(job)),
        integrity_failures=job.integrity_failures,
        screening=job.screening,
        links={"self": f"/jobs/{job.id}"},
    )


@router.post("/train", status_code=202, response_model=JobOut)
def start_training(
    body: TrainBody, request: Request, session: SessionDep, principal: ModelsAdmin
) -> JobOut:
    """Queues a training run with provenance; the version it makes serves once it finishes."""
    job = create_job(session, JobKind.train, actor=principal.actor, params=body.model_dump())
    session.commit()
    request.app.state.enqueue(job.id)  # after commit: the worker must find the row
    return present(job)


@router.get("/jobs", response_model=JobPage)
def read_jobs(
    session: SessionDep,
    _p: StatusReader,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,12}$")] = None,
) -> JobPage:
    """Newest first; `state=held` lists the jobs waiting for an operator."""
    rows = list_jobs(
        session, state=state, limit=limit + 1, after_id=int(cursor) if cursor else None
    )
    next_cursor = str(rows[limit - 1].id) if len(rows) > limit else None
    return JobPage(items=[present(job) for job in rows[:limit]], next_cursor=next_cursor)


@router.get("/jobs/{job_id}", response_model=JobOut)
def read_job(job_id: JobId, session: SessionDep, _p: StatusReader) -> JobOut:
    return present(get_job(session, job_id))


@router.post("/jobs/{job_id}/approve", response_model=JobOut)
def approve(
    job_id: JobId,
    body: OperatorDecision,
    request: Request,
    session: SessionDep,
    principal: ModelsAdmin,
) -> JobOut:
    """A held job runs on: held at screening, it runs without the screen; held at promotion,
    its candidate serves. The reason is recorded. `409` unless the job is held."""
    job = approve_job(session, job_id, actor=principal.actor, reason=body.reason)
    session.commit()
    request.app.state.enqueue(job.id)
    return present(job)


@router.post("/jobs/{job_id}/reject", response_model=JobOut)
def reject(
    job_id: JobId,
    body: OperatorDecision,
    request: Request,
    session: SessionDep,
    principal: ModelsAdmin,
) -> JobOut:
    """A held job fails: its requests fail with the reason (nothing was erased; they can be
    filed again) and a candidate held at promotion is rejected. `409` unless the job is held."""
    job = reject_job(session, job_id, actor=principal.actor, reason=body.reason)
    successor = next_queued_in_lineage(session, job.id)
    session.commit()
    if successor is not None:  # the lineage the held job kept is free
        request.app.state.enqueue(successor)
    return present(job)
