"""Feature windows: exact vectors from hand-built TraceRecords on a fake clock."""

from __future__ import annotations

import pytest
from driftwarden.core.records import ContainerView, TraceRecord
from driftwarden.models import features as features_module
from driftwarden.models.features import (
    FEATURES,
    WindowAggregator,
    is_public_address,
    is_shell,
    is_writable_location,
    vector_dict,
)
from driftwarden.probes._layout import AT_FDCWD, EventKind, FileOp, Flag
from driftwarden.probes.events import (
    ChdirEvent,
    ConnectEvent,
    ExecEvent,
    Family,
    FileEvent,
    Header,
    SockType,
)

CID = "f00dcafe" * 8
OTHER = "0123abcd" * 8
WEB = ContainerView(state="container", cgroup_id=777, id=CID, name="web", image="nginx:1.25",
                    image_id="sha256:" + "ab" * 32, runtime="docker")
DB = ContainerView(state="container", cgroup_id=778, id=OTHER, name="db", image="postgres:16",
                   image_id="sha256:" + "cd" * 32, runtime="docker")
HOST = ContainerView(state="host", cgroup_id=1)
UNKNOWN = ContainerView(state="unknown", cgroup_id=999)

O_WRONLY, O_CREAT, O_TRUNC, O_APPEND = 0o1, 0o100, 0o1000, 0o2000


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def header(kind: EventKind, comm: str = "sh") -> Header:
    return Header(kind=kind, ts_ns=1, cgroup_id=777, pid=4243, tgid=4242, ppid=4000, uid=0,
                  gid=0, comm=comm, flags=Flag(0), suppressed=0)


def exec_rec(path: str, argv: tuple[str, ...] | None = None, *, retval: int = 0,
             exe: str | None = None, view: ContainerView = WEB, **kw) -> TraceRecord:
    argv = argv if argv is not None else (path.rsplit("/", 1)[-1],)
    event = ExecEvent(header=header(EventKind.EXEC), filename=path, argv=argv, retval=retval,
                      dirfd=AT_FDCWD)
    return TraceRecord(event=event, kind="exec", container=view, ppid=4000, path=path,
                       exe=exe if exe is not None else (path if retval == 0 else None), **kw)


def connect_rec(address: str = "10.0.0.5", port: int = 8080, *, retval: int = 0,
                family: Family = Family.INET, view: ContainerView = WEB) -> TraceRecord:
    event = ConnectEvent(header=header(EventKind.CONNECT), family=family, family_number=2,
                         address=address, port=port, sock_type=SockType.TCP, retval=retval, fd=5)
    return TraceRecord(event=event, kind="connect", container=view, ppid=4000)


def write_rec(op: FileOp, path: str | None, path2: str | None = None, *, flags: int = 0,
              mode: int = 0, view: ContainerView = WEB) -> TraceRecord:
    event = FileEvent(header=header(EventKind.FILE), op=op, path=path, path2=path2,
                      dirfd=AT_FDCWD, dirfd2=AT_FDCWD, open_flags=flags, mode=mode, retval=0)
    return TraceRecord(event=event, kind="write", container=view, ppid=4000, path=path,
                       path2=path2)


def expected(**nonzero: float) -> tuple[float, ...]:
    assert set(nonzero) <= set(FEATURES)
    return tuple(float(nonzero.get(name, 0)) for name in FEATURES)


def test_feature_order_is_append_only():
    # Stored baselines depend on this order: append new names, never edit this prefix.
    assert FEATURES[:21] == (
        "execs", "distinct_executables", "shells_spawned", "execs_from_writable", "connects",
        "distinct_destinations", "failed_connects", "connects_public", "writes_create",
        "writes_truncate", "writes_append", "writes_rename", "writes_unlink", "writes_chmod_x",
        "writes_setuid", "writes_other", "distinct_write_dirs", "novel_exec", "novel_connect",
        "novel_write", "execs_failed")
    assert len(set(FEATURES)) == len(FEATURES)


def test_exact_vector_of_one_window():
    clock = FakeClock(100.0)
    agg = WindowAggregator(10.0, clock=clock)
    agg.add(exec_rec("/bin/sh", ("sh", "-c", "id")), frozenset({"exec"}))
    clock.t = 101.0
    agg.add(exec_rec("/bin/sh", ("sh", "-c", "ls")))
    agg.add(connect_rec("10.0.0.5", 8080, retval=-111))  # refused
    agg.add(write_rec(FileOp.CHMOD, "/tmp/payload", mode=0o755), frozenset({"write"}))
    agg.add(write_rec(FileOp.RENAME, "/app/tmp/x", "/usr/bin/x"))
    clock.t = 109.99
    assert agg.tick() == []
    clock.t = 110.0
    [win] = agg.tick()
    assert win.container_id == CID
    assert win.image_id == WEB.image_id and win.image == "nginx:1.25"
    assert (win.start, win.end) == (100.0, 110.0)
    assert win.events == 5 and not win.tainted and win.taint_reasons == ()
    assert win.vector == expected(
        execs=2, distinct_executables=1, shells_spawned=2, connects=1, distinct_destinations=1,
        failed_connects=1, writes_chmod_x=1, writes_rename=1, distinct_write_dirs=3,
        novel_exec=1, novel_write=1)
    assert vector_dict(win.vector)["shells_spawned"] == 2.0
    assert win.as_dict() == vector_dict(win.vector)


def test_exec_features():
    clock = FakeClock(0.0)
    agg = WindowAggregator(10.0, clock=clock)
    agg.add(exec_rec("/proc/self/exe", ("sh", "-c", "x"), exe="/bin/busybox"))  # busybox applet
    agg.add(exec_rec("/proc/self/exe", ("wget", "x"), exe="/bin/busybox"))
    agg.add(exec_rec("/bin/bash", ("-bash",)))
    agg.add(exec_rec("/tmp/.x/payload"))
    agg.add(exec_rec("/usr/bin/python3", exe="/dev/shm/py"))  # renamed copy
    agg.add(exec_rec("/home/app/run.sh", ("run.sh",), exe="/bin/dash"))  # script in home
    agg.add(exec_rec("/usr/local/sbin/foo", retval=-2))  # PATH search miss
    agg.add(exec_rec("/usr/local/bin/foo", retval=-2))
    [win] = agg.tick(10.0)
    assert win.vector == expected(execs=6, distinct_executables=6, shells_spawned=3,
                                  execs_from_writable=3, execs_failed=2)


@pytest.mark.parametrize(("names", "shell"), [
    (("/bin/sh",), True), (("/bin/busybox", "sh"), True), (("/usr/bin/zsh",), True),
    (("-ash",), True), (("/bin/bashful",), False), (("/usr/bin/ssh",), False), ((None,), False),
])
def test_is_shell(names, shell):
    assert is_shell(*names) is shell


@pytest.mark.parametrize(("path", "writable"), [
    ("/tmp/x", True), ("/var/tmp/x", True), ("/dev/shm/x", True), ("/run/x", True),
    ("/root/x", True), ("/home/u/x", True), ("/memfd:x (deleted)", True), ("/tmp", True),
    ("/tmpfoo/x", False), ("/usr/bin/x", False), ("/running", False), (None, False),
])
def test_writable_locations(path, writable):
    assert is_writable_location(path) is writable


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("2606:4700::1111", True), ("::ffff:8.8.8.8", True),
    ("127.0.0.1", False), ("10.1.2.3", False), ("192.168.1.1", False), ("172.17.0.2", False),
    ("169.254.169.254", False), ("::1", False), ("fe80::1", False), ("0.0.0.0", False),
    ("224.0.0.1", False), ("not-an-ip", False),
])
def test_public_addresses(address, public):
    assert is_public_address(address) is public


def test_connect_features():
    agg = WindowAggregator(10.0, clock=FakeClock(0.0))
    agg.add(connect_rec("8.8.8.8", 53, retval=0))
    agg.add(connect_rec("8.8.8.8", 53, retval=-115))  # in-progress: not a failure
    agg.add(connect_rec("10.0.0.9", 80, retval=-113))  # unreachable
    agg.add(connect_rec("10.0.0.9", 81, retval=-110))  # timed out
    agg.add(connect_rec("10.0.0.9", 82, retval=-13))  # denied
    agg.add(connect_rec("10.0.0.9", 83, retval=-22))  # error
    agg.add(connect_rec("/run/docker.sock", 0, family=Family.UNIX))
    [win] = agg.tick(10.0)
    assert win.vector == expected(connects=7, distinct_destinations=6, failed_connects=4,
                                  connects_public=2)


def test_write_classes_are_exclusive():
    agg = WindowAggregator(10.0, clock=FakeClock(0.0))
    agg.add(write_rec(FileOp.OPEN, "/app/a", flags=O_WRONLY | O_CREAT | O_TRUNC))  # create
    agg.add(write_rec(FileOp.OPEN, "/app/log", flags=O_WRONLY | O_CREAT | O_APPEND))  # append
    agg.add(write_rec(FileOp.OPEN, "/app/b", flags=O_WRONLY | O_TRUNC))  # truncate
    agg.add(write_rec(FileOp.TRUNCATE, "/app/c"))  # truncate
    agg.add(write_rec(FileOp.OPEN, "/app/d", flags=O_WRONLY))  # other
    agg.add(write_rec(FileOp.UNLINK, "/app/e"))
    agg.add(write_rec(FileOp.RMDIR, "/app/dir"))
    agg.add(write_rec(FileOp.CHMOD, "/app/f", mode=0o4755))  # setuid
    agg.add(write_rec(FileOp.CHMOD, "/app/g", mode=0o2755))  # setgid
    agg.add(write_rec(FileOp.CHMOD, "/app/h", mode=0o644))  # other
    agg.add(write_rec(FileOp.CHMOD, None, mode=0o700))  # fchmod +x: no path
    agg.add(write_rec(FileOp.MKDIR, "/var/cache/x/"))  # other
    agg.add(write_rec(FileOp.SYMLINK, "/app/i", "/app/j"))  # other
    [win] = agg.tick(10.0)
    assert win.vector == expected(writes_create=1, writes_append=1, writes_truncate=2,
                                  writes_other=4, writes_unlink=2, writes_setuid=2,
                                  writes_chmod_x=1, distinct_write_dirs=2)
    assert win.events == 13


def test_tick_boundaries_are_aligned_and_add_closes_a_late_window():
    clock = FakeClock(103.0)
    agg = WindowAggregator(10.0, clock=clock)
    agg.add(exec_rec("/bin/ls"))
    clock.t = 109.999
    agg.add(exec_rec("/bin/ls"))
    clock.t = 110.0  # first instant of the next window; no tick in between
    agg.add(exec_rec("/bin/cat"))
    clock.t = 115.0
    [first] = agg.tick()
    assert (first.start, first.end, first.events) == (100.0, 110.0, 2)
    assert first.vector == expected(execs=2, distinct_executables=1)
    [second] = agg.tick(120.0)
    assert (second.start, second.end, second.events) == (110.0, 120.0, 1)


def test_windows_of_many_containers_come_out_in_one_tick_sorted():
    agg = WindowAggregator(5.0, clock=FakeClock(0.0))
    agg.add(exec_rec("/bin/ls", view=WEB))
    agg.add(exec_rec("/bin/ls", view=DB))
    wins = agg.tick(5.0)
    assert [w.container_id for w in wins] == sorted([CID, OTHER])
    assert {w.image_id for w in wins} == {WEB.image_id, DB.image_id}


def test_idle_windows_then_dropped():
    agg = WindowAggregator(10.0, clock=FakeClock(100.0))
    agg.add(connect_rec())
    assert [w.events for w in agg.tick(110.0)] == [1]
    for end in (120.0, 130.0, 140.0):  # silent: still emitted, all zeros
        [idle] = agg.tick(end)
        assert idle.events == 0 and idle.vector == expected() and idle.end == end
        assert not idle.tainted
    assert len(agg) == 1
    assert agg.tick(150.0) == []  # silent for a 4th window: dropped
    assert len(agg) == 0 and agg.stats.dropped_silent == 1


def test_activity_resets_idle_count_and_a_long_gap_is_bounded():
    clock = FakeClock(100.0)
    agg = WindowAggregator(10.0, clock=clock)
    agg.add(connect_rec())
    assert len(agg.tick(125.0)) == 2  # active + 1 idle
    clock.t = 125.0
    agg.add(connect_rec())
    wins = agg.tick(10_000_000.0)  # asleep for ages: active + 3 idle, not a million windows
    assert [w.events for w in wins] == [1, 0, 0, 0]
    assert len(agg) == 0
    clock.t = 10_000_001.0
    agg.add(connect_rec())  # wakes up: a fresh state
    [win] = agg.tick(10_000_010.0)
    assert (win.start, win.events) == (10_000_000.0, 1)


def test_taint_marks_only_the_current_window():
    clock = FakeClock(0.0)
    agg = WindowAggregator(10.0, clock=clock)
    agg.add(exec_rec("/bin/ls"))
    agg.mark_tainted(CID, "kernel dropped 12 events")
    agg.mark_tainted(CID, "kernel dropped 12 events")  # reasons are not repeated
    agg.mark_tainted(CID, "unattributed events")
    clock.t = 10.0
    agg.add(exec_rec("/bin/ls"))
    [tainted] = agg.tick(10.0)
    assert tainted.tainted
    assert tainted.taint_reasons == ("kernel dropped 12 events", "unattributed events")
    [clean] = agg.tick(20.0)
    assert not clean.tainted and clean.events == 1


def test_records_count_at_the_time_given_and_a_late_one_in_the_open_window():
    """The agent gives each record its event's time: the clock (ahead, the agent lagging)
    neither places records nor, through a taint, closes windows."""
    clock = FakeClock(105.0)
    agg = WindowAggregator(10.0, clock=clock)
    agg.add(exec_rec("/bin/ls"), now=98.0)
    agg.add(exec_rec("/bin/ls"), now=99.5)
    agg.mark_all_tainted("kernel dropped events")  # the open window [90, 100), not the clock's
    agg.add(exec_rec("/bin/ls"), now=100.5)  # closes [90, 100)
    agg.add(exec_rec("/bin/ls"), now=99.9)  # its window closed already: counted in the open one
    assert agg.stats.late == 1
    first, second = agg.tick(110.0)
    assert (first.start, first.events, first.taint_reasons) == (
        90.0, 2, ("kernel dropped events",))
    assert (second.start, second.events, second.tainted) == (100.0, 2, False)


def test_taint_of_a_silent_or_new_container_and_taint_all():
    clock = FakeClock(0.0)
    agg = WindowAggregator(10.0, clock=clock)
    agg.mark_tainted(OTHER, "drops")  # no record yet: its window exists and is tainted
    agg.add(exec_rec("/bin/ls"))
    agg.mark_all_tainted("ring buffer full")
    wins = {w.container_id: w for w in agg.tick(10.0)}
    assert wins[OTHER].events == 0 and wins[OTHER].taint_reasons == ("drops", "ring buffer full")
    assert wins[CID].taint_reasons == ("ring buffer full",)


def test_records_without_container_runtime_setup_and_chdir_are_ignored():
    agg = WindowAggregator(10.0, clock=FakeClock(0.0))
    agg.add(exec_rec("/bin/ls", view=HOST))
    agg.add(exec_rec("/bin/ls", view=UNKNOWN))
    agg.add(exec_rec("/pause", runtime_setup=True))
    chdir = ChdirEvent(header=header(EventKind.CHDIR), path="/tmp", fd=-1, retval=0)
    agg.add(TraceRecord(event=chdir, kind="chdir", container=WEB, ppid=1, path="/tmp"))
    assert agg.tick(10.0) == []
    assert len(agg) == 0
    assert dict(agg.stats.ignored) == {"no_container": 2, "runtime_setup": 1, "kind": 1}


def test_lru_evicts_the_least_recent_container_with_a_tainted_partial_window():
    third = ContainerView(state="container", cgroup_id=5, id="9" * 64, image_id="sha256:ee")
    agg = WindowAggregator(10.0, clock=FakeClock(0.0), max_containers=2)
    agg.add(exec_rec("/bin/ls", view=WEB))
    agg.add(exec_rec("/bin/ls", view=DB))
    agg.add(exec_rec("/bin/ls", view=WEB))  # WEB is now the most recent
    agg.add(exec_rec("/bin/ls", view=third))
    assert len(agg) == 2 and set(agg.containers()) == {CID, "9" * 64}
    assert agg.stats.evicted == 1
    wins = {w.container_id: w for w in agg.tick(10.0)}
    assert wins[OTHER].taint_reasons == ("evicted",)
    assert not wins[CID].tainted and wins[CID].events == 2


def test_distinct_counts_saturate():
    agg = WindowAggregator(10.0, clock=FakeClock(0.0), max_distinct=3)
    for port in range(10):
        agg.add(connect_rec("10.0.0.1", port))
    [win] = agg.tick(10.0)
    assert vector_dict(win.vector)["distinct_destinations"] == 3
    assert vector_dict(win.vector)["connects"] == 10


def test_flush_closes_partial_windows():
    clock = FakeClock(3.0)
    agg = WindowAggregator(10.0, clock=clock)
    agg.add(exec_rec("/bin/ls"))
    clock.t = 14.0
    agg.add(exec_rec("/bin/ls"))
    wins = agg.flush()
    assert [(w.end, w.tainted, w.taint_reasons) for w in wins] == [
        (10.0, False, ()), (14.0, True, ("partial",))]
    assert len(agg) == 0


def test_bad_arguments():
    with pytest.raises(ValueError):
        WindowAggregator(0)
    with pytest.raises(ValueError):
        WindowAggregator(10.0, max_containers=0)


def test_distinct_write_dirs_are_exact_past_the_parent_cache_bound(monkeypatch):
    # the parent-directory cache (WindowAggregator._parent_of) is emptied when full: windows
    # must count the same directories whatever it holds, odd paths included
    monkeypatch.setattr(features_module, "_MAX_CACHED_PARENTS", 3)
    paths = ["/a/b", "/a/c", "/a/b/", "/x", "//y", "/", "/a/b/c", "/q/r", "/a/c", "/x",
             "/q/r/s", "/a/b", "rel/f", "/q/r"]
    agg = WindowAggregator(10.0, clock=FakeClock(0.0))
    for path in paths:
        agg.add(write_rec(FileOp.OPEN, path, flags=0o2001))
    [win] = agg.tick(10.0)
    # /a, /, // (posixpath.dirname("//y")), /a/b, /q, /q/r, rel
    assert vector_dict(win.vector)["distinct_write_dirs"] == 7
    assert vector_dict(win.vector)["writes_append"] == len(paths)
