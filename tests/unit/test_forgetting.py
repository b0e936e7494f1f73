"""The unlearn job on the embedded ledger (SQLite, local store): ladder, gate, promotion, purge
and certificates. One training (with the audit's cached models) for the module; each test gets
its own copy of the ledger and store."""

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.ledger.db import make_engine, open_session
from app.ledger.filing import file_requests
from app.ledger.jobs import (
    approve_job,
    claim_job,
    coalesce_pending_requests,
    get_job,
    hold_job,
    requests_of_job,
)
from app.ledger.provenance import rolled_back_steps, step_deltas, steps_of_samples
from app.ledger.samples import sample_ids, samples_by_id
from app.ledger.tables import (
    AliasHistory,
    HoldStage,
    Job,
    ModelVersion,
    RequestState,
    SampleState,
    Split,
    VersionState,
)
from app.ledger.versions import alias_target, versions_of_job
from app.settings import Settings
from tests.unit.worker_support import digits_store, ledger_session
from worker import forgetting
from worker.audit import prepare_audits
from worker.data import load_samples
from worker.pipeline import JobHeld
from worker.store import ArtifactStore
from worker.training import TrainConfig, train_first_version

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A home folder (ledger + store) with v1 serving and the audit caches built."""
    home = tmp_path_factory.mktemp("forgetting")
    session = ledger_session(home)
    store = digits_store(session, home)
    config = TrainConfig(epochs=6, batch_size=16, optimizer="adam", lr=1e-3, seed=0)
    v1 = train_first_version(session, store, "digits", "small-cnn", config, CPU)
    prepare_audits(session, store, v1, CPU)
    session.commit()
    session.close()
    return home


@dataclass
class Ledger:
    session: Session
    store: ArtifactStore
    settings: Settings

    def forget(self, ids: list[str]) -> Job:
        """Files the requests and coalesces them into one job, as the API and scheduler do."""
        for sample_id in ids:
            file_requests(self.session, [sample_id], actor="test", note=None, deadline_days=30)
        job = coalesce_pending_requests(
            self.session, window_seconds=0, max_requests=100, max_attempts=3, actor="test"
        )
        assert job is not None
        self.session.commit()
        return job

    def run(self, job: Job) -> str | None:
        progress: list[int] = []
        method = forgetting.run_unlearn_job(
            self.session, job, lambda percent, _step=None: progress.append(percent), self.settings
        )
        self.session.commit()
        assert progress == sorted(progress) and progress[-1] == 100
        return method

    def train_ids(self, count: int, offset: int = 0) -> list[str]:
        return sample_ids(self.session, "digits", Split.train)[offset : offset + count]


@pytest.fixture
def ledger(trained_home: Path, tmp_path: Path) -> Iterator[Ledger]:
    home = tmp_path / "home"
    shutil.copytree(trained_home, home)
    settings = Settings(home=home)
    session = open_session(make_engine(settings.resolved_database_url))
    yield Ledger(session, ArtifactStore(settings.resolved_store_url), settings)
    session.close()


def test_a_job_promotes_an_audited_version_purges_and_certifies(ledger: Ledger) -> None:
    session, store = ledger.session, ledger.store
    ids = ledger.train_ids(2)
    v1 = alias_target(session)
    assert v1 is not None and v1.weights_key is not None
    job = ledger.forget(ids)

    method = ledger.run(job)

    serving = alias_target(session)
    assert serving is not None and serving.parent_id == v1.id and serving.method == method
    history = session.scalars(select(AliasHistory).order_by(AliasHistory.id)).all()
    assert history[-1].moved_by == f"job:{job.id}" and "passed" in history[-1].reason
    requests = requests_of_job(session, job.id)
    assert {r.state for r in requests} == {RequestState.completed}
    assert {r.completed_version_id for r in requests} == {serving.id}
    assert {s.state for s in samples_by_id(session, ids).values()} == {SampleState.forgotten}
    # Purged: the raw data, the rolled-back deltas, the parent's weights; the hashes stay.
    with pytest.raises(LookupError):
        load_samples(store, "digits", ids)
    deltas = step_deltas(session, rolled_back_steps(session, [serving.id]))
    assert deltas and all(d.purged_at is not None and not store.exists(d.store_key) for d in deltas)
    session.refresh(v1)
    assert v1.weights_purged_at is not None and not store.exists(v1.weights_key)
    assert store.exists(str(serving.weights_key))
    listed: set[tuple[int, int]] = set()
    for request in requests:
        certificate = request.certificate
        assert certificate is not None
        assert store.get_json(certificate["store_key"])["request_id"] == request.id
        assert certificate["version"] == serving.version
        assert certificate["audit"]["decision"] == "pass"
        (weights,) = certificate["purged"]["weights"]
        assert (weights["version"], weights["sha256"]) == (v1.version, v1.weights_sha256)
        listed |= {
            (group["run_id"], step)
            for group in certificate["purged"]["step-deltas"]
            for first, last in group["steps"]
            for step in range(first, last + 1)
        }
    assert {(d.run_id, d.step) for d in deltas} == listed  # each certificate: its sample's


def test_forgotten_samples_are_left_out_of_every_later_training(ledger: Ledger) -> None:
    ids = ledger.train_ids(1)
    ledger.run(ledger.forget(ids))
    config = TrainConfig(epochs=1, batch_size=64, seed=1)
    retrained = train_first_version(
        ledger.session, ledger.store, "digits", "small-cnn", config, CPU
    )
    runs = {run for run, _step in steps_of_samples(ledger.session, ids)[ids[0]]}
    assert runs and retrained.run_id not in runs


def test_a_failed_audit_climbs_to_the_next_rung(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_audit = forgetting.run_audit

    def amnesiac_fails(*args: Any, **kwargs: Any) -> Any:
        result = real_audit(*args, **kwargs)
        if args[2].method == "amnesiac":
            return replace(result, passed=False, decision="fail")
        return result

    monkeypatch.setattr(forgetting, "run_audit", amnesiac_fails)
    ids = ledger.train_ids(1, offset=10)  # few steps: the planner starts with amnesiac
    job = ledger.forget(ids)

    assert ledger.run(job) == "amnesiac+repair"

    session = ledger.session
    rejected, promoted = session.scalars(
        select(ModelVersion).where(ModelVersion.job_id == job.id).order_by(ModelVersion.id)
    ).all()
    assert (rejected.state, promoted.state) == (VersionState.rejected, VersionState.serving)
    # The rejected candidate gave its steps back, and the promoted one subtracted them once.
    assert rolled_back_steps(session, [rejected.id]) == set()
    assert rolled_back_steps(session, [promoted.id])
    assert [r["method"] for r in promoted.details["ladder"]] == ["amnesiac", "amnesiac+repair"]
    assert rejected.weights_purged_at is not None  # it was derived from the erased data


def test_when_every_rung_fails_the_requests_fail_with_the_reasons(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_audit = forgetting.run_audit
    monkeypatch.setattr(forgetting, "LADDER", ("amnesiac", "amnesiac+repair"))
    monkeypatch.setattr(
        forgetting,
        "run_audit",
        lambda *a, **k: replace(real_audit(*a, **k), passed=False, decision="fail"),
    )
    ids = ledger.train_ids(1, offset=20)
    job = ledger.forget(ids)
    with pytest.raises(forgetting.LadderExhausted, match="every rung failed"):
        forgetting.run_unlearn_job(ledger.session, job, lambda *_: None, ledger.settings)
    ledger.session.rollback()
    # The rungs' candidates were committed as they failed: an operator can read their audits.
    states = ledger.session.scalars(
        select(ModelVersion.state).where(ModelVersion.job_id == job.id)
    ).all()
    assert states == [VersionState.rejected, VersionState.rejected]
    assert load_samples(ledger.store, "digits", ids).sample_ids == ids  # nothing erased


def test_a_crash_after_promotion_only_finishes_the_purge(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = ledger.train_ids(1, offset=30)
    job = ledger.forget(ids)

    def crash(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("killed between promotion and purge")

    with monkeypatch.context() as patch:
        patch.setattr(forgetting, "purge_and_certify", crash)
        with pytest.raises(RuntimeError):
            forgetting.run_unlearn_job(ledger.session, job, lambda *_: None, ledger.settings)
    ledger.session.rollback()
    promoted = alias_target(ledger.session)
    assert promoted is not None and promoted.job_id == job.id
    made = select(ModelVersion.id).where(ModelVersion.job_id == job.id)
    before = ledger.session.scalars(made).all()

    assert ledger.run(job) == promoted.method  # the retry: no new candidate, the purge is done

    assert alias_target(ledger.session) == promoted
    assert ledger.session.scalars(made).all() == before
    (request,) = requests_of_job(ledger.session, job.id)
    assert request.certificate is not None
    with pytest.raises(LookupError):
        load_samples(ledger.store, "digits", ids)


def test_a_retry_resumes_the_ladder_after_the_rungs_already_rejected(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_audit, real_unlearn = forgetting.run_audit, forgetting.unlearn

    def amnesiac_fails(*args: Any, **kwargs: Any) -> Any:
        result = real_audit(*args, **kwargs)
        return replace(result, passed=False) if args[2].method == "amnesiac" else result

    def crash_on_repair(*args: Any, **kwargs: Any) -> Any:
        if args[4] == "amnesiac+repair":
            raise RuntimeError("the worker died on the second rung")
        return real_unlearn(*args, **kwargs)

    monkeypatch.setattr(forgetting, "run_audit", amnesiac_fails)
    job = ledger.forget(ledger.train_ids(1, offset=40))
    with monkeypatch.context() as patch:
        patch.setattr(forgetting, "unlearn", crash_on_repair)
        with pytest.raises(RuntimeError):
            forgetting.run_unlearn_job(ledger.session, job, lambda *_: None, ledger.settings)
    ledger.session.rollback()

    assert ledger.run(job) == "amnesiac+repair"

    methods = ledger.session.scalars(
        select(ModelVersion.method).where(ModelVersion.job_id == job.id).order_by(ModelVersion.id)
    ).all()
    assert methods == ["amnesiac", "amnesiac+repair"]
    serving = alias_target(ledger.session)
    assert serving is not None
    assert [r["method"] for r in serving.details["ladder"]] == methods


def test_erasing_a_reference_pool_sample_purges_the_audit_models_that_learned_it(
    ledger: Ledger,
) -> None:
    store = ledger.store
    (pool_id,) = sample_ids(ledger.session, "digits", Split.pool)[:1]
    cached = [k for k in store.list("audits/references") if k.endswith(".safetensors")]
    assert cached

    ledger.run(ledger.forget([pool_id]))

    (request,) = requests_of_job(ledger.session, ledger.session.scalars(select(Job.id)).one())
    assert request.state is RequestState.completed
    purged = request.certificate["purged"]["audit-models"]  # type: ignore[index]
    assert set(cached) <= {p["key"] for p in purged}
    assert not any(store.exists(key) for key in cached)
    # The next audit's models are built from the pool without the sample.
    serving = alias_target(ledger.session)
    assert serving is not None
    prepare_audits(ledger.session, store, serving, CPU)
    (manifest,) = [k for k in store.list("audits/references") if k.endswith("manifest.json")]
    assert pool_id not in store.get_json(manifest)["pool"]


def test_a_job_over_the_screening_policy_is_held_before_any_model_changes(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LETHE_SCREEN_MAX_CLASS_SHARE", "0.01")  # one digit of ~90: held
    job = ledger.forget(ledger.train_ids(2, offset=60))
    with pytest.raises(JobHeld) as held:
        forgetting.run_unlearn_job(ledger.session, job, lambda *_: None, ledger.settings)
    ledger.session.rollback()
    assert held.value.stage is HoldStage.screening and "class_share" in str(held.value.screening)
    assert versions_of_job(ledger.session, job.id) == []


def test_a_candidate_below_the_accuracy_floor_is_held_then_served_on_approval(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LETHE_SCREEN_FLOOR_MIN_TEST_ACCURACY", "0.9999")  # none reaches it
    session = ledger.session
    parent = alias_target(session)
    job = ledger.forget(ledger.train_ids(1, offset=70))
    claim_job(session, job.id, lease_seconds=600)
    session.commit()
    with pytest.raises(JobHeld) as held:
        forgetting.run_unlearn_job(session, job, lambda *_: None, ledger.settings)
    session.rollback()
    assert held.value.stage is HoldStage.promotion and "below the floor" in held.value.reason
    (candidate,) = versions_of_job(session, job.id)  # committed: it waits for the operator
    assert candidate.state is VersionState.auditing and alias_target(session) == parent
    assert {r.state for r in requests_of_job(session, job.id)} == {RequestState.processing}

    hold_job(session, job.id, 1, stage=held.value.stage, reason=held.value.reason)
    approve_job(session, job.id, actor="key:9:ops", reason="the drop is test-set noise")
    claim_job(session, job.id, lease_seconds=600)
    session.commit()
    assert ledger.run(get_job(session, job.id)) == candidate.method  # no rung is run again

    assert alias_target(session) == candidate
    assert versions_of_job(session, job.id) == [candidate]
    requests = requests_of_job(session, job.id)
    assert {r.state for r in requests} == {RequestState.completed}
    assert all(r.certificate is not None for r in requests)


def test_exact_retraining_that_fails_the_gate_is_held_for_an_operator_not_failed(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last rung trains without the samples; its audit failing is the gate's false alarm
    (a few percent of forget sets) or a sign of a near-duplicate: an operator decides. Failing
    the request would leave the sample unerasable."""
    real_audit = forgetting.run_audit
    monkeypatch.setattr(
        forgetting,
        "run_audit",
        lambda *a, **k: replace(real_audit(*a, **k), passed=False, decision="fail"),
    )
    session = ledger.session
    settings = ledger.settings.model_copy(update={"ladder_start": "retrain-exact"})
    job = ledger.forget(ledger.train_ids(1, offset=80))
    claim_job(session, job.id, lease_seconds=600)
    session.commit()
    with pytest.raises(JobHeld) as held:
        forgetting.run_unlearn_job(session, job, lambda *_: None, settings)
    session.rollback()
    assert held.value.stage is HoldStage.promotion and "exact retraining" in held.value.reason
    (candidate,) = versions_of_job(session, job.id)
    assert candidate.state is VersionState.auditing
    assert {r.state for r in requests_of_job(session, job.id)} == {RequestState.processing}

    hold_job(session, job.id, 1, stage=held.value.stage, reason=held.value.reason)
    approve_job(session, job.id, actor="key:9:ops", reason="read the audit: a false alarm")
    claim_job(session, job.id, lease_seconds=600)
    session.commit()
    assert forgetting.run_unlearn_job(session, get_job(session, job.id), lambda *_: None, settings)
    session.commit()
    assert alias_target(session) == candidate
    assert {r.state for r in requests_of_job(session, job.id)} == {RequestState.completed}
