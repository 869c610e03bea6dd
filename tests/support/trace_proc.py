"""`driftwarden trace --json` as a child process for live tests."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import IO


@contextlib.contextmanager
def tracing(args: Sequence[str], out: IO[str]) -> Iterator[subprocess.Popen]:
    """`driftwarden trace --json ARGS` writing its lines to `out` until the block ends (SIGINT;
    it must then exit 0). `out` is a file: a pipe holds 64 KiB, and a trace that cannot write
    stops taking events. The block starts once the trace attached its probes."""
    proc = subprocess.Popen([sys.executable, "-m", "driftwarden", "trace", "--json", *args],
                            stdout=out, stderr=subprocess.PIPE, text=True, cwd="/")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if "tracing" in line:
                break
            if not line and proc.poll() is not None:
                raise AssertionError(f"trace exited early: {proc.stderr.read()}")
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
