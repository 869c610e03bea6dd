"""The operator commands' texts: what a cell, a line or a JSON object says about an alert, an
action, a stream notice, an agent or a fleet baseline. Pure functions of the collector's
messages.

Every text that came from the collector (and so, often, from a container: names, paths, argv,
labels) goes through :func:`clean_text` before it is printed, in every output: a control
character (newline, ESC, ...) becomes ``?`` so a container name cannot drive the terminal or
forge a line. JSON objects keep the texts as they are; ``json.dumps`` writes every control
character as a ``\\u`` escape, so a JSON line is one line and carries no terminal codes.

Times are UTC, ``2024-05-01T12:00:00Z``; an unset timestamp is ``-``.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from driftwarden.core import wire
from driftwarden.core.baselines import BASELINE_ITEM_FIELDS, ITEM_KINDS, item_key
from driftwarden.proto.v1 import actions_pb2, agent_pb2, alerts_pb2, baselines_pb2, common_pb2
from google.protobuf.timestamp_pb2 import Timestamp

_PENDING = wire.ACTION_STATUS.to_proto("pending")
SHORT_KEY_CHARS = 19  # "sha256:" and 12 hex: enough to tell images apart, as Docker shows ids


# -- texts ---------------------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """`text` with every non-printable character (newline, ESC, ...) as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


def format_epoch(seconds: float) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_time(ts: Timestamp | None) -> str:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return "-"
    return format_epoch(ts.seconds)


def format_age(seconds: float) -> str:
    """Seconds since something -> ``"4s ago"``, ``"12m ago"``, ``"3h ago"``, ``"2d ago"``."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def enum_text(enum: wire.EnumText, number: int) -> str:
    """An enum number's text; ``-`` for unspecified, the number for one this build lacks."""
    try:
        return enum.from_proto(number)
    except wire.InvalidMessage:
        return "-" if number == 0 else str(number)


def container_text(container: common_pb2.Container) -> str:
    """The container's name, else the first 12 characters of its id, else ``-``."""
    if container.HasField("name"):
        return container.name
    return container.id[:12] if container.HasField("id") else "-"


def image_text(image: common_pb2.Image) -> str:
    """The image's name (``repo:tag``), else its id's first 19 characters (``sha256:`` and 12)."""
    if image.HasField("name"):
        return image.name
    return image.id[:SHORT_KEY_CHARS] if image.HasField("id") else "-"


def reason_text(msg: common_pb2.Alert) -> str:
    """Why: the first reason's text (its code when it has none), and how many more an
    incident's alert carries (``--json`` shows them all)."""
    if not msg.reasons:
        return "-"
    first = msg.reasons[0].text or msg.reasons[0].code
    return f"{first} (+{len(msg.reasons) - 1} more)" if len(msg.reasons) > 1 else first


def alert_time(msg: common_pb2.Alert) -> Timestamp | None:
    return msg.time if msg.HasField("time") else None


def action_time(action: actions_pb2.Action) -> Timestamp | None:
    """When it finished, else when it was asked for."""
    for field in ("finished_at", "requested_at"):
        if action.HasField(field):
            return getattr(action, field)
    return None


def notice_time(notice: alerts_pb2.StreamNotice) -> Timestamp | None:
    return notice.time if notice.HasField("time") else None


def action_target(action: actions_pb2.Action) -> str:
    return action.container_name or action.container_id[:12] or "?"


def requested_by_text(who: str) -> str:
    """``"policy:R"`` -> ``"policy rule R"``; ``"operator:alice"`` -> ``"by operator alice"``."""
    if who.startswith("policy:"):
        return f"policy rule {who.removeprefix('policy:')}"
    return f"by {who.replace(':', ' ', 1)}" if who else ""


def notice_text(notice: alerts_pb2.StreamNotice) -> str:
    """``12 alerts dropped (slow reader)``."""
    noun = "alert" if notice.dropped == 1 else "alerts"
    return clean_text(f"{notice.dropped} {noun} dropped ({notice.text or 'slow reader'})")


def heartbeat_text(agent: agent_pb2.Agent, now: float) -> str:
    if not agent.HasField("last_heartbeat"):
        return "never"
    return format_age(now - wire.from_timestamp(agent.last_heartbeat))


def counter_dicts(agent: agent_pb2.Agent) -> list[dict[str, Any]]:
    """The agent's per-kind probe counters, as JSON objects."""
    return [{"kind": c.kind, **{f: getattr(c, f) for f in wire.KIND_COUNTER_FIELDS}}
            for c in agent.counters]


def dropped_total(agent: agent_pb2.Agent) -> int:
    """Events the agent's probes dropped, all kinds together."""
    return sum(c.dropped for c in agent.counters)


def action_outcome_line(action_type: str, asked_for: str,
                        response: actions_pb2.ActionResponse) -> str:
    """`driftwarden action`'s answer: ``quarantine web-1 (abc123def456) on node-a: done``."""
    short = response.container_id[:12]
    if not short or response.container_id.startswith(asked_for):
        target = short or asked_for
    else:
        target = f"{asked_for} ({short})"
    line = f"{action_type} {target}"
    if response.node:
        line += f" on {response.node}"
    line += f": {enum_text(wire.ACTION_STATUS, response.status)}"
    if response.message:
        line += f": {response.message}"
    if response.status == _PENDING:
        line += (f" (action {response.action_id}: the agent has not answered yet; its result "
                 f"will show in `driftwarden alerts --actions`)")
    return clean_text(line)


# -- baselines -----------------------------------------------------------------------------------


def short_key(image_key: str) -> str:
    """``sha256:`` and the first 12 hex of an image key (``-`` when unset)."""
    return image_key[:SHORT_KEY_CHARS] or "-"


def baseline_label(summary: baselines_pb2.BaselineSummary) -> str:
    """``shop/web:1.2 (sha256:1a1a1a1a1a1a)``, or the short key alone when it has no name."""
    key = short_key(summary.image_key)
    return f"{summary.image_name} ({key})" if summary.image_name else key


def _connect_text(key: Sequence[str]) -> str:
    family, addr_class, address, port, protocol, exe = key
    if family == "unix":
        return f"unix connect to {address} ({addr_class}) by {exe}"
    where = f"[{address}]:{port}" if family == "inet6" else f"{address}:{port}"
    return f"{protocol} connect to {where} ({addr_class}) by {exe}"


def _exec_text(key: Sequence[str]) -> str:
    exe, argv0 = key
    return f"exec {exe}" if posixpath.basename(exe) == argv0 else f"exec {exe} as {argv0}"


# kind -> the sentence, as `baseline show --state-dir` words it
_ITEM_TEXTS = {
    "exec": _exec_text,
    "lineage": lambda key: f"{key[0]} started {key[1]}",
    "connect": _connect_text,
    "write": lambda key: f"{key[1]} {key[0]}",
}


def item_text(item: baselines_pb2.BaselineItem) -> str:
    """One behaviour in words: ``exec /bin/busybox as httpd``, ``tcp connect to
    127.0.0.1:5432 (loopback) by /bin/busybox``, ``append /var/log/*.log``; a kind or key this
    build does not know as the kind and its fields."""
    sentence = _ITEM_TEXTS.get(item.kind)
    if sentence is None or len(item.key) != len(BASELINE_ITEM_FIELDS.get(item.kind, ())):
        return " ".join([item.kind or "?", *item.key])
    return sentence(list(item.key))


def item_order(item: baselines_pb2.BaselineItem) -> tuple[int, str, str]:
    """Sort key: by kind (:data:`ITEM_KINDS` first, others after), then by text."""
    rank = ITEM_KINDS.index(item.kind) if item.kind in ITEM_KINDS else len(ITEM_KINDS)
    return (rank, item.kind, item_text(item))


def container_ref_text(ref: baselines_pb2.ContainerRef) -> str:
    """``web-2@node-b``: the container's name (else its id's first 12) and its node."""
    name = ref.name if ref.HasField("name") and ref.name else ref.container_id[:12] or "?"
    return f"{name}@{ref.node}" if ref.node else name


# -- JSON ----------------------------------------------------------------------------------------


def _timestamp_json(msg: Any, field: str) -> float | None:
    return wire.from_timestamp(getattr(msg, field)) if msg.HasField(field) else None


def alert_dict(msg: common_pb2.Alert) -> dict[str, Any]:
    """The alert as the agent writes it (``wire.alert_dict_from_proto``); InvalidMessage for
    one that does not decode."""
    return wire.alert_dict_from_proto(msg)


def action_dict(action: actions_pb2.Action) -> dict[str, Any]:
    return {"action_id": action.action_id, "type": enum_text(wire.ACTION_TYPE, action.type),
            "status": enum_text(wire.ACTION_STATUS, action.status), "message": action.message,
            "container_id": action.container_id, "container_name": action.container_name,
            "node": action.node, "reason": action.reason, "requested_by": action.requested_by,
            "with_pause": action.with_pause, "alert_id": action.alert_id,
            "requested_at": _timestamp_json(action, "requested_at"),
            "finished_at": _timestamp_json(action, "finished_at")}


def notice_dict(notice: alerts_pb2.StreamNotice) -> dict[str, Any]:
    return {"dropped": notice.dropped, "text": notice.text,
            "time": _timestamp_json(notice, "time")}


def agent_dict(agent: agent_pb2.Agent) -> dict[str, Any]:
    return {"node": agent.node, "connected": agent.connected,
            "agent_version": agent.agent_version, "mode": enum_text(wire.MODE, agent.mode),
            "hostname": agent.hostname, "peer": agent.peer,
            "connected_at": _timestamp_json(agent, "connected_at"),
            "last_heartbeat": _timestamp_json(agent, "last_heartbeat"),
            "containers_watched": agent.containers_watched, "spool_depth": agent.spool_depth,
            "counters": counter_dicts(agent),
            "baselines": [{"image_key": b.image_key, "version": b.version,
                           "mode": enum_text(wire.MODE, b.mode)} for b in agent.baselines]}


def baseline_summary_dict(summary: baselines_pb2.BaselineSummary) -> dict[str, Any]:
    return {"image_key": summary.image_key, "image_name": summary.image_name,
            "mode": enum_text(wire.MODE, summary.mode), "version": summary.version,
            "items": summary.items, "unconfirmed": summary.unconfirmed,
            "windows": summary.windows, "containers": summary.containers,
            "nodes": list(summary.nodes), "updated_at": _timestamp_json(summary, "updated_at"),
            "learning_started_at": _timestamp_json(summary, "learning_started_at"),
            "stable": summary.stable,
            "carried_from": summary.carried_from if summary.HasField("carried_from") else None}


def item_dict(item: baselines_pb2.BaselineItem) -> dict[str, Any]:
    """Kind, key (typed as in a NOVEL alert's ``item_key``: a port as a number) and text."""
    try:
        key: list[Any] = list(item_key(item.kind, list(item.key))[1])
    except ValueError:  # a kind or key this build does not know: as the collector sent it
        key = list(item.key)
    return {"kind": item.kind, "key": key, "text": item_text(item)}


def container_ref_dict(ref: baselines_pb2.ContainerRef) -> dict[str, Any]:
    return {"container_id": ref.container_id, "node": ref.node,
            "name": ref.name if ref.HasField("name") else None}


def mode_change_dict(change: baselines_pb2.ModeChange) -> dict[str, Any]:
    return {"changed_at": _timestamp_json(change, "changed_at"),
            "from": enum_text(wire.MODE, getattr(change, "from")),
            "to": enum_text(wire.MODE, change.to), "reason": change.reason, "by": change.by}


def baseline_dict(baseline: baselines_pb2.Baseline) -> dict[str, Any]:
    """`baseline show --json`: the summary, items (by kind, then text), unconfirmed items with
    the containers that showed them, the mode history (oldest first) and the layers."""
    return {"summary": baseline_summary_dict(baseline.summary),
            "items": [item_dict(i) for i in sorted(baseline.items, key=item_order)],
            "unconfirmed": [{**item_dict(e.item),
                             "containers": [container_ref_dict(c) for c in e.containers]}
                            for e in sorted(baseline.unconfirmed,
                                            key=lambda e: item_order(e.item))],
            "history": [mode_change_dict(c) for c in baseline.history],
            "layers": list(baseline.layers)}


__all__ = [
    "SHORT_KEY_CHARS",
    "action_dict",
    "action_outcome_line",
    "action_target",
    "action_time",
    "agent_dict",
    "alert_dict",
    "alert_time",
    "baseline_dict",
    "baseline_label",
    "baseline_summary_dict",
    "clean_text",
    "container_ref_dict",
    "container_ref_text",
    "container_text",
    "counter_dicts",
    "dropped_total",
    "enum_text",
    "format_age",
    "format_epoch",
    "format_time",
    "heartbeat_text",
    "image_text",
    "item_dict",
    "item_order",
    "item_text",
    "mode_change_dict",
    "notice_dict",
    "notice_text",
    "notice_time",
    "reason_text",
    "requested_by_text",
    "short_key",
]
