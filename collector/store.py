"""The collector's store: alerts, actions, agents, known containers and the audit log.

:class:`CollectorStore` is what the collector asks of a store (the service, the server and the
command use nothing else); :func:`open_store` opens the backend the collector's flags name.
:class:`AlertStore` is the SQLite backend, the embedded default;
:class:`~driftwarden.collector.store_pg.PostgresStore` keeps the same data in PostgreSQL. The
records, the outcomes, the checks of what a caller gives and the operations themselves
(:class:`SqlStore`, in SQL that SQLite and PostgreSQL both read) are written once; what is
SQLite's (the connection, its pragmas and transactions, the background WAL checkpoints) is in
the SQLite section below, the schema of both in :mod:`~driftwarden.collector.migrations`. The
filter language and the page tokens every backend reads are in
:mod:`~driftwarden.collector.filters`. Every backend keeps these semantics:

Alerts
    An alert is the dict of ``driftwarden.core.alerts.Alert.to_dict()`` plus a top-level ``"node"``
    (the agent's node name). The store keeps one row per alert id; the row's columns serve the
    filters and the full dict is kept as JSON and returned as stored.

Repeated ids (what ``insert_alerts`` returns per alert, in order)
    - ``NEW``: the id was not stored: the alert is stored as given.
    - ``DUPLICATE``: the id is stored and the delivery's ``last_seen`` is not later than the
      stored ``last_seen``: nothing changes. This is a replay after a reconnect (same
      ``last_seen``), and also an older aggregate arriving after a newer one (its count is lost:
      agents replay their spool in order, so this does not happen in practice).
    - ``UPDATED``: the id is stored and the delivery's ``last_seen`` is later: the delivery is an
      aggregate of repeats the agent folded since its previous send, so
      ``count`` = stored count + delivered count, ``first_seen`` = the earlier of the two,
      ``last_seen`` = the delivery's. Everything else (severity, score, reasons, process, events,
      container fields) comes from the delivery, except ``time``, which stays the first
      delivery's: an alert keeps its place in time order, so paging cursors stay valid.
    A batch is processed in order, so a batch may hold the same id several times; a batch is
    one transaction (all stored or none).

Listing (``list_alerts``)
    Newest first by ``(time, id)`` (both descending), paged with a keyset cursor
    (:func:`~driftwarden.collector.filters.encode_page_token`). A page never repeats an alert
    of an earlier page and never skips one that was stored when the walk started; alerts stored
    during the walk appear in it when they sort after the cursor (an older ``time``) and not
    when they sort before it (newer ones: start a new walk to see them).
    ``time`` bounds: ``since <= time < until``.

Actions
    One row per action, with the operator's or policy's ``with_pause``. ``page_actions`` pages
    newest first by ``(created_at, action_id)`` with the same kind of keyset token as alerts.
    ``fail_pending_actions`` (the collector calls it at start) fails the actions a stopped
    collector left pending, marked ``interrupted``: the agent's late result replaces that guess.

Transactions
    ``transaction()`` groups several writes into one (all or none); a write inside it is a
    savepoint, so the block may catch one write's error and go on.

Store order (``seq``)
    Every change of an alert (NEW or UPDATED; a DUPLICATE changes nothing) takes the next
    value of one counter as the alert's ``seq`` (``store_alerts`` returns it), so ``seq`` grows
    with every change, the store order (table ``alert_order``) holds each alert's last one, and
    ``alerts_after(seq)`` reads the changes after a point in store order: what subscribers
    follow and resume from. The counter's row is locked by the batch's transaction from its
    numbering (at its end) to its commit, so batches (of any replica sharing the store) commit
    in seq order: a reader that sees seq N sees every change before it, and a batch that rolls
    back leaves no hole. Only the numbering and the commit are serialized (three statements);
    batches do their inserts side by side.

Replicas (collector processes sharing a store)
    Each opened store is one replica with its own ``replica_id`` (a random uuid).
    ``live_replicas()`` names those whose store is open now. An agent's row names the replica
    holding its stream; an action the replica that must send it (``claim_action`` lets it do
    so once). ``mark_all_agents_disconnected`` and ``fail_pending_actions`` (at start) only
    touch what replicas that are gone left behind. ``claim_decision`` makes one automatic
    decision per alert and action type across replicas.

Retention (``prune``)
    Deletes alerts whose ``last_seen`` is older than the cutoff (an alert that still repeats is
    kept), audit entries whose ``time`` is older, and known containers not seen since the cutoff.
    Actions and agents are kept. Audit sequence numbers are never reused.

Containers (``find_container``)
    Each stored alert with a container id records (container id, name, node, last_seen) in the
    ``containers`` table. Operators name a container by its full id, its name, or a unique id
    prefix of at least ``MIN_ID_PREFIX`` characters, tried in that order (as Docker does). A name
    used by several containers on one node means the latest seen; on several nodes it is
    ambiguous.

Fleet baselines
    One baseline per image key (:class:`~driftwarden.core.baselines.FleetBaseline`), kept as
    the baseline file (``pack_baseline``) with its summary's columns beside it, so that
    ``list_baselines`` (newest change first) reads no file. ``put_baseline`` is compare-and-set
    on the version: a writer states the version it read (None: the image has none yet), so
    two collectors never lose each other's merge. Baselines are never pruned. Each agent's row
    also keeps the baselines it holds (``upsert_agent(baselines=...)``).

SQLite
    One :class:`AlertStore` owns one SQLite file (WAL journal, ``synchronous=NORMAL``) through
    one connection guarded by a lock, so any thread of the gRPC server may call it. Every write
    is one ``BEGIN IMMEDIATE`` transaction. Opening a store applies the missing schema
    migrations (:mod:`~driftwarden.collector.migrations`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import itertools
import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from driftwarden.collector.filters import (
    MIN_ID_PREFIX,
    ActionFilter,
    AlertFilter,
    decode_page_token,
    encode_page_token,
    finite_number,
    image_repository,
    sql_marks,
)
from driftwarden.collector.migrations import SCHEMA_VERSION, migrate
from driftwarden.core.actions import ActionStatus
from driftwarden.core.alerts import AlertKind, Severity
from driftwarden.core.baselines import (
    BaselineSummary,
    FleetBaseline,
    HeldBaseline,
    pack_baseline,
    unpack_baseline,
)
from driftwarden.core.errors import (
    AmbiguousContainer,
    BaselineError,
    StoreError,
    UnknownAction,
    UnknownContainer,
)
from driftwarden.core.lifecycle import Service
from driftwarden.core.modes import Mode

log = logging.getLogger(__name__)

MAX_PAGE_SIZE = 1000
MAX_CANDIDATES = 10  # listed in AmbiguousContainer / UnknownContainer
# what replicas announce to each other (PostgreSQL LISTEN/NOTIFY channels)
ALERTS_CHANNEL = "driftwarden_alerts"  # payload: the replica that stored alert changes
ACTIONS_CHANNEL = "driftwarden_actions"  # payload: "send <action id>" or "done <action id>"


# -- records -------------------------------------------------------------------------------------


class ContainerMatch(NamedTuple):
    container_id: str
    name: str | None
    node: str

    def describe(self) -> str:
        name = self.name or "?"
        return f"{name} ({self.container_id[:12]}) on {self.node}"


class InsertOutcome(enum.StrEnum):
    """What ``insert_alerts`` did with one alert (module docstring: repeated ids)."""

    NEW = "new"
    UPDATED = "updated"
    DUPLICATE = "duplicate"


@dataclass(frozen=True)
class ActionRecord:
    action_id: str
    created_at: float
    container_id: str
    container_name: str | None
    node: str
    type: str
    reason: str
    requested_by: str  # an operator's name, or "policy"
    alert_id: str | None
    status: ActionStatus
    message: str
    finished_at: float | None
    with_pause: bool = False  # quarantine: also pause the container
    interrupted: bool = False  # failed by a collector restart: the agent's result may follow

    @property
    def finished(self) -> bool:
        return self.status is not ActionStatus.PENDING

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["status"] = self.status.value
        return out


@dataclass(frozen=True)
class AgentRecord:
    node: str
    agent_version: str | None
    mode: str | None
    connected: bool
    connected_at: float | None
    disconnected_at: float | None
    last_seen: float
    counters: dict[str, Any]
    containers_watched: int | None
    spool_depth: int | None
    peer: str | None
    baselines: tuple[HeldBaseline, ...] = ()  # the fleet baselines it holds, as last known
    replica: str | None = None  # the collector process holding its stream (replica_id)


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    time: float
    actor: str
    action: str
    target: str
    decision: str
    reason: str
    details: dict[str, Any]


@dataclass(frozen=True)
class PruneResult:
    alerts: int
    audit: int
    containers: int


# -- the interface -------------------------------------------------------------------------------


class CollectorStore(Protocol):
    """What the collector asks of its store, whatever keeps it (module docstring for the
    semantics). Every method may be called from any thread; a failure of the store itself
    raises StoreError, a bad argument ValueError."""

    path: str  # where the store is, for messages (a file name, a server address)
    checkpoint_stats: dict[str, int]  # background maintenance: "checkpoints", "errors"

    def close(self) -> None: ...

    def transaction(self) -> contextlib.AbstractContextManager[None]: ...

    replica_id: str  # this collector process among the replicas sharing the store

    def insert_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> list[InsertOutcome]: ...

    def store_alerts(self, alerts: Sequence[Mapping[str, Any]],
                     ) -> list[tuple[InsertOutcome, int | None]]: ...

    def last_alert_seq(self) -> int: ...

    def alerts_after(self, seq: int, alert_filter: AlertFilter | None = None,
                     limit: int = MAX_PAGE_SIZE) -> list[tuple[int, dict[str, Any]]]: ...

    def live_replicas(self) -> set[str]: ...

    def listen(self, on_message: Callable[[str, str], None]) -> Service | None: ...

    def claim_action(self, action_id: str) -> ActionRecord | None: ...

    def announce_action(self, event: str, action_id: str, *details: str) -> None: ...

    def routed_actions(self) -> list[str]: ...

    def claim_decision(self, alert_id: str, action: str, action_id: str, *,
                       now: float | None = None) -> bool: ...

    def get_agent(self, node: str) -> AgentRecord | None: ...

    def get_alert(self, alert_id: str) -> dict[str, Any] | None: ...

    def get_alerts(self, alert_ids: Sequence[str]) -> dict[str, dict[str, Any]]: ...

    def list_alerts(self, alert_filter: AlertFilter | None = None, page_size: int = 100,
                    page_token: str | None = None,
                    ) -> tuple[list[dict[str, Any]], str | None]: ...

    def record_action(self, *, container_id: str, node: str, type: str, reason: str,
                      requested_by: str, container_name: str | None = None,
                      alert_id: str | None = None,
                      status: ActionStatus | str = ActionStatus.PENDING, message: str = "",
                      with_pause: bool = False, action_id: str | None = None,
                      now: float | None = None, replica: str | None = None,
                      ) -> ActionRecord: ...

    def finish_action(self, action_id: str, status: ActionStatus | str, message: str = "", *,
                      now: float | None = None) -> ActionRecord: ...

    def fail_pending_actions(self, message: str, *, actor: str = "collector",
                             now: float | None = None) -> list[ActionRecord]: ...

    def get_action(self, action_id: str) -> ActionRecord | None: ...

    def page_actions(self, action_filter: ActionFilter | None = None, page_size: int = 100,
                     page_token: str | None = None,
                     ) -> tuple[list[ActionRecord], str | None]: ...

    def upsert_agent(self, node: str, *, agent_version: str | None = None,
                     mode: str | None = None, peer: str | None = None,
                     counters: Mapping[str, Any] | None = None,
                     containers_watched: int | None = None, spool_depth: int | None = None,
                     baselines: Sequence[HeldBaseline] | None = None,
                     now: float | None = None, replica: str | None = None) -> AgentRecord: ...

    def mark_agent_disconnected(self, node: str, *, peer: str | None = None,
                                baselines: Sequence[HeldBaseline] | None = None,
                                now: float | None = None, replica: str | None = None,
                                ) -> bool: ...

    def mark_all_agents_disconnected(self, *, now: float | None = None) -> int: ...

    def list_agents(self, *, connected: bool | None = None) -> list[AgentRecord]: ...

    def audit(self, actor: str, action: str, target: str, decision: str, reason: str = "",
              details: Mapping[str, Any] | None = None, *, now: float | None = None) -> int: ...

    def find_container(self, text: str) -> ContainerMatch: ...

    def note_containers(self, containers: Sequence[ContainerMatch], *,
                        now: float | None = None) -> None: ...

    def get_baseline(self, image_key: str) -> FleetBaseline | None: ...

    def put_baseline(self, doc: FleetBaseline, *, expect_version: int | None) -> None: ...

    def list_baselines(self) -> list[BaselineSummary]: ...

    def prune(self, older_than_seconds: float, now: float | None = None) -> PruneResult: ...

    def stats(self) -> dict[str, int]: ...


# -- what every backend checks before it writes --------------------------------------------------


@dataclass(frozen=True, slots=True)
class _AlertRow:
    id: str
    time: float
    kind: str
    severity: int
    score: float
    node: str
    container_id: str | None
    container_name: str | None
    image: str | None
    image_repo: str | None
    image_id: str | None
    namespace: str | None
    pod: str | None
    baseline_mode: str | None
    count: int
    first_seen: float
    last_seen: float
    text: str  # the alert as JSON, validated



def _parse_alert(doc: Any, index: int) -> _AlertRow:
    if not isinstance(doc, Mapping):
        raise ValueError(f"alert #{index}: expected a dict (Alert.to_dict() plus 'node'), "
                         f"got {type(doc).__name__}")
    alert_id = doc.get("id")
    where = f"alert #{index} (id {alert_id!r})"
    if not isinstance(alert_id, str) or not alert_id:
        raise ValueError(f"alert #{index}: 'id' must be a non-empty string, got {alert_id!r}")

    def fail(what: str) -> ValueError:
        return ValueError(f"{where}: {what}")

    when = doc.get("time")
    if not finite_number(when):
        raise fail(f"'time' must be a finite number of seconds, got {when!r}")
    try:
        kind = AlertKind(doc.get("kind")).value
    except ValueError:
        names = ", ".join(k.value for k in AlertKind)
        raise fail(f"'kind' must be one of {names}, got {doc.get('kind')!r}") from None
    severity_text = doc.get("severity")
    if not isinstance(severity_text, str):
        raise fail(f"'severity' must be a string, got {severity_text!r}")
    try:
        severity = Severity.parse(severity_text)
    except ValueError as exc:
        raise fail(str(exc)) from None
    score = doc.get("score")
    if not finite_number(score):
        raise fail(f"'score' must be a finite number, got {score!r}")
    node = doc.get("node")
    if not isinstance(node, str) or not node:
        raise fail(f"'node' must be the agent's node name, got {node!r}")
    container = doc.get("container")
    if container is None:
        container = {}
    if not isinstance(container, Mapping):
        raise fail(f"'container' must be a dict or null, got {type(container).__name__}")
    fields: dict[str, str | None] = {}
    for key in ("id", "name", "image", "image_id", "image_digest", "pod", "namespace",
                "pod_uid", "workload"):
        value = container.get(key)
        if value is not None and not isinstance(value, str):
            raise fail(f"'container.{key}' must be a string or null, got {value!r}")
        fields[key] = value or None  # "" is as unknown as null
    mode = doc.get("baseline_mode")
    if mode is not None and not isinstance(mode, str):
        raise fail(f"'baseline_mode' must be a string or null, got {mode!r}")
    count = doc.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise fail(f"'count' must be an integer >= 1, got {count!r}")
    first_seen = doc.get("first_seen", when)
    last_seen = doc.get("last_seen", when)
    if first_seen is None:
        first_seen = when
    if last_seen is None:
        last_seen = when
    if not finite_number(first_seen) or not finite_number(last_seen):
        raise fail(f"'first_seen' and 'last_seen' must be finite numbers, "
                   f"got {first_seen!r} and {last_seen!r}")
    if first_seen > last_seen:
        raise fail(f"'first_seen' ({first_seen}) is after 'last_seen' ({last_seen})")
    out = dict(doc)
    out["first_seen"], out["last_seen"], out["count"] = first_seen, last_seen, count
    try:
        text = json.dumps(out, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise fail(f"not JSON-serialisable: {exc}") from None
    image = fields["image"]
    return _AlertRow(
        id=alert_id, time=float(when), kind=kind, severity=int(severity), score=float(score),
        node=node, container_id=fields["id"], container_name=fields["name"], image=image,
        image_repo=image_repository(image) if image else None, image_id=fields["image_id"],
        namespace=fields["namespace"], pod=fields["pod"], baseline_mode=mode, count=count,
        first_seen=float(first_seen), last_seen=float(last_seen), text=text)


def _json_text(what: str, value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from None


def _text(what: str, value: Any, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str) or (not value and not empty_ok):
        raise ValueError(f"{what} must be a {'' if empty_ok else 'non-empty '}string, "
                         f"got {value!r}")
    return value


def _optional_text(what: str, value: Any) -> str | None:
    return None if value is None else _text(what, value)


def _limit(value: Any, what: str = "limit") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PAGE_SIZE:
        raise ValueError(f"{what} must be an integer from 1 to {MAX_PAGE_SIZE}, got {value!r}")
    return value


# -- the SQL every backend runs ----------------------------------------------------------------

_ACTION_COLUMNS = ("action_id, created_at, container_id, container_name, node, type, reason, "
                   "requested_by, alert_id, status, message, finished_at, with_pause, "
                   "interrupted")
_AGENT_FIELDS = ("node", "agent_version", "mode", "connected", "connected_at",
                 "disconnected_at", "last_seen", "counters", "containers_watched", "spool_depth",
                 "peer", "baselines", "replica")
_AGENT_COLUMNS = ", ".join(_AGENT_FIELDS)
_UPSERT_CONTAINER = (
    "INSERT INTO containers (container_id, name, node, last_seen) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (container_id) DO UPDATE SET "
    "name = coalesce(excluded.name, containers.name), node = excluded.node, "
    "last_seen = excluded.last_seen WHERE excluded.last_seen >= containers.last_seen")
_BASELINE_COLUMNS = ("image_key, image_name, mode, version, created_at, updated_at, items, "
                     "unconfirmed, windows, containers, nodes, learning_started_at, "
                     "last_new_item_at, unstable, carried_from")


def _action(row: tuple[Any, ...]) -> ActionRecord:
    (action_id, created_at, container_id, container_name, node, kind, reason, requested_by,
     alert_id, status, message, finished_at, with_pause, interrupted) = row
    return ActionRecord(action_id=action_id, created_at=created_at, container_id=container_id,
                        container_name=container_name, node=node, type=kind, reason=reason,
                        requested_by=requested_by, alert_id=alert_id,
                        status=ActionStatus(status), message=message, finished_at=finished_at,
                        with_pause=bool(with_pause), interrupted=bool(interrupted))


def _action_values(record: ActionRecord) -> tuple[Any, ...]:
    """`record` as the row _ACTION_COLUMNS lists."""
    return (record.action_id, record.created_at, record.container_id, record.container_name,
            record.node, record.type, record.reason, record.requested_by, record.alert_id,
            record.status.value, record.message, record.finished_at, int(record.with_pause),
            int(record.interrupted))


def _agent(row: tuple[Any, ...]) -> AgentRecord:
    (node, version, mode, connected, connected_at, disconnected_at, last_seen, counters,
     watched, spool, peer, baselines, replica) = row
    return AgentRecord(node=node, agent_version=version, mode=mode, connected=bool(connected),
                       connected_at=connected_at, disconnected_at=disconnected_at,
                       last_seen=last_seen, counters=json.loads(counters),
                       containers_watched=watched, spool_depth=spool, peer=peer,
                       replica=replica,
                       baselines=tuple(HeldBaseline(key, version, Mode(held_mode))
                                       for key, version, held_mode in json.loads(baselines)))


def _held_text(baselines: Sequence[HeldBaseline]) -> str:
    for held in baselines:
        if not isinstance(held, HeldBaseline) or not held.image_key \
                or type(held.version) is not int or held.version < 0:
            raise ValueError(f"baselines: expected HeldBaseline entries, got {held!r}")
    return json.dumps([[h.image_key, h.version, Mode(h.mode).value] for h in baselines])


def _baseline_summary(row: tuple[Any, ...]) -> BaselineSummary:
    (key, name, mode, version, created_at, updated_at, items, unconfirmed, windows,
     containers, nodes, learning_started_at, last_new_item_at, unstable, carried_from) = row
    return BaselineSummary(
        image_key=key, image_name=name, mode=Mode(mode), version=version, items=items,
        unconfirmed=unconfirmed, windows=windows, containers=containers,
        nodes=tuple(json.loads(nodes)), created_at=created_at, updated_at=updated_at,
        learning_started_at=learning_started_at, carried_from=carried_from,
        last_new_item_at=last_new_item_at, unstable=bool(unstable))


class SqlStore(Service):
    """The operations every SQL backend shares (module docstring), written once in the SQL that
    SQLite and PostgreSQL both read, with ``?`` marks. A backend gives the connection
    (``_read()``: a connection; ``_write()``: a transaction, a savepoint inside another), the
    class of its driver's unique-constraint error, and the few spellings that differ."""

    path: str
    checkpoint_stats: dict[str, int]
    _clock: Callable[[], float]
    _integrity_errors: tuple[type[BaseException], ...] = ()
    _lock_rows = ""  # appended to a SELECT whose rows the transaction then changes
    _insertion_order = "rowid"  # a column that grows with every inserted action
    _contains = "instr({}, ?) > 0"  # the text in `?` occurs in the expression {}
    _shared = False  # other collector processes may use the store (replicas)

    def __init__(self) -> None:
        super().__init__()
        self.replica_id = uuid.uuid4().hex  # this collector process among those of a store

    def _read(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    def _announce(self, conn: Any, channel: str, payload: str) -> None:
        """Tell the other replicas, when the transaction on `conn` commits (nothing to tell
        for a store only one process uses)."""

    def live_replicas(self) -> set[str]:
        """The replicas whose store is open now (this one only, for SQLite)."""
        return {self.replica_id}

    def listen(self, on_message: Callable[[str, str], None]) -> Service | None:
        """Call ``on_message(channel, payload)`` for what other replicas announce (a started
        service of its own; stop it before closing the store). None when no other replica
        can share this store."""
        return None

    def _write(self) -> contextlib.AbstractContextManager[Any]:
        raise NotImplementedError

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """Make the writes of the block one transaction: all are stored, or (when the block
        raises) none. Writes inside may nest their own (a failed one undoes only itself when
        the block catches its error). Other threads wait for the store until the block ends:
        keep it short, and call nothing that waits for another thread."""
        with self._write():
            yield

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else float(now)

    def schema_version(self) -> int:
        with self._read() as conn:
            return conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]

    # - alerts -------------------------------------------------------------------------------

    def insert_alert(self, alert: Mapping[str, Any]) -> InsertOutcome:
        return self.insert_alerts([alert])[0]

    def insert_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> list[InsertOutcome]:
        """Store a batch in one transaction; one outcome per alert, in order (module docstring).

        Every alert is validated first: a ValueError names the first bad one and nothing is
        stored.
        """
        return [outcome for outcome, _ in self.store_alerts(alerts)]

    def store_alerts(self, alerts: Sequence[Mapping[str, Any]],
                     ) -> list[tuple[InsertOutcome, int | None]]:
        """:meth:`insert_alerts`, with the seq each NEW or UPDATED alert took (None for a
        DUPLICATE)."""
        rows = [_parse_alert(doc, i) for i, doc in enumerate(alerts)]
        if not rows:
            return []
        with self._write() as conn:
            received_at = self._clock()
            outcomes = [self._insert_row(conn, row, received_at) for row in rows]
            changes = sum(o is not InsertOutcome.DUPLICATE for o in outcomes)
            if not changes:
                return [(o, None) for o in outcomes]
            # last: the counter's row lock, held from here to the commit, orders the commits
            # of alert batches (module docstring); taken after the batch's own work, it is
            # held for three statements, whatever the batch's size
            last = conn.execute("UPDATE counters SET value = value + ? WHERE name = 'alerts' "
                                "RETURNING value", (changes,)).fetchone()[0]
            seqs = iter(range(last - changes + 1, last + 1))
            out = [(o, None if o is InsertOutcome.DUPLICATE else next(seqs)) for o in outcomes]
            final = {row.id: seq for row, (_, seq) in zip(rows, out, strict=True)
                     if seq is not None}  # an id changed twice: its last change
            items = [(seq, alert_id) for alert_id, seq in final.items()]
            for start in range(0, len(items), 400):  # SQLite's bound on parameters
                chunk = items[start:start + 400]
                conn.execute("INSERT INTO alert_order (seq, alert_id) VALUES "
                             + ", ".join("(?, ?)" for _ in chunk),
                             tuple(itertools.chain.from_iterable(chunk)))
            self._announce(conn, ALERTS_CHANNEL, self.replica_id)
            return out

    def _insert_row(self, conn: Any, row: _AlertRow, received_at: float) -> InsertOutcome:
        """Store one alert (store_alerts numbers the batch's changes after)."""
        stored = conn.execute("SELECT time, count, first_seen, last_seen FROM alerts "
                              f"WHERE id = ?{self._lock_rows}", (row.id,)).fetchone()
        if stored is not None and row.last_seen <= stored[3]:
            return InsertOutcome.DUPLICATE
        text = row.text
        if stored is None:
            when, count, first_seen = row.time, row.count, row.first_seen
        else:
            when, count, first_seen = stored[0], stored[1] + row.count, min(stored[2],
                                                                            row.first_seen)
            doc = {**json.loads(text), "time": when, "count": count, "first_seen": first_seen}
            text = json.dumps(doc, ensure_ascii=False)
        values = (row.kind, row.severity, row.score, row.node, row.container_id,
                  row.container_name, row.image, row.image_repo, row.image_id, row.namespace,
                  row.pod, row.baseline_mode, count, first_seen, row.last_seen, received_at,
                  text, row.id)
        if stored is None:
            inserted = conn.execute(
                "INSERT INTO alerts (kind, severity, score, node, container_id, container_name, "
                "image, image_repo, image_id, namespace, pod, baseline_mode, count, first_seen, "
                "last_seen, updated_at, json, id, time, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO NOTHING", (*values, when, received_at)).rowcount
            if inserted == 0:  # another transaction stored the id since our read: read it again
                return self._insert_row(conn, row, received_at)
        else:
            conn.execute(
                "UPDATE alerts SET kind = ?, severity = ?, score = ?, node = ?, container_id = ?, "
                "container_name = ?, image = ?, image_repo = ?, image_id = ?, namespace = ?, "
                "pod = ?, baseline_mode = ?, count = ?, first_seen = ?, last_seen = ?, "
                "updated_at = ?, json = ? WHERE id = ?", values)
            # its earlier change leaves the store order (store_alerts numbers this one)
            conn.execute("DELETE FROM alert_order WHERE alert_id = ?", (row.id,))
        if row.container_id is not None:
            conn.execute(_UPSERT_CONTAINER,
                         (row.container_id, row.container_name, row.node, row.last_seen))
        return InsertOutcome.NEW if stored is None else InsertOutcome.UPDATED

    def last_alert_seq(self) -> int:
        """The seq of the last committed alert change (0: none yet)."""
        with self._read() as conn:
            return int(conn.execute("SELECT value FROM counters WHERE name = 'alerts'"
                                    ).fetchone()[0])

    def alerts_after(self, seq: int, alert_filter: AlertFilter | None = None,
                     limit: int = MAX_PAGE_SIZE) -> list[tuple[int, dict[str, Any]]]:
        """Up to `limit` alerts whose last change came after `seq`, in store order, as
        (seq, alert); with `alert_filter`, only those it matches."""
        where, params = (alert_filter or AlertFilter()).sql()
        with self._read() as conn:
            rows = conn.execute("SELECT alert_order.seq, alerts.json FROM alert_order JOIN "
                                "alerts ON alerts.id = alert_order.alert_id WHERE "
                                f"alert_order.seq > ? AND ({where}) ORDER BY alert_order.seq "
                                "LIMIT ?", (int(seq), *params, _limit(limit))).fetchall()
        return [(int(r[0]), json.loads(r[1])) for r in rows]

    def get_alert(self, alert_id: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute("SELECT json FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def get_alerts(self, alert_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The stored alerts among `alert_ids`, by id, in one query."""
        ids = list(dict.fromkeys(alert_ids))
        out: dict[str, dict[str, Any]] = {}
        with self._read() as conn:
            for start in range(0, len(ids), 500):  # SQLite's bound on parameters
                chunk = ids[start:start + 500]
                out.update((r[0], json.loads(r[1])) for r in conn.execute(
                    f"SELECT id, json FROM alerts WHERE id IN ({sql_marks(chunk)})", chunk))
        return out

    def list_alerts(self, alert_filter: AlertFilter | None = None, page_size: int = 100,
                    page_token: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """One page of alerts, newest first, and the token of the next page (None: no more).

        An empty or None token starts at the newest alert. A token is only valid with the
        filter it was issued for; anything else raises ValueError.
        """
        alert_filter = alert_filter or AlertFilter()
        rows, token = self._page("alerts", ("time", "id"), "json", alert_filter.sql(),
                                 alert_filter.fingerprint(), page_size, page_token)
        return [json.loads(r[2]) for r in rows], token

    def count_alerts(self, alert_filter: AlertFilter | None = None) -> int:
        where, params = (alert_filter or AlertFilter()).sql()
        with self._read() as conn:
            return conn.execute(f"SELECT count(*) FROM alerts WHERE {where}", params
                                ).fetchone()[0]

    def _page(self, table: str, key: tuple[str, str], columns: str,
              where: tuple[str, list[Any]], fingerprint: str, page_size: int,
              page_token: str | None) -> tuple[list[tuple[Any, ...]], str | None]:
        """Keyset paging, newest first by `key` (a time column, then a unique id): rows of
        (time, id, *columns) and the next page's token (None on the last page)."""
        page_size = _limit(page_size, "page_size")
        clause, params = where
        if page_token:
            when, last_id = decode_page_token(page_token, fingerprint)
            clause = f"({clause}) AND ({key[0]}, {key[1]}) < (?, ?)"
            params = [*params, when, last_id]
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT {key[0]}, {key[1]}, {columns} FROM {table} WHERE {clause} "
                f"ORDER BY {key[0]} DESC, {key[1]} DESC LIMIT ?",
                (*params, page_size + 1)).fetchall()
        page = rows[:page_size]
        token = None
        if len(rows) > page_size:
            token = encode_page_token(page[-1][0], page[-1][1], fingerprint)
        return page, token

    # - actions ------------------------------------------------------------------------------

    def record_action(self, *, container_id: str, node: str, type: str, reason: str,
                      requested_by: str, container_name: str | None = None,
                      alert_id: str | None = None,
                      status: ActionStatus | str = ActionStatus.PENDING, message: str = "",
                      with_pause: bool = False, action_id: str | None = None,
                      now: float | None = None, replica: str | None = None) -> ActionRecord:
        """Store a requested action (``pending``), or one decided at once (e.g. ``skipped``,
        which is then also finished). ``action_id`` defaults to a random hex id; an id already
        stored raises StoreError. `replica`: the one that sends it (default this one)."""
        status = ActionStatus.parse(status)
        created_at = self._now(now)
        if not isinstance(with_pause, bool):
            raise ValueError(f"with_pause must be True or False, got {with_pause!r}")
        record = ActionRecord(
            action_id=uuid.uuid4().hex if action_id is None else _text("action_id", action_id),
            created_at=created_at, container_id=_text("container_id", container_id),
            container_name=_optional_text("container_name", container_name),
            node=_text("node", node), type=_text("type", type),
            reason=_text("reason", reason, empty_ok=True),
            requested_by=_text("requested_by", requested_by),
            alert_id=_optional_text("alert_id", alert_id), status=status,
            message=_text("message", message, empty_ok=True),
            finished_at=None if status is ActionStatus.PENDING else created_at,
            with_pause=with_pause)
        values = (*_action_values(record), replica or self.replica_id)
        try:
            with self._write() as conn:
                conn.execute(f"INSERT INTO actions ({_ACTION_COLUMNS}, replica) "
                             f"VALUES ({sql_marks(values)})", values)
        except StoreError as exc:
            if isinstance(exc.__cause__, self._integrity_errors):
                raise StoreError(f"action id {record.action_id!r} is already stored; "
                                 "use a new id") from exc
            raise
        return record

    def finish_action(self, action_id: str, status: ActionStatus | str, message: str = "", *,
                      now: float | None = None) -> ActionRecord:
        """Record an action's result. The first result wins: finishing an action that is
        already finished (a result replayed after a reconnect) changes nothing and returns the
        stored action. The one exception is an ``interrupted`` action (failed by
        :meth:`fail_pending_actions`, a guess): the agent's result replaces it. An unknown id
        raises UnknownAction."""
        status = ActionStatus.parse(status)
        if status is ActionStatus.PENDING:
            raise ValueError("finish_action: 'pending' is not a result; give a final status")
        message = _text("message", message, empty_ok=True)
        finished_at = self._now(now)
        with self._write() as conn:
            conn.execute("UPDATE actions SET status = ?, message = ?, finished_at = ?, "
                         "interrupted = 0 "
                         "WHERE action_id = ? AND (status = 'pending' OR interrupted = 1)",
                         (status.value, message, finished_at, action_id))
            row = conn.execute(f"SELECT {_ACTION_COLUMNS} FROM actions WHERE action_id = ?",
                               (action_id,)).fetchone()
        if row is None:
            raise UnknownAction(f"no action with id {action_id!r} is stored")
        return _action(row)

    def fail_pending_actions(self, message: str, *, actor: str = "collector",
                             now: float | None = None) -> list[ActionRecord]:
        """At collector start: every action still pending that a replica now gone was to send
        was sent by a collector that stopped before its agent answered, and nothing will wait
        for that answer any more. Each becomes
        ``failed`` with `message`, marked ``interrupted`` (a late result from the agent still
        replaces it), with one audit entry by `actor`; all in one transaction. Returns them,
        oldest first."""
        message = _text("message", message)
        actor = _text("actor", actor)
        now = self._now(now)
        live = sorted(self.live_replicas())
        with self._write() as conn:
            ids = [r[0] for r in conn.execute(
                "SELECT action_id FROM actions WHERE status = 'pending' AND (replica IS NULL "
                f"OR replica NOT IN ({sql_marks(live)})) ORDER BY created_at, action_id", live)]
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                conn.execute("UPDATE actions SET status = 'failed', message = ?, "
                             f"finished_at = ?, interrupted = 1 WHERE action_id IN "
                             f"({sql_marks(chunk)})", (message, now, *chunk))
            records = []
            for action_id in ids:
                record = _action(conn.execute(
                    f"SELECT {_ACTION_COLUMNS} FROM actions WHERE action_id = ?",
                    (action_id,)).fetchone())
                records.append(record)
                self.audit(actor, record.type, record.container_id, "failed", message,
                           {"action_id": record.action_id, "node": record.node,
                            "requested_by": record.requested_by,
                            "requested_at": record.created_at}, now=now)
        return records

    def claim_action(self, action_id: str) -> ActionRecord | None:
        """The pending action routed to this replica, once: the first call takes it (to send
        it to the agent), later ones and other replicas' get None."""
        with self._write() as conn:
            claimed = conn.execute("UPDATE actions SET sent = 1 WHERE action_id = ? AND "
                                   "replica = ? AND sent = 0 AND status = 'pending'",
                                   (action_id, self.replica_id)).rowcount
            if claimed != 1:
                return None
            return _action(conn.execute(f"SELECT {_ACTION_COLUMNS} FROM actions "
                                        "WHERE action_id = ?", (action_id,)).fetchone())

    def routed_actions(self) -> list[str]:
        """The ids of pending actions routed to this replica and not sent yet, oldest first
        (their announcements may have been missed)."""
        with self._read() as conn:
            return [r[0] for r in conn.execute(
                "SELECT action_id FROM actions WHERE replica = ? AND sent = 0 AND "
                "status = 'pending' ORDER BY created_at, action_id", (self.replica_id,))]

    def announce_action(self, event: str, action_id: str, *details: str) -> None:
        """Tell the other replicas about an action (ACTIONS_CHANNEL): ``send`` (routed to the
        replica holding its node's stream), ``done`` (its result is stored) or ``event``
        (published to subscribers; `details`: the replica and the status). Inside a
        transaction, told when it commits. Nothing to tell for a store no other replica
        shares."""
        if not self._shared:
            return
        with self._write() as conn:
            self._announce(conn, ACTIONS_CHANNEL, " ".join((event, action_id, *details)))

    def claim_decision(self, alert_id: str, action: str, action_id: str, *,
                       now: float | None = None) -> bool:
        """Whether this is the first automatic `action` decision on the alert (any replica):
        True records it; False when one is recorded already (call within the decision's
        transaction, so a decision rolled back frees its claim)."""
        values = (alert_id, action, action_id, self.replica_id, self._now(now))
        with self._write() as conn:
            return conn.execute("INSERT INTO policy_decisions (alert_id, action, action_id, "
                                "replica, decided_at) VALUES (?, ?, ?, ?, ?) "
                                "ON CONFLICT (alert_id, action) DO NOTHING", values
                                ).rowcount == 1

    def get_action(self, action_id: str) -> ActionRecord | None:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_ACTION_COLUMNS} FROM actions WHERE action_id = ?",
                               (action_id,)).fetchone()
        return None if row is None else _action(row)

    def list_actions(self, *, container_id: str | None = None, node: str | None = None,
                     statuses: Iterable[ActionStatus | str] = (), alert_id: str | None = None,
                     limit: int = 100) -> list[ActionRecord]:
        """Actions, newest first (by created_at, then insertion order), optionally filtered."""
        clauses, params = [], []
        for column, value in (("container_id", container_id), ("node", node),
                              ("alert_id", alert_id)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        wanted = [ActionStatus.parse(s).value for s in statuses]
        if wanted:
            clauses.append(f"status IN ({sql_marks(wanted)})")
            params.extend(wanted)
        where = " AND ".join(clauses) or "TRUE"
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_ACTION_COLUMNS} FROM actions WHERE {where} "
                                f"ORDER BY created_at DESC, {self._insertion_order} DESC LIMIT ?",
                                (*params, _limit(limit))).fetchall()
        return [_action(r) for r in rows]

    def page_actions(self, action_filter: ActionFilter | None = None, page_size: int = 100,
                     page_token: str | None = None) -> tuple[list[ActionRecord], str | None]:
        """One page of actions, newest first by (created_at, action_id), and the next page's
        token (None: no more); paged like :meth:`list_alerts` (module docstring)."""
        action_filter = action_filter or ActionFilter()
        rows, token = self._page("actions", ("created_at", "action_id"), _ACTION_COLUMNS,
                                 action_filter.sql(), action_filter.fingerprint(), page_size,
                                 page_token)
        return [_action(r[2:]) for r in rows], token

    # - agents -------------------------------------------------------------------------------

    def upsert_agent(self, node: str, *, agent_version: str | None = None,
                     mode: str | None = None, peer: str | None = None,
                     counters: Mapping[str, Any] | None = None,
                     containers_watched: int | None = None, spool_depth: int | None = None,
                     baselines: Sequence[HeldBaseline] | None = None,
                     now: float | None = None, replica: str | None = None) -> AgentRecord:
        """The agent on `node` spoke (hello or heartbeat): it is connected, last seen `now`,
        its stream held by `replica` (None keeps the stored one).

        Arguments left None keep the stored values. ``connected_at`` is set when the agent was
        unknown or disconnected, or connects from a new peer (a new stream that came up before
        the old one was seen closing)."""
        node = _text("node", node)
        now = self._now(now)
        for what, value in (("containers_watched", containers_watched),
                            ("spool_depth", spool_depth)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f"{what} must be an integer >= 0, got {value!r}")
        counters_text = None if counters is None else _json_text("counters", dict(counters))
        if baselines is not None:
            _held_text(baselines)
        with self._write() as conn:
            row = conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE node = ?"
                               f"{self._lock_rows}", (node,)).fetchone()
            old = _agent(row) if row is not None else None
            new_session = (old is None or not old.connected
                           or (peer is not None and peer != old.peer))
            record = AgentRecord(
                node=node,
                agent_version=agent_version if agent_version is not None else (
                    old.agent_version if old else None),
                mode=mode if mode is not None else (old.mode if old else None),
                connected=True,
                connected_at=now if new_session or old is None else old.connected_at,
                disconnected_at=old.disconnected_at if old else None,
                last_seen=now,
                counters=(json.loads(counters_text) if counters_text is not None
                          else (old.counters if old else {})),
                containers_watched=containers_watched if containers_watched is not None else (
                    old.containers_watched if old else None),
                spool_depth=spool_depth if spool_depth is not None else (
                    old.spool_depth if old else None),
                peer=peer if peer is not None else (old.peer if old else None),
                baselines=tuple(baselines) if baselines is not None else (
                    old.baselines if old else ()),
                replica=replica if replica is not None else (old.replica if old else None))
            conn.execute(f"INSERT INTO agents ({_AGENT_COLUMNS}) "
                         f"VALUES ({sql_marks(_AGENT_FIELDS)}) ON CONFLICT (node) DO UPDATE SET "
                         + ", ".join(f"{c} = excluded.{c}" for c in _AGENT_FIELDS[1:]),
                         (record.node, record.agent_version, record.mode, 1,
                          record.connected_at, record.disconnected_at, record.last_seen,
                          json.dumps(record.counters, sort_keys=True),
                          record.containers_watched, record.spool_depth, record.peer,
                          _held_text(record.baselines), record.replica))
        return record

    def mark_agent_disconnected(self, node: str, *, peer: str | None = None,
                                baselines: Sequence[HeldBaseline] | None = None,
                                now: float | None = None, replica: str | None = None) -> bool:
        """Mark `node`'s agent disconnected; with `peer` (`replica`), only if that is still
        its peer (the replica holding its stream), so a stale stream closing does not
        disconnect the agent's newer stream, here or on another replica. `baselines`: what it
        held last (None keeps the stored list). True if marked."""
        now = self._now(now)
        held = None if baselines is None else _held_text(baselines)
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE agents SET connected = 0, disconnected_at = ?, "
                "baselines = coalesce(?, baselines) "
                "WHERE node = ? AND connected = 1 AND (CAST(? AS TEXT) IS NULL OR peer = ?) "
                "AND (CAST(? AS TEXT) IS NULL OR replica IS NULL OR replica = ?)",
                (now, held, node, peer, peer, replica, replica))
            return cursor.rowcount == 1

    def mark_all_agents_disconnected(self, *, now: float | None = None) -> int:
        """At collector start: no stream of a replica that is gone survived it (those of
        replicas still running stay connected). Returns how many were marked."""
        now = self._now(now)
        live = sorted(self.live_replicas())
        with self._write() as conn:
            return conn.execute("UPDATE agents SET connected = 0, disconnected_at = ? "
                                "WHERE connected = 1 AND (replica IS NULL OR replica NOT IN "
                                f"({sql_marks(live)}))", (now, *live)).rowcount

    def get_agent(self, node: str) -> AgentRecord | None:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE node = ?",
                               (node,)).fetchone()
        return None if row is None else _agent(row)

    def list_agents(self, *, connected: bool | None = None) -> list[AgentRecord]:
        """Agents by node name; ``connected`` True/False keeps only those."""
        where, params = (("TRUE", ()) if connected is None
                         else ("connected = ?", (int(connected),)))
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE {where} "
                                "ORDER BY node", params).fetchall()
        return [_agent(r) for r in rows]

    # - audit --------------------------------------------------------------------------------

    def audit(self, actor: str, action: str, target: str, decision: str, reason: str = "",
              details: Mapping[str, Any] | None = None, *, now: float | None = None) -> int:
        """Append one decision to the audit log; returns its sequence number (never reused)."""
        values = (self._now(now), _text("actor", actor), _text("action", action),
                  _text("target", target), _text("decision", decision),
                  _text("reason", reason, empty_ok=True),
                  _json_text("details", dict(details or {})))
        with self._write() as conn:
            return int(conn.execute("INSERT INTO audit (time, actor, action, target, decision, "
                                    "reason, details) VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                                    values).fetchone()[0])

    def list_audit(self, since_seq: int = 0, limit: int = 100) -> list[AuditEntry]:
        """Entries with ``seq > since_seq``, oldest first: pass the last seq to read on."""
        with self._read() as conn:
            rows = conn.execute("SELECT seq, time, actor, action, target, decision, reason, "
                                "details FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
                                (int(since_seq), _limit(limit))).fetchall()
        return [AuditEntry(*r[:7], details=json.loads(r[7])) for r in rows]

    # - containers ---------------------------------------------------------------------------

    def find_container(self, text: str) -> ContainerMatch:
        """Resolve an operator's container reference (module docstring). Raises
        UnknownContainer or AmbiguousContainer, both listing candidates."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty container reference: give a container id, id prefix or name")
        text = text.strip()
        select = "SELECT container_id, name, node FROM containers"
        with self._read() as conn:
            row = conn.execute(f"{select} WHERE container_id = ?", (text,)).fetchone()
            if row is not None:
                return ContainerMatch(*row)
            rows = conn.execute(f"{select} WHERE name = ? ORDER BY last_seen DESC, container_id",
                                (text,)).fetchall()
            if rows:
                latest_per_node: dict[str, ContainerMatch] = {}
                for r in rows:
                    latest_per_node.setdefault(r[2], ContainerMatch(*r))
                if len(latest_per_node) == 1:
                    return next(iter(latest_per_node.values()))
                raise AmbiguousContainer(
                    text, list(latest_per_node.values())[:MAX_CANDIDATES],
                    f"the name is used on {len(latest_per_node)} nodes")
            if len(text) >= MIN_ID_PREFIX:
                rows = conn.execute(f"{select} WHERE substr(container_id, 1, ?) = ? "
                                    "ORDER BY last_seen DESC, container_id LIMIT ?",
                                    (len(text), text, MAX_CANDIDATES + 1)).fetchall()
                if len(rows) == 1:
                    return ContainerMatch(*rows[0])
                if rows:
                    more = " or more" if len(rows) > MAX_CANDIDATES else ""
                    raise AmbiguousContainer(
                        text, [ContainerMatch(*r) for r in rows[:MAX_CANDIDATES]],
                        f"an id prefix of {len(rows[:MAX_CANDIDATES])}{more} containers")
            needle = text.lower()
            in_name = self._contains.format("lower(coalesce(name, ''))")
            in_id = self._contains.format("container_id")
            rows = conn.execute(f"{select} WHERE {in_name} OR {in_id} "
                                "ORDER BY last_seen DESC, container_id LIMIT ?",
                                (needle, needle, MAX_CANDIDATES)).fetchall()
        raise UnknownContainer(text, [ContainerMatch(*r) for r in rows], min_prefix=MIN_ID_PREFIX)

    def note_containers(self, containers: Sequence[ContainerMatch], *,
                        now: float | None = None) -> None:
        """Containers an agent's heartbeat lists, seen `now`: an operator on any replica can
        name them (find_container) before they raise an alert."""
        if not containers:
            return
        now = self._now(now)
        with self._write() as conn:
            for match in containers:
                conn.execute(_UPSERT_CONTAINER, (_text("container id", match.container_id),
                                                 match.name, _text("node", match.node), now))

    # - fleet baselines -----------------------------------------------------------------------

    def get_baseline(self, image_key: str) -> FleetBaseline | None:
        """The stored baseline of `image_key`, None when there is none."""
        with self._read() as conn:
            row = conn.execute("SELECT data FROM baselines WHERE image_key = ?",
                               (image_key,)).fetchone()
        if row is None:
            return None
        try:
            return unpack_baseline(bytes(row[0]))
        except BaselineError as exc:
            raise StoreError(f"store {self.path}: the baseline of {image_key} is unreadable "
                             f"({exc})") from None

    def put_baseline(self, doc: FleetBaseline, *, expect_version: int | None) -> None:
        """Store `doc` (module docstring: fleet baselines): a new image's baseline with
        ``expect_version=None``, else the one whose stored version is `expect_version`
        (StoreError when another writer changed it meanwhile, or it exists already)."""
        if not isinstance(doc, FleetBaseline) or not doc.image_key:
            raise ValueError(f"put_baseline needs a FleetBaseline with an image key, "
                             f"got {doc!r}")
        if type(doc.version) is not int or doc.version < 1:
            raise ValueError(f"baseline version must be an integer >= 1, got {doc.version!r}")
        s = doc.summary()
        values = (s.image_key, s.image_name, s.mode.value, s.version, s.created_at,
                  s.updated_at, s.items, s.unconfirmed, s.windows, s.containers,
                  json.dumps(list(s.nodes)), s.learning_started_at, s.last_new_item_at,
                  int(s.unstable), s.carried_from, pack_baseline(doc))
        columns = f"{_BASELINE_COLUMNS}, data"
        with self._write() as conn:
            if expect_version is None:
                try:
                    conn.execute(f"INSERT INTO baselines ({columns}) "
                                 f"VALUES ({sql_marks(values)})", values)
                except self._integrity_errors:
                    raise StoreError(f"a baseline of {doc.image_key} is stored already"
                                     ) from None
                return
            sets = ", ".join(f"{c.strip()} = ?" for c in columns.split(",")[1:])
            cursor = conn.execute(f"UPDATE baselines SET {sets} WHERE image_key = ? "
                                  "AND version = ?", (*values[1:], s.image_key, expect_version))
            if cursor.rowcount != 1:
                raise StoreError(f"the baseline of {doc.image_key} changed meanwhile (not at "
                                 f"version {expect_version} any more); retry")

    def list_baselines(self) -> list[BaselineSummary]:
        """Every stored baseline's summary, newest change first."""
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_BASELINE_COLUMNS} FROM baselines "
                                "ORDER BY updated_at DESC, image_key").fetchall()
        return [_baseline_summary(r) for r in rows]

    # - retention and metrics ----------------------------------------------------------------

    def prune(self, older_than_seconds: float, now: float | None = None) -> PruneResult:
        """Delete what is older than ``now - older_than_seconds`` (module docstring)."""
        if not finite_number(older_than_seconds) or older_than_seconds < 0:
            raise ValueError(f"older_than_seconds must be a number >= 0, "
                             f"got {older_than_seconds!r}")
        cutoff = self._now(now) - older_than_seconds
        with self._write() as conn:
            alerts = conn.execute("DELETE FROM alerts WHERE last_seen < ?", (cutoff,)).rowcount
            audit = conn.execute("DELETE FROM audit WHERE time < ?", (cutoff,)).rowcount
            containers = conn.execute("DELETE FROM containers WHERE last_seen < ?",
                                      (cutoff,)).rowcount
            conn.execute("DELETE FROM policy_decisions WHERE decided_at < ?", (cutoff,))
            if alerts:
                conn.execute("DELETE FROM alert_order WHERE NOT EXISTS "
                             "(SELECT 1 FROM alerts WHERE alerts.id = alert_order.alert_id)")
        if alerts or audit or containers:
            log.info("store %s: pruned %d alerts, %d audit entries, %d containers older than "
                     "%.0f", self.path, alerts, audit, containers, cutoff)
        return PruneResult(alerts=alerts, audit=audit, containers=containers)

    def stats(self) -> dict[str, int]:
        """Row counts, for metrics."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT (SELECT count(*) FROM alerts), (SELECT count(*) FROM actions), "
                "(SELECT count(*) FROM actions WHERE status = 'pending'), "
                "(SELECT count(*) FROM agents), (SELECT count(*) FROM agents WHERE connected = 1), "
                "(SELECT count(*) FROM audit), (SELECT count(*) FROM containers), "
                "(SELECT count(*) FROM baselines)").fetchone()
        keys = ("alerts", "actions", "actions_pending", "agents", "agents_connected", "audit",
                "containers", "baselines")
        return dict(zip(keys, row, strict=True))


# -- the SQLite backend --------------------------------------------------------------------------


class AlertStore(SqlStore):
    """The collector's store in one SQLite file. Thread-safe; a context manager.

    ``clock`` (default ``time.time``) stamps received/created/finished times and is the default
    ``now`` of every method that takes one.
    """

    _integrity_errors = (sqlite3.IntegrityError,)

    def __init__(self, path: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time,
                 checkpoint_interval: float | None = None) -> None:
        if checkpoint_interval is not None and not checkpoint_interval > 0:
            raise ValueError(f"checkpoint_interval must be > 0 seconds, got "
                             f"{checkpoint_interval}")
        super().__init__()
        self.path = os.fspath(path)
        self._clock = clock
        self._checkpointer: _Checkpointer | None = None
        self.checkpoint_stats = {"checkpoints": 0, "errors": 0}
        self._lock = threading.RLock()
        self._depth = 0  # open transactions of the thread holding _lock (transaction())
        self._conn: sqlite3.Connection | None = None
        try:
            conn = sqlite3.connect(self.path, timeout=10.0, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {self.path}: {exc} (does the directory exist "
                             "and is it writable?)") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal" and self.path != ":memory:":
                raise StoreError(f"store {self.path}: SQLite refused WAL journal mode (got "
                                 f"{mode!r}); put the store on a local filesystem")
            conn.execute("PRAGMA synchronous=NORMAL")
            if checkpoint_interval is not None and self.path != ":memory:":
                # the WAL is copied back by a thread of its own, not by the commit that crosses
                # 1000 pages (15-25 ms on one commit in ~50: the alert stream's p99)
                conn.execute("PRAGMA wal_autocheckpoint=0")
            migrate(conn, self.path, self._clock)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open store {self.path}: {exc} (is it a driftwarden "
                             "SQLite store?)") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        if checkpoint_interval is not None and self.path != ":memory:":
            self._checkpointer = _Checkpointer(self.path, checkpoint_interval,
                                               self.checkpoint_stats)
        log.debug("opened store %s (schema %d)", self.path, SCHEMA_VERSION)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *,
             clock: Callable[[], float] = time.time,
             checkpoint_interval: float | None = None) -> AlertStore:
        """``checkpoint_interval``: copy the WAL back into the database from a background
        thread every so many seconds instead of inside commits (None: SQLite's automatic
        checkpoints)."""
        return cls(path, clock=clock, checkpoint_interval=checkpoint_interval)

    def _stop(self, timeout: float | None) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    # - plumbing -----------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self.path} is closed")
        return self._conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            conn = self._connection()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction; inside another (transaction()), a savepoint of it."""
        with self._lock:
            conn = self._connection()
            depth = self._depth
            if depth == 0:
                begin, commit, undo = "BEGIN IMMEDIATE", ("COMMIT",), ("ROLLBACK",)
            else:  # ROLLBACK TO leaves the savepoint open: release it too
                begin = f"SAVEPOINT s{depth}"
                commit, undo = (f"RELEASE s{depth}",), (f"ROLLBACK TO s{depth}",
                                                        f"RELEASE s{depth}")
            try:
                conn.execute(begin)
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from exc
            self._depth += 1
            try:
                yield conn
                for statement in commit:
                    conn.execute(statement)
            except BaseException as exc:
                if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                    for statement in undo:
                        conn.execute(statement)
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"store {self.path}: {exc}") from exc
                raise
            finally:
                self._depth -= 1

    def pragmas(self) -> dict[str, Any]:
        """The connection's journal mode and synchronous level (1 = NORMAL), for diagnostics."""
        with self._read() as conn:
            return {"journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
                    "synchronous": conn.execute("PRAGMA synchronous").fetchone()[0]}


# -- choosing the backend ------------------------------------------------------------------------

POSTGRES_URL_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(text: str) -> bool:
    """Whether `text` names a PostgreSQL store (a ``postgresql://`` URL)."""
    return text.startswith(POSTGRES_URL_SCHEMES)


def redact(url: str) -> str:
    """A store URL without its password, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    user = urllib.parse.quote(parts.username or "", safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def open_store(*, db_path: str | os.PathLike[str] | None = None, url: str | None = None,
               clock: Callable[[], float] = time.time,
               checkpoint_interval: float | None = None) -> SqlStore:
    """The collector's store: PostgreSQL at `url` (``postgresql://USER@HOST:PORT/DB``), else
    the SQLite file at `db_path` (with its background checkpoints every `checkpoint_interval`
    seconds). Exactly one of the two."""
    if url is not None and db_path is None:
        # imported only when asked for: a SQLite collector never loads the PostgreSQL driver
        from driftwarden.collector.store_pg import PostgresStore

        return PostgresStore.open(url, clock=clock)
    if db_path is not None and url is None:
        return AlertStore.open(db_path, clock=clock, checkpoint_interval=checkpoint_interval)
    raise ValueError("open_store: give either db_path (SQLite) or url (PostgreSQL)")


class _Checkpointer:
    """A thread with its own connection running ``wal_checkpoint(PASSIVE)`` every `interval`
    seconds: it copies what the WAL holds back into the database without blocking writers
    (WAL mode lets them append meanwhile), so no commit pays for a checkpoint."""

    def __init__(self, path: str, interval: float, stats: dict[str, int]) -> None:
        self._path = path
        self._interval = interval
        self._stats = stats
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="driftwarden-store-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self._path, timeout=10.0, isolation_level=None,
                               check_same_thread=False)
        try:
            while not self._stopping.wait(self._interval):
                self._checkpoint(conn)
            self._checkpoint(conn)  # what the last commits wrote, before close
        finally:
            conn.close()

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            self._stats["checkpoints"] += 1
        except sqlite3.Error as exc:  # the next round tries again; the WAL only grows meanwhile
            self._stats["errors"] += 1
            log.warning("store %s: background WAL checkpoint failed: %s", self._path, exc)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._thread.join(timeout)



__all__ = [
    "ACTIONS_CHANNEL",
    "ALERTS_CHANNEL",
    "MAX_CANDIDATES",
    "MAX_PAGE_SIZE",
    "ActionRecord",
    "AgentRecord",
    "AlertStore",
    "AuditEntry",
    "CollectorStore",
    "ContainerMatch",
    "InsertOutcome",
    "PruneResult",
    "SqlStore",
    "is_postgres_url",
    "open_store",
    "redact",
]
