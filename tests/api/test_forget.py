"""POST /forget and the request resources: status codes, durability, idempotency, pagination."""

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from app.ledger import idempotency
from app.ledger.clock import utcnow
from app.ledger.db import open_session, session_scope
from app.ledger.jobs import coalesce_pending_requests
from app.ledger.requests import attach_certificate, transition_requests
from app.ledger.tables import AuditEvent, DeletionRequest, RequestState, VersionState
from app.ledger.versions import create_version
from tests.api.conftest import Api


def count_requests(api: Api, sample_id: str | None = None) -> int:
    query = select(func.count()).select_from(DeletionRequest)
    if sample_id:
        query = query.where(DeletionRequest.sample_id == sample_id)
    with open_session(api.engine) as session:
        return session.scalar(query) or 0


def test_forget_records_the_request_before_answering_202(api: Api) -> None:
    response = api.client.post("/forget/toy-001", headers=api.headers(), json={"note": "ticket 7"})
    assert response.status_code == 202
    body = response.json()
    assert body["sample_id"] == "toy-001"
    assert body["state"] == "pending"
    assert body["links"]["self"] == f"/forget/requests/{body['request_id']}"
    received = body["received_at"]
    deadline = body["deadline"]
    assert deadline > received
    with open_session(api.engine) as session:
        row = session.get(DeletionRequest, body["request_id"])
        assert row is not None and row.requester_note == "ticket 7"
        assert row.deadline - row.received_at == timedelta(days=30)
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "forget.request"))
        assert [e.target for e in events] == ["toy-001"]


def test_a_second_post_returns_the_existing_request(api: Api) -> None:
    first = api.client.post("/forget/toy-002", headers=api.headers())
    second = api.client.post("/forget/toy-002", headers=api.headers())
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["request_id"] == second.json()["request_id"]
    assert count_requests(api, "toy-002") == 1


def test_a_completed_request_is_returned_and_a_failed_one_is_not(api: Api) -> None:
    request_id = api.client.post("/forget/toy-003", headers=api.headers()).json()["request_id"]
    with session_scope(api.engine) as session:
        transition_requests(session, [request_id], RequestState.pending, RequestState.completed)
    again = api.client.post("/forget/toy-003", headers=api.headers())
    assert again.status_code == 200 and again.json()["state"] == "completed"

    failed_id = api.client.post("/forget/toy-004", headers=api.headers()).json()["request_id"]
    with session_scope(api.engine) as session:
        transition_requests(session, [failed_id], RequestState.pending, RequestState.failed)
    retried = api.client.post("/forget/toy-004", headers=api.headers())
    assert retried.status_code == 202 and retried.json()["request_id"] != failed_id


def test_unknown_sample_is_404_problem(api: Api) -> None:
    response = api.client.post("/forget/nobody", headers=api.headers())
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    assert "nobody" in response.json()["detail"]
    assert count_requests(api) == 0


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/forget/" + "x" * 129, "1 to 128 characters"),
        ("/forget/a%2Fb", "path separator"),
        ("/forget/a%5Cb", "path separator"),
        ("/forget/a%01b", "printable"),
        ("/forget/a%0Ab", "printable"),
    ],
)
def test_malformed_sample_id_is_422_with_reason(api: Api, path: str, reason: str) -> None:
    response = api.client.post(path, headers=api.headers())
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert reason in response.json()["detail"]


def test_unknown_body_field_is_422(api: Api) -> None:
    response = api.client.post("/forget/toy-005", headers=api.headers(), json={"nope": 1})
    assert response.status_code == 422
    assert "nope" in response.json()["detail"]
    assert count_requests(api) == 0


def test_batch_is_all_or_nothing(api: Api) -> None:
    bad = api.client.post(
        "/forget", headers=api.headers(), json={"sample_ids": ["toy-010", "ghost", "toy-011"]}
    )
    assert bad.status_code == 404 and "ghost" in bad.json()["detail"]
    assert count_requests(api) == 0

    api.client.post("/forget/toy-010", headers=api.headers())
    good = api.client.post(
        "/forget", headers=api.headers(), json={"sample_ids": ["toy-010", "toy-011", "toy-011"]}
    )
    assert good.status_code == 202
    body = good.json()
    assert body["created"] == 1
    assert [r["sample_id"] for r in body["requests"]] == ["toy-010", "toy-011"]
    repeat = api.client.post("/forget", headers=api.headers(), json={"sample_ids": ["toy-011"]})
    assert repeat.status_code == 200 and repeat.json()["created"] == 0


def test_idempotency_key_replays_and_refuses_another_body(api: Api) -> None:
    headers = {**api.headers(), "Idempotency-Key": "k-1"}
    first = api.client.post("/forget/toy-020", headers=headers)
    replay = api.client.post("/forget/toy-020", headers=headers)
    assert first.status_code == replay.status_code == 202
    assert first.json() == replay.json()
    assert replay.headers["Idempotent-Replayed"] == "true"

    other = api.client.post("/forget/toy-021", headers=headers)
    assert other.status_code == 422
    assert "different request" in other.json()["detail"]
    assert count_requests(api, "toy-021") == 0


def test_an_idempotency_key_in_flight_with_another_body_is_422(api: Api) -> None:
    key_id = _key_id(api)
    hash_of_first = "f" * 64
    with open_session(api.engine) as session:
        stored = idempotency.begin(
            session,
            api_key_id=key_id,
            key="busy",
            request_hash=hash_of_first,
            ttl=timedelta(hours=1),
            stale_after=timedelta(minutes=5),
        )
        assert stored is None
    response = api.client.post(
        "/forget/toy-022", headers={**api.headers(), "Idempotency-Key": "busy"}
    )
    # The stored hash differs from this request's, so the key is refused as reused (422);
    # the same body while the first is in flight is the 409 case, checked below.
    assert response.status_code == 422


def test_idempotency_same_body_in_flight_is_409(api: Api) -> None:
    headers = {**api.headers(), "Idempotency-Key": "twice"}
    first = api.client.post("/forget/toy-023", headers=headers)
    assert first.status_code == 202
    with session_scope(api.engine) as session:  # make the first look unfinished
        session.execute(
            update(idempotency.IdempotencyKey)
            .where(idempotency.IdempotencyKey.key == "twice")
            .values(completed_at=None, status_code=None, response_body=None)
        )
    second = api.client.post("/forget/toy-023", headers=headers)
    assert second.status_code == 409
    assert second.headers["content-type"] == "application/problem+json"


def test_failed_request_does_not_burn_the_idempotency_key(api: Api) -> None:
    headers = {**api.headers(), "Idempotency-Key": "retry-me"}
    assert api.client.post("/forget/ghost", headers=headers).status_code == 404
    # The key was released: the same key may be used for the (same) retried request.
    assert api.client.post("/forget/ghost", headers=headers).status_code == 404


def _key_id(api: Api) -> int:
    from app.ledger.keys import find_active_key

    with open_session(api.engine) as session:
        found = find_active_key(session, api.keys["all"])
        assert found is not None
        return found.id


def test_read_request_and_404(api: Api) -> None:
    request_id = api.client.post("/forget/toy-030", headers=api.headers()).json()["request_id"]
    response = api.client.get(f"/forget/requests/{request_id}", headers=api.headers())
    assert response.status_code == 200
    assert response.json()["request_id"] == request_id
    assert response.json()["overdue"] is False
    missing = api.client.get("/forget/requests/not-a-request", headers=api.headers())
    assert missing.status_code == 404
    cert = api.client.get(f"/forget/requests/{request_id}/certificate", headers=api.headers())
    assert cert.status_code == 404 and "no certificate" in cert.json()["detail"]


def test_list_is_paginated_with_a_cursor_and_filters(api: Api) -> None:
    ids = [
        api.client.post(f"/forget/toy-{i:03d}", headers=api.headers()).json()["request_id"]
        for i in range(5)
    ]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = api.client.get("/forget/requests", headers=api.headers(), params=params).json()
        seen += [item["request_id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))

    with session_scope(api.engine) as session:  # one request is past its deadline
        session.execute(
            update(DeletionRequest)
            .where(DeletionRequest.id == ids[0])
            .values(deadline=utcnow() - timedelta(days=1))
        )
    overdue = api.client.get("/forget/requests?overdue=true", headers=api.headers()).json()
    assert [item["request_id"] for item in overdue["items"]] == [ids[0]]
    assert overdue["items"][0]["overdue"] is True
    pending = api.client.get("/forget/requests?state=pending", headers=api.headers()).json()
    assert len(pending["items"]) == 5
    assert api.client.get("/stats", headers=api.headers()).json()["overdue"] == 1


@pytest.mark.parametrize(
    "query", ["state=bogus", "limit=0", "limit=5000", "cursor=%%%", "overdue=maybe"]
)
def test_bad_list_parameters_are_422(api: Api, query: str) -> None:
    response = api.client.get(f"/forget/requests?{query}", headers=api.headers())
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"


RECEIPT = {"request_id", "sample_id", "state", "received_at", "deadline", "links"}


def test_a_repeat_answers_the_receipt_never_the_job_or_certificate(api: Api) -> None:
    """Filing answers the request's identity and state, on every path (the fast lane, FastAPI's
    own, an Idempotency-Key and its replay, the batch): what became of the request (its job,
    its version, its certificate) needs status:read."""
    first = api.client.post("/forget/toy-031", headers=api.headers("forget:write"))
    assert first.status_code == 202 and set(first.json()) == RECEIPT
    request_id = first.json()["request_id"]
    with session_scope(api.engine) as session:
        job = coalesce_pending_requests(
            session, window_seconds=0, max_requests=10, max_attempts=3, actor="test"
        )
        assert job is not None
        version = create_version(session, method="amnesiac", state=VersionState.candidate)
        transition_requests(
            session,
            [request_id],
            RequestState.processing,
            RequestState.completed,
            completed_version_id=version.id,
        )
        attach_certificate(session, request_id, {"sample_id": "toy-031", "signed": "yes"})
    resource = api.client.get(f"/forget/requests/{request_id}", headers=api.headers()).json()
    assert resource["job"]["kind"] == "unlearn" and resource["certificate"]["signed"] == "yes"
    idempotent = {**api.headers("forget:write"), "Idempotency-Key": "repeat-31"}
    answers = [
        api.client.post("/forget/toy-031", headers=api.headers("forget:write")),  # fast lane
        api.client.post("/forget/toy-031", headers=api.headers("forget:write"), json={}),
        api.client.post("/forget/toy-031", headers=idempotent),
        api.client.post("/forget/toy-031", headers=idempotent),  # its replay
    ]
    batch = api.client.post(
        "/forget", headers=api.headers("forget:write"), json={"sample_ids": ["toy-031"]}
    )
    assert [a.status_code for a in answers] == [200] * 4 and batch.status_code == 200
    assert answers[3].headers["Idempotent-Replayed"] == "true"
    for receipt in [a.json() for a in answers] + batch.json()["requests"]:
        assert receipt == {name: resource[name] for name in RECEIPT} | {
            "links": {"self": f"/forget/requests/{request_id}"}
        }
        assert receipt["state"] == "completed"
    # The GET itself stays closed to the write-only key.
    read = api.client.get(f"/forget/requests/{request_id}", headers=api.headers("forget:write"))
    assert read.status_code == 403
    assert count_requests(api, "toy-031") == 1


def test_a_replay_stored_with_more_says_only_the_receipt(api: Api) -> None:
    """An answer stored before receipts (with the job and certificate) is replayed as a
    receipt."""
    headers = {**api.headers(), "Idempotency-Key": "stored-long-ago"}
    first = api.client.post("/forget/toy-035", headers=headers).json()
    with session_scope(api.engine) as session:
        session.execute(
            update(idempotency.IdempotencyKey)
            .where(idempotency.IdempotencyKey.key == "stored-long-ago")
            .values(response_body=first | {"certificate": {"signed": "yes"}, "job": None})
        )
    replay = api.client.post("/forget/toy-035", headers=headers)
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.json() == first


def test_a_batch_larger_than_the_setting_is_413(api: Api) -> None:
    limit = api.client.app.state.settings.batch_max_sample_ids  # type: ignore[attr-defined]
    ids = [f"toy-{i % 40:03d}" for i in range(limit + 1)]
    response = api.client.post("/forget", headers=api.headers(), json={"sample_ids": ids})
    assert response.status_code == 413
    assert f"at most {limit}" in response.json()["detail"]
    assert count_requests(api) == 0
    within = api.client.post("/forget", headers=api.headers(), json={"sample_ids": ids[:limit]})
    assert within.status_code == 202 and within.json()["created"] == 40


def test_a_key_not_yet_cached_is_looked_up_then_served(api: Api) -> None:
    verifier = api.client.app.state.key_verifier  # type: ignore[attr-defined]
    verifier.forget_cached()
    for sample in ("toy-032", "toy-033"):  # a lookup first, then the cached verdict
        response = api.client.post(f"/forget/{sample}", headers=api.headers("forget:write"))
        assert response.status_code == 202
    refused = api.client.post("/forget/toy-034", headers=api.headers("status:read"))
    assert refused.status_code == 403  # cached, but without the scope: refused as before
    assert refused.headers["content-type"] == "application/problem+json"
    assert count_requests(api, "toy-034") == 0
