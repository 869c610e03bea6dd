"""Fleet baselines as plain data: one image's baseline as the collector holds it and ships it.

The agent keeps a baseline as a ``driftwarden.models.profile.Profile`` (with an ``ItemSet``);
the collector may not load models, so the fleet's copy is a :class:`FleetBaseline`: the same
content as plain data, items as ``(kind, key)`` pairs (:data:`ItemKey`, ``Item.key()``'s
tuple). Both meet in the baseline file format, msgpack of ``Profile.to_obj()``:

- :meth:`FleetBaseline.to_file_obj` writes exactly that format (confirmed items only), plus a
  ``"fleet"`` key with what only the fleet knows (the evidence of items shown while learning,
  the containers and nodes that taught it, the image's layers), which ``Profile.from_obj``
  ignores: ``Profile.from_obj(doc.to_file_obj(), ItemSet)`` is the agent's profile of it.
- :meth:`FleetBaseline.from_file_obj` reads any such file: a local ``baseline export``,
  ``driftwarden learn``'s output, or a fleet export. Anything malformed is a BaselineError that
  names the field.

Consensus vocabulary: ``items`` are the confirmed items (what the image does); ``evidence``
maps an item shown while learning to the containers that showed it (:class:`ContainerRef`);
an item with evidence that is not in ``items`` is unconfirmed (held back by consensus).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
from driftwarden.core.errors import BaselineError
from driftwarden.core.learning import LearningPolicy, LearningProgress, is_stable
from driftwarden.core.modes import Mode

FILE_FORMAT = 1  # models.profile.FORMAT_VERSION: the baseline file format
ITEM_SET_FORMAT = 1  # models.items.FORMAT_VERSION: the "items" map inside it
MAX_HISTORY = 100  # mode changes kept (models.profile keeps as many)
MAX_PORT = 65_535

# The key of each item kind (driftwarden.models.items: ``Item.key()``), field by field: a
# BaselineItem carries every field as text, a port as decimal digits.
BASELINE_ITEM_FIELDS: dict[str, tuple[type, ...]] = {
    "exec": (str, str),  # exe, argv0
    "lineage": (str, str),  # parent, child
    "connect": (str, str, str, int, str, str),  # family, class, address, port, protocol, exe
    "write": (str, str),  # path, op
}
ITEM_KINDS = tuple(BASELINE_ITEM_FIELDS)

ItemKey = tuple[str, tuple[str | int, ...]]


def item_key(kind: Any, fields: Any) -> ItemKey:
    """``(kind, key)`` checked against :data:`BASELINE_ITEM_FIELDS`: an int field takes an int
    or its decimal text (the wire's form). ValueError saying what is wrong."""
    types = BASELINE_ITEM_FIELDS.get(kind) if isinstance(kind, str) else None
    if types is None:
        raise ValueError(f"{kind!r} is not an item kind (one of {', '.join(ITEM_KINDS)})")
    if isinstance(fields, str | bytes) or not isinstance(fields, Sequence):
        raise ValueError(f"a {kind} item's key must be a list of {len(types)} fields, "
                         f"got {fields!r}")
    if len(fields) != len(types):
        raise ValueError(f"a {kind} item's key has {len(types)} fields, got {len(fields)}")
    key: list[str | int] = []
    for value, wanted in zip(fields, types, strict=True):
        if wanted is int:
            number = value
            if isinstance(value, str) and value.isascii() and value.isdigit():
                number = int(value)
            if isinstance(number, bool) or not isinstance(number, int) \
                    or not 0 <= number <= MAX_PORT:
                raise ValueError(f"a {kind} item's port must be a number 0..{MAX_PORT}, "
                                 f"got {value!r}")
            key.append(number)
        elif isinstance(value, str):
            key.append(value)
        else:
            raise ValueError(f"a {kind} item's key fields are texts, got {value!r}")
    return kind, tuple(key)


def describe_item(item: ItemKey) -> str:
    """``exec /bin/sh sh``: an item for messages."""
    kind, key = item
    return f"{kind} " + " ".join(str(v) for v in key)


@dataclass(frozen=True, order=True)
class ContainerRef:
    """A container that ran an image (or showed an item), and where."""

    container_id: str
    node: str
    name: str | None = None

    def describe(self) -> str:
        return f"{self.name or '?'} ({self.container_id[:12]}) on {self.node}"


@dataclass(frozen=True)
class HeldBaseline:
    """The fleet baseline an agent holds for an image: its version and mode."""

    image_key: str
    version: int
    mode: Mode


@dataclass(frozen=True)
class BaselineSummary:
    image_key: str
    image_name: str
    mode: Mode
    version: int
    items: int
    unconfirmed: int
    windows: int
    containers: int
    nodes: tuple[str, ...]
    created_at: float
    updated_at: float
    learning_started_at: float | None  # None when not learning
    stable: bool = False  # learning and no new confirmed item for the stable period
    carried_from: str | None = None
    last_new_item_at: float = 0.0  # when the last item was confirmed
    unstable: bool = False  # grew past the learning policy's max_items

    def describe(self) -> str:
        return f"{self.image_name or '?'} ({self.image_key[:19]})"

    def is_stable(self, policy: LearningPolicy, now: float) -> bool:
        """Learning, and no new confirmed item for the policy's stable period."""
        return (self.mode is Mode.LEARN and not self.unstable
                and now - self.last_new_item_at >= policy.stable_seconds)


@dataclass
class FleetBaseline:
    """One image's fleet baseline (module docstring). Mutable; plain data."""

    image_key: str
    image_name: str = ""
    mode: Mode = Mode.LEARN
    version: int = 1
    created_at: float = 0.0
    updated_at: float = 0.0
    items: dict[ItemKey, None] = field(default_factory=dict)  # confirmed, in learned order
    evidence: dict[ItemKey, dict[str, ContainerRef]] = field(default_factory=dict)
    windows: list[tuple[float, ...]] = field(default_factory=list)
    progress: LearningProgress | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # at, from, to, reason, by
    layers: tuple[str, ...] = ()  # the image's layer digests, base first
    containers: dict[str, ContainerRef] = field(default_factory=dict)  # ran it while learning
    nodes: tuple[str, ...] = ()  # nodes that sent increments
    carried_from: str | None = None
    carried_layers: int = 0  # with carried_from: `layers` shared with it, from the base
    starts_seen: bool = False
    startup_items: list[dict[str, Any]] = field(default_factory=list)
    caps: dict[str, int] = field(default_factory=dict)  # the file's ItemSet caps, kept as given
    overflowed: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.progress is None:
            self.progress = LearningProgress(started_at=self.created_at,
                                             last_new_item_at=self.created_at)

    def unconfirmed(self) -> dict[ItemKey, tuple[ContainerRef, ...]]:
        """Items shown while learning but held back by consensus, with who showed them."""
        return {item: tuple(refs.values()) for item, refs in self.evidence.items()
                if item not in self.items}

    def summary(self, policy: LearningPolicy | None = None,
                now: float | None = None) -> BaselineSummary:
        """The counts; ``stable`` is computed when `policy` and `now` are given."""
        learning = self.mode is Mode.LEARN
        return BaselineSummary(
            image_key=self.image_key, image_name=self.image_name, mode=self.mode,
            version=self.version, items=len(self.items),
            unconfirmed=sum(1 for item in self.evidence if item not in self.items),
            windows=len(self.windows), containers=len(self.containers), nodes=self.nodes,
            created_at=self.created_at, updated_at=self.updated_at,
            learning_started_at=self.progress.started_at if learning else None,
            stable=(learning and policy is not None and now is not None
                    and is_stable(self.progress, policy, now)),
            carried_from=self.carried_from, last_new_item_at=self.progress.last_new_item_at,
            unstable=self.progress.unstable)

    # -- the file format ------------------------------------------------------------------

    def to_file_obj(self) -> dict[str, Any]:
        """``Profile.to_obj()``'s format plus the fleet's extras (module docstring)."""
        by_kind: dict[str, list[list[str | int]]] = {kind: [] for kind in ITEM_KINDS}
        for kind, key in self.items:
            by_kind[kind].append(list(key))
        return {
            "format": FILE_FORMAT,
            "image_id": self.image_key,
            "image_name": self.image_name,
            "mode": self.mode.value,
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "items": {"version": ITEM_SET_FORMAT, "caps": dict(self.caps),
                      "overflowed": dict(self.overflowed), "items": by_kind},
            "windows": [list(w) for w in self.windows],
            "progress": dataclasses.asdict(self.progress),  # LearningProgress(**it) reads it
            "history": [dict(h) for h in self.history],
            "starts_seen": self.starts_seen,
            "startup_items": [dict(s) for s in self.startup_items],
            "fleet": {
                "evidence": [[kind, list(key), [_ref_obj(r) for r in refs.values()]]
                             for (kind, key), refs in self.evidence.items()],
                "containers": [_ref_obj(r) for r in self.containers.values()],
                "nodes": list(self.nodes),
                "layers": list(self.layers),
                "carried_from": self.carried_from,
                "carried_layers": self.carried_layers,
            },
        }

    @classmethod
    def from_file_obj(cls, obj: Any) -> FleetBaseline:
        """A baseline file's content (module docstring); BaselineError naming what is wrong."""
        if not isinstance(obj, Mapping):
            raise BaselineError("not a baseline file (its top level is not a map)")
        if obj.get("format") != FILE_FORMAT:
            raise BaselineError(f"baseline file format {obj.get('format')!r}; this "
                                f"driftwarden reads format {FILE_FORMAT}")
        try:
            return _from_file_obj(cls, obj)
        except (KeyError, TypeError, ValueError) as exc:
            what = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc)
            raise BaselineError(f"not a usable baseline file: {what}") from None


def pack_baseline(doc: FleetBaseline) -> bytes:
    """The baseline file's bytes (msgpack)."""
    return msgpack.packb(doc.to_file_obj(), use_bin_type=True)


def unpack_baseline(data: bytes) -> FleetBaseline:
    """A baseline file's bytes -> its baseline; BaselineError for a corrupt or truncated one."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError,
            msgpack.exceptions.StackError, ValueError, TypeError) as exc:
        raise BaselineError(f"not a baseline file: corrupt or truncated msgpack ({exc})") \
            from None
    return FleetBaseline.from_file_obj(obj)


# -- reading a file -----------------------------------------------------------------------------


def _ref_obj(ref: ContainerRef) -> list[str | None]:
    return [ref.container_id, ref.node, ref.name]


def _ref(value: Any, what: str) -> ContainerRef:
    if not (isinstance(value, list | tuple) and len(value) == 3
            and all(isinstance(v, str) and v for v in value[:2])
            and (value[2] is None or isinstance(value[2], str))):
        raise ValueError(f"{what}: expected [container id, node, name or null], got {value!r}")
    return ContainerRef(value[0], value[1], value[2] or None)


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"{what} must be a list, got {type(value).__name__}")
    return list(value)


def _counts(value: Any, what: str) -> dict[str, int]:
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in value.items()):
        raise ValueError(f"{what} must map item kinds to counts, got {value!r}")
    return dict(value)


def _items(value: Any) -> tuple[dict[ItemKey, None], dict[str, int], dict[str, int]]:
    if not isinstance(value, Mapping) or value.get("version") != ITEM_SET_FORMAT:
        raise ValueError("items: not an item set (missing or unsupported version)")
    by_kind = value.get("items")
    if not isinstance(by_kind, Mapping):
        raise ValueError("items.items must map item kinds to lists of keys")
    items: dict[ItemKey, None] = {}
    for kind, keys in by_kind.items():
        for key in _list(keys, f"items.items[{kind!r}]"):
            items[item_key(kind, key)] = None
    return (items, _counts(value.get("caps", {}), "items.caps"),
            _counts(value.get("overflowed", {}), "items.overflowed"))


def _history(value: Any) -> list[dict[str, Any]]:
    out = []
    for entry in _list(value, "history"):
        if not isinstance(entry, Mapping):
            raise ValueError(f"history: an entry is not a map ({entry!r})")
        out.append({"at": _number(entry.get("at", 0.0), "history[].at"),
                    "from": str(entry.get("from", "")), "to": str(entry.get("to", "")),
                    "reason": str(entry.get("reason", "")), "by": str(entry.get("by", ""))})
    return out[-MAX_HISTORY:]


def _startup_items(value: Any) -> list[dict[str, Any]]:
    out = []
    for entry in _list(value, "startup_items"):
        if not (isinstance(entry, Mapping) and isinstance(entry.get("kind"), str)
                and isinstance(entry.get("key"), list | tuple)
                and isinstance(entry.get("container"), str)):
            raise ValueError(f"startup_items: bad entry {entry!r}")
        out.append({"kind": entry["kind"], "key": list(entry["key"]),
                    "container": entry["container"],
                    "at": _number(entry.get("at") or 0.0, "startup_items[].at")})
    return out


def _progress(value: Any) -> LearningProgress:
    if not isinstance(value, Mapping):
        raise ValueError("progress must be a map")
    ended_at = value.get("ended_at")
    end_reason = value.get("end_reason")
    counts = {}
    for name in ("windows_learned", "windows_tainted", "items_seen"):
        count = value.get(name, 0)
        if type(count) is not int or count < 0:
            raise ValueError(f"progress.{name} must be a count, got {count!r}")
        counts[name] = count
    return LearningProgress(
        started_at=_number(value["started_at"], "progress.started_at"),
        last_new_item_at=_number(value["last_new_item_at"], "progress.last_new_item_at"),
        unstable=bool(value.get("unstable", False)),
        ended_at=None if ended_at is None else _number(ended_at, "progress.ended_at"),
        end_reason=None if end_reason is None else str(end_reason), **counts)


def _window(value: Any) -> tuple[float, ...]:
    values = _list(value, "windows[]")
    if not values:
        raise ValueError("windows: an empty window")
    return tuple(_number(v, "a window's value") for v in values)


def _from_file_obj(cls: type[FleetBaseline], obj: Mapping[str, Any]) -> FleetBaseline:
    image_key = obj["image_id"]
    if not isinstance(image_key, str) or not image_key:
        raise ValueError(f"image_id must be the image key, got {image_key!r}")
    image_name = obj.get("image_name") or ""
    if not isinstance(image_name, str):
        raise ValueError(f"image_name must be a text, got {image_name!r}")
    version = obj["version"]
    if type(version) is not int or version < 1:
        raise ValueError(f"version must be a number >= 1, got {version!r}")
    items, caps, overflowed = _items(obj["items"])
    fleet = obj.get("fleet") or {}
    if not isinstance(fleet, Mapping):
        raise ValueError("fleet must be a map")
    evidence: dict[ItemKey, dict[str, ContainerRef]] = {}
    for entry in _list(fleet.get("evidence", []), "fleet.evidence"):
        if not isinstance(entry, list | tuple) or len(entry) != 3:
            raise ValueError(f"fleet.evidence: expected [kind, key, containers], got {entry!r}")
        refs = [_ref(r, "fleet.evidence[].containers[]") for r in _list(entry[2], "containers")]
        evidence[item_key(entry[0], entry[1])] = {r.container_id: r for r in refs}
    containers = [_ref(r, "fleet.containers[]") for r in _list(fleet.get("containers", []),
                                                                "fleet.containers")]
    texts = {}
    for name in ("nodes", "layers"):
        texts[name] = tuple(_list(fleet.get(name, []), f"fleet.{name}"))
        if not all(isinstance(v, str) and v for v in texts[name]):
            raise ValueError(f"fleet.{name} must be a list of texts")
    carried_from = fleet.get("carried_from")
    if carried_from is not None and not isinstance(carried_from, str):
        raise ValueError(f"fleet.carried_from must be an image key, got {carried_from!r}")
    carried_layers = fleet.get("carried_layers", 0) if carried_from else 0
    if type(carried_layers) is not int or not 0 <= carried_layers <= len(texts["layers"]):
        raise ValueError(f"fleet.carried_layers must count some of the image's "
                         f"{len(texts['layers'])} layers, got {carried_layers!r}")
    return cls(
        image_key=image_key, image_name=image_name, mode=Mode(obj["mode"]), version=version,
        created_at=_number(obj["created_at"], "created_at"),
        updated_at=_number(obj["updated_at"], "updated_at"),
        items=items, evidence=evidence,
        windows=[_window(w) for w in _list(obj["windows"], "windows")],
        progress=_progress(obj["progress"]), history=_history(obj.get("history", [])),
        layers=texts["layers"], containers={r.container_id: r for r in containers},
        nodes=texts["nodes"], carried_from=carried_from or None, carried_layers=carried_layers,
        starts_seen=bool(obj.get("starts_seen", False)),
        startup_items=_startup_items(obj.get("startup_items", [])), caps=caps,
        overflowed=overflowed)


def known_items(items: Iterable[ItemKey]) -> dict[str, list[ItemKey]]:
    """Items grouped by kind, in :data:`ITEM_KINDS` order (each kind's in the given order)."""
    out: dict[str, list[ItemKey]] = {kind: [] for kind in ITEM_KINDS}
    for item in items:
        out[item[0]].append(item)
    return out


__all__ = [
    "BASELINE_ITEM_FIELDS",
    "FILE_FORMAT",
    "ITEM_KINDS",
    "MAX_HISTORY",
    "BaselineSummary",
    "ContainerRef",
    "FleetBaseline",
    "HeldBaseline",
    "ItemKey",
    "describe_item",
    "item_key",
    "known_items",
    "pack_baseline",
    "unpack_baseline",
]
