"""Stored alerts and actions from the collector (``Alerts.List``, ``Actions.List``), page by
page, and the two merged in time order for `driftwarden alerts`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from driftwarden.core import wire
from driftwarden.ops.format import action_time
from driftwarden.proto.v1 import (
    actions_pb2,
    actions_pb2_grpc,
    alerts_pb2,
    alerts_pb2_grpc,
    common_pb2,
)

CALL_TIMEOUT = 20.0  # each list call
_MAX_PAGE = wire.DEFAULT_LIMITS.max_page_size

T = TypeVar("T")


def _pages(fetch: Callable[[int, str], tuple[Sequence[T], str]], limit: int) -> list[T]:
    """Up to `limit` items, page by page: ``fetch(page_size, page_token)`` returns a page and
    the next token ("" after the last page)."""
    out: list[T] = []
    token = ""
    while len(out) < limit:
        items, token = fetch(min(limit - len(out), _MAX_PAGE), token)
        out += items
        if not token:
            break
    return out[:limit]


def list_alerts(stub: alerts_pb2_grpc.AlertsStub, request_filter: alerts_pb2.AlertFilter,
                since: float | None, limit: int) -> list[common_pb2.Alert]:
    """Up to `limit` stored alerts, newest first."""
    def fetch(size: int, token: str) -> tuple[Sequence[common_pb2.Alert], str]:
        request = alerts_pb2.ListAlertsRequest(filter=request_filter, page_size=size,
                                               page_token=token)
        if since is not None:
            request.since.CopyFrom(wire.to_timestamp(since))
        response = stub.List(request, timeout=CALL_TIMEOUT)
        return response.alerts, response.next_page_token

    return _pages(fetch, limit)


def list_actions(stub: actions_pb2_grpc.ActionsStub, nodes: Sequence[str],
                 containers: Sequence[str], since: float | None,
                 limit: int) -> list[actions_pb2.Action]:
    """Up to `limit` actions on these nodes and containers (all when empty), newest first."""
    def fetch(size: int, token: str) -> tuple[Sequence[actions_pb2.Action], str]:
        request = actions_pb2.ListActionsRequest(nodes=nodes, containers=containers,
                                                 page_size=size, page_token=token)
        if since is not None:
            request.since.CopyFrom(wire.to_timestamp(since))
        response = stub.List(request, timeout=CALL_TIMEOUT)
        return response.actions, response.next_page_token

    return _pages(fetch, limit)


def oldest_first(alerts: Sequence[common_pb2.Alert], actions: Sequence[actions_pb2.Action]
                 ) -> list[common_pb2.Alert | actions_pb2.Action]:
    """Alerts and actions (each newest first from the collector) merged, oldest first; at the
    same time an alert before an action, each kind in the collector's order."""
    keyed: list[tuple[int, int, common_pb2.Alert | actions_pb2.Action]] = []
    for i, alert in enumerate(reversed(alerts)):
        keyed.append((alert.time.ToNanoseconds(), i, alert))
    for i, action in enumerate(reversed(actions)):
        when = action_time(action)
        keyed.append((when.ToNanoseconds() if when else 0, len(alerts) + i, action))
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [item for _, _, item in keyed]


__all__ = ["CALL_TIMEOUT", "list_actions", "list_alerts", "oldest_first"]
