"""The promotion gate: the policy (configuration) and the decision, with a reason per rule.

Three rules decide; each is a statistical test whose false-rejection rate for a model that
never saw F (an exact retrain) is set by the policy, so that "fail" means evidence:

- ``per_sample_membership``: every erased sample, two-sided (still member-like, or less
  member-like than data never seen), against the reference models and the never-seen samples
  scored under the candidate (worker/audit/membership.py). Level ``membership_alpha``.
- ``two_version``: how far F's predictions moved from the parent to the candidate, against how
  far an exact retrain moves a deleted sample (the shadow pairs). Level ``two_version_alpha``.
  Reported, not enforced, for exact retraining: the shadow pairs are trained on pool halves,
  smaller than the target's data, and move a deleted sample less than the target's own exact
  retrains move F, so the rule errs strict; for the approximate methods that means a rung more,
  for exact retraining (the reference itself) a false alarm.
- ``test_accuracy``: a paired test of the candidate's errors against the parent's on the
  never-seen samples (exact McNemar, one-sided). Level ``accuracy_alpha``.

Everything else the audit measures (population AUCs, TPR at low FPR, the shadow-model attack of
the Amnesiac paper, the inversions) is reported, not decided on: with the forget sets real jobs
have (1 to 10 samples) population figures have no power, and the shadow-model attack calls most
never-seen samples members.
"""

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from app.ledger.tables import Method
from worker.config import PolicySettings

EXACT_RETRAINING = Method.retrain_exact


class AuditDecision(StrEnum):
    passed = "pass"
    failed = "fail"
    baseline = "baseline"  # a trained version's audit: figures, no gate


class GatePolicy(PolicySettings):
    section = "gate"
    model_config = SettingsConfigDict(env_prefix="LETHE_GATE_")

    membership_alpha: float = Field(
        default=0.04,
        gt=0,
        lt=1,
        description="Per-sample membership rule: the chance that a model that never saw F fails "
        "it (half for per-sample Holm, half for the set-level tests)",
    )
    control_alpha: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="A sample whose score under the parent has a p-value above this carries no "
        "measurable membership signal (its verdict is no-signal)",
    )
    two_version_alpha: float = Field(
        default=0.01,
        gt=0,
        lt=1,
        description="Two-version rule: the chance that an exact retrain fails it",
    )
    two_version_binds_exact_retraining: bool = Field(
        default=False,
        description="Apply the two-version rule to exact retraining too; by default it is "
        "reported, not enforced there: its shadow-pair baseline comes from smaller models that "
        "move a deleted sample less than the target's exact retrains do (docs/gate.md)",
    )
    accuracy_alpha: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="Accuracy rule: the chance that a candidate as accurate as the parent fails "
        "it (one-sided exact McNemar test on the never-seen samples)",
    )
    accuracy_binds_exact_retraining: bool = Field(
        default=False,
        description="Apply the accuracy rule to exact retraining too; by default it is reported, "
        "not enforced there: the model retrained without the samples is what erasure means "
        "(a floor that no version goes below without an operator is screening's)",
    )


@dataclass(frozen=True)
class RuleResult:
    rule: str
    passed: bool
    reason: str
    value: Any = None
    threshold: Any = None
    enforced: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    passed: bool
    rules: list[RuleResult]

    @property
    def decision(self) -> AuditDecision:
        return AuditDecision.passed if self.passed else AuditDecision.failed

    @property
    def reasons(self) -> list[dict[str, Any]]:
        return [rule.to_dict() for rule in self.rules]


def membership_rule(per_sample: dict[str, Any], policy: GatePolicy) -> RuleResult:
    return RuleResult(
        "per_sample_membership",
        per_sample["passed"],
        per_sample["reason"],
        per_sample["decisions"],
        policy.membership_alpha,
    )


def two_version_rule(change: dict[str, Any], policy: GatePolicy, method: str) -> RuleResult:
    p = change["p_value"]
    reason = (
        f"F's prediction change from the parent, standardised by the never-seen samples' "
        f"(median {change['forget_median']:.2f}), against {change['baseline_size']} samples "
        f"deleted by exact retraining in the shadow pairs (median "
        f"{change['baseline_median']:.2f}): one-sided Mann-Whitney p = {p:.3g}; fails below "
        f"{policy.two_version_alpha:g}"
    )
    binds = method != EXACT_RETRAINING or policy.two_version_binds_exact_retraining
    return reported_or_enforced(
        "two_version", p >= policy.two_version_alpha, reason, p, policy.two_version_alpha, binds
    )


def reported_or_enforced(
    rule: str, passed: bool, reason: str, value: float, threshold: float, binds: bool
) -> RuleResult:
    """A rule's outcome; one that does not bind this candidate passes, its reason saying so."""
    if binds:
        return RuleResult(rule, passed, reason, value, threshold)
    return RuleResult(
        rule, True, f"reported, not enforced: {reason}", value, threshold, enforced=False
    )


def accuracy_rule(paired: dict[str, Any], policy: GatePolicy, method: str) -> RuleResult:
    p, alpha = paired["p_worse"], policy.accuracy_alpha
    reason = (
        f"on {paired['n']} never-seen samples the candidate got {paired['parent_only']} wrong "
        f"that the parent got right and {paired['candidate_only']} the other way round: "
        f"{paired['drop_points']:+.2f} points (noise: standard error {paired['se_points']:.2f}), "
        f"one-sided exact McNemar p = {p:.3g}; fails below {alpha:g}"
    )
    binds = method != EXACT_RETRAINING or policy.accuracy_binds_exact_retraining
    return reported_or_enforced("test_accuracy", p >= alpha, reason, p, alpha, binds)


def decide(metrics: dict[str, Any], policy: GatePolicy, method: str) -> Decision:
    """Every rule on the audit's figures of a candidate made by ``method``; it passes when all
    enforced rules pass."""
    rules = [
        membership_rule(metrics["per_sample"], policy),
        two_version_rule(metrics["two_version_change"], policy, method),
        accuracy_rule(metrics["utility"]["paired"], policy, method),
    ]
    return Decision(all(rule.passed for rule in rules), rules)
