"""Request and response bodies of the HTTP API. Requests forbid unknown fields."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Note = Annotated[str, StringConstraints(max_length=1000)]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=1000, strip_whitespace=True)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FieldError(BaseModel):
    loc: list[str | int] = Field(description="Where the invalid input is, e.g. ['query', 'limit']")
    msg: str
    type: str


class ProblemDetail(BaseModel):
    """RFC 9457 problem details: the body of every error answer (application/problem+json)."""

    type: str
    title: str
    status: int
    detail: str = Field(description="What went wrong, in words a caller can act on")
    instance: str = Field(description="The path that was called")
    errors: list[FieldError] | None = Field(default=None, description="Each invalid input (422)")
    certificates: list[str] | None = Field(
        default=None, description="The certificates of the erasure that purged it (410)"
    )


class ForgetBody(Strict):
    note: Note | None = Field(default=None, description="Free text kept with the request")


class ForgetManyBody(Strict):
    sample_ids: list[str] = Field(
        min_length=1, description="At most LETHE_BATCH_MAX_SAMPLE_IDS (1,000 by default)"
    )
    note: Note | None = None


class JobStep(BaseModel):
    """What a running job is doing: its phase and, where the phase counts something, how far."""

    phase: str = Field(
        default="",
        description="e.g. 'audit models: reference models'; nested phases are joined by ': '",
    )
    done: int | None = None
    total: int | None = None
    unit: str | None = Field(default=None, description="What done and total count, e.g. 'models'")
    left_seconds: float | None = Field(
        default=None, description="The phase's time left, estimated from its pace so far"
    )


class JobSummary(BaseModel):
    id: int
    kind: str
    state: str
    progress: int = Field(description="Percent of the whole job done, 0-100")
    progress_detail: JobStep | None = Field(
        default=None, description="The phase of a running job; null when it has not said"
    )
    attempts: int
    method: str | None
    error: str | None
    hold_stage: Literal["screening", "promotion"] | None = Field(
        default=None,
        description="Where the job was last held for an operator (state `held` while it waits)",
    )
    hold_reason: str | None = Field(default=None, description="Why it was held, in words")
    approved_stages: list[str] = Field(
        default_factory=list, description="The holds an operator approved"
    )


class ForgetRequestOut(BaseModel):
    request_id: str
    sample_id: str
    state: str
    received_at: datetime
    deadline: datetime
    updated_at: datetime
    completed_at: datetime | None
    overdue: bool
    job: JobSummary | None
    completed_in_version: str | None
    error: str | None
    certificate: dict[str, Any] | None
    links: dict[str, str]


class ForgetReceipt(BaseModel):
    """What filing a request answers: its identity and state. Its job, error and certificate
    are read with `GET /forget/requests/{request_id}` (status:read)."""

    request_id: str
    sample_id: str
    state: str
    received_at: datetime
    deadline: datetime
    links: dict[str, str]


class ForgetManyOut(BaseModel):
    requests: list[ForgetReceipt]
    created: int


class RequestPage(BaseModel):
    items: list[ForgetRequestOut]
    next_cursor: str | None


class AliasMove(BaseModel):
    version: str
    started_at: datetime
    ended_at: datetime | None
    moved_by: str
    reason: str


class ModelVersionOut(BaseModel):
    version: str
    parent: str | None
    run_id: int | None
    method: str
    state: str
    weights_sha256: str | None
    weights_purged: bool
    details: dict[str, Any]
    created_at: datetime
    promoted_at: datetime | None
    links: dict[str, str]


class ModelVersionDetail(ModelVersionOut):
    lineage: list[str] = Field(description="This version and its ancestors, newest first")


class ModelPage(BaseModel):
    items: list[ModelVersionOut]
    next_cursor: str | None


class ServingOut(BaseModel):
    version: ModelVersionOut | None
    history: list[AliasMove]


class OperatorDecision(Strict):
    reason: Reason


class PurgedArtifactOut(BaseModel):
    key: str = Field(description="Where the store held it")
    purged_at: datetime
    certificates: list[str] = Field(description="The certificates of the erasure that purged it")


class AuditOut(BaseModel):
    version: str
    state: Literal["pending", "running", "done", "not-audited"] = Field(
        description="202 while pending or running; not-audited: no audit was or will be made"
    )
    reason: str | None = Field(default=None, description="Why it is pending or not audited")
    decision: str | None
    thresholds: dict[str, Any]
    reasons: list[Any]
    metrics: dict[str, Any]
    artifacts: dict[str, str] = Field(description="Name -> URL of each artifact still held")
    purged_artifacts: dict[str, PurgedArtifactOut] = Field(
        default_factory=dict, description="Artifacts an erasure purged (GET answers 410)"
    )
    created_at: datetime | None
    finished_at: datetime | None


class PublicKeyOut(BaseModel):
    algorithm: Literal["Ed25519"]
    key_id: str = Field(description="The first 16 hex digits of the raw public key's sha256")
    public_key_pem: str
    signed_payload: str = Field(
        description="What the signature covers: the certificate without `signature`, as JSON "
        "with sorted keys, no whitespace, UTF-8"
    )


class LeftoverOut(BaseModel):
    kind: str
    key: str
    reason: str


class VerificationOut(BaseModel):
    request_id: str
    sample_id: str
    verified: bool = Field(description="Signature valid, nothing listed or derived left")
    signature_valid: bool
    key_id: str
    listed_checked: int
    listed_present: list[str] = Field(description="Listed as purged, yet still in the store")
    derived_checked: int
    derived_present: list[LeftoverOut] = Field(
        description="Derived from the sample (recomputed now), in the store, not declared retained"
    )
    retained: list[str] = Field(description="Declared retained by the certificate (legal hold)")
    checked_at: datetime


class TrainBody(Strict):
    dataset: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")] = "digits"
    architecture: Literal["small-cnn", "resnet18"] = "small-cnn"
    epochs: int = Field(default=10, ge=1, le=500)
    batch_size: int = Field(default=64, ge=1, le=4096)
    learning_rate: float = Field(default=0.05, gt=0, le=10)
    optimizer: Literal["sgd", "adam"] = "sgd"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    delta_dtype: Literal["fp32", "bf16"] = "fp32"
    prepare_audits: bool = Field(
        default=True,
        description="Also train the audit's reference and attack models now, so that the "
        "first deletion does not wait for them",
    )


class JobOut(BaseModel):
    job: JobSummary
    integrity_failures: list[dict[str, Any]] = Field(
        default_factory=list,
        description="Objects whose bytes failed their recorded sha256 (key, expected_sha256, "
        "actual_sha256), and the ladder rung that read them",
    )
    screening: dict[str, Any] | None = Field(
        default=None,
        description="An unlearn job's planning-time screen: its figures, the policy and each "
        "rule's outcome",
    )
    links: dict[str, str]


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None


class StatsOut(BaseModel):
    requests_by_state: dict[str, int]
    jobs_by_state: dict[str, int]
    versions_by_state: dict[str, int]
    time_to_erasure_p50_s: float | None
    time_to_erasure_p95_s: float | None
    oldest_open_received_at: datetime | None
    overdue: int
    serving_version: str | None
