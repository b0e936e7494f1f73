"""Why relabel unlearning passes or fails the promotion gate on digits: for forget sets of
``--samples`` training samples, relabel with each (steps, learning-rate scale) setting, audit
the candidate against its parent, and print every gate rule's figure.

    .venv/bin/python bench/bench_relabel.py [--epochs 6 --batch-size 16 --optimizer adam
        --lr 0.001] [--samples 10] [--offsets 0 100 200] [--settings 60:1 60:0.1 120:0.1]

One model is trained with provenance and its audit models are built once; every candidate
starts from that model. Results go to bench/results/relabel.json.
"""

import argparse
import json
import tempfile
from pathlib import Path

import torch
from bench_training import RESULTS, digits_lab

from app.ledger.samples import sample_ids
from app.ledger.tables import Split
from worker.audit import prepare_audits, run_audit
from worker.devices import resolve_device
from worker.training import TrainConfig, train_first_version
from worker.unlearning import RelabelConfig, relabel_unlearning

RULES = ("test_accuracy_drop", "auc_forget_vs_heldout", "calibrated_tpr", "lira_tpr")


def setting(text: str) -> RelabelConfig:
    steps, lr_scale = text.split(":")
    return RelabelConfig(steps=int(steps), lr_scale=float(lr_scale))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--optimizer", default="adam")
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 100, 200])
    parser.add_argument("--settings", type=setting, nargs="+", default=[RelabelConfig()])
    args = parser.parse_args()
    device = resolve_device()
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="lethe-relabel-") as folder:
        session, store, _train = digits_lab(Path(folder))
        config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr
        )
        parent = train_first_version(session, store, "digits", "small-cnn", config, device)
        prepare_audits(session, store, parent, device)
        session.commit()
        train_ids = sample_ids(session, "digits", Split.train)
        print("| steps | lr scale | offset | passed | failed rules | " + " | ".join(RULES) + " |")
        print("|---" * (5 + len(RULES)) + "|")
        for relabel in args.settings:
            for offset in args.offsets:
                forget = train_ids[offset : offset + args.samples]
                candidate = relabel_unlearning(session, store, parent, forget, device, relabel)
                audit = run_audit(session, store, candidate, parent, forget, device)
                figures = {r["rule"]: r["value"] for r in audit.reasons}
                failed = [r["rule"] for r in audit.reasons if not r["passed"]]
                session.rollback()  # every candidate starts from the same parent
                rows.append(
                    {
                        **vars(relabel),
                        "offset": offset,
                        "passed": audit.passed,
                        "failed": failed,
                        "figures": figures,
                    }
                )
                values = " | ".join(f"{figures[rule]:.3f}" for rule in RULES)
                print(
                    f"| {relabel.steps} | {relabel.lr_scale:g} | {offset} | {audit.passed} "
                    f"| {', '.join(failed) or '-'} | {values} |",
                    flush=True,
                )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "relabel.json").write_text(json.dumps({"args": str(vars(args)), "rows": rows}))


if __name__ == "__main__":
    main()
