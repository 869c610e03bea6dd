"""agent/procfs.py on a fake /proc tree: the start-up snapshot (every process: parent, start,
exe, argv, cwd, cgroup v2 id, the script an interpreter runs), tolerant of processes that
vanish while it reads, and the per-process answers."""

from __future__ import annotations

import os
from pathlib import Path

from driftwarden.agent.procfs import LiveProcReader, ProcessSnapshot


def _stat(pid: int, comm: str, ppid: int, start: int) -> str:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime
    # stime cutime cstime priority nice threads itrealvalue starttime ...
    fields = ["S", str(ppid)] + ["0"] * 17 + [str(start), "123", "456"]
    return f"{pid} ({comm}) " + " ".join(fields) + "\n"


def _process(proc: Path, pid: int, *, comm: str = "sh", ppid: int = 1, start: int = 100,
             argv: tuple[str, ...] = ("sh",), exe: str | None = "/bin/busybox",
             cwd: str | None = "/", cgroup: str | None = "0::/system.slice/docker-abc.scope\n",
             root: Path | None = None) -> Path:
    d = proc / str(pid)
    (d / "task" / str(pid)).mkdir(parents=True)
    (d / "stat").write_text(_stat(pid, comm, ppid, start))
    (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    if exe is not None:
        (d / "exe").symlink_to(exe)
    if cwd is not None:
        (d / "cwd").symlink_to(cwd)
    if cgroup is not None:
        (d / "cgroup").write_text(cgroup)
    if root is not None:
        (d / "root").symlink_to(root)
    return d


def test_snapshot_reads_every_process_oldest_first(tmp_path):
    proc, cgroups, rootfs = tmp_path / "proc", tmp_path / "cgroup", tmp_path / "rootfs"
    scope = cgroups / "system.slice" / "docker-abc.scope"
    scope.mkdir(parents=True)
    (rootfs / "srv").mkdir(parents=True)
    (rootfs / "srv" / "app.sh").write_text("#!/bin/sh -e\necho hi\n")
    proc.mkdir()
    (proc / "self").symlink_to("1")  # not a pid: skipped
    (proc / "meminfo").write_text("MemTotal: 1 kB\n")
    _process(proc, 1, comm="init", ppid=0, start=1, argv=("/sbin/init",), exe="/sbin/init",
             cgroup="0::/\n")
    _process(proc, 900, comm="app.sh", start=500, argv=("/bin/sh", "-e", "/srv/app.sh", "x"),
             cwd="/srv", root=rootfs)
    _process(proc, 901, comm="a (b) c", ppid=900, start=600, argv=("nc", "-l", "-p", "80"),
             exe="/tmp/nc (deleted)", cwd="/tmp (deleted)", root=rootfs)
    _process(proc, 2, comm="kthreadd", ppid=0, start=0, argv=(), exe=None, cwd=None,
             cgroup="0::/\n")
    reader = LiveProcReader(str(proc), cgroups)
    found = reader.snapshot()
    assert [p.tgid for p in found] == [2, 1, 900, 901]
    root_id, scope_id = os.stat(cgroups).st_ino, os.stat(scope).st_ino
    assert found[0] == ProcessSnapshot(tgid=2, ppid=0, start_ticks=0, exe=None, argv=(),
                                       cwd=None, cgroup_id=root_id)
    assert found[1].cgroup_id == root_id and found[1].exe == "/sbin/init"
    assert found[2] == ProcessSnapshot(
        tgid=900, ppid=1, start_ticks=500, exe="/bin/busybox",
        argv=("/bin/sh", "-e", "/srv/app.sh", "x"), cwd="/srv", cgroup_id=scope_id,
        script="/srv/app.sh")
    # comm with spaces and parentheses; exe keeps " (deleted)", cwd drops it
    assert found[3] == ProcessSnapshot(
        tgid=901, ppid=900, start_ticks=600, exe="/tmp/nc (deleted)",
        argv=("nc", "-l", "-p", "80"), cwd="/tmp", cgroup_id=scope_id)
    assert reader.start_ticks(901) == 600 and reader.start_ticks(5) is None
    assert [ProcessSnapshot.from_dict(p.to_dict()) for p in found] == found


def test_processes_that_vanish_mid_read_are_skipped_or_partial(tmp_path):
    proc, cgroups = tmp_path / "proc", tmp_path / "cgroup"
    cgroups.mkdir()
    proc.mkdir()
    (proc / "77").mkdir()  # gone before its stat was read
    _process(proc, 78, exe=None, cwd=None, cgroup=None)  # gone after its stat
    (proc / "78" / "cmdline").unlink()
    _process(proc, 79, cgroup="0::/gone.scope\n")  # its cgroup was removed meanwhile
    (proc / "80").mkdir()
    (proc / "80" / "stat").write_text("80 (x) S\n")  # truncated
    found = LiveProcReader(str(proc), cgroups).snapshot()
    assert found == [
        ProcessSnapshot(tgid=78, ppid=1, start_ticks=100, exe=None, argv=(), cwd=None,
                        cgroup_id=None),
        ProcessSnapshot(tgid=79, ppid=1, start_ticks=100, exe="/bin/busybox", argv=("sh",),
                        cwd="/", cgroup_id=None),
    ]


def test_a_script_is_named_only_when_its_shebang_matches_argv(tmp_path):
    proc, rootfs = tmp_path / "proc", tmp_path / "rootfs"
    (rootfs / "srv").mkdir(parents=True)
    (rootfs / "srv" / "run.sh").write_text("#!/bin/sh\nexec app\n")
    (rootfs / "srv" / "data.txt").write_text("not a script\n")
    os.mkfifo(rootfs / "srv" / "pipe")  # never opened: reading it would block
    proc.mkdir()
    cases = {
        10: ("/bin/sh", "run.sh"),  # relative to its cwd
        11: ("/bin/sh", "/srv/data.txt"),  # no #! line
        12: ("/bin/bash", "/srv/run.sh"),  # another interpreter than the #! names
        13: ("/bin/cat", "/srv/pipe"),
        14: ("sh", "/srv/run.sh"),  # `sh /srv/run.sh`: the shell was run, not the script
    }
    for pid, argv in cases.items():
        _process(proc, pid, argv=argv, cwd="/srv", root=rootfs)
    scripts = {p.tgid: p.script for p in LiveProcReader(str(proc), tmp_path).snapshot()}
    assert scripts == {10: "/srv/run.sh", 11: None, 12: None, 13: None, 14: None}


def test_per_process_answers(tmp_path):
    proc = tmp_path / "proc"
    proc.mkdir()
    d = _process(proc, 5, cwd="/work (deleted)", exe="/memfd:x (deleted)")
    (d / "fd").mkdir()
    (d / "fd" / "3").symlink_to("/data/dir")
    (d / "fd" / "4").symlink_to("socket:[1234]")
    reader = LiveProcReader(str(proc))
    assert reader.cwd(5) == "/work"
    assert reader.exe(5) == "/memfd:x (deleted)"
    assert reader.fd_path(5, 3) == "/data/dir"
    assert reader.fd_path(5, 4) is None and reader.fd_path(5, 9) is None
    assert reader.cwd(6) is None and reader.exe(6) is None and reader.start_ticks(6) is None
