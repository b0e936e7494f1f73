"""The purge of a job's erased samples and their signed certificates (docs/erasure.md).

What is deleted is the erasure closure of ``app.ledger.erasure``, whatever method served. The
purge is planned first: one ``purged_artifacts`` row per object (per run for step deltas), with
the digest of what it deletes, committed before anything is deleted. A retry after a crash
then deletes what the plan names, even objects whose listing (a reference folder's manifest)
the crash already removed, and certifies them.
"""

import posixpath
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from app.certificates import FORMAT, CertificateKey, certificate_key
from app.ledger.audits import latest_audit
from app.ledger.clock import as_utc, utcnow
from app.ledger.erasure import (
    Closure,
    Derived,
    ErasureGraph,
    Kind,
    deltas_in_ranges,
    digest_of_digests,
    purged_rows,
    step_ranges,
)
from app.ledger.events import record_event
from app.ledger.requests import attach_certificate
from app.ledger.samples import samples_by_id
from app.ledger.tables import Audit, DeletionRequest, Job, ModelVersion, PurgedArtifact, Sample
from app.ledger.versions import get_version, mark_weights_purged
from app.settings import Settings
from worker.data import erase_samples
from worker.store import ArtifactStore, sha256_hex
from worker.unlearning import purge_deltas

RAW_DIGEST = "hmac-sha256"  # keyed: a plain digest of a shard that holds one sample names it
DELTAS_DIGEST = "sha256-of-digests"
# A legal hold (LETHE_RETAIN_SUPERSEDED_WEIGHTS) keeps these; certificates say so.
RETAINABLE = (Kind.weights, Kind.model_cache)
LEGAL_HOLD = "kept under a legal hold (LETHE_RETAIN_SUPERSEDED_WEIGHTS)"


def purge_and_certify(
    session: Session,
    store: ArtifactStore,
    job: Job,
    requests: Sequence[DeletionRequest],
    settings: Settings,
) -> None:
    """Erases the closure of every request's sample (idempotent) and writes one signed
    certificate per request, in the store and in the request row."""
    key = certificate_key(settings.resolved_certificate_key_file)
    ids = {r.id for r in requests}
    samples = samples_by_id(session, [r.sample_id for r in requests])
    rows = [row for row in purged_rows(session, job_id=job.id) if ids & set(row.request_ids)]
    if not rows:
        rows = _plan(session, store, job, requests, samples, settings, key)
        session.commit()  # the plan is on record before anything is deleted
    _delete(session, store, samples, rows)
    held = (
        _retained(session, store, requests, samples) if settings.retain_superseded_weights else {}
    )
    for request in requests:
        sample = samples[request.sample_id]
        _certify(session, store, job, request, sample, rows, held.get(request.id, []), key)
    for sample in samples.values():
        sample.content_sha256 = None  # the certificates keep a keyed digest instead
    record_event(
        session,
        actor=f"job:{job.id}",
        action="samples.purge",
        target=f"job:{job.id}",
        details={"samples": sorted(samples), "objects": len(rows)},
    )


def _plan(
    session: Session,
    store: ArtifactStore,
    job: Job,
    requests: Sequence[DeletionRequest],
    samples: dict[str, Sample],
    settings: Settings,
    key: CertificateKey,
) -> list[PurgedArtifact]:
    graph = ErasureGraph(session, store)
    retained = [v.id for v in graph.versions] if settings.retain_superseded_weights else []
    shared: dict[tuple[str, str], PurgedArtifact] = {}
    for request in requests:
        closure = graph.closure(samples[request.sample_id], request.completed_version_id, retained)
        _delta_rows(job, request, closure, shared)
        present = store.present(o.key for o in closure.objects)
        for found in closure.objects:
            if found.key not in present or (retained and found.kind in RETAINABLE):
                continue
            row = shared.get((found.kind, found.key))
            if row is None:
                row = shared[(found.kind, found.key)] = _object_row(store, job, found, key)
            row.request_ids = [*row.request_ids, request.id]
    rows = list(shared.values())
    session.add_all(rows)
    session.flush()
    return rows


def _delta_rows(
    job: Job,
    request: DeletionRequest,
    closure: Closure,
    shared: dict[tuple[str, str], PurgedArtifact],
) -> None:
    """One row per run and set of steps; requests whose samples share it (a whole run) share
    the row."""
    for run_id, deltas in closure.deltas.items():
        live = [d for d in deltas if d.purged_at is None]
        if not live:
            continue
        steps = step_ranges(d.step for d in live)
        row = shared.get((Kind.step_deltas.value, f"{run_id}:{steps}"))
        if row is None:
            row = shared[(Kind.step_deltas.value, f"{run_id}:{steps}")] = PurgedArtifact(
                kind=Kind.step_deltas.value,
                key=posixpath.dirname(live[0].store_key) + "/",
                digest_algorithm=DELTAS_DIGEST,
                digest=digest_of_digests(live),
                details={
                    "run_id": run_id,
                    "steps": steps,
                    "count": len(live),
                    "reason": closure.delta_reasons[run_id],
                },
                job_id=job.id,
                request_ids=[],
            )
        row.request_ids = [*row.request_ids, request.id]


def _object_row(
    store: ArtifactStore, job: Job, found: Derived, key: CertificateKey
) -> PurgedArtifact:
    sha256 = found.sha256 or sha256_hex(store.get_bytes(found.key))
    raw = found.kind is Kind.raw_data
    return PurgedArtifact(
        kind=found.kind.value,
        key=found.key,
        digest_algorithm=RAW_DIGEST if raw else "sha256",
        digest=key.keyed_digest(sha256) if raw else sha256,
        details={"reason": found.reason, **({"version": found.version} if found.version else {})},
        job_id=job.id,
        request_ids=[],
    )


def _delete(
    session: Session, store: ArtifactStore, samples: dict[str, Sample], rows: list[PurgedArtifact]
) -> None:
    by_dataset: dict[str, list[str]] = {}
    for sample in samples.values():
        by_dataset.setdefault(sample.dataset, []).append(sample.sample_id)
    for dataset, ids in by_dataset.items():
        erase_samples(store, dataset, sorted(ids))  # rewrites the shards that held them
    now = utcnow()
    for row in rows:
        if row.kind == Kind.step_deltas:
            deltas = deltas_in_ranges(session, row.details["run_id"], row.details["steps"])
            purge_deltas(session, store, [(d.run_id, d.step) for d in deltas])
        else:
            store.delete(row.key)
        if row.kind == Kind.weights:
            version = get_version(session, row.details["version"])
            if version.weights_purged_at is None:
                mark_weights_purged(session, version)
        row.purged_at = row.purged_at or now


def _certify(
    session: Session,
    store: ArtifactStore,
    job: Job,
    request: DeletionRequest,
    sample: Sample,
    rows: list[PurgedArtifact],
    retained: list[dict[str, Any]],
    key: CertificateKey,
) -> None:
    version = (
        session.get(ModelVersion, request.completed_version_id)
        if request.completed_version_id
        else None
    )
    mine = [row for row in rows if request.id in row.request_ids]
    store_key = f"certificates/{request.id}.json"
    body = {
        "format": FORMAT,
        "request_id": request.id,
        "sample_id": sample.sample_id,
        "dataset": sample.dataset,
        "split": sample.split.value,
        "sample_content_hmac_sha256": (
            key.keyed_digest(sample.content_sha256) if sample.content_sha256 else None
        ),
        "received_at": as_utc(request.received_at).isoformat(),
        "completed_at": as_utc(request.completed_at or utcnow()).isoformat(),
        "issued_at": utcnow().isoformat(),
        "job_id": job.id,
        "model_unlearning": _model_unlearning(version, sample),
        "version": version.version if version else None,
        "weights_sha256": version.weights_sha256 if version else None,
        "method": version.method if version else None,
        "ladder": version.details.get("ladder", []) if version else [],
        "ladder_notes": version.details.get("ladder_notes", []) if version else [],
        "integrity_failures": job.integrity_failures,
        "audit": _audit_summary(latest_audit(session, version.id), sample) if version else None,
        "purged": _purged_section(mine),
        "retained": retained,
        "store_key": store_key,
    }
    certificate = key.sign(body)
    store.put_json(store_key, certificate)
    attach_certificate(session, request.id, certificate)


def _model_unlearning(version: ModelVersion | None, sample: Sample) -> dict[str, Any]:
    if version is not None:
        return {"needed": True, "reason": "the serving model's training steps held the sample"}
    return {
        "needed": False,
        "reason": f"no training step of the serving model held the sample ({sample.split.value} "
        "split): its raw data and derivatives were erased, no model was unlearned",
    }


def _purged_section(rows: list[PurgedArtifact]) -> dict[str, list[dict[str, Any]]]:
    section: dict[str, list[dict[str, Any]]] = {kind.value: [] for kind in Kind}
    for row in sorted(rows, key=lambda r: (r.kind, r.key)):
        entry = {"key": row.key, row.digest_algorithm.replace("-", "_"): row.digest}
        section[row.kind].append({**entry, **row.details})
    return section


def _retained(
    session: Session,
    store: ArtifactStore,
    requests: Sequence[DeletionRequest],
    samples: dict[str, Sample],
) -> dict[str, list[dict[str, Any]]]:
    """Per request, the derived weights still in the store under a legal hold
    (LETHE_RETAIN_SUPERSEDED_WEIGHTS): the certificate says they were kept, and why."""
    graph = ErasureGraph(session, store)
    every = [v.id for v in graph.versions]
    retained: dict[str, list[dict[str, Any]]] = {}
    for request in requests:
        closure = graph.closure(samples[request.sample_id], request.completed_version_id, every)
        objects = [o for o in closure.objects if o.kind in RETAINABLE]
        present = store.present(o.key for o in objects)
        retained[request.id] = [
            {"kind": o.kind.value, "key": o.key, "version": o.version, "reason": LEGAL_HOLD}
            for o in objects
            if o.key in present
        ]
    return retained


def _audit_summary(audit: Audit | None, sample: Sample) -> dict[str, Any] | None:
    """The audit's decision, its rules, and the evidence the audit recorded for this sample."""
    if audit is None:
        return None
    utility = audit.metrics.get("utility", {})
    per_sample = audit.metrics.get("per_sample", {}).get("samples", [])
    return {
        "audit_id": audit.id,
        "decision": audit.decision,
        "report_key": audit.report_key,
        "test_accuracy": utility.get("test", {}).get("candidate"),
        "test_drop_points": utility.get("test", {}).get("drop_points"),
        "rules": [{"rule": r.get("rule"), "passed": r.get("passed")} for r in audit.reasons],
        "sample": next((e for e in per_sample if e.get("sample_id") == sample.sample_id), None),
    }
