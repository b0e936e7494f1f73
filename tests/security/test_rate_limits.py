"""Rate limits per key and per address, counted in Redis and so shared by every uvicorn worker;
failed authentication throttled; probing for samples refused; a key cache bogus keys cannot
flush."""

import concurrent.futures
from collections import Counter

import httpx
import pytest
import redis
from sqlalchemy import update

from app.ledger.clock import utcnow
from app.ledger.db import make_engine, session_scope
from app.ledger.keys import hash_key
from app.ledger.tables import ApiKey
from tests.integration.stack import REDIS_URL
from tests.security.conftest import Serve, Service

pytestmark = pytest.mark.integration


def fresh_connections(
    service: Service, path: str, n: int, headers: dict[str, str]
) -> list[httpx.Response]:
    """``n`` calls, each on a new connection (so that both workers' accept loops get some),
    8 at a time."""

    def call(_: int) -> httpx.Response:
        return httpx.get(f"{service.server.base_url}{path}", headers=headers, timeout=10)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return list(pool.map(call, range(n)))


def counted_in_redis(service: Service) -> int:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{service.redis_prefix}*"))
    return sum(int(client.get(key) or 0) for key in keys)


def test_a_keys_limit_is_shared_by_two_workers_through_redis(serve: Serve) -> None:
    with serve(workers=2, rate_limit_per_key="12/minute") as service:
        answers = fresh_connections(service, "/stats", 30, service.headers("read"))
        statuses = Counter(a.status_code for a in answers)
        assert statuses == {200: 12, 429: 18}, statuses  # per process it would be up to 24
        refused = next(a for a in answers if a.status_code == 429)
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["content-type"] == "application/problem+json"
        assert "12 per 1 minute" in refused.json()["detail"]
        assert counted_in_redis(service) >= 12 + 12  # the key's 12 and the address's
        # Another key is not held back by this one.
        assert service.client.get("/stats", headers=service.headers("all")).status_code == 200


def test_an_address_is_limited_with_or_without_a_key(serve: Serve) -> None:
    with serve(workers=2, rate_limit_per_address="10/minute") as service:
        answers = fresh_connections(service, "/models", 10, {})
        assert {a.status_code for a in answers} == {401}
        refused = service.client.get("/stats", headers=service.headers())
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "this address made more than 10 per 1 minute" in refused.json()["detail"]
        assert service.client.get("/healthz").status_code == 200  # probes are not counted


def test_failed_authentication_is_throttled_per_address(serve: Serve) -> None:
    with serve(rate_limit_failed_auth_per_address="5/minute") as service:
        assert service.client.get("/stats", headers=service.headers("read")).status_code == 200
        bogus = [
            service.client.get("/stats", headers={"X-API-Key": f"lethe_bogus-{i}"})
            for i in range(8)
        ]
        assert [b.status_code for b in bogus] == [401] * 5 + [429] * 3
        assert "unknown or revoked API keys" in bogus[-1].json()["detail"]
        # A key verified before (cached) is still served; it is not looked up again.
        assert service.client.get("/stats", headers=service.headers("read")).status_code == 200


def test_a_key_that_probes_for_samples_is_refused_for_known_and_unknown_alike(
    serve: Serve,
) -> None:
    """Each 404 tells a forget:write key that a sample does not exist: past its budget, every
    filing call of the key is 429, so the answers no longer tell known from unknown."""
    with serve(rate_limit_unknown_samples_per_key="3/hour") as service:
        headers = service.headers("write")
        probes = [service.client.post(f"/forget/nobody-{i}", headers=headers) for i in range(4)]
        assert [p.status_code for p in probes] == [404, 404, 404, 429]
        known = service.client.post("/forget/sec-150", headers=headers)
        assert known.status_code == 429 and int(known.headers["Retry-After"]) > 60
        batch = service.client.post("/forget", headers=headers, json={"sample_ids": ["sec-151"]})
        assert batch.status_code == 429
        # Another key files as before.
        assert service.client.post("/forget/sec-150", headers=service.headers()).status_code == 202


def test_bogus_keys_do_not_push_a_valid_key_out_of_the_cache(serve: Serve) -> None:
    """More bogus keys than the cache of refusals holds, then the valid key is revoked in the
    ledger: still served from the cache, so it was never evicted (before, 10,001 bogus keys
    emptied the whole cache and the key went back to the database: 401)."""
    with serve(
        api_key_cache_seconds="120",
        api_key_refusals_cached="1000",
        rate_limit_failed_auth_per_address="100000/minute",
        rate_limit_per_address="100000/minute",
    ) as service:
        valid = service.headers("read")
        assert service.client.get("/stats", headers=valid).status_code == 200

        def bogus(i: int) -> int:
            with httpx.Client(base_url=service.server.base_url, timeout=30) as client:
                return sum(
                    client.get("/stats", headers={"X-API-Key": f"lethe_bogus-{i}-{j}"}).status_code
                    == 401
                    for j in range(130)
                )

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert sum(pool.map(bogus, range(8))) == 1040
        engine = make_engine(service.ledger.url)
        with session_scope(engine) as session:
            session.execute(
                update(ApiKey)
                .where(ApiKey.key_sha256 == hash_key(service.ledger.keys["read"]))
                .values(revoked_at=utcnow())
            )
        engine.dispose()
        assert service.client.get("/stats", headers=valid).status_code == 200
