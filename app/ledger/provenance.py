"""Training provenance: runs, which samples were in which step, and each step's stored delta."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from app.ledger.clock import utcnow
from app.ledger.db import affected_rows
from app.ledger.errors import NotFound, StateConflict
from app.ledger.tables import ModelVersion, StepDelta, StepMembership, TrainingRun

StepRef = tuple[int, int]  # (run_id, step)


@dataclass(frozen=True)
class DeltaRecord:
    step: int
    store_key: str
    sha256: str
    dtype: str
    num_bytes: int
    entries: list[str]


def create_run(
    session: Session,
    *,
    kind: str,
    dataset: str,
    architecture: str,
    hyperparameters: dict[str, Any],
    seed: int,
    store_prefix: str,
    base_version_id: int | None = None,
) -> TrainingRun:
    run = TrainingRun(
        kind=kind,
        dataset=dataset,
        architecture=architecture,
        hyperparameters=hyperparameters,
        seed=seed,
        store_prefix=store_prefix,
        base_version_id=base_version_id,
    )
    session.add(run)
    session.flush()
    return run


def get_run(session: Session, run_id: int) -> TrainingRun:
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise NotFound(f"unknown training run {run_id}")
    return run


def finish_run(session: Session, run_id: int, num_steps: int) -> None:
    run = get_run(session, run_id)
    run.num_steps = num_steps
    run.finished_at = utcnow()


def record_steps(
    session: Session,
    run_id: int,
    batches: Iterable[tuple[int, Sequence[str]]],
    deltas: Iterable[DeltaRecord] = (),
) -> None:
    """Records a chunk of steps: the sample IDs of each batch and, optionally, their deltas."""
    membership = [
        {"run_id": run_id, "step": step, "sample_id": sid}
        for step, sample_ids in batches
        for sid in dict.fromkeys(sample_ids)  # a sample repeated in a batch is one membership
    ]
    if membership:
        session.execute(insert(StepMembership), membership)
    delta_rows = [
        {
            "run_id": run_id,
            "step": d.step,
            "store_key": d.store_key,
            "sha256": d.sha256,
            "dtype": d.dtype,
            "num_bytes": d.num_bytes,
            "entries": d.entries,
        }
        for d in deltas
    ]
    if delta_rows:
        session.execute(insert(StepDelta), delta_rows)


def steps_of_samples(session: Session, sample_ids: Sequence[str]) -> dict[str, list[StepRef]]:
    """sample → the (run, step) pairs it was in, over every recorded run."""
    result: dict[str, list[StepRef]] = {sid: [] for sid in sample_ids}
    rows = session.execute(
        select(StepMembership.sample_id, StepMembership.run_id, StepMembership.step)
        .where(StepMembership.sample_id.in_(sample_ids))
        .order_by(StepMembership.run_id, StepMembership.step)
    )
    for sample_id, run_id, step in rows:
        result[sample_id].append((run_id, step))
    return result


def samples_in_step(session: Session, run_id: int, step: int) -> list[str]:
    """step → the sample IDs of its batch."""
    return list(
        session.scalars(
            select(StepMembership.sample_id)
            .where(StepMembership.run_id == run_id, StepMembership.step == step)
            .order_by(StepMembership.sample_id)
        )
    )


def runs_containing(session: Session, sample_ids: Sequence[str]) -> set[int]:
    return set(
        session.scalars(
            select(StepMembership.run_id).where(StepMembership.sample_id.in_(sample_ids)).distinct()
        )
    )


IN_CHUNK = 500  # bound parameters per query, well under SQLite's and PostgreSQL's limits


def step_deltas(session: Session, steps: Iterable[StepRef]) -> list[StepDelta]:
    """The delta rows of the given steps, ordered by run and step, as the database holds them
    now (rolled-back and purge marks are bulk updates that loaded rows do not see). Only the
    wanted rows are read: a run may hold hundreds of thousands of steps."""
    by_run: dict[int, list[int]] = {}
    for run_id, step in sorted(set(steps)):
        by_run.setdefault(run_id, []).append(step)
    rows: list[StepDelta] = []
    for run_id, run_steps in by_run.items():
        for start in range(0, len(run_steps), IN_CHUNK):
            chunk = run_steps[start : start + IN_CHUNK]
            rows.extend(
                session.scalars(
                    select(StepDelta)
                    .where(StepDelta.run_id == run_id, StepDelta.step.in_(chunk))
                    .order_by(StepDelta.step)
                    .execution_options(populate_existing=True)  # marks are bulk updates
                )
            )
    return rows


def rolled_back_steps(session: Session, version_ids: Sequence[int]) -> set[StepRef]:
    """Steps already subtracted by any of these versions (a lineage's ancestors)."""
    rows = session.execute(
        select(StepDelta.run_id, StepDelta.step).where(StepDelta.rolled_back_in.in_(version_ids))
    )
    return {(run_id, step) for run_id, step in rows}


def mark_rolled_back(session: Session, steps: Iterable[StepRef], version_id: int) -> None:
    """Invariant 2: claims each step for ``version_id`` with compare-and-set, or raises.

    A step already subtracted (by any version still holding it) is refused; the caller's
    transaction must then roll back so that no claim of this call survives.
    """
    for run_id, step in sorted(set(steps)):
        claimed = affected_rows(
            session.execute(
                update(StepDelta)
                .where(
                    StepDelta.run_id == run_id,
                    StepDelta.step == step,
                    StepDelta.rolled_back_in.is_(None),
                )
                .values(rolled_back_in=version_id)
                .execution_options(synchronize_session=False)
            )
        )
        if claimed != 1:
            raise StateConflict(f"step {step} of run {run_id} is already rolled back or unknown")


def release_rollbacks(session: Session, version_id: int) -> int:
    """A rejected candidate gives its steps back, so that a later candidate may subtract them."""
    return affected_rows(
        session.execute(
            update(StepDelta)
            .where(StepDelta.rolled_back_in == version_id)
            .values(rolled_back_in=None)
            .execution_options(synchronize_session=False)
        )
    )


def mark_deltas_purged(session: Session, steps: Iterable[StepRef]) -> None:
    now = utcnow()
    for run_id, step in set(steps):
        session.execute(
            update(StepDelta)
            .where(StepDelta.run_id == run_id, StepDelta.step == step)
            .values(purged_at=now)
            .execution_options(synchronize_session=False)
        )


def lineage(session: Session, version_id: int) -> list[ModelVersion]:
    """The version and its ancestors, newest first."""
    chain: list[ModelVersion] = []
    current: int | None = version_id
    while current is not None:
        version = session.get(ModelVersion, current)
        if version is None:
            raise NotFound(f"unknown model version id {current}")
        chain.append(version)
        current = version.parent_id
    return chain


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
