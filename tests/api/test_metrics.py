"""Observability: domain gauges on /metrics, request IDs in logs and task headers, readiness."""

import re

import structlog
from prometheus_client.parser import text_string_to_metric_families

from app.ledger.clock import utcnow
from app.ledger.db import make_engine, session_scope
from app.ledger.filing import file_requests
from app.ledger.jobs import coalesce_pending_requests, requests_of_job
from app.ledger.requests import transition_requests
from app.ledger.tables import Audit, RequestState, VersionState
from app.ledger.versions import create_version, promote
from app.log_context import TASK_REQUEST_ID, task_headers, task_log_context
from tests.api.conftest import Api

DEAD_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:1/none"
DEAD_BROKER = "redis://127.0.0.1:1/0"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(api: Api) -> Samples:
    response = api.client.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def seed_ledger(api: Api) -> None:
    """Requests: one completed, one pending, one pending past its deadline. Audits: pass, fail."""
    for sample in ("toy-001", "toy-002"):
        assert api.client.post(f"/forget/{sample}", headers=api.headers()).status_code == 202
    with session_scope(api.engine) as session:
        file_requests(session, ["toy-003"], actor="test", note=None, deadline_days=-1)
        job = coalesce_pending_requests(
            session, window_seconds=0, max_requests=1, max_attempts=3, actor="test"
        )
        assert job is not None
        v1 = create_version(session, method="train", state=VersionState.candidate)
        v2 = create_version(session, method="amnesiac", state=VersionState.auditing, parent_id=1)
        promote(session, v1, moved_by="test", reason="first model")
        for version, decision in ((v1, "pass"), (v2, "fail")):
            session.add(
                Audit(version_id=version.id, state="done", decision=decision, finished_at=utcnow())
            )
        session.add(Audit(version_id=v2.id, state="running"))  # unfinished: not counted
        (done,) = [r.id for r in requests_of_job(session, job.id)]
        transition_requests(
            session,
            [done],
            RequestState.processing,
            RequestState.completed,
            completed_version_id=v1.id,
        )


def test_domain_gauges_follow_the_ledger(api: Api) -> None:
    seed_ledger(api)
    samples = scrape(api)
    assert samples[("lethe_ledger_up", ())] == 1
    assert samples[("lethe_deletion_requests", (("state", "pending"),))] == 2
    assert samples[("lethe_deletion_requests", (("state", "completed"),))] == 1
    assert samples[("lethe_deletion_requests", (("state", "failed"),))] == 0  # zeros reported
    assert samples[("lethe_deletion_requests_overdue", ())] == 1
    assert samples[("lethe_oldest_open_request_age_seconds", ())] >= 0
    assert samples[("lethe_time_to_erasure_p50_seconds", ())] >= 0
    assert samples[("lethe_jobs", (("state", "queued"),))] == 1
    assert samples[("lethe_model_versions", (("state", "serving"),))] == 1
    assert samples[("lethe_audits", (("decision", "pass"),))] == 1
    assert samples[("lethe_audits", (("decision", "fail"),))] == 1
    assert samples[("lethe_serving_version", (("version", "v1"),))] == 1
    assert any(name == "http_requests_total" for name, _ in samples)


def test_empty_ledger_reports_zeros_and_no_percentiles(api: Api) -> None:
    samples = scrape(api)
    assert samples[("lethe_deletion_requests_overdue", ())] == 0
    assert samples[("lethe_oldest_open_request_age_seconds", ())] == 0
    assert ("lethe_time_to_erasure_p50_seconds", ()) not in samples
    assert not [name for name, _ in samples if name == "lethe_serving_version"]


def test_metrics_survive_a_database_outage(api: Api) -> None:
    app = api.client.app
    healthy_engine = app.state.engine  # type: ignore[attr-defined]
    app.state.engine = make_engine(DEAD_DATABASE)  # type: ignore[attr-defined]
    try:
        samples = scrape(api)
    finally:
        app.state.engine = healthy_engine  # type: ignore[attr-defined]
    assert samples[("lethe_ledger_up", ())] == 0
    assert not [name for name, _ in samples if name.startswith("lethe_deletion")]
    assert scrape(api)[("lethe_ledger_up", ())] == 1


def test_readyz_is_503_when_the_broker_is_down(api: Api) -> None:
    app = api.client.app
    settings = app.state.settings  # type: ignore[attr-defined]
    app.state.settings = settings.model_copy(update={"broker_url": DEAD_BROKER})  # type: ignore[attr-defined]
    try:
        ready = api.client.get("/readyz")
    finally:
        app.state.settings = settings  # type: ignore[attr-defined]
    assert ready.status_code == 503
    assert ready.headers["Retry-After"].isdigit()
    checks = ready.json()["checks"]
    assert checks["database"] == "ok" and checks["broker"].startswith("unavailable")


def test_every_response_carries_a_request_id(api: Api) -> None:
    generated = api.client.get("/healthz").headers["X-Request-ID"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    assert api.client.get("/nowhere").headers["X-Request-ID"]  # errors too
    kept = api.client.get("/healthz", headers={"X-Request-ID": "lb-7f3a.01"})
    assert kept.headers["X-Request-ID"] == "lb-7f3a.01"
    replaced = api.client.get("/healthz", headers={"X-Request-ID": "no spaces {allowed}"})
    assert replaced.headers["X-Request-ID"] != "no spaces {allowed}"


def test_the_request_id_reaches_the_route_and_the_task_headers(api: Api) -> None:
    # What a route sees is what app.dispatch would put on the Celery message.
    api.client.app.add_api_route("/probe", task_headers)  # type: ignore[attr-defined]
    response = api.client.get("/probe", headers={"X-Request-ID": "req-42"})
    assert response.json() == {TASK_REQUEST_ID: "req-42"}
    assert structlog.contextvars.get_contextvars() == {}  # nothing leaks out of the request


def test_task_log_context_binds_job_and_request_ids_for_the_task_only() -> None:
    assert task_headers() == {}
    with task_log_context(7, "req-42"):
        assert structlog.contextvars.get_contextvars() == {"job_id": 7, "request_id": "req-42"}
    with task_log_context(8, None):
        assert structlog.contextvars.get_contextvars() == {"job_id": 8}
    assert structlog.contextvars.get_contextvars() == {}


def test_http_metrics_by_route_template_status_class_and_method(api: Api) -> None:
    for sample in ("toy-001", "toy-001", "ghost"):
        api.client.post(f"/forget/{sample}", headers=api.headers())
    api.client.get("/nowhere")
    api.client.get("/forget/toy-001", headers=api.headers())  # 405: the route, not "none"
    scrape(api)
    samples = scrape(api)
    forget = "/forget/{sample_id:sample_id}"
    total = "http_requests_total"
    assert samples[(total, (("handler", forget), ("method", "POST"), ("status", "2xx")))] == 2
    assert samples[(total, (("handler", forget), ("method", "POST"), ("status", "4xx")))] == 1
    assert samples[(total, (("handler", forget), ("method", "GET"), ("status", "4xx")))] == 1
    assert samples[(total, (("handler", "none"), ("method", "GET"), ("status", "4xx")))] == 1
    assert not [labels for name, labels in samples if ("handler", "/metrics") in labels]
    count = "http_request_duration_seconds_count"
    assert samples[(count, (("handler", forget), ("method", "POST")))] == 3
    assert samples[("http_request_duration_highr_seconds_count", ())] == 5
    assert samples[("http_response_size_bytes_sum", (("handler", forget),))] > 0
