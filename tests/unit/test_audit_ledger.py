"""Recording audits in the ledger: running, then finished once."""

import pytest
from sqlalchemy.orm import Session

from app.ledger.audits import create_audit, finish_audit, latest_audit
from app.ledger.errors import StateConflict
from app.ledger.tables import VersionState
from app.ledger.versions import create_version


def test_an_audit_runs_then_finishes_once(session: Session) -> None:
    version = create_version(session, method="train", state=VersionState.candidate)
    audit = create_audit(session, version.id)
    assert latest_audit(session, version.id) is audit and audit.state == "running"
    finished = finish_audit(
        session,
        audit.id,
        metrics={"calibrated": {"auc": {"value": 0.5}}},
        decision="pass",
        thresholds={"max_auc_forget_vs_heldout": 0.6},
        reasons=[{"rule": "auc_forget_vs_heldout", "passed": True}],
        artifacts={"roc_calibrated.png": "audits/v1/1/roc_calibrated.png"},
        report_key="audits/v1/1/report.json",
    )
    session.commit()
    assert finished.state == "done" and finished.finished_at is not None
    assert latest_audit(session, version.id).decision == "pass"
    with pytest.raises(StateConflict):
        finish_audit(
            session,
            audit.id,
            metrics={},
            decision="fail",
            thresholds={},
            reasons=[],
            artifacts={},
            report_key="x",
        )
