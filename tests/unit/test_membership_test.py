"""The per-sample, two-sided membership test on constructed scores: no model is trained, so
every outcome here is the same on any machine. Scores are drawn from a seeded generator; the
cases are built so that each assertion holds with a wide margin."""

import numpy as np
import pytest

from worker.audit.membership import (
    DifficultyCurve,
    ModelScores,
    SampleDecision,
    holm_rejections,
    membership_test,
    model_scores,
    rank_p_values,
)

ALPHA, CONTROL = 0.04, 0.05
NULL_SIZE = 540  # held-out and test of the digits


def never_seen(rng: np.random.Generator, size: int = NULL_SIZE) -> np.ndarray:
    return rng.standard_normal(size)


def scores(forget: list[float], rng: np.random.Generator) -> ModelScores:
    return ModelScores(np.asarray(forget, float), never_seen(rng), never_seen(rng, 300))


def ids(n: int) -> list[str]:
    return [f"s{i}" for i in range(n)]


def test_rank_p_values_count_the_sample_itself_and_ties() -> None:
    null = np.array([0.0, 1.0, 2.0, 3.0])
    p_leak, p_over = rank_p_values([3.0, -1.0, 1.0], null)
    assert p_leak.tolist() == [2 / 5, 5 / 5, 4 / 5]
    assert p_over.tolist() == [5 / 5, 1 / 5, 3 / 5]


def test_holm_rejects_step_down_and_stops_at_the_first_acceptance() -> None:
    p = [0.001, 0.02, 0.013, 0.5]
    # thresholds 0.05/4, 0.05/3, 0.05/2, 0.05: 0.001 and 0.013 pass, 0.02 < 0.025 passes too
    assert holm_rejections(p, 0.05).tolist() == [True, True, True, False]
    assert holm_rejections([0.02, 0.001], 0.05).tolist() == [True, True]
    assert holm_rejections([0.03, 0.03], 0.05).tolist() == [False, False]


def test_difficulty_curve_makes_hard_and_easy_never_seen_samples_comparable() -> None:
    """Never-seen samples whose location and spread depend on difficulty (as a stronger target
    against weaker references): standardised, the hardest tenth and the easiest tenth have the
    same centre and spread; unstandardised, they are far apart."""
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(-3, 5, 4000)
    phi = (
        5
        + 0.6 * difficulty
        - 0.04 * difficulty**2
        + np.exp(0.6 - 0.15 * difficulty) * (rng.standard_normal(4000))
    )
    curve = DifficultyCurve.fit(difficulty, phi)
    z = curve.standardise(difficulty, phi)
    hard = difficulty < np.quantile(difficulty, 0.1)
    easy = difficulty > np.quantile(difficulty, 0.9)
    assert abs(np.median(z[hard]) - np.median(z[easy])) < 0.15 * np.std(z)
    assert 0.8 < np.std(z[hard]) / np.std(z[easy]) < 1.25
    assert abs(np.median(phi[hard]) - np.median(phi[easy])) > 3 * np.std(phi[easy])


def test_model_scores_uses_the_null_curve_for_every_part() -> None:
    rng = np.random.default_rng(1)
    d_null, d_forget = rng.uniform(0, 4, NULL_SIZE), np.array([0.5, 3.5])
    phi_null = 2 * d_null + rng.standard_normal(NULL_SIZE)
    scored = model_scores(
        {"forget": 2 * d_forget + 10, "null": phi_null}, {"forget": d_forget, "null": d_null}
    )
    assert scored.retained is None
    assert (scored.forget > 5).all()  # ten units above the curve, at either difficulty


def test_a_sample_like_never_seen_data_passes_or_has_no_signal() -> None:
    rng = np.random.default_rng(2)
    parent = scores([5.0], rng)  # the parent made it member-like: the control has power
    result = membership_test(ids(1), scores([0.1], rng), parent, ALPHA, CONTROL)
    assert result.passed
    assert result.samples[0].decision is SampleDecision.passed
    quiet_parent = scores([0.2], rng)  # the parent did not: no measurable signal
    result = membership_test(ids(1), scores([0.1], rng), quiet_parent, ALPHA, CONTROL)
    assert result.passed and result.samples[0].decision is SampleDecision.no_signal


def test_one_over_unlearned_sample_fails_in_the_over_unlearning_direction() -> None:
    """|F| = 1: far below every never-seen sample (as relabel trained to the end leaves it)."""
    rng = np.random.default_rng(3)
    result = membership_test(ids(1), scores([-9.0], rng), scores([5.0], rng), ALPHA, CONTROL)
    assert not result.passed
    verdict = result.samples[0]
    assert verdict.decision is SampleDecision.over_unlearned
    assert verdict.p_over == pytest.approx(1 / (NULL_SIZE + 1))  # the floor: 0.0018 < 0.02
    assert "over-unlearned" in result.reason


def test_one_remembered_sample_fails_as_a_leak() -> None:
    rng = np.random.default_rng(4)
    result = membership_test(ids(1), scores([9.0], rng), scores([9.0], rng), ALPHA, CONTROL)
    assert not result.passed and result.samples[0].decision is SampleDecision.leak


def test_a_shared_shift_fails_at_set_level_when_no_single_sample_can() -> None:
    """Ten samples each 1.5 sd above never-seen data: no single one is beyond Holm's first
    threshold (0.001 for |F| = 10, below the 1/541 floor), but together they are."""
    rng = np.random.default_rng(5)
    result = membership_test(
        ids(10), scores([1.5] * 10, rng), scores([4.0] * 10, rng), ALPHA, CONTROL
    )
    assert not result.passed
    assert result.figures["per_sample_resolvable"] is False
    assert result.figures["set_level_p"]["leak"] < ALPHA / 4 / 100
    assert all(s.decision is SampleDecision.passed for s in result.samples)
    assert "fails at set level: leak" in result.reason


@pytest.mark.parametrize("forget_size", [1, 10])
def test_models_that_never_saw_f_fail_at_most_alpha_of_the_time(forget_size: int) -> None:
    """The rule's false-rejection rate under its null: F drawn from the never-seen
    distribution, 2,000 times. Expected at most alpha (0.04); the bound 0.06 is 4.5 binomial
    standard errors above it, and the lower bound shows the rule does reject sometimes."""
    rng = np.random.default_rng(6)
    failures = 0
    for _ in range(2000):
        candidate = scores(list(rng.standard_normal(forget_size)), rng)
        parent = scores(list(rng.standard_normal(forget_size) + 3), rng)
        failures += not membership_test(ids(forget_size), candidate, parent, ALPHA, CONTROL).passed
    assert 0.005 < failures / 2000 < 0.06


def test_power_figures_report_retained_members_and_the_parent_control() -> None:
    rng = np.random.default_rng(7)
    candidate = ModelScores(np.zeros(1), never_seen(rng), never_seen(rng, 300) + 4)
    result = membership_test(ids(1), candidate, scores([5.0], rng), ALPHA, CONTROL)
    assert result.figures["retained_power"]["value"] > 0.9  # members 4 sd out are visible
    assert result.figures["control_power"]["value"] == 1.0
