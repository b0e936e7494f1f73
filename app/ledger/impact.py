"""What a set of deletion requests would remove, counted in the ledger: per class of the
training split (cumulatively, with every sample already erased or being erased) and per API key
(for quotas and concentration). Read by the worker's planner and screen before any model
changes."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.orm import Session

from app.ledger.tables import LIVE_REQUEST_STATES, DeletionRequest, Sample, SampleState, Split


@dataclass(frozen=True)
class ClassCount:
    label: int
    train: int  # training samples of the class, whatever their state
    forgotten: int  # erased already: the serving model no longer holds them
    removed: int  # erased, being erased by any job, or in the forget set
    forget: int  # in the forget set

    @property
    def kept(self) -> int:
        """The samples the serving model still holds (its training data, minus erasures)."""
        return self.train - self.forgotten


def _count(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def class_counts(session: Session, dataset: str, forget_ids: Sequence[str]) -> list[ClassCount]:
    """Each class of ``dataset``'s training split, by label; samples of other splits in
    ``forget_ids`` (no model learned from them) are not counted."""
    in_forget = Sample.sample_id.in_(list(forget_ids))
    rows = session.execute(
        select(
            Sample.label,
            func.count(),
            _count(Sample.state == SampleState.forgotten),
            _count((Sample.state != SampleState.active) | in_forget),
            _count(in_forget),
        )
        .where(Sample.dataset == dataset, Sample.split == Split.train)
        .group_by(Sample.label)
        .order_by(Sample.label)
    )
    return [ClassCount(*row) for row in rows]


def requests_by_key(session: Session, job_id: int) -> dict[str, int]:
    """The job's requests per API key that filed them."""
    rows = session.execute(
        select(DeletionRequest.requested_by, func.count())
        .where(DeletionRequest.job_id == job_id)
        .group_by(DeletionRequest.requested_by)
    )
    return {key: count for key, count in rows}


@dataclass(frozen=True)
class KeyUsage:
    since: int  # live requests received since the window's start
    total: int  # live requests ever


def key_usage(session: Session, keys: Iterable[str], since: datetime) -> dict[str, KeyUsage]:
    """Live requests (open or completed: those that erase, or will) filed by each key, within
    the window and in all; a failed or rejected request erased nothing and does not count."""
    rows = session.execute(
        select(
            DeletionRequest.requested_by,
            _count(DeletionRequest.received_at >= since),
            func.count(),
        )
        .where(
            DeletionRequest.requested_by.in_(list(keys)),
            DeletionRequest.state.in_(LIVE_REQUEST_STATES),
        )
        .group_by(DeletionRequest.requested_by)
    )
    return {key: KeyUsage(within, total) for key, within, total in rows}
