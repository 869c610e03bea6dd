"""ProcessTable: processes keyed by (tgid, start_ns) from fork/exec/exit events and the start-up
snapshot, their programs and working directories, with a dict-backed /proc."""

from __future__ import annotations

import pytest
from driftwarden.agent.processes import (
    ExecRepeats,
    ExecTarget,
    ProcessTable,
    ResolvedPath,
    normalize,
    snapshot_program,
)
from driftwarden.agent.procfs import ProcessSnapshot
from driftwarden.core.records import ProcKey, Program
from driftwarden.probes._layout import AT_FDCWD, EventKind, Flag
from driftwarden.probes.events import Header

TICKS = 100  # clock ticks per second, as on every Linux
SECOND = 1_000_000_000


class FakeProc:
    """A ProcReader over dicts; a missing key is a process (or fd) that is gone."""

    def __init__(self, *, cwd=None, exe=None, fds=None, ticks=None, running=()) -> None:
        self.cwds: dict[int, str] = dict(cwd or {})
        self.exes: dict[int, str] = dict(exe or {})
        self.fds: dict[tuple[int, int], str] = dict(fds or {})
        self.ticks: dict[int, int] = dict(ticks or {})
        self.running: list[ProcessSnapshot] = list(running)
        self.calls: list[tuple] = []

    def cwd(self, tgid: int) -> str | None:
        self.calls.append(("cwd", tgid))
        return self.cwds.get(tgid)

    def exe(self, tgid: int) -> str | None:
        self.calls.append(("exe", tgid))
        return self.exes.get(tgid)

    def fd_path(self, tgid: int, fd: int) -> str | None:
        self.calls.append(("fd_path", tgid, fd))
        return self.fds.get((tgid, fd))

    def start_ticks(self, tgid: int) -> int | None:
        self.calls.append(("start_ticks", tgid))
        return self.ticks.get(tgid)

    def snapshot(self) -> list[ProcessSnapshot]:
        self.calls.append(("snapshot",))
        return list(self.running)


def hdr(tgid: int, start_ns: int = 0, ppid: int = 0, parent_start_ns: int = 0, *,
        comm: str = "sh") -> Header:
    """An event header: (tgid, start_ns) is the process, (ppid, parent_start_ns) its parent."""
    return Header(kind=EventKind.FILE, ts_ns=1, cgroup_id=500, pid=tgid, tgid=tgid, ppid=ppid,
                  uid=0, gid=0, comm=comm, flags=Flag(0), suppressed=0, start_ns=start_ns,
                  parent_start_ns=parent_start_ns)


def snap(tgid: int, ppid: int, exe: str | None, *argv: str, cwd: str | None = "/",
         ticks: int = 50, script: str | None = None) -> ProcessSnapshot:
    return ProcessSnapshot(tgid=tgid, ppid=ppid, start_ticks=ticks, exe=exe, argv=argv, cwd=cwd,
                           cgroup_id=500, script=script)


def forked(table: ProcessTable, parent: ProcKey, child_tgid: int, child_start: int,
           grandparent: ProcKey | None = None) -> ProcKey:
    g = grandparent or ProcKey(0, 0)
    return table.on_fork(hdr(parent.tgid, parent.start_ns, g.tgid, g.start_ns), child_tgid,
                         child_start)


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


# -- identity: fork, exec, exit ---------------------------------------------------------------


def test_fork_inherits_program_and_cwd_exec_sets_program_exit_removes():
    table = ProcessTable(FakeProc(), ticks_per_second=TICKS)
    sh = table.key_of(hdr(100, 10 * SECOND, 1, 0))
    assert sh == ProcKey(100, 10 * SECOND) and sh in table
    assert table.on_exec(sh, "/bin/sh", "sh") == Program("/bin/sh", "sh")
    table.on_chdir(sh, "/srv", -1)
    child = forked(table, sh, 101, 11 * SECOND, ProcKey(1, 0))
    assert child == ProcKey(101, 11 * SECOND)
    assert table.program(child) == Program("/bin/sh", "sh")  # inherited, not exec'd
    assert table.parent(child) == sh
    assert table.cwd(child) == "/srv"
    assert table.exec_seen(sh) and not table.exec_seen(child)
    # an exec by the child: the lineage parent is what it ran before (the inherited shell)
    assert table.prior_program(child) == Program("/bin/sh", "sh")
    assert table.on_exec(child, "/bin/date", "date") == Program("/bin/date", "date")
    assert table.exec_seen(child)
    assert table.parent_program(child) == Program("/bin/sh", "sh")
    table.on_exit(hdr(101, 11 * SECOND, 100, 10 * SECOND))
    assert child not in table and table.program(child) is None
    assert len(table) == 1  # the shell (its parent is named by its key, not entered)


def test_a_child_whose_fork_was_held_back_inherits_at_its_first_event():
    """Flag.FORK_UNSENT: the kernel held the fork back (over the container's fork budget, or
    dropped). The child's first event carries the flag and the child gets what on_fork would
    have given it; without the flag an unknown process inherits nothing (it may have exec'd)."""
    proc = FakeProc()
    table = ProcessTable(proc, ticks_per_second=TICKS)
    sh = table.key_of(hdr(100, 10 * SECOND, 1, 0))
    table.on_exec(sh, "/bin/sh", "sh")
    table.on_chdir(sh, "/srv", -1)
    held = hdr(101, 11 * SECOND, 100, 10 * SECOND)._replace(flags=Flag.FORK_UNSENT)
    child = table.key_of(held)
    assert child == ProcKey(101, 11 * SECOND)
    assert table.program(child) == Program("/bin/sh", "sh")
    assert table.parent(child) == sh and table.cwd(child) == "/srv"
    assert not table.exec_seen(child)
    assert table.resolve(child, "x.txt", AT_FDCWD) == ResolvedPath("/srv/x.txt", True)
    assert table.stats["fork_unsent"] == 1 and proc.calls == []
    # unflagged: the probes saw no fork but sent one; this process may run anything
    other = table.key_of(hdr(102, 12 * SECOND, 100, 10 * SECOND))
    assert table.program(other) is None and table.parent_program(other) == Program("/bin/sh",
                                                                                   "sh")
    assert table.stats["fork_unsent"] == 1


def test_proc_self_exe_keeps_the_exe_it_ran_with_the_new_argv0():
    """busybox applets: `sh` forks, the child execs /proc/self/exe as `nc`; the binary is the
    one the process ran (here inherited from the shell), whatever /proc says or does not say."""
    proc = FakeProc()
    table = ProcessTable(proc, ticks_per_second=TICKS)
    sh = table.key_of(hdr(200, 5 * SECOND))
    table.on_exec(sh, "/bin/sh", "sh")
    child = forked(table, sh, 201, 6 * SECOND)
    nc = table.on_exec(child, None, "nc", self_exec=True)
    assert nc == Program("/bin/sh", "nc", self_exec=True)
    # and again (an applet that re-execs itself): still the same binary
    assert table.on_exec(child, None, "sh", self_exec=True) == Program("/bin/sh", "sh", True)
    # a fork of it inherits that, self_exec included
    grandchild = forked(table, child, 202, 7 * SECOND)
    assert table.program(grandchild) == Program("/bin/sh", "sh", True)
    assert proc.calls == []  # never /proc


def test_proc_self_exe_of_a_process_whose_program_is_unknown_takes_its_parents():
    table = ProcessTable(FakeProc(), ticks_per_second=TICKS)
    parent = table.key_of(hdr(300, 3 * SECOND))
    table.on_exec(parent, "/usr/bin/python3", "python3")
    # its fork event was lost: the child is created from its own header
    child = table.key_of(hdr(301, 4 * SECOND, 300, 3 * SECOND))
    assert table.program(child) is None
    assert table.prior_program(child) == Program("/usr/bin/python3", "python3")
    assert table.on_exec(child, None, "worker", self_exec=True) == Program(
        "/usr/bin/python3", "worker", True)
    orphan = table.key_of(hdr(302, 4 * SECOND))  # no parent known at all
    assert table.prior_program(orphan) is None
    assert table.on_exec(orphan, None, "nc", self_exec=True) == Program(None, "nc", True)


def test_exec_chains_take_the_program_the_process_ran_before():
    """`exec httpd` in a start script, `nc -e /bin/sh`: the lineage parent is what the same
    process ran, not its parent process."""
    table = ProcessTable(FakeProc(), ticks_per_second=TICKS)
    init = table.key_of(hdr(400, SECOND))
    table.on_exec(init, "/srv/start.sh", "/srv/start.sh")
    assert table.prior_program(init) == Program("/srv/start.sh", "/srv/start.sh")
    table.on_exec(init, "/bin/httpd", "httpd")
    assert table.prior_program(init) == Program("/bin/httpd", "httpd")


def test_unknown_processes_get_entries_from_the_event_and_know_nothing_they_did_not_see():
    table = ProcessTable(FakeProc(), ticks_per_second=TICKS)
    shim = table.key_of(hdr(50, 0))  # running before the probes: (50, 0)
    table.on_exec(shim, "/usr/bin/containerd-shim", "containerd-shim")
    # runc, forked by the shim in the host cgroup (no fork event), exec'd runc there unseen
    runc = table.key_of(hdr(60, 2 * SECOND, 50, 0, comm="runc:[2:INIT]"))
    assert table.parent(runc) == shim
    assert table.program(runc) is None  # never the shim's: it may have exec'd unseen
    assert table.parent_program(runc) == Program("/usr/bin/containerd-shim", "containerd-shim")


def test_a_parent_that_is_gone_still_names_the_lineage_of_its_children():
    table = ProcessTable(FakeProc(), ticks_per_second=TICKS)
    sh = table.key_of(hdr(500, SECOND))
    table.on_exec(sh, "/bin/sh", "sh")
    child = forked(table, sh, 501, 2 * SECOND)
    table.on_exec(child, "/bin/sleep", "sleep")
    table.on_exit(hdr(500, SECOND))
    assert sh not in table
    assert table.parent_program(child) == Program("/bin/sh", "sh")  # remembered at its fork


def test_pid_reuse_is_a_new_process_that_inherits_nothing():
    proc = FakeProc()
    table = ProcessTable(proc, ticks_per_second=TICKS)
    old = table.key_of(hdr(800, 10 * SECOND, 10, 0))
    table.on_exec(old, "/bin/old", "old")
    table.on_chdir(old, "/old", -1)
    # the pid counter wrapped: 800 again, forked by someone else, the old one never exited for
    # us (its exit event was lost, or it is still queued)
    new = table.key_of(hdr(800, 99 * SECOND, 20, 0, comm="runc:[2:INIT]"))
    assert new != old and len(table) == 2
    assert table.program(new) is None and not table.exec_seen(new)
    assert table.parent(new) == ProcKey(20, 0)
    assert table.program(old) == Program("/bin/old", "old")  # still its own, untouched
    assert table.exec_seen(old) and table.cwd(old) == "/old"
    # the new one's cwd comes from neither: /proc is asked (and checked against its start)
    proc.cwds[800] = "/new"
    proc.ticks[800] = 99 * TICKS
    assert table.cwd(new) == "/new"


def test_start_ns_zero_events_are_the_snapshots_or_the_newest_entry_of_that_tgid():
    proc = FakeProc(running=[snap(70, 1, "/bin/busybox", "sleep", "3600")])
    table = ProcessTable(proc, ticks_per_second=TICKS)
    table.seed(proc.snapshot())
    assert table.key_of(hdr(70, 0)) == ProcKey(70, 0)
    assert table.program(ProcKey(70, 0)) == Program("/bin/busybox", "sleep")
    # a process the kernel saw fork with that tgid later (70 was reused): the newest wins for
    # events whose kernel record was evicted (start_ns 0)
    reused = table.key_of(hdr(70, 50 * SECOND, 1, 0))
    assert table.key_of(hdr(70, 0)) == reused
    table.on_exit(hdr(70, 50 * SECOND))
    assert table.key_of(hdr(71, 0)) == ProcKey(71, 0)  # unknown: created, parent unknown
    assert table.parent(ProcKey(71, 0)) is None


def test_lru_bound_counts_evictions_and_forgets_the_tgid_index():
    table = ProcessTable(FakeProc(), capacity=2, ticks_per_second=TICKS)
    one = table.key_of(hdr(1, SECOND))
    two = table.key_of(hdr(2, SECOND))
    table.on_exec(one, "/bin/one", "one")
    table.key_of(hdr(1, SECOND))  # 1 is now the most recent
    three = table.key_of(hdr(3, SECOND))
    assert len(table) == 2 and table.stats["evicted"] == 1
    assert one in table and three in table and two not in table
    # the evicted one's events start over as an unknown process
    assert table.key_of(hdr(2, 0)) == ProcKey(2, 0)
    assert table.stats["evicted"] == 2
    assert table.program(one) is None  # 1 was the least recently used this time


def test_a_replaced_entry_takes_the_most_recent_lru_slot():
    table = ProcessTable(FakeProc(), capacity=2, ticks_per_second=TICKS)
    a = table.key_of(hdr(1, SECOND))
    table.key_of(hdr(2, SECOND))
    again = forked(table, a, 2, SECOND)  # a fork event for (2, SECOND) again: replaced
    table.key_of(hdr(3, SECOND))
    assert again in table and a not in table and table.stats["evicted"] == 1


# -- repeated execs (the kernel's dedup) -------------------------------------------------------


def test_exec_repeats_name_the_full_exec_per_cgroup_bounded():
    repeats = ExecRepeats(capacity=2)
    job = ExecTarget("/app/job.sh", "/bin/sh", False)
    applet = ExecTarget(None, "nc", True)
    repeats.remember(500, 7, job)
    repeats.remember(500, 0, job)  # no key: a record without one is never repeated
    repeats.remember(600, 7, applet)  # the same key in another container is another exec
    assert len(repeats) == 2
    assert repeats.lookup(500, 7) == job and repeats.lookup(600, 7) == applet
    assert repeats.lookup(500, 8) is None
    repeats.lookup(500, 7)  # now the most recent: 600's is evicted next
    repeats.remember(500, 9, applet)
    assert repeats.lookup(600, 7) is None and repeats.lookup(500, 7) == job
    assert repeats.stats == {"remembered": 3, "repeated": 4, "unknown": 2, "evicted": 1}


def test_a_repeat_applies_like_the_exec_it_repeats_and_an_unknown_one_forgets_the_program():
    table = ProcessTable(FakeProc(), ticks_per_second=TICKS)
    loop = table.key_of(hdr(50, 50 * SECOND))
    table.on_exec(loop, "/app/cron.sh", "/bin/sh")
    job = forked(table, loop, 51, 51 * SECOND)
    target = ExecTarget("/app/job.sh", "/bin/sh", False)
    table.on_exec(job, target.exe, target.argv0, self_exec=target.self_exec)
    kid = forked(table, job, 52, 52 * SECOND, loop)
    assert table.parent_program(kid) == Program("/app/job.sh", "/bin/sh")
    # a repeat whose full exec is unknown: the job no longer runs cron.sh, and nothing says what
    lost = forked(table, loop, 53, 53 * SECOND)
    table.on_unknown_exec(lost)
    assert table.program(lost) is None and table.exec_seen(lost)
    assert table.prior_program(lost) is None  # not cron.sh: an exec chain from it is unknown
    orphan = forked(table, lost, 54, 54 * SECOND, loop)
    assert table.parent_program(orphan) is None and table.prior_program(orphan) is None


# -- the start-up snapshot --------------------------------------------------------------------


def test_seed_enters_every_process_with_its_parent_and_program():
    running = [
        snap(1, 0, "/sbin/init", "/sbin/init", ticks=1),
        snap(900, 1, "/bin/busybox", "sh", "-c", "loop", cwd="/srv", ticks=5),
        snap(901, 900, "/bin/busybox", "/bin/sh", "/srv/app.sh", ticks=6,
             script="/srv/app.sh"),
        snap(2, 0, None, ticks=0),  # a kernel thread: nothing to run
    ]
    table = ProcessTable(FakeProc(), ticks_per_second=TICKS)
    assert table.seed(running) == 4
    assert table.parent(ProcKey(900, 0)) == ProcKey(1, 0)
    assert table.parent(ProcKey(1, 0)) is None
    assert table.program(ProcKey(900, 0)) == Program("/bin/busybox", "sh")
    assert table.program(ProcKey(901, 0)) == Program("/srv/app.sh", "/srv/app.sh")
    assert table.program(ProcKey(2, 0)) is None
    assert table.parent_program(ProcKey(901, 0)) == Program("/bin/busybox", "sh")
    assert table.cwd(ProcKey(900, 0)) == "/srv"
    # a child forked after the start inherits from the snapshot's entry
    child = table.on_fork(hdr(900, 0, 1, 0), 950, 80 * SECOND)
    assert table.program(child) == Program("/bin/busybox", "sh") and table.cwd(child) == "/srv"
    assert not table.exec_seen(ProcKey(900, 0))


def test_snapshot_program():
    assert snapshot_program(snap(5, 1, "/bin/busybox", "nc", "-l")) == Program(
        "/bin/busybox", "nc")
    assert snapshot_program(snap(5, 1, "/bin/busybox (deleted)", "x")) == Program(
        "/bin/busybox (deleted)", "x")
    assert snapshot_program(snap(5, 1, "/bin/busybox", "/bin/sh", "/a.sh", script="/a.sh")) == (
        Program("/a.sh", "/a.sh"))
    assert snapshot_program(snap(5, 1, None)) is None
    assert snapshot_program(snap(5, 1, None, "zombie")) == Program(None, "zombie")


# -- working directories and /proc ------------------------------------------------------------


def test_absolute_paths_are_normalized_without_proc():
    proc = FakeProc()
    table = ProcessTable(proc, ticks_per_second=TICKS)
    key = table.key_of(hdr(100, SECOND))
    assert table.resolve(key, "//etc/./cron.d/../passwd", AT_FDCWD) == ResolvedPath(
        "/etc/passwd", True)
    assert table.resolve(key, "/tmp//x", 7) == ResolvedPath("/tmp/x", True)
    assert proc.calls == []
    assert table.stats == {"proc_reads": 0, "unresolved": 0, "evicted": 0, "stale_proc": 0,
                           "cwd_lost": 0, "fork_unsent": 0}


def test_relative_resolved_against_chdir_tracked_cwd():
    proc = FakeProc(cwd={100: "/somewhere/else"})
    table = ProcessTable(proc, ticks_per_second=TICKS)
    key = table.key_of(hdr(100, SECOND))
    table.on_chdir(key, "/srv/app", -1)
    assert table.resolve(key, "logs/../out.txt", AT_FDCWD) == ResolvedPath(
        "/srv/app/out.txt", True)
    table.on_chdir(key, "sub//dir/.", -1)
    assert table.resolve(key, "f", AT_FDCWD) == ResolvedPath("/srv/app/sub/dir/f", True)
    table.on_chdir(key, "../..", -1)
    assert table.resolve(key, "./g", AT_FDCWD) == ResolvedPath("/srv/app/g", True)
    assert proc.calls == []  # everything came from chdir events


def test_a_lost_chdir_makes_the_next_relative_path_read_proc_again():
    """Flag.CWD_LOST: a chdir of the process was held back (over budget) or dropped, so the
    tracked cwd is stale; the flagged event reads /proc, and so does a flagged chdir (its path
    may be relative to a directory never seen)."""
    proc = FakeProc(cwd={100: "/c"}, ticks={100: 30 * TICKS})
    table = ProcessTable(proc, ticks_per_second=TICKS)
    key = table.key_of(hdr(100, 30 * SECOND))
    table.on_chdir(key, "/a", -1)
    lost = hdr(100, 30 * SECOND)._replace(flags=Flag.CWD_LOST)
    assert table.key_of(lost) == key
    assert table.resolve(key, "out.txt", AT_FDCWD) == ResolvedPath("/c/out.txt", True)
    assert table.resolve(key, "more.txt", AT_FDCWD) == ResolvedPath("/c/more.txt", True)
    assert proc.calls == [("cwd", 100), ("start_ticks", 100)]  # once, then tracked again
    proc.cwds[100] = "/d/e"
    table.key_of(lost)
    table.on_chdir(key, "e", -1)  # relative to /d, whose chdir was never sent
    assert table.resolve(key, "f", AT_FDCWD) == ResolvedPath("/d/e/f", True)
    table.on_chdir(key, "..", -1)  # an unflagged chdir: tracked as before
    assert table.resolve(key, "g", AT_FDCWD) == ResolvedPath("/d/g", True)
    assert table.stats["cwd_lost"] == 2


def test_relative_resolved_against_proc_cwd_checked_against_the_start_and_cached():
    proc = FakeProc(cwd={200: "/work"}, ticks={200: 30 * TICKS})
    table = ProcessTable(proc, ticks_per_second=TICKS)
    # started at 30.004 s: the kernel's own starttime (30.00 s, in ticks) is at most a tick off
    key = table.key_of(hdr(200, 30 * SECOND + 4_000_000))
    assert table.resolve(key, "a.txt", AT_FDCWD) == ResolvedPath("/work/a.txt", True)
    assert table.resolve(key, "../b", AT_FDCWD) == ResolvedPath("/b", True)
    assert proc.calls == [("cwd", 200), ("start_ticks", 200)]
    assert table.stats == {"proc_reads": 2, "unresolved": 0, "evicted": 0, "stale_proc": 0,
                           "cwd_lost": 0, "fork_unsent": 0}


def test_proc_answers_of_a_reused_pid_are_dropped():
    """/proc/200 now belongs to another process (started at 90 s, ours at 30 s): its cwd and
    fd paths are not ours; the path stays unresolved rather than wrong."""
    proc = FakeProc(cwd={200: "/elsewhere"}, fds={(200, 4): "/other"}, ticks={200: 90 * TICKS})
    table = ProcessTable(proc, ticks_per_second=TICKS)
    key = table.key_of(hdr(200, 30 * SECOND))
    assert table.resolve(key, "a", AT_FDCWD) == ResolvedPath("a", False)
    assert table.resolve(key, "b", 4) == ResolvedPath("b", False)
    assert table.stats["stale_proc"] == 2 and table.stats["unresolved"] == 2
    # a snapshot entry is checked against the snapshot's own starttime
    table.seed([snap(300, 1, "/bin/busybox", "sh", cwd=None, ticks=7)])
    proc.cwds[300], proc.ticks[300] = "/reused", 8
    assert table.cwd(ProcKey(300, 0)) is None
    proc.ticks[300] = 7
    assert table.cwd(ProcKey(300, 0)) == "/reused"


def test_inherits_cwd_from_an_ancestor_when_the_process_is_gone():
    proc = FakeProc(cwd={50: "/app"})
    table = ProcessTable(proc, ticks_per_second=TICKS)
    parent = table.key_of(hdr(50, 0))
    child = table.key_of(hdr(51, 2 * SECOND, 50, 0))  # its fork was not seen; /proc/51 gone
    assert table.resolve(child, "x.log", AT_FDCWD) == ResolvedPath("/app/x.log", True)
    before = list(proc.calls)
    assert table.cwd(child) == "/app"  # now its own: no more /proc reads for it
    assert proc.calls == before
    assert table.cwd(parent) == "/app"


def test_forks_carry_the_cwd_over_generations():
    proc = FakeProc()
    table = ProcessTable(proc, ticks_per_second=TICKS)
    top = table.key_of(hdr(10, SECOND))
    table.on_chdir(top, "/home/u", -1)
    middle = forked(table, top, 11, 2 * SECOND)
    table.on_exec(middle, "/bin/make", "make")
    leaf = forked(table, middle, 12, 3 * SECOND)
    assert table.resolve(leaf, "src/../out/x.o", AT_FDCWD) == ResolvedPath(
        "/home/u/out/x.o", True)
    assert proc.calls == []


def _chain(table: ProcessTable, depth: int, cwd: str) -> ProcKey:
    """Processes 1000+depth (cwd known) down to 1000, each created from its own event with the
    next one as its parent (no forks seen: the cwd must be walked up to)."""
    top = 1000 + depth
    table.on_chdir(table.key_of(hdr(top, SECOND)), cwd, -1)
    for tgid in range(top - 1, 999, -1):
        table.key_of(hdr(tgid, SECOND, tgid + 1, SECOND))
    return ProcKey(1000, SECOND)


def test_parent_walk_is_bounded_to_eight_hops():
    table = ProcessTable(FakeProc(), ticks_per_second=TICKS)
    start = _chain(table, 8, "/eight")
    assert table.resolve(start, "f", AT_FDCWD) == ResolvedPath("/eight/f", True)

    table = ProcessTable(FakeProc(), ticks_per_second=TICKS)
    start = _chain(table, 9, "/nine")
    assert table.resolve(start, "f", AT_FDCWD) == ResolvedPath("f", False)
    assert table.stats["unresolved"] == 1


def test_self_parent_does_not_loop():
    proc = FakeProc()
    table = ProcessTable(proc, ticks_per_second=TICKS)
    key = table.key_of(hdr(5, SECOND, 5, SECOND))
    assert table.resolve(key, "f", AT_FDCWD) == ResolvedPath("f", False)
    assert proc.calls == [("cwd", 5)]


def test_dirfd_resolved_through_fd_path():
    proc = FakeProc(cwd={500: "/not/used"}, fds={(500, 7): "/data/dir"})
    table = ProcessTable(proc, ticks_per_second=TICKS)
    key = table.key_of(hdr(500, 0))  # nothing to check /proc against: taken as it is
    assert table.resolve(key, "x/../y", 7) == ResolvedPath("/data/dir/y", True)
    assert proc.calls == [("fd_path", 500, 7)]
    assert table.resolve(key, "", 7) == ResolvedPath("/data/dir", True)  # fd-only (fchmod)
    assert table.stats == {"proc_reads": 2, "unresolved": 0, "evicted": 0, "stale_proc": 0,
                           "cwd_lost": 0, "fork_unsent": 0}


def test_dirfd_unknown_is_unresolved():
    table = ProcessTable(FakeProc(cwd={500: "/cwd"}), ticks_per_second=TICKS)
    key = table.key_of(hdr(500, 0))
    assert table.resolve(key, "y", 8) == ResolvedPath("y", False)
    assert table.resolve(key, "", 8) == ResolvedPath("", False)
    assert table.stats["unresolved"] == 2


def test_relative_chdir_with_unknown_cwd_forgets_cwd():
    proc = FakeProc()
    table = ProcessTable(proc, ticks_per_second=TICKS)
    key = table.key_of(hdr(650, 0))
    table.on_chdir(key, "sub", -1)
    proc.cwds[650] = "/later"
    # cwd stayed unknown, so a later lookup goes to /proc again
    assert table.resolve(key, "f", AT_FDCWD) == ResolvedPath("/later/f", True)


def test_relative_chdir_of_new_child_starts_from_parent_cwd():
    # the child's /proc cwd was read after its chdir("cgi-bin"): it must not be applied twice
    proc = FakeProc(cwd={800: "/www", 801: "/www/cgi-bin"})
    table = ProcessTable(proc, ticks_per_second=TICKS)
    child = table.key_of(hdr(801, 0, 800, 0))
    table.on_chdir(child, "cgi-bin", -1)
    assert table.resolve(child, "app", AT_FDCWD) == ResolvedPath("/www/cgi-bin/app", True)
    assert ("cwd", 801) not in proc.calls


def test_relative_chdir_starts_from_the_kernels_cwd_base_when_parents_are_gone():
    # httpd (900, /www) forks a connection child (901, exits at once) which forks the CGI (902):
    # neither 901 nor 902 is alive when the events are processed
    proc = FakeProc(cwd={900: "/www"})
    table = ProcessTable(proc, ticks_per_second=TICKS)
    cgi = table.key_of(hdr(902, 0, 901, 0))
    table.on_chdir(cgi, "./cgi-bin", -1, base=900)
    assert table.resolve(cgi, "app", AT_FDCWD) == ResolvedPath("/www/cgi-bin/app", True)


def test_fchdir_reads_proc():
    proc = FakeProc(cwd={700: "/var/lib"})
    table = ProcessTable(proc, ticks_per_second=TICKS)
    key = table.key_of(hdr(700, 0))
    table.on_chdir(key, "/ignored", -1)
    table.on_chdir(key, None, 5)
    assert proc.calls == [("cwd", 700)]
    assert table.resolve(key, "x", AT_FDCWD) == ResolvedPath("/var/lib/x", True)
    assert proc.calls == [("cwd", 700)]


def test_fchdir_with_process_gone_drops_the_stale_cwd():
    proc = FakeProc(cwd={1: "/"})
    table = ProcessTable(proc, ticks_per_second=TICKS)
    key = table.key_of(hdr(701, 0, 1, 0))
    table.on_chdir(key, "/a", -1)
    table.on_chdir(key, None, 3)  # /proc/701 is gone: the cwd is no longer known
    assert table.resolve(key, "x", AT_FDCWD) == ResolvedPath("/x", True)  # the parent's


def test_live_exe_is_checked_against_the_start():
    proc = FakeProc(exe={9: "/memfd:payload (deleted)"}, ticks={9: 12 * TICKS})
    table = ProcessTable(proc, ticks_per_second=TICKS)
    assert table.live_exe(table.key_of(hdr(9, 12 * SECOND))) == "/memfd:payload (deleted)"
    proc.ticks[9] = 40 * TICKS
    assert table.live_exe(ProcKey(9, 12 * SECOND)) is None


def test_fd_of_path():
    assert ProcessTable.fd_of_path("/proc/self/fd/3") == 3
    assert ProcessTable.fd_of_path("/dev/fd/12") == 12
    assert ProcessTable.fd_of_path("/proc/self/exe") is None
    assert ProcessTable.fd_of_path("/dev/fd/3/x") is None
