"""The promotion gate: the policy (configuration) and the decision with a reason per rule.

The policy is read from the environment (prefix ``LETHE_GATE_``) and, when
``LETHE_GATE_FILE`` names one, a JSON file of the same fields (the environment wins).

F can hold a single sample, so the membership rules compare Clopper-Pearson or AUC interval
bounds (95% by default), never bare point estimates: a rule fails on evidence of leakage, not
on one unlucky sample. With a tiny F the intervals are wide and the membership rules can only
fail on a blatant leak; the report shows the intervals so that a reader sees how little a
small F can prove. Over-unlearning (F looking *less* member-like than data never seen, an AUC
well below 0.5) is a failure too: it tells an attacker which samples were erased.
"""

from dataclasses import asdict, dataclass
from typing import Any

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from worker.policy import FilePolicy


class GatePolicy(FilePolicy):
    model_config = SettingsConfigDict(
        env_prefix="LETHE_GATE_", env_ignore_empty=True, extra="ignore"
    )

    max_test_accuracy_drop_points: float = Field(
        default=1.0, description="Test accuracy may fall by at most this many points vs the parent"
    )
    max_auc_forget_vs_heldout: float = Field(
        default=0.60,
        description="Calibrated attack: fail when the AUC(F vs H) interval lies above this",
    )
    min_auc_forget_vs_heldout: float = Field(
        default=0.40,
        description="Over-unlearning: fail when the AUC(F vs H) interval lies below this",
    )
    calibrated_fpr: float = Field(
        default=0.01, description="FPR over H at which the calibrated threshold is set"
    )
    shadow_recall_margin: float = Field(
        default=0.05,
        description="Shadow-model attack: recall on F may exceed its FPR on H by this much",
    )
    lira_fpr: float = Field(default=0.01, description="FPR over H for the LiRA rule")
    max_two_version_auc: float | None = Field(
        default=None,
        description="Two-version attack: fail when the best feature's AUC interval lies above "
        "this; unset = reported, not enforced (any change between versions leaks something, "
        "exact retraining included)",
    )
    confidence: float = Field(default=0.95, description="Level of every interval")
    accuracy_binds_exact_retraining: bool = Field(
        default=False,
        description="Apply the accuracy rule to exact retraining too; by default it is reported, "
        "not enforced there: the model retrained without the samples is what erasure means, "
        "and failing it would leave the request unhonoured over test-set noise",
    )


@dataclass(frozen=True)
class RuleResult:
    rule: str
    passed: bool
    reason: str
    value: Any = None
    threshold: Any = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    passed: bool
    rules: list[RuleResult]

    @property
    def decision(self) -> str:
        return "pass" if self.passed else "fail"

    @property
    def reasons(self) -> list[dict[str, Any]]:
        return [rule.to_dict() for rule in self.rules]


def _fmt(interval: dict[str, Any]) -> str:
    value = interval["value"]
    shown = "n/a" if value is None else f"{value:.3f}"
    return f"{shown} [{interval['low']:.3f}, {interval['high']:.3f}]"


EXACT_RETRAINING = "retrain-exact"


def accuracy_rule(utility: dict[str, Any], policy: GatePolicy, method: str) -> RuleResult:
    drop = utility["test"]["drop_points"]
    limit = policy.max_test_accuracy_drop_points
    reason = f"test accuracy fell {drop:.2f} points vs the parent (at most {limit:g} allowed)"
    if method == EXACT_RETRAINING and not policy.accuracy_binds_exact_retraining:
        return RuleResult("test_accuracy_drop", True, f"reported, not enforced: {reason}", drop)
    return RuleResult("test_accuracy_drop", drop <= limit, reason, drop, limit)


def auc_rules(calibrated: dict[str, Any], policy: GatePolicy) -> list[RuleResult]:
    auc = calibrated["auc"]
    high, low = policy.max_auc_forget_vs_heldout, policy.min_auc_forget_vs_heldout
    return [
        RuleResult(
            "auc_forget_vs_heldout",
            auc["low"] <= high,
            f"calibrated attack AUC(F vs H) = {_fmt(auc)}; fails only if the whole interval "
            f"lies above {high:g} (F still recognisable as members)",
            auc["value"],
            high,
        ),
        RuleResult(
            "over_unlearning",
            auc["high"] >= low,
            f"AUC(F vs H) = {_fmt(auc)}; an interval wholly below {low:g} means F looks less "
            "like members than unseen data: over-unlearning, which itself reveals the erasure",
            auc["value"],
            low,
        ),
    ]


def tpr_within_fpr_rule(name: str, at_fpr: dict[str, Any], attack: str) -> RuleResult:
    tpr, fpr = at_fpr["tpr"], at_fpr["fpr"]
    return RuleResult(
        name,
        tpr["low"] <= fpr["high"],
        f"{attack}: TPR on F = {_fmt(tpr)} ({tpr['k']}/{tpr['n']}) at FPR on H = {_fmt(fpr)} "
        f"(target {at_fpr['target_fpr']:g}); fails when the TPR interval lies above the FPR's",
        tpr["value"],
        fpr["high"],
    )


def shadow_rule(shadow: dict[str, Any], policy: GatePolicy) -> RuleResult:
    recall, fpr = shadow["recall_forget"], shadow["fpr_heldout"]
    limit = (fpr["value"] or 0.0) + policy.shadow_recall_margin
    return RuleResult(
        "shadow_recall",
        recall["low"] <= limit,
        f"shadow-model attack: recall on F = {_fmt(recall)} vs FPR on H = {_fmt(fpr)}; fails "
        f"when the recall interval lies above FPR + {policy.shadow_recall_margin:g}",
        recall["value"],
        limit,
    )


def two_version_rule(two_version: dict[str, Any], policy: GatePolicy) -> RuleResult:
    aucs = {name: figures["auc"] for name, figures in two_version.items() if name != "basic_mia"}
    best = max(aucs, key=lambda name: aucs[name]["value"] or 0.0)
    limit = policy.max_two_version_auc
    if limit is None:
        return RuleResult(
            "two_version_auc",
            True,
            f"reported, not enforced: best feature {best} AUC = {_fmt(aucs[best])}",
            aucs[best]["value"],
            None,
        )
    return RuleResult(
        "two_version_auc",
        aucs[best]["low"] <= limit,
        f"two-version attack, best feature {best}: AUC = {_fmt(aucs[best])}; fails when the "
        f"interval lies above {limit:g}",
        aucs[best]["value"],
        limit,
    )


def decide(metrics: dict[str, Any], policy: GatePolicy, method: str) -> Decision:
    """Every rule on the audit's figures of a candidate made by ``method``; it passes when all
    rules pass."""
    lira = metrics["lira"]["at_fpr"][f"{policy.lira_fpr:g}"]
    rules = [
        accuracy_rule(metrics["utility"], policy, method),
        *auc_rules(metrics["calibrated"], policy),
        tpr_within_fpr_rule("calibrated_tpr", metrics["calibrated"]["at_fpr"], "calibrated attack"),
        shadow_rule(metrics["shadow"], policy),
        tpr_within_fpr_rule("lira_tpr", lira, "offline LiRA"),
        two_version_rule(metrics["two_version"], policy),
    ]
    return Decision(all(rule.passed for rule in rules), rules)
