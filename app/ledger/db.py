"""Engine and sessions. Every other module receives a Session; none creates an engine."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import psycopg
from sqlalchemy import CursorResult, Engine, Result, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InvalidatePoolError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from app.settings import Settings, get_settings

# A statement of StatementPool.transaction(): its rows.
Run = Callable[[str, dict[str, Any]], Awaitable[list[tuple[Any, ...]]]]


def make_engine(
    url: str, settings: Settings | None = None, *, ping_after_idle: float | None = None
) -> Engine:
    """An engine for ``url``; on a server, a pool of ``db_pool_size`` connections (and as many
    again on overflow) that checks a connection is alive before handing it out.

    ``ping_after_idle`` (seconds): check only a connection that has been idle longer than that
    (pool_pre_ping checks every one, a round trip per checkout). A connection that dies while
    in use is then caught when used: SQLAlchemy replaces every connection of its generation (and
    the caller may retry).
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


def held_by_another_writer(error: BaseException) -> bool:
    """SQLite has one writer at a time: another connection's transaction (in embedded mode, a
    running job's, which commits when the job does) held the lock past the busy timeout."""
    return "database is locked" in str(getattr(error, "orig", ""))


def affected_rows(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE touched: the count a compare-and-set checks."""
    return cast(CursorResult[Any], result).rowcount


class StatementPool:
    """A few psycopg AsyncConnections to one PostgreSQL database, in autocommit, for single
    statements awaited on the event loop: no thread hop, no SQLAlchemy Connection around them
    (on the busiest call both cost more CPU than the statement). A statement's rows are returned
    once PostgreSQL has committed it; transaction() runs a few in one transaction.

    At most ``size`` statements run at once; the others wait their turn here, up to ``timeout``
    seconds (then SQLAlchemy's pool TimeoutError). Few connections serve best: under load, each
    extra backend is one more process competing for the cores, and latency's tail grows with it.

    For statements that may run twice: one that finds its connection dead (the server
    restarted) runs once more on a new connection, and the idle connections, of the same age,
    are dropped too. Driver errors leave as SQLAlchemy's
    (OperationalError, DataError, ...), as from any other query, so the API answers them the
    same way. Bound to the event loop it is first used on; close() it on that loop.
    """

    def __init__(self, engine: Engine, size: int, timeout: float) -> None:
        _args, params = engine.dialect.create_connect_args(engine.url)
        params.pop("context", None)  # SQLAlchemy's adapters: psycopg's defaults here
        self._connect_params = {**params, "connect_timeout": max(1, round(timeout))}
        self._dialect = engine.dialect
        self._size = size
        self._timeout = timeout
        self._idle: list[Any] = []  # psycopg.AsyncCursor of each free connection, newest last
        self._slots: asyncio.Semaphore | None = None

    async def _take_slot(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._size)
        if self._slots.locked():  # (the timeout's own cost, only when there is a wait)
            try:
                async with asyncio.timeout(self._timeout):
                    await self._slots.acquire()
            except TimeoutError:
                raise PoolTimeout(
                    f"no connection free for a statement within {self._timeout} s"
                ) from None
        else:
            await self._slots.acquire()
        return self._slots

    async def run(self, statement: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
        """The rows of ``statement`` (one that returns rows), committed."""
        slots = await self._take_slot()
        try:
            for attempt in (1, 2):
                reused = bool(self._idle)
                try:
                    cursor = self._idle.pop() if reused else await self._connect()
                except psycopg.Error as error:
                    raise self._translate(statement, parameters, error, False) from error
                connection = cursor.connection
                try:
                    await cursor.execute(statement, parameters)
                    rows: list[tuple[Any, ...]] = await cursor.fetchall()
                except psycopg.Error as error:
                    if not (connection.broken or connection.closed):
                        self._idle.append(cursor)  # the statement failed, not the link
                        raise self._translate(statement, parameters, error, False) from error
                    await connection.close()
                    if reused and attempt == 1:
                        # A connection from before a restart, and so, likely, every idle one:
                        # all go, and the statement runs once more on a new connection.
                        await self.close()
                        continue
                    raise self._translate(statement, parameters, error, True) from error
                except BaseException:
                    await connection.close()  # cancelled mid-statement: its state is unknown
                    raise
                self._idle.append(cursor)
                return rows
            raise AssertionError("unreachable")
        finally:
            slots.release()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Run]:
        """Statements run in one transaction on one connection: committed when the block ends,
        rolled back when it raises. Not run again on a dead connection (the block may have
        acted on what it read): that error leaves as SQLAlchemy's, as from run()."""
        slots = await self._take_slot()
        try:
            try:
                cursor = self._idle.pop() if self._idle else await self._connect()
            except psycopg.Error as error:
                raise self._translate("BEGIN", {}, error, False) from error
            connection = cursor.connection

            async def run(statement: str, parameters: dict[str, Any]) -> list[tuple[Any, ...]]:
                try:
                    await cursor.execute(statement, parameters)
                    rows: list[tuple[Any, ...]] = await cursor.fetchall()
                except psycopg.Error as error:
                    lost = connection.broken or connection.closed
                    raise self._translate(statement, parameters, error, lost) from error
                return rows

            try:
                async with connection.transaction():
                    yield run
            except BaseException:
                if connection.broken or connection.closed:
                    await connection.close()
                else:
                    self._idle.append(cursor)  # rolled back: the connection is usable
                raise
            self._idle.append(cursor)
        finally:
            slots.release()

    async def _connect(self) -> Any:
        connection = await psycopg.AsyncConnection.connect(autocommit=True, **self._connect_params)
        return connection.cursor()  # kept with its connection: a cursor per call costs CPU

    def _translate(
        self, statement: str, parameters: dict[str, Any], error: Exception, lost: bool
    ) -> StatementError:
        return DBAPIError.instance(
            statement,
            parameters,
            error,
            self._dialect.loaded_dbapi.Error,
            connection_invalidated=lost,
            dialect=self._dialect,
        )

    async def close(self) -> None:
        """Closes the connections not in use (one in use rejoins the pool when its statement
        ends)."""
        idle, self._idle = self._idle, []
        for cursor in idle:
            await cursor.connection.close()
