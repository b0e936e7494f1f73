"""Amnesiac rollback of 1, 10 and 100 samples against exact retraining, and against the time
to merely read the same delta bytes from the store (the physical limit).

    .venv/bin/python bench/bench_rollback.py [--epochs 10] [--sizes 1 10 100]

One model is trained with provenance on digits. For each forget-set size, in the same run:
the seconds to read the affected deltas' bytes with the rollback's parallelism (no parsing,
no verification: the physical limit), the seconds of a whole rollback (plan, claim, read,
subtract, store the candidate), the same with a repair fine-tune, and the seconds of exact
retraining without the forget set, with each candidate's test accuracy drop.
Each rollback's claim is released afterwards, so that every size starts from the same parent.
Results go to bench/results/rollback.json.
"""

import argparse
import json
import random
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from bench_training import RESULTS, clock, digits_lab

from app.ledger.provenance import release_rollbacks, step_deltas
from app.ledger.tables import Split
from worker.data import load_split
from worker.devices import resolve_device
from worker.training import TrainConfig, accuracy, load_model, train_first_version
from worker.unlearning import amnesiac_rollback, exact_retrain, plan_rollback

READERS = 4  # as many threads as the rollback's own reader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--repair-steps", type=int, default=60, help="about one epoch")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    rows = []
    with tempfile.TemporaryDirectory() as folder:
        session, store, train = digits_lab(Path(folder))
        config = TrainConfig(epochs=args.epochs)
        parent = train_first_version(session, store, "digits", "small-cnn", config, device)
        session.commit()
        test = load_split(session, store, "digits", Split.test)
        parent_accuracy = accuracy(load_model(store, parent, device), test, device)
        for size in args.sizes:
            forget = random.Random(size).sample(train.sample_ids, size)
            plan = plan_rollback(session, parent, forget)
            deltas = step_deltas(session, plan.steps)

            with ThreadPoolExecutor(READERS) as pool:
                start = clock(device)
                read_bytes = sum(map(len, pool.map(store.get_bytes, [d.store_key for d in deltas])))
                read = clock(device) - start

            start = clock(device)
            candidate = amnesiac_rollback(session, store, parent, forget, device)
            session.commit()
            rollback = clock(device) - start
            rolled_back_accuracy = accuracy(load_model(store, candidate, device), test, device)
            release_rollbacks(session, candidate.id)
            session.commit()

            start = clock(device)
            repaired = amnesiac_rollback(
                session, store, parent, forget, device, repair_steps=args.repair_steps
            )
            session.commit()
            repair = clock(device) - start
            repaired_accuracy = accuracy(load_model(store, repaired, device), test, device)
            release_rollbacks(session, repaired.id)
            session.commit()

            start = clock(device)
            exact_retrain(session, store, parent, forget, device)
            session.commit()
            retrain = clock(device) - start
            rows.append(
                {
                    "samples": size,
                    "steps": len(plan.steps),
                    "share_of_steps": plan.share,
                    "delta_bytes": read_bytes,
                    "read_seconds": read,
                    "rollback_seconds": rollback,
                    "retrain_seconds": retrain,
                    "rollback_over_retrain": rollback / retrain,
                    "rollback_over_read": rollback / read,
                    "test_accuracy_drop_points": 100 * (parent_accuracy - rolled_back_accuracy),
                    "rollback_and_repair_seconds": repair,
                    "repaired_drop_points": 100 * (parent_accuracy - repaired_accuracy),
                }
            )
            print(json.dumps(rows[-1]))
        session.close()

    result = {
        "device": str(device),
        "threads": args.threads,
        "epochs": args.epochs,
        "parent_test_accuracy": parent_accuracy,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rollback.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
