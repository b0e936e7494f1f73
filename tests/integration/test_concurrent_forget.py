"""POST /forget under real concurrency: a uvicorn process with two workers on PostgreSQL.

Races that TestClient cannot produce: identical requests landing in different processes and
threads at once, concurrent reuse of one Idempotency-Key, and a server killed mid-load.
"""

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select

from app.ledger.db import make_engine, open_session, session_scope
from app.ledger.samples import SampleRecord, register_samples
from app.ledger.tables import AuditEvent, DeletionRequest, Split
from tests.integration.servers import Server, service_env, uvicorn_server

pytestmark = pytest.mark.postgres

API_KEY = "lethe_it_" + secrets.token_urlsafe(24)
HEADERS = {"X-API-Key": API_KEY}
CONCURRENCY = 20
RACED = [f"it-race-{i}" for i in range(5)]
IDEMPOTENT = "it-idem-0"
KILLED = [f"it-kill-{i:04d}" for i in range(2000)]


@pytest.fixture(scope="module")
def ledger(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    with session_scope(engine) as session:
        register_samples(
            session,
            "it",
            [
                SampleRecord(sid, Split.train, 0, f"{i:064x}")
                for i, sid in enumerate([*RACED, IDEMPOTENT, *KILLED])
            ],
        )
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lethe-home")


@pytest.fixture(scope="module")
def server(ledger: Engine, postgres_url: str, home: Path) -> Iterator[Server]:
    with uvicorn_server(service_env(postgres_url, API_KEY, home), workers=2) as running:
        yield running


def post_concurrently(
    base_url: str, path: str, n: int, headers: dict[str, str], body: object = None
) -> list[httpx.Response]:
    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:
            return await asyncio.gather(
                *(client.post(path, headers=headers, json=body) for _ in range(n))
            )

    return asyncio.run(burst())


def request_ids(engine: Engine, sample_id: str) -> set[str]:
    with open_session(engine) as session:
        query = select(DeletionRequest.id).where(DeletionRequest.sample_id == sample_id)
        return set(session.scalars(query))


def forget_events(engine: Engine, sample_id: str) -> int:
    query = select(func.count()).where(
        AuditEvent.action == "forget.request", AuditEvent.target == sample_id
    )
    with open_session(engine) as session:
        return session.scalar(query) or 0


@pytest.mark.parametrize("sample_id", RACED)
def test_identical_concurrent_posts_file_exactly_one_request(
    server: Server, ledger: Engine, sample_id: str
) -> None:
    responses = post_concurrently(server.base_url, f"/forget/{sample_id}", CONCURRENCY, HEADERS)

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * (CONCURRENCY - 1) + [202], statuses
    answered = {r.json()["request_id"] for r in responses}
    assert len(answered) == 1
    assert request_ids(ledger, sample_id) == answered
    assert forget_events(ledger, sample_id) == 1


def test_concurrent_reuse_of_an_idempotency_key_files_one_request(
    server: Server, ledger: Engine
) -> None:
    headers = HEADERS | {"Idempotency-Key": "it-" + secrets.token_hex(8)}
    responses = post_concurrently(
        server.base_url, f"/forget/{IDEMPOTENT}", CONCURRENCY, headers, {"note": "ticket 42"}
    )

    by_status: dict[int, list[httpx.Response]] = {}
    for response in responses:
        by_status.setdefault(response.status_code, []).append(response)
    assert set(by_status) <= {202, 409}, {s: len(r) for s, r in by_status.items()}
    accepted = by_status[202]
    filed = request_ids(ledger, IDEMPOTENT)
    assert len(filed) == 1
    assert {r.json()["request_id"] for r in accepted} == filed
    # Exactly one answer is the original; every other 202 is a replay of it.
    assert sum("Idempotent-Replayed" not in r.headers for r in accepted) == 1
    for conflict in by_status.get(409, []):
        assert conflict.headers["content-type"] == "application/problem+json"
    assert forget_events(ledger, IDEMPOTENT) == 1


async def _accept_until_killed(server: Server, accepted: dict[str, str], kill_after: int) -> None:
    """Files KILLED at 16 in flight; SIGKILLs the server once ``kill_after`` 202s arrived."""
    pending = iter(KILLED)
    killed = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient) -> None:
        for sample_id in pending:
            try:
                response = await client.post(f"/forget/{sample_id}", headers=HEADERS)
            except httpx.TransportError:
                return  # the server is gone
            if response.status_code == 202:
                accepted[sample_id] = response.json()["request_id"]
            if len(accepted) >= kill_after and not killed.is_set():
                killed.set()
                server.kill()

    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(16)))
    assert killed.is_set(), f"only {len(accepted)} requests were accepted"


def test_every_202_survives_sigkill(ledger: Engine, postgres_url: str, home: Path) -> None:
    """Invariant 1: a 202 means the request is in the ledger, whatever process dies."""
    accepted: dict[str, str] = {}  # sample_id -> request_id of its 202
    env = service_env(postgres_url, API_KEY, home)
    with uvicorn_server(env, workers=2) as doomed:
        asyncio.run(_accept_until_killed(doomed, accepted, kill_after=300))
        assert doomed.process.poll() is not None

    with open_session(ledger) as session:
        query = select(DeletionRequest.id).where(DeletionRequest.id.in_(accepted.values()))
        in_ledger = set(session.scalars(query))
    assert len(accepted) >= 300
    assert set(accepted.values()) - in_ledger == set()

    # And a restarted service answers with the same requests rather than filing new ones.
    sample_id, request_id = next(iter(accepted.items()))
    with uvicorn_server(env, workers=1) as restarted:
        again = httpx.post(f"{restarted.base_url}/forget/{sample_id}", headers=HEADERS)
    assert again.status_code == 200
    assert again.json()["request_id"] == request_id
