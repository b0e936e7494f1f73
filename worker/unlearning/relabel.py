"""Relabel unlearning (Graves et al. 2021, "Unlearning"): the forget samples are replaced by
``copies`` copies each under a uniformly drawn wrong label, mixed with the retained data, and
the parent is trained on that for a few recorded steps.

Trained to the end, relabel drives F to confidently wrong labels: far *less* member-like than
data the model never saw, which shows the deletion (the gate's over-unlearning side rejects it).
So, given a probe, it stops as soon as F looks like never-seen data: when the median share of
never-seen samples that F's samples score above falls to ``stop_quantile`` (0.5: a typical
never-seen sample), probing after every ``check_every`` steps. When F already scores at that
level under the parent (the parent never made it measurably member-like), relabel would stop
before its first step and serve the parent's own weights, which were trained on F: it refuses
(``NothingToUnlearn``) and the ladder goes on to a rung that removes F's updates.

It needs the forget samples' raw data, so it must run before their erasure from the store.
"""

from collections.abc import Sequence

import numpy as np
import torch
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from app.ledger.provenance import root_run
from app.ledger.tables import Method, ModelVersion, VersionState
from worker.audit.probe import ForgetProbe
from worker.data import SampleSet, load_samples
from worker.progress import Progress
from worker.store import ArtifactStore
from worker.training import load_model, model_spec, new_version
from worker.unlearning.common import (
    NothingToUnlearn,
    continued_config,
    fine_tune_candidate,
    finish_candidate,
    retained_train_set,
)


class RelabelConfig(BaseModel, frozen=True, extra="forbid"):
    copies: int = Field(
        default=10, ge=1, description="Wrong-label copies per sample (Graves: 'a small number')"
    )
    steps: int = Field(default=60, ge=1, description="Most steps of the relabel run")
    seed: int = Field(default=0, description="Seed of the wrong labels and the data order")
    lr_scale: float = Field(default=1.0, gt=0, description="Of the first run's learning rate")
    stop_quantile: float | None = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Stop once F's median share of never-seen samples scored below it falls to "
        "this (0.5: the never-seen level); null trains all the steps",
    )
    check_every: int = Field(
        default=1, ge=1, description="Steps between two probes (the first is after the first step)"
    )


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
    probe: ForgetProbe | None = None,
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
    stop_at = config.stop_quantile if probe is not None else None

    def median_quantile() -> float:
        assert probe is not None
        return float(np.median(probe.quantiles(model)))

    if stop_at is not None and (median := median_quantile()) <= stop_at:
        raise NothingToUnlearn(
            f"the forget set already scores at the never-seen level under the parent "
            f"(median quantile {median:.2f} <= {stop_at}): relabel would stop before its first "
            "step, and the parent's unchanged weights were trained on it"
        )
    version = new_version(
        session,
        model_spec(parent),
        method=Method.relabel,
        state=VersionState.training,
        parent_id=parent.id,
        details={"dataset": dataset, "forget": list(forget_ids), "relabel": config.model_dump()},
    )
    stopped: list[float] = []

    def forgotten(step: int) -> bool:
        if stop_at is None or step % config.check_every:
            return False
        median = median_quantile()
        stopped[:] = [step, median]
        return median <= stop_at

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
        stop=forgotten,
    )
    if stopped:
        version.details = {
            **version.details,
            "relabel_stop": {"step": stopped[0], "forget_median_quantile": stopped[1]},
        }
    return finish_candidate(session, store, version, model)
