"""An idle agent's periodic costs, part by part: the old settings against the new, alternating.

    python -m bench.idle_parts [--rounds 3] [--seconds 15]

1. The read loop: LiveCapture on a private ring buffer that nothing writes (so other containers
   on the host do not count), driven by TracePipeline.run (fakes for /proc and attribution):
   the 50 ms idle drain timer and read timeout against 250 ms ones.
2. The periodic kernel reads on the real maps (a ProbeSet, 400 identities in `known`): the
   detector's ticks simulated over 60 s of an idle node, KnownFilter without and with `moved`,
   FloodWatch polling every 0.25 s or (after 10 s without growth) every second, and the drops
   read once a second as the detector's housekeeping does.

CPU is the measuring thread's run time from /proc/self/task/TID/schedstat (nanoseconds; the
clock-tick counts of /proc/PID/stat are too coarse for tenths of a percent). Needs root.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from dataclasses import dataclass

OLD, NEW = "old", "new"


def _run_ns() -> int:
    with open(f"/proc/self/task/{threading.get_native_id()}/schedstat") as fh:
        return int(fh.read().split()[0])


@dataclass(frozen=True)
class LoopResult:
    share: float  # of one core
    wakeups: float  # per second
    flushes: float  # the sinks' flushes per second (the detector's ticks)


def read_loop(setting: str, seconds: float) -> LoopResult:
    from driftwarden.probes._layout import Limits
    from driftwarden.probes._libbpf import Libbpf, RingBuffer
    from driftwarden.probes.capture import LiveCapture

    from tests.test_pipeline_unit import make

    lib = Libbpf()
    fd = lib.map_create(27, "dw_idle_rb", 0, 0, 4096 * 16)  # BPF_MAP_TYPE_RINGBUF

    class PrivateProbes:
        """drain/wait of ProbeSet on the private ring buffer."""

        class config:  # stands for ProbeConfig
            limits = Limits()

        def __init__(self) -> None:
            self.ring = RingBuffer(lib, fd, lambda _ctx, _data, _size: 0)
            self.wakeups = 0

        def drain(self) -> list[bytes]:
            self.ring.consume()
            return []

        def wait(self, timeout: float) -> None:
            self.wakeups += 1
            self.ring.poll(max(0, int(-(-timeout * 1000 // 1))))

        def counters(self) -> dict:
            return {}

        def stop(self) -> None:
            self.ring.free()

    probes = PrivateProbes()
    idle = 0.05 if setting == OLD else 0.25
    source = LiveCapture(probes, idle_interval=idle)  # type: ignore[arg-type]
    pipeline, sink = make()
    pipeline.source = source
    time.sleep(source.idle_after + 0.5)  # the node is idle from here
    start_cpu, start = _run_ns(), time.monotonic()
    pipeline.run(should_stop=lambda: time.monotonic() - start >= seconds, poll_interval=0.05,
                 idle_poll_interval=None if setting == OLD else source.idle_interval)
    elapsed = time.monotonic() - start
    result = LoopResult((_run_ns() - start_cpu) / 1e9 / elapsed, probes.wakeups / elapsed,
                        sink.flushes / elapsed)
    probes.stop()
    os.close(fd)
    return result


def kernel_reads(probes, setting: str, seconds: float = 60.0, tick: float = 0.25) -> float:
    """Share of one core the periodic reads of an idle node take."""
    from driftwarden.agent.flood import FloodWatch, ReadWhenMoved
    from driftwarden.agent.known import KnownFilter
    from driftwarden.core.records import ContainerView

    from tests.test_known import _write

    t = [1000.0]

    def totals(*names: str) -> int:
        return sum(k[n] for k in probes.counters().values() for n in names)

    known = KnownFilter(probes.known_install, probes.known_hits, probes.known_remove,
                        clock=lambda: t[0],
                        moved=None if setting == OLD else (lambda: totals("known")))
    for i in range(400):  # a cgroup id no process has: nothing hits them
        known.offer(_write(f"/data/f{i}", 10_000 + i), "sha256:idle", "idle")
    known.flush()
    known.poll(t[0])
    flood = FloodWatch(ReadWhenMoved(probes.budget_usage,
                                     lambda: totals("over_budget", "dropped")),
                       lambda cgid: ContainerView(state="unknown", cgroup_id=cgid),
                       clock=lambda: t[0], idle_poll_seconds=0.25 if setting == OLD else 1.0)
    last_drops = 0.0
    start_cpu, end = _run_ns(), t[0] + seconds
    while t[0] < end:
        t[0] += tick
        if known.due(t[0]):
            known.poll(t[0])
        if flood.due(t[0]):
            flood.poll(t[0])
        if t[0] - last_drops >= 1.0:
            last_drops = t[0]
            totals("dropped")
    share = (_run_ns() - start_cpu) / 1e9 / seconds
    probes.known_remove(list(known._entries))
    return share


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idle_parts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=15.0, help="per read-loop run")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (BPF maps)")
    if args.rounds < 1 or args.seconds <= 0:
        p.error("--rounds must be >= 1 and --seconds > 0")
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    print("| part | setting | CPU, % of a core | wake-ups/s | detector ticks/s |")
    print("|---|---|---|---|---|")
    for _ in range(args.rounds):
        for setting in (OLD, NEW):
            r = read_loop(setting, args.seconds)
            print(f"| read loop | {setting} | {100 * r.share:.3f} | {r.wakeups:.1f} | "
                  f"{r.flushes:.1f} |", flush=True)
    with ProbeSet(ProbeConfig(known_entries=16384)) as probes:
        for _ in range(args.rounds):
            for setting in (OLD, NEW):
                share = kernel_reads(probes, setting)
                print(f"| kernel reads | {setting} | {100 * share:.3f} | - | - |", flush=True)
    print("\nold: 50 ms idle drain timer and read timeout, the known map read every second, "
          "the flood counts every 0.25 s; new: 250 ms, the known map read when the kernel's "
          "total of hits moved (or every 10 s), the flood counts every second after 10 s "
          "without growth.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
