"""Two collector replicas (in-process CollectorServers) sharing one real PostgreSQL database:
alerts an agent sends to replica A reach subscribers of replica B once and in store order, an
operator's action sent to B reaches the agent streaming to A and its result comes back, one
policy decision per alert across replicas, and replicas that stop leave nothing behind them
(agents of a live replica stay connected, its pending actions are not failed)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import pytest
from driftwarden.collector.policy import parse_policy
from driftwarden.collector.server import CollectorConfig, CollectorServer
from driftwarden.core import wire
from driftwarden.proto.v1 import (
    actions_pb2,
    actions_pb2_grpc,
    agent_pb2,
)

from tests.support.collector_proc import LISTENING
from tests.support.fake_agent import FakeAgent, container_id, heartbeat, hello, make_alert
from tests.support.processes import FAULTHANDLER_ENV
from tests.support.scenario import wait_until
from tests.support.subscriber import alert_events, subscribe

NO_RULES = parse_policy("version: 1\n")
QUARANTINE_DRIFT = parse_policy(
    "version: 1\nrules:\n  - name: quarantine-drift\n    match: {kinds: [drift]}\n"
    "    action: quarantine\n")
DONE = actions_pb2.ACTION_STATUS_DONE
FAILED = actions_pb2.ACTION_STATUS_FAILED
PENDING = actions_pb2.ACTION_STATUS_PENDING
SKIPPED = actions_pb2.ACTION_STATUS_SKIPPED


@pytest.fixture
def replicas(postgres):
    """replicas(n, **config) -> n started collectors on one fresh database (stopped before
    it is dropped)."""
    started: list[CollectorServer] = []
    with postgres.database() as url:
        def start(n: int = 2, **overrides) -> list[CollectorServer]:
            settings = {"db_path": None, "store_url": url, "listen": "127.0.0.1:0",
                        "stop_grace": 0.5, "poll_seconds": 0.05, "policy": NO_RULES,
                        **overrides}
            servers = [CollectorServer(CollectorConfig(**settings)).start() for _ in range(n)]
            started.extend(servers)
            return servers

        try:
            yield start
        finally:
            for server in started:
                server.stop(0.5)


def alerts_of(call, n: int) -> list[tuple[str, int, str]]:
    """The next `n` alerts of a stream as (id, count, resume token of its event)."""
    out: list[tuple[str, int, str]] = []
    while len(out) < n:
        for alerts, token in alert_events(call, 1):
            out.extend((a.id, a.count, token) for a in alerts)
    return out


def connect(channel: grpc.Channel, node: str) -> FakeAgent:
    agent = FakeAgent(channel)
    agent.send(hello=hello(node))
    return agent


def test_a_subscriber_on_either_replica_sees_every_alert_once_in_store_order(replicas,
                                                                            channels):
    a, b = replicas(2)
    sub_a, _ = subscribe(channels(a))
    sub_b, start = subscribe(channels(b))
    assert start == "0"
    agent_a = connect(channels(a), "node-a")
    agent_b = connect(channels(b), "node-b")
    sent = []
    for round_ in range(3):  # interleaved batches of both replicas
        for agent, node in ((agent_a, "node-a"), (agent_b, "node-b")):
            batch = [make_alert(f"{node}-{round_}-{i}", name=f"web-{node}") for i in range(4)]
            agent.send_alerts(batch)
            agent.recv_kind("ack")
            sent.extend(a.id for a in batch)
    # a repeat with a later last_seen is a change too (an UPDATED alert, its new count)
    repeat = make_alert("node-a-0-0", name="web-node-a", count=2,
                        last_seen=1_700_000_000.0 + 5)
    agent_a.send_alerts([repeat])
    agent_a.recv_kind("ack")
    expected = [(alert_id, 1) for alert_id in sent] + [(repeat.id, 3)]
    got_b = alerts_of(sub_b, len(expected))
    got_a = alerts_of(sub_a, len(expected))
    assert [(i, c) for i, c, _ in got_b] == expected
    assert got_a == got_b  # the same store order, the same tokens, on both replicas
    assert [int(t) for _, _, t in got_b] == list(range(1, len(expected) + 1))
    # nothing twice: the next alert is the next event on both
    agent_b.send_alerts([make_alert("marker", name="web-node-b")])
    agent_b.recv_kind("ack")
    assert alerts_of(sub_b, 1)[0][:2] == (make_alert("marker").id, 1)
    assert alerts_of(sub_a, 1)[0][:2] == (make_alert("marker").id, 1)
    for agent in (agent_a, agent_b):
        agent.close()


def test_an_action_requested_on_b_reaches_the_agent_on_a_and_its_result_returns(
        replicas, channels):
    a, b = replicas(2, action_timeout=20.0)
    watch_b, _ = subscribe(channels(b), include_actions=True)
    agent = connect(channels(a), "node-a")
    web, db = container_id("web"), container_id("db")
    agent.send(heartbeat=heartbeat([(web, "web"), (db, "db")]))
    agent.send_alerts([make_alert("drift-1", name="web")])
    agent.recv_kind("ack")  # B knows the container from the store
    answers: dict[str, actions_pb2.ActionResponse] = {}
    stub_b = actions_pb2_grpc.ActionsStub(channels(b))

    def request() -> None:
        answers["quarantine"] = stub_b.Request(actions_pb2.ActionRequest(
            container="web", type=actions_pb2.ACTION_TYPE_QUARANTINE, reason="looks bad",
            requested_by="alice"), timeout=30)

    caller = threading.Thread(target=request)
    caller.start()
    command = agent.recv_kind("action", timeout=15)
    assert (command.container_id, command.type, command.reason) == (
        web, actions_pb2.ACTION_TYPE_QUARANTINE, "looks bad")
    agent.send(action_result=agent_pb2.ActionResult(
        action_id=command.action_id, status=DONE, message="network cut",
        finished_at=wire.to_timestamp(time.time())))
    caller.join(30)
    answer = answers["quarantine"]
    assert (answer.action_id, answer.status, answer.message, answer.node) == (
        command.action_id, DONE, "network cut", "node-a")
    assert agent.pending() == []  # sent once
    # B's subscriber: the alert, then the action as A sent it and as the agent answered
    assert events_of(watch_b, 3) == [
        ("alert", make_alert("drift-1").id, 1), ("action", command.action_id, PENDING),
        ("action", command.action_id, DONE)]
    record = b.store.get_action(command.action_id)
    assert (record.status.value, record.requested_by) == ("done", "operator:alice")
    # a container only A's heartbeats list (no alert yet) is known on B too (the stream's
    # heartbeat was taken in before the alert batch acked above)
    assert b.store.find_container("db").container_id == db
    caller = threading.Thread(target=lambda: answers.update(pause=stub_b.Request(
        actions_pb2.ActionRequest(container="db", type=actions_pb2.ACTION_TYPE_PAUSE,
                                  reason="r"), timeout=30)))
    caller.start()
    command = agent.recv_kind("action", timeout=15)
    assert (command.container_id, command.type) == (db, actions_pb2.ACTION_TYPE_PAUSE)
    agent.send(action_result=agent_pb2.ActionResult(
        action_id=command.action_id, status=DONE, finished_at=wire.to_timestamp(time.time())))
    caller.join(30)
    assert (answers["pause"].action_id, answers["pause"].status) == (command.action_id, DONE)
    # the agent goes away: a node no replica holds fails at once, as with one collector
    agent.close()
    wait_until(lambda: not b.store.get_agent("node-a").connected, 10, "node-a disconnected")
    answer = stub_b.Request(actions_pb2.ActionRequest(
        container="web", type=actions_pb2.ACTION_TYPE_KILL, reason="r"), timeout=10)
    assert (answer.status, answer.message) == (FAILED, "agent for node node-a is not connected")


def start_process(url: str, log_path) -> tuple[subprocess.Popen, str]:
    """`driftwarden collector --store URL` as a process of its own; (process, address)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "driftwarden", "collector", "--store", url,
             "--listen", "127.0.0.1:0"], stdout=log,
            stderr=subprocess.STDOUT, cwd="/", env={**os.environ, **FAULTHANDLER_ENV})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        found = LISTENING.search(log_path.read_text(errors="replace"))
        if found:
            return proc, f"127.0.0.1:{found.group(1)}"
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the collector did not start:\n{log_path.read_text(errors='replace')}")


@pytest.fixture
def killable(postgres, tmp_path):
    """Replica A as a process of its own (to SIGKILL: (process, address)) and replica B in
    this one, on a fresh database."""
    with postgres.database() as url:
        proc, address = start_process(url, tmp_path / "a.log")
        b = CollectorServer(CollectorConfig(db_path=None, store_url=url, listen="127.0.0.1:0",
                                            stop_grace=0.5, policy=NO_RULES)).start()
        try:
            yield proc, address, b
        finally:
            b.stop(0.5)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def test_a_node_held_by_a_replica_killed_with_sigkill_is_not_connected(killable, channels):
    proc, address, b = killable
    agent = connect(channels(address), "node-a")
    # in monitor mode: the default policy stays quiet
    agent.send_alerts([make_alert("drift-1", name="web", mode="monitor")])
    agent.recv_kind("ack")
    holder = b.store.get_agent("node-a").replica
    assert holder in b.store.live_replicas() - {b.store.replica_id}
    proc.kill()  # no goodbye: its agent's row still says connected, held by it
    proc.wait(10)
    wait_until(lambda: holder not in b.store.live_replicas(), 10, "A's connections gone")
    assert b.store.get_agent("node-a").connected
    answer = actions_pb2_grpc.ActionsStub(channels(b)).Request(
        actions_pb2.ActionRequest(container="web", type=actions_pb2.ACTION_TYPE_KILL,
                                  reason="r"), timeout=10)
    assert (answer.status, answer.message) == (
        FAILED, "agent for node node-a is not connected")


def test_a_replica_starting_leaves_the_agents_and_actions_of_live_replicas_alone(
        replicas, channels, postgres):
    a, = replicas(1)
    agent = connect(channels(a), "node-a")
    agent.send_alerts([make_alert("drift-1", name="web")])
    agent.recv_kind("ack")
    pending = a.store.record_action(container_id=container_id("web"), node="node-a",
                                    type="kill", reason="r", requested_by="alice")
    b, = replicas(1)  # its start marks stale agents disconnected and fails stale actions
    assert b.store.get_agent("node-a").connected
    assert b.store.get_action(pending.action_id).status.value == "pending"
    agent.close()


def events_of(call, n: int) -> list[tuple[str, str, int]]:
    """The next `n` events as (kind, alert or action id, count or action status)."""
    out = []
    for _ in range(n):
        event = next(call)
        kind = event.WhichOneof("event")
        out.append((kind, event.alert.id, event.alert.count) if kind == "alert"
                   else (kind, event.action.action_id, event.action.status))
    return out


def test_one_policy_decision_per_alert_across_replicas(replicas, channels):
    a, b = replicas(2, policy=QUARANTINE_DRIFT)
    watch_b, _ = subscribe(channels(b), include_actions=True)
    agent = connect(channels(a), "node-a")
    drift = make_alert("drift-1", name="web")
    agent.send_alerts([drift])
    command = agent.recv_kind("action")
    agent.recv_kind("ack")
    agent.send(action_result=agent_pb2.ActionResult(
        action_id=command.action_id, status=DONE, finished_at=wire.to_timestamp(time.time())))
    wait_until(lambda: a.store.get_action(command.action_id).finished, 10, "the result")
    # a subscriber on B sees A's alert, then A's action as it went
    assert events_of(watch_b, 3) == [
        ("alert", drift.id, 1), ("action", command.action_id, PENDING),
        ("action", command.action_id, DONE)]
    agent.close()
    # the agent fails over to B and replays the alert, folded with a later repeat: B's policy
    # (which never saw the container) matches it again, and the store says it was decided
    moved = connect(channels(b), "node-a")
    moved.send_alerts([make_alert("drift-1", name="web", count=2,
                                  last_seen=1_700_000_000.0 + 9)])
    moved.recv_kind("ack")
    assert moved.pending() == []  # no second quarantine
    actions = b.store.list_actions(alert_id=drift.id)
    assert sorted((r.status.value, r.requested_by) for r in actions) == [
        ("done", "policy"), ("skipped", "policy")]
    skipped = next(r for r in actions if r.status.value == "skipped")
    assert events_of(watch_b, 2) == [("alert", drift.id, 3),
                                     ("action", skipped.action_id, SKIPPED)]
    assert skipped.message == (f"already decided: an earlier quarantine decision on alert "
                               f"{drift.id} (the store keeps one per alert)")
    # the same replay with the same last_seen is a duplicate: not decided at all
    moved.send_alerts([make_alert("drift-1", name="web", count=2,
                                  last_seen=1_700_000_000.0 + 9)])
    moved.recv_kind("ack")
    assert len(b.store.list_actions(alert_id=drift.id)) == 2
    moved.close()


def test_the_cooldown_holds_across_replicas(replicas, channels):
    """A quarantines a container for one drift alert; its agent fails over to B and sends
    another drift alert of the same container. B's engine never acted on it, but the store
    says A did: B skips it for the cooldown instead of quarantining again."""
    a, b = replicas(2, policy=QUARANTINE_DRIFT)
    agent = connect(channels(a), "node-a")
    agent.send_alerts([make_alert("drift-1", name="web")])
    command = agent.recv_kind("action")
    agent.recv_kind("ack")
    agent.send(action_result=agent_pb2.ActionResult(
        action_id=command.action_id, status=DONE, finished_at=wire.to_timestamp(time.time())))
    wait_until(lambda: a.store.get_action(command.action_id).finished, 10, "the result")
    agent.close()
    moved = connect(channels(b), "node-a")
    second = make_alert("drift-2", name="web", when=1_700_000_000.0 + 30)
    moved.send_alerts([second])
    moved.recv_kind("ack")
    assert moved.pending() == []  # no second quarantine
    [skipped] = b.store.list_actions(alert_id=second.id)
    assert (skipped.status.value, skipped.requested_by) == ("skipped", "policy")
    assert skipped.message.startswith(
        f"cooldown: container {second.container.id[:12]} (web) acted on (quarantine) ")
    assert "by another collector replica or before a restart (cooldown 600 s)" in skipped.message
    moved.close()


def test_a_subscriber_of_a_replica_killed_during_a_burst_resumes_on_another_exactly_once(
        killable, channels):
    proc, address, b = killable
    call, _ = subscribe(channels(address))
    got: list[tuple[str, str]] = []
    burst = [make_alert(f"burst-{i}", name="web", mode="monitor") for i in range(80)]

    def send_burst() -> None:  # to B, one alert a batch, each acked before the next
        agent = connect(channels(b), "node-b")
        for alert in burst:
            agent.send_alerts([alert])
            agent.recv_kind("ack")
        agent.close()

    sender = threading.Thread(target=send_burst)
    sender.start()
    while len(got) < 20:
        got.extend((a.id, token) for alerts, token in alert_events(call, 1)
                   for a in alerts)
    proc.kill()  # mid-burst, no goodbye
    proc.wait(10)
    with pytest.raises(grpc.RpcError) as info:
        while True:
            got.extend((a.id, token) for alerts, token in alert_events(call, 1)
                       for a in alerts)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    resumed, _ = subscribe(channels(b), resume_after=got[-1][1])
    while len(got) < len(burst):
        got.extend((a.id, token) for alerts, token in alert_events(resumed, 1)
                   for a in alerts)
    sender.join(30)
    assert [alert_id for alert_id, _ in got] == [a.id for a in burst]
    assert [int(t) for _, t in got] == list(range(1, len(burst) + 1))
