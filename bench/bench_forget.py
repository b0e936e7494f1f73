"""POST /forget/{sample_id}: throughput and latency through a real uvicorn on PostgreSQL.

For each uvicorn worker count: a fresh database (created and migrated here, dropped after), N
registered samples, the service started as an operator would, a warm-up, then wrk posting every
sample exactly once at a fixed concurrency. Afterwards every 202's request_id is looked up in
the ledger: lost (a 202 whose request is missing) must be 0.

    .venv/bin/python -m bench.bench_forget --requests 20000 --concurrency 32 --workers 1 2

Every limit is on, as deployed: the rate limits are counted in the Redis of the tests
(LETHE_TEST_REDIS_URL, default 127.0.0.1:6379, under a key prefix of the run's own), per key and
per address, with limits set above the offered load so that none of the posts is refused: what
is measured is what counting costs (--rate-limits memory counts in the process instead).

Needs wrk (Debian: apt-get install wrk), the PostgreSQL of the tests (LETHE_TEST_POSTGRES_URL,
default postgres@127.0.0.1:5432/test) and its Redis. Results print as a Markdown table and go
to bench/results/.
"""

import argparse
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from app.ledger.db import make_engine, session_scope
from app.ledger.samples import SampleRecord, register_samples
from app.ledger.tables import DeletionRequest, Split
from tests.conftest import POSTGRES_ADMIN_URL
from tests.integration.servers import (
    PROJECT_ROOT,
    Server,
    fresh_postgres_database,
    service_env,
    uvicorn_server,
)
from tests.integration.stack import REDIS_URL, delete_keys

LUA_SCRIPT = PROJECT_ROOT / "bench" / "forget.lua"
RESULTS = PROJECT_ROOT / "bench" / "results"
WARM, RUN = "b-warm-", "b-run-"  # sample ID prefixes; forget.lua appends a 7-digit index


@dataclass(frozen=True)
class Result:
    workers: int
    concurrency: int
    requests: int
    seconds: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    accepted: int
    errors: int
    socket_errors: int
    lost: int
    in_ledger: int
    # CPU per request: a load-independent figure (the machine may be shared while measuring).
    server_cpu_ms: float
    postgres_cpu_ms: float
    redis_cpu_ms: float
    # Whatever else the machine's CPUs did meanwhile, per request: wrk and the kernel's share
    # (~0.1 ms), plus anything else running. Well above that: the machine was not quiet.
    other_cpu_ms: float
    load_before: float  # 1-minute load average as the measured run started (JSON only: it lags)

    def meets(self, rps: float, p99_ms: float) -> bool:
        return self.requests_per_s >= rps and self.p99_ms <= p99_ms and not self.lost


def _stat_fields(pid: int) -> list[str] | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None  # it has exited
    return stat.rsplit(")", 1)[1].split()  # the fields after "pid (comm)", state first


def cpu_seconds(pids: list[int], *, reaped: bool = False) -> dict[int, float]:
    """User + system CPU of each live process (Linux /proc); ``reaped`` adds that of its exited
    children (for the postmaster: the backends that came and went)."""
    clock = os.sysconf("SC_CLK_TCK")
    found = {}
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks = sum(int(fields[i]) for i in ((11, 12, 13, 14) if reaped else (11, 12)))
            found[pid] = ticks / clock
    return found


def machine_busy_seconds() -> float:
    """CPU time all the machine's CPUs spent busy since boot (Linux /proc/stat)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(limit_s: float, busy_below: float = 0.10, window_s: float = 3.0) -> None:
    """Waits (at most ``limit_s``) until the machine's CPUs are less than ``busy_below`` busy over
    ``window_s``: on a shared machine, a run then starts when nobody else's does."""
    deadline = time.monotonic() + limit_s
    cpus = os.cpu_count() or 1
    while time.monotonic() < deadline:
        before = machine_busy_seconds()
        time.sleep(window_s)
        if (machine_busy_seconds() - before) / (window_s * cpus) < busy_below:
            return
    print(f"the machine stayed busy for {limit_s:g} s: measuring anyway", file=sys.stderr)


def server_processes(server: Server) -> list[int]:
    """uvicorn's supervisor and its workers."""
    root = server.process.pid
    children = Path(f"/proc/{root}/task/{root}/children").read_text().split()
    return [root, *map(int, children)]


def postgres_backends(database: str) -> list[int]:
    """The PostgreSQL backends serving ``database`` (their titles name it)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            title = cmdline.read_bytes().decode(errors="replace")
        except OSError:
            continue
        if title.startswith("postgres: ") and f" {database} " in title:
            pids.append(int(cmdline.parent.name))
    return pids


def postgres_cpu(database: str) -> dict[int, float]:
    """CPU of this database's live backends, plus the postmaster's reaped children: a pool that
    opens and closes connections leaves its backends' CPU there (so would other databases' short
    sessions meanwhile: measure on a quiet server)."""
    backends = postgres_backends(database)
    fields = _stat_fields(backends[0]) if backends else None
    postmaster = [int(fields[1])] if fields else []  # the parent of a backend
    return cpu_seconds(backends) | cpu_seconds(postmaster, reaped=True)


def redis_servers() -> list[int]:
    """The machine's redis-server processes (the rate limits' counters)."""
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            if comm.read_text().strip() == "redis-server":
                pids.append(int(comm.parent.name))
        except OSError:
            continue
    return pids


def cpu_spent(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def sample_ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i:07d}" for i in range(n)]


def register(url: str, n_run: int, n_warm: int) -> None:
    engine = make_engine(url)
    records = [
        SampleRecord(sid, Split.train, 0, "0" * 64)
        for sid in sample_ids(WARM, n_warm) + sample_ids(RUN, n_run)
    ]
    with session_scope(engine) as session:
        register_samples(session, "bench", records)
    engine.dispose()


def run_wrk(
    server: Server, api_key: str, prefix: str, n: int, args: argparse.Namespace, out: Path
) -> dict[str, float]:
    """One wrk run over ``n`` distinct samples; the figures forget.lua prints, as a dict."""
    out.mkdir(parents=True, exist_ok=True)
    command = [
        *("wrk", f"--threads={args.threads}", f"--connections={args.concurrency}"),
        *(f"--duration={args.max_seconds}s", "--timeout=10s", f"--script={LUA_SCRIPT}"),
        server.base_url,
        *("--", prefix, str(n), str(args.threads), str(out), api_key),
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as wrk:
        while wrk.poll() is None and len(list(out.glob("done-*"))) < args.threads:
            if server.process.poll() is not None:
                wrk.kill()
                raise RuntimeError(f"the server died under load:\n{server.log_tail()}")
            time.sleep(0.01)
        wrk.send_signal(signal.SIGINT)  # ends the run now rather than at --duration
        stdout, stderr = wrk.communicate()
    found = re.search(r"^BENCH_JSON (.*)$", stdout, re.MULTILINE)
    if found is None:
        raise RuntimeError(f"wrk printed no figures:\n{stdout}\n{stderr}")
    figures: dict[str, float] = json.loads(found.group(1))
    return figures


def ledger_ids(url: str, prefix: str) -> set[str]:
    engine = make_engine(url)
    with session_scope(engine) as session:
        query = select(DeletionRequest.id).where(DeletionRequest.sample_id.startswith(prefix))
        found = set(session.scalars(query))
    engine.dispose()
    return found


def accepted_ids(out: Path) -> set[str]:
    return {line for f in out.glob("accepted-*.txt") for line in f.read_text().split() if line}


def run_once(workers: int, args: argparse.Namespace) -> Result:
    api_key = "lethe_bench_" + secrets.token_urlsafe(24)
    with (
        fresh_postgres_database(args.admin_url, prefix="lethe_bench") as url,
        tempfile.TemporaryDirectory(prefix="lethe-bench-") as tmp,
    ):
        register(url, args.requests, args.warmup)
        prefix = f"lethe-bench-{uuid.uuid4().hex[:10]}:"
        storage = REDIS_URL if args.rate_limits == "redis" else "memory://"
        limits = {
            "rate_limit_storage_url": storage,
            "broker_key_prefix": prefix,
            "rate_limit_per_key": "1000000/second",
            "rate_limit_per_address": "1000000/second",
        }
        env = service_env(url, api_key, Path(tmp) / "home", **(limits | dict(args.set)))
        try:
            with uvicorn_server(env, workers=workers) as server:
                run_wrk(server, api_key, WARM, args.warmup, args, Path(tmp) / "warm")
                database = url.rsplit("/", 1)[1]
                if args.wait_quiet:
                    wait_until_quiet(args.wait_quiet)
                load_before = os.getloadavg()[0]
                machine_before = machine_busy_seconds()
                server_before = cpu_seconds(server_processes(server))
                pg_before = postgres_cpu(database)
                redis_before = cpu_seconds(redis_servers())
                figures = run_wrk(server, api_key, RUN, args.requests, args, Path(tmp) / "run")
                server_cpu = cpu_spent(server_before, cpu_seconds(server_processes(server)))
                pg_cpu = cpu_spent(pg_before, postgres_cpu(database))
                redis_cpu = cpu_spent(redis_before, cpu_seconds(redis_servers()))
                machine_cpu = machine_busy_seconds() - machine_before
        finally:
            delete_keys(REDIS_URL, prefix)  # the run's rate-limit counters
        accepted = accepted_ids(Path(tmp) / "run")
        in_ledger = ledger_ids(url, RUN)
    answered = figures["accepted"] + figures["repeated"] + figures["failed"]
    seconds = figures["duration_us"] / 1e6
    return Result(
        workers=workers,
        concurrency=args.concurrency,
        requests=int(answered),
        seconds=round(seconds, 2),
        requests_per_s=round(answered / seconds, 1),
        p50_ms=figures["p50_us"] / 1000,
        p95_ms=figures["p95_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        max_ms=figures["max_us"] / 1000,
        accepted=len(accepted),
        # Every sample is fresh, so anything but a 202 (a 200 included) is a failure, and so
        # is a request that got no answer.
        errors=int(figures["repeated"] + figures["failed"]) + args.requests - int(answered),
        socket_errors=int(figures["socket_errors"]),
        lost=len(accepted - in_ledger),
        in_ledger=len(in_ledger),
        server_cpu_ms=round(1000 * server_cpu / answered, 2),
        postgres_cpu_ms=round(1000 * pg_cpu / answered, 2),
        redis_cpu_ms=round(1000 * redis_cpu / answered, 2),
        other_cpu_ms=round(1000 * (machine_cpu - server_cpu - pg_cpu - redis_cpu) / answered, 2),
        load_before=round(load_before, 2),
    )


def markdown(results: list[Result], args: argparse.Namespace) -> str:
    header = (
        "| uvicorn workers | concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | max ms "
        "| errors | 202s | in ledger | lost | server CPU ms/req | PostgreSQL CPU ms/req "
        "| Redis CPU ms/req | other CPU ms/req "
        f"| ≥{args.target_rps:g} req/s, p99 ≤{args.target_p99_ms:g} ms |"
    )
    rows = [
        f"| {r.workers} | {r.concurrency} | {r.requests} | {r.requests_per_s:.0f} "
        f"| {r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.p99_ms:.1f} | {r.max_ms:.1f} | {r.errors} "
        f"| {r.accepted} | {r.in_ledger} | {r.lost} "
        f"| {r.server_cpu_ms:.2f} | {r.postgres_cpu_ms:.2f} | {r.redis_cpu_ms:.2f} "
        f"| {r.other_cpu_ms:.2f} "
        f"| {'yes' if r.meets(args.target_rps, args.target_p99_ms) else 'no'} |"
        for r in results
    ]
    return "\n".join([header, "|" + "---|" * 17, *rows])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="distinct samples posted")
    parser.add_argument("--warmup", type=int, default=1_000, help="posts before measuring")
    parser.add_argument("--concurrency", type=int, default=32, help="open connections")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (keep it light)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="uvicorn workers")
    parser.add_argument("--admin-url", default=POSTGRES_ADMIN_URL, help="PostgreSQL to use")
    parser.add_argument("--max-seconds", type=int, default=300, help="cap on one wrk run")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="before each measured run, wait up to this long for the machine to be <10%% busy",
    )
    parser.add_argument(
        "--set",
        type=lambda pair: tuple(pair.split("=", 1)),
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a service setting for this run, e.g. --set db_pool_size=40 (LETHE_DB_POOL_SIZE)",
    )
    parser.add_argument(
        "--rate-limits",
        choices=["redis", "memory"],
        default="redis",
        help="where the service counts its rate limits (redis: shared, as deployed)",
    )
    parser.add_argument("--target-rps", type=float, default=1000.0)
    parser.add_argument("--target-p99-ms", type=float, default=50.0)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # A SIGTERM (timeout, CI) unwinds normally, so the server stops and the database is dropped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if shutil.which("wrk") is None:
        raise SystemExit("bench_forget needs wrk on PATH: apt-get install wrk (or make install)")
    results = [run_once(workers, args) for workers in args.workers]
    table = markdown(results, args)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    record = {
        "at": stamp,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": vars(args),
        "results": [asdict(r) for r in results],
    }
    (RESULTS / f"forget-{stamp}.json").write_text(json.dumps(record, indent=2))
    if any(r.lost for r in results):
        raise SystemExit("a 202 is missing from the ledger")


if __name__ == "__main__":
    main()
