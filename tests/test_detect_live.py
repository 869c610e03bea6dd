"""Detection end to end: real probes, a real container, a short learning period, then attacks.

A first slice of issue 3's scenario suite: the pipeline feeds the Detector, which learns the
image while the container runs its normal loop, switches to monitor (--learn-for), and then
must raise the right alert kind with the right reason for each attack.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.support.containers import run_container

pytestmark = pytest.mark.integration

NORMAL_LOOP = (
    "mkdir -p /data && while true; do echo tick >> /data/app.log; "
    "nc -w1 127.0.0.1 8080 </dev/null; sleep 0.3; done"
)


@pytest.fixture
def detecting(kernel_ok, docker_ok, tmp_path):
    """Probes + pipeline + Detector in a thread; yields (detector, alert list)."""
    from driftwarden.agent.alerts import ListAlertSink
    from driftwarden.agent.attribution_view import LiveAttribution
    from driftwarden.agent.detect import Detector, DetectorConfig, LayersCache
    from driftwarden.agent.pipeline import TracePipeline
    from driftwarden.agent.procfs import LiveProcReader
    from driftwarden.models.items import ItemSet
    from driftwarden.models.profile import LearningPolicy, ProfileStore
    from driftwarden.probes.capture import LiveCapture
    from driftwarden.probes.loader import ProbeConfig, ProbeSet, find_cgroup2_root

    sink = ListAlertSink()
    stop = threading.Event()
    with (
        LiveAttribution(str(find_cgroup2_root()), "unix:///var/run/docker.sock") as attribution,
        ProbeSet(ProbeConfig()) as probes,
    ):
        source = LiveCapture(probes)
        pipeline = TracePipeline(source, proc=LiveProcReader(), attribution=attribution,
                                 sinks=[])
        detector = Detector(
            DetectorConfig(window_seconds=1.0, policy=LearningPolicy(learn_for=6.0)),
            ProfileStore(tmp_path, ItemSet), sink,
            exe_of=pipeline.processes.exe_before_exec, layers_of=LayersCache().get,
            clock_offset_ns=source.clock_offset_ns,
        )
        pipeline.sinks.append(detector)
        thread = threading.Thread(target=pipeline.run,
                                  kwargs={"should_stop": stop.is_set, "poll_interval": 0.02})
        thread.start()
        try:
            yield detector, sink
        finally:
            stop.set()
            thread.join(timeout=15)
            detector.close()


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
