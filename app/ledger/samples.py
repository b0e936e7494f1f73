"""The samples a data set contributes, keyed by their public, stable sample IDs."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from app.ledger.clock import utcnow
from app.ledger.db import affected_rows
from app.ledger.errors import NotFound, StateConflict
from app.ledger.tables import Sample, SampleState, Split


@dataclass(frozen=True)
class SampleRecord:
    sample_id: str
    split: Split
    label: int
    content_sha256: str


def register_samples(session: Session, dataset: str, records: Iterable[SampleRecord]) -> int:
    """Adds samples not yet known (ingest is re-runnable); returns how many were new."""
    records = list(records)
    known = set(session.scalars(select(Sample.sample_id).where(Sample.dataset == dataset)).all())
    new = [
        {
            "sample_id": r.sample_id,
            "dataset": dataset,
            "split": r.split,
            "label": r.label,
            "content_sha256": r.content_sha256,
            "state": SampleState.active,
        }
        for r in records
        if r.sample_id not in known
    ]
    if new:
        session.execute(insert(Sample), new)
    return len(new)


def get_sample(session: Session, sample_id: str) -> Sample:
    sample = session.get(Sample, sample_id)
    if sample is None:
        raise NotFound(f"unknown sample {sample_id!r}")
    return sample


def missing_samples(session: Session, sample_ids: Sequence[str]) -> list[str]:
    found = set(session.scalars(select(Sample.sample_id).where(Sample.sample_id.in_(sample_ids))))
    return [s for s in sample_ids if s not in found]


def sample_ids(
    session: Session, dataset: str, split: Split, state: SampleState | None = None
) -> list[str]:
    query = select(Sample.sample_id).where(Sample.dataset == dataset, Sample.split == split)
    if state is not None:
        query = query.where(Sample.state == state)
    return list(session.scalars(query.order_by(Sample.sample_id)))


def set_sample_state(
    session: Session, sample_ids: Sequence[str], expected: SampleState, new: SampleState
) -> None:
    """Compare-and-set on every sample: all must be in ``expected`` or nothing changes."""
    values: dict[str, object] = {"state": new}
    if new is SampleState.forgotten:
        values["forgotten_at"] = utcnow()
    changed = affected_rows(
        session.execute(
            update(Sample)
            .where(Sample.sample_id.in_(sample_ids), Sample.state == expected)
            .values(**values)
        )
    )
    if changed != len(set(sample_ids)):
        raise StateConflict(f"samples are not all {expected.value}; none moved to {new.value}")


def samples_by_id(session: Session, sample_ids: Sequence[str]) -> dict[str, Sample]:
    rows = session.scalars(select(Sample).where(Sample.sample_id.in_(sample_ids)))
    return {sample.sample_id: sample for sample in rows}
