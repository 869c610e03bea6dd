"""`driftwarden collector` as a real subprocess for end-to-end tests and benchmarks: start it,
learn its port from the line it prints, stop it (SIGTERM) or kill it (SIGKILL, an outage), and
start it again on the same port with the same store."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.processes import FAULTHANDLER_ENV, terminate

LISTENING = re.compile(r"driftwarden collector listening on 127\.0\.0\.1:(\d+) ")


class CollectorProcess:
    """One collector. The first start listens on `port` (0: any free port); later starts reuse
    the port it got, so agents configured with its address find it again after a restart."""

    def __init__(self, db: Path | str, log_path: Path, extra: Sequence[str] = (), *,
                 port: int = 0, ready_timeout: float = 30.0) -> None:
        # the SQLite file (--db), or a postgresql:// URL (--store)
        self.db: Path | str = db if str(db).startswith("postgresql://") else Path(db)
        self.log_path = Path(log_path)
        self.extra = list(extra)
        self.port = port
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> CollectorProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "driftwarden", "collector",
                 "--listen", f"127.0.0.1:{self.port}",
                 *(["--store", self.db] if isinstance(self.db, str) else ["--db", str(self.db)]),
                 *self.extra],
                stdout=log, stderr=subprocess.STDOUT, cwd="/",
                env={**os.environ, **FAULTHANDLER_ENV})
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log()[offset:])
            if match:
                self.port = int(match.group(1))
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"collector did not start:\n{self.log()}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (a clean shutdown); see processes.terminate for one that hangs."""
        return terminate(self.proc, timeout, "collector", self.log)

    def kill(self) -> None:
        """SIGKILL: the collector vanishes without closing its streams (an outage, a crash)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
