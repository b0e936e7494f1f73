"""Model versions, the serving alias, operator overrides, audit reports, jobs and stats."""

from sqlalchemy import select

from app.ledger.clock import utcnow
from app.ledger.db import open_session, session_scope
from app.ledger.jobs import create_job
from app.ledger.tables import (
    Audit,
    AuditEvent,
    Job,
    JobKind,
    JobState,
    ModelVersion,
    PurgedArtifact,
    VersionState,
)
from app.ledger.versions import create_version, promote
from tests.api.conftest import Api


def seed_versions(api: Api) -> None:
    """v1 serving, v2 a candidate derived from it."""
    with session_scope(api.engine) as session:
        v1 = create_version(session, method="train", state=VersionState.candidate)
        promote(session, v1, moved_by="test", reason="first model")
        create_version(session, method="amnesiac", state=VersionState.candidate, parent_id=v1.id)


def test_models_list_detail_and_serving(api: Api) -> None:
    seed_versions(api)
    listing = api.client.get("/models?limit=1", headers=api.headers()).json()
    assert [v["version"] for v in listing["items"]] == ["v2"]
    rest = api.client.get(f"/models?cursor={listing['next_cursor']}", headers=api.headers())
    assert [v["version"] for v in rest.json()["items"]] == ["v1"]

    detail = api.client.get("/models/v2", headers=api.headers()).json()
    assert detail["parent"] == "v1" and detail["lineage"] == ["v2", "v1"]
    assert detail["state"] == "candidate"

    serving = api.client.get("/models/serving", headers=api.headers()).json()
    assert serving["version"]["version"] == "v1"
    assert [h["version"] for h in serving["history"]] == ["v1"]
    assert api.client.get("/models/v9", headers=api.headers()).status_code == 404
    assert api.client.get("/models/latest", headers=api.headers()).status_code == 422


def test_operator_promotion_needs_a_reason_and_is_recorded(api: Api) -> None:
    seed_versions(api)
    no_reason = api.client.post("/models/v2/promote", headers=api.headers(), json={"reason": " "})
    assert no_reason.status_code == 422
    promoted = api.client.post(
        "/models/v2/promote", headers=api.headers(), json={"reason": "audit reviewed by hand"}
    )
    assert promoted.status_code == 200 and promoted.json()["state"] == "serving"
    serving = api.client.get("/models/serving", headers=api.headers()).json()
    assert serving["version"]["version"] == "v2"
    history = serving["history"]
    assert [h["version"] for h in history] == ["v2", "v1"]
    assert history[0]["reason"] == "audit reviewed by hand" and history[1]["ended_at"]
    assert api.client.get("/models/v1", headers=api.headers()).json()["state"] == "retired"

    again = api.client.post("/models/v2/promote", headers=api.headers(), json={"reason": "x"})
    assert again.status_code == 409
    with open_session(api.engine) as session:
        actions = session.scalars(select(AuditEvent.action).where(AuditEvent.target == "v2"))
        assert list(actions) == ["models.promote"]


def test_retiring_the_serving_version_is_refused(api: Api) -> None:
    seed_versions(api)
    refused = api.client.post("/models/v1/retire", headers=api.headers(), json={"reason": "old"})
    assert refused.status_code == 409 and "serving" in refused.json()["detail"]
    retired = api.client.post("/models/v2/retire", headers=api.headers(), json={"reason": "bad"})
    assert retired.status_code == 200 and retired.json()["state"] == "retired"


def test_audit_report_404_and_200(api: Api) -> None:
    seed_versions(api)
    assert api.client.get("/audit/v7", headers=api.headers()).status_code == 404
    with session_scope(api.engine) as session:
        session.add(
            Audit(
                version_id=2,
                state="done",
                decision="pass",
                metrics={"test_accuracy": 0.97},
                thresholds={"max_test_accuracy_drop": 1.0},
                reasons=["all rules hold"],
                artifacts={"roc.png": "audits/v2/roc.png"},
                finished_at=utcnow(),
            )
        )
    report = api.client.get("/audit/v2", headers=api.headers())
    assert report.status_code == 200
    body = report.json()
    assert body["decision"] == "pass" and body["metrics"]["test_accuracy"] == 0.97
    assert body["artifacts"] == {"roc.png": "/audit/v2/artifacts/roc.png"}
    # The store does not hold that file: a clear 404, not a 500.
    missing = api.client.get("/audit/v2/artifacts/roc.png", headers=api.headers())
    assert missing.status_code == 404
    unknown = api.client.get("/audit/v2/artifacts/other.png", headers=api.headers())
    assert unknown.status_code == 404


def test_audit_is_202_only_while_a_job_will_make_it(api: Api) -> None:
    """v1 was made outside a job, v2 by a job: 202 while that job is queued or running (or its
    audit row runs), then 200 with the reason why no audit will come, never an endless 202."""
    seed_versions(api)
    with session_scope(api.engine) as session:
        job = create_job(session, JobKind.unlearn, actor="test")
        session.get(ModelVersion, 2).job_id = job.id  # type: ignore[union-attr]
        job_id = job.id
    never = api.client.get("/audit/v1", headers=api.headers())
    assert never.status_code == 200 and never.json()["state"] == "not-audited"
    assert "no job will audit it" in never.json()["reason"]

    pending = api.client.get("/audit/v2", headers=api.headers())
    assert pending.status_code == 202 and pending.json()["state"] == "pending"
    with session_scope(api.engine) as session:
        session.add(Audit(version_id=2, job_id=job_id, state="running"))
    running = api.client.get("/audit/v2", headers=api.headers())
    assert running.status_code == 202 and running.json()["state"] == "running"

    with session_scope(api.engine) as session:
        session.get(Job, job_id).state = JobState.dead  # type: ignore[union-attr]
    stopped = api.client.get("/audit/v2", headers=api.headers())
    assert stopped.status_code == 200 and stopped.json()["state"] == "not-audited"
    assert f"job {job_id} ended dead" in stopped.json()["reason"]


def test_a_purged_artifact_is_listed_as_purged_and_answers_410(api: Api) -> None:
    seed_versions(api)
    with session_scope(api.engine) as session:
        job = create_job(session, JobKind.unlearn, actor="test")
        artifacts = {"roc.png": "audits/v2/1/roc.png", "unlearning_inversion.png": "gone.png"}
        session.add(Audit(version_id=2, state="done", artifacts=artifacts, finished_at=utcnow()))
        session.add(
            PurgedArtifact(
                kind="audit-images",
                key="gone.png",
                digest_algorithm="sha256",
                digest="0" * 64,
                job_id=job.id,
                request_ids=["r-1"],
                purged_at=utcnow(),
            )
        )
    body = api.client.get("/audit/v2", headers=api.headers()).json()
    assert body["artifacts"] == {"roc.png": "/audit/v2/artifacts/roc.png"}
    (name,) = body["purged_artifacts"]
    assert name == "unlearning_inversion.png"
    assert body["purged_artifacts"][name]["certificates"] == ["/forget/requests/r-1/certificate"]
    gone = api.client.get(f"/audit/v2/artifacts/{name}", headers=api.headers())
    assert gone.status_code == 410
    assert gone.headers["content-type"] == "application/problem+json"
    assert gone.json()["certificates"] == ["/forget/requests/r-1/certificate"]


def test_train_queues_a_job_and_enqueues_it_after_commit(api: Api) -> None:
    response = api.client.post("/train", headers=api.headers(), json={"epochs": 2})
    assert response.status_code == 202
    job_id = response.json()["job"]["id"]
    assert api.enqueued == [job_id]
    with open_session(api.engine) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.params["epochs"] == 2 and job.state.value == "queued"
    assert api.client.get(f"/jobs/{job_id}", headers=api.headers()).json()["job"]["id"] == job_id
    assert api.client.get("/jobs/999", headers=api.headers()).status_code == 404
    bad = api.client.post("/train", headers=api.headers(), json={"epochs": 0})
    assert bad.status_code == 422 and api.enqueued == [job_id]


def test_stats_counts_by_state(api: Api) -> None:
    seed_versions(api)
    api.client.post("/forget/toy-001", headers=api.headers())
    api.client.post("/forget/toy-002", headers=api.headers())
    stats = api.client.get("/stats", headers=api.headers()).json()
    assert stats["requests_by_state"] == {"pending": 2}
    assert stats["versions_by_state"] == {"serving": 1, "candidate": 1}
    assert stats["serving_version"] == "v1"
    assert stats["oldest_open_received_at"] is not None
    assert stats["time_to_erasure_p50_s"] is None
