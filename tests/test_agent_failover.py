"""End to end on this host: one agent, two collector replicas sharing a real PostgreSQL, a real
container raising drift, real gRPC over 127.0.0.1.

`driftwarden agent --collector A,B`: collector A is SIGKILLed in the middle of a burst of drift
alerts; the agent fails over to B, replays what A had not acknowledged, and every alert the agent
raised is in the shared store exactly once with the count the agent gave it. Heartbeats, fleet
baseline requests and actions keep working on B. An agent given an address where nothing listens
and a live collector streams to the live one. A replica that hangs (SIGSTOP: its kernel still
acknowledges TCP) is left for the next one by the stream's keepalive pings.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from driftwarden.proto.v1 import actions_pb2, actions_pb2_grpc, agent_pb2, agent_pb2_grpc

from tests.support.agent_proc import AgentProcess
from tests.support.collector_proc import LISTENING
from tests.support.containers import RunningContainer, run_container
from tests.support.e2e import wait_until
from tests.support.processes import FAULTHANDLER_ENV, terminate

pytestmark = pytest.mark.integration

NODE = "node-a"
LABEL = "driftwarden.test/failover"
SLEEPER = ["sh", "-c", "sleep 600"]
BURST = 60  # drift alerts in the burst A dies in
KILL_AFTER = 10  # ... once the store holds this many of them
METRICS_AT = re.compile(r"driftwarden: metrics at (http://\S+)")
NO_RULES_POLICY = "version: 1\n"  # no actions by policy: these tests are about delivery


class StoreCollector:
    """`driftwarden collector --store postgresql://...` as a process on a free loopback port."""

    def __init__(self, url: str, log_path: Path, policy: Path) -> None:
        self.url = url
        self.log_path = log_path
        self.policy = policy
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> StoreCollector:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "driftwarden", "collector", "--store", self.url,
                 "--listen", "127.0.0.1:0", "--policy", str(self.policy)],
                stdout=log, stderr=subprocess.STDOUT, cwd="/",
                env={**os.environ, **FAULTHANDLER_ENV})
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log())
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"collector did not start:\n{self.log()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        terminate(self.proc, 20.0, "collector", self.log)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@dataclass
class Stack:
    url: str
    collectors: list[StoreCollector]
    agent: AgentProcess
    channels: dict[str, grpc.Channel] = field(default_factory=dict)

    def logs(self) -> str:
        parts = [f"--- collector {c.address} ---\n{c.log()}" for c in self.collectors]
        try:
            metrics = "\n".join(f"{n} {lab} {v}" for n, lab, v in self.metrics()
                                if "collector" in n or "spool" in n or "alerts" in n)
        except Exception as exc:  # a failing test still shows the logs
            metrics = f"(no metrics: {exc})"
        alerts = [(a["kind"], a["process"]["exe"], a["count"]) for a in self.agent.alerts()]
        return "\n".join([*parts, f"--- agent ---\n{self.agent.log()}",
                          f"--- agent metrics ---\n{metrics}",
                          f"--- agent alerts ({len(alerts)}) ---\n{alerts}"])

    def channel(self, collector: StoreCollector) -> grpc.Channel:
        if collector.address not in self.channels:
            self.channels[collector.address] = grpc.insecure_channel(collector.address)
        return self.channels[collector.address]

    def agents(self, collector: StoreCollector) -> list[tuple[str, bool]]:
        try:
            listed = agent_pb2_grpc.AgentsStub(self.channel(collector)).List(
                agent_pb2.ListAgentsRequest(), timeout=5).agents
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            return []
        return [(a.node, a.connected) for a in listed]

    def metrics(self) -> list[tuple[str, dict[str, str], float]]:
        """The agent's samples: (name, labels, value)."""
        from prometheus_client.parser import text_string_to_metric_families

        match = METRICS_AT.search(self.agent.log())
        assert match, f"the agent did not say where its metrics are:\n{self.agent.log()}"
        with urllib.request.urlopen(match.group(1), timeout=5) as response:
            text = response.read().decode()
        return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text)
                for s in f.samples]

    def metric(self, name: str, **labels: str) -> float | None:
        found = [v for n, lab, v in self.metrics() if n == name and lab == labels]
        return found[0] if found else None

    def connected_to(self) -> dict[str, float]:
        return {lab["address"]: v for n, lab, v in self.metrics()
                if n == "driftwarden_agent_collector_address_connected"}

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()


@pytest.fixture
def stack_factory(kernel_ok, docker_ok, postgres, tmp_path) -> Iterator[Any]:
    """Starts collectors on one fresh database and then the agent with the addresses given."""
    with postgres.database() as url, contextlib.ExitStack() as on_exit:
        policy = tmp_path / "policy.yaml"
        policy.write_text(NO_RULES_POLICY)

        def make(count: int, addresses: Callable[[list[StoreCollector]], list[str]],
                 label: str) -> Stack:
            collectors = [StoreCollector(url, tmp_path / f"collector-{i}.log", policy).start()
                          for i in range(count)]
            for c in collectors:
                on_exit.callback(c.stop)
            return start_agent(url, collectors, addresses(collectors), label, tmp_path,
                               on_exit)

        yield make


def start_agent(url: str, collectors: list[Any], addresses: list[str], label: str,
                tmp_path: Path, on_exit: contextlib.ExitStack) -> Stack:
    """The agent (node NODE, containers labelled LABEL=label) streaming to `addresses`, as a
    Stack with `collectors` (processes with ``address`` and ``log()``); `on_exit` stops it."""
    agent = AgentProcess(tmp_path / "agent-state", tmp_path / "alerts.jsonl", extra=[
        "--collector", ",".join(addresses), "--node", NODE,
        "--only-label", f"{LABEL}={label}", "--window", "1", "--heartbeat", "1",
        "--incident-window", "0", "--budget", "off", "--metrics", "127.0.0.1:0"])
    stack = Stack(url, collectors, agent)
    on_exit.callback(stack.close)
    agent.start()
    on_exit.callback(agent.stop)
    return stack


def stored(url: str, container_id: str) -> dict[str, tuple[int, int]]:
    """Alert id -> (rows with that id, its stored count), for one container's alerts."""
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT id, count(*), max(count) FROM alerts "
                            "WHERE container_id = %s GROUP BY id", [container_id]).fetchall()
    return {alert_id: (int(rows_), int(count)) for alert_id, rows_, count in rows}


def local_counts(stack: Stack, c: RunningContainer) -> dict[str, int]:
    """Alert id -> occurrences, from the agent's own alerts file: the alerts it spooled."""
    counts: collections.Counter[str] = collections.Counter()
    for a in stack.agent.alerts():
        if a["container"]["id"] == c.id:
            counts[a["id"]] += a["count"]
    return dict(counts)


def drift_paths(stack: Stack, c: RunningContainer) -> dict[str, str]:
    """Exe path -> alert id of the container's drift alerts in the agent's alerts file."""
    return {a["process"]["exe"]: a["id"] for a in stack.agent.alerts()
            if a["container"]["id"] == c.id and a["kind"] == "drift"}


def burst(c: RunningContainer, tag: str, count: int) -> tuple[int, str]:
    """`count` executables the image never shipped, each copied and run: a drift each."""
    script = (f"for i in $(seq 1 {count}); do mkdir -p /tmp/{tag}$i && "
              f"cp /bin/busybox /tmp/{tag}$i/true && /tmp/{tag}$i/true || exit 1; done")
    return c.exec(["sh", "-c", script])


def request_once_listed(stack: Stack, collector: StoreCollector, c: RunningContainer,
                        action: int) -> actions_pb2.ActionResponse:
    """Actions.Request on `collector`; the container is known once a heartbeat listed it."""

    def attempt() -> actions_pb2.ActionResponse | None:
        try:
            return actions_pb2_grpc.ActionsStub(stack.channel(collector)).Request(
                actions_pb2.ActionRequest(container=c.id, type=action, reason="failover test",
                                          requested_by="e2e-test"), timeout=30)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None

    return wait_until(attempt, "the container to be listed by a heartbeat", stack)


def test_collector_a_killed_during_a_burst_the_agent_fails_over_to_b_and_nothing_is_lost(
        stack_factory, bb_image):
    label = uuid.uuid4().hex[:12]
    stack = stack_factory(2, lambda cs: [c.address for c in cs], label)
    a, b = stack.collectors
    with run_container(bb_image, SLEEPER, name="failover", labels={LABEL: label}) as c:
        wait_until(lambda: stack.connected_to() == {a.address: 1.0, b.address: 0.0},
                   "the agent to stream to A, the first address", stack, timeout=45)
        requests_before = stack.metric("driftwarden_agent_baseline_messages_total",
                                       kind="request")
        result: list[tuple[int, str]] = []
        runner = threading.Thread(target=lambda: result.append(burst(c, "a", BURST)))
        runner.start()
        try:
            # A dies with part of the burst stored and the rest still to come or in flight
            wait_until(lambda: len(stored(stack.url, c.id)) >= KILL_AFTER,
                       f"{KILL_AFTER} alerts of the burst in the store", stack, interval=0.02)
            a.kill()
            stored_at_kill = len(stored(stack.url, c.id))
        finally:
            runner.join(120)
        assert result == [(0, "")], result
        assert stored_at_kill < BURST, "the burst ended before A was killed"

        # A drift raised after the burst: once the agent has it, it has judged every exec
        # of the burst before it (one ring buffer, read in order).
        assert burst(c, "end", 1) == (0, "")
        wait_until(lambda: "/tmp/end1/true" in drift_paths(stack, c),
                   "the agent to raise the drift after the burst", stack, timeout=60)
        paths = drift_paths(stack, c)
        assert len(paths) > stored_at_kill, "no alert of the burst was raised after the kill"
        assert set(paths) <= {f"/tmp/a{i}/true" for i in range(1, BURST + 1)} | {
            "/tmp/end1/true"}
        wait_until(lambda: stack.connected_to() == {a.address: 0.0, b.address: 1.0},
                   "the agent to stream to B", stack, timeout=30)
        wait_until(lambda: stack.metric("driftwarden_agent_spool_depth") == 0,
                   "the agent's spool to drain on B", stack, timeout=60)

        # every alert the agent raised: in the store once, with the count the agent gave it
        local = local_counts(stack, c)
        rows = stored(stack.url, c.id)
        assert set(paths.values()) <= set(local)
        assert {i: n for i, (n, _) in rows.items()} == dict.fromkeys(local, 1)
        assert {i: count for i, (_, count) in rows.items()} == local
        assert stack.metric("driftwarden_agent_collector_failovers_total") >= 1
        assert stack.metric("driftwarden_agent_collector_connected") == 1
        log = stack.agent.log()
        assert re.search(rf"collector {re.escape(a.address)}: UNAVAILABLE: .*alerts stay in the "
                         rf"spool \(\d+ pending\) and the agent keeps redialing; trying "
                         rf"{re.escape(b.address)} next", log), log
        assert re.search(rf"collector {re.escape(b.address)}: connected again after [0-9.]+ s "
                         rf"\(collector 2 of 2\)", log), log

        # what follows the collector follows the agent to B: heartbeats (B lists the node as
        # connected), fleet baseline requests (asked again on the new stream) and actions
        wait_until(lambda: (NODE, True) in stack.agents(b), "B to list the agent connected",
                   stack)
        assert stack.metric("driftwarden_agent_baseline_messages_total",
                            kind="request") > requests_before
        paused = request_once_listed(stack, b, c, actions_pb2.ACTION_TYPE_PAUSE)
        assert (paused.status, paused.container_id, paused.node) == (
            actions_pb2.ACTION_STATUS_DONE, c.id, NODE), (paused, stack.logs())
        c.container.reload()
        assert c.container.status == "paused"
        resumed = request_once_listed(stack, b, c, actions_pb2.ACTION_TYPE_RESUME)
        assert resumed.status == actions_pb2.ACTION_STATUS_DONE, (resumed, stack.logs())

        # and drift raised after the failover is stored once too
        assert burst(c, "b", 3) == (0, "")
        wait_until(lambda: {f"/tmp/b{i}/true" for i in (1, 2, 3)} <= set(drift_paths(stack, c)),
                   "the drift raised on B", stack, timeout=30)
        wait_until(lambda: {i: count for i, (_, count) in stored(stack.url, c.id).items()}
                   == local_counts(stack, c), "the store to hold what the agent raised", stack,
                   timeout=30)


def test_an_unreachable_address_is_skipped_for_the_reachable_collector(stack_factory,
                                                                       bb_image):
    with contextlib.closing(socket.socket()) as bound:
        bound.bind(("127.0.0.1", 0))  # bound and not listening: connections are refused
        nobody = bound.getsockname()[1]
        label = uuid.uuid4().hex[:12]
        unreachable = f"127.0.0.1:{nobody}"
        stack = stack_factory(1, lambda cs: [unreachable, cs[0].address], label)
        [b] = stack.collectors
        with run_container(bb_image, SLEEPER, name="failover-skip", labels={LABEL: label}) as c:
            wait_until(lambda: stack.connected_to() == {unreachable: 0.0, b.address: 1.0},
                       "the agent to stream to the reachable collector", stack, timeout=45)
            assert burst(c, "x", 2) == (0, "")
            wait_until(lambda: len(stored(stack.url, c.id)) >= 2, "the drift in the store",
                       stack, timeout=30)
            wait_until(lambda: {i: count for i, (_, count) in stored(stack.url, c.id).items()}
                       == local_counts(stack, c), "the store to hold what the agent raised",
                       stack, timeout=30)
            assert (NODE, True) in stack.agents(b)
            assert stack.metric("driftwarden_agent_collector_failovers_total") >= 1
        assert re.search(rf"collector {re.escape(unreachable)}: UNAVAILABLE: .*trying "
                         rf"{re.escape(b.address)} next", stack.agent.log()), stack.agent.log()


def test_a_hung_collector_is_left_for_the_next_by_keepalive(stack_factory, bb_image):
    """Replica A stops (SIGSTOP) with the agent's stream open and no alert in flight: its
    kernel still acknowledges every TCP segment, so only the stream's HTTP/2 keepalive pings
    (unanswered) tell the agent A is gone."""
    label = uuid.uuid4().hex[:12]
    stack = stack_factory(2, lambda cs: [c.address for c in cs], label)
    a, b = stack.collectors
    with run_container(bb_image, SLEEPER, name="failover-hung", labels={LABEL: label}) as c:
        wait_until(lambda: stack.connected_to() == {a.address: 1.0, b.address: 0.0},
                   "the agent to stream to A", stack, timeout=45)
        wait_until(lambda: stack.metric("driftwarden_agent_spool_depth") == 0,
                   "nothing in flight", stack)
        a.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: stack.connected_to() == {a.address: 0.0, b.address: 1.0},
                       "the agent to leave the hung A for B", stack, timeout=90)
            assert burst(c, "h", 1) == (0, "")
            wait_until(lambda: "/tmp/h1/true" in drift_paths(stack, c), "the drift", stack,
                       timeout=30)
            wait_until(lambda: {i: count for i, (_, count) in stored(stack.url, c.id).items()}
                       == local_counts(stack, c), "the store to hold what the agent raised",
                       stack, timeout=30)
        finally:
            a.proc.send_signal(signal.SIGCONT)
    assert re.search(rf"collector {re.escape(a.address)}: UNAVAILABLE: .*trying "
                     rf"{re.escape(b.address)} next", stack.agent.log()), stack.agent.log()
