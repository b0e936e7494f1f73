"""Membership inference against one model version, scored on the forget set F (positives)
against held-out non-members H (negatives).

- ``shadow_mia``: Graves et al.'s attack (Shokri/Yeom): per-class MLPs on sorted softmax
  vectors, trained on the reference models' pool halves; recall on F, FPR on H.
- ``calibrated_mia``: a loss attack (the scaled logit, a monotone function of the loss) with
  its threshold set on this very model at a fixed FPR over H; TPR on F; AUC(F vs H); and SalUn's
  MIA-efficacy (an SVC on confidence, retained train vs test, applied to F).
- ``lira_offline``: Carlini et al.'s offline LiRA with a global (fixed) variance, as they
  recommend for fewer than 64 reference models; TPR at low FPR and AUC.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.svm import SVC

from worker.audit.attack_models import (
    fit_attack,
    member_probability,
    stacked_state,
    unstack_state,
)
from worker.audit.config import AuditConfig
from worker.audit.posteriors import logits, scaled_logit, true_class_confidence
from worker.audit.references import ReferenceSet
from worker.audit.stats import auc_with_interval, clopper_pearson, rates_at_fpr
from worker.data import SampleSet


@dataclass(frozen=True)
class AttackOutcome:
    """An attack's figures (JSON-ready) and its raw scores on F and H (for the ROC plots)."""

    figures: dict[str, Any]
    positive: np.ndarray
    negative: np.ndarray


def sorted_softmax(raw_logits: torch.Tensor) -> torch.Tensor:
    return raw_logits.softmax(dim=1).sort(dim=1, descending=True).values


def shadow_attack_models(
    references: ReferenceSet, config: AuditConfig, device: torch.device
) -> list[Any]:
    """One attack MLP per class, trained on every reference's pool: positives are its members
    that it classifies correctly (as in the Amnesiac notebook), negatives its non-members."""
    pool, classes = references.pool, references.spec.num_classes

    def build() -> dict[str, torch.Tensor]:
        features, is_member, labels = [], [], []
        for i, half in enumerate(references.members):
            raw = logits(references.reference(i, device), pool, device)
            inside = torch.zeros(len(pool), dtype=torch.bool)
            inside[half] = True
            correct = raw.argmax(dim=1) == pool.labels.cpu()
            keep = ~inside | correct
            features.append(sorted_softmax(raw)[keep])
            is_member.append(inside[keep])
            labels.append(pool.labels.cpu()[keep])
        x, y, c = torch.cat(features), torch.cat(is_member), torch.cat(labels)
        models = [
            fit_attack(x[c == k], y[c == k], config.attack_epochs, config.attack_batch_size, seed=k)
            for k in range(classes)
        ]
        return stacked_state(models)

    return unstack_state(references.cached("shadow-attack", build), classes, classes)


def per_class_scores(
    attacks: list[Any], raw_logits: torch.Tensor, labels: torch.Tensor
) -> np.ndarray:
    features, labels = sorted_softmax(raw_logits), labels.cpu()
    scores = torch.zeros(len(labels))
    for k, attack in enumerate(attacks):
        chosen = labels == k
        if chosen.any():
            scores[chosen] = member_probability(attack, features[chosen])
    return scores.numpy()


def shadow_mia(
    attacks: list[Any],
    forget_logits: torch.Tensor,
    forget: SampleSet,
    heldout_logits: torch.Tensor,
    heldout: SampleSet,
) -> AttackOutcome:
    pos = per_class_scores(attacks, forget_logits, forget.labels)
    neg = per_class_scores(attacks, heldout_logits, heldout.labels)
    correct = (forget_logits.argmax(dim=1) == forget.labels.cpu()).numpy()
    figures = {
        "recall_forget": clopper_pearson(int((pos > 0.5).sum()), len(pos)).to_dict(),
        "recall_forget_correct": clopper_pearson(
            int((pos[correct] > 0.5).sum()), int(correct.sum())
        ).to_dict(),
        "fpr_heldout": clopper_pearson(int((neg > 0.5).sum()), len(neg)).to_dict(),
        "auc": auc_with_interval(pos, neg),
    }
    return AttackOutcome(figures, pos, neg)


def calibrated_mia(
    candidate_logits: dict[str, torch.Tensor], sets: dict[str, SampleSet], fpr: float
) -> AttackOutcome:
    """``candidate_logits`` and ``sets`` hold "forget", "heldout" and "retained"."""
    pos = scaled_logit(candidate_logits["forget"], sets["forget"].labels).numpy()
    neg = scaled_logit(candidate_logits["heldout"], sets["heldout"].labels).numpy()
    figures = {
        "at_fpr": rates_at_fpr(pos, neg, fpr),
        "auc": auc_with_interval(pos, neg),
        "mia_efficacy": mia_efficacy(candidate_logits, sets),
    }
    return AttackOutcome(figures, pos, neg)


def mia_efficacy(
    logits_by_set: dict[str, torch.Tensor], sets: dict[str, SampleSet]
) -> dict[str, Any]:
    """SalUn/l1-sparse MIA-efficacy: an RBF SVC (C=3, gamma='auto') on the true-class
    confidence, members = the first |H| retained samples, non-members = H (never seen; SalUn
    uses its test set); the share of F it calls non-member. Read as a gap to exact retraining,
    not as "higher is better"."""
    confidence = {
        name: true_class_confidence(logits_by_set[name], sets[name].labels).numpy()
        for name in ("retained", "heldout", "forget")
    }
    members = confidence["retained"][: len(confidence["heldout"])]
    x = np.concatenate([members, confidence["heldout"]]).reshape(-1, 1)
    y = np.concatenate([np.ones(len(members)), np.zeros(len(confidence["heldout"]))])
    svc = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
    called_member = svc.predict(confidence["forget"].reshape(-1, 1))
    return clopper_pearson(int((called_member == 0).sum()), len(called_member)).to_dict()


def reference_statistics(
    references: ReferenceSet, sets: dict[str, SampleSet], device: torch.device
) -> dict[str, torch.Tensor]:
    """Per set, (R, N): every reference model's scaled logit on every sample (each reference
    model loaded once)."""
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in sets}
    for i in range(len(references.members)):
        model = references.reference(i, device)
        for name, data in sets.items():
            rows[name].append(scaled_logit(logits(model, data, device), data.labels))
    return {name: torch.stack(values) for name, values in rows.items()}


def lira_offline(
    target_forget: torch.Tensor,
    reference_forget: torch.Tensor,
    target_heldout: torch.Tensor,
    reference_heldout: torch.Tensor,
    fprs: tuple[float, ...],
) -> AttackOutcome:
    """Score = (phi_target - mean_OUT) / sigma, sigma pooled over every sample's references:
    one-sided, high means the target is more confident than models that never saw the
    sample. Every reference is OUT for both F and H."""
    residuals = torch.cat([reference_forget, reference_heldout], dim=1)
    sigma = float((residuals - residuals.mean(dim=0)).std()) or 1.0
    pos = ((target_forget - reference_forget.mean(dim=0)) / sigma).numpy()
    neg = ((target_heldout - reference_heldout.mean(dim=0)) / sigma).numpy()
    figures = {
        "reference_models": int(reference_forget.shape[0]),
        "sigma": sigma,
        "at_fpr": {f"{fpr:g}": rates_at_fpr(pos, neg, fpr) for fpr in fprs},
        "auc": auc_with_interval(pos, neg),
        "forget_z_max": float(pos.max()) if len(pos) else None,
    }
    return AttackOutcome(figures, pos, neg)
