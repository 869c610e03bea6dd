"""The baseline in the kernel (issue 12.1), for real: real probes with the map `known`, real
containers, and the detector deciding what goes into it.

The kernel part: an identity put in the map is counted there, not sent (exactly: with dedup off
every event is a hit), a neighbouring identity is still sent, a relative path and an exec are
never filterable, and taking the entry out sends its events again. The agent part: a learned
workload's writes and connects stop reaching userspace once its image is out of learning while
its feature windows keep counting them, and drift and novelty in the same container are still
reported."""

from __future__ import annotations

import time

import pytest

from tests.support.containers import run_container
from tests.support.known_agent import known_agent
from tests.support.ring import drain_for
from tests.support.scenario import wait_until

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


def test_a_learned_workload_is_counted_in_the_kernel_and_attacks_still_alert(
        kernel_ok, docker_ok, storm_image, tmp_path):
    from driftwarden.models.features import INDEX

    with known_agent(tmp_path, learn_for=5.0) as agent, \
            run_container(storm_image, ["/bin/sh", "-c", NORMAL_LOOP], name="steady") as c:
        live, detector, known, lock = agent.live, agent.detector, agent.known, agent.lock
        image_id = c.container.attrs["Image"]
        profile = wait_until(lambda: detector.profiles.get(image_id), 20, what="a baseline")
        wait_until(lambda: profile.mode.value == "monitor", 20, what="learning to end")
        with lock:
            ended_at = time.time()
        # the loop's append and connect go into the map (the nc's exec is never filtered)
        wait_until(lambda: len(known) >= 2, 20, what="the loop's identities in the kernel")
        installed_at = time.time()  # on a busy host, later than learning's end
        time.sleep(4)
        with lock:
            installed = len(known)
            hits = known.stats["hits"]
            windows = [w for w in agent.handled
                       if w.container_id == c.id and w.start >= ended_at + 1]
        counted = live.probes.known_hits()
        records = live.for_cgroup(c.cgroup_id)
        late_appends = [r for r in records if r.kind == "write"
                        and r.event.path == "/data/app.log"
                        and (r.event.header.ts_ns + live.pipeline.source.clock_offset_ns) / 1e9
                        > installed_at + 1]
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
        wait_until(lambda: agent.alerts_of(c.id, "drift", "exec-added-binary"), 20,
                   "the exec drift")
        c.exec(["/bin/sh", "-c", "echo evil > /bin/evil"])
        wait_until(lambda: agent.alerts_of(c.id, "drift", "write-binary-dir"), 20,
                   "the write drift")
        c.exec(["/bin/sh", "-c", "nc -w1 127.0.0.1 4444 </dev/null; true"])
        wait_until(lambda: agent.alerts_of(c.id, "novel", "new-connect"), 20,
                   "the new connect")
        c.exec(["/bin/sh", "-c", "echo x >> /data/other.log"])
        wait_until(lambda: agent.alerts_of(c.id, "novel", "new-write"), 20,
                   "the new write")

        # back to learning: nothing of the image is filtered any more
        from driftwarden.core.modes import Mode

        with lock:
            profile.set_mode(Mode.LEARN, reason="test", who="test", now=time.time())
        wait_until(lambda: len(known) == 0, 20, what="the image's identities out of the kernel")
        assert live.probes.known_hits() == {}
        wait_until(lambda: [r for r in live.for_cgroup(c.cgroup_id) if r.kind == "write"
                            and r.event.path == "/data/app.log" and r.event.header.ts_ns
                            > time.monotonic_ns() - 2_000_000_000], 20, "the appends sent again")


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
