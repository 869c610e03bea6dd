"""Stopping the driftwarden processes tests start (agent, collector): SIGTERM, and when that is
ignored, SIGABRT first, so that faulthandler (PYTHONFAULTHANDLER=1 in their environment) writes
every thread's stack into their log before they are killed."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable

# for the environment of a started process: a hang can then be diagnosed from its log
FAULTHANDLER_ENV = {"PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}


def terminate(proc: subprocess.Popen | None, timeout: float, what: str,
              log: Callable[[], str]) -> int | None:
    """Stop `proc` with SIGTERM and return its exit code (None if never started). A process
    that ignores SIGTERM for `timeout` s is made to dump its threads, killed, and reported
    with an AssertionError carrying its log."""
    if proc is None or proc.poll() is not None:
        return None if proc is None else proc.returncode
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        raise AssertionError(f"{what} ignored SIGTERM for {timeout} s (its threads at the end "
                             f"of the log):\n{log()}") from None
