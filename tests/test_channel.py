"""The agent's collector channel: real gRPC over 127.0.0.1 against tests/support/fake_collector,
real spool files. Hello first, batches and acks, the spool as the source of truth across
collector outages and agent restarts, size limits, actions, heartbeats; the agent's flags."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from driftwarden.agent import command as agent_cmd
from driftwarden.agent.actions import ActionResult, ActionStatus
from driftwarden.agent.alerts import JsonLinesAlertSink, ListAlertSink
from driftwarden.agent.channel import (
    Backoff,
    ChannelConfig,
    CollectorChannel,
    TeeSink,
)
from driftwarden.agent.spool import AlertSpool
from driftwarden.core import __version__
from driftwarden.core.alerts import Alert, AlertKind, AlertReason, Severity, alert_from_dict
from driftwarden.core.errors import InvalidMessage, UsageError
from driftwarden.core.tls import TlsFiles
from driftwarden.core.wire import MAX_MESSAGE_BYTES, alert_from_proto, validate_agent_message
from driftwarden.proto.v1 import actions_pb2, common_pb2

from tests.support.fake_collector import FakeCollector

NODE = "node-1"
CID = "f00dcafe" * 8
OTHER_CID = "deadbeef" * 8
IMAGE_ID = "sha256:" + "ab" * 32


def make_alert(n: int, *, blob: int = 0, count: int = 1) -> Alert:
    """Alert number n (its id is n in hex); ``blob`` characters of event payload."""
    events = ({"kind": "exec", "time": "2023-11-14T22:13:23.250000000Z", "blob": "x" * blob},)
    return Alert(
        id=f"{n:024x}", time=1_700_000_000.0 + n, kind=AlertKind.DRIFT, severity=Severity.HIGH,
        score=1.0,
        reasons=(AlertReason("exec-added-binary", "ran /tmp/x, which the image does not contain",
                             (("path", "/tmp/x"), ("layers", ("upper",)))),),
        container={"id": CID, "name": "web", "image": "nginx:1.25", "image_id": IMAGE_ID,
                   "image_digest": None, "pod": "web-0", "namespace": "shop",
                   "pod_uid": "4f0ab913-49bd-4781-bd74-62f4d49f3374",
                   "workload": "StatefulSet/web", "labels": {}},
        process={"pid": 4242, "ppid": 4000, "exe": "/tmp/x", "argv": ["./x", "-c"], "uid": 0,
                 "comm": "x"},
        events=events if blob else (), baseline_version=7, count=count)


def config(address: str, **kw: Any) -> ChannelConfig:
    args: dict[str, Any] = dict(address=address, node=NODE, hostname="host-a",
                                started_at=1_700_000_000.5, heartbeat_seconds=60.0,
                                backoff_initial=0.02, backoff_max=0.1, spool_fsync=False)
    args.update(kw)
    return ChannelConfig(**args)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spooled_ids(spool_dir: Path) -> list[str]:
    with AlertSpool(spool_dir, fsync=False) as spool:
        return [a["id"] for _, a in spool.pending()]


@pytest.fixture
def collector():
    with FakeCollector() as fake:
        yield fake


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "spool"


# -- delivery --------------------------------------------------------------------------------


def test_hello_first_then_a_heartbeat_then_alerts_acked_and_spool_empty(collector, spool_dir):
    alerts = [make_alert(n) for n in range(3)]
    with CollectorChannel(config(collector.address), spool_dir) as channel:
        for alert in alerts:
            channel.emit(alert)
        assert channel.wait_idle(10)
        stats = channel.stats
    assert (stats.sent, stats.acked, stats.spool_depth, stats.reconnects, stats.streams) == (
        3, 3, 0, 0, 1)
    [stream] = collector.streams
    bodies = stream.bodies()
    assert bodies[:2] == ["hello", "heartbeat"]
    assert set(bodies[2:-1]) == {"alert_batch"} and bodies[-1] == "heartbeat"  # last: close()
    assert [m.seq for m in stream.messages] == list(range(1, len(bodies) + 1))
    hello = stream.messages[0].hello
    assert (hello.node, hello.agent_version, hello.mode, hello.hostname) == (
        NODE, __version__, common_pb2.MODE_LEARN, "host-a")
    assert (hello.started_at.seconds, hello.started_at.nanos) == (1_700_000_000, 500_000_000)
    batches = collector.batches()
    assert [a.id for b in batches for a in b.alerts] == [a.id for a in alerts]
    assert [s for b in batches for s in b.spool_seqs] == [0, 1, 2]
    received = [a for b in batches for a in b.alerts]
    assert {a.container.node for a in received} == {NODE}
    assert [alert_from_proto(a) for a in received] == alerts  # nothing lost on the way
    assert collector.invalid() == []
    assert spooled_ids(spool_dir) == []


def test_undecodable_path_bytes_are_spooled_exactly_and_sent_as_replacement_chars(collector,
                                                                                  spool_dir):
    # the kernel's bytes decode with surrogate escapes; the spool keeps them, the wire's
    # strings are UTF-8, so they arrive as U+FFFD (the JSON events keep the escapes)
    odd = dataclasses.replace(make_alert(1), process={
        **make_alert(1).process, "exe": "/tmp/\udcff\udcfe", "argv": ["/tmp/\udcff"]})
    with CollectorChannel(config(collector.address), spool_dir) as channel:
        channel.emit(odd)
        assert channel.wait_idle(10)
        assert channel.stats.acked == 1
    [received] = [a for b in collector.batches() for a in b.alerts]
    assert (received.process.exe, list(received.process.argv)) == (
        "/tmp/\ufffd\ufffd", ["/tmp/\ufffd"])
    assert collector.invalid() == []


def test_acks_by_alert_id_when_the_collector_sends_no_seqs(spool_dir):
    with FakeCollector(ack_by="ids") as collector, \
            CollectorChannel(config(collector.address), spool_dir) as channel:
        # the same id twice: an alert and its aggregated repeat, two spool entries
        for alert in (make_alert(1), make_alert(2), make_alert(1, count=4)):
            channel.emit(alert)
        assert channel.wait_idle(10)
        assert channel.stats.acked == 3
    assert [(a.id, a.count) for b in collector.batches() for a in b.alerts] == [
        (f"{1:024x}", 1), (f"{2:024x}", 1), (f"{1:024x}", 4)]


def test_collector_down_at_start_alerts_wait_in_the_spool_then_all_arrive(spool_dir, caplog):
    caplog.set_level(logging.INFO, logger="driftwarden.agent.channel")
    port = free_port()
    channel = CollectorChannel(config(f"127.0.0.1:{port}"), spool_dir).start()
    try:
        for n in range(3):
            channel.emit(make_alert(n))
        assert wait_until(lambda: channel.stats.reconnects >= 3)
        stats = channel.stats
        assert (stats.connected, stats.sent, stats.spool_depth) == (False, 0, 3)
        assert stats.last_error.startswith("UNAVAILABLE: ")
        with FakeCollector(port=port) as collector:
            assert channel.wait_idle(10)
            assert channel.connected
            channel.close()  # before the collector goes away: no second outage
        assert collector.alert_ids() == [f"{n:024x}" for n in range(3)]
        assert [s.bodies()[0] for s in collector.streams] == ["hello"]
    finally:
        channel.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one per outage, not one per retry, and one for its end
    assert warnings[0].startswith(f"collector 127.0.0.1:{port}: UNAVAILABLE: ")
    assert warnings[1].startswith(f"collector 127.0.0.1:{port}: connected again after ")
    assert warnings[1].endswith(" s; 3 alerts still spooled")


def test_a_refused_stream_is_an_error_logged_once_and_alerts_stay_spooled(spool_dir, caplog):
    refusal = (grpc.StatusCode.PERMISSION_DENIED, "hello.node 'node-1' is not the certificate's")
    with FakeCollector(reject=refusal) as collector:
        channel = CollectorChannel(config(collector.address), spool_dir)
        channel.emit(make_alert(1))
        with channel:
            assert collector.wait_for(lambda: len(collector.streams) >= 3)
            stats = channel.stats
    assert stats.last_error == f"PERMISSION_DENIED: {refusal[1]}"
    assert (stats.acked, stats.spool_depth) == (0, 1)
    assert [s.bodies() for s in collector.streams[:3]] == [["hello"]] * 3
    errors = [r for r in caplog.records if r.name == "driftwarden.agent.channel"
              and r.levelno >= logging.WARNING]
    assert [r.levelno for r in errors] == [logging.ERROR]
    assert spooled_ids(spool_dir) == [f"{1:024x}"]


def test_backoff_doubles_to_the_maximum_with_jitter_and_resets():
    high = Backoff(0.5, 30.0, random=lambda: 1.0)
    assert [high.next_delay() for _ in range(8)] == [
        (0.5, 0.5), (1.0, 1.0), (2.0, 2.0), (4.0, 4.0), (8.0, 8.0), (16.0, 16.0), (30.0, 30.0),
        (30.0, 30.0)]
    assert high.failures == 8
    high.reset()
    assert high.next_delay() == (0.5, 0.5)
    low = Backoff(0.5, 30.0, random=lambda: 0.0)
    assert [low.next_delay()[1] for _ in range(3)] == [0.25, 0.5, 1.0]


def test_backoff_grows_while_the_collector_stays_down(spool_dir):
    cfg = config(f"127.0.0.1:{free_port()}", backoff_initial=0.005, backoff_max=0.04)
    with CollectorChannel(cfg, spool_dir) as channel:
        assert wait_until(lambda: channel.stats.failures_in_row >= 6)
        stats = channel.stats  # one consistent snapshot
    assert stats.reconnects >= 5
    assert stats.backoff_seconds == min(0.04, 0.005 * 2 ** (stats.failures_in_row - 1))
    assert stats.backoff_seconds == 0.04  # reached the maximum


def test_collector_restart_mid_stream_delivers_every_alert(spool_dir):
    first = [make_alert(n) for n in range(5)]
    later = [make_alert(n) for n in range(5, 10)]
    collector = FakeCollector(ack=False).start()
    try:
        with CollectorChannel(config(collector.address), spool_dir) as channel:
            for alert in first:
                channel.emit(alert)
            assert collector.wait_for(lambda: len(collector.alert_ids()) == 5)
            collector.stop()  # not one ack was sent
            for alert in later:
                channel.emit(alert)
            assert wait_until(lambda: channel.stats.failures_in_row >= 2)
            assert channel.stats.spool_depth == 10
            collector.ack = True
            collector.start()  # the same port
            assert channel.wait_idle(15)
            stats = channel.stats
        assert stats.reconnects >= 2 and stats.acked == 10 and stats.spool_depth == 0
        assert collector.streams[0].bodies()[0] == "hello"
        before = [a.id for m in collector.streams[0].messages if m.HasField("alert_batch")
                  for a in m.alert_batch.alerts]
        after = [a.id for s in collector.streams[1:] for m in s.messages
                 if m.HasField("alert_batch") for a in m.alert_batch.alerts]
        assert before == [a.id for a in first]
        assert after == [a.id for a in first + later]  # unacked ones resent, in spool order
        assert all(s.bodies()[0] == "hello" for s in collector.streams)
        assert collector.invalid() == []
    finally:
        collector.stop()
    assert spooled_ids(spool_dir) == []


def test_close_keeps_pending_alerts_on_disk_and_an_agent_restart_resends_them(spool_dir):
    alerts = [make_alert(n) for n in range(3)]
    with FakeCollector(ack=False) as collector:
        channel = CollectorChannel(config(collector.address), spool_dir).start()
        for alert in alerts:
            channel.emit(alert)
        assert collector.wait_for(lambda: len(collector.alert_ids()) == 3)
        channel.close()
        assert channel.stats.spool_depth == 3
        assert channel.stats.connected is False
        last = collector.streams[0].messages[-1]
        assert last.WhichOneof("body") == "heartbeat" and last.heartbeat.spool_depth == 3
        assert spooled_ids(spool_dir) == [a.id for a in alerts]

        collector.ack = True
        with CollectorChannel(config(collector.address), spool_dir) as again:
            assert again.wait_idle(10)
        second = collector.streams[1]
        assert second.bodies()[:2] == ["hello", "heartbeat"]
        resent = [m.alert_batch for m in second.messages if m.HasField("alert_batch")]
        assert [a.id for b in resent for a in b.alerts] == [a.id for a in alerts]
        assert [s for b in resent for s in b.spool_seqs] == [0, 1, 2]
    assert spooled_ids(spool_dir) == []


def test_a_stream_without_acks_is_abandoned_after_the_ack_timeout(spool_dir):
    with FakeCollector(ack=False) as collector, \
            CollectorChannel(config(collector.address, ack_timeout=0.1), spool_dir) as channel:
        channel.emit(make_alert(1))
        assert collector.wait_for(lambda: len(collector.streams) >= 3)
        assert channel.stats.spool_depth == 1
    per_stream = [[a.id for m in s.messages if m.HasField("alert_batch")
                   for a in m.alert_batch.alerts] for s in collector.streams[:2]]
    assert per_stream == [[f"{1:024x}"], [f"{1:024x}"]]


def test_sending_pauses_when_max_in_flight_alerts_wait_for_acks(spool_dir):
    with FakeCollector(ack=False) as collector:
        cfg = config(collector.address, max_batch_alerts=10, max_in_flight=20,
                     heartbeat_seconds=0.01)
        channel = CollectorChannel(cfg, spool_dir)
        for n in range(50):
            channel.emit(make_alert(n))
        with channel:
            def heartbeats_after_the_window() -> int:
                bodies = collector.streams[0].bodies() if collector.streams else []
                batches = [i for i, b in enumerate(bodies) if b == "alert_batch"]
                return bodies[batches[-1]:].count("heartbeat") if len(batches) >= 2 else 0

            # heartbeats come from the same sender: three of them after the window filled
            # mean it chose not to send more alerts
            assert collector.wait_for(lambda: heartbeats_after_the_window() >= 3)
            assert collector.alert_ids() == [f"{n:024x}" for n in range(20)]
            assert channel.stats.sent == 20


def test_emit_after_close_is_refused(collector, spool_dir):
    channel = CollectorChannel(config(collector.address), spool_dir).start()
    channel.close()
    with pytest.raises(Exception, match="after the collector channel was closed"):
        channel.emit(make_alert(1))


# -- batches ---------------------------------------------------------------------------------


def test_replay_batches_hold_at_most_500_alerts(collector, spool_dir):
    channel = CollectorChannel(config(collector.address), spool_dir)
    for n in range(1200):
        channel.emit(make_alert(n))  # before start: all of it is replayed from the spool
    with channel:
        assert channel.wait_idle(20)
    assert [len(b.alerts) for b in collector.batches()] == [500, 500, 200]
    assert collector.alert_ids() == [f"{n:024x}" for n in range(1200)]


def test_batches_stay_below_the_message_size_limit(collector, spool_dir):
    channel = CollectorChannel(config(collector.address), spool_dir)
    for n in range(40):
        channel.emit(make_alert(n, blob=200_000))  # ~8 MB in all
    with channel:
        assert channel.wait_idle(20)
    sizes = [m.ByteSize() for m in collector.messages("alert_batch")]
    assert len(sizes) >= 2
    assert max(sizes) < MAX_MESSAGE_BYTES
    assert collector.alert_ids() == [f"{n:024x}" for n in range(40)]
    assert collector.invalid() == []


def test_an_undeliverable_spool_record_is_dropped_without_blocking_the_others(
        collector, spool_dir):
    good = [make_alert(1), make_alert(2)]
    with AlertSpool(spool_dir, fsync=False) as spool:
        spool.append([good[0].to_dict(), {"v": 1, "id": "f" * 24, "kind": "drift"},
                      good[1].to_dict()])
    with CollectorChannel(config(collector.address), spool_dir) as channel:
        assert channel.wait_idle(10)
        stats = channel.stats
    assert (stats.invalid_dropped, stats.acked, stats.sent) == (1, 2, 2)
    assert collector.alert_ids() == [a.id for a in good]


def test_alert_from_dict_inverts_to_dict():
    alert = make_alert(3, blob=10, count=2)
    assert alert_from_dict(json.loads(json.dumps(alert.to_dict()))) == alert


# -- heartbeats ------------------------------------------------------------------------------


def test_heartbeat_carries_counters_containers_and_spool_depth(spool_dir):
    counters = {"exec": {"emitted": 7, "suppressed": 3, "dropped": 1, "read_failed": 0,
                         "over_budget": 40, "known": 0},
                "connect": {"emitted": 2, "suppressed": 0, "dropped": 0, "read_failed": 0,
                            "over_budget": 0, "known": 123}}
    containers = [(CID, "web", IMAGE_ID, "nginx:1.25"), (OTHER_CID, None, None, None)]
    with FakeCollector(ack=False) as collector, \
            CollectorChannel(config(collector.address, heartbeat_seconds=0.05), spool_dir,
                             counters=lambda: counters,
                             containers=lambda: containers) as channel:
        channel.emit(make_alert(1))
        channel.emit(make_alert(2))

        def deep_heartbeat():
            return [m.heartbeat for m in collector.messages("heartbeat")
                    if m.heartbeat.spool_depth == 2]

        assert collector.wait_for(deep_heartbeat)
        beat = deep_heartbeat()[0]
    assert [(c.kind, c.emitted, c.suppressed, c.dropped, c.over_budget, c.known)
            for c in beat.counters] == [("connect", 2, 0, 0, 0, 123), ("exec", 7, 3, 1, 40, 0)]
    assert beat.containers_watched == 2
    assert [(c.id, c.name, c.image.id, c.image.name, c.node) for c in beat.containers] == [
        (CID, "web", IMAGE_ID, "nginx:1.25", NODE), (OTHER_CID, "", "", "", NODE)]
    assert not beat.containers[1].HasField("name")
    assert beat.sent_at.seconds > 0
    assert collector.invalid() == []


def test_alerts_go_out_while_a_periodic_heartbeat_is_being_built(collector, spool_dir):
    """The heartbeat thread builds the periodic heartbeats: a slow read of the node's containers
    (the runtime's API) does not hold back an alert emitted meanwhile."""
    calls = []
    release = threading.Event()

    def containers():
        calls.append(1)
        if len(calls) == 2:  # the first periodic heartbeat (after the stream's first one)
            release.wait(30)
        return [(CID, "web", IMAGE_ID, "nginx:1.25")]

    with CollectorChannel(config(collector.address, heartbeat_seconds=0.05), spool_dir,
                          containers=containers) as channel:
        assert wait_until(lambda: len(calls) == 2)
        channel.emit(make_alert(1))
        assert collector.wait_for(lambda: collector.messages("alert_batch"))
        assert (len(collector.messages("heartbeat")), release.is_set()) == (1, False)
        release.set()
        assert collector.wait_for(lambda: len(collector.messages("heartbeat")) >= 2)
        assert channel.wait_idle(10)


def test_a_crowded_node_lists_1024_containers_which_the_collector_accepts(collector, spool_dir):
    # a Kubernetes node runs up to 110 pods, several containers each: far above the wire's
    # default bound for repeated fields (64), below the heartbeat's own (1024)
    many = [(f"{i:064x}", f"c{i}", None, None) for i in range(1030)]
    with CollectorChannel(config(collector.address), spool_dir, containers=lambda: many):
        assert collector.wait_for(lambda: collector.messages("heartbeat"))
        message = collector.messages("heartbeat")[0]
    beat = message.heartbeat
    assert beat.containers_watched == 1030
    assert [c.id for c in beat.containers] == [c[0] for c in many[:1024]]
    assert collector.invalid() == []  # the fake collector validates with validate_agent_message
    beat.containers.add(id="f" * 64, node=NODE)
    with pytest.raises(InvalidMessage, match=r"^agent_message.heartbeat.containers: 1025 "
                                             r"entries, at most 1024$"):
        validate_agent_message(message)


def test_a_failing_heartbeat_callback_leaves_its_part_out(collector, spool_dir):
    def broken():
        raise RuntimeError("probes are gone")

    with CollectorChannel(config(collector.address), spool_dir, counters=broken,
                          containers=lambda: [(CID, "web", None, None)]):
        assert collector.wait_for(lambda: collector.messages("heartbeat"))
        beat = collector.messages("heartbeat")[0].heartbeat
    assert list(beat.counters) == []
    assert [c.id for c in beat.containers] == [CID]


# -- actions ---------------------------------------------------------------------------------


class FakeActions:
    def __init__(self, status: ActionStatus = ActionStatus.DONE, message: str = "done it"):
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.status = status
        self.message = message

    def run(self, action: str, container_id: str, **options: Any) -> ActionResult:
        self.calls.append((action, container_id, options))
        return ActionResult(action, container_id, self.status, self.message)


def action_results(collector: FakeCollector) -> list[Any]:
    return [m.action_result for m in collector.messages("action_result")]


def test_an_action_runs_once_and_its_result_goes_back(collector, spool_dir):
    actions = FakeActions(ActionStatus.DONE, "paused web")
    with CollectorChannel(config(collector.address), spool_dir, actions=actions,
                          is_local=lambda cid: cid == CID) as channel:
        assert collector.wait_for(lambda: collector.messages("heartbeat"))
        collector.send_action(action_id="act-1", container_id=CID,
                              type=actions_pb2.ACTION_TYPE_PAUSE, reason="drift",
                              requested_by="operator:alice")
        assert collector.wait_for(lambda: len(action_results(collector)) == 1)
        # the same command again (e.g. resent after a reconnect): answered, not run again
        collector.send_action(action_id="act-1", container_id=CID,
                              type=actions_pb2.ACTION_TYPE_PAUSE)
        assert collector.wait_for(lambda: len(action_results(collector)) == 2)
        stats = channel.stats
    assert actions.calls == [("pause", CID, {})]
    first, again = action_results(collector)
    assert (first.action_id, first.status, first.message) == (
        "act-1", actions_pb2.ACTION_STATUS_DONE, "paused web")
    assert first.finished_at.seconds > 0
    assert again == first
    assert stats.actions == {("pause", "done"): 1}
    assert collector.invalid() == []


def test_quarantine_with_pause_passes_the_option_and_reports_already(collector, spool_dir):
    actions = FakeActions(ActionStatus.ALREADY, "already quarantined")
    with CollectorChannel(config(collector.address), spool_dir, actions=actions,
                          is_local=lambda cid: True):
        assert collector.wait_for(lambda: collector.messages("heartbeat"))
        collector.send_action(action_id="act-2", container_id=CID,
                              type=actions_pb2.ACTION_TYPE_QUARANTINE, with_pause=True)
        assert collector.wait_for(lambda: action_results(collector))
    assert actions.calls == [("quarantine", CID, {"with_pause": True})]
    [result] = action_results(collector)
    assert (result.status, result.message) == (actions_pb2.ACTION_STATUS_ALREADY,
                                               "already quarantined")


def test_an_action_for_a_container_on_another_node_is_container_gone(collector, spool_dir):
    actions = FakeActions()
    asked: list[str] = []

    def is_local(cid: str) -> bool:
        asked.append(cid)
        return False

    with CollectorChannel(config(collector.address), spool_dir, actions=actions,
                          is_local=is_local) as channel:
        assert collector.wait_for(lambda: collector.messages("heartbeat"))
        collector.send_action(action_id="act-3", container_id=OTHER_CID,
                              type=actions_pb2.ACTION_TYPE_KILL)
        assert collector.wait_for(lambda: action_results(collector))
        stats = channel.stats
    assert actions.calls == []
    assert asked == [OTHER_CID]
    [result] = action_results(collector)
    assert (result.action_id, result.status, result.message) == (
        "act-3", actions_pb2.ACTION_STATUS_CONTAINER_GONE,
        f"container {OTHER_CID} is not on node {NODE}")
    assert stats.actions == {("kill", "container-gone"): 1}


# -- TLS -------------------------------------------------------------------------------------


def test_mutual_tls_delivers_and_the_collector_sees_the_node_certificate(tmp_path, spool_dir):
    from driftwarden.ops.certs import init_certs

    bundle = init_certs(tmp_path / "certs", [NODE])
    key, cert = bundle.collector.read()
    credentials = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=bundle.ca_cert.read_bytes(), require_client_auth=True)
    agent = bundle.agent(NODE)
    tls = TlsFiles(cert=agent.cert, key=agent.key, ca=bundle.ca_cert)
    with FakeCollector(credentials=credentials) as collector:
        with CollectorChannel(config(collector.address, tls=tls), spool_dir) as channel:
            channel.emit(make_alert(1))
            assert channel.wait_idle(10)
        assert collector.streams[0].auth["x509_common_name"] == [NODE.encode()]
        # a plaintext agent cannot talk to it
        with CollectorChannel(config(collector.address), spool_dir) as plain:
            plain.emit(make_alert(2))
            assert wait_until(lambda: plain.stats.reconnects >= 1)
            assert plain.stats.sent == 0 and plain.stats.spool_depth == 1
        assert len(collector.streams) == 1


# -- sinks, addresses, flags -----------------------------------------------------------------


def test_tee_sink_gives_every_alert_to_each_sink_even_when_one_fails():
    text = io.StringIO()
    listed = ListAlertSink()

    class Broken:
        def emit(self, alert):
            raise OSError("disk full")

        def flush(self):
            pass

        def close(self):
            pass

    tee = TeeSink(Broken(), JsonLinesAlertSink(text), listed)
    with pytest.raises(OSError, match="disk full"):
        tee.emit(make_alert(1))
    tee.close()
    assert [json.loads(line)["id"] for line in text.getvalue().splitlines()] == [f"{1:024x}"]
    assert [a.id for a in listed.alerts] == [f"{1:024x}"] and listed.closed


def agent_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    subparsers = parser.add_subparsers()
    agent_cmd._add_agent(subparsers)
    agent_parser = subparsers.choices["agent"]
    if "--collector" not in agent_parser._option_string_actions:  # until cli.py calls it
        agent_cmd.add_collector_flags(agent_parser)
    return parser.parse_args(["agent", "--state-dir", "/tmp/s", *argv])


def test_options_without_collector_write_alerts_to_stdout():
    options = agent_cmd.options_from_args(agent_args())
    assert (options.collector, options.alerts_out, options.alerts_file) == (None, None, "-")
    assert agent_cmd.channel_config(options) is None


def test_options_with_collector_send_alerts_there_only_unless_alerts_out_is_given():
    options = agent_cmd.options_from_args(agent_args(
        "--collector", "127.0.0.1:50051", "--node", "web-host", "--heartbeat", "2.5"))
    assert (options.collector, options.alerts_file) == ("127.0.0.1:50051", None)
    cfg = agent_cmd.channel_config(options)
    assert (cfg.address, cfg.node, cfg.heartbeat_seconds, cfg.mode, cfg.tls) == (
        "127.0.0.1:50051", "web-host", 2.5, "learn", None)
    both = agent_cmd.options_from_args(agent_args("--collector", "127.0.0.1:1",
                                                  "--alerts-out", "-"))
    assert both.alerts_file == "-"
    assert agent_cmd.channel_config(both).node == socket.gethostname()


@pytest.mark.parametrize(("argv", "message"), [
    (["--collector", "10.0.0.5:50051"], "not a loopback address"),
    (["--collector", "10.0.0.5:50051", "--allow-non-loopback"], "plain text"),
    (["--collector", "127.0.0.1:1", "--tls-cert", "a.crt"],
     "^--tls-cert given without --tls-ca, --tls-key: TLS needs all three "),
    (["--collector", "127.0.0.1:1", "--tls-cert", "/nonexistent/a.crt", "--tls-key", "k",
      "--tls-ca", "c"], r"^--tls-ca c: cannot read it \(No such file or directory\)"),
    (["--collector", "127.0.0.1:1", "--node", "bad name"], "node name 'bad name'"),
    (["--node", "web-host"], "--node only make"),
])
def test_bad_collector_options(argv, message):
    options = agent_cmd.options_from_args(agent_args(*argv))
    with pytest.raises(UsageError, match=message):
        agent_cmd.channel_config(options)


def test_heartbeat_flag_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        agent_args("--collector", "127.0.0.1:1", "--heartbeat", "0")
    assert "must be > 0" in capsys.readouterr().err


def test_metrics_of_the_agent_and_its_channel(collector, spool_dir):
    from driftwarden.core.metrics import MetricsRegistry
    from prometheus_client.parser import text_string_to_metric_families

    class Probes:
        def counters(self):
            return {"exec": {"emitted": 9, "suppressed": 4, "dropped": 2, "read_failed": 0,
                             "over_budget": 3, "known": 5}}

    actions = FakeActions(ActionStatus.DONE, "paused")
    with CollectorChannel(config(collector.address), spool_dir, actions=actions,
                          is_local=lambda cid: True) as channel:
        counter = agent_cmd.AlertCounter(channel)
        counter.emit(make_alert(1))
        assert channel.wait_idle(10)
        collector.send_action(action_id="a", container_id=CID,
                              type=actions_pb2.ACTION_TYPE_PAUSE)
        assert collector.wait_for(lambda: action_results(collector))
        registry = MetricsRegistry()
        event_seen = agent_cmd.register_metrics(registry, Probes(), counter, channel)
        event_seen(time.monotonic_ns() - 3_000_000)  # an event the kernel stamped 3 ms ago
        families = {f.name: f for f in text_string_to_metric_families(registry.render())}
    assert {name: family.type for name, family in families.items()} == {
        "driftwarden_agent_actions": "counter",
        "driftwarden_agent_alerts": "counter",
        "driftwarden_agent_alerts_acked": "counter",
        "driftwarden_agent_alerts_sent": "counter",
        "driftwarden_agent_collector_address_connected": "gauge",
        "driftwarden_agent_collector_connected": "gauge",
        "driftwarden_agent_collector_failovers": "counter",
        "driftwarden_agent_collector_reconnects": "counter",
        "driftwarden_agent_event_latency_seconds": "histogram",
        "driftwarden_agent_event_latency_seconds_created": "gauge",
        "driftwarden_agent_events": "counter",
        "driftwarden_agent_spool_depth": "gauge",
    }
    samples = sorted((s.name, tuple(sorted(s.labels.items())), s.value)
                     for name, family in families.items() if "latency" not in name
                     for s in family.samples)
    assert samples == [
        ("driftwarden_agent_actions_total", (("status", "done"), ("type", "pause")), 1.0),
        ("driftwarden_agent_alerts_acked_total", (), 1.0),
        ("driftwarden_agent_alerts_sent_total", (), 1.0),
        ("driftwarden_agent_alerts_total", (("kind", "anomaly"),), 0.0),
        ("driftwarden_agent_alerts_total", (("kind", "drift"),), 1.0),
        ("driftwarden_agent_alerts_total", (("kind", "novel"),), 0.0),
        ("driftwarden_agent_collector_address_connected",
         (("address", collector.address),), 1.0),
        ("driftwarden_agent_collector_connected", (), 1.0),
        ("driftwarden_agent_collector_failovers_total", (), 0.0),
        ("driftwarden_agent_collector_reconnects_total", (), 0.0),
        ("driftwarden_agent_events_total", (("kind", "exec"), ("outcome", "dropped")), 2.0),
        ("driftwarden_agent_events_total", (("kind", "exec"), ("outcome", "emitted")), 9.0),
        ("driftwarden_agent_events_total", (("kind", "exec"), ("outcome", "known")), 5.0),
        ("driftwarden_agent_events_total", (("kind", "exec"), ("outcome", "over_budget")), 3.0),
        ("driftwarden_agent_events_total", (("kind", "exec"), ("outcome", "suppressed")), 4.0),
        ("driftwarden_agent_spool_depth", (), 0.0),
    ]
    latency = {(s.name, s.labels.get("le")): s.value
               for s in families["driftwarden_agent_event_latency_seconds"].samples}
    assert latency[("driftwarden_agent_event_latency_seconds_count", None)] == 1
    # 3 ms and the few microseconds of this test: in the (2 ms, 5 ms] bucket
    assert (latency[("driftwarden_agent_event_latency_seconds_bucket", "0.002")],
            latency[("driftwarden_agent_event_latency_seconds_bucket", "0.005")]) == (0, 1)
    assert 0.003 <= latency[("driftwarden_agent_event_latency_seconds_sum", None)] < 0.005


def test_metrics_of_containers_the_runtime_does_not_describe(tmp_path):
    """A podman container on a Docker host: no metadata, no detection, counted once."""
    from driftwarden.agent.attribution import Attributor
    from driftwarden.agent.cgroups import CgroupIndex
    from driftwarden.core.metrics import MetricsRegistry

    class Probes:
        def counters(self):
            return {}

    podman = tmp_path / f"machine.slice/libpod-{'f' * 64}.scope"
    podman.mkdir(parents=True)
    attributor = Attributor(CgroupIndex(tmp_path), None)
    registry = MetricsRegistry()
    agent_cmd.register_metrics(registry, Probes(), agent_cmd.AlertCounter(None), None,
                               attributor)
    for _ in range(3):
        attributor.lookup(podman.stat().st_ino)
    lines = [line for line in registry.render().splitlines()
             if "metadata" in line and not line.startswith("#")]
    assert lines == [
        'driftwarden_agent_containers_without_metadata_total{runtime="containerd"} 0.0',
        'driftwarden_agent_containers_without_metadata_total{runtime="cri-o"} 0.0',
        'driftwarden_agent_containers_without_metadata_total{runtime="docker"} 0.0',
        'driftwarden_agent_containers_without_metadata_total{runtime="podman"} 1.0',
        'driftwarden_agent_container_metadata_unavailable{runtime="containerd"} 0.0',
        'driftwarden_agent_container_metadata_unavailable{runtime="cri-o"} 0.0',
        'driftwarden_agent_container_metadata_unavailable{runtime="docker"} 0.0',
        'driftwarden_agent_container_metadata_unavailable{runtime="podman"} 0.0',
    ]


# -- live --------------------------------------------------------------------------------------


@pytest.mark.integration
def test_live_agent_lists_its_containers_and_pauses_one_for_the_collector(kernel_ok, bb_image,
                                                                          tmp_path):
    """`driftwarden agent --collector --metrics` in-process: real probes, Docker, gRPC."""
    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.containers import docker_client, run_container

    with FakeCollector() as collector, \
            run_container(bb_image, ["sleep", "300"], name="dw-channel") as box:
        options = agent_cmd.AgentOptions(
            state_dir=str(tmp_path / "state"), collector=collector.address, node=NODE,
            heartbeat=0.2, metrics="127.0.0.1:0")
        stop = threading.Event()
        out, err = io.StringIO(), io.StringIO()
        outcome: dict[str, Any] = {}

        def agent() -> None:
            try:
                outcome["rc"] = agent_cmd.run_agent(options, stop, stdout=out, stderr=err)
            except BaseException as exc:
                outcome["error"] = exc

        docker = docker_client()
        thread = threading.Thread(target=agent, name="agent-under-test")
        thread.start()
        try:
            def listing_box() -> list[Any]:
                return [m.heartbeat for m in collector.messages("heartbeat")
                        if any(c.id == box.id for c in m.heartbeat.containers)]

            assert wait_until(lambda: "agent running" in err.getvalue() or outcome, 120), \
                err.getvalue()
            assert "error" not in outcome, outcome
            assert collector.wait_for(listing_box, timeout=30)
            beat = listing_box()[-1]
            assert {c.kind for c in beat.counters} == {"exec", "connect", "file", "chdir",
                                                       "fork", "exit", "exec_repeat"}
            [entry] = [c for c in beat.containers if c.id == box.id]
            assert (entry.name, entry.node) == (box.name, NODE)
            assert entry.image.id.startswith("sha256:")
            url = re.search(r"metrics at (\S+)", err.getvalue()).group(1)
            with urllib.request.urlopen(url, timeout=10) as reply:
                metrics = {s.name: s.value for f in text_string_to_metric_families(
                    reply.read().decode()) for s in f.samples if s.labels.get("le") in
                    (None, "+Inf")}
            assert metrics["driftwarden_agent_collector_connected"] == 1
            # whatever this host's other containers did meanwhile: counted, and kept up with
            latency = "driftwarden_agent_event_latency_seconds"
            assert metrics[latency + "_bucket"] == metrics[latency + "_count"] >= 0
            assert metrics[latency + "_sum"] <= 60 * metrics[latency + "_count"]

            for action_id, kind in (("p1", actions_pb2.ACTION_TYPE_PAUSE),
                                    ("r1", actions_pb2.ACTION_TYPE_RESUME)):
                collector.send_action(action_id=action_id, container_id=box.id, type=kind,
                                      requested_by="test")
                assert collector.wait_for(
                    lambda a=action_id: [r for r in action_results(collector)
                                         if r.action_id == a], timeout=30)
                if action_id == "p1":
                    assert docker.api.inspect_container(box.id)["State"]["Paused"] is True
            assert [(r.action_id, r.status) for r in action_results(collector)] == [
                ("p1", actions_pb2.ACTION_STATUS_DONE), ("r1", actions_pb2.ACTION_STATUS_DONE)]
            assert docker.api.inspect_container(box.id)["State"]["Paused"] is False
        finally:
            stop.set()
            thread.join(60)
            docker.close()
    assert outcome == {"rc": 0}
    assert out.getvalue() == ""  # with --collector and no --alerts-out: nothing on stdout
    assert collector.streams[0].bodies()[0] == "hello"
    assert collector.invalid() == []
