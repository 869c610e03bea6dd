"""`driftwarden agent` as a real subprocess for end-to-end tests: start, wait until its probes are
attached, read the alerts it wrote (JSON lines), stop it with SIGTERM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.support.processes import FAULTHANDLER_ENV, terminate

READY_TEXT = "agent running"


class AgentProcess:
    """One agent process. ``alerts()`` re-reads the alerts file (complete lines only)."""

    def __init__(self, state_dir: Path, alerts_out: Path, extra: Sequence[str] = (),
                 *, ready_timeout: float = 60.0) -> None:
        self.state_dir = Path(state_dir)
        self.alerts_out = Path(alerts_out)
        self.extra = list(extra)
        self.ready_timeout = ready_timeout
        self.stderr_path = self.state_dir.parent / f"{self.state_dir.name}.agent.log"
        self.proc: subprocess.Popen | None = None
        self._alerts_lock = threading.Lock()
        self._alerts: list[dict[str, Any]] = []
        self._alerts_offset = 0

    def __enter__(self) -> AgentProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.state_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.stderr_path, "ab")  # noqa: SIM115 - handed to the child
        cmd = [sys.executable, "-m", "driftwarden", "agent", "--state-dir", str(self.state_dir),
               "--alerts-out", str(self.alerts_out), *self.extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd="/",
                                     env={**os.environ, **FAULTHANDLER_ENV})
        log.close()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()}")
            if READY_TEXT in self.log():
                return
            time.sleep(0.1)
        raise AssertionError(f"agent not ready after {self.ready_timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        return terminate(self.proc, timeout, "agent", self.log)

    def log(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alerts(self) -> list[dict[str, Any]]:
        """Every alert written so far, in order (a fresh list). Only the bytes added since the
        last call are read and parsed: callers poll this while the file grows."""
        with self._alerts_lock:
            try:
                with open(self.alerts_out, "rb") as fh:
                    fh.seek(self._alerts_offset)
                    data = fh.read()
            except FileNotFoundError:
                return []
            complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
            self._alerts_offset += len(complete)
            self._alerts.extend(json.loads(line) for line in complete.splitlines()
                                if line.strip())
            return list(self._alerts)

    def wait_for_alerts(self, predicate: Callable[[dict[str, Any]], bool], *,
                        timeout: float, what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            found = [a for a in self.alerts() if predicate(a)]
            if found:
                return found
            if time.monotonic() >= deadline:
                raise AssertionError(f"no alert for {what} within {timeout} s")
            time.sleep(0.1)
