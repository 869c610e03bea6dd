"""End to end on this host: bad input against a real `driftwarden collector` process over real
gRPC on 127.0.0.1, checked in its real SQLite file.

Malformed and oversize messages, an unknown container, a wrong operator token, plaintext
against a TLS collector, certificates of a foreign CA, and an agent acting for another node:
each is rejected with a clear status (or, inside an open agent stream, a notice), and nothing
of it is stored: the alerts, actions and containers tables do not change, and the audit log
gains only the rejections the protocol says it records.

The clients are raw (tests/support/fake_agent.py's FakeAgent speaks AgentChannel.Connect with
the generated stubs; generic channel methods send bytes that are no protobuf at all): a real
agent never sends these messages.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from driftwarden.core import wire
from driftwarden.ops.certs import CertBundle, KeyPair, init_certs
from driftwarden.proto.v1 import (
    actions_pb2,
    actions_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    alerts_pb2,
    alerts_pb2_grpc,
)

from tests.support.collector_proc import CollectorProcess
from tests.support.e2e import query, wait_until
from tests.support.fake_agent import FakeAgent, container_id, heartbeat, hello, make_alert

pytestmark = pytest.mark.integration

CODE = grpc.StatusCode
NO_RULES_POLICY = "version: 1\n"
GARBAGE = b"\xff\xff\xff\xff"  # a truncated varint: no protobuf message parses from it
CONNECT_METHOD = "/driftwarden.v1.AgentChannel/Connect"
LIST_ALERTS_METHOD = "/driftwarden.v1.Alerts/List"
UNAUTHENTICATED_TEXT = ("missing or wrong operator token: send metadata 'authorization: Bearer "
                        "<token>' with the collector's token")
# The tables bad input must leave alone (agents change with every legitimate heartbeat).
STORED_TABLES = ("alerts", "actions", "containers", "audit")


@dataclass
class Collector:
    process: CollectorProcess
    channels: list[grpc.Channel]

    @property
    def db(self) -> Path:
        return self.process.db

    @property
    def address(self) -> str:
        return self.process.address

    def logs(self) -> str:
        return f"--- collector ---\n{self.process.log()}"

    def channel(self, credentials: grpc.ChannelCredentials | None = None,
                options: list[tuple[str, Any]] | None = None) -> grpc.Channel:
        channel = (grpc.secure_channel(self.address, credentials, options=options)
                   if credentials is not None
                   else grpc.insecure_channel(self.address, options=options))
        self.channels.append(channel)
        return channel

    def stored(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of the tables bad input must not change."""
        return {table: query(self.db, f"SELECT * FROM {table} ORDER BY rowid")
                for table in STORED_TABLES}

    def audit_since(self, before: dict[str, list[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
        """Audit rows added since `before`: (actor, action, target, decision, reason, details)."""
        last = before["audit"][-1][0] if before["audit"] else 0
        return [(*row[:5], json.loads(row[5])) for row in query(
            self.db, "SELECT actor, action, target, decision, reason, details FROM audit "
                     "WHERE seq > ? ORDER BY seq", [last])]

    def assert_nothing_stored(self, before: dict[str, list[tuple[Any, ...]]],
                              audited: list[tuple[Any, ...]] = ()) -> None:
        after = self.stored()
        assert {t: after[t] for t in STORED_TABLES if t != "audit"} == {
            t: before[t] for t in STORED_TABLES if t != "audit"}
        assert self.audit_since(before) == list(audited)


def _start(tmp: Path, name: str, extra: list[str]) -> Collector:
    policy = tmp / f"{name}-policy.yaml"
    policy.write_text(NO_RULES_POLICY)
    process = CollectorProcess(tmp / f"{name}.db", tmp / f"{name}.log",
                               ["--policy", str(policy), *extra])
    process.start()
    return Collector(process, [])


def _stop(collector: Collector) -> None:
    for channel in collector.channels:
        channel.close()
    collector.process.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> CertBundle:
    return init_certs(tmp_path_factory.mktemp("certs") / "ca", ["node-a", "node-b"])


@pytest.fixture(scope="module")
def tls_collector(certs, tmp_path_factory) -> Iterator[Collector]:
    """Mutual TLS: agents and operators authenticate with certificates of `certs`' CA."""
    collector = _start(tmp_path_factory.mktemp("e2e-tls"), "tls", [
        "--tls-cert", str(certs.collector.cert), "--tls-key", str(certs.collector.key),
        "--tls-client-ca", str(certs.ca_cert)])
    yield collector
    _stop(collector)


@pytest.fixture(scope="module")
def token_collector(certs, tmp_path_factory) -> Iterator[Collector]:
    """Plaintext (loopback dev mode) with an operator token."""
    collector = _start(tmp_path_factory.mktemp("e2e-token"), "token",
                       ["--token-file", str(certs.operator_token)])
    yield collector
    _stop(collector)


@pytest.fixture(scope="module")
def token(certs) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {certs.operator_token.read_text().strip()}"),)


def credentials(certs: CertBundle, pair: KeyPair) -> grpc.ChannelCredentials:
    key, cert = pair.read()
    return grpc.ssl_channel_credentials(root_certificates=certs.ca_cert.read_bytes(),
                                        private_key=key, certificate_chain=cert)


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        fn()
    return raised.value


def connect(channel: grpc.Channel, node: str) -> FakeAgent:
    agent = FakeAgent(channel)
    agent.send(hello=hello(node))
    return agent


def wait_for_heartbeat(collector: Collector, channel: grpc.Channel, node: str, count: int,
                       metadata: Any = None) -> None:
    """A heartbeat has no answer: wait until Agents.List shows its container count."""

    def seen() -> bool:
        agents = agent_pb2_grpc.AgentsStub(channel).List(agent_pb2.ListAgentsRequest(),
                                                         timeout=5, metadata=metadata).agents
        return any(a.node == node and a.connected and a.containers_watched == count
                   for a in agents)

    wait_until(seen, f"{node}'s heartbeat", collector, timeout=10, interval=0.05)


def fresh_alert(key: str, **kwargs: Any):
    """An alert of now (the collector prunes alerts older than its retention at start)."""
    return make_alert(f"{key}-{time.time_ns()}", when=time.time(), **kwargs)


# -- transport and identity ----------------------------------------------------------------------


def test_plaintext_and_foreign_certificates_cannot_reach_a_tls_collector(
        tls_collector, certs, tmp_path):
    before = tls_collector.stored()
    foreign = init_certs(tmp_path / "foreign-ca", ["node-a"])
    callers = {
        "plaintext": tls_collector.channel(),
        "no client certificate": tls_collector.channel(
            grpc.ssl_channel_credentials(root_certificates=certs.ca_cert.read_bytes())),
        "agent certificate of another CA": tls_collector.channel(
            grpc.ssl_channel_credentials(root_certificates=certs.ca_cert.read_bytes(),
                                         private_key=foreign.agent("node-a").read()[0],
                                         certificate_chain=foreign.agent("node-a").read()[1])),
        "operator certificate of another CA": tls_collector.channel(
            grpc.ssl_channel_credentials(root_certificates=certs.ca_cert.read_bytes(),
                                         private_key=foreign.operator.read()[0],
                                         certificate_chain=foreign.operator.read()[1])),
    }
    for who, channel in callers.items():
        err = rpc_error(lambda channel=channel: agent_pb2_grpc.AgentsStub(channel).List(
            agent_pb2.ListAgentsRequest(), timeout=10))
        assert (who, err.code()) == (who, CODE.UNAVAILABLE)
        agent = connect(channel, "node-plaintext")
        assert (who, agent.status(timeout=10)[0]) == (who, CODE.UNAVAILABLE)
    assert query(tls_collector.db, "SELECT node FROM agents WHERE node = 'node-plaintext'") == []
    tls_collector.assert_nothing_stored(before)


def test_an_agent_certificate_cannot_say_hello_as_another_node(tls_collector, certs):
    before = tls_collector.stored()
    node_a_sessions = "SELECT node, connected_at, peer FROM agents WHERE node = 'node-a'"
    node_a_before = query(tls_collector.db, node_a_sessions)
    node_b = tls_collector.channel(credentials(certs, certs.agent("node-b")))
    impostor = connect(node_b, "node-a")
    assert impostor.status(timeout=10) == (
        CODE.PERMISSION_DENIED,
        "hello.node 'node-a' is not the node of this agent's certificate ('node-b')")
    assert query(tls_collector.db, node_a_sessions) == node_a_before  # no session for it
    operator = tls_collector.channel(credentials(certs, certs.operator))
    # Operators may not speak for agents, nor agents call operator services.
    assert FakeAgent(operator).status(timeout=10) == (
        CODE.PERMISSION_DENIED, "only agent certificates (OU=agent) may call "
        "AgentChannel.Connect, not certificate 'operator' (OU=operator)")
    err = rpc_error(lambda: actions_pb2_grpc.ActionsStub(node_b).Request(
        actions_pb2.ActionRequest(container="anything", type=actions_pb2.ACTION_TYPE_KILL),
        timeout=10))
    assert (err.code(), err.details()) == (
        CODE.PERMISSION_DENIED, "agent certificate 'node-b' may only call "
        "AgentChannel.Connect; use an operator certificate or token")
    tls_collector.assert_nothing_stored(before)


def test_an_agent_cannot_report_alerts_for_another_node(tls_collector, certs):
    web = container_id("node-a-web")
    node_a = connect(tls_collector.channel(credentials(certs, certs.agent("node-a"))), "node-a")
    node_a.send(heartbeat=heartbeat([(web, "web")]))
    operator = tls_collector.channel(credentials(certs, certs.operator))
    wait_for_heartbeat(tls_collector, operator, "node-a", 1)
    node_b = connect(tls_collector.channel(credentials(certs, certs.agent("node-b"))), "node-b")
    before = tls_collector.stored()

    forged = fresh_alert("forged", cid=web, name="web", node="node-a")
    node_b.send_alerts([forged], [1])
    reason = (f"alert_batch rejected: alerts[0] (id {forged.id}) claims node 'node-a' but this "
              "stream is node 'node-b'; nothing of the batch is stored or acked")
    assert node_b.recv_kind("notice").text == reason
    assert node_b.pending() == []  # no ack: nothing was taken
    tls_collector.assert_nothing_stored(before, [
        ("node-b", "alert-batch", "node-b", "rejected", reason,
         {"alerts": 1, "claimed_node": "node-a"})])
    assert node_a.pending() == []
    node_a.cancel()
    node_b.cancel()


def test_an_agent_cannot_report_another_nodes_container_as_its_own(tls_collector, certs):
    web = container_id("node-a-web-3")
    node_a = connect(tls_collector.channel(credentials(certs, certs.agent("node-a"))), "node-a")
    node_a.send(heartbeat=heartbeat([(web, "web")]))
    operator = tls_collector.channel(credentials(certs, certs.operator))
    wait_for_heartbeat(tls_collector, operator, "node-a", 1)
    node_b = connect(tls_collector.channel(credentials(certs, certs.agent("node-b"))), "node-b")
    before = tls_collector.stored()
    try:
        forged = fresh_alert("unclaimed", cid=web, name="web")  # container.node left empty
        node_b.send_alerts([forged], [1])
        command = node_b.recv(timeout=10)
        assert command.WhichOneof("body") == "notice", command  # not an ack
        assert command.notice.text == (
            f"alert_batch rejected: alerts[0] (id {forged.id}) is about container {web[:12]}, "
            "which node 'node-a' runs, but this stream is node 'node-b'; nothing of the batch "
            "is stored or acked")
        assert node_b.pending() == []
        [rejection] = tls_collector.audit_since(before)
        assert rejection[:4] == ("node-b", "alert-batch", "node-b", "rejected")
        assert rejection[4] == command.notice.text
        tls_collector.assert_nothing_stored(before, [rejection])
    finally:
        node_a.cancel()
        node_b.cancel()


def test_an_agent_cannot_answer_for_another_nodes_action(tls_collector, certs):
    web = container_id("node-a-web-2")
    node_a = connect(tls_collector.channel(credentials(certs, certs.agent("node-a"))), "node-a")
    node_a.send(heartbeat=heartbeat([(web, "web-2")]))
    operator = tls_collector.channel(credentials(certs, certs.operator))
    wait_for_heartbeat(tls_collector, operator, "node-a", 1)
    node_b = connect(tls_collector.channel(credentials(certs, certs.agent("node-b"))), "node-b")

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        response = pool.submit(actions_pb2_grpc.ActionsStub(operator).Request,
                               actions_pb2.ActionRequest(
                                   container="web-2", type=actions_pb2.ACTION_TYPE_QUARANTINE,
                                   reason="e2e", requested_by="e2e-test"), timeout=30)
        command = node_a.recv_kind("action", timeout=10)
        assert (command.container_id, command.type) == (web, actions_pb2.ACTION_TYPE_QUARANTINE)
        before = tls_collector.stored()

        node_b.send(action_result=agent_pb2.ActionResult(
            action_id=command.action_id, status=actions_pb2.ACTION_STATUS_DONE,
            message="forged", finished_at=wire.to_timestamp(time.time())))
        text = (f"action_result for {command.action_id!r} ignored: the action was sent to "
                "node node-a")
        assert node_b.recv_kind("notice").text == text
        tls_collector.assert_nothing_stored(before, [
            ("node-b", "action-result", command.action_id, "rejected", text, {})])
        assert not response.done()  # the operator still waits for node-a

        node_a.send(action_result=agent_pb2.ActionResult(
            action_id=command.action_id, status=actions_pb2.ACTION_STATUS_DONE,
            message="quarantined by node-a", finished_at=wire.to_timestamp(time.time())))
        answer = response.result(timeout=20)
    assert (answer.action_id, answer.status, answer.message, answer.node) == (
        command.action_id, actions_pb2.ACTION_STATUS_DONE, "quarantined by node-a", "node-a")
    [row] = query(tls_collector.db, "SELECT node, status, message FROM actions "
                                    "WHERE action_id = ?", [command.action_id])
    assert row == ("node-a", "done", "quarantined by node-a")
    node_a.cancel()
    node_b.cancel()


# -- operator auth and unknown names -------------------------------------------------------------


OPERATOR_CALLS: dict[str, Callable[[grpc.Channel, Any], object]] = {
    "Alerts.List": lambda ch, md: alerts_pb2_grpc.AlertsStub(ch).List(
        alerts_pb2.ListAlertsRequest(), timeout=10, metadata=md),
    "Alerts.Subscribe": lambda ch, md: next(alerts_pb2_grpc.AlertsStub(ch).Subscribe(
        alerts_pb2.SubscribeRequest(), timeout=10, metadata=md)),
    "Actions.Request": lambda ch, md: actions_pb2_grpc.ActionsStub(ch).Request(
        actions_pb2.ActionRequest(container="web-3", type=actions_pb2.ACTION_TYPE_KILL,
                                  reason="e2e"), timeout=10, metadata=md),
    "Actions.List": lambda ch, md: actions_pb2_grpc.ActionsStub(ch).List(
        actions_pb2.ListActionsRequest(), timeout=10, metadata=md),
    "Agents.List": lambda ch, md: agent_pb2_grpc.AgentsStub(ch).List(
        agent_pb2.ListAgentsRequest(), timeout=10, metadata=md),
}


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),),
                                      (("authorization", "wrong"),)],
                         ids=["missing", "wrong", "not-bearer"])
def test_operator_calls_without_the_right_token_are_unauthenticated(
        token_collector, token, metadata):
    channel = token_collector.channel()
    agent = connect(channel, "node-token")  # agents do not use the operator token
    agent.send(heartbeat=heartbeat([(container_id("web-3"), "web-3")]))
    wait_for_heartbeat(token_collector, channel, "node-token", 1, token)
    before = token_collector.stored()
    for name, call in OPERATOR_CALLS.items():
        err = rpc_error(lambda call=call: call(channel, metadata))
        assert (name, err.code(), err.details()) == (name, CODE.UNAUTHENTICATED,
                                                      UNAUTHENTICATED_TEXT)
    assert agent.pending() == []  # no action reached the agent
    token_collector.assert_nothing_stored(before)
    agent.cancel()


def test_an_action_on_an_unknown_container_is_not_found(token_collector, token):
    channel = token_collector.channel()
    before = token_collector.stored()
    err = rpc_error(lambda: actions_pb2_grpc.ActionsStub(channel).Request(
        actions_pb2.ActionRequest(container="dwtest-no-such-container",
                                  type=actions_pb2.ACTION_TYPE_QUARANTINE, reason="e2e"),
        timeout=10, metadata=token))
    assert (err.code(), err.details()) == (
        CODE.NOT_FOUND, "no container known from alerts matches 'dwtest-no-such-container': "
        "give a full container id, a container name, or an id prefix of at least 4 characters")
    token_collector.assert_nothing_stored(before)


def test_a_result_for_an_unknown_action_is_ignored_with_a_notice(token_collector):
    agent = connect(token_collector.channel(), "node-results")
    before = token_collector.stored()
    agent.send(action_result=agent_pb2.ActionResult(
        action_id="no-such-action", status=actions_pb2.ACTION_STATUS_DONE, message="done",
        finished_at=wire.to_timestamp(time.time())))
    text = "action_result for 'no-such-action' ignored: no such action"
    assert agent.recv_kind("notice").text == text
    token_collector.assert_nothing_stored(before, [
        ("node-results", "action-result", "no-such-action", "rejected", text, {})])
    agent.cancel()


# -- malformed and oversize messages -------------------------------------------------------------


def test_bytes_that_are_no_protobuf_are_rejected(token_collector, token):
    channel = token_collector.channel()
    before = token_collector.stored()
    err = rpc_error(lambda: channel.unary_unary(LIST_ALERTS_METHOD)(
        GARBAGE, timeout=10, metadata=token))
    assert (err.code(), err.details()) == (CODE.INTERNAL, "Exception deserializing request!")
    err = rpc_error(lambda: list(channel.stream_stream(CONNECT_METHOD)(
        iter([GARBAGE]), timeout=10)))
    assert (err.code(), err.details()) == (CODE.INTERNAL, "Exception deserializing request!")
    token_collector.assert_nothing_stored(before)


def test_invalid_agent_messages_end_the_stream_with_the_validator_text(token_collector):
    channel = token_collector.channel()
    before = token_collector.stored()

    first_not_hello = FakeAgent(channel)
    first_not_hello.send(heartbeat=heartbeat())
    assert first_not_hello.status(timeout=10) == (
        CODE.FAILED_PRECONDITION, "the first message must be hello, got heartbeat")

    bad_id = fresh_alert("bad-id")
    bad_id.id = "not-an-id"
    agent = connect(channel, "node-invalid")
    agent.send_alerts([fresh_alert("good"), bad_id], [1, 2])
    assert agent.status(timeout=10) == (
        CODE.INVALID_ARGUMENT, "agent_message.alert_batch.alerts[1].id: must be 24 lowercase "
        "hex characters, got 'not-an-id'")

    agent = connect(channel, "node-invalid")
    agent.send_raw(agent_pb2.AgentMessage(seq=5, heartbeat=heartbeat()))
    assert agent.status(timeout=10) == (
        CODE.INVALID_ARGUMENT, "agent_message.seq: expected 2, got 5 (messages are numbered "
        "from 1, one more each)")

    too_long = fresh_alert("too-long")
    too_long.reasons[0].text = "x" * 5000
    agent = connect(channel, "node-invalid")
    agent.send_alerts([too_long], [1])
    assert agent.status(timeout=10) == (
        CODE.INVALID_ARGUMENT, "agent_message.alert_batch.alerts[0].reasons[0].text: 5000 "
        "characters, at most 4096")
    token_collector.assert_nothing_stored(before)


def test_oversize_messages_are_refused(token_collector, token):
    # The client may send what it likes; the collector receives at most MAX_MESSAGE_BYTES.
    channel = token_collector.channel(options=[("grpc.max_send_message_length", -1)])
    before = token_collector.stored()
    oversize = b"\x00" * (wire.MAX_MESSAGE_BYTES + 1)
    err = rpc_error(lambda: channel.unary_unary(LIST_ALERTS_METHOD)(
        oversize, timeout=10, metadata=token))
    assert (err.code(), err.details()) == (CODE.RESOURCE_EXHAUSTED, too_large(len(oversize)))

    agent = connect(channel, "node-oversize")
    padding = 200_000  # events_json's bound is 256 K characters: each alert alone is valid
    batch = agent_pb2.AlertBatch(
        alerts=[fresh_alert(f"big-{i}", padding=padding)
                for i in range(wire.MAX_MESSAGE_BYTES // padding + 1)])
    batch.spool_seqs.extend(range(1, len(batch.alerts) + 1))
    agent.send(alert_batch=batch)
    size = agent_pb2.AgentMessage(seq=2, alert_batch=batch).ByteSize()
    assert agent.status(timeout=10) == (CODE.RESOURCE_EXHAUSTED, too_large(size))
    token_collector.assert_nothing_stored(before)


def too_large(size: int) -> str:
    """gRPC's own status text for a received message over the collector's limit."""
    return f"SERVER: Received message larger than max ({size} vs. {wire.MAX_MESSAGE_BYTES})"
