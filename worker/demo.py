"""``lethe demo``: the whole service on one machine, driven through its own HTTP API.

It starts the API (uvicorn, on a thread) over the embedded ledger and store, with the in-process
job runner and scheduler (``embedded_services``), trains on the bundled digits through
``POST /train``, files deletion requests with ``POST /forget``, follows them to their
certificates (drawing each phase of their jobs as a bar), prints the ladder each deletion
climbed, prints where to look and keeps serving until Ctrl-C. With ``LETHE_BROKER_URL`` set the
jobs go to Redis instead, for ``celery worker`` and ``lethe scheduler`` processes.
"""

import argparse
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from datetime import datetime
from itertools import groupby
from typing import Any

import httpx
import uvicorn
from sqlalchemy import Engine

from app.ledger import migrate
from app.ledger.db import make_engine, session_scope
from app.ledger.jobs import FINISHED_STATES
from app.ledger.keys import SCOPES, replace_key
from app.ledger.samples import sample_ids
from app.ledger.tables import OPEN_REQUEST_STATES, JobState, RequestState, SampleState, Split
from app.logging import configure_logging
from app.main import create_app
from app.server import HTTP_PROTOCOL
from app.settings import Settings, get_settings
from worker.progress import PhaseBars, Step
from worker.scheduler import embedded_services

# Short waits so that the demo finishes promptly, unless the environment sets them.
DEMO_TIMINGS = {"coalesce_window_seconds": 2.0, "scheduler_interval_seconds": 0.5}
DEMO_KEY_NAME = "demo"
# Batches of 16: a sample is then in one step of 56 per epoch (1.8% of the run), so removing one
# sample's steps costs the model almost nothing and the planner starts at amnesiac rollback; in
# batches of 64 (7.1%) the rollback costs about ten points and its repair one or two.
DEMO_TRAINING = {"dataset": "digits", "batch_size": 16, "epochs": 5}
# What follow() reads from a polled body: its state, its job (or None), and whether it is over.
Status = Callable[[dict[str, Any]], tuple[str, dict[str, Any] | None, bool]]


class DemoFailed(Exception):
    pass


def add_demo_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    demo = commands.add_parser(
        "demo",
        help="train on digits, forget samples through the API, audit, promote, serve",
        description="Runs the whole service in this process over the ledger and store under "
        "LETHE_HOME: trains the small CNN on the bundled digits (unless a model serves "
        "already), forgets a few training samples through the HTTP API, prints the ladder "
        "each deletion climbed, then serves the API and the dashboard until Ctrl-C. Each run "
        "prints a new API key and revokes the previous run's (LETHE_BOOTSTRAP_API_KEY: use "
        "that key instead).",
    )
    demo.add_argument("--port", type=int, default=8000, help="port of the API on 127.0.0.1")
    demo.add_argument("--samples", type=int, default=3, help="training samples to forget")
    demo.add_argument("--timeout", type=float, default=900, help="seconds to wait for each step")
    demo.add_argument("--no-serve", action="store_true", help="exit after the summary")
    demo.set_defaults(handler=_demo)


def demo_settings(base: Settings) -> Settings:
    """The environment's settings, with the demo's short waits where the environment is silent."""
    updates = {
        name: value for name, value in DEMO_TIMINGS.items() if name not in base.model_fields_set
    }
    return base.model_copy(update=updates)


def demo_key(settings: Settings, engine: Engine) -> str:
    """LETHE_BOOTSTRAP_API_KEY when set; else a new key with every scope, which replaces (and
    revokes) the key the previous run printed."""
    if settings.bootstrap_api_key is not None:
        return settings.bootstrap_api_key.get_secret_value()
    with session_scope(engine) as session:
        return replace_key(session, DEMO_KEY_NAME, SCOPES, actor="lethe demo")


def _demo(args: argparse.Namespace) -> None:
    try:
        _run(args, demo_settings(get_settings()))
    except DemoFailed as error:
        sys.exit(f"lethe demo: {error}")


def _run(args: argparse.Namespace, settings: Settings) -> None:
    started = time.monotonic()
    _check_port_free(args.port)
    migrate.upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url, settings)
    base_url = f"http://127.0.0.1:{args.port}"
    key = demo_key(settings, engine)
    if settings.broker_url:
        print(
            f"jobs go to {settings.broker_url}: run `celery -A worker.celery_app:celery_app worker`"
            " and `lethe scheduler` with the same environment"
        )
    workers = nullcontext() if settings.broker_url else embedded_services(settings, engine)
    with (
        workers,
        api_server(settings, engine, args.port),
        httpx.Client(base_url=base_url, headers={"X-API-Key": key}, timeout=30) as client,
    ):
        requests = walk_through(client, engine, args.samples, args.timeout)
        print_summary(client, base_url, key, requests)
        print(f"\ndemo done in {_duration(time.monotonic() - started)}")
        _finish(args, requests)


def _finish(args: argparse.Namespace, requests: list[dict[str, Any]]) -> None:
    """Fails, exits or serves until a signal."""
    if any(r["state"] != RequestState.completed and not held(r) for r in requests):
        raise DemoFailed("a request did not complete (see its error above)")
    if not args.no_serve:
        print("\nserving until Ctrl-C")
        wait_for_signal()


def _check_port_free(port: int) -> None:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise DemoFailed(f"port {port} is taken; choose another with --port") from None


@contextmanager
def api_server(settings: Settings, engine: Engine, port: int) -> Iterator[None]:
    """The API on a thread of this process, until the block exits."""
    app = create_app(settings, engine)
    configure_logging(logging.WARNING)  # the demo's own lines, not one per HTTP call
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", http=HTTP_PROTOCOL
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="lethe-api", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise DemoFailed("the API did not start")
        time.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join()


def walk_through(
    client: httpx.Client, engine: Engine, count: int, timeout: float
) -> list[dict[str, Any]]:
    """Trains (unless something serves already), then forgets ``count`` training samples (the
    first alone, the others together); returns the requests as the API shows them at the end."""
    serving = _ok(client.get("/models/serving"))["version"]
    if serving is None:
        job = _ok(client.post("/train", json=DEMO_TRAINING))
        number = job["job"]["id"]
        print(f"training on digits (job {number}): the small CNN, then the audit's models")
        job = follow(client, job["links"]["self"], job_status, timeout)
        if job["job"]["state"] != JobState.succeeded:
            raise DemoFailed(f"training ended {job['job']['state']}: {job['job']['error']}")
        serving = _ok(client.get("/models/serving"))["version"]
    print(f"serving {serving['version']} ({serving['method']})")
    chosen = active_training_samples(engine, count)
    if not chosen:
        raise DemoFailed("every training sample is forgotten already: remove LETHE_HOME's data")
    # One sample alone first: its steps are a small share of the run, so the planner starts at
    # amnesiac rollback; then the others together, as one job.
    done = []
    for group in (chosen[:1], chosen[1:]):
        if not group:
            continue
        filed = [_ok(client.post(f"/forget/{sample_id}")) for sample_id in group]
        print(f"filed {len(filed)} deletion request(s): {', '.join(group)}")
        done += [follow(client, r["links"]["self"], request_status, timeout) for r in filed]
    return done


def active_training_samples(engine: Engine, count: int) -> list[str]:
    with session_scope(engine) as session:
        return sample_ids(session, "digits", Split.train, SampleState.active)[:count]


def job_status(body: dict[str, Any]) -> tuple[str, dict[str, Any] | None, bool]:
    job: dict[str, Any] = body["job"]
    return job["state"], job, job["state"] in FINISHED_STATES


def request_status(body: dict[str, Any]) -> tuple[str, dict[str, Any] | None, bool]:
    """Over once the request is certified or failed, or its job waits for an operator."""
    state, job = body["state"], body["job"]
    if held(body):
        return f"{state}, job held for an operator", job, True
    # The certificate is written by the purge, which follows the completion's commit.
    done = state not in OPEN_REQUEST_STATES and (
        state != RequestState.completed or body["certificate"] is not None
    )
    return state, job, done


def follow(client: httpx.Client, path: str, status: Status, timeout: float) -> dict[str, Any]:
    """Polls ``path`` until ``status`` says it is over, printing each state it passes through
    and drawing each phase of its job as a bar."""
    deadline = time.monotonic() + timeout
    bars = PhaseBars()
    shown = ""
    try:
        while True:
            body = _ok(client.get(path))
            state, job, done = status(body)
            if state != shown:
                bars.close()
                shown = state
                print(f"  {path}: {state}" + (f" (job {job['id']})" if job else ""), flush=True)
            if job and job["state"] == JobState.running and job.get("progress_detail"):
                bars.show(Step.from_dict(job["progress_detail"]))
            if done:
                return body
            if time.monotonic() > deadline:
                raise DemoFailed(f"{path} still {state} after {timeout:.0f}s")
            time.sleep(0.5)
    finally:
        bars.close()


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise DemoFailed(f"{response.request.method} {response.request.url.path}: {response.text}")
    body: dict[str, Any] = response.json()
    return body


def print_summary(
    client: httpx.Client, base_url: str, key: str, requests: list[dict[str, Any]]
) -> None:
    """Per version that completed requests: the ladder its job climbed (each candidate, its
    audit's decision and the reason of every rule it failed; each rung skipped, and why), test
    accuracy before and after,
    and the time from the first request to the last completion; then failed requests."""
    for version, group in groupby(sorted(requests, key=_version_of), key=_version_of):
        done = list(group)
        if version:
            print_deletion(client, base_url, version, done)
        else:
            for r in done:
                print_unfinished(base_url, key, r)
    print(f"\ndashboard:    {base_url}/dashboard (enter the API key once)")
    print(f"API key:      {key}")
    print(f'  curl -H "X-API-Key: {key}" {base_url}/models/serving')


def held(request: dict[str, Any]) -> bool:
    """Its job waits for an operator (approve or reject): not a failure, the screen's or the
    gate's call."""
    job = request["job"]
    return bool(job) and job.get("state") == JobState.held


def print_unfinished(base_url: str, key: str, request: dict[str, Any]) -> None:
    """A failed request with its error, or one whose job is held, with the operator's calls."""
    job = request["job"]
    if not held(request):
        print(f"\n{request['sample_id']}: {request['state']}: {request['error']}")
        return
    stage, reason = job["hold_stage"], job["hold_reason"]
    print(f"\n{request['sample_id']}: held for an operator ({stage}): {reason}")
    for verb in ("approve", "reject"):
        print(
            f'  curl -X POST -H "X-API-Key: {key}" -H "content-type: application/json" '
            f'-d \'{{"reason": "..."}}\' {base_url}/jobs/{job["id"]}/{verb}'
        )


def _version_of(request: dict[str, Any]) -> str:
    return request["completed_in_version"] or ""


def print_deletion(
    client: httpx.Client, base_url: str, version: str, requests: list[dict[str, Any]]
) -> None:
    received = min(_when(r["received_at"]) for r in requests)
    completed = max(_when(r["completed_at"]) for r in requests)
    detail = _ok(client.get(f"/models/{version}"))
    samples = ", ".join(r["sample_id"] for r in requests)
    print(f"\n{samples}: forgotten in {version} by {detail['method']}")
    print(f"  time from request to completion: {_duration((completed - received).total_seconds())}")
    ladder = detail["details"].get("ladder", [])
    names = dict.fromkeys([*(rung["version"] for rung in ladder), version])
    audits = {name: _ok(client.get(f"/audit/{name}")) for name in names}
    print("  ladder:")
    for rung in ladder:
        audit = audits[rung["version"]]
        decision = audit.get("decision") or audit["state"]
        print(f"    {rung['version']:<5} {rung['method']:<16} {decision}")
        for reason in audit.get("reasons", []):
            if isinstance(reason, dict) and not reason.get("passed", True):
                print(f"      failed {reason.get('rule')}: {reason.get('reason')}")
    for note in detail["details"].get("ladder_notes", []):
        print(f"    {'':<5} {note['method']:<16} {note['outcome']}: {note['reason']}")
    test = audits[version].get("metrics", {}).get("utility", {}).get("test", {})
    if test.get("parent") is not None and test.get("candidate") is not None:
        print(
            f"  test accuracy: {100 * test['parent']:.1f}% before ({detail['parent']}), "
            f"{100 * test['candidate']:.1f}% after ({version})"
        )
    for r in requests:
        print(f"  {r['sample_id']}: {base_url}{r['links']['self']}")
        if "certificate" in r["links"]:
            print(f"    certificate: {base_url}{r['links']['certificate']}")
    print(f"  audit report: {base_url}/audit/{version}")


def _when(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    stop.wait()
