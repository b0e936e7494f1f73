"""The audit report: JSON-safe figures with their definitions, and the ROC plots (linear and
log-log, as Carlini et al. recommend for reading TPR at low FPR)."""

import io
import math
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from worker.audit.mia import AttackOutcome
from worker.audit.stats import roc_points

DEFINITIONS = {
    "per_sample": "The gate's membership rule. Per erased sample x, phi(x) = log(p_y / (1 - "
    "p_y)) standardised by a difficulty curve: location (quadratic) and scale (log-linear) of "
    "phi against the reference models' median phi, fitted on the never-seen samples (held-out "
    "and test) under the same model. p_leak / p_over: share of never-seen samples at least as "
    "high / as low (1 / (|Z| + 1) at best). Holm over the 2|F| p-values, and for |F| > 1 a "
    "Mann-Whitney test per tail of F against the never-seen samples (set_level_p). "
    "control_p_leak: the same under the parent, which trained on x; at or above control_alpha "
    "the sample carries no measurable membership signal (no-signal). retained_power: share of "
    "retained members flagged at this job's first Holm threshold (how visible membership is "
    "in this model); control_power: share of F measurably member-like in the parent.",
    "two_version_change": "The gate's two-version rule. Per sample, how far the scaled logit of "
    "the true class fell from parent to candidate, standardised by the median and spread of "
    "the never-seen samples' changes; compared with the same standardised change of members "
    "deleted by exact retraining in the shadow pairs (baseline). p_value: one-sided "
    "Mann-Whitney (F moved further than exact retraining moves a deleted sample); "
    "per_sample_p: share of the baseline that moved at least as far.",
    "baseline": "The audit of a trained version (no parent, no gate): accuracy on held-out, "
    "test and a sample of its training members; member_auc: AUC of those members' "
    "standardised scores (as per_sample) against the never-seen samples; "
    "measurably_remembered: share of them with p_leak below the gate's control_alpha.",
    "utility": "Top-1 accuracy of parent and candidate on F (the erased samples), on the "
    "retained training samples and on the test set T; drop_points = 100 * (parent - "
    "candidate). paired: the gate's accuracy rule on the never-seen samples (held-out and "
    "test): parent_only / candidate_only = samples only that model gets right; se_points = "
    "standard error of the paired difference; p_worse = one-sided exact McNemar p-value.",
    "shadow": "Reported, not a gate rule. "
    "Graves et al.'s membership attack (Shokri/Yeom): one MLP (256-128, ReLU, "
    "dropout 0.5) per class on the sorted softmax vector, trained on the reference models' "
    "pool halves (members they classify correctly vs non-members). recall_forget = share of F "
    "called member (the paper's Table 1 counts only correctly classified samples: "
    "recall_forget_correct); fpr_heldout = share of H called member; AUC uses the attack's "
    "probability.",
    "calibrated": "Reported, not a gate rule. "
    "Loss attack on the candidate alone: score = log(p_y / (1 - p_y)), a "
    "monotone function of the loss; threshold set on H at the target FPR; TPR on F with "
    "Clopper-Pearson interval; AUC(F vs H) with Hanley-McNeil interval (0.5 = F "
    "indistinguishable from unseen data; far below 0.5 = over-unlearning). mia_efficacy: "
    "SalUn's share of F that an RBF SVC on confidence (retained vs H) calls non-member; "
    "compare it with exact retraining, do not maximise it.",
    "lira": "Reported, not a gate rule. "
    "Offline LiRA (Carlini et al.): per sample, z = (scaled logit on the candidate - "
    "mean over reference models that never saw it) / a global sigma; TPR on F at fixed FPRs "
    "over H with Clopper-Pearson intervals, AUC. With |H| samples the smallest nonzero FPR is "
    "1/|H|: below that the threshold is the largest H score.",
    "two_version": "Reported, not a gate rule. "
    "Chen et al.'s attack on (parent, candidate) posteriors, per feature "
    "(direct_diff, sorted_diff, direct_concat, l2_distance; basic_mia = the classical attack "
    "on the parent alone), an MLP trained on shadow pairs (a reference model and its twin "
    "retrained exactly without one member). AUC(F vs H); DegCount = share of samples on "
    "which the feature is more confident of the true membership than basic_mia, DegRate = "
    "mean gain.",
    "unlearning_inversion": "Hu et al.: theta_candidate - theta_parent taken as the gradient "
    "of the erased samples' loss; inputs rebuilt by cosine gradient matching with a TV prior "
    "(bounded iterations, true labels given). PSNR (dB) / SSIM against the true samples; "
    "chance_psnr = PSNR of held-out images of the same class. inferred_label: the class "
    "whose test-set confidence fell most from parent to candidate. positive_control: the "
    "same attack, same budget, on the exact one-step gradient of one erased sample; "
    "has_power = false means the budget rebuilds nothing even there, so beats_chance on the "
    "candidate says nothing either way.",
    "class_inversion": "Graves et al.'s model inversion (gradient steps from faint noise, "
    "denoising every n steps, fixed iterations) for every class, on parent and candidate; an "
    "evaluator trained on the disjoint pool gives the confidence that each inversion shows "
    "its class and whether it is recognised (its argmax). has_power: the parent's inversions "
    "(the positive control: the parent knows every class) are recognised more often than "
    "chance; without it, the candidate's figures say nothing.",
}


def json_safe(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays as Python values, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def roc_png(title: str, outcomes: dict[str, AttackOutcome]) -> bytes:
    """Linear and log-log ROC of each named outcome (F positive, H negative), as PNG."""
    # A bare Figure renders with Agg and touches no pyplot state (safe in worker threads).
    figure = Figure(figsize=(8, 3.6))
    linear, loglog = figure.subplots(1, 2)
    floor = 1e-3
    for label, outcome in outcomes.items():
        if len(outcome.positive) == 0 or len(outcome.negative) == 0:
            continue
        fpr, tpr = roc_points(outcome.positive, outcome.negative)
        linear.plot(fpr, tpr, label=label)
        loglog.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=label)
    loglog.set_xscale("log")
    loglog.set_yscale("log")
    # Fixed limits and ticks, no minor ticks and a fixed legend place: ~0.06 s of CPU a plot.
    for axis, ticks in ((linear, [0, 0.5, 1]), (loglog, [floor, 1e-2, 1e-1, 1])):
        axis.plot([floor, 1], [floor, 1], "k:", linewidth=0.8)
        axis.set_xlabel("FPR on H")
        axis.set_ylabel("TPR on F")
        axis.set_xlim(ticks[0], 1)
        axis.set_ylim(ticks[0], 1)
        axis.set_xticks(ticks)
        axis.set_yticks(ticks)
        axis.minorticks_off()
    linear.set_title(title, fontsize=9)
    loglog.set_title("log-log", fontsize=9)
    linear.legend(fontsize=7, loc="lower right")
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.9, wspace=0.25)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=72)
    return buffer.getvalue()
