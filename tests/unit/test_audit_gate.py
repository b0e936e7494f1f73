"""The gate policy (environment and JSON file) and the decision, on synthetic figures."""

import json
from pathlib import Path
from typing import Any

import pytest

from worker.audit.gate import GatePolicy, decide
from worker.audit.stats import auc_with_interval, clopper_pearson


def proportion(k: int, n: int) -> dict[str, Any]:
    return clopper_pearson(k, n).to_dict()


def metrics(
    *, drop: float = 0.2, auc: tuple[float, float, float] = (0.5, 0.3, 0.7), tpr_k: int = 0
) -> dict[str, Any]:
    value, low, high = auc
    at_fpr = {"target_fpr": 0.01, "tpr": proportion(tpr_k, 20), "fpr": proportion(2, 270)}
    return {
        "utility": {"test": {"drop_points": drop}},
        "calibrated": {"auc": {"value": value, "low": low, "high": high}, "at_fpr": at_fpr},
        "shadow": {"recall_forget": proportion(tpr_k, 20), "fpr_heldout": proportion(100, 270)},
        "lira": {"at_fpr": {"0.01": at_fpr}},
        "two_version": {
            "direct_diff": {"auc": auc_with_interval([0.9] * 20, [0.1, 0.2] * 10)},
            "basic_mia": {"auc": auc_with_interval([0.1] * 20, [0.1, 0.2] * 10)},
        },
    }


def failed(
    figures: dict[str, Any], policy: GatePolicy | None = None, method: str = "amnesiac"
) -> set[str]:
    decision = decide(figures, policy or GatePolicy(), method)
    assert decision.passed == (not any(not r["passed"] for r in decision.reasons))
    return {r["rule"] for r in decision.reasons if not r["passed"]}


def test_figures_like_an_exact_retrain_pass_every_rule() -> None:
    decision = decide(metrics(), GatePolicy(), "amnesiac")
    assert decision.passed and decision.decision == "pass"
    assert {r["rule"] for r in decision.reasons} == {
        "test_accuracy_drop",
        "auc_forget_vs_heldout",
        "over_unlearning",
        "calibrated_tpr",
        "shadow_recall",
        "lira_tpr",
        "two_version_auc",
    }


def test_leakage_fails_with_a_reason_per_rule() -> None:
    assert failed(metrics(auc=(0.9, 0.8, 1.0), tpr_k=18)) == {
        "auc_forget_vs_heldout",
        "calibrated_tpr",
        "shadow_recall",
        "lira_tpr",
    }


def test_over_unlearning_is_flagged_not_rewarded() -> None:
    assert failed(metrics(auc=(0.05, 0.0, 0.2))) == {"over_unlearning"}


def test_accuracy_drop_beyond_the_policy_fails() -> None:
    assert failed(metrics(drop=1.5)) == {"test_accuracy_drop"}
    assert failed(metrics(drop=1.5), GatePolicy(max_test_accuracy_drop_points=2)) == set()


def test_exact_retraining_reports_its_accuracy_drop_unless_the_policy_binds_it() -> None:
    assert failed(metrics(drop=1.5), method="retrain-exact") == set()
    binding = GatePolicy(accuracy_binds_exact_retraining=True)
    assert failed(metrics(drop=1.5), binding, method="retrain-exact") == {"test_accuracy_drop"}
    assert failed(metrics(drop=1.5), method="relabel") == {"test_accuracy_drop"}


def test_two_version_rule_is_enforced_only_when_configured() -> None:
    assert failed(metrics(), GatePolicy(max_two_version_auc=0.0)) == {"two_version_auc"}


def test_policy_from_env_and_json_file_env_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert GatePolicy().max_test_accuracy_drop_points == 1.0
    path = tmp_path / "gate.json"
    path.write_text(json.dumps({"max_auc_forget_vs_heldout": 0.55, "lira_fpr": 0.001}))
    monkeypatch.setenv("LETHE_GATE_FILE", str(path))
    monkeypatch.setenv("LETHE_GATE_LIRA_FPR", "0.01")
    policy = GatePolicy()
    assert policy.max_auc_forget_vs_heldout == 0.55
    assert policy.lira_fpr == 0.01
