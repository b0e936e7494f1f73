"""Engine and sessions. Every other module receives a Session; none creates an engine."""

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InvalidatePoolError
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings, get_settings


def make_engine(
    url: str, settings: Settings | None = None, *, ping_after_idle: float | None = None
) -> Engine:
    """An engine for ``url``; on a server, a pool of ``db_pool_size`` connections (and as many
    again on overflow) that checks a connection is alive before handing it out.

    ``ping_after_idle`` (seconds): check only a connection that has been idle longer than that
    (pool_pre_ping checks every one, a round trip per checkout). A connection that dies while
    in use is then caught when used: SQLAlchemy replaces every connection of its generation, and
    run_driver_statement runs its statement again on a new one.
    """
    settings = settings or get_settings()
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(
        url,
        pool_pre_ping=ping_after_idle is None,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_size,
        pool_timeout=settings.db_connect_timeout_seconds,
        connect_args={"connect_timeout": settings.db_connect_timeout_seconds},
    )
    if ping_after_idle is not None:
        _ping_after_idle(engine, ping_after_idle)
    return engine


def _ping_after_idle(engine: Engine, seconds: float) -> None:
    dialect = engine.dialect

    def checked_in(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    def checked_out(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("idle_since")
        if idle_since is None or time.monotonic() - idle_since <= seconds:
            return  # fresh, or in steady use
        try:
            dialect.do_ping(dbapi_connection)
        except dialect.loaded_dbapi.Error as error:
            if dialect.is_disconnect(error, dbapi_connection, None):
                # as pool_pre_ping does: this connection and every older one are replaced
                raise InvalidatePoolError() from error
            raise

    event.listen(engine, "checkin", checked_in)
    event.listen(engine, "checkout", checked_out)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


@lru_cache
def get_engine() -> Engine:
    return make_engine(get_settings().resolved_database_url)


@lru_cache
def _session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error (for the worker and CLI)."""
    session = _session_factory(engine or get_engine())()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def open_session(engine: Engine | None = None) -> Session:
    return _session_factory(engine or get_engine())()


def affected_rows(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE touched: the count a compare-and-set checks."""
    return cast(CursorResult[Any], result).rowcount


def run_driver_statement(
    engine: Engine, statement: str, parameters: dict[str, Any]
) -> list[tuple[Any, ...]]:
    """Runs one statement in autocommit on a pooled connection, straight through the driver
    (no SQLAlchemy Connection or Session around it: on the hot path they cost more CPU than the
    statement); returns its rows once PostgreSQL has committed it.

    For statements that may run twice: a connection found dead (the server restarted) is
    discarded with every connection of its generation, and the statement is run once more on a
    new one. Driver errors leave as SQLAlchemy's (OperationalError, DataError, ...), as from
    any other query, so the API's error handlers answer them the same way.
    """
    dbapi_error = engine.dialect.loaded_dbapi.Error
    for attempt in (1, 2):
        pooled = None
        try:
            pooled = engine.raw_connection()
            connection: Any = pooled.driver_connection
            connection.autocommit = True
            try:
                with connection.cursor() as cursor:
                    cursor.execute(statement, parameters)
                    return cursor.fetchall() if cursor.description else []
            finally:
                if not connection.closed:
                    connection.autocommit = False
        except dbapi_error as error:
            disconnected = pooled is not None and engine.dialect.is_disconnect(
                error, pooled.driver_connection, None
            )
            if disconnected and pooled is not None:
                engine.pool._invalidate(pooled, error)  # as SQLAlchemy does on a disconnect
                if attempt == 1:
                    continue
            raise DBAPIError.instance(
                statement,
                parameters,
                error,
                dbapi_error,
                connection_invalidated=disconnected,
                dialect=engine.dialect,
            ) from error
        finally:
            if pooled is not None:
                pooled.close()
    raise AssertionError("unreachable")
