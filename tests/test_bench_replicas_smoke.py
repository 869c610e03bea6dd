"""bench/collector_replicas.py end to end in its tiny mode: SQLite (1 replica), PostgreSQL (1
replica) and PostgreSQL (2 replicas) on a real PostgreSQL server, 8 synthetic agents and 2
subscribers: every alert acked once, stored once and delivered once to each subscriber, with a
latency for each. It checks the benchmark's plumbing, not performance: no duration is
asserted."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.timeout(400)
def test_replica_benchmark_tiny_mode(postgres):
    from bench.collector_replicas import (
        AGENTS,
        SETUPS,
        SUBSCRIBERS,
        TINY,
        render_report,
        run_benchmark,
    )

    result = run_benchmark(TINY, log=lambda _msg: None, postgres=postgres)
    kinds = [kind for kind, _, _ in TINY.specs()]
    assert [(row.setup, row.kind) for row in result.rows] == [
        (setup, kind) for setup in SETUPS for kind in kinds]
    for row in result.rows:
        r = row.result
        assert (r.agents, r.subscribers) == (AGENTS, SUBSCRIBERS)
        assert r.problems() == [] and r.complete, (row.setup, row.kind, r.problems())
        assert r.sent == r.acked == r.unique_acked == r.stored == r.alerts
        assert r.delivered == [r.alerts] * SUBSCRIBERS and r.duplicates == 0
        assert len(r.latencies_ms) == r.alerts * SUBSCRIBERS
        assert min(r.latencies_ms) > 0
    assert [row.result.batch for row in result.rows] == [100, 1] * len(SETUPS)
    report = render_report(result)
    for setup in SETUPS:
        assert f"| {setup.label} | throughput | {TINY.throughput_alerts} | 100 |" in report
        assert f"| {setup.label} | latency | 200 | 1 | 200 |" in report
    assert "NO" not in report.split("## Alerts/s")[1]
