"""Figures for compliance dashboards."""

from fastapi import APIRouter

from app.api.deps import SessionDep, StatusReader
from app.api.errors import PROBLEM_RESPONSES
from app.ledger.stats import ledger_stats
from app.ledger.versions import alias_target
from app.schemas import StatsOut

router = APIRouter(tags=["stats"], responses=PROBLEM_RESPONSES)


@router.get("/stats", response_model=StatsOut)
def stats(session: SessionDep, _p: StatusReader) -> StatsOut:
    figures = ledger_stats(session)
    serving = alias_target(session)
    return StatsOut(**vars(figures), serving_version=serving.version if serving else None)
