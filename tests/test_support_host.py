"""tests/support/host.py on fake hosts (hybrid, pure v2, systemd driver), then on this one."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pytest
from driftwarden.core.errors import HostSupportError
from driftwarden.probes.loader import find_cgroup2_root

from tests.support import host
from tests.support.host import (
    ProgramTry,
    cgroup2_mount_points,
    cgroup2_root,
    docker_cgroup_path,
    in_root_cgroup,
    kernel_config,
    parse_kernel_config,
    process_cgroup_dir,
    systemd_slice_path,
    v2_cgroup_of,
)

CID = "0123456789abcdef" * 4

# /proc/self/mountinfo of a hybrid host (v1 controllers, v2 at .../unified), abridged
HYBRID_MOUNTINFO = """\
23 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
# a pure v2 host booted by systemd: optional fields ("shared:4") before the separator
PURE_MOUNTINFO = """\
22 28 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 22 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""
V1_ONLY_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
"""
# /proc/PID/cgroup of a container's init: hybrid (v1 lines too) and pure v2 with systemd
HYBRID_PROC_CGROUP = f"12:pids:/docker/{CID}\n4:memory:/docker/{CID}\n0::/docker/{CID}\n"
SYSTEMD_PROC_CGROUP = f"0::/system.slice/docker-{CID}.scope\n"


# ---- cgroup v2 mount ---------------------------------------------------------------------------

@pytest.mark.parametrize(("mountinfo", "expected"), [
    (HYBRID_MOUNTINFO, [Path("/sys/fs/cgroup/unified")]),
    (PURE_MOUNTINFO, [Path("/sys/fs/cgroup")]),
    (V1_ONLY_MOUNTINFO, []),
    ("", []),
    # a bind mount of a sub-tree is not the hierarchy's root; escaped names are unescaped
    ("50 26 0:23 /docker/x /mnt/box rw - cgroup2 cgroup2 rw\n"
     "51 22 0:23 / /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw\n", [Path("/mnt/my cgroup")]),
])
def test_cgroup2_mount_points(mountinfo, expected):
    assert cgroup2_mount_points(mountinfo) == expected


def fake_host(tmp: Path, layout: str) -> tuple[Path, Path, str]:
    """A fake /proc (self/mountinfo, 4242/cgroup) and cgroup v2 tree with one container in it:
    (proc root, cgroup v2 root, Docker's path of the container)."""
    proc, sys_cgroup = tmp / "proc", tmp / "sys" / "fs" / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "4242").mkdir()
    if layout == "hybrid, cgroupfs driver":
        root, mountinfo, proc_cgroup = sys_cgroup / "unified", HYBRID_MOUNTINFO, HYBRID_PROC_CGROUP
        docker_path = docker_cgroup_path(CID, "cgroupfs")
    elif layout == "pure v2, cgroupfs driver":
        root, mountinfo, proc_cgroup = sys_cgroup, PURE_MOUNTINFO, f"0::/docker/{CID}\n"
        docker_path = docker_cgroup_path(CID, "cgroupfs")
    else:  # pure v2, systemd driver
        root, mountinfo, proc_cgroup = sys_cgroup, PURE_MOUNTINFO, SYSTEMD_PROC_CGROUP
        docker_path = docker_cgroup_path(CID, "systemd")
    (proc / "self" / "mountinfo").write_text(mountinfo.replace(" /sys", f" {tmp}/sys"))
    (proc / "4242" / "cgroup").write_text(proc_cgroup)
    (root / docker_path.lstrip("/")).mkdir(parents=True)
    return proc, root, docker_path


LAYOUTS = ["hybrid, cgroupfs driver", "pure v2, cgroupfs driver", "pure v2, systemd driver"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_process_cgroup_dir_is_where_docker_put_the_container(tmp_path, layout):
    proc, root, docker_path = fake_host(tmp_path, layout)
    assert cgroup2_root(proc) == root
    found = process_cgroup_dir(4242, proc_root=proc)
    assert found == root / docker_path.lstrip("/")
    assert process_cgroup_dir(4242, proc_root=proc, cgroup_root=root) == found


@pytest.mark.parametrize("layout", LAYOUTS)
def test_process_cgroup_dir_none_when_gone(tmp_path, layout):
    proc, root, docker_path = fake_host(tmp_path, layout)
    assert process_cgroup_dir(4343, proc_root=proc) is None  # no such process
    (root / docker_path.lstrip("/")).rmdir()
    assert process_cgroup_dir(4242, proc_root=proc) is None  # its cgroup was removed
    (proc / "4242" / "cgroup").write_text("4:memory:/docker/x\n")
    assert process_cgroup_dir(4242, proc_root=proc, cgroup_root=root) is None  # no v2 line


def test_cgroup2_root_without_v2_says_how_to_mount_it(tmp_path):
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "mountinfo").write_text(V1_ONLY_MOUNTINFO)
    with pytest.raises(FileNotFoundError, match=r"no cgroup2 mount in .*; mount one with "
                                                r"`mount -t cgroup2 none /sys/fs/cgroup/unified`"):
        cgroup2_root(tmp_path)


@pytest.mark.parametrize(("text", "expected"), [
    (HYBRID_PROC_CGROUP, f"/docker/{CID}"),
    (SYSTEMD_PROC_CGROUP, f"/system.slice/docker-{CID}.scope"),
    ("0::/\n", "/"),
    ("12:pids:/docker/x\n1:name=systemd:/\n", None),
    ("", None),
])
def test_v2_cgroup_of(text, expected):
    assert v2_cgroup_of(text) == expected


def test_in_root_cgroup_moves_the_shell_then_execs(tmp_path):
    (tmp_path / "cgroup.procs").write_text("")
    argv = in_root_cgroup(["sh", "-c", 'echo "$$ $0"', "arg 0"], tmp_path)
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=10)
    pid, arg0 = done.stdout.split(" ", 1)
    assert (tmp_path / "cgroup.procs").read_text() == f"{pid}\n"  # the same process, exec'd
    assert arg0 == "arg 0\n"


# ---- Docker's cgroup layout --------------------------------------------------------------------

@pytest.mark.parametrize(("name", "expected"), [
    ("system.slice", "/system.slice"),
    ("kubepods-burstable-pod1.slice",
     "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice"),
    ("-.slice", ""),
])
def test_systemd_slice_path(name, expected):
    assert systemd_slice_path(name) == expected


@pytest.mark.parametrize("bad", ["system", "a--b.slice", ".slice", "a/b.slice", "-a.slice"])
def test_systemd_slice_path_refuses_non_slices(bad):
    with pytest.raises(ValueError, match="not a systemd slice name"):
        systemd_slice_path(bad)


@pytest.mark.parametrize(("driver", "parent", "expected"), [
    ("cgroupfs", "", f"/docker/{CID}"),
    ("cgroupfs", "/ci/jobs/", f"/ci/jobs/{CID}"),
    ("cgroupfs", "ci", f"/ci/{CID}"),
    ("cgroupfs", "/", f"/{CID}"),
    ("systemd", "", f"/system.slice/docker-{CID}.scope"),
    ("systemd", "ci-jobs.slice", f"/ci.slice/ci-jobs.slice/docker-{CID}.scope"),
])
def test_docker_cgroup_path(driver, parent, expected):
    assert docker_cgroup_path(CID, driver, parent) == expected


def test_docker_cgroup_path_unknown_driver():
    with pytest.raises(ValueError, match="unknown Docker cgroup driver 'none'"):
        docker_cgroup_path(CID, "none")


# ---- kernel ------------------------------------------------------------------------------------

CONFIG = """\
#
# Automatically generated file; DO NOT EDIT.
CONFIG_BPF_LSM=y
# CONFIG_KPROBES is not set
CONFIG_LSM="landlock,lockdown,bpf"
CONFIG_NR_CPUS=64
CONFIG_BTRFS_FS=m
"""


def test_parse_kernel_config():
    assert parse_kernel_config(CONFIG) == {
        "CONFIG_BPF_LSM": "y", "CONFIG_KPROBES": "n", "CONFIG_LSM": "landlock,lockdown,bpf",
        "CONFIG_NR_CPUS": "64", "CONFIG_BTRFS_FS": "m"}


def test_kernel_config_prefers_proc_then_boot(tmp_path):
    proc, boot = tmp_path / "proc", tmp_path / "boot"
    proc.mkdir()
    boot.mkdir()
    assert kernel_config("6.1.0-9-amd64", proc_root=proc, boot=boot) is None
    (boot / "config-6.1.0-9-amd64").write_text("CONFIG_KPROBES=y\n")
    (boot / "config-5.10.0-1-amd64").write_text("# CONFIG_KPROBES is not set\n")
    assert kernel_config("6.1.0-9-amd64", proc_root=proc, boot=boot) == {"CONFIG_KPROBES": "y"}
    (proc / "config.gz").write_bytes(gzip.compress(CONFIG.encode()))
    assert kernel_config("6.1.0-9-amd64", proc_root=proc, boot=boot)["CONFIG_KPROBES"] == "n"


@pytest.mark.parametrize(("error", "loaded", "attached"), [
    (None, True, True),
    ("Failed to attach BPF program b'dw_try' to kprobe b'__x64_sys_getpid', it's not traceable "
     "(either non-existing, inlined, or marked as \"notrace\")", True, False),
    ("Failed to attach LSM", True, False),
    ("Need super-user privileges to run", False, False),
    ("Failed to load BPF program b'kfunc__do_sys_openat2': Invalid argument", False, False),
    ("Failed to compile BPF module <text>", False, False),
])
def test_program_try_says_how_far_it_got(error, loaded, attached):
    tried = ProgramTry("x", error)
    assert (tried.loaded, tried.attached) == (loaded, attached)


def test_try_program_types_reads_the_child_answer(monkeypatch):
    def fake_run(argv, **kw):
        assert kw["input"] == '["kprobe", "lsm"]'
        out = 'bcc noise\nDWTRY {"kprobe": null, "lsm": "Failed to attach LSM"}\n'
        return subprocess.CompletedProcess(argv, 0, out, "")

    monkeypatch.setattr(host.subprocess, "run", fake_run)
    assert host.try_program_types(("kprobe", "lsm")) == {
        "kprobe": ProgramTry("kprobe", None), "lsm": ProgramTry("lsm", "Failed to attach LSM")}


def test_try_program_types_child_without_answer_is_an_error(monkeypatch):
    monkeypatch.setattr(host.subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(
        argv, -11, "", "Segmentation fault\n"))
    with pytest.raises(RuntimeError, match="exited -11 without an answer: Segmentation fault"):
        host.try_program_types(("lsm",))


# ---- this host ---------------------------------------------------------------------------------

def test_this_hosts_cgroup2_mount_is_where_the_probes_look():
    """mountinfo and the loader's find_cgroup2_root ask the host two ways and agree."""
    try:
        expected = find_cgroup2_root()
    except HostSupportError:
        with pytest.raises(FileNotFoundError):
            cgroup2_root()
        return
    assert cgroup2_root() == expected
    own = process_cgroup_dir(os.getpid())
    assert own is not None and own.is_relative_to(expected)
