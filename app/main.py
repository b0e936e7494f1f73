"""create_app(): the HTTP service over the ledger."""

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_fastapi_instrumentator import Instrumentator
from sqlalchemy import Engine

from app.api import audit, certificates, dashboard, forget, health, jobs, models, stats
from app.api.errors import install_error_handlers
from app.http_guard import RequestGuard, SecurityHeaders
from app.ledger.db import make_engine, session_scope
from app.ledger.keys import SCOPES, register_key
from app.logging import configure_logging
from app.metrics import HttpMetrics, HttpMetricsMiddleware, metrics_registry
from app.middleware import RequestIdMiddleware
from app.ratelimit import RateLimiter
from app.security import KeyVerifier
from app.settings import Settings, get_settings

Enqueue = Callable[[int], None]
# A pooled connection idle longer than this is checked before use; one in steady use is not:
# pool_pre_ping's round trip on every checkout cost POST /forget ~0.2 ms of CPU (server and DB).
PING_AFTER_IDLE_SECONDS = 5.0


def _default_enqueue(settings: Settings) -> Enqueue:
    from app.dispatch import enqueue_job

    return lambda job_id: enqueue_job(job_id, settings)


def _register_bootstrap_key(engine: Engine, settings: Settings) -> None:
    if settings.bootstrap_api_key is not None:
        with session_scope(engine) as session:
            register_key(
                session,
                "bootstrap",
                settings.bootstrap_api_key.get_secret_value(),
                SCOPES,
                actor="settings",
            )


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    enqueue: Enqueue | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    engine = engine or make_engine(
        settings.resolved_database_url, settings, ping_after_idle=PING_AFTER_IDLE_SECONDS
    )
    configure_logging()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _register_bootstrap_key(engine, settings)
        yield
        intakes, app.state.intakes = app.state.intakes, {}
        for intake in intakes.values():
            await intake.close()
        engine.dispose()

    app = FastAPI(
        title="Lethe",
        version="0.1.0",
        description="Right-to-be-forgotten requests against trained models.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.key_verifier = KeyVerifier(
        engine, settings.api_key_cache_seconds, settings.api_key_refusals_cached
    )
    app.state.intakes = {}  # engine -> Intake, see app.api.deps.intake
    app.state.rate_limiter = rate_limiter = RateLimiter(settings)
    app.state.enqueue = enqueue or _default_enqueue(settings)
    install_error_handlers(app)
    for module in (forget, audit, models, jobs, stats, certificates, health, dashboard):
        app.include_router(module.router)
    registry = metrics_registry(lambda: app.state.engine)
    Instrumentator(registry=registry).expose(app, include_in_schema=False)  # GET /metrics
    # Outermost last: IDs and metrics see every answer, the guard's and the headers' included.
    app.add_middleware(RequestGuard, settings=settings, limiter=rate_limiter)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(
        HttpMetricsMiddleware, metrics=HttpMetrics(registry), excluded=frozenset({"/metrics"})
    )
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so every line has the ID
    return app
