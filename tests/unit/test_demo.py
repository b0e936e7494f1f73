"""``lethe demo``: the README's first command, run as a user runs it."""

import re
import socket
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine, select

from app.ledger.db import make_engine, open_session
from app.ledger.keys import KEY_PREFIX, find_active_key
from app.ledger.tables import ApiKey, DeletionRequest, Job, JobState, ModelVersion, RequestState
from app.ledger.versions import alias_target
from app.settings import Settings
from tests.conftest import DemoRun
from tests.integration.servers import free_port
from tests.lethe_cli import lethe
from worker.demo import DEMO_KEY_NAME, demo_key, demo_settings, print_summary, request_status


def test_demo_settings_keep_what_the_environment_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_COALESCE_WINDOW_SECONDS", "30")
    settings = demo_settings(Settings())
    assert settings.coalesce_window_seconds == 30  # the environment's
    assert settings.scheduler_interval_seconds == 0.5  # the demo's


def test_each_run_revokes_the_key_the_last_run_printed(engine: Engine) -> None:
    first, second = demo_key(Settings(), engine), demo_key(Settings(), engine)
    assert first.startswith(KEY_PREFIX) and second.startswith(KEY_PREFIX)  # as the README shows
    with open_session(engine) as session:
        assert find_active_key(session, first) is None
        assert find_active_key(session, second) is not None
        assert len(session.scalars(select(ApiKey).where(ApiKey.name == DEMO_KEY_NAME)).all()) == 2


def test_a_bootstrap_key_is_used_as_it_is(engine: Engine) -> None:
    chosen = Settings(bootstrap_api_key=SecretStr("lethe_chosen-by-the-operator"))
    assert demo_key(chosen, engine) == "lethe_chosen-by-the-operator"
    with open_session(engine) as session:
        assert not session.scalars(select(ApiKey)).all()  # registered by the API at start-up


def test_the_summary_shows_the_ladder_each_failed_rule_and_the_accuracy(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Whatever rules the audit has: their names and reasons are the API's data."""
    ladder = [
        {"method": "amnesiac", "version": "v2", "decision": "fail", "failed_rules": ["new_rule"]},
        {"method": "amnesiac+repair", "version": "v3", "decision": "pass", "failed_rules": []},
    ]
    answers = {
        "/models/v3": {"method": "amnesiac+repair", "parent": "v1", "details": {"ladder": ladder}},
        "/audit/v2": {
            "state": "done",
            "decision": "fail",
            "reasons": [
                {"rule": "new_rule", "passed": False, "reason": "a reason of the new rule"},
                {"rule": "old_rule", "passed": True, "reason": "held"},
            ],
        },
        "/audit/v3": {
            "state": "done",
            "decision": "pass",
            "reasons": [{"rule": "new_rule", "passed": True, "reason": "held"}],
            "metrics": {"utility": {"test": {"parent": 0.9712, "candidate": 0.9651}}},
        },
    }
    transport = httpx.MockTransport(
        lambda request: httpx.Response(200, json=answers[request.url.path])
    )
    request = {
        "sample_id": "digits-0002",
        "state": "completed",
        "completed_in_version": "v3",
        "received_at": "2026-12-02T10:00:00+00:00",
        "completed_at": "2026-12-02T10:01:05+00:00",
        "links": {"self": "/forget/requests/r1", "certificate": "/forget/requests/r1/certificate"},
    }
    with httpx.Client(transport=transport, base_url="http://lethe") as client:
        print_summary(client, "http://lethe", "lethe_key", [request])
    out = capsys.readouterr().out
    assert "digits-0002: forgotten in v3 by amnesiac+repair\n" in out
    assert "  time from request to completion: 1 min 5 s\n" in out
    assert re.search(
        r"    v2 +amnesiac +fail\n      failed new_rule: a reason of the new rule\n", out
    )
    assert re.search(r"    v3 +amnesiac\+repair +pass\n", out) and "old_rule" not in out
    assert "  test accuracy: 97.1% before (v1), 96.5% after (v3)\n" in out
    assert "certificate: http://lethe/forget/requests/r1/certificate" in out


def test_a_completed_request_is_followed_until_it_has_its_certificate() -> None:
    pending = {"state": "pending", "job": None, "certificate": None}
    completed = {"state": "completed", "job": {"progress": 100}, "certificate": None}
    assert request_status(pending) == ("pending", None, False)
    assert request_status(completed) == ("completed", {"progress": 100}, False)  # uncertified
    assert request_status(completed | {"certificate": {"method": "relabel"}})[2]
    assert request_status(pending | {"state": "failed"})[2]


def test_a_taken_port_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    port = free_port()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        result = lethe(tmp_path, "demo", "--no-serve", "--port", str(port))
    assert result.returncode != 0
    assert f"port {port} is taken" in result.stderr


@pytest.mark.slow
def test_the_demo_trains_forgets_and_certifies_through_the_api(demo_run: DemoRun) -> None:
    """Whatever the gate decides on this machine's training: every request ends forgotten with
    its ladder and certificate, or held for an operator with the reason and the calls to make;
    the lone sample's job starts at a rollback rung."""
    result = demo_run.result
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    out = result.stdout
    # Each phase of the jobs, with its count (one line each: the output is not a terminal).
    assert re.search(r"^  training \(\d+ steps\)$", out, re.MULTILINE)
    assert "  audit models: reference models (8 models)\n" in out
    assert re.search(r"^  [a-z+-]+ \(rung \d of 4\): audit: membership attacks$", out, re.MULTILINE)
    # The summary, per job that served: the samples, the ladder with each candidate's decision,
    # accuracy before and after, time. Per request held: the reason and the operator's calls.
    forgotten = [
        b for b in out.split("\n\n") if re.match(r"digits-\d+(?:, digits-\d+)*: forgotten in", b)
    ]
    held = re.findall(r"^(digits-\d+): held for an operator \(\w+\): .+$", out, re.MULTILINE)
    assert out.count("/approve") == out.count("/reject") == len(held)
    served: list[str] = []
    for block in forgotten:
        job = re.match(
            r"^(digits-\d+(?:, digits-\d+)*): forgotten in (v\d+) by (\S+)$", block, re.M
        )
        assert job is not None
        served += job.group(1).split(", ")
        version, method = job.group(2), job.group(3)
        rungs = re.findall(r"^    (v\d+) +(\S+) +(pass|fail)$", block, re.MULTILINE)
        assert rungs and rungs[-1] == (version, method, "pass")
        assert all(decision == "fail" for _, _, decision in rungs[:-1])
        assert len(re.findall(r"^      failed \w+: .+$", block, re.MULTILINE)) >= len(rungs) - 1
        assert re.search(
            rf"test accuracy: \d+\.\d% before \(v\d+\), \d+\.\d% after \({version}\)", block
        )
        assert re.search(r"^  time from request to completion: (\d+ min )?\d+ s$", block, re.M)
        assert f"/audit/{version}" in block
    assert len(served) + len(held) == 3 and out.count("/certificate") == len(served)
    key = re.search(r"^API key: +(\S+)$", out, re.MULTILINE)
    assert key is not None and key.group(1).startswith(KEY_PREFIX)

    engine = make_engine(Settings(home=demo_run.home).resolved_database_url)
    with open_session(engine) as session:
        requests = session.scalars(select(DeletionRequest)).all()
        completed = {r.sample_id for r in requests if r.state is RequestState.completed}
        assert completed == set(served)
        assert all(r.certificate is not None for r in requests if r.sample_id in completed)
        held_jobs = {
            r.sample_id for r in requests if session.get(Job, r.job_id).state is JobState.held
        }
        assert held_jobs == set(held)
        serving = alias_target(session)
        assert serving is not None
        if forgotten:  # the last job that served serves
            assert f"forgotten in {serving.version} by {serving.method}" in forgotten[-1]
        # One sample of 898 in batches of 16 is in 1.8% of the steps: the planner starts its job
        # at a rollback rung (whether the candidate passes is the gate's to say).
        lone = min(requests, key=lambda r: r.received_at)
        first = session.scalars(
            select(ModelVersion).where(ModelVersion.job_id == lone.job_id).order_by(ModelVersion.id)
        ).first()
        assert first is not None and first.method in ("amnesiac", "amnesiac+repair")
        assert find_active_key(session, key.group(1)) is not None
    engine.dispose()
