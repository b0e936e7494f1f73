"""``lethe demo``: the README's first command, run as a user runs it."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from app.ledger.db import make_engine, open_session
from app.ledger.tables import DeletionRequest, RequestState
from app.ledger.versions import alias_target
from app.settings import Settings
from tests.integration.servers import PROJECT_ROOT, free_port
from worker.demo import demo_settings, request_status


def lethe(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LETHE_")}
    env |= {"LETHE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "worker.cli", *args]
    return subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_demo_settings_keep_what_the_environment_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LETHE_COALESCE_WINDOW_SECONDS", "30")
    settings = demo_settings(Settings())
    assert settings.coalesce_window_seconds == 30  # the environment's
    assert settings.scheduler_interval_seconds == 0.5  # the demo's
    assert settings.bootstrap_api_key is not None  # a new key, since none is set


def test_a_completed_request_is_followed_until_it_has_its_certificate() -> None:
    pending = {"state": "pending", "job": None, "certificate": None}
    completed = {"state": "completed", "job": {"progress": 100}, "certificate": None}
    assert request_status(pending) == ("pending", 0, False)
    assert request_status(completed) == ("completed", 100, False)  # the purge has yet to certify
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
def test_the_demo_trains_forgets_and_certifies_through_the_api(tmp_path: Path) -> None:
    result = lethe(tmp_path, "demo", "--no-serve", "--port", str(free_port()))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(re.findall(r"^  digits-\d+: completed", result.stdout, re.MULTILINE)) == 3
    assert "/certificate" in result.stdout and "/audit/v2" in result.stdout

    engine = make_engine(Settings(home=tmp_path).resolved_database_url)
    with open_session(engine) as session:
        requests = session.scalars(select(DeletionRequest)).all()
        assert [r.state for r in requests] == [RequestState.completed] * 3
        assert all(r.certificate is not None for r in requests)
        serving = alias_target(session)
        assert serving is not None and serving.method != "train"
    engine.dispose()
