"""What every unlearning method needs: the lineage behind a version's weights, the retained
data, the training settings to continue with, and the recording of the candidate."""

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from sqlalchemy.orm import Session
from torch import nn

from app.ledger.provenance import root_run
from app.ledger.tables import ModelVersion, Split, VersionState
from app.ledger.versions import transition_version
from worker.data import SampleSet, load_split
from worker.progress import Progress
from worker.store import ArtifactStore
from worker.training import TrainConfig, model_spec, store_weights, train_recorded


class NothingToUnlearn(Exception):
    """The method would leave the parent's weights as they are: they were trained on the forget
    set, so an unchanged copy erases nothing, whatever an audit could measure. The ladder goes
    on to the next rung."""


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
    stop: Callable[[int], bool] | None = None,
) -> None:
    """Trains ``model`` (the parent's weights, changed or not) further on ``data`` as a recorded
    run based on the parent; the run becomes the candidate's, so it can be rolled back later.
    ``stop`` may end it early (see ``worker.training.train``)."""
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
        stop=stop,
    )
    candidate.run_id = run.run_id


def finish_candidate(
    session: Session, store: ArtifactStore, version: ModelVersion, model: nn.Module
) -> ModelVersion:
    store_weights(store, version, model)
    transition_version(session, version, {VersionState.training}, VersionState.candidate)
    return version
