"""Every endpoint x {no key, a key without the scope, a key with the scope}."""

import pytest

from app.ledger.keys import SCOPES
from tests.api.conftest import Api

PROTECTED = [
    ("POST", "/forget/{sample_id}", "/forget/toy-001", None, "forget:write"),
    ("POST", "/forget", "/forget", {"sample_ids": ["toy-002"]}, "forget:write"),
    ("GET", "/forget/requests", "/forget/requests", None, "status:read"),
    ("GET", "/forget/requests/{request_id}", "/forget/requests/r1", None, "status:read"),
    (
        "GET",
        "/forget/requests/{request_id}/certificate",
        "/forget/requests/r1/certificate",
        None,
        "status:read",
    ),
    (
        "GET",
        "/forget/requests/{request_id}/verification",
        "/forget/requests/r1/verification",
        None,
        "audit:read",
    ),
    ("GET", "/audit/{model_version}", "/audit/v1", None, "audit:read"),
    (
        "GET",
        "/audit/{model_version}/artifacts/{name}",
        "/audit/v1/artifacts/roc.png",
        None,
        "audit:read",
    ),
    ("GET", "/models", "/models", None, "status:read"),
    ("GET", "/models/serving", "/models/serving", None, "status:read"),
    ("GET", "/models/{version}", "/models/v1", None, "status:read"),
    ("POST", "/models/{version}/promote", "/models/v1/promote", {"reason": "t"}, "models:admin"),
    ("POST", "/models/{version}/retire", "/models/v1/retire", {"reason": "t"}, "models:admin"),
    ("POST", "/train", "/train", {"epochs": 1}, "models:admin"),
    ("GET", "/jobs", "/jobs", None, "status:read"),
    ("GET", "/jobs/{job_id}", "/jobs/1", None, "status:read"),
    ("POST", "/jobs/{job_id}/approve", "/jobs/1/approve", {"reason": "t"}, "models:admin"),
    ("POST", "/jobs/{job_id}/reject", "/jobs/1/reject", {"reason": "t"}, "models:admin"),
    ("GET", "/stats", "/stats", None, "status:read"),
]
PUBLIC = ["/healthz", "/readyz", "/certificates/public-key"]
UNDOCUMENTED_PUBLIC = ["/metrics", "/openapi.json", "/docs"]


def call(api: Api, method: str, path: str, body: object, headers: dict[str, str]) -> int:
    return api.client.request(method, path, json=body, headers=headers).status_code


def test_every_route_is_in_the_matrix(api: Api) -> None:
    documented = api.client.get("/openapi.json").json()["paths"]
    routes = {(m.upper(), path) for path, ops in documented.items() for m in ops}
    public = {("GET", path) for path in PUBLIC}
    assert routes - public == {(method, template) for method, template, *_ in PROTECTED}


@pytest.mark.parametrize(("method", "template", "path", "body", "scope"), PROTECTED)
def test_auth_matrix(
    api: Api, method: str, template: str, path: str, body: object, scope: str
) -> None:
    no_key = api.client.request(method, path, json=body)
    assert no_key.status_code == 401
    assert no_key.headers["content-type"] == "application/problem+json"
    assert call(api, method, path, body, {"X-API-Key": "lethe_not-a-key"}) == 401

    other_scope = next(s for s in SCOPES if s != scope)
    assert call(api, method, path, body, api.headers(other_scope)) == 403
    assert call(api, method, path, body, api.headers(scope)) not in (401, 403)


@pytest.mark.parametrize("path", PUBLIC + UNDOCUMENTED_PUBLIC)
def test_public_routes_need_no_key(api: Api, path: str) -> None:
    assert api.client.get(path).status_code == 200


def test_revoked_key_is_refused(api: Api) -> None:
    from app.ledger.db import session_scope
    from app.ledger.keys import find_active_key, revoke_key

    key = api.keys["status:read"]
    with session_scope(api.engine) as session:
        found = find_active_key(session, key)
        assert found is not None
        revoke_key(session, found.id, actor="test")
    api.client.app.state.key_verifier.forget_cached()  # type: ignore[attr-defined]
    assert api.client.get("/stats", headers={"X-API-Key": key}).status_code == 401
