"""One entry point for every unlearning method, by name: the job's ladder and ``lethe forget``
call the same function."""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from sqlalchemy.orm import Session

from app.ledger.tables import ModelVersion
from worker.store import ArtifactStore
from worker.training import Progress
from worker.unlearning.amnesiac import amnesiac_rollback
from worker.unlearning.common import root_run
from worker.unlearning.relabel import RelabelConfig, relabel_unlearning
from worker.unlearning.retrain import exact_retrain, naive_retrain

METHODS = ("amnesiac", "amnesiac+repair", "relabel", "retrain-exact", "retrain-naive")


@dataclass(frozen=True)
class MethodOptions:
    # None: a tenth of the first run's steps (at least 10). On digits 60 steps, a tenth of the
    # 570-step run, at a tenth of its learning rate take a 46-point rollback drop back to 0
    # (bench/bench_rollback.py); see the planner's notes.
    repair_steps: int | None = None
    relabel: RelabelConfig = field(default_factory=RelabelConfig)
    naive_steps: int | None = None  # None: as many epochs as the first run


def unlearn(
    session: Session,
    store: ArtifactStore,
    parent: ModelVersion,
    forget_ids: Sequence[str],
    method: str,
    device: torch.device,
    options: MethodOptions = MethodOptions(),
    progress: Progress | None = None,
) -> ModelVersion:
    """A candidate version: ``parent`` with ``forget_ids`` unlearned by ``method``."""
    if method in ("amnesiac", "amnesiac+repair"):
        repair = 0
        if method == "amnesiac+repair":
            repair = options.repair_steps or max(10, root_run(session, parent).num_steps // 10)
        return amnesiac_rollback(
            session, store, parent, forget_ids, device, repair_steps=repair, progress=progress
        )
    if method == "relabel":
        return relabel_unlearning(
            session, store, parent, forget_ids, device, options.relabel, progress=progress
        )
    if method == "retrain-exact":
        return exact_retrain(session, store, parent, forget_ids, device, progress=progress)
    if method == "retrain-naive":
        return naive_retrain(
            session, store, parent, forget_ids, device, steps=options.naive_steps, progress=progress
        )
    raise ValueError(f"unknown unlearning method {method!r}; one of {', '.join(METHODS)}")
