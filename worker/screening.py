"""Screening of hostile deletion jobs, before any model changes, and the accuracy floor before
promotion. Both hold the job for an operator (``POST /jobs/{id}/approve`` or ``/reject``)
instead of running or promoting it.

Deletion requests can be chosen to harm the model: a burst that leaves too little data, a
class wiped out a few samples at a time, many samples from one key (Marchant et al., Zhao et
al., Hu et al.; /work/shared/reading/hostile-deletion-requests.md D2, D3 and D6). Exact
retraining does not protect against them: it is the harm (890 of 898 digits erased left a model
at 16% test accuracy). The screen estimates a job's impact from the ledger and the planner, and
the policy (``ScreenPolicy``, ``LETHE_SCREEN_*`` or the ``screen`` section of the policy file) says
how much is too much. Each rule is reported with its figure and limit in ``jobs.screening``.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.ledger.audits import latest_audit
from app.ledger.clock import utcnow
from app.ledger.db import session_scope
from app.ledger.impact import ClassCount, class_counts, key_usage, requests_by_key
from app.ledger.jobs import record_screening
from app.ledger.provenance import release_rollbacks
from app.ledger.tables import (
    Audit,
    DeletionRequest,
    HoldStage,
    Job,
    ModelVersion,
    VersionState,
)
from app.ledger.versions import alias_target, transition_version, versions_of_job
from worker.config import PolicySettings
from worker.pipeline import JobHeld
from worker.unlearning.planner import LADDER, plan


class ScreenPolicy(PolicySettings):
    section = "screen"
    model_config = SettingsConfigDict(env_prefix="LETHE_SCREEN_")

    enabled: bool = Field(
        default=True,
        description="Screen jobs and hold candidates below the floor; false turns both off (for "
        "benchmarks that measure the gate alone)",
    )
    max_predicted_drop_points: float | None = Field(
        default=5.0,
        description="Hold a job whose predicted test accuracy drop exceeds this: exact "
        "retraining's, the last rung and the only one the gate's accuracy rule does not bind",
    )
    max_class_share: float | None = Field(
        default=0.10,
        description="Hold a job after which a class would have lost more than this share of its "
        "training samples (every erasure so far, running jobs' and this job's)",
    )
    max_dataset_share: float | None = Field(
        default=0.10,
        description="The same for the whole training set",
    )
    concentration_min_samples: int = Field(
        default=20, description="The concentration rules apply to jobs of at least this many"
    )
    max_class_lift: float | None = Field(
        default=5.0,
        description="Hold a job whose share of one class is more than this many times the "
        "class's share of the training set (a targeted class)",
    )
    max_key_share: float | None = Field(
        default=None,
        description="Hold a job more than this share of whose requests one API key filed; unset "
        "= reported, not enforced (a deployment with one intake key files everything with it)",
    )
    key_quota_window_hours: float = Field(default=24.0, description="The quota's window")
    key_quota_per_window: int | None = Field(
        default=100,
        description="Hold a job holding requests of a key that filed more than this many "
        "samples (open or completed requests) within the window",
    )
    key_quota_total: int | None = Field(default=10_000, description="The same over all time")
    floor_max_drop_points: float | None = Field(
        default=5.0,
        description="Accuracy floor: a candidate whose test accuracy fell more than this many "
        "points below the serving version's is held instead of promoted, whatever rung made "
        "it (exact retraining included)",
    )
    floor_min_test_accuracy: float | None = Field(
        default=None,
        description="Accuracy floor: a candidate below this test accuracy (0-1) is held "
        "instead of promoted",
    )


@dataclass(frozen=True)
class Check:
    rule: str
    passed: bool
    reason: str
    value: float | None
    limit: float | None


def _check(rule: str, value: float, limit: float | None, figure: str) -> Check:
    if limit is None:
        return Check(rule, True, f"reported, not enforced: {figure}", value, None)
    return Check(rule, value <= limit, f"{figure} (at most {limit:g} allowed)", value, limit)


def _not_applied(rule: str, samples: int, policy: ScreenPolicy) -> Check:
    reason = f"not applied: {samples} sample(s), under {policy.concentration_min_samples}"
    return Check(rule, True, reason, None, None)


@dataclass(frozen=True)
class Screening:
    figures: dict[str, Any]
    checks: list[Check]
    policy: ScreenPolicy

    @property
    def held(self) -> bool:
        return not all(check.passed for check in self.checks)

    @property
    def reason(self) -> str:
        return "; ".join(check.reason for check in self.checks if not check.passed)

    def to_dict(self) -> dict[str, Any]:
        return {
            "held": self.held,
            "figures": self.figures,
            "checks": [asdict(check) for check in self.checks],
            "policy": self.policy.model_dump(),
        }


def screen(
    session: Session,
    job_id: int,
    parent: ModelVersion,
    forget_ids: Sequence[str],
    policy: ScreenPolicy,
) -> Screening:
    """Every rule of ``policy`` on the job's forget set against the serving version ``parent``.
    The predicted drop is exact retraining's: the earlier rungs' candidates serve only if the
    gate's accuracy rule finds them no worse than the parent, so the drop a job can cause
    without an operator is the last rung's."""
    planned = plan(session, parent, forget_ids)
    predictions = {rung.method: rung.predicted_test_drop_points for rung in planned.ladder}
    predicted = predictions[LADDER[-1]]
    classes = class_counts(session, parent.details["dataset"], forget_ids)
    keys = requests_by_key(session, job_id)
    since = utcnow() - timedelta(hours=policy.key_quota_window_hours)
    usage = key_usage(session, keys, since)
    samples = sum(c.forget for c in classes)
    checks = [
        _check(
            "predicted_test_drop",
            predicted,
            policy.max_predicted_drop_points,
            f"predicted test accuracy drop {predicted:.1f} points (exact retraining)",
        ),
        _class_share(classes, policy),
        _dataset_share(classes, policy),
        _class_lift(classes, samples, policy),
        _key_share(keys, policy),
        _quota(
            "key_quota_window",
            {key: u.since for key, u in usage.items()},
            policy.key_quota_per_window,
            f"in {policy.key_quota_window_hours:g} h",
        ),
        _quota(
            "key_quota_total",
            {key: u.total for key, u in usage.items()},
            policy.key_quota_total,
            "in all",
        ),
    ]
    figures = {
        "samples": len(forget_ids),
        "training_samples": samples,
        "method": planned.method,
        "predicted_test_drop_points": predictions,
        "classes": [asdict(c) for c in classes],
        "requests_by_key": keys,
        "key_usage": {key: asdict(u) for key, u in usage.items()},
    }
    return Screening(figures, checks, policy)


def _class_share(classes: Sequence[ClassCount], policy: ScreenPolicy) -> Check:
    worst = max(classes, key=lambda c: c.removed / c.train if c.train else 0.0)
    share = worst.removed / worst.train if worst.train else 0.0
    figure = (
        f"class {worst.label} would have lost {share:.1%} of its training samples "
        f"({worst.removed} of {worst.train}, erasures so far included)"
    )
    return _check("class_share", share, policy.max_class_share, figure)


def _dataset_share(classes: Sequence[ClassCount], policy: ScreenPolicy) -> Check:
    removed, train = sum(c.removed for c in classes), sum(c.train for c in classes)
    share = removed / train if train else 0.0
    figure = (
        f"the training set would have lost {share:.1%} of its samples ({removed} of {train}, "
        "erasures so far included)"
    )
    return _check("dataset_share", share, policy.max_dataset_share, figure)


def _class_lift(classes: Sequence[ClassCount], samples: int, policy: ScreenPolicy) -> Check:
    if samples < policy.concentration_min_samples:
        return _not_applied("class_lift", samples, policy)
    kept = sum(c.kept for c in classes)

    def lift(c: ClassCount) -> float:
        return (c.forget / samples) / (c.kept / kept) if c.kept else 0.0

    top = max(classes, key=lift)
    figure = (
        f"class {top.label} is {top.forget / samples:.0%} of the job's samples, "
        f"{lift(top):.1f} times its share of the training set"
    )
    return _check("class_lift", lift(top), policy.max_class_lift, figure)


def _key_share(keys: dict[str, int], policy: ScreenPolicy) -> Check:
    requests = sum(keys.values())
    if requests < policy.concentration_min_samples:
        return _not_applied("key_share", requests, policy)
    top = max(keys, key=lambda key: keys[key])
    share = keys[top] / requests
    figure = f"{top} filed {share:.0%} of the job's {requests} requests"
    return _check("key_share", share, policy.max_key_share, figure)


def _quota(rule: str, counts: dict[str, int], quota: int | None, window: str) -> Check:
    if not counts:
        return Check(rule, True, "no live requests", 0, quota)
    top = max(counts, key=lambda key: counts[key])
    over = sorted(key for key, count in counts.items() if quota is not None and count > quota)
    figure = f"{', '.join(over) or top} filed {counts[top]} samples {window}"
    return _check(rule, counts[top], quota, figure)


def screen_job(session: Session, job: Job, requests: Sequence[DeletionRequest]) -> None:
    """At the start of an unlearn job: records the screen on the job, or raises JobHeld when it
    exceeds the policy. A job screened once (or approved after a hold) is not screened again."""
    parent = alias_target(session)
    policy = ScreenPolicy()
    if parent is None or job.screening is not None or HoldStage.screening in job.approved_stages:
        return
    if not policy.enabled:
        return
    forget_ids = sorted({r.sample_id for r in requests})
    screening = screen(session, job.id, parent, forget_ids, policy)
    if screening.held:
        raise JobHeld(HoldStage.screening, screening.reason, screening.to_dict())
    engine = session.get_bind()
    assert isinstance(engine, Engine)  # the worker's sessions are bound to its engine
    with session_scope(engine) as own:
        record_screening(own, job.id, screening.to_dict())


def floor_breach(audit: Audit | None, policy: ScreenPolicy) -> str | None:
    """Why a candidate with this audit may not be promoted without an operator, or None."""
    least, most = policy.floor_min_test_accuracy, policy.floor_max_drop_points
    if least is None and most is None:
        return None
    test = audit.metrics.get("utility", {}).get("test", {}) if audit is not None else {}
    accuracy, drop = test.get("candidate"), test.get("drop_points")
    if accuracy is None or drop is None:
        return "its test accuracy was not measured"
    if least is not None and accuracy < least:
        return f"test accuracy {accuracy:.2%} is below the floor of {least:.2%}"
    if most is not None and drop > most:
        return (
            f"test accuracy {accuracy:.2%} fell {drop:.1f} points below the serving version's "
            f"(the floor allows {most:g})"
        )
    return None


def hold_below_floor(session: Session, job: Job, candidate: ModelVersion) -> None:
    """Before promotion: unless an operator approved this job's promotion, a candidate below the
    accuracy floor is held. The candidate and its audit are committed first (they wait for the
    operator; its rolled-back steps stay claimed), then JobHeld is raised."""
    policy = ScreenPolicy()
    if HoldStage.promotion in job.approved_stages or not policy.enabled:
        return
    reason = floor_breach(latest_audit(session, candidate.id), policy)
    if reason is None:
        return
    session.commit()
    raise JobHeld(
        HoldStage.promotion, f"candidate {candidate.version} ({candidate.method}): {reason}"
    )


def hold_failed_exact_retraining(
    session: Session, job: Job, candidate: ModelVersion, failed_rules: Sequence[str]
) -> None:
    """Exact retraining, the last rung, failed the gate: the candidate and its audit are
    committed and the job held for an operator, not failed. The model never saw the samples, so
    a failed membership or two-version rule is either the gate's own false alarm (each rule
    fails a model that never saw F at its policy level, a few percent of forget sets) or a sign
    that something else in the data still carries them (a near-duplicate): an operator reads
    the audit and approves (the candidate serves) or rejects (the requests fail)."""
    session.commit()
    raise JobHeld(
        HoldStage.promotion,
        f"candidate {candidate.version} (exact retraining, the last rung) failed the gate's "
        f"{', '.join(failed_rules)}: a model retrained without the samples fails it at the "
        "policy's level by chance; read its audit, then approve or reject",
    )


def held_candidate(
    session: Session, job: Job, parent: ModelVersion
) -> tuple[ModelVersion, Audit] | None:
    """The job's candidate an earlier attempt held at promotion (one that passed its audit
    but not the floor, or an exact retrain that failed the gate), to promote now. If another
    version serves since (an operator promoted one by hand), the candidate no longer fits: it
    is rejected and its steps released, and the ladder runs again from the serving version."""
    for version in versions_of_job(session, job.id):
        audit = latest_audit(session, version.id)
        if version.state is not VersionState.auditing or audit is None:
            continue
        if version.parent_id == parent.id:
            return version, audit
        transition_version(session, version, {VersionState.auditing}, VersionState.rejected)
        release_rollbacks(session, version.id)
    return None
