"""The collector's schema: the migrations that build it and the runner that applies them.

The schema is versioned (table ``schema_version``, one row per applied migration): opening a
store applies the missing migrations in order, in one transaction, and refuses a store newer
than this code. A migration is never edited once released: a change is a new one appended.
The DDL is written once, in SQLite's spelling (``REAL``, ``AUTOINCREMENT``, ``ALTER TABLE ...
ADD COLUMN``); :data:`POSTGRES_MIGRATIONS` is the same list in PostgreSQL's types
(:func:`postgres_ddl`), so a version number means the same schema on both backends.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Callable
from typing import Any

from driftwarden.core.errors import StoreError

log = logging.getLogger(__name__)

# The action statuses schema 1 accepts (the actions table's CHECK), spelled out so that the
# migration never changes: a new status needs a migration that rebuilds the table.
ACTION_STATUSES_V1 = ("pending", "done", "already", "container_gone", "failed", "refused",
                      "skipped")
_STATUSES_V1 = ", ".join(f"'{s}'" for s in ACTION_STATUSES_V1)

# MIGRATIONS[n] brings a store from schema version n to n + 1. Append, never edit.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE alerts (
            id TEXT PRIMARY KEY,
            time REAL NOT NULL,
            kind TEXT NOT NULL,
            severity INTEGER NOT NULL,
            score REAL NOT NULL,
            node TEXT NOT NULL,
            container_id TEXT,
            container_name TEXT,
            image TEXT,
            image_repo TEXT,
            image_id TEXT,
            namespace TEXT,
            pod TEXT,
            baseline_mode TEXT,
            count INTEGER NOT NULL,
            first_seen REAL NOT NULL,
            last_seen REAL NOT NULL,
            received_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            json TEXT NOT NULL)""",
        "CREATE INDEX alerts_time ON alerts (time, id)",
        "CREATE INDEX alerts_kind ON alerts (kind, time)",
        "CREATE INDEX alerts_severity ON alerts (severity, time)",
        "CREATE INDEX alerts_node ON alerts (node, time)",
        "CREATE INDEX alerts_namespace ON alerts (namespace, time)",
        "CREATE INDEX alerts_container_id ON alerts (container_id)",
        "CREATE INDEX alerts_container_name ON alerts (container_name)",
        "CREATE INDEX alerts_image ON alerts (image)",
        "CREATE INDEX alerts_image_repo ON alerts (image_repo)",
        "CREATE INDEX alerts_image_id ON alerts (image_id)",
        "CREATE INDEX alerts_last_seen ON alerts (last_seen)",
        f"""CREATE TABLE actions (
            action_id TEXT PRIMARY KEY,
            created_at REAL NOT NULL,
            container_id TEXT NOT NULL,
            container_name TEXT,
            node TEXT NOT NULL,
            type TEXT NOT NULL,
            reason TEXT NOT NULL,
            requested_by TEXT NOT NULL,
            alert_id TEXT,
            status TEXT NOT NULL CHECK (status IN ({_STATUSES_V1})),
            message TEXT NOT NULL,
            finished_at REAL)""",
        "CREATE INDEX actions_created ON actions (created_at)",
        "CREATE INDEX actions_container ON actions (container_id)",
        "CREATE INDEX actions_status ON actions (status)",
        "CREATE INDEX actions_alert ON actions (alert_id)",
        """CREATE TABLE agents (
            node TEXT PRIMARY KEY,
            agent_version TEXT,
            mode TEXT,
            connected INTEGER NOT NULL,
            connected_at REAL,
            disconnected_at REAL,
            last_seen REAL NOT NULL,
            counters TEXT NOT NULL,
            containers_watched INTEGER,
            spool_depth INTEGER,
            peer TEXT)""",
        """CREATE TABLE audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            time REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT NOT NULL,
            decision TEXT NOT NULL,
            reason TEXT NOT NULL,
            details TEXT NOT NULL)""",
        "CREATE INDEX audit_time ON audit (time)",
        """CREATE TABLE containers (
            container_id TEXT PRIMARY KEY,
            name TEXT,
            node TEXT NOT NULL,
            last_seen REAL NOT NULL)""",
        "CREATE INDEX containers_name ON containers (name)",
        "CREATE INDEX containers_last_seen ON containers (last_seen)",
    ),
    (  # 2: actions keep with_pause and whether a restart failed them; keyset paging index
        "ALTER TABLE actions ADD COLUMN with_pause INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE actions ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0",
        "DROP INDEX actions_created",
        "CREATE INDEX actions_created_id ON actions (created_at, action_id)",
    ),
    (  # 3: fleet baselines (one row per image key: summary columns + the baseline file) and
        # the baselines each agent holds
        """CREATE TABLE baselines (
            image_key TEXT PRIMARY KEY,
            image_name TEXT NOT NULL,
            mode TEXT NOT NULL,
            version INTEGER NOT NULL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            items INTEGER NOT NULL,
            unconfirmed INTEGER NOT NULL,
            windows INTEGER NOT NULL,
            containers INTEGER NOT NULL,
            nodes TEXT NOT NULL,
            learning_started_at REAL,
            last_new_item_at REAL NOT NULL,
            unstable INTEGER NOT NULL,
            carried_from TEXT,
            data BLOB NOT NULL)""",
        "CREATE INDEX baselines_name ON baselines (image_name)",
        "CREATE INDEX baselines_updated ON baselines (updated_at)",
        "ALTER TABLE agents ADD COLUMN baselines TEXT NOT NULL DEFAULT '[]'",
    ),
    (  # 4: replicas sharing one store. Every change of an alert (new, or updated by a repeat)
        # takes the next value of the 'alerts' counter as its seq; alert_order keeps each
        # alert's last one (a narrow table: numbering a batch does not rewrite its alerts'
        # rows): subscribers read and resume in that order. Existing alerts are numbered by
        # their last change.
        """CREATE TABLE alert_order (
            seq INTEGER PRIMARY KEY,
            alert_id TEXT NOT NULL)""",
        "CREATE UNIQUE INDEX alert_order_alert ON alert_order (alert_id)",
        "INSERT INTO alert_order (seq, alert_id) SELECT row_number() OVER "
        "(ORDER BY updated_at, id), id FROM alerts",
        "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO counters (name, value) SELECT 'alerts', coalesce(max(seq), 0) "
        "FROM alert_order",
        # the collector process (replica) holding the node's stream; the one an action is
        # routed to, and whether that replica has sent it to the agent
        "ALTER TABLE agents ADD COLUMN replica TEXT",
        "ALTER TABLE actions ADD COLUMN replica TEXT",
        "ALTER TABLE actions ADD COLUMN sent INTEGER NOT NULL DEFAULT 0",
        # one automatic decision per alert and action type, whichever replica makes it
        """CREATE TABLE policy_decisions (
            alert_id TEXT NOT NULL,
            action TEXT NOT NULL,
            action_id TEXT NOT NULL,
            replica TEXT NOT NULL,
            decided_at REAL NOT NULL,
            PRIMARY KEY (alert_id, action))""",
        "CREATE INDEX policy_decisions_time ON policy_decisions (decided_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)
_SCHEMA_TABLE = ("CREATE TABLE IF NOT EXISTS schema_version ("
                 "version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")

# SQLite's types as PostgreSQL's: 64-bit integers and doubles as SQLite stores them
_POSTGRES_TYPES = ((re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"),
                    "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY"),
                   (re.compile(r"\bINTEGER\b"), "BIGINT"),
                   (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
                   (re.compile(r"\bBLOB\b"), "BYTEA"))
# what PostgreSQL needs beside the shared DDL, per migration: SQLite's actions have a rowid
# that grows with each insert (list_actions' order among equal times); PostgreSQL's get a column
_POSTGRES_EXTRA: dict[int, tuple[str, ...]] = {
    1: ("ALTER TABLE actions ADD COLUMN seq BIGINT GENERATED ALWAYS AS IDENTITY",),
}


def postgres_ddl(statement: str) -> str:
    """One statement of the shared DDL in PostgreSQL's types."""
    for pattern, replacement in _POSTGRES_TYPES:
        statement = pattern.sub(replacement, statement)
    return statement


POSTGRES_MIGRATIONS: tuple[tuple[str, ...], ...] = tuple(
    tuple(postgres_ddl(s) for s in statements) + _POSTGRES_EXTRA.get(version, ())
    for version, statements in enumerate(MIGRATIONS, start=1))


def apply_migrations(execute: Callable[..., Any], path: str, clock: Callable[[], float], *,
                     postgres: bool = False) -> int:
    """Bring a store to SCHEMA_VERSION (in PostgreSQL's spelling with `postgres`), inside the
    transaction the caller holds; `execute(sql, params)` runs one statement with ``?`` marks and
    returns a cursor. Returns the version the store had. StoreError for a store newer than this
    code; `path` names it in messages, `clock` stamps each applied migration."""
    migrations = POSTGRES_MIGRATIONS if postgres else MIGRATIONS
    execute(postgres_ddl(_SCHEMA_TABLE) if postgres else _SCHEMA_TABLE, ())
    current = execute("SELECT coalesce(max(version), 0) FROM schema_version", ()).fetchone()[0]
    if current > SCHEMA_VERSION:
        raise StoreError(f"store {path} has schema version {current}, newer than "
                         f"this driftwarden supports ({SCHEMA_VERSION}): upgrade "
                         "driftwarden or use another store")
    for version in range(current + 1, SCHEMA_VERSION + 1):
        for statement in migrations[version - 1]:
            execute(statement, ())
        execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                (version, clock()))
        log.info("store %s: applied schema migration %d", path, version)
    return current


def migrate(conn: sqlite3.Connection, path: str, clock: Callable[[], float]) -> int:
    """Bring the SQLite store on `conn` (an autocommit connection) to SCHEMA_VERSION; returns
    the version it had (:func:`apply_migrations`)."""
    conn.execute("BEGIN IMMEDIATE")  # two collectors opening one new file: one migrates
    try:
        current = apply_migrations(conn.execute, path, clock)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return current


__all__ = ["ACTION_STATUSES_V1", "MIGRATIONS", "POSTGRES_MIGRATIONS", "SCHEMA_VERSION",
           "apply_migrations", "migrate", "postgres_ddl"]
