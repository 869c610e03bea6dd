"""The collector's filter language: which alerts and actions a listing or a stream selects, and
the keyset page tokens of the store's listings.

Filters (``AlertFilter``, ``ActionFilter``, ``ImageSelector``, ``ContainerSelector``)
    The single definition of what a filter matches, for the store's SQL and, through
    ``fanout.SubscriberFilter``, for the subscriber streams: each condition is written in Python
    (``matches``) and in SQL (``sql``) side by side, and one table of test cases
    (tests/test_collector_filters.py) runs through the SQL, ``AlertFilter.matches`` and
    ``SubscriberFilter.matches`` and requires the same answer.

    The SQL is what SQLite and PostgreSQL both read (``IN``, ``lower``, ``substr``,
    ``coalesce``, ``TRUE``/``FALSE``) with ``?`` parameters; a store whose driver takes
    another parameter style translates the marks.

Page tokens
    Listings are newest first by ``(time, id)``, paged with a keyset cursor: the opaque token
    holds the last returned ``(time, id)`` and a fingerprint of the filter, so a token is only
    valid with the listing it came from (the store's docstring says what a walk sees).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import math
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from driftwarden.core.alerts import AlertKind, Severity

MIN_ID_PREFIX = 4  # shortest container id prefix accepted (filters and find_container)
_TOKEN_VERSION = "v1"


def finite_number(value: Any) -> bool:
    """An int or float (not a bool), neither NaN nor infinite."""
    return (not isinstance(value, bool) and isinstance(value, int | float)
            and math.isfinite(value))


# -- terms and selectors -------------------------------------------------------------------------

_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)  # SQLite's lower()
_HEX_DIGITS = frozenset("0123456789abcdef")
_DIGEST = "sha256:"
_KIND_VALUES = tuple(k.value for k in AlertKind)
_SEVERITY_NAMES = {s.text: s for s in Severity}


def image_repository(image: str) -> str:
    """``registry:5000/team/app:1.2@sha256:...`` -> ``registry:5000/team/app``."""
    name = image.split("@", 1)[0]
    colon = name.rfind(":")
    return name[:colon] if colon > name.rfind("/") else name


def _id_prefix(term: str) -> str | None:
    """The id prefix a term can be: its hex digits in lower case without ``sha256:``; None
    when it is not hex or shorter than MIN_ID_PREFIX (then it is only a name)."""
    digits = term.translate(_ASCII_LOWER).removeprefix(_DIGEST)
    return digits if len(digits) >= MIN_ID_PREFIX and _HEX_DIGITS.issuperset(digits) else None


class _Selector:
    """Terms that name things exactly, plus the hex id prefixes among them. Empty = nothing."""

    __slots__ = ("names", "prefixes")

    def __init__(self, terms: Iterable[str]) -> None:
        self.names = tuple(dict.fromkeys(t.strip() for t in terms))
        self.prefixes = tuple(dict.fromkeys(
            p for t in self.names if (p := _id_prefix(t)) is not None))

    def __bool__(self) -> bool:
        return bool(self.names)

    def _id_matches(self, value: str | None) -> bool:
        """The id is a term, or starts with an id prefix (case and ``sha256:`` aside)."""
        if not value:
            return False
        if value in self.names:
            return True
        low = value.translate(_ASCII_LOWER)
        return any(low.startswith(p) or low.startswith(_DIGEST + p) for p in self.prefixes)

    def _id_sql(self, column: str) -> tuple[list[str], list[Any]]:
        parts = [f"{column} IN ({sql_marks(self.names)})"]
        params: list[Any] = list(self.names)
        for p in self.prefixes:
            parts.append(f"substr(lower({column}), 1, ?) = ? "
                         f"OR substr(lower({column}), 1, ?) = ?")
            params.extend([len(p), p, len(_DIGEST) + len(p), _DIGEST + p])
        return parts, params


class ImageSelector(_Selector):
    """Images by the name an alert shows (``nginx:1.25``), its repository (``nginx``: every tag
    and digest of it), or the image id (``sha256:<hex>``, the bare hex, or a prefix of at least
    MIN_ID_PREFIX hex digits). Empty = nothing."""

    __slots__ = ()

    def matches(self, image: str | None, image_id: str | None) -> bool:
        if image and (image in self.names or image_repository(image) in self.names):
            return True
        return self._id_matches(image_id)

    def sql(self) -> tuple[str, list[Any]]:
        """The same over the alerts table's image, image_repo and image_id columns."""
        marks = sql_marks(self.names)
        parts, params = self._id_sql("image_id")
        return (" OR ".join([f"image IN ({marks})", f"image_repo IN ({marks})", *parts]),
                [*self.names, *self.names, *params])


class ContainerSelector(_Selector):
    """Containers by name, full id, or an id prefix of at least MIN_ID_PREFIX hex digits.
    Empty = nothing."""

    __slots__ = ()

    def matches(self, container_id: str | None, name: str | None) -> bool:
        if name and name in self.names:
            return True
        return self._id_matches(container_id)

    def sql(self, id_column: str = "container_id",
            name_column: str = "container_name") -> tuple[str, list[Any]]:
        """The same over a table's container id and name columns."""
        parts, params = self._id_sql(id_column)
        return (" OR ".join([f"{name_column} IN ({sql_marks(self.names)})", *parts]),
                [*self.names, *params])


def _terms(field: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):  # one term given bare, not a tuple of its characters
        value = (value,)
    out = []
    for i, term in enumerate(value):
        if not isinstance(term, str):
            raise ValueError(f"{field}[{i}]: must be a string, got {type(term).__name__}")
        if not term.strip():
            raise ValueError(f"{field}[{i}]: empty value; leave the list empty to match any")
        out.append(term.strip())
    return tuple(out)


def _kinds(field: str, value: Any) -> tuple[str, ...]:
    out = []
    for i, term in enumerate(_terms(field, value)):
        kind = term.lower()
        if kind not in _KIND_VALUES:
            raise ValueError(f"{field}[{i}]: unknown kind {kind!r}; allowed: "
                             + ", ".join(_KIND_VALUES))
        out.append(kind)
    return tuple(out)


def _severity(value: Any) -> Severity | None:
    if value is None or isinstance(value, Severity):
        return value
    if isinstance(value, str):
        severity = _SEVERITY_NAMES.get(value.strip().lower())
        if severity is None:
            raise ValueError(f"min_severity: unknown severity {value!r}; allowed: "
                             + ", ".join(_SEVERITY_NAMES))
        return severity
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return Severity(value)
        except ValueError:
            raise ValueError(f"min_severity: {value!r} is not 1..4 (low..critical)") from None
    raise ValueError(f"min_severity: {value!r} is not a severity")


def _time_bound(field: str, value: Any) -> float | None:
    if value is None:
        return None
    if not finite_number(value):
        raise ValueError(f"{field} must be seconds since the epoch, got {value!r}")
    return float(value)


def _time_range(since: Any, until: Any) -> tuple[float | None, float | None]:
    since, until = _time_bound("since", since), _time_bound("until", until)
    if since is not None and until is not None and since > until:
        raise ValueError(f"since ({since}) is after until ({until})")
    return since, until


def _fingerprint(kind: str, filter: Any) -> str:
    """Short hash of a filter: a page token is only valid with the listing it came from."""
    data = {f.name: getattr(filter, f.name) for f in dataclasses.fields(filter) if f.init}
    text = json.dumps([kind, data], sort_keys=True, default=int)  # default: Severity
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class AlertFilter:
    """Which alerts to list or stream. Empty means "any"; all given conditions must hold.

    - ``kinds`` / ``exclude_kinds``: alert kind ("drift", "novel", "anomaly"; any case).
    - ``min_severity``: severity at least this ("low" < "medium" < "high" < "critical").
    - ``nodes``, ``namespaces``: exact.
    - ``images``: see :class:`ImageSelector`; ``containers``: see :class:`ContainerSelector`.
    - ``exclude_*``: the same matches, negated. An unknown (null or empty) field matches no
      term: an include list rejects the alert, an exclude list keeps it.
    - ``since`` <= time < ``until`` (seconds since the epoch).
    Terms are stripped of surrounding white space; a lone string is one term.
    ``matches()`` (for streams) and ``sql()`` (for the store) apply exactly the same rules.
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
    _images: ImageSelector = field(init=False, repr=False, compare=False)
    _exclude_images: ImageSelector = field(init=False, repr=False, compare=False)
    _containers: ContainerSelector = field(init=False, repr=False, compare=False)
    _exclude_containers: ContainerSelector = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("nodes", "namespaces", "images", "containers", "exclude_nodes",
                     "exclude_namespaces", "exclude_images", "exclude_containers"):
            put(name, _terms(name, getattr(self, name)))
        for name in ("kinds", "exclude_kinds"):
            put(name, _kinds(name, getattr(self, name)))
        put("min_severity", _severity(self.min_severity))
        since, until = _time_range(self.since, self.until)
        put("since", since)
        put("until", until)
        put("_images", ImageSelector(self.images))
        put("_exclude_images", ImageSelector(self.exclude_images))
        put("_containers", ContainerSelector(self.containers))
        put("_exclude_containers", ContainerSelector(self.exclude_containers))

    @property
    def empty(self) -> bool:
        """No condition at all: every alert matches."""
        return not (self.kinds or self.nodes or self.namespaces or self.images
                    or self.containers or self.exclude_kinds or self.exclude_nodes
                    or self.exclude_namespaces or self.exclude_images
                    or self.exclude_containers) and (self.min_severity, self.since,
                                                     self.until) == (None, None, None)

    # - in Python, for streams ---------------------------------------------------------------

    def matches(self, alert: Mapping[str, Any]) -> bool:
        """Whether an alert dict (the store's shape: ``to_dict()`` plus ``"node"``) passes."""
        kind = alert.get("kind")
        if self.kinds and kind not in self.kinds:
            return False
        if kind in self.exclude_kinds:
            return False
        if self.min_severity is not None:
            try:  # as the store parses it on insert
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
        if namespace in self.exclude_namespaces:
            return False
        image, image_id = container.get("image"), container.get("image_id")
        if self.images and not self._images.matches(image, image_id):
            return False
        if self.exclude_images and self._exclude_images.matches(image, image_id):
            return False
        cid, name = container.get("id"), container.get("name")
        if self.containers and not self._containers.matches(cid, name):
            return False
        if self.exclude_containers and self._exclude_containers.matches(cid, name):
            return False
        when = alert.get("time")
        if self.since is not None and not (finite_number(when) and when >= self.since):
            return False
        return self.until is None or (finite_number(when) and when < self.until)

    # - in SQL, for the store ----------------------------------------------------------------

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE expression over the alerts table and its parameters (``"TRUE"`` for none)."""
        where = _Where()
        if self.kinds:
            where.include(f"kind IN ({sql_marks(self.kinds)})", self.kinds)
        if self.exclude_kinds:
            where.exclude(f"kind IN ({sql_marks(self.exclude_kinds)})", self.exclude_kinds)
        if self.min_severity is not None:
            where.include("severity >= ?", [int(self.min_severity)])
        if self.nodes:
            where.include(f"node IN ({sql_marks(self.nodes)})", self.nodes)
        if self.exclude_nodes:
            where.exclude(f"node IN ({sql_marks(self.exclude_nodes)})", self.exclude_nodes)
        if self.namespaces:
            where.include(f"namespace IN ({sql_marks(self.namespaces)})", self.namespaces)
        if self.exclude_namespaces:
            where.exclude(f"namespace IN ({sql_marks(self.exclude_namespaces)})",
                          self.exclude_namespaces)
        if self.images:
            where.include(*self._images.sql())
        if self.exclude_images:
            where.exclude(*self._exclude_images.sql())
        if self.containers:
            where.include(*self._containers.sql())
        if self.exclude_containers:
            where.exclude(*self._exclude_containers.sql())
        where.time_range("time", self.since, self.until)
        return where.done()

    def fingerprint(self) -> str:
        """Short hash of the filter: a page token is only valid with the filter it came from."""
        return _fingerprint("alerts", self)


@dataclass(frozen=True)
class ActionFilter:
    """Which actions to list. Empty means "any"; all given conditions must hold.

    - ``nodes``: exact; ``types``: action types ("pause", "quarantine", ...), exact.
    - ``containers``: see :class:`ContainerSelector` (over the action's container id and name).
    - ``since`` <= requested time < ``until`` (seconds since the epoch).
    """

    nodes: tuple[str, ...] = ()
    containers: tuple[str, ...] = ()
    types: tuple[str, ...] = ()
    since: float | None = None
    until: float | None = None
    _containers: ContainerSelector = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("nodes", "containers", "types"):
            object.__setattr__(self, name, _terms(name, getattr(self, name)))
        since, until = _time_range(self.since, self.until)
        object.__setattr__(self, "since", since)
        object.__setattr__(self, "until", until)
        object.__setattr__(self, "_containers", ContainerSelector(self.containers))

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE expression over the actions table and its parameters (``"TRUE"`` for none)."""
        where = _Where()
        if self.nodes:
            where.include(f"node IN ({sql_marks(self.nodes)})", self.nodes)
        if self.containers:
            where.include(*self._containers.sql())
        if self.types:
            where.include(f"type IN ({sql_marks(self.types)})", self.types)
        where.time_range("created_at", self.since, self.until)
        return where.done()

    def fingerprint(self) -> str:
        return _fingerprint("actions", self)


class _Where:
    """AND-ed SQL conditions and their parameters."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.params: list[Any] = []

    def include(self, expr: str, values: Sequence[Any]) -> None:
        self.clauses.append(f"({expr})")
        self.params.extend(values)

    def exclude(self, expr: str, values: Sequence[Any]) -> None:
        # NOT(NULL) is NULL, which would drop rows whose field is unknown
        self.clauses.append(f"NOT coalesce(({expr}), FALSE)")
        self.params.extend(values)

    def time_range(self, column: str, since: float | None, until: float | None) -> None:
        if since is not None:
            self.include(f"{column} >= ?", [since])
        if until is not None:
            self.include(f"{column} < ?", [until])

    def done(self) -> tuple[str, list[Any]]:
        return (" AND ".join(self.clauses) or "TRUE"), self.params


def sql_marks(values: Sequence[Any]) -> str:
    return ", ".join("?" * len(values))


# -- page tokens ---------------------------------------------------------------------------------


def encode_page_token(when: float, alert_id: str, fingerprint: str) -> str:
    data = json.dumps({"t": when, "i": alert_id, "f": fingerprint}, separators=(",", ":"))
    return f"{_TOKEN_VERSION}.{base64.urlsafe_b64encode(data.encode()).decode().rstrip('=')}"


def decode_page_token(token: str, fingerprint: str) -> tuple[float, str]:
    bad = ("invalid page token: pass back exactly the next_page_token of the previous page, "
           "or no token to start from the newest entry")
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
    if (not finite_number(when) or not isinstance(alert_id, str)
            or not isinstance(token_filter, str)):
        raise ValueError(bad)
    if token_filter != fingerprint:
        raise ValueError("invalid page token: it belongs to a listing with another filter; "
                         "keep the filter unchanged while paging, or start without a token")
    return float(when), alert_id


__all__ = [
    "MIN_ID_PREFIX",
    "ActionFilter",
    "AlertFilter",
    "ContainerSelector",
    "ImageSelector",
    "decode_page_token",
    "encode_page_token",
    "finite_number",
    "image_repository",
    "sql_marks",
]
