"""``lethe demo``: the whole service on one machine, driven through its own HTTP API.

It starts the API (uvicorn, on a thread) over the embedded ledger and store, with the in-process
job runner and scheduler (``embedded_services``), trains on the bundled digits through
``POST /train``, files deletion requests with ``POST /forget``, follows them to their
certificates, prints where to look and keeps serving until Ctrl-C. With ``LETHE_BROKER_URL``
set the jobs go to Redis instead, for ``celery worker`` and ``lethe scheduler`` processes.
"""

import argparse
import logging
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import httpx
import uvicorn
from pydantic import SecretStr
from sqlalchemy import Engine

from app.ledger import migrate
from app.ledger.db import make_engine, session_scope
from app.ledger.jobs import FINISHED_STATES
from app.ledger.samples import sample_ids
from app.ledger.tables import OPEN_REQUEST_STATES, JobState, RequestState, SampleState, Split
from app.logging import configure_logging
from app.main import create_app
from app.server import HTTP_PROTOCOL
from app.settings import Settings, get_settings
from worker.scheduler import embedded_services

# Short waits so that the demo finishes promptly, unless the environment sets them.
DEMO_TIMINGS = {"coalesce_window_seconds": 2.0, "scheduler_interval_seconds": 0.5}
# What follow() reads from a polled body: its state, its job's progress, and whether it is over.
Status = Callable[[dict[str, Any]], tuple[str, int, bool]]


class DemoFailed(Exception):
    pass


def add_demo_command(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    demo = commands.add_parser(
        "demo", help="train on digits, forget samples through the API, audit, promote, serve"
    )
    demo.add_argument("--port", type=int, default=8000, help="port of the API on 127.0.0.1")
    demo.add_argument("--samples", type=int, default=3, help="training samples to forget")
    demo.add_argument("--timeout", type=float, default=900, help="seconds to wait for each step")
    demo.add_argument("--no-serve", action="store_true", help="exit after the summary")
    demo.set_defaults(handler=_demo)


def demo_settings(base: Settings) -> Settings:
    """The environment's settings, with the demo's short waits where the environment is silent,
    and a bootstrap key (new, random) when none is set."""
    updates: dict[str, Any] = {
        name: value for name, value in DEMO_TIMINGS.items() if name not in base.model_fields_set
    }
    if base.bootstrap_api_key is None:
        updates["bootstrap_api_key"] = SecretStr(secrets.token_urlsafe(24))
    return base.model_copy(update=updates)


def _demo(args: argparse.Namespace) -> None:
    try:
        _run(args, demo_settings(get_settings()))
    except DemoFailed as error:
        sys.exit(f"lethe demo: {error}")


def _run(args: argparse.Namespace, settings: Settings) -> None:
    _check_port_free(args.port)
    migrate.upgrade(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url, settings)
    base_url = f"http://127.0.0.1:{args.port}"
    key = settings.bootstrap_api_key.get_secret_value() if settings.bootstrap_api_key else ""
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
        _finish(args, base_url, key, requests)


def _finish(
    args: argparse.Namespace, base_url: str, key: str, requests: list[dict[str, Any]]
) -> None:
    """Prints the summary; then fails, exits or serves until a signal."""
    print_summary(base_url, key, requests)
    if any(r["state"] != RequestState.completed for r in requests):
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
    """Trains (unless something serves already), then forgets ``count`` training samples;
    returns the requests as the API shows them at the end."""
    serving = _ok(client.get("/models/serving"))["version"]
    if serving is None:
        job = _ok(client.post("/train", json={"dataset": "digits"}))
        print(f"training on digits (job {job['job']['id']}): small CNN, audit models")
        job = follow(client, job["links"]["self"], job_status, timeout)
        if job["job"]["state"] != JobState.succeeded:
            raise DemoFailed(f"training ended {job['job']['state']}: {job['job']['error']}")
        serving = _ok(client.get("/models/serving"))["version"]
    print(f"serving {serving['version']} ({serving['method']})")
    chosen = active_training_samples(engine, count)
    if not chosen:
        raise DemoFailed("every training sample is forgotten already: remove LETHE_HOME's data")
    filed = [_ok(client.post(f"/forget/{sample_id}")) for sample_id in chosen]
    print(f"filed {len(filed)} deletion request(s): {', '.join(chosen)}")
    return [follow(client, r["links"]["self"], request_status, timeout) for r in filed]


def active_training_samples(engine: Engine, count: int) -> list[str]:
    with session_scope(engine) as session:
        return sample_ids(session, "digits", Split.train, SampleState.active)[:count]


def job_status(body: dict[str, Any]) -> tuple[str, int, bool]:
    job = body["job"]
    return job["state"], job["progress"], job["state"] in FINISHED_STATES


def request_status(body: dict[str, Any]) -> tuple[str, int, bool]:
    state, job = body["state"], body["job"]
    # The certificate is written by the purge, which follows the completion's commit.
    done = state not in OPEN_REQUEST_STATES and (
        state != RequestState.completed or body["certificate"] is not None
    )
    return state, job["progress"] if job else 0, done


def follow(client: httpx.Client, path: str, status: Status, timeout: float) -> dict[str, Any]:
    """Polls ``path`` until ``status`` says it is over, printing progress as it changes."""
    deadline = time.monotonic() + timeout
    shown = ""
    while True:
        body = _ok(client.get(path))
        state, progress, done = status(body)
        if f"{state} {progress}%" != shown:
            shown = f"{state} {progress}%"
            print(f"  {path}: {shown}", flush=True)
        if done:
            return body
        if time.monotonic() > deadline:
            raise DemoFailed(f"{path} still {state} after {timeout:.0f}s")
        time.sleep(0.5)


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise DemoFailed(f"{response.request.method} {response.request.url.path}: {response.text}")
    body: dict[str, Any] = response.json()
    return body


def print_summary(base_url: str, key: str, requests: list[dict[str, Any]]) -> None:
    print("\nrequests:")
    for r in requests:
        outcome = r["completed_in_version"] or r["error"]
        method = (r["certificate"] or {}).get("method", "")
        print(f"  {r['sample_id']}: {r['state']} {method} {outcome or ''}".rstrip())
        print(f"    {base_url}{r['links']['self']}")
        if "certificate" in r["links"]:
            print(f"    certificate: {base_url}{r['links']['certificate']}")
    for audit in sorted({r["links"]["audit"] for r in requests if "audit" in r["links"]}):
        print(f"audit report: {base_url}{audit}")
    print(f"dashboard:    {base_url}/dashboard (paste the API key)")
    print(f"API key:      {key}")
    print(f'  curl -H "X-API-Key: {key}" {base_url}/models/serving')


def wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda _signum, _frame: stop.set())
    stop.wait()
