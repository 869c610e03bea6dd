"""The collector over real gRPC on 127.0.0.1 with a real SQLite file: the agent channel (a fake
agent speaking Connect with the generated stubs), subscribers, listings, actions, policy, auth,
TLS with real certificates, health, reflection, limits, and the `driftwarden collector` command.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from driftwarden.collector.command import add_parser, config_from_args, run_collector
from driftwarden.collector.policy import parse_policy
from driftwarden.collector.server import CollectorConfig, CollectorServer
from driftwarden.collector.service import INTERRUPTED_MESSAGE
from driftwarden.collector.servicers import SUBSCRIBED_METADATA, service_names
from driftwarden.collector.store import AlertStore
from driftwarden.core import wire
from driftwarden.core.actions import ActionStatus
from driftwarden.core.alerts import Alert, AlertKind, Severity
from driftwarden.core.argtypes import CommandParser
from driftwarden.core.errors import CollectorError, UsageError
from driftwarden.core.tls import TlsFiles
from driftwarden.ops.certs import init_certs
from driftwarden.proto.v1 import (
    actions_pb2,
    actions_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    alerts_pb2,
    alerts_pb2_grpc,
    common_pb2,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support.fake_agent import FakeAgent, container_id, heartbeat, hello, make_alert

REPO = Path(__file__).resolve().parents[1]
NO_RULES = parse_policy("version: 1\n")
RULE = "quarantine-protect-drift"
SKIPPED = actions_pb2.ACTION_STATUS_SKIPPED
CODE = grpc.StatusCode


def wait_until(predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def server(make_server) -> CollectorServer:
    return make_server(policy=NO_RULES)


def connect(channel: grpc.Channel, node: str = "node-a", **kwargs) -> FakeAgent:
    agent = FakeAgent(channel, **kwargs)
    agent.send(hello=hello(node))
    return agent


def wait_for_containers(channel: grpc.Channel, node: str, count: int) -> None:
    """A heartbeat has no answer: wait until the collector has taken it in."""
    stub = agent_pb2_grpc.AgentsStub(channel)

    def seen() -> bool:
        agents = stub.List(agent_pb2.ListAgentsRequest(), timeout=5).agents
        return any(a.node == node and a.containers_watched == count for a in agents)

    wait_until(seen, f"{node}'s heartbeat")


def subscribe(channel: grpc.Channel, metadata=None, **request):
    """An Alerts.Subscribe call, returned once the subscription is live."""
    call = alerts_pb2_grpc.AlertsStub(channel).Subscribe(
        alerts_pb2.SubscribeRequest(**request), metadata=metadata)
    assert SUBSCRIBED_METADATA in call.initial_metadata()
    return call


def take(call, n: int) -> list[alerts_pb2.AlertEvent]:
    return [next(call) for _ in range(n)]


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def ids(events) -> list[str]:
    return [e.alert.id for e in events]


def counted(server: CollectorServer, counter: str, **labels: str) -> float:
    """``driftwarden_collector_<counter>_total{labels}`` now; 0 before its first count."""
    value = server.metrics.sample(f"driftwarden_collector_{counter}_total", labels)
    return 0.0 if value is None else value


# -- the agent channel ---------------------------------------------------------------------------


def test_first_message_must_be_hello_and_nothing_is_stored(server, channels):
    agent = FakeAgent(channels(server))
    agent.send(heartbeat=heartbeat([(container_id("web"), "web")]))
    assert agent.status() == (CODE.FAILED_PRECONDITION,
                              "the first message must be hello, got heartbeat")
    assert server.store.list_agents() == []


def test_invalid_message_is_rejected_with_the_validator_text_and_not_stored(server, channels):
    agent = connect(channels(server))
    bad = make_alert("one")
    bad.count = 0
    agent.send_alerts([make_alert("zero"), bad], [1, 2])
    assert agent.status() == (
        CODE.INVALID_ARGUMENT,
        "agent_message.alert_batch.alerts[1].count: must be at least 1, got 0")
    assert server.store.count_alerts() == 0
    assert counted(server, "invalid_messages", rpc="AgentChannel.Connect") == 1


def test_a_stream_without_hello_times_out(make_server, channels):
    server = make_server(policy=NO_RULES, hello_timeout=0.2)
    assert FakeAgent(channels(server)).status() == (CODE.DEADLINE_EXCEEDED,
                                                    "no hello within 0.2 s")


def test_messages_are_numbered_from_one(server, channels):
    agent = FakeAgent(channels(server))
    agent.send_raw(agent_pb2.AgentMessage(seq=1, hello=hello("node-a")))
    agent.send_raw(agent_pb2.AgentMessage(seq=3, heartbeat=heartbeat()))
    assert agent.status() == (CODE.INVALID_ARGUMENT,
                              "agent_message.seq: expected 2, got 3 (messages are numbered "
                              "from 1, one more each)")


def test_alerts_are_stored_and_acked_with_their_spool_seqs_and_replays_are_not_duplicated(
        server, channels):
    agent = connect(channels(server))
    alerts = [make_alert("one", when=100.0), make_alert("two", when=200.0)]
    agent.send_alerts(alerts, [7, 8])
    ack = agent.recv_kind("ack")
    assert list(ack.alert_ids) == [a.id for a in alerts]
    assert list(ack.spool_seqs) == [7, 8]
    stored = server.store.get_alert(alerts[0].id)
    assert stored["node"] == "node-a"
    assert stored == wire.alert_dict_from_proto(make_alert("one", when=100.0, node="node-a"))

    agent.send_alerts(alerts, [9, 10])  # a replay after a reconnect
    ack = agent.recv_kind("ack")
    assert (list(ack.alert_ids), list(ack.spool_seqs)) == ([a.id for a in alerts], [9, 10])
    assert server.store.count_alerts() == 2

    agent.send_alerts([make_alert("one", when=100.0, count=3, last_seen=150.0)])
    assert list(agent.recv_kind("ack").spool_seqs) == []
    assert server.store.get_alert(alerts[0].id)["count"] == 4
    assert [counted(server, "alerts_received", outcome=o)
            for o in ("new", "duplicate", "updated", "rejected")] == [2, 2, 1, 0]
    assert agent.pending() == []


def test_a_batch_with_an_alert_of_another_node_is_rejected_whole(server, channels):
    agent = connect(channels(server))
    batch = [make_alert("mine"), make_alert("theirs", node="node-b")]
    agent.send_alerts(batch, [1, 2])
    notice = agent.recv_kind("notice")
    assert notice.text == (f"alert_batch rejected: alerts[1] (id {batch[1].id}) claims node "
                           "'node-b' but this stream is node 'node-a'; nothing of the batch is "
                           "stored or acked")
    assert agent.pending() == []  # no ack
    assert server.store.count_alerts() == 0
    [entry] = server.store.list_audit()
    assert (entry.actor, entry.action, entry.decision, entry.reason) == (
        "node-a", "alert-batch", "rejected", notice.text)
    assert counted(server, "alerts_received", outcome="rejected") == 2
    agent.send_alerts([make_alert("mine", node="node-a")], [3])  # the stream goes on
    assert list(agent.recv_kind("ack").spool_seqs) == [3]


@pytest.mark.parametrize("named", ["", "node-b"])  # none, or its own node
def test_an_alert_about_a_container_another_connected_node_runs_is_rejected(server, channels,
                                                                             named):
    channel = channels(server)
    web = container_id("node-a-web")
    owner = connect(channel, "node-a")
    owner.send(heartbeat=heartbeat([(web, "web")]))
    wait_until(lambda: server.service._connected_host_of(web, "node-b") == "node-a",
               "node-a's heartbeat")
    forger = connect(channel, "node-b")
    forged = make_alert("forged", cid=web, node=named)
    forger.send_alerts([forged], [1])
    notice = forger.recv_kind("notice")
    assert notice.text == (f"alert_batch rejected: alerts[0] (id {forged.id}) is about container "
                           f"{web[:12]}, which node 'node-a' runs, but this stream is node "
                           "'node-b'; nothing of the batch is stored or acked")
    assert forger.pending() == [] and server.store.count_alerts() == 0
    owner.send_alerts([make_alert("real", cid=web)], [1])  # the node that runs it may
    assert list(owner.recv_kind("ack").spool_seqs) == [1]
    owner.send(heartbeat=heartbeat([]))  # gone from node-a: nobody's container any more
    wait_until(lambda: server.service._connected_host_of(web, "node-b") is None,
               "node-a's next heartbeat")


def test_a_second_stream_for_a_node_replaces_the_first(server, channels):
    channel = channels(server)
    first = connect(channel)
    first.send(heartbeat=heartbeat())
    wait_until(lambda: server.service.connected_count() == 1, "the first stream")
    second = connect(channel)
    code, details = first.status()
    assert code == CODE.ABORTED
    assert details.startswith("replaced by a newer stream for node node-a from ")
    second.send_alerts([make_alert("one")])
    second.recv_kind("ack")
    assert server.store.get_agent("node-a").connected
    second.cancel()
    wait_until(lambda: not server.store.get_agent("node-a").connected, "the disconnect")
    assert server.service.connected_count() == 0


def test_agents_list_shows_hello_and_heartbeat(server, channels):
    channel = channels(server)
    agent = connect(channel)
    agent.send(heartbeat=heartbeat([(container_id("web"), "web")], spool_depth=4))
    wait_for_containers(channel, "node-a", 1)
    [row] = agent_pb2_grpc.AgentsStub(channel).List(agent_pb2.ListAgentsRequest(),
                                                     timeout=5).agents
    assert (row.node, row.agent_version, row.mode, row.connected, row.hostname) == (
        "node-a", "0.1.0", common_pb2.MODE_MONITOR, True, "host-1")
    assert (row.containers_watched, row.spool_depth) == (1, 4)
    assert [(c.kind, c.emitted, c.suppressed, c.dropped, c.over_budget, c.known)
            for c in row.counters] == [("exec", 5, 2, 1, 9, 40)]
    assert row.peer.startswith("ipv4:127.0.0.1:")


# -- subscribers ---------------------------------------------------------------------------------

FILTER_ALERTS = {
    "a1": {"kind": "drift", "severity": "high", "name": "web", "image": "nginx:1.25",
           "namespace": "prod"},
    "a2": {"kind": "novel", "severity": "low", "name": "api", "image": "redis:7",
           "namespace": "prod"},
    "a3": {"kind": "anomaly", "severity": "critical", "name": "db", "image": "postgres:16",
           "namespace": "kube-system"},
    "a4": {"kind": "novel", "severity": "medium", "name": "web", "image": "nginx:1.25",
           "namespace": "staging"},
    "a5": {"kind": "drift", "severity": "critical", "name": "api", "image": "redis:7",
           "namespace": "prod"},
}
F = alerts_pb2.AlertFilter
FILTER_CASES = [
    (F(), ["a1", "a2", "a3", "a4", "a5"]),
    (F(kinds=[common_pb2.ALERT_KIND_NOVEL]), ["a2", "a4"]),
    (F(min_severity=common_pb2.SEVERITY_HIGH), ["a1", "a3", "a5"]),
    (F(images=["redis"]), ["a2", "a5"]),
    (F(containers=["api"]), ["a2", "a5"]),
    (F(containers=[container_id("web")[:8]]), ["a1", "a4"]),
    (F(nodes=["node-b"]), []),
    (F(exclude_namespaces=["kube-system"], exclude_images=["nginx:1.25"]), ["a2", "a5"]),
    (F(kinds=[common_pb2.ALERT_KIND_DRIFT, common_pb2.ALERT_KIND_ANOMALY],
       exclude_containers=["api"]), ["a1", "a3"]),
]


def test_subscriber_filters_let_through_exactly_what_they_match(server, channels):
    channel = channels(server)
    calls = [subscribe(channel, filter=f) for f, _ in FILTER_CASES]
    agent = connect(channel)
    alerts = {key: make_alert(key, when=100.0 + i, kind=a["kind"], severity=a["severity"],
                              name=a["name"], image=a["image"], namespace=a["namespace"])
              for i, (key, a) in enumerate(FILTER_ALERTS.items())}
    agent.send_alerts(list(alerts.values()))
    agent.recv_kind("ack")  # published before the ack: every queue holds its alerts now
    wait_until(lambda: all(s["pending"] == 0 for s in server.hub.stats()["per_subscriber"]),
               "the subscribers to take their alerts")
    subs = server.hub.stats()["per_subscriber"]
    for (_, expected), call, stats in zip(FILTER_CASES, calls, subs, strict=True):
        assert stats["delivered"] == len(expected)
        assert ids(take(call, len(expected))) == [alerts[k].id for k in expected]
        call.cancel()
    wait_until(lambda: len(server.hub) == 0, "cancelled subscriptions to close")
    err = rpc_error(lambda: next(alerts_pb2_grpc.AlertsStub(channel).Subscribe(
        alerts_pb2.SubscribeRequest(filter=F(containers=[""])), timeout=5)))
    assert (err.code(), err.details()) == (
        CODE.INVALID_ARGUMENT, "subscribe_request.filter.containers[0]: missing")


def test_a_subscription_ends_with_unavailable_when_the_collector_stops(make_server, channels):
    # UNAVAILABLE, not OK: `driftwarden alerts --follow` reconnects on it, and stops on OK
    server = make_server(policy=NO_RULES)
    call = subscribe(channels(server))
    server.stop(0.5)
    with pytest.raises(grpc.RpcError):
        list(call)
    assert call.code() == CODE.UNAVAILABLE
    assert call.details() == "the collector is shutting down"


def test_a_slow_subscriber_gets_a_notice_with_the_exact_dropped_count(make_server, channels):
    server = make_server(policy=NO_RULES, subscriber_queue=10)
    fast = subscribe(channels(server), include_notices=True)
    # A small HTTP/2 window without BDP probing: a client that does not read stops the stream
    slow = subscribe(channels(server, options=[("grpc.http2.bdp_probe", 0),
                                               ("grpc.http2.lookahead_bytes", 1024),
                                               ("grpc.use_local_subchannel_pool", 1)]),
                     include_notices=True)
    agent = connect(channels(server))
    published = []
    for batch in range(4):
        alerts = [make_alert(f"a{batch}-{i}", when=1000.0 + 10 * batch + i, padding=20_000)
                  for i in range(10)]
        agent.send_alerts(alerts)
        agent.recv_kind("ack")
        published += [a.id for a in alerts]
        assert ids(take(fast, 10)) == published[-10:]

    expected, dropped, seen = list(published), 0, 0
    while seen + dropped < len(published):
        event = next(slow)
        if event.WhichOneof("event") == "notice":
            assert event.notice.dropped > 0
            assert event.notice.text.endswith("dropped here: this subscriber fell behind and "
                                              "its queue (10 items) was full")
            del expected[seen:seen + event.notice.dropped]  # the gap is exactly here
            dropped += event.notice.dropped
        else:
            assert event.alert.id == expected[seen]
            seen += 1
    assert dropped >= len(published) - 10 - 2  # the queue plus what was in flight
    assert server.hub.stats()["dropped"] == dropped
    assert server.metrics.sample("driftwarden_collector_subscriber_dropped_total") == dropped


# -- listing alerts ------------------------------------------------------------------------------


def test_alerts_list_pages_newest_first(server, channels):
    channel = channels(server)
    agent = connect(channel)
    alerts = [make_alert(f"p{i}", when=1000.0 + i, name="web" if i % 2 else "api")
              for i in range(5)]
    agent.send_alerts(alerts)
    agent.recv_kind("ack")
    stub = alerts_pb2_grpc.AlertsStub(channel)
    pages, token = [], ""
    while True:
        page = stub.List(alerts_pb2.ListAlertsRequest(page_size=2, page_token=token), timeout=5)
        pages.append(ids(_as_events(page.alerts)))
        token = page.next_page_token
        if not token:
            break
    newest_first = [a.id for a in reversed(alerts)]
    assert pages == [newest_first[:2], newest_first[2:4], newest_first[4:]]
    api = stub.List(alerts_pb2.ListAlertsRequest(filter=F(containers=["api"]), page_size=10,
                                                 since=wire.to_timestamp(1001.0)), timeout=5)
    assert ids(_as_events(api.alerts)) == [alerts[4].id, alerts[2].id]
    assert api.alerts[0] == make_alert("p4", when=1004.0, name="api", node="node-a")

    err = rpc_error(lambda: stub.List(alerts_pb2.ListAlertsRequest(page_token="garbage"),
                                      timeout=5))
    assert err.code() == CODE.INVALID_ARGUMENT
    assert err.details().startswith("invalid page token: pass back exactly the next_page_token")
    first = stub.List(alerts_pb2.ListAlertsRequest(page_size=1), timeout=5)
    err = rpc_error(lambda: stub.List(alerts_pb2.ListAlertsRequest(
        page_size=1, page_token=first.next_page_token, filter=F(images=["nginx"])), timeout=5))
    assert err.code() == CODE.INVALID_ARGUMENT
    assert "belongs to a listing with another filter" in err.details()
    err = rpc_error(lambda: stub.List(alerts_pb2.ListAlertsRequest(page_size=1001), timeout=5))
    assert (err.code(), err.details()) == (
        CODE.INVALID_ARGUMENT, "list_alerts_request.page_size: 1001, at most 1000")


def _as_events(alerts) -> list[alerts_pb2.AlertEvent]:
    return [alerts_pb2.AlertEvent(alert=a) for a in alerts]


# -- operator actions ----------------------------------------------------------------------------


def test_an_action_is_routed_to_the_agent_and_its_result_returned_and_stored(server, channels):
    channel = channels(server)
    events = subscribe(channel, include_actions=True)
    agent = connect(channel)
    cid = container_id("web")
    agent.send(heartbeat=heartbeat([(cid, "web"), (container_id("api"), "api")]))
    wait_for_containers(channel, "node-a", 2)
    stub = actions_pb2_grpc.ActionsStub(channel)
    future = stub.Request.future(actions_pb2.ActionRequest(
        container="web", type=actions_pb2.ACTION_TYPE_QUARANTINE, with_pause=True,
        reason="investigating", requested_by="alice"), timeout=10)
    command = agent.recv_kind("action")
    assert (command.container_id, command.type, command.reason, command.requested_by,
            command.with_pause) == (cid, actions_pb2.ACTION_TYPE_QUARANTINE, "investigating",
                                    "operator:alice", True)
    agent.send(action_result=agent_pb2.ActionResult(
        action_id=command.action_id, status=actions_pb2.ACTION_STATUS_DONE,
        message="quarantined and paused", finished_at=wire.to_timestamp(time.time())))
    response = future.result()
    assert response == actions_pb2.ActionResponse(
        action_id=command.action_id, status=actions_pb2.ACTION_STATUS_DONE,
        message="quarantined and paused", container_id=cid, node="node-a")

    record = server.store.get_action(command.action_id)
    assert (record.status, record.type, record.requested_by, record.container_name) == (
        ActionStatus.DONE, "quarantine", "operator:alice", "web")
    assert [(e.actor, e.decision, e.reason) for e in server.store.list_audit()] == [
        ("operator:alice", "request", "investigating"),
        ("node-a", "done", "quarantined and paused")]
    pending, done = take(events, 2)
    assert (pending.action.status, pending.action.with_pause) == (
        actions_pb2.ACTION_STATUS_PENDING, True)
    assert (done.action.action_id, done.action.status, done.action.message) == (
        command.action_id, actions_pb2.ACTION_STATUS_DONE, "quarantined and paused")
    assert done.action.HasField("finished_at")
    listed = stub.List(actions_pb2.ListActionsRequest(), timeout=5).actions
    assert [(a.action_id, a.status) for a in listed] == [
        (command.action_id, actions_pb2.ACTION_STATUS_DONE)]
    assert counted(server, "actions", type="quarantine", status="done") == 1


def test_an_action_for_a_node_whose_agent_is_offline_fails_with_the_reason(server, channels):
    channel = channels(server)
    agent = connect(channel)
    agent.send_alerts([make_alert("one", name="web")])
    agent.recv_kind("ack")
    agent.cancel()
    wait_until(lambda: server.service.connected_count() == 0, "the disconnect")
    response = actions_pb2_grpc.ActionsStub(channel).Request(actions_pb2.ActionRequest(
        container=container_id("web")[:12], type=actions_pb2.ACTION_TYPE_KILL, reason="x"),
        timeout=5)
    assert (response.status, response.message, response.node) == (
        actions_pb2.ACTION_STATUS_FAILED, "agent for node node-a is not connected", "node-a")
    assert server.store.get_action(response.action_id).status is ActionStatus.FAILED


def test_an_unknown_container_is_not_found_and_an_ambiguous_prefix_lists_candidates(
        server, channels):
    channel = channels(server)
    agent = connect(channel)
    agent.send(heartbeat=heartbeat([("abcd1" + "0" * 59, "one"), ("abcd2" + "0" * 59, "two")]))
    wait_for_containers(channel, "node-a", 2)
    stub = actions_pb2_grpc.ActionsStub(channel)

    def request(container: str) -> grpc.RpcError:
        return rpc_error(lambda: stub.Request(actions_pb2.ActionRequest(
            container=container, type=actions_pb2.ACTION_TYPE_PAUSE), timeout=5))

    err = request("nosuch")
    assert (err.code(), err.details()) == (
        CODE.NOT_FOUND, "no container known from alerts matches 'nosuch': give a full "
        "container id, a container name, or an id prefix of at least 4 characters")
    err = request("abcd")
    assert (err.code(), err.details()) == (
        CODE.FAILED_PRECONDITION, "'abcd' is ambiguous (an id prefix of 2 running "
        "containers): one (abcd10000000) on node-a, two (abcd20000000) on node-a; give the full "
        "container id")
    assert server.store.list_actions() == []
    err = rpc_error(lambda: stub.Request(actions_pb2.ActionRequest(
        container="one", type=actions_pb2.ACTION_TYPE_PAUSE, with_pause=True), timeout=5))
    assert (err.code(), err.details()) == (
        CODE.INVALID_ARGUMENT, "action_request.with_pause: only for ACTION_TYPE_QUARANTINE, "
        "not ACTION_TYPE_PAUSE")


def test_an_operator_request_times_out_as_pending(make_server, channels):
    server = make_server(policy=NO_RULES, action_timeout=0.2)
    channel = channels(server)
    agent = connect(channel)
    agent.send(heartbeat=heartbeat([(container_id("web"), "web")]))
    wait_for_containers(channel, "node-a", 1)
    response = actions_pb2_grpc.ActionsStub(channel).Request(actions_pb2.ActionRequest(
        container="web", type=actions_pb2.ACTION_TYPE_PAUSE), timeout=5)
    assert response.status == actions_pb2.ACTION_STATUS_PENDING
    command = agent.recv_kind("action")
    assert command.action_id == response.action_id
    agent.send(action_result=agent_pb2.ActionResult(  # the result lands later
        action_id=command.action_id, status=actions_pb2.ACTION_STATUS_ALREADY,
        finished_at=wire.to_timestamp(time.time())))
    wait_until(lambda: server.store.get_action(command.action_id).finished, "the late result")
    assert server.store.get_action(command.action_id).status is ActionStatus.ALREADY


# -- policy --------------------------------------------------------------------------------------


def test_policy_quarantines_a_protect_mode_high_drift(make_server, channels):
    server = make_server()  # DEFAULT_POLICY
    channel = channels(server)
    events = subscribe(channel, include_actions=True)
    agent = connect(channel)
    alert = make_alert("drift", name="web")
    agent.send_alerts([alert], [1])
    command = agent.recv_kind("action")
    assert (command.container_id, command.type, command.requested_by, command.reason) == (
        container_id("web"), actions_pb2.ACTION_TYPE_QUARANTINE, "policy",
        f"rule {RULE}: quarantine")
    assert list(agent.recv_kind("ack").spool_seqs) == [1]
    agent.send(action_result=agent_pb2.ActionResult(
        action_id=command.action_id, status=actions_pb2.ACTION_STATUS_DONE,
        finished_at=wire.to_timestamp(time.time())))
    got_alert, pending, done = take(events, 3)
    assert got_alert.alert.id == alert.id
    assert (pending.action.status, pending.action.alert_id) == (
        actions_pb2.ACTION_STATUS_PENDING, alert.id)
    assert (done.action.status, done.action.requested_by) == (
        actions_pb2.ACTION_STATUS_DONE, "policy")
    record = server.store.get_action(command.action_id)
    assert (record.status, record.alert_id, record.requested_by) == (
        ActionStatus.DONE, alert.id, "policy")
    act = server.store.list_audit()[0]
    assert (act.actor, act.action, act.decision, act.reason, act.details["rule"]) == (
        "policy", "quarantine", "act", f"rule {RULE}: quarantine", RULE)
    # a novel alert is no rule's business: no action, no audit entry
    agent.send_alerts([make_alert("novel", kind="novel", name="web")])
    agent.recv_kind("ack")
    assert [(e.actor, e.decision) for e in server.store.list_audit()] == [
        ("policy", "act"), ("node-a", "done")]


@pytest.mark.parametrize(("policy_text", "alerts", "reason"), [
    (f"version: 1\ndry_run: true\nrules:\n  - name: {RULE}\n    match: {{kinds: [drift]}}\n"
     "    action: quarantine\n", [{}], f"dry run: would quarantine (rule {RULE})"),
    (None, [{"namespace": "kube-system"}], "exempt: namespace kube-system"),
    ("version: 1\nlimits: {cooldown_seconds: 0, per_container: {max_actions: 1, "
     f"per_seconds: 300}}}}\nrules:\n  - name: {RULE}\n    match: {{kinds: [drift]}}\n"
     "    action: kill\n", [{}, {}],
     f"rate limit: container {container_id('web')[:12]} (web) had 1 action in the last 300 s"),
], ids=["dry-run", "exempt-namespace", "rate-limit"])
def test_policy_brakes_skip_with_the_reason_audited_and_streamed(
        make_server, channels, policy_text, alerts, reason):
    server = make_server(**({"policy": parse_policy(policy_text)} if policy_text else {}))
    channel = channels(server)
    events = subscribe(channel, include_actions=True, filter=F(containers=["web"]))
    agent = connect(channel)
    for i, extra in enumerate(alerts):
        agent.send_alerts([make_alert(f"drift-{i}", name="web", **extra)])
        if i < len(alerts) - 1:  # earlier alerts pass the brake: answer their action
            command = agent.recv_kind("action")
            agent.send(action_result=agent_pb2.ActionResult(
                action_id=command.action_id, status=actions_pb2.ACTION_STATUS_DONE,
                finished_at=wire.to_timestamp(time.time())))
        agent.recv_kind("ack")
    assert agent.pending() == []  # no action command for the skipped one
    skip = [e for e in server.store.list_audit() if e.decision == "skip"]
    assert [(e.actor, e.reason) for e in skip] == [("policy", reason)]
    # earlier alerts: the alert, its action pending, then done; the last: the alert, skipped
    expected = [("alert", None), ("action", actions_pb2.ACTION_STATUS_PENDING),
                ("action", actions_pb2.ACTION_STATUS_DONE)] * (len(alerts) - 1)
    expected += [("alert", None), ("action", SKIPPED)]
    got = take(events, len(expected))
    assert [(e.WhichOneof("event"), e.action.status if e.HasField("action") else None)
            for e in got] == expected
    event = got[-1]
    assert (event.action.message, event.action.requested_by, event.action.alert_id) == (
        reason, "policy", got[-2].alert.id)
    assert server.store.get_action(event.action.action_id).status is ActionStatus.SKIPPED


# -- auth ----------------------------------------------------------------------------------------

OPERATOR_CALLS = {
    "Alerts.List": lambda ch, md: alerts_pb2_grpc.AlertsStub(ch).List(
        alerts_pb2.ListAlertsRequest(), metadata=md, timeout=5),
    "Alerts.Subscribe": lambda ch, md: next(alerts_pb2_grpc.AlertsStub(ch).Subscribe(
        alerts_pb2.SubscribeRequest(), metadata=md, timeout=5)),
    "Actions.Request": lambda ch, md: actions_pb2_grpc.ActionsStub(ch).Request(
        actions_pb2.ActionRequest(container="web", type=actions_pb2.ACTION_TYPE_KILL),
        metadata=md, timeout=5),
    "Actions.List": lambda ch, md: actions_pb2_grpc.ActionsStub(ch).List(
        actions_pb2.ListActionsRequest(), metadata=md, timeout=5),
    "Agents.List": lambda ch, md: agent_pb2_grpc.AgentsStub(ch).List(
        agent_pb2.ListAgentsRequest(), metadata=md, timeout=5),
}


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),),
                                      (("authorization", "s3cret"),)],
                         ids=["missing", "wrong", "not-bearer"])
def test_operator_calls_without_the_right_token_are_unauthenticated(
        make_server, channels, metadata):
    server = make_server(policy=NO_RULES, operator_token="s3cret")
    channel = channels(server)
    agent = connect(channel)  # agents do not use the operator token
    agent.send(heartbeat=heartbeat([(container_id("web"), "web")]))
    wait_until(lambda: server.store.get_agent("node-a") is not None, "the hello")
    for name, call in OPERATOR_CALLS.items():
        err = rpc_error(lambda call=call: call(channel, metadata))
        assert (name, err.code(), err.details()) == (
            name, CODE.UNAUTHENTICATED, "missing or wrong operator token: send metadata "
            "'authorization: Bearer <token>' with the collector's token")
    assert server.store.list_actions() == []
    assert server.store.list_audit() == []
    assert agent.pending() == []
    good = (("authorization", "Bearer s3cret"),)
    assert OPERATOR_CALLS["Agents.List"](channel, good).agents[0].node == "node-a"


# -- TLS -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return init_certs(tmp_path_factory.mktemp("tls") / "certs", ["node-a", "node-b"])


def _credentials(certs, pair) -> grpc.ChannelCredentials:
    key, cert = pair.read()
    return grpc.ssl_channel_credentials(root_certificates=certs.ca_cert.read_bytes(),
                                        private_key=key, certificate_chain=cert)


def test_tls_binds_the_node_to_the_certificate_and_roles_to_calls(make_server, channels, certs):
    server = make_server(policy=NO_RULES, tls=TlsFiles(
        ca=certs.ca_cert, cert=certs.collector.cert, key=certs.collector.key,
        ca_flag="--tls-client-ca"))
    node_a = channels(server, credentials=_credentials(certs, certs.agent("node-a")))
    operator = channels(server, credentials=_credentials(certs, certs.operator))

    impostor = connect(node_a, "node-b")
    assert impostor.status() == (CODE.PERMISSION_DENIED,
                                 "hello.node 'node-b' is not the node of this agent's "
                                 "certificate ('node-a')")
    agent = connect(node_a, "node-a")
    agent.send_alerts([make_alert("one")], [1])
    assert list(agent.recv_kind("ack").spool_seqs) == [1]
    assert server.store.get_alert(make_alert("one").id)["node"] == "node-a"

    listed = OPERATOR_CALLS["Alerts.List"](operator, None)
    assert [a.container.node for a in listed.alerts] == ["node-a"]
    err = rpc_error(lambda: OPERATOR_CALLS["Alerts.List"](node_a, None))
    assert (err.code(), err.details()) == (
        CODE.PERMISSION_DENIED, "agent certificate 'node-a' may only call AgentChannel.Connect; "
        "use an operator certificate or token")
    assert FakeAgent(operator).status() == (
        CODE.PERMISSION_DENIED, "only agent certificates (OU=agent) may call "
        "AgentChannel.Connect, not certificate 'operator' (OU=operator)")

    health = health_pb2_grpc.HealthStub(operator).Check(health_pb2.HealthCheckRequest(),
                                                        timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    plaintext = channels(server)
    err = rpc_error(lambda: OPERATOR_CALLS["Agents.List"](plaintext, None))
    assert err.code() == CODE.UNAVAILABLE


# -- server plumbing -----------------------------------------------------------------------------


def test_health_reports_serving_for_every_service(server, channels):
    stub = health_pb2_grpc.HealthStub(channels(server))
    for name in ("", *service_names()):
        response = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert (name, response.status) == (name, health_pb2.HealthCheckResponse.SERVING)
    err = rpc_error(lambda: stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5))
    assert err.code() == CODE.NOT_FOUND


def test_reflection_lists_the_services(server, channels):
    stub = reflection_pb2_grpc.ServerReflectionStub(channels(server))
    [response] = list(stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    assert sorted(s.name for s in response.list_services_response.service) == sorted([
        "driftwarden.v1.Actions", "driftwarden.v1.AgentChannel", "driftwarden.v1.Agents",
        "driftwarden.v1.Alerts", "driftwarden.v1.Baselines", "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection"])


def test_oversize_messages_are_refused_by_grpc(server, channels):
    channel = channels(server)
    err = rpc_error(lambda: actions_pb2_grpc.ActionsStub(channel).Request(
        actions_pb2.ActionRequest(container="web", type=actions_pb2.ACTION_TYPE_KILL,
                                  reason="x" * (wire.MAX_MESSAGE_BYTES + 1)), timeout=5))
    assert err.code() == CODE.RESOURCE_EXHAUSTED
    agent = connect(channel)
    agent.send_alerts([make_alert(f"big{i}", padding=200_000) for i in range(21)])
    assert agent.status()[0] == CODE.RESOURCE_EXHAUSTED
    assert server.store.count_alerts() == 0


def test_streams_beyond_the_limit_are_refused(make_server, channels):
    server = make_server(policy=NO_RULES, max_workers=4, max_streams=1)
    channel = channels(server)
    held = subscribe(channel)  # holds the only stream slot while referenced
    agent = FakeAgent(channel)
    assert agent.status() == (CODE.RESOURCE_EXHAUSTED,
                              "the collector serves at most 1 streams at once; retry later or "
                              "raise its stream limit")
    assert OPERATOR_CALLS["Agents.List"](channel, None).agents == []  # unary calls still run
    held.cancel()


def test_metrics_are_served_over_http(make_server, channels):
    from prometheus_client.parser import text_string_to_metric_families

    server = make_server(policy=NO_RULES, metrics_listen="127.0.0.1:0")
    channel = channels(server)
    call = subscribe(channel)
    agent = connect(channel)
    now = time.time()
    # raised 0.7 s ago; from an agent whose clock is an hour ahead (counts as 0 s)
    one, two = make_alert("one", when=now - 0.7), make_alert("two", when=now + 3600)
    agent.send_alerts([one, two])
    agent.recv_kind("ack")
    agent.send_alerts([one])  # a replay: DUPLICATE, neither published nor timed again
    agent.recv_kind("ack")
    assert ids(take(call, 2)) == [one.id, two.id]
    # the store's background WAL checkpoints run every second (collector/server.py)
    wait_until(lambda: server.store.checkpoint_stats["checkpoints"] >= 1, "a checkpoint")
    with urllib.request.urlopen(server.metrics_url, timeout=5) as reply:
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = reply.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text)
               if not family.name.endswith("_created") for s in family.samples}
    done = samples.pop(("driftwarden_collector_store_checkpoints_total", (("outcome", "done"),)))
    assert 1 <= done <= server.store.checkpoint_stats["checkpoints"]
    latencies = {key: samples.pop(key) for key in list(samples) if "latency" in key[0]}
    # the store tail reads the store every second in any case (collector/tail.py)
    assert samples.pop(("driftwarden_collector_store_tail_reads_total", ())) >= 0
    assert samples == {
        ("driftwarden_collector_store_seq", ()): 2.0,
        ("driftwarden_collector_agents_connected", ()): 1.0,
        ("driftwarden_collector_alerts_received_total", (("outcome", "duplicate"),)): 1.0,
        ("driftwarden_collector_alerts_received_total", (("outcome", "new"),)): 2.0,
        ("driftwarden_collector_actions_interrupted_total", ()): 0.0,
        **{("driftwarden_collector_policy_decisions_total", (("outcome", outcome),)): value
           for outcome, value in (("act", 0.0), ("no-match", 2.0), ("skip", 0.0))},
        ("driftwarden_collector_store_checkpoints_total", (("outcome", "error"),)): 0.0,
        **{("driftwarden_collector_store_rows", (("table", table),)): value
           for table, value in (("actions", 0.0), ("agents", 1.0), ("alerts", 2.0),
                                ("audit", 0.0), ("baselines", 0.0), ("containers", 1.0))},
        **{("driftwarden_collector_baselines", (("mode", mode),)): 0.0
           for mode in ("learn", "monitor", "protect")},
        ("driftwarden_collector_subscriber_dropped_total", ()): 0.0,
        ("driftwarden_collector_subscribers", ()): 1.0,
    }

    def histogram(name: str) -> tuple[dict[str, float], float, float]:
        buckets = {dict(labels)["le"]: value for (sample, labels), value in latencies.items()
                   if sample == name + "_bucket"}
        return buckets, latencies[(name + "_count", ())], latencies[(name + "_sum", ())]

    buckets, count, total = histogram("driftwarden_collector_alert_store_latency_seconds")
    assert (count, buckets["0.0005"], buckets["0.5"], buckets["2.5"], buckets["+Inf"]) == (
        2, 1, 1, 2, 2)
    assert 0.7 <= total < 2.5
    buckets, count, total = histogram("driftwarden_collector_subscriber_latency_seconds")
    assert (count, buckets["2.5"], buckets["+Inf"]) == (2, 2, 2)
    assert 0 < total < 5
    assert len(buckets) == 18  # LATENCY_BUCKETS and +Inf


def test_a_port_in_use_is_an_error(server, tmp_path):
    taken = CollectorServer(CollectorConfig(db_path=tmp_path / "other.db",
                                            listen=server.address))
    with pytest.raises(CollectorError) as info:
        taken.start()
    assert str(info.value) == (f"cannot listen on {server.address}: the port is in use or the "
                               "address is not on this host")


def test_config_refuses_what_it_cannot_serve(tmp_path):
    def config(**kw) -> str:
        with pytest.raises(UsageError) as info:
            CollectorConfig(db_path=tmp_path / "c.db", **kw)
        return str(info.value)

    assert config(listen="0.0.0.0:50051") == (
        "--listen '0.0.0.0:50051': 0.0.0.0 is not a loopback address; this build listens on "
        "127.0.0.0/8, ::1 and localhost only (pass --allow-non-loopback for a real deployment, "
        "with TLS: the --tls-* flags)")
    assert config(listen="0.0.0.0:50051", allow_non_loopback=True) == (
        "--listen 0.0.0.0:50051: listening beyond loopback needs TLS (--tls-cert, --tls-key, "
        "--tls-client-ca)")
    assert config(listen="50051") == (
        "--listen '50051': a port alone, no host; expected HOST:PORT (e.g. 127.0.0.1:50051 or "
        "[::1]:50051; port 0 picks a free port)")
    assert config(metrics_listen="10.0.0.1:9464") == (
        "--metrics '10.0.0.1:9464': 10.0.0.1 is not a loopback address; it listens on "
        "127.0.0.0/8, ::1 and localhost only (put a proxy in front to expose it)")
    assert config(tls=TlsFiles(ca=tmp_path / "ca.crt")) == (
        "a TLS collector presents its certificate: give --tls-cert and --tls-key with "
        "--tls-client-ca")


# -- the command ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="driftwarden")
    add_parser(parser.add_subparsers(dest="command", parser_class=CommandParser))
    return parser


def test_collector_command_serves_prunes_and_stops(tmp_path, channels):
    db = tmp_path / "c.db"
    with AlertStore.open(db) as store:  # an alert from long ago: retention drops it at start
        old = Alert(id="0" * 24, time=1000.0, kind=AlertKind.DRIFT, severity=Severity.LOW,
                    score=1.0, reasons=(), container={"id": "c" * 64}, process=None,
                    events=(), baseline_version=1)
        store.insert_alert({**old.to_dict(), "node": "node-a"})
    args = _parser().parse_args(["collector", "--db", str(db), "--listen", "127.0.0.1:0",
                                 "--retention-days", "1"])
    out, stop, result = io.StringIO(), threading.Event(), []
    thread = threading.Thread(target=lambda: result.append(run_collector(
        config_from_args(args), stop, retention_days=args.retention_days, stdout=out)))
    thread.start()
    try:
        wait_until(lambda: out.getvalue(), "the collector's line")
        line = out.getvalue()
        match = re.fullmatch(r"driftwarden collector listening on 127\.0\.0\.1:(\d+) \(plaintext, "
                             r"no operator auth\), data in (.+)\n", line)
        assert match, line
        assert match.group(2) == str(db.resolve())
        channel = channels(f"127.0.0.1:{match.group(1)}")
        assert OPERATOR_CALLS["Alerts.List"](channel, None).alerts == []
    finally:
        stop.set()
        thread.join(10)
    assert result == [0]


def test_collector_command_flag_errors_are_one_line(tmp_path, capsys):
    parser = _parser()
    with pytest.raises(SystemExit) as info:
        parser.parse_args(["collector", "--db", "x.db", "--retention-days", "-1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == ("driftwarden collector: error: argument --retention-days: must be a number of "
                   "days >= 0, got -1 (see `driftwarden collector --help`)\n")
    for bad, why in (("0", "must be 1..4096, got 0"), ("lots", "expected a whole number, got "
                                                            "'lots'")):
        with pytest.raises(SystemExit):
            parser.parse_args(["collector", "--db", "x.db", "--max-streams", bad])
        assert capsys.readouterr().err == (
            f"driftwarden collector: error: argument --max-streams: {why} "
            "(see `driftwarden collector --help`)\n")
    sized = config_from_args(parser.parse_args(["collector", "--db", str(tmp_path / "c.db"),
                                                "--max-streams", "500"]))
    assert (sized.streams, sized.max_workers) == (500, 504)
    default = config_from_args(parser.parse_args(["collector", "--db", str(tmp_path / "c.db")]))
    assert (default.streams, default.max_workers) == (256, 260)

    def usage(*argv: str) -> str:
        args = parser.parse_args(["collector", "--db", str(tmp_path / "c.db"), *argv])
        with pytest.raises(UsageError) as info:
            config_from_args(args)
        return str(info.value)

    assert usage("--tls-cert", "c.crt") == (
        "--tls-cert given without --tls-client-ca, --tls-key: TLS needs all three "
        "(`driftwarden certs init DIR` makes them)")
    assert usage("--tls-cert", "c.crt", "--tls-key", "k", "--tls-client-ca", "ca") == (
        "--tls-client-ca ca: cannot read it (No such file or directory); run `driftwarden "
        "certs init DIR` to make certificates")
    (tmp_path / "empty").write_text("\n")
    assert usage("--token-file", str(tmp_path / "empty")) == (
        f"--token-file {tmp_path / 'empty'}: the file is empty")
    assert usage("--listen", "0.0.0.0:50051").startswith(
        "--listen '0.0.0.0:50051': 0.0.0.0 is not a loopback address; this build listens on ")
    (tmp_path / "bad.yaml").write_text("version: 1\ndry_run: maybe\n")
    assert usage("--policy", str(tmp_path / "bad.yaml")).startswith(
        f"{tmp_path / 'bad.yaml'}: dry_run: ")
    args = parser.parse_args(["collector", "--db", str(tmp_path / "nodir" / "c.db")])
    with pytest.raises(UsageError, match="does not exist; create it first"):
        config_from_args(args)


_SCRIPT = """
import sys
from driftwarden.core.argtypes import CommandParser
from driftwarden.collector.command import add_parser
parser = CommandParser(prog="driftwarden")
add_parser(parser.add_subparsers(dest="command", parser_class=CommandParser))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_collector_command_stops_on_sigterm(tmp_path):
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, "collector", "--db", str(tmp_path / "c.db"),
         "--listen", "127.0.0.1:0", "--token-file", str(token)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert re.fullmatch(r"driftwarden collector listening on 127\.0\.0\.1:\d+ \(plaintext, "
                            r"operator token required\), data in .+\n", line), line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# -- actions: persistence, restarts, listing -----------------------------------------------------

PAUSE_RULE = parse_policy(
    f"version: 1\nrules:\n  - name: {RULE}\n    match: {{kinds: [drift]}}\n"
    "    action: quarantine\n    with_pause: true\n")


def test_with_pause_is_stored_and_listed_for_policy_actions(make_server, channels):
    server = make_server(policy=PAUSE_RULE)
    channel = channels(server)
    agent = connect(channel)
    agent.send_alerts([make_alert("drift", name="web")], [1])
    command = agent.recv_kind("action")
    assert (command.type, command.with_pause) == (actions_pb2.ACTION_TYPE_QUARANTINE, True)
    agent.recv_kind("ack")
    assert server.store.get_action(command.action_id).with_pause is True
    listed = actions_pb2_grpc.ActionsStub(channel).List(actions_pb2.ListActionsRequest(),
                                                        timeout=5).actions
    assert [(a.action_id, a.with_pause, a.status) for a in listed] == [
        (command.action_id, True, actions_pb2.ACTION_STATUS_PENDING)]


def test_an_action_left_pending_by_a_stopped_collector_fails_at_start_and_a_late_result_wins(
        make_server, channels):
    first = make_server(policy=NO_RULES, action_timeout=0.2)
    agent = connect(channels(first))
    cid = container_id("web")
    agent.send(heartbeat=heartbeat([(cid, "web")]))
    wait_for_containers(channels(first), "node-a", 1)
    response = actions_pb2_grpc.ActionsStub(channels(first)).Request(actions_pb2.ActionRequest(
        container="web", type=actions_pb2.ACTION_TYPE_QUARANTINE, with_pause=True,
        reason="investigating"), timeout=5)
    assert response.status == actions_pb2.ACTION_STATUS_PENDING
    assert agent.recv_kind("action").action_id == response.action_id
    first.stop(0.5)  # before the agent answered

    second = make_server(policy=NO_RULES)  # the same SQLite file
    record = second.store.get_action(response.action_id)
    assert (record.status, record.message, record.interrupted, record.with_pause) == (
        ActionStatus.FAILED, INTERRUPTED_MESSAGE, True, True)
    assert second.store.stats()["actions_pending"] == 0
    failed = second.store.list_audit()[-1]
    assert (failed.actor, failed.action, failed.target, failed.decision, failed.reason) == (
        "collector", "quarantine", cid, "failed", INTERRUPTED_MESSAGE)
    assert counted(second, "actions_interrupted") == 1
    channel = channels(second)
    listed = actions_pb2_grpc.ActionsStub(channel).List(actions_pb2.ListActionsRequest(),
                                                        timeout=5).actions
    assert [(a.action_id, a.status, a.message, a.with_pause) for a in listed] == [
        (response.action_id, actions_pb2.ACTION_STATUS_FAILED, INTERRUPTED_MESSAGE, True)]

    late = connect(channel)  # the agent reconnects and reports what it did
    late.send(action_result=agent_pb2.ActionResult(
        action_id=response.action_id, status=actions_pb2.ACTION_STATUS_DONE,
        message="quarantined and paused", finished_at=wire.to_timestamp(time.time())))
    wait_until(lambda: second.store.get_action(response.action_id).status is ActionStatus.DONE,
               "the late result")
    record = second.store.get_action(response.action_id)
    assert (record.message, record.interrupted) == ("quarantined and paused", False)
    done = second.store.list_audit()[-1]
    assert (done.actor, done.decision, done.reason, done.details["replaces"]) == (
        "node-a", "done", "quarantined and paused", INTERRUPTED_MESSAGE)
    assert counted(second, "actions", type="quarantine", status="done") == 1


def test_actions_list_filters_and_pages_in_the_store(server, channels):
    old = server.store.record_action(container_id=container_id("old"), container_name="old",
                                     node="node-old", type="kill", reason="r",
                                     requested_by="alice", now=1.0)
    with server.store.transaction():  # more than the store's largest page, all newer
        recent = [server.store.record_action(
            container_id=container_id("web"), container_name="web", node="node-a",
            type="pause", reason="r", requested_by="alice", now=100.0 + i // 2).action_id
            for i in range(1100)]
    stub = actions_pb2_grpc.ActionsStub(channels(server))

    def action_ids(**request) -> tuple[list[str], str]:
        page = stub.List(actions_pb2.ListActionsRequest(**request), timeout=5)
        return [a.action_id for a in page.actions], page.next_page_token

    assert action_ids(nodes=["node-old"]) == ([old.action_id], "")
    assert action_ids(containers=["old"]) == ([old.action_id], "")
    assert action_ids(containers=[container_id("old")[:6]],
                      types=[actions_pb2.ACTION_TYPE_KILL]) == ([old.action_id], "")
    assert action_ids(until=wire.to_timestamp(100.0)) == ([old.action_id], "")
    walked, token, pages = [], "", 0
    while True:
        page, token = action_ids(types=[actions_pb2.ACTION_TYPE_PAUSE], page_size=400,
                                 page_token=token)
        walked += page
        pages += 1
        if not token:
            break
    by_time = sorted(recent, key=lambda i: (server.store.get_action(i).created_at, i),
                     reverse=True)
    assert (pages, walked) == (3, by_time)
    err = rpc_error(lambda: stub.List(actions_pb2.ListActionsRequest(page_token="garbage"),
                                      timeout=5))
    assert (err.code(), err.details().startswith("invalid page token")) == (
        CODE.INVALID_ARGUMENT, True)


# -- what an error after the store commit must not cost -------------------------------------------


def test_a_container_without_a_name_is_acted_on_by_policy_and_operators(make_server, channels):
    server = make_server()  # DEFAULT_POLICY: quarantine protect-mode high drift
    channel = channels(server)
    agent = connect(channel)
    unnamed, api = make_alert("unnamed", name=""), make_alert("api", name="api")
    assert unnamed.container.HasField("name") and unnamed.container.name == ""
    agent.send_alerts([unnamed, api], [1, 2])
    commands = [agent.recv_kind("action"), agent.recv_kind("action")]
    assert [c.container_id for c in commands] == [unnamed.container.id, api.container.id]
    assert list(agent.recv_kind("ack").spool_seqs) == [1, 2]
    assert [(a.container_name, a.status) for a in server.store.list_actions()] == [
        ("api", ActionStatus.PENDING), (None, ActionStatus.PENDING)]
    assert counted(server, "batch_errors", stage="policy") == 0
    # a heartbeat listing a container with an empty name: an operator can act on it too
    cid = container_id("nameless")
    agent.send(heartbeat=heartbeat([(cid, "")]))
    wait_for_containers(channel, "node-a", 1)
    future = actions_pb2_grpc.ActionsStub(channel).Request.future(actions_pb2.ActionRequest(
        container=cid[:8], type=actions_pb2.ACTION_TYPE_PAUSE), timeout=5)
    command = agent.recv_kind("action")
    agent.send(action_result=agent_pb2.ActionResult(
        action_id=command.action_id, status=actions_pb2.ACTION_STATUS_DONE,
        finished_at=wire.to_timestamp(time.time())))
    assert future.result().status == actions_pb2.ACTION_STATUS_DONE
    assert server.store.get_action(command.action_id).container_name is None


def test_a_stored_batch_is_acked_when_the_policy_fails_for_one_of_its_alerts(
        make_server, channels, monkeypatch):
    server = make_server()
    bad, good = make_alert("bad", name="web"), make_alert("good", name="api")
    decide = server.engine.decide

    def failing_decide(alert):
        if alert["id"] == bad.id:
            raise RuntimeError("boom")
        return decide(alert)

    monkeypatch.setattr(server.engine, "decide", failing_decide)
    channel = channels(server)
    events = subscribe(channel)
    agent = connect(channel)
    agent.send_alerts([bad, good], [1, 2])
    assert agent.recv_kind("action").container_id == good.container.id
    assert list(agent.recv_kind("ack").spool_seqs) == [1, 2]
    assert ids(take(events, 2)) == [bad.id, good.id]  # both published
    assert server.store.count_alerts() == 2
    assert counted(server, "batch_errors", stage="policy") == 1
    error = server.store.list_audit()[0]
    assert (error.actor, error.action, error.target, error.decision, error.reason,
            error.details) == ("collector", "policy", bad.id, "error", "RuntimeError: boom",
                               {"node": "node-a"})
    agent.send(heartbeat=heartbeat())  # the stream is still up
    wait_for_containers(channel, "node-a", 0)
    assert agent.pending() == []
