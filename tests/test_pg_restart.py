"""End to end on this host: PostgreSQL restarted under load.

Two real collector processes share a database of a PostgreSQL server of this test's own (the
session's server is shared, so never stopped); a real `driftwarden agent --collector A,B` watches
a real container that raises a burst of drift alerts. The server is stopped (`pg_ctl stop -m
fast`: every connection cut) in the middle of the burst:

- both collectors report it: their gRPC health says NOT_SERVING, for the whole server and each
  service, until the store is back;
- the agent keeps spooling: every drift raised while the store is down waits in its spool;
- once the server is started again both collectors say SERVING, the spool drains, and every
  alert the agent raised is in the store exactly once, with the count the agent gave it.
"""

from __future__ import annotations

import contextlib
import threading
import uuid

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import running_test_postgres
from tests.support.collector_proc import CollectorProcess
from tests.support.containers import run_container
from tests.support.e2e import wait_until
from tests.test_agent_failover import (
    LABEL,
    NO_RULES_POLICY,
    SLEEPER,
    Stack,
    burst,
    drift_paths,
    local_counts,
    start_agent,
    stored,
)

pytestmark = pytest.mark.integration

BURST = 40  # drift alerts in the burst the store goes down in
HALT_AFTER = 8  # ... once the store holds this many of them
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICES = ("", "driftwarden.v1.AgentChannel", "driftwarden.v1.Alerts")


@pytest.fixture
def own_postgres():
    """A PostgreSQL server this test may stop and start (tests/support/postgres.py)."""
    with running_test_postgres() as server:
        yield server


def health(stack: Stack) -> list[list[int]]:
    """Each collector's health status for each of SERVICES."""
    out = []
    for collector in stack.collectors:
        stub = health_pb2_grpc.HealthStub(stack.channel(collector))
        out.append([stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                    for name in SERVICES])
    return out


def every(status: int, stack: Stack) -> list[list[int]]:
    return [[status] * len(SERVICES)] * len(stack.collectors)


def spool_depth(stack: Stack) -> float | None:
    return stack.metric("driftwarden_agent_spool_depth")


@pytest.mark.timeout(480)
def test_postgres_restarted_during_a_burst_the_agent_spools_and_nothing_is_lost(
        own_postgres, kernel_ok, docker_ok, bb_image, tmp_path):
    label = uuid.uuid4().hex[:12]
    policy = tmp_path / "policy.yaml"
    policy.write_text(NO_RULES_POLICY)
    with own_postgres.database() as url, contextlib.ExitStack() as on_exit:
        collectors = [CollectorProcess(url, tmp_path / f"collector-{i}.log",
                                       ["--policy", str(policy)]) for i in range(2)]
        for collector in collectors:
            collector.start()
            on_exit.callback(collector.stop)
        stack = start_agent(url, collectors, [c.address for c in collectors], label, tmp_path,
                            on_exit)
        a, b = collectors
        with run_container(bb_image, SLEEPER, name="pg-restart", labels={LABEL: label}) as c:
            wait_until(lambda: stack.connected_to() == {a.address: 1.0, b.address: 0.0},
                       "the agent to stream to A", stack, timeout=45)
            assert health(stack) == every(SERVING, stack)
            result: list[tuple[int, str]] = []
            runner = threading.Thread(target=lambda: result.append(burst(c, "p", BURST)))
            runner.start()
            try:
                wait_until(lambda: len(stored(url, c.id)) >= HALT_AFTER,
                           f"{HALT_AFTER} alerts of the burst in the store", stack,
                           interval=0.02)
                stored_before_halt = len(stored(url, c.id))
                on_exit.callback(lambda: own_postgres.resume() if down else None)
                down = True
                own_postgres.halt()
            finally:
                runner.join(120)
            assert result == [(0, "")], result
            assert stored_before_halt < BURST, "the burst ended before the store went down"

            # both collectors say so, for the server and for each service
            wait_until(lambda: health(stack) == every(NOT_SERVING, stack),
                       "both collectors to report NOT_SERVING", stack, timeout=30)

            # a drift raised after the burst: once the agent has it, it has judged every exec
            # of the burst (one ring buffer, read in order)
            assert burst(c, "down", 1) == (0, "")
            wait_until(lambda: "/tmp/down1/true" in drift_paths(stack, c),
                       "the agent to raise the drift after the burst", stack, timeout=60)
            held = wait_until(lambda: spool_depth(stack), "the drift in the agent's spool", stack)
            assert held >= 1
            # the store is down: nothing leaves the spool, each new alert waits in it
            assert burst(c, "down", 2) == (0, "")
            wait_until(lambda: "/tmp/down2/true" in drift_paths(stack, c),
                       "the agent to raise a drift while the store is down", stack, timeout=60)
            wait_until(lambda: spool_depth(stack) == held + 1,
                       f"the agent's spool to hold {held + 1} alerts", stack)
            assert health(stack) == every(NOT_SERVING, stack)

            own_postgres.resume()
            down = False
            wait_until(lambda: health(stack) == every(SERVING, stack),
                       "both collectors to report SERVING again", stack, timeout=30)
            wait_until(lambda: spool_depth(stack) == 0, "the agent's spool to drain", stack,
                       timeout=120)

            # every alert the agent raised: in the store once, with the count it gave it
            paths = drift_paths(stack, c)
            assert {"/tmp/down1/true", "/tmp/down2/true"} <= set(paths)
            assert set(paths) <= {f"/tmp/p{i}/true" for i in range(1, BURST + 1)} | {
                "/tmp/down1/true", "/tmp/down2/true"}
            local = local_counts(stack, c)
            assert set(paths.values()) <= set(local)
            rows = stored(url, c.id)
            assert {i: n for i, (n, _) in rows.items()} == dict.fromkeys(local, 1)
            assert {i: count for i, (_, count) in rows.items()} == local
            assert stack.metric("driftwarden_agent_collector_connected") == 1

            # and what is raised after the restart is stored once too
            assert burst(c, "up", 2) == (0, "")
            wait_until(lambda: {"/tmp/up1/true", "/tmp/up2/true"} <= set(drift_paths(stack, c)),
                       "the drift raised after the restart", stack, timeout=30)
            wait_until(lambda: {i: count for i, (_, count) in stored(url, c.id).items()}
                       == local_counts(stack, c), "the store to hold what the agent raised",
                       stack, timeout=60)
        for collector in collectors:
            assert "is unreachable: health NOT_SERVING" in collector.log(), collector.log()
            assert "is reachable again: health SERVING" in collector.log(), collector.log()
