"""The collector's SQLite schema: the migrations that build it and the runner that applies them.

The schema is versioned (table ``schema_version``, one row per applied migration): opening a
store applies the missing migrations in order, in one transaction, and refuses a store newer
than this code. A migration is never edited once released: a change is a new one appended.
The DDL is SQLite's (``REAL``, ``AUTOINCREMENT``, ``ALTER TABLE ... ADD COLUMN``); another
backend keeps its own list next to its store.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

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
)
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, path: str, clock: Callable[[], float]) -> int:
    """Bring the store on `conn` (an autocommit connection) to SCHEMA_VERSION; returns the
    version it had. StoreError for a store newer than this code; `path` names it in messages,
    `clock` stamps each applied migration."""
    conn.execute("BEGIN IMMEDIATE")  # two collectors opening one new file: one migrates
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                     "version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version"
                               ).fetchone()[0]
        if current > SCHEMA_VERSION:
            raise StoreError(f"store {path} has schema version {current}, newer than "
                             f"this driftwarden supports ({SCHEMA_VERSION}): upgrade "
                             "driftwarden or use another store file")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                         (version, clock()))
            log.info("store %s: applied schema migration %d", path, version)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return current


__all__ = ["ACTION_STATUSES_V1", "MIGRATIONS", "SCHEMA_VERSION", "migrate"]
