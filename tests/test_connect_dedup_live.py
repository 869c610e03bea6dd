"""The kernel's dedup of connects, for real: a repeat is the same program connecting to the same
place with the same result. Another program's connect there within the dedup interval is its
own event: before, the key held only the destination, so a tool connecting where the
application already connects was suppressed and never judged."""

from __future__ import annotations

import pytest

from tests.support.containers import run_container
from tests.support.ring import drain_for

pytestmark = pytest.mark.integration

PORT = 47999  # nobody listens: every connect is refused, the same result each time


def test_a_connect_repeats_only_its_own_programs(kernel_ok, storm_image):
    from driftwarden.probes.decode import Decoder
    from driftwarden.probes.events import ConnectEvent
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    # as `trace` runs it: no kernel baseline filter, so the program is tracked for dedup alone
    config = ProbeConfig(kinds=frozenset({"exec", "connect"}))
    script = (f"dwstorm connect 3 127.0.0.1:{PORT}; nc -w1 127.0.0.1 {PORT} </dev/null; "
              f"nc -w1 127.0.0.1 {PORT} </dev/null; dwstorm connect 2 127.0.0.1:{PORT}; true")
    with ProbeSet(config) as probes, run_container(storm_image, ["sleep", "3600"]) as c:
        probes.drain()
        code, out = c.exec(["/bin/sh", "-c", script])
        assert code == 0, out
        raws = drain_for(probes, 0.5)
    connects = [e for e in Decoder(config.limits).decode_many(raws)
                if isinstance(e, ConnectEvent) and e.header.cgroup_id == c.cgroup_id
                and e.port == PORT]
    # within one second: dwstorm's first connect (its 2 repeats and the later 2 suppressed),
    # nc's first (the second nc runs the same program: a repeat)
    assert [(e.header.comm, e.address, e.result.value) for e in connects] == [
        ("dwstorm", "127.0.0.1", "refused"), ("nc", "127.0.0.1", "refused")]
