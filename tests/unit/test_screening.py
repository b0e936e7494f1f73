"""The screen of unlearn jobs and the accuracy floor, on a toy ledger (SQLite, no tensors): each
rule holds a job that exceeds it and lets through one that does not."""

import json
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update
from sqlalchemy.orm import Session

from app.ledger.audits import create_audit, finish_audit
from app.ledger.clock import utcnow
from app.ledger.db import make_engine, open_session
from app.ledger.filing import file_requests
from app.ledger.impact import ClassCount, class_counts, key_usage, requests_by_key
from app.ledger.jobs import (
    claim_job,
    coalesce_pending_requests,
    get_job,
    heartbeat,
    requests_of_job,
)
from app.ledger.provenance import create_run, finish_run, record_steps
from app.ledger.samples import SampleRecord, register_samples, set_sample_state
from app.ledger.tables import (
    DeletionRequest,
    Job,
    ModelVersion,
    RequestState,
    SampleState,
    Split,
    VersionState,
)
from app.ledger.versions import alias_target, create_version, promote
from tests.api.conftest import _truncate_all as truncate_all
from worker.screening import Screening, ScreenPolicy, floor_breach, screen, screen_job
from worker.unlearning.planner import PlannerPolicy, exact_retrain_drop

CLASSES, PER_CLASS = 10, 40  # 400 training samples
RULE_OF = {
    "max_class_share": "class_share",
    "max_dataset_share": "dataset_share",
    "max_class_lift": "class_lift",
    "max_key_share": "key_share",
}
ALL_RULES_OFF = ScreenPolicy(
    max_predicted_drop_points=None,
    max_class_share=None,
    max_dataset_share=None,
    max_class_lift=None,
    max_key_share=None,
    key_quota_per_window=None,
    key_quota_total=None,
)


def toy_id(label: int, index: int) -> str:
    return f"toy-{label}-{index:02d}"


@pytest.fixture
def serving(session: Session) -> ModelVersion:
    return serve_toy(session)


def serve_toy(session: Session) -> ModelVersion:
    """A toy model serving, trained once over its samples in steps of 10."""
    ids = [toy_id(label, i) for i in range(PER_CLASS) for label in range(CLASSES)]
    register_samples(
        session, "toy", [SampleRecord(sid, Split.train, int(sid[4]), "0" * 64) for sid in ids]
    )
    run = create_run(
        session, kind="train", dataset="toy", architecture="toy", hyperparameters={}, seed=0,
        store_prefix="runs/1",
    )  # fmt: skip
    steps = len(ids) // 10
    record_steps(
        session, run.id, [(step, ids[step * 10 : step * 10 + 10]) for step in range(steps)]
    )
    finish_run(session, run.id, steps)
    version = create_version(
        session,
        method="train",
        state=VersionState.candidate,
        run_id=run.id,
        details={"dataset": "toy", "test_accuracy": 0.99},
    )
    promote(session, version, moved_by="test", reason="toy")
    session.commit()
    return version


def job_of(session: Session, filed: dict[str, Sequence[str]]) -> Job:
    """Requests filed by each key, coalesced into one job as the scheduler does."""
    for key, ids in filed.items():
        file_requests(session, list(ids), actor=key, note=None, deadline_days=30)
    job = coalesce_pending_requests(
        session, window_seconds=0, max_requests=1000, max_attempts=3, actor="test"
    )
    assert job is not None
    session.commit()
    return job


def screened(session: Session, job: Job, parent: ModelVersion, policy: ScreenPolicy) -> Screening:
    ids = [r.sample_id for r in session.query(DeletionRequest).filter_by(job_id=job.id)]
    return screen(session, job.id, parent, ids, policy)


def failed(screening: Screening) -> set[str]:
    return {check.rule for check in screening.checks if not check.passed}


def test_an_ordinary_job_passes_every_rule(session: Session, serving: ModelVersion) -> None:
    job = job_of(session, {"key:1:intake": [toy_id(0, 0), toy_id(3, 0), toy_id(7, 0)]})
    result = screened(session, job, serving, ScreenPolicy())
    assert not result.held and failed(result) == set()
    assert result.to_dict()["figures"]["training_samples"] == 3


def test_a_burst_that_leaves_little_data_is_held_by_every_size_rule(
    session: Session, serving: ModelVersion
) -> None:
    ids = [toy_id(label, i) for label in range(CLASSES) for i in range(PER_CLASS - 1)]  # 390
    job = job_of(session, {"key:2:burst": ids})
    result = screened(session, job, serving, ScreenPolicy())
    assert result.held
    assert failed(result) == {
        "predicted_test_drop",
        "class_share",
        "dataset_share",
        "key_quota_window",
    }
    assert "key:2:burst filed 390 samples" in result.reason
    drop = next(c for c in result.checks if c.rule == "predicted_test_drop")
    assert drop.value is not None and drop.value > 50  # exact retraining on 10 samples


def test_a_burst_split_over_several_jobs_holds_each_of_them(
    session: Session, serving: ModelVersion
) -> None:
    """Coalescing caps a job (500 requests by default): each part is screened with the others'
    samples counted, since exact retraining leaves out every sample being erased."""
    ids = [toy_id(label, i) for label in range(CLASSES) for i in range(PER_CLASS - 1)]
    file_requests(session, ids, actor="key:2:burst", note=None, deadline_days=30)
    jobs = []
    while job := coalesce_pending_requests(
        session, window_seconds=0, max_requests=200, max_attempts=3, actor="test"
    ):
        jobs.append(job)
    session.commit()
    assert len(jobs) == 2
    for job in jobs:
        result = screened(session, job, serving, ScreenPolicy())
        assert {"predicted_test_drop", "class_share", "dataset_share"} <= failed(result)


@pytest.mark.parametrize(
    ("policy", "over", "under"),
    [  # a policy with one rule on; a job over its limit and one under it
        ({"max_class_share": 0.10}, [(0, 5)], [(0, 4), (1, 4)]),
        ({"max_dataset_share": 0.05}, [(c, 3) for c in range(7)], [(c, 2) for c in range(10)]),
        ({"max_class_lift": 5.0}, [(0, 12), (1, 8)], [(c, 2) for c in range(10)]),
        ({"max_key_share": 0.55}, [(0, 12), (1, 8)], [(0, 10), (1, 10)]),
    ],
)
def test_each_concentration_rule_holds_over_its_limit_only(
    session: Session,
    serving: ModelVersion,
    policy: dict[str, float],
    over: list[tuple[int, int]],
    under: list[tuple[int, int]],
) -> None:
    """``over``/``under``: (class, samples) per key, key i filing the i-th entry."""
    rules = ALL_RULES_OFF.model_copy(update=policy)
    (rule,) = [RULE_OF[name] for name in policy]
    offset = 0
    for filed, expect_held in ((under, False), (over, True)):
        job = job_of(
            session,
            {
                f"key:{i}:k": [toy_id(label, offset + j) for j in range(count)]
                for i, (label, count) in enumerate(filed)
            },
        )
        result = screened(session, job, serving, rules)
        assert failed(result) == ({rule} if expect_held else set()), result.checks
        _forget_none(session, job)
        offset += 10


def _forget_none(session: Session, job: Job) -> None:
    """The job's requests fail (its samples active again): the next case starts afresh."""
    session.execute(
        update(DeletionRequest).where(DeletionRequest.job_id == job.id).values(state="failed")
    )
    ids = [r.sample_id for r in session.query(DeletionRequest).filter_by(job_id=job.id)]
    set_sample_state(session, ids, SampleState.forgetting, SampleState.active)
    session.commit()


def test_class_share_counts_earlier_erasures(session: Session, serving: ModelVersion) -> None:
    """A class wiped out a sample at a time: the cumulative share holds the third job."""
    rules = ALL_RULES_OFF.model_copy(update={"max_class_share": 0.05})  # 2 of 40
    for index, expect_held in ((0, False), (1, False), (2, True)):
        job = job_of(session, {"key:1:k": [toy_id(5, index)]})
        result = screened(session, job, serving, rules)
        assert result.held is expect_held
        ids = [toy_id(5, index)]
        set_sample_state(session, ids, SampleState.forgetting, SampleState.forgotten)
        session.commit()


def test_quotas_count_a_keys_live_requests_in_the_window_and_in_all(
    session: Session, serving: ModelVersion
) -> None:
    old = [toy_id(1, i) for i in range(3)]
    file_requests(session, old, actor="key:1:k", note=None, deadline_days=30)
    session.execute(  # filed two days ago: outside a 24 h window, inside the total
        update(DeletionRequest)
        .where(DeletionRequest.sample_id.in_(old))
        .values(received_at=utcnow() - timedelta(days=2))
    )
    failed_one = toy_id(1, 9)
    file_requests(session, [failed_one], actor="key:1:k", note=None, deadline_days=30)
    session.execute(  # a failed request erased nothing: not counted
        update(DeletionRequest)
        .where(DeletionRequest.sample_id == failed_one)
        .values(state=RequestState.failed)
    )
    job = job_of(session, {"key:1:k": [toy_id(2, i) for i in range(4)]})
    assert key_usage(session, ["key:1:k"], utcnow() - timedelta(hours=24))["key:1:k"].since == 4
    for window, total, expect in ((4, 7, set()), (3, 7, {"key_quota_window"}),
                                  (4, 6, {"key_quota_total"})):  # fmt: skip
        rules = ALL_RULES_OFF.model_copy(
            update={"key_quota_per_window": window, "key_quota_total": total}
        )
        assert failed(screened(session, job, serving, rules)) == expect


def test_the_ledger_counts_classes_and_keys(session: Session, serving: ModelVersion) -> None:
    job = job_of(session, {"key:1:a": [toy_id(0, 0), toy_id(0, 1)], "key:2:b": [toy_id(4, 0)]})
    assert requests_by_key(session, job.id) == {"key:1:a": 2, "key:2:b": 1}
    counts = {c.label: c for c in class_counts(session, "toy", [toy_id(4, 0), toy_id(4, 1)])}
    assert counts[0] == ClassCount(0, PER_CLASS, forgotten=0, removed=2, forget=0)  # forgetting
    assert counts[4] == ClassCount(4, PER_CLASS, forgotten=0, removed=2, forget=2)
    assert counts[9].removed == 0


def test_the_exact_retraining_prediction_follows_the_data_left() -> None:
    policy = PlannerPolicy()

    def drop(forget: dict[int, int], accuracy: float | None = 0.99) -> float:
        classes = [ClassCount(c, 90, 0, forget.get(c, 0), forget.get(c, 0)) for c in range(10)]
        return exact_retrain_drop(classes, accuracy, policy)

    assert drop({}) == 0.0
    assert drop({0: 1}) < 0.01  # one sample
    assert drop({0: 90}) == pytest.approx(9.9)  # a whole class: a tenth of the test set
    assert drop({c: 89 for c in range(10)}) > 50  # the 890-of-898 burst
    assert drop({c: 45 for c in range(10)}) < 2  # half the data: a little
    assert drop({0: 1}, accuracy=None) > drop({0: 1}, accuracy=1.0) > 0  # assumed, least error


def test_the_policy_reads_variables_over_its_json_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "screen.json"
    path.write_text(json.dumps({"screen": {"max_class_share": 0.2, "key_quota_total": 5}}))
    monkeypatch.setenv("LETHE_POLICY_FILE", str(path))
    monkeypatch.setenv("LETHE_SCREEN_KEY_QUOTA_TOTAL", "7")
    policy = ScreenPolicy()
    assert (policy.max_class_share, policy.key_quota_total) == (0.2, 7)
    assert policy.max_dataset_share == 0.10  # the default


def _audit(session: Session, serving: ModelVersion, accuracy: float, drop: float) -> object:
    audit = create_audit(session, serving.id)
    utility = {
        "test": {"candidate": accuracy, "parent": accuracy + drop / 100, "drop_points": drop}
    }
    return finish_audit(
        session, audit.id, metrics={"utility": utility}, decision="pass", thresholds={},
        reasons=[], artifacts={}, report_key="",
    )  # fmt: skip


def test_the_floor_holds_a_drop_beyond_it_or_an_accuracy_under_it(
    session: Session, serving: ModelVersion
) -> None:
    policy = ScreenPolicy()  # at most 5 points below the serving version
    assert floor_breach(_audit(session, serving, 0.95, 4.0), policy) is None  # type: ignore[arg-type]
    reason = floor_breach(_audit(session, serving, 0.163, 83.0), policy)  # type: ignore[arg-type]
    assert reason is not None and "fell 83.0 points" in reason
    absolute = policy.model_copy(update={"floor_min_test_accuracy": 0.96})
    reason = floor_breach(_audit(session, serving, 0.95, 0.1), absolute)  # type: ignore[arg-type]
    assert reason is not None and "below the floor of 96.00%" in reason
    assert floor_breach(None, policy) == "its test accuracy was not measured"
    off = policy.model_copy(update={"floor_max_drop_points": None})
    assert floor_breach(None, off) is None


@pytest.mark.postgres
def test_screening_leaves_the_jobs_row_to_the_heartbeat(postgres_url: str) -> None:
    """The job's own transaction runs for the whole ladder: had the screen written the job's
    row in it, the row would stay locked and the heartbeat could not renew the lease."""
    truncate_all(postgres_url)
    engine = make_engine(postgres_url)
    with open_session(engine) as session:
        parent = serve_toy(session)
        job = job_of(session, {"key:1:intake": [toy_id(0, 0), toy_id(5, 0)]})
        claim_job(session, job.id, lease_seconds=60)
        session.commit()
        job = get_job(session, job.id)
        screen_job(session, job, requests_of_job(session, job.id))
        session.flush()  # as the job's next query would
        with engine.connect() as other:
            other.execute(text("SET lock_timeout = '2s'"))
            with Session(bind=other) as beat:
                assert heartbeat(beat, job.id, 1, lease_seconds=60)
                beat.commit()
        session.rollback()
        assert get_job(session, job.id).screening["held"] is False  # committed on its own
        assert alias_target(session) == parent
    engine.dispose()
