"""The baseline in the kernel (issue 12.1) in field conditions, not lab order: the agent joins a
node whose containers already run, the learned image runs as a CRI pod under containerd, and
containers restart and scale. Real probes, a real agent (the detection pipeline in this process
where the feature windows and the map must be seen; `driftwarden agent` itself under
containerd) and real containers of one learned image, whose baseline a first agent run left in
its state dir.

The workload (WORKLOAD): a shell that appends to /data/app.log as many times as a number
written into the FIFO /run/trigger says (the shell itself, no new process: when it began
before the agent, so do its writes), and dwstorm, one process connecting to 127.0.0.1:PORT
four times a second. What each condition must show:

* joins a busy node: the running shell's writes are counted in the kernel (exactly: dedup off,
  20 appends are 20 hits and none is sent) and the windows count every one of them; dwstorm's
  connects are never filtered (the kernel never saw its exec, so it cannot name its program)
  and keep arriving; a process started after the agent (nc) has its connects filtered; no
  alert.
* containerd: the pod's repeats are counted in the kernel (the agent's metrics and exit line)
  and a drop-and-execute in it still alerts.
* restart and scale: each cgroup (a restart is a new one) gets its own entries once its first
  events are judged; a gone cgroup's entries are taken out; a novel write in replica 3 alerts
  while replicas 1 and 2 stay quiet."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.agent_proc import AgentProcess
from tests.support.containerd import unique_pod_name
from tests.support.containers import run_container
from tests.support.known_agent import known_agent
from tests.support.scenario import free_port, image_id, wait_until

pytestmark = pytest.mark.integration

FILE, CONNECT = 3, 2  # EventKind numbers, as the map `known` keys them
PORT = 47913  # dwstorm serves it itself: loopback of the container (of the host, in a pod)
APP_LOG = "/data/app.log"
WORKLOAD_SCRIPT = f"""mkdir -p /data /run
[ -p /run/trigger ] || mkfifo /run/trigger
dwstorm connect 1000000000 127.0.0.1:{PORT} --serve --rate 4 >/dev/null 2>&1 &
while true; do
  read n < /run/trigger
  i=0
  while [ "$i" -lt "$n" ]; do
    echo tick >> {APP_LOG}
    i=$((i + 1))
  done
done
"""
WORKLOAD = ["/bin/sh", "/app/run.sh"]
# nc connects where nobody listens (refused: still a connect, the same every time). Not to
# PORT: the kernel's dedup key of a connect holds no program, so within a second of dwstorm's
# connect to PORT, nc's would be suppressed as its repeat and never judged (nor learned).
NC_PORT = PORT + 1
NC = ["nc", "-w1", "127.0.0.1", str(NC_PORT)]
DOCKER = "unix:///var/run/docker.sock"


@pytest.fixture(scope="module")
def learned(storm_image, kernel_ok, tmp_path_factory) -> tuple[str, Path]:
    """(the workload image, a state dir holding its baseline in monitor): a first agent run
    that watched one container do everything the tests call normal, then stopped."""
    from driftwarden.core.modes import Mode
    from driftwarden.models.items import ItemSet
    from driftwarden.models.profile import ProfileStore

    from tests.support.images import workload_image

    image = workload_image("known-field", {"/app/run.sh": (WORKLOAD_SCRIPT, 0o755)},
                           base=storm_image)
    state = tmp_path_factory.mktemp("learned-state")
    key = image_id(image)
    with known_agent(state, learn_for=8.0) as agent, \
            run_container(image, WORKLOAD, name="learn") as c:
        profile = wait_until(lambda: agent.detector.profiles.get(key), 30, "a baseline")
        _wait_for_workload(c.pid)
        _trigger(c, 2)
        c.exec(NC)

        def learned_ports() -> set[int]:
            with agent.lock:
                return {item.port for item in profile.items.items("connect")}

        wait_until(lambda: {PORT, NC_PORT} <= learned_ports(), 30, "both connects learned")
        wait_until(lambda: profile.mode is Mode.MONITOR, 30, "learning to end")
        # and its start-up is over: the baseline has seen a start, so later ones are checked
        wait_until(lambda: profile.starts_seen, 30, "the container's start-up seen")
        _trigger(c, 1)  # judged in monitor: nothing new
        alerts = agent.alerts_of(c.id)
    assert alerts == []
    # only this image's baseline: other containers on the host (other tests') learn afresh
    ours = ProfileStore(state, ItemSet).path_for(key)
    for path in ours.parent.iterdir():
        if path != ours:
            path.unlink()
    assert ours.exists()
    return image, state


def _state_from(learned_state: Path, tmp_path: Path) -> Path:
    """A copy of the learned state dir for one test (each test's agent saves into its own)."""
    state = tmp_path / "state"
    shutil.copytree(learned_state, state, ignore=shutil.ignore_patterns("*.sock"))
    return state


def _exec(container, cmd: list[str]) -> None:
    code, out = container.exec(cmd)
    assert code == 0, f"{cmd}: {out}"


def _trigger(container, appends: int) -> None:
    """The workload's shell appends `appends` lines to APP_LOG (it waits for this write)."""
    _exec(container, ["/bin/sh", "-c", f"echo {appends} > /run/trigger"])


def _wait_for_workload(pid: int) -> None:
    """Until the container's dwstorm runs (its shell then reads the FIFO)."""
    cgroup = Path(f"/proc/{pid}/cgroup").read_text()

    def running() -> bool:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if ((entry / "comm").read_text().strip() == "dwstorm"
                            and (entry / "cgroup").read_text() == cgroup):
                        return True
                except OSError:
                    continue
        return False

    wait_until(running, 30, "the workload's dwstorm")


def _appended(pid: int) -> int:
    return Path(f"/proc/{pid}/root{APP_LOG}").read_text().count("\n")


def _appends(records) -> list:
    return [r for r in records if r.kind == "write" and r.event.path == APP_LOG]


def _connects(records, port: int = PORT) -> list:
    return [r for r in records if r.kind == "connect" and r.event.port == port]


def _entries_of(agent, cgroup_id: int) -> dict:
    return {key: value for key, value in agent.entries().items() if key[0] == cgroup_id}


def _judged_append_key(agent, container, cgroup_id: int) -> tuple[int, int, int]:
    """One append in the container; its record, judged known, puts its identity in the map
    for the container's cgroup: that map key."""
    _trigger(container, 1)
    [first, *_] = _appends(agent.live.wait_for(_appends, cgroup_id, timeout=20))
    key = (cgroup_id, FILE, first.event.known_key)
    assert key[2] != 0
    wait_until(lambda: key in agent.entries(), 20, "the append's identity in the kernel")
    return key


def test_an_agent_joining_a_busy_node_counts_running_processes_writes_not_their_connects(
        learned, tmp_path):
    from driftwarden.core.modes import Mode
    from driftwarden.models.features import INDEX

    image, learned_state = learned
    key_image = image_id(image)
    with run_container(image, WORKLOAD, name="busy") as c:
        _wait_for_workload(c.pid)  # its shell and its dwstorm begin before the agent
        with known_agent(_state_from(learned_state, tmp_path), dedup_interval_ns=0) as agent:
            live, known, cgroup = agent.live, agent.known, c.cgroup_id
            # the shell's write, judged against the baseline loaded at start, goes in
            app = _judged_append_key(agent, c, cgroup)
            profile = agent.detector.profiles[key_image]
            assert profile.mode is Mode.MONITOR
            sent = len(_appends(live.for_cgroup(cgroup)))
            before = live.probes.counters()
            _trigger(c, 20)
            wait_until(lambda: _appended(c.pid) == 1 + 20, 20, "the 20 appends")
            wait_until(lambda: agent.entries()[app][0] >= 20, 20, "the kernel's hits")
            # the detector read them (every hit of every entry so far), then every window of
            # the container that was open by then closes
            counted = sum(hits for hits, _ in agent.entries().values())
            read_at = wait_until(lambda: known.stats["hits"] >= counted and time.time(), 20,
                                 "the hits read")
            wait_until(lambda: [w for w in agent.windows_of(c.id) if w.start > read_at], 20,
                       "a window after the hits were read")
            windows = agent.windows_of(c.id)
            appends = sum(w.vector[INDEX["writes_append"]] for w in windows)
            print(f"\nbusy node: {agent.entries()[app][0]} appends counted in the kernel, "
                  f"{len(_appends(live.for_cgroup(cgroup)))} sent; {len(windows)} windows "
                  f"count {appends:g} appends")
            assert agent.entries()[app][0] == 20  # dedup off: each append is one hit
            assert len(_appends(live.for_cgroup(cgroup))) == sent  # none of the 20 was sent
            # the windows count what they counted without the filter: every append
            assert appends == _appended(c.pid) == 21

            # dwstorm began before the agent: the kernel cannot name its program, so its
            # connects are never filtered (userspace knows it, from /proc) and keep arriving
            dwstorm = _connects(live.for_cgroup(cgroup))
            assert dwstorm and {r.event.known_key for r in dwstorm} == {0}
            assert {r.program.exe for r in dwstorm} == {"/bin/dwstorm"}
            wait_until(lambda: len(_connects(live.for_cgroup(cgroup))) >= len(dwstorm) + 8,
                       20, "dwstorm's connects still arriving")
            assert [k for k in _entries_of(agent, cgroup) if k[1] == CONNECT] == []

            # nc starts after the agent: its connect goes in, and its repeats are hits
            c.exec(NC)
            live.wait_for(lambda rs: _connects(rs, NC_PORT), cgroup)
            [nc_first] = _connects(live.for_cgroup(cgroup), NC_PORT)
            assert nc_first.event.known_key != 0 and nc_first.program.argv0 == "nc"
            nc_key = (cgroup, CONNECT, nc_first.event.known_key)
            wait_until(lambda: nc_key in agent.entries(), 20, "nc's connect in the kernel")
            for _ in range(3):
                c.exec(NC)
            after = live.probes.counters()
            assert agent.entries()[nc_key][0] == 3
            assert _connects(live.for_cgroup(cgroup), NC_PORT) == [nc_first]
            # every connect the kernel counted as known was nc's: none of dwstorm's
            assert after["connect"]["known"] - before["connect"]["known"] == 3
            assert agent.alerts_of(c.id) == []  # quiet: nothing new, nothing drifted
            held = dict(_entries_of(agent, cgroup))
    # at its stop the agent read every hit the kernel counted (its exit line's count)
    assert known.stats["hits"] == sum(hits for hits, _ in held.values())
    assert {(kind, key) for _, kind, key in held} >= {(FILE, app[2]), (CONNECT, nc_key[2])}


def _metric(text: str, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_a_learned_image_as_a_cri_pod_is_counted_in_the_kernel_and_drift_alerts(
        learned, containerd, tmp_path):
    image, learned_state = learned
    port = free_port()
    agent = AgentProcess(_state_from(learned_state, tmp_path), tmp_path / "alerts.jsonl",
                         ["--runtime-endpoint", containerd.endpoint, "--docker-host", DOCKER,
                          "--window", "1", "--metrics", f"127.0.0.1:{port}"])

    def metrics() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()

    known_events = 'driftwarden_agent_events_total{kind="file",outcome="known"}'
    with containerd.pod(unique_pod_name("known-field"), namespace="shop") as pod:
        container = pod.run(image, WORKLOAD, name="app")  # before the agent, as on a node
        _wait_for_workload(container.pid)
        with agent:
            # the appends are judged known, go in, then count in the kernel (one a second as
            # dedup lets them through: triggers a second apart)
            def counted() -> bool:
                _trigger(container, 1)
                time.sleep(1.1)
                return _metric(metrics(), known_events) > 0

            wait_until(counted, 40, "the pod's appends counted in the kernel")
            text = metrics()
            assert _metric(text, "driftwarden_agent_known_entries") >= 1
            assert [a for a in agent.alerts() if a["container"]["id"] == container.id] == []
            # drop-and-execute in the filtered container
            _exec(container, ["/bin/sh", "-c", "mkdir -p /tmp && cp /bin/busybox /tmp/true && "
                              "/tmp/true"])
            [drift] = agent.wait_for_alerts(
                lambda a: a["kind"] == "drift" and a["container"]["id"] == container.id,
                timeout=30, what="the pod's drift")
        pod_alerts = [a for a in agent.alerts() if a["container"]["id"] == container.id]
    assert drift["reasons"][0]["code"] == "exec-added-binary"
    assert drift["process"]["exe"] == "/tmp/true"
    assert (drift["container"]["pod"], drift["container"]["namespace"],
            drift["container"]["image_id"]) == (pod.name, "shop", image_id(image))
    assert {a["kind"] for a in pod_alerts} <= {"drift", "novel"}  # the copy is a new write
    # the exit lines: every event the kernel counted as known was read back (none since the
    # drift was filterable), and it counted the pod's appends
    log = agent.log().splitlines()
    [line] = [ln for ln in log if "kernel baseline filter:" in ln]
    identities, counted_events = (int(n) for n in re.search(
        r"filter: (\d+) identities, (\d+) events counted", line).groups())
    [kernel] = [json.loads(ln.split("kernel counters ", 1)[1]) for ln in log
                if "kernel counters " in ln]
    print(f"\ncri pod: {line.split('filter: ', 1)[1]}; kernel known counts: "
          f"{kernel['file']['known']} file, {kernel['connect']['known']} connect")
    assert identities >= 1 and counted_events >= 1, line
    assert counted_events == kernel["file"]["known"] + kernel["connect"]["known"], (line, kernel)


def _cgroup_now(container) -> int:
    return os.stat(container.cgroup_path).st_ino


def test_restarted_and_scaled_containers_get_their_own_entries_and_the_gone_give_theirs_back(
        learned, tmp_path):
    image, learned_state = learned
    with known_agent(_state_from(learned_state, tmp_path), gone_check_seconds=1.0) as agent, \
            run_container(image, WORKLOAD, name="replica-1") as r1:
        known = agent.known
        first_cgroup = _cgroup_now(r1)
        app = _judged_append_key(agent, r1, first_cgroup)
        first_entries = len(_entries_of(agent, first_cgroup))

        r1.container.restart(timeout=0)  # a new cgroup: a restart is a new container run
        restarted = _cgroup_now(r1)
        assert restarted != first_cgroup
        _judged_append_key(agent, r1, restarted)
        wait_until(lambda: not _entries_of(agent, first_cgroup), 20,
                   "the gone cgroup's entries out of the kernel")
        with agent.lock:
            assert first_cgroup not in known.cgroups()
            assert known.stats["gone"] >= first_entries >= 1

        with run_container(image, WORKLOAD, name="replica-2") as r2, \
                run_container(image, WORKLOAD, name="replica-3") as r3:
            replicas = {restarted: r1, r2.cgroup_id: r2, r3.cgroup_id: r3}
            for cgroup, replica in replicas.items():
                if replica is not r1:
                    assert _judged_append_key(agent, replica, cgroup)[1:] == app[1:]
            # one entry of the same identity per cgroup
            entries = agent.entries()
            assert {cgroup for cgroup, kind, key in entries if (kind, key) == app[1:]} == set(
                replicas)
            r3.exec(["/bin/sh", "-c", "echo x >> /data/novel.log"])
            for replica in (r1, r2):
                _trigger(replica, 3)
            novel = wait_until(lambda: agent.alerts_of(r3.id, "novel", "new-write"), 20,
                               "replica 3's new write")
            for replica in (r1, r2):
                wait_until(lambda replica=replica: _appended(replica.pid) >= 4, 20,
                           "the appends in replicas 1 and 2")
            agent.live.settle(r3.cgroup_id)
            assert agent.alerts_of(r1.id) == [] and agent.alerts_of(r2.id) == []
            assert [a.kind.value for a in agent.alerts_of(r3.id)] == ["novel"]
            [reason] = [r for r in novel[0].reasons if r.code == "new-write"]
            assert "/data/novel.log" in reason.text, reason
            scaled_down = (r2.cgroup_id, r3.cgroup_id)
            with agent.lock:
                gone_before = known.stats["gone"]
        wait_until(lambda: not any(_entries_of(agent, cg) for cg in scaled_down), 20,
                   "the removed replicas' entries out of the kernel")
        with agent.lock:
            assert known.cgroups() == {restarted}
            assert known.stats["gone"] > gone_before
            # every identity that went in is still held or was taken out as gone: none idle,
            # none refused, none left behind
            stats = dict(known.stats)
            assert stats["installed"] == len(known) + stats["gone"], stats
            assert (stats.get("evicted_idle", 0), stats.get("refused_full", 0)) == (0, 0)
        print(f"\nrestart and scale: {stats}")
