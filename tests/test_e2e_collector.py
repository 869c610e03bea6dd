"""End to end on this host: a real `driftwarden collector` process, a real `driftwarden agent
--collector` process, real containers and real gRPC over 127.0.0.1.

Drift found by the agent's probes reaches an operator's live subscription (and only the
subscriptions whose filter matches) and the store; an operator's quarantine goes through the
collector to the agent and really cuts the container's network, and release restores it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from driftwarden.proto.v1 import (
    actions_pb2,
    actions_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    alerts_pb2,
    alerts_pb2_grpc,
    common_pb2,
)

from tests.support.agent_proc import AgentProcess
from tests.support.collector_proc import CollectorProcess
from tests.support.containers import RunningContainer, run_container
from tests.support.e2e import Subscription, read_subscription

pytestmark = pytest.mark.integration

NODE = "node-a"
SLEEPER = ["sh", "-c", "sleep 600"]
# Copies busybox to a path the image never shipped and runs it: drift in every mode (named
# after an applet, so that busybox runs `true` and the exec succeeds).
DROP_AND_RUN = ["sh", "-c", "cp /bin/busybox /tmp/true && /tmp/true"]
PORT = 7000
SERVE = ["sh", "-c", f"nc -ll -p {PORT} -e cat & exec sleep 600"]
CONNECT = ["sh", "-c", f"echo hello | nc -w 2 127.0.0.1 {PORT}"]
# What busybox nc prints when the quarantine programs refuse the connect (EPERM).
CONNECT_DENIED = (1, "nc: can't connect to remote host (127.0.0.1): Operation not permitted\n")


@dataclass
class Stack:
    port: int
    channel: grpc.Channel
    agent: AgentProcess
    collector_log: Path

    def logs(self) -> str:
        return (f"--- collector ---\n{self.collector_log.read_text(errors='replace')}\n"
                f"--- agent ---\n{self.agent.log()}")


@pytest.fixture
def subscribe(stack: Stack) -> Iterator[Callable[[alerts_pb2.AlertFilter], Subscription]]:
    """Opens subscriptions that are registered at the collector when this returns."""
    opened: list[tuple[Subscription, threading.Thread]] = []
    stub = alerts_pb2_grpc.AlertsStub(stack.channel)

    def open_subscription(alert_filter: alerts_pb2.AlertFilter) -> Subscription:
        call = stub.Subscribe(alerts_pb2.SubscribeRequest(filter=alert_filter))
        call.initial_metadata()  # sent once the collector has registered the subscriber
        sub = Subscription(call)
        thread = threading.Thread(target=read_subscription, args=(sub,), daemon=True)
        thread.start()
        opened.append((sub, thread))
        return sub

    yield open_subscription
    for sub, thread in opened:
        sub.call.cancel()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def stack(kernel_ok, docker_ok, tmp_path_factory) -> Iterator[Stack]:
    """Collector and agent processes, shared by the module (the agent's bcc compile is slow)."""
    tmp = tmp_path_factory.mktemp("e2e")
    collector = CollectorProcess(tmp / "c.db", tmp / "collector.log")
    collector.start()
    port = collector.port
    channel = grpc.insecure_channel(collector.address)
    try:
        agent = AgentProcess(tmp / "agent-state", tmp / "alerts.jsonl",
                             extra=["--collector", f"127.0.0.1:{port}", "--node", NODE,
                                    "--window", "1", "--heartbeat", "1"])
        with agent:
            stack = Stack(port, channel, agent, collector.log_path)
            _wait_agent_connected(stack)
            yield stack
    finally:
        channel.close()
        collector.stop()


def _wait_agent_connected(stack: Stack, timeout: float = 20.0) -> None:
    stub = agent_pb2_grpc.AgentsStub(stack.channel)
    deadline = time.monotonic() + timeout
    while True:
        agents = stub.List(agent_pb2.ListAgentsRequest(), timeout=5).agents
        if [(a.node, a.connected) for a in agents] == [(NODE, True)]:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"agent never connected: {agents}\n{stack.logs()}")
        time.sleep(0.2)


def _image_id(c: RunningContainer) -> str:
    c.container.reload()
    return str(c.container.attrs["Image"])


def _is_drift_of(c: RunningContainer) -> Callable[[common_pb2.Alert], bool]:
    return lambda a: a.kind == common_pb2.ALERT_KIND_DRIFT and a.container.id == c.id


def test_drift_reaches_matching_subscribers_and_the_store(stack, subscribe, bb_image):
    everything = subscribe(alerts_pb2.AlertFilter())
    with (run_container(bb_image, SLEEPER, name="e2e") as target,
          run_container(bb_image, SLEEPER, name="e2e-control") as control):
        not_target = subscribe(alerts_pb2.AlertFilter(exclude_containers=[target.name]))
        anomalies = subscribe(alerts_pb2.AlertFilter(kinds=[common_pb2.ALERT_KIND_ANOMALY]))

        code, out = target.exec(DROP_AND_RUN)
        assert code == 0, out
        [alert] = everything.wait_for(_is_drift_of(target), "the target's drift", stack)
        assert alert.reasons[0].code == "exec-added-binary"
        assert alert.container.id == target.id
        assert alert.container.name == target.name
        assert alert.container.node == NODE
        assert alert.container.image.id == _image_id(target)
        assert alert.process.exe == "/tmp/true"

        # The control container's drift is published after the target's: once the filtered
        # subscriber has it, it would also have had the target's, had its filter let it pass.
        code, out = control.exec(DROP_AND_RUN)
        assert code == 0, out
        [control_alert] = not_target.wait_for(_is_drift_of(control), "the control's drift",
                                              stack)
        everything.wait_for(_is_drift_of(control), "the control's drift", stack)
        assert [a.id for a in not_target.alerts() if a.container.id == target.id] == []
        assert {a.kind for a in anomalies.alerts()} <= {common_pb2.ALERT_KIND_ANOMALY}
        assert [a.id for a in anomalies.alerts()
                if a.id in (alert.id, control_alert.id)] == []

        stored = alerts_pb2_grpc.AlertsStub(stack.channel).List(
            alerts_pb2.ListAlertsRequest(
                filter=alerts_pb2.AlertFilter(containers=[target.id],
                                              kinds=[common_pb2.ALERT_KIND_DRIFT])),
            timeout=10).alerts
        assert [a.id for a in stored] == [alert.id]
        assert stored[0].container.node == NODE


def _request(stack: Stack, container: str, action: int) -> actions_pb2.ActionResponse:
    return actions_pb2_grpc.ActionsStub(stack.channel).Request(
        actions_pb2.ActionRequest(container=container, type=action, reason="e2e",
                                  requested_by="e2e-test"),
        timeout=30)


def _request_once_listed(stack: Stack, container: str, action: int,
                         timeout: float = 15.0) -> actions_pb2.ActionResponse:
    """The collector knows a container from the agent's heartbeats (every second here)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _request(stack, container, action)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def _wait_listening(c: RunningContainer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = c.exec(CONNECT)
        if result == (0, "hello\n"):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"echo listener in {c.name} never answered: {result}")
        time.sleep(0.1)


def test_quarantine_and_release_through_the_collector(stack, bb_image):
    with run_container(bb_image, SERVE, name="e2e-q") as c:
        _wait_listening(c)
        try:
            response = _request_once_listed(stack, c.name, actions_pb2.ACTION_TYPE_QUARANTINE)
            assert (response.status, response.container_id, response.node) == (
                actions_pb2.ACTION_STATUS_DONE, c.id, NODE), (response, stack.logs())
            assert c.exec(CONNECT) == CONNECT_DENIED
        finally:
            response = _request(stack, c.name, actions_pb2.ACTION_TYPE_RELEASE)
        assert (response.status, response.container_id) == (
            actions_pb2.ACTION_STATUS_DONE, c.id), response
        assert c.exec(CONNECT) == (0, "hello\n")


def test_action_on_an_unknown_container_is_not_found(stack):
    with pytest.raises(grpc.RpcError) as raised:
        _request(stack, "dwtest-no-such-container", actions_pb2.ACTION_TYPE_QUARANTINE)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND


def test_one_cause_is_one_stored_alert_with_every_reason(stack, subscribe, bb_image):
    """chmod +x of a dropped binary, then its exec, by one shell: one drift incident. The first
    goes out at once, the exec folds into it and goes out at once too (a drift never waits):
    the collector stores one alert with both reasons and a count of 2, and subscribers and the
    JSON lines see the merged alert last."""
    everything = subscribe(alerts_pb2.AlertFilter())
    with run_container(bb_image, SLEEPER, name="e2e-incident") as c:
        code, out = c.exec(["sh", "-c", "mkdir /tmp/dw && cp /bin/busybox /tmp/dw/true && "
                            "chmod +x /tmp/dw/true && /tmp/dw/true"])
        assert code == 0, out
        merged = everything.wait_for(
            lambda a: _is_drift_of(c)(a) and len(a.reasons) == 2, "the merged drift", stack)[0]
        expected = [("chmod-x-new-file", "/tmp/dw/true"), ("exec-added-binary", "/tmp/dw/true")]
        assert [(r.code, _detail(r, "path")) for r in merged.reasons] == expected
        assert (merged.count, merged.severity) == (2, common_pb2.SEVERITY_HIGH)
        stored = alerts_pb2_grpc.AlertsStub(stack.channel).List(
            alerts_pb2.ListAlertsRequest(filter=alerts_pb2.AlertFilter(
                containers=[c.id], kinds=[common_pb2.ALERT_KIND_DRIFT])), timeout=10).alerts
        assert [(a.id, a.count, len(a.reasons)) for a in stored] == [(merged.id, 2, 2)]
        lines = [a for a in stack.agent.alerts() if a["id"] == merged.id]
        assert [len(a["reasons"]) for a in lines] == [1, 2]
        assert [(r["code"], r["details"]["path"]) for r in lines[-1]["reasons"]] == expected


def _detail(reason: common_pb2.Reason, key: str) -> object:
    return next(json.loads(d.value_json) for d in reason.details if d.key == key)
