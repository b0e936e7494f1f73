"""One clock for the ledger, always timezone-aware UTC."""

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime) -> datetime:
    """SQLite returns naive datetimes; the ledger only ever stores UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
