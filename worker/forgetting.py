"""The unlearn job: the forget set of a job's requests goes up the ladder (amnesiac, amnesiac +
repair, relabel, exact retraining) until a candidate passes its audit; that candidate serves,
the requests complete, and what still holds the erased samples is purged and certified.

Two transactions. The first ends with the promotion and the completed requests: everything
before it can be redone by a retry, and nothing is erased until it has committed (the audit and
the next rung need the raw data). The second purges and writes the certificates
(``worker.erasure``); it is idempotent, so a retry after a crash in between only finishes it.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session

from app.ledger.audits import latest_audit
from app.ledger.events import record_event
from app.ledger.jobs import requests_of_job
from app.ledger.provenance import (
    lineage_runs,
    release_rollbacks,
    steps_of_samples,
    weight_lineage,
)
from app.ledger.requests import transition_requests
from app.ledger.samples import set_sample_state
from app.ledger.tables import (
    DeletionRequest,
    Job,
    ModelVersion,
    RequestState,
    SampleState,
    VersionState,
)
from app.ledger.versions import alias_target, promote, transition_version, versions_of_job
from app.settings import Settings
from worker.audit import GatePolicy, run_audit
from worker.audit.gate import EXACT_RETRAINING, AuditDecision
from worker.devices import resolve_device
from worker.erasure import purge_and_certify
from worker.progress import Progress, within
from worker.screening import (
    held_candidate,
    hold_below_floor,
    hold_failed_exact_retraining,
    screen_job,
)
from worker.store import ArtifactStore, IntegrityError
from worker.unlearning import LADDER, MethodOptions, NothingToUnlearn, plan, unlearn


class LadderExhausted(Exception):
    """Every rung's candidate failed its audit: the requests fail, with each rung's reasons."""


@dataclass(frozen=True)
class TriedRung:
    """A candidate the ladder made and its audit's outcome (the planner's ``Rung`` is a rung
    not yet tried, with its prediction)."""

    method: str
    version: str
    audit_id: int
    decision: str
    failed_rules: list[str]


def run_unlearn_job(
    session: Session, job: Job, progress: Progress, settings: Settings
) -> str | None:
    """Runs (or, after a crash, finishes) the job; returns the method of the promoted version.

    Requests whose samples no step of the serving model held (a test, held-out or pool sample)
    need no unlearning: they complete and are certified first, so that neither the ladder nor
    its failure touches them."""
    store = ArtifactStore(settings.resolved_store_url)
    open_requests = [
        r for r in requests_of_job(session, job.id) if r.state is RequestState.processing
    ]
    if open_requests:
        parent = alias_target(session)
        if parent is None:
            raise LadderExhausted("nothing serves yet: train a model first (POST /train)")
        trained = _trained_on(session, parent, open_requests)
        untrained = [r for r in open_requests if r not in trained]
        if untrained:
            _complete_requests(session, job, None, untrained)
            session.commit()
            purge_and_certify(session, store, job, untrained, settings)
            session.commit()
        if trained:
            screen_job(session, job, trained)  # JobHeld above the screening policy
            forget(session, store, job, parent, trained, within(progress, 0, 90), settings)
            session.commit()  # the promotion is durable before anything is erased
    uncertified = [
        r
        for r in requests_of_job(session, job.id)
        if r.state is RequestState.completed and r.certificate is None
    ]
    if uncertified:
        purge_and_certify(session, store, job, uncertified, settings)
    progress(100)
    version = _completed_version(session, requests_of_job(session, job.id))
    return version.method if version else job.method


def _trained_on(
    session: Session, parent: ModelVersion, requests: Sequence[DeletionRequest]
) -> list[DeletionRequest]:
    """The requests whose samples were in a step of the runs the parent's weights are made of."""
    runs = {run.id for run in lineage_runs(session, weight_lineage(session, parent))}
    steps = steps_of_samples(session, [r.sample_id for r in requests])
    return [r for r in requests if any(run in runs for run, _ in steps[r.sample_id])]


def forget(
    session: Session,
    store: ArtifactStore,
    job: Job,
    parent: ModelVersion,
    requests: Sequence[DeletionRequest],
    progress: Progress | None,
    settings: Settings,
) -> ModelVersion:
    """Climbs the ladder from the planner's rung, past the rungs that cannot run; promotes the
    first candidate of ``parent`` (the serving version) whose audit passes and completes the
    requests with it. An object whose bytes fail their recorded sha256 ends its rung, recorded on
    the job; a method that would change nothing is skipped, recorded in the ladder's notes.
    Raises LadderExhausted after the last rung."""
    forget_ids = sorted({r.sample_id for r in requests})
    planned = plan(session, parent, forget_ids)
    first = settings.ladder_start or planned.method
    notes = [{"method": m, "outcome": "skipped", "reason": r} for m, r in planned.blocked.items()]
    tried = _rejected_rungs(session, job)  # by an earlier attempt of this job: not redone
    held = held_candidate(session, job, parent)  # passed its audit, then held at the floor
    if held is not None:
        version, audit = held
        tried.append(_rung(version, audit.id, str(audit.decision), audit.reasons))
        return _promote(session, job, version, requests, tried)
    done = {rung.method for rung in tried}
    rungs = [m for m in LADDER[LADDER.index(first) :] if m not in done and m not in planned.blocked]
    device = resolve_device()
    for number, method in enumerate(rungs):
        span = within(
            progress,
            100 * number // len(rungs),
            100 * (number + 1) // len(rungs),
            f"{method} (rung {LADDER.index(method) + 1} of {len(LADDER)})",
        )
        try:
            candidate, rung = _try_rung(
                session, store, job, parent, forget_ids, method, device, span
            )
        except IntegrityError as error:
            session.rollback()  # the rung's half-made candidate goes; the job records why
            notes.append(_integrity_failure(session, job, method, error))
            session.commit()
            continue
        except NothingToUnlearn as error:
            notes.append({"method": method, "outcome": "skipped", "reason": str(error)})
            continue
        tried.append(rung)
        if rung.decision == AuditDecision.passed:
            candidate.details = {**candidate.details, "ladder_notes": notes}
            return _promote(session, job, candidate, requests, tried)
        if method == EXACT_RETRAINING:
            hold_failed_exact_retraining(session, job, candidate, rung.failed_rules)
        session.commit()  # the rejected candidate and its audit stay for the operator to read
    raise LadderExhausted(
        "every rung failed: "
        + "; ".join(
            [f"{r.method} ({r.version}): {', '.join(r.failed_rules)}" for r in tried]
            + [f"{n['method']} {n['outcome']}: {n['reason']}" for n in notes]
        )
    )


def _integrity_failure(
    session: Session, job: Job, method: str, error: IntegrityError
) -> dict[str, Any]:
    failure = {
        "method": method,
        "outcome": "integrity-failure",
        "reason": "an object's bytes differ from its recorded sha256",
        "key": error.key,
        "expected_sha256": error.expected_sha256,
        "actual_sha256": error.actual_sha256,
    }
    job.integrity_failures = [*job.integrity_failures, failure]
    record_event(
        session,
        actor=f"job:{job.id}",
        action="artifacts.integrity",
        target=error.key,
        outcome="error",
        details=failure,
    )
    return failure


def _rejected_rungs(session: Session, job: Job) -> list[TriedRung]:
    rungs = []
    for version in versions_of_job(session, job.id):
        audit = latest_audit(session, version.id)
        if version.state is VersionState.rejected and audit is not None:
            rungs.append(_rung(version, audit.id, str(audit.decision), audit.reasons))
    return rungs


def _rung(
    version: ModelVersion, audit_id: int, decision: str, reasons: list[dict[str, Any]]
) -> TriedRung:
    failed = [str(reason["rule"]) for reason in reasons if not reason["passed"]]
    return TriedRung(version.method, version.version, audit_id, decision, failed)


def _try_rung(
    session: Session,
    store: ArtifactStore,
    job: Job,
    parent: ModelVersion,
    forget_ids: list[str],
    method: str,
    device: torch.device,
    progress: Progress | None,
) -> tuple[ModelVersion, TriedRung]:
    candidate = unlearn(
        session,
        store,
        parent,
        forget_ids,
        method,
        device,
        MethodOptions(),
        within(progress, 0, 50, "unlearning"),
    )
    candidate.job_id = job.id
    transition_version(session, candidate, {VersionState.candidate}, VersionState.auditing)
    audit = run_audit(
        session,
        store,
        candidate,
        parent,
        forget_ids,
        device,
        GatePolicy(),
        within(progress, 50, 100, "audit"),
        job_id=job.id,
    )
    if not audit.passed and method != EXACT_RETRAINING:  # exact retraining goes to an operator
        transition_version(session, candidate, {VersionState.auditing}, VersionState.rejected)
        release_rollbacks(session, candidate.id)  # a later rung may subtract those steps
        record_event(
            session,
            actor=f"job:{job.id}",
            action="models.reject",
            target=candidate.version,
            outcome="rejected",
            details={"method": method, "audit": audit.audit_id, "reasons": audit.reasons},
        )
    decision = AuditDecision.passed if audit.passed else AuditDecision.failed
    return candidate, _rung(candidate, audit.audit_id, decision, audit.reasons)


def _promote(
    session: Session,
    job: Job,
    candidate: ModelVersion,
    requests: Sequence[DeletionRequest],
    tried: list[TriedRung],
) -> ModelVersion:
    hold_below_floor(session, job, candidate)  # JobHeld below the accuracy floor
    _complete(session, job, candidate, requests, tried)
    return candidate


def _complete(
    session: Session,
    job: Job,
    candidate: ModelVersion,
    requests: Sequence[DeletionRequest],
    tried: list[TriedRung],
) -> None:
    rung = tried[-1]
    candidate.details = {**candidate.details, "ladder": [vars(r) for r in tried]}
    promote(
        session,
        candidate,
        moved_by=f"job:{job.id}",
        reason=f"audit {rung.audit_id} passed; forgets {len(requests)} sample(s) by {rung.method}",
    )
    _complete_requests(session, job, candidate, requests)


def _complete_requests(
    session: Session,
    job: Job,
    version: ModelVersion | None,
    requests: Sequence[DeletionRequest],
) -> None:
    """The requests are honoured by ``version``, or need no model unlearning when None."""
    ids = [r.id for r in requests]
    transition_requests(
        session,
        ids,
        RequestState.processing,
        RequestState.completed,
        completed_version_id=version.id if version else None,
    )
    set_sample_state(
        session, [r.sample_id for r in requests], SampleState.forgetting, SampleState.forgotten
    )
    record_event(
        session,
        actor=f"job:{job.id}",
        action="requests.complete",
        target=version.version if version else f"job:{job.id}",
        details={"requests": ids, "method": version.method if version else None},
    )


def _completed_version(
    session: Session, requests: Sequence[DeletionRequest]
) -> ModelVersion | None:
    """The version the job's requests completed in (None when none needed unlearning)."""
    version_ids = {r.completed_version_id for r in requests} - {None}
    if len(version_ids) > 1:
        raise RuntimeError(f"completed requests of one job name versions {version_ids}")
    return session.get(ModelVersion, version_ids.pop()) if version_ids else None
