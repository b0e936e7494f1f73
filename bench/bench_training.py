"""Training time with provenance recording against plain training, and delta bytes per step.

    .venv/bin/python bench/bench_training.py [--arch small-cnn] [--epochs 10] [--repeats 3]

Each repeat trains the same seeded model three ways, interleaved so that a noisy neighbour
slows all three alike: plain ``train``, recorded with fp32 deltas, recorded with bf16 deltas.
Wall-clock and process CPU seconds (all threads, the delta writer's included) are kept; the
figures are the minimum over the repeats, the run least disturbed by other processes on a
shared machine. Results are printed and written to bench/results/training-<arch>.json.
"""

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from sqlalchemy.orm import Session

from app.ledger import migrate
from app.ledger.db import make_engine, open_session
from app.ledger.tables import Split
from worker.data import SampleSet, ingest, load_split, open_source
from worker.devices import resolve_device
from worker.nets import ModelSpec, build_model
from worker.store import ArtifactStore
from worker.training import TrainConfig, train, train_recorded

RESULTS = Path(__file__).parent / "results"


def digits_lab(folder: Path) -> tuple[Session, ArtifactStore, SampleSet]:
    """A fresh ledger and store under ``folder`` with the digits ingested; the train split."""
    url = f"sqlite:///{folder / 'ledger.sqlite3'}"
    migrate.upgrade(url)
    session = open_session(make_engine(url))
    store = ArtifactStore(str(folder / "store"))
    ingest(session, store, open_source("digits"))
    session.commit()
    return session, store, load_split(session, store, "digits", Split.train)


def clock(device: torch.device) -> float:
    """perf_counter once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def clocks(device: torch.device) -> tuple[float, float]:
    """(wall, process CPU) seconds, once the device has finished its queued work."""
    return clock(device), time.process_time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="small-cnn")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, help="cap the steps (for resnet18 on a CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = TrainConfig(epochs=args.epochs, max_steps=args.max_steps)
    spec = ModelSpec(args.arch, 1, 10)

    with tempfile.TemporaryDirectory() as folder:
        session, store, data = digits_lab(Path(folder))
        wall: dict[str, list[float]] = {"plain": [], "fp32": [], "bf16": []}
        cpu: dict[str, list[float]] = {"plain": [], "fp32": [], "bf16": []}
        delta_bytes: dict[str, int] = {}
        steps = config.total_steps(len(data))
        for _ in range(args.repeats):
            start = clocks(device)
            train(build_model(spec, seed=0), data, config, device)
            end = clocks(device)
            wall["plain"].append(end[0] - start[0])
            cpu["plain"].append(end[1] - start[1])
            for dtype in ("fp32", "bf16"):
                start = clocks(device)
                run = train_recorded(
                    session,
                    store,
                    build_model(spec, seed=0),
                    data,
                    replace(config, delta_dtype=dtype),
                    device,
                    kind="bench",
                    dataset="digits",
                    spec=spec,
                )
                session.commit()
                end = clocks(device)
                wall[dtype].append(end[0] - start[0])
                cpu[dtype].append(end[1] - start[1])
                delta_bytes[dtype] = run.delta_bytes // run.steps
        session.close()

    best_wall = {name: min(values) for name, values in wall.items()}
    best_cpu = {name: min(values) for name, values in cpu.items()}
    result = {
        "arch": args.arch,
        "device": str(device),
        "threads": args.threads,
        "steps": steps,
        "wall_seconds_min": best_wall,
        "cpu_seconds_min": best_cpu,
        "wall_seconds_all": wall,
        "overhead_wall": {d: best_wall[d] / best_wall["plain"] for d in ("fp32", "bf16")},
        "overhead_cpu": {d: best_cpu[d] / best_cpu["plain"] for d in ("fp32", "bf16")},
        "delta_bytes_per_step": delta_bytes,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"training-{args.arch}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
