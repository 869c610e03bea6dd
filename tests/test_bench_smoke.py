"""The overhead/loss benchmark end to end, in its tiny mode (one pair, small storms, a 2 s
low-rate loss test, no reference tools): every section is rendered and the numbers hang
together. It checks the benchmark's plumbing, not performance: no timing is asserted."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.timeout(240)
def test_benchmark_tiny_mode(kernel_ok, docker_ok):
    from bench.probe_overhead import STORMS, render_report, run_benchmark, tiny_config

    config = tiny_config()
    result = run_benchmark(config, log=lambda _msg: None)
    report = render_report(result)

    for heading in ("## Host", "## 1. Overhead", "## 2. Loss test", "## Raw storm times"):
        assert heading in report
    for item in ("| kernel |", "| cpu |", "| cores |", "| date |", "Command: `"):
        assert item in report

    # Section 1: one driftwarden pair set per storm, every run complete and sane.
    assert [ps.storm for ps in result.overhead] == list(config.storms)
    for ps in result.overhead:
        storm = STORMS[ps.storm]
        assert ps.role == "agent" and ps.n == config.sizes[ps.storm]
        assert len(ps.off) == len(ps.on) == config.pairs
        for run in ps.off + ps.on:
            assert run.count == ps.n and run.errors == 0 and run.elapsed_ns > 0
        assert ps.off_median > 0 and ps.on_median > 0 and ps.ratio > 0
        assert sorted(ps.order) == sorted(["off", "on"] * config.pairs)
        assert ps.sessions >= 1 and len(ps.summaries) == ps.sessions
        # every event the storm made reached the probe: emitted, suppressed (dedup) or dropped
        c = ps.counters()
        generated = ps.n * len(ps.on) * storm.events_per_iter
        assert c["emitted"] + c["suppressed"] + c["dropped"] >= generated, (ps.storm, c)
        assert f"| {ps.storm} | driftwarden | {ps.n} |" in report

    # The kernel's run statistics: one untimed ON run per storm, every storm syscall's program
    # counted (host-wide, so at least N runs), and the section rendered.
    programs = {"exec": "sys_enter_execve", "connect": "sys_exit_connect",
                "openuniq": "sys_enter_openat"}
    assert [c.storm for c in result.kernel_costs] == list(config.storms)
    for cost in result.kernel_costs:
        assert cost.tool == "driftwarden" and cost.iterations == config.sizes[cost.storm]
        runs = cost.runs[programs[cost.storm]]
        assert runs.run_cnt >= cost.iterations and runs.run_time_ns > 0, (cost.storm, cost.runs)
        assert f"| {cost.storm} | driftwarden | " in report
    assert "### Kernel ns per program run, agent vs floor" in report

    # Section 2: dedup off, so the kernel saw at least every generated event; at this low rate
    # userspace keeps up and shows exactly the storm container's events.
    (loss,) = result.loss
    assert loss.storm.count > 0 and loss.storm.errors == 0 and loss.storm.elapsed_ns > 0
    k = loss.kernel_file()
    assert k["suppressed"] == 0
    assert k["emitted"] + k["dropped"] >= loss.generated == 2 * loss.storm.count
    assert k["dropped"] == 0 and loss.userspace_lost == 0 and loss.kept_up
    assert loss.shown == loss.generated
    assert loss.cpu_busy > 0 and loss.wall_busy > 0
    assert "| userspace kept up (no drops, nothing lost) | yes |" in report

    # Section 4: the whole agent, learning, at one low rate: every new file's events reached it
    (step,) = result.capacity
    assert step.rate == 500 and step.storm.count > 0 and step.storm.errors == 0
    assert step.kernel["dropped"] == 0 and step.kept_up
    assert step.kernel["emitted"] >= 2 * step.storm.count
    assert step.cpu_busy > 0
    assert "## 4. The whole agent, nothing learned" in report
    assert "Highest step without drops: " in report
