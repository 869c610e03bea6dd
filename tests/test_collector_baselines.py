"""Fleet baselines at the collector, over real gRPC on 127.0.0.1 with a real SQLite file: fake
agents (tests/support/fake_agent.py) send increments and requests and receive the merged
baselines; operators call the Baselines service. Also the baseline file format against the
agent's profile (models.profile), the store's baseline operations and the collector's flags.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import msgpack
import pytest
from driftwarden.collector.baselines import FleetSettings, alert_items, required_containers
from driftwarden.collector.command import add_parser, config_from_args
from driftwarden.collector.policy import parse_policy
from driftwarden.collector.server import CollectorServer
from driftwarden.core import wire
from driftwarden.core.alerts import Alert, AlertKind, AlertReason, Severity
from driftwarden.core.argtypes import CommandParser
from driftwarden.core.baselines import (
    ContainerRef,
    FleetBaseline,
    HeldBaseline,
    pack_baseline,
    unpack_baseline,
)
from driftwarden.core.errors import BaselineError, StoreError
from driftwarden.core.learning import LearningPolicy
from driftwarden.core.modes import Mode
from driftwarden.models.items import ConnectItem, ExecItem, ItemSet
from driftwarden.models.profile import Profile
from driftwarden.proto.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    baselines_pb2,
    baselines_pb2_grpc,
    common_pb2,
)

from tests.support.fake_agent import FakeAgent, container_id, heartbeat, hello
from tests.test_collector_service import wait_until

NO_RULES = parse_policy("version: 1\n")
CODE = grpc.StatusCode
LEARN, MONITOR, PROTECT = common_pb2.MODE_LEARN, common_pb2.MODE_MONITOR, common_pb2.MODE_PROTECT
KEY = "sha256:" + "a1" * 32
OTHER = "sha256:" + "b2" * 32
C1, C2, C3 = container_id("web-1"), container_id("web-2"), container_id("web-3")
X = ("exec", ("/usr/bin/python3", "python3"))
Y = ("connect", ("inet", "private", "10.0.0.5", 5432, "tcp", "/usr/bin/python3"))
Z = ("exec", ("/bin/nc", "nc"))
QUIET = LearningPolicy(warmup_seconds=0, stable_seconds=3600, min_windows=1)
FLEET = {"policy": NO_RULES, "fleet": FleetSettings(consensus=2, policy=QUIET),
         "baseline_tick": 0.1}


@pytest.fixture
def server(make_server) -> CollectorServer:
    return make_server(**FLEET)


def connect(channel: grpc.Channel, node: str, *containers: tuple[str, str, str],
            held: tuple[HeldBaseline, ...] = ()) -> FakeAgent:
    """An agent for `node` that said hello and sent a heartbeat listing `containers`
    (id, name, image key)."""
    agent = FakeAgent(channel)
    message = hello(node)
    message.baselines.extend(wire.held_baseline_to_proto(h) for h in held)
    agent.send(hello=message)
    agent.send(heartbeat=heartbeat(containers))
    return agent


def increment(node: str, items=(), *, containers=(), windows: int = 0, key: str = KEY,
              name: str = "shop/web:1") -> baselines_pb2.BaselineIncrement:
    """`items`: (item, container ids) pairs; `containers`: (id, name) pairs, all of `node`."""
    return baselines_pb2.BaselineIncrement(
        image_key=key, image_name=name,
        items=[wire.item_evidence_to_proto(item, [ContainerRef(c, node) for c in cids])
               for item, cids in items],
        windows=[baselines_pb2.FeatureWindow(values=[float(i), 0.5, 2.0])
                 for i in range(windows)],
        containers=[wire.container_ref_to_proto(ContainerRef(c, node, n))
                    for c, n in containers])


def update_where(agent: FakeAgent, predicate: Callable[[baselines_pb2.BaselineUpdate], bool],
                 timeout: float = 2.0) -> baselines_pb2.BaselineUpdate:
    """The first baseline update matching `predicate` within `timeout` (others skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            pytest.fail(f"no matching baseline update within {timeout} s")
        command = agent.recv(left)
        if command.WhichOneof("body") == "baseline" and predicate(command.baseline):
            return command.baseline


def version_of(update: baselines_pb2.BaselineUpdate) -> int:
    return update.baseline.summary.version


def items_of(baseline: baselines_pb2.Baseline) -> list[tuple]:
    return [wire.baseline_item_from_proto(i) for i in baseline.items]


def unconfirmed_of(baseline: baselines_pb2.Baseline) -> dict[tuple, list[tuple]]:
    return {wire.baseline_item_from_proto(e.item): [(c.container_id, c.node, c.name)
                                                    for c in e.containers]
            for e in baseline.unconfirmed}


def baselines_stub(channel: grpc.Channel) -> baselines_pb2_grpc.BaselinesStub:
    return baselines_pb2_grpc.BaselinesStub(channel)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def learned_fleet(server: CollectorServer, channel: grpc.Channel,
                  ) -> tuple[FakeAgent, FakeAgent]:
    """Three containers of KEY on two nodes learn: X and Y shown by c1 and c2 on node-a, X and
    Z by c3 on node-b (which reports first). Returns the two agents once both hold version 2."""
    node_a = connect(channel, "node-a", (C1, "web-1", KEY), (C2, "web-2", KEY))
    node_b = connect(channel, "node-b", (C3, "web-3", KEY))
    node_b.send(baseline_increment=increment("node-b", [(X, [C3]), (Z, [C3])],
                                             containers=[(C3, "web-3")], windows=2))
    update_where(node_b, lambda u: version_of(u) == 1)
    node_a.send(baseline_increment=increment("node-a", [(X, [C1, C2]), (Y, [C1, C2])],
                                             containers=[(C1, "web-1"), (C2, "web-2")],
                                             windows=2))
    for agent in (node_a, node_b):
        update_where(agent, lambda u: version_of(u) == 2)
    return node_a, node_b


def novel_alert(key: str, item: tuple, *, alert_id: str = "c0ffee" * 4,
                kind: AlertKind = AlertKind.NOVEL) -> common_pb2.Alert:
    details = (("item", f"exec {item[1][0]}"), ("item_kind", item[0]),
               ("item_key", list(item[1])))
    alert = Alert(
        id=alert_id, time=1_700_000_000.0, kind=kind, severity=Severity.HIGH, score=1.0,
        reasons=(AlertReason(f"new-{item[0]}", "new exec", details),),
        container={"id": C1, "name": "web-1", "image": "shop/web:1", "image_id": key},
        process=None, events=(), baseline_version=2, baseline_mode="monitor")
    return wire.alert_to_proto(alert, "")


# -- merge, consensus, updates -------------------------------------------------------------------


def test_three_replicas_on_two_nodes_learn_one_baseline_by_consensus(server, channels):
    channel = channels(server)
    node_a, _ = learned_fleet(server, channel)
    baseline = baselines_stub(channel).Get(
        baselines_pb2.GetBaselineRequest(image=KEY), timeout=5).baseline
    # node-b alone first taught X and Z (one container ran); with three, two must show an item
    assert items_of(baseline) == [X, Y]
    assert unconfirmed_of(baseline) == {Z: [(C3, "node-b", "")]}
    summary = baseline.summary
    assert (summary.image_key, summary.image_name, summary.mode, summary.version, summary.items,
            summary.unconfirmed, summary.windows, summary.containers, list(summary.nodes)) == (
        KEY, "shop/web:1", LEARN, 2, 2, 1, 4, 3, ["node-b", "node-a"])
    assert [list(w.values) for w in baseline.windows] == [[0.0, 0.5, 2.0], [1.0, 0.5, 2.0]] * 2
    # both agents hold what the collector holds
    held = {a.node: [(b.image_key, b.version, b.mode) for b in a.baselines]
            for a in agent_pb2_grpc.AgentsStub(channel).List(
                agent_pb2.ListAgentsRequest(), timeout=5).agents}
    assert held == {"node-a": [(KEY, 2, LEARN)], "node-b": [(KEY, 2, LEARN)]}
    # a resent increment changes nothing: no new version, nothing sent
    node_a.send(baseline_increment=increment("node-a", [(X, [C1])], containers=[(C1, "web-1")]))
    node_a.send(heartbeat=heartbeat([(C1, "web-1", KEY)]))
    wait_until(lambda: server.metrics.sample("driftwarden_collector_baseline_increments_total",
                                             {"outcome": "unchanged"}) == 1, "the resend")
    assert server.store.get_baseline(KEY).version == 2
    assert [c for c in node_a.pending(0.3) if c.WhichOneof("body") == "baseline"] == []


def test_the_merged_baseline_is_the_agents_profile_and_its_export(server, channels):
    channel = channels(server)
    learned_fleet(server, channel)
    exported = baselines_stub(channel).Export(
        baselines_pb2.ExportBaselineRequest(image="shop/web:1"), timeout=5).file
    profile = Profile.from_obj(msgpack.unpackb(exported, raw=False, strict_map_key=False),
                               ItemSet)
    assert (profile.image_id, profile.image_name, profile.mode, profile.version) == (
        KEY, "shop/web:1", Mode.LEARN, 2)
    assert list(profile.items) == [ExecItem("/usr/bin/python3", "python3"),
                                   ConnectItem("inet", "private", "10.0.0.5", 5432, "tcp",
                                               "/usr/bin/python3")]
    assert profile.windows == [(0.0, 0.5, 2.0), (1.0, 0.5, 2.0)] * 2
    assert unpack_baseline(exported).unconfirmed() == {Z: (ContainerRef(C3, "node-b"),)}


def test_the_fleet_ends_learning_and_every_agent_gets_the_mode(make_server, channels):
    server = make_server(**{**FLEET, "fleet": FleetSettings(consensus=2, policy=LearningPolicy(
        warmup_seconds=0, stable_seconds=0.5, min_windows=4))})
    channel = channels(server)
    node_a, node_b = learned_fleet(server, channel)
    for agent in (node_a, node_b):
        update = update_where(agent, lambda u: u.baseline.summary.mode == MONITOR, timeout=3)
        assert version_of(update) == 3
    doc = server.store.get_baseline(KEY)
    assert (doc.mode, list(doc.items), doc.unconfirmed()) == (
        Mode.MONITOR, [X, Y], {Z: (ContainerRef(C3, "node-b"),)})
    (change,) = doc.history
    assert (change["from"], change["to"], change["by"]) == ("learn", "monitor", "collector")
    assert change["reason"].startswith("stable: no new behaviour for ")
    entries = [e for e in server.store.list_audit() if e.action == "baseline-mode"]
    assert [(e.actor, e.target, e.decision) for e in entries] == [("collector", KEY, "monitor")]
    # an agent still learning the image is told the mode; nothing of its increment is kept
    node_b.send(baseline_increment=increment("node-b", [(Z, [C3])], windows=3))
    update = update_where(node_b, lambda u: True)
    assert (version_of(update), update.baseline.summary.mode) == (3, MONITOR)
    assert server.store.get_baseline(KEY) == doc


def test_every_change_reaches_both_agents_within_2_seconds(server, channels):
    channel = channels(server)
    node_a, node_b = learned_fleet(server, channel)
    bystander = connect(channel, "node-c", (container_id("db"), "db", OTHER))
    stub = baselines_stub(channel)
    node_a.send_alerts([novel_alert(KEY, Z)])
    node_a.recv_kind("ack")

    def reaches_both(change: Callable[[], object], version: int, mode: int) -> None:
        started = time.monotonic()
        change()
        for agent in (node_a, node_b):
            update = update_where(agent, lambda u: version_of(u) == version)
            assert update.baseline.summary.mode == mode
        assert time.monotonic() - started < 2.0

    reaches_both(lambda: stub.SetMode(baselines_pb2.SetBaselineModeRequest(
        image=KEY, mode=PROTECT, reason="canary is clean"), timeout=5), 3, PROTECT)
    reaches_both(lambda: stub.Accept(baselines_pb2.AcceptAlertRequest(
        alert_id="c0ffee" * 4, reason="nc is our health check"), timeout=5), 4, PROTECT)
    exported = stub.Export(baselines_pb2.ExportBaselineRequest(image=KEY), timeout=5).file
    reaches_both(lambda: stub.Reset(baselines_pb2.ResetBaselineRequest(
        image=KEY, reason="new release"), timeout=5), 5, LEARN)
    reaches_both(lambda: stub.Push(baselines_pb2.PushBaselineRequest(
        file=exported, reason="restore"), timeout=5), 6, MONITOR)
    assert [c for c in bystander.pending(0.3) if c.WhichOneof("body") == "baseline"] == []
    assert server.metrics.sample("driftwarden_collector_baseline_versions_sent_total",
                                 {"cause": "change"}) >= 8


def test_a_request_is_answered_found_or_not(server, channels):
    channel = channels(server)
    learned_fleet(server, channel)
    newcomer = connect(channel, "node-new")  # runs nothing of KEY yet
    newcomer.send(baseline_request=baselines_pb2.BaselineRequest(image_key=KEY))
    update = update_where(newcomer, lambda u: True)
    assert (update.image_key, update.found, version_of(update)) == (KEY, True, 2)
    assert items_of(update.baseline) == [X, Y]
    newcomer.send(baseline_request=baselines_pb2.BaselineRequest(image_key=OTHER))
    update = update_where(newcomer, lambda u: True)
    assert (update.image_key, update.found, update.HasField("baseline")) == (OTHER, False, False)
    # it asked for KEY: later changes reach it too
    baselines_stub(channel).SetMode(baselines_pb2.SetBaselineModeRequest(
        image=KEY, mode=MONITOR, reason="done"), timeout=5)
    assert update_where(newcomer, lambda u: True).baseline.summary.mode == MONITOR


def test_an_agent_that_reconnects_gets_what_changed_while_it_was_away(server, channels):
    channel = channels(server)
    _, node_b = learned_fleet(server, channel)
    node_b.cancel()
    baselines_stub(channel).SetMode(baselines_pb2.SetBaselineModeRequest(
        image=KEY, mode=PROTECT, reason="go"), timeout=5)
    back = connect(channel, "node-b", held=(HeldBaseline(KEY, 2, Mode.LEARN),))
    update = update_where(back, lambda u: True)
    assert (version_of(update), update.baseline.summary.mode) == (3, PROTECT)
    current = connect(channel, "node-d", held=(HeldBaseline(KEY, 3, Mode.PROTECT),))
    assert [c for c in current.pending(0.3) if c.WhichOneof("body") == "baseline"] == []


# -- bad input from agents -----------------------------------------------------------------------


def test_increments_for_an_image_the_agent_does_not_run_are_refused(server, channels):
    channel = channels(server)
    agent = connect(channel, "node-a", (C1, "web-1", KEY))
    agent.send(baseline_increment=increment("node-a", [(Z, [C1])], key=OTHER, windows=2))
    notice = agent.recv_kind("notice")
    assert notice.text == (f"baseline_increment for image {OTHER} refused: this node's "
                           "heartbeats list no container of that image; nothing of it is stored")
    # containers of another node are refused as well
    agent.send(baseline_increment=baselines_pb2.BaselineIncrement(
        image_key=KEY, containers=[baselines_pb2.ContainerRef(container_id=C3, node="node-b")]))
    notice = agent.recv_kind("notice")
    assert notice.text.startswith(f"baseline_increment for image {KEY} refused: container "
                                  f"{C3[:12]} is named as one of node 'node-b', but this stream "
                                  "is node 'node-a'")
    assert server.store.list_baselines() == []
    refused = {reason: server.metrics.sample(
        "driftwarden_collector_baseline_increments_refused_total", {"reason": reason})
        for reason in ("not_running", "other_node")}
    assert refused == {"not_running": 1, "other_node": 1}
    assert [(e.actor, e.action, e.target, e.decision) for e in server.store.list_audit()] == [
        ("node-a", "baseline-increment", OTHER, "refused"),
        ("node-a", "baseline-increment", KEY, "refused")]
    # a malformed increment ends the stream like any invalid message
    agent.send(baseline_increment=baselines_pb2.BaselineIncrement(
        image_key=KEY, items=[baselines_pb2.ItemEvidence(
            item=baselines_pb2.BaselineItem(kind="exec", key=["/bin/sh"]),
            containers=[baselines_pb2.ContainerRef(container_id=C1)])]))
    assert agent.status() == (CODE.INVALID_ARGUMENT, "agent_message.baseline_increment.items[0]"
                              ".item.key: a exec item has 2 fields, got 1")


def test_increments_are_judged_in_stream_order_and_merged_before_the_stream_ends(server,
                                                                               channels):
    """A stream's increments are merged by a thread of their own (alert batches do not wait
    behind them), yet each is judged by the heartbeats sent before it, alerts are acked
    meanwhile, and the stream ends once every increment sent before its close is merged."""
    channel = channels(server)
    agent = connect(channel, "node-a", (C1, "web-1", KEY))
    agent.send(baseline_increment=increment("node-a", [(Z, [C1])], key=OTHER, windows=2))
    agent.send(heartbeat=heartbeat([(C1, "web-1", KEY), (C2, "web-2", OTHER)]))
    assert agent.recv_kind("notice").text.startswith(
        f"baseline_increment for image {OTHER} refused: this node's heartbeats list no "
        "container of that image")
    agent.send(baseline_increment=increment("node-a", [(X, [C1])], containers=[(C1, "web-1")],
                                            windows=2))
    agent.send_alerts([novel_alert(KEY, Y)], spool_seqs=[7])
    agent.send(baseline_increment=increment("node-a", [(Y, [C1, C2])], key=OTHER,
                                            containers=[(C2, "web-2")], windows=1))
    agent.close()
    commands = agent.pending(5.0)  # until the stream ends
    assert [list(c.ack.spool_seqs) for c in commands if c.WhichOneof("body") == "ack"] == [[7]]
    assert agent.status() == (CODE.OK, "")
    assert (server.store.get_baseline(KEY).version, server.store.get_baseline(OTHER).version) \
        == (1, 1)
    assert server.metrics.sample("driftwarden_collector_baseline_increments_total",
                                 {"outcome": "merged"}) == 2


# -- the Baselines service -----------------------------------------------------------------------


def test_list_get_and_diff_name_images_by_key_prefix_or_name(server, channels):
    channel = channels(server)
    learned_fleet(server, channel)
    agent = connect(channel, "node-c", (container_id("v2"), "web-v2", OTHER))
    agent.send(baseline_increment=increment("node-c", [(X, [container_id("v2")]),
                                                       (Z, [container_id("v2")])],
                                            key=OTHER, name="shop/web:2", windows=1))
    update_where(agent, lambda u: version_of(u) == 1)
    stub = baselines_stub(channel)
    listed = stub.List(baselines_pb2.ListBaselinesRequest(), timeout=5).baselines
    assert [(s.image_key, s.image_name, s.version, s.items, s.unconfirmed) for s in listed] == [
        (OTHER, "shop/web:2", 1, 2, 0), (KEY, "shop/web:1", 2, 2, 1)]
    for image in (KEY, "a1a1a1", "sha256:a1a1", "shop/web:1", "shop/web@" + KEY):
        got = stub.Get(baselines_pb2.GetBaselineRequest(image=image), timeout=5).baseline
        assert got.summary.image_key == KEY, image
    # a repository without a tag: its newest key
    assert stub.Get(baselines_pb2.GetBaselineRequest(image="shop/web"),
                    timeout=5).baseline.summary.image_key == OTHER
    diff = stub.Diff(baselines_pb2.DiffBaselinesRequest(a="shop/web:1", b="shop/web:2"),
                     timeout=5)
    assert (diff.a.image_key, diff.b.image_key) == (KEY, OTHER)
    assert ([wire.baseline_item_from_proto(i) for i in diff.only_in_a],
            [wire.baseline_item_from_proto(i) for i in diff.only_in_b]) == ([Y], [Z])
    err = rpc_error(lambda: stub.Get(baselines_pb2.GetBaselineRequest(image="nginx:1.25"),
                                     timeout=5))
    assert (err.code(), err.details()) == (
        CODE.NOT_FOUND, "no baseline matches image 'nginx:1.25': give an image key "
        "(sha256:...), a unique prefix of its digits (at least 4) or an image name[:tag] "
        "(`driftwarden baseline list` shows them)")
    err = rpc_error(lambda: stub.Get(baselines_pb2.GetBaselineRequest(image="web"), timeout=5))
    assert err.code() == CODE.NOT_FOUND and err.details().endswith(
        f"; similar: shop/web:2 ({OTHER[:19]}), shop/web:1 ({KEY[:19]})")


def test_an_ambiguous_prefix_names_the_candidates(server, channels):
    for key in ("sha256:" + "ab" * 31 + "01", "sha256:" + "ab" * 31 + "02"):
        server.store.put_baseline(FleetBaseline(image_key=key, image_name="x:1", created_at=1.0,
                                                updated_at=1.0), expect_version=None)
    err = rpc_error(lambda: baselines_stub(channels(server)).Get(
        baselines_pb2.GetBaselineRequest(image="abab"), timeout=5))
    assert (err.code(), err.details()) == (
        CODE.FAILED_PRECONDITION, "image 'abab' is ambiguous (a prefix of 2 baselines' keys): "
        f"x:1 (sha256:{'ab' * 6}), x:1 (sha256:{'ab' * 6}); give more of the key")


def test_set_mode_is_audited_with_its_reason_and_needs_one(server, channels):
    channel = channels(server)
    learned_fleet(server, channel)
    stub = baselines_stub(channel)
    reply = stub.SetMode(baselines_pb2.SetBaselineModeRequest(
        image="shop/web:1", mode=PROTECT, reason="reviewed"), timeout=5)
    assert (reply.baseline.mode, reply.baseline.version) == (PROTECT, 3)
    doc = server.store.get_baseline(KEY)
    assert doc.history[-1] | {"at": 0} == {"at": 0, "from": "learn", "to": "protect",
                                           "reason": "reviewed", "by": "operator"}
    # leaving learn fixes the items: the unconfirmed keep their evidence, nothing else does
    assert (list(doc.items), list(doc.evidence)) == ([X, Y], [Z])
    entry = server.store.list_audit()[-1]
    assert (entry.actor, entry.action, entry.target, entry.decision, entry.reason,
            entry.details) == ("operator", "baseline-mode", KEY, "protect", "reviewed",
                               {"from": "learn", "image": "shop/web:1", "version": 3})
    for request, message in (
            (baselines_pb2.SetBaselineModeRequest(image=KEY, mode=MONITOR, reason="  "),
             "set_baseline_mode_request.reason: missing"),
            (baselines_pb2.SetBaselineModeRequest(image=KEY, reason="r"),
             "set_baseline_mode_request.mode: unspecified; set one of MODE_LEARN, MODE_MONITOR,"
             " MODE_PROTECT")):
        err = rpc_error(lambda r=request: stub.SetMode(r, timeout=5))
        assert (err.code(), err.details()) == (CODE.INVALID_ARGUMENT, message)
    err = rpc_error(lambda: stub.SetMode(baselines_pb2.SetBaselineModeRequest(
        image=OTHER, mode=MONITOR, reason="r"), timeout=5))
    assert err.code() == CODE.NOT_FOUND
    assert err.details().startswith(f"no baseline matches image '{OTHER}'")
    assert server.store.get_baseline(KEY) == doc and server.store.get_baseline(OTHER) is None


def test_accept_adds_a_novel_alerts_item(server, channels):
    channel = channels(server)
    node_a, _ = learned_fleet(server, channel)
    node_a.send_alerts([novel_alert(KEY, Z), novel_alert(KEY, X, alert_id="d1" * 12,
                                                        kind=AlertKind.DRIFT)])
    node_a.recv_kind("ack")
    stub = baselines_stub(channel)
    reply = stub.Accept(baselines_pb2.AcceptAlertRequest(alert_id="c0ffee" * 4), timeout=5)
    assert [wire.baseline_item_from_proto(i) for i in reply.added] == [Z]
    assert (reply.baseline.items, reply.baseline.unconfirmed, reply.baseline.version) == (3, 0, 3)
    entry = server.store.list_audit()[-1]
    assert (entry.action, entry.decision, entry.reason, entry.details["added"]) == (
        "baseline-accept", "accepted", f"accepted alert {'c0ffee' * 4}", ["exec /bin/nc nc"])
    again = stub.Accept(baselines_pb2.AcceptAlertRequest(alert_id="c0ffee" * 4), timeout=5)
    assert (list(again.added), again.baseline.version) == ([], 3)
    # an alert whose item the baseline has already adds nothing
    assert stub.Accept(baselines_pb2.AcceptAlertRequest(alert_id="d1" * 12),
                       timeout=5).baseline.version == 3
    err = rpc_error(lambda: stub.Accept(baselines_pb2.AcceptAlertRequest(alert_id="e2" * 12),
                                        timeout=5))
    assert (err.code(), err.details()) == (
        CODE.NOT_FOUND, f"no alert {'e2' * 12} is stored (`driftwarden alerts --collector` "
        "lists them)")


def test_accept_reads_the_items_of_a_stored_alert_defensively():
    def alert(*reasons):
        return {"id": "x", "kind": "novel", "reasons": list(reasons)}

    connect_key = ["inet", "private", "10.0.0.5", 5432, "tcp", "/usr/bin/python3"]
    assert alert_items(alert(
        {"code": "new-connect", "details": {"item_kind": "connect", "item_key": connect_key}},
        {"code": "new-exec", "details": [["item_kind", "exec"],
                                         ["item_key", '["/bin/nc", "nc"]']]},
        {"code": "new-exec", "details": {"item_kind": "exec", "item_key": ["/bin/nc"]}},
        {"code": "new-exec", "details": {"item_kind": "nope", "item_key": ["a", "b"]}},
        {"code": "exec-added-binary", "details": {"path": "/tmp/x"}},
        "junk", {"details": None})) == [Y, Z]
    assert alert_items({"id": "x"}) == []


def test_an_alert_without_an_item_cannot_be_accepted(server, channels):
    channel = channels(server)
    node_a, _ = learned_fleet(server, channel)
    plain = Alert(id="f3" * 12, time=1.0, kind=AlertKind.DRIFT, severity=Severity.HIGH,
                  score=1.0, reasons=(AlertReason("exec-added-binary", "ran /tmp/x"),),
                  container={"id": C1, "image_id": KEY}, process=None, events=(),
                  baseline_version=1)
    node_a.send_alerts([wire.alert_to_proto(plain, "")])
    node_a.recv_kind("ack")
    err = rpc_error(lambda: baselines_stub(channel).Accept(
        baselines_pb2.AcceptAlertRequest(alert_id="f3" * 12), timeout=5))
    assert (err.code(), err.details()) == (
        CODE.FAILED_PRECONDITION, f"alert {'f3' * 12} (drift) carries no baseline item: only "
        "novel alerts (new exec, lineage, connect or write) can be accepted")


def test_reset_forgets_items_and_windows_and_learns_again(server, channels):
    channel = channels(server)
    learned_fleet(server, channel)
    stub = baselines_stub(channel)
    reply = stub.Reset(baselines_pb2.ResetBaselineRequest(image=KEY, reason="rebuilt"),
                       timeout=5)
    assert (reply.baseline.mode, reply.baseline.version, reply.baseline.items,
            reply.baseline.unconfirmed, reply.baseline.windows, reply.baseline.containers) == (
        LEARN, 3, 0, 0, 0, 0)
    doc = server.store.get_baseline(KEY)
    assert doc.history[-1]["reason"] == "reset: rebuilt"
    entry = server.store.list_audit()[-1]
    assert (entry.action, entry.details["items"], entry.details["windows"]) == (
        "baseline-reset", 2, 4)
    err = rpc_error(lambda: stub.Reset(baselines_pb2.ResetBaselineRequest(image=KEY),
                                       timeout=5))
    assert (err.code(), err.details()) == (CODE.INVALID_ARGUMENT,
                                           "reset_baseline_request.reason: missing")


def test_push_stores_a_file_for_its_key_and_refuses_others(server, channels):
    channel = channels(server)
    stub = baselines_stub(channel)
    ci = FleetBaseline(image_key=KEY, image_name="shop/web:1", version=7, created_at=1.0,
                       updated_at=2.0, items={X: None, Z: None}, windows=[(1.0, 2.0, 3.0)])
    ci_file = pack_baseline(ci)
    for request, message in (
            (baselines_pb2.PushBaselineRequest(file=b"\xc1 not msgpack"),
             "not a baseline file: corrupt or truncated msgpack"),
            (baselines_pb2.PushBaselineRequest(file=msgpack.packb({"format": 1})),
             "not a usable baseline file: missing field 'image_id'"),
            (baselines_pb2.PushBaselineRequest(file=ci_file, image_key=OTHER),
             f"the file is a baseline of image {KEY}, not of {OTHER}: push it for its own "
             "image (give no image, or that key); a baseline is never stored for another "
             "image's key"),
            (baselines_pb2.PushBaselineRequest(), "push_baseline_request.file: missing")):
        err = rpc_error(lambda r=request: stub.Push(r, timeout=5))
        assert err.code() == CODE.INVALID_ARGUMENT
        assert err.details().startswith(message), err.details()
    assert server.store.list_baselines() == [] and server.store.list_audit() == []
    node = connect(channel, "node-a", (C1, "web-1", KEY))
    node.send(baseline_request=baselines_pb2.BaselineRequest(image_key=KEY))
    assert update_where(node, lambda u: True).found is False
    reply = stub.Push(baselines_pb2.PushBaselineRequest(file=ci_file, image_key=KEY),
                      timeout=5)
    assert (reply.baseline.image_key, reply.baseline.mode, reply.baseline.version,
            reply.baseline.items) == (KEY, MONITOR, 8, 2)
    update = update_where(node, lambda u: True)
    assert (update.found, version_of(update), items_of(update.baseline)) == (
        True, 8, [X, Z])
    doc = server.store.get_baseline(KEY)
    assert doc.history[-1] | {"at": 0} == {"at": 0, "from": "learn", "to": "monitor",
                                           "reason": "pushed by operator",
                                           "by": "push by operator"}
    entry = server.store.list_audit()[-1]
    assert (entry.actor, entry.action, entry.target, entry.decision) == (
        "operator", "baseline-push", KEY, "stored")
    # pushed again with a mode: the version goes on from the stored one
    reply = stub.Push(baselines_pb2.PushBaselineRequest(file=ci_file, mode=PROTECT,
                                                        reason="CI run 4711"), timeout=5)
    assert (reply.baseline.mode, reply.baseline.version) == (PROTECT, 9)
    assert server.store.get_baseline(KEY).history[-1]["reason"] == "CI run 4711"


def test_baselines_need_an_operator(make_server, channels):
    server = make_server(**FLEET, operator_token="s3cret")
    stub = baselines_stub(channels(server))
    err = rpc_error(lambda: stub.List(baselines_pb2.ListBaselinesRequest(), timeout=5))
    assert err.code() == CODE.UNAUTHENTICATED
    reply = stub.List(baselines_pb2.ListBaselinesRequest(), timeout=5,
                      metadata=(("authorization", "Bearer s3cret"),))
    assert list(reply.baselines) == []


# -- restart -------------------------------------------------------------------------------------


def test_a_restart_keeps_baselines_modes_and_what_agents_held(make_server, channels):
    server = make_server(**FLEET)
    channel = channels(server)
    agents = learned_fleet(server, channel)
    baselines_stub(channel).SetMode(baselines_pb2.SetBaselineModeRequest(
        image=KEY, mode=PROTECT, reason="go"), timeout=5)
    for agent in agents:
        update_where(agent, lambda u: version_of(u) == 3)
    before = server.store.get_baseline(KEY)
    server.stop(0.5)
    again = make_server(**FLEET)
    channel = channels(again)
    listed = baselines_stub(channel).List(baselines_pb2.ListBaselinesRequest(),
                                          timeout=5).baselines
    assert [(s.image_key, s.mode, s.version, s.items, s.unconfirmed) for s in listed] == [
        (KEY, PROTECT, 3, 2, 1)]
    assert again.store.get_baseline(KEY) == before
    held = {a.node: [(b.image_key, b.version, b.mode) for b in a.baselines]
            for a in agent_pb2_grpc.AgentsStub(channel).List(
                agent_pb2.ListAgentsRequest(), timeout=5).agents}
    assert held == {"node-a": [(KEY, 3, PROTECT)], "node-b": [(KEY, 3, PROTECT)]}


# -- pieces --------------------------------------------------------------------------------------


def test_consensus_needs_n_containers_only_when_n_ran():
    assert [required_containers(2, ran) for ran in (0, 1, 2, 3)] == [1, 1, 2, 2]
    assert [required_containers(3, ran) for ran in (2, 3)] == [1, 3]
    with pytest.raises(ValueError, match=r"consensus must be 1\.\.32 containers, got 0"):
        FleetSettings(consensus=0)


def test_the_baseline_file_reads_an_agents_profile_and_refuses_junk():
    profile = Profile(image_id=KEY, image_name="shop/web:1", items=ItemSet(),
                      created_at=5.0, updated_at=6.0)
    profile.items.add(ExecItem("/bin/sh", "sh"))
    profile.windows.append((1.0, 2.0))
    doc = FleetBaseline.from_file_obj(profile.to_obj())
    assert (doc.image_key, list(doc.items), doc.windows, doc.mode, doc.version) == (
        KEY, [("exec", ("/bin/sh", "sh"))], [(1.0, 2.0)], Mode.LEARN, 1)
    assert Profile.from_obj(doc.to_file_obj(), ItemSet).to_obj() == profile.to_obj()
    assert unpack_baseline(pack_baseline(doc)) == doc
    obj = profile.to_obj()
    obj["items"]["items"]["connect"] = [["inet", "public", "1.1.1.1", "x", "tcp", "?"]]
    with pytest.raises(BaselineError, match=r"a connect item's port must be a number 0\.\.65535"):
        FleetBaseline.from_file_obj(obj)
    with pytest.raises(BaselineError, match="baseline file format 2; this driftwarden reads"):
        FleetBaseline.from_file_obj({**profile.to_obj(), "format": 2})
    with pytest.raises(BaselineError, match="its top level is not a map"):
        unpack_baseline(msgpack.packb([1, 2]))


def test_the_store_compares_versions_and_keeps_what_agents_hold(open_store):
    doc = FleetBaseline(image_key=KEY, image_name="shop/web:1", created_at=1.0, updated_at=2.0,
                        items={X: None})
    with open_store() as store:  # each backend
        store.put_baseline(doc, expect_version=None)
        with pytest.raises(StoreError, match=r"a baseline of .* is stored already"):
            store.put_baseline(doc, expect_version=None)
        doc.version = 2
        with pytest.raises(StoreError, match=r"changed meanwhile \(not at version 5 any more"):
            store.put_baseline(doc, expect_version=5)
        store.put_baseline(doc, expect_version=1)
        assert store.get_baseline(KEY) == doc and store.get_baseline(OTHER) is None
        [summary] = store.list_baselines()
        assert (summary.version, summary.items, summary.learning_started_at) == (2, 1, 1.0)
        held = (HeldBaseline(KEY, 2, Mode.LEARN),)
        store.upsert_agent("node-a", baselines=held)
        store.upsert_agent("node-a", counters={})  # keeps them
        assert store.get_agent("node-a").baselines == held
        store.mark_agent_disconnected("node-a", baselines=())
        assert store.get_agent("node-a").baselines == ()
        assert store.stats()["baselines"] == 1


def test_the_collector_command_takes_the_learning_settings(tmp_path):
    parser = CommandParser(prog="driftwarden")
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["collector", "--db", str(tmp_path / "c.db"), "--consensus", "3",
                              "--learn-for", "600", "--learn-stable-for", "30",
                              "--learn-min-windows", "5", "--learn-warmup", "10"])
    assert config_from_args(args).fleet == FleetSettings(consensus=3, policy=LearningPolicy(
        warmup_seconds=10, stable_seconds=30, min_windows=5, learn_for=600))
    defaults = config_from_args(parser.parse_args(["collector", "--db",
                                                   str(tmp_path / "c.db")]))
    assert defaults.fleet == FleetSettings()
    with pytest.raises(SystemExit):
        parser.parse_args(["collector", "--db", "x", "--consensus", "0"])
