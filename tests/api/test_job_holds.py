"""An operator's decision on a held job over HTTP: the hold is visible in the job, its requests
and the metrics; approve and reject need a reason and a held job."""

from prometheus_client.parser import text_string_to_metric_families

from app.ledger.db import session_scope
from app.ledger.jobs import claim_job, coalesce_pending_requests, hold_job
from app.ledger.tables import HoldStage
from tests.api.conftest import Api


def held_job(api: Api, samples: list[str], stage: HoldStage = HoldStage.screening) -> int:
    """A job of requests filed over HTTP, held at ``stage`` by its first attempt."""
    answer = api.client.post("/forget", json={"sample_ids": samples}, headers=api.headers())
    assert answer.status_code == 202, answer.text
    with session_scope(api.engine) as session:
        job = coalesce_pending_requests(
            session, window_seconds=0, max_requests=100, max_attempts=3, actor="test"
        )
        assert job is not None
        claim_job(session, job.id, lease_seconds=60)
        hold_job(session, job.id, 1, stage=stage, reason="class 1 would lose 40%",
                 screening={"held": True})  # fmt: skip
        return job.id


def held_gauge(api: Api) -> dict[str, float]:
    families = text_string_to_metric_families(api.client.get("/metrics").text)
    return {
        sample.labels["stage"]: sample.value
        for family in families
        if family.name == "lethe_jobs_held"
        for sample in family.samples
    }


def test_a_held_job_shows_its_stage_and_reason(api: Api) -> None:
    job_id = held_job(api, ["toy-001", "toy-004"])
    job = api.client.get(f"/jobs/{job_id}", headers=api.headers()).json()
    assert job["job"]["state"] == "held"
    assert (job["job"]["hold_stage"], job["job"]["hold_reason"]) == (
        "screening",
        "class 1 would lose 40%",
    )
    assert job["screening"] == {"held": True}
    page = api.client.get("/forget/requests?sample_id=toy-001", headers=api.headers()).json()
    (request,) = page["items"]
    assert request["state"] == "processing"  # open: its deadline still counts
    assert request["job"]["state"] == "held" and request["job"]["hold_stage"] == "screening"
    assert held_gauge(api) == {"screening": 1, "promotion": 0}


def test_approve_needs_a_reason_and_queues_the_job_again(api: Api) -> None:
    job_id = held_job(api, ["toy-002"])
    path = f"/jobs/{job_id}/approve"
    missing = api.client.post(path, json={}, headers=api.headers("models:admin"))
    assert missing.status_code == 422 and "reason" in missing.json()["detail"]
    approved = api.client.post(path, json={"reason": "reviewed: one data subject"},
                               headers=api.headers("models:admin"))  # fmt: skip
    assert approved.status_code == 200, approved.text
    assert approved.json()["job"]["state"] == "queued"
    assert approved.json()["job"]["approved_stages"] == ["screening"]
    assert api.enqueued == [job_id]  # sent to the worker after commit
    again = api.client.post(path, json={"reason": "twice"}, headers=api.headers("models:admin"))
    assert again.status_code == 409 and "not held" in again.json()["detail"]
    assert held_gauge(api)["screening"] == 0


def test_reject_fails_the_requests_with_the_reason(api: Api) -> None:
    job_id = held_job(api, ["toy-003", "toy-006"], HoldStage.promotion)
    assert held_gauge(api) == {"screening": 0, "promotion": 1}
    rejected = api.client.post(f"/jobs/{job_id}/reject", json={"reason": "hostile burst"},
                               headers=api.headers("models:admin"))  # fmt: skip
    assert rejected.status_code == 200, rejected.text
    assert rejected.json()["job"]["state"] == "failed"
    page = api.client.get("/forget/requests?sample_id=toy-003", headers=api.headers()).json()
    (request,) = page["items"]
    assert request["state"] == "failed" and "hostile burst" in request["error"]
    assert api.client.post("/forget/toy-003", headers=api.headers()).status_code == 202  # refile
    unknown = api.client.post("/jobs/999/reject", json={"reason": "x"},
                              headers=api.headers("models:admin"))  # fmt: skip
    assert unknown.status_code == 404


def test_the_held_jobs_are_listed(api: Api) -> None:
    first = held_job(api, ["toy-007"])
    second = held_job(api, ["toy-008"], HoldStage.promotion)
    page = api.client.get("/jobs?state=held&limit=1", headers=api.headers()).json()
    assert [job["job"]["id"] for job in page["items"]] == [second]  # newest first
    rest = api.client.get(f"/jobs?state=held&cursor={page['next_cursor']}", headers=api.headers())
    assert [job["job"]["id"] for job in rest.json()["items"]] == [first]
    assert rest.json()["next_cursor"] is None
    assert api.client.get("/jobs?state=queued", headers=api.headers()).json()["items"] == []
    wrong = api.client.get("/jobs?state=paused", headers=api.headers())
    assert wrong.status_code == 422 and "state" in wrong.json()["detail"]
