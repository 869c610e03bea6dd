"""End to end on this host: fleet baselines (issue 11) with a real `driftwarden collector`
process, real `driftwarden agent --collector` processes playing separate nodes (each its own
--node and --state-dir, and `--only-label` so that it watches only its own containers), real
containers (network none) and the operator's real `driftwarden baseline ... --collector`.

- Three replicas of one image on two nodes learn one fleet baseline; what one replica alone
  showed is held back (unconfirmed, with its container and node), and raises NOVEL on either
  node once learning ended.
- A node that never ran the image detects in its first container at once: no learning.
- `baseline mode IMAGE protect` reaches every agent within 2 s; drift on either node is then
  quarantined by the collector's default policy.
- A collector restart keeps baselines and modes; an agent restarted while the collector is down
  detects from its local copy.
- CI: `driftwarden learn`, `baseline push`, then a fresh collector and agent detect from it.
- Bad input (a file of another image, a corrupt file, an unknown image): exit 2, a clear
  message, nothing stored.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from driftwarden.proto.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    baselines_pb2,
    baselines_pb2_grpc,
    common_pb2,
)

from tests.support.agent_proc import AgentProcess
from tests.support.collector_proc import CollectorProcess
from tests.support.containers import RunningContainer, run_container
from tests.support.e2e import query, wait_until
from tests.support.images import workload_image
from tests.support.scenario import image_id

pytestmark = pytest.mark.integration

NODE_LABEL = "driftwarden.e2e.node"  # each agent watches only containers labelled its node
LOOP = "while true; do cat /etc/passwd >/dev/null; sleep 1; done"
REPLICA = ["sh", "-c", LOOP]
# The fleet learns quickly here: never before WARMUP s, then once no new item was confirmed
# for STABLE s and MIN_WINDOWS clean windows (1 s each) came in.
WARMUP, STABLE, MIN_WINDOWS = 10, 4, 4
LEARNED = {
    ("exec", ("/bin/busybox", "sh")), ("exec", ("/bin/busybox", "cat")),
    ("exec", ("/bin/busybox", "sleep")),
    ("lineage", ("/bin/busybox:sh", "/bin/busybox:cat")),
    ("lineage", ("/bin/busybox:sh", "/bin/busybox:sleep")),
    ("write", ("/dev/null", "create")),
}
EXEC_ID = ("exec", ("/bin/busybox", "id"))
EXEC_UNAME = ("exec", ("/bin/busybox", "uname"))
# a path, so that busybox sh really execs it (applets such as date or cp it forks, no exec)
HOSTNAME = "/bin/hostname"
EXEC_HOSTNAME = ("exec", ("/bin/busybox", "hostname"))
SH_HOSTNAME = ("lineage", ("/bin/busybox:sh", "/bin/busybox:hostname"))
PORT = 7000
CONNECT = ["nc", "-w", "1", "127.0.0.1", str(PORT)]  # nothing listens: refused, or EPERM
CONNECT_REFUSED = (1, "nc: can't connect to remote host (127.0.0.1): Connection refused\n")
CONNECT_DENIED = (1, "nc: can't connect to remote host (127.0.0.1): Operation not permitted\n")
QUARANTINED = "quarantined: connect4, connect6, egress, ingress attached"
MODE_CHANGE_BOUND = 2.0  # issue 11: mode changes reach every connected agent within 2 s
NEW_NODE_BOUND = 10.0  # issue 11: a new node alerts on a novel exec within 10 s


def dw(address: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "driftwarden", *argv, "--collector", address],
                          capture_output=True, text=True, timeout=60, cwd="/")


def tail(text: str, size: int = 6000) -> str:
    return text[-size:]


@dataclass
class Nodes:
    """A collector and the agents (by node name) that use it."""

    tmp: Path
    collector: CollectorProcess
    agents: dict[str, AgentProcess] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return self.collector.address

    def logs(self) -> str:
        parts = [f"--- collector ---\n{tail(self.collector.log())}"]
        parts += [f"--- agent {node} ---\n{tail(agent.log())}"
                  for node, agent in self.agents.items()]
        return "\n".join(parts)

    def agent(self, node: str) -> AgentProcess:
        return AgentProcess(self.tmp / f"{node}-state", self.tmp / f"{node}.alerts.jsonl",
                            extra=["--collector", self.address, "--node", node,
                                   "--only-label", f"{NODE_LABEL}={node}", "--window", "1",
                                   "--heartbeat", "1"])

    def start(self, *nodes: str) -> None:
        """Start agents for `nodes` at once (each compiles its probes)."""
        started = {node: self.agent(node) for node in nodes}
        failures: list[BaseException] = []

        def start(agent: AgentProcess) -> None:
            try:
                agent.start()
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=start, args=(a,)) for a in started.values()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.agents.update(started)
        if failures:
            raise failures[0]

    def restart(self, node: str) -> AgentProcess:
        """Stop `node`'s agent and start it again with the same state dir and alerts file
        (its previous log kept aside, so that readiness is read from the new one)."""
        old = self.agents[node]
        old.stop()
        old.stderr_path.rename(old.stderr_path.with_suffix(".log.1"))
        agent = self.agents[node] = self.agent(node)
        agent.start()
        return agent

    def stop(self) -> None:
        for agent in self.agents.values():
            with contextlib.suppress(AssertionError):
                agent.stop()
        self.collector.stop()

    def dw(self, *argv: str) -> subprocess.CompletedProcess:
        return dw(self.address, *argv)

    def show(self, image: str) -> dict[str, Any]:
        result = self.dw("baseline", "show", image, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def listing(self) -> list[dict[str, Any]]:
        result = self.dw("baseline", "list", "--json")
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    def agents_list(self) -> list[agent_pb2.Agent]:
        with grpc.insecure_channel(self.address) as channel:
            return list(agent_pb2_grpc.AgentsStub(channel).List(
                agent_pb2.ListAgentsRequest(), timeout=5).agents)

    def held(self) -> dict[str, tuple[bool, list[tuple[str, int, int]]]]:
        """node -> (connected, [(image key, version, mode)] the collector says it holds)."""
        return {a.node: (a.connected, sorted((b.image_key, b.version, b.mode)
                                             for b in a.baselines))
                for a in self.agents_list()}

    def wait_connected(self, nodes: set[str], timeout: float = 45.0) -> None:
        def connected() -> bool:
            try:
                return {n for n, (up, _) in self.held().items() if up} == nodes
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return False

        wait_until(connected, f"agents {sorted(nodes)} connected", self, timeout=timeout)


def start_collector(tmp: Path, *extra: str) -> CollectorProcess:
    collector = CollectorProcess(tmp / "collector.db", tmp / "collector.log", list(extra))
    collector.start()
    return collector


def fleet_file(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    """STATE_DIR/fleet.json: the fleet version and mode of each local copy the agent holds
    (written when its detector has put a fleet baseline in place)."""
    try:
        return json.loads((agent.state_dir / "fleet.json").read_text())["baselines"]
    except (FileNotFoundError, ValueError):
        return {}


def local_baselines(agent: AgentProcess) -> dict[str, dict[str, Any]]:
    """The agent's own `baseline --state-dir ... --json list` (through its control socket)."""
    result = subprocess.run([sys.executable, "-m", "driftwarden", "baseline", "--state-dir",
                             str(agent.state_dir), "--json", "list"],
                            capture_output=True, text=True, timeout=60, cwd="/")
    assert result.returncode == 0, result.stderr
    return {b["image_id"]: b for b in json.loads(result.stdout)}


def items(entries: list[dict[str, Any]]) -> set[tuple[str, tuple[Any, ...]]]:
    return {(e["kind"], tuple(e["key"])) for e in entries}


def incidents(alerts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The newest copy of each alert id: an incident is sent at once, and again with every
    reason folded into it when its window ends."""
    return list({a["id"]: a for a in alerts}.values())


def novel_items(alerts: list[dict[str, Any]]) -> list[tuple[str, str, tuple[Any, ...]]]:
    """(reason code, item kind, item key) of every reason of NOVEL alerts, in order."""
    return [(r["code"], r["details"]["item_kind"], tuple(r["details"]["item_key"]))
            for a in alerts if a["kind"] == "novel" for r in a["reasons"]]


def of(c: RunningContainer, kind: str | None = None) -> Callable[[dict[str, Any]], bool]:
    return lambda a: a["container"]["id"] == c.id and (kind is None or a["kind"] == kind)


def replica(stack: contextlib.ExitStack, image: str, node: str) -> RunningContainer:
    return stack.enter_context(run_container(image, REPLICA, name=f"fleet-{node}",
                                             labels={NODE_LABEL: node}))


def local_copy(agent: AgentProcess, key: str) -> tuple[Any, ...]:
    """(mode, items, version, starts seen) of the agent's own baseline of `key`."""
    local = local_baselines(agent)[key]
    return local["mode"], local["items"], local["version"], local["starts_seen"]


def drift(c: RunningContainer, tag: str) -> str:
    """Copy busybox to a path the image never shipped and run it (as `true`): drift."""
    path = f"/tmp/{tag}/true"
    code, out = c.exec(["sh", "-c", f"mkdir -p /tmp/{tag} && cp /bin/busybox {path} && {path}"])
    assert code == 0, out
    return path


# -- the shared fleet: one collector, nodes a and b, three replicas that learned ----------------


@dataclass
class Learned:
    nodes: Nodes
    image: str  # tag
    key: str  # the image key (sha256:...) the fleet baseline belongs to
    replicas: dict[str, RunningContainer]  # r1 on node-a; r2 and r3 on node-b
    baseline: dict[str, Any]  # `baseline show --json` once learning ended


@pytest.fixture(scope="module")
def learned(kernel_ok, docker_ok, tmp_path_factory) -> Iterator[Learned]:
    tmp = tmp_path_factory.mktemp("e2e-fleet")
    image = workload_image("e2e-fleet", {"/app/README": ("fleet baselines e2e\n", 0o644)})
    nodes = Nodes(tmp, start_collector(tmp, "--learn-warmup", str(WARMUP), "--learn-stable-for",
                                       str(STABLE), "--learn-min-windows", str(MIN_WINDOWS)))
    try:
        with contextlib.ExitStack() as stack:
            nodes.start("node-a", "node-b")
            nodes.wait_connected({"node-a", "node-b"})
            replicas = {"r1": replica(stack, image, "node-a"),
                        "r2": replica(stack, image, "node-b"),
                        "r3": replica(stack, image, "node-b")}
            # one replica alone runs `id` while the image learns
            assert replicas["r3"].exec(["id"])[0] == 0
            key = image_id(image)

            def ended() -> dict[str, Any] | None:
                result = nodes.dw("baseline", "show", key, "--json")
                if result.returncode != 0:
                    return None
                shown = json.loads(result.stdout)
                return shown if shown["summary"]["mode"] != "learn" else None

            baseline = wait_until(ended, "the fleet to end learning", nodes, timeout=120,
                                  interval=0.5)
            yield Learned(nodes, image, key, replicas, baseline)
    finally:
        nodes.stop()


def test_replicas_learn_one_baseline_and_one_replica_cannot_teach(learned) -> None:
    nodes, key, r = learned.nodes, learned.key, learned.replicas
    shown = learned.baseline
    summary = shown["summary"]
    assert (summary["image_key"], summary["image_name"], summary["mode"]) == (
        key, learned.image, "monitor")
    assert (summary["containers"], sorted(summary["nodes"])) == (3, ["node-a", "node-b"])
    assert items(shown["items"]) == LEARNED
    assert summary["items"] == len(LEARNED)
    assert summary["windows"] >= MIN_WINDOWS
    # `id`, which only r3 ran, is held back with who showed it
    assert shown["unconfirmed"] == [{
        "kind": "exec", "key": list(EXEC_ID[1]), "text": "exec /bin/busybox as id",
        "containers": [{"container_id": r["r3"].id, "node": "node-b", "name": r["r3"].name}]}]
    assert summary["unconfirmed"] == 1
    [ended] = shown["history"]
    assert (ended["from"], ended["to"], ended["by"]) == ("learn", "monitor", "collector")
    assert ended["reason"].startswith("stable: no new behaviour for ")
    version = summary["version"]

    # every node holds that version, in monitor
    for node in ("node-a", "node-b"):
        agent = nodes.agents[node]
        wait_until(lambda a=agent: fleet_file(a).get(key) == {"mode": "monitor",
                                                                "version": version},
                   f"{node} to hold version {version}", nodes)
        assert local_copy(agent, key) == ("monitor", len(LEARNED), version, True)
    assert nodes.held() == {node: (True, [(key, version, common_pb2.MODE_MONITOR)])
                            for node in ("node-a", "node-b")}

    # the same behaviour after learning: NOVEL on either node
    for node, c in (("node-a", r["r1"]), ("node-b", r["r2"])):
        assert c.exec(["id"])[0] == 0
        [alert] = nodes.agents[node].wait_for_alerts(of(c, "novel"), timeout=20,
                                                      what=f"id in {c.name} on {node}")
        assert novel_items([alert]) == [("new-exec", *EXEC_ID)]
        assert (alert["baseline_mode"], alert["baseline_version"]) == ("monitor", version)
        assert alert["reasons"][0]["details"]["item"] == "exec /bin/busybox as id"
        wait_until(lambda a=alert, n=node: query(
            nodes.collector.db, "SELECT node, kind, container_id FROM alerts WHERE id = ?",
            [a["id"]]) == [(n, "novel", a["container"]["id"])],
            f"the alert of {node} at the collector", nodes)
    # the replicas' own loop raised nothing new after learning
    for node, c in (("node-a", r["r1"]), ("node-b", r["r2"]), ("node-b", r["r3"])):
        assert novel_items(incidents(
            [a for a in nodes.agents[node].alerts() if of(c)(a)])) == (
            [("new-exec", *EXEC_ID)] if c is not r["r3"] else []), node
    assert nodes.show(key)["summary"]["version"] == version  # nothing more was learned


def test_a_new_node_detects_at_once_from_the_fleet_baseline(learned) -> None:
    nodes, key = learned.nodes, learned.key
    version = learned.baseline["summary"]["version"]
    nodes.start("node-c")
    nodes.wait_connected({"node-a", "node-b", "node-c"})
    agent = nodes.agents["node-c"]
    with run_container(learned.image, REPLICA, name="fleet-node-c",
                       labels={NODE_LABEL: "node-c"}) as c:
        started = time.monotonic()
        assert c.exec(["uname"])[0] == 0
        [alert] = agent.wait_for_alerts(of(c, "novel"), timeout=30, what="uname on node-c")
        elapsed = time.monotonic() - started
        assert elapsed <= NEW_NODE_BOUND, f"NOVEL after {elapsed:.1f} s"
        assert novel_items([alert]) == [("new-exec", *EXEC_UNAME)]
        assert (alert["baseline_mode"], alert["baseline_version"]) == ("monitor", version)
        # no learning: the fleet's copy, in its mode; the loop's items are known
        assert fleet_file(agent) == {key: {"mode": "monitor", "version": version}}
        assert local_copy(agent, key) == ("monitor", len(LEARNED), version, True)
        time.sleep(2)  # the loop runs twice more
        assert novel_items(incidents([a for a in agent.alerts() if of(c)(a)])) == [
            ("new-exec", *EXEC_UNAME)]
    summary = nodes.show(key)["summary"]
    assert (summary["version"], summary["mode"], summary["containers"],
            sorted(summary["nodes"])) == (version, "monitor", 3, ["node-a", "node-b"])


def test_protect_reaches_every_agent_and_drift_is_quarantined(learned) -> None:
    nodes, key, r = learned.nodes, learned.key, learned.replicas
    running = sorted(nodes.agents)
    before = nodes.show(key)["summary"]["version"]
    result = nodes.dw("baseline", "mode", learned.image, "protect", "--reason", "reviewed")
    assert result.returncode == 0, result.stderr
    version = before + 1
    assert result.stdout == (f"{learned.image} ({key[:19]}): mode protect, version "
                             f"{version}\n")
    shown = nodes.show(key)
    change = shown["history"][-1]
    assert (change["from"], change["to"], change["reason"]) == ("monitor", "protect",
                                                                "reviewed")
    for node in running:
        agent = nodes.agents[node]
        wait_until(lambda a=agent: fleet_file(a).get(key) == {"mode": "protect",
                                                                "version": version},
                   f"{node} to hold the protect version", nodes, interval=0.05)
        # when the agent put it in place (its write of fleet.json), after the change
        took = (agent.state_dir / "fleet.json").stat().st_mtime - change["changed_at"]
        assert took <= MODE_CHANGE_BOUND, f"{node} got the mode change after {took:.2f} s"
        assert local_copy(agent, key) == ("protect", len(LEARNED), version, True)
    assert nodes.held() == {node: (True, [(key, version, common_pb2.MODE_PROTECT)])
                            for node in running}

    for node, c in (("node-a", r["r1"]), ("node-b", r["r2"])):
        assert c.exec(CONNECT) == CONNECT_REFUSED
        path = drift(c, f"drift-{node}")
        [alert] = incidents(nodes.agents[node].wait_for_alerts(
            lambda a, c=c, p=path: of(c, "drift")(a) and a["process"]["exe"] == p,
            timeout=20, what=f"drift on {node}"))
        assert (alert["baseline_mode"], alert["severity"]) == ("protect", "high")

        def done(c=c, alert=alert, node=node) -> list[tuple[Any, ...]]:
            rows = query(nodes.collector.db, "SELECT status, type, node, requested_by, "
                         "alert_id, message FROM actions WHERE container_id = ?", [c.id])
            return rows if rows and rows[0][0] != "pending" else []

        assert wait_until(done, f"the quarantine on {node}", nodes) == [
            ("done", "quarantine", node, "policy", alert["id"], QUARANTINED)]
        assert c.exec(CONNECT) == CONNECT_DENIED


def test_a_collector_restart_keeps_baselines_and_an_agent_uses_its_copy(learned) -> None:
    nodes, key = learned.nodes, learned.key
    shown = nodes.show(key)
    version, mode = shown["summary"]["version"], shown["summary"]["mode"]
    assert mode == "protect"
    listing = nodes.listing()

    nodes.collector.stop()
    agent = nodes.restart("node-b")  # while the collector is down
    # a new container whose command runs hostname first: checked from its first event
    with run_container(learned.image, ["sh", "-c", f"{HOSTNAME} >/dev/null; {LOOP}"],
                       name="fleet-restarted", labels={NODE_LABEL: "node-b"}) as c:
        agent.wait_for_alerts(of(c, "novel"), timeout=30, what="hostname on node-b")
        expected = [("new-exec", *EXEC_HOSTNAME), ("new-lineage", *SH_HOSTNAME)]

        def incident() -> list[dict[str, Any]]:
            return incidents([a for a in agent.alerts() if of(c)(a)])

        # an incident's other reasons come when its window ends (2 s), later on a busy host
        try:
            wait_until(lambda: sorted(novel_items(incident())) == expected,
                       "the incident's exec and lineage", nodes, timeout=15)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {incident()}") from None
        time.sleep(1)  # the loop's next turns: nothing more
        alerts = incident()
        assert sorted(novel_items(alerts)) == expected, alerts
        assert {(a["baseline_mode"], a["baseline_version"]) for a in alerts} == {
            ("protect", version)}
        assert fleet_file(agent) == {key: {"mode": "protect", "version": version}}
        assert local_copy(agent, key) == ("protect", len(LEARNED), version, True)

        nodes.collector.start()  # same port, same store
        assert nodes.listing() == listing
        nodes.wait_connected(set(nodes.agents))
        assert nodes.held() == {node: (True, [(key, version, common_pb2.MODE_PROTECT)])
                                for node in nodes.agents}
        # what the restarted agent raised while the collector was down reaches it
        for alert in alerts:
            wait_until(lambda a=alert: query(
                nodes.collector.db, "SELECT node FROM alerts WHERE id = ?", [a["id"]]) == [
                ("node-b",)], "the spooled alert at the collector", nodes)
    summary = nodes.show(key)["summary"]
    assert (summary["version"], summary["mode"]) == (version, "protect")


# -- CI: learn, push, a fresh collector and agent -----------------------------------------------


@dataclass
class Shipped:
    nodes: Nodes
    image: str
    key: str
    file: Path
    version: int


@pytest.fixture(scope="module")
def shipped(kernel_ok, docker_ok, tmp_path_factory) -> Iterator[Shipped]:
    """`driftwarden learn` on an image whose own command is the replicas' loop, then `baseline
    push` to a fresh collector, which a fresh agent (node-d) uses."""
    tmp = tmp_path_factory.mktemp("e2e-ci")
    image = workload_image("e2e-ci", {"/app/README": ("learned in CI\n", 0o644)}, cmd=REPLICA)
    key = image_id(image)
    out = tmp / "ci.baseline"
    learn = subprocess.run([sys.executable, "-m", "driftwarden", "learn", image, "--for", "5",
                            "--window", "1", "--startup-grace", "0", "--out", str(out), "--",
                            "sleep", "2"],
                           capture_output=True, text=True, timeout=180, cwd="/")
    assert learn.returncode == 0, learn.stderr
    assert learn.stderr.splitlines()[-1].startswith(f"driftwarden: learned {image} ({key}) ")
    assert learn.stderr.endswith(f"; wrote {out}\n")
    nodes = Nodes(tmp, start_collector(tmp))
    try:
        pushed = nodes.dw("baseline", "push", str(out), "--reason", "learned in CI")
        assert pushed.returncode == 0, pushed.stderr
        assert pushed.stdout.startswith(f"{image} ({key[:19]}): pushed from {out} (mode "
                                        "monitor, version ")
        version = nodes.show(key)["summary"]["version"]
        nodes.start("node-d")
        nodes.wait_connected({"node-d"})
        yield Shipped(nodes, image, key, out, version)
    finally:
        nodes.stop()


def test_a_baseline_learned_in_ci_is_used_by_a_fresh_fleet(shipped) -> None:
    nodes, key, version = shipped.nodes, shipped.key, shipped.version
    shown = nodes.show(key)
    assert (shown["summary"]["mode"], shown["summary"]["nodes"], shown["unconfirmed"]) == (
        "monitor", [], [])
    assert items(shown["items"]) == LEARNED
    # --startup-grace 0: windows from the container's start (5 s of 1 s windows, the last
    # one may still be open)
    assert shown["summary"]["windows"] >= 3
    pushed = shown["history"][-1]
    assert (pushed["to"], pushed["reason"], pushed["by"]) == ("monitor", "learned in CI",
                                                              "push by operator")
    agent = nodes.agents["node-d"]
    with run_container(shipped.image, REPLICA, name="fleet-ci",
                       labels={NODE_LABEL: "node-d"}) as c:
        assert c.exec(["uname"])[0] == 0
        [alert] = agent.wait_for_alerts(of(c, "novel"), timeout=NEW_NODE_BOUND,
                                        what="uname on node-d")
        assert novel_items([alert]) == [("new-exec", *EXEC_UNAME)]
        assert (alert["baseline_mode"], alert["baseline_version"]) == ("monitor", version)
        assert fleet_file(agent) == {key: {"mode": "monitor", "version": version}}
        time.sleep(2)
        assert novel_items(incidents([a for a in agent.alerts() if of(c)(a)])) == [
            ("new-exec", *EXEC_UNAME)]
    summary = nodes.show(key)["summary"]
    assert (summary["version"], summary["mode"], summary["nodes"]) == (version, "monitor", [])


def test_bad_input_is_refused_and_nothing_is_stored(shipped, tmp_path) -> None:
    nodes, key, file = shipped.nodes, shipped.key, shipped.file
    before = nodes.listing()
    other = "sha256:" + "0f" * 32
    corrupt = tmp_path / "corrupt.baseline"
    data = file.read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    cases = [
        (["baseline", "push", str(file), "--image", other],
         f"driftwarden: error: {file} is the baseline of image {key} ({shipped.image}), not "
         f"{other}; push the file learned for that image\n"),
        (["baseline", "push", str(corrupt)],
         f"driftwarden: error: {corrupt}: not a baseline file: corrupt or truncated msgpack "
         "(Unpack failed: incomplete input); push a file `driftwarden baseline export` or "
         "`driftwarden learn` wrote\n"),
        (["baseline", "mode", other, "protect", "--reason", "reviewed"],
         f"driftwarden: error: the collector at {nodes.address}: no baseline matches image "
         f"'{other}': give an image key (sha256:...), a unique prefix of its digits (at least "
         "4) or an image name[:tag] (`driftwarden baseline list` shows them)\n"),
    ]
    for argv, err in cases:
        result = nodes.dw(*argv)
        assert (result.returncode, result.stdout, result.stderr) == (2, "", err), argv
    # the collector checks pushed files itself too
    with grpc.insecure_channel(nodes.address) as channel:
        stub = baselines_pb2_grpc.BaselinesStub(channel)
        for request, details in [
            (baselines_pb2.PushBaselineRequest(file=data, image_key=other, reason="x"),
             f"the file is a baseline of image {key}, not of {other}: push it for its own "
             "image (give no image, or that key); a baseline is never stored for another "
             "image's key"),
            (baselines_pb2.PushBaselineRequest(file=data[: len(data) // 2], reason="x"),
             "not a baseline file: corrupt or truncated msgpack (Unpack failed: incomplete "
             "input)"),
        ]:
            with pytest.raises(grpc.RpcError) as refused:
                stub.Push(request, timeout=10)
            assert (refused.value.code(), refused.value.details()) == (
                grpc.StatusCode.INVALID_ARGUMENT, details)
    assert nodes.listing() == before
    # the one change the collector ever stored is the push
    assert query(nodes.collector.db, "SELECT actor, action, target, decision FROM audit") == [
        ("operator", "baseline-push", key, "stored")]
    assert nodes.show(key)["summary"]["version"] == shipped.version
