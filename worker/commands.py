"""``lethe train`` and ``lethe forget``: training with provenance and unlearning, run in the
calling process. Torch is imported inside the handlers only."""

import argparse
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from app.ledger.db import get_engine, session_scope
from app.ledger.errors import NotFound
from app.ledger.samples import missing_samples
from app.ledger.tables import UNLEARNING_METHODS, Method, ModelVersion, Split
from app.ledger.versions import alias_target, get_version
from app.settings import get_settings
from worker.progress import PhaseBars, Progress, within

if TYPE_CHECKING:
    import torch

    from worker.store import ArtifactStore


def add_worker_commands(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    train = commands.add_parser(
        "train",
        help="ingest a data set and train a version with provenance, in this process",
        description="Ingests the data set into the ledger and trains a model on its train "
        "split, recording every step (its batch and its parameter change) so that samples can "
        "be rolled back later. The version serves when nothing serves yet. Prints the version "
        "as JSON. Unlike POST /train, it does not build the audit's reference models.",
    )
    train.add_argument(
        "--dataset",
        default="digits",
        help="digits (bundled), digits-noisy (the digits with a fifth of the labels wrong: models "
        "memorise), mnist, fashion-mnist, cifar10, cifar100 or imagefolder",
    )
    train.add_argument("--data-root", type=Path, help="folder of a torchvision data set")
    train.add_argument("--manifest", type=Path, help="imagefolder CSV: sample_id,path,label")
    train.add_argument("--arch", default="small-cnn", help="small-cnn or resnet18")
    # Unset training options keep worker.training.TrainConfig's defaults.
    train.add_argument("--epochs", type=int, help="passes over the train split (default 10)")
    train.add_argument("--batch-size", type=int, help="samples per step (default 16)")
    train.add_argument("--optimizer", choices=("adam", "sgd"), help="the optimiser (default adam)")
    train.add_argument("--lr", type=float, help="learning rate (default 0.001)")
    train.add_argument("--momentum", type=float, help="SGD's momentum (default 0.9)")
    train.add_argument("--weight-decay", type=float, help="L2 penalty (default 0.0)")
    train.add_argument("--seed", type=int, help="seed of the weights and data order (default 0)")
    train.add_argument(
        "--delta-dtype",
        choices=("fp32", "bf16"),
        help="precision of the recorded per-step updates (default fp32); bf16 halves them",
    )
    train.add_argument("--split-seed", type=int, default=0, help="seed of the split assignment")
    train.add_argument("--device", help="cuda, cpu, cuda:1...; default: cuda when present")
    train.set_defaults(handler=_train)

    forget = commands.add_parser(
        "forget",
        help="unlearn samples now, in this process; records a candidate version",
        description="Runs one unlearning method on the samples against a version and records "
        "the result as a candidate, without auditing, promoting or purging it (the HTTP API "
        "and the scheduler do that). Prints the candidate and its test accuracy as JSON.",
    )
    forget.add_argument(
        "sample_ids", nargs="+", metavar="SAMPLE_ID", help="training samples to forget"
    )
    forget.add_argument(
        "--method",
        choices=(*UNLEARNING_METHODS, "retrain"),
        default="amnesiac",
        help="unlearning method (default amnesiac); retrain is short for retrain-exact",
    )
    forget.add_argument("--version", help="parent version; default: the serving one")
    forget.add_argument("--repair-steps", type=int, help="amnesiac+repair: fine-tune steps")
    forget.add_argument("--copies", type=int, help="relabel: copies per sample")
    forget.add_argument("--relabel-steps", type=int, help="relabel: training steps")
    forget.add_argument("--naive-steps", type=int, help="retrain-naive: default one run's epochs")
    forget.add_argument("--device", help="cuda, cpu, cuda:1...; default: cuda when present")
    forget.set_defaults(handler=_forget)


TRAIN_OPTIONS = {
    name: name
    for name in (
        "epochs",
        "batch_size",
        "optimizer",
        "lr",
        "momentum",
        "weight_decay",
        "seed",
        "delta_dtype",
    )
}


def _given(args: argparse.Namespace, options: dict[str, str]) -> dict[str, Any]:
    """The options set on the command line, renamed to the config's fields."""
    return {
        field: getattr(args, option)
        for option, field in options.items()
        if getattr(args, option) is not None
    }


@contextmanager
def _phase_bars(label: str) -> Iterator[Progress]:
    """A bar per phase of the work, on stderr: stdout is for the JSON result."""
    bars = PhaseBars(sys.stderr, indent="")
    try:
        yield within(bars, 0, 100, label) or bars
    finally:
        bars.close()


def _train(args: argparse.Namespace) -> None:
    from worker.data import ingest, open_source
    from worker.devices import resolve_device
    from worker.store import ArtifactStore
    from worker.training import TrainConfig, train_first_version

    settings = get_settings()
    store = ArtifactStore(settings.resolved_store_url)
    config = TrainConfig.from_dict(_given(args, TRAIN_OPTIONS))
    raw = open_source(args.dataset, args.data_root, args.manifest)
    with session_scope(get_engine()) as session:
        ingest(session, store, raw, seed=args.split_seed)
    with session_scope(get_engine()) as session, _phase_bars("training") as progress:
        version = train_first_version(
            session, store, raw.name, args.arch, config, resolve_device(args.device), progress
        )
        serving = alias_target(session)
        summary = {
            "version": version.version,
            "run": version.run_id,
            "serving": serving is not None and serving.id == version.id,
            "test_accuracy": version.details["test_accuracy"],
        }
    print(json.dumps(summary))


def _forget(args: argparse.Namespace) -> None:
    from worker.data import load_split
    from worker.devices import resolve_device
    from worker.store import ArtifactStore
    from worker.training import accuracy, load_model

    store = ArtifactStore(get_settings().resolved_store_url)
    device = resolve_device(args.device)
    with session_scope(get_engine()) as session, _phase_bars(args.method) as progress:
        unknown = missing_samples(session, args.sample_ids)
        if unknown:
            raise NotFound(f"unknown samples: {', '.join(unknown)}")
        parent = get_version(session, args.version) if args.version else alias_target(session)
        if parent is None:
            raise NotFound("nothing serves yet: run `lethe train` first")
        candidate = _run_method(session, store, parent, args, device, progress)
        summary = {
            "version": candidate.version,
            "parent": parent.version,
            "method": candidate.method,
            "state": candidate.state.value,
            "test_accuracy": accuracy(
                load_model(store, candidate, device),
                load_split(session, store, candidate.details["dataset"], Split.test),
                device,
            ),
        }
    print(json.dumps(summary))


def _run_method(
    session: Session,
    store: "ArtifactStore",
    parent: ModelVersion,
    args: argparse.Namespace,
    device: "torch.device",
    progress: Progress,
) -> ModelVersion:
    from worker.unlearning import MethodOptions, NothingToUnlearn, RelabelConfig, unlearn

    relabel = RelabelConfig(**_given(args, {"copies": "copies", "relabel_steps": "steps"}))
    given = _given(args, {"repair_steps": "repair_steps", "naive_steps": "naive_steps"})
    options = MethodOptions(relabel=relabel, **given)
    method = Method.retrain_exact if args.method == "retrain" else Method(args.method)
    try:
        return unlearn(session, store, parent, args.sample_ids, method, device, options, progress)
    except NothingToUnlearn as error:
        sys.exit(f"lethe forget: {method} made no candidate: {error}")
