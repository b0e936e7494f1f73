"""How much test accuracy exact retraining loses when deletions remove much of the data, against
the planner's prediction (worker/unlearning/planner.py ``exact_retrain_drop``) that the screen
holds jobs on.

    .venv/bin/python bench/bench_screening.py [--epochs 10 --batch-size 64 --optimizer sgd
        --lr 0.05] [--exponents 0.5 1 1.5 2] [--seeds 0 1]

Trains the digits model once with provenance (the POST /train defaults), then retrains it
exactly without each forget set (the ladder's last rung, same seed and hyper-parameters):
random shares of the training set, growing shares of one class, and the 890-of-898 burst.
For each it prints the measured drop in test accuracy points and the prediction for each
exponent k. Results go to bench/results/screening.json.
"""

import argparse
import json
import random
import tempfile
from pathlib import Path

import torch
from bench_training import RESULTS, digits_lab

from app.ledger.audits import measured_test_accuracy
from app.ledger.impact import class_counts
from app.ledger.samples import samples_by_id
from app.ledger.tables import Split
from worker.data import load_split
from worker.devices import resolve_device
from worker.training import TrainConfig, accuracy, load_model, train_first_version
from worker.unlearning.planner import PlannerPolicy, exact_retrain_drop
from worker.unlearning.retrain import exact_retrain

UNIFORM_SHARES = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
CLASS_SHARES = (0.25, 0.5, 0.75, 0.9, 1.0)
BURST = 890  # of digits' 898 training samples


def forget_sets(train_ids: list[str], labels: dict[str, int], seed: int) -> dict[str, list[str]]:
    chooser = random.Random(seed)
    shuffled = chooser.sample(train_ids, len(train_ids))
    sets = {
        f"random {share:.0%}": shuffled[: round(share * len(train_ids))] for share in UNIFORM_SHARES
    }
    sets[f"random {BURST} of {len(train_ids)}"] = shuffled[:BURST]
    one_class = [sid for sid in shuffled if labels[sid] == seed % 10]
    for share in CLASS_SHARES:
        sets[f"class {seed % 10}: {share:.0%}"] = one_class[: round(share * len(one_class))]
    return sets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--optimizer", default="sgd")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--exponents", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    device = resolve_device()
    torch.set_num_threads(1)
    rows = []
    print("| seed | forget set | samples | measured drop | " + " | ".join(
        f"predicted, k={k:g}" for k in args.exponents) + " |")  # fmt: skip
    print("|---" * (4 + len(args.exponents)) + "|")
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="lethe-screening-") as folder:
            session, store, train = digits_lab(Path(folder))
            config = TrainConfig(
                epochs=args.epochs,
                batch_size=args.batch_size,
                optimizer=args.optimizer,
                lr=args.lr,
                seed=seed,
            )
            parent = train_first_version(session, store, "digits", "small-cnn", config, device)
            session.commit()
            parent_accuracy = measured_test_accuracy(session, parent)
            assert parent_accuracy is not None  # training measures it
            test = load_split(session, store, "digits", Split.test)
            labels = {
                s.sample_id: s.label for s in samples_by_id(session, train.sample_ids).values()
            }
            for name, forget in forget_sets(list(train.sample_ids), labels, seed).items():
                candidate = exact_retrain(session, store, parent, forget, device)
                measured = 100 * (
                    parent_accuracy - accuracy(load_model(store, candidate, device), test, device)
                )
                classes = class_counts(session, "digits", forget)
                predicted = {
                    k: exact_retrain_drop(
                        classes, parent_accuracy, PlannerPolicy(retrain_error_exponent=k)
                    )
                    for k in args.exponents
                }
                session.rollback()  # every retrain starts from the same parent
                rows.append(
                    {
                        "seed": seed,
                        "forget_set": name,
                        "samples": len(forget),
                        "parent_test_accuracy": parent_accuracy,
                        "measured_drop_points": measured,
                        "predicted_drop_points": {f"{k:g}": v for k, v in predicted.items()},
                    }
                )
                shown = " | ".join(f"{predicted[k]:.1f}" for k in args.exponents)
                print(f"| {seed} | {name} | {len(forget)} | {measured:.1f} | {shown} |", flush=True)
            session.close()
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "screening.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
