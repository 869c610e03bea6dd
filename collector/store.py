"""The collector's SQLite store: alerts, actions, agents, known containers and the audit log.

One :class:`AlertStore` owns one SQLite file (WAL journal, ``synchronous=NORMAL``) through one
connection guarded by a lock, so any thread of the gRPC server may call it. Every write is one
``BEGIN IMMEDIATE`` transaction; a batch of alerts is one transaction (all stored or none).
The schema is versioned (table ``schema_version``, one row per applied migration); opening a store
applies the missing migrations in order and refuses a store newer than this code.

Alerts
    An alert is the dict of ``driftwarden.alerts.Alert.to_dict()`` plus a top-level ``"node"``
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
    A batch is processed in order, so a batch may hold the same id several times.

Listing (``list_alerts``)
    Newest first by ``(time, id)`` (both descending), paged with a keyset cursor: the opaque page
    token holds the last returned ``(time, id)`` and a fingerprint of the filter. A page never
    repeats an alert of an earlier page and never skips one that was stored when the walk
    started; alerts stored during the walk appear in it when they sort after the cursor (an
    older ``time``) and not when they sort before it (newer ones: start a new walk to see them).
    ``time`` bounds: ``since <= time < until``.

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
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import math
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from driftwarden.alerts import AlertKind, Severity
from driftwarden.errors import DriftwardenError

log = logging.getLogger(__name__)

MIN_ID_PREFIX = 4  # shortest container id prefix accepted (filters and find_container)
MAX_PAGE_SIZE = 1000
MAX_CANDIDATES = 10  # listed in AmbiguousContainer / UnknownContainer
_TOKEN_VERSION = "v1"


# -- errors --------------------------------------------------------------------------------------


class StoreError(DriftwardenError):
    """The store cannot be opened or used (I/O, corruption, newer schema, closed store)."""


class UnknownAction(StoreError):
    """No action with that id is stored."""


class ContainerMatch(NamedTuple):
    container_id: str
    name: str | None
    node: str

    def describe(self) -> str:
        name = self.name or "?"
        return f"{name} ({self.container_id[:12]}) on {self.node}"


class UnknownContainer(StoreError):
    """No known container matches the operator's text; ``candidates`` are similar ones."""

    def __init__(self, text: str, candidates: Sequence[ContainerMatch] = ()) -> None:
        self.text = text
        self.candidates = tuple(candidates)
        hint = (f"; similar: {', '.join(c.describe() for c in self.candidates)}"
                if self.candidates else "")
        super().__init__(
            f"no container known from alerts matches {text!r}: give a full container id, a "
            f"container name, or an id prefix of at least {MIN_ID_PREFIX} characters{hint}")


class AmbiguousContainer(StoreError):
    """Several known containers match the operator's text; ``candidates`` lists them."""

    def __init__(self, text: str, candidates: Sequence[ContainerMatch], why: str) -> None:
        self.text = text
        self.candidates = tuple(candidates)
        listed = ", ".join(c.describe() for c in self.candidates)
        super().__init__(f"{text!r} is ambiguous ({why}): {listed}; give the full container id")


# -- records -------------------------------------------------------------------------------------


class InsertOutcome(enum.StrEnum):
    NEW = "new"
    UPDATED = "updated"
    DUPLICATE = "duplicate"


class ActionStatus(enum.StrEnum):
    PENDING = "pending"
    DONE = "done"
    ALREADY = "already"  # the container was already in the requested state
    CONTAINER_GONE = "container_gone"
    FAILED = "failed"
    REFUSED = "refused"  # the agent refused (e.g. an exempt container)
    SKIPPED = "skipped"  # policy decided not to act (dry run, rate limit, exemption)

    @classmethod
    def parse(cls, value: str | ActionStatus) -> ActionStatus:
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(s.value for s in cls)
            raise ValueError(f"unknown action status {value!r} (one of {names})") from None


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PruneResult:
    alerts: int
    audit: int
    containers: int


# -- filter --------------------------------------------------------------------------------------


def image_repository(image: str) -> str:
    """``registry:5000/nginx:1.25`` -> ``registry:5000/nginx``; a digest is dropped too."""
    name = image.split("@", 1)[0]
    colon = name.rfind(":")
    return name[:colon] if colon > name.rfind("/") else name


def _terms(field: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):  # one term given bare, not a tuple of its characters
        value = (value,)
    out = tuple(value)
    for term in out:
        if not isinstance(term, str) or not term:
            raise ValueError(f"AlertFilter.{field}: terms must be non-empty strings, got {term!r}")
    return out


def _kinds(field: str, value: Any) -> tuple[str, ...]:
    out = []
    for term in _terms(field, value):
        try:
            out.append(AlertKind(term).value)
        except ValueError:
            names = ", ".join(k.value for k in AlertKind)
            raise ValueError(
                f"AlertFilter.{field}: unknown kind {term!r} (one of {names})") from None
    return tuple(out)


def _time_bound(field: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"AlertFilter.{field} must be seconds since the epoch, got {value!r}")
    return float(value)


def _image_ids(terms: tuple[str, ...]) -> list[str]:
    # an image id matches with or without its "sha256:" prefix
    return [*terms, *(f"sha256:{t}" for t in terms if not t.startswith("sha256:"))]


@dataclass(frozen=True)
class AlertFilter:
    """Which alerts to list or stream. Empty means "any"; all given conditions must hold.

    - ``kinds`` / ``exclude_kinds``: alert kind ("drift", "novel", "anomaly").
    - ``min_severity``: severity at least this ("low" < "medium" < "high" < "critical").
    - ``nodes``, ``namespaces``: exact.
    - ``images``: the image as reported (``nginx:1.25``), its repository (``nginx``), or the image
      id (with or without ``sha256:``).
    - ``containers``: the container id, its name, or an id prefix of >= ``MIN_ID_PREFIX`` chars.
    - ``exclude_*``: the same matches, negated. An unknown (null) field matches no term: an
      include list rejects the alert, an exclude list keeps it.
    - ``since`` <= time < ``until`` (seconds since the epoch).
    ``matches()`` (for streams) and the store's SQL apply exactly the same rules.
    """

    kinds: tuple[str, ...] = ()
    min_severity: Severity | None = None
    nodes: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    images: tuple[str, ...] = ()
    containers: tuple[str, ...] = ()
    exclude_kinds: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    exclude_namespaces: tuple[str, ...] = ()
    exclude_images: tuple[str, ...] = ()
    exclude_containers: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None

    def __post_init__(self) -> None:
        for field in ("nodes", "namespaces", "images", "containers", "exclude_nodes",
                      "exclude_namespaces", "exclude_images", "exclude_containers"):
            object.__setattr__(self, field, _terms(field, getattr(self, field)))
        for field in ("kinds", "exclude_kinds"):
            object.__setattr__(self, field, _kinds(field, getattr(self, field)))
        severity = self.min_severity
        if severity is not None:
            if isinstance(severity, str):
                severity = Severity.parse(severity)
            elif isinstance(severity, int) and not isinstance(severity, bool):
                try:
                    severity = Severity(severity)
                except ValueError:
                    raise ValueError(f"AlertFilter.min_severity: {severity!r} is not 1..4 "
                                     "(low..critical)") from None
            else:
                raise ValueError(f"AlertFilter.min_severity: {severity!r} is not a severity")
            object.__setattr__(self, "min_severity", severity)
        since = _time_bound("since", self.since)
        until = _time_bound("until", self.until)
        if since is not None and until is not None and since > until:
            raise ValueError(f"AlertFilter: since ({since}) is after until ({until})")
        object.__setattr__(self, "since", since)
        object.__setattr__(self, "until", until)

    # - in Python, for streams ---------------------------------------------------------------

    def matches(self, alert: Mapping[str, Any]) -> bool:
        """Whether an alert dict (the store's shape: ``to_dict()`` plus ``"node"``) passes."""
        kind = alert.get("kind")
        if self.kinds and kind not in self.kinds:
            return False
        if kind in self.exclude_kinds:
            return False
        if self.min_severity is not None:
            try:
                severity = Severity.parse(str(alert.get("severity")))
            except ValueError:
                return False
            if severity < self.min_severity:
                return False
        node = alert.get("node")
        if self.nodes and node not in self.nodes:
            return False
        if node in self.exclude_nodes:
            return False
        container = alert.get("container") or {}
        namespace = container.get("namespace")
        if self.namespaces and namespace not in self.namespaces:
            return False
        if namespace is not None and namespace in self.exclude_namespaces:
            return False
        if self.images and not _image_matches(self.images, container):
            return False
        if self.exclude_images and _image_matches(self.exclude_images, container):
            return False
        if self.containers and not _container_matches(self.containers, container):
            return False
        if self.exclude_containers and _container_matches(self.exclude_containers, container):
            return False
        when = alert.get("time")
        if self.since is not None and not (isinstance(when, int | float) and when >= self.since):
            return False
        return not (self.until is not None
                    and not (isinstance(when, int | float) and when < self.until))

    # - in SQL, for the store ----------------------------------------------------------------

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE expression over the alerts table and its parameters (``"1"`` for none)."""
        clauses: list[str] = []
        params: list[Any] = []

        def include(expr: str, values: Sequence[Any]) -> None:
            clauses.append(expr)
            params.extend(values)

        def exclude(expr: str, values: Sequence[Any]) -> None:
            # NOT(NULL) is NULL, which would drop alerts whose field is unknown
            clauses.append(f"NOT coalesce(({expr}), 0)")
            params.extend(values)

        if self.kinds:
            include(f"kind IN ({_marks(self.kinds)})", self.kinds)
        if self.exclude_kinds:
            exclude(f"kind IN ({_marks(self.exclude_kinds)})", self.exclude_kinds)
        if self.min_severity is not None:
            include("severity >= ?", [int(self.min_severity)])
        if self.nodes:
            include(f"node IN ({_marks(self.nodes)})", self.nodes)
        if self.exclude_nodes:
            exclude(f"node IN ({_marks(self.exclude_nodes)})", self.exclude_nodes)
        if self.namespaces:
            include(f"namespace IN ({_marks(self.namespaces)})", self.namespaces)
        if self.exclude_namespaces:
            exclude(f"namespace IN ({_marks(self.exclude_namespaces)})", self.exclude_namespaces)
        if self.images:
            include(*_image_sql(self.images))
        if self.exclude_images:
            exclude(*_image_sql(self.exclude_images))
        if self.containers:
            include(*_container_sql(self.containers))
        if self.exclude_containers:
            exclude(*_container_sql(self.exclude_containers))
        if self.since is not None:
            include("time >= ?", [self.since])
        if self.until is not None:
            include("time < ?", [self.until])
        return (" AND ".join(clauses) or "1"), params

    def fingerprint(self) -> str:
        """Short hash of the filter: a page token is only valid with the filter it came from."""
        data = dataclasses.asdict(self)
        data["min_severity"] = None if self.min_severity is None else int(self.min_severity)
        text = json.dumps(data, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _marks(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


def _image_matches(terms: tuple[str, ...], container: Mapping[str, Any]) -> bool:
    image = container.get("image")
    image_id = container.get("image_id")
    if image is not None and (image in terms or image_repository(image) in terms):
        return True
    return image_id is not None and image_id in _image_ids(terms)


def _image_sql(terms: tuple[str, ...]) -> tuple[str, list[Any]]:
    ids = _image_ids(terms)
    expr = (f"image IN ({_marks(terms)}) OR image_repo IN ({_marks(terms)}) "
            f"OR image_id IN ({_marks(ids)})")
    return expr, [*terms, *terms, *ids]


def _container_matches(terms: tuple[str, ...], container: Mapping[str, Any]) -> bool:
    cid = container.get("id")
    name = container.get("name")
    for term in terms:
        if name is not None and term == name:
            return True
        if cid is not None and (term == cid or (len(term) >= MIN_ID_PREFIX
                                                and cid.startswith(term))):
            return True
    return False


def _container_sql(terms: tuple[str, ...]) -> tuple[str, list[Any]]:
    parts = [f"container_id IN ({_marks(terms)})", f"container_name IN ({_marks(terms)})"]
    params: list[Any] = [*terms, *terms]
    for term in terms:
        if len(term) >= MIN_ID_PREFIX:
            parts.append("substr(container_id, 1, ?) = ?")
            params.extend([len(term), term])
    return " OR ".join(parts), params


# -- page tokens ---------------------------------------------------------------------------------


def _encode_token(when: float, alert_id: str, fingerprint: str) -> str:
    data = json.dumps({"t": when, "i": alert_id, "f": fingerprint}, separators=(",", ":"))
    return f"{_TOKEN_VERSION}.{base64.urlsafe_b64encode(data.encode()).decode().rstrip('=')}"


def _decode_token(token: str, fingerprint: str) -> tuple[float, str]:
    bad = ("invalid page token: pass back exactly the next_page_token of the previous page, "
           "or no token to start from the newest alert")
    if not isinstance(token, str):
        raise ValueError(bad)
    version, _, body = token.partition(".")
    if version != _TOKEN_VERSION or not body:
        raise ValueError(bad)
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        data = json.loads(raw)
        when, alert_id, token_filter = data["t"], data["i"], data["f"]
    except (binascii.Error, ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise ValueError(bad) from None
    if (isinstance(when, bool) or not isinstance(when, int | float) or not math.isfinite(when)
            or not isinstance(alert_id, str) or not isinstance(token_filter, str)):
        raise ValueError(bad)
    if token_filter != fingerprint:
        raise ValueError("invalid page token: it belongs to a listing with another filter; "
                         "keep the filter unchanged while paging, or start without a token")
    return float(when), alert_id


# -- alert validation ----------------------------------------------------------------------------


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


def _number(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, int | float)
            and math.isfinite(value))


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
    if not _number(when):
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
    if not _number(score):
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
    for key in ("id", "name", "image", "image_id", "pod", "namespace"):
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
    if not _number(first_seen) or not _number(last_seen):
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


# -- schema --------------------------------------------------------------------------------------

_STATUSES = ", ".join(f"'{s.value}'" for s in ActionStatus)

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
            status TEXT NOT NULL CHECK (status IN ({_STATUSES})),
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
)
SCHEMA_VERSION = len(MIGRATIONS)

_ACTION_COLUMNS = ("action_id, created_at, container_id, container_name, node, type, reason, "
                   "requested_by, alert_id, status, message, finished_at")
_AGENT_COLUMNS = ("node, agent_version, mode, connected, connected_at, disconnected_at, "
                  "last_seen, counters, containers_watched, spool_depth, peer")


def _action(row: sqlite3.Row | tuple[Any, ...]) -> ActionRecord:
    (action_id, created_at, container_id, container_name, node, kind, reason, requested_by,
     alert_id, status, message, finished_at) = row
    return ActionRecord(action_id=action_id, created_at=created_at, container_id=container_id,
                        container_name=container_name, node=node, type=kind, reason=reason,
                        requested_by=requested_by, alert_id=alert_id,
                        status=ActionStatus(status), message=message, finished_at=finished_at)


def _agent(row: tuple[Any, ...]) -> AgentRecord:
    (node, version, mode, connected, connected_at, disconnected_at, last_seen, counters,
     watched, spool, peer) = row
    return AgentRecord(node=node, agent_version=version, mode=mode, connected=bool(connected),
                       connected_at=connected_at, disconnected_at=disconnected_at,
                       last_seen=last_seen, counters=json.loads(counters),
                       containers_watched=watched, spool_depth=spool, peer=peer)


# -- the store -----------------------------------------------------------------------------------


class AlertStore:
    """The collector's store in one SQLite file. Thread-safe; a context manager.

    ``clock`` (default ``time.time``) stamps received/created/finished times and is the default
    ``now`` of every method that takes one.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = os.fspath(path)
        self._clock = clock
        self._lock = threading.RLock()
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
            self._migrate(conn)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open store {self.path}: {exc} (is it a driftwarden "
                             "SQLite store?)") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        log.debug("opened store %s (schema %d)", self.path, SCHEMA_VERSION)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *,
             clock: Callable[[], float] = time.time) -> AlertStore:
        return cls(path, clock=clock)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    def __enter__(self) -> AlertStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # - plumbing -----------------------------------------------------------------------------

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")  # two collectors opening one new file: one migrates
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version ("
                         "version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
            current = conn.execute("SELECT coalesce(max(version), 0) FROM schema_version"
                                   ).fetchone()[0]
            if current > SCHEMA_VERSION:
                raise StoreError(f"store {self.path} has schema version {current}, newer than "
                                 f"this driftwarden supports ({SCHEMA_VERSION}): upgrade "
                                 "driftwarden or use another store file")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version - 1]:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                             (version, self._clock()))
                log.info("store %s: applied schema migration %d", self.path, version)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

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
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: {exc}") from exc
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:  # SQLite may have rolled back already (disk full)
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StoreError(f"store {self.path}: {exc}") from exc
                raise

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else float(now)

    def schema_version(self) -> int:
        with self._read() as conn:
            return conn.execute("SELECT max(version) FROM schema_version").fetchone()[0]

    def pragmas(self) -> dict[str, Any]:
        """The connection's journal mode and synchronous level (1 = NORMAL), for diagnostics."""
        with self._read() as conn:
            return {"journal_mode": conn.execute("PRAGMA journal_mode").fetchone()[0],
                    "synchronous": conn.execute("PRAGMA synchronous").fetchone()[0]}

    # - alerts -------------------------------------------------------------------------------

    def insert_alert(self, alert: Mapping[str, Any]) -> InsertOutcome:
        return self.insert_alerts([alert])[0]

    def insert_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> list[InsertOutcome]:
        """Store a batch in one transaction; one outcome per alert, in order (module docstring).

        Every alert is validated first: a ValueError names the first bad one and nothing is
        stored.
        """
        rows = [_parse_alert(doc, i) for i, doc in enumerate(alerts)]
        if not rows:
            return []
        with self._write() as conn:
            received_at = self._clock()
            return [self._insert_row(conn, row, received_at) for row in rows]

    def _insert_row(self, conn: sqlite3.Connection, row: _AlertRow,
                    received_at: float) -> InsertOutcome:
        stored = conn.execute("SELECT time, count, first_seen, last_seen FROM alerts WHERE id = ?",
                              (row.id,)).fetchone()
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
            conn.execute(
                "INSERT INTO alerts (kind, severity, score, node, container_id, container_name, "
                "image, image_repo, image_id, namespace, pod, baseline_mode, count, first_seen, "
                "last_seen, updated_at, json, id, time, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (*values, when, received_at))
        else:
            conn.execute(
                "UPDATE alerts SET kind = ?, severity = ?, score = ?, node = ?, container_id = ?, "
                "container_name = ?, image = ?, image_repo = ?, image_id = ?, namespace = ?, "
                "pod = ?, baseline_mode = ?, count = ?, first_seen = ?, last_seen = ?, "
                "updated_at = ?, json = ? WHERE id = ?", values)
        if row.container_id is not None:
            conn.execute(
                "INSERT INTO containers (container_id, name, node, last_seen) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (container_id) DO UPDATE SET "
                "name = coalesce(excluded.name, containers.name), node = excluded.node, "
                "last_seen = excluded.last_seen WHERE excluded.last_seen >= containers.last_seen",
                (row.container_id, row.container_name, row.node, row.last_seen))
        return InsertOutcome.NEW if stored is None else InsertOutcome.UPDATED

    def get_alert(self, alert_id: str) -> dict[str, Any] | None:
        with self._read() as conn:
            row = conn.execute("SELECT json FROM alerts WHERE id = ?", (alert_id,)).fetchone()
        return None if row is None else json.loads(row[0])

    def list_alerts(self, alert_filter: AlertFilter | None = None, page_size: int = 100,
                    page_token: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """One page of alerts, newest first, and the token of the next page (None: no more).

        An empty or None token starts at the newest alert. A token is only valid with the
        filter it was issued for; anything else raises ValueError.
        """
        alert_filter = alert_filter or AlertFilter()
        page_size = _limit(page_size, "page_size")
        where, params = alert_filter.sql()
        if page_token:
            when, alert_id = _decode_token(page_token, alert_filter.fingerprint())
            where = f"({where}) AND (time, id) < (?, ?)"
            params = [*params, when, alert_id]
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT time, id, json FROM alerts WHERE {where} "
                "ORDER BY time DESC, id DESC LIMIT ?", (*params, page_size + 1)).fetchall()
        page = rows[:page_size]
        token = None
        if len(rows) > page_size:
            token = _encode_token(page[-1][0], page[-1][1], alert_filter.fingerprint())
        return [json.loads(r[2]) for r in page], token

    def count_alerts(self, alert_filter: AlertFilter | None = None) -> int:
        where, params = (alert_filter or AlertFilter()).sql()
        with self._read() as conn:
            return conn.execute(f"SELECT count(*) FROM alerts WHERE {where}", params
                                ).fetchone()[0]

    # - actions ------------------------------------------------------------------------------

    def record_action(self, *, container_id: str, node: str, type: str, reason: str,
                      requested_by: str, container_name: str | None = None,
                      alert_id: str | None = None,
                      status: ActionStatus | str = ActionStatus.PENDING, message: str = "",
                      action_id: str | None = None, now: float | None = None) -> ActionRecord:
        """Store a requested action (``pending``), or one decided at once (e.g. ``skipped``,
        which is then also finished). ``action_id`` defaults to a random hex id; an id already
        stored raises StoreError."""
        status = ActionStatus.parse(status)
        created_at = self._now(now)
        record = ActionRecord(
            action_id=uuid.uuid4().hex if action_id is None else _text("action_id", action_id),
            created_at=created_at, container_id=_text("container_id", container_id),
            container_name=_optional_text("container_name", container_name),
            node=_text("node", node), type=_text("type", type),
            reason=_text("reason", reason, empty_ok=True),
            requested_by=_text("requested_by", requested_by),
            alert_id=_optional_text("alert_id", alert_id), status=status,
            message=_text("message", message, empty_ok=True),
            finished_at=None if status is ActionStatus.PENDING else created_at)
        values = dataclasses.astuple(record)
        try:
            with self._write() as conn:
                conn.execute(f"INSERT INTO actions ({_ACTION_COLUMNS}) "
                             f"VALUES ({_marks(values)})",
                             (*values[:9], record.status.value, *values[10:]))
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise StoreError(f"action id {record.action_id!r} is already stored; "
                                 "use a new id") from exc
            raise
        return record

    def finish_action(self, action_id: str, status: ActionStatus | str, message: str = "", *,
                      now: float | None = None) -> ActionRecord:
        """Record an action's result. The first result wins: finishing an action that is
        already finished (a result replayed after a reconnect) changes nothing and returns the
        stored action. An unknown id raises UnknownAction."""
        status = ActionStatus.parse(status)
        if status is ActionStatus.PENDING:
            raise ValueError("finish_action: 'pending' is not a result; give a final status")
        message = _text("message", message, empty_ok=True)
        finished_at = self._now(now)
        with self._write() as conn:
            conn.execute("UPDATE actions SET status = ?, message = ?, finished_at = ? "
                         "WHERE action_id = ? AND status = 'pending'",
                         (status.value, message, finished_at, action_id))
            row = conn.execute(f"SELECT {_ACTION_COLUMNS} FROM actions WHERE action_id = ?",
                               (action_id,)).fetchone()
        if row is None:
            raise UnknownAction(f"no action with id {action_id!r} is stored")
        return _action(row)

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
            clauses.append(f"status IN ({_marks(wanted)})")
            params.extend(wanted)
        where = " AND ".join(clauses) or "1"
        with self._read() as conn:
            rows = conn.execute(f"SELECT {_ACTION_COLUMNS} FROM actions WHERE {where} "
                                "ORDER BY created_at DESC, rowid DESC LIMIT ?",
                                (*params, _limit(limit))).fetchall()
        return [_action(r) for r in rows]

    # - agents -------------------------------------------------------------------------------

    def upsert_agent(self, node: str, *, agent_version: str | None = None,
                     mode: str | None = None, peer: str | None = None,
                     counters: Mapping[str, Any] | None = None,
                     containers_watched: int | None = None, spool_depth: int | None = None,
                     now: float | None = None) -> AgentRecord:
        """The agent on `node` spoke (hello or heartbeat): it is connected, last seen `now`.

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
        with self._write() as conn:
            row = conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE node = ?",
                               (node,)).fetchone()
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
                peer=peer if peer is not None else (old.peer if old else None))
            conn.execute(f"INSERT OR REPLACE INTO agents ({_AGENT_COLUMNS}) "
                         f"VALUES ({_marks(range(11))})",
                         (record.node, record.agent_version, record.mode, 1,
                          record.connected_at, record.disconnected_at, record.last_seen,
                          json.dumps(record.counters, sort_keys=True),
                          record.containers_watched, record.spool_depth, record.peer))
        return record

    def mark_agent_disconnected(self, node: str, *, peer: str | None = None,
                                now: float | None = None) -> bool:
        """Mark `node`'s agent disconnected; with `peer`, only if that is still its peer (so a
        stale stream closing does not disconnect the agent's newer stream). True if marked."""
        now = self._now(now)
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE agents SET connected = 0, disconnected_at = ? "
                "WHERE node = ? AND connected = 1 AND (? IS NULL OR peer = ?)",
                (now, node, peer, peer))
            return cursor.rowcount == 1

    def mark_all_agents_disconnected(self, *, now: float | None = None) -> int:
        """At collector start: no stream survived the restart. Returns how many were marked."""
        now = self._now(now)
        with self._write() as conn:
            return conn.execute("UPDATE agents SET connected = 0, disconnected_at = ? "
                                "WHERE connected = 1", (now,)).rowcount

    def get_agent(self, node: str) -> AgentRecord | None:
        with self._read() as conn:
            row = conn.execute(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE node = ?",
                               (node,)).fetchone()
        return None if row is None else _agent(row)

    def list_agents(self, *, connected: bool | None = None) -> list[AgentRecord]:
        """Agents by node name; ``connected`` True/False keeps only those."""
        where, params = ("1", ()) if connected is None else ("connected = ?", (int(connected),))
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
            cursor = conn.execute("INSERT INTO audit (time, actor, action, target, decision, "
                                  "reason, details) VALUES (?, ?, ?, ?, ?, ?, ?)", values)
            return int(cursor.lastrowid or 0)

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
            rows = conn.execute(f"{select} WHERE instr(lower(coalesce(name, '')), ?) > 0 "
                                "OR instr(container_id, ?) > 0 "
                                "ORDER BY last_seen DESC, container_id LIMIT ?",
                                (needle, needle, MAX_CANDIDATES)).fetchall()
        raise UnknownContainer(text, [ContainerMatch(*r) for r in rows])

    # - retention and metrics ----------------------------------------------------------------

    def prune(self, older_than_seconds: float, now: float | None = None) -> PruneResult:
        """Delete what is older than ``now - older_than_seconds`` (module docstring)."""
        if not _number(older_than_seconds) or older_than_seconds < 0:
            raise ValueError(f"older_than_seconds must be a number >= 0, "
                             f"got {older_than_seconds!r}")
        cutoff = self._now(now) - older_than_seconds
        with self._write() as conn:
            alerts = conn.execute("DELETE FROM alerts WHERE last_seen < ?", (cutoff,)).rowcount
            audit = conn.execute("DELETE FROM audit WHERE time < ?", (cutoff,)).rowcount
            containers = conn.execute("DELETE FROM containers WHERE last_seen < ?",
                                      (cutoff,)).rowcount
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
                "(SELECT count(*) FROM agents), (SELECT count(*) FROM agents WHERE connected), "
                "(SELECT count(*) FROM audit), (SELECT count(*) FROM containers)").fetchone()
        keys = ("alerts", "actions", "actions_pending", "agents", "agents_connected", "audit",
                "containers")
        return dict(zip(keys, row, strict=True))


__all__ = [
    "MAX_PAGE_SIZE",
    "MIN_ID_PREFIX",
    "SCHEMA_VERSION",
    "ActionRecord",
    "ActionStatus",
    "AgentRecord",
    "AlertFilter",
    "AlertStore",
    "AmbiguousContainer",
    "AuditEntry",
    "ContainerMatch",
    "InsertOutcome",
    "PruneResult",
    "StoreError",
    "UnknownAction",
    "UnknownContainer",
    "image_repository",
]
