"""The planner: for a forget set, the share of the lineage's steps it touches and the ladder of
DESIGN.md (amnesiac, amnesiac + repair, relabel, exact retraining) with a predicted test
accuracy drop for each; the first rung predicted to stay within the budget is chosen.

The predictions are a heuristic, not a guarantee; the audit decides. The rollback's drop grows
with the square of the share of steps rolled back: Graves et al. (Fig. 7) see little change up
to 1% of the batches and a collapse at 10%, and bench/bench_rollback.py on digits measures
0 points at 1.8% of the steps and 53 points at 16% (2000 x share^2 gives 0.6 and 53). A short
fine-tune on retained data recovers most of the drop ("a small amount of training corrects
that"): 60 steps at a tenth of the learning rate take 46 points back to 0, and 91 to 11.

Relabel's drop grows with the share of training samples relabelled, at a rate that differs a
lot between runs (an earlier benchmark: 10 samples cost 1.5 to 6.3 points on one digits run and
-0.7 to 1.5 on another). So once the data set has audited relabel candidates, the planner
uses their median observed rate instead of the default: a rung that keeps failing the accuracy
rule stops being tried first.

Exact retraining's drop is that of the model trained without the samples: a learning curve per
class. A class that keeps a share f of the samples the serving model learned from has its error
e grow to e / f^k, capped at losing the whole class (f = 0); e is the serving version's measured
test error. Exact retraining trains on the active samples only, so the samples other jobs are
erasing are left out too: f counts them. bench/bench_screening.py measures exact retrains of
digits against it (docs/benchmarks/screening.md). The screen (worker/screening.py) holds a job
whose predicted drop is too large, whatever rung it would take.
"""

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import Field
from pydantic_settings import SettingsConfigDict
from sqlalchemy.orm import Session

from app.ledger.audits import finished_audits_of_method, measured_test_accuracy
from app.ledger.impact import ClassCount, class_counts
from app.ledger.provenance import StepRef
from app.ledger.samples import sample_ids
from app.ledger.tables import Method, ModelVersion, SampleState, Split
from worker.config import PolicySettings
from worker.unlearning.amnesiac import plan_rollback

LADDER = (Method.amnesiac, Method.amnesiac_repair, Method.relabel, Method.retrain_exact)
ROLLBACK_RUNGS = (Method.amnesiac, Method.amnesiac_repair)  # they subtract recorded deltas


class PlannerPolicy(PolicySettings):
    section = "planner"
    model_config = SettingsConfigDict(env_prefix="LETHE_PLANNER_")

    max_predicted_drop_points: float = Field(
        default=1.0,
        ge=0,
        description="The first rung is the first whose predicted test-accuracy drop is at most "
        "this (exact retraining always qualifies)",
    )
    rollback_points_per_squared_share: float = Field(
        default=2000.0,
        ge=0,
        description="Rollback's predicted drop per squared share of steps rolled back (1%: 0.2 "
        "points; 10%: 20)",
    )
    repair_remaining_share: float = Field(
        default=0.1, ge=0, le=1, description="The part of the rollback drop a repair leaves"
    )
    relabel_points_per_sample_share: float = Field(
        default=50.0,
        ge=0,
        description="Relabel's predicted drop per share of training samples relabelled, until "
        "the data set's relabel audits say otherwise",
    )
    retrain_error_exponent: float = Field(
        default=1.5,
        gt=0,
        description="Exact retraining's predicted error: the class's error divided by its kept "
        "share to this power (a learning curve; bench/bench_screening.py)",
    )
    assumed_test_error: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="The error assumed when the serving version's accuracy was never measured",
    )
    min_test_error: float = Field(
        default=0.01,
        gt=0,
        lt=1,
        description="The least error assumed: a test set of a few hundred samples cannot show a "
        "smaller one",
    )


@dataclass(frozen=True)
class Rung:
    method: str
    predicted_test_drop_points: float
    within_budget: bool
    blocked: str | None = None  # why this rung cannot run (e.g. its deltas were purged)


@dataclass(frozen=True)
class Plan:
    affected_steps: list[StepRef]  # to roll back: touched the forget set, not yet rolled back
    already_rolled_back: list[StepRef]
    total_steps: int
    affected_share: float  # of the lineage's recorded steps
    forget_share: float  # of the active training samples
    ladder: list[Rung]
    relabel_rate_observed_in: int  # audits relabel's prediction was learned from; 0: default

    @property
    def method(self) -> str:
        """The first rung within budget that can run; exact retraining, the last rung, always
        qualifies."""
        return next(r.method for r in self.ladder if r.within_budget and r.blocked is None)

    @property
    def blocked(self) -> dict[str, str]:
        """The rungs that cannot run, with the reason."""
        return {r.method: r.blocked for r in self.ladder if r.blocked is not None}


def plan(
    session: Session,
    parent: ModelVersion,
    forget_ids: Sequence[str],
    policy: PlannerPolicy | None = None,
) -> Plan:
    policy = policy or PlannerPolicy()
    rollback = plan_rollback(session, parent, forget_ids)
    active = len(sample_ids(session, rollback.dataset, Split.train, SampleState.active))
    forget_share = len(forget_ids) / active if active else 1.0
    rollback_drop = min(100.0, policy.rollback_points_per_squared_share * rollback.share**2)
    observed = observed_relabel_rates(session, rollback.dataset, active)
    relabel_rate = (
        statistics.median(observed) if observed else policy.relabel_points_per_sample_share
    )
    predictions = {
        Method.amnesiac: rollback_drop,
        Method.amnesiac_repair: rollback_drop * policy.repair_remaining_share,
        Method.relabel: relabel_rate * forget_share,
        Method.retrain_exact: exact_retrain_drop(
            class_counts(session, rollback.dataset, forget_ids),
            measured_test_accuracy(session, parent),
            policy,
        ),
    }
    return Plan(
        affected_steps=rollback.steps,
        already_rolled_back=rollback.already_rolled_back,
        total_steps=rollback.total_steps,
        affected_share=rollback.share,
        forget_share=forget_share,
        ladder=[
            Rung(
                method,
                drop,
                drop <= policy.max_predicted_drop_points or method == LADDER[-1],
                rollback.blocked if method in ROLLBACK_RUNGS else None,
            )
            for method, drop in predictions.items()
        ],
        relabel_rate_observed_in=len(observed),
    )


def observed_relabel_rates(session: Session, dataset: str, active: int) -> list[float]:
    """Test accuracy points lost per unit of forget share, for each audited relabel candidate
    of ``dataset`` (a gain counts as no loss; the share is taken against today's active
    training samples)."""
    if not active:
        return []
    rates = []
    for version, audit in finished_audits_of_method(session, Method.relabel):
        drop = audit.metrics.get("utility", {}).get("test", {}).get("drop_points")
        forgotten = len(version.details.get("forget", []))
        if version.details.get("dataset") == dataset and drop is not None and forgotten:
            rates.append(max(0.0, float(drop)) * active / forgotten)
    return rates


def exact_retrain_drop(
    classes: Sequence[ClassCount], test_accuracy: float | None, policy: PlannerPolicy
) -> float:
    """Test accuracy points the model retrained without the forget set is predicted to lose:
    each class weighs by its share of the training data, and the test set is assumed to follow
    the training set's class mix."""
    error = policy.assumed_test_error if test_accuracy is None else max(0.0, 1.0 - test_accuracy)
    error = max(error, policy.min_test_error)
    kept = sum(c.kept for c in classes)
    lost = 0.0
    for c in classes:
        if c.kept <= 0:
            continue
        share = max(0, c.train - c.removed) / c.kept  # without every sample being erased
        grown = error / share**policy.retrain_error_exponent if share > 0 else 1.0
        lost += c.kept / kept * (min(1.0, grown) - error)
    return 100 * max(0.0, lost)
