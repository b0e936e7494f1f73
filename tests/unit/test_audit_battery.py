"""The audit battery end to end on a subset of digits with the small CNN: an overfit parent,
its exact retrain without F, and the audits of both (the parent audited as if it were the
candidate: F still inside)."""

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from PIL import Image

from app.ledger import migrate
from app.ledger.audits import latest_audit
from app.ledger.db import make_engine, open_session
from app.ledger.samples import sample_ids
from app.ledger.tables import Split
from worker.audit import AuditConfig, AuditResult, GatePolicy, prepare_audits, run_audit
from worker.data import RawDataset, ingest, open_source
from worker.store import ArtifactStore
from worker.training import TrainConfig, train_first_version
from worker.unlearning.retrain import exact_retrain

CPU = torch.device("cpu")
SUBSET = 600  # 300 train, 90 held out, 90 test, 120 pool
# T has 90 samples, so one sample is 1.1 points of accuracy: the default 1-point limit would
# fail an exact retrain on noise alone.
POLICY = GatePolicy(max_test_accuracy_drop_points=5.0)
FAST = AuditConfig(
    reference_models=4,
    pair_shadows=1,
    removals_per_shadow=3,
    inversion_iterations=10,
    class_inversion_iterations=10,
    class_inversion_denoise_every=5,
)
ATTACKS = ("shadow", "calibrated", "lira", "two_version", "unlearning_inversion", "class_inversion")


def noisy_digits() -> RawDataset:
    """The first SUBSET digits with 30% of the labels replaced by wrong ones (seeded): label
    noise forces the model to memorise its members, the usual way to overfit on purpose."""
    raw = open_source("digits")
    labels = raw.labels[:SUBSET].copy()
    rng = np.random.default_rng(0)
    noisy = rng.random(SUBSET) < 0.3
    labels[noisy] = (labels[noisy] + rng.integers(1, 10, int(noisy.sum()))) % 10
    return replace(
        raw, sample_ids=raw.sample_ids[:SUBSET], images=raw.images[:SUBSET], labels=labels
    )


@dataclass(frozen=True)
class Audited:
    store: ArtifactStore
    prepared: dict[str, float]  # one-off seconds of every cached model, built before the audits
    parent: AuditResult  # the parent audited as the candidate: F still inside
    retrain: AuditResult
    retrain_again: AuditResult  # a second audit: every cached model reused


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Audited]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("audit")
    url = f"sqlite:///{root / 'ledger.sqlite3'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    store = ArtifactStore(str(root / "store"))
    with open_session(engine) as session:
        ingest(session, store, noisy_digits())
        parent = train_first_version(
            session, store, "digits", "small-cnn", TrainConfig(epochs=20), CPU
        )
        forget = sample_ids(session, "digits", Split.train)[:40]
        retrain = exact_retrain(session, store, parent, forget, CPU)
        prepared = prepare_audits(session, store, parent, CPU, FAST)
        session.commit()
        results = [
            run_audit(session, store, candidate, parent, forget, CPU, POLICY, config=FAST)
            for candidate in (parent, retrain, retrain)
        ]
        session.commit()
        assert latest_audit(session, retrain.id).id == results[2].audit_id
        yield Audited(store, prepared, *results)
    engine.dispose()


def auc(result: AuditResult, attack: str) -> float:
    return float(result.metrics[attack]["auc"]["value"])


@pytest.mark.parametrize("attack", ["shadow", "calibrated", "lira"])
def test_membership_attacks_beat_chance_on_members_of_an_overfit_model(
    audited: Audited, attack: str
) -> None:
    assert auc(audited.parent, attack) > 0.6


@pytest.mark.parametrize("attack", ["shadow", "calibrated", "lira"])
def test_membership_attacks_near_chance_after_exact_retraining(
    audited: Audited, attack: str
) -> None:
    assert abs(auc(audited.retrain, attack) - 0.5) < 0.15


def test_gate_passes_the_exact_retrain_and_fails_the_parent(audited: Audited) -> None:
    assert audited.retrain.passed, audited.retrain.reasons
    assert audited.retrain.decision == "pass"
    assert not audited.parent.passed, [r["reason"] for r in audited.parent.reasons]
    failed = {r["rule"] for r in audited.parent.reasons if not r["passed"]}
    assert "auc_forget_vs_heldout" in failed
    assert all(r["reason"] for r in audited.parent.reasons)


def test_report_is_valid_json_with_every_figure(audited: Audited) -> None:
    result = audited.retrain
    document = json.loads(audited.store.get_bytes(result.report_key), parse_constant=None)
    assert document["decision"] == "pass"
    metrics = document["metrics"]
    for attack in ("utility", *ATTACKS):
        assert metrics[attack]["definition"]
    assert metrics["sets"]["forget"] == 40
    assert metrics["lira"]["at_fpr"]["0.001"]["tpr"]["n"] == 40
    assert set(metrics["two_version"]) >= {"direct_diff", "sorted_diff", "direct_concat"}
    assert metrics["unlearning_inversion"]["psnr"]
    assert metrics["timings"]["stages"]["class_inversion"] > 0
    assert (
        document["thresholds"]["max_auc_forget_vs_heldout"]
        == GatePolicy().max_auc_forget_vs_heldout
    )


def test_plots_are_real_png_files_with_servable_names(audited: Audited) -> None:
    artifacts = audited.retrain.artifacts
    assert {"roc.png", "unlearning_inversion.png"} <= set(artifacts)
    assert "inversion_class_0.png" in artifacts
    for name, key in artifacts.items():
        assert re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", name)
        with Image.open(io.BytesIO(audited.store.get_bytes(key))) as image:
            assert image.format == "PNG"
            assert min(image.size) > 8


def test_cached_models_are_built_once_and_reused_by_every_audit(audited: Audited) -> None:
    assert {"reference-000", "shadow-attack", "two-version-pairs", "evaluator"} <= set(
        audited.prepared
    )
    for result in (audited.parent, audited.retrain, audited.retrain_again):
        assert result.metrics["timings"]["built_in_this_audit"] == []
    assert np.isclose(auc(audited.retrain, "lira"), auc(audited.retrain_again, "lira"))
