"""The baseline in the kernel (issue 12.1), for real: real probes with the map `known`, real
containers, and the detector deciding what goes into it.

The kernel part: an identity put in the map is counted there, not sent (exactly: with dedup off
every event is a hit), a neighbouring identity is still sent, a relative path and an exec are
never filterable, and taking the entry out sends its events again. The agent part: a learned
workload's writes and connects stop reaching userspace once its image is out of learning while
its feature windows keep counting them, and drift and novelty in the same container are still
reported."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from tests.support.containers import run_container
from tests.support.ring import drain_for

pytestmark = pytest.mark.integration

FILE, CONNECT = 3, 2  # EventKind numbers
LOOPS = 40


def _events(probes, cgroup_id: int, seconds: float = 0.5) -> list:
    from driftwarden.probes.decode import Decoder

    raws = drain_for(probes, seconds)
    return [e for e in Decoder(probes.config.limits).decode_many(raws)
            if e.header.cgroup_id == cgroup_id]


def test_the_kernel_counts_what_the_map_holds_and_sends_the_rest(kernel_ok, storm_image):
    from driftwarden.probes.events import ConnectEvent, FileEvent
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    config = ProbeConfig(kinds=frozenset({"exec", "connect", "write"}), dedup_interval_ns=0,
                         known_entries=64)
    with ProbeSet(config) as probes, run_container(storm_image, ["sleep", "3600"]) as c:
        probes.drain()
        code, out = c.exec(["/bin/sh", "-c", "mkdir -p /tmp/w && echo x > /tmp/w/state && "
                            "cd /tmp/w && echo x > relative && nc -w1 127.0.0.1 1 </dev/null; "
                            "true"])
        assert code == 0, out
        events = _events(probes, c.cgroup_id)
        [state] = [e for e in events if isinstance(e, FileEvent) and e.path == "/tmp/w/state"]
        [relative] = [e for e in events if isinstance(e, FileEvent) and e.path == "relative"]
        [connect] = [e for e in events if isinstance(e, ConnectEvent) and e.port == 1]
        assert state.known_key != 0 and connect.known_key != 0
        assert relative.known_key == 0  # its hash holds the process and its directory

        installed = probes.known_install([(c.cgroup_id, FILE, state.known_key, 0),
                                          (c.cgroup_id, CONNECT, connect.known_key, 0)])
        assert installed == 2
        before = probes.counters()
        # the same write and the same connect (a new nc process each time: the same program)
        code, out = c.exec(["/bin/sh", "-c", f"for i in $(seq {LOOPS}); do echo x > "
                            "/tmp/w/state; nc -w1 127.0.0.1 1 </dev/null; done; "
                            "echo y > /tmp/w/other; true"])
        assert code == 0, out
        events = _events(probes, c.cgroup_id)
        after = probes.counters()
        hits = probes.known_hits()
        sent_state = [e for e in events if isinstance(e, FileEvent) and e.path == "/tmp/w/state"]
        sent_connects = [e for e in events if isinstance(e, ConnectEvent) and e.port == 1]
        other = [e for e in events if isinstance(e, FileEvent) and e.path == "/tmp/w/other"]
        assert (sent_state, sent_connects) == ([], [])
        assert len(other) == 1  # another path of the same container is sent
        assert hits[(c.cgroup_id, FILE, state.known_key)][0] == LOOPS
        assert hits[(c.cgroup_id, CONNECT, connect.known_key)][0] == LOOPS
        assert after["file"]["known"] - before["file"]["known"] >= LOOPS
        assert after["connect"]["known"] - before["connect"]["known"] >= LOOPS
        # another container writing the same path is not this container's baseline
        with run_container(storm_image, ["/bin/sh", "-c", "mkdir -p /tmp/w && echo x > "
                                         "/tmp/w/state && sleep 3600"]) as other_c:
            deadline = time.monotonic() + 10
            seen = []
            while not seen and time.monotonic() < deadline:
                seen = [e for e in _events(probes, other_c.cgroup_id, 0.3)
                        if isinstance(e, FileEvent) and e.path == "/tmp/w/state"]
            assert len(seen) == 1 and seen[0].known_key == state.known_key

        # out of the map: sent again
        probes.known_remove([(c.cgroup_id, FILE, state.known_key)])
        c.exec(["/bin/sh", "-c", "echo x > /tmp/w/state"])
        again = [e for e in _events(probes, c.cgroup_id)
                 if isinstance(e, FileEvent) and e.path == "/tmp/w/state"]
        assert len(again) == 1


NORMAL_LOOP = (
    "mkdir -p /data && while true; do echo tick >> /data/app.log; "
    "nc -w1 127.0.0.1 8080 </dev/null; sleep 0.2; done"
)


@contextlib.contextmanager
def _agent(tmp_path, learn_for: float):
    """Probes with the map, the pipeline and a Detector with a KnownFilter, as `driftwarden
    agent` wires them; yields (live trace, detector, known filter, alert sink, lock, windows
    the detector handled)."""
    from driftwarden.agent.alerts import ListAlertSink
    from driftwarden.agent.detect import Detector, DetectorConfig, LayersCache, LockedSink
    from driftwarden.agent.known import KnownFilter
    from driftwarden.agent.runtimes.docker import DockerGraphDriver
    from driftwarden.models.items import ItemSet
    from driftwarden.models.profile import LearningPolicy, ProfileStore
    from driftwarden.probes.loader import ProbeConfig

    from tests.conftest import start_live_trace

    alerts, lock, detector = ListAlertSink(), threading.Lock(), None
    handled: list = []
    with contextlib.closing(DockerGraphDriver("unix:///var/run/docker.sock")) as graph_driver:
        try:
            with start_live_trace(ProbeConfig(known_entries=1024)) as live:
                probes = live.probes
                known = KnownFilter(probes.known_install, probes.known_hits,
                                    probes.known_remove, capacity=1024, poll_seconds=0.5)
                detector = Detector(
                    DetectorConfig(window_seconds=1.0, policy=LearningPolicy(learn_for=learn_for)),
                    ProfileStore(tmp_path, ItemSet), alerts,
                    layers_of=LayersCache(graph_driver_of=graph_driver).get,
                    clock_offset_ns=live.pipeline.source.clock_offset_ns, known=known)
                handle = detector._handle_windows

                def recording(windows):
                    handled.extend(windows)
                    handle(windows)

                detector._handle_windows = recording
                live.pipeline.sinks.append(LockedSink(detector, lock))
                yield live, detector, known, alerts, lock, handled
        finally:
            if detector is not None:
                detector.close()


def _wait(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _of(sink, lock, container, kind, code=None) -> list:
    with lock:
        return [a for a in sink.alerts if a.container.get("id") == container.id
                and a.kind.value == kind
                and (code is None or any(r.code == code for r in a.reasons))]


def test_a_learned_workload_is_counted_in_the_kernel_and_attacks_still_alert(
        kernel_ok, docker_ok, storm_image, tmp_path):
    from driftwarden.models.features import INDEX

    with _agent(tmp_path, learn_for=5.0) as (live, detector, known, sink, lock, handled), \
            run_container(storm_image, ["/bin/sh", "-c", NORMAL_LOOP], name="steady") as c:
        image_id = c.container.attrs["Image"]
        profile = _wait(lambda: detector.profiles.get(image_id), what="a baseline")
        _wait(lambda: profile.mode.value == "monitor", what="learning to end")
        with lock:
            ended_at = time.time()
        # the loop's append and connect go into the map (the nc's exec is never filtered)
        _wait(lambda: len(known) >= 2, what="the loop's identities in the kernel")
        time.sleep(4)
        with lock:
            installed = len(known)
            hits = known.stats["hits"]
            windows = [w for w in handled if w.container_id == c.id and w.start >= ended_at + 1]
        counted = live.probes.known_hits()
        records = live.for_cgroup(c.cgroup_id)
        late_appends = [r for r in records if r.kind == "write"
                        and r.event.path == "/data/app.log"
                        and (r.event.header.ts_ns + live.pipeline.source.clock_offset_ns) / 1e9
                        > ended_at + 2]
        appends = [w.vector[INDEX["writes_append"]] for w in windows]
        print(f"\n{installed} identities in the kernel, {hits} hits read; "
              f"{len(windows)} windows after learning: writes_append {appends}")
        assert installed >= 2
        assert late_appends == []  # counted in the kernel, not sent
        assert hits > 0 and sum(h for h, _ in counted.values()) >= hits
        # the windows still count the appends (about one a second, as dedup lets them through)
        assert windows and sum(appends) >= len(windows) / 2, appends

        # attacks in the same container
        c.exec(["/bin/sh", "-c", "mkdir -p /tmp/x && cp /bin/busybox /tmp/x/busybox && "
                "/tmp/x/busybox true"])
        _wait(lambda: _of(sink, lock, c, "drift", "exec-added-binary"), what="the exec drift")
        c.exec(["/bin/sh", "-c", "echo evil > /bin/evil"])
        _wait(lambda: _of(sink, lock, c, "drift", "write-binary-dir"), what="the write drift")
        c.exec(["/bin/sh", "-c", "nc -w1 127.0.0.1 4444 </dev/null; true"])
        _wait(lambda: _of(sink, lock, c, "novel", "new-connect"), what="the new connect")
        c.exec(["/bin/sh", "-c", "echo x >> /data/other.log"])
        _wait(lambda: _of(sink, lock, c, "novel", "new-write"), what="the new write")

        # back to learning: nothing of the image is filtered any more
        from driftwarden.core.modes import Mode

        with lock:
            profile.set_mode(Mode.LEARN, reason="test", who="test", now=time.time())
        _wait(lambda: len(known) == 0, what="the image's identities out of the kernel")
        assert live.probes.known_hits() == {}
        _wait(lambda: [r for r in live.for_cgroup(c.cgroup_id) if r.kind == "write"
                       and r.event.path == "/data/app.log" and r.event.header.ts_ns
                       > time.monotonic_ns() - 2_000_000_000], what="the appends sent again")


def test_paths_that_differ_in_one_byte_are_different_identities(kernel_ok, storm_image):
    """The identity hash carries every byte to every bit: with the old word-wise FNV,
    /tmp/a13 and /tmp/a19 (and a22, a28) hashed alike, so the second exec in a second was
    suppressed as a repeat of the first, and a write could pass for a known one."""
    from driftwarden.probes.events import ExecEvent, FileEvent
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    names = ("a13", "a19", "a22", "a28")
    config = ProbeConfig(kinds=frozenset({"exec", "write"}), known_entries=64)
    with ProbeSet(config) as probes, run_container(storm_image, ["sleep", "3600"]) as c:
        code, out = c.exec(["/bin/sh", "-c", " && ".join(
            f"mkdir -p /tmp/{n} && cp /bin/busybox /tmp/{n}/true" for n in names)])
        assert code == 0, out
        probes.drain()
        code, out = c.exec(["/bin/sh", "-c", "; ".join(
            f"/tmp/{n}/true; echo x > /tmp/{n}/w" for n in names)])
        assert code == 0, out
        events = _events(probes, c.cgroup_id)
    execs = {e.filename for e in events if isinstance(e, ExecEvent)}
    writes = [e for e in events if isinstance(e, FileEvent) and e.path.endswith("/w")]
    assert {f"/tmp/{n}/true" for n in names} <= execs
    assert sorted(e.path for e in writes) == [f"/tmp/{n}/w" for n in names]
    assert len({e.known_key for e in writes}) == len(names)
