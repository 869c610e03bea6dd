"""Fleet baselines, the agent's side (agent/fleet.py, agent/detect.py, agent/channel.py): the
wire's baseline items, requests and holds, increments and what survives a reconnect, applying
the collector's baselines. The channel runs real gRPC over 127.0.0.1 against
tests/support/fake_collector; the detector gets synthetic records."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
from driftwarden.agent.alerts import ListAlertSink
from driftwarden.agent.channel import ChannelConfig, CollectorChannel
from driftwarden.agent.detect import Detector, DetectorConfig
from driftwarden.agent.fleet import FLEET_FILE, FleetBaselines, FleetConfig, profile_from_baseline
from driftwarden.core.alerts import AlertKind
from driftwarden.core.errors import InvalidMessage
from driftwarden.core.modes import Mode
from driftwarden.core.records import ContainerView, Program, TraceRecord
from driftwarden.core.wire import (
    BASELINE_ITEM_FIELDS,
    MODE,
    baseline_item_from_proto,
    baseline_item_to_proto,
    validate_agent_message,
    validate_collector_command,
)
from driftwarden.models.features import FEATURES
from driftwarden.models.items import (
    ITEM_TYPES,
    ConnectItem,
    ExecItem,
    ItemSet,
    LineageItem,
    WriteItem,
    item_from_key,
)
from driftwarden.models.profile import LearningPolicy, Profile, ProfileStore
from driftwarden.probes._layout import AT_FDCWD, EventKind, Flag
from driftwarden.probes.events import ExecEvent, Header
from driftwarden.proto.v1 import agent_pb2, baselines_pb2

from tests.support.fake_collector import FakeCollector

NODE = "node-1"
KEY = "sha256:" + "ab" * 32
OTHER_KEY = "sha256:" + "cd" * 32
A_ID, B_ID = "a" * 64, "b" * 64
SH = ExecItem("/bin/busybox", "sh")
SLEEP = ExecItem("/bin/busybox", "sleep")
NC = ExecItem("/bin/busybox", "nc")
LOG = WriteItem("/data/app.log", "append")
DB = ConnectItem("inet", "loopback", "127.0.0.1", 5432, "tcp", "/bin/busybox")
ZERO = tuple(0.0 for _ in FEATURES)


def wait_until(predicate, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.01)
    return predicate()


def proto_baseline(key: str = KEY, *, version: int, mode: str = "monitor", items=(),
                   unconfirmed: dict | None = None, windows=(), name: str = "shop/web:1"
                   ) -> baselines_pb2.Baseline:
    return baselines_pb2.Baseline(
        summary=baselines_pb2.BaselineSummary(image_key=key, image_name=name,
                                              mode=MODE.to_proto(mode), version=version),
        items=[baseline_item_to_proto(i.KIND, i.key()) for i in items],
        unconfirmed=[baselines_pb2.ItemEvidence(
            item=baseline_item_to_proto(i.KIND, i.key()),
            containers=[baselines_pb2.ContainerRef(container_id=c, node=NODE) for c in cids])
            for i, cids in (unconfirmed or {}).items()],
        windows=[baselines_pb2.FeatureWindow(values=w) for w in windows])


def evidence(increment: baselines_pb2.BaselineIncrement) -> dict:
    """{item: sorted container ids} of an increment."""
    return {item_from_key(*baseline_item_from_proto(e.item)): sorted(c.container_id
                                                                      for c in e.containers)
            for e in increment.items}


# -- the wire ---------------------------------------------------------------------------------


@pytest.mark.parametrize("item", [SH, LineageItem("/bin/busybox:sh", "/bin/busybox:nc"), DB,
                                  ConnectItem("unix", "unix", "/run/x.sock", 0, "tcp", "?"),
                                  LOG])
def test_an_item_crosses_the_wire_as_texts_and_comes_back_the_same(item):
    msg = baseline_item_to_proto(item.KIND, item.key())
    assert all(isinstance(field, str) for field in msg.key)
    assert item_from_key(*baseline_item_from_proto(msg)) == item


def test_the_wire_knows_each_item_kinds_key_fields_as_models_items_does():
    examples = {"exec": SH, "lineage": LineageItem("a:b", "c:d"), "connect": DB, "write": LOG}
    assert set(BASELINE_ITEM_FIELDS) == set(ITEM_TYPES) == set(examples)
    for kind, item in examples.items():
        assert tuple(type(v) for v in item.key()) == BASELINE_ITEM_FIELDS[kind]


@pytest.mark.parametrize(("kind", "key", "message"), [
    ("spawn", ["x"], "item.kind: 'spawn' is not an item kind (one of exec, lineage, connect, "
                     "write)"),
    ("exec", ["/bin/sh"], "item.key: a exec item has 2 fields, got 1"),
    ("connect", ["inet", "public", "1.2.3.4", "80x", "tcp", "/bin/nc"],
     "item.key[3]: must be a decimal number, got '80x'"),
    ("connect", ["inet", "public", "1.2.3.4", "-1", "tcp", "/bin/nc"],
     "item.key[3]: must be a decimal number, got '-1'"),
])
def test_a_bad_item_is_refused_naming_its_field(kind, key, message):
    with pytest.raises(InvalidMessage) as err:
        baseline_item_from_proto(baselines_pb2.BaselineItem(kind=kind, key=key))
    assert str(err.value) == message


def update_command(update: baselines_pb2.BaselineUpdate) -> agent_pb2.CollectorCommand:
    return agent_pb2.CollectorCommand(baseline=update)


def test_baseline_updates_are_checked_and_a_whole_baseline_fits_the_limits():
    many = [ExecItem(f"/usr/bin/tool{i}", f"tool{i}") for i in range(5000)]
    big = proto_baseline(version=3, items=many, windows=[ZERO] * 2000)
    validate_collector_command(update_command(baselines_pb2.BaselineUpdate(
        image_key=KEY, found=True, baseline=big)))
    validate_collector_command(update_command(baselines_pb2.BaselineUpdate(image_key=KEY)))
    cases = [
        (baselines_pb2.BaselineUpdate(found=False), "collector_command.baseline.image_key: "
                                                    "missing"),
        (baselines_pb2.BaselineUpdate(image_key=KEY, found=True),
         "collector_command.baseline.baseline: missing (found is set)"),
        (baselines_pb2.BaselineUpdate(image_key=KEY, found=True,
                                      baseline=proto_baseline(OTHER_KEY, version=1)),
         f"collector_command.baseline.baseline.summary.image_key: '{OTHER_KEY[:40]}...' is not "
         f"the update's image '{KEY[:40]}...'"),
        (baselines_pb2.BaselineUpdate(image_key=KEY, found=True,
                                      baseline=proto_baseline(version=0)),
         "collector_command.baseline.baseline.summary.version: must be at least 1, got 0"),
    ]
    for update, message in cases:
        with pytest.raises(InvalidMessage) as err:
            validate_collector_command(update_command(update))
        assert str(err.value) == message
    bad_item = proto_baseline(version=2)
    bad_item.items.add(kind="exec", key=["/bin/sh"])
    with pytest.raises(InvalidMessage) as err:
        validate_collector_command(update_command(baselines_pb2.BaselineUpdate(
            image_key=KEY, found=True, baseline=bad_item)))
    assert str(err.value) == ("collector_command.baseline.baseline.items[0].key: a exec item "
                              "has 2 fields, got 1")


def test_increments_and_requests_are_checked():
    good = baselines_pb2.BaselineIncrement(image_key=KEY, items=[baselines_pb2.ItemEvidence(
        item=baseline_item_to_proto("exec", SH.key()),
        containers=[baselines_pb2.ContainerRef(container_id=A_ID, node=NODE)])])
    validate_agent_message(agent_pb2.AgentMessage(seq=1, baseline_increment=good))
    validate_agent_message(agent_pb2.AgentMessage(
        seq=1, baseline_request=baselines_pb2.BaselineRequest(image_key=KEY)))
    no_one = baselines_pb2.BaselineIncrement(image_key=KEY, items=[baselines_pb2.ItemEvidence(
        item=baseline_item_to_proto("exec", SH.key()))])
    cases = [
        (agent_pb2.AgentMessage(seq=1, baseline_request=baselines_pb2.BaselineRequest()),
         "agent_message.baseline_request.image_key: missing"),
        (agent_pb2.AgentMessage(seq=1, baseline_increment=no_one),
         "agent_message.baseline_increment.items[0].containers: empty (who showed the item?)"),
        (agent_pb2.AgentMessage(seq=1, baseline_increment=baselines_pb2.BaselineIncrement(
            image_key=KEY, windows=[baselines_pb2.FeatureWindow(values=[float("nan")])])),
         "agent_message.baseline_increment.windows[0].values: every value must be a finite "
         "number"),
        (agent_pb2.AgentMessage(seq=1, hello=agent_pb2.Hello(
            node=NODE, agent_version="1", mode=MODE.to_proto("learn"),
            started_at={"seconds": 1}, baselines=[baselines_pb2.BaselineVersion(
                image_key=KEY, version=3)])),
         "agent_message.hello.baselines[0].mode: unspecified; set one of MODE_LEARN, "
         "MODE_MONITOR, MODE_PROTECT"),
    ]
    for msg, message in cases:
        with pytest.raises(InvalidMessage) as err:
            validate_agent_message(msg)
        assert str(err.value) == message


# -- the channel ------------------------------------------------------------------------------


@pytest.fixture
def collector():
    with FakeCollector() as server:
        yield server


def channel_config(address: str, **kw: Any) -> ChannelConfig:
    args: dict[str, Any] = dict(address=address, node=NODE, hostname="host-a",
                                started_at=1_700_000_000.5, heartbeat_seconds=60.0,
                                backoff_initial=0.02, backoff_max=0.1, spool_fsync=False)
    args.update(kw)
    return ChannelConfig(**args)


def make_fleet(state_dir: Path, **kw: Any) -> FleetBaselines:
    kw.setdefault("image_layers", lambda cid: ("sha256:base", "sha256:app"))
    return FleetBaselines(FleetConfig(node=NODE, increment_seconds=kw.pop("every", 0.2)),
                          state_dir, **kw)


RUNNING = [(A_ID, "web-1", KEY, "shop/web:1"), (B_ID, "db-1", OTHER_KEY, "shop/db:2")]


def open_channel(address: str, state_dir: Path, fleet: FleetBaselines, *,
                 running: list | None = None) -> CollectorChannel:
    """A channel whose heartbeats list `running` (default: a container of each image)."""
    rows = RUNNING if running is None else running
    channel = CollectorChannel(channel_config(address), state_dir / "spool", fleet=fleet,
                               containers=lambda: rows)
    channel.start()
    assert wait_until(lambda: fleet.connected)
    return channel


def test_hello_lists_the_fleet_copies_held_here(collector, tmp_path):
    (tmp_path / FLEET_FILE).write_text(json.dumps({"format": 1, "baselines": {
        KEY: {"version": 7, "mode": "monitor"}, OTHER_KEY: {"version": 2, "mode": "learn"}}}))
    fleet = make_fleet(tmp_path, has_copy=lambda key: key == KEY)  # OTHER_KEY's file is gone
    with open_channel(collector.address, tmp_path, fleet):
        assert collector.wait_for(lambda: collector.messages("hello"))
    hello = collector.messages("hello")[0].hello
    assert [(b.image_key, b.version, MODE.from_proto(b.mode)) for b in hello.baselines] == [
        (KEY, 7, "monitor")]
    assert collector.invalid() == []


def test_a_new_image_is_asked_for_and_its_records_held_until_the_answer(collector, tmp_path):
    collector.baselines[KEY] = proto_baseline(version=4, items=[SH])
    fleet = make_fleet(tmp_path)
    with open_channel(collector.address, tmp_path, fleet):
        assert fleet.see(KEY, "shop/web:1", A_ID) is True  # connected, no copy: hold
        assert wait_until(lambda: fleet.answered(KEY))
        assert fleet.see(OTHER_KEY, "shop/db:2", B_ID) is True
        assert wait_until(lambda: fleet.answered(OTHER_KEY))
        updates = {u.image_key: u for u in fleet.take_updates()}
    assert [(r.image_key, r.image_name, list(r.layers)) for r in collector.requests()] == [
        (KEY, "shop/web:1", ["sha256:base", "sha256:app"]),
        (OTHER_KEY, "shop/db:2", ["sha256:base", "sha256:app"])]
    assert (updates[KEY].found, updates[KEY].baseline.summary.version) == (True, 4)
    assert updates[OTHER_KEY].found is False
    assert fleet.take_updates() == []


def test_an_image_is_not_held_without_a_stream_or_with_a_fleet_copy(tmp_path):
    fleet = make_fleet(tmp_path)
    assert fleet.see(KEY, "shop/web:1", A_ID) is False  # no collector: nothing to wait for
    fleet.applied(OTHER_KEY, 3, Mode.MONITOR)
    fleet.stream_started(1)
    assert fleet.see(OTHER_KEY, "shop/db:2", B_ID) is False  # the local copy serves
    assert json.loads((tmp_path / FLEET_FILE).read_text())["baselines"] == {
        OTHER_KEY: {"version": 3, "mode": "monitor"}}
    # both are asked for on the stream (the copy may be outdated)
    messages = [fleet.next_message(1, 100.0), fleet.next_message(1, 100.0)]
    assert sorted(m["baseline_request"].image_key for m in messages) == [KEY, OTHER_KEY]


def test_increments_carry_each_item_with_the_containers_that_showed_it(collector, tmp_path):
    collector.answer_requests = False
    fleet = make_fleet(tmp_path)
    with open_channel(collector.address, tmp_path, fleet):
        fleet.see(KEY, "shop/web:1", A_ID)
        fleet.learned(KEY, "shop/web:1", [SH, LOG], A_ID, "web-1")
        fleet.learned(KEY, "shop/web:1", [SH, LOG], A_ID, "web-1")  # said once
        fleet.learned(KEY, "shop/web:1", [SH], B_ID, "web-2")
        fleet.window(KEY, ZERO)
        fleet.window(KEY, tuple(1.0 for _ in FEATURES))
        assert collector.wait_for(lambda: collector.increments())
        fleet.learned(KEY, "shop/web:1", [SH, DB], B_ID, "web-2")
        assert collector.wait_for(lambda: len(collector.increments()) == 2)
    first, second = collector.increments()[:2]
    assert (first.image_key, first.image_name, first.based_on_version) == (KEY, "shop/web:1", 0)
    assert evidence(first) == {SH: [A_ID, B_ID], LOG: [A_ID]}
    assert [(c.container_id, c.node, c.name) for c in first.containers] == [
        (A_ID, NODE, "web-1"), (B_ID, NODE, "web-2")]
    assert [list(w.values) for w in first.windows] == [list(ZERO), [1.0] * len(FEATURES)]
    assert list(first.layers) == ["sha256:base", "sha256:app"]
    assert evidence(second) == {DB: [B_ID]}  # only what is new
    assert list(second.windows) == []
    assert collector.invalid() == []


def test_an_increment_waits_for_a_heartbeat_that_lists_its_image(collector, tmp_path):
    """The collector takes increments only for images this stream's heartbeats listed: the
    agent asks for an early heartbeat (a second apart, three at most) and sends the increment
    after one that lists the image."""
    collector.answer_requests = False
    rows: list = []
    fleet = make_fleet(tmp_path)
    with open_channel(collector.address, tmp_path, fleet, running=rows):
        assert collector.wait_for(lambda: collector.messages("heartbeat"))  # the first one
        fleet.see(KEY, "shop/web:1", A_ID)
        fleet.learned(KEY, "shop/web:1", [SH], A_ID, "web-1")
        assert collector.wait_for(lambda: len(collector.messages("heartbeat")) == 2)
        rows.append(RUNNING[0])  # the runtime lists the container from now on
        assert collector.wait_for(lambda: collector.increments())
        bodies = collector.streams[0].bodies()
    heartbeats = collector.messages("heartbeat")
    assert [[c.image.id for c in h.heartbeat.containers] for h in heartbeats[:3]] == [
        [], [], [KEY]]
    assert bodies.index("baseline_increment") > [i for i, b in enumerate(bodies)
                                                  if b == "heartbeat"][2]
    assert (heartbeats[2].heartbeat.sent_at.ToNanoseconds()
                   - heartbeats[1].heartbeat.sent_at.ToNanoseconds()) / 1e9 >= 0.9


def test_a_collector_outage_loses_no_increment(tmp_path):
    """What a stream carried without a sign of its merge goes again on the next stream;
    what an update shows merged does not."""
    collector = FakeCollector().start()
    collector.answer_requests = False
    fleet = make_fleet(tmp_path)
    try:
        with open_channel(collector.address, tmp_path, fleet):
            fleet.see(KEY, "shop/web:1", A_ID)
            fleet.learned(KEY, "shop/web:1", [SH, LOG], A_ID, "web-1")
            fleet.window(KEY, ZERO)
            assert collector.wait_for(lambda: collector.increments())
            port = collector.port
            collector.stop()  # before any update: nothing is known merged
            assert wait_until(lambda: not fleet.connected)
            fleet.learned(KEY, "shop/web:1", [NC], A_ID, "web-1")  # learned meanwhile
            collector = FakeCollector(port=port).start()
            collector.answer_requests = False
            assert collector.wait_for(lambda: collector.increments())
            again = collector.increments()[0]
            assert evidence(again) == {SH: [A_ID], LOG: [A_ID], NC: [A_ID]}
            assert len(again.windows) == 1
            assert [r.image_key for r in collector.requests()] == [KEY]  # asked again
            # the collector merged SH (confirmed) and LOG (unconfirmed, shown by A_ID): only
            # NC, which it did not show, and nothing of the windows go again
            collector.send_baseline(proto_baseline(version=2, mode="learn", items=[SH],
                                                   unconfirmed={LOG: [A_ID]}))
            assert wait_until(lambda: fleet.answered(KEY) and fleet.stats["updates"] == 1)
            port = collector.port
            collector.stop()
            assert wait_until(lambda: not fleet.connected)
            collector = FakeCollector(port=port).start()
            collector.answer_requests = False
            assert collector.wait_for(lambda: collector.increments())
            third = collector.increments()[0]
            assert evidence(third) == {NC: [A_ID]}
            assert list(third.windows) == []
    finally:
        collector.stop()


def test_the_last_increment_goes_at_stop_and_a_monitor_baseline_ends_reporting(collector,
                                                                               tmp_path):
    collector.answer_requests = False
    fleet = make_fleet(tmp_path, every=60.0)
    with open_channel(collector.address, tmp_path, fleet) as channel:
        fleet.see(KEY, "shop/web:1", A_ID)
        fleet.learned(KEY, "shop/web:1", [SH], A_ID, "web-1")
        assert collector.wait_for(lambda: collector.increments())  # the first one is due
        fleet.learned(KEY, "shop/web:1", [LOG], A_ID, "web-1")
        fleet.see(OTHER_KEY, "shop/db:2", B_ID)
        collector.send_baseline(proto_baseline(OTHER_KEY, version=5, items=[SH]))
        assert wait_until(lambda: fleet.answered(OTHER_KEY))
        fleet.learned(OTHER_KEY, "shop/db:2", [NC], B_ID, "db-1")  # ignored: not learning
        fleet.window(OTHER_KEY, ZERO)
        time.sleep(0.3)
        assert len(collector.increments()) == 1
        channel.close()
    increments = collector.increments()
    assert [(i.image_key, evidence(i)) for i in increments] == [
        (KEY, {SH: [A_ID]}), (KEY, {LOG: [A_ID]})]


# -- the detector -----------------------------------------------------------------------------


WEB = ContainerView(state="container", cgroup_id=10, id=A_ID, name="web-1", image="shop/web:1",
                    image_id=KEY, runtime="docker", started_at=900.0)
WEB2 = ContainerView(state="container", cgroup_id=11, id=B_ID, name="web-2",
                     image="shop/web:1", image_id=KEY, runtime="docker", started_at=900.0)


def exec_of(view: ContainerView, item: ExecItem, at: float, *, tgid: int = 100,
            parent: Program | None = None) -> TraceRecord:
    header = Header(kind=EventKind.EXEC, ts_ns=int(at * 1e9), cgroup_id=view.cgroup_id,
                    pid=tgid, tgid=tgid, ppid=1, uid=0, gid=0, comm=item.argv0,
                    flags=Flag(0), suppressed=0, start_ns=tgid)
    event = ExecEvent(header=header, filename=item.exe, argv=(item.argv0,), retval=0,
                      dirfd=AT_FDCWD)
    return TraceRecord(event=event, kind="exec", container=view, ppid=1, path=item.exe,
                       exe=item.exe, program=Program(item.exe, item.argv0),
                       parent_program=parent)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_detector(tmp_path: Path, fleet: FleetBaselines | None, clock: Clock, **config: Any
                  ) -> tuple[Detector, ListAlertSink, ProfileStore]:
    store = ProfileStore(tmp_path, ItemSet)
    alerts = ListAlertSink()
    config.setdefault("startup_seconds", 0.0)
    detector = Detector(DetectorConfig(window_seconds=10.0, **config), store, alerts,
                        layers_of=lambda cid, tgid: None, clock=clock, fleet=fleet)
    return detector, alerts, store


def test_a_new_nodes_first_container_is_checked_against_the_fleet_from_its_first_event(
        tmp_path):
    clock = Clock()
    fleet = make_fleet(tmp_path)
    fleet.stream_started(1)
    detector, alerts, store = make_detector(tmp_path, fleet, clock, startup_seconds=10.0)
    detector.write(exec_of(WEB, SH, 999.0))
    detector.write(exec_of(WEB, NC, 999.5, tgid=101))  # an attack in its first second
    detector.flush()
    assert (alerts.alerts, detector.stats["fleet_records_held"]) == ([], 2)
    assert fleet.next_message(1, 100.0)["baseline_request"].image_key == KEY
    fleet.on_update(1, baselines_pb2.BaselineUpdate(
        image_key=KEY, found=True, baseline=proto_baseline(version=6, items=[SH],
                                                           windows=[ZERO] * 3)))
    detector.flush()
    assert [(a.kind, [dict(r.details) for r in a.reasons]) for a in alerts.alerts] == [
        (AlertKind.NOVEL, [{"item": "exec /bin/busybox as nc", "item_kind": "exec",
                            "item_key": ("/bin/busybox", "nc"),
                            "nearest_baseline_item": "exec /bin/busybox as sh"}])]
    assert (alerts.alerts[0].baseline_version, alerts.alerts[0].baseline_mode) == (6, "monitor")
    profile = detector.profiles[KEY]
    assert (profile.mode, profile.version, set(profile.items), len(profile.windows),
            profile.starts_seen) == (Mode.MONITOR, 6, {SH}, 3, True)
    saved = store.load(KEY)
    assert (saved.version, set(saved.items)) == (6, {SH})
    assert fleet.version(KEY) == 6
    assert json.loads((tmp_path / FLEET_FILE).read_text())["baselines"] == {
        KEY: {"version": 6, "mode": "monitor"}}
    # an older version (a late answer) changes nothing; a newer one replaces the copy
    fleet.on_update(1, baselines_pb2.BaselineUpdate(
        image_key=KEY, found=True, baseline=proto_baseline(version=5, items=[])))
    detector.flush()
    assert set(detector.profiles[KEY].items) == {SH}
    fleet.on_update(1, baselines_pb2.BaselineUpdate(
        image_key=KEY, found=True, baseline=proto_baseline(version=9, mode="protect",
                                                           items=[SH, NC])))
    detector.flush()
    assert (detector.profiles[KEY].mode, set(detector.profiles[KEY].items)) == (
        Mode.PROTECT, {SH, NC})


def test_without_an_answer_the_records_go_on_after_the_hold_and_the_image_learns_here(
        tmp_path):
    clock = Clock()
    fleet = make_fleet(tmp_path)
    fleet.stream_started(1)
    detector, alerts, _ = make_detector(tmp_path, fleet, clock)
    detector.write(exec_of(WEB, SH, 999.0))
    detector.write(exec_of(WEB2, SLEEP, 999.1, tgid=200))
    clock.now += 2.9
    detector.flush()
    assert KEY not in detector.profiles
    clock.now += 0.2  # 3 s: the hold is over
    detector.flush()
    profile = detector.profiles[KEY]
    assert (profile.mode, set(profile.items)) == (Mode.LEARN, {SH, SLEEP})
    assert (detector.stats["fleet_hold_timeout"], alerts.alerts) == (1, [])
    fleet.next_message(1, 100.0)  # the request
    assert fleet.next_message(1, 100.0) is None  # no heartbeat listed the image yet
    assert fleet.heartbeat_wanted(1, 100.0) is True
    fleet.listed(1, {KEY})
    increment = fleet.next_message(1, 100.0)["baseline_increment"]
    assert evidence(increment) == {SH: [A_ID], SLEEP: [B_ID]}
    # a later "not found" leaves it learning here
    fleet.on_update(1, baselines_pb2.BaselineUpdate(image_key=KEY, found=False))
    detector.flush()
    assert detector.profiles[KEY] is profile and profile.mode is Mode.LEARN


def test_the_hold_is_bounded_and_ends_at_stop(tmp_path):
    clock = Clock()
    fleet = make_fleet(tmp_path)
    fleet.stream_started(1)
    detector, _, _ = make_detector(tmp_path, fleet, clock, hold_capacity=3)
    for i, item in enumerate((SH, SLEEP, NC, SH, SLEEP)):
        detector.write(exec_of(WEB, item, 999.0 + i / 10, tgid=100 + i))
    # the fourth record found the queue full: the three waiting went on, then it and the rest
    assert (detector.stats["fleet_hold_full"], detector.stats["fleet_records_held"]) == (1, 3)
    assert set(detector.profiles[KEY].items) == {SH, SLEEP, NC}
    other = make_detector(tmp_path / "other", fleet, clock)[0]
    other.write(exec_of(dataclasses.replace(WEB2, image_id=OTHER_KEY), SH, 999.0, tgid=200))
    assert other.stats["fleet_records_held"] == 1 and OTHER_KEY not in other.profiles
    other.close()  # a held record is not lost at stop
    assert (other.stats["fleet_hold_stop"], set(other.profiles[OTHER_KEY].items)) == (1, {SH})


def test_with_the_fleet_learning_ends_by_the_collector_not_here(tmp_path):
    clock = Clock()
    policy = LearningPolicy(learn_for=5.0)
    alone, _, _ = make_detector(tmp_path / "alone", None, clock, policy=policy)
    fleet = make_fleet(tmp_path / "fleet")
    with_fleet, _, _ = make_detector(tmp_path / "fleet", fleet, clock, policy=policy)
    for detector in (alone, with_fleet):
        detector.write(exec_of(WEB, SH, 999.0))
    clock.now += 60
    for detector in (alone, with_fleet):
        detector.flush()
    assert (alone.profiles[KEY].mode, with_fleet.profiles[KEY].mode) == (Mode.MONITOR,
                                                                         Mode.LEARN)
    fleet.on_update(1, baselines_pb2.BaselineUpdate(
        image_key=KEY, found=True, baseline=proto_baseline(version=3, items=[SH])))
    with_fleet.flush()
    assert with_fleet.profiles[KEY].mode is Mode.MONITOR


def test_a_fleet_baseline_becomes_a_profile_keeping_what_only_this_node_tracks():
    local = Profile(image_id=KEY, image_name="shop/web:1", items=ItemSet(), created_at=10.0,
                    updated_at=10.0,
                    startup_items=[{"kind": "exec", "key": ["/x", "x"], "container": A_ID,
                                    "at": 11.0}])
    baseline = proto_baseline(version=4, mode="learn", items=[SH, DB], windows=[ZERO])
    baseline.history.add(changed_at={"seconds": 20}, to=MODE.to_proto("learn"),
                         reason="first seen", by="collector")
    profile = profile_from_baseline(baseline, local, now=50.0)
    assert (profile.image_id, profile.mode, profile.version, set(profile.items),
            profile.windows, profile.created_at, profile.starts_seen) == (
        KEY, Mode.LEARN, 4, {SH, DB}, [ZERO], 10.0, False)
    assert profile.history == [{"at": 20.0, "from": "", "to": "learn",
                                "reason": "first seen", "by": "collector"}]
    assert profile.startup_items == local.startup_items
    assert profile.progress.windows_learned == 1
    assert (profile.progress.ended_at, profile.progress.end_reason) == (None, None)
    # outside learning: when and why learning ended come from the history
    ended = proto_baseline(version=6, mode="monitor", items=[SH])
    ended.history.add(changed_at={"seconds": 20}, to=MODE.to_proto("learn"),
                      reason="first seen", by="collector")
    ended.history.add(changed_at={"seconds": 90}, to=MODE.to_proto("monitor"),
                      reason="stable for 120 s", by="collector",
                      **{"from": MODE.to_proto("learn")})
    profile = profile_from_baseline(ended, local, now=100.0)
    assert (profile.progress.ended_at, profile.progress.end_reason) == (90.0,
                                                                       "stable for 120 s")
    short = proto_baseline(version=5, windows=[(1.0, 2.0)])
    with pytest.raises(InvalidMessage) as err:
        profile_from_baseline(short, None)
    assert str(err.value) == (f"baseline.windows[0]: 2 values, this agent's windows have "
                              f"{len(FEATURES)}")
