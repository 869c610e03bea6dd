"""The collector's records as driftwarden.v1 messages, and requests' filters as store filters.

Alerts go through the one alert model (:func:`driftwarden.core.alerts.alert_from_dict`, then
:func:`driftwarden.core.wire.alert_to_proto`); actions and agents are the store's records
(:mod:`driftwarden.collector.store`); enum texts and numbers are the wire codec's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from driftwarden.collector.store import ActionRecord, AgentRecord
from driftwarden.core import wire
from driftwarden.core.alerts import alert_from_dict
from driftwarden.core.baselines import BaselineSummary, FleetBaseline, HeldBaseline
from driftwarden.proto.v1 import actions_pb2, agent_pb2, alerts_pb2, baselines_pb2, common_pb2

log = logging.getLogger(__name__)

UPDATE_SLACK_BYTES = 1024  # the stream's framing around one command


class PublishedAlert(dict):
    """An alert dict as published to the hub, carrying its AlertEvent built once for all
    subscribers (read-only once published)."""

    # seq: the store's order (collector.store); stored_at: time.monotonic() after the
    # store's commit (None: stored by another replica)
    __slots__ = ("event", "seq", "stored_at")


def _complete(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """A stored alert as ``Alert.to_dict()`` has it: the store also takes an alert without
    reasons, or with a null container or baseline mode (it checks only what its columns
    need); those read as none, empty and "monitor"."""
    if doc.get("reasons") is not None and doc.get("container") is not None \
            and doc.get("baseline_mode"):
        return doc
    return {**doc, "reasons": doc.get("reasons") or (), "container": doc.get("container") or {},
            "baseline_mode": doc.get("baseline_mode") or "monitor"}


def alert_message(doc: Mapping[str, Any]) -> common_pb2.Alert:
    """The store's alert dict (``Alert.to_dict()`` plus ``"node"``) as a message."""
    return wire.alert_to_proto(alert_from_dict(_complete(doc)), doc.get("node") or "")


def _type_proto(text: str) -> int:
    try:
        return wire.ACTION_TYPE.to_proto(text)
    except ValueError:
        return 0


def action_message(record: ActionRecord) -> actions_pb2.Action:
    msg = actions_pb2.Action(
        action_id=record.action_id, type=_type_proto(record.type),
        status=wire.action_status_to_proto(record.status), message=record.message,
        container_id=record.container_id, container_name=record.container_name or "",
        node=record.node, reason=record.reason, requested_by=record.requested_by,
        with_pause=record.with_pause, alert_id=record.alert_id or "",
        requested_at=wire.to_timestamp(record.created_at))
    if record.finished_at is not None:
        msg.finished_at.CopyFrom(wire.to_timestamp(record.finished_at))
    return msg


def action_response(record: ActionRecord) -> actions_pb2.ActionResponse:
    """Actions.Request's answer: the action as it stands when the call returns."""
    return actions_pb2.ActionResponse(
        action_id=record.action_id, status=wire.action_status_to_proto(record.status),
        message=record.message, container_id=record.container_id, node=record.node)


def action_command(record: ActionRecord) -> agent_pb2.CollectorCommand:
    """A pending action as the command its agent runs."""
    return agent_pb2.CollectorCommand(action=agent_pb2.ActionCommand(
        action_id=record.action_id, container_id=record.container_id,
        type=wire.ACTION_TYPE.to_proto(record.type), reason=record.reason,
        requested_by=record.requested_by, with_pause=record.with_pause))


def agent_message(record: AgentRecord, hostname: str,
                  baselines: Sequence[HeldBaseline] | None = None) -> agent_pb2.Agent:
    """An agent's row as a message; `baselines`: what it holds now (default: as stored)."""
    held = record.baselines if baselines is None else baselines
    msg = agent_pb2.Agent(
        node=record.node, agent_version=record.agent_version or "",
        mode=wire.MODE.to_proto(record.mode) if record.mode in wire.MODE.texts else 0,
        connected=record.connected, containers_watched=record.containers_watched or 0,
        spool_depth=record.spool_depth or 0, peer=record.peer or "", hostname=hostname,
        last_heartbeat=wire.to_timestamp(record.last_seen),
        counters=[common_pb2.KindCounters(kind=k, **{
            f: int(v.get(f, 0)) for f in wire.KIND_COUNTER_FIELDS})
            for k, v in sorted(record.counters.items()) if isinstance(v, Mapping)],
        baselines=[wire.held_baseline_to_proto(h)
                   for h in list(held)[:wire.DEFAULT_LIMITS.max_node_baselines]])
    if record.connected_at is not None:
        msg.connected_at.CopyFrom(wire.to_timestamp(record.connected_at))
    return msg


def baseline_update(doc: FleetBaseline, summary: BaselineSummary,
                    ) -> agent_pb2.CollectorCommand:
    """A baseline as the update agents get. One too big for the wire loses its oldest
    windows (logged): the items and the mode matter more than the forest's oldest data."""
    baseline = wire.baseline_to_proto(doc, summary)
    command = agent_pb2.CollectorCommand(baseline=baselines_pb2.BaselineUpdate(
        image_key=doc.image_key, found=True, baseline=baseline))
    limit = wire.MAX_MESSAGE_BYTES - UPDATE_SLACK_BYTES
    if command.ByteSize() > limit:
        before = len(baseline.windows)
        while command.ByteSize() > limit and len(baseline.windows):
            del baseline.windows[:max(1, len(baseline.windows) // 4)]
        log.warning("baseline of %s: the update is too big for the wire; sent with %d of its "
                    "%d windows", doc.image_key, len(baseline.windows), before)
    return command


def baseline_not_found(image_key: str) -> agent_pb2.CollectorCommand:
    return agent_pb2.CollectorCommand(baseline=baselines_pb2.BaselineUpdate(
        image_key=image_key, found=False))


def filter_args(f: alerts_pb2.AlertFilter) -> dict[str, Any]:
    """A request's AlertFilter as AlertFilter / SubscriberFilter arguments: Alerts.List and
    Alerts.Subscribe read it the same way."""
    return {"kinds": [wire.ALERT_KIND.from_proto(k) for k in f.kinds],
            "min_severity": wire.SEVERITY.from_proto(f.min_severity) if f.min_severity else None,
            "nodes": list(f.nodes), "namespaces": list(f.namespaces), "images": list(f.images),
            "containers": list(f.containers), "exclude_images": list(f.exclude_images),
            "exclude_namespaces": list(f.exclude_namespaces),
            "exclude_containers": list(f.exclude_containers)}


__all__ = [
    "PublishedAlert",
    "action_command",
    "action_message",
    "action_response",
    "agent_message",
    "alert_message",
    "baseline_not_found",
    "baseline_update",
    "filter_args",
]
