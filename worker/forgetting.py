"""The unlearn job: the forget set of a job's requests goes up the ladder (amnesiac, amnesiac +
repair, relabel, exact retraining) until a candidate passes its audit; that candidate serves,
the requests complete, and what still holds the erased samples is purged and certified.

Two transactions. The first ends with the promotion and the completed requests: everything
before it can be redone by a retry, and nothing is erased until it has committed (the audit and
the next rung need the raw data). The second purges and writes the certificates; it is
idempotent, so a retry after a crash in between only finishes it.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy.orm import Session

from app.ledger.audits import latest_audit
from app.ledger.clock import as_utc, utcnow
from app.ledger.events import record_event
from app.ledger.jobs import requests_of_job
from app.ledger.provenance import lineage, release_rollbacks, rolled_back_steps, step_deltas
from app.ledger.requests import attach_certificate, transition_requests
from app.ledger.samples import samples_by_id, set_sample_state
from app.ledger.tables import (
    Audit,
    DeletionRequest,
    Job,
    ModelVersion,
    RequestState,
    SampleState,
    VersionState,
)
from app.ledger.versions import (
    alias_target,
    mark_weights_purged,
    promote,
    transition_version,
    versions_of_job,
)
from app.settings import Settings
from worker.audit import GatePolicy, run_audit
from worker.audit.references import purge_reference_caches
from worker.data import erase_samples
from worker.devices import resolve_device
from worker.screening import held_candidate, hold_below_floor, screen_job
from worker.store import ArtifactStore, sha256_hex
from worker.training import Progress
from worker.unlearning import LADDER, MethodOptions, plan, purge_deltas, unlearn
from worker.unlearning.common import within

# Audit artifacts that picture the erased samples (rebuilt from the two versions' difference):
# they are personal data too, and go with the purge.
SAMPLE_IMAGES = ("unlearning_inversion.png",)


class LadderExhausted(Exception):
    """Every rung's candidate failed its audit: the requests fail, with each rung's reasons."""


@dataclass(frozen=True)
class Rung:
    method: str
    version: str
    audit_id: int
    decision: str
    failed_rules: list[str]


def run_unlearn_job(
    session: Session, job: Job, progress: Progress, settings: Settings
) -> str | None:
    """Runs (or, after a crash, finishes) the job; returns the method of the promoted version."""
    store = ArtifactStore(settings.resolved_store_url)
    requests = requests_of_job(session, job.id)
    open_requests = [r for r in requests if r.state is RequestState.processing]
    if open_requests:
        screen_job(session, job, open_requests, settings)  # JobHeld above the screening policy
        version = forget(session, store, job, open_requests, within(progress, 0, 90), settings)
        session.commit()  # the promotion is durable before anything is erased
        requests = requests_of_job(session, job.id)
    uncertified = [
        r for r in requests if r.state is RequestState.completed and r.certificate is None
    ]
    if not uncertified:
        return job.method
    version = _completed_version(session, uncertified)
    purge_and_certify(session, store, job, version, uncertified, settings)
    progress(100)
    return version.method


def forget(
    session: Session,
    store: ArtifactStore,
    job: Job,
    requests: Sequence[DeletionRequest],
    progress: Progress,
    settings: Settings,
) -> ModelVersion:
    """Climbs the ladder from the planner's rung; promotes the first candidate whose audit
    passes and completes the requests with it. Raises LadderExhausted after the last rung."""
    parent = alias_target(session)
    if parent is None:
        raise LadderExhausted("nothing serves yet: train a model first (POST /train)")
    forget_ids = sorted({r.sample_id for r in requests})
    foreign = [
        s for s in samples_by_id(session, forget_ids).values() if s.dataset != _dataset(parent)
    ]
    if foreign:
        raise LadderExhausted(
            f"samples of another data set than the serving model's ({_dataset(parent)}): "
            + ", ".join(sorted(s.sample_id for s in foreign))
        )
    first = settings.ladder_start or plan(session, parent, forget_ids).method
    tried = _rejected_rungs(session, job)  # by an earlier attempt of this job: not redone
    held = held_candidate(session, job, parent)  # passed its audit, then held at the floor
    if held is not None:
        version, audit = held
        tried.append(_rung(version, audit.id, str(audit.decision), audit.reasons))
        return _promote(session, job, version, requests, tried)
    done = {rung.method for rung in tried}
    rungs = [m for m in LADDER[LADDER.index(first) :] if m not in done]
    device = resolve_device()
    for number, method in enumerate(rungs):
        span = within(progress, 100 * number // len(rungs), 100 * (number + 1) // len(rungs))
        candidate, rung = _try_rung(session, store, job, parent, forget_ids, method, device, span)
        tried.append(rung)
        if rung.decision == "pass":
            return _promote(session, job, candidate, requests, tried)
        session.commit()  # the rejected candidate and its audit stay for the operator to read
    raise LadderExhausted(
        "every rung failed its audit: "
        + "; ".join(f"{r.method} ({r.version}): {', '.join(r.failed_rules)}" for r in tried)
    )


def _rejected_rungs(session: Session, job: Job) -> list[Rung]:
    rungs = []
    for version in versions_of_job(session, job.id):
        audit = latest_audit(session, version.id)
        if version.state is VersionState.rejected and audit is not None:
            rungs.append(_rung(version, audit.id, str(audit.decision), audit.reasons))
    return rungs


def _rung(
    version: ModelVersion, audit_id: int, decision: str, reasons: list[dict[str, Any]]
) -> Rung:
    failed = [str(reason["rule"]) for reason in reasons if not reason["passed"]]
    return Rung(version.method, version.version, audit_id, decision, failed)


def _dataset(version: ModelVersion) -> str:
    dataset: str = version.details["dataset"]
    return dataset


def _try_rung(
    session: Session,
    store: ArtifactStore,
    job: Job,
    parent: ModelVersion,
    forget_ids: list[str],
    method: str,
    device: torch.device,
    progress: Progress | None,
) -> tuple[ModelVersion, Rung]:
    candidate = unlearn(
        session,
        store,
        parent,
        forget_ids,
        method,
        device,
        MethodOptions(),
        within(progress, 0, 50),
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
        within(progress, 50, 100),
        job_id=job.id,
    )
    if not audit.passed:
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
    return candidate, _rung(candidate, audit.audit_id, audit.decision, audit.reasons)


def _promote(
    session: Session,
    job: Job,
    candidate: ModelVersion,
    requests: Sequence[DeletionRequest],
    tried: list[Rung],
) -> ModelVersion:
    hold_below_floor(session, job, candidate)  # JobHeld below the accuracy floor
    _complete(session, job, candidate, requests, tried)
    return candidate


def _complete(
    session: Session,
    job: Job,
    candidate: ModelVersion,
    requests: Sequence[DeletionRequest],
    tried: list[Rung],
) -> None:
    rung = tried[-1]
    candidate.details = {**candidate.details, "ladder": [vars(r) for r in tried]}
    promote(
        session,
        candidate,
        moved_by=f"job:{job.id}",
        reason=f"audit {rung.audit_id} passed; forgets {len(requests)} sample(s) by {rung.method}",
    )
    ids = [r.id for r in requests]
    transition_requests(
        session,
        ids,
        RequestState.processing,
        RequestState.completed,
        completed_version_id=candidate.id,
    )
    set_sample_state(
        session, [r.sample_id for r in requests], SampleState.forgetting, SampleState.forgotten
    )
    record_event(
        session,
        actor=f"job:{job.id}",
        action="requests.complete",
        target=candidate.version,
        details={"requests": ids, "method": rung.method},
    )


def _completed_version(session: Session, requests: Sequence[DeletionRequest]) -> ModelVersion:
    version_ids = {r.completed_version_id for r in requests}
    if len(version_ids) != 1 or None in version_ids:
        raise RuntimeError(f"completed requests of one job name versions {version_ids}")
    version = session.get(ModelVersion, version_ids.pop())
    assert version is not None  # a foreign key
    return version


def purge_and_certify(
    session: Session,
    store: ArtifactStore,
    job: Job,
    version: ModelVersion,
    requests: Sequence[DeletionRequest],
    settings: Settings,
) -> None:
    """Erases what still holds the samples (idempotent: a re-run skips what is gone) and
    writes one certificate per request, in the store and in the request row."""
    samples = samples_by_id(session, [r.sample_id for r in requests])
    shards = erase_samples(store, _dataset(version), sorted(samples))
    rolled_back = step_deltas(session, rolled_back_steps(session, [version.id]))
    deltas = purge_deltas(
        session, store, [(d.run_id, d.step) for d in rolled_back if d.purged_at is None]
    )
    weights = (
        [] if settings.retain_superseded_weights else _purge_weights(session, store, job, version)
    )
    images = _purge_sample_images(session, store, job)
    audit = latest_audit(session, version.id)
    purged = {
        "raw_data_shards": shards,
        "step_deltas_sha256": deltas,
        "weights": weights,
        "audit_images": images,
        "audit_reference_models": purge_reference_caches(store, set(samples)),
    }
    for request in requests:
        sample = samples[request.sample_id]
        certificate = {
            "request_id": request.id,
            "sample_id": sample.sample_id,
            "dataset": sample.dataset,
            "sample_content_sha256": sample.content_sha256,
            "received_at": as_utc(request.received_at).isoformat(),
            "completed_at": as_utc(request.completed_at or utcnow()).isoformat(),
            "job_id": job.id,
            "version": version.version,
            "weights_sha256": version.weights_sha256,
            "method": version.method,
            "ladder": version.details.get("ladder", []),
            "audit": _audit_summary(audit),
            "purged": purged,
            "issued_at": utcnow().isoformat(),
        }
        key = store.put_json(f"certificates/{request.id}.json", certificate).key
        attach_certificate(session, request.id, {**certificate, "store_key": key})
    record_event(
        session,
        actor=f"job:{job.id}",
        action="samples.purge",
        target=version.version,
        details={
            "samples": sorted(samples),
            "deltas": len(deltas),
            "weights": [w["version"] for w in weights],
        },
    )


def _purge_weights(
    session: Session, store: ArtifactStore, job: Job, version: ModelVersion
) -> list[dict[str, Any]]:
    """The weights of every ancestor of the new version and of this job's rejected candidates:
    each was trained on the erased samples or derived from a version that was."""
    superseded = lineage(session, version.id)[1:] + [
        v for v in versions_of_job(session, job.id) if v.state is VersionState.rejected
    ]
    purged = []
    for old in superseded:
        if old.weights_key is None or old.weights_purged_at is not None:
            continue
        store.delete(old.weights_key)
        mark_weights_purged(session, old)
        purged.append({"version": old.version, "sha256": old.weights_sha256})
    return purged


def _purge_sample_images(session: Session, store: ArtifactStore, job: Job) -> list[dict[str, str]]:
    purged = []
    for candidate in versions_of_job(session, job.id):
        audit = latest_audit(session, candidate.id)
        for name in SAMPLE_IMAGES:
            key = audit.artifacts.get(name) if audit else None
            if key and store.exists(key):
                purged.append({"key": key, "sha256": sha256_hex(store.get_bytes(key))})
                store.delete(key)
    return purged


def _audit_summary(audit: Audit | None) -> dict[str, Any] | None:
    if audit is None:
        return None
    utility = audit.metrics.get("utility", {})
    return {
        "audit_id": audit.id,
        "decision": audit.decision,
        "report_key": audit.report_key,
        "test_accuracy": utility.get("test", {}).get("candidate"),
        "test_drop_points": utility.get("test", {}).get("drop_points"),
        "auc_forget_vs_heldout": audit.metrics.get("calibrated", {}).get("auc"),
        "rules": [{"rule": r["rule"], "passed": r["passed"]} for r in audit.reasons],
    }
