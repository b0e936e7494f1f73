"""What recording one step's delta costs, part by part, for a model of a given size (default:
ResNet18's 11.2 M floating-point entries, 44.7 MB in fp32): the subtraction, the sha256 and the
write of the bytes to a file in the working folder (the local store's disk).

    .venv/bin/python bench/bench_delta_parts.py [--entries 11200000] [--repeats 5]

Prints milliseconds per repeat. Explains the ResNet18 row of bench_training.py: recording keeps
up with training only if these parts, on the spare core, take less than one training step.
"""

import argparse
import hashlib
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def timed(work: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(round((time.perf_counter() - started) * 1000, 1))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=11_200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    before, after = torch.randn(args.entries), torch.randn(args.entries)
    data = after.numpy().tobytes()
    with tempfile.TemporaryDirectory(dir=".") as folder:
        files = iter(range(args.repeats))

        def write() -> None:
            (Path(folder) / str(next(files))).write_bytes(data)

        parts = {
            "subtract": lambda: after - before,
            "sha256": lambda: hashlib.sha256(data).digest(),
            "write": write,
        }
        print(f"{len(data) / 1e6:.1f} MB per delta")
        for name, work in parts.items():
            print(f"{name}: {timed(work, args.repeats)} ms")


if __name__ == "__main__":
    main()
