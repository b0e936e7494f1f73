"""The gate's three rules on constructed figures (each can fail, each can pass), and the worker
policies read from the environment and the policy file."""

import json
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
from pydantic import ValidationError

from app.settings import Settings
from worker.audit.config import AuditConfig
from worker.audit.gate import GatePolicy, decide
from worker.audit.stats import paired_accuracy
from worker.audit.unlearning_mia import two_version_change
from worker.unlearning import LADDER, MethodOptions, PlannerPolicy

RULES = {"per_sample_membership", "two_version", "test_accuracy"}


def metrics(
    *,
    membership_passed: bool = True,
    forget_change: float = 0.5,
    parent_only: int = 5,
    candidate_only: int = 5,
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    baseline = rng.normal(1.0, 1.0, 32)  # exact retraining moves a deleted sample about 1 sd
    never_seen = rng.normal(0.0, 1.0, 540)
    n = 540
    parent = np.ones(n, bool)
    parent[:20] = False  # the parent gets 20 wrong
    candidate = parent.copy()
    candidate[20 : 20 + parent_only] = False
    candidate[:candidate_only] = True
    return {
        "per_sample": {
            "passed": membership_passed,
            "reason": "constructed",
            "decisions": {"pass": 1},
        },
        "two_version_change": two_version_change(baseline, np.full(5, forget_change), never_seen),
        "utility": {"paired": paired_accuracy(parent, candidate)},
    }


def failed(
    figures: dict[str, Any], policy: GatePolicy | None = None, method: str = "amnesiac"
) -> set[str]:
    decision = decide(figures, policy or GatePolicy(), method)
    assert decision.passed == all(r["passed"] for r in decision.reasons)
    assert all(r["reason"] for r in decision.reasons)
    return {r["rule"] for r in decision.reasons if not r["passed"]}


def test_figures_like_an_exact_retrain_pass_every_rule() -> None:
    decision = decide(metrics(), GatePolicy(), "amnesiac")
    assert decision.passed and decision.decision == "pass"
    assert {r["rule"] for r in decision.reasons} == RULES


def test_the_membership_rule_decides() -> None:
    assert failed(metrics(membership_passed=False)) == {"per_sample_membership"}


def test_f_moving_far_beyond_what_exact_retraining_moves_fails_the_two_version_rule() -> None:
    """Five samples moved 8 never-seen standard deviations (relabel's kind of change) against
    an exact-retraining baseline centred at 1: p ~ 1e-4, far below 0.01."""
    assert failed(metrics(forget_change=8.0)) == {"two_version"}
    assert metrics(forget_change=8.0)["two_version_change"]["p_value"] < 0.001


def test_significantly_more_errors_fail_the_accuracy_rule_and_noise_does_not() -> None:
    assert failed(metrics(parent_only=25, candidate_only=3)) == {"test_accuracy"}
    # 3 more errors of 540 (0.6 points): within the noise
    assert failed(metrics(parent_only=6, candidate_only=3)) == set()


def test_the_accuracy_rule_shows_its_noise_estimate() -> None:
    reasons = decide(metrics(), GatePolicy(), "amnesiac").reasons
    rule = next(r for r in reasons if r["rule"] == "test_accuracy")
    assert "standard error" in rule["reason"] and "McNemar" in rule["reason"]


def test_exact_retraining_reports_its_accuracy_unless_the_policy_binds_it() -> None:
    worse = metrics(parent_only=25, candidate_only=3)
    assert failed(worse, method="retrain-exact") == set()
    binding = GatePolicy(accuracy_binds_exact_retraining=True)
    assert failed(worse, binding, method="retrain-exact") == {"test_accuracy"}


def test_exact_retraining_reports_its_two_version_change_unless_the_policy_binds_it() -> None:
    moved = metrics(forget_change=8.0)
    assert failed(moved, method="retrain-exact") == set()
    rules = {r["rule"]: r for r in decide(moved, GatePolicy(), "retrain-exact").reasons}
    assert not rules["two_version"]["enforced"]
    assert rules["two_version"]["reason"].startswith("reported, not enforced")
    binding = GatePolicy(two_version_binds_exact_retraining=True)
    assert failed(moved, binding, method="retrain-exact") == {"two_version"}


def test_paired_accuracy_counts_discordant_pairs() -> None:
    parent = np.array([True, True, True, False, False, True])
    candidate = np.array([True, False, False, True, False, True])
    figures = paired_accuracy(parent, candidate)
    assert (figures["parent_only"], figures["candidate_only"], figures["n"]) == (2, 1, 6)
    assert figures["drop_points"] == pytest.approx(100 / 6)
    assert figures["p_worse"] == pytest.approx(0.5)  # P(Binomial(3, 0.5) >= 2)


def test_policies_from_the_environment_and_the_policy_file_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.json"
    path.write_text(
        json.dumps(
            {
                "gate": {"membership_alpha": 0.02, "two_version_alpha": 0.005},
                "audit": {"reference_models": 16},
                "planner": {"max_predicted_drop_points": 2.0},
                "methods": {"relabel": {"copies": 3}},
            }
        )
    )
    monkeypatch.setenv("LETHE_POLICY_FILE", str(path))
    monkeypatch.setenv("LETHE_GATE_TWO_VERSION_ALPHA", "0.02")
    monkeypatch.setenv("LETHE_METHODS_RELABEL__STEPS", "30")
    policy = GatePolicy()
    assert (policy.membership_alpha, policy.two_version_alpha) == (0.02, 0.02)
    assert AuditConfig().reference_models == 16
    assert PlannerPolicy().max_predicted_drop_points == 2.0
    options = MethodOptions()
    assert (options.relabel.copies, options.relabel.steps) == (3, 30)


def test_a_misspelt_policy_field_is_an_error_not_a_silent_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"gate": {"membership_alfa": 0.02}}))
    monkeypatch.setenv("LETHE_POLICY_FILE", str(path))
    with pytest.raises(ValidationError, match="membership_alfa"):
        GatePolicy()


def test_the_documented_gpu_profile_loads() -> None:
    profile = Path(__file__).parents[2] / "config" / "gpu.json"
    sections = json.loads(profile.read_text())
    assert AuditConfig(**sections["audit"]).reference_models >= 16
    GatePolicy(**sections.get("gate", {}))


def test_the_ladder_settings_name_the_ladders_methods() -> None:
    """LETHE_LADDER_START is a literal in the torch-free settings; it names the same rungs."""
    annotation = Settings.model_fields["ladder_start"].annotation
    assert get_args(annotation) == ("", *LADDER)
