"""Lifecycles of long-running commands: how a signal ends them."""

from __future__ import annotations

import signal
import threading


def stop_on_signals() -> threading.Event:
    """An event set by Ctrl-C or SIGTERM, so a long-running command ends cleanly (drain, summary,
    save) instead of dying mid-write."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    return stop
