"""Tests for `driftwarden doctor`: fixture trees for each check, then the real host."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
from driftwarden.agent import doctor
from driftwarden.agent.doctor import Check, DoctorEnv
from driftwarden.probes.loader import ProbeConfig, find_tracefs, plan_probes

RELEASE = "6.9.9-test"
ALL_CAPS = "000001ffffffffff"
# every tracepoint the probes can use, on a kernel with every syscall
TPS = tuple(tp for tps in ProbeConfig(open_result=True).tracepoints().values() for tp in tps)
LEGACY = ("open", "creat", "rename", "unlink", "rmdir", "chmod", "link", "symlink", "mkdir",
          "mknod")


def without(*syscalls: str) -> tuple[str, ...]:
    """TPS less both tracepoints of each syscall named."""
    gone = {f"syscalls:sys_{side}_{name}" for name in syscalls for side in ("enter", "exit")}
    return tuple(tp for tp in TPS if tp not in gone)


def make_host(
    tmp: Path,
    *,
    capeff: str | None = ALL_CAPS,
    tracefs: str | None = "tracing",
    syscalls: bool = True,
    tracepoints: tuple[str, ...] = TPS,
    headers: str | None = "matching",
    cgroup: str | None = "hybrid",
    btf: bool = True,
) -> DoctorEnv:
    """A fake /proc, /sys and /lib/modules under tmp; each knob removes one thing."""
    proc, sys_, mods = tmp / "proc", tmp / "sys", tmp / "modules"
    (proc / "self").mkdir(parents=True)
    status = "Name:\tpython\nUid:\t0\t0\t0\t0\n"
    if capeff is not None:
        status += f"CapInh:\t0000000000000000\nCapEff:\t{capeff}\n"
    (proc / "self" / "status").write_text(status)
    if tracefs is not None:
        root = sys_ / "kernel" / ("tracing" if tracefs == "tracing" else "debug/tracing")
        (root / "events").mkdir(parents=True)
        if syscalls:
            (root / "events" / "syscalls").mkdir()
        for tp in tracepoints:
            cat, _, ev = tp.partition(":")
            (root / "events" / cat / ev).mkdir(parents=True, exist_ok=True)
    kdir = mods / RELEASE
    kdir.mkdir(parents=True)
    if headers == "matching":
        src = tmp / "usr" / f"linux-headers-{RELEASE}"
        (src / "include").mkdir(parents=True)
        (kdir / "build").symlink_to(src)
    elif headers == "other":
        src = tmp / "usr" / "linux-headers-6.1.0-56-amd64"
        (src / "include").mkdir(parents=True)
        (kdir / "build").symlink_to(src)
    elif headers == "dangling":
        (kdir / "build").symlink_to(tmp / "usr" / "gone")
    elif headers == "empty":
        (kdir / "build").mkdir()
    if cgroup == "pure":
        (sys_ / "fs" / "cgroup").mkdir(parents=True)
        (sys_ / "fs" / "cgroup" / "cgroup.controllers").write_text("cpu memory pids\n")
    elif cgroup == "hybrid":
        (sys_ / "fs" / "cgroup" / "unified").mkdir(parents=True)
        (sys_ / "fs" / "cgroup" / "unified" / "cgroup.controllers").write_text("")
        (sys_ / "fs" / "cgroup" / "memory").mkdir()
    elif cgroup == "v1":
        (sys_ / "fs" / "cgroup" / "memory").mkdir(parents=True)
    if btf:
        (sys_ / "kernel" / "btf").mkdir(parents=True)
        (sys_ / "kernel" / "btf" / "vmlinux").write_bytes(b"\x9f\xeb")
    return DoctorEnv(proc_root=str(proc), sys_root=str(sys_), modules_root=str(mods),
                     docker_socket=str(tmp / "docker.sock"), run_root=str(tmp / "run"),
                     kernel_release=RELEASE)


def caps(*bits: int) -> str:
    return f"{sum(1 << b for b in bits):016x}"


# ------------------------------------------------------------------ privileges

def test_privileges_root_ok(tmp_path):
    c = doctor.check_privileges(make_host(tmp_path))
    assert (c.name, c.required, c.status) == ("privileges", True, "ok")
    assert "CAP_SYS_ADMIN" in c.detail


def test_privileges_not_root_fails_with_fix(tmp_path):
    c = doctor.check_privileges(make_host(tmp_path, capeff="0000000000000000"))
    assert c.status == "fail"
    assert "lacks CAP_SYS_ADMIN" in c.detail
    assert "run as root" in c.fix and "CAP_BPF+CAP_PERFMON" in c.fix


def test_privileges_bpf_perfmon_net_admin_ok(tmp_path):
    env = make_host(tmp_path, capeff=caps(doctor.CAP_BPF, doctor.CAP_PERFMON,
                                          doctor.CAP_NET_ADMIN))
    assert doctor.check_privileges(env).status == "ok"


def test_privileges_without_net_admin_warns(tmp_path):
    env = make_host(tmp_path, capeff=caps(doctor.CAP_BPF, doctor.CAP_PERFMON))
    c = doctor.check_privileges(env)
    assert c.status == "warn"
    assert "quarantine" in c.detail and "CAP_NET_ADMIN" in c.fix


def test_privileges_bpf_alone_fails(tmp_path):
    assert doctor.check_privileges(make_host(tmp_path, capeff=caps(doctor.CAP_BPF))).status \
        == "fail"


def test_privileges_no_capeff_line_fails(tmp_path):
    c = doctor.check_privileges(make_host(tmp_path, capeff=None))
    assert c.status == "fail" and "no CapEff" in c.detail


def test_privileges_unreadable_status_fails(tmp_path):
    env = make_host(tmp_path)
    Path(env.proc_root, "self", "status").unlink()
    c = doctor.check_privileges(env)
    assert c.status == "fail" and "cannot read" in c.detail and c.fix


# ------------------------------------------------------------------ bpf syscall

def test_bpf_syscall_ok_with_fake(tmp_path):
    seen = []

    def fake(cmd, attr):
        seen.append((cmd, len(attr)))
        return 3, 0

    c = doctor.check_bpf_syscall(make_host(tmp_path), bpf_call=fake)
    assert c.status == "ok" and c.required
    assert [cmd for cmd, _ in seen] == [0, 5]  # BPF_MAP_CREATE, then BPF_PROG_LOAD


def test_bpf_syscall_eperm_fails(tmp_path):
    c = doctor.check_bpf_syscall(make_host(tmp_path), bpf_call=lambda cmd, a: (-1, errno.EPERM))
    assert c.status == "fail"
    assert c.detail == "map create failed: EPERM"
    assert "root" in c.fix


def test_bpf_syscall_enosys_points_at_kernel_config(tmp_path):
    c = doctor.check_bpf_syscall(make_host(tmp_path), bpf_call=lambda cmd, a: (-1, errno.ENOSYS))
    assert c.status == "fail" and "CONFIG_BPF_SYSCALL" in c.fix


def test_bpf_syscall_prog_load_failure(tmp_path):
    def fake(cmd, attr):
        return (3, 0) if cmd == 0 else (-1, errno.EINVAL)

    c = doctor.check_bpf_syscall(make_host(tmp_path), bpf_call=fake)
    assert c.status == "fail" and c.detail == "tracepoint program load failed: EINVAL"


# ------------------------------------------------------------------ btf

def test_btf_present_ok(tmp_path):
    c = doctor.check_btf(make_host(tmp_path))
    assert (c.required, c.status) == (False, "ok")


def test_btf_absent_is_info_not_fail(tmp_path):
    c = doctor.check_btf(make_host(tmp_path, btf=False))
    assert (c.required, c.status) == (False, "info")
    assert "CO-RE" in c.detail and "CONFIG_DEBUG_INFO_BTF" in c.fix


# ------------------------------------------------------------------ tracefs

def test_tracefs_ok(tmp_path):
    c = doctor.check_tracefs(make_host(tmp_path))
    assert (c.required, c.status) == (True, "ok")


def test_tracefs_via_debugfs_ok(tmp_path):
    c = doctor.check_tracefs(make_host(tmp_path, tracefs="debug"))
    assert c.status == "ok" and "debug/tracing" in c.detail


def test_tracefs_missing_fails_with_mount_fix(tmp_path):
    env = make_host(tmp_path, tracefs=None)
    c = doctor.check_tracefs(env)
    assert c.status == "fail" and "not mounted" in c.detail
    assert c.fix == f"mount -t tracefs nodev {env.sys_root}/kernel/tracing"


def test_tracefs_without_syscall_events_fails(tmp_path):
    c = doctor.check_tracefs(make_host(tmp_path, syscalls=False, tracepoints=()))
    assert c.status == "fail" and "CONFIG_FTRACE_SYSCALLS" in c.fix


def test_tracefs_permission_denied(tmp_path, monkeypatch):
    def denied(env):
        raise PermissionError(errno.EACCES, "Permission denied", "/sys/kernel/tracing/events")

    monkeypatch.setattr(doctor, "_tracefs_root", denied)
    env = make_host(tmp_path)
    for c in (doctor.check_tracefs(env), doctor.check_tracepoints(env)):
        assert c.status == "fail" and c.detail == "permission denied: /sys/kernel/tracing/events"
        assert "run as root" in c.fix
    assert doctor.kprobes_attachable(env) is False


# ------------------------------------------------------------------ kernel headers

def test_headers_matching_ok(tmp_path):
    c = doctor.check_kernel_headers(make_host(tmp_path))
    assert (c.required, c.status) == (True, "ok")
    assert "another kernel" not in c.detail


def test_headers_other_kernel_ok_but_said(tmp_path):
    c = doctor.check_kernel_headers(make_host(tmp_path, headers="other"))
    assert c.status == "ok"
    assert "linux-headers-6.1.0-56-amd64" in c.detail and "another kernel" in c.detail


def test_headers_missing_fails_with_setup_fix(tmp_path):
    c = doctor.check_kernel_headers(make_host(tmp_path, headers=None))
    assert c.status == "fail" and c.detail.endswith("missing")
    assert "make setup" in c.fix and f"linux-headers-{RELEASE}" in c.fix


def test_headers_dangling_link_fails(tmp_path):
    c = doctor.check_kernel_headers(make_host(tmp_path, headers="dangling"))
    assert c.status == "fail" and "dangling" in c.detail and "make setup" in c.fix


def test_headers_without_include_fails(tmp_path):
    c = doctor.check_kernel_headers(make_host(tmp_path, headers="empty"))
    assert c.status == "fail" and "include/" in c.detail


# ------------------------------------------------------------------ bcc

def test_bcc_missing_fails(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bcc", None)  # makes `import bcc` raise ImportError
    c = doctor.check_bcc(make_host(tmp_path))
    assert (c.required, c.status) == (True, "fail")
    assert c.detail.startswith("import bcc failed: ") and "python3-bpfcc" in c.fix


def test_bcc_present_ok(tmp_path, monkeypatch):
    fake = types.ModuleType("bcc")
    fake.__version__ = "9.9.9"
    fake.__file__ = "/somewhere/bcc/__init__.py"
    monkeypatch.setitem(sys.modules, "bcc", fake)
    c = doctor.check_bcc(make_host(tmp_path))
    assert c.status == "ok" and c.detail == "bcc 9.9.9 (/somewhere/bcc)"


# ------------------------------------------------------------------ tracepoints

EVERY_KIND_ON_A_FULL_KERNEL = ("all kinds attach 60 tracepoints (bookkeeping 10, exec 4, "
                               "connect 4, write 42), --open-result 4 more")


def test_tracepoints_all_present(tmp_path):
    c = doctor.check_tracepoints(make_host(tmp_path))
    assert (c.required, c.status) == (True, "ok")
    assert c.detail == EVERY_KIND_ON_A_FULL_KERNEL


def test_tracepoints_linux_6_1_without_fchmodat2_is_ok_and_says_so(tmp_path):
    c = doctor.check_tracepoints(make_host(tmp_path, tracepoints=without("fchmodat2")))
    assert (c.required, c.status) == (True, "ok")
    assert c.detail == ("all kinds attach 58 tracepoints (bookkeeping 10, exec 4, connect 4, "
                        "write 40), --open-result 4 more; not on this kernel: "
                        "sys_enter_fchmodat2, sys_exit_fchmodat2 (Linux 6.6+)")


def test_tracepoints_arm64_without_legacy_syscalls_is_ok_and_says_so(tmp_path):
    c = doctor.check_tracepoints(make_host(tmp_path, tracepoints=without(*LEGACY)))
    assert c.status == "ok"
    assert c.detail.startswith("all kinds attach 42 tracepoints (bookkeeping 10, exec 4, "
                               "connect 4, write 24), --open-result 2 more; not on this "
                               "kernel: sys_enter_open, sys_enter_creat, sys_enter_rename, ")
    assert c.detail.endswith(", sys_exit_mknod (legacy, not on arm64)")


def test_tracepoints_missing_required_named(tmp_path):
    lacking = {"syscalls:sys_enter_connect", "sched:sched_process_fork"}
    env = make_host(tmp_path, tracepoints=tuple(tp for tp in TPS if tp not in lacking))
    c = doctor.check_tracepoints(env)
    assert (c.required, c.status) == (True, "fail")
    assert c.detail == ("2 required missing: sched:sched_process_fork (for bookkeeping); "
                        "syscalls:sys_enter_connect (for connect)")
    assert c.fix == "use Linux 5.8+ with CONFIG_FTRACE_SYSCALLS (syscall tracepoints)"


def test_tracepoints_without_tracefs_fails_with_mount_fix(tmp_path):
    c = doctor.check_tracepoints(make_host(tmp_path, tracefs=None))
    assert c.status == "fail" and c.fix.startswith("mount -t tracefs")


def test_tracefs_found_where_mountinfo_says(tmp_path):
    env = make_host(tmp_path, tracefs=None)
    elsewhere = tmp_path / "elsewhere"
    for tp in TPS:
        category, _, event = tp.partition(":")
        (elsewhere / "events" / category / event).mkdir(parents=True)
    Path(env.proc_root, "self", "mountinfo").write_text(
        f"45 23 0:13 / {elsewhere} rw,relatime - tracefs nodev rw\n")
    assert doctor.check_tracefs(env).detail == f"{elsewhere}/events/syscalls present"
    assert doctor.check_tracepoints(env).detail == EVERY_KIND_ON_A_FULL_KERNEL


# ------------------------------------------------------------------ cgroup v2

def test_cgroup_pure_v2(tmp_path):
    env = make_host(tmp_path, cgroup="pure")
    c = doctor.check_cgroup_v2(env)
    assert c.status == "ok" and c.detail == f"pure v2 at {env.sys_root}/fs/cgroup"


def test_cgroup_hybrid(tmp_path):
    env = make_host(tmp_path, cgroup="hybrid")
    c = doctor.check_cgroup_v2(env)
    assert c.status == "ok" and c.detail == f"hybrid: v2 at {env.sys_root}/fs/cgroup/unified"


@pytest.mark.parametrize("layout", ["v1", None])
def test_cgroup_no_v2_fails(tmp_path, layout):
    c = doctor.check_cgroup_v2(make_host(tmp_path, cgroup=layout))
    assert (c.required, c.status) == (True, "fail")
    assert "mount -t cgroup2" in c.fix


# ------------------------------------------------------------------ docker socket

def _serve_once(path: Path, reply: bytes) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)

    def run():
        with srv:
            conn, _ = srv.accept()
            with conn:
                conn.recv(4096)
                conn.sendall(reply)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_docker_socket_missing_is_info(tmp_path):
    env = make_host(tmp_path)
    c = doctor.check_docker(env)
    assert (c.required, c.status) == (False, "info")
    assert c.detail == f"no socket at {env.docker_socket}"
    assert "dockerd" in c.fix


def test_docker_socket_answers(tmp_path):
    env = make_host(tmp_path)
    t = _serve_once(Path(env.docker_socket),
                    b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Length: 2\r\n\r\nOK")
    c = doctor.check_docker(env)
    t.join(2)
    assert c.status == "ok" and c.detail == f"{env.docker_socket} answers /_ping (API 1.41)"


def test_docker_socket_bad_status_is_info(tmp_path):
    env = make_host(tmp_path)
    t = _serve_once(Path(env.docker_socket), b"HTTP/1.1 500 Internal Server Error\r\n\r\n")
    c = doctor.check_docker(env)
    t.join(2)
    assert c.status == "info" and "500" in c.detail


def test_docker_socket_refused_is_info(tmp_path):
    env = make_host(tmp_path)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(env.docker_socket)
    dead.close()  # the socket file stays; nobody listens
    c = doctor.check_docker(env)
    assert c.status == "info" and "ECONNREFUSED" in c.detail


# ------------------------------------------------------------------ container runtimes

CID_A, CID_B, CID_C, CID_D = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
POD = "8f2c1b3e_5a6d_4e7f_9a0b_1c2d3e4f5a6b"


def with_containers(tmp: Path, layout: str, *relatives: str) -> DoctorEnv:
    env = make_host(tmp, cgroup=layout)
    root = Path(env.sys_root, "fs", "cgroup", *(("unified",) if layout == "hybrid" else ()))
    for relative in relatives:
        (root / relative).mkdir(parents=True)
    return env


def test_container_runtimes_none_running(tmp_path):
    c = doctor.check_container_runtimes(with_containers(tmp_path, "pure", "init.scope"))
    assert (c.required, c.status, c.detail) == (False, "ok", "no containers running")


def test_container_runtimes_all_answering_is_ok(tmp_path):
    env = with_containers(tmp_path, "hybrid", f"docker/{CID_A}",
                          f"system.slice/docker-{CID_B}.scope/init.scope",
                          f"kubepods/besteffort/pod{POD.replace('_', '-')}/{CID_C}")
    c = doctor.check_container_runtimes(env, frozenset({"docker", "cri-o"}))
    # a kubelet cgroupfs path names no CRI runtime (cgroups.py says containerd): CRI-O serves it
    assert (c.status, c.detail) == ("ok", "3 running: 1 under containerd, 2 under docker; "
                                    "their runtimes answer")


def test_container_runtimes_warns_about_containers_no_runtime_describes(tmp_path):
    """A containerd (CRI) node whose containerd does not answer: no detection for those."""
    env = with_containers(
        tmp_path, "pure", f"docker/{CID_A}",
        f"kubepods.slice/kubepods-pod{POD}.slice/cri-containerd-{CID_B}.scope",
        f"kubepods.slice/kubepods-pod{POD}.slice/cri-containerd-{CID_C}.scope",
        f"kubepods.slice/kubepods-pod{POD}.slice/cri-containerd-{CID_C}.scope/sub",
        f"machine.slice/libpod-{CID_D}.scope", f"machine.slice/libpod-conmon-{CID_D}.scope")
    socket_path = Path(env.run_root, "containerd", "containerd.sock")
    socket_path.parent.mkdir(parents=True)
    socket_path.touch()
    c = doctor.check_container_runtimes(env, frozenset({"docker"}))
    assert (c.required, c.status) == (False, "warn")
    assert c.detail == (f"2 under containerd (socket {socket_path}), 1 under podman: no "
                        "endpoint of these runtimes answers, so these containers get no names, "
                        "images or detection; 1 under docker are watched")
    assert "driftwarden_agent_containers_without_metadata_total" in c.fix
    assert "fix: give each runtime's socket with --runtime-endpoint unix:///path" in \
        doctor.format_table([c])


def test_container_runtimes_one_runtime_nobody_answers_for(tmp_path):
    env = with_containers(tmp_path, "pure", f"kubepods/besteffort/pod{POD.replace('_', '-')}/"
                          f"{CID_B}")
    c = doctor.check_container_runtimes(env)
    assert (c.status, c.detail) == ("warn", "1 under containerd: no endpoint of this runtime "
                                    "answers, so these containers get no names, images or "
                                    "detection")


def test_runtime_endpoints_found_under_the_run_root(tmp_path):
    env = make_host(tmp_path)
    assert doctor.runtime_endpoints(env) == []
    for relative in ("crio/crio.sock", "podman/podman.sock"):
        (Path(env.run_root) / relative).parent.mkdir(parents=True)
        (Path(env.run_root) / relative).touch()
    assert [(e.url, e.api, e.runtime, given) for e, given in doctor.runtime_endpoints(env)] == [
        (f"unix://{env.run_root}/crio/crio.sock", "cri", "cri-o", False),
        (f"unix://{env.run_root}/podman/podman.sock", "docker", "podman", False)]
    given = dataclasses.replace(env, runtime_endpoints=("unix:///x/containerd.sock",))
    assert [(e.url, given) for e, given in doctor.runtime_endpoints(given)] == [
        ("unix:///x/containerd.sock", True)]


def test_runtime_endpoint_rows_probed_warn_given_fail(tmp_path):
    env = make_host(tmp_path)
    dead = Path(env.run_root, "crio", "crio.sock")
    dead.parent.mkdir(parents=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(dead))
    sock.close()
    [probed] = doctor.check_runtime_endpoints(env)
    assert (probed.name, probed.required, probed.status) == ("runtime cri-o", False, "warn")
    assert probed.detail.startswith(f"cri-o unreachable at unix://{dead}: ")
    assert probed.fix.startswith("start cri-o, or give the socket it listens on with "
                                 "--runtime-endpoint unix:///path")
    [given] = doctor.check_runtime_endpoints(
        dataclasses.replace(env, runtime_endpoints=(f"unix://{dead}",)))
    assert (given.required, given.status, given.detail) == (True, "fail", probed.detail)
    [bad] = doctor.check_runtime_endpoints(
        dataclasses.replace(env, runtime_endpoints=("tcp://127.0.0.1:1",)))
    assert (bad.name, bad.required, bad.status) == ("runtime endpoints", True, "fail")
    assert bad.detail.startswith("--runtime-endpoint 'tcp://127.0.0.1:1': give a unix socket")


# ------------------------------------------------------------------ program types

@pytest.mark.parametrize(("error", "reason"), [
    ("Need super-user privileges to run", "EPERM"),
    ("Failed to load BPF program b'x': Invalid argument", "EINVAL"),
    ("Failed to load BPF program b'x': Argument list too long", "E2BIG"),
    ("Failed to compile BPF module <text>", "compile failed"),
    ("", "unknown error"),
])
def test_load_reason(error, reason):
    assert doctor.load_reason(error) == reason


def _runner(results):
    def run(keys, timeout):
        assert list(keys) == [p.key for p in doctor.PROGRAM_TYPES]
        return results
    return run


def test_program_types_report(tmp_path):
    results = {"raw_tracepoint": None, "cgroup_sock_addr": None, "cgroup_skb": None,
               "kprobe": None, "fentry": "Need super-user privileges to run",
               "lsm": "Need super-user privileges to run"}
    checks = {c.name: c for c in doctor.program_type_checks(make_host(tmp_path),
                                                            runner=_runner(results))}
    assert all(not c.required for c in checks.values())
    assert (checks["prog raw tracepoint"].status, checks["prog raw tracepoint"].detail) \
        == ("ok", "loads")
    assert checks["prog cgroup sock_addr"].status == "ok"
    assert checks["prog fentry (KFUNC_PROBE)"].detail == "not supported here: EPERM"
    assert checks["prog LSM (LSM_PROBE)"].status == "info"
    # Loads, but nothing to attach it to: no kprobe PMU and no kprobe_events in the fixture.
    kp = checks["prog kprobe"]
    assert kp.status == "info" and kp.detail.startswith("not supported here: loads, but")


def test_kprobe_attachable_with_pmu(tmp_path):
    env = make_host(tmp_path)
    (Path(env.sys_root) / "bus/event_source/devices/kprobe").mkdir(parents=True)
    results = dict.fromkeys((p.key for p in doctor.PROGRAM_TYPES), None)
    checks = {c.name: c for c in doctor.program_type_checks(env, runner=_runner(results))}
    assert checks["prog kprobe"].status == "ok"


def test_kprobe_attachable_with_kprobe_events(tmp_path):
    env = make_host(tmp_path)
    (Path(env.sys_root) / "kernel/tracing/kprobe_events").write_text("")
    assert doctor.kprobes_attachable(env)
    assert not doctor.kprobes_attachable(make_host(tmp_path / "other"))


def test_program_types_child_failure(tmp_path):
    checks = doctor.program_type_checks(
        make_host(tmp_path), runner=lambda keys, t: {k: "load test timed out after 60 s"
                                                     for k in keys})
    assert {c.status for c in checks} == {"info"}
    assert checks[0].detail == "not supported here: load test timed out after 60 s"


def test_load_child_output_parsing(monkeypatch):
    def fake_run(argv, **kw):
        assert argv[0] == sys.executable and json.loads(kw["input"]) == ["kprobe"]
        out = 'noise\nDWDOCTOR {"kprobe": null}\n'
        return subprocess.CompletedProcess(argv, 0, out, "bpf: chatter\n")

    monkeypatch.setattr(doctor.subprocess, "run", fake_run)
    assert doctor._run_load_child(["kprobe"], 5) == {"kprobe": None}


def test_load_child_crash_reported(monkeypatch):
    monkeypatch.setattr(doctor.subprocess, "run", lambda argv, **kw: subprocess.CompletedProcess(
        argv, -11, "", "Traceback...\nSegmentation fault\n"))
    assert doctor._run_load_child(["lsm"], 5) == {
        "lsm": "load test exited -11: Segmentation fault"}


def test_load_child_timeout_reported(monkeypatch):
    def slow(argv, **kw):
        raise subprocess.TimeoutExpired(argv, kw["timeout"])

    monkeypatch.setattr(doctor.subprocess, "run", slow)
    assert doctor._run_load_child(["lsm"], 7) == {"lsm": "load test timed out after 7 s"}


# ------------------------------------------------------------------ driver, exit code, table

def test_run_checks_on_fixture_tree(tmp_path):
    env = make_host(tmp_path, tracefs=None, headers=None, cgroup="v1", capeff="0")
    checks = doctor.run_checks(env, probe_program_types=False)
    by = {c.name: c for c in checks}
    assert [c.name for c in checks] == ["privileges", "bpf syscall", "btf", "tracefs",
                                        "kernel headers", "bcc", "tracepoints", "cgroup v2",
                                        "docker socket", "container runtimes", "prog types"]
    for name in ("privileges", "tracefs", "kernel headers", "tracepoints", "cgroup v2"):
        assert by[name].required and by[name].status == "fail", name
        assert by[name].fix, name
    assert by["docker socket"].status == "info" and not by["docker socket"].required
    assert (by["container runtimes"].required, by["container runtimes"].status,
            by["container runtimes"].detail) == (False, "info",
                                                 "cannot check: no cgroup v2 hierarchy")
    assert by["prog types"].detail == "skipped (--no-load-tests)"
    assert doctor.exit_code(checks) == 1
    assert all(c.status in doctor.STATUSES for c in checks)


def test_run_checks_skips_load_tests_without_privilege(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "program_type_checks",
                        lambda env: pytest.fail("load tests must not run unprivileged"))
    checks = doctor.run_checks(make_host(tmp_path, capeff="0"))
    assert checks[-1].name == "prog types"
    assert checks[-1].detail == "not tested: needs root or CAP_BPF+CAP_PERFMON"


def test_crashing_check_becomes_a_row():
    def boom():
        raise RuntimeError("bad")

    c = doctor._guard("x", True, boom)
    assert (c.status, c.detail) == ("fail", "check crashed: RuntimeError: bad")
    assert doctor._guard("y", False, boom).status == "info"


def _c(name, required, status, detail="d", fix="do it"):
    return Check(name, required, status, detail, fix)


@pytest.mark.parametrize(("checks", "code"), [
    ([], 0),
    ([_c("a", True, "ok"), _c("b", False, "info")], 0),
    ([_c("a", True, "warn")], 0),
    ([_c("a", False, "fail")], 0),  # optional checks never decide the exit code
    ([_c("a", True, "ok"), _c("b", True, "fail")], 1),
])
def test_exit_code(checks, code):
    assert doctor.exit_code(checks) == code


def test_format_table_exact():
    checks = [
        _c("privileges", True, "ok", "euid 0", "run as root"),
        _c("tracefs", True, "fail", "not mounted", "mount -t tracefs nodev /sys/kernel/tracing"),
        _c("caps", True, "warn", "no net admin", "grant CAP_NET_ADMIN"),
        _c("prog kprobe", False, "info", "not supported here: EPERM", "optional"),
    ]
    assert doctor.format_table(checks) == (
        "CHECK        STATUS  DETAIL\n"
        "privileges   ok      euid 0\n"
        "tracefs      fail    not mounted\n"
        "                     fix: mount -t tracefs nodev /sys/kernel/tracing\n"
        "caps         warn    no net admin\n"
        "                     fix: grant CAP_NET_ADMIN\n"
        "prog kprobe  info    not supported here: EPERM\n"
        "\n"
        "1 required check(s) failed: tracefs"
    )


def test_format_table_all_ok_header():
    out = doctor.format_table([_c("bcc", True, "ok")]).splitlines()
    assert out[0] == "CHECK  STATUS  DETAIL"
    assert "fix:" not in "\n".join(out)
    assert out[-1] == "all required checks passed"


def test_json_roundtrip():
    checks = [_c("a", True, "fail", "x", "y")]
    assert json.loads(doctor.checks_to_json(checks)) == [
        {"name": "a", "required": True, "status": "fail", "detail": "x", "fix": "y"}]


def _parser():
    parser = argparse.ArgumentParser(prog="driftwarden")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor.add_parser(sub)
    return parser


@pytest.mark.parametrize("as_json", [False, True])
def test_cli_flags_and_output(monkeypatch, capsys, as_json):
    seen = {}

    def fake_run_checks(env, *, probe_program_types=True):
        seen["probe"] = probe_program_types
        return [_c("tracefs", True, "fail", "not mounted", "mount it")]

    monkeypatch.setattr(doctor, "run_checks", fake_run_checks)
    argv = ["doctor", "--no-load-tests"] + (["--json"] if as_json else [])
    args = _parser().parse_args(argv)
    assert args.func is doctor.run_command
    assert args.func(args) == 1
    assert seen["probe"] is False
    out = capsys.readouterr().out
    if as_json:
        assert json.loads(out)[0]["fix"] == "mount it"
    else:
        assert out.startswith("CHECK    STATUS  DETAIL\n") and "fix: mount it" in out


def test_cli_defaults():
    args = _parser().parse_args(["doctor"])
    assert (args.json, args.no_load_tests) == (False, False)


# ------------------------------------------------------------------ the real host

def _host_prerequisites() -> None:
    """Skip without root/bcc/tracefs, or fail when CI demands integration tests run."""
    problems = []
    if os.geteuid() != 0:
        problems.append("not root")
    try:
        import bcc  # noqa: F401
    except Exception as exc:
        problems.append(f"bcc not importable ({exc})")
    try:
        if not Path("/sys/kernel/tracing/events/syscalls").is_dir() and \
                not Path("/sys/kernel/debug/tracing/events/syscalls").is_dir():
            problems.append("tracefs not mounted")
    except PermissionError:
        problems.append("tracefs not readable")
    if problems:
        reason = "doctor integration needs: " + ", ".join(problems)
        if os.environ.get("DRIFTWARDEN_REQUIRE_INTEGRATION") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def host_checks():
    _host_prerequisites()
    return {c.name: c for c in doctor.run_checks(DoctorEnv())}


REQUIRED = ("privileges", "bpf syscall", "tracefs", "kernel headers", "bcc", "tracepoints",
            "cgroup v2")


@pytest.mark.integration
def test_host_required_checks_ok(host_checks):
    for name in REQUIRED:
        c = host_checks[name]
        assert c.required and c.status == "ok", (name, c.detail)
    assert doctor.exit_code(list(host_checks.values())) == 0


@pytest.mark.integration
def test_host_tracepoints_row_is_what_this_kernel_offers(host_checks):
    """Counted from the host's tracefs, not from one kernel's numbers."""
    tracefs = find_tracefs()
    every = plan_probes(ProbeConfig(), tracefs)
    more = len(plan_probes(ProbeConfig(open_result=True), tracefs).tracepoint_names()) - len(
        every.tracepoint_names())
    absent = every.describe_absent()
    assert host_checks["tracepoints"].detail == (
        f"all kinds attach {every.describe()}, --open-result {more} more"
        + (f"; not on this kernel: {absent}" if absent else ""))


@pytest.mark.integration
def test_host_docker_answers_when_running(host_checks):
    if Path("/var/run/docker.sock").exists():
        assert host_checks["docker socket"].status == "ok", host_checks["docker socket"].detail


@pytest.mark.integration
@pytest.mark.parametrize("name", ["prog raw tracepoint", "prog cgroup sock_addr",
                                  "prog cgroup skb"])
def test_host_supported_program_types_load(host_checks, name):
    assert (host_checks[name].status, host_checks[name].detail) == ("ok", "loads")


@pytest.fixture(scope="module")
def host_tries():
    """What this host does when a bcc user loads and attaches a kprobe, fentry and LSM program
    (CONFIG_KPROBES is off on some kernels, fentry and LSM refused with EPERM on others)."""
    _host_prerequisites()
    from tests.support.host import try_program_types

    return try_program_types()


OPTIONAL_ROWS = {"kprobe": "prog kprobe", "fentry": "prog fentry (KFUNC_PROBE)",
                 "lsm": "prog LSM (LSM_PROBE)"}


@pytest.mark.integration
@pytest.mark.parametrize("key", sorted(OPTIONAL_ROWS))
def test_host_optional_program_types_match_what_the_host_does(host_checks, host_tries, key):
    c, tried = host_checks[OPTIONAL_ROWS[key]], host_tries[key]
    # doctor's "ok" means "loads"; for kprobes also "has something to attach to"
    supported = tried.attached if key == "kprobe" else tried.loaded
    if supported:
        assert (c.status, c.detail) == ("ok", "loads"), tried
    elif tried.loaded:  # a kprobe that loads but cannot attach (no kprobe PMU/kprobe_events)
        assert c.status == "info" and c.detail.startswith(f"{doctor.NOT_SUPPORTED}: loads, but"), (
            tried, c.detail)
    else:
        assert (c.status, c.detail) == (
            "info", f"{doctor.NOT_SUPPORTED}: {doctor.load_reason(tried.error)}"), tried


@pytest.mark.integration
def test_host_kprobe_row_follows_the_kernel_config(host_checks, host_tries):
    from tests.support.host import kernel_config

    config = kernel_config()
    if config is None:
        pytest.skip("no /proc/config.gz or /boot/config-RELEASE to compare with")
    built_in = config.get("CONFIG_KPROBES") == "y"
    assert host_tries["kprobe"].attached == built_in, host_tries["kprobe"]
    assert (host_checks["prog kprobe"].status == "ok") == built_in


@pytest.mark.integration
def test_host_in_process_load_keeps_fd2_quiet(capfd, host_tries):
    _host_prerequisites()
    results = doctor.load_program_types(["raw_tracepoint", "fentry"])
    assert results["raw_tracepoint"] is None
    fentry = host_tries["fentry"]
    if fentry.loaded:
        assert results["fentry"] is None
    else:
        assert doctor.load_reason(results["fentry"]) == doctor.load_reason(fentry.error)
    assert capfd.readouterr().err == ""  # libbcc's "Failed to load program" went to the sink


@pytest.mark.integration
def test_host_cli_json_end_to_end(capsys):
    _host_prerequisites()
    args = _parser().parse_args(["doctor", "--json", "--no-load-tests"])
    assert args.func(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows if r["required"]} == set(REQUIRED)


@pytest.mark.integration
def test_host_cli_subprocess_table():
    _host_prerequisites()
    code = ("import argparse, sys\n"
            "from driftwarden.agent import doctor\n"
            "p = argparse.ArgumentParser(); s = p.add_subparsers()\n"
            "doctor.add_parser(s)\n"
            "a = p.parse_args(['doctor'])\n"
            "sys.exit(a.func(a))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == ""  # bcc's compile/verifier noise never reaches the terminal
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert any(ln.startswith("prog raw tracepoint") and ln.split()[3] == "ok" for ln in lines)
    assert lines[-1] == "all required checks passed"


@pytest.mark.integration
def test_host_compile_failure_falls_back_per_type(monkeypatch):
    _host_prerequisites()
    broken = doctor.ProgramType("broken", "broken", "int dw_broken(void *ctx) { return; ",
                                "dw_broken", "KPROBE")
    raw = next(p for p in doctor.PROGRAM_TYPES if p.key == "raw_tracepoint")
    monkeypatch.setattr(doctor, "PROGRAM_TYPES", (raw, broken))
    results = doctor.load_program_types(["raw_tracepoint", "broken"])
    assert results["raw_tracepoint"] is None  # one bad program does not hide the others
    assert doctor.load_reason(results["broken"]) == "compile failed"
