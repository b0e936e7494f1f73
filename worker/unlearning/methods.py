"""One entry point for every unlearning method, by name: the job's ladder and ``lethe forget``
call the same function."""

from collections.abc import Sequence

import torch
from pydantic import Field
from pydantic_settings import SettingsConfigDict
from sqlalchemy.orm import Session

from app.ledger.provenance import root_run
from app.ledger.tables import UNLEARNING_METHODS, Method, ModelVersion
from worker.audit.runner import forget_probe
from worker.config import PolicySettings
from worker.progress import Progress
from worker.store import ArtifactStore
from worker.unlearning.amnesiac import amnesiac_rollback
from worker.unlearning.relabel import RelabelConfig, relabel_unlearning
from worker.unlearning.retrain import exact_retrain, naive_retrain


class MethodOptions(PolicySettings):
    section = "methods"
    model_config = SettingsConfigDict(env_prefix="LETHE_METHODS_")

    repair_steps: int | None = Field(
        default=None,
        ge=1,
        description="Repair fine-tune steps after a rollback; null: a tenth of the first run's "
        "steps, at least 10 (on digits a tenth of the run at a tenth of its learning rate takes "
        "a 46-point rollback drop back to 0: bench/bench_rollback.py)",
    )
    repair_lr_scale: float = Field(
        default=0.1, gt=0, description="Repair learning rate, as a share of the first run's"
    )
    relabel: RelabelConfig = Field(default_factory=RelabelConfig)
    naive_steps: int | None = Field(
        default=None, ge=1, description="Naive retraining steps; null: the first run's epochs"
    )


def unlearn(
    session: Session,
    store: ArtifactStore,
    parent: ModelVersion,
    forget_ids: Sequence[str],
    method: str,
    device: torch.device,
    options: MethodOptions | None = None,
    progress: Progress | None = None,
) -> ModelVersion:
    """A candidate version: ``parent`` with ``forget_ids`` unlearned by ``method``."""
    options = options or MethodOptions()
    if method in (Method.amnesiac, Method.amnesiac_repair):
        repair = 0
        if method == Method.amnesiac_repair:
            repair = options.repair_steps or max(10, root_run(session, parent).num_steps // 10)
        return amnesiac_rollback(
            session,
            store,
            parent,
            forget_ids,
            device,
            repair_steps=repair,
            repair_lr_scale=options.repair_lr_scale,
            progress=progress,
        )
    if method == Method.relabel:
        probe = forget_probe(session, store, parent, forget_ids, device)
        return relabel_unlearning(
            session,
            store,
            parent,
            forget_ids,
            device,
            options.relabel,
            probe=probe,
            progress=progress,
        )
    if method == Method.retrain_exact:
        return exact_retrain(session, store, parent, forget_ids, device, progress=progress)
    if method == Method.retrain_naive:
        return naive_retrain(
            session, store, parent, forget_ids, device, steps=options.naive_steps, progress=progress
        )
    raise ValueError(
        f"unknown unlearning method {method!r}; one of {', '.join(UNLEARNING_METHODS)}"
    )
