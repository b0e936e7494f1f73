"""The retraining baselines: naive retraining (the parent keeps training on D minus F) and
exact retraining from scratch without F, with the seed and hyper-parameters of the lineage's
first run: the reference that benchmarks and audits compare with."""

from collections.abc import Sequence

import torch
from sqlalchemy.orm import Session

from app.ledger.provenance import root_run
from app.ledger.tables import Method, ModelVersion, VersionState
from worker.nets import build_model
from worker.progress import Progress
from worker.store import ArtifactStore
from worker.training import (
    TrainConfig,
    load_model,
    model_spec,
    new_version,
    train_recorded,
)
from worker.unlearning.common import (
    continued_config,
    fine_tune_candidate,
    finish_candidate,
    retained_train_set,
)


def naive_retrain(
    session: Session,
    store: ArtifactStore,
    parent: ModelVersion,
    forget_ids: Sequence[str],
    device: torch.device,
    *,
    steps: int | None = None,
    progress: Progress | None = None,
) -> ModelVersion:
    """Continues training the parent on the retained data: ``steps`` steps, or as many epochs
    as the first run when None."""
    dataset = root_run(session, parent).dataset
    model = load_model(store, parent, device)
    version = new_version(
        session,
        model_spec(parent),
        method=Method.retrain_naive,
        state=VersionState.training,
        parent_id=parent.id,
        details={"dataset": dataset, "forget": list(forget_ids)},
    )
    fine_tune_candidate(
        session,
        store,
        parent,
        version,
        model,
        retained_train_set(session, store, dataset, forget_ids),
        continued_config(session, parent, steps, seed_offset=version.id),
        device,
        kind="retrain-naive",
        progress=progress,
    )
    return finish_candidate(session, store, version, model)


def exact_retrain(
    session: Session,
    store: ArtifactStore,
    parent: ModelVersion,
    forget_ids: Sequence[str],
    device: torch.device,
    *,
    progress: Progress | None = None,
) -> ModelVersion:
    """Trains from the same initial weights (same seed) with the same hyper-parameters on the
    active training samples minus the forget set. The new run starts from no version, so the
    candidate's weight lineage begins with it."""
    root = root_run(session, parent)
    config = TrainConfig.from_dict(root.hyperparameters)
    spec = model_spec(parent)
    model = build_model(spec, seed=config.seed)
    version = new_version(
        session,
        spec,
        method=Method.retrain_exact,
        state=VersionState.training,
        parent_id=parent.id,
        details={"dataset": root.dataset, "forget": list(forget_ids)},
    )
    run = train_recorded(
        session,
        store,
        model,
        retained_train_set(session, store, root.dataset, forget_ids),
        config,
        device,
        kind="retrain-exact",
        dataset=root.dataset,
        spec=spec,
        progress=progress,
    )
    version.run_id = run.run_id
    return finish_candidate(session, store, version, model)
