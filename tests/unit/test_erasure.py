"""The erasure closure on the real PostgreSQL and the artifact store.

Invariant 4 tried as an outside auditor would: after a deletion served by each method, nothing
left in the store, with the ledger and the seeds, rebuilds the version that held the sample.

The rebuild tries every route: the initial weights of each recorded run (``build_model`` with
the run's seed) plus every delta of that run still in the store, in order; every weights object
left; each of those minus the deltas of its run still left (back to the version it started
from); an amnesiac version plus its rolled-back deltas still left (back to its parent). v1 is
held as rebuilt when one of them lies within half of ||Σ δ(s)|| of v1's weights, δ(s) being the
recorded updates of the steps whose batch held the sample: that is the distance from v1 to its
amnesiac rollback, the version closest to v1 that is cleared of the sample by design.

On main before the erasure closure, relabel and exact retraining purged no delta at all: the
first route rebuilt v1 exactly (distance 0; 98.14% test accuracy in the issue), and so did the
relabel version minus its run (checked once by running this test with the closure's delta rule
cut back to main's: relabel and exact retraining failed at a distance of 1e-6, the amnesiac
rungs passed). The amnesiac rungs subtract (and main purged) the sample's steps.

Then: samples no model trained on, a corrupt delta, a rollback whose deltas were purged, and
verify-erasure catching what is left and a forged certificate.
"""

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from app.certificates import certificate_key, verify_signature
from app.ledger import migrate
from app.ledger.db import make_engine, open_session, session_scope
from app.ledger.filing import file_requests
from app.ledger.jobs import coalesce_pending_requests, get_job, requests_of_job
from app.ledger.keys import create_key
from app.ledger.provenance import steps_of_samples
from app.ledger.samples import sample_ids
from app.ledger.tables import (
    DeletionRequest,
    ModelVersion,
    Sample,
    Split,
    StepDelta,
    StepMembership,
    TrainingRun,
)
from app.ledger.versions import alias_target
from app.main import create_app
from app.settings import Settings
from app.verification import verify_erasure
from tests.conftest import POSTGRES_ADMIN_URL, postgres_available
from worker import forgetting
from worker.audit import AuditResult
from worker.data import ingest, open_source
from worker.nets import build_model
from worker.store import ArtifactStore, sha256_hex
from worker.training import TrainConfig, model_spec, train_first_version
from worker.unlearning import plan

pytestmark = pytest.mark.postgres
CPU = torch.device("cpu")
Weights = dict[str, torch.Tensor]


def _admin() -> Any:
    return make_engine(POSTGRES_ADMIN_URL).execution_options(isolation_level="AUTOCOMMIT")


def _create_database(name: str, template: str | None = None) -> str:
    admin = _admin()
    with admin.connect() as connection:
        source = f' TEMPLATE "{template}"' if template else ""
        connection.execute(text(f'CREATE DATABASE "{name}"{source}'))
    admin.dispose()
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _drop_database(name: str) -> None:
    admin = _admin()
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@dataclass(frozen=True)
class Template:
    database: str
    home: Path


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Template]:
    """v1 trained on digits with provenance, in a PostgreSQL database each test copies
    (CREATE DATABASE ... TEMPLATE) with the store."""
    reason = postgres_available()
    if reason:
        pytest.skip(reason)
    name = f"lethe_erasure_{uuid.uuid4().hex[:12]}"
    url = _create_database(name)
    migrate.upgrade(url)
    home = tmp_path_factory.mktemp("erasure")
    engine = make_engine(url)
    with open_session(engine) as session:
        store = ArtifactStore(str(home / "store"))
        ingest(session, store, open_source("digits"))
        config = TrainConfig(epochs=3, batch_size=32, optimizer="adam", lr=3e-3, seed=0)
        train_first_version(session, store, "digits", "small-cnn", config, CPU)
        session.commit()
    engine.dispose()
    yield Template(name, home)
    _drop_database(name)


@dataclass
class Deployment:
    session: Session
    store: ArtifactStore
    settings: Settings

    def erase(self, ids: list[str]) -> int:
        """Files the requests, coalesces them into one job and runs it; returns the job's ID."""
        file_requests(self.session, ids, actor="test", note=None, deadline_days=30)
        job = coalesce_pending_requests(
            self.session, window_seconds=0, max_requests=1000, max_attempts=3, actor="test"
        )
        assert job is not None
        self.session.commit()
        forgetting.run_unlearn_job(self.session, job, lambda *_: None, self.settings)
        self.session.commit()
        return job.id


@pytest.fixture
def deployment(
    template: Template, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Deployment]:
    # These tests are about the purge: the job screen and the accuracy floor are off (several
    # fake the audit, which then measures no accuracy for the floor to read).
    monkeypatch.setenv("LETHE_SCREEN_ENABLED", "false")
    name = f"lethe_erasure_{uuid.uuid4().hex[:12]}"
    url = _create_database(name, template.database)
    home = tmp_path / "home"
    shutil.copytree(template.home, home)
    settings = Settings(home=home, database_url=url)
    engine = make_engine(url)
    session = open_session(engine)
    yield Deployment(session, ArtifactStore(settings.resolved_store_url), settings)
    session.close()
    engine.dispose()
    _drop_database(name)


def weights(store: ArtifactStore, key: str) -> Weights:
    return store.get_tensors(key, CPU)


def distance(a: Weights, b: Weights) -> float:
    """Over the floating-point entries (those a delta records; not the step counters)."""
    keys = [k for k in b if b[k].is_floating_point()]
    return float(sum(((a[k].float() - b[k].float()) ** 2).sum() for k in keys) ** 0.5)


def delta_sum(store: ArtifactStore, rows: list[StepDelta]) -> Weights | None:
    """The sum of the deltas among ``rows`` that the store still holds; None if none."""
    present = store.present(row.store_key for row in rows)
    total: Weights | None = None
    for row in rows:
        if row.store_key in present:
            delta = weights(store, row.store_key)
            total = delta if total is None else {k: total[k] + delta[k] for k in total}
    return total


def shifted(base: Weights, change: Weights | None, sign: float) -> Weights:
    if change is None:
        return base
    return {k: base[k].float() + sign * change[k] if k in change else base[k] for k in base}


def rebuilds(session: Session, store: ArtifactStore) -> dict[str, Weights]:
    """Every model that what is left can give, by route."""
    routes: dict[str, Weights] = {}

    def run_deltas(run_id: int) -> list[StepDelta]:
        query = select(StepDelta).where(StepDelta.run_id == run_id).order_by(StepDelta.step)
        return list(session.scalars(query))

    versions = session.scalars(select(ModelVersion).order_by(ModelVersion.id)).all()
    spec = model_spec(versions[0])
    for run in session.scalars(select(TrainingRun).where(TrainingRun.base_version_id.is_(None))):
        initial = dict(build_model(spec, seed=run.seed).state_dict())
        routes[f"seed {run.seed} + run {run.id}"] = shifted(
            initial, delta_sum(store, run_deltas(run.id)), +1
        )
    for version in versions:
        if version.weights_key is None or not store.exists(version.weights_key):
            continue
        kept = weights(store, version.weights_key)
        routes[f"weights {version.version}"] = kept
        if version.run_id is not None:
            kept = shifted(kept, delta_sum(store, run_deltas(version.run_id)), -1)
            routes[f"{version.version} minus run {version.run_id}"] = kept
        rolled_back = [tuple(ref) for ref in version.details.get("rolled_back_steps", [])]
        if rolled_back:
            rows = [row for run, step in rolled_back for row in _delta(session, run, step)]
            routes[f"{version.version} plus its rolled-back deltas"] = shifted(
                kept, delta_sum(store, rows), +1
            )
    return routes


def _delta(session: Session, run_id: int, step: int) -> list[StepDelta]:
    return list(
        session.scalars(select(StepDelta).where(StepDelta.run_id == run_id, StepDelta.step == step))
    )


@pytest.mark.parametrize("method", ["amnesiac", "amnesiac+repair", "relabel", "retrain-exact"])
def test_nothing_left_rebuilds_the_version_that_held_the_sample(
    deployment: Deployment, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    session, store = deployment.session, deployment.store
    # The audit is not under test here (tests/unit/test_forgetting.py runs it): the forced rung
    # serves, and the unlearning inversion's image is left to that file's tests.
    pass_every_audit(monkeypatch)
    # relabel may not refuse the sample as one the parent never made member-like
    monkeypatch.setenv("LETHE_METHODS_RELABEL__STOP_QUANTILE", "0")
    deployment.settings = deployment.settings.model_copy(update={"ladder_start": method})
    v1 = alias_target(session)
    assert v1 is not None and v1.weights_key is not None
    (sample,) = sample_ids(session, "digits", Split.train)[5:6]
    held = weights(store, v1.weights_key)
    steps = steps_of_samples(session, [sample])[sample]
    sample_deltas = [row for run, step in steps for row in _delta(session, run, step)]
    own = delta_sum(store, sample_deltas)
    assert own is not None
    margin = 0.5 * distance(shifted(held, own, -1), held)
    assert margin > 0
    # The test can fail: before the erasure, the first route rebuilds v1 exactly.
    assert distance(rebuilds(session, store)[f"seed 0 + run {v1.run_id}"], held) < 1e-3 * margin

    deployment.erase([sample])

    served = alias_target(session)
    assert served is not None and served.method == method
    nearest = {
        route: distance(rebuilt, held) for route, rebuilt in rebuilds(session, store).items()
    }
    assert f"weights {served.version}" in nearest  # the routes are really tried
    assert min(nearest.values()) >= margin, nearest

    (request,) = requests_of_job(session, served.job_id or 0)
    key = certificate_key(deployment.settings.resolved_certificate_key_file)
    assert request.certificate is not None and verify_signature(request.certificate, key.public)
    assert verify_erasure(session, store, request.id, key).verified


def pass_every_audit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        forgetting,
        "run_audit",
        lambda session, store, candidate, *a, **k: AuditResult(
            0, candidate.version, True, "pass", [], {}, "", {}
        ),
    )


def test_samples_no_model_trained_on_are_erased_without_unlearning(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every held-out sample filed with one training sample, in one job: the training sample is
    unlearned and certified; each held-out one is certified as needing no model unlearning and
    never enters a forget set (the issue's job crashed on it and failed the other request)."""
    # the real audit: with every held-out sample erased it judges against the test split
    session = deployment.session
    heldout = sample_ids(session, "digits", Split.heldout)
    (trained,) = sample_ids(session, "digits", Split.train)[7:8]
    job_id = deployment.erase([*heldout, trained])

    requests = {r.sample_id: r for r in requests_of_job(session, job_id)}
    assert {r.state.value for r in requests.values()} == {"completed"}
    served = alias_target(session)
    assert served is not None and served.details["forget"] == [trained]
    assert requests[trained].completed_version_id == served.id
    assert requests[trained].certificate["model_unlearning"]["needed"] is True  # type: ignore[index]
    for sample_id in heldout:
        certificate = requests[sample_id].certificate
        assert certificate is not None and requests[sample_id].completed_version_id is None
        assert certificate["model_unlearning"]["needed"] is False
        assert certificate["version"] is None and certificate["purged"]["raw-data"]
    assert not set(load_split_ids(deployment)) & {*heldout, trained}
    samples = session.scalars(select(Sample).where(Sample.sample_id.in_([*heldout, trained])))
    assert {s.content_sha256 for s in samples} == {None}  # no plain digest of erased content


def load_split_ids(deployment: Deployment) -> list[str]:
    manifest = deployment.store.get_json("datasets/digits/manifest.json")
    return [sid for shard in manifest["shards"] for sid in shard["ids"]]


def test_a_corrupt_delta_ends_its_rung_and_is_recorded_with_its_digests(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    pass_every_audit(monkeypatch)
    # relabel may not refuse the sample as one the parent never made member-like
    monkeypatch.setenv("LETHE_METHODS_RELABEL__STOP_QUANTILE", "0")
    session, store = deployment.session, deployment.store
    deployment.settings = deployment.settings.model_copy(update={"ladder_start": "amnesiac"})
    (sample,) = sample_ids(session, "digits", Split.train)[9:10]
    run, step = steps_of_samples(session, [sample])[sample][0]
    (row,) = _delta(session, run, step)
    corrupted = bytearray(store.get_bytes(row.store_key))
    corrupted[-1] ^= 0xFF
    store.put_bytes(row.store_key, bytes(corrupted))

    job_id = deployment.erase([sample])

    job = get_job(session, job_id)
    assert [f["method"] for f in job.integrity_failures] == ["amnesiac", "amnesiac+repair"]
    for failure in job.integrity_failures:
        assert failure["key"] == row.store_key and failure["expected_sha256"] == row.sha256
        assert failure["actual_sha256"] == sha256_hex(bytes(corrupted))
    served = alias_target(session)
    assert served is not None and served.method == "relabel"  # the ladder went on
    assert served.details["ladder_notes"] == job.integrity_failures
    (request,) = requests_of_job(session, job_id)
    assert request.certificate is not None
    assert request.certificate["integrity_failures"] == job.integrity_failures
    with TestClient(create_app(deployment.settings, session.get_bind())) as client:  # type: ignore[arg-type]
        with session_scope(session.get_bind()) as keys_session:  # type: ignore[arg-type]
            reader = create_key(keys_session, "reader", ["status:read"], actor="test")
        shown = client.get(f"/jobs/{job_id}", headers={"X-API-Key": reader}).json()
        assert shown["integrity_failures"] == job.integrity_failures
    assert request.certificate["ladder_notes"] == job.integrity_failures


def test_the_planner_skips_a_rollback_whose_deltas_an_erasure_purged(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relabel serves the first request and its run's deltas are purged; a second sample that
    was in a relabel step cannot be rolled back: the plan says so and the job starts at
    relabel, with no failure at run time."""
    pass_every_audit(monkeypatch)
    session = deployment.session
    first = sample_ids(session, "digits", Split.train)[11]
    deployment.settings = deployment.settings.model_copy(update={"ladder_start": "relabel"})
    # relabel until the sample is below every never-seen one, so that its run surely has steps
    # (a sample the parent never memorised would stop it before its first step)
    monkeypatch.setenv("LETHE_METHODS_RELABEL__STOP_QUANTILE", "0")
    deployment.erase([first])
    relabelled = alias_target(session)
    assert relabelled is not None and relabelled.method == "relabel"
    second = next(
        sid
        for sid in session.scalars(
            select(StepMembership.sample_id).where(StepMembership.run_id == relabelled.run_id)
        )
        if sid != first
    )
    planned = plan(session, relabelled, [second])
    assert set(planned.blocked) == {"amnesiac", "amnesiac+repair"}
    assert "purged by an earlier erasure" in planned.blocked["amnesiac"]
    assert planned.method in ("relabel", "retrain-exact")

    deployment.settings = deployment.settings.model_copy(update={"ladder_start": ""})
    job_id = deployment.erase([second])

    served = alias_target(session)
    assert served is not None and served.method in ("relabel", "retrain-exact")
    assert [n["outcome"] for n in served.details["ladder_notes"]] == ["skipped", "skipped"]
    assert get_job(session, job_id).integrity_failures == []


def test_verify_erasure_finds_what_is_left_and_a_forged_certificate(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The check fails when it should: an object put back, a certificate altered in the
    ledger; and the CLI and the HTTP form give the same answer."""
    pass_every_audit(monkeypatch)
    session, store = deployment.session, deployment.store
    deployment.settings = deployment.settings.model_copy(update={"ladder_start": "retrain-exact"})
    v1 = alias_target(session)
    assert v1 is not None and v1.weights_key is not None
    kept = store.get_bytes(v1.weights_key)
    (sample,) = sample_ids(session, "digits", Split.train)[13:14]
    (request,) = requests_of_job(session, deployment.erase([sample]))
    key = certificate_key(deployment.settings.resolved_certificate_key_file)
    assert verify_erasure(session, store, request.id, key).verified

    store.put_bytes(v1.weights_key, kept)  # e.g. a backup restored into the store
    found = verify_erasure(session, store, request.id, key)
    assert not found.verified and found.listed_present == [v1.weights_key]
    assert [(d.kind, d.key) for d in found.derived_present] == [("weights", v1.weights_key)]
    assert cli_verification(deployment, request.id).returncode == 1
    with TestClient(create_app(deployment.settings, session.get_bind())) as client:
        with session_scope(session.get_bind()) as keys_session:  # type: ignore[arg-type]
            audit_key = create_key(
                keys_session, "auditor", ["audit:read", "status:read"], actor="test"
            )
        answer = client.get(
            f"/forget/requests/{request.id}/verification", headers={"X-API-Key": audit_key}
        ).json()
        assert answer["verified"] is False and answer["listed_present"] == [v1.weights_key]
        model = client.get(f"/models/{v1.version}", headers={"X-API-Key": audit_key}).json()
        assert model["weights_purged"] is True
        assert model["links"]["purged_by"] == f"/forget/requests/{request.id}/certificate"
        public = client.get("/certificates/public-key").json()
        assert public["key_id"] == key.key_id == request.certificate["signature"]["key_id"]  # type: ignore[index]
    store.delete(v1.weights_key)
    assert cli_verification(deployment, request.id).returncode == 0

    forged = {**request.certificate, "purged": {}}  # type: ignore[dict-item]
    session.execute(
        update(DeletionRequest).where(DeletionRequest.id == request.id).values(certificate=forged)
    )
    session.commit()
    found = verify_erasure(session, store, request.id, key)
    assert not found.verified and not found.signature_valid


def cli_verification(deployment: Deployment, request_id: str) -> subprocess.CompletedProcess[str]:
    settings = deployment.settings
    environment = {
        **os.environ,
        "LETHE_HOME": str(settings.home),
        "LETHE_DATABASE_URL": str(settings.database_url),
    }
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "verify-erasure", request_id],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
