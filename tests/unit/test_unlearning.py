"""The unlearning methods on a small CNN trained on digits (one training for the module)."""

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.ledger.audits import create_audit, finish_audit
from app.ledger.errors import StateConflict
from app.ledger.provenance import (
    StepRef,
    get_run,
    release_rollbacks,
    samples_in_step,
    step_deltas,
    steps_of_samples,
)
from app.ledger.tables import ModelVersion, Split, VersionState
from tests.unit.worker_support import digits_store, ledger_session
from worker.data import SampleSet, load_samples, load_split
from worker.nets import tracked_entries
from worker.store import ArtifactStore
from worker.training import (
    TrainConfig,
    accuracy,
    load_model,
    model_spec,
    new_version,
    train_first_version,
)
from worker.unlearning import (
    LADDER,
    NothingToUnlearn,
    PlannerPolicy,
    RelabelConfig,
    amnesiac_rollback,
    exact_retrain,
    naive_retrain,
    plan,
    plan_rollback,
    purge_deltas,
    relabel_unlearning,
    subtract_steps,
)

CPU = torch.device("cpu")
CONFIG = TrainConfig(epochs=6, batch_size=16, optimizer="adam", lr=1e-3, seed=0)


@dataclass
class Trained:
    session: Session
    store: ArtifactStore
    v1: ModelVersion
    bf16: ModelVersion  # the same training as v1, its deltas recorded in bf16
    train: SampleSet
    test: SampleSet

    def v1_steps(self, sample_id: str) -> set[StepRef]:
        refs = steps_of_samples(self.session, [sample_id])[sample_id]
        return {ref for ref in refs if ref[0] == self.v1.run_id}

    def model(self, version: ModelVersion) -> torch.nn.Module:
        return load_model(self.store, version, CPU)

    def test_accuracy(self, version: ModelVersion) -> float:
        return accuracy(self.model(version), self.test, CPU)

    def accuracy_on(self, version: ModelVersion, ids: list[str]) -> float:
        return accuracy(self.model(version), load_samples(self.store, "digits", ids), CPU)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    folder = tmp_path_factory.mktemp("unlearning")
    session = ledger_session(folder)
    store = digits_store(session, folder)
    v1 = train_first_version(session, store, "digits", "small-cnn", CONFIG, CPU)
    bf16 = replace(CONFIG, delta_dtype="bf16")
    bf16_version = train_first_version(session, store, "digits", "small-cnn", bf16, CPU)
    session.commit()
    yield Trained(
        session,
        store,
        v1,
        bf16_version,
        load_split(session, store, "digits", Split.train),
        load_split(session, store, "digits", Split.test),
    )
    session.close()


@pytest.fixture
def ctx(trained: Trained) -> Iterator[Trained]:
    """Each test's candidates give their claimed steps back, so tests stay independent."""
    yield trained
    session = trained.session
    session.rollback()
    for version in session.scalars(select(ModelVersion).where(ModelVersion.id > trained.bf16.id)):
        release_rollbacks(session, version.id)
    session.commit()


def test_amnesiac_rollback_of_one_sample_keeps_test_accuracy(ctx: Trained) -> None:
    forget = [ctx.train.sample_ids[0]]
    candidate = amnesiac_rollback(ctx.session, ctx.store, ctx.v1, forget, CPU)

    steps = ctx.v1_steps(forget[0])
    assert len(steps) == CONFIG.epochs  # one step per epoch
    assert all(row.rolled_back_in == candidate.id for row in step_deltas(ctx.session, steps))
    assert candidate.state.value == "candidate" and candidate.parent_id == ctx.v1.id
    assert abs(ctx.test_accuracy(candidate) - ctx.test_accuracy(ctx.v1)) <= 0.01


def test_a_step_is_never_subtracted_twice(ctx: Trained) -> None:
    first = amnesiac_rollback(ctx.session, ctx.store, ctx.v1, [ctx.train.sample_ids[1]], CPU)
    ctx.session.commit()
    with pytest.raises(StateConflict):  # a duplicate job on the same parent
        amnesiac_rollback(ctx.session, ctx.store, ctx.v1, [ctx.train.sample_ids[1]], CPU)
    ctx.session.rollback()
    again = plan_rollback(ctx.session, first, [ctx.train.sample_ids[1]])
    assert again.steps == [] and len(again.already_rolled_back) == CONFIG.epochs


def test_requests_sharing_a_step_subtract_it_once(ctx: Trained) -> None:
    a = ctx.train.sample_ids[2]
    steps_a = ctx.v1_steps(a)
    b = next(s for s in samples_in_step(ctx.session, *min(steps_a)) if s != a)
    steps_b = ctx.v1_steps(b)
    assert steps_a & steps_b

    v_a = amnesiac_rollback(ctx.session, ctx.store, ctx.v1, [a], CPU)
    v_ab = amnesiac_rollback(ctx.session, ctx.store, v_a, [b], CPU)

    assert {tuple(s) for s in v_ab.details["rolled_back_steps"]} == steps_b - steps_a
    expected = load_model(ctx.store, ctx.v1, CPU)
    subtract_steps(expected, ctx.store, step_deltas(ctx.session, steps_a | steps_b), CPU)
    got = tracked_entries(load_model(ctx.store, v_ab, CPU))
    for name, tensor in tracked_entries(expected).items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6)


def test_rolled_back_deltas_can_be_purged(ctx: Trained) -> None:
    quick = TrainConfig(epochs=2, batch_size=128)  # a run of its own: other tests read v1's
    parent = train_first_version(ctx.session, ctx.store, "digits", "small-cnn", quick, CPU)
    candidate = amnesiac_rollback(ctx.session, ctx.store, parent, ctx.train.sample_ids[:1], CPU)
    steps = [(run, step) for run, step in candidate.details["rolled_back_steps"]]

    hashes = purge_deltas(ctx.session, ctx.store, steps)

    rows = step_deltas(ctx.session, steps)
    assert hashes == [row.sha256 for row in rows] and len(rows) == quick.epochs
    assert all(row.purged_at is not None and not ctx.store.exists(row.store_key) for row in rows)


def test_bf16_deltas_roll_back_close_to_fp32(ctx: Trained) -> None:
    """bf16 keeps 8 significant bits: each delta entry is off by at most 2^-9 of itself, so the
    rolled-back weights differ from fp32 by at most 2^-9 * sum(|delta|) per entry (2^-8 here,
    for the fp32 rounding of the sum)."""
    forget = [ctx.train.sample_ids[4]]
    for name, tensor in ctx.model(ctx.v1).state_dict().items():
        assert torch.equal(tensor, ctx.model(ctx.bf16).state_dict()[name])  # same training
    from_fp32 = amnesiac_rollback(ctx.session, ctx.store, ctx.v1, forget, CPU)
    from_bf16 = amnesiac_rollback(ctx.session, ctx.store, ctx.bf16, forget, CPU)

    fp32_rows = step_deltas(ctx.session, ctx.v1_steps(forget[0]))
    bound = {name: torch.zeros_like(t) for name, t in tracked_entries(ctx.model(ctx.v1)).items()}
    for row in fp32_rows:
        for name, delta in ctx.store.get_tensors(row.store_key, CPU).items():
            bound[name] += delta.abs()
    exact, approx = tracked_entries(ctx.model(from_fp32)), tracked_entries(ctx.model(from_bf16))
    for name, tensor in exact.items():
        assert bool(((approx[name] - tensor).abs() <= bound[name] / 256 + 1e-6).all()), name
    assert abs(ctx.test_accuracy(from_fp32) - ctx.test_accuracy(from_bf16)) <= 0.002


def test_repair_fine_tunes_on_retained_data_with_provenance(ctx: Trained) -> None:
    forget = ctx.train.sample_ids[5:15]
    candidate = amnesiac_rollback(ctx.session, ctx.store, ctx.v1, forget, CPU, repair_steps=20)

    run = get_run(ctx.session, candidate.run_id)
    assert (candidate.method, run.kind, run.num_steps) == ("amnesiac+repair", "repair", 20)
    assert not members_of_run(ctx.session, run.id, forget)
    assert ctx.test_accuracy(candidate) >= ctx.test_accuracy(ctx.v1) - 0.02


def test_relabel_unlearning_drops_forget_accuracy_to_chance(ctx: Trained) -> None:
    forget = ctx.train.sample_ids[20:30]
    assert ctx.accuracy_on(ctx.v1, forget) == 1.0
    candidate = relabel_unlearning(
        ctx.session, ctx.store, ctx.v1, forget, CPU, RelabelConfig(copies=10, steps=60)
    )

    assert ctx.accuracy_on(candidate, forget) <= 0.1 + 1e-6  # chance for 10 classes
    assert abs(ctx.test_accuracy(candidate) - ctx.test_accuracy(ctx.v1)) <= 0.02
    assert members_of_run(ctx.session, candidate.run_id, forget) == set(forget)


class FixedProbe:
    """A probe that reads the forget set at a given quantile of the never-seen samples, until
    the model's weights change."""

    def __init__(self, parent: torch.nn.Module, quantile: float) -> None:
        self.parent = [p.detach().clone() for p in parent.parameters()]
        self.quantile = quantile

    def quantiles(self, model: torch.nn.Module) -> np.ndarray:
        unchanged = all(
            torch.equal(a, b) for a, b in zip(self.parent, model.parameters(), strict=True)
        )
        return np.full(2, self.quantile if unchanged else 0.0)


def test_relabel_refuses_to_serve_the_parent_unchanged(ctx: Trained) -> None:
    """A forget set already at the never-seen level would stop relabel before its first step:
    the candidate would be the parent's own weights, trained on F. It refuses instead; a
    member-like forget set is relabelled until the probe says it reached that level."""
    forget = ctx.train.sample_ids[40:42]
    at_level = FixedProbe(ctx.model(ctx.v1), quantile=0.5)
    with pytest.raises(NothingToUnlearn, match="never-seen level"):
        relabel_unlearning(ctx.session, ctx.store, ctx.v1, forget, CPU, probe=at_level)  # type: ignore[arg-type]
    member_like = FixedProbe(ctx.model(ctx.v1), quantile=0.9)
    candidate = relabel_unlearning(ctx.session, ctx.store, ctx.v1, forget, CPU, probe=member_like)  # type: ignore[arg-type]
    assert candidate.details["relabel_stop"]["step"] == 1  # the first probe, after one step
    assert get_run(ctx.session, candidate.run_id).num_steps == 1


def test_exact_retraining_never_sees_the_forget_set(ctx: Trained) -> None:
    forget = ctx.train.sample_ids[30:40]
    candidate = exact_retrain(ctx.session, ctx.store, ctx.v1, forget, CPU)

    run = get_run(ctx.session, candidate.run_id)
    root = get_run(ctx.session, ctx.v1.run_id)
    assert run.base_version_id is None and run.hyperparameters == root.hyperparameters
    assert run.num_steps > 0 and not members_of_run(ctx.session, run.id, forget)
    assert abs(ctx.test_accuracy(candidate) - ctx.test_accuracy(ctx.v1)) <= 0.02
    # The retrained weights owe nothing to v1's steps: a later rollback only sees the new run.
    later = plan_rollback(ctx.session, candidate, [ctx.train.sample_ids[0]])
    assert {run_id for run_id, _ in later.steps} == {run.id}


def test_naive_retraining_continues_without_the_forget_set(ctx: Trained) -> None:
    forget = ctx.train.sample_ids[40:50]
    candidate = naive_retrain(ctx.session, ctx.store, ctx.v1, forget, CPU, steps=30)

    run = get_run(ctx.session, candidate.run_id)
    assert (run.base_version_id, run.num_steps) == (ctx.v1.id, 30)
    assert not members_of_run(ctx.session, run.id, forget)


def test_planner_reports_the_share_and_climbs_the_ladder(ctx: Trained) -> None:
    one = [ctx.train.sample_ids[0]]
    total = get_run(ctx.session, ctx.v1.run_id).num_steps

    generous = plan(ctx.session, ctx.v1, one, PlannerPolicy(max_predicted_drop_points=100))
    strict = plan(ctx.session, ctx.v1, one, PlannerPolicy(max_predicted_drop_points=0))

    assert generous.total_steps == total and len(generous.affected_steps) == CONFIG.epochs
    assert generous.affected_share == pytest.approx(CONFIG.epochs / total)
    assert [rung.method for rung in generous.ladder] == list(LADDER)
    assert generous.method == "amnesiac" and strict.method == "retrain-exact"
    drops = [rung.predicted_test_drop_points for rung in generous.ladder]
    assert drops[0] > drops[1] > 0 and 0 < drops[3] < 0.01  # one sample: exact retraining ~0


def members_of_run(session: Session, run_id: int | None, ids: list[str]) -> set[str]:
    return {
        sid
        for sid, refs in steps_of_samples(session, ids).items()
        if any(r == run_id for r, _ in refs)
    }


def test_the_planner_learns_relabels_cost_from_past_audits(ctx: Trained) -> None:
    ten = ctx.train.sample_ids[100:110]
    before = plan(ctx.session, ctx.v1, ten)
    assert before.relabel_rate_observed_in == 0 and before.method == "relabel"

    # A past relabel of ten samples that cost 5 test points, as its audit recorded.
    past = new_version(
        ctx.session,
        model_spec(ctx.v1),
        method="relabel",
        state=VersionState.rejected,
        parent_id=ctx.v1.id,
        details={"dataset": "digits", "forget": ctx.train.sample_ids[200:210]},
    )
    audit = create_audit(ctx.session, past.id)
    finish_audit(
        ctx.session,
        audit.id,
        metrics={"utility": {"test": {"drop_points": 5.0}}},
        decision="fail",
        thresholds={},
        reasons=[],
        artifacts={},
        report_key="",
    )

    after = plan(ctx.session, ctx.v1, ten)
    relabel = next(rung for rung in after.ladder if rung.method == "relabel")
    assert after.relabel_rate_observed_in == 1
    assert relabel.predicted_test_drop_points == pytest.approx(5.0)
    assert after.method == "retrain-exact"
