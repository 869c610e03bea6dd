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
of one new alert id store it once (alert batches commit one at a time: the store's counter
row, :mod:`~driftwarden.collector.store`'s "store order").

Replicas: every connection of a store is named ``driftwarden-collector <replica id>``
(``application_name``), so ``live_replicas()`` reads the replicas whose store is open from
``pg_stat_activity`` (a replica killed with SIGKILL loses its connections, and with them its
place, as soon as the server sees the sockets close). What a replica announces is a
``pg_notify`` in the writing transaction (sent when it commits); ``listen()`` runs one thread
with a connection of its own that LISTENs to the store's channels and hands every notification
on (after each (re)connection, one with an empty payload on each channel: notifications may
have been missed meanwhile).
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
from driftwarden.collector.store import (
    ACTIONS_CHANNEL,
    ALERTS_CHANNEL,
    SqlStore,
    is_postgres_url,
    redact,
)
from driftwarden.core.errors import StoreError
from driftwarden.core.lifecycle import Service
from psycopg_pool import ConnectionPool

log = logging.getLogger(__name__)

DEFAULT_POOL_SIZE = 16  # connections at most; a call waits for a free one up to POOL_TIMEOUT
POOL_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10  # seconds, per connection attempt
APPLICATION = "driftwarden-collector"  # application_name; a replica's adds its id
LISTEN_RETRY = 1.0  # seconds between attempts to reconnect the listening connection
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
    _shared = True

    def __init__(self, url: str, *, clock: Callable[[], float] = time.time,
                 pool_size: int = DEFAULT_POOL_SIZE) -> None:
        if not isinstance(url, str) or not is_postgres_url(url):
            raise ValueError(f"a PostgreSQL store needs a postgresql://USER@HOST:PORT/DB URL, "
                             f"got {url!r}")
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError(f"pool_size must be an integer >= 1, got {pool_size!r}")
        super().__init__()
        self.path = redact(url)
        self._url = url
        self._application = f"{APPLICATION} {self.replica_id}"
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
                                      "application_name": self._application})
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

    # - replicas -----------------------------------------------------------------------------

    def _announce(self, conn: _Connection, channel: str, payload: str) -> None:
        conn.execute("SELECT pg_notify(?, ?)", (channel, payload))

    def live_replicas(self) -> set[str]:
        prefix = f"{APPLICATION} "
        with self._read() as conn:
            rows = conn.execute("SELECT DISTINCT application_name FROM pg_stat_activity "
                                "WHERE datname = current_database() AND "
                                "substr(application_name, 1, ?) = ?",
                                (len(prefix), prefix)).fetchall()
        return {r[0][len(prefix):] for r in rows} | {self.replica_id}

    def listen(self, on_message: Callable[[str, str], None]) -> _Listener:
        return _Listener(self._url, self.path, self._application, on_message).start()

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


class _Listener(Service):
    """One thread LISTENing to the store's channels on a connection of its own (module
    docstring)."""

    def __init__(self, url: str, path: str, application: str,
                 on_message: Callable[[str, str], None]) -> None:
        super().__init__()
        self._url = url
        self._path = path
        self._application = application
        self._on_message = on_message
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="driftwarden-store-listen",
                                        daemon=True)
        self.connected = threading.Event()  # LISTENing now

    def _start(self) -> None:
        self._thread.start()

    def _stop(self, timeout: float | None) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        failing = False
        while not self._stopping.is_set():
            try:
                self._listen()
                failing = False
            except psycopg.Error as exc:
                self.connected.clear()
                if not failing:
                    log.warning("store %s: listening for other replicas failed (%s); "
                                "retrying every %g s", self._path, _one_line(exc), LISTEN_RETRY)
                failing = True
                self._stopping.wait(LISTEN_RETRY)
            except Exception:  # a bug in a handler: keep listening
                log.exception("store %s: a notification handler failed", self._path)

    def _listen(self) -> None:
        with psycopg.connect(self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                             application_name=self._application) as conn:
            for channel in (ALERTS_CHANNEL, ACTIONS_CHANNEL):
                conn.execute(f"LISTEN {channel}")
            self.connected.set()
            for channel in (ALERTS_CHANNEL, ACTIONS_CHANNEL):  # what may have been missed
                self._on_message(channel, "")
            while not self._stopping.is_set():
                for note in conn.notifies(timeout=0.5):
                    self._on_message(note.channel, note.payload)
                    if self._stopping.is_set():
                        break


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


__all__ = ["DEFAULT_POOL_SIZE", "PostgresStore"]
