"""Ledger operations: membership both ways, guarded transitions, alias history, keys."""

import pytest
from sqlalchemy.orm import Session

from app.ledger.errors import Invalid, StateConflict
from app.ledger.keys import create_key, find_active_key, hash_key, list_keys
from app.ledger.provenance import (
    DeltaRecord,
    create_run,
    mark_rolled_back,
    record_steps,
    release_rollbacks,
    rolled_back_steps,
    samples_in_step,
    steps_of_samples,
)
from app.ledger.requests import file_requests, transition_requests
from app.ledger.samples import SampleRecord, register_samples, set_sample_state
from app.ledger.tables import RequestState, SampleState, Split, VersionState
from app.ledger.versions import alias_history, alias_target, create_version, promote


def seed(session: Session, n: int = 6) -> list[str]:
    ids = [f"s{i}" for i in range(n)]
    register_samples(session, "toy", [SampleRecord(i, Split.train, 0, "0" * 64) for i in ids])
    return ids


def test_register_is_rerunnable(session: Session) -> None:
    seed(session)
    assert register_samples(session, "toy", [SampleRecord("s0", Split.train, 0, "0" * 64)]) == 0


def test_membership_both_ways(session: Session) -> None:
    ids = seed(session)
    run = create_run(
        session,
        kind="train",
        dataset="toy",
        architecture="x",
        hyperparameters={},
        seed=0,
        store_prefix="runs/1",
    )
    record_steps(session, run.id, [(0, ids[:3]), (1, ids[3:]), (2, [ids[0], ids[0], ids[5]])])
    assert steps_of_samples(session, ["s0", "s4"]) == {
        "s0": [(run.id, 0), (run.id, 2)],
        "s4": [(run.id, 1)],
    }
    assert samples_in_step(session, run.id, 2) == ["s0", "s5"]


def test_rollback_claims_a_step_once(session: Session) -> None:
    ids = seed(session)
    run = create_run(
        session,
        kind="train",
        dataset="toy",
        architecture="x",
        hyperparameters={},
        seed=0,
        store_prefix="runs/1",
    )
    deltas = [DeltaRecord(s, f"d/{s}", "0" * 64, "fp32", 4, ["w"]) for s in range(2)]
    record_steps(session, run.id, [(0, ids[:3]), (1, ids[3:])], deltas)
    v2 = create_version(session, method="amnesiac", state=VersionState.candidate)
    mark_rolled_back(session, [(run.id, 0)], v2.id)
    with pytest.raises(StateConflict):
        mark_rolled_back(session, [(run.id, 0)], v2.id)
    assert rolled_back_steps(session, [v2.id]) == {(run.id, 0)}
    assert release_rollbacks(session, v2.id) == 1
    assert rolled_back_steps(session, [v2.id]) == set()


def test_guarded_request_transitions(session: Session) -> None:
    seed(session)
    (filed,) = file_requests(session, ["s1"], actor="t", note=None, deadline_days=30)
    request_id = filed.request.id
    with pytest.raises(StateConflict, match="not completed"):
        transition_requests(session, [request_id], RequestState.completed, RequestState.failed)
    session.rollback()
    transition_requests(session, [request_id], RequestState.pending, RequestState.processing)
    session.commit()
    session.refresh(filed.request)
    assert filed.request.state is RequestState.processing


def test_guarded_sample_transitions(session: Session) -> None:
    seed(session)
    set_sample_state(session, ["s1", "s2"], SampleState.active, SampleState.forgetting)
    with pytest.raises(StateConflict):
        set_sample_state(session, ["s2", "s3"], SampleState.forgetting, SampleState.forgotten)


def test_alias_moves_keep_history(session: Session) -> None:
    v1 = create_version(session, method="train", state=VersionState.candidate)
    v2 = create_version(session, method="amnesiac", state=VersionState.candidate, parent_id=v1.id)
    promote(session, v1, moved_by="t", reason="first")
    promote(session, v2, moved_by="t", reason="second")
    target = alias_target(session)
    assert target is not None and target.version == "v2"
    history = alias_history(session)
    assert [(h.version_id, h.ended_at is None) for h in history] == [(v2.id, True), (v1.id, False)]
    assert v1.state is VersionState.retired
    rejected = create_version(session, method="relabel", state=VersionState.rejected)
    with pytest.raises(StateConflict):
        promote(session, rejected, moved_by="t", reason="no")


def test_keys_are_stored_hashed(session: Session) -> None:
    key = create_key(session, "ops", ["status:read"], actor="t")
    stored = list_keys(session)[0]
    assert stored.key_sha256 == hash_key(key) and key not in stored.key_sha256
    assert find_active_key(session, key) is not None
    with pytest.raises(Invalid):
        create_key(session, "bad", ["root"], actor="t")
