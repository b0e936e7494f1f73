"""A deletion from POST to certificate, with nobody's help: the API (uvicorn), a ``celery worker``
and ``lethe scheduler`` over the real PostgreSQL and Redis, and training through ``POST /train``.

One stack for the module (training and the audit's cached models take most of a minute); each
test forgets samples of its own.
"""

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from app.ledger.db import session_scope
from app.ledger.samples import sample_ids
from app.ledger.tables import DeletionRequest, ModelVersion, Split, StepDelta, VersionState
from tests.integration.conftest import require_services
from tests.integration.servers import uvicorn_server
from tests.integration.stack import Stack, open_stack, wait_for
from worker.data import load_samples
from worker.store import ArtifactStore

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.postgres]


def job_finished(body: dict[str, Any]) -> bool:
    return body["job"]["state"] in {"succeeded", "failed", "dead"}


def request_finished(body: dict[str, Any]) -> bool:
    """Failed, held for an operator, or completed and certified (the purge follows the
    promotion)."""
    held = (body.get("job") or {}).get("state") == "held"
    return body["state"] == "failed" or held or body["certificate"] is not None


class Service:
    def __init__(self, stack: Stack, base_url: str) -> None:
        self.stack = stack
        key = stack.env["LETHE_BOOTSTRAP_API_KEY"]
        self.http = httpx.Client(base_url=base_url, headers={"X-API-Key": key}, timeout=10)

    def wait(
        self, path: str, finished: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """Polls ``path`` until ``finished`` holds for its body; returns the last body."""
        last: dict[str, Any] = {}

        def done() -> bool:
            nonlocal last
            last = self.http.get(path).json()
            return finished(last)

        try:
            wait_for(done, timeout, path)
        except TimeoutError as error:
            raise AssertionError(f"{error}: {last}\n{self.stack.logs()}") from error
        return last

    def train_ids(self, count: int, offset: int) -> list[str]:
        with session_scope(self.stack.engine) as session:
            return sample_ids(session, "digits", Split.train)[offset : offset + count]

    def store(self) -> ArtifactStore:
        return ArtifactStore(str(self.stack.home / "store"))


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    require_services()
    home: Path = tmp_path_factory.mktemp("end-to-end")
    # Every job starts at amnesiac rollback, so that the burst below claims recorded steps
    # whichever rung serves it in the end (the planner would start 10 samples at relabel).
    with open_stack(home, ladder_start="amnesiac") as stack, uvicorn_server(stack.env) as api:
        worker = stack.start_worker()
        stack.start_scheduler()
        service = Service(stack, api.base_url)
        accepted = service.http.post(
            "/train", json={"epochs": 5, "batch_size": 32}, headers={"X-Request-ID": "e2e-train"}
        )
        assert accepted.status_code == 202, accepted.text
        job = service.wait(accepted.json()["links"]["self"], job_finished, 300)
        assert job["job"]["state"] == "succeeded", job
        # The worker's log lines of the job name the HTTP call that started it.
        log = worker.log_path.read_text().splitlines()
        lines = [json.loads(line) for line in log if line.startswith("{")]  # not the banner
        assert any(
            line.get("request_id") == "e2e-train" and line.get("job_id") == job["job"]["id"]
            for line in lines
        ), worker.log_tail()
        yield service


def test_a_forget_request_ends_in_a_promoted_audited_version_and_a_certificate(
    service: Service,
) -> None:
    http = service.http
    (sample_id,) = service.train_ids(1, offset=0)
    parent = http.get("/models/serving").json()["version"]

    accepted = http.post(f"/forget/{sample_id}")
    assert accepted.status_code == 202
    path = f"/forget/requests/{accepted.json()['request_id']}"
    request = service.wait(path, request_finished, 300)

    assert request["state"] == "completed", request
    alias = http.get("/models/serving").json()
    serving = alias["version"]
    assert serving["version"] == request["completed_in_version"] != parent["version"]
    assert alias["history"][0]["reason"].startswith("audit ")
    audit = http.get(f"/audit/{serving['version']}")
    assert audit.status_code == 200 and audit.json()["decision"] == "pass"
    certificate = http.get(request["links"]["certificate"]).json()
    assert certificate["sample_id"] == sample_id
    assert certificate["version"] == serving["version"]
    assert certificate["audit"]["decision"] == "pass"
    assert {w["version"] for w in certificate["purged"]["weights"]} >= {parent["version"]}
    # Signed by the key the API publishes (worker and API read the same key file), and the
    # store re-checked against it: nothing listed or derived is left.
    public = http.get("/certificates/public-key").json()
    assert public["key_id"] == certificate["signature"]["key_id"]
    verification = http.get(f"{path}/verification").json()
    assert verification["verified"] is True, verification
    with pytest.raises(LookupError):  # the raw data are gone from the store
        load_samples(service.store(), "digits", [sample_id])
    again = http.post(f"/forget/{sample_id}")
    assert again.status_code == 200 and again.json()["request_id"] == request["request_id"]
    assert again.json()["state"] == "completed"


@pytest.mark.timeout(1500)
def test_a_burst_of_50_posts_over_10_samples_subtracts_each_delta_once(service: Service) -> None:
    ids = service.train_ids(10, offset=100)
    answers = [service.http.post(f"/forget/{sample_id}") for sample_id in ids * 5]
    assert sorted(a.status_code for a in answers) == [200] * 40 + [202] * 10
    request_ids = {a.json()["request_id"] for a in answers}
    assert len(request_ids) == 10
    for request_id in request_ids:
        done = service.wait(f"/forget/requests/{request_id}", request_finished, 1200)
        assert done["state"] == "completed", done

    with session_scope(service.stack.engine) as session:
        jobs = session.scalars(
            select(func.count(func.distinct(DeletionRequest.job_id))).where(
                DeletionRequest.id.in_(request_ids)
            )
        ).one()
        assert jobs <= 3  # a coalescing window of 1 s over a burst of a second or two
        rollbacks = session.scalars(
            select(ModelVersion).where(ModelVersion.method.in_(["amnesiac", "amnesiac+repair"]))
        ).all()
        assert rollbacks  # the ladder started at a rollback: steps were claimed
        # Invariant 2: a delta is subtracted by at most one version, and never by a version that
        # does not serve or has not served (a rejected candidate gives its steps back).
        holders = session.execute(
            select(ModelVersion.state)
            .join(StepDelta, StepDelta.rolled_back_in == ModelVersion.id)
            .distinct()
        ).scalars()
        assert set(holders) <= {VersionState.serving, VersionState.retired}
        claimed = [
            tuple(step)
            for version in session.scalars(
                select(ModelVersion).where(ModelVersion.state != VersionState.rejected)
            )
            for step in version.details.get("rolled_back_steps", [])
        ]
        assert len(claimed) == len(set(claimed))
