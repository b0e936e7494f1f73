"""The ledger's tables (SQLAlchemy 2). The schema itself changes only through Alembic migrations."""

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from app.ledger.clock import utcnow

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_N_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
        list[Any]: JSON,
    }


def _enum(cls: type[enum.Enum]) -> Enum:
    # Stored as plain strings with a CHECK constraint: portable across SQLite and PostgreSQL.
    return Enum(cls, native_enum=False, values_callable=lambda e: [m.value for m in e], length=16)


class SampleState(enum.StrEnum):
    active = "active"
    forgetting = "forgetting"
    forgotten = "forgotten"


class Split(enum.StrEnum):
    train = "train"
    heldout = "heldout"
    test = "test"
    pool = "pool"


class VersionState(enum.StrEnum):
    training = "training"
    candidate = "candidate"
    auditing = "auditing"
    serving = "serving"
    rejected = "rejected"
    retired = "retired"


class RequestState(enum.StrEnum):
    pending = "pending"
    processing = "processing"
    completed = "completed"
    failed = "failed"
    rejected = "rejected"


OPEN_REQUEST_STATES = (RequestState.pending, RequestState.processing)
# At most one request per sample in these states: a repeated POST returns it instead.
LIVE_REQUEST_STATES = (*OPEN_REQUEST_STATES, RequestState.completed)


class Method(enum.StrEnum):
    """How a version's weights were made: trained, or one of the unlearning methods."""

    train = "train"
    amnesiac = "amnesiac"
    amnesiac_repair = "amnesiac+repair"
    relabel = "relabel"
    retrain_exact = "retrain-exact"
    retrain_naive = "retrain-naive"


UNLEARNING_METHODS = tuple(m for m in Method if m is not Method.train)


class JobKind(enum.StrEnum):
    train = "train"
    unlearn = "unlearn"
    audit = "audit"


class JobState(enum.StrEnum):
    queued = "queued"
    running = "running"
    held = "held"  # waits for an operator's approve or reject (screening, accuracy floor)
    succeeded = "succeeded"
    failed = "failed"
    dead = "dead"


class HoldStage(enum.StrEnum):
    screening = "screening"  # before any model changed: the job's predicted impact
    promotion = "promotion"  # a candidate passed its audit but fell below the accuracy floor


class Sample(Base):
    __tablename__ = "samples"

    sample_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    dataset: Mapped[str] = mapped_column(String(64), index=True)
    split: Mapped[Split] = mapped_column(_enum(Split))
    label: Mapped[int] = mapped_column(Integer)
    # Cleared when the sample is erased: a plain digest of a small input identifies it.
    content_sha256: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[SampleState] = mapped_column(_enum(SampleState), default=SampleState.active)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    forgotten_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_samples_dataset_split", "dataset", "split"),)


class TrainingRun(Base):
    """A sequence of recorded optimisation steps: initial training, repair, relabel or retrain."""

    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32), default="train")
    dataset: Mapped[str] = mapped_column(String(64))
    architecture: Mapped[str] = mapped_column(String(64))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    seed: Mapped[int] = mapped_column(Integer)
    num_steps: Mapped[int] = mapped_column(Integer, default=0)
    store_prefix: Mapped[str] = mapped_column(String(512))
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class StepMembership(Base):
    """Which samples were in which step: one row per (run, step, sample), indexed both ways."""

    __tablename__ = "step_membership"

    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    sample_id: Mapped[str] = mapped_column(ForeignKey("samples.sample_id"), primary_key=True)

    __table_args__ = (Index("ix_step_membership_sample_run", "sample_id", "run_id"),)


class StepDelta(Base):
    """The parameter change one step made, kept in the artifact store."""

    __tablename__ = "step_deltas"

    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    store_key: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    dtype: Mapped[str] = mapped_column(String(16))
    num_bytes: Mapped[int] = mapped_column(BigInteger)
    entries: Mapped[list[Any]] = mapped_column(default=list)
    # Set (compare-and-set) when a version subtracts this delta: invariant 2.
    rolled_back_in: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), index=True)
    purged_at: Mapped[datetime | None]


class ModelVersion(Base):
    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version: Mapped[str] = mapped_column(String(32), unique=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    run_id: Mapped[int | None] = mapped_column(ForeignKey("training_runs.id", use_alter=True))
    method: Mapped[str] = mapped_column(String(32))
    state: Mapped[VersionState] = mapped_column(_enum(VersionState))
    weights_key: Mapped[str | None] = mapped_column(String(512))
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[datetime | None]
    weights_purged_at: Mapped[datetime | None]


class AliasHistory(Base):
    """Append-only: which version an alias pointed at, from when to when, who moved it and why."""

    __tablename__ = "alias_history"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alias: Mapped[str] = mapped_column(String(32))
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None]
    moved_by: Mapped[str] = mapped_column(String(128))
    reason: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        # One open row per alias: the alias points at exactly one version at a time.
        Index(
            "uq_alias_history_open",
            "alias",
            unique=True,
            sqlite_where=text("ended_at IS NULL"),
            postgresql_where=text("ended_at IS NULL"),
        ),
    )


class DeletionRequest(Base):
    __tablename__ = "deletion_requests"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    sample_id: Mapped[str] = mapped_column(ForeignKey("samples.sample_id"))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    deadline: Mapped[datetime]
    state: Mapped[RequestState] = mapped_column(_enum(RequestState), index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), index=True)
    completed_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    requester_note: Mapped[str | None] = mapped_column(Text)
    requested_by: Mapped[str] = mapped_column(String(128))
    error: Mapped[str | None] = mapped_column(Text)
    certificate: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    __table_args__ = (
        Index(
            "uq_deletion_requests_live_sample",
            "sample_id",
            unique=True,
            sqlite_where=text("state IN ('pending', 'processing', 'completed')"),
            postgresql_where=text("state IN ('pending', 'processing', 'completed')"),
        ),
        Index("ix_deletion_requests_received_id", "received_at", "id"),
    )


class Job(Base):
    """The outbox and the unit of work."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind))
    state: Mapped[JobState] = mapped_column(_enum(JobState), index=True)
    lineage: Mapped[str] = mapped_column(String(64), default="serving")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    # The phase a running job is in and the phase's count: {"phase", "done", "total", "unit",
    # "left_seconds"}; null when it has not said, or once it has finished.
    progress_detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    method: Mapped[str | None] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    # Objects whose bytes no longer matched their recorded sha256: key, digests, the rung hit.
    integrity_failures: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # The planning-time screen of an unlearn job: its figures, the policy and each rule's outcome.
    screening: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The current (state held) or last hold, and the stages an operator approved.
    hold_stage: Mapped[HoldStage | None] = mapped_column(_enum(HoldStage))
    hold_reason: Mapped[str | None] = mapped_column(Text)
    approved_stages: Mapped[list[Any]] = mapped_column(default=list)


class Audit(Base):
    __tablename__ = "audits"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"))
    state: Mapped[str] = mapped_column(String(16), default="running")
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    decision: Mapped[str | None] = mapped_column(String(16))
    thresholds: Mapped[dict[str, Any]] = mapped_column(default=dict)
    reasons: Mapped[list[Any]] = mapped_column(default=list)
    artifacts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    report_key: Mapped[str | None] = mapped_column(String(512))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]


class PurgedArtifact(Base):
    """An object an erasure deleted from the store (step deltas are marked in ``step_deltas``):
    what it was, the digest of what was deleted, and the requests whose samples it derived from.
    Recorded with ``purged_at`` unset before the deletion, so a retry knows what it deletes."""

    __tablename__ = "purged_artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(512), index=True)
    digest_algorithm: Mapped[str] = mapped_column(String(32))  # sha256, or hmac-sha256 of it
    digest: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    request_ids: Mapped[list[Any]] = mapped_column(default=list)
    purged_at: Mapped[datetime | None]


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16))
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    scopes: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class IdempotencyKey(Base):
    __tablename__ = "idempotency_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    completed_at: Mapped[datetime | None]

    __table_args__ = (UniqueConstraint("api_key_id", "key"),)


class AuditEvent(Base):
    """Append-only record of every mutation."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(256))
    outcome: Mapped[str] = mapped_column(String(32))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
