"""Time from POST /forget to a completed, certified request, through the whole service: uvicorn,
the scheduler, Redis, a ``celery worker`` and PostgreSQL, on digits with the small CNN trained by
``POST /train`` (its defaults). For 1, 10 and 100 requests, then the same with every job forced
to exact retraining (``LETHE_LADDER_START=retrain-exact``): the same run retrained without the
samples, plus the same audit, promotion and purge. The ratio of the two is the issue's figure.

    .venv/bin/python -m bench.bench_pipeline                 # ~4 min on 2 cores
    .venv/bin/python -m bench.bench_pipeline --counts 1 1 1 --baseline-counts 1 1 1
    .venv/bin/python -m bench.bench_pipeline --train '{"epochs": 40, "batch_size": 16}'

Needs the PostgreSQL and Redis of the tests. Prints a Markdown table and writes
``bench/results/pipeline-<time>.json``.
"""

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

import httpx
from sqlalchemy import func, or_, select

from app.ledger.clock import as_utc
from app.ledger.db import session_scope
from app.ledger.samples import sample_ids
from app.ledger.tables import Audit, DeletionRequest, Job, ModelVersion, RequestState, Split
from tests.integration.servers import uvicorn_server
from tests.integration.stack import Stack, open_stack, wait_for

RESULTS = Path(__file__).parent / "results"
# Production-like leases (no job here should look lost); a short coalescing window, since the
# window is latency chosen by the operator, not work.
SETTINGS = {
    "lease_seconds": "120",
    "heartbeat_seconds": "5",
    "requeue_after_seconds": "300",
    "task_time_limit_seconds": "1800",
    "visibility_timeout_seconds": "3600",
    # One key files 113 of the 898 samples here, spread over every class: a benchmark of the
    # pipeline, not a burst for the screen to hold (docs/operators.md, screening).
    "screen_max_class_share": "1",
    "screen_max_dataset_share": "1",
    "screen_key_quota_per_window": "100000",
}


@dataclass
class Measurement:
    policy: str  # "ladder" (the planner chooses) or "retrain-exact"
    requests: int
    seconds: float  # first POST to the last certificate, on the client's clock
    request_p50_s: float  # received_at to completed_at, from the ledger
    request_max_s: float
    jobs: int
    methods: list[str]  # of the promoted versions
    rungs: list[str]  # every candidate of the jobs, "method:state", in order
    job_seconds: float  # sum over the jobs of started to finished
    audit_seconds: float  # sum over the audits (the failed rungs' included)


def run(args: argparse.Namespace) -> list[Measurement]:
    settings = SETTINGS | {
        "coalesce_window_seconds": str(args.window),
        "scheduler_interval_seconds": str(args.tick),
    }
    with (
        tempfile.TemporaryDirectory(prefix="lethe-bench-") as home,
        open_stack(Path(home), **settings) as stack,
        uvicorn_server(stack.env) as api,
    ):
        key = stack.env["LETHE_BOOTSTRAP_API_KEY"]
        http = httpx.Client(base_url=api.base_url, headers={"X-API-Key": key}, timeout=30)
        stack.start_scheduler()
        worker = stack.start_worker()
        train(stack, http, json.loads(args.train))
        unused = iter(train_samples(stack))
        results = []
        for count in args.counts:
            results.append(measure(stack, http, "ladder", [next(unused) for _ in range(count)]))
            print(row(results[-1]), flush=True)
        worker.stop()
        stack.env["LETHE_LADDER_START"] = "retrain-exact"
        stack.start_worker()
        measure(stack, http, "warm-up", [next(unused)])  # a new pool process pays its imports
        for count in args.baseline_counts:
            ids = [next(unused) for _ in range(count)]
            results.append(measure(stack, http, "retrain-exact", ids))
            print(row(results[-1]), flush=True)
        return results


def train(stack: Stack, http: httpx.Client, body: dict[str, Any]) -> None:
    job = http.post("/train", json=body).json()["links"]["self"]

    def finished() -> bool:
        return http.get(job).json()["job"]["state"] in ("succeeded", "failed", "dead")

    wait_for(finished, 900, "the training job")
    state = http.get(job).json()["job"]
    if state["state"] != "succeeded":
        raise SystemExit(f"training failed: {state}\n{stack.logs()}")


def train_samples(stack: Stack) -> list[str]:
    with session_scope(stack.engine) as session:
        return sample_ids(session, "digits", Split.train)


def measure(stack: Stack, http: httpx.Client, policy: str, ids: list[str]) -> Measurement:
    started = time.perf_counter()
    request_ids = [http.post(f"/forget/{sample_id}").json()["request_id"] for sample_id in ids]
    wait_for(lambda: finished(stack, request_ids) == len(ids), 1800, f"{len(ids)} requests")
    seconds = time.perf_counter() - started
    with session_scope(stack.engine) as session:
        requests = session.scalars(
            select(DeletionRequest).where(DeletionRequest.id.in_(request_ids))
        ).all()
        failed = [r.error for r in requests if r.state is not RequestState.completed]
        if failed:
            raise SystemExit(f"{len(failed)} request(s) failed: {failed[0]}\n{stack.logs()}")
        latencies = [
            (as_utc(r.completed_at) - as_utc(r.received_at)).total_seconds()
            for r in requests
            if r.completed_at is not None
        ]
        jobs = session.scalars(select(Job).where(Job.id.in_({r.job_id for r in requests}))).all()
        job_ids = [j.id for j in jobs]
        audits = session.scalars(select(Audit).where(Audit.job_id.in_(job_ids))).all()
        candidates = session.scalars(
            select(ModelVersion).where(ModelVersion.job_id.in_(job_ids)).order_by(ModelVersion.id)
        ).all()
        return Measurement(
            policy=policy,
            requests=len(ids),
            seconds=seconds,
            request_p50_s=median(latencies),
            request_max_s=max(latencies),
            jobs=len(jobs),
            methods=sorted({str(j.method) for j in jobs}),
            rungs=[f"{v.method}:{v.state.value}" for v in candidates],
            job_seconds=sum(_span(j.started_at, j.finished_at) for j in jobs),
            audit_seconds=sum(a.metrics["timings"]["total_seconds"] for a in audits),
        )


def finished(stack: Stack, request_ids: list[str]) -> int:
    """Requests certified (the purge done) or failed."""
    with session_scope(stack.engine) as session:
        count = session.scalar(
            select(func.count()).where(
                DeletionRequest.id.in_(request_ids),
                or_(
                    DeletionRequest.certificate.is_not(None),
                    DeletionRequest.state == RequestState.failed,
                ),
            )
        )
        return int(count or 0)


def _span(start: datetime | None, end: datetime | None) -> float:
    return (as_utc(end) - as_utc(start)).total_seconds() if start and end else 0.0


HEADER = (
    "| policy | requests | jobs | candidates (method: state) | POST → all certified s "
    "| request p50 s | request max s | job s | audit s |\n|---|---|---|---|---|---|---|---|---|"
)


def row(m: Measurement) -> str:
    return (
        f"| {m.policy} | {m.requests} | {m.jobs} | {', '.join(m.rungs)} | {m.seconds:.1f} "
        f"| {m.request_p50_s:.1f} | {m.request_max_s:.1f} | {m.job_seconds:.1f} "
        f"| {m.audit_seconds:.1f} |"
    )


def ratios(results: list[Measurement]) -> dict[int, float]:
    """Exact retraining's median time over the ladder's, per request count measured both ways
    (a count given several times is measured several times, on fresh samples)."""

    def medians(policy: str) -> dict[int, float]:
        counts = {m.requests for m in results if m.policy == policy}
        return {
            n: median(m.seconds for m in results if (m.policy, m.requests) == (policy, n))
            for n in counts
        }

    ladder, exact = medians("ladder"), medians("retrain-exact")
    return {n: exact[n] / ladder[n] for n in ladder.keys() & exact.keys()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 1, 1, 10, 100])
    parser.add_argument("--baseline-counts", type=int, nargs="+", default=[1, 1, 1, 10])
    parser.add_argument("--window", type=float, default=0.5, help="coalescing window, s")
    parser.add_argument("--tick", type=float, default=0.2, help="scheduler interval, s")
    parser.add_argument("--train", default="{}", help="POST /train body (JSON); {} = defaults")
    args = parser.parse_args()
    print(HEADER, flush=True)
    results = run(args)
    for count, ratio in sorted(ratios(results).items()):
        print(f"\n{count} request(s): exact retraining takes {ratio:.1f}x the ladder's time")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    document: dict[str, Any] = {
        "date": stamp,
        "machine": platform.platform(),
        "args": vars(args),
        "results": [asdict(m) for m in results],
        "ratios": ratios(results),
    }
    (RESULTS / f"pipeline-{stamp}.json").write_text(json.dumps(document, indent=2))


if __name__ == "__main__":
    main()
