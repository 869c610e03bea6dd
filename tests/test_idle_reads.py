"""How often an idle agent wakes up: LiveCapture's drain timer (on a scripted ring buffer and
clock) and TracePipeline.run's read timeout (longer while no record waits for metadata), and
bench.idle_parts, which measures what they cost."""

from __future__ import annotations

import pytest
from driftwarden.probes._layout import Limits
from driftwarden.probes.capture import LiveCapture

from tests.test_decode import exec_record
from tests.test_pipeline_unit import NEW_CG, FakeAttribution, FakeSource, make, w


class ScriptedProbes:
    """drain() hands out the scripted batch of the current time (once); wait(t) lets t pass."""

    class config:  # stands for ProbeConfig
        limits = Limits()

    def __init__(self) -> None:
        self.now = 100.0
        self.arrivals: dict[float, list[bytes]] = {}
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    def drain(self) -> list[bytes]:
        due = [t for t in self.arrivals if t <= self.now + 1e-9]
        return [raw for t in sorted(due) for raw in self.arrivals.pop(t)]

    def wait(self, timeout: float) -> None:
        self.waits.append(round(timeout, 6))
        self.now += timeout


def test_the_drain_timer_is_short_while_records_come_and_long_on_an_idle_node():
    probes = ScriptedProbes()
    source = LiveCapture(probes, clock=probes.clock)  # type: ignore[arg-type]
    assert (source.drain_interval, source.follow_up_interval, source.idle_interval,
            source.idle_after) == (0.01, 0.002, 0.25, 2.0)
    assert source.read_batch(0.05) == [] and probes.waits == [0.01] * 5  # records 0 s ago
    write = w("/data/app.log")
    probes.arrivals[probes.now + 0.02] = [write]
    assert source.read_batch(0.25) == [write] and probes.waits[5:] == [0.01, 0.01]
    probes.waits.clear()
    probes.now += 2.0  # nothing for 2 s: idle
    assert source.read_batch(0.25) == [] and probes.waits == [0.25]
    assert source.read_batch(0.05) == [] and probes.waits == [0.25, 0.05]  # the caller's bound
    started = exec_record("/bin/sh", ["sh"])
    probes.arrivals[probes.now] = [started]  # an exec wakes the reader (the kernel's wake-up)
    assert source.read_batch(0.25) == [started]
    probes.waits.clear()
    assert source.read_batch(0.25) == [] and probes.waits[:2] == [0.002, 0.01]  # follow-up


class TimedSource(FakeSource):
    def __init__(self, batches) -> None:
        super().__init__(batches)
        self.timeouts: list[float] = []

    def read_batch(self, timeout: float) -> list[bytes] | None:
        self.timeouts.append(timeout)
        return super().read_batch(timeout)


def test_the_pipeline_reads_with_the_idle_timeout_unless_a_record_waits_for_metadata():
    source = TimedSource([[], [w("/one", cg=NEW_CG)], [], [], []])
    pipeline, sink = make(attribution=FakeAttribution(pending_for={NEW_CG: 2}))
    pipeline.source = source
    pipeline.run(poll_interval=0.05, idle_poll_interval=0.25)
    # the record waits for its container through two lookups: short reads until it is out
    assert source.timeouts == [0.25, 0.25, 0.05, 0.25, 0.25, 0.25, 0]  # 0: the last drain
    assert [r.path for r in sink.records] == ["/one"]
    plain = TimedSource([[], []])
    pipeline, _ = make()
    pipeline.source = plain
    pipeline.run(poll_interval=0.05)
    assert plain.timeouts == [0.05, 0.05, 0.05, 0]


@pytest.mark.integration
def test_the_idle_parts_bench_runs_and_the_new_settings_wake_less(kernel_ok, capsys):
    from bench.idle_parts import main

    assert main(["--rounds", "1", "--seconds", "1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| read loop") or line.startswith("| kernel reads")]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [
        ("read loop", "old"), ("read loop", "new"), ("kernel reads", "old"),
        ("kernel reads", "new")]
    wakeups = {r[1].strip(): float(r[3]) for r in rows[:2]}
    assert wakeups["new"] < wakeups["old"]  # 4 a second against 20
