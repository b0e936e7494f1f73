"""Unlearning methods: each takes a parent version and a forget set and records a candidate."""

from worker.unlearning.amnesiac import (
    amnesiac_rollback,
    plan_rollback,
    purge_deltas,
    subtract_steps,
)
from worker.unlearning.common import NothingToUnlearn
from worker.unlearning.methods import MethodOptions, unlearn
from worker.unlearning.planner import LADDER, Plan, PlannerPolicy, plan
from worker.unlearning.relabel import RelabelConfig, relabel_unlearning
from worker.unlearning.retrain import exact_retrain, naive_retrain

__all__ = [
    "LADDER",
    "MethodOptions",
    "NothingToUnlearn",
    "Plan",
    "PlannerPolicy",
    "RelabelConfig",
    "amnesiac_rollback",
    "exact_retrain",
    "naive_retrain",
    "plan",
    "plan_rollback",
    "purge_deltas",
    "relabel_unlearning",
    "subtract_steps",
    "unlearn",
]
