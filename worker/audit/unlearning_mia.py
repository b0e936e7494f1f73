"""Chen et al.'s two-version attack: given the posteriors of the parent (p_o) and of the
candidate (p_u) on a sample, was it the one deleted? Trained on shadow pairs (a reference
model and its twin retrained exactly without one member; see ``references``), scored on F
(deleted) against H (never members), and compared with the classical attack on p_o alone
(DegCount / DegRate: how much publishing both versions adds)."""

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from worker.audit.attack_models import fit_attack, member_probability, stacked_state, unstack_state
from worker.audit.config import AuditConfig
from worker.audit.mia import AttackOutcome
from worker.audit.posteriors import logits
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
    """Rows (p_o, p_u, deleted?): for each removed member, itself (deleted) and one random
    non-member of the same shadow (not deleted), queried on the same pair: balanced 1:1."""

    def build() -> dict[str, torch.Tensor]:
        pool = references.pool
        p_o, p_u, deleted = [], [], []
        for s in range(min(config.pair_shadows, len(references.members))):
            half = references.members[s]
            outside = sorted(set(range(len(pool))) - set(half))
            chooser = np.random.default_rng(references.seed + s)
            removed = chooser.choice(half, config.removals_per_shadow, replace=False)
            queried = chooser.choice(outside, config.removals_per_shadow, replace=False)
            original = references.reference(s, device)
            for member, other in zip(removed.tolist(), queried.tolist(), strict=True):
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
                rows = pool.select([member, other])
                p_o.append(logits(original, rows, device).softmax(dim=1))
                p_u.append(logits(twin, rows, device).softmax(dim=1))
                deleted.append(torch.tensor([True, False]))
        return {"p_o": torch.cat(p_o), "p_u": torch.cat(p_u), "deleted": torch.cat(deleted)}

    return references.cached("two-version-pairs", build)


def two_version_attacks(
    references: ReferenceSet, config: AuditConfig, device: torch.device
) -> dict[str, Any]:
    pairs = shadow_pairs(references, config, device)
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
