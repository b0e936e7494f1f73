"""Relabel unlearning (Graves et al. 2021, "Unlearning"): the forget samples are replaced by
``copies`` copies each under a uniformly drawn wrong label, mixed with the retained data, and
the parent is trained on that for a few recorded steps.

It needs the forget samples' raw data, so it must run before their erasure from the store.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from sqlalchemy.orm import Session

from app.ledger.tables import ModelVersion, VersionState
from worker.data import SampleSet, load_samples
from worker.store import ArtifactStore
from worker.training import Progress, load_model, model_spec, new_version
from worker.unlearning.common import (
    continued_config,
    fine_tune_candidate,
    finish_candidate,
    retained_train_set,
    root_run,
)


@dataclass(frozen=True)
class RelabelConfig:
    copies: int = 10  # no published value; Graves only says "a small number"
    steps: int = 60
    seed: int = 0
    lr_scale: float = 1.0  # of the first run's learning rate


def wrong_label_copies(forget: SampleSet, copies: int, seed: int) -> SampleSet:
    """``copies`` copies of every sample under one label drawn uniformly among its wrong ones
    (adding 1..C-1 modulo C never gives back the true label). One wrong label per sample,
    rather than one per copy, gives a consistent target: on digits it reaches zero accuracy on
    the forget set in half the steps, with less harm to the test accuracy."""
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, forget.num_classes, (len(forget),), generator=generator)
    labels = (forget.labels.cpu() + shift) % forget.num_classes
    relabelled = SampleSet(forget.sample_ids, forget.images.cpu(), labels, forget.num_classes)
    return relabelled.select([i for i in range(len(forget)) for _ in range(copies)])


def relabel_unlearning(
    session: Session,
    store: ArtifactStore,
    parent: ModelVersion,
    forget_ids: Sequence[str],
    device: torch.device,
    config: RelabelConfig = RelabelConfig(),
    *,
    progress: Progress | None = None,
) -> ModelVersion:
    dataset = root_run(session, parent).dataset
    forget = load_samples(store, dataset, forget_ids)
    missing = set(forget_ids) - set(forget.sample_ids)
    if missing:
        raise LookupError(f"relabel needs the raw data of {sorted(missing)}, already erased")
    mixed = retained_train_set(session, store, dataset, forget_ids).plus(
        wrong_label_copies(forget, config.copies, config.seed)
    )
    model = load_model(store, parent, device)
    version = new_version(
        session,
        model_spec(parent),
        method="relabel",
        state=VersionState.training,
        parent_id=parent.id,
        details={"dataset": dataset, "forget": list(forget_ids), "relabel": vars(config)},
    )
    fine_tune_candidate(
        session,
        store,
        parent,
        version,
        model,
        mixed,
        continued_config(session, parent, config.steps, config.seed + version.id, config.lr_scale),
        device,
        kind="relabel",
        progress=progress,
    )
    return finish_candidate(session, store, version, model)
