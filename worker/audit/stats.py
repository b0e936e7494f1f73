"""Small-sample statistics for attack figures: ROC curves, TPR at a fixed FPR, AUC with an
interval, and Clopper-Pearson intervals for proportions (F may hold a single sample)."""

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import beta, binom, norm
from sklearn.metrics import roc_auc_score, roc_curve

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Proportion:
    """k successes of n, with its exact two-sided Clopper-Pearson interval."""

    k: int
    n: int
    value: float | None
    low: float
    high: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> Proportion:
    if n == 0:
        return Proportion(0, 0, None, 0.0, 1.0)
    alpha = 1 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return Proportion(k, n, k / n, low, high)


def auc_with_interval(
    positive: ArrayLike, negative: ArrayLike, confidence: float = CONFIDENCE
) -> dict[str, Any]:
    """ROC AUC (positives scored higher = 1.0) with an interval: the wider of Hanley-McNeil's
    (1982) normal interval and Hoeffding's bound for the mean of the smaller class's placement
    values (each in [0, 1]). Hanley-McNeil alone collapses to a point at an AUC of 0 or 1,
    which a single positive always has at the ends of the ranking: F = one unlucky sample
    would then look like proof. Hoeffding keeps that interval as wide as one sample deserves."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    if len(pos) == 0 or len(neg) == 0:
        return {"value": None, "low": 0.0, "high": 1.0, "n_pos": len(pos), "n_neg": len(neg)}
    scores = np.concatenate([pos, neg])
    truth = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    auc = float(roc_auc_score(truth, scores))
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (
        auc * (1 - auc) + (len(pos) - 1) * (q1 - auc**2) + (len(neg) - 1) * (q2 - auc**2)
    ) / (len(pos) * len(neg))
    hanley_mcneil = float(norm.ppf(0.5 + confidence / 2)) * math.sqrt(max(variance, 0.0))
    smaller = min(len(pos), len(neg))
    hoeffding = math.sqrt(math.log(2 / (1 - confidence)) / (2 * smaller))
    half = max(hanley_mcneil, hoeffding)
    return {
        "value": auc,
        "low": max(0.0, auc - half),
        "high": min(1.0, auc + half),
        "n_pos": len(pos),
        "n_neg": len(neg),
    }


def threshold_at_fpr(negative: ArrayLike, fpr: float) -> float:
    """The smallest threshold t with share(negative > t) <= fpr: calling ``score > t`` a member
    flags at most ``fpr`` of the non-members (fewer when |H| is too small to reach it)."""
    neg = np.sort(np.asarray(negative, float))
    allowed = math.floor(fpr * len(neg))
    return float(neg[len(neg) - allowed - 1]) if allowed < len(neg) else -math.inf


def rates_at_fpr(positive: ArrayLike, negative: ArrayLike, fpr: float) -> dict[str, Any]:
    """TPR on the positives at the threshold set on the negatives for a target FPR, both as
    Clopper-Pearson proportions; the realised FPR can be below the target for small |H|."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    threshold = threshold_at_fpr(neg, fpr)
    return {
        "target_fpr": fpr,
        "threshold": threshold,
        "tpr": clopper_pearson(int((pos > threshold).sum()), len(pos)).to_dict(),
        "fpr": clopper_pearson(int((neg > threshold).sum()), len(neg)).to_dict(),
    }


def roc_points(positive: ArrayLike, negative: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve, for plots."""
    pos, neg = np.asarray(positive, float), np.asarray(negative, float)
    truth = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    fpr, tpr, _ = roc_curve(truth, np.concatenate([pos, neg]))
    return fpr, tpr


def paired_accuracy(parent_correct: ArrayLike, candidate_correct: ArrayLike) -> dict[str, Any]:
    """Paired comparison of two models on the same samples: the discordant counts, the accuracy
    drop in points with its standard error, and the one-sided exact McNemar p-value of "the
    candidate makes more errors than the parent" (the binomial tail of the discordant pairs)."""
    parent, candidate = np.asarray(parent_correct, bool), np.asarray(candidate_correct, bool)
    parent_only = int((parent & ~candidate).sum())
    candidate_only = int((~parent & candidate).sum())
    n, discordant = len(parent), parent_only + candidate_only
    difference = parent_only - candidate_only
    variance = max(discordant - difference**2 / n, 0.0) if n else 0.0
    return {
        "n": n,
        "parent_only": parent_only,
        "candidate_only": candidate_only,
        "drop_points": 100 * difference / n if n else 0.0,
        "se_points": 100 * math.sqrt(variance) / n if n else 0.0,
        "p_worse": float(binom.sf(parent_only - 1, discordant, 0.5)) if discordant else 1.0,
    }
