"""What publishing two versions leaks (Chen et al.): given the parent's and the candidate's
predictions on a sample, was it the one deleted?

- ``two_version_change`` (the gate's rule): how far each sample of F moved from the parent to
  the candidate, judged against how far exact retraining moves a deleted sample: the shadow
  pairs (a reference model and its twin retrained exactly without one member; see
  ``references``) give that baseline.
- ``two_version_mia`` (reported): Chen et al.'s learned attacks on posterior features, trained
  on the shadow pairs, scored on F (deleted) against H (never members), and compared with the
  classical attack on the parent alone (DegCount / DegRate: how much both versions add)."""

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from scipy.stats import mannwhitneyu

from worker.audit.attack_models import fit_attack, member_probability, stacked_state, unstack_state
from worker.audit.config import AuditConfig
from worker.audit.mia import AttackOutcome
from worker.audit.posteriors import logits, scaled_logit
from worker.audit.references import ReferenceSet, train_model
from worker.audit.stats import auc_with_interval, rates_at_fpr
from worker.nets import build_model

Feature = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sorted_diff(p_o: torch.Tensor, p_u: torch.Tensor) -> torch.Tensor:
    order = p_o.argsort(dim=1, descending=True)
    return p_o.gather(1, order) - p_u.gather(1, order)


FEATURES: dict[str, Feature] = {
    "direct_diff": lambda p_o, p_u: p_o - p_u,
    "sorted_diff": _sorted_diff,
    "direct_concat": lambda p_o, p_u: torch.cat([p_o, p_u], dim=1),
    "l2_distance": lambda p_o, p_u: (p_o - p_u).norm(dim=1, keepdim=True),
    "basic_mia": lambda p_o, _: p_o.sort(dim=1, descending=True).values,
}
CLASSICAL = "basic_mia"


def shadow_pairs(
    references: ReferenceSet, config: AuditConfig, device: torch.device
) -> dict[str, torch.Tensor]:
    """For each removal: the reference it came from, the member removed, and the logits of the
    reference (before) and of its twin retrained exactly without that member (after) on the
    whole pool."""

    def build() -> dict[str, torch.Tensor]:
        pool = references.pool
        shadow, removed, before, after = [], [], [], []
        for s in range(min(config.pair_shadows, len(references.members))):
            half = references.members[s]
            chooser = np.random.default_rng(references.seed + s)
            original = logits(references.reference(s, device), pool, device)
            for member in chooser.choice(half, config.removals_per_shadow, replace=False):
                twin = build_model(references.spec)
                kept = [j for j in half if j != member]
                twin.load_state_dict(
                    train_model(
                        references.spec,
                        pool.select(kept),
                        references.config,
                        references.seed + s,
                        device,
                    )
                )
                shadow.append(s)
                removed.append(int(member))
                before.append(original)
                after.append(logits(twin, pool, device))
        return {
            "shadow": torch.tensor(shadow),
            "removed": torch.tensor(removed),
            "before": torch.stack(before),
            "after": torch.stack(after),
        }

    return references.cached("shadow-pairs", build)


def removals(
    references: ReferenceSet, pairs: dict[str, torch.Tensor]
) -> Iterator[tuple[int, int, list[int]]]:
    """(row, removed member, the non-members of its shadow) of every removal."""
    shadows, members = pairs["shadow"].tolist(), pairs["removed"].tolist()
    everyone = set(range(len(references.pool)))
    for row, (s, member) in enumerate(zip(shadows, members, strict=True)):
        yield row, member, sorted(everyone - set(references.members[s]))


def pair_rows(references: ReferenceSet, pairs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Chen et al.'s training rows, balanced 1:1: each removed member (deleted) and one random
    non-member of its shadow (not deleted), queried on the same pair, as posteriors."""
    p_o, p_u, deleted = [], [], []
    for r, member, outside in removals(references, pairs):
        other = int(np.random.default_rng(references.seed + r).choice(outside))
        rows = [member, other]
        p_o.append(pairs["before"][r, rows].softmax(dim=1))
        p_u.append(pairs["after"][r, rows].softmax(dim=1))
        deleted.append(torch.tensor([True, False]))
    return {"p_o": torch.cat(p_o), "p_u": torch.cat(p_u), "deleted": torch.cat(deleted)}


def standardised_change(change: np.ndarray, never_seen: np.ndarray) -> np.ndarray:
    """How far a sample's prediction moved (drop of the true class's scaled logit), relative to
    the median and spread of the moves of samples neither model saw."""
    centre = float(np.median(never_seen))
    spread = 1.4826 * float(np.median(np.abs(never_seen - centre))) or 1.0
    standardised: np.ndarray = (change - centre) / spread
    return standardised


def exact_retrain_changes(references: ReferenceSet, pairs: dict[str, torch.Tensor]) -> np.ndarray:
    """The baseline: the standardised change of every member deleted by exact retraining in
    the shadow pairs, against the non-members of its shadow."""
    labels = references.pool.labels.cpu()
    baseline = []
    for r, member, outside in removals(references, pairs):
        change = (
            scaled_logit(pairs["before"][r], labels) - scaled_logit(pairs["after"][r], labels)
        ).numpy()
        baseline.append(standardised_change(change[[member]], change[outside])[0])
    return np.asarray(baseline)


def two_version_change(
    baseline: np.ndarray, forget_change: np.ndarray, null_change: np.ndarray
) -> dict[str, Any]:
    """Does F's prediction change from the parent to the candidate exceed what an exact retrain
    makes a deleted sample move? One-sided Mann-Whitney of F's standardised changes against the
    baseline's; per sample, the share of the baseline that moved at least as far."""
    forget = standardised_change(forget_change, null_change)
    at_least = (1 + (baseline[None, :] >= forget[:, None]).sum(axis=1)) / (len(baseline) + 1)
    return {
        "p_value": float(mannwhitneyu(forget, baseline, alternative="greater").pvalue),
        "forget_median": float(np.median(forget)),
        "baseline_median": float(np.median(baseline)),
        "baseline_size": len(baseline),
        "forget": forget.tolist(),
        "per_sample_p": at_least.tolist(),
    }


def two_version_attacks(
    references: ReferenceSet, config: AuditConfig, device: torch.device
) -> dict[str, Any]:
    pairs = pair_rows(references, shadow_pairs(references, config, device))
    attacks = {}
    for name, feature in FEATURES.items():
        x = feature(pairs["p_o"], pairs["p_u"])

        def build(x: torch.Tensor = x) -> dict[str, torch.Tensor]:
            model = fit_attack(
                x, pairs["deleted"], config.attack_epochs, config.attack_batch_size, seed=0
            )
            return stacked_state([model])

        attacks[name] = unstack_state(
            references.cached(f"two-version-{name}", build), 1, x.shape[1]
        )[0]
    return attacks


def two_version_mia(
    attacks: dict[str, Any],
    parent_probs: dict[str, torch.Tensor],
    candidate_probs: dict[str, torch.Tensor],
    fpr: float,
) -> dict[str, AttackOutcome]:
    """Per feature: AUC(F vs H), TPR at ``fpr``, and DegCount/DegRate against the classical
    attack, on F alone and on F and H together."""
    scores = {
        name: {
            part: member_probability(
                attack, FEATURES[name](parent_probs[part], candidate_probs[part])
            ).numpy()
            for part in ("forget", "heldout")
        }
        for name, attack in attacks.items()
    }
    outcomes = {}
    for name, by_part in scores.items():
        pos, neg = by_part["forget"], by_part["heldout"]
        figures: dict[str, Any] = {
            "auc": auc_with_interval(pos, neg),
            "at_fpr": rates_at_fpr(pos, neg, fpr),
        }
        if name != CLASSICAL:
            figures["degradation"] = degradation(by_part, scores[CLASSICAL])
        outcomes[name] = AttackOutcome(figures, pos, neg)
    return outcomes


def degradation(feature: dict[str, np.ndarray], classical: dict[str, np.ndarray]) -> dict[str, Any]:
    """Chen et al.: per sample, the attack's confidence in the true membership label minus the
    classical attack's; DegRate = mean, DegCount = share above 0."""
    gain_forget = feature["forget"] - classical["forget"]
    gain_heldout = (1 - feature["heldout"]) - (1 - classical["heldout"])
    both = np.concatenate([gain_forget, gain_heldout])

    def summary(gain: np.ndarray) -> dict[str, Any]:
        if len(gain) == 0:
            return {"deg_count": None, "deg_rate": None, "n": 0}
        return {
            "deg_count": float((gain > 0).mean()),
            "deg_rate": float(gain.mean()),
            "n": len(gain),
        }

    return {"forget": summary(gain_forget), "forget_and_heldout": summary(both)}
