"""What every answer says about itself (security headers), an ambiguous key header, and what a
write-only key learns by filing a request again."""

import json
from collections.abc import Iterator

import pytest

from app.ledger.db import make_engine, session_scope
from app.ledger.requests import attach_certificate, transition_requests
from app.ledger.tables import RequestState
from tests.security.conftest import Serve, Service, read_answer

pytestmark = pytest.mark.integration
RECEIPT = {"request_id", "sample_id", "state", "received_at", "deadline", "links"}
API_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "cache-control": "no-store",
}


@pytest.fixture(scope="module")
def service(serve: Serve) -> Iterator[Service]:
    with serve() as running:
        yield running


@pytest.mark.parametrize(
    ("path", "key", "status"),
    [("/stats", "read", 200), ("/stats", None, 401), ("/forget/requests/nope", "read", 404)],
)
def test_api_answers_carry_the_security_headers(
    service: Service, path: str, key: str | None, status: int
) -> None:
    response = service.client.get(path, headers=service.headers(key) if key else {})
    assert response.status_code == status
    assert {name: response.headers.get(name) for name in API_HEADERS} == API_HEADERS


def test_the_dashboard_has_a_strict_policy_of_its_own(service: Service) -> None:
    page = service.client.get("/dashboard")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'none'", "script-src 'self'", "frame-ancestors 'none'"):
        assert directive in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    script = service.client.get("/dashboard/dashboard.js")
    assert script.headers["content-security-policy"] == policy
    # /docs loads Swagger UI from its CDN: no policy that would block it, the rest applies.
    docs = service.client.get("/docs")
    assert "content-security-policy" not in docs.headers
    assert docs.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("header", ["X-API-Key", "Idempotency-Key"])
def test_a_header_sent_twice_is_400(service: Service, header: str) -> None:
    """Two X-API-Key headers used to mean the first one; now they mean nothing."""
    with service.connect() as sock:
        lines = [
            "POST /forget/sec-010 HTTP/1.1",
            "Host: lethe",
            f"X-API-Key: {service.ledger.keys['write']}",
            f"{header}: lethe_second-value",
        ]
        if header == "Idempotency-Key":
            lines.append("Idempotency-Key: first-value")
        sock.sendall("\r\n".join([*lines, "Content-Length: 0", "", ""]).encode())
        answer = read_answer(sock)
    assert answer.status == 400
    assert answer.headers["content-type"] == "application/problem+json"
    assert f"send {header} once; it was sent 2 times" in json.loads(answer.body)["detail"]
    assert (
        service.client.get("/forget/requests?sample_id=sec-010", headers=service.headers()).json()[
            "items"
        ]
        == []
    )


def test_a_write_only_key_learns_identity_and_state_only(service: Service) -> None:
    """The repeat POST of a forget:write key used to answer the whole request (job,
    certificate), even for requests other keys filed."""
    filed = service.client.post("/forget/sec-020", headers=service.headers("all"))
    assert filed.status_code == 202
    request_id = filed.json()["request_id"]
    engine = make_engine(service.ledger.url)
    with session_scope(engine) as session:
        transition_requests(session, [request_id], RequestState.pending, RequestState.completed)
        attach_certificate(session, request_id, {"sample_id": "sec-020", "purged": ["x"]})
    engine.dispose()
    write = service.headers("write")
    answers = [
        service.client.post("/forget/sec-020", headers=write),
        service.client.post("/forget/sec-020", headers=write | {"Idempotency-Key": "w-1"}),
        service.client.post("/forget/sec-020", headers=write | {"Idempotency-Key": "w-1"}),
        service.client.post("/forget", headers=write, json={"sample_ids": ["sec-020"]}),
    ]
    assert [a.status_code for a in answers] == [200] * 4
    for answer in answers:
        receipt = answer.json()["requests"][0] if "requests" in answer.json() else answer.json()
        assert set(receipt) == {
            "request_id",
            "sample_id",
            "state",
            "received_at",
            "deadline",
            "links",
        }
        assert receipt["state"] == "completed" and receipt["request_id"] == request_id
        assert receipt["links"] == {"self": f"/forget/requests/{request_id}"}
        assert "purged" not in answer.text
    assert service.client.get(f"/forget/requests/{request_id}", headers=write).status_code == 403
    full = service.client.get(f"/forget/requests/{request_id}", headers=service.headers("read"))
    assert full.json()["certificate"]["purged"] == ["x"]
