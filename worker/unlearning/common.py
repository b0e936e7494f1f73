"""What every unlearning method needs: the lineage behind a version's weights, the retained
data, the training settings to continue with, and the recording of the candidate."""

from collections.abc import Sequence
from dataclasses import replace

import torch
from sqlalchemy.orm import Session
from torch import nn

from app.ledger.provenance import get_run, lineage
from app.ledger.tables import ModelVersion, Split, TrainingRun, VersionState
from app.ledger.versions import transition_version
from worker.data import SampleSet, load_split
from worker.store import ArtifactStore
from worker.training import Progress, TrainConfig, model_spec, store_weights, train_recorded


def weight_lineage(session: Session, version: ModelVersion) -> list[ModelVersion]:
    """The version and its ancestors whose recorded steps make up its weights, newest first:
    back to (and with) the last version trained from scratch."""
    chain = []
    for ancestor in lineage(session, version.id):
        chain.append(ancestor)
        if (
            ancestor.run_id is not None
            and get_run(session, ancestor.run_id).base_version_id is None
        ):
            break
    return chain


def lineage_runs(session: Session, chain: Sequence[ModelVersion]) -> list[TrainingRun]:
    return [get_run(session, v.run_id) for v in chain if v.run_id is not None]


def root_run(session: Session, version: ModelVersion) -> TrainingRun:
    """The from-scratch run at the start of the version's weight lineage."""
    return lineage_runs(session, weight_lineage(session, version))[-1]


def continued_config(
    session: Session,
    version: ModelVersion,
    steps: int | None,
    seed_offset: int,
    lr_scale: float = 1.0,
) -> TrainConfig:
    """The root run's settings, for ``steps`` more steps (or its epochs when None), with a
    data order of their own and the learning rate scaled."""
    root = TrainConfig.from_dict(root_run(session, version).hyperparameters)
    return replace(root, max_steps=steps, seed=root.seed + seed_offset, lr=root.lr * lr_scale)


def retained_train_set(
    session: Session, store: ArtifactStore, dataset: str, forget_ids: Sequence[str]
) -> SampleSet:
    """The active training samples outside the forget set."""
    return load_split(session, store, dataset, Split.train, exclude=forget_ids)


def fine_tune_candidate(
    session: Session,
    store: ArtifactStore,
    parent: ModelVersion,
    candidate: ModelVersion,
    model: nn.Module,
    data: SampleSet,
    config: TrainConfig,
    device: torch.device,
    *,
    kind: str,
    progress: Progress | None = None,
) -> None:
    """Trains ``model`` (the parent's weights, changed or not) further on ``data`` as a recorded
    run based on the parent; the run becomes the candidate's, so it can be rolled back later."""
    run = train_recorded(
        session,
        store,
        model,
        data,
        config,
        device,
        kind=kind,
        dataset=candidate.details["dataset"],
        spec=model_spec(parent),
        base_version_id=parent.id,
        progress=progress,
    )
    candidate.run_id = run.run_id


def finish_candidate(
    session: Session, store: ArtifactStore, version: ModelVersion, model: nn.Module
) -> ModelVersion:
    store_weights(store, version, model)
    transition_version(session, version, {VersionState.training}, VersionState.candidate)
    return version
