"""Audit benchmark on digits (small CNN, CPU): the Amnesiac paper's Table 1 and Figure 7, and
the cost of an audit against one training run.

    .venv/bin/python bench/bench_audit.py --out docs/benchmarks

Table 1: membership recall on the erased targets before (0), right after removal (0') and
after 1-5 epochs of training on the modified data, for naive retraining, relabel unlearning
and amnesiac rollback, next to the calibrated and LiRA figures and an exact retrain.
Figure 7: test accuracy against the share of steps rolled back (random steps, several seeds).
Cost: a full audit with cached reference models against one training run (target <= 20%).
"""

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy.orm import Session

from app.ledger import migrate
from app.ledger.db import make_engine, open_session
from app.ledger.provenance import get_run, release_rollbacks, step_deltas
from app.ledger.samples import sample_ids
from app.ledger.tables import ModelVersion, Split
from worker.audit import AuditConfig, mia, run_audit
from worker.audit.posteriors import logits, scaled_logit
from worker.audit.references import ReferenceSet, reference_set
from worker.audit.report import json_safe
from worker.data import SampleSet, ingest, load_samples, load_split, open_source
from worker.store import ArtifactStore
from worker.training import TrainConfig, accuracy, load_model, model_spec, train_first_version
from worker.unlearning.amnesiac import amnesiac_rollback, subtract_steps
from worker.unlearning.relabel import RelabelConfig, relabel_unlearning
from worker.unlearning.retrain import exact_retrain, naive_retrain

CPU = torch.device("cpu")
DATASET = "digits"
SHARES = (0.01, 0.03, 0.05, 0.10, 0.20, 0.30, 0.50)


class World:
    """A fresh ledger and store with digits ingested."""

    def __init__(self, root: Path) -> None:
        url = f"sqlite:///{root / 'ledger.sqlite3'}"
        migrate.upgrade(url)
        self.engine = make_engine(url)
        self.store = ArtifactStore(str(root / "store"))
        self.session: Session = open_session(self.engine)
        ingest(self.session, self.store, open_source(DATASET))
        self.session.commit()

    def split(self, split: Split, exclude: Sequence[str] = ()) -> SampleSet:
        return load_split(self.session, self.store, DATASET, split, exclude)


class MembershipProbe:
    """Shadow, calibrated and LiRA figures of any version on a fixed F and H."""

    def __init__(self, world: World, parent: ModelVersion, forget_ids: list[str]) -> None:
        assert parent.run_id is not None
        config = TrainConfig.from_dict(get_run(world.session, parent.run_id).hyperparameters)
        self.world = world
        self.sets = {
            "forget": load_samples(world.store, DATASET, forget_ids),
            "heldout": world.split(Split.heldout),
            "test": world.split(Split.test),
            "retained": world.split(Split.train, forget_ids),
        }
        audit = AuditConfig()
        self.references: ReferenceSet = reference_set(
            world.store,
            DATASET,
            model_spec(parent),
            config,
            world.split(Split.pool),
            audit.reference_models,
            audit.reference_seed,
            CPU,
        )
        self.attacks = mia.shadow_attack_models(self.references, audit, CPU)
        self.reference_phi = mia.reference_statistics(
            self.references, {n: self.sets[n] for n in ("forget", "heldout")}, CPU
        )

    def figures(self, version: ModelVersion) -> dict[str, Any]:
        model = load_model(self.world.store, version, CPU)
        out = {name: logits(model, data, CPU) for name, data in self.sets.items()}
        shadow = mia.shadow_mia(
            self.attacks, out["forget"], self.sets["forget"], out["heldout"], self.sets["heldout"]
        ).figures
        calibrated = mia.calibrated_mia(out, self.sets, 0.01).figures
        phi = {n: scaled_logit(out[n], self.sets[n].labels) for n in ("forget", "heldout")}
        lira = mia.lira_offline(
            phi["forget"],
            self.reference_phi["forget"],
            phi["heldout"],
            self.reference_phi["heldout"],
            (0.001, 0.01),
        ).figures

        def correct(name: str) -> float:
            return float((out[name].argmax(1) == self.sets[name].labels).float().mean())

        return {
            "forget_accuracy": correct("forget"),
            "test_accuracy": correct("test"),
            "shadow_recall": shadow["recall_forget"],
            "shadow_recall_correct": shadow["recall_forget_correct"],
            "shadow_fpr_heldout": shadow["fpr_heldout"]["value"],
            "calibrated_tpr_1pct": calibrated["at_fpr"]["tpr"],
            "calibrated_auc": calibrated["auc"]["value"],
            "mia_efficacy": calibrated["mia_efficacy"]["value"],
            "lira_tpr_0.1pct": lira["at_fpr"]["0.001"]["tpr"],
            "lira_tpr_1pct": lira["at_fpr"]["0.01"]["tpr"],
            "lira_auc": lira["auc"]["value"],
        }


def epochs_after(
    world: World, start: ModelVersion, step: Callable[[ModelVersion], ModelVersion], epochs: int
) -> list[ModelVersion]:
    versions, current = [], start
    for _ in range(epochs):
        current = step(current)
        world.session.commit()
        versions.append(current)
    return versions


def table1(world: World, config: TrainConfig, forget_size: int, draws: int) -> dict[str, Any]:
    """One target; per draw a disjoint random F and every method's versions at 0, 0', 1..5,
    probed on that F and H, with an exact retrain beside them."""
    parent = train_first_version(world.session, world.store, DATASET, "small-cnn", config, CPU)
    world.session.commit()
    members = sample_ids(world.session, DATASET, Split.train)
    order = np.random.default_rng(0).permutation(len(members))
    epoch_steps = math.ceil((len(members) - forget_size) / config.batch_size)
    results = []
    for draw in range(draws):
        forget = [members[i] for i in sorted(order[draw * forget_size : (draw + 1) * forget_size])]
        results.append(table1_draw(world, parent, forget, epoch_steps))
    return {"config": config.to_dict(), "forget_size": forget_size, "draws": results}


def table1_draw(
    world: World, parent: ModelVersion, forget: list[str], epoch_steps: int
) -> dict[str, Any]:
    probe = MembershipProbe(world, parent, forget)
    s, st = world.session, world.store
    naive = lambda v: naive_retrain(s, st, v, forget, CPU, steps=epoch_steps)  # noqa: E731
    relabel_config = RelabelConfig(steps=epoch_steps)
    relabel = lambda v: relabel_unlearning(s, st, v, forget, CPU, relabel_config)  # noqa: E731
    rolled_back = amnesiac_rollback(s, st, parent, forget, CPU)
    s.commit()
    rows = {
        "naive": [parent, parent, *epochs_after(world, parent, naive, 5)],
        "relabel": [parent, parent, *epochs_after(world, parent, relabel, 5)],
        "amnesiac": [parent, rolled_back, *epochs_after(world, rolled_back, naive, 5)],
    }
    retrained = exact_retrain(s, st, parent, forget, CPU)
    # The draws are sibling candidates of one parent: give the rolled-back steps back, as a
    # rejected candidate does, so that the next draw may subtract the steps it shares.
    release_rollbacks(s, rolled_back.id)
    s.commit()
    return {
        "forget_ids": forget,
        "affected_share": rolled_back.details["affected_share"],
        "methods": {
            method: [probe.figures(v) for v in versions] for method, versions in rows.items()
        },
        "exact_retrain": probe.figures(retrained),
    }


def figure7(world: World, config: TrainConfig, seeds: int) -> dict[str, Any]:
    """Test accuracy after subtracting a random share of all recorded steps, per seed."""
    test = world.split(Split.test)
    curves = []
    for seed in range(seeds):
        version = train_first_version(
            world.session, world.store, DATASET, "small-cnn", replace(config, seed=seed), CPU
        )
        world.session.commit()
        assert version.run_id is not None
        run = get_run(world.session, version.run_id)
        baseline = accuracy(load_model(world.store, version, CPU), test, CPU)
        chooser = np.random.default_rng(seed)
        curve = []
        for share in SHARES:
            steps = chooser.choice(run.num_steps, round(share * run.num_steps), replace=False)
            model = load_model(world.store, version, CPU)
            rows = step_deltas(world.session, [(run.id, int(k)) for k in steps])
            subtract_steps(model, world.store, rows, CPU)
            curve.append(accuracy(model, test, CPU))
        curves.append({"seed": seed, "baseline": baseline, "accuracy": curve})
    return {"config": config.to_dict(), "shares": list(SHARES), "runs": curves}


def cost(world: World, config: TrainConfig, forget_size: int, audit: AuditConfig) -> dict[str, Any]:
    """One training run; a first audit (builds the caches) of a rollback of F1; then, as a
    rejected candidate gives its steps back, a second audit of a fresh candidate (a rollback of
    a disjoint F2): the cached case, where only the new candidate's own work is done. Each is
    timed as wall and CPU (process) seconds."""
    started, cpu = time.perf_counter(), time.process_time()
    parent = train_first_version(world.session, world.store, DATASET, "small-cnn", config, CPU)
    world.session.commit()
    training = {"wall": time.perf_counter() - started, "cpu": time.process_time() - cpu}
    members = sample_ids(world.session, DATASET, Split.train)
    audits = []
    for draw in range(2):
        forget = members[draw * forget_size : (draw + 1) * forget_size]
        candidate = amnesiac_rollback(world.session, world.store, parent, forget, CPU)
        world.session.commit()
        started, cpu = time.perf_counter(), time.process_time()
        result = run_audit(world.session, world.store, candidate, parent, forget, CPU, config=audit)
        world.session.commit()
        audits.append(
            {
                "wall": time.perf_counter() - started,
                "cpu": time.process_time() - cpu,
                "stages": result.metrics["timings"]["stages"],
                "built": result.metrics["timings"]["built_in_this_audit"],
                "one_off": result.metrics["timings"]["cache_one_off_seconds"],
                "decision": result.decision,
                "artifacts": result.artifacts,
            }
        )
        release_rollbacks(world.session, candidate.id)
        world.session.commit()
    return {
        "config": config.to_dict(),
        "audit_config": audit.model_dump(),
        "training": training,
        "first_audit": audits[0],
        "cached_audit": audits[1],
        "ratio_cpu": audits[1]["cpu"] / training["cpu"],
        "ratio_wall": audits[1]["wall"] / training["wall"],
        "report": result.metrics,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument("--parts", nargs="+", default=["cost", "figure7", "table1"])
    parser.add_argument("--draws", type=int, default=3, help="Table 1: independent forget sets")
    parser.add_argument("--forget-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=5, help="Figure 7: training seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--lean", action="store_true", help="cost: the audit with its inversions cut to a token"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "audit_results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    # Table 1 follows the paper's MIA notebook (batch 8): each sample then touches ~1% of steps.
    table1_config = TrainConfig(batch_size=8)
    for part in args.parts:
        with tempfile.TemporaryDirectory() as folder:
            world = World(Path(folder))
            if part == "cost":
                audit = AuditConfig()
                if args.lean:
                    audit = AuditConfig(inversion_iterations=4, class_inversion_iterations=4)
                key = "cost_lean" if args.lean else "cost"
                results[key] = cost(world, TrainConfig(), 4, audit)
            elif part == "figure7":
                results["figure7"] = figure7(world, TrainConfig(), args.seeds)
            elif part == "table1":
                results["table1"] = table1(world, table1_config, args.forget_size, args.draws)
            if part == "cost" and not args.lean:
                copy_artifacts(world.store, results["cost"]["cached_audit"]["artifacts"], args.out)
            world.session.close()
            world.engine.dispose()
        results_path.write_text(json.dumps(json_safe(results), indent=1))
        print(f"{part} done", flush=True)


def copy_artifacts(store: ArtifactStore, artifacts: dict[str, str], out: Path) -> None:
    images = out / "img"
    images.mkdir(exist_ok=True)
    for name, key in artifacts.items():
        if name.startswith("roc") or name in {"unlearning_inversion.png", "inversion_class_0.png"}:
            (images / f"audit_{name}").write_bytes(store.get_bytes(key))


if __name__ == "__main__":
    main()
