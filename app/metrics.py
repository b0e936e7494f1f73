"""Prometheus registry of the API: process figures, HTTP figures, and domain gauges read from
the ledger.

The gauges are computed at scrape time from a few aggregate queries, so they are never stale and
every API process reports the same figures. A scrape while the database is down still succeeds,
with ``lethe_ledger_up 0`` and no domain gauges, so the HTTP metrics keep arriving.
"""

import enum
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    ProcessCollector,
    Summary,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.ledger.clock import utcnow
from app.ledger.db import open_session
from app.ledger.stats import audit_decisions, held_jobs_by_stage, ledger_stats
from app.ledger.tables import HoldStage, JobState, RequestState, VersionState
from app.ledger.versions import alias_target

EngineSource = Callable[[], Engine]  # read per scrape: the app's engine may be replaced
log = structlog.get_logger("lethe.metrics")


def _by_label(
    name: str, documentation: str, label: str, values: Mapping[str, float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(values.items()):
        family.add_metric([value], count)
    return family


def _by_state(
    name: str, documentation: str, states: type[enum.StrEnum], counts: Mapping[str, int]
) -> GaugeMetricFamily:
    # Every state is reported, zeros included, so an alert never meets a missing series.
    return _by_label(
        name, documentation, "state", {s.value: counts.get(s.value, 0) for s in states}
    )


def _optional(name: str, documentation: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation)
    if value is not None:
        family.add_metric([], value)
    return family


def ledger_metrics(session: Session) -> list[Metric]:
    stats = ledger_stats(session)
    held = held_jobs_by_stage(session)
    oldest = stats.oldest_open_received_at
    serving = alias_target(session)
    return [
        _by_state(
            "lethe_deletion_requests",
            "Deletion requests by state",
            RequestState,
            stats.requests_by_state,
        ),
        GaugeMetricFamily(
            "lethe_deletion_requests_overdue",
            "Open (pending or processing) deletion requests past their deadline",
            value=stats.overdue,
        ),
        GaugeMetricFamily(
            "lethe_oldest_open_request_age_seconds",
            "Age of the oldest open deletion request; 0 when none is open",
            value=(utcnow() - oldest).total_seconds() if oldest else 0.0,
        ),
        _optional(
            "lethe_time_to_erasure_p50_seconds",
            "Median time from receipt to completion over completed requests",
            stats.time_to_erasure_p50_s,
        ),
        _optional(
            "lethe_time_to_erasure_p95_seconds",
            "95th percentile of time from receipt to completion over completed requests",
            stats.time_to_erasure_p95_s,
        ),
        _by_state("lethe_jobs", "Jobs by state", JobState, stats.jobs_by_state),
        _by_label(
            "lethe_jobs_held",
            "Jobs held for an operator's approve or reject, by the stage that held them",
            "stage",
            {stage.value: held.get(stage.value, 0) for stage in HoldStage},
        ),
        _by_state(
            "lethe_model_versions",
            "Model versions by state",
            VersionState,
            stats.versions_by_state,
        ),
        _by_label(
            "lethe_audits",
            "Finished audits by gate decision",
            "decision",
            audit_decisions(session),
        ),
        _by_label(
            "lethe_serving_version",
            "1 for the model version the serving alias points at",
            "version",
            {serving.version: 1} if serving else {},
        ),
    ]


class LedgerCollector(Collector):
    def __init__(self, engine: EngineSource) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("lethe_ledger_up", "1 when this scrape could read the ledger")
        try:
            with open_session(self._engine()) as session:
                metrics = ledger_metrics(session)
        except SQLAlchemyError as error:
            log.warning("metrics.ledger_unavailable", error=error.__class__.__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from metrics


def metrics_registry(engine: EngineSource) -> CollectorRegistry:
    """One registry per app (not the global one), bound to that app's ledger."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(LedgerCollector(engine))
    return registry


# The HTTP figures prometheus-fastapi-instrumentator's default set gives (names, labels, buckets
# and meaning unchanged, see docs/operators.md), recorded by HttpMetricsMiddleware below.
LATENCY_HIGHR_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5),
    *(7.5, 10, 30, 60, float("inf")),
)
LATENCY_LOWR_BUCKETS = (0.1, 0.5, 1, float("inf"))
UNTEMPLATED = "none"  # the handler label of a request that matched no route


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.total = Counter(
            "http_requests_total",
            "Total number of requests by method, status and handler.",
            ("method", "status", "handler"),
            registry=registry,
        )
        self.request_size = Summary(
            "http_request_size_bytes",
            "Content length of incoming requests by handler. Only value of header is "
            "respected. Otherwise ignored. No percentile calculated. ",
            ("handler",),
            registry=registry,
        )
        self.response_size = Summary(
            "http_response_size_bytes",
            "Content length of outgoing responses by handler. Only value of header is "
            "respected. Otherwise ignored. No percentile calculated. ",
            ("handler",),
            registry=registry,
        )
        self.latency_highr = Histogram(
            "http_request_duration_highr_seconds",
            "Latency with many buckets but no API specific labels. Made for more accurate "
            "percentile calculations. ",
            buckets=LATENCY_HIGHR_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Latency with only few buckets by handler. Made to be only used if aggregation by "
            "handler is important. ",
            ("method", "handler"),
            buckets=LATENCY_LOWR_BUCKETS,
            registry=registry,
        )
        # Labelled children by label values: labels() validates and locks on every call.
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any, Any]] = {}

    def record(
        self, method: str, status: int, handler: str, in_bytes: int, out_bytes: int, seconds: float
    ) -> None:
        key = (method, f"{str(status)[0]}xx", handler)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.total.labels(*key),
                self.request_size.labels(handler),
                self.response_size.labels(handler),
                self.latency.labels(method, handler),
            )
        total, request_size, response_size, latency = children
        total.inc()
        request_size.observe(in_bytes)
        response_size.observe(out_bytes)
        self.latency_highr.observe(seconds)
        latency.observe(seconds)


def _content_length(headers: Any) -> int:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value)
    return 0


class HttpMetricsMiddleware:
    """Pure ASGI: counts every HTTP call by method, grouped status (2xx, 4xx, ...) and route
    template (what the router matched, ``none`` if nothing), with its sizes and latency.
    ``/metrics`` itself is not counted. (prometheus-fastapi-instrumentator's middleware records
    the same series but matches every request against every route a second time: ten times
    the CPU.)"""

    def __init__(
        self, app: ASGIApp, metrics: HttpMetrics, excluded: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.excluded = excluded

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status, out_bytes = 500, 0

        async def send_and_note(message: Message) -> None:
            nonlocal status, out_bytes
            if message["type"] == "http.response.start":
                status = message["status"]
                out_bytes = _content_length(message.get("headers", ()))
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")  # set by the router on the scope passed down
            handler = getattr(route, "path", None) or UNTEMPLATED
            if handler not in self.excluded:
                self.metrics.record(
                    scope["method"],
                    status,
                    handler,
                    _content_length(scope["headers"]),
                    out_bytes,
                    max(time.perf_counter() - started, 0.0),
                )
