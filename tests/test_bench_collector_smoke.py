"""The collector benchmark end to end, in its tiny mode (6 latency trials, 2 quarantine trials,
two small throughput rows): every trial is accounted for, every field the report is built from
is there and causally ordered, every synthetic alert is acked and delivered exactly once. It
checks the benchmark's plumbing, not performance: no duration is asserted."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
def test_collector_benchmark_tiny_mode(kernel_ok, docker_ok):
    from bench.collector_e2e import (
        DRIFT_DIR,
        raw_data,
        render_report,
        run_benchmark,
        tiny_config,
    )

    config = tiny_config()
    result = run_benchmark(config, log=lambda _msg: None)
    e2e = result.e2e

    # Part 1: one trial per exec, each its own drift finding, with every timestamp in order.
    assert [t.index for t in e2e.latency] == list(range(1, config.trials + 1))
    assert [t.path for t in e2e.latency] == [f"{DRIFT_DIR}/a{i}/true"
                                             for i in range(1, config.trials + 1)]
    assert [w.path for w in e2e.warmups] == [f"{DRIFT_DIR}/a0/true", f"{DRIFT_DIR}/q0/true"]
    for t in e2e.warmups + e2e.latency:
        assert (t.status, t.reason, t.count) == ("received", "exec-added-binary", 1), t
        assert len(t.alert_id) == 24
        assert None not in (t.trigger, t.exec_ts, t.emitted, t.stored, t.received), t
        assert t.trigger < t.exec_ts < t.emitted < t.received, t
        assert t.exec_ts < t.stored < t.received, t
    ids = [t.alert_id for t in e2e.warmups + e2e.latency]
    assert len(set(ids)) == len(ids)

    # Part 2: each drift in protect mode was quarantined by the policy, cut the network, and
    # was released by the bench.
    assert [q.index for q in e2e.quarantine] == list(range(1, config.quarantine_trials + 1))
    for q in e2e.quarantine:
        assert (q.status, q.action_status, q.release_status) == (
            "done", "ACTION_STATUS_DONE", "ACTION_STATUS_DONE"), q
        assert q.path == f"{DRIFT_DIR}/q{q.index}/true" and q.action_id
        assert None not in (q.exec_ts, q.alert, q.stored, q.action_created, q.dispatched,
                            q.cut, q.action_finished, q.result, q.restored), q
        assert q.trigger < q.exec_ts < q.stored < q.action_created < q.action_finished, q
        assert q.exec_ts < q.cut < q.result and q.dispatched < q.result, q
        assert q.result < q.release_requested < q.restored, q
    assert len({q.alert_id for q in e2e.quarantine}) == config.quarantine_trials

    # Part 3: every alert acked once, stored once, delivered once to every subscriber.
    assert [[(r.agents, r.subscribers, r.alerts, r.rate) for r in runs]
            for runs in result.throughput] == [[(s.agents, s.subscribers, s.alerts, s.rate)]
                                               * config.throughput_runs
                                               for s in config.throughput]
    for r in (r for runs in result.throughput for r in runs):
        assert r.problems() == [] and r.complete and r.accounted, r
        assert r.sent == r.acked == r.unique_acked == r.stored == r.alerts
        assert r.delivered == [r.alerts] * r.subscribers
        assert r.dropped == [0] * r.subscribers and r.duplicates == 0
        assert r.seconds_acked > 0 and r.acked_rate > 0

    report = render_report(result)
    for heading in ("## Host", "## 1. Exec -> subscriber latency",
                    "## 2. Alert -> quarantine in effect", "## 3. Alerts/s through the collector"):
        assert heading in report
    assert (f"{config.trials} drift execs, {config.trials} alerts received, 0 missing"
            in report)
    assert f"{config.quarantine_trials} drift execs in protect mode: " \
           f"{config.quarantine_trials} done." in report
    for label in ("exec -> subscriber (total)", "kernel -> agent emitted",
                  "agent emitted -> collector stored", "collector stored -> subscriber",
                  "exec -> network cut (last accept)", "exec -> action result at subscriber",
                  "ring buffer drain interval when empty", "agent spool fsync",
                  "interpreter switch interval (agent and collector)"):
        assert f"| {label}" in report
    assert report.count("| yes, nothing dropped |") == len(config.throughput)

    raw = json.loads(json.dumps(raw_data(result)))
    assert len(raw["latency"]) == config.trials + 2
    assert len(raw["quarantine"]) == config.quarantine_trials
    assert [len(runs) for runs in raw["throughput"]] == [config.throughput_runs] * len(
        config.throughput)
