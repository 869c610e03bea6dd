"""Reading a started ProbeSet's ring buffer directly, for tests of the kernel side."""

from __future__ import annotations

import time


def drain_for(probes, seconds: float) -> list[bytes]:
    """Every raw record the probes send within `seconds` (drained every 10 ms), and the rest."""
    raws, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        raws.extend(probes.drain())
        time.sleep(0.01)
    return raws + probes.drain()
