"""Kernel time of a tool's BPF programs, per program run and per storm iteration.

    python -m bench.kernel_cost [--storms exec,connect,open,openuniq] [--runs N]

The kernel's own per-program statistics (BPF_ENABLE_STATS: run_time_ns and run_cnt of every
program, on only while this process holds the fd it returns) for the programs one process
attached: every perf-event fd of that process is asked which program and tracepoint it holds
(BPF_TASK_FD_QUERY, as `bpftool perf` does). A snapshot before and after a storm gives what the
storm cost each program, independently of how busy the host is otherwise (only the storm's
syscalls are counted when nothing else runs them; the counts say so). The time of the
tracepoint machinery around a program (perf's syscall record) is not in it: it is the same per
attached tracepoint for every tool, so programs a storm triggers are counted too.

probe_overhead.py's section 1 takes these snapshots around every ON run; run alone, this
module measures driftwarden (`trace --budget off`) and the bpftrace floor on each storm once.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from driftwarden.probes._libbpf import Libbpf, enable_prog_stats, prog_info, task_fd_program

from bench.common import run_bench

PERF_EVENT_LINK = "anon_inode:[perf_event]"


@dataclass
class ProgramRuns:
    """What the programs on one tracepoint cost over a span: total ns and runs."""

    run_time_ns: int = 0
    run_cnt: int = 0

    @property
    def ns_per_run(self) -> float:
        return self.run_time_ns / self.run_cnt if self.run_cnt else 0.0


def perf_event_fds(pid: int) -> Iterator[int]:
    """The fd numbers of `pid` that are perf events (a tracepoint attachment each)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{name}") == PERF_EVENT_LINK:
                    yield int(name)


class ProgramStats:
    """The kernel's per-program statistics, on between start() and stop(); snapshots of one
    process's programs."""

    def __init__(self) -> None:
        self._lib = Libbpf()
        self._stats_fd = -1

    def start(self) -> None:
        if self._stats_fd < 0:
            self._stats_fd = enable_prog_stats(self._lib)

    def stop(self) -> None:
        """Statistics off again (they cost two clock reads per program run)."""
        if self._stats_fd >= 0:
            os.close(self._stats_fd)
            self._stats_fd = -1

    def programs(self, pid: int) -> dict[int, str]:
        """Program id -> the tracepoint it is attached to, for the perf events `pid` holds."""
        found: dict[int, str] = {}
        for fd in perf_event_fds(pid):
            held = task_fd_program(self._lib, pid, fd)
            if held is not None:
                found[held[0]] = held[1]
        return found

    def snapshot(self, programs: Mapping[int, str]) -> dict[str, ProgramRuns]:
        """Tracepoint -> the cumulative runs of its programs (a gone program is left out)."""
        out: dict[str, ProgramRuns] = {}
        for prog_id, tracepoint in programs.items():
            try:
                info = prog_info(self._lib, prog_id)
            except OSError:
                continue
            runs = out.setdefault(tracepoint, ProgramRuns())
            runs.run_time_ns += int(info.run_time_ns)
            runs.run_cnt += int(info.run_cnt)
        return out


def runs_between(before: Mapping[str, ProgramRuns],
                 after: Mapping[str, ProgramRuns]) -> dict[str, ProgramRuns]:
    """What ran between two snapshots, tracepoints that did not run left out."""
    out: dict[str, ProgramRuns] = {}
    for tracepoint, end in after.items():
        start = before.get(tracepoint, ProgramRuns())
        delta = ProgramRuns(end.run_time_ns - start.run_time_ns, end.run_cnt - start.run_cnt)
        if delta.run_cnt > 0:
            out[tracepoint] = delta
    return out


def add_runs(total: dict[str, ProgramRuns], more: Mapping[str, ProgramRuns]) -> None:
    for tracepoint, runs in more.items():
        into = total.setdefault(tracepoint, ProgramRuns())
        into.run_time_ns += runs.run_time_ns
        into.run_cnt += runs.run_cnt


@dataclass
class KernelCost:
    """One tool's programs over a storm's ON runs: `iterations` storm iterations in all."""

    storm: str
    tool: str
    iterations: int = 0
    runs: dict[str, ProgramRuns] = field(default_factory=dict)

    @property
    def ns_per_iteration(self) -> float:
        total = sum(r.run_time_ns for r in self.runs.values())
        return total / self.iterations if self.iterations else 0.0

    def busiest(self, limit: int = 6) -> list[tuple[str, ProgramRuns]]:
        """The tracepoints that took the most time, most first."""
        return sorted(self.runs.items(), key=lambda kv: -kv[1].run_time_ns)[:limit]


def render_costs(costs: Sequence[KernelCost]) -> str:
    """A markdown table: per storm and tool, kernel ns per iteration and the busiest programs
    with their ns per run and runs per iteration."""
    lines = ["| storm | tool | kernel ns / iteration | programs (ns/run x runs/iteration) |",
             "|---|---|---|---|"]
    for cost in costs:
        parts = [f"{tp} {r.ns_per_run:.0f} x {r.run_cnt / max(cost.iterations, 1):.2f}"
                 for tp, r in cost.busiest()]
        lines.append(f"| {cost.storm} | {cost.tool} | {cost.ns_per_iteration:.0f} | "
                     f"{'; '.join(parts) or '(none ran)'} |")
    return "\n".join(lines)


def cost_during(stats: ProgramStats, pid: int, storm: str, tool: str,
                run: Callable[[], int], runs: int = 1) -> KernelCost:
    """The kernel time of `pid`'s programs over `runs` calls of `run` (one storm each; it
    returns the iterations it made), statistics on only while a storm runs."""
    cost = KernelCost(storm, tool)
    programs = stats.programs(pid)
    for _ in range(runs):
        stats.start()
        try:
            before = stats.snapshot(programs)
            cost.iterations += run()
            add_runs(cost.runs, runs_between(before, stats.snapshot(programs)))
        finally:
            stats.stop()
    return cost


def measure(storms: Sequence[str], runs: int, full_agent: bool,
            log: Callable[[str], None]) -> list[KernelCost]:
    """driftwarden `trace --budget off` (and the whole agent on a learned baseline when
    `full_agent`) and the bpftrace floor, `runs` ON runs per storm."""
    from bench import probe_overhead as po
    from tests.support.images import storm_image

    image = storm_image()
    sizes = {name: po.calibrate(image, po.STORMS[name], 1.0, log) for name in storms}
    costs: list[KernelCost] = []
    stats = ProgramStats()
    state = None
    try:
        state = po.learned_state(image, sizes, "tmpfs", log) if full_agent else None
        for name in storms:
            storm, n = po.STORMS[name], sizes[name]
            tools = [po.agent_tool("--summary-only", "--budget", "off")]
            if state is not None:
                tools.append(po.full_agent_tool(state))
            tools.append(po.floor_tool(storm.syscall))
            for tool in tools:
                cost = po.measure_kernel_cost(image, storm, n, tool, stats, runs=runs)
                log(f"[kernel-cost] {name} {tool.label}: {cost.ns_per_iteration:.0f} ns "
                    "per iteration")
                costs.append(cost)
    finally:
        stats.stop()
        po.stop_all_tools()
        if state is not None:
            shutil.rmtree(state, ignore_errors=True)
    return costs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernel_cost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--storms", default="exec,connect,open,openuniq",
                   help="comma-separated storms (default %(default)s)")
    p.add_argument("--runs", type=int, default=2, help="ON runs per storm and tool")
    p.add_argument("--full-agent", action="store_true",
                   help="also the whole agent on a learned baseline (learning takes ~1 min)")
    args = p.parse_args(argv)
    from bench import probe_overhead as po

    storms = [s for s in args.storms.split(",") if s]
    unknown = [s for s in storms if s not in po.STORMS]
    if unknown:
        p.error(f"unknown storm(s) {', '.join(unknown)}: choose from {', '.join(po.STORMS)}")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    if os.geteuid() != 0:
        p.error("needs root (BPF statistics, the tools' probes and Docker)")
    code, _ = run_bench(
        lambda: measure(storms, args.runs, args.full_agent,
                        lambda msg: print(msg, file=sys.stderr, flush=True)),
        render_costs, out=None, cleaned_up="tools stopped, containers removed")
    return code


if __name__ == "__main__":
    sys.exit(main())
