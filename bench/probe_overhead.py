"""Probe overhead and loss benchmark for driftwarden, in one run, as ratios.

    python -m bench.probe_overhead [--pairs N] [--quick] [--no-references] [--out FILE]

Section 1 (overhead): dwstorm storms (exec, connect, open, openuniq --unlink) run inside a
loopback-only container (network none). Each (storm, tool) gets its own OFF/ON pairs; the time
compared is the storm's own elapsed_ns, so container start-up is excluded. Pair order alternates
ABBA-style (pair 0: OFF then ON, pair 1: ON then OFF, ...), so a tool stays attached across two
adjacent ON runs and is stopped (process exited, probes detached) before every OFF run. Tools:
driftwarden (`trace --summary-only`, default settings), a naive per-event reference (bcc's
*snoop tools; where they cannot attach here, a tracepoint port of them, see --snoop) and a floor
(bpftrace count-only on the same syscall).

Section 2 (loss): `trace --dedup-interval 0` against `dwstorm openuniq --rate R --seconds S
--unlink`, storm count vs the agent's kernel counters and userspace counts, plus the agent's CPU.

Everything is bounded: subprocesses have timeouts, containers are force-removed, tools are
stopped on any error, KeyboardInterrupt or SIGTERM. See bench/README.md for how to read it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BenchError, run_bench
from bench.kernel_cost import (
    KernelCost,
    ProgramStats,
    cost_during,
    perf_event_fds,
    render_costs,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "bench" / "RESULTS.md"
READY_AGENT = "driftwarden: tracing"
READY_SNOOP = "snoop: ready"
READY_BPFTRACE = "bench: ready"

# Target ratios (on/off) for driftwarden, by event kind.
# issue 12's targets, for `trace` and for the whole agent with a learned baseline
TARGETS = {"exec": 1.02, "connect": 1.02, "write": 1.10}
READY_FULL_AGENT = "agent running"


# ---- storms ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Storm:
    name: str
    mode: str
    args: tuple[str, ...]  # dwstorm arguments after COUNT
    kind: str  # target kind: exec / connect / write
    counter: str  # driftwarden kernel counter kind: exec / connect / file
    syscall: str  # what the references trace: execve / connect / openat
    events_per_iter: int  # driftwarden events one iteration produces
    pilot: int  # calibration count
    bounds: tuple[int, int]  # calibrated count is clamped to this range

    def argv(self, n: int) -> list[str]:
        return ["/bin/dwstorm", self.mode, str(n), *self.args]


STORMS: dict[str, Storm] = {
    s.name: s
    for s in (
        Storm("exec", "exec", (), "exec", "exec", "execve", 1, 300, (50, 20_000)),
        # its own listener on a fixed port: the same destination every run (a baseline learns it)
        Storm("connect", "connect", ("127.0.0.1:39123", "--serve"), "connect", "connect",
              "connect", 1, 5_000, (200, 500_000)),
        Storm("open", "open", ("/tmp/x",), "write", "file", "openat", 1, 20_000, (500, 2_000_000)),
        Storm("openuniq", "openuniq", ("/tmp/u", "--unlink"), "write", "file", "openat", 2,
              20_000, (500, 2_000_000)),
    )
}


@dataclass
class StormRun:
    count: int
    errors: int
    elapsed_ns: int
    exit_code: int

    @property
    def elapsed_ms(self) -> float:
        return self.elapsed_ns / 1e6


def parse_storm_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{") and '"elapsed_ns"' in line:
            return json.loads(line)
    raise BenchError(f"dwstorm printed no result line; output was: {text[-500:]!r}")


TMPFS = {"/tmp": "rw,size=256m"}


def container_options(tmp: str) -> dict:
    """docker create options for the storm containers: /tmp on tmpfs or the container layer."""
    return {"tmpfs": dict(TMPFS)} if tmp == "tmpfs" else {}


def run_storm(image: str, argv: Sequence[str], *, timeout: float, tmp: str = "tmpfs") -> StormRun:
    """One storm in a fresh loopback-only container; always removed afterwards."""
    from tests.support.containers import run_container

    with run_container(image, list(argv), name=f"bench-{argv[1]}", network="none",
                       detach=False, wait_timeout=timeout, **container_options(tmp)) as box:
        code = box.wait(timeout=10)
        out = box.logs(stdout=True, stderr=False)
        if code not in (0, 3):
            raise BenchError(f"{' '.join(argv)} exited {code}: {box.logs()[-500:]!r}")
    r = parse_storm_line(out)
    return StormRun(int(r["count"]), int(r["errors"]), int(r["elapsed_ns"]), code)


# ---- tools (agent and references) -----------------------------------------------------------


@dataclass(frozen=True)
class Tool:
    label: str
    role: str  # agent / naive / floor
    argv: tuple[str, ...]
    ready: str  # stderr:TEXT, stdout:TEXT or perf-fds
    note: str = ""


class ToolSession:
    """One running tool process: started, waited for until attached, stopped on demand."""

    live: set[ToolSession] = set()  # everything started and not yet stopped (for cleanup)

    def __init__(self, tool: Tool, *, start_timeout: float = 90.0) -> None:
        self.tool = tool
        self.lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._ready = threading.Event()
        self._readers: list[threading.Thread] = []
        where, _, text = tool.ready.partition(":")
        self._ready_stream, self._ready_text = where, text
        pipe_out = where == "stdout"
        self.proc = subprocess.Popen(
            list(tool.argv), cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_out else subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, errors="replace", start_new_session=True,
        )
        ToolSession.live.add(self)
        self.started = time.monotonic()
        for name, stream in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr)):
            if stream is not None:
                t = threading.Thread(target=self._read, args=(name, stream), daemon=True)
                t.start()
                self._readers.append(t)
        try:
            self._wait_ready(start_timeout)
        except BaseException:
            self.stop()
            raise
        self.attach_seconds = time.monotonic() - self.started

    def _read(self, name: str, stream) -> None:
        for line in stream:
            self.lines[name].append(line.rstrip("\n"))
            if name == self._ready_stream and self._ready_text in line:
                self._ready.set()

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        stable_since, last = None, -1
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(
                    f"{self.tool.label} exited ({self.proc.returncode}) before attaching: "
                    f"{self.tail()}"
                )
            if self._ready_stream == "perf-fds":
                n = _perf_event_fds(self.proc.pid)
                if n != last:
                    stable_since, last = time.monotonic(), n
                elif n > 0 and time.monotonic() - stable_since >= 1.5:
                    return
            elif self._ready.wait(0.05):
                return
            time.sleep(0.05)
        raise BenchError(f"{self.tool.label} did not attach within {timeout:.0f}s: {self.tail()}")

    def tail(self, n: int = 5) -> str:
        text = " | ".join((self.lines["stderr"] + self.lines["stdout"])[-n:])
        return text or "(no output)"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu_seconds(self) -> float:
        import psutil

        t = psutil.Process(self.proc.pid).cpu_times()
        return t.user + t.system

    def stop(self, timeout: float = 60.0) -> float:
        """SIGINT, then SIGTERM, then SIGKILL (this pid only); returns seconds until it exited."""
        t0 = time.monotonic()
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
        for t in self._readers:
            t.join(5)
        ToolSession.live.discard(self)
        return time.monotonic() - t0


def stop_all_tools() -> None:
    for session in list(ToolSession.live):
        with contextlib.suppress(Exception):
            session.stop(timeout=20)


def _perf_event_fds(pid: int) -> int:
    return sum(1 for _ in perf_event_fds(pid))


def agent_tool(*extra: str, label: str = "driftwarden") -> Tool:
    argv = (sys.executable, "-m", "driftwarden", "trace", *extra)
    return Tool(label, "agent", argv, f"stderr:{READY_AGENT}")


def full_agent_tool(state_dir: Path, label: str = "driftwarden agent (learned)") -> Tool:
    """The whole agent (detection, windows, the kernel's baseline filter), alerts to
    /dev/null, on a state dir whose baseline of the storm image learned_state() made."""
    argv = (sys.executable, "-m", "driftwarden", "agent", "--state-dir", str(state_dir),
            "--alerts-out", "/dev/null", "--budget", "off")
    return Tool(label, "full", argv, f"stderr:{READY_FULL_AGENT}")


def learned_state(image: str, sizes: dict[str, int], tmp: str,
                  log: Callable[[str], None]) -> Path:
    """A state dir where the storm image's baseline learned every storm (a few small runs
    under a learning agent), then set to monitor: what an agent on a node whose workloads
    are learned runs with."""
    state = Path(tempfile.mkdtemp(prefix="dw-bench-state-"))
    session = ToolSession(full_agent_tool(state, "learning agent"))
    try:
        for _ in range(2):
            for name, storm in STORMS.items():
                run_storm(image, storm.argv(min(sizes.get(name, 500), 2000)), timeout=120,
                          tmp=tmp)
            run_storm(image, learned_storm_argv(), timeout=120, tmp=tmp)
        time.sleep(2)
        done = subprocess.run(
            [sys.executable, "-m", "driftwarden", "baseline", "--state-dir", str(state), "mode",
             image, "monitor", "--reason", "bench: the storms are learned"],
            capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise BenchError(f"could not end learning: {done.stderr.strip()}")
    finally:
        session.stop()
    log(f"[bench] learned the storms' baseline in {state}")
    return state


BCC_TOOLS = {
    "execve": "execsnoop-bpfcc", "openat": "opensnoop-bpfcc", "connect": "tcpconnect-bpfcc",
}


def floor_tool(syscall: str) -> Tool:
    program = (f'BEGIN {{ printf("{READY_BPFTRACE}\\n"); }} '
               f"tracepoint:syscalls:sys_enter_{syscall} {{ @c = count(); }}")
    return Tool(f"bpftrace count sys_enter_{syscall}", "floor", ("bpftrace", "-e", program),
                f"stdout:{READY_BPFTRACE}")


def snoop_tool(syscall: str, note: str = "") -> Tool:
    kind = {"execve": "exec", "openat": "open", "connect": "connect"}[syscall]
    return Tool(f"bcc-tp-{kind}snoop", "naive", (sys.executable, "-m", "bench.probe_overhead",
                                                 "--snoop", kind), f"stderr:{READY_SNOOP}", note)


def naive_tool(syscall: str, log: Callable[[str], None]) -> Tool:
    """bcc's own *snoop tool (output to /dev/null) when it can attach here, else the port."""
    name = BCC_TOOLS[syscall]
    path = Path("/usr/sbin") / name
    if not path.exists():
        return snoop_tool(syscall, f"{name} not installed")
    tool = Tool(name, "naive", (str(path),), "perf-fds")
    try:
        ToolSession(tool, start_timeout=60).stop()
        return tool
    except BenchError as exc:
        reason = re.sub(r"\s+", " ", str(exc).rsplit(" | ", 1)[-1])[-200:]
        log(f"[bench] {name} cannot attach on this host; using the tracepoint port instead")
        return snoop_tool(syscall, f"{name} cannot attach on this host: {reason}")


# ---- summaries -------------------------------------------------------------------------------

# kind, emitted, suppressed, dropped, over budget, shown
_SUMMARY_ROW = re.compile(
    r"^\s*(exec|connect|write)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$")


def parse_summary(lines: Sequence[str]) -> dict:
    """The agent's exit summary (JSON with --json, else the human table) as one dict."""
    for line in reversed(lines):
        if line.startswith('{"summary"'):
            return json.loads(line)["summary"]
    out: dict = {"kernel": {}, "shown": {}, "filtered": {}, "decode_errors": {},
                 "unresolved_paths": 0, "pending_timeouts": 0}
    seen = False
    for line in lines:
        if line.strip() == "summary:":
            seen = True
        m = _SUMMARY_ROW.match(line)
        if m:
            label, emitted, suppressed, dropped, over_budget, shown = m.groups()
            kind = "file" if label == "write" else label
            out["kernel"][kind] = {"emitted": int(emitted), "suppressed": int(suppressed),
                                   "dropped": int(dropped), "over_budget": int(over_budget)}
            out["shown"][label] = int(shown)
        for key, prefix in (("filtered", "filtered:"), ("decode_errors", "decode errors:")):
            if line.strip().startswith(prefix):
                for part in line.split(":", 1)[1].split(","):
                    name, _, value = part.strip().rpartition("=")
                    if name:
                        out[key][name] = int(value)
        if "unresolved relative paths:" in line:
            out["unresolved_paths"] = int(line.rsplit(":", 1)[1])
        if "without container metadata" in line:
            out["pending_timeouts"] = int(line.rsplit(":", 1)[1])
    if not seen or not out["kernel"]:
        raise BenchError(f"no summary in the agent's output: {list(lines)[-5:]}")
    return out


# ---- overhead section ------------------------------------------------------------------------


@dataclass
class PairSet:
    storm: str
    tool: str
    role: str
    n: int
    kind: str
    off: list[StormRun] = field(default_factory=list)
    on: list[StormRun] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # "off"/"on" in the order they ran
    tool_cpu: list[float] = field(default_factory=list)  # tool CPU seconds per ON run
    sessions: int = 0
    attach_seconds: list[float] = field(default_factory=list)
    stop_seconds: list[float] = field(default_factory=list)
    summaries: list[dict] = field(default_factory=list)  # driftwarden exit summaries
    tool_output: list[str] = field(default_factory=list)  # reference tools' exit output
    note: str = ""

    @property
    def off_median(self) -> float:
        return statistics.median(r.elapsed_ms for r in self.off)

    @property
    def on_median(self) -> float:
        return statistics.median(r.elapsed_ms for r in self.on)

    @property
    def ratio(self) -> float:
        return self.on_median / self.off_median

    @property
    def pair_ratios(self) -> list[float]:
        return [b.elapsed_ns / a.elapsed_ns for a, b in zip(self.off, self.on, strict=True)]

    @property
    def added_us_per_event(self) -> float:
        return (self.on_median - self.off_median) * 1000 / self.n

    def counters(self) -> dict[str, int]:
        """driftwarden kernel counters for this storm's kind, summed over sessions."""
        storm = STORMS[self.storm]
        total = {"emitted": 0, "suppressed": 0, "dropped": 0, "shown": 0}
        for s in self.summaries:
            k = s.get("kernel", {}).get(storm.counter, {})
            for key in ("emitted", "suppressed", "dropped"):
                total[key] += int(k.get(key, 0))
            total["shown"] += int(s.get("shown", {}).get(storm.kind, 0))
        return total


def calibrate(image: str, storm: Storm, target_s: float, log: Callable[[str], None],
              tmp: str = "tmpfs") -> int:
    run = run_storm(image, storm.argv(storm.pilot), timeout=120, tmp=tmp)
    per_event = run.elapsed_ns / max(run.count, 1)
    n = int(target_s * 1e9 / per_event)
    lo, hi = storm.bounds
    n = max(lo, min(hi, n))
    digits = len(str(n)) - 2
    n = round(n, -digits) if digits > 0 else n  # two significant digits
    log(f"[bench] calibrate {storm.name}: pilot {storm.pilot} took {run.elapsed_ms:.0f} ms "
        f"({per_event / 1000:.2f} us/event) -> N={n}")
    return n


def measure_pairs(image: str, storm: Storm, n: int, tool: Tool, pairs: int, first_pair: int,
                  settle: float, log: Callable[[str], None], tmp: str = "tmpfs") -> PairSet:
    result = PairSet(storm.name, tool.label, tool.role, n, storm.kind, note=tool.note)
    session: ToolSession | None = None
    timeout = 180.0  # generous: the storms are sized to ~1-2 s

    def close() -> None:
        nonlocal session
        if session is None:
            return
        result.stop_seconds.append(session.stop())
        if tool.role == "agent":
            result.summaries.append(parse_summary(session.lines["stderr"]))
        else:
            result.tool_output.append(" | ".join(
                ln for ln in session.lines["stdout"] + session.lines["stderr"]
                if ln.strip() and READY_BPFTRACE not in ln and "RLIMIT_MEMLOCK" not in ln
                and not ln.startswith("Attaching")
            )[-300:])
        session = None

    try:
        for i in range(pairs):
            order = ("off", "on") if (first_pair + i) % 2 == 0 else ("on", "off")
            runs: dict[str, StormRun] = {}
            for state in order:
                if state == "on" and session is None:
                    session = ToolSession(tool)
                    result.sessions += 1
                    result.attach_seconds.append(session.attach_seconds)
                elif state == "off":
                    close()
                time.sleep(settle)
                if session is not None and not session.alive():
                    raise BenchError(f"{tool.label} died: {session.tail()}")
                cpu0 = session.cpu_seconds() if session else 0.0
                run = run_storm(image, storm.argv(n), timeout=timeout, tmp=tmp)
                if session is not None:
                    result.tool_cpu.append(session.cpu_seconds() - cpu0)
                if run.count != n or run.errors:
                    raise BenchError(f"{storm.name} storm: count {run.count} (wanted {n}), "
                                     f"errors {run.errors}")
                runs[state] = run
                result.order.append(state)
            result.off.append(runs["off"])
            result.on.append(runs["on"])
            log(f"[bench] {storm.name:<8} {tool.label:<28} pair {i + 1}/{pairs} "
                f"({order[0]} first): off {runs['off'].elapsed_ms:8.1f} ms  "
                f"on {runs['on'].elapsed_ms:8.1f} ms  "
                f"x{runs['on'].elapsed_ns / runs['off'].elapsed_ns:.3f}")
    finally:
        close()
    return result


def measure_kernel_cost(image: str, storm: Storm, n: int, tool: Tool, stats: ProgramStats,
                        tmp: str = "tmpfs", runs: int = 1) -> KernelCost:
    """The kernel time of the tool's BPF programs over `runs` extra ON runs, untimed: the
    kernel's per-program statistics cost two clock reads per program run, so they are on
    only here, never during the timed pairs."""
    session = ToolSession(tool)
    try:
        return cost_during(stats, session.pid, storm.name, tool.label,
                           lambda: run_storm(image, storm.argv(n), timeout=180, tmp=tmp).count,
                           runs)
    finally:
        session.stop()


# ---- loss section ----------------------------------------------------------------------------


@dataclass
class LossResult:
    variant: str
    agent_argv: list[str]
    storm_argv: list[str]
    storm: StormRun
    summary: dict
    cpu_storm: float  # agent CPU seconds from container start to container exit
    wall_storm: float
    cpu_busy: float  # agent CPU seconds from container start until the agent went idle
    wall_busy: float
    catch_up: float  # seconds after the container exited until the agent went idle
    went_idle: bool
    stop_seconds: float
    attach_seconds: float
    other_containers: int

    @property
    def generated(self) -> int:
        return 2 * self.storm.count  # open(O_CREAT) + unlink per iteration, both file events

    def kernel_file(self) -> dict[str, int]:
        k = self.summary.get("kernel", {}).get("file", {})
        return {key: int(k.get(key, 0)) for key in ("emitted", "suppressed", "dropped")}

    @property
    def shown(self) -> int:
        return int(self.summary.get("shown", {}).get("write", 0))

    @property
    def decoded_file(self) -> int | None:
        d = self.summary.get("decoded")
        return None if d is None else int(d.get("file", 0))

    @property
    def userspace_processed(self) -> int:
        """Records userspace decoded and delivered (shown or filtered), all kinds but chdir."""
        return sum(self.summary.get("shown", {}).values()) + sum(
            self.summary.get("filtered", {}).values())

    @property
    def kernel_emitted_user_kinds(self) -> int:
        k = self.summary.get("kernel", {})
        return sum(int(k.get(kind, {}).get("emitted", 0)) for kind in ("exec", "connect", "file"))

    @property
    def userspace_lost(self) -> int:
        if self.decoded_file is not None:
            return self.kernel_file()["emitted"] - self.decoded_file
        return self.kernel_emitted_user_kinds - self.userspace_processed

    @property
    def kept_up(self) -> bool:
        return self.kernel_file()["dropped"] == 0 and self.userspace_lost == 0


def _wait_idle(session: ToolSession, *, threshold: float = 0.1, window: float = 0.5,
               timeout: float = 60.0) -> tuple[float, bool]:
    """Wait until the tool uses < threshold of a core over `window` seconds; (time, idle?)."""
    deadline = time.monotonic() + timeout
    prev_t, prev_cpu = time.monotonic(), session.cpu_seconds()
    while time.monotonic() < deadline:
        time.sleep(window)
        now, cpu = time.monotonic(), session.cpu_seconds()
        if (cpu - prev_cpu) / (now - prev_t) < threshold:
            return prev_t, True  # idle since the start of this window
        prev_t, prev_cpu = now, cpu
    return time.monotonic(), False


def _count_other_containers() -> int:
    from tests.support.containers import docker_client

    client = docker_client()
    try:
        return len(client.containers.list())
    finally:
        client.close()


def loss_storm_argv(seconds: float, rate: int) -> list[str]:
    return ["/bin/dwstorm", "openuniq", "--seconds", f"{seconds:g}", "/tmp/l",
            "--rate", str(rate), "--unlink"]


@contextlib.contextmanager
def _storm_container(client, image: str, argv: Sequence[str], name: str, tmp: str):
    """A loopback-less storm container, created (not started), removed on the way out."""
    from tests.support.containers import TEST_LABEL

    container = client.containers.create(image, command=list(argv), name=name,
                                         labels={TEST_LABEL: "1"}, network_mode="none",
                                         **container_options(tmp))
    try:
        yield container
    finally:
        with contextlib.suppress(Exception):
            container.remove(force=True, v=True)


def _run_to_end(container, seconds: float, what: str) -> StormRun:
    """Starts the storm container and waits for it: its run, from dwstorm's own line."""
    container.start()
    status = container.wait(timeout=seconds * 3 + 120)
    out = container.logs(stdout=True, stderr=False).decode("utf-8", "replace")
    if int(status["StatusCode"]) not in (0, 3):
        raise BenchError(f"{what} storm exited {status['StatusCode']}: {out[-300:]!r}")
    storm = parse_storm_line(out)
    return StormRun(int(storm["count"]), int(storm["errors"]), int(storm["elapsed_ns"]),
                    int(status["StatusCode"]))


def loss_test(image: str, variant: str, seconds: float, rate: int,
              log: Callable[[str], None], tmp: str = "tmpfs") -> LossResult:
    from tests.support.containers import check_network, docker_client, unique_name

    storm_argv = loss_storm_argv(seconds, rate)
    name = unique_name("bench-loss")
    output = "--json" if variant == "json" else "--summary-only"
    # --budget off: the loss test measures what the pipeline sustains, not the per-container
    # budget (which would hold back all but 5,000 writes/s of the storm)
    tool = agent_tool("--dedup-interval", "0", "--budget", "off", output, "--container", name,
                      label=f"driftwarden {output}")
    check_network("none", {})
    with contextlib.closing(docker_client()) as client, contextlib.ExitStack() as stack:
        others = len(client.containers.list())
        # created first: trace's --container needs it to exist
        container = stack.enter_context(_storm_container(client, image, storm_argv, name, tmp))
        session = ToolSession(tool)
        stack.callback(session.stop, timeout=60)
        time.sleep(0.5)
        t0, cpu0 = time.monotonic(), session.cpu_seconds()
        storm = _run_to_end(container, seconds, "loss")
        t1, cpu1 = time.monotonic(), session.cpu_seconds()
        t_idle, idle = _wait_idle(session)
        cpu_idle = session.cpu_seconds()
        if not session.alive():
            raise BenchError(f"agent died during the loss test: {session.tail()}")
        stop_s = session.stop(timeout=120)
        summary = parse_summary(session.lines["stderr"])
        result = LossResult(
            variant=output, agent_argv=list(tool.argv), storm_argv=storm_argv,
            storm=storm, summary=summary, cpu_storm=cpu1 - cpu0, wall_storm=t1 - t0,
            cpu_busy=cpu_idle - cpu0, wall_busy=max(t_idle, t1) - t0,
            catch_up=max(0.0, t_idle - t1), went_idle=idle, stop_seconds=stop_s,
            attach_seconds=session.attach_seconds, other_containers=others,
        )
        k = result.kernel_file()
        log(f"[bench] loss {output}: {result.storm.count} iterations in "
            f"{result.storm.elapsed_ns / 1e9:.1f} s, file emitted {k['emitted']} dropped "
            f"{k['dropped']}, shown {result.shown}, agent CPU {result.cpu_busy:.1f} s")
        return result


CYCLE_PATHS = 1000  # the learned loss storm's paths, written in turn


def learned_storm_argv(seconds: float | None = None, count: int = 2 * CYCLE_PATHS) -> list[str]:
    """New or appended writes over CYCLE_PATHS names (no digits: learned as they are)."""
    bound = ["--seconds", f"{seconds:g}"] if seconds else [str(count)]
    return ["/bin/dwstorm", "openuniq", *bound, "/tmp/c", "--cycle", str(CYCLE_PATHS)]


@dataclass
class LearnedLossResult:
    storm: StormRun
    kernel: dict[str, int]  # the file kind's counters over the agent's life (host-wide)
    known_line: str  # the agent's "kernel baseline filter" exit line
    cpu_storm: float  # agent CPU seconds while the storm ran
    other_containers: int


def parse_kernel_counters(lines: Sequence[str]) -> dict:
    for line in reversed(lines):
        if "driftwarden: kernel counters " in line:
            return json.loads(line.split("driftwarden: kernel counters ", 1)[1])
    raise BenchError(f"no kernel counters in the agent's output: {list(lines)[-5:]}")


def learned_loss_test(image: str, state: Path, seconds: float, log: Callable[[str], None],
                      tmp: str = "tmpfs") -> LearnedLossResult:
    """The whole agent with the storm image learned (learned_state) while a container writes
    CYCLE_PATHS known paths in turn as fast as it can: the kernel counts them, nothing is
    dropped, userspace sees each identity once per container."""
    from tests.support.containers import docker_client, unique_name

    with contextlib.closing(docker_client()) as client, contextlib.ExitStack() as stack:
        others = len(client.containers.list())
        container = stack.enter_context(_storm_container(
            client, image, learned_storm_argv(seconds), unique_name("bench-learned"), tmp))
        session = ToolSession(full_agent_tool(state, "driftwarden agent (learned), loss"))
        stack.callback(session.stop, timeout=60)
        time.sleep(0.5)
        cpu0 = session.cpu_seconds()
        storm = _run_to_end(container, seconds, "learned loss")
        cpu1 = session.cpu_seconds()
        time.sleep(1.5)  # the last windows and hits are read
        session.stop(timeout=120)
        lines = session.lines["stderr"]
        known = next((ln for ln in reversed(lines) if "kernel baseline filter" in ln), "")
        result = LearnedLossResult(
            storm, parse_kernel_counters(lines)["file"], known.split(": ", 1)[-1], cpu1 - cpu0,
            others)
        k = result.kernel
        log(f"[bench] learned loss: {result.storm.count} writes in "
            f"{result.storm.elapsed_ns / 1e9:.1f} s; kernel: known {k['known']} suppressed "
            f"{k['suppressed']} emitted {k['emitted']} dropped {k['dropped']}")
        return result


@dataclass
class CapacityStep:
    rate: int  # storm iterations/s asked for (2 file events each)
    storm: StormRun
    kernel: dict[str, int]  # the file kind's counters over the agent's life (host-wide)
    cpu_busy: float  # agent CPU seconds from the storm's start until it went idle
    wall_busy: float

    @property
    def generated_per_s(self) -> float:
        return 2 * self.storm.count / (self.storm.elapsed_ns / 1e9)

    @property
    def kept_up(self) -> bool:
        return self.kernel["dropped"] == 0


def unlearned_capacity_test(image: str, seconds: float, rates: Sequence[int],
                            log: Callable[[str], None], tmp: str = "tmpfs") -> list[CapacityStep]:
    """The whole agent with nothing learned (a fresh state dir: the storm image learns) while a
    container creates and removes new files at each rate in turn, until the kernel drops
    events: how many unique file events a second the agent takes with detection on. A fresh
    agent per step, so one step's backlog never counts against the next."""
    from tests.support.containers import docker_client, unique_name

    steps: list[CapacityStep] = []
    with contextlib.closing(docker_client()) as client:
        for rate in rates:
            with contextlib.ExitStack() as stack:
                state = stack.enter_context(tempfile.TemporaryDirectory(prefix="dw-capacity-"))
                argv = (sys.executable, "-m", "driftwarden", "agent", "--state-dir", state,
                        "--alerts-out", "/dev/null", "--budget", "off")
                session = ToolSession(Tool("driftwarden agent (learning)", "full", argv,
                                           f"stderr:{READY_FULL_AGENT}"))
                stack.callback(session.stop, timeout=60)
                container = stack.enter_context(_storm_container(
                    client, image, loss_storm_argv(seconds, rate),
                    unique_name("bench-capacity"), tmp))
                time.sleep(0.5)
                t0, cpu0 = time.monotonic(), session.cpu_seconds()
                storm = _run_to_end(container, seconds, "capacity")
                t_idle, _ = _wait_idle(session)
                cpu1 = session.cpu_seconds()
                session.stop(timeout=120)
                step = CapacityStep(rate, storm,
                                    parse_kernel_counters(session.lines["stderr"])["file"],
                                    cpu1 - cpu0, t_idle - t0)
            steps.append(step)
            k = step.kernel
            log(f"[bench] capacity {rate}/s: {step.generated_per_s:,.0f} file events/s, "
                f"emitted {k['emitted']} dropped {k['dropped']}, agent CPU {step.cpu_busy:.1f} s")
            if not step.kept_up:
                break
    return steps


# ---- the whole benchmark ---------------------------------------------------------------------


@dataclass
class BenchConfig:
    pairs: int = 5
    storms: tuple[str, ...] = ("exec", "connect", "open", "openuniq")
    sizes: dict[str, int] | None = None  # None: calibrate each storm to target_seconds
    target_seconds: float = 1.5
    references: bool = True
    loss_seconds: float = 30.0
    loss_rate: int = 100_000
    loss_variants: tuple[str, ...] = ("summary-only", "json")
    settle: float = 0.3
    tmp: str = "tmpfs"  # storm containers' /tmp: "tmpfs" or "overlay" (the container layer)
    loss_baseline_seconds: float = 5.0  # the loss storm once without any agent (0: skip)
    full_agent: bool = True  # also the whole agent with a learned baseline
    # the whole agent, nothing learned: storm iterations/s (2 unique file events each) in turn
    capacity_rates: tuple[int, ...] = (5_000, 10_000, 15_000, 20_000, 30_000)
    capacity_seconds: float = 10.0
    learned_seconds: float = 60.0  # the learned loss storm (issue 12: 60 s)
    kernel_cost: bool = True  # one more ON run per (storm, tool) with BPF run statistics on
    command: str = "python -m bench.probe_overhead"


def tiny_config() -> BenchConfig:
    """What tests/test_bench_smoke.py runs: one pair, small storms, a 2 s low-rate loss test."""
    return BenchConfig(
        pairs=1, storms=("exec", "connect", "openuniq"),
        sizes={"exec": 30, "connect": 300, "openuniq": 1000},
        references=False, loss_seconds=2.0, loss_rate=2000, loss_variants=("summary-only",),
        settle=0.1, loss_baseline_seconds=0.0, full_agent=False,
        capacity_rates=(500,), capacity_seconds=2.0,
        command="tests/test_bench_smoke.py (tiny mode)",
    )


@dataclass
class BenchResult:
    config: BenchConfig
    host: dict[str, str]
    sizes: dict[str, int]
    overhead: list[PairSet]
    loss: list[LossResult]
    started: float
    finished: float
    notes: list[str] = field(default_factory=list)
    loss_baseline: StormRun | None = None  # the loss storm without an agent
    learned_loss: LearnedLossResult | None = None
    capacity: list[CapacityStep] = field(default_factory=list)
    kernel_costs: list[KernelCost] = field(default_factory=list)


def host_info() -> dict[str, str]:
    info = {
        "kernel": " ".join(platform.uname()[2:4]),
        "cpu": _cpu_model(),
        "cores": str(os.cpu_count()),
        "memory": _mem_total(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "python": platform.python_version(),
        "load average (1/5/15 min) at start": _loadavg(),
    }
    for label, argv in (("docker", ["docker", "version", "--format", "{{.Server.Version}}"]),
                        ("bpftrace", ["bpftrace", "--version"]),
                        ("git", ["git", "-C", str(REPO_ROOT), "describe", "--always",
                                 "--dirty"])):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            p = subprocess.run(argv, capture_output=True, text=True, timeout=20)
            if p.returncode == 0:
                info[label] = p.stdout.strip()
    with contextlib.suppress(ImportError):
        import bcc

        info["bcc"] = getattr(bcc, "__version__", "?")
    return info


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _mem_total() -> str:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "?"


def run_benchmark(config: BenchConfig, log: Callable[[str], None] | None = None) -> BenchResult:
    from tests.support.images import storm_image

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.time()
    host = host_info()
    image = storm_image()
    notes: list[str] = []
    others = _count_other_containers()
    if others:
        notes.append(f"{others} other container(s) were running when the benchmark started.")
    stats = ProgramStats()
    try:
        tmp = config.tmp
        run_storm(image, STORMS["open"].argv(100), timeout=60, tmp=tmp)  # warm-up
        sizes = dict(config.sizes or {})
        for name in config.storms:
            if name not in sizes:
                sizes[name] = calibrate(image, STORMS[name], config.target_seconds, log, tmp)
        naive: dict[str, Tool] = {}
        overhead: list[PairSet] = []
        kernel_costs: list[KernelCost] = []
        state = learned_state(image, sizes, tmp, log) if config.full_agent else None
        pair_index = 0
        for name in config.storms:
            storm = STORMS[name]
            # --budget off: every event the storm makes goes through (the strict case, and what
            # the README's table measured); the default budgets hold a flood's excess back
            tools = [agent_tool("--summary-only", "--budget", "off")]
            if state is not None:
                tools.append(full_agent_tool(state))
            if config.references:
                if storm.syscall not in naive:
                    naive[storm.syscall] = naive_tool(storm.syscall, log)
                tools += [naive[storm.syscall], floor_tool(storm.syscall)]
            for tool in tools:
                overhead.append(measure_pairs(image, storm, sizes[name], tool, config.pairs,
                                              pair_index, config.settle, log, tmp))
                pair_index += config.pairs
                if config.kernel_cost and tool.role in ("agent", "full", "floor"):
                    kernel_costs.append(measure_kernel_cost(image, storm, sizes[name], tool,
                                                            stats, tmp))
        baseline = None
        if config.loss_variants and config.loss_baseline_seconds > 0:
            argv = loss_storm_argv(min(config.loss_baseline_seconds, config.loss_seconds),
                                   config.loss_rate)
            baseline = run_storm(image, argv, timeout=config.loss_seconds + 120, tmp=tmp)
            log(f"[bench] loss storm without an agent: {baseline.count} iterations in "
                f"{baseline.elapsed_ns / 1e9:.1f} s")
        loss = [loss_test(image, variant, config.loss_seconds, config.loss_rate, log, tmp)
                for variant in config.loss_variants]
        learned = (learned_loss_test(image, state, config.learned_seconds, log, tmp)
                   if state is not None and config.loss_variants else None)
        capacity = (unlearned_capacity_test(image, config.capacity_seconds,
                                            config.capacity_rates, log, tmp)
                    if config.capacity_rates else [])
    finally:
        stats.stop()
        stop_all_tools()
    host["load average (1/5/15 min) at end"] = _loadavg()
    return BenchResult(config, host, sizes, overhead, loss, started, time.time(), notes,
                       baseline, learned, capacity, kernel_costs)


# ---- report ----------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _target_cell(ps: PairSet) -> str:
    target = TARGETS[ps.kind]
    if ps.role not in ("agent", "full"):
        return f"(ref; agent target {ps.kind} <= {target:.2f}x)"
    verdict = "met" if ps.ratio <= target else "MISSED"
    ratios = ps.pair_ratios
    if min(ratios) <= target < max(ratios):
        verdict += " (inconclusive: pair ratios straddle it)"
    return f"{ps.kind} <= {target:.2f}x: {verdict}"


def _tmp_desc(tmp: str) -> str:
    if tmp == "tmpfs":
        return ("tmpfs (`--tmp tmpfs`, the default: cheapest file syscalls, so the largest "
                "relative overhead and the least disk noise)")
    return "the container's overlay layer on the host disk (`--tmp overlay`)"


def _spread(runs: Sequence[StormRun]) -> str:
    times = [r.elapsed_ns for r in runs]
    return f"{100 * (max(times) / min(times) - 1):.0f}%"


def render_report(result: BenchResult) -> str:
    cfg = result.config
    out: list[str] = []
    took = result.finished - result.started
    out.append("# driftwarden probe overhead and loss benchmark\n")
    out.append(f"Command: `{cfg.command}`  \nRun took {took / 60:.1f} min. "
               "Every number below comes from this one run; compare ratios, not absolute times.\n")

    out.append("## Host\n")
    out.append(_table(["item", "value"], list(result.host.items())))
    for note in result.notes:
        out.append(f"\nNote: {note}")
    out.append("")

    out.append("## 1. Overhead: storms inside a container, tool off vs on\n")
    out.append(
        "Each storm runs in a fresh loopback-only container (`--network none`); the time is the "
        "storm's own `elapsed_ns` (container start-up excluded). Per (storm, tool): "
        f"{cfg.pairs} OFF/ON pairs, order alternating ABBA (OFF,ON then ON,OFF ...); the tool "
        "is attached (ready line seen) before an ON run, stays attached across two adjacent ON "
        "runs, and has exited before every OFF run. ratio = on median / off median; "
        "added = (on median - off median) / N. Pair ratios = on/off within each pair: their "
        "median is robust to slow drift, their range shows the noise; OFF spread = slowest / "
        "fastest OFF run - 1, the noise with no tool at all. A verdict is only meaningful when "
        "the gap to the target is larger than that noise. Tool CPU = the tool process's "
        "user+sys seconds during one ON run (cost paid on another core, not in the ratio). "
        f"Container /tmp: {_tmp_desc(cfg.tmp)}.\n")
    rows = []
    for ps in result.overhead:
        ratios = ps.pair_ratios
        rows.append([
            ps.storm, ps.tool, ps.n, f"{ps.off_median:.1f} ms", f"{ps.on_median:.1f} ms",
            f"{ps.ratio:.3f}x", f"{ps.added_us_per_event:+.2f} us", _target_cell(ps), len(ratios),
            f"{statistics.median(ratios):.3f}x", f"{min(ratios):.3f}-{max(ratios):.3f}",
            _spread(ps.off), f"{statistics.median(ps.tool_cpu):.2f} s" if ps.tool_cpu else "-",
        ])
    out.append(_table(["storm", "tool", "N", "off median", "on median", "ratio on/off",
                       "added/event", "target", "pairs", "median pair ratio", "pair ratios",
                       "OFF spread", "tool CPU/run"], rows))
    out.append("")
    storms_desc = {
        "exec": "`dwstorm exec N` (fork + execve /bin/true + wait; busybox applet)",
        "connect": "`dwstorm connect N` (TCP connect+close to its own 127.0.0.1 listener)",
        "open": "`dwstorm open N /tmp/x` (open O_APPEND + 1-byte write + close, same path)",
        "openuniq": "`dwstorm openuniq N /tmp/u --unlink` (new path each time, then unlink: "
                    "2 file events per iteration, no dedup possible)",
    }
    out.append("Storms: " + "; ".join(f"{k}: {v}" for k, v in storms_desc.items()
                                      if k in result.sizes) + ".\n")
    notes = sorted({f"{ps.tool}: {ps.note}" for ps in result.overhead if ps.note})
    tools_desc = [
        "driftwarden = `python -m driftwarden trace --summary-only` (kernel dedup 1 s, "
        "ring buffer without wake-ups, whole userspace pipeline, no output)",
    ]
    if any(ps.role == "full" for ps in result.overhead):
        tools_desc.append(
            "driftwarden agent (learned) = `python -m driftwarden agent --alerts-out /dev/null "
            "--budget off` with a state dir where the storm image's baseline learned every "
            "storm (a few small runs under a learning agent) and was set to monitor: the whole "
            "agent (process table, attribution, detection, feature windows), with the kernel's "
            "baseline filter counting the known writes and connects instead of sending them")
    naive_labels = {ps.tool for ps in result.overhead if ps.role == "naive"}
    if any(label.endswith("-bpfcc") for label in naive_labels):
        tools_desc.append("*-bpfcc = bcc's own execsnoop / opensnoop / tcpconnect, the naive "
                          "reference (perf buffer, a wake-up and a Python print per event), "
                          "stdout to /dev/null")
    if any(label.startswith("bcc-tp-") for label in naive_labels):
        tools_desc.append(
            "bcc-tp-*snoop = the naive reference where bcc's tool cannot attach: the design of "
            "execsnoop / opensnoop / tcpconnect (perf buffer, a wake-up per event, a Python "
            "callback that formats and prints every event with printb, stdout to /dev/null) on "
            "syscall tracepoints, because the bcc tools use kprobes/fentry, which this kernel "
            "refuses (source: `SNOOP_PROGRAMS` in bench/probe_overhead.py, run as "
            "`python -m bench.probe_overhead --snoop exec|open|connect`)")
    if any(ps.role == "floor" for ps in result.overhead):
        tools_desc.append("bpftrace count = the floor: one tracepoint on the storm's syscall "
                          "entry, an in-kernel per-CPU counter, nothing sent to userspace")
    out.append("Tools: " + "; ".join(tools_desc) + ".\n")
    for n in notes:
        out.append(f"- {n}")
    if notes:
        out.append("")

    agent_sets = [ps for ps in result.overhead if ps.role == "agent"]
    if agent_sets:
        out.append("driftwarden's own kernel counters during the ON sessions of each storm "
                   "(host-wide, summed over sessions; generated = N x ON runs x events per "
                   "iteration):\n")
        rows = []
        for ps in agent_sets:
            c = ps.counters()
            storm = STORMS[ps.storm]
            rows.append([ps.storm, storm.counter, len(ps.on), ps.sessions,
                         ps.n * len(ps.on) * storm.events_per_iter, c["emitted"],
                         c["suppressed"], c["dropped"], c["shown"],
                         f"{statistics.median(ps.attach_seconds):.1f} s",
                         f"{statistics.median(ps.stop_seconds):.1f} s"])
        out.append(_table(["storm", "kind", "ON runs", "sessions", "generated", "emitted",
                           "suppressed", "dropped", "shown", "attach time", "stop time"], rows))
        out.append("")
    if result.kernel_costs:
        out.append("### Kernel ns per program run, agent vs floor\n")
        out.append(
            "One more ON run per (storm, tool), untimed, with the kernel's BPF run statistics "
            "on (BPF_ENABLE_STATS, off again after the run): the run_time_ns and run_cnt of "
            "every program the tool attached, so the kernel side is measured whatever else "
            "loads the host. kernel ns / iteration = all its programs' time over the storm's "
            "iterations (host-wide: runs from other processes are in it, and the runs per "
            "iteration show them); the busiest programs follow as ns per run x runs per "
            "iteration. Not in it: the tracepoint machinery around each program (the same per "
            "attached tracepoint for every tool) and the tool's userspace (tool CPU above). "
            "`python -m bench.kernel_cost` measures this alone.\n")
        out.append(render_costs(result.kernel_costs))
        out.append("")
    ref_out = [ps for ps in result.overhead if ps.tool_output]
    if ref_out:
        out.append("Reference tools' own exit output (last session): " + "; ".join(
            f"{ps.tool} on {ps.storm}: `{ps.tool_output[-1] or '-'}`" for ps in ref_out) + "\n")

    out.append("## 2. Loss test: dedup off, unique paths at a high rate\n")
    if result.loss:
        out.append(
            "Agent: `trace --dedup-interval 0 --budget off` with `--container NAME` (the storm "
            "container, "
            "created before the agent starts; the filter is in userspace only, so the kernel "
            "side is the default program) and either `--summary-only` (the pipeline without "
            "formatting) or `--json` with stdout to /dev/null (the full pipeline incl. JSON "
            "output). Each storm iteration is openat(O_CREAT) + unlink = 2 file events. Kernel "
            "counters are host-wide: anything above the generated count is other activity "
            "(runc setup writes, other containers). After the storm ends the agent is left "
            "until its CPU use falls below 10% of a core (catch-up), then stopped with SIGINT "
            f"(it drains the ring buffer and prints its summary). Container /tmp: "
            f"{_tmp_desc(cfg.tmp)}.\n")
        base = result.loss_baseline
        if base is not None:
            secs = base.elapsed_ns / 1e9
            out.append(
                f"Without any agent, the same storm for {secs:.0f} s ran "
                f"{base.count / secs:,.0f} iterations/s ({2 * base.count / secs:,.0f} file "
                f"events/s): the rate the container can reach here, for comparison with the "
                "rate achieved below.\n")
        header = ["metric", *[r.variant for r in result.loss]]
        metrics = _loss_rows(result.loss)
        out.append(_table(header, metrics))
        out.append("")
        out.append(_loss_verdict(result.loss))
        out.append("")
    else:
        out.append("Skipped (`--loss-seconds 0`).\n")

    learned = result.learned_loss
    if learned is not None:
        k, storm = learned.kernel, learned.storm
        secs = storm.elapsed_ns / 1e9
        out.append("## 3. Loss with a learned baseline: the whole agent, known paths\n")
        out.append(
            f"Agent: `driftwarden agent --budget off` (dedup 1 s, the kernel's baseline filter "
            f"on) with the storm image learned and in monitor (see the tools above). Storm: "
            f"`{' '.join(learned_storm_argv(cfg.learned_seconds))}`: {CYCLE_PATHS} paths (letters "
            f"only, so each is learned as itself) written in turn, unpaced, one file event each. "
            f"Counters are the agent's kernel counters for file events over its whole life "
            f"(host-wide: {learned.other_containers} other container(s) were running).\n")
        out.append(_table(["item", "value"], [
            ("file events written", f"{storm.count} in {secs:.1f} s ({storm.count / secs:,.0f}/s)"),
            ("counted in the kernel as known", k["known"]),
            ("suppressed as repeats (dedup)", k["suppressed"]),
            ("sent to the agent", k["emitted"]),
            ("dropped", k["dropped"]),
            ("agent CPU while the storm ran", f"{learned.cpu_storm:.2f} s"),
            ("the agent's filter at exit", learned.known_line),
        ]))
        out.append("")

    if result.capacity:
        out.append("## 4. The whole agent, nothing learned: unique file events a second\n")
        out.append(
            f"Agent: `driftwarden agent --budget off --alerts-out /dev/null` on a fresh state dir "
            f"(the storm image learns; detection, items, drift and windows all run), a fresh "
            f"agent per step. Storm: `{' '.join(loss_storm_argv(cfg.capacity_seconds, 0))}` "
            f"with `--rate` each step's value: every path is new, so neither dedup nor the "
            f"kernel's baseline filter folds anything. Steps stop at the first one with drops.\n")
        rows = []
        for step in result.capacity:
            k = step.kernel
            emitted = max(k["emitted"], 1)
            rows.append([f"{step.rate:,}", f"{step.generated_per_s:,.0f}", k["emitted"],
                         k["dropped"], _pct(k["dropped"], k["emitted"] + k["dropped"]),
                         f"{step.cpu_busy:.1f} s over {step.wall_busy:.1f} s",
                         f"{step.cpu_busy / emitted * 1e6:.1f} us",
                         "yes" if step.kept_up else "NO"])
        out.append(_table(["--rate", "file events/s generated", "emitted (host-wide)",
                           "dropped", "dropped %", "agent CPU (storm start to idle)",
                           "CPU per emitted event", "kept up"], rows))
        kept = [s for s in result.capacity if s.kept_up]
        out.append("")
        out.append(f"Highest step without drops: "
                   f"{kept[-1].generated_per_s:,.0f} unique file events/s." if kept else
                   "Every step dropped events.")
        out.append("")

    out.append("## Raw storm times (ms, in the order they ran)\n")
    rows = []
    for ps in result.overhead:
        seq, offs, ons = [], iter(ps.off), iter(ps.on)
        for state in ps.order:
            r = next(offs) if state == "off" else next(ons)
            seq.append(f"{state} {r.elapsed_ms:.0f}")
        rows.append([ps.storm, ps.tool, ", ".join(seq)])
    out.append(_table(["storm", "tool", "runs"], rows))
    out.append("")
    return "\n".join(out)


def _pct(a: float, b: float) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def _loss_metrics(r: LossResult) -> list[tuple[str, object]]:
    k = r.kernel_file()
    storm_s = r.storm.elapsed_ns / 1e9
    seen = k["emitted"] + k["dropped"]
    decoded = "-" if r.decoded_file is None else f"{r.decoded_file:,}"
    idle = "" if r.went_idle else " (never went idle)"
    return [
        ("storm", f"`{' '.join(r.storm_argv[1:])}`"),
        ("storm elapsed", f"{storm_s:.2f} s"),
        ("iterations (count), errors", f"{r.storm.count:,}, {r.storm.errors}"),
        ("rate achieved (iterations/s)", f"{r.storm.count / storm_s:,.0f}"),
        ("file events generated (2 x count)", f"{r.generated:,}"),
        ("generated file events/s", f"{r.generated / storm_s:,.0f}"),
        ("kernel file emitted (host-wide)", f"{k['emitted']:,}"),
        ("kernel file dropped (ring buffer full)", f"{k['dropped']:,}"),
        ("kernel emitted + dropped", f"{seen:,}"),
        ("... minus generated (other activity)", f"{seen - r.generated:+,}"),
        ("kernel suppressed (dedup off: 0)", f"{k['suppressed']:,}"),
        ("drop rate (dropped / (emitted + dropped))", _pct(k["dropped"], seen)),
        ("userspace decoded (file; --json only)", decoded),
        ("userspace lost after the ring buffer", f"{r.userspace_lost:,}"),
        ("shown for this container (write)", f"{r.shown:,}"),
        ("shown / generated", _pct(r.shown, r.generated)),
        ("userspace kept up (no drops, nothing lost)", "yes" if r.kept_up else "NO"),
        ("agent CPU during the storm (container start..exit)",
         f"{r.cpu_storm:.2f} s = {_pct(r.cpu_storm, r.wall_storm)} of a core "
         f"over {r.wall_storm:.1f} s"),
        ("catch-up after the storm (until CPU < 10%)", f"{r.catch_up:.1f} s{idle}"),
        ("agent CPU until caught up",
         f"{r.cpu_busy:.2f} s = {_pct(r.cpu_busy, r.wall_busy)} of a core"),
        ("agent CPU per emitted event", f"{1e6 * r.cpu_busy / max(k['emitted'], 1):.1f} us"),
        ("pipeline throughput (emitted / busy wall time)",
         f"{k['emitted'] / r.wall_busy:,.0f} events/s"),
        ("pipeline capacity per core (emitted / CPU s)",
         f"{k['emitted'] / max(r.cpu_busy, 1e-9):,.0f} events/s"),
        ("agent attach / stop (final drain) time",
         f"{r.attach_seconds:.1f} s / {r.stop_seconds:.1f} s"),
        ("other containers running", r.other_containers),
    ]


def _loss_rows(results: Sequence[LossResult]) -> list[list[object]]:
    columns = [_loss_metrics(r) for r in results]
    return [[label, *[col[i][1] for col in columns]] for i, (label, _) in enumerate(columns[0])]


def _loss_verdict(results: Sequence[LossResult]) -> str:
    lines = []
    for r in results:
        k = r.kernel_file()
        seen = k["emitted"] + k["dropped"]
        if r.kept_up:
            lines.append(f"- {r.variant}: userspace kept up: no ring-buffer drops, every emitted "
                         f"event decoded; {r.shown:,} of {r.generated:,} generated shown.")
            continue
        where = []
        if k["dropped"]:
            where.append(
                f"{k['dropped']:,} events ({100 * k['dropped'] / max(seen, 1):.1f}%) were dropped "
                "in the kernel because the ring buffer was full, i.e. the userspace consumer was "
                f"slower than the storm: it handled ~{k['emitted'] / r.wall_busy:,.0f} events/s "
                f"at {100 * r.cpu_busy / r.wall_busy:.0f}% of a core vs "
                f"{r.generated / (r.storm.elapsed_ns / 1e9):,.0f}/s generated")
        if r.userspace_lost:
            where.append(f"{r.userspace_lost:,} emitted events were not decoded/delivered")
        lines.append(f"- {r.variant}: userspace did NOT keep up: " + "; ".join(where) + ".")
    return "\n".join(lines)


# ---- naive reference: bcc *snoop design on tracepoints ----------------------------------------

SNOOP_PROGRAMS = {
    "exec": r"""
#define ARGSIZE 128
#define MAXARG 20
struct ev_t { u32 pid; u32 type; s32 retval; char comm[16]; char arg[ARGSIZE]; };
BPF_PERF_OUTPUT(events);
TRACEPOINT_PROBE(syscalls, sys_enter_execve) {
    struct ev_t e = {};
    e.pid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    bpf_probe_read_user_str(e.arg, sizeof(e.arg), args->filename);
    events.perf_submit(args, &e, sizeof(e));
    const char *const *argv = (const char *const *)args->argv;
    #pragma unroll
    for (int i = 1; i < MAXARG; i++) {
        const char *p = 0;
        bpf_probe_read_user(&p, sizeof(p), &argv[i]);
        if (!p)
            break;
        bpf_probe_read_user_str(e.arg, sizeof(e.arg), p);
        events.perf_submit(args, &e, sizeof(e));
    }
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_execve) {
    struct ev_t e = {};
    e.pid = bpf_get_current_pid_tgid() >> 32;
    e.type = 1;
    e.retval = args->ret;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    events.perf_submit(args, &e, sizeof(e));
    return 0;
}
""",
    "open": r"""
struct val_t { const char *fname; int flags; };
struct ev_t { u32 pid; s32 ret; int flags; char comm[16]; char fname[256]; };
BPF_HASH(infotmp, u64, struct val_t);
BPF_PERF_OUTPUT(events);
TRACEPOINT_PROBE(syscalls, sys_enter_openat) {
    u64 id = bpf_get_current_pid_tgid();
    struct val_t v = {};
    v.fname = args->filename;
    v.flags = args->flags;
    infotmp.update(&id, &v);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_openat) {
    u64 id = bpf_get_current_pid_tgid();
    struct val_t *vp = infotmp.lookup(&id);
    if (!vp)
        return 0;
    struct ev_t e = {};
    e.pid = id >> 32;
    e.ret = args->ret;
    e.flags = vp->flags;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    bpf_probe_read_user_str(e.fname, sizeof(e.fname), vp->fname);
    infotmp.delete(&id);
    events.perf_submit(args, &e, sizeof(e));
    return 0;
}
""",
    "connect": r"""
struct val_t { const void *addr; };
struct ev_t { u32 pid; s32 ret; u16 family; u16 dport; char comm[16]; u8 daddr[16]; };
BPF_HASH(infotmp, u64, struct val_t);
BPF_PERF_OUTPUT(events);
TRACEPOINT_PROBE(syscalls, sys_enter_connect) {
    u64 id = bpf_get_current_pid_tgid();
    struct val_t v = {};
    v.addr = args->uservaddr;
    infotmp.update(&id, &v);
    return 0;
}
TRACEPOINT_PROBE(syscalls, sys_exit_connect) {
    u64 id = bpf_get_current_pid_tgid();
    struct val_t *vp = infotmp.lookup(&id);
    if (!vp)
        return 0;
    const char *sa = (const char *)vp->addr;
    infotmp.delete(&id);
    struct ev_t e = {};
    bpf_probe_read_user(&e.family, sizeof(e.family), sa);
    if (e.family != 2 && e.family != 10)
        return 0;
    u16 port = 0;
    bpf_probe_read_user(&port, sizeof(port), sa + 2);
    e.dport = (port >> 8) | ((port & 0xff) << 8);
    if (e.family == 2)
        bpf_probe_read_user(e.daddr, 4, sa + 4);
    else
        bpf_probe_read_user(e.daddr, 16, sa + 8);
    e.pid = id >> 32;
    e.ret = args->ret;
    bpf_get_current_comm(&e.comm, sizeof(e.comm));
    events.perf_submit(args, &e, sizeof(e));
    return 0;
}
""",
}


def run_snoop(kind: str) -> int:
    """The naive reference: bcc *snoop's design (perf buffer, wake-up and a Python print per
    event) on syscall tracepoints. Events to stdout (the benchmark sends them to /dev/null)."""
    import socket

    from bcc import BPF
    from bcc.utils import printb

    b = BPF(text=SNOOP_PROGRAMS[kind])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    counts = {"events": 0, "lost": 0}
    pending: dict[int, list[bytes]] = {}

    def on_exec(_cpu, data, _size):
        e = b["events"].event(data)
        counts["events"] += 1
        if e.type == 0:
            pending.setdefault(e.pid, []).append(e.arg)
            return
        argv = b" ".join(pending.pop(e.pid, []))
        printb(b"%-16s %-7d %3d %s" % (e.comm, e.pid, e.retval, argv))

    def on_open(_cpu, data, _size):
        e = b["events"].event(data)
        counts["events"] += 1
        fd, err = (e.ret, 0) if e.ret >= 0 else (-1, -e.ret)
        printb(b"%-6d %-16s %4d %3d %08o %s" % (e.pid, e.comm, fd, err, e.flags, e.fname))

    def on_connect(_cpu, data, _size):
        e = b["events"].event(data)
        counts["events"] += 1
        fam = socket.AF_INET if e.family == 2 else socket.AF_INET6
        addr = socket.inet_ntop(fam, bytes(e.daddr[: 4 if e.family == 2 else 16]))
        printb(b"%-7d %-12.12s %-2d %-16s %-6d %d" % (
            e.pid, e.comm, 4 if e.family == 2 else 6, addr.encode(), e.dport, e.ret))

    def on_lost(n):
        counts["lost"] += n

    callback = {"exec": on_exec, "open": on_open, "connect": on_connect}[kind]
    b["events"].open_perf_buffer(callback, page_cnt=64, lost_cb=on_lost)
    print(READY_SNOOP, file=sys.stderr, flush=True)
    while not stop.is_set():
        b.perf_buffer_poll(timeout=100)
    print(json.dumps({"snoop": kind, **counts}), file=sys.stderr, flush=True)
    return 0


# ---- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probe_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=None, help="OFF/ON pairs per (storm, tool); "
                   "default 5 (3 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="3 pairs, ~1 s storms, 10 s loss test")
    p.add_argument("--no-references", action="store_true",
                   help="skip the naive and floor reference tools")
    p.add_argument("--no-full-agent", action="store_true",
                   help="skip the whole agent with a learned baseline (trace and references "
                   "only)")
    p.add_argument("--no-kernel-cost", action="store_true",
                   help="skip the extra ON run per (storm, tool) that reads the kernel's BPF "
                   "run statistics")
    p.add_argument("--storms", default="exec,connect,open,openuniq",
                   help="comma list of storms (default: all)")
    p.add_argument("--tmp", choices=("tmpfs", "overlay"), default="tmpfs",
                   help="the storm containers' /tmp: tmpfs (default) or the overlay layer")
    p.add_argument("--loss-seconds", type=float, default=None,
                   help="loss storm length (default 30, 10 with --quick; 0 skips the loss test)")
    p.add_argument("--loss-rate", type=int, default=50_000,
                   help="loss storm rate, iterations/s; each is 2 file events, so the default "
                   "%(default)s is the 100K events/s target")
    p.add_argument("--learned-seconds", type=float, default=None,
                   help="the learned loss storm's length (default 60, 10 with --quick)")
    p.add_argument("--capacity-rates", default=None,
                   help="comma list of storm rates (iterations/s, 2 new-file events each) for "
                   "the whole agent with nothing learned, in turn until one drops (default "
                   "5000,10000,15000,20000,30000; 2000,8000 with --quick; '' skips it)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="markdown report (default %(default)s)")
    p.add_argument("--snoop", choices=sorted(SNOOP_PROGRAMS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.snoop:
        return run_snoop(args.snoop)
    if os.geteuid() != 0:
        p.error("needs root (BPF programs and Docker)")
    storms = tuple(s.strip() for s in args.storms.split(",") if s.strip())
    unknown = set(storms) - set(STORMS)
    if unknown or not storms:
        p.error(f"unknown storm(s) {sorted(unknown)}; choose from {','.join(STORMS)}")
    pairs = args.pairs if args.pairs is not None else (3 if args.quick else 5)
    if pairs < 1:
        p.error("--pairs must be >= 1")
    loss_seconds = args.loss_seconds
    if loss_seconds is None:
        loss_seconds = 10.0 if args.quick else 30.0
    if loss_seconds < 0 or args.loss_rate < 1:
        p.error("--loss-seconds must be >= 0 and --loss-rate >= 1")
    rates_text = args.capacity_rates if args.capacity_rates is not None else (
        "2000,8000" if args.quick else ",".join(map(str, BenchConfig.capacity_rates)))
    try:
        capacity_rates = tuple(int(r) for r in rates_text.split(",") if r.strip())
    except ValueError:
        p.error(f"--capacity-rates {rates_text!r}: give whole numbers, e.g. 5000,10000")
    if any(r < 1 for r in capacity_rates):
        p.error("--capacity-rates must be >= 1 each")
    learned_seconds = args.learned_seconds
    if learned_seconds is None:
        learned_seconds = 10.0 if args.quick else 60.0
    config = BenchConfig(
        capacity_rates=capacity_rates, learned_seconds=learned_seconds or 1.0,
        capacity_seconds=5.0 if args.quick else 10.0,
        pairs=pairs, storms=storms, target_seconds=1.0 if args.quick else 1.5,
        references=not args.no_references, tmp=args.tmp, full_agent=not args.no_full_agent,
        kernel_cost=not args.no_kernel_cost, loss_seconds=loss_seconds or 1.0,
        loss_rate=args.loss_rate,
        loss_variants=BenchConfig.loss_variants if loss_seconds else (),
        command=" ".join(["python -m bench.probe_overhead", *map(shlex.quote, sys.argv[1:])]),
    )
    code, _ = run_bench(lambda: run_benchmark(config), render_report, out=args.out,
                        cleaned_up="tools stopped, containers removed")
    return code


if __name__ == "__main__":
    sys.exit(main())
