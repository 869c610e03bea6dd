"""Host conditions for field tests: CPU load outside containers, and a pid counter that wraps.

- ``cpu_load(n, nice)``: n busy loops (host processes, outside any container) for the block.
- ``lowered_pid_max(value)``: /proc/sys/kernel/pid_max lowered for the block and restored in a
  finally, so that forks soon reuse the pids of processes that exited not long ago.
- ``PidWrapper(rate)``: forks on the host for the block and counts the pid counter's wraps
  (ns_last_pid going down); ``wait(n)`` returns once it wrapped n times.

Every helper takes the /proc root as a parameter (default the real one) and stops or restores
what it started or changed, whatever happens inside the block.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

PROC = Path("/proc")
PID_MAX_MIN = 301  # RESERVED_PIDS + 1: the kernel refuses lower values


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait(10)


@contextmanager
def cpu_load(processes: int, nice: int = 0) -> Iterator[list[int]]:
    """`processes` busy loops on the host (nice `nice`) for the block; yields their pids."""
    if processes < 1 or not 0 <= nice <= 19:
        raise ValueError(f"cpu_load: need >= 1 processes and nice 0..19, got {processes}, {nice}")
    code = f"import os; os.nice({nice})\nwhile True: pass"
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(processes):
            procs.append(subprocess.Popen([sys.executable, "-c", code],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield [p.pid for p in procs]
    finally:
        _stop_all(procs)


def pids_in_use(proc_root: Path = PROC) -> set[int]:
    """Every process and thread id on the host (threads take pids too)."""
    used: set[int] = set()
    for entry in proc_root.iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                used.update(int(t.name) for t in (entry / "task").iterdir())
    return used


@contextmanager
def lowered_pid_max(value: int, proc_root: Path = PROC, *, min_free: int = 2000) -> Iterator[int]:
    """kernel.pid_max = `value` for the block (restored afterwards); yields the value set. The
    value is raised (by 500s, up to the current pid_max) until at least `min_free` pids below
    it are free, so that everything else on the host can still fork meanwhile."""
    path = proc_root / "sys/kernel/pid_max"
    old = int(path.read_text())
    if not PID_MAX_MIN <= value <= old:
        raise ValueError(f"pid_max {value}: must be between {PID_MAX_MIN} and the current {old}")
    used = pids_in_use(proc_root)
    while value < old and value - PID_MAX_MIN - sum(1 for p in used if p < value) < min_free:
        value = min(old, value + 500)
    path.write_text(f"{value}\n")
    try:
        yield value
    finally:
        path.write_text(f"{old}\n")


def last_pid(proc_root: Path = PROC) -> int:
    return int((proc_root / "sys/kernel/ns_last_pid").read_text())


class PidWrapper:
    """Forks on the host at about `rate` forks a second (a dash loop of subshells) and counts
    how often the pid counter (ns_last_pid) wrapped, until the block ends. Lower pid_max first
    (lowered_pid_max) so that it wraps in seconds; a modest rate leaves the containers' own
    forks a good share of the pids, so their processes reuse each other's pids."""

    def __init__(self, rate: int = 1000, proc_root: Path = PROC) -> None:
        if rate < 10:
            raise ValueError(f"PidWrapper: rate {rate} forks/s is too low to wrap anything")
        self.rate = rate
        self.proc_root = proc_root
        self.wraps = 0
        self.pids = 0  # pids handed out on the host meanwhile (ours mostly)
        self.started = 0.0
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="pid-wraps", daemon=True)
        self._forker: subprocess.Popen | None = None

    def __enter__(self) -> PidWrapper:
        batch = max(1, self.rate // 10)  # `( : )`: a subshell, a fork and no exec
        loop = (f"while :; do i=0; while [ $i -lt {batch} ]; do ( : ); i=$((i + 1)); done; "
                "sleep 0.1; done")
        self.started = time.monotonic()
        self._forker = subprocess.Popen(["dash", "-c", loop], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, cwd="/",
                                        env={"PATH": os.defpath})
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._watcher.join(5)
        if self._forker is not None:
            _stop_all([self._forker])

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started

    def _watch(self) -> None:
        pid_max = int((self.proc_root / "sys/kernel/pid_max").read_text())
        previous = last_pid(self.proc_root)
        while not self._stop.wait(0.01):
            now = last_pid(self.proc_root)
            if now < previous:  # went up to pid_max, then on from the bottom
                self.wraps += 1
                self.pids += pid_max - previous + now - PID_MAX_MIN + 1
            else:
                self.pids += now - previous
            previous = now

    def wait(self, wraps: int, timeout: float = 120.0) -> None:
        """Until the counter wrapped `wraps` times since the block began."""
        deadline = time.monotonic() + timeout
        while self.wraps < wraps:
            if time.monotonic() > deadline or self._forker.poll() is not None:
                raise AssertionError(f"the pid counter wrapped {self.wraps} of {wraps} times "
                                     f"in {self.seconds:.0f} s ({self.pids} pids handed out)")
            time.sleep(0.05)
