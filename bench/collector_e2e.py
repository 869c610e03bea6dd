"""Collector benchmark: exec -> subscriber latency, alert -> quarantine, alerts/s (issue 4).

    python -m bench.collector_e2e [--trials N] [--quick] [--out FILE] [--raw FILE]

Part 1 (latency): a real `driftwarden collector`, a real `driftwarden agent --collector` and a
subscriber (Alerts.Subscribe in this process). One loopback-only container (network host) reads
trial names from a FIFO bind-mounted from the host and runs ``/tmp/dw/<name>/true``, a hard link
to a busybox copied into the container at run time: every trial is a new drift finding (its own
alert id), triggered only after the previous trial's alert reached the subscriber plus a random
gap. Latency = subscriber receipt (CLOCK_MONOTONIC here) - the exec's kernel timestamp carried in
the alert (``exec.header.ts_ns``, bpf_ktime_get_ns at sys_enter_execve: the same clock). Split
into kernel -> agent emitted (the agent's --alerts-out line appearing, watched with inotify),
agent -> collector stored (the store's ``received_at``) and collector -> subscriber.

Part 2 (quarantine): the image is then switched to protect mode (`driftwarden baseline mode`);
the collector runs the default rule with a bench policy file whose brakes allow one action per
trial. The container also runs dwstorm connecting to a host listener on 127.0.0.1 1000 times a
second; the network is cut when the accepts stop. Each trial: a drift exec, then the alert, the
policy's action events (pending, then the agent's result) on the subscriber's stream, the last
accepted connection, and a RELEASE through Actions.Request (the accepts must resume).

Part 3 (throughput): no kernel. N synthetic agents (spawned processes, AgentChannel.Connect:
hello, then AlertBatch messages of `batch` valid alerts, at most `window` batches awaiting an
ack) and M subscribers (spawned processes) against a fresh collector; every alert must be acked
once and delivered to every subscriber once.

Everything is loopback only, every wait has a timeout, containers are labelled
driftwarden.test=1 and force-removed, processes are stopped on errors, Ctrl-C and SIGTERM.
See bench/COLLECTOR.md for the method and how to read the report.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import inspect
import json
import math
import multiprocessing
import os
import queue
import random
import select
import shlex
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driftwarden.core.lifecycle import Service, join_or_warn, serve_accepts, start_daemon_thread

from bench.common import BenchError, run_bench

NODE = "bench-node"
TARGET_P99_MS = 100.0
PROBE_RATE = 1000  # connects/s of the in-container network probe (the cut's resolution: 1 ms)
QUIET_FOR_CUT = 0.25  # s without an accepted connect that confirm the network is cut
DRIFT_DIR = "/tmp/dw"  # in the container: DRIFT_DIR/b is busybox, DRIFT_DIR/<name>/true links
DROPPED = "reported dropped (subscriber queue full)"

# The default rule (quarantine high drift of images in protect mode) with brakes loose enough
# for one action per trial: the default allows 1 action per container per 300 s, and any action
# (the bench's RELEASE too) starts a 600 s cooldown.
BENCH_POLICY = """\
version: 1
dry_run: false
limits:
  per_container: {max_actions: 1000, per_seconds: 1}
  global: {max_actions: 1000, per_seconds: 1}
  cooldown_seconds: 0
rules:
  - name: quarantine-protect-drift
    match: {kinds: [drift], min_severity: high, modes: [protect]}
    action: quarantine
    with_pause: false
"""


# ---- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ThroughputSpec:
    """One part-3 row: `alerts` in all, split over `agents`; `rate` alerts/s in all (None: as
    fast as the acks allow)."""

    agents: int
    subscribers: int
    alerts: int
    rate: float | None = None

    def __post_init__(self) -> None:
        if self.agents < 1 or self.subscribers < 0 or self.alerts < self.agents:
            raise ValueError(f"{self}: needs >= 1 agent, >= 0 subscribers and at least one "
                             "alert per agent")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"{self}: rate must be > 0 alerts/s or None")


FULL_THROUGHPUT = (
    ThroughputSpec(1, 0, 10_000), ThroughputSpec(4, 0, 10_000),
    ThroughputSpec(1, 2, 10_000), ThroughputSpec(4, 2, 10_000),
    ThroughputSpec(4, 2, 5_000, rate=1000.0),
)


@dataclass(frozen=True)
class BenchConfig:
    trials: int = 200  # part 1 drift execs
    gap: tuple[float, float] = (0.03, 0.12)  # s between trials, uniform (decorrelates timers)
    alert_timeout: float = 10.0  # s a trial's alert may take before it counts as missing
    quarantine_trials: int = 15
    quarantine_gap: float = 0.3
    throughput: tuple[ThroughputSpec, ...] = FULL_THROUGHPUT
    throughput_runs: int = 3  # runs per row, each with a fresh collector (median reported)
    batch: int = 100
    window: int = 8  # batches an agent may have awaiting an ack
    subscriber_batch: int = 0  # part 3 subscribers' SubscribeRequest.max_batch (0: one an event)
    seed: int = 4
    command: str = "python -m bench.collector_e2e"

    def __post_init__(self) -> None:
        if self.trials < 1 or self.quarantine_trials < 0:
            raise ValueError("trials must be >= 1 and quarantine_trials >= 0")
        if self.throughput_runs < 1:
            raise ValueError("throughput_runs must be >= 1")
        if not 1 <= self.batch <= 500 or self.window < 1:
            raise ValueError("batch must be 1..500 and window >= 1")


def quick_config() -> BenchConfig:
    return BenchConfig(
        trials=60, quarantine_trials=5,
        throughput=(ThroughputSpec(1, 0, 6_000), ThroughputSpec(4, 2, 6_000),
                    ThroughputSpec(4, 2, 3_000, rate=1000.0)), throughput_runs=1,
        command="python -m bench.collector_e2e --quick")


def tiny_config() -> BenchConfig:
    """What tests/test_bench_collector_smoke.py runs: the plumbing, in ~40 s."""
    return BenchConfig(trials=6, gap=(0.02, 0.05), quarantine_trials=2, quarantine_gap=0.1,
                       throughput=(ThroughputSpec(2, 1, 600), ThroughputSpec(1, 1, 200, 400.0)),
                       throughput_runs=1, batch=50, window=2,
                       command="tests/test_bench_collector_smoke.py (tiny mode)")


# ---- small helpers ---------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p99 of 200 values is the 2nd largest); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def _mono() -> int:
    return time.monotonic_ns()


def wall_minus_mono_ns() -> int:
    """Add to CLOCK_MONOTONIC ns to get wall-clock ns (the tightest of 5 bracketed reads)."""
    best = None
    for _ in range(5):
        a = time.monotonic_ns()
        w = time.time_ns()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, w - (a + b) // 2)
    assert best is not None
    return best[1]


def _wait(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def _cpu_seconds(pid: int) -> float:
    import psutil

    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return math.nan
    return t.user + t.system


def _other_containers() -> int:
    from tests.support.containers import docker_client

    client = docker_client()
    try:
        return len(client.containers.list())
    finally:
        client.close()


# ---- what the bench process watches ----------------------------------------------------------


class AcceptRecorder(Service):
    """A loopback TCP listener that accepts, closes and remembers when (monotonic ns)."""

    STOP_TIMEOUT = 5.0

    def __init__(self) -> None:
        super().__init__()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1024)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.times: list[int] = []  # appended by one thread, read by others (append is atomic)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        self._thread = start_daemon_thread(
            serve_accepts, "bench-accept", self._sock, self._stopping,
            lambda _conn: self.times.append(_mono()))

    def _stop(self, timeout: float | None) -> None:
        self._stopping.set()
        join_or_warn(self._thread, timeout, "bench accept thread")
        self._sock.close()

    def last(self) -> int:
        return self.times[-1] if self.times else 0

    def first_after(self, t: int) -> int | None:
        times = self.times
        for i in range(len(times) - 1, -1, -1):  # recent ones are at the end
            if times[i] <= t:
                return times[i + 1] if i + 1 < len(times) else None
        return times[0] if times else None


class AlertsFileTail(Service):
    """When each alert id first appears in the agent's --alerts-out file (inotify, monotonic
    ns at the wake-up): the moment the agent emitted it, just before its collector channel
    spooled it (the JSON sink comes first in the agent's TeeSink)."""

    IN_MODIFY = 0x2
    STOP_TIMEOUT = 5.0

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = Path(path)
        self.seen: dict[str, int] = {}
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise BenchError(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        if libc.inotify_add_watch(self._fd, str(self.path).encode(), self.IN_MODIFY) < 0:
            os.close(self._fd)
            raise BenchError(f"inotify_add_watch {self.path}: "
                             f"{os.strerror(ctypes.get_errno())}")
        self._offset = 0
        self._partial = b""
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        self._thread = start_daemon_thread(self._run, "bench-tail")

    def _stop(self, timeout: float | None) -> None:
        self._stopping.set()
        join_or_warn(self._thread, timeout, "bench tail thread")
        os.close(self._fd)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(200):
                continue
            now = _mono()
            with contextlib.suppress(BlockingIOError):
                while os.read(self._fd, 4096):
                    pass
            self._read_new(now)

    def _read_new(self, now: int) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.seen.setdefault(json.loads(line)["id"], now)


@dataclass
class Received:
    at: int  # monotonic ns when the subscriber's reader thread got it
    event: Any  # alerts_pb2.AlertEvent


class Subscriber:
    """One Alerts.Subscribe stream read by a thread, indexed for the trials: drift alerts by
    the exec's path, action events by their alert id."""

    def __init__(self, channel: Any, alert_filter: Any, *, include_actions: bool) -> None:
        from driftwarden.proto.v1 import alerts_pb2, alerts_pb2_grpc

        self._cond = threading.Condition()
        self.by_path: dict[str, Received] = {}
        self.actions: dict[str, list[Received]] = {}
        self.other = 0  # events of no interest (other alerts, notices)
        self.error: BaseException | None = None
        self.call = alerts_pb2_grpc.AlertsStub(channel).Subscribe(alerts_pb2.SubscribeRequest(
            filter=alert_filter, include_actions=include_actions, include_notices=True))
        # initial metadata = registered at the collector; bounded by a watchdog
        timer = threading.Timer(15, self.call.cancel)
        timer.start()
        try:
            self.call.initial_metadata()
        finally:
            timer.cancel()
        self._thread = threading.Thread(target=self._run, name="bench-subscriber", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(5)

    def _run(self) -> None:
        import grpc

        try:
            for event in self.call:
                got = Received(_mono(), event)
                with self._cond:
                    self._index(got)
                    self._cond.notify_all()
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.error = exc
        with self._cond:
            self._cond.notify_all()

    def _index(self, got: Received) -> None:
        event = got.event
        kind = event.WhichOneof("event")
        if kind == "alert" and event.alert.HasField("exec") and event.alert.exec.path:
            self.by_path.setdefault(event.alert.exec.path, got)
        elif kind == "action" and event.action.alert_id:
            self.actions.setdefault(event.action.alert_id, []).append(got)
        else:
            self.other += 1

    def wait(self, predicate: Callable[[], Any], timeout: float) -> Any:
        with self._cond:
            self._cond.wait_for(lambda: predicate() or self.error is not None, timeout)
            if self.error is not None:
                raise BenchError(f"the subscription failed: {self.error!r}")
            return predicate()

    def alert_for(self, path: str, timeout: float) -> Received | None:
        return self.wait(lambda: self.by_path.get(path), timeout)

    def action_events(self, alert_id: str, timeout: float) -> list[Received]:
        """The alert's action events once one with a final status (not PENDING) is in."""
        from driftwarden.proto.v1 import actions_pb2

        def final() -> list[Received] | None:
            events = self.actions.get(alert_id) or []
            done = any(e.event.action.status != actions_pb2.ACTION_STATUS_PENDING
                       for e in events)
            return list(events) if done else None

        return self.wait(final, timeout) or list(self.actions.get(alert_id) or [])


# ---- the end-to-end stack (parts 1 and 2) ----------------------------------------------------


def _container_script(probe_port: int) -> str:
    """The container's main loop: one FIFO line per trial."""
    probe = (f"/bin/dwstorm connect --seconds 3600 127.0.0.1:{probe_port} --rate {PROBE_RATE}"
             " >/dev/null 2>&1 &")
    return ("while read -r n; do case \"$n\" in "
            f"probe) {probe} ;; "
            f"*) {DRIFT_DIR}/$n/true ;; "
            "esac; done < /ctl/fifo")


def _prep_script(names: Sequence[str]) -> str:
    """One busybox copy, then a directory with a hard link to it per trial (cheap, and every
    link is its own path, so its exec is its own drift finding)."""
    return (f"mkdir -p {DRIFT_DIR} && cp /bin/busybox {DRIFT_DIR}/b && "
            f"for n in {' '.join(names)}; do mkdir {DRIFT_DIR}/$n && "
            f"ln {DRIFT_DIR}/b {DRIFT_DIR}/$n/true || exit 1; done")


@dataclass
class LatencyTrial:
    index: int  # 0 = warm-up (not in the statistics)
    path: str
    status: str = "pending"  # received | missing
    alert_id: str = ""
    trigger: int | None = None  # bench wrote the trial's name to the FIFO (monotonic ns)
    exec_ts: int | None = None  # the exec's kernel timestamp, from the alert
    emitted: int | None = None  # the agent's --alerts-out line appeared
    stored: int | None = None  # the collector's store received_at (converted to monotonic)
    received: int | None = None  # the subscriber had it
    count: int = 0
    reason: str = ""

    def span(self, start: str, end: str) -> float | None:
        a, b = getattr(self, start), getattr(self, end)
        return None if a is None or b is None else (b - a) / 1e6

    @property
    def total_ms(self) -> float | None:
        return self.span("exec_ts", "received")


@dataclass
class QuarantineTrial:
    index: int
    path: str
    status: str = "pending"  # done | missing-alert | no-result | <action status> | not-cut
    alert_id: str = ""
    action_id: str = ""
    action_status: str = ""
    trigger: int | None = None
    exec_ts: int | None = None
    alert: int | None = None  # subscriber got the alert
    stored: int | None = None  # collector store received_at
    action_created: int | None = None  # collector recorded the policy's action (store)
    dispatched: int | None = None  # subscriber got the PENDING action event
    action_finished: int | None = None  # collector stored the agent's result (store)
    result: int | None = None  # subscriber got the final action event
    cut: int | None = None  # the last connect the host listener accepted before the cut
    release_requested: int | None = None
    release_status: str = ""
    restored: int | None = None  # first accept after the release request

    def span(self, start: str, end: str) -> float | None:
        a, b = getattr(self, start), getattr(self, end)
        return None if a is None or b is None else (b - a) / 1e6


@dataclass
class E2EResult:
    latency: list[LatencyTrial]
    warmups: list[LatencyTrial]
    quarantine: list[QuarantineTrial]
    settings: list[tuple[str, str, str]]
    agent_cpu_s: float
    collector_cpu_s: float
    part1_seconds: float
    agent_counters: dict[str, dict[str, int]]
    clock_drift_us: float  # wall-minus-monotonic change over the run
    notes: list[str] = field(default_factory=list)


class _Stack:
    """Collector + agent + container + subscriber for parts 1 and 2."""

    def __init__(self, config: BenchConfig, tmp: Path, image: str,
                 log: Callable[[str], None]) -> None:
        self.config = config
        self.tmp = tmp
        self.image = image
        self.log = log
        self.rng = random.Random(config.seed)
        self.offset = wall_minus_mono_ns()

    def run(self) -> E2EResult:
        import grpc
        from driftwarden.proto.v1 import alerts_pb2, common_pb2

        from tests.support.agent_proc import AgentProcess
        from tests.support.collector_proc import CollectorProcess
        from tests.support.containers import run_container

        cfg = self.config
        policy = self.tmp / "bench-policy.yaml"
        policy.write_text(BENCH_POLICY)
        ctl = self.tmp / "ctl"
        ctl.mkdir()
        fifo = ctl / "fifo"
        os.mkfifo(fifo)
        alerts_out = self.tmp / "agent-alerts.jsonl"
        alerts_out.touch()
        db = self.tmp / "e2e.db"
        names = ([f"a{i}" for i in range(cfg.trials + 1)]
                 + [f"q{i}" for i in range(cfg.quarantine_trials + 1)])
        with contextlib.ExitStack() as stack:
            self.fifo_fd = os.open(fifo, os.O_RDWR | os.O_CLOEXEC)  # never blocks on a FIFO
            stack.callback(os.close, self.fifo_fd)
            self.listener = stack.enter_context(AcceptRecorder())
            self.log("[e2e] starting the collector and the agent (the agent compiles its "
                     "probes: ~10-30 s)")
            collector = stack.enter_context(CollectorProcess(
                db, self.tmp / "collector.log", ["--policy", str(policy)]))
            channel = grpc.insecure_channel(collector.address)
            stack.callback(channel.close)
            agent = stack.enter_context(AgentProcess(
                self.tmp / "agent-state", alerts_out,
                extra=["--collector", collector.address, "--node", NODE]))
            self.agent, self.collector, self.channel = agent, collector, channel
            self._wait_connected()
            tail = stack.enter_context(AlertsFileTail(alerts_out))
            box = stack.enter_context(run_container(
                self.image, ["sh", "-c", _container_script(self.listener.port)],
                name="bench-e2e", network="host",
                volumes={str(ctl): {"bind": "/ctl", "mode": "ro"}}))
            self.box = box
            code, out = box.exec(["sh", "-c", _prep_script(names)])
            if code != 0:
                raise BenchError(f"preparing the drift binaries failed ({code}): {out[-500:]}")
            sub = Subscriber(channel, alerts_pb2.AlertFilter(
                containers=[box.name], kinds=[common_pb2.ALERT_KIND_DRIFT]),
                include_actions=True)
            stack.callback(sub.close)
            self.sub = sub

            # Warm-ups while the image learns: the first drift of a container reads its layers,
            # and /tmp/dw/*/true (digits are wildcards) and its lineage become known items.
            warmups = [self._latency_trial(0, "a0"), self._latency_trial(0, "q0")]
            for w in warmups:
                if w.status != "received":
                    raise BenchError(f"warm-up drift {w.path} never reached the subscriber"
                                     f"\n{self._logs()}")
            self.log(f"[e2e] part 1: {cfg.trials} drift execs")
            cpu_agent0, cpu_coll0 = (_cpu_seconds(agent.proc.pid),
                                     _cpu_seconds(collector.proc.pid))
            t0 = time.monotonic()
            latency = []
            for i in range(1, cfg.trials + 1):
                latency.append(self._latency_trial(i, f"a{i}"))
                time.sleep(self.rng.uniform(*cfg.gap))
            part1 = time.monotonic() - t0
            cpu_agent = _cpu_seconds(agent.proc.pid) - cpu_agent0
            cpu_coll = _cpu_seconds(collector.proc.pid) - cpu_coll0
            quarantine: list[QuarantineTrial] = []
            if cfg.quarantine_trials:
                self._start_probe()
                self._protect(box)
                self.log(f"[e2e] part 2: {cfg.quarantine_trials} drift execs in protect mode")
                for k in range(1, cfg.quarantine_trials + 1):
                    quarantine.append(self._quarantine_trial(k))
                    time.sleep(cfg.quarantine_gap)
            counters = self._agent_counters()
            for trial in warmups + latency:
                trial.emitted = tail.seen.get(trial.alert_id)
            stack.close()  # container, agent and collector gone: the store is final
        self._read_store(db, warmups + latency, quarantine)
        drift = (wall_minus_mono_ns() - self.offset) / 1e3
        notes = []
        if abs(drift) > 1000:
            notes.append(f"the wall clock moved {drift:.0f} us against the monotonic clock "
                         "during the run: store times may be off by that much")
        return E2EResult(latency, warmups, quarantine, agent_settings(), cpu_agent, cpu_coll,
                         part1, counters, drift, notes)

    # - steps ------------------------------------------------------------------------------

    def _wait_connected(self) -> None:
        from driftwarden.proto.v1 import agent_pb2, agent_pb2_grpc

        stub = agent_pb2_grpc.AgentsStub(self.channel)

        def connected() -> bool:
            agents = stub.List(agent_pb2.ListAgentsRequest(), timeout=5).agents
            return any(a.node == NODE and a.connected for a in agents)

        try:
            _wait(connected, 30, "the agent to connect to the collector", 0.1)
        except BenchError as exc:
            raise BenchError(f"{exc}\n{self._logs()}") from None

    def _agent_counters(self) -> dict[str, dict[str, int]]:
        from driftwarden.proto.v1 import agent_pb2, agent_pb2_grpc

        agents = agent_pb2_grpc.AgentsStub(self.channel).List(
            agent_pb2.ListAgentsRequest(), timeout=5).agents
        return {c.kind: {"emitted": c.emitted, "suppressed": c.suppressed, "dropped": c.dropped}
                for a in agents if a.node == NODE for c in a.counters}

    def _trigger(self, name: str) -> int:
        now = _mono()
        os.write(self.fifo_fd, f"{name}\n".encode())
        return now

    def _latency_trial(self, index: int, name: str) -> LatencyTrial:
        trial = LatencyTrial(index, f"{DRIFT_DIR}/{name}/true")
        trial.trigger = self._trigger(name)
        got = self.sub.alert_for(trial.path, self.config.alert_timeout)
        if got is None:
            trial.status = "missing"
            return trial
        alert = got.event.alert
        trial.status = "received"
        trial.received = got.at
        trial.alert_id = alert.id
        trial.exec_ts = alert.exec.header.ts_ns
        trial.count = alert.count
        trial.reason = alert.reasons[0].code if alert.reasons else ""
        return trial

    def _start_probe(self) -> None:
        before = len(self.listener.times)
        self._trigger("probe")
        _wait(lambda: len(self.listener.times) > before + PROBE_RATE // 2, 15,
              "the in-container connect probe to reach the host listener")
        time.sleep(1.0)  # still learning: its connect and exec become known items

    def _protect(self, box: Any) -> None:
        """Protect mode for the image, on the collector (the agent follows the fleet's
        baselines), and wait until the agent holds that version."""
        box.container.reload()
        image_id = str(box.container.attrs["Image"])

        def attempt() -> int | None:
            proc = subprocess.run(
                [sys.executable, "-m", "driftwarden", "baseline", "mode", image_id, "protect",
                 "--reason", "bench", "--collector", self.collector.address, "--json"],
                capture_output=True, text=True, timeout=60, cwd="/")
            if proc.returncode == 0:
                return int(json.loads(proc.stdout)["version"])
            if proc.returncode == 2 and "baseline for image" in proc.stderr:
                return None  # the agent has not reported the image yet
            raise BenchError(f"driftwarden baseline mode ... protect failed: "
                             f"{proc.stdout}{proc.stderr}")

        version = _wait(attempt, 20, f"the collector to hold a baseline for {image_id}",
                        step=0.5)
        fleet_file = self.agent.state_dir / "fleet.json"

        def held() -> int:
            try:
                entry = json.loads(fleet_file.read_text())["baselines"].get(image_id, {})
            except (OSError, ValueError, KeyError):
                return 0
            return entry.get("version", 0) if entry.get("mode") == "protect" else 0

        _wait(lambda: held() >= version, 10, f"the agent to hold protect (version {version})")

    def _quarantine_trial(self, index: int) -> QuarantineTrial:
        from driftwarden.proto.v1 import actions_pb2

        trial = QuarantineTrial(index, f"{DRIFT_DIR}/q{index}/true")
        _wait(lambda: _mono() - self.listener.last() < 50_000_000, 10,
              "the probe's connects to arrive (the network should be up)")
        trial.trigger = self._trigger(f"q{index}")
        got = self.sub.alert_for(trial.path, self.config.alert_timeout)
        if got is None:
            trial.status = "missing-alert"
            return trial
        trial.alert, trial.alert_id = got.at, got.event.alert.id
        trial.exec_ts = got.event.alert.exec.header.ts_ns
        # the first quarantine compiles the programs with bcc: allow for it
        events = self.sub.action_events(trial.alert_id, 60)
        for e in events:
            action = e.event.action
            trial.action_id = action.action_id
            if action.status == actions_pb2.ACTION_STATUS_PENDING:
                trial.dispatched = trial.dispatched or e.at
            else:
                trial.result = e.at
                trial.action_status = actions_pb2.ActionStatus.Name(action.status)
        if trial.result is None:
            trial.status = "no-result"
        elif trial.action_status != "ACTION_STATUS_DONE":
            trial.status = trial.action_status.removeprefix("ACTION_STATUS_").lower()
        else:
            trial.cut = self._wait_cut(trial.exec_ts)
            trial.status = "done" if trial.cut is not None else "not-cut"
        if trial.action_status in ("ACTION_STATUS_DONE", "ACTION_STATUS_ALREADY"):
            self._release(trial)
        return trial

    def _wait_cut(self, after: int) -> int | None:
        """The last accepted connect once none arrived for QUIET_FOR_CUT s (None: not cut
        within 10 s, or cut before `after`, the exec)."""
        quiet = int(QUIET_FOR_CUT * 1e9)
        try:
            last = _wait(lambda: (_mono() - self.listener.last() >= quiet
                                  and self.listener.last()), 10, "the network to be cut")
        except BenchError:
            return None
        return last if last > after else None

    def _release(self, trial: QuarantineTrial) -> None:
        from driftwarden.proto.v1 import actions_pb2, actions_pb2_grpc

        trial.release_requested = _mono()
        response = actions_pb2_grpc.ActionsStub(self.channel).Request(
            actions_pb2.ActionRequest(container=self.box.id,
                                      type=actions_pb2.ACTION_TYPE_RELEASE,
                                      reason=f"bench: release after trial {trial.index}",
                                      requested_by="bench"), timeout=30)
        trial.release_status = actions_pb2.ActionStatus.Name(response.status)
        if response.status != actions_pb2.ACTION_STATUS_DONE:
            raise BenchError(f"release after trial {trial.index}: {trial.release_status} "
                             f"{response.message}")
        start = trial.release_requested
        trial.restored = _wait(lambda: self.listener.first_after(start), 10,
                               "the network to come back after the release")

    def _read_store(self, db: Path, latency: list[LatencyTrial],
                    quarantine: list[QuarantineTrial]) -> None:
        """Collector-side times from the store (wall clock -> monotonic with this process's
        offset)."""

        def mono(wall: float | None) -> int | None:
            return None if wall is None else round(wall * 1e9) - self.offset

        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            received = dict(conn.execute("SELECT id, received_at FROM alerts"))
            actions = {row[0]: row[1:] for row in conn.execute(
                "SELECT alert_id, created_at, finished_at FROM actions "
                "WHERE requested_by = 'policy'")}
        for t in latency:
            t.stored = mono(received.get(t.alert_id))
        for q in quarantine:
            q.stored = mono(received.get(q.alert_id))
            created, finished = actions.get(q.alert_id, (None, None))
            q.action_created, q.action_finished = mono(created), mono(finished)

    def _logs(self) -> str:
        return (f"--- collector ---\n{self.collector.log()[-3000:]}\n"
                f"--- agent ---\n{self.agent.log()[-3000:]}")


def agent_settings() -> list[tuple[str, str, str]]:
    """(setting, value, where) of the defaults that bound the exec -> subscriber latency, read
    from the code so the report stays true when they change."""
    from driftwarden.agent.channel import ChannelConfig
    from driftwarden.agent.pipeline import TracePipeline
    from driftwarden.collector.service import ServiceConfig
    from driftwarden.core.lifecycle import LATENCY_SWITCH_INTERVAL
    from driftwarden.probes.capture import LiveCapture
    from driftwarden.probes.loader import ProbeConfig

    def default(func: Callable, name: str) -> Any:
        return inspect.signature(func).parameters[name].default

    probe = ProbeConfig()
    channel_fields = {f.name: f.default for f in dataclasses.fields(ChannelConfig)}
    service_fields = {f.name: f.default for f in dataclasses.fields(ServiceConfig)}
    return [
        ("ring buffer wake-up", "none (BPF_RB_NO_WAKEUP)" if not probe.wakeup else "per event",
         "probes/loader.py ProbeConfig.wakeup"),
        ("ring buffer drain interval when empty",
         f"{default(LiveCapture.__init__, 'drain_interval') * 1e3:g} ms",
         "probes/capture.py LiveCapture(drain_interval)"),
        ("pipeline read timeout", f"{default(TracePipeline.run, 'poll_interval') * 1e3:g} ms",
         "agent/pipeline.py TracePipeline.run(poll_interval)"),
        ("kernel dedup of repeats", f"{probe.dedup_interval_ns / 1e9:g} s",
         "probes/loader.py ProbeConfig.dedup_interval_ns (new paths are never suppressed)"),
        ("agent spool fsync", "by the spool's sync thread, off the alert's path (group "
         "commit)" if channel_fields["spool_fsync"] else "none",
         "agent/channel.py ChannelConfig.spool_fsync, agent/spool.py"),
        ("interpreter switch interval (agent and collector)",
         f"{LATENCY_SWITCH_INTERVAL * 1e3:g} ms", "core/lifecycle.py shorten_switch_interval"),
        ("channel batching", f"no wait; up to {channel_fields['max_batch_alerts']} alerts a "
         "batch, whatever is spooled when the sender wakes",
         "agent/channel.py ChannelConfig.max_batch_alerts"),
        ("alerts in flight before the sender waits", str(channel_fields["max_in_flight"]),
         "agent/channel.py ChannelConfig.max_in_flight"),
        ("collector stream poll (only for ending idle streams)",
         f"{service_fields['poll_seconds'] * 1e3:g} ms",
         "collector/service.py ServiceConfig.poll_seconds"),
    ]


# ---- part 3: throughput (synthetic agents and subscribers in their own processes) -----------


def _alert_template(node: str) -> Any:
    """A drift alert shaped like the agent's (one exec event, provenance-free), as a message."""
    from driftwarden.core.alerts import Alert, AlertKind, AlertReason, Severity
    from driftwarden.core.wire import alert_to_proto, validate_alert

    now = time.time()
    path = "/tmp/payload/run"
    container = {"id": "0" * 64, "name": "bench-app", "image": "bench/app:1",
                 "image_id": "sha256:" + "1" * 64, "pod": None, "namespace": None}
    event = {
        "v": 1, "time": time.strftime("%Y-%m-%dT%H:%M:%S.000000Z", time.gmtime(now)),
        "ts_ns": 1, "kind": "exec",
        "container": {**container, "runtime": "docker", "labels": {}, "attribution": "container",
                      "metadata_error": None},
        "cgroup_id": 4242, "process": {"pid": 100, "tid": 100, "ppid": 1, "uid": 0, "gid": 0,
                                       "comm": "run", "exe": path},
        "suppressed_before": 0, "runtime_setup": False,
        "exec": {"filename": path, "path": path, "path_resolved": True, "exe": path,
                 "argv": ["run", "--serve"], "argv_truncated": False, "result": 0,
                 "error": None},
    }
    alert = Alert(
        id="0" * 24, time=now, kind=AlertKind.DRIFT, severity=Severity.HIGH, score=1.0,
        reasons=(AlertReason("exec-added-binary", f"ran {path}, which the image does not "
                             "contain (added at run time)", (("path", path),)),),
        container=container, process={"pid": 100, "ppid": 1, "exe": path,
                                      "argv": ["run", "--serve"], "uid": 0, "comm": "run"},
        events=(event,), baseline_version=1, baseline_mode="monitor")
    msg = alert_to_proto(alert, node)
    validate_alert(msg)
    return msg


def _wait_flag(flag: Any, timeout: float, step: float) -> bool:
    """Poll a shared flag (a lock-free RawValue: a worker that exits while waiting on a
    multiprocessing Event or Condition leaves it unusable, and set() then blocks forever)."""
    deadline = time.monotonic() + timeout
    while not flag.value:
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)
    return True


def _alert_id(agent: int, n: int) -> str:
    return f"{agent:04x}{n:020x}"


def _agent_worker(address: str, index: int, count: int, batch: int, window: int,
                  rate: float | None, ready: Any, start: Any, results: Any,
                  deadline_s: float) -> None:
    """A synthetic agent: hello, then `count` alerts in batches, <= `window` awaiting an ack,
    at most `rate` alerts/s (None: unpaced). Messages are serialized before `start`, so the
    send loop costs next to nothing."""
    result: dict[str, Any] = {"role": "agent", "index": index, "sent": 0, "acked": 0,
                              "unique_acked": 0, "unknown_acked": 0, "notices": [],
                              "first_send": None, "last_ack": None, "error": None,
                              "sends": []}  # when each batch was sent (_mono)
    readied = False
    try:
        import grpc
        from driftwarden.core import __version__
        from driftwarden.core.wire import MAX_MESSAGE_BYTES, to_timestamp
        from driftwarden.proto.v1 import agent_pb2, common_pb2

        node = f"{NODE}-{index}"
        template = _alert_template(node)
        hello = agent_pb2.AgentMessage(seq=1, hello=agent_pb2.Hello(
            node=node, agent_version=__version__, mode=common_pb2.MODE_MONITOR,
            hostname="bench", started_at=to_timestamp(time.time()))).SerializeToString()
        payloads: list[tuple[bytes, int]] = []  # (message, alerts in it)
        ids: set[str] = set()
        for b, first in enumerate(range(0, count, batch)):
            msg = agent_pb2.AgentMessage(seq=b + 2)
            for n in range(first, min(first + batch, count)):
                alert = msg.alert_batch.alerts.add()
                alert.CopyFrom(template)
                alert.id = _alert_id(index, n)
                alert.container.id = f"{index:04x}{n % 10:060x}"
                alert.container.name = f"bench-app-{index}-{n % 10}"
                msg.alert_batch.spool_seqs.append(n + 1)
                ids.add(alert.id)
            payloads.append((msg.SerializeToString(), len(msg.alert_batch.alerts)))
        options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        with grpc.insecure_channel(address, options=options) as channel:
            grpc.channel_ready_future(channel).result(timeout=15)
            connect = channel.stream_stream(
                "/driftwarden.v1.AgentChannel/Connect", request_serializer=None,
                response_deserializer=agent_pb2.CollectorCommand.FromString)
            ready.put(index)
            readied = True
            if not _wait_flag(start, deadline_s, 0.0005):
                raise BenchError("never told to start")
            credits = threading.Semaphore(window)
            finished = threading.Event()

            def requests() -> Iterator[bytes]:
                yield hello
                began = time.monotonic()
                for i, (payload, size) in enumerate(payloads):
                    if rate is not None:  # absolute schedule: a late batch does not shift later
                        time.sleep(max(0.0, began + i * batch / rate - time.monotonic()))
                    while not credits.acquire(timeout=0.5):
                        if finished.is_set():
                            return
                    if result["first_send"] is None:
                        result["first_send"] = _mono()
                    result["sent"] += size
                    result["sends"].append(_mono())
                    yield payload
                finished.wait(deadline_s)  # keep the stream open until every ack is in

            call = connect(requests(), timeout=deadline_s)
            acked: set[str] = set()
            try:
                for command in call:
                    body = command.WhichOneof("body")
                    if body == "ack":
                        result["last_ack"] = _mono()
                        for alert_id in command.ack.alert_ids:
                            result["acked"] += 1
                            if alert_id not in ids:
                                result["unknown_acked"] += 1
                            acked.add(alert_id)
                        credits.release()
                        if len(acked) >= count:
                            break
                    elif body == "notice":
                        result["notices"].append(command.notice.text)
            finally:
                finished.set()
                call.cancel()
            result["unique_acked"] = len(acked)
    except Exception as exc:  # reported to the parent, which fails the configuration
        result["error"] = f"{type(exc).__name__}: {exc}"
    if not readied:
        ready.put(index)
    results.put(result)


def _subscriber_worker(address: str, index: int, expected: int, ready: Any, stop: Any,
                       results: Any, deadline_s: float, max_batch: int = 0) -> None:
    """A subscriber that counts alerts (by id) and the collector's drop notices until every one
    of `expected` alerts is accounted for (received or reported dropped), or it is told to
    stop. `max_batch` > 1 asks for up to that many alerts an event."""
    result: dict[str, Any] = {"role": "subscriber", "index": index, "received": 0, "unique": 0,
                              "duplicates": 0, "dropped": 0, "first": None, "last": None,
                              "error": None, "arrivals": {}}  # alert id -> first receipt
    readied = False
    try:
        import grpc
        from driftwarden.core.wire import MAX_MESSAGE_BYTES
        from driftwarden.proto.v1 import alerts_pb2, alerts_pb2_grpc

        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        with grpc.insecure_channel(address, options=options) as channel:
            grpc.channel_ready_future(channel).result(timeout=15)
            call = alerts_pb2_grpc.AlertsStub(channel).Subscribe(
                alerts_pb2.SubscribeRequest(filter=alerts_pb2.AlertFilter(),
                                            include_notices=True, max_batch=max_batch),
                timeout=deadline_s)
            call.initial_metadata()
            watchdog = threading.Thread(
                target=lambda: (_wait_flag(stop, deadline_s, 0.05), call.cancel()), daemon=True)
            watchdog.start()
            ready.put(-1 - index)
            readied = True
            seen: set[str] = set()
            try:
                for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "notice":
                        result["dropped"] += event.notice.dropped
                        if len(seen) + result["dropped"] >= expected:
                            break
                        continue
                    if kind == "alert":
                        alerts: Sequence[Any] = (event.alert,)
                    elif kind == "batch":
                        alerts = event.batch.alerts
                    else:
                        continue
                    now = _mono()
                    result["first"] = result["first"] or now
                    result["last"] = now
                    for alert in alerts:
                        result["received"] += 1
                        if alert.id in seen:
                            result["duplicates"] += 1
                        else:
                            result["arrivals"][alert.id] = now
                        seen.add(alert.id)
                    if len(seen) + result["dropped"] >= expected:
                        break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    raise
            finally:
                call.cancel()
            result["unique"] = len(seen)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    if not readied:
        ready.put(-1 - index)
    results.put(result)


@dataclass
class ThroughputResult:
    agents: int
    subscribers: int
    alerts: int
    rate: float | None  # offered alerts/s (None: unpaced)
    batch: int
    window: int
    seconds_acked: float
    seconds_delivered: float | None
    sent: int
    acked: int
    unique_acked: int
    unknown_acked: int
    delivered: list[int]  # per subscriber: unique alerts received
    duplicates: int
    dropped: list[int]  # per subscriber: alerts the collector reported dropped (notices)
    collector_cpu_s: float
    stored: int
    errors: list[str]
    latencies_ms: list[float] = field(default_factory=list)  # batch sent -> each subscriber

    @property
    def acked_rate(self) -> float:
        return self.unique_acked / self.seconds_acked if self.seconds_acked > 0 else math.nan

    @property
    def delivered_rate(self) -> float | None:
        if not self.subscribers or not self.seconds_delivered:
            return None
        return min(self.delivered) / self.seconds_delivered

    def problems(self) -> list[str]:
        """Why not every alert was acked once and delivered once to every subscriber."""
        out = list(self.errors)
        if not self.sent == self.alerts == self.unique_acked == self.acked:
            out.append(f"sent {self.sent}, acked {self.acked} ({self.unique_acked} unique) of "
                       f"{self.alerts}")
        if self.unknown_acked:
            out.append(f"{self.unknown_acked} acks for ids never sent")
        if self.stored != self.alerts:
            out.append(f"{self.stored} of {self.alerts} in the store")
        if self.duplicates:
            out.append(f"{self.duplicates} duplicate deliveries")
        for i, (got, dropped) in enumerate(zip(self.delivered, self.dropped, strict=True)):
            if got + dropped != self.alerts:
                out.append(f"subscriber {i}: {self.alerts - got - dropped} alerts unaccounted "
                           "for (neither delivered nor reported dropped)")
            elif dropped:
                out.append(f"subscriber {i}: {dropped} {DROPPED}")
        return out

    @property
    def accounted(self) -> bool:
        """Every alert acked once, stored, and delivered or reported dropped to each
        subscriber (no silent loss, no duplicates)."""
        return all(p.endswith(DROPPED) for p in self.problems())

    @property
    def complete(self) -> bool:
        """Accounted for, and nothing dropped."""
        return not self.problems()


def run_throughput(config: BenchConfig, tmp: Path, spec: ThroughputSpec,
                   log: Callable[[str], None], run: int = 1) -> ThroughputResult:
    """One run of one row against a fresh collector with an empty store (alerts stored by an
    earlier run would come back as UPDATED, a different and slower path)."""
    from tests.support.collector_proc import CollectorProcess

    label = f"tp-{spec.agents}a{spec.subscribers}s{int(spec.rate or 0)}r-run{run}"
    db = tmp / f"{label}.db"
    if db.exists():
        raise BenchError(f"{db} exists: every run needs an empty store")
    with CollectorProcess(db, tmp / f"{label}.log") as collector:
        return drive_throughput(config, spec, [collector], label, log,
                                lambda: _count_alerts(db))


def drive_throughput(config: BenchConfig, spec: ThroughputSpec, collectors: Sequence[Any],
                     label: str, log: Callable[[str], None],
                     count_stored: Callable[[], int]) -> ThroughputResult:
    """One row's synthetic agents and subscribers against running collector processes
    (tests.support.collector_proc; agent i and subscriber i on collector i modulo their number)
    whose store holds no alert yet; ``count_stored()`` counts the alerts stored at the end."""
    agents, subscribers, total = spec.agents, spec.subscribers, spec.alerts
    per_agent = [total // agents] * agents
    per_agent[0] += total - sum(per_agent)
    agent_rate = None if spec.rate is None else spec.rate / agents
    deadline = max(60.0, total / (spec.rate or 300) * 1.5)
    ctx = multiprocessing.get_context("spawn")
    ready, results = ctx.Queue(), ctx.Queue()
    start, stop = ctx.RawValue(ctypes.c_bool, False), ctx.RawValue(ctypes.c_bool, False)
    procs: list[Any] = []
    log(f"[throughput] {label}: {agents} agent(s), {subscribers} subscriber(s), {total} alerts"
        + (f" at {spec.rate:g}/s" if spec.rate else "")
        + (f", {len(collectors)} collectors" if len(collectors) > 1 else ""))

    def address(i: int) -> str:
        return collectors[i % len(collectors)].address

    def logs() -> str:
        return "\n".join(c.log()[-2000:] for c in collectors)

    try:
        for i in range(subscribers):
            procs.append(ctx.Process(target=_subscriber_worker, args=(
                address(i), i, total, ready, stop, results, deadline, config.subscriber_batch),
                daemon=True))
        for i, count in enumerate(per_agent):
            procs.append(ctx.Process(target=_agent_worker, args=(
                address(i), i, count, config.batch, config.window, agent_rate, ready,
                start, results, deadline), daemon=True))
        for p in procs:
            p.start()
        for _ in procs:  # every subscriber registered, every agent's messages built
            try:
                ready.get(timeout=60)
            except queue.Empty:
                raise BenchError(f"{label}: a worker did not get ready in 60 s "
                                 f"(collector logs:\n{logs()})") from None
        cpu0 = sum(_cpu_seconds(c.proc.pid) for c in collectors)
        t0 = _mono()
        start.value = True
        out = _collect(results, lambda got: sum(r["role"] == "agent" for r in got) == agents,
                       deadline + 30)
        cpu = sum(_cpu_seconds(c.proc.pid) for c in collectors) - cpu0
        # subscribers stop by themselves once they have every alert; else after 10 s

        def everyone(got: list) -> bool:
            return len(got) == len(procs)

        out = _collect(results, everyone, 10, out)
        if not everyone(out):
            stop.value = True
            out = _collect(results, everyone, 15, out)
        stop.value = True
    finally:
        start.value = stop.value = True
        for p in procs:
            if p.pid is None:  # never started
                continue
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    stored = count_stored()
    agent_results = [r for r in out if r["role"] == "agent"]
    subs = sorted((r for r in out if r["role"] == "subscriber"), key=lambda r: r["index"])
    if len(agent_results) < agents:
        raise BenchError(f"{label}: {agents - len(agent_results)} agent(s) never reported")
    errors = [f"agent {r['index']}: {r['error']}" for r in agent_results if r["error"]]
    errors += [f"agent {r['index']}: notice {n}" for r in agent_results for n in r["notices"]]
    errors += [f"subscriber {r['index']}: {r['error']}" for r in subs if r["error"]]
    if len(subs) < subscribers:
        errors.append(f"{subscribers - len(subs)} subscriber(s) never reported")
    last_ack = max((r["last_ack"] or t0) for r in agent_results)
    last_sub = max((r["last"] or t0) for r in subs) if subs else None
    return ThroughputResult(
        agents=agents, subscribers=subscribers, alerts=total, rate=spec.rate, batch=config.batch,
        window=config.window, seconds_acked=(last_ack - t0) / 1e9,
        seconds_delivered=None if last_sub is None else (last_sub - t0) / 1e9,
        sent=sum(r["sent"] for r in agent_results),
        acked=sum(r["acked"] for r in agent_results),
        unique_acked=sum(r["unique_acked"] for r in agent_results),
        unknown_acked=sum(r["unknown_acked"] for r in agent_results),
        delivered=[r["unique"] for r in subs], duplicates=sum(r["duplicates"] for r in subs),
        dropped=[r["dropped"] for r in subs], collector_cpu_s=cpu, stored=stored,
        errors=errors,
        latencies_ms=_latencies_ms(agent_results, subs, per_agent, config.batch))


def _latencies_ms(agents: Sequence[dict[str, Any]], subscribers: Sequence[dict[str, Any]],
                  per_agent: Sequence[int], batch: int) -> list[float]:
    """For every alert and subscriber: ms from the agent's send of the alert's batch to the
    subscriber's receipt (CLOCK_MONOTONIC, one clock for every process of the host)."""
    sent_at: dict[str, int] = {}
    for r in agents:
        for b, at in enumerate(r["sends"]):
            for n in range(b * batch, min((b + 1) * batch, per_agent[r["index"]])):
                sent_at[_alert_id(r["index"], n)] = at
    return [(at - sent_at[alert_id]) / 1e6 for s in subscribers
            for alert_id, at in s["arrivals"].items() if alert_id in sent_at]


def _collect(results: Any, enough: Callable[[list], bool], timeout: float,
             got: list | None = None) -> list[dict[str, Any]]:
    """Worker results from the queue until `enough(got)` or `timeout` s."""
    got = list(got or [])
    deadline = time.monotonic() + timeout
    while not enough(got):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with contextlib.suppress(queue.Empty):
            got.append(results.get(timeout=min(left, 1.0)))
    return got


def _count_alerts(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return int(conn.execute("SELECT count(*) FROM alerts").fetchone()[0])


# ---- the whole benchmark ---------------------------------------------------------------------


@dataclass
class BenchResult:
    config: BenchConfig
    host: dict[str, str]
    e2e: E2EResult
    throughput: list[list[ThroughputResult]]  # per ThroughputSpec, one per run
    started: float
    finished: float
    notes: list[str] = field(default_factory=list)


def run_benchmark(config: BenchConfig, log: Callable[[str], None] | None = None) -> BenchResult:
    from bench.probe_overhead import host_info
    from tests.support.images import storm_image

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    started = time.time()
    host = host_info()
    notes: list[str] = []
    others = _other_containers()
    if others:
        notes.append(f"{others} other container(s) were running when the benchmark started "
                     "(the agent watches them too).")
    image = storm_image()
    with tempfile.TemporaryDirectory(prefix="dw-bench-collector-") as tmp_text:
        tmp = Path(tmp_text)
        e2e = _Stack(config, tmp, image, log).run()
        host["load average (1/5/15 min) after parts 1-2"] = _loadavg()
        throughput = [[run_throughput(config, tmp, spec, log, run)
                       for run in range(1, config.throughput_runs + 1)]
                      for spec in config.throughput]
    host["load average (1/5/15 min) at end"] = _loadavg()
    return BenchResult(config, host, e2e, throughput, started, time.time(), notes + e2e.notes)


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ---- report ----------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _dist_row(label: str, values: Sequence[float]) -> list[object]:
    if not values:
        return [label, 0, "-", "-", "-", "-", "-", "-"]
    return [label, len(values), _f(min(values)), _f(percentile(values, 50)),
            _f(percentile(values, 90)), _f(percentile(values, 99)), _f(max(values)),
            _f(statistics.fmean(values))]


DIST_HEADER = ("", "n", "min ms", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms")
LATENCY_SEGMENTS = (
    ("exec -> subscriber (total)", "exec_ts", "received"),
    ("kernel -> agent emitted", "exec_ts", "emitted"),
    ("agent emitted -> collector stored", "emitted", "stored"),
    ("collector stored -> subscriber", "stored", "received"),
    ("(FIFO write -> exec: trigger, not latency)", "trigger", "exec_ts"),
)
QUARANTINE_SEGMENTS = (
    ("exec -> alert at subscriber", "exec_ts", "alert"),
    ("exec -> collector stored", "exec_ts", "stored"),
    ("exec -> policy action recorded", "exec_ts", "action_created"),
    ("exec -> PENDING action event at subscriber", "exec_ts", "dispatched"),
    ("exec -> network cut (last accept)", "exec_ts", "cut"),
    ("exec -> result stored by the collector", "exec_ts", "action_finished"),
    ("exec -> action result at subscriber (a)", "exec_ts", "result"),
    ("alert at subscriber -> network cut", "alert", "cut"),
    ("release request -> network back", "release_requested", "restored"),
)


def _rates(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:,.0f}"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def latency_values(trials: Sequence[LatencyTrial], start: str, end: str) -> list[float]:
    return [v for t in trials if t.status == "received"
            if (v := t.span(start, end)) is not None]


def render_report(result: BenchResult) -> str:
    cfg = result.config
    e2e = result.e2e
    out: list[str] = ["# driftwarden collector benchmark", ""]
    out.append(f"Command: `{cfg.command}`; {cfg.trials} latency trials, "
               f"{cfg.quarantine_trials} quarantine trials, {len(cfg.throughput)} throughput "
               f"configurations x {cfg.throughput_runs} run(s); "
               f"{result.finished - result.started:.0f} s in all. Method and "
               "definitions: bench/COLLECTOR.md.")
    out += ["", "## Host", "", _table(("", ""), sorted(result.host.items()))]
    for note in result.notes:
        out += ["", f"Note: {note}"]

    # part 1
    trials = e2e.latency
    got = [t for t in trials if t.status == "received"]
    totals = latency_values(trials, "exec_ts", "received")
    p99 = percentile(totals, 99)
    verdict = ("met" if p99 <= TARGET_P99_MS else "MISSED") if totals else "no data"
    out += ["", "## 1. Exec -> subscriber latency", "",
            f"{len(trials)} drift execs, {len(got)} alerts received, "
            f"{len(trials) - len(got)} missing (after {cfg.alert_timeout:g} s); "
            f"target p99 <= {TARGET_P99_MS:g} ms: **{verdict}** (p99 {_f(p99)} ms). "
            f"Part 1 took {e2e.part1_seconds:.1f} s; the agent used {e2e.agent_cpu_s:.2f} CPU-s "
            f"and the collector {e2e.collector_cpu_s:.2f} CPU-s in it.", "",
            _table(DIST_HEADER, [_dist_row(label, latency_values(trials, a, b))
                                 for label, a, b in LATENCY_SEGMENTS])]
    bad = [t for t in got if t.count != 1 or t.reason != "exec-added-binary"]
    if bad:
        out += ["", f"{len(bad)} alert(s) were not a single exec-added-binary drift: "
                + ", ".join(f"{t.path} ({t.reason}, count {t.count})" for t in bad[:5])]
    slow = sorted(got, key=lambda t: -(t.total_ms or 0))[:5]
    out += ["", "Slowest trials (ms): "
            + "; ".join(f"#{t.index} total {_f(t.total_ms)} = kernel->agent "
                        f"{_f(t.span('exec_ts', 'emitted'))} + agent->collector "
                        f"{_f(t.span('emitted', 'stored'))} + collector->subscriber "
                        f"{_f(t.span('stored', 'received'))}" for t in slow)]
    out += ["", "Agent and collector defaults on this path:", "",
            _table(("setting", "value", "where"), e2e.settings)]
    if e2e.agent_counters:
        out += ["", "Kernel events the agent received over parts 1-2 (all containers on the "
                "host, from its last heartbeat): " + ", ".join(
                    f"{k} {v['emitted']} emitted / {v['suppressed']} suppressed / "
                    f"{v['dropped']} dropped" for k, v in sorted(e2e.agent_counters.items()))]

    # part 2
    if cfg.quarantine_trials:
        q = e2e.quarantine
        statuses: dict[str, int] = {}
        for t in q:
            statuses[t.status] = statuses.get(t.status, 0) + 1
        done = [t for t in q if t.status == "done"]
        warm = [t for t in done if t.index > 1]
        out += ["", "## 2. Alert -> quarantine in effect", "",
                f"{len(q)} drift execs in protect mode: "
                + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
                + f". The network probe connects {PROBE_RATE}/s, so a cut is known to "
                f"{1000 / PROBE_RATE:g} ms. Trial 1 is cold (the agent compiles the quarantine "
                "programs with bcc on its first quarantine); the table covers trials 2.., "
                "trial 1 is listed apart.", "",
                _table(DIST_HEADER, [_dist_row(label, [v for t in warm
                                                       if (v := t.span(a, b)) is not None])
                                     for label, a, b in QUARANTINE_SEGMENTS])]
        releases = [v for t in q if (v := t.span("release_requested", "restored")) is not None]
        slow_releases = [v for v in releases if v > 500]
        if slow_releases:
            out += ["", f"{len(slow_releases)} of {len(releases)} releases took > 0.5 s "
                    f"({', '.join(_f(v, 0) for v in slow_releases)} ms): 1 s more than the "
                    "others, TCP's initial SYN retransmission timeout. Release detaches the "
                    "programs in attach order (connect4/6, then egress/ingress), so a connect() "
                    "let through by the first detach can lose its SYN to the still attached "
                    "egress program and retry a second later."]
        first = next((t for t in q if t.index == 1), None)
        if first is not None:
            out += ["", "Trial 1 (cold): " + "; ".join(
                f"{label} {_f(first.span(a, b))} ms" for label, a, b in QUARANTINE_SEGMENTS
                if first.span(a, b) is not None)]

    # part 3
    if result.throughput:
        rows: list[list[object]] = []
        problems: list[str] = []
        for runs in result.throughput:
            r0 = runs[0]
            acked = [r.acked_rate for r in runs]
            delivered = [d for r in runs if (d := r.delivered_rate) is not None]
            cpu = [r.collector_cpu_s / r.seconds_acked for r in runs if r.seconds_acked > 0]
            dropped = [sum(r.dropped) for r in runs]
            rows.append([
                r0.agents, r0.subscribers, r0.alerts,
                "as acked" if r0.rate is None else f"{r0.rate:,.0f}", len(runs),
                _rates(acked), _rates(delivered) if delivered else "-",
                sum(r.unique_acked for r in runs), sum(r.duplicates for r in runs),
                f"{sum(dropped)} of {r0.alerts * r0.subscribers * len(runs)}"
                if r0.subscribers else "-",
                f"{100 * statistics.median(cpu):.0f}%" if cpu else "-",
                ("yes" if all(r.accounted for r in runs) else "NO")
                + (", nothing dropped" if all(r.complete for r in runs) else "")])
            for i, r in enumerate(runs, 1):  # drops are in the table; list anything else
                problems += [f"{r.agents} agent(s), {r.subscribers} subscriber(s), run {i}: {p}"
                             for p in r.problems() if not p.endswith(DROPPED)]
        out += ["", "## 3. Alerts/s through the collector", "",
                f"Synthetic agents send batches of {cfg.batch} valid drift alerts, at most "
                f"{cfg.window} batches awaiting an ack; every run has a fresh collector (default "
                "policy, nothing matches). Rates: median (min-max) over the runs; acked = "
                "alerts / time from start to the last ack; delivered = what the slowest "
                "subscriber received / time from start to its last alert.", "",
                _table(("agents", "subscribers", "alerts a run", "offered alerts/s", "runs",
                        "acked alerts/s", "delivered alerts/s (slowest subscriber)",
                        "acked (unique, all runs)", "duplicates", "dropped for subscribers",
                        "collector CPU", "every alert accounted for"), rows)]
        if problems:
            out += ["", *(f"- {p}" for p in problems)]
    return "\n".join(out) + "\n"


def raw_data(result: BenchResult) -> dict[str, Any]:
    """Every trial and configuration as JSON-ready data (for --raw)."""
    return {"config": dataclasses.asdict(result.config), "host": result.host,
            "latency": [dataclasses.asdict(t) for t in result.e2e.warmups + result.e2e.latency],
            "quarantine": [dataclasses.asdict(t) for t in result.e2e.quarantine],
            "throughput": [[dataclasses.asdict(r) for r in runs] for runs in result.throughput]}


# ---- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.collector_e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=None,
                   help="latency trials (default 200; 60 with --quick)")
    p.add_argument("--quarantine-trials", type=int, default=None,
                   help="quarantine trials (default 15; 5 with --quick; 0 skips part 2)")
    p.add_argument("--quick", action="store_true",
                   help="fewer trials and alerts: ~1.5 min instead of ~4")
    p.add_argument("--no-throughput", action="store_true", help="skip part 3")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument("--raw", help="write every trial as JSON to this file")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (the agent's BPF programs and Docker)")
    base = quick_config() if args.quick else BenchConfig()
    changes: dict[str, Any] = {
        "command": " ".join(["python -m bench.collector_e2e", *map(shlex.quote, sys.argv[1:])])}
    if args.trials is not None:
        changes["trials"] = args.trials
    if args.quarantine_trials is not None:
        changes["quarantine_trials"] = args.quarantine_trials
    if args.no_throughput:
        changes["throughput"] = ()
    try:
        config = dataclasses.replace(base, **changes)
    except ValueError as exc:
        p.error(str(exc))
    code, result = run_bench(lambda: run_benchmark(config), render_report, out=args.out,
                             cleaned_up="processes stopped, containers removed")
    if result is None:
        return code
    if args.raw:
        Path(args.raw).write_text(json.dumps(raw_data(result), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
