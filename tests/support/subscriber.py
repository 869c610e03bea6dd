"""Alerts.Subscribe for tests of store order and resume: a live call and its start token, and
its next events with their alerts (single or batched) and resume tokens."""

from __future__ import annotations

import grpc
from driftwarden.collector.servicers import RESUME_METADATA, SUBSCRIBED_METADATA
from driftwarden.proto.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2


def subscribe(channel: grpc.Channel, **request) -> tuple[grpc.Call, str]:
    """A Subscribe call once it is live, and the resume token of its start."""
    call = alerts_pb2_grpc.AlertsStub(channel).Subscribe(alerts_pb2.SubscribeRequest(**request))
    metadata = dict(call.initial_metadata())
    assert metadata.get(SUBSCRIBED_METADATA[0]) == SUBSCRIBED_METADATA[1]
    return call, metadata[RESUME_METADATA]


def alert_events(call, n: int) -> list[tuple[list[common_pb2.Alert], str]]:
    """The next `n` events, each as (its alerts, its resume token); anything but alerts fails."""
    out = []
    for _ in range(n):
        event = next(call)
        kind = event.WhichOneof("event")
        assert kind in ("alert", "batch"), event
        out.append(([event.alert] if kind == "alert" else list(event.batch.alerts),
                     event.resume_token))
    return out
