"""bench/kernel_cost.py: what ran between two snapshots of the kernel's program statistics, and
the table probe_overhead.py renders from it. The live reading is in tests/test_bench_smoke.py."""

from __future__ import annotations

import ctypes

from driftwarden.probes._libbpf import ProgInfo

from bench.kernel_cost import KernelCost, ProgramRuns, add_runs, render_costs, runs_between


def test_runs_between_keeps_only_what_ran():
    before = {"sys_enter_connect": ProgramRuns(1_000, 10), "sys_exit_socket": ProgramRuns(50, 1)}
    after = {"sys_enter_connect": ProgramRuns(31_000, 110), "sys_exit_socket": ProgramRuns(50, 1),
             "sys_exit_connect": ProgramRuns(8_000, 20)}
    assert runs_between(before, after) == {
        "sys_enter_connect": ProgramRuns(30_000, 100),
        "sys_exit_connect": ProgramRuns(8_000, 20),
    }


def test_costs_add_up_per_tracepoint_and_render():
    cost = KernelCost("connect", "driftwarden")
    add_runs(cost.runs, {"sys_exit_connect": ProgramRuns(30_000, 100)})
    add_runs(cost.runs, {"sys_exit_connect": ProgramRuns(10_000, 100),
                         "sys_enter_connect": ProgramRuns(2_000, 200)})
    cost.iterations = 200
    assert cost.runs["sys_exit_connect"] == ProgramRuns(40_000, 200)
    assert cost.runs["sys_exit_connect"].ns_per_run == 200.0
    assert cost.ns_per_iteration == 210.0
    assert [tp for tp, _ in cost.busiest()] == ["sys_exit_connect", "sys_enter_connect"]
    table = render_costs([cost, KernelCost("exec", "floor")])
    assert table.splitlines()[2] == (
        "| connect | driftwarden | 210 | "
        "sys_exit_connect 200 x 1.00; sys_enter_connect 10 x 1.00 |")
    assert table.splitlines()[3] == "| exec | floor | 0 | (none ran) |"


def test_prog_info_mirrors_the_kernel_struct_offsets():
    """struct bpf_prog_info (linux/bpf.h): name at 64, run_time_ns at 192, run_cnt at 200."""
    assert ProgInfo.name.offset == 64
    assert ProgInfo.run_time_ns.offset == 192
    assert ProgInfo.run_cnt.offset == 200
    assert ctypes.sizeof(ProgInfo) == 216
