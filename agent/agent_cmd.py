"""`driftwarden agent`: probes -> attribution -> detection -> alerts (JSON lines).

The alert sink is an interface (driftwarden.alerts.AlertSink): `--alerts-out` writes JSON
lines; the collector stream plugs in behind the same interface later.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from driftwarden.errors import UsageError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentOptions:
    state_dir: str
    alerts_out: str = "-"
    window: float = 10.0
    learn_for: float | None = None
    mode: str = "learn"
    duration: float | None = None
    docker_host: str = "unix:///var/run/docker.sock"


def run_agent(options: AgentOptions, stop: threading.Event, *, stdout: TextIO,
              stderr: TextIO) -> int:
    from driftwarden.alerts import AlertAggregator, JsonLinesAlertSink
    from driftwarden.attribution_view import LiveAttribution
    from driftwarden.control import BaselineService, ControlServer
    from driftwarden.detect import Detector, DetectorConfig, LayersCache, LiveProfiles, LockedSink
    from driftwarden.models.items import ItemSet
    from driftwarden.models.profile import LearningPolicy, Mode, ProfileStore
    from driftwarden.pipeline import TracePipeline
    from driftwarden.probes.capture import LiveCapture
    from driftwarden.probes.loader import ProbeConfig, ProbeSet, find_cgroup2_root
    from driftwarden.procfs import LiveProcReader

    try:
        mode = Mode(options.mode)
    except ValueError:
        raise UsageError(f"--mode must be learn or monitor, got {options.mode!r}") from None
    if mode is Mode.PROTECT:
        raise UsageError("--mode protect is set per image with `driftwarden baseline mode`")
    if options.window <= 0:
        raise UsageError(f"--window must be > 0 seconds, got {options.window}")
    policy = LearningPolicy(learn_for=options.learn_for)
    state_dir = Path(options.state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        store = ProfileStore(state_dir, ItemSet)
    except OSError as exc:
        raise UsageError(f"cannot use --state-dir {state_dir}: {exc.strerror}") from exc
    with contextlib.ExitStack() as stack:
        if options.alerts_out == "-":
            out = stdout
        else:
            try:
                out = stack.enter_context(open(options.alerts_out, "a", encoding="utf-8"))
            except OSError as exc:
                raise UsageError(
                    f"cannot write --alerts-out {options.alerts_out}: {exc.strerror}") from exc
        aggregator = AlertAggregator(JsonLinesAlertSink(out))
        attribution = stack.enter_context(
            LiveAttribution(str(find_cgroup2_root()), options.docker_host))
        probes = stack.enter_context(ProbeSet(ProbeConfig()))
        source = LiveCapture(probes)
        pipeline = TracePipeline(source, proc=LiveProcReader(), attribution=attribution,
                                 sinks=[])
        detector = Detector(
            DetectorConfig(window_seconds=options.window, policy=policy, initial_mode=mode),
            store, aggregator,
            exe_of=pipeline.processes.exe_before_exec,
            layers_of=LayersCache().get,
            clock_offset_ns=source.clock_offset_ns,
            drops=lambda: sum(k["dropped"] for k in probes.counters().values()),
        )
        lock = threading.Lock()
        pipeline.sinks.append(LockedSink(detector, lock))
        stack.enter_context(ControlServer(BaselineService(LiveProfiles(detector), store),
                                          state_dir, lock))
        stderr.write(f"driftwarden: agent running; baselines in {store.dir}; Ctrl-C to stop\n")
        stderr.flush()
        try:
            pipeline.run(duration=options.duration, should_stop=stop.is_set)
        finally:
            with lock:
                detector.close()
    stderr.write(f"driftwarden: agent stopped; {dict(detector.stats)}\n")
    return 0

