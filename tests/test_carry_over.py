"""Carry-over across image versions (issue 11 point 5): a new digest of an image's repository
starts from the previous version's baseline for what the layers they share do; only what the new
layers bring is learned, and the rest is judged at once.

The pure rules (collector.baselines: shared_layers, carry_source, carried_baseline; agent.carry),
the collector over real gRPC with fake agents, the detector with real layer directories, and
one live run: a real collector, a real agent, real Docker images v1 and v2 (built FROM v1 with
one binary more), and `driftwarden baseline diff IMAGE@OLD IMAGE@NEW` as an operator runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from driftwarden.agent.alerts import ListAlertSink
from driftwarden.agent.carry import CarriedScope, CarryJudge, record_files
from driftwarden.agent.detect import Detector, DetectorConfig
from driftwarden.agent.fleet import FLEET_FILE, carried_scope
from driftwarden.collector.baselines import (
    carried_baseline,
    carry_source,
    shared_layers,
)
from driftwarden.core import wire
from driftwarden.core.alerts import AlertKind
from driftwarden.core.baselines import FleetBaseline, pack_baseline, unpack_baseline
from driftwarden.core.errors import BaselineError, InvalidMessage
from driftwarden.core.modes import Mode
from driftwarden.core.records import Program
from driftwarden.models.drift import Layers
from driftwarden.models.items import ExecItem, ItemSet, LineageItem, WriteItem
from driftwarden.models.profile import ProfileStore
from driftwarden.proto.v1 import baselines_pb2, common_pb2

from tests.support.agent_proc import AgentProcess
from tests.support.collector_proc import CollectorProcess
from tests.support.containers import docker_client, run_container
from tests.support.e2e import wait_until
from tests.support.fake_agent import container_id
from tests.support.images import workload_image
from tests.test_collector_baselines import (
    FLEET,
    baselines_stub,
    connect,
    increment,
    items_of,
    update_where,
    version_of,
)
from tests.test_fleet import (
    A_ID,
    KEY,
    SH,
    WEB,
    Clock,
    evidence,
    exec_of,
    make_fleet,
)

V1 = "sha256:" + "11" * 32
V2 = "sha256:" + "22" * 32
L0, L1, L2 = ("sha256:" + c * 64 for c in "abc")
X = ("exec", ("/bin/busybox", "sh"))
Y = ("exec", ("/bin/busybox", "sleep"))
Z = ("exec", ("/usr/local/bin/newtool", "newtool"))
NEWTOOL = ExecItem("/usr/local/bin/newtool", "newtool")
NC = ExecItem("/bin/busybox", "nc")
SLEEP = ExecItem("/bin/busybox", "sleep")


def doc(key: str, name: str, layers: tuple[str, ...], *, mode: Mode = Mode.MONITOR,
        created_at: float = 100.0, items=(X,)) -> FleetBaseline:
    return FleetBaseline(image_key=key, image_name=name, mode=mode, version=4,
                         created_at=created_at, updated_at=created_at,
                         items=dict.fromkeys(items), windows=[(1.0, 2.0)], layers=layers)


# -- the collector's rules ----------------------------------------------------------------------


def test_two_images_share_the_common_prefix_of_their_layer_digests() -> None:
    assert shared_layers((L0, L1), (L0, L1, L2)) == 2
    assert shared_layers((L0, L1, L2), (L0, L1)) == 2
    assert shared_layers((L1, L0), (L0, L1)) == 0  # the same layer on another base: not shared
    assert shared_layers((), (L0,)) == 0


def test_the_previous_version_is_the_newest_learned_baseline_sharing_a_layer() -> None:
    old = doc(V1, "shop/web:1", (L0, L1), created_at=100.0)
    newer = doc("sha256:" + "33" * 32, "shop/web:1.1", (L0,), created_at=200.0)
    learning = doc("sha256:" + "44" * 32, "shop/web:1.2", (L0, L1), mode=Mode.LEARN,
                   created_at=300.0)
    rebased = doc("sha256:" + "55" * 32, "shop/web:1.3", (L2,), created_at=400.0)
    unknown = doc("sha256:" + "66" * 32, "shop/web:1.4", (), created_at=500.0)
    assert carry_source([old, newer, learning, rebased, unknown], (L0, L1, L2)) == (newer, 1)
    assert carry_source([old], (L0, L1, L2)) == (old, 2)
    assert carry_source([learning, rebased, unknown], (L0, L1, L2)) is None


def test_a_carried_baseline_keeps_the_old_items_learns_and_says_where_it_came_from() -> None:
    old = doc(V1, "shop/web:1", (L0, L1), items=(X, Y))
    new = carried_baseline(old, V2, "shop/web:2", (L0, L1, L2), 2, 500.0)
    assert (new.image_key, new.image_name, new.mode, new.version) == (V2, "shop/web:2",
                                                                      Mode.LEARN, 1)
    assert (list(new.items), new.windows, new.layers) == ([X, Y], [(1.0, 2.0)], (L0, L1, L2))
    assert (new.carried_from, new.carried_layers, new.starts_seen) == (V1, 2, True)
    assert new.history == [{
        "at": 500.0, "from": "monitor", "to": "learn", "by": "collector",
        "reason": f"carried from shop/web:1 ({V1}) version 4: 2 of 3 layers shared; what the "
                  "other 1 bring is learned"}]
    old.items[Z] = None
    assert Z not in new.items  # a copy: the old one's later changes stay its own
    # the file format and the wire keep the carry
    again = unpack_baseline(pack_baseline(new))
    assert (again.carried_from, again.carried_layers) == (V1, 2)
    message = wire.baseline_to_proto(new)
    assert (message.summary.carried_from, message.carried_layers) == (V1, 2)
    back = wire.baseline_from_proto(message)
    assert (back.carried_from, back.carried_layers, back.layers) == (V1, 2, (L0, L1, L2))
    assert carried_scope(message) == CarriedScope(V1, (L0, L1, L2), 2)


def test_a_carry_that_claims_more_layers_than_the_image_has_is_refused() -> None:
    new = carried_baseline(doc(V1, "shop/web:1", (L0, L1)), V2, "shop/web:2", (L0, L1), 2, 1.0)
    message = wire.baseline_to_proto(new)
    message.carried_layers = 3
    with pytest.raises(InvalidMessage, match=r"baseline.carried_layers: 3, but the image has "
                                             r"2 layers"):
        wire.baseline_from_proto(message)
    obj = new.to_file_obj()
    obj["fleet"]["carried_layers"] = 3
    with pytest.raises(BaselineError, match=r"fleet.carried_layers must count some of "
                                            r"the image's 2 layers, got 3"):
        FleetBaseline.from_file_obj(obj)


def test_the_collector_carries_a_new_version_and_diff_lists_what_it_learned(make_server,
                                                                               channels) -> None:
    server = make_server(**FLEET)
    channel = channels(server)
    c1, c2 = container_id("web-v1"), container_id("web-v2")
    agent = connect(channel, "node-a", (c1, "web-v1", V1), (c2, "web-v2", V2))
    first = increment("node-a", [(X, [c1]), (Y, [c1])], containers=[(c1, "web-v1")],
                      key=V1, name="shop/web:1", windows=2)
    first.layers.extend((L0, L1))
    agent.send(baseline_increment=first)
    update_where(agent, lambda u: u.image_key == V1 and version_of(u) == 1)
    stub = baselines_stub(channel)
    stub.SetMode(baselines_pb2.SetBaselineModeRequest(image=V1, mode=common_pb2.MODE_MONITOR,
                                                      reason="learned"), timeout=5)
    # another repository, and a version that shares no layer: nothing to carry from
    for name, layers, digit in (("shop/db:1", (L0, L1, L2), "d"), ("shop/web:3", (L2,), "e")):
        key = "sha256:" + digit * 64
        agent.send(baseline_request=baselines_pb2.BaselineRequest(
            image_key=key, image_name=name, layers=layers))
        assert not update_where(agent, lambda u, key=key: u.image_key == key).found

    agent.send(baseline_request=baselines_pb2.BaselineRequest(
        image_key=V2, image_name="shop/web:2", layers=(L0, L1, L2)))
    carried = update_where(agent, lambda u: u.image_key == V2 and u.found).baseline
    summary = carried.summary
    assert (summary.mode, summary.version, summary.carried_from, carried.carried_layers,
            list(carried.layers)) == (common_pb2.MODE_LEARN, 1, V1, 2, [L0, L1, L2])
    assert items_of(carried) == [X, Y] and len(carried.windows) == 2
    assert carried.history[-1].reason == (f"carried from shop/web:1 ({V1}) version 2: 2 of 3 "
                                          "layers shared; what the other 1 bring is learned")
    audit = [e for e in server.store.list_audit() if e.action == "baseline-carry"]
    assert [(e.actor, e.target, e.decision) for e in audit] == [("collector", V2, "carried")]

    # what the new layer brings is learned on top; the diff shows it, either way round
    agent.send(baseline_increment=increment("node-a", [(Z, [c2])], containers=[(c2, "web-v2")],
                                            key=V2, name="shop/web:2"))
    learned = update_where(agent, lambda u: u.image_key == V2 and version_of(u) == 2).baseline
    assert items_of(learned) == [X, Y, Z]
    diff = stub.Diff(baselines_pb2.DiffBaselinesRequest(a=V1, b=V2), timeout=5)
    assert ([wire.baseline_item_from_proto(i) for i in diff.only_in_a],
            [wire.baseline_item_from_proto(i) for i in diff.only_in_b]) == ([], [Z])
    assert diff.b.carried_from == V1
    # a reset forgets the carry: the image learns everything again
    reset = stub.Reset(baselines_pb2.ResetBaselineRequest(image=V2, reason="rebuilt"),
                       timeout=5).baseline
    assert not reset.HasField("carried_from")
    assert server.store.get_baseline(V2).carried_layers == 0


# -- the agent's rules --------------------------------------------------------------------------


def image_dirs(tmp_path: Path) -> Layers:
    """A container of an image with a base layer (busybox) and a new one (newtool), under
    Docker's -init layer: lowers top first."""
    base, new, init = tmp_path / "base", tmp_path / "new", tmp_path / "init"
    (base / "bin").mkdir(parents=True)
    (base / "bin/busybox").write_text("busybox")
    (base / "etc").mkdir()
    (base / "etc/app.conf").write_text("old")
    (new / "usr/local/bin").mkdir(parents=True)
    (new / "usr/local/bin/newtool").write_text("#!/bin/sh\n")
    (new / "etc").mkdir()
    (new / "etc/app.conf").write_text("replaced")  # a file the new layer replaces
    (init / "etc").mkdir(parents=True)
    (init / "etc/hosts").write_text("")
    (tmp_path / "upper").mkdir()
    return Layers(upper=tmp_path / "upper", lowers=(init, new, base))


def test_the_new_layers_are_the_lowers_above_the_shared_ones(tmp_path) -> None:
    layers = image_dirs(tmp_path)
    _, new, base = layers.lowers
    scope = CarriedScope(V1, (L0, L1), 1)
    assert scope.new_layer_dirs(layers.lowers) == (new,)
    assert scope.new_layer_dirs((new, base)) == (new,)  # a runtime without an -init layer
    assert scope.new_layer_dirs((base,)) is None  # fewer lowers than layers: not this image
    assert CarriedScope(V1, (L0, L1), 2).new_layer_dirs(layers.lowers) == ()
    with pytest.raises(ValueError):
        CarriedScope(V1, (L0,), 2)


def test_a_record_is_learned_when_it_involves_a_file_of_a_new_layer(tmp_path) -> None:
    lowers = image_dirs(tmp_path).lowers
    scope = CarriedScope(V1, (L0, L1), 1)
    judge = CarryJudge()
    cases = [
        ([NEWTOOL], "/usr/local/bin/newtool", True),  # the new binary runs
        ([SLEEP, LineageItem("/usr/local/bin/newtool:newtool", "/bin/busybox:sleep")],
         "/bin/busybox", True),  # it starts an old one
        ([WriteItem("/tmp/out", "create")], "/usr/local/bin/newtool", True),  # it writes
        ([WriteItem("/etc/app.conf", "append")], "/bin/busybox", True),  # a replaced file
        ([NC, LineageItem("/bin/busybox:sh", "/bin/busybox:nc")], "/bin/busybox", False),
        ([WriteItem("/etc/hosts", "append")], "/bin/busybox", False),  # the runtime's layer
        ([WriteItem("/tmp/out", "create")], "/bin/busybox", False),
    ]
    for items, program, learned in cases:
        files = record_files(items, program)
        assert judge.learns(scope, A_ID, lowers, files) is learned, (items, program)
    assert record_files([NC, LineageItem("/bin/busybox:sh", "/usr/local/bin/newtool:newtool")],
                        None) == ["/bin/busybox", "/usr/local/bin/newtool"]
    # layers that cannot be told apart: everything is judged
    assert judge.learns(scope, A_ID, None, ["/usr/local/bin/newtool"]) is False
    assert judge.learns(scope, "other", lowers[2:], ["/usr/local/bin/newtool"]) is False


def carried_update(version: int = 3) -> baselines_pb2.BaselineUpdate:
    baseline = baselines_pb2.Baseline(
        summary=baselines_pb2.BaselineSummary(image_key=KEY, image_name="shop/web:2",
                                              mode=common_pb2.MODE_LEARN, version=version,
                                              carried_from=V1),
        items=[wire.baseline_item_to_proto(SH.KIND, SH.key())], layers=[L0, L1],
        carried_layers=1)
    return baselines_pb2.BaselineUpdate(image_key=KEY, found=True, baseline=baseline)


def test_the_detector_learns_what_the_new_layer_brings_and_judges_the_rest(tmp_path) -> None:
    layers = image_dirs(tmp_path / "fs")
    clock = Clock()
    fleet = make_fleet(tmp_path)
    fleet.stream_started(1)
    alerts = ListAlertSink()
    detector = Detector(DetectorConfig(window_seconds=10.0, startup_seconds=0.0),
                        ProfileStore(tmp_path, ItemSet), alerts,
                        layers_of=lambda cid, tgid: layers, clock=clock, fleet=fleet)
    detector.write(exec_of(WEB, SH, 999.0))  # held until the collector answers
    assert fleet.next_message(1, 100.0)["baseline_request"].image_key == KEY
    fleet.on_update(1, carried_update())
    detector.flush()
    detector.write(exec_of(WEB, NEWTOOL, 999.5, tgid=101, parent=_program(SH)))
    detector.write(exec_of(WEB, SLEEP, 999.6, tgid=102, parent=_program(NEWTOOL)))
    detector.write(exec_of(WEB, NC, 999.7, tgid=103, parent=_program(SH)))  # the attack
    detector.flush()
    profile = detector.profiles[KEY]
    assert (profile.mode, profile.starts_seen) == (Mode.LEARN, True)
    assert set(profile.items) == {SH, NEWTOOL, SLEEP,
                                  LineageItem("/bin/busybox:sh", "/usr/local/bin/newtool:newtool"),
                                  LineageItem("/usr/local/bin/newtool:newtool",
                                              "/bin/busybox:sleep")}
    assert [(a.kind, a.reasons[0].code, dict(a.reasons[0].details)["item"])
            for a in alerts.alerts] == [
        (AlertKind.NOVEL, "new-exec", "exec /bin/busybox as nc"),
        (AlertKind.NOVEL, "new-lineage", "/bin/busybox:sh started /bin/busybox:nc")]
    assert (detector.stats["carried_learned"], detector.stats["carried_judged"]) == (2, 2)
    fleet.listed(1, {KEY})
    reported = evidence(fleet.next_message(1, 200.0)["baseline_increment"])
    assert NC not in reported and set(reported) >= {NEWTOOL, SLEEP}
    # the carry survives a restart with the collector away (STATE_DIR/fleet.json)
    assert json.loads((tmp_path / FLEET_FILE).read_text())["baselines"][KEY] == {
        "version": 3, "mode": "learn",
        "carried": {"carried_from": V1, "layers": [L0, L1], "shared": 1}}
    assert make_fleet(tmp_path).carried(KEY) == CarriedScope(V1, (L0, L1), 1)


def _program(item: ExecItem) -> Program:
    return Program(item.exe, item.argv0)


# -- live: a real collector, a real agent, real Docker images -----------------------------------

LABEL = ("driftwarden.test/carry-over", "1")
NEWTOOL_PATH = "/usr/local/bin/newtool"
NEWTOOL_SCRIPT = "#!/bin/sh\necho ok > /tmp/newtool.out\n"
LOOP_V1 = ["sh", "-c", "while :; do cat /etc/hostname > /dev/null; sleep 1; done"]
LOOP_V2 = ["sh", "-c", f"while :; do cat /etc/hostname > /dev/null; {NEWTOOL_PATH}; sleep 1; "
                       "done"]


class LiveStack:
    def __init__(self, collector: CollectorProcess, agent: AgentProcess) -> None:
        self.collector, self.agent = collector, agent

    def logs(self) -> str:
        return (f"--- collector ---\n{self.collector.log()}\n"
                f"--- agent ---\n{self.agent.log()}")

    def dw(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "driftwarden", *argv, "--collector",
                               self.collector.address], capture_output=True, text=True,
                              timeout=60, cwd="/")

    def show(self, image: str) -> dict | None:
        done = self.dw("baseline", "show", image, "--json")
        if done.returncode == 2 and "no baseline matches" in done.stderr:
            return None
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def texts(shown: dict | None) -> set[str]:
    return {item["text"] for item in shown["items"]} if shown else set()


def novel_of(alerts: list[dict], container: str) -> list[str]:
    return sorted(r["details"]["item"] for a in alerts
                  if a["kind"] == "novel" and a["container"]["id"] == container
                  for r in a["reasons"])


@pytest.mark.integration
def test_v2_built_from_v1_keeps_its_items_learns_only_the_new_binary_and_diff_lists_it(
        kernel_ok, docker_ok, tmp_path) -> None:
    v1 = workload_image("carry", {"/app/v1": ("1\n", 0o644)})
    v2 = workload_image("carry", {NEWTOOL_PATH: (NEWTOOL_SCRIPT, 0o755)}, base=v1)
    repository = v1.split(":")[0]
    layers_v1 = docker_client().images.get(v1).attrs["RootFS"]["Layers"]
    layers_v2 = docker_client().images.get(v2).attrs["RootFS"]["Layers"]
    assert layers_v2[:-1] == layers_v1  # v2 is v1 plus one layer
    labels = dict([LABEL])
    with CollectorProcess(tmp_path / "c.db", tmp_path / "collector.log") as collector, \
            AgentProcess(tmp_path / "agent", tmp_path / "alerts.jsonl",
                         ["--collector", collector.address, "--node", "node-carry",
                          "--window", "1", "--heartbeat", "1",
                          "--only-label", "=".join(LABEL)]) as agent:
        stack = LiveStack(collector, agent)
        with run_container(v1, LOOP_V1, name="carry-v1", labels=labels):
            shown = wait_until(
                lambda: (s := stack.show(v1)) and {"exec /bin/busybox as cat",
                                                   "exec /bin/busybox as sleep"} <= texts(s)
                and s, "v1's baseline to learn its loop", stack, timeout=60)
            key_v1 = shown["summary"]["image_key"]
            ended = stack.dw("baseline", "mode", key_v1, "monitor", "--reason", "v1 learned")
            assert ended.returncode == 0, ended.stderr
        v1_items = texts(stack.show(key_v1))

        with run_container(v2, LOOP_V2, name="carry-v2", labels=labels) as c2:
            def learned() -> dict | None:
                s = stack.show(v2)
                return s if s and f"exec {NEWTOOL_PATH}" in texts(s) else None

            shown = wait_until(learned, "v2 to learn its new binary", stack, timeout=60)
            key_v2 = shown["summary"]["image_key"]
            assert (shown["summary"]["carried_from"], shown["summary"]["mode"]) == (key_v1,
                                                                                    "learn")
            assert shown["history"][0]["reason"].startswith(
                f"carried from {v1} ({key_v1}) version ")
            assert shown["history"][0]["reason"].endswith(
                f": {len(layers_v1)} of {len(layers_v2)} layers shared; what the other 1 "
                "bring is learned")
            assert v1_items <= texts(shown)  # v1's items carried
            assert novel_of(agent.alerts(), c2.id) == []  # the new binary is learned silently

            # what the old binaries do is judged at once: a NOVEL, not learned
            assert c2.exec(["ls", "/"])[0] == 0
            wait_until(lambda: "exec /bin/busybox as ls" in novel_of(agent.alerts(), c2.id),
                       "a NOVEL alert for ls in v2", stack, timeout=10)
            time.sleep(3)  # two increment periods: anything reported would be merged by now
            after = stack.show(key_v2)
            assert "exec /bin/busybox as ls" not in texts(after)
            assert all(u["item"]["text"] != "exec /bin/busybox as ls"
                       for u in after["unconfirmed"])

        diff = stack.dw("baseline", "diff", f"{repository}@{key_v1}", f"{repository}@{key_v2}",
                        "--json")
        assert diff.returncode == 0, diff.stderr
        result = json.loads(diff.stdout)
        assert (result["a"]["image_key"], result["b"]["image_key"]) == (key_v1, key_v2)
        assert result["only_in_a"] == []
        assert sorted(i["text"] for i in result["only_in_b"]) == sorted(
            texts(after) - v1_items)
        # the new binary's exec, who starts it, and what it writes: learned, nothing else
        assert sorted(i["text"] for i in result["only_in_b"]) == [
            f"/bin/busybox:sh started {NEWTOOL_PATH}:newtool", "create /tmp/newtool.out",
            f"exec {NEWTOOL_PATH}"]
        plain = stack.dw("baseline", "diff", f"{repository}@{key_v1}",
                         f"{repository}@{key_v2}")
        assert plain.returncode == 0 and f"exec {NEWTOOL_PATH}" in plain.stdout, plain.stderr
