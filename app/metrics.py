"""Prometheus registry of the API: process figures plus domain gauges read from the ledger.

The gauges are computed at scrape time from a few aggregate queries, so they are never stale and
every API process reports the same figures. A scrape while the database is down still succeeds,
with ``lethe_ledger_up 0`` and no domain gauges, so the HTTP metrics keep arriving.
"""

import enum
from collections.abc import Callable, Iterator, Mapping

import structlog
from prometheus_client import CollectorRegistry, GCCollector, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from app.ledger.clock import utcnow
from app.ledger.db import open_session
from app.ledger.stats import audit_decisions, ledger_stats
from app.ledger.tables import JobState, RequestState, VersionState
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
