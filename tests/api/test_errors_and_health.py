"""Errors are problem+json everywhere; a database outage is 503 with Retry-After, never 202."""

from fastapi.testclient import TestClient
from sqlalchemy import func, select

from app.ledger.db import make_engine, open_session
from app.ledger.tables import DeletionRequest
from tests.api.conftest import Api

DEAD_DATABASE = "postgresql+psycopg://postgres@127.0.0.1:1/none"


def test_unknown_route_and_wrong_method_are_problems(api: Api) -> None:
    for response, status in (
        (api.client.get("/nowhere"), 404),
        (api.client.get("/forget/toy-001", headers=api.headers()), 405),
        (api.client.delete("/models/v1", headers=api.headers()), 405),
    ):
        assert response.status_code == status
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == status


def test_malformed_json_is_422_problem(api: Api) -> None:
    response = api.client.post(
        "/forget", headers={**api.headers(), "content-type": "application/json"}, content=b"{"
    )
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


def test_database_down_is_503_with_retry_after_and_nothing_recorded(api: Api) -> None:
    assert api.client.get("/stats", headers=api.headers()).status_code == 200  # key now cached
    app = api.client.app
    healthy_engine = app.state.engine  # type: ignore[attr-defined]
    app.state.engine = make_engine(DEAD_DATABASE)  # type: ignore[attr-defined]
    try:
        response = api.client.post("/forget/toy-001", headers=api.headers())
        assert response.status_code == 503
        assert response.headers["Retry-After"].isdigit()
        assert response.headers["content-type"] == "application/problem+json"
        ready = api.client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
    finally:
        app.state.engine = healthy_engine  # type: ignore[attr-defined]
    with open_session(api.engine) as session:
        assert session.scalar(select(func.count()).select_from(DeletionRequest)) == 0
    assert api.client.post("/forget/toy-001", headers=api.headers()).status_code == 202


def test_database_down_at_key_lookup_is_503(api: Api) -> None:
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(database_url=DEAD_DATABASE), make_engine(DEAD_DATABASE), print)
    with TestClient(app) as client:
        response = client.post("/forget/toy-001", headers={"X-API-Key": "lethe_whatever"})
    assert response.status_code == 503


def test_health_ready_and_metrics(api: Api) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    ready = api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
    api.client.post("/forget/toy-001", headers=api.headers())
    metrics = api.client.get("/metrics")
    assert metrics.status_code == 200
    assert "http_requests_total" in metrics.text
