"""The collector's store in PostgreSQL: the same operations and semantics as the SQLite store
(:mod:`~driftwarden.collector.store`, whose :class:`~driftwarden.collector.store.SqlStore` runs
them), on a server several collectors can share.

A :class:`PostgresStore` opens a pool of connections (psycopg 3, ``psycopg_pool``) to the
database of a ``postgresql://USER@HOST:PORT/DB`` URL (any libpq connection string works; a
password in it is never shown in messages). Opening applies the missing schema migrations in one
transaction under an advisory lock (collectors starting together: one migrates) and refuses a
database whose schema is newer than this code.

Each call takes a connection from the pool for its statements; ``transaction()`` keeps one for
the calling thread until the block ends, and writes inside it are savepoints. Rows a write reads
and then changes are locked (``SELECT ... FOR UPDATE``), so concurrent writers (threads, or
collectors sharing the database) never lose a repeat's count or an agent's update; two inserts
of one new alert id store it once (``ON CONFLICT DO NOTHING``, then the second reads it again).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import psycopg.errors
from driftwarden.collector.migrations import SCHEMA_VERSION, apply_migrations
from driftwarden.collector.store import SqlStore, is_postgres_url, redact
from driftwarden.core.errors import StoreError
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 16  # connections at most; a call waits for a free one up to POOL_TIMEOUT
POOL_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10  # seconds, per connection attempt
_MIGRATION_LOCK = 0x64726966  # pg_advisory_xact_lock key: collectors migrate one at a time


def _marks(sql: str) -> str:
    """The shared SQL's ``?`` marks as psycopg's ``%s`` (a literal ``%`` doubled). The shared
    SQL has no ``?`` inside a string literal."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Connection:
    """A psycopg connection that reads the shared SQL (``?`` marks)."""

    __slots__ = ("_conn",)

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self._conn.execute(_marks(sql), tuple(params))


class PostgresStore(SqlStore):
    """The collector's store in a PostgreSQL database (module docstring). Thread-safe; a
    context manager. ``clock`` as :class:`~driftwarden.collector.store.AlertStore`'s."""

    _integrity_errors = (psycopg.errors.UniqueViolation,)
    _lock_rows = " FOR UPDATE"
    _insertion_order = "seq"
    _contains = "strpos({}, ?) > 0"

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time,
                 pool_size: int = DEFAULT_POOL_SIZE) -> None:
        if not isinstance(url, str) or not is_postgres_url(url):
            raise ValueError(f"a PostgreSQL store needs a postgresql://USER@HOST:PORT/DB URL, "
                             f"got {url!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be an integer >= 1, got {pool_size!r}")
        super().__init__()
        self.path = redact(url)
        self._clock = clock
        self.checkpoint_stats = {"checkpoints": 0, "errors": 0}  # nothing to checkpoint
        self._local = threading.local()  # the connection of a thread's open transaction
        self._pool: ConnectionPool | None = None
        try:  # one connection of its own first: its error says what is wrong
            with (psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                                  application_name="driftwarden-collector") as conn,
                  conn.transaction()):
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                apply_migrations(_Connection(conn).execute, self.path, clock, postgres=True)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {_one_line(exc)} (is the server "
                             "running, and does the database exist?)") from exc
        pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False,
                              timeout=POOL_TIMEOUT, name="driftwarden-store",
                              kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT,
                                      "application_name": "driftwarden-collector"})
        try:
            pool.open(wait=True, timeout=POOL_TIMEOUT)
        except psycopg.Error as exc:
            pool.close()
            raise StoreError(f"cannot open store {self.path}: {_one_line(exc)}") from exc
        self._pool = pool
        log.debug("opened store %s (schema %d)", self.path, SCHEMA_VERSION)

    @classmethod
    def open(cls, url: str, *, clock: Callable[[], float] = time.time,
             pool_size: int = DEFAULT_POOL_SIZE) -> PostgresStore:
        return cls(url, clock=clock, pool_size=pool_size)

    def _stop(self, timeout: float | None) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(timeout=5.0 if timeout is None else timeout)

    @property
    def closed(self) -> bool:
        return self._pool is None

    # - plumbing -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except psycopg.Error as exc:
            raise StoreError(f"store {self.path}: {_one_line(exc)}") from exc

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        held = getattr(self._local, "conn", None)
        if held is not None:  # inside this thread's transaction: the same connection
            yield held
            return
        pool = self._pool
        if pool is None:
            raise StoreError(f"store {self.path} is closed")
        with pool.connection() as conn:
            self._local.conn = conn
            try:
                yield conn
            finally:
                self._local.conn = None

    @contextlib.contextmanager
    def _read(self) -> Iterator[_Connection]:
        with self._errors(), self._connection() as conn:
            yield _Connection(conn)

    @contextlib.contextmanager
    def _write(self) -> Iterator[_Connection]:
        """One transaction; inside another (transaction()), a savepoint of it."""
        with self._errors(), self._connection() as conn, conn.transaction():
            yield _Connection(conn)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


__all__ = ["DEFAULT_POOL_SIZE", "PostgresStore"]
