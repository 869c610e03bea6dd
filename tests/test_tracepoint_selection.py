"""Which tracepoints the probes compile and attach on a kernel, chosen from its tracefs.

Fake tracefs trees in tmp_path stand for kernels this host is not: Debian 12's 6.1 (no
fchmodat2), arm64 (no legacy syscalls without *at), one that lacks a required tracepoint. The
real kernel is tests/test_probes_live.py's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from driftwarden.core.errors import HostSupportError, ProbeLoadError
from driftwarden.probes.loader import (
    OPTIONAL_SYSCALLS,
    ProbeConfig,
    ProbePlan,
    bpf_text,
    find_tracefs,
    plan_probes,
    require_tracefs,
)

from tests.support.probe_source import compiled_tracepoints, source_tracepoints

EVERY = ProbeConfig(open_result=True)
ALL_TRACEPOINTS = tuple(tp for tps in EVERY.tracepoints().values() for tp in tps)
LEGACY = frozenset({"open", "creat", "rename", "unlink", "rmdir", "chmod", "link", "symlink",
                    "mkdir", "mknod"})


def _syscall(tracepoint: str) -> str:
    """'syscalls:sys_exit_openat' -> 'openat'; '' for a sched tracepoint."""
    category, _, event = tracepoint.partition(":")
    return event.split("_", 2)[2] if category == "syscalls" else ""


def fake_tracefs(root: Path, *, lacking: tuple[str, ...] = ()) -> Path:
    """A tracefs with every tracepoint the probes can use but those named (syscall names, or
    "category:event" tracepoints), plus one the probes do not use."""
    lacking_tps = {tp for tp in ALL_TRACEPOINTS if tp in lacking or _syscall(tp) in lacking}
    for tp in (*ALL_TRACEPOINTS, "syscalls:sys_enter_read"):
        if tp not in lacking_tps:
            category, _, event = tp.partition(":")
            (root / "events" / category / event).mkdir(parents=True)
    return root


def _names(tracepoints) -> list[str]:
    return [tp.partition(":")[2] for tp in tracepoints]


def _have_flags(plan: ProbePlan) -> dict[str, str]:
    return {flag[2:].partition("=")[0]: flag.partition("=")[2] for flag in plan.cflags()
            if flag.startswith("-DDW_HAVE_")}


def test_fake_tracefs_helper_leaves_out_what_it_is_told(tmp_path):
    root = fake_tracefs(tmp_path, lacking=("fchmodat2", "sched:sched_process_fork"))
    assert not (root / "events/syscalls/sys_enter_fchmodat2").exists()
    assert not (root / "events/syscalls/sys_exit_fchmodat2").exists()
    assert not (root / "events/sched/sched_process_fork").exists()
    assert (root / "events/syscalls/sys_enter_fchmodat").is_dir()
    assert (root / "events/sched/sched_process_exit").is_dir()


# ------------------------------------------------------------------ the table and the source

def test_table_names_every_tracepoint_of_the_source_once():
    assert len(ALL_TRACEPOINTS) == len(set(ALL_TRACEPOINTS)) == 64
    assert set(ALL_TRACEPOINTS) == set(source_tracepoints())


def test_optional_syscalls_are_traced_syscalls_with_a_reason():
    traced = {_syscall(tp) for tp in ALL_TRACEPOINTS} - {""}
    assert set(OPTIONAL_SYSCALLS) <= traced
    assert {name for name, why in OPTIONAL_SYSCALLS.items() if "not on arm64" in why} == LEGACY
    assert OPTIONAL_SYSCALLS["fchmodat2"] == "Linux 6.6+"
    assert OPTIONAL_SYSCALLS["openat2"] == "Linux 5.6+"
    # old enough for every supported kernel (5.8+), and on every architecture: required
    for name in ("execve", "execveat", "openat", "renameat2", "unlinkat", "connect", "socket"):
        assert name not in OPTIONAL_SYSCALLS


@pytest.mark.parametrize("absent", [
    frozenset(),
    frozenset({"fchmodat2"}),
    LEGACY,
    frozenset(OPTIONAL_SYSCALLS),
], ids=["every-syscall", "linux-6.1", "arm64", "none-optional"])
@pytest.mark.parametrize("config", [
    ProbeConfig(),
    EVERY,
    ProbeConfig(kinds=frozenset({"exec"})),
    ProbeConfig(kinds=frozenset({"write"}), open_result=True),
], ids=["all-kinds", "open-result", "exec", "write-open-result"])
def test_source_compiles_exactly_what_the_plan_attaches(gcc_ok, config, absent):
    """The C #if structure (DW_WITH_*, DW_OPEN_RESULT, DW_HAVE_*) leaves exactly the plan's
    tracepoints: a syscall the kernel lacks is not compiled, so bcc cannot attach it."""
    plan = ProbePlan(config, absent)
    assert sorted(compiled_tracepoints(plan.cflags())) == sorted(plan.tracepoint_names())


# ------------------------------------------------------------------ kernels

def test_kernel_with_every_syscall(tmp_path):
    plan = plan_probes(ProbeConfig(), fake_tracefs(tmp_path))
    assert plan.absent == frozenset()
    assert plan.describe() == "60 tracepoints (bookkeeping 10, exec 4, connect 4, write 42)"
    assert plan.absent_tracepoints() == () and plan.describe_absent() == ""
    assert set(_have_flags(plan).values()) == {"1"}
    assert len(_have_flags(plan)) == len(OPTIONAL_SYSCALLS) == 13


def test_linux_6_1_lacks_fchmodat2(tmp_path):
    plan = plan_probes(ProbeConfig(), fake_tracefs(tmp_path, lacking=("fchmodat2",)))
    assert plan.absent == frozenset({"fchmodat2"})
    assert plan.describe() == "58 tracepoints (bookkeeping 10, exec 4, connect 4, write 40)"
    assert plan.absent_tracepoints() == ("syscalls:sys_enter_fchmodat2",
                                         "syscalls:sys_exit_fchmodat2")
    assert plan.describe_absent() == "sys_enter_fchmodat2, sys_exit_fchmodat2 (Linux 6.6+)"
    flags = _have_flags(plan)
    assert flags.pop("DW_HAVE_FCHMODAT2") == "0"
    assert set(flags.values()) == {"1"}
    names = plan.tracepoint_names()
    assert "syscalls:sys_enter_fchmodat" in names and "syscalls:sys_exit_fchmodat" in names
    assert set(names) == set(ProbePlan(ProbeConfig()).tracepoint_names()) - {
        "syscalls:sys_enter_fchmodat2", "syscalls:sys_exit_fchmodat2"}


def test_arm64_lacks_the_legacy_syscalls(tmp_path):
    root = fake_tracefs(tmp_path, lacking=tuple(LEGACY))
    plan = plan_probes(ProbeConfig(), root)
    assert plan.absent == LEGACY
    assert plan.describe() == "42 tracepoints (bookkeeping 10, exec 4, connect 4, write 24)"
    assert plan.describe_absent() == (
        "sys_enter_open, sys_enter_creat, sys_enter_rename, sys_exit_rename, sys_enter_unlink, "
        "sys_exit_unlink, sys_enter_rmdir, sys_exit_rmdir, sys_enter_chmod, sys_exit_chmod, "
        "sys_enter_link, sys_exit_link, sys_enter_symlink, sys_exit_symlink, sys_enter_mkdir, "
        "sys_exit_mkdir, sys_enter_mknod, sys_exit_mknod (legacy, not on arm64)")
    assert _names(plan.tracepoints()["write"]) == [
        "sys_enter_openat", "sys_enter_openat2",
        "sys_enter_truncate", "sys_exit_truncate", "sys_enter_renameat", "sys_exit_renameat",
        "sys_enter_renameat2", "sys_exit_renameat2", "sys_enter_unlinkat", "sys_exit_unlinkat",
        "sys_enter_fchmod", "sys_exit_fchmod", "sys_enter_fchmodat", "sys_exit_fchmodat",
        "sys_enter_fchmodat2", "sys_exit_fchmodat2", "sys_enter_linkat", "sys_exit_linkat",
        "sys_enter_symlinkat", "sys_exit_symlinkat", "sys_enter_mkdirat", "sys_exit_mkdirat",
        "sys_enter_mknodat", "sys_exit_mknodat"]
    # --open-result adds the exits of the opens this kernel has: openat and openat2
    with_results = plan_probes(EVERY, root).tracepoints()["write"]
    assert len(with_results) == 26
    assert _names(with_results[-2:]) == ["sys_exit_openat", "sys_exit_openat2"]
    flags = _have_flags(plan)
    assert {name for name, value in flags.items() if value == "0"} == {
        f"DW_HAVE_{name.upper()}" for name in LEGACY}


def test_kernel_lacking_several_reasons_groups_them(tmp_path):
    root = fake_tracefs(tmp_path, lacking=("openat2", "fchmodat2", "renameat"))
    plan = plan_probes(ProbeConfig(), root)
    assert plan.describe_absent() == (
        "sys_enter_openat2 (Linux 5.6+); "
        "sys_enter_renameat, sys_exit_renameat (superseded by renameat2, not on riscv64); "
        "sys_enter_fchmodat2, sys_exit_fchmodat2 (Linux 6.6+)")


def test_an_optional_syscall_with_one_side_only_is_left_out(tmp_path):
    root = fake_tracefs(tmp_path, lacking=("syscalls:sys_exit_openat2",))
    plan = plan_probes(ProbeConfig(), root)
    assert plan.absent == frozenset({"openat2"})
    assert "syscalls:sys_enter_openat2" not in plan.tracepoint_names()


def test_unselected_kinds_list_nothing_absent(tmp_path):
    plan = plan_probes(ProbeConfig(kinds=frozenset({"exec"})),
                       fake_tracefs(tmp_path, lacking=tuple(LEGACY)))
    assert plan.describe() == "14 tracepoints (bookkeeping 10, exec 4)"
    assert plan.absent_tracepoints() == ()
    assert plan.describe_absent() == ""


def test_missing_required_tracepoint_is_a_clear_error(tmp_path):
    root = fake_tracefs(tmp_path, lacking=("syscalls:sys_enter_openat", "connect"))
    with pytest.raises(ProbeLoadError) as caught:
        plan_probes(ProbeConfig(), root)
    assert str(caught.value) == (
        f"this kernel lacks tracepoints the probes need (none under {root}/events): "
        "syscalls:sys_enter_connect, syscalls:sys_exit_connect (for connect); "
        "syscalls:sys_enter_openat (for write); use Linux 5.8+ with CONFIG_FTRACE_SYSCALLS, "
        "or leave those kinds out with --kinds")
    # a kind that does not use them loads
    assert plan_probes(ProbeConfig(kinds=frozenset({"exec"})), root).describe() == (
        "14 tracepoints (bookkeeping 10, exec 4)")


def test_missing_bookkeeping_fails_every_kind(tmp_path):
    root = fake_tracefs(tmp_path, lacking=("sched:sched_process_fork",))
    with pytest.raises(ProbeLoadError) as caught:
        plan_probes(ProbeConfig(kinds=frozenset({"exec"})), root)
    assert str(caught.value) == (
        f"this kernel lacks tracepoints the probes need (none under {root}/events): "
        "sched:sched_process_fork (for bookkeeping); use Linux 5.8+ with "
        "CONFIG_FTRACE_SYSCALLS")


def test_plan_refuses_a_required_syscall_as_absent():
    with pytest.raises(ValueError, match=r"not optional syscalls: \['openat'\]"):
        ProbePlan(ProbeConfig(), frozenset({"openat"}))


def test_print_bpf_text_shows_what_this_kernel_leaves_out(tmp_path):
    root = fake_tracefs(tmp_path, lacking=("fchmodat2",))
    text = bpf_text(ProbeConfig(kinds=frozenset({"write"})), host_cgroup_id=1, agent_tgid=7,
                    tracefs=root)
    comment = text.split("*/", 1)[0].splitlines()
    assert comment[0] == ("/* driftwarden BPF program, as compiled; it attaches 50 tracepoints "
                          "(bookkeeping 10, write 40):")
    assert comment[-2] == (" * not on this kernel, so not compiled: sys_enter_fchmodat2, "
                           "sys_exit_fchmodat2 (Linux 6.6+)")
    assert "#define DW_HAVE_FCHMODAT2 0\n" in text and "#define DW_HAVE_OPEN 1\n" in text


# ------------------------------------------------------------------ finding tracefs

def _mountinfo(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text("".join(f"{line}\n" for line in lines))
    return path


def test_tracefs_found_from_mountinfo_wherever_it_is_mounted(tmp_path):
    where = tmp_path / "my tracing"
    fake_tracefs(where)
    escaped = str(where).replace(" ", "\\040")
    mountinfo = _mountinfo(
        tmp_path,
        "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw",
        f"45 23 0:13 / {escaped} rw,relatime shared:7 - tracefs nodev rw",
    )
    assert find_tracefs(mountinfo, usual=(str(tmp_path / "nowhere"),)) == where


def test_tracefs_under_a_debugfs_mount(tmp_path):
    debug = tmp_path / "debug"
    fake_tracefs(debug / "tracing")
    mountinfo = _mountinfo(tmp_path, f"30 22 0:7 / {debug} rw,relatime - debugfs debugfs rw")
    assert find_tracefs(mountinfo, usual=()) == debug / "tracing"


def test_tracefs_falls_back_to_the_usual_places(tmp_path):
    usual = tmp_path / "kernel" / "tracing"
    fake_tracefs(usual)
    assert find_tracefs(tmp_path / "no-mountinfo",
                        usual=(str(tmp_path / "absent"), str(usual))) == usual
    # listed but empty (not really mounted there): the usual place still answers
    listed = _mountinfo(tmp_path, f"45 23 0:13 / {tmp_path / 'gone'} rw - tracefs nodev rw")
    assert find_tracefs(listed, usual=(str(usual),)) == usual


def test_tracefs_not_mounted(tmp_path):
    assert find_tracefs(tmp_path / "no-mountinfo", usual=(str(tmp_path / "absent"),)) is None
    with pytest.raises(HostSupportError, match=r"^no tracepoints under .*absent: tracefs is not "
                                               r"mounted; run `mount -t tracefs nodev "
                                               r"/sys/kernel/tracing`$"):
        require_tracefs(tmp_path / "absent")


def test_tracefs_without_syscall_tracepoints(tmp_path):
    (tmp_path / "events" / "sched").mkdir(parents=True)
    with pytest.raises(HostSupportError, match=r"CONFIG_FTRACE_SYSCALLS"):
        require_tracefs(tmp_path)
    assert require_tracefs(fake_tracefs(tmp_path / "ok")) == tmp_path / "ok"
