"""The agent's detection with the baseline in the kernel, in the test process: real probes with
the map `known`, the pipeline, and a Detector with a KnownFilter, wired as `driftwarden agent`
wires them, plus a recorder of the feature windows the detector handled (which the agent
process does not show). For tests/test_known_live.py and tests/test_known_field.py."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class KnownAgent:
    """What `known_agent` yields: the live trace (records, probes), the detector, its known
    filter, the alert sink, the detector's lock, and the windows it handled, in order."""

    live: Any
    detector: Any
    known: Any
    sink: Any
    lock: threading.Lock
    handled: list = field(default_factory=list)

    def alerts_of(self, container_id: str, kind: str | None = None,
                  code: str | None = None) -> list:
        """The alerts of one container (of a kind, with a reason code) raised so far."""
        with self.lock:
            return [a for a in self.sink.alerts if a.container.get("id") == container_id
                    and (kind is None or a.kind.value == kind)
                    and (code is None or any(r.code == code for r in a.reasons))]

    def windows_of(self, container_id: str) -> list:
        with self.lock:
            return [w for w in self.handled if w.container_id == container_id]

    def entries(self) -> dict[tuple[int, int, int], tuple[int, int]]:
        """The kernel's map as it is now: (cgroup id, kind, key) -> (hits, last hit ns)."""
        return self.live.probes.known_hits()


@contextlib.contextmanager
def known_agent(state_dir: Path, *, learn_for: float | None = None, window: float = 1.0,
                dedup_interval_ns: int = 1_000_000_000, known_entries: int = 1024,
                gone_check_seconds: float = 5.0) -> Iterator[KnownAgent]:
    """The detection pipeline on the real kernel, its baselines in `state_dir` (loaded from
    there as images show up: what an agent restarted on a node does); `learn_for` ends the
    learning of a new image after that many seconds. Leaving saves the baselines."""
    from driftwarden.agent.alerts import ListAlertSink
    from driftwarden.agent.detect import Detector, DetectorConfig, LayersCache
    from driftwarden.agent.known import KnownFilter, cgroup_alive
    from driftwarden.agent.runtimes.docker import DockerGraphDriver
    from driftwarden.models.items import ItemSet
    from driftwarden.models.profile import LearningPolicy, ProfileStore
    from driftwarden.probes.loader import ProbeConfig, find_cgroup2_root

    from tests.conftest import start_live_trace

    sink, lock = ListAlertSink(), threading.Lock()
    with contextlib.closing(DockerGraphDriver("unix:///var/run/docker.sock")) as graph_driver, \
            start_live_trace(ProbeConfig(known_entries=known_entries,
                                         dedup_interval_ns=dedup_interval_ns)) as live:
        probes = live.probes
        known = KnownFilter(probes.known_install, probes.known_hits, probes.known_remove,
                            capacity=known_entries, poll_seconds=0.5,
                            alive=cgroup_alive(find_cgroup2_root()),
                            gone_check_seconds=gone_check_seconds)
        detector = Detector(
            DetectorConfig(window_seconds=window, policy=LearningPolicy(learn_for=learn_for)),
            ProfileStore(state_dir, ItemSet), sink,
            layers_of=LayersCache(graph_driver_of=graph_driver).get,
            clock_offset_ns=live.pipeline.source.clock_offset_ns, known=known)
        agent = KnownAgent(live, detector, known, sink, lock)
        handle = detector._handle_windows

        def recording(windows):
            agent.handled.extend(windows)
            handle(windows)

        detector._handle_windows = recording
        gate = _Gate(detector, lock)
        live.pipeline.sinks.append(gate)
        try:
            yield agent
        finally:
            # as the agent stops: while the probes are there (close reads the last hits)
            with lock:
                gate.closed = True
                detector.close()


class _Gate:
    """The detector as the pipeline's sink, on the lock (as detect.LockedSink), until closed:
    the pipeline's thread stops after the detector does."""

    def __init__(self, detector, lock: threading.Lock) -> None:
        self.detector, self.lock, self.closed = detector, lock, False

    def write(self, record) -> None:
        with self.lock:
            if not self.closed:
                self.detector.write(record)

    def flush(self) -> None:
        with self.lock:
            if not self.closed:
                self.detector.flush()
