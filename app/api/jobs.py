"""Training as a job, and the state of any job (the worker writes its progress there)."""

from typing import Annotated

from fastapi import APIRouter, Path, Request

from app.api.deps import ModelsAdmin, SessionDep, StatusReader
from app.api.errors import PROBLEM_RESPONSES
from app.dispatch import running_here
from app.ledger.jobs import create_job, get_job
from app.ledger.requests import JobView
from app.ledger.tables import Job, JobKind, JobState
from app.schemas import JobOut, JobStep, JobSummary, TrainBody

router = APIRouter(tags=["jobs"], responses=PROBLEM_RESPONSES)


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


@router.get("/jobs/{job_id}", response_model=JobOut)
def read_job(
    job_id: Annotated[int, Path(ge=1, le=2**31 - 1)], session: SessionDep, _p: StatusReader
) -> JobOut:
    return present(get_job(session, job_id))
