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


class ForgetBody(Strict):
    note: Note | None = Field(default=None, description="Free text kept with the request")


class ForgetManyBody(Strict):
    sample_ids: list[str] = Field(
        min_length=1, description="At most LETHE_BATCH_MAX_SAMPLE_IDS (1,000 by default)"
    )
    note: Note | None = None


class JobSummary(BaseModel):
    id: int
    kind: str
    state: str
    progress: int
    attempts: int
    method: str | None
    error: str | None


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


class AuditOut(BaseModel):
    version: str
    state: Literal["pending", "running", "done"]
    decision: str | None
    thresholds: dict[str, Any]
    reasons: list[Any]
    metrics: dict[str, Any]
    artifacts: dict[str, str]
    created_at: datetime | None
    finished_at: datetime | None


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
    links: dict[str, str]


class StatsOut(BaseModel):
    requests_by_state: dict[str, int]
    jobs_by_state: dict[str, int]
    versions_by_state: dict[str, int]
    time_to_erasure_p50_s: float | None
    time_to_erasure_p95_s: float | None
    oldest_open_received_at: datetime | None
    overdue: int
    serving_version: str | None
