"""The wire: driftwarden.v1 messages <-> the agent's objects, and validation of what arrives.

Pure functions, no I/O. A server validates every message it receives with the ``validate_*``
function for its type before using it; a bad message raises :class:`InvalidMessage`, whose text
names the field and what is wrong (``alert.reasons[2].code: missing``).

Alerts travel without loss: ``alert_from_proto(alert_to_proto(a, node)) == a``.
- Texts the agent leaves null are unset ``optional`` fields.
- Reason detail values and the triggering events travel as JSON text (types kept exactly).
- Times are Timestamps with nanosecond resolution, which hold a float epoch time exactly: a
  double's step is coarser than 1 ns for any time after April 1970.
- One exception: protobuf strings must be valid UTF-8, so a text holding undecodable bytes (a
  path decoded with ``surrogateescape``) has each of them replaced by U+FFFD in string fields.
  The JSON fields keep them exactly (as ``\\udcXX`` escapes).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from driftwarden.core.actions import AGENT_RESULTS, ActionStatus
from driftwarden.core.alerts import (
    ID_HEX_CHARS,
    MAX_LABELS,
    Alert,
    AlertKind,
    AlertReason,
    Severity,
)
from driftwarden.core.baselines import (
    BASELINE_ITEM_FIELDS,
    BaselineSummary,
    ContainerRef,
    FleetBaseline,
    HeldBaseline,
    ItemKey,
)
from driftwarden.core.errors import InvalidMessage
from driftwarden.core.learning import LearningProgress
from driftwarden.core.modes import Mode
from driftwarden.proto.v1 import actions_pb2, agent_pb2, alerts_pb2, baselines_pb2, common_pb2
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

MAX_MESSAGE_BYTES = 4 * 1024 * 1024  # grpc.max_send/receive_message_length, both ends


@dataclass(frozen=True)
class WireLimits:
    """Bounds a received message must keep (string lengths in characters)."""

    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_text_chars: int = 4096  # every string field but events_json
    max_events_json_chars: int = 256 * 1024
    max_repeated: int = 64  # every repeated field without its own bound below
    max_reasons: int = 32
    max_details: int = 32  # per reason
    max_argv: int = 256
    max_labels: int = MAX_LABELS  # per container
    max_heartbeat_containers: int = 1024  # a node's running containers (a k8s node: <= 110 pods)
    max_batch_alerts: int = 500  # alerts (and spool_seqs) in one AlertBatch or Ack
    max_page_size: int = 1000
    # fleet baselines: a whole baseline (4 item kinds x models.items' cap of 4096; the windows
    # and mode history models.profile keeps), what one node holds, one increment's share
    max_baseline_items: int = 4 * 4096
    max_baseline_windows: int = 2000
    max_baseline_history: int = 100
    max_node_baselines: int = 4096  # images an agent holds baselines of (Hello, Agents.List)
    max_increment_items: int = 1000
    max_increment_windows: int = 500
    max_evidence_containers: int = 1024  # containers that showed one item (a node: <= 110 pods)
    max_layers: int = 256  # an image's layer digests


DEFAULT_LIMITS = WireLimits()

# An agent's per-kind probe counters (KindCounters), as the probes name them
KIND_COUNTER_FIELDS = ("emitted", "suppressed", "dropped", "over_budget", "known")

# Repeated fields with their own bound: field full name -> WireLimits attribute.
_REPEATED_LIMITS = {
    "driftwarden.v1.Alert.reasons": "max_reasons",
    "driftwarden.v1.Reason.details": "max_details",
    "driftwarden.v1.Process.argv": "max_argv",
    "driftwarden.v1.ExecEvent.argv": "max_argv",
    "driftwarden.v1.Container.labels": "max_labels",
    "driftwarden.v1.Heartbeat.containers": "max_heartbeat_containers",
    "driftwarden.v1.AlertBatch.alerts": "max_batch_alerts",
    "driftwarden.v1.AlertBatch.spool_seqs": "max_batch_alerts",
    "driftwarden.v1.Ack.alert_ids": "max_batch_alerts",
    "driftwarden.v1.Ack.spool_seqs": "max_batch_alerts",
    "driftwarden.v1.Baseline.items": "max_baseline_items",
    "driftwarden.v1.Baseline.unconfirmed": "max_baseline_items",
    "driftwarden.v1.Baseline.windows": "max_baseline_windows",
    "driftwarden.v1.Baseline.history": "max_baseline_history",
    "driftwarden.v1.Baseline.layers": "max_layers",
    "driftwarden.v1.BaselineSummary.nodes": "max_evidence_containers",
    "driftwarden.v1.BaselineIncrement.items": "max_increment_items",
    "driftwarden.v1.BaselineIncrement.windows": "max_increment_windows",
    "driftwarden.v1.BaselineIncrement.containers": "max_evidence_containers",
    "driftwarden.v1.BaselineIncrement.layers": "max_layers",
    "driftwarden.v1.BaselineRequest.layers": "max_layers",
    "driftwarden.v1.ItemEvidence.containers": "max_evidence_containers",
    "driftwarden.v1.Hello.baselines": "max_node_baselines",
    "driftwarden.v1.Agent.baselines": "max_node_baselines",
    "driftwarden.v1.ListBaselinesResponse.baselines": "max_node_baselines",
    "driftwarden.v1.DiffBaselinesResponse.only_in_a": "max_baseline_items",
    "driftwarden.v1.DiffBaselinesResponse.only_in_b": "max_baseline_items",
    "driftwarden.v1.AcceptAlertResponse.added": "max_baseline_items",
}
_EVENTS_JSON_FIELD = "driftwarden.v1.Alert.events_json"
_TIMESTAMP_TYPE = Timestamp.DESCRIPTOR.full_name
_MIN_SECONDS = -62_135_596_800  # 0001-01-01T00:00:00Z, the Timestamp range
_MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z
_ALERT_ID = re.compile(f"[0-9a-f]{{{ID_HEX_CHARS}}}")


# -- enums -----------------------------------------------------------------------------------


class EnumText:
    """Text <-> a proto enum's numbers: ``"container-gone"`` <-> ``ACTION_STATUS_CONTAINER_GONE``.

    The text is the value name without the prefix, lower case, ``_`` -> ``-``; the zero
    (``*_UNSPECIFIED``) value has none.
    """

    def __init__(self, enum_type: Any, prefix: str, what: str) -> None:
        self.descriptor = enum_type.DESCRIPTOR
        self.what = what
        self._numbers = {v.name.removeprefix(prefix).lower().replace("_", "-"): v.number
                         for v in self.descriptor.values if v.number != 0}
        self._texts = {n: t for t, n in self._numbers.items()}

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(self._numbers)

    @property
    def numbers(self) -> tuple[int, ...]:
        return tuple(self._texts)

    def to_proto(self, text: str) -> int:
        """``"drift"`` (or an enum whose ``str()`` is that) -> the number; ValueError if unknown."""
        try:
            return self._numbers[str(text)]
        except KeyError:
            raise ValueError(f"unknown {self.what} {str(text)!r} "
                             f"(one of {', '.join(self.texts)})") from None

    def from_proto(self, number: int) -> str:
        """The number -> its text; InvalidMessage for the zero value or an unknown number."""
        try:
            return self._texts[number]
        except KeyError:
            problem = "unspecified" if number == 0 else f"unknown value {number}"
            raise InvalidMessage(f"{self.what}: {problem}") from None

    def name(self, number: int) -> str:
        value = self.descriptor.values_by_number.get(number)
        return value.name if value is not None else str(number)

    def names(self, numbers: tuple[int, ...]) -> str:
        return ", ".join(self.name(n) for n in numbers)


ALERT_KIND = EnumText(common_pb2.AlertKind, "ALERT_KIND_", "alert kind")
SEVERITY = EnumText(common_pb2.Severity, "SEVERITY_", "severity")
MODE = EnumText(common_pb2.Mode, "MODE_", "mode")
ACTION_TYPE = EnumText(actions_pb2.ActionType, "ACTION_TYPE_", "action type")
ACTION_STATUS = EnumText(actions_pb2.ActionStatus, "ACTION_STATUS_", "action status")


def action_status_to_proto(status: ActionStatus | str) -> int:
    """``ActionStatus.CONTAINER_GONE`` (or ``"container_gone"``) -> its proto number."""
    return ACTION_STATUS.to_proto(ActionStatus(status).value.replace("_", "-"))


def action_status_from_proto(number: int) -> ActionStatus:
    """The number -> its ActionStatus; InvalidMessage for the zero value or an unknown one."""
    return ActionStatus(ACTION_STATUS.from_proto(number).replace("-", "_"))


# What an agent may report in an ActionResult (PENDING and SKIPPED are the collector's).
AGENT_ACTION_STATUSES = tuple(action_status_to_proto(s) for s in AGENT_RESULTS)


# -- times -----------------------------------------------------------------------------------


def to_timestamp(seconds: float) -> Timestamp:
    """Float epoch seconds -> Timestamp, to the nearest nanosecond."""
    if not math.isfinite(seconds):
        raise ValueError(f"time {seconds!r} is not a finite number of seconds")
    whole = math.floor(seconds)
    nanos = round((seconds - whole) * 1e9)
    if nanos == 1_000_000_000:
        whole, nanos = whole + 1, 0
    return Timestamp(seconds=whole, nanos=nanos)


def from_timestamp(ts: Timestamp) -> float:
    return ts.seconds + ts.nanos / 1e9


# -- alerts: agent -> wire -------------------------------------------------------------------

_CONTAINER_KEYS = ("id", "name", "image", "image_id", "image_digest", "pod", "namespace",
                   "pod_uid", "workload", "labels")
_PROCESS_KEYS = ("pid", "ppid", "exe", "argv", "uid", "comm")


def alert_to_proto(alert: Alert, node: str) -> common_pb2.Alert:
    """The agent's alert as a message; ``node`` goes to ``container.node``.

    ValueError when the alert's container or process dict has a key the message cannot carry
    (the alert schema grew: extend common.proto and this module).
    """
    _require_known_keys(alert.container, _CONTAINER_KEYS, f"alert {alert.id}: container")
    container = alert.container
    fields: dict[str, Any] = {
        "id": alert.id,
        "time": to_timestamp(alert.time),
        "kind": ALERT_KIND.to_proto(alert.kind),
        "severity": SEVERITY.to_proto(alert.severity),
        "score": alert.score,
        "reasons": [_reason_to_proto(r) for r in alert.reasons],
        "container": _message(
            common_pb2.Container, id=container.get("id"), name=container.get("name"),
            image=_message(common_pb2.Image, id=container.get("image_id"),
                           name=container.get("image"), digest=container.get("image_digest")),
            pod=container.get("pod"), namespace=container.get("namespace"), node=node,
            labels=container.get("labels") or None, pod_uid=container.get("pod_uid"),
            workload=container.get("workload")),
        "baseline_version": alert.baseline_version,
        "baseline_mode": MODE.to_proto(alert.baseline_mode),
        "count": alert.count,
        "first_seen": to_timestamp(alert.first_seen),
        "last_seen": to_timestamp(alert.last_seen),
        "events_json": json.dumps(list(alert.events), separators=(",", ":")),
    }
    if alert.process is not None:
        _require_known_keys(alert.process, _PROCESS_KEYS, f"alert {alert.id}: process")
        fields["process"] = _message(common_pb2.Process, **alert.process)
    if alert.events:
        fields.update(_typed_event(alert.events[0]))
    return common_pb2.Alert(**fields)


def _require_known_keys(data: Mapping[str, Any], known: tuple[str, ...], what: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{what} has keys {unknown} that driftwarden.v1 cannot carry")


def _reason_to_proto(reason: AlertReason) -> common_pb2.Reason:
    details = [common_pb2.Detail(key=_text(k), value_json=json.dumps(v))  # tuple -> JSON list
               for k, v in reason.details]
    return common_pb2.Reason(code=_text(reason.code), text=_text(reason.text), details=details)


def _typed_event(record: Mapping[str, Any]) -> dict[str, Message]:
    """The `trace --json` record as the Alert's ``event`` oneof ({} for an unknown kind)."""
    kind = record.get("kind")
    body = record.get(kind) if isinstance(kind, str) else None
    if not isinstance(body, Mapping):
        return {}
    proc = record.get("process") or {}
    header = _message(
        common_pb2.EventHeader, time=_parse_rfc3339(record.get("time")),
        ts_ns=record.get("ts_ns"), cgroup_id=record.get("cgroup_id"), pid=proc.get("pid"),
        tid=proc.get("tid"), ppid=proc.get("ppid"), uid=proc.get("uid"), gid=proc.get("gid"),
        comm=proc.get("comm"), suppressed_before=record.get("suppressed_before"),
        runtime_setup=record.get("runtime_setup"))
    if kind == "exec":
        return {"exec": _message(common_pb2.ExecEvent, header=header, **_pick(body, (
            "filename", "path", "path_resolved", "exe", "argv", "argv_truncated", "result",
            "error")))}
    if kind == "connect":
        return {"connect": _message(common_pb2.ConnectEvent, header=header, **_pick(body, (
            "family", "protocol", "address", "port", "result", "errno", "fd")))}
    if kind == "write":
        return {"file_write": _message(common_pb2.FileWriteEvent, header=header, **_pick(body, (
            "op", "path", "path_as_given", "path_resolved", "dirfd", "result", "error",
            "truncated", "path2", "path2_as_given", "path2_resolved", "dirfd2", "flags",
            "mode")))}
    return {}


def _pick(data: Mapping[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: data.get(k) for k in keys}


def _parse_rfc3339(text: Any) -> Timestamp | None:
    if not isinstance(text, str):
        return None
    ts = Timestamp()
    try:
        ts.FromJsonString(text)
    except ValueError:
        return None
    return ts


def _message(cls: Any, **fields: Any) -> Any:
    """``cls(**fields)`` leaving None fields unset, with every text made valid UTF-8."""
    values = {}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, str):
            value = _text(value)
        elif isinstance(value, list | tuple):
            value = [_text(v) if isinstance(v, str) else v for v in value]
        values[key] = value
    return cls(**values)


def _text(value: str) -> str:
    """`value` if it is valid Unicode, else with each lone surrogate replaced by U+FFFD."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in value)
    return value


# -- alerts: wire -> agent -------------------------------------------------------------------


def alert_from_proto(msg: common_pb2.Alert) -> Alert:
    """The agent's Alert back from a message (validate it first: InvalidMessage if bad)."""
    return Alert(
        id=msg.id,
        time=from_timestamp(msg.time),
        kind=AlertKind(ALERT_KIND.from_proto(msg.kind)),
        severity=Severity.parse(SEVERITY.from_proto(msg.severity)),
        score=msg.score,
        reasons=tuple(_reason_from_proto(r, f"alert.reasons[{i}]")
                      for i, r in enumerate(msg.reasons)),
        container=_container_dict(msg.container),
        process=_process_dict(msg.process) if msg.HasField("process") else None,
        events=tuple(_events(msg.events_json, "alert.events_json")),
        baseline_version=msg.baseline_version,
        baseline_mode=MODE.from_proto(msg.baseline_mode),
        count=msg.count,
        first_seen=from_timestamp(msg.first_seen),
        last_seen=from_timestamp(msg.last_seen),
    )


def alert_dict_from_proto(msg: common_pb2.Alert) -> dict[str, Any]:
    """``Alert.to_dict()`` of the message's alert plus ``"node"`` (last key): the JSON shape
    the collector stores and the CLI prints."""
    out = alert_from_proto(msg).to_dict()
    out["node"] = msg.container.node
    return out


def _reason_from_proto(msg: common_pb2.Reason, path: str) -> AlertReason:
    details = tuple((d.key, _detail_value(d.value_json, f"{path}.details[{j}].value_json"))
                    for j, d in enumerate(msg.details))
    return AlertReason(code=msg.code, text=msg.text, details=details)


def _optional(msg: Message, field: str) -> Any:
    return getattr(msg, field) if msg.HasField(field) else None


def _container_dict(msg: common_pb2.Container) -> dict[str, Any]:
    """The alert's container dict, keys in core.alerts' order."""
    return {"id": _optional(msg, "id"), "name": _optional(msg, "name"),
            "image": _optional(msg.image, "name"), "image_id": _optional(msg.image, "id"),
            "image_digest": _optional(msg.image, "digest"),
            "pod": _optional(msg, "pod"), "namespace": _optional(msg, "namespace"),
            "pod_uid": _optional(msg, "pod_uid"), "workload": _optional(msg, "workload"),
            "labels": dict(sorted(msg.labels.items()))}


def _process_dict(msg: common_pb2.Process) -> dict[str, Any]:
    return {"pid": msg.pid, "ppid": msg.ppid, "exe": _optional(msg, "exe"),
            "argv": list(msg.argv), "uid": msg.uid, "comm": msg.comm}


def _detail_value(text: str, path: str) -> Any:
    """A Detail's value_json: a JSON scalar, or a flat list of scalars (returned as a tuple)."""
    value = _json(text, path)
    items = value if isinstance(value, list) else [value]
    if any(isinstance(v, list | dict) for v in items):
        raise InvalidMessage(f"{path}: must be a JSON scalar or a flat list of scalars, "
                             f"got {_show(text)}")
    return tuple(value) if isinstance(value, list) else value


def _events(text: str, path: str) -> list[dict[str, Any]]:
    events = _json(text, path)
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise InvalidMessage(f"{path}: must be a JSON list of objects, got {_show(text)}")
    return events


def _json(text: str, path: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidMessage(f"{path}: not JSON ({exc})") from None


# -- baseline items --------------------------------------------------------------------------

# BASELINE_ITEM_FIELDS (core.baselines): each kind's key fields, a port as decimal digits
_DIGITS = re.compile(r"0|[1-9][0-9]{0,9}")


def baseline_item_to_proto(kind: str, key: tuple[str | int, ...] | list[str | int]
                           ) -> baselines_pb2.BaselineItem:
    """An item (its kind and ``key()``) as a BaselineItem: every key field as text."""
    return baselines_pb2.BaselineItem(kind=kind, key=[_text(str(v)) for v in key])


def baseline_item_from_proto(msg: baselines_pb2.BaselineItem, path: str = "item"
                             ) -> tuple[str, tuple[str | int, ...]]:
    """``(kind, key)`` of a BaselineItem, the key typed as ``models.items.item_from_key`` takes
    it; InvalidMessage naming the field when the kind is unknown, the key has the wrong number
    of fields or a port is not a decimal number."""
    fields = BASELINE_ITEM_FIELDS.get(msg.kind)
    if fields is None:
        raise InvalidMessage(f"{path}.kind: {_show(msg.kind)} is not an item kind (one of "
                             f"{', '.join(BASELINE_ITEM_FIELDS)})")
    if len(msg.key) != len(fields):
        raise InvalidMessage(f"{path}.key: a {msg.kind} item has {len(fields)} fields, got "
                             f"{len(msg.key)}")
    key: list[str | int] = []
    for i, (text, kind) in enumerate(zip(msg.key, fields, strict=True)):
        if kind is int:
            if not _DIGITS.fullmatch(text):
                raise InvalidMessage(f"{path}.key[{i}]: must be a decimal number, got "
                                     f"{_show(text)}")
            key.append(int(text))
        else:
            key.append(text)
    return msg.kind, tuple(key)


# -- whole baselines -------------------------------------------------------------------------


def container_ref_to_proto(ref: ContainerRef) -> baselines_pb2.ContainerRef:
    msg = baselines_pb2.ContainerRef(container_id=ref.container_id, node=_text(ref.node))
    if ref.name:
        msg.name = _text(ref.name)
    return msg


def container_ref_from_proto(msg: baselines_pb2.ContainerRef, node: str = "") -> ContainerRef:
    """A ContainerRef; `node` stands in for an empty node (an agent's own containers)."""
    return ContainerRef(msg.container_id, msg.node or node,
                        msg.name if msg.HasField("name") and msg.name else None)


def item_evidence_to_proto(item: ItemKey, refs: Iterable[ContainerRef],
                           ) -> baselines_pb2.ItemEvidence:
    """An item with the containers that showed it (increments; unconfirmed items)."""
    return baselines_pb2.ItemEvidence(item=baseline_item_to_proto(*item),
                                      containers=[container_ref_to_proto(r) for r in refs])


def _mode_number(text: str) -> int:
    return MODE.to_proto(text) if text in MODE.texts else 0


def baseline_summary_to_proto(summary: BaselineSummary,
                              limits: WireLimits = DEFAULT_LIMITS,
                              ) -> baselines_pb2.BaselineSummary:
    """A baseline's summary; its node list is cut to the wire's bound (the newest kept)."""
    msg = baselines_pb2.BaselineSummary(
        image_key=summary.image_key, image_name=_text(summary.image_name),
        mode=MODE.to_proto(summary.mode), version=summary.version, items=summary.items,
        unconfirmed=summary.unconfirmed, windows=summary.windows,
        containers=summary.containers,
        nodes=[_text(n) for n in summary.nodes[-limits.max_evidence_containers:]],
        updated_at=to_timestamp(summary.updated_at), stable=summary.stable)
    if summary.learning_started_at is not None:
        msg.learning_started_at.CopyFrom(to_timestamp(summary.learning_started_at))
    if summary.carried_from:
        msg.carried_from = summary.carried_from
    return msg


def baseline_summary_from_proto(msg: baselines_pb2.BaselineSummary) -> BaselineSummary:
    updated_at = from_timestamp(msg.updated_at) if msg.HasField("updated_at") else 0.0
    return BaselineSummary(
        image_key=msg.image_key, image_name=msg.image_name,
        mode=Mode(MODE.from_proto(msg.mode)), version=msg.version, items=msg.items,
        unconfirmed=msg.unconfirmed, windows=msg.windows, containers=msg.containers,
        nodes=tuple(msg.nodes), created_at=updated_at, updated_at=updated_at,
        learning_started_at=(from_timestamp(msg.learning_started_at)
                             if msg.HasField("learning_started_at") else None),
        stable=msg.stable,
        carried_from=msg.carried_from if msg.HasField("carried_from") else None)


def baseline_to_proto(doc: FleetBaseline, summary: BaselineSummary | None = None,
                      ) -> baselines_pb2.Baseline:
    """A fleet baseline as a message: confirmed items, unconfirmed ones with their evidence,
    windows, mode history (the newest entries the wire allows), layers. `summary`: the one
    to send (the collector's, with ``stable`` computed); default ``doc.summary()``."""
    history = doc.history[-DEFAULT_LIMITS.max_baseline_history:]
    return baselines_pb2.Baseline(
        summary=baseline_summary_to_proto(summary or doc.summary()),
        items=[baseline_item_to_proto(*item) for item in doc.items],
        unconfirmed=[item_evidence_to_proto(item, refs)
                     for item, refs in doc.unconfirmed().items()],
        windows=[baselines_pb2.FeatureWindow(values=w) for w in doc.windows],
        history=[baselines_pb2.ModeChange(**{
            "changed_at": to_timestamp(h["at"]), "from": _mode_number(h["from"]),
            "to": _mode_number(h["to"]), "reason": _text(h["reason"]), "by": _text(h["by"])})
            for h in history],
        layers=list(doc.layers), carried_layers=doc.carried_layers if doc.carried_from else 0)


def baseline_from_proto(msg: baselines_pb2.Baseline, path: str = "baseline") -> FleetBaseline:
    """A Baseline message as a FleetBaseline (``.to_file_obj()`` is what
    ``models.profile.Profile.from_obj`` reads); InvalidMessage naming a bad field. The message
    carries no learning counters: the progress says "learning since learning_started_at (else
    the update time), last new item at the update time, the windows it carries"."""
    if not msg.summary.mode:
        raise InvalidMessage(f"{path}.summary.mode: unspecified")
    summary = baseline_summary_from_proto(msg.summary)
    items = {baseline_item_from_proto(item, f"{path}.items[{i}]"): None
             for i, item in enumerate(msg.items)}
    evidence = {}
    for i, entry in enumerate(msg.unconfirmed):
        refs = [container_ref_from_proto(r) for r in entry.containers]
        evidence[baseline_item_from_proto(entry.item, f"{path}.unconfirmed[{i}].item")] = {
            r.container_id: r for r in refs}
    history = [{"at": from_timestamp(h.changed_at) if h.HasField("changed_at") else 0.0,
                "from": MODE.from_proto(getattr(h, "from")) if getattr(h, "from") else "",
                "to": MODE.from_proto(h.to) if h.to else "", "reason": h.reason, "by": h.by}
               for h in msg.history]
    carried_layers = msg.carried_layers if summary.carried_from else 0
    if carried_layers > len(msg.layers):
        raise InvalidMessage(f"{path}.carried_layers: {carried_layers}, but the image has "
                             f"{len(msg.layers)} layers")
    updated_at = summary.updated_at
    started_at = summary.learning_started_at
    learning = summary.mode is Mode.LEARN
    return FleetBaseline(
        image_key=summary.image_key, image_name=summary.image_name, mode=summary.mode,
        version=summary.version, created_at=updated_at, updated_at=updated_at, items=items,
        evidence=evidence, windows=[tuple(w.values) for w in msg.windows],
        progress=LearningProgress(
            started_at=started_at if started_at is not None else updated_at,
            last_new_item_at=updated_at, windows_learned=len(msg.windows),
            items_seen=len(items), ended_at=None if learning else updated_at),
        history=history, layers=tuple(msg.layers), nodes=summary.nodes,
        carried_from=summary.carried_from, carried_layers=carried_layers)


def held_baseline_to_proto(held: HeldBaseline) -> baselines_pb2.BaselineVersion:
    return baselines_pb2.BaselineVersion(image_key=held.image_key, version=held.version,
                                         mode=MODE.to_proto(held.mode))


def held_baseline_from_proto(msg: baselines_pb2.BaselineVersion) -> HeldBaseline:
    return HeldBaseline(msg.image_key, msg.version, Mode(MODE.from_proto(msg.mode)))


# -- validation ------------------------------------------------------------------------------


def validate_alert(msg: common_pb2.Alert, *, limits: WireLimits = DEFAULT_LIMITS) -> None:
    _check_message(msg, "alert", limits)
    _check_alert(msg, "alert")


def validate_agent_message(msg: agent_pb2.AgentMessage, *,
                           limits: WireLimits = DEFAULT_LIMITS) -> None:
    """Everything an agent sends on AgentChannel.Connect."""
    path = "agent_message"
    _check_message(msg, path, limits)
    if msg.seq == 0:
        raise InvalidMessage(f"{path}.seq: missing (messages are numbered from 1)")
    body = msg.WhichOneof("body")
    if body is None:
        raise InvalidMessage(f"{path}: empty; set one of hello, alert_batch, heartbeat, "
                             "action_result, baseline_increment, baseline_request")
    path = f"{path}.{body}"
    if body == "hello":
        hello = msg.hello
        _require_name(hello.node, f"{path}.node")
        _require_text(hello.agent_version, f"{path}.agent_version")
        _require_enum(hello.mode, f"{path}.mode", MODE)
        _require_time(hello, "started_at", path)
        _check_baseline_versions(hello.baselines, f"{path}.baselines")
    elif body == "alert_batch":
        batch = msg.alert_batch
        if not batch.alerts:
            raise InvalidMessage(f"{path}.alerts: empty")
        if batch.spool_seqs and len(batch.spool_seqs) != len(batch.alerts):
            raise InvalidMessage(f"{path}.spool_seqs: {len(batch.spool_seqs)} entries for "
                                 f"{len(batch.alerts)} alerts (one per alert, or none)")
        for i, alert in enumerate(batch.alerts):
            _check_alert(alert, f"{path}.alerts[{i}]")
    elif body == "heartbeat":
        _require_time(msg.heartbeat, "sent_at", path)
        _check_counters(msg.heartbeat.counters, f"{path}.counters")
    elif body == "baseline_increment":
        _check_increment(msg.baseline_increment, path)
    elif body == "baseline_request":
        _require_text(msg.baseline_request.image_key, f"{path}.image_key")
    else:
        result = msg.action_result
        _require_text(result.action_id, f"{path}.action_id")
        _require_enum(result.status, f"{path}.status", ACTION_STATUS, AGENT_ACTION_STATUSES)
        _require_time(result, "finished_at", path)


def validate_collector_command(msg: agent_pb2.CollectorCommand, *,
                               limits: WireLimits = DEFAULT_LIMITS) -> None:
    """Everything the collector sends back on AgentChannel.Connect (the agent checks it)."""
    path = "collector_command"
    _check_message(msg, path, limits)
    body = msg.WhichOneof("body")
    if body is None:
        raise InvalidMessage(f"{path}: empty; set one of ack, action, notice, baseline")
    path = f"{path}.{body}"
    if body == "ack":
        for i, alert_id in enumerate(msg.ack.alert_ids):
            _check_alert_id(alert_id, f"{path}.alert_ids[{i}]")
    elif body == "action":
        action = msg.action
        _require_text(action.action_id, f"{path}.action_id")
        _require_text(action.container_id, f"{path}.container_id")
        _check_action_type(action.type, action.with_pause, path)
    elif body == "baseline":
        _check_baseline_update(msg.baseline, path)


def validate_action_request(msg: actions_pb2.ActionRequest, *,
                            limits: WireLimits = DEFAULT_LIMITS) -> None:
    path = "action_request"
    _check_message(msg, path, limits)
    _require_text(msg.container, f"{path}.container")
    _check_action_type(msg.type, msg.with_pause, path)


def validate_subscribe_request(msg: alerts_pb2.SubscribeRequest, *,
                               limits: WireLimits = DEFAULT_LIMITS) -> None:
    path = "subscribe_request"
    _check_message(msg, path, limits)
    _check_filter(msg.filter, f"{path}.filter")


def validate_list_alerts_request(msg: alerts_pb2.ListAlertsRequest, *,
                                 limits: WireLimits = DEFAULT_LIMITS) -> None:
    path = "list_alerts_request"
    _check_message(msg, path, limits)
    _check_filter(msg.filter, f"{path}.filter")
    _check_page(msg, path, limits)


def validate_list_actions_request(msg: actions_pb2.ListActionsRequest, *,
                                  limits: WireLimits = DEFAULT_LIMITS) -> None:
    path = "list_actions_request"
    _check_message(msg, path, limits)
    _require_entries(msg, ("nodes", "containers"), path)
    for i, action_type in enumerate(msg.types):
        _require_enum(action_type, f"{path}.types[{i}]", ACTION_TYPE)
    _check_page(msg, path, limits)


# Baselines.* requests: the fields each must set (reasons must say something)
_BASELINE_REQUEST_FIELDS = {
    "ListBaselinesRequest": (),
    "GetBaselineRequest": ("image",),
    "SetBaselineModeRequest": ("image", "reason"),
    "DiffBaselinesRequest": ("a", "b"),
    "AcceptAlertRequest": ("alert_id",),
    "ResetBaselineRequest": ("image", "reason"),
    "ExportBaselineRequest": ("image",),
    "PushBaselineRequest": ("file",),
}


def validate_baselines_request(msg: Message, *, limits: WireLimits = DEFAULT_LIMITS) -> None:
    """Any Baselines.* request: bounds, the fields it needs, its mode."""
    name = msg.DESCRIPTOR.name
    path = re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()
    _check_message(msg, path, limits)
    for field in _BASELINE_REQUEST_FIELDS[name]:
        value = getattr(msg, field)
        if not (value.strip() if isinstance(value, str) else value):
            raise InvalidMessage(f"{path}.{field}: missing")
    if name == "SetBaselineModeRequest" or (name == "PushBaselineRequest" and msg.mode):
        _require_enum(msg.mode, f"{path}.mode", MODE)
    elif name == "AcceptAlertRequest":
        _check_alert_id(msg.alert_id, f"{path}.alert_id")


def _check_message(msg: Message, path: str, limits: WireLimits) -> None:
    size = msg.ByteSize()
    if size > limits.max_message_bytes:
        raise InvalidMessage(f"{path}: {size} bytes, at most {limits.max_message_bytes}")
    _check_bounds(msg, path, limits)


def _check_bounds(msg: Message, path: str, limits: WireLimits) -> None:
    """Every string and repeated field within its bound, every enum value known, every
    Timestamp in range; recursively."""
    if msg.DESCRIPTOR.full_name == _TIMESTAMP_TYPE:
        if not 0 <= msg.nanos < 1_000_000_000:
            raise InvalidMessage(f"{path}.nanos: {msg.nanos} is outside 0..999999999")
        if not _MIN_SECONDS <= msg.seconds <= _MAX_SECONDS:
            raise InvalidMessage(f"{path}.seconds: {msg.seconds} is outside years 1..9999")
        return
    for field, value in msg.ListFields():
        name = f"{path}.{field.name}"
        if not field.is_repeated:
            _check_field_value(field, value, name, limits)
            continue
        limit = getattr(limits, _REPEATED_LIMITS.get(field.full_name, "max_repeated"))
        if len(value) > limit:
            raise InvalidMessage(f"{name}: {len(value)} entries, at most {limit}")
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            _check_map(field, value, name, limits)
            continue
        for i, item in enumerate(value):
            _check_field_value(field, item, f"{name}[{i}]", limits)


def _check_map(field: Any, value: Any, path: str, limits: WireLimits) -> None:
    """A map<string, string>: keys non-empty, keys and values within the text bound."""
    key_field, value_field = field.message_type.fields_by_name["key"], \
        field.message_type.fields_by_name["value"]
    for key, item in value.items():
        if not key:
            raise InvalidMessage(f"{path}: an empty key")
        _check_field_value(key_field, key, f"{path}[{key[:64]!r}] key", limits)
        _check_field_value(value_field, item, f"{path}[{key[:64]!r}]", limits)


def _check_field_value(field: Any, value: Any, path: str, limits: WireLimits) -> None:
    if field.type == field.TYPE_STRING:
        limit = (limits.max_events_json_chars if field.full_name == _EVENTS_JSON_FIELD
                 else limits.max_text_chars)
        if len(value) > limit:
            raise InvalidMessage(f"{path}: {len(value)} characters, at most {limit}")
    elif field.type == field.TYPE_ENUM:
        if value not in field.enum_type.values_by_number:
            raise InvalidMessage(f"{path}: unknown value {value} (not in {field.enum_type.name})")
    elif field.type == field.TYPE_MESSAGE:
        _check_bounds(value, path, limits)


def _check_alert(msg: common_pb2.Alert, path: str) -> None:
    _check_alert_id(msg.id, f"{path}.id")
    _require_time(msg, "time", path)
    _require_enum(msg.kind, f"{path}.kind", ALERT_KIND)
    _require_enum(msg.severity, f"{path}.severity", SEVERITY)
    if not math.isfinite(msg.score):
        raise InvalidMessage(f"{path}.score: must be a finite number, got {msg.score}")
    for i, reason in enumerate(msg.reasons):
        _require_text(reason.code, f"{path}.reasons[{i}].code")
        for j, detail in enumerate(reason.details):
            dpath = f"{path}.reasons[{i}].details[{j}]"
            _require_text(detail.key, f"{dpath}.key")
            _detail_value(detail.value_json, f"{dpath}.value_json")
    if not msg.container.id:
        raise InvalidMessage(f"{path}.container.id: missing")
    _require_enum(msg.baseline_mode, f"{path}.baseline_mode", MODE)
    if msg.count < 1:
        raise InvalidMessage(f"{path}.count: must be at least 1, got {msg.count}")
    _require_time(msg, "first_seen", path)
    _require_time(msg, "last_seen", path)
    if msg.first_seen.ToNanoseconds() > msg.last_seen.ToNanoseconds():
        raise InvalidMessage(f"{path}.first_seen: {msg.first_seen.ToJsonString()} is after "
                             f"last_seen {msg.last_seen.ToJsonString()}")
    _events(msg.events_json, f"{path}.events_json")


def _check_baseline_versions(versions: Any, path: str) -> None:
    for i, held in enumerate(versions):
        _require_text(held.image_key, f"{path}[{i}].image_key")
        _require_enum(held.mode, f"{path}[{i}].mode", MODE)


def _check_items(items: Any, path: str) -> None:
    for i, item in enumerate(items):
        baseline_item_from_proto(item, f"{path}[{i}]")


def _check_containers(refs: Any, path: str) -> None:
    for i, ref in enumerate(refs):
        _require_text(ref.container_id, f"{path}[{i}].container_id")


def _check_evidence(evidence: Any, path: str) -> None:
    for i, entry in enumerate(evidence):
        where = f"{path}[{i}]"
        if not entry.HasField("item"):
            raise InvalidMessage(f"{where}.item: missing")
        baseline_item_from_proto(entry.item, f"{where}.item")
        if not entry.containers:
            raise InvalidMessage(f"{where}.containers: empty (who showed the item?)")
        _check_containers(entry.containers, f"{where}.containers")


def _check_windows(windows: Any, path: str) -> None:
    for i, window in enumerate(windows):
        if not window.values:
            raise InvalidMessage(f"{path}[{i}].values: empty")
        if not all(math.isfinite(v) for v in window.values):
            raise InvalidMessage(f"{path}[{i}].values: every value must be a finite number")


def _check_increment(msg: baselines_pb2.BaselineIncrement, path: str) -> None:
    _require_text(msg.image_key, f"{path}.image_key")
    _check_evidence(msg.items, f"{path}.items")
    _check_windows(msg.windows, f"{path}.windows")
    _check_containers(msg.containers, f"{path}.containers")


def _check_baseline_update(msg: baselines_pb2.BaselineUpdate, path: str) -> None:
    _require_text(msg.image_key, f"{path}.image_key")
    if not msg.found:
        return
    if not msg.HasField("baseline"):
        raise InvalidMessage(f"{path}.baseline: missing (found is set)")
    baseline, where = msg.baseline, f"{path}.baseline"
    summary = baseline.summary
    if summary.image_key != msg.image_key:
        raise InvalidMessage(f"{where}.summary.image_key: {_show(summary.image_key)} is not "
                             f"the update's image {_show(msg.image_key)}")
    _require_enum(summary.mode, f"{where}.summary.mode", MODE)
    if summary.version < 1:
        raise InvalidMessage(f"{where}.summary.version: must be at least 1, got "
                             f"{summary.version}")
    _check_items(baseline.items, f"{where}.items")
    _check_evidence(baseline.unconfirmed, f"{where}.unconfirmed")
    _check_windows(baseline.windows, f"{where}.windows")


def _check_alert_id(alert_id: str, path: str) -> None:
    if not _ALERT_ID.fullmatch(alert_id):
        raise InvalidMessage(f"{path}: must be {ID_HEX_CHARS} lowercase hex characters, "
                             f"got {_show(alert_id)}")


def _check_counters(counters: Any, path: str) -> None:
    seen: set[str] = set()
    for i, counter in enumerate(counters):
        _require_text(counter.kind, f"{path}[{i}].kind")
        if counter.kind in seen:
            raise InvalidMessage(f"{path}[{i}].kind: {counter.kind!r} appears twice")
        seen.add(counter.kind)


def _check_action_type(action_type: int, with_pause: bool, path: str) -> None:
    _require_enum(action_type, f"{path}.type", ACTION_TYPE)
    quarantine = ACTION_TYPE.to_proto("quarantine")
    if with_pause and action_type != quarantine:
        raise InvalidMessage(f"{path}.with_pause: only for {ACTION_TYPE.name(quarantine)}, "
                             f"not {ACTION_TYPE.name(action_type)}")


_FILTER_LISTS = ("nodes", "namespaces", "images", "containers", "exclude_images",
                 "exclude_namespaces", "exclude_containers")


def _check_filter(msg: alerts_pb2.AlertFilter, path: str) -> None:
    for i, kind in enumerate(msg.kinds):
        _require_enum(kind, f"{path}.kinds[{i}]", ALERT_KIND)
    _require_entries(msg, _FILTER_LISTS, path)


def _require_entries(msg: Message, fields: tuple[str, ...], path: str) -> None:
    for field in fields:
        for i, value in enumerate(getattr(msg, field)):
            _require_text(value, f"{path}.{field}[{i}]")


def _check_page(msg: Any, path: str, limits: WireLimits) -> None:
    if msg.page_size > limits.max_page_size:
        raise InvalidMessage(f"{path}.page_size: {msg.page_size}, at most "
                             f"{limits.max_page_size}")
    if (msg.HasField("since") and msg.HasField("until")
            and msg.since.ToNanoseconds() > msg.until.ToNanoseconds()):
        raise InvalidMessage(f"{path}.since: {msg.since.ToJsonString()} is after until "
                             f"{msg.until.ToJsonString()}")


def _require_text(value: str, path: str) -> None:
    if not value:
        raise InvalidMessage(f"{path}: missing")


def _require_name(value: str, path: str) -> None:
    _require_text(value, path)
    if not value.isprintable() or any(c.isspace() for c in value):
        raise InvalidMessage(f"{path}: must be printable without spaces, got {_show(value)}")


def _require_enum(number: int, path: str, enum: EnumText,
                  allowed: tuple[int, ...] | None = None) -> None:
    allowed = enum.numbers if allowed is None else allowed
    if number in allowed:
        return
    if number == 0:
        problem = "unspecified"
    elif number in enum.descriptor.values_by_number:
        problem = f"{enum.name(number)} not allowed here"
    else:
        problem = f"unknown value {number}"
    raise InvalidMessage(f"{path}: {problem}; set one of {enum.names(allowed)}")


def _require_time(msg: Message, field: str, path: str) -> None:
    if not msg.HasField(field):
        raise InvalidMessage(f"{path}.{field}: missing")


def _show(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "...")


__all__ = [
    "ACTION_STATUS",
    "ACTION_TYPE",
    "AGENT_ACTION_STATUSES",
    "ALERT_KIND",
    "BASELINE_ITEM_FIELDS",
    "DEFAULT_LIMITS",
    "MAX_MESSAGE_BYTES",
    "MODE",
    "SEVERITY",
    "EnumText",
    "InvalidMessage",
    "WireLimits",
    "action_status_from_proto",
    "action_status_to_proto",
    "alert_dict_from_proto",
    "alert_from_proto",
    "alert_to_proto",
    "baseline_from_proto",
    "baseline_item_from_proto",
    "baseline_item_to_proto",
    "baseline_summary_from_proto",
    "baseline_summary_to_proto",
    "baseline_to_proto",
    "container_ref_from_proto",
    "container_ref_to_proto",
    "from_timestamp",
    "held_baseline_from_proto",
    "held_baseline_to_proto",
    "item_evidence_to_proto",
    "to_timestamp",
    "validate_action_request",
    "validate_agent_message",
    "validate_alert",
    "validate_baselines_request",
    "validate_collector_command",
    "validate_list_actions_request",
    "validate_list_alerts_request",
    "validate_subscribe_request",
]
