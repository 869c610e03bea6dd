"""Detection end to end: real probes, a real container, a short learning period, then attacks.

A first slice of issue 3's scenario suite: the pipeline feeds the Detector, which learns the
image while the container runs its normal loop, switches to monitor (--learn-for), and then
must raise the right alert kind with the right reason for each attack.

Process identity (issue 9): programs and lineages come from the agent's own process table (fork,
exec and exit events keyed by (tgid, start_ns)), so they stay right when the pid counter wraps
and when a process is gone before the agent looks at it. The pid wrap test lowers
kernel.pid_max for a few seconds (restored in a finally) and forks through the whole pid range
from a container, so every pid a workload used before is handed to another process; runc's
setup of a container started afterwards must still be known as setup, and a learned workload
must stay quiet.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.containers import run_container

pytestmark = pytest.mark.integration

NORMAL_LOOP = (
    "mkdir -p /data && while true; do echo tick >> /data/app.log; "
    "nc -w1 127.0.0.1 8080 </dev/null; sleep 0.3; done"
)


@dataclass
class Agent:
    """The real probes + pipeline (conftest's LiveTrace: every record it delivered, runtime
    setup included) feeding a Detector, as `driftwarden agent` wires them."""

    live: Any
    detector: Any
    alerts: Any
    lock: threading.Lock

    def of(self, container) -> list:
        return self.live.for_cgroup(container.cgroup_id)

    def alerts_of(self, container, since: int = 0) -> list:
        with self.lock:
            return [a for a in self.alerts.alerts[since:] if a.container.get("id") == container.id]

    def monitor(self, image_id: str) -> int:
        """The image's baseline switches to monitor now; returns the alert count so far."""
        from driftwarden.core.modes import Mode

        with self.lock:
            self.detector.profiles[image_id].set_mode(Mode.MONITOR, reason="test", who="test",
                                                      now=time.time())
            return len(self.alerts.alerts)


class Lagging:
    """A sink that makes the pipeline slow (after each batch), as a loaded agent is: the
    processes its events name are long gone when they are handled."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def write(self, record) -> None:
        pass

    def flush(self) -> None:
        time.sleep(self.seconds)


@contextlib.contextmanager
def running_agent(tmp_path, *, learn_for: float = 3600.0, lag: float = 0.0) -> Iterator[Agent]:
    from driftwarden.agent.alerts import ListAlertSink
    from driftwarden.agent.detect import Detector, DetectorConfig, LayersCache, LockedSink
    from driftwarden.agent.runtimes.docker import DockerGraphDriver
    from driftwarden.models.items import ItemSet
    from driftwarden.models.profile import LearningPolicy, ProfileStore
    from driftwarden.probes.loader import ProbeConfig

    from tests.conftest import start_live_trace

    alerts, lock, detector = ListAlertSink(), threading.Lock(), None
    with contextlib.closing(DockerGraphDriver("unix:///var/run/docker.sock")) as graph_driver:
        try:
            with start_live_trace(ProbeConfig()) as live:
                detector = Detector(
                    DetectorConfig(window_seconds=1.0, policy=LearningPolicy(learn_for=learn_for)),
                    ProfileStore(tmp_path, ItemSet), alerts,
                    layers_of=LayersCache(graph_driver_of=graph_driver).get,
                    clock_offset_ns=live.pipeline.source.clock_offset_ns)
                live.pipeline.sinks.append(LockedSink(detector, lock))
                if lag:
                    live.pipeline.sinks.append(Lagging(lag))
                yield Agent(live, detector, alerts, lock)
        finally:
            if detector is not None:  # the pipeline has stopped: nothing writes any more
                detector.close()


@pytest.fixture
def detecting(kernel_ok, docker_ok, tmp_path):
    """Probes + pipeline + Detector in a thread; yields (detector, alert list)."""
    with running_agent(tmp_path, learn_for=6.0) as agent:
        yield agent.detector, agent.alerts


def _wait(predicate, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _item(alert) -> str:
    return str(alert.reasons[0].to_dict()["details"].get("item", ""))


def _alerts(sink, container, kind=None, code=None):
    out = [a for a in sink.alerts if a.container.get("id") == container.id]
    if kind is not None:
        out = [a for a in out if a.kind.value == kind]
    if code is not None:
        out = [a for a in out if any(r.code == code for r in a.reasons)]
    return out


def test_learn_then_detect_drift_and_novelty(detecting, storm_image):
    detector, sink = detecting
    with run_container(storm_image, ["/bin/sh", "-c", NORMAL_LOOP], name="webapp") as c:
        profile = _wait(lambda: detector.profiles.get(
            c.container.attrs["Image"]), what="a baseline for the image")
        _wait(lambda: profile.mode.value == "monitor", timeout=20, what="learning to end")
        assert len(profile.items) >= 3
        assert not _alerts(sink, c, "novel"), "the normal loop must not raise novelty"
        before = len(sink.alerts)

        # drop and execute a copied binary (busybox picks its applet from argv[0])
        c.exec(["/bin/sh", "-c", "mkdir -p /tmp/x && cp /bin/busybox /tmp/x/busybox && "
                "/tmp/x/busybox true"])
        drift = _wait(lambda: _alerts(sink, c, "drift", "exec-added-binary"),
                      what="the exec drift alert")
        assert drift[0].severity.name == "HIGH"
        assert "/tmp/x/busybox" in drift[0].reasons[0].text
        assert drift[0].process["pid"] > 0 and drift[0].events

        # a write into /bin
        c.exec(["/bin/sh", "-c", "echo evil > /bin/evil"])
        write = _wait(lambda: _alerts(sink, c, "drift", "write-binary-dir"),
                      what="the write drift alert")
        assert "/bin/evil" in write[0].reasons[0].text

        # a connect to a port the image never used
        c.exec(["/bin/sh", "-c", "nc -w1 127.0.0.1 4444 </dev/null; true"])
        novel = _wait(lambda: [a for a in _alerts(sink, c, "novel", "new-connect")
                               if ":4444" in _item(a)], what="the new-connect alert")
        assert _item(novel[0]) == "tcp connect to 127.0.0.1:4444 (loopback) by /bin/busybox"
        assert novel[0].baseline_version == profile.version or novel[0].baseline_version > 0

        assert len(sink.alerts) > before
        learned = [a for a in _alerts(sink, c, "novel") if ":8080" in _item(a)
                   or "app.log" in _item(a)]
        assert not learned, [a.reasons[0].text for a in learned]


# -- process identity (issue 9: classes 1 and 4) ---------------------------------------------

PID_MAX = Path("/proc/sys/kernel/pid_max")
NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
FIRST_PID_AFTER_WRAP = 300  # the kernel's RESERVED_PIDS


def _pids_in_use() -> set[int]:
    """Every process and thread id (threads take pids too)."""
    used = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError):
                used.update(int(t) for t in os.listdir(f"/proc/{name}/task"))
    return used


@contextlib.contextmanager
def lowered_pid_max(free: int = 3000):
    """pid_max a few thousand above the last pid handed out, so a few thousand forks wrap the
    counter, with at least `free` pids free below it for everything else running on this host
    (processes holding higher pids keep them; none is handed out meanwhile); restored whatever
    happens. Yields (last pid, the lowered pid_max)."""
    saved = int(PID_MAX.read_text())
    last = int(NS_LAST_PID.read_text())
    used = _pids_in_use()
    lowered = min(saved, max(last, FIRST_PID_AFTER_WRAP) + free)
    while lowered < saved and lowered - FIRST_PID_AFTER_WRAP - sum(
            1 for p in used if p < lowered) < free:
        lowered += 500
    lowered = min(lowered, saved)
    PID_MAX.write_text(str(lowered))
    try:
        yield last, lowered
    finally:
        PID_MAX.write_text(str(saved))


# a shell forking two programs in a loop: busybox's sleep (a re-exec of /proc/self/exe) and
# dwstorm (an exec of /bin/dwstorm; a new argv each time, so no exec is deduplicated)
WORKLOAD = "i=0; while :; do i=$((i+1)); dwstorm open 1 /tmp/w.$i >/dev/null; sleep 0.02; done"


def _is_setup_comm(comm: str) -> bool:
    return comm == "runc" or comm.startswith("runc:")


def test_identity_survives_a_pid_wrap(kernel_ok, docker_ok, storm_image, tmp_path):
    from driftwarden.core.records import Program

    with running_agent(tmp_path) as agent, \
            run_container(storm_image, ["/bin/sh", "-c", WORKLOAD], name="wrapload") as w:
        image_id = w.container.attrs["Image"]
        init = Program("/bin/sh", "/bin/sh")
        # learn the workload: its applets, their lineage from the shell, its writes
        _wait(lambda: {"dwstorm", "sleep"} <= {r.event.argv[0] for r in agent.of(w)
                                               if r.kind == "exec" and r.event.argv},
              30, "the workload's execs")
        time.sleep(3)
        since = agent.monitor(image_id)
        learned = {i.describe() for i in agent.detector.profiles[image_id].items}
        assert {"exec /bin/busybox as sleep", "exec /bin/dwstorm",
                "/bin/busybox:sh started /bin/busybox:sleep",
                "/bin/busybox:sh started /bin/dwstorm:dwstorm"} <= learned, learned
        before_wrap = len(agent.of(w))

        with lowered_pid_max() as (last, pid_max):
            # every pid from here up to pid_max, then every free one from 300 up again: each
            # pid the workload used before is handed to another process (a last pid at or
            # above the new pid_max wraps at the first fork)
            forks = max(pid_max - last, 0) + (pid_max - FIRST_PID_AFTER_WRAP) + 500
            with run_container(storm_image, ["dwstorm", "exec", str(forks)], detach=False,
                               wait_timeout=300, name="pidwrap") as storm:
                # every fork succeeded: more pids than [last, pid_max) holds were handed out
                assert storm.wait() == 0, storm.logs()
                assert f'"count":{forks},"errors":0' in storm.logs(), storm.logs()
            # a container started after the wrap: runc's setup gets recycled pids
            with run_container(storm_image, ["/bin/sh", "-c", "mkdir -p /data && sleep 3600"],
                               name="afterwrap") as fresh:
                fresh.exec(["/bin/sh", "-c", "echo hi > /data/x; date >/dev/null"])
                _wait(lambda: [r for r in agent.of(fresh) if r.path == "/data/x"], 30,
                      "the new container's write")
                time.sleep(1.5)  # the workload keeps running on recycled pids meanwhile
                fresh_records = agent.of(fresh)
                fresh_alerts = agent.alerts_of(fresh, since)
        # the workload before and after the wrap: every exec names its own program and the
        # shell that started it, on whatever pid it got
        after = agent.of(w)[before_wrap:]
        execs = [r for r in after if r.kind == "exec" and r.event.ok and not r.runtime_setup]
        assert len(execs) >= 10, [r.event.argv for r in execs]
        for r in execs:
            argv0 = r.event.argv[0]
            assert r.program in (Program("/bin/sh", argv0, True),
                                 Program(f"/bin/{argv0}", argv0)), r
            assert r.parent_program == init, r
        w_alerts = [a for a in agent.alerts_of(w, since) if a.kind.value in ("novel", "drift")]
        assert not w_alerts, [r.text for a in w_alerts for r in a.reasons]

    # runc's setup of the new container is setup, whatever pids it got
    runc = [r for r in fresh_records if _is_setup_comm(r.event.header.comm)]
    assert [r for r in runc if r.kind == "write"], "runc's setup writes were not seen"
    assert all(r.runtime_setup for r in runc), [
        (r.event.header.tgid, r.event.header.comm, r.path) for r in runc if not r.runtime_setup]
    writes = [r.path for r in fresh_records if r.kind == "write" and not r.runtime_setup]
    assert writes and not [p for p in writes if "/merged/" in p or p.startswith("/proc/")], (
        writes)
    drift = [a for a in fresh_alerts if a.kind.value == "drift"]
    assert not drift, [r.text for a in drift for r in a.reasons]


APPLETS = "nc -w1 127.0.0.1 1 </dev/null; base64 /etc/passwd >/dev/null; timeout 1 true"


def test_busybox_applets_are_named_by_their_binary_even_when_gone(kernel_ok, docker_ok,
                                                                   bb_image, tmp_path):
    """busybox re-execs itself (/proc/self/exe) for each applet, which exits at once; the agent
    handles the events a second later (a lagging pipeline). Learned as `exec /bin/busybox as
    nc`, the same applet in a new container of the image is known: never `/proc/self/exe`."""
    with running_agent(tmp_path, lag=1.0) as agent:
        with run_container(bb_image, ["/bin/sh", "-c", f"{APPLETS}; sleep 3600"],
                           name="applets") as first:
            image_id = first.container.attrs["Image"]
            _wait(lambda: [r for r in agent.of(first) if r.kind == "exec"
                           and r.event.argv[:1] == ("timeout",)], 30, "the applets' execs")
            time.sleep(1.5)
            since = agent.monitor(image_id)
        items = {i.describe() for i in agent.detector.profiles[image_id].items}
        for applet in ("nc", "base64", "timeout"):
            assert f"exec /bin/busybox as {applet}" in items, items
        assert not [i for i in items if "/proc/self/exe" in i], items
        with run_container(bb_image, ["/bin/sh", "-c", f"{APPLETS}; sleep 3600"],
                           name="applets2") as second:
            _wait(lambda: [r for r in agent.of(second) if r.kind == "exec"
                           and r.event.argv[:1] == ("timeout",)], 30, "the second run")
            time.sleep(2.5)
            execs = [r for r in agent.of(second) if r.kind == "exec" and r.event.ok
                     and r.event.filename == "/proc/self/exe"]
            novel = [a for a in agent.alerts_of(second, since) if a.kind.value == "novel"]
    assert {r.event.argv[0] for r in execs} >= {"nc", "base64", "timeout"}
    texts = [r.text for a in novel for r in a.reasons]
    assert not [t for t in texts if "/proc/self/exe" in t or " as nc" in t
                or " as base64" in t or " as timeout" in t], texts
