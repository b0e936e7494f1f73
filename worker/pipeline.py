"""What a job does, by kind: plain Python, called by the task once the job is claimed.

Handlers import their tensor code inside the function, so that the Celery parent process (which
imports this module) never loads torch; only a pool process running a job does.
"""

import os
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.orm import Session

from app.ledger.errors import StateConflict
from app.ledger.events import record_event
from app.ledger.tables import HoldStage, Job, JobKind
from app.settings import Settings
from worker.progress import Progress, Step, within

Handler = Callable[[Session, Job, Progress, Settings], str | None]


class JobFailed(Exception):
    """A failure that retrying cannot fix: the job and its requests end ``failed`` at once."""


class JobHeld(Exception):
    """The job waits for an operator; the task records the hold (``held``) once the job's
    transaction is rolled back, so whatever must survive the hold is committed before this is
    raised."""

    def __init__(
        self, stage: HoldStage, reason: str, screening: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"held at {stage.value}: {reason}")
        self.stage = stage
        self.reason = reason
        self.screening = screening


def run_job(session: Session, job: Job, progress: Progress, *, settings: Settings) -> str | None:
    """Runs the job's handler in the caller's transaction; returns the method it used."""
    fault = job.params.get("test_fault")
    if fault is not None and settings.allow_test_faults:
        return _inject_fault(session, job, fault, progress)
    handler = HANDLERS.get(job.kind)
    if handler is None:
        raise JobFailed(f"no handler for {job.kind.value} jobs: audits run inside unlearn jobs")
    return handler(session, job, progress, settings)


def _train(session: Session, job: Job, progress: Progress, settings: Settings) -> str:
    """Ingests the data set (re-runnable) and trains a version with provenance; the version
    serves at once only when nothing serves yet (``train_first_version``)."""
    from worker.audit import prepare_audits, run_baseline_audit
    from worker.data import SourceUnavailable, ingest, open_source
    from worker.devices import resolve_device
    from worker.store import ArtifactStore
    from worker.training import TrainConfig, train_first_version

    params = job.params
    store = ArtifactStore(settings.resolved_store_url)
    progress(0, Step("loading the data set"))
    try:
        raw = open_source(params.get("dataset", "digits"))
    except SourceUnavailable as error:
        raise JobFailed(str(error)) from error
    ingest(session, store, raw, seed=0)
    config = TrainConfig(
        epochs=params.get("epochs", 10),
        batch_size=params.get("batch_size", 64),
        optimizer=params.get("optimizer", "sgd"),
        lr=params.get("learning_rate", 0.05),
        seed=params.get("seed", 0),
        delta_dtype=params.get("delta_dtype", "fp32"),
    )
    architecture = params.get("architecture", "small-cnn")
    device = resolve_device()
    prepare = params.get("prepare_audits", True)
    version = train_first_version(
        session,
        store,
        raw.name,
        architecture,
        config,
        device,
        within(progress, 0, 20 if prepare else 100, "training"),
    )
    version.job_id = job.id
    if prepare:  # the reference models, then the trained version's own (baseline) audit
        prepare_audits(
            session, store, version, device, progress=within(progress, 20, 95, "audit models")
        )
        progress(95, Step("baseline audit"))
        run_baseline_audit(session, store, version, device, job_id=job.id)
    return "train"


def _unlearn(session: Session, job: Job, progress: Progress, settings: Settings) -> str | None:
    from worker.forgetting import LadderExhausted, run_unlearn_job

    try:
        return run_unlearn_job(session, job, progress, settings)
    except LadderExhausted as error:
        raise JobFailed(str(error)) from error


HANDLERS: dict[JobKind, Handler] = {
    JobKind.train: _train,
    JobKind.unlearn: _unlearn,
}


def _inject_fault(session: Session, job: Job, fault: dict[str, object], progress: Progress) -> str:
    """Failure tests only (``LETHE_ALLOW_TEST_FAULTS``): a job that is slow, raises, fails, meets
    a conflict in the ledger or kills its process, deterministically, in place of its real
    handler."""
    mode = fault.get("mode")
    if mode == "sleep":
        holding = session if fault.get("hold_ledger") else None
        _sleep_reporting(float(str(fault.get("seconds", 1.0))), progress, holding, job.id)
        return "test-sleep"
    if mode == "raise":
        raise RuntimeError("test fault: raise")
    if mode == "conflict":
        raise StateConflict("test fault: a row changed under the job")
    if mode == "fail":
        raise JobFailed("test fault: fail")
    if mode == "crash":
        os._exit(70)  # as SIGKILL or the OOM killer would: no cleanup, no exception
    raise JobFailed(f"unknown test fault {fault!r}")


def _sleep_reporting(
    seconds: float, progress: Progress, holding: Session | None = None, job_id: int = 0
) -> None:
    """``holding``: a session that writes before each half of the sleep and commits between
    them, so that it holds the ledger (SQLite's only write lock) as a real job does: an unlearn
    job through each rung, with a commit between rungs."""
    ticks = 10
    for tick in range(1, ticks + 1):
        if holding is not None and tick in (1, ticks // 2 + 1):
            holding.commit()
            record_event(holding, actor=f"job:{job_id}", action="jobs.test", target="hold")
            holding.flush()
        time.sleep(seconds / ticks)
        progress(tick * 100 // ticks, Step("sleeping", tick, ticks, "ticks"))
