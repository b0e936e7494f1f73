"""Training as a job, and the state of any job (the worker writes its progress there)."""

from typing import Annotated

from fastapi import APIRouter, Path, Request

from app.api.deps import ModelsAdmin, SessionDep, StatusReader
from app.api.errors import PROBLEM_RESPONSES
from app.ledger.jobs import create_job, get_job
from app.ledger.requests import JobView
from app.ledger.tables import Job, JobKind
from app.schemas import JobOut, JobSummary, TrainBody

router = APIRouter(tags=["jobs"], responses=PROBLEM_RESPONSES)


def present(job: Job) -> JobOut:
    return JobOut(
        job=JobSummary.model_validate(JobView.of(job), from_attributes=True),
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
