"""ProcessTable: cwd/exe bookkeeping and relative path resolution, with a dict-backed /proc."""

from __future__ import annotations

import pytest
from driftwarden.agent.processes import ProcessTable, ResolvedPath, normalize
from driftwarden.probes._layout import AT_FDCWD


class FakeProc:
    """A ProcReader over dicts; a missing key is a process (or fd) that is gone."""

    def __init__(self, *, cwd=None, exe=None, ppid=None, fds=None) -> None:
        self.cwds: dict[int, str] = dict(cwd or {})
        self.exes: dict[int, str] = dict(exe or {})
        self.ppids: dict[int, int] = dict(ppid or {})
        self.fds: dict[tuple[int, int], str] = dict(fds or {})
        self.calls: list[tuple] = []

    def cwd(self, tgid: int) -> str | None:
        self.calls.append(("cwd", tgid))
        return self.cwds.get(tgid)

    def exe(self, tgid: int) -> str | None:
        self.calls.append(("exe", tgid))
        return self.exes.get(tgid)

    def ppid(self, tgid: int) -> int | None:
        self.calls.append(("ppid", tgid))
        return self.ppids.get(tgid)

    def fd_path(self, tgid: int, fd: int) -> str | None:
        self.calls.append(("fd_path", tgid, fd))
        return self.fds.get((tgid, fd))


@pytest.mark.parametrize(("given", "expected"), [
    ("/a/b", "/a/b"),
    ("//etc//passwd", "/etc/passwd"),
    ("///etc/passwd", "/etc/passwd"),
    ("/etc/./ssh/./sshd_config", "/etc/ssh/sshd_config"),
    ("/usr/lib/../bin/x", "/usr/bin/x"),
    ("/../../x", "/x"),
    ("/a/b/", "/a/b"),
    ("//", "/"),
    ("/", "/"),
])
def test_normalize(given, expected):
    assert normalize(given) == expected


def test_absolute_paths_are_normalized_without_proc():
    proc = FakeProc()
    table = ProcessTable(proc)
    got = table.resolve(100, 1, "//etc/./cron.d/../passwd", AT_FDCWD)
    assert got == ResolvedPath("/etc/passwd", True)
    # dirfd does not matter for an absolute path
    assert table.resolve(100, 1, "/tmp//x", 7) == ResolvedPath("/tmp/x", True)
    assert proc.calls == []
    assert table.stats == {"proc_reads": 0, "unresolved": 0, "evicted": 0}


def test_relative_resolved_against_chdir_tracked_cwd():
    proc = FakeProc(cwd={100: "/somewhere/else"})
    table = ProcessTable(proc)
    table.on_chdir(100, 1, "/srv/app", -1)
    assert table.resolve(100, 1, "logs/../out.txt", AT_FDCWD) == ResolvedPath(
        "/srv/app/out.txt", True)
    table.on_chdir(100, 1, "sub//dir/.", -1)
    assert table.resolve(100, 1, "f", AT_FDCWD) == ResolvedPath("/srv/app/sub/dir/f", True)
    table.on_chdir(100, 1, "../..", -1)
    assert table.resolve(100, 1, "./g", AT_FDCWD) == ResolvedPath("/srv/app/g", True)
    assert proc.calls == []  # everything came from chdir events


def test_relative_resolved_against_proc_cwd_and_cached():
    proc = FakeProc(cwd={200: "/work"})
    table = ProcessTable(proc)
    assert table.resolve(200, 1, "a.txt", AT_FDCWD) == ResolvedPath("/work/a.txt", True)
    assert table.resolve(200, 1, "../b", AT_FDCWD) == ResolvedPath("/b", True)
    assert proc.calls == [("cwd", 200)]
    assert table.stats == {"proc_reads": 1, "unresolved": 0, "evicted": 0}


def test_unknown_ppid_is_read_from_proc():
    proc = FakeProc(cwd={200: "/work"}, ppid={200: 150})
    table = ProcessTable(proc)
    assert table.resolve(200, 0, "a", AT_FDCWD) == ResolvedPath("/work/a", True)
    assert proc.calls == [("ppid", 200), ("cwd", 200)]
    assert table.stats["proc_reads"] == 2


def test_inherits_cwd_from_parent_when_child_is_gone():
    proc = FakeProc(cwd={50: "/app"})
    table = ProcessTable(proc)
    # 51 forked from 50 and exited before we looked: /proc/51 is gone
    assert table.resolve(51, 50, "x.log", AT_FDCWD) == ResolvedPath("/app/x.log", True)
    # the inherited cwd is now the child's own: no more /proc reads for it
    before = list(proc.calls)
    assert table.cwd(51) == "/app"
    assert proc.calls == before


def test_inherits_cwd_over_several_generations():
    proc = FakeProc()
    table = ProcessTable(proc)
    table.on_chdir(10, 1, "/home/u", -1)  # grandparent, tracked by a chdir event
    table.on_exec(11, 10, "/bin/sh")  # parent seen once, now gone
    table.on_exec(12, 11, "/bin/make")  # child seen once, now gone
    assert table.resolve(13, 12, "src/../out/x.o", AT_FDCWD) == ResolvedPath(
        "/home/u/out/x.o", True)
    # /proc was asked for the gone ones, nothing else
    assert proc.calls == [("cwd", 13), ("cwd", 12), ("cwd", 11)]
    assert table.stats["unresolved"] == 0


def test_parent_chain_read_from_proc_stat():
    proc = FakeProc(cwd={30: "/opt"}, ppid={32: 31, 31: 30})
    table = ProcessTable(proc)
    assert table.resolve(32, 0, "f", AT_FDCWD) == ResolvedPath("/opt/f", True)
    assert proc.calls == [("ppid", 32), ("cwd", 32), ("ppid", 31), ("cwd", 31), ("ppid", 30),
                          ("cwd", 30)]


def _chain(table: ProcessTable, depth: int, cwd: str) -> int:
    """Processes 1000 .. 1000+depth, each the child of the next; the last one has `cwd`."""
    top = 1000 + depth
    table.on_chdir(top, 1, cwd, -1)
    for tgid in range(top - 1, 1000, -1):
        table.on_exec(tgid, tgid + 1, None)
    return 1000


def test_parent_walk_is_bounded_to_eight_hops():
    table = ProcessTable(FakeProc())
    start = _chain(table, 8, "/eight")
    assert table.resolve(start, 1001, "f", AT_FDCWD) == ResolvedPath("/eight/f", True)

    table = ProcessTable(FakeProc())
    start = _chain(table, 9, "/nine")
    assert table.resolve(start, 1001, "f", AT_FDCWD) == ResolvedPath("f", False)
    assert table.stats["unresolved"] == 1


def test_self_parent_does_not_loop():
    proc = FakeProc()
    table = ProcessTable(proc)
    assert table.resolve(5, 5, "f", AT_FDCWD) == ResolvedPath("f", False)
    assert proc.calls == [("cwd", 5)]


def test_dirfd_resolved_through_fd_path():
    proc = FakeProc(cwd={500: "/not/used"}, fds={(500, 7): "/data/dir"})
    table = ProcessTable(proc)
    assert table.resolve(500, 1, "x/../y", 7) == ResolvedPath("/data/dir/y", True)
    assert proc.calls == [("fd_path", 500, 7)]
    # fd-only syscalls (fchmod) resolve the fd itself
    assert table.resolve(500, 1, "", 7) == ResolvedPath("/data/dir", True)
    assert table.stats == {"proc_reads": 2, "unresolved": 0, "evicted": 0}


def test_dirfd_unknown_is_unresolved():
    proc = FakeProc(cwd={500: "/cwd"})
    table = ProcessTable(proc)
    assert table.resolve(500, 1, "y", 8) == ResolvedPath("y", False)
    assert table.resolve(500, 1, "", 8) == ResolvedPath("", False)
    assert table.stats["unresolved"] == 2


def test_unresolved_keeps_path_as_given():
    proc = FakeProc()
    table = ProcessTable(proc)
    got = table.resolve(600, 1, "rel/./p/../q", AT_FDCWD)
    assert got == ResolvedPath("rel/./p/../q", False)
    assert table.stats["unresolved"] == 1
    # the parent (pid 1) is unknown and gone too: its ppid and cwd were asked, then the walk stops
    assert proc.calls == [("cwd", 600), ("ppid", 1), ("cwd", 1)]
    table.resolve(600, 1, "again", AT_FDCWD)
    assert table.stats["unresolved"] == 2


def test_relative_chdir_with_unknown_cwd_forgets_cwd():
    proc = FakeProc()
    table = ProcessTable(proc)
    table.on_chdir(650, 1, "sub", -1)
    proc.cwds[650] = "/later"
    # cwd stayed unknown, so a later lookup goes to /proc again
    assert table.resolve(650, 1, "f", AT_FDCWD) == ResolvedPath("/later/f", True)


def test_relative_chdir_of_new_child_starts_from_parent_cwd():
    # the child's /proc cwd was read after its chdir("cgi-bin"): it must not be applied twice
    proc = FakeProc(cwd={800: "/www", 801: "/www/cgi-bin"})
    table = ProcessTable(proc)
    table.on_chdir(801, 800, "cgi-bin", -1)
    assert table.resolve(801, 800, "app", AT_FDCWD) == ResolvedPath("/www/cgi-bin/app", True)
    assert ("cwd", 801) not in proc.calls


def test_relative_chdir_starts_from_the_kernels_cwd_base_when_parents_are_gone():
    # httpd (900, /www) forks a connection child (901, exits at once) which forks the CGI (902):
    # neither 901 nor 902 is alive when the events are processed
    proc = FakeProc(cwd={900: "/www"})
    table = ProcessTable(proc)
    table.on_chdir(902, 901, "./cgi-bin", -1, base=900)
    assert table.resolve(902, 901, "app", AT_FDCWD) == ResolvedPath("/www/cgi-bin/app", True)


def test_fchdir_reads_proc():
    proc = FakeProc(cwd={700: "/var/lib"})
    table = ProcessTable(proc)
    table.on_chdir(700, 1, "/ignored", -1)
    table.on_chdir(700, 1, None, 5)
    assert proc.calls == [("cwd", 700)]
    assert table.resolve(700, 1, "x", AT_FDCWD) == ResolvedPath("/var/lib/x", True)
    assert proc.calls == [("cwd", 700)]


def test_fchdir_with_process_gone_drops_the_stale_cwd():
    proc = FakeProc(cwd={1: "/"})
    table = ProcessTable(proc)
    table.on_chdir(701, 1, "/a", -1)
    table.on_chdir(701, 1, None, 3)  # /proc/701 is gone: the cwd is no longer known
    assert table.resolve(701, 1, "x", AT_FDCWD) == ResolvedPath("/x", True)  # the parent's


def test_pid_reuse_resets_entry():
    proc = FakeProc(cwd={800: "/new"})
    table = ProcessTable(proc)
    table.on_chdir(800, 10, "/old", -1)
    table.on_exec(800, 10, "/bin/old")
    assert table.resolve(800, 10, "f", AT_FDCWD) == ResolvedPath("/old/f", True)
    assert table.exec_seen(800)
    # same tgid, another parent: a new process
    assert table.resolve(800, 20, "f", AT_FDCWD) == ResolvedPath("/new/f", True)
    assert not table.exec_seen(800)
    assert len(table) == 1
    assert table.exe_before_exec(800, 20) is None  # "/bin/old" belonged to the previous process


def test_unknown_ppid_does_not_reset_entry():
    proc = FakeProc(cwd={800: "/new"})
    table = ProcessTable(proc)
    table.on_chdir(800, 0, "/old", -1)  # ppid unknown to the kernel: read from /proc (None)
    assert proc.calls == [("ppid", 800)]
    # the first known ppid is adopted, not treated as reuse
    assert table.resolve(800, 10, "f", AT_FDCWD) == ResolvedPath("/old/f", True)
    # a later event without ppid keeps the entry
    assert table.resolve(800, 0, "g", AT_FDCWD) == ResolvedPath("/old/g", True)
    # and now 10 is its parent: 20 means reuse
    assert table.resolve(800, 20, "h", AT_FDCWD) == ResolvedPath("/new/h", True)


def test_lru_capacity_eviction():
    proc = FakeProc()
    table = ProcessTable(proc, capacity=2)
    for tgid, cwd in ((1, "/one"), (2, "/two")):
        table.on_chdir(tgid, 100, cwd, -1)
        table.on_exec(tgid, 100, f"/bin/{tgid}")
    assert table.resolve(1, 100, "f", AT_FDCWD).path == "/one/f"  # 1 is now the most recent
    table.on_chdir(3, 100, "/three", -1)
    assert len(table) == 2
    assert table.stats["evicted"] == 1
    assert table.exec_seen(1)
    assert not table.exec_seen(2)  # 2 was the least recently used: forgotten
    assert table.resolve(1, 100, "f", AT_FDCWD) == ResolvedPath("/one/f", True)
    assert table.resolve(3, 100, "f", AT_FDCWD) == ResolvedPath("/three/f", True)
    # and /proc no longer has it either
    assert table.resolve(2, 100, "f", AT_FDCWD) == ResolvedPath("f", False)


def test_pid_reuse_counts_as_most_recent():
    table = ProcessTable(FakeProc(), capacity=2)
    table.on_chdir(1, 100, "/one", -1)
    table.on_chdir(2, 100, "/two", -1)
    table.on_chdir(1, 200, "/reused", -1)  # pid 1 reused: a new entry, the most recent
    table.on_chdir(3, 100, "/three", -1)
    assert table.stats["evicted"] == 1
    assert table.resolve(1, 200, "f", AT_FDCWD) == ResolvedPath("/reused/f", True)
    assert table.resolve(3, 100, "f", AT_FDCWD) == ResolvedPath("/three/f", True)


def test_exe_before_exec_inherited_from_ancestors():
    proc = FakeProc()
    table = ProcessTable(proc)
    table.on_exec(900, 1, "/usr/bin/python3")
    assert table.exe_before_exec(900, 1) == "/usr/bin/python3"
    # a forked child that has not exec'd runs its parent's image
    assert table.exe_before_exec(901, 900) == "/usr/bin/python3"
    assert table.exe_before_exec(902, 901) == "/usr/bin/python3"
    table.on_exec(901, 900, "/bin/sh")
    assert table.exe_before_exec(901, 900) == "/bin/sh"
    assert table.exe_before_exec(902, 901) == "/bin/sh"
    assert table.exe_before_exec(903, 0) is None  # nothing known, /proc has no parent
    assert ("ppid", 903) in proc.calls


def test_exec_seen_and_live_exe():
    proc = FakeProc(exe={5: "/bin/busybox"})
    table = ProcessTable(proc)
    assert not table.exec_seen(5)
    assert len(table) == 0  # asking does not create an entry
    table.on_exec(5, 1, "/bin/busybox")
    assert table.exec_seen(5)
    assert table.live_exe(5) == "/bin/busybox"
    assert table.live_exe(6) is None
    assert table.stats["proc_reads"] == 2
