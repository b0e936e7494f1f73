"""Training with provenance on digits: every step's batch and delta are recorded, and the
deltas add up exactly to what training changed."""

import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.ledger import provenance
from app.ledger.provenance import get_run, samples_in_step, step_deltas
from app.ledger.tables import Split, StepDelta, StepMembership, VersionState
from app.ledger.versions import alias_target
from tests.unit.worker_support import digits_store
from worker.data import load_split
from worker.nets import ARCHITECTURES, ModelSpec, build_model, tracked_entries
from worker.progress import Step
from worker.store import ArtifactStore, IntegrityError, sha256_hex
from worker.training import (
    TrainConfig,
    accuracy,
    epoch_batches,
    load_model,
    train,
    train_first_version,
    train_recorded,
)
from worker.unlearning import subtract_steps

CPU = torch.device("cpu")
SPEC = ModelSpec("small-cnn", 1, 10)
SHORT = TrainConfig(epochs=2, batch_size=64)


@pytest.fixture
def store(session: Session, tmp_path: Path) -> ArtifactStore:
    return digits_store(session, tmp_path)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in tracked_entries(model).items()}


def test_rolling_back_every_step_gives_the_initial_weights(
    session: Session, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(provenance, "IN_CHUNK", 7)  # the ledger reads the rows in chunks
    data = load_split(session, store, "digits", Split.train)
    model = build_model(SPEC, seed=1)
    initial = snapshot(model)
    run = train_recorded(
        session, store, model, data, SHORT, CPU, kind="train", dataset="digits", spec=SPEC
    )
    trained = snapshot(model)

    subtract_steps(
        model, store, step_deltas(session, [(run.run_id, s) for s in range(run.steps)]), CPU
    )

    for name, tensor in tracked_entries(model).items():
        assert not torch.equal(trained[name], initial[name]) or "running" in name
        torch.testing.assert_close(tensor, initial[name], rtol=0, atol=2e-5)


def test_every_step_records_its_batch_and_its_delta(session: Session, store: ArtifactStore) -> None:
    data = load_split(session, store, "digits", Split.train)
    run = train_recorded(
        session,
        store,
        build_model(SPEC, seed=0),
        data,
        SHORT,
        CPU,
        kind="train",
        dataset="digits",
        spec=SPEC,
    )
    per_epoch = len(epoch_batches(torch.arange(len(data)), SHORT.batch_size))
    assert run.steps == get_run(session, run.run_id).num_steps == 2 * per_epoch
    seen = Counter(session.scalars(select(StepMembership.sample_id)))
    assert seen == dict.fromkeys(data.sample_ids, 2)  # each sample once per epoch
    assert len(samples_in_step(session, run.run_id, 0)) == SHORT.batch_size
    rows = list(session.scalars(select(StepDelta).order_by(StepDelta.step)))
    assert [row.step for row in rows] == list(range(run.steps))
    assert rows[0].entries == sorted(tracked_entries(build_model(SPEC)))
    assert sha256_hex(store.get_bytes(rows[5].store_key)) == rows[5].sha256
    assert run.delta_bytes == sum(row.num_bytes for row in rows)


def test_recording_does_not_change_training(session: Session, store: ArtifactStore) -> None:
    data = load_split(session, store, "digits", Split.train)
    plain, recorded = build_model(SPEC, seed=0), build_model(SPEC, seed=0)
    reports: list[tuple[int, Step | None]] = []

    train(
        plain, data, SHORT, CPU, progress=lambda percent, step=None: reports.append((percent, step))
    )
    train_recorded(
        session, store, recorded, data, SHORT, CPU, kind="train", dataset="digits", spec=SPEC
    )

    percents = [percent for percent, _ in reports]
    assert percents == sorted(set(percents)) and percents[-1] == 100
    steps = SHORT.total_steps(len(data))  # the count comes with the percentage
    assert reports[-1][1] == Step(done=steps, total=steps, unit="steps")
    for name, tensor in recorded.state_dict().items():
        torch.testing.assert_close(tensor, plain.state_dict()[name], rtol=0, atol=0)


def test_bf16_deltas_take_half_the_bytes(session: Session, store: ArtifactStore) -> None:
    data = load_split(session, store, "digits", Split.train)
    config = TrainConfig(epochs=1, batch_size=128)
    sizes = {}
    for dtype in ("fp32", "bf16"):
        run = train_recorded(
            session,
            store,
            build_model(SPEC, seed=0),
            data,
            TrainConfig(**{**config.to_dict(), "delta_dtype": dtype}),
            CPU,
            kind="train",
            dataset="digits",
            spec=SPEC,
        )
        sizes[dtype] = run.delta_bytes
    assert sizes["bf16"] < 0.51 * sizes["fp32"]


def test_first_version_serves_and_a_second_stays_candidate(
    session: Session, store: ArtifactStore
) -> None:
    config = TrainConfig(epochs=2, batch_size=32)
    first = train_first_version(session, store, "digits", "small-cnn", config, CPU)
    second = train_first_version(session, store, "digits", "small-cnn", config, CPU)

    assert alias_target(session) == first and first.state is VersionState.serving
    assert second.state is VersionState.candidate
    assert first.weights_sha256 == sha256_hex(
        store.get_bytes(f"versions/{first.version}.safetensors")
    )
    reloaded = load_model(store, first, CPU)
    assert first.details["test_accuracy"] > 0.5
    assert reloaded.state_dict().keys() == build_model(SPEC).state_dict().keys()


def test_a_failed_write_stops_the_run(
    session: Session, store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = load_split(session, store, "digits", Split.train)

    def full_disk(key: str, parts: object) -> None:
        raise OSError(f"no space left for {key}")

    monkeypatch.setattr(store, "put_parts", full_disk)
    with pytest.raises(OSError, match="no space"):
        train_recorded(
            session,
            store,
            build_model(SPEC),
            data,
            SHORT,
            CPU,
            kind="train",
            dataset="digits",
            spec=SPEC,
        )
    assert not [t for t in threading.enumerate() if t.name.startswith("lethe-deltas")]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_architectures_take_their_shape_from_the_data(architecture: str) -> None:
    model = build_model(ModelSpec(architecture, 3, 7))
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 7)


def test_unknown_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="small-cnn"):
        build_model(ModelSpec("vgg", 1, 10))


def test_cli_trains_then_forgets(tmp_path: Path) -> None:
    env = {**os.environ, "LETHE_HOME": str(tmp_path), "LETHE_DATABASE_URL": ""}
    lethe = [sys.executable, "-m", "worker.cli"]

    def run(*args: str) -> str:
        done = subprocess.run([*lethe, *args], env=env, capture_output=True, text=True, check=True)
        return done.stdout

    run("db", "upgrade")
    assert '"version": "v1"' in run("train", "--epochs", "1", "--device", "cpu")
    assert '"method": "amnesiac"' in run("forget", "digits-0003", "--device", "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_round_trips_tensors_and_verifies_them(tmp_path: Path, dtype: torch.dtype) -> None:
    store = ArtifactStore(f"file://{tmp_path}")
    tensors = {"w": torch.randn(3, 4).to(dtype), "b": torch.randn(4).to(dtype)}
    mixed = {**tensors, "count": torch.tensor(7)}
    for key, value in {"same.safetensors": tensors, "mixed.safetensors": mixed}.items():
        stored = store.put_tensors(key, value)
        loaded = store.get_tensors(key, CPU, expected_sha256=stored.sha256)
        assert loaded.keys() == value.keys()
        assert all(torch.equal(loaded[name], value[name]) for name in value)
    assert store.list("") == ["mixed.safetensors", "same.safetensors"]
    with pytest.raises(IntegrityError):
        store.get_tensors("same.safetensors", CPU, expected_sha256="0" * 64)


@pytest.mark.parametrize(("samples", "batch_size", "sizes"), [(898, 64, [64] * 13 + [66]),
                                                            (90, 64, [90]), (96, 64, [64, 32]),
                                                            (10, 64, [10])])  # fmt: skip
def test_an_epoch_never_steps_on_a_remainder_of_less_than_half_a_batch(
    samples: int, batch_size: int, sizes: list[int]
) -> None:
    batches = epoch_batches(torch.randperm(samples), batch_size)
    assert [len(b) for b in batches] == sizes
    assert sorted(torch.cat(batches).tolist()) == list(range(samples))  # each sample once
    assert TrainConfig(epochs=3, batch_size=batch_size).total_steps(samples) == 3 * len(sizes)


def test_the_default_run_is_stable_across_seeds(session: Session, store: ArtifactStore) -> None:
    """Seeds 3, 6 and 10 of the API's default run (SGD, lr 0.05, batch 64, 10 epochs) ended at
    87% test accuracy when the epoch's 2-sample remainder was a step of its own (BatchNorm's
    running statistics from 2 samples); with it joined to the last batch they reach 98-99%. The
    bound, 95%, sits between the two."""
    train_split = load_split(session, store, "digits", Split.train)
    test_split = load_split(session, store, "digits", Split.test)
    for seed in (3, 6, 10):
        model = build_model(ModelSpec("small-cnn", 1, 10), seed=seed)
        config = TrainConfig(epochs=10, batch_size=64, optimizer="sgd", lr=0.05, seed=seed)
        train(model, train_split, config, CPU)
        assert accuracy(model, test_split, CPU) > 0.95, seed
