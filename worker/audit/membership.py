"""The per-sample, two-sided membership test of the gate (offline U-LiRA style).

For every sample x, a model's statistic is LiRA's scaled logit phi(x) = log p_y / (1 - p_y).
The reference models never saw any train, held-out or test sample, so their median phi(x) says
how hard x is for a model that never saw it ("difficulty"). The references are trained on a
smaller pool than the target, so the target is more confident than they are, and more so on
easy samples: phi_target is not difficulty plus a constant. So the relation is learnt, per
model, on samples that model never saw (the null set Z: held-out and test samples): a quadratic
location and a log-linear scale in the difficulty (``DifficultyCurve``). A sample's score is its
phi standardised by that curve; under the hypothesis "this model never saw x", the score of x is
exchangeable with the scores of Z, so rank p-values against Z are exact (up to the fit).

Two one-sided p-values per sample: ``p_leak`` (x is more member-like than never-seen data: the
model still remembers it) and ``p_over`` (x is *less* member-like than never-seen data: the
deletion itself shows, "over-unlearning"). The same score under the parent, which did train on x,
is the positive control: if the parent did not make x measurably member-like, the test cannot see
whether x was forgotten, and the sample's verdict says so (``no-signal``).

Multiple testing over the forget set F: Holm over the 2|F| one-sided p-values (family-wise error
under any dependence) and, when |F| > 1, a Mann-Whitney test per tail of F against Z: a shift
shared by many samples, which per-sample ranks cannot resolve once |F| is more than a few (the
smallest p-value a rank can give is 1 / (|Z| + 1)). With |F| = 1 Holm gets the whole level; with
more, half, and each set-level tail a quarter. By the union bound, a model that never saw F fails
the rule with probability at most ``alpha``.
"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import mannwhitneyu

from worker.audit.stats import clopper_pearson

Array = NDArray[np.float64]


class SampleDecision(StrEnum):
    passed = "pass"
    leak = "fail-leak"
    over_unlearned = "fail-over-unlearned"
    no_signal = "no-signal"


FAILURES = (SampleDecision.leak, SampleDecision.over_unlearned)


@dataclass(frozen=True)
class DifficultyCurve:
    """phi on never-seen samples ~ location(d) + scale(d) * noise, d the difficulty."""

    location: Array  # quadratic coefficients, constant first
    log_scale: Array  # log-linear coefficients, constant first

    @classmethod
    def fit(cls, difficulty: ArrayLike, phi: ArrayLike) -> "DifficultyCurve":
        d, y = np.asarray(difficulty, float), np.asarray(phi, float)
        location = np.linalg.lstsq(_design(d, 2), y, rcond=None)[0]
        residual = np.abs(y - _design(d, 2) @ location)
        # A floor keeps one exact fit (a residual of 0) from sending the log to -inf.
        floor = max(float(np.median(residual)) * 1e-3, 1e-9)
        log_scale = np.linalg.lstsq(_design(d, 1), np.log(residual + floor), rcond=None)[0]
        return cls(location, log_scale)

    def standardise(self, difficulty: ArrayLike, phi: ArrayLike) -> Array:
        d, y = np.asarray(difficulty, float), np.asarray(phi, float)
        scale = np.exp(_design(d, 1) @ self.log_scale)
        standardised: Array = (y - _design(d, 2) @ self.location) / scale
        return standardised


def _design(d: Array, degree: int) -> Array:
    return np.stack([d**k for k in range(degree + 1)], axis=1)


@dataclass(frozen=True)
class ModelScores:
    """One model's standardised scores: on F, on the null set Z, and optionally on retained
    training samples (members of the model, for the power estimate)."""

    forget: Array
    null: Array
    retained: Array | None = None


def model_scores(phi: Mapping[str, ArrayLike], difficulty: Mapping[str, ArrayLike]) -> ModelScores:
    """``phi`` and ``difficulty`` hold "forget" and "null" (and optionally "retained") arrays."""
    curve = DifficultyCurve.fit(difficulty["null"], phi["null"])
    scored = {name: curve.standardise(difficulty[name], phi[name]) for name in phi}
    return ModelScores(scored["forget"], scored["null"], scored.get("retained"))


def rank_p_values(scores: ArrayLike, null: ArrayLike) -> tuple[Array, Array]:
    """(p_leak, p_over) of each score against the null scores: the share of the null at least
    as high (as low), counting the sample itself, so a p-value is never below 1 / (|Z| + 1)."""
    s, z = np.asarray(scores, float), np.sort(np.asarray(null, float))
    at_least = len(z) - np.searchsorted(z, s, side="left")
    at_most = np.searchsorted(z, s, side="right")
    return (1 + at_least) / (len(z) + 1), (1 + at_most) / (len(z) + 1)


def holm_rejections(p_values: ArrayLike, alpha: float) -> NDArray[np.bool_]:
    """Holm's step-down procedure: which hypotheses are rejected at family-wise level alpha."""
    p = np.asarray(p_values, float)
    rejected = np.zeros(len(p), dtype=bool)
    for rank, index in enumerate(np.argsort(p)):
        if p[index] > alpha / (len(p) - rank):
            break
        rejected[index] = True
    return rejected


@dataclass(frozen=True)
class SampleVerdict:
    sample_id: str
    decision: SampleDecision
    reason: str
    score: float
    p_leak: float
    p_over: float
    control_score: float
    control_p_leak: float

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "decision": self.decision.value}


@dataclass(frozen=True)
class MembershipTest:
    passed: bool
    reason: str
    samples: list[SampleVerdict]
    figures: dict[str, Any]


def membership_test(
    forget_ids: list[str],
    candidate: ModelScores,
    parent: ModelScores,
    alpha: float,
    control_alpha: float,
) -> MembershipTest:
    """The two-sided test of the candidate on F, with the parent as the positive control."""
    p_leak, p_over = rank_p_values(candidate.forget, candidate.null)
    control_p, _ = rank_p_values(parent.forget, parent.null)
    levels = Levels.of(alpha, len(forget_ids))
    rejected = holm_rejections(np.concatenate([p_leak, p_over]), levels.per_sample)
    leak, over = rejected[: len(p_leak)], rejected[len(p_leak) :]
    samples = [
        _verdict(sid, i, candidate, parent, p_leak, p_over, control_p, leak, over, control_alpha)
        for i, sid in enumerate(forget_ids)
    ]
    set_level = {}
    if levels.set_level_tail:
        set_level = {
            "leak": _shift_p(candidate.forget, candidate.null, "greater"),
            "over": _shift_p(candidate.forget, candidate.null, "less"),
        }
    set_failed = [tail for tail, p in set_level.items() if p < levels.set_level_tail]
    failed = [s for s in samples if s.decision in FAILURES]
    floor = 1 / (len(candidate.null) + 1)
    figures = {
        "alpha": alpha,
        "control_alpha": control_alpha,
        "levels": asdict(levels),
        "null_size": len(candidate.null),
        "p_value_floor": floor,
        # Holm's first threshold: a single sample can be singled out only if the floor is below it.
        "per_sample_resolvable": floor <= levels.first_holm_threshold,
        "set_level_p": set_level,
        "decisions": {d.value: sum(s.decision is d for s in samples) for d in SampleDecision},
        "control_power": clopper_pearson(
            int((control_p < control_alpha).sum()), len(control_p)
        ).to_dict(),
        "retained_power": _retained_power(candidate, levels),
        "samples": [s.to_dict() for s in samples],
    }
    passed = not failed and not set_failed
    reason = _reason(failed, set_failed, set_level, samples, levels)
    return MembershipTest(passed, reason, samples, {"passed": passed, "reason": reason, **figures})


@dataclass(frozen=True)
class Levels:
    """How the rule's level is shared between per-sample Holm and the set-level tails."""

    per_sample: float
    set_level_tail: float  # 0: no set-level test (a single sample)
    first_holm_threshold: float

    @classmethod
    def of(cls, alpha: float, forget_size: int) -> "Levels":
        per_sample = alpha if forget_size == 1 else alpha / 2
        return cls(
            per_sample,
            0.0 if forget_size == 1 else alpha / 4,
            per_sample / (2 * forget_size),
        )


def _verdict(
    sample_id: str,
    i: int,
    candidate: ModelScores,
    parent: ModelScores,
    p_leak: Array,
    p_over: Array,
    control_p: Array,
    leak: NDArray[np.bool_],
    over: NDArray[np.bool_],
    control_alpha: float,
) -> SampleVerdict:
    if leak[i]:
        decision, reason = SampleDecision.leak, "more member-like than never-seen samples"
    elif over[i]:
        decision = SampleDecision.over_unlearned
        reason = "less member-like than never-seen samples: the deletion shows"
    elif control_p[i] >= control_alpha:
        decision = SampleDecision.no_signal
        reason = (
            f"the parent did not make it measurably member-like (control p = {control_p[i]:.3f}):"
            " no measurable membership signal, and no evidence either way"
        )
    else:
        decision = SampleDecision.passed
        reason = "member-like in the parent, like never-seen samples in the candidate"
    return SampleVerdict(
        sample_id,
        decision,
        reason,
        float(candidate.forget[i]),
        float(p_leak[i]),
        float(p_over[i]),
        float(parent.forget[i]),
        float(control_p[i]),
    )


def _shift_p(forget: Array, null: Array, alternative: str) -> float:
    return float(mannwhitneyu(forget, null, alternative=alternative).pvalue)


def _retained_power(candidate: ModelScores, levels: Levels) -> dict[str, Any] | None:
    """The share of retained members (still members of the candidate) that this job's first
    Holm threshold would flag: how visible membership is in this model."""
    if candidate.retained is None or len(candidate.retained) == 0:
        return None
    p_leak, _ = rank_p_values(candidate.retained, candidate.null)
    flagged = int((p_leak <= levels.first_holm_threshold).sum())
    return clopper_pearson(flagged, len(p_leak)).to_dict()


def _reason(
    failed: list[SampleVerdict],
    set_failed: list[str],
    set_level: dict[str, float],
    samples: list[SampleVerdict],
    levels: Levels,
) -> str:
    counts = ", ".join(f"{sum(s.decision is d for s in samples)} {d.value}" for d in SampleDecision)
    parts = [f"per sample (Holm, family level {levels.per_sample:g}): {counts}"]
    if set_level:
        parts.append(
            "set level (Mann-Whitney vs never-seen, {:g} per tail): p(leak) = {:.2g}, "
            "p(over-unlearned) = {:.2g}".format(
                levels.set_level_tail, set_level["leak"], set_level["over"]
            )
        )
    if failed:
        parts.append("fails on " + ", ".join(f"{s.sample_id} ({s.decision})" for s in failed[:5]))
    if set_failed:
        parts.append("fails at set level: " + ", ".join(set_failed))
    return "; ".join(parts)
