"""One settings object for the whole service, read from the environment (prefix ``LETHE_``)."""

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LETHE_", env_file=".env", env_ignore_empty=True, extra="ignore"
    )

    # Embedded mode keeps everything under one folder; operators point these elsewhere.
    home: Path = Field(default=Path("lethe-data"), description="Folder for embedded-mode state")
    database_url: str = Field(
        default="", description="SQLAlchemy URL; empty means a SQLite file under `home`"
    )
    broker_url: str = Field(
        default="", description="Celery broker URL; empty means an in-process worker"
    )
    store_url: str = Field(
        default="", description="fsspec URL of the artifact store; empty means `home`/store"
    )

    bootstrap_api_key: SecretStr | None = Field(
        default=None,
        description="Demo/bootstrap key with every scope, registered (hashed) at start-up",
    )
    api_key_cache_seconds: float = Field(
        default=5.0, description="How long a verified key is trusted before it is looked up again"
    )
    api_key_refusals_cached: int = Field(
        default=10_000,
        description="Unknown or revoked keys whose refusal is remembered (the oldest are "
        "forgotten first); valid keys are cached apart, so bogus ones never push them out",
    )

    deletion_deadline_days: int = Field(default=30, description="GDPR Art. 12(3): one month")
    idempotency_key_ttl_hours: int = Field(
        default=24, description="How long an Idempotency-Key answer is replayed"
    )
    idempotency_stale_seconds: int = Field(
        default=60, description="An in-flight idempotency key older than this may be taken over"
    )
    page_size_max: int = Field(default=200, description="Largest page a list call returns")
    db_connect_timeout_seconds: int = Field(
        default=3, description="Give up on the database after this; the API answers 503"
    )
    db_pool_size: int = Field(
        default=20,
        description="Connections per process, and as many again on overflow: together as many "
        "as the threads that serve requests (40), so that none waits for a connection",
    )
    retry_after_seconds: int = Field(default=5, description="Retry-After sent with 503")

    # Limits met before a request is authenticated (issue 12): what one client can make the API
    # hold, read or look up. Rate limits are `limits` notation (N per second, minute or hour).
    max_body_bytes: int = Field(
        default=1_048_576,
        description="Largest request body; a larger one is answered 413 before it is read "
        "(by Content-Length) or as soon as it grows past this (chunked)",
    )
    max_header_bytes: int = Field(
        default=16_384, description="Largest request line and headers; larger is answered 431"
    )
    header_timeout_seconds: float = Field(
        default=10.0,
        description="A connection must send a request's line and headers within this; "
        "otherwise 408 and the connection is closed (slowly sent headers)",
    )
    body_timeout_seconds: float = Field(
        default=10.0,
        description="A request's body must arrive whole within this; otherwise 408 and the "
        "connection is closed (slowly sent bodies)",
    )
    batch_max_sample_ids: int = Field(
        default=1000, description="Most sample IDs in one `POST /forget`; more is answered 413"
    )
    rate_limit_storage_url: str = Field(
        default="",
        description="Where rate-limit counters live: `redis://...` shares them between API "
        "processes, `memory://` keeps them per process; empty means the broker URL when it is "
        "Redis, else memory",
    )
    rate_limit_per_key: str = Field(
        default="100/second", description="Calls one API key may make (429 past it)"
    )
    rate_limit_per_address: str = Field(
        default="200/second",
        description="Calls one client address may make, with a key or without (429 past it; "
        "probes excepted)",
    )
    rate_limit_failed_auth_per_address: str = Field(
        default="20/minute",
        description="Unknown or revoked keys one client address may present; past it, a key "
        "not already verified is answered 429 without being looked up",
    )
    rate_limit_unknown_samples_per_key: str = Field(
        default="200/hour",
        description="Unknown sample IDs one key may file (each 404 tells it a sample does not "
        "exist); past it, its filing calls are answered 429",
    )

    # Job machinery (issue 5). Celery's hard time limit must stay below the broker's visibility
    # timeout, or Redis hands a still-running task to a second worker.
    gpu_queue: str = Field(default="lethe.gpu", description="Celery queue the GPU workers consume")
    broker_key_prefix: str = Field(
        default="", description="Prefix for every broker key in Redis (isolates deployments)"
    )
    worker_concurrency: int = Field(default=1, description="Pool processes: one per GPU")
    worker_max_tasks_per_child: int = Field(
        default=8,
        description="Recycle a pool process after this many tasks (frees its CUDA context)",
    )
    task_time_limit_seconds: int = Field(default=6 * 3600, description="Hard limit per job attempt")
    visibility_timeout_seconds: int = Field(
        default=7 * 3600, description="Redis redelivers an unacknowledged task after this"
    )
    job_max_attempts: int = Field(default=3, description="Attempts before a job is dead")
    lease_seconds: float = Field(
        default=120.0, description="A running job whose lease is older is presumed lost"
    )
    heartbeat_seconds: float = Field(default=20.0, description="How often a running job renews")
    coalesce_window_seconds: float = Field(
        default=60.0, description="Pending requests wait this long to be batched into one job"
    )
    coalesce_max_requests: int = Field(default=500, description="Most requests in one job")
    requeue_after_seconds: float = Field(
        default=300.0, description="A job still queued after this is sent to the broker again"
    )
    scheduler_interval_seconds: float = Field(default=5.0, description="Scheduler tick")
    ladder_start: Literal["", "amnesiac", "amnesiac+repair", "relabel", "retrain-exact"] = Field(
        default="",
        description="First rung of the unlearning ladder; empty lets the planner choose "
        "(e.g. `retrain-exact` for a policy of exact retraining only)",
    )
    retain_superseded_weights: bool = Field(
        default=False,
        description="Keep the weights of the versions a deletion superseded (they still hold "
        "the erased samples); by default they are purged",
    )
    certificate_key_file: Path | None = Field(
        default=None,
        description="Ed25519 private key (PEM) that signs erasure certificates and keys the "
        "digests of erased content; empty means `home`/keys/certificate-ed25519.pem, created on "
        "first use. API and workers must read the same file",
    )
    allow_test_faults: bool = Field(
        default=False, description="Honour `test_fault` in job params (failure tests only)"
    )

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'ledger.sqlite3').resolve()}"

    @property
    def resolved_rate_limit_storage_url(self) -> str:
        if self.rate_limit_storage_url:
            return self.rate_limit_storage_url
        return (
            self.broker_url
            if self.broker_url.startswith(("redis://", "rediss://"))
            else "memory://"
        )

    @property
    def resolved_store_url(self) -> str:
        return self.store_url or str((self.home / "store").resolve())

    @property
    def resolved_certificate_key_file(self) -> Path:
        return self.certificate_key_file or self.home / "keys" / "certificate-ed25519.pem"


@lru_cache
def get_settings() -> Settings:
    return Settings()
