"""TracePipeline on fakes: a list of raw records, a dict /proc, a scripted attribution, a clock."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from driftwarden.agent.output import record_to_dict
from driftwarden.agent.pipeline import (
    ReplayAttribution,
    ReplayProcReader,
    TraceFilter,
    TracePipeline,
)
from driftwarden.core.records import ContainerView, Program, TraceRecord
from driftwarden.probes._layout import FileOp, Limits
from driftwarden.probes.capture import CaptureWriter, ReplayCapture

from tests.test_decode import (
    chdir_record,
    connect_record,
    exec_record,
    exec_repeat_record,
    exit_record,
    file_record,
    fork_record,
    ipv4,
)
from tests.test_processes import FakeProc, snap

LIMITS = Limits()
OFFSET = 1_700_000_000_000_000_000
COUNTERS = {"exec": {"emitted": 3, "suppressed": 0, "dropped": 0, "read_failed": 0}}

HOST_CG, WEB_CG, DB_CG, NEW_CG, OTHER_NEW_CG = 1, 500, 600, 700, 800
WEB_ID = "f00dcafe" * 8
DB_ID = "0123abcd" * 8

VIEWS = {
    HOST_CG: ContainerView(state="host", cgroup_id=HOST_CG, cgroup_path="/"),
    WEB_CG: ContainerView(state="container", cgroup_id=WEB_CG, id=WEB_ID, name="web",
                          image="nginx:1.25", image_id="sha256:aa", runtime="docker",
                          labels=(("app", "web"),)),
    DB_CG: ContainerView(state="container", cgroup_id=DB_CG, id=DB_ID, name="db",
                         image="postgres:16", runtime="docker"),
    NEW_CG: ContainerView(state="container", cgroup_id=NEW_CG, id="7" * 64, name="fresh",
                          image="busybox", runtime="docker"),
    OTHER_NEW_CG: ContainerView(state="container", cgroup_id=OTHER_NEW_CG, id="8" * 64,
                                name="fresh2", image="busybox", runtime="docker"),
}


class FakeSource:
    """A CaptureSource over a list of batches; `before` runs a hook before a batch is handed out."""

    def __init__(self, batches: list[list[bytes]], *,
                 before: dict[int, Callable[[], None]] | None = None) -> None:
        self.limits = LIMITS
        self.clock_offset_ns = OFFSET
        self._batches = list(batches)
        self._before = before or {}
        self._next = 0
        self.closed = False

    def read_batch(self, timeout: float) -> list[bytes] | None:
        if self._next >= len(self._batches):
            return None
        hook = self._before.get(self._next)
        if hook is not None:
            hook()
        batch = self._batches[self._next]
        self._next += 1
        return batch

    def counters(self) -> dict[str, dict[str, int]]:
        return COUNTERS

    def close(self) -> None:
        self.closed = True


class FakeAttribution:
    """Fixed views; a cgroup in `pending_for` answers "pending" (or `waiting_state`) for its
    first N lookups."""

    def __init__(self, views=None, *, pending_for=None, waiting_state: str = "pending") -> None:
        self.views = dict(VIEWS if views is None else views)
        self.pending_for = dict(pending_for or {})
        self.waiting_state = waiting_state
        self.lookups: list[int] = []

    def lookup(self, cgroup_id: int) -> ContainerView:
        self.lookups.append(cgroup_id)
        left = self.pending_for.get(cgroup_id, 0)
        if left > 0:
            self.pending_for[cgroup_id] = left - 1
            return ContainerView(state=self.waiting_state, cgroup_id=cgroup_id)
        return self.views.get(cgroup_id, ContainerView(state="unknown", cgroup_id=cgroup_id))


class ListSink:
    def __init__(self) -> None:
        self.records: list[TraceRecord] = []
        self.flushes = 0

    def write(self, record: TraceRecord) -> None:
        self.records.append(record)

    def flush(self) -> None:
        self.flushes += 1


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def make(batches=(), *, proc=None, attribution=None, trace_filter=None, clock=None,
         recorder=None, before=None, **kw):
    sink = ListSink()
    pipeline = TracePipeline(
        FakeSource(list(batches), before=before),
        proc=proc if proc is not None else FakeProc(),
        attribution=attribution if attribution is not None else FakeAttribution(),
        sinks=[sink],
        trace_filter=trace_filter,
        recorder=recorder,
        clock=clock if clock is not None else FakeClock(),
        **kw,
    )
    return pipeline, sink


def brief(record: TraceRecord) -> tuple:
    """(kind, tgid, container state, path or address) of a delivered record."""
    e = record.event
    what = record.path if record.kind != "connect" else e.address
    return record.kind, e.header.tgid, record.container.state, what


def w(path: str, *, cg: int = WEB_CG, tgid: int = 10, **kw) -> bytes:
    return file_record(FileOp.OPEN, path, open_flags=0o1101, cgroup_id=cg, tgid=tgid, pid=tgid,
                       **kw)


# -- basic flow -----------------------------------------------------------------


def test_records_flow_to_the_sink_with_views():
    proc = FakeProc(exe={10: "/usr/bin/curl"})
    batches = [[
        exec_record("/usr/bin/curl", ["curl", "db:5432"], cgroup_id=WEB_CG, tgid=10, pid=10,
                    ppid=9, comm="curl"),
        connect_record(family=2, addr=ipv4("10.0.0.2"), port=5432, cgroup_id=WEB_CG, tgid=10),
        w("/tmp/out", cg=DB_CG, tgid=20),
    ]]
    pipeline, sink = make(batches, proc=proc)
    summary = pipeline.run()
    assert [brief(r) for r in sink.records] == [
        ("exec", 10, "container", "/usr/bin/curl"),
        ("connect", 10, "container", "10.0.0.2"),
        ("write", 20, "container", "/tmp/out"),
    ]
    assert [r.container for r in sink.records] == [VIEWS[WEB_CG], VIEWS[WEB_CG], VIEWS[DB_CG]]
    assert sink.records[0].exe == "/usr/bin/curl"
    assert sink.records[0].ppid == 9
    assert dict(summary.shown) == {"exec": 1, "connect": 1, "write": 1}
    assert dict(summary.decoded) == {"exec": 1, "connect": 1, "file": 1}
    assert dict(summary.filtered) == {}
    assert summary.kernel == COUNTERS
    assert summary.pending_timeouts == 0
    assert sink.flushes >= 2


def test_decode_errors_are_counted_and_skipped():
    batches = [[b"\x01\x02", w("/a"), file_record(42, "/x", cgroup_id=WEB_CG), w("/b")]]
    pipeline, sink = make(batches)
    summary = pipeline.run()
    assert [r.path for r in sink.records] == ["/a", "/b"]
    assert dict(summary.decode_errors) == {"unknown:short-header": 1, "file:file-op-42": 1}


# -- pending metadata ------------------------------------------------------------


def test_pending_container_buffered_then_delivered_in_order():
    attribution = FakeAttribution(pending_for={NEW_CG: 2})
    clock = FakeClock()
    pipeline, sink = make(attribution=attribution, clock=clock)
    pipeline.process([w("/one", cg=NEW_CG), w("/x", cg=DB_CG, tgid=20), w("/two", cg=NEW_CG)])
    # NEW_CG asked once for /one (pending), /two queued behind it, then once at batch end
    assert [brief(r) for r in sink.records] == [("write", 20, "container", "/x")]
    clock.t += 0.5
    pipeline.process([w("/three", cg=NEW_CG)])
    # third lookup: resolved; everything it held goes out in arrival order
    assert [brief(r) for r in sink.records] == [
        ("write", 20, "container", "/x"),
        ("write", 10, "container", "/one"),
        ("write", 10, "container", "/two"),
        ("write", 10, "container", "/three"),
    ]
    assert all(r.container == VIEWS[NEW_CG] for r in sink.records[1:])
    assert pipeline.summary.pending_timeouts == 0
    assert attribution.lookups == [NEW_CG, DB_CG, NEW_CG, NEW_CG]


def test_unknown_cgroup_waits_like_pending():
    attribution = FakeAttribution(pending_for={NEW_CG: 1}, waiting_state="unknown")
    pipeline, sink = make(attribution=attribution)
    pipeline.process([w("/one", cg=NEW_CG)])
    assert [r.container.state for r in sink.records] == ["container"]
    assert pipeline.summary.pending_timeouts == 0


def test_pending_timeout_sends_with_what_is_known():
    attribution = FakeAttribution(pending_for={NEW_CG: 10**6})
    clock = FakeClock(100.0)
    pipeline, sink = make(attribution=attribution, clock=clock, pending_timeout=1.0)
    pipeline.process([w("/one", cg=NEW_CG), w("/two", cg=NEW_CG)])
    clock.t = 100.5
    pipeline.process([w("/three", cg=NEW_CG)])
    clock.t = 100.999
    pipeline.process([])
    assert sink.records == []
    clock.t = 101.0  # the oldest has waited pending_timeout
    pipeline.process([])
    assert [brief(r) for r in sink.records] == [
        ("write", 10, "pending", "/one"),
        ("write", 10, "pending", "/two"),
        ("write", 10, "pending", "/three"),
    ]
    assert sink.records[0].container == ContainerView(state="pending", cgroup_id=NEW_CG)
    assert pipeline.summary.pending_timeouts == 3
    assert dict(pipeline.summary.shown) == {"write": 3}
    # metadata arrives later: new records get it
    attribution.pending_for[NEW_CG] = 0
    pipeline.process([w("/four", cg=NEW_CG)])
    assert brief(sink.records[-1]) == ("write", 10, "container", "/four")
    assert pipeline.summary.pending_timeouts == 3


def test_run_end_flushes_everything_still_waiting():
    attribution = FakeAttribution(pending_for={NEW_CG: 10**6})
    batches = [[w("/one", cg=NEW_CG)], [w("/x", cg=DB_CG, tgid=20), w("/two", cg=NEW_CG)]]
    pipeline, sink = make(batches, attribution=attribution, pending_timeout=60.0)
    summary = pipeline.run()
    assert [brief(r) for r in sink.records] == [
        ("write", 20, "container", "/x"),
        ("write", 10, "pending", "/one"),
        ("write", 10, "pending", "/two"),
    ]
    assert summary.pending_timeouts == 2


def test_pending_capacity_overflow_is_sent_in_order_and_counted():
    attribution = FakeAttribution(pending_for={NEW_CG: 10**6})
    pipeline, sink = make(attribution=attribution, pending_capacity=2, pending_timeout=60.0)
    pipeline.process([w("/one", cg=NEW_CG), w("/two", cg=NEW_CG), w("/three", cg=NEW_CG)])
    assert [brief(r) for r in sink.records] == [
        ("write", 10, "pending", "/one"),
        ("write", 10, "pending", "/two"),
        ("write", 10, "pending", "/three"),
    ]
    assert pipeline.summary.pending_timeouts == 3


def test_pending_capacity_overflow_flushes_the_oldest_container_first():
    attribution = FakeAttribution(pending_for={NEW_CG: 10**6, OTHER_NEW_CG: 10**6})
    pipeline, sink = make(attribution=attribution, pending_capacity=2, pending_timeout=60.0)
    pipeline.process([w("/a1", cg=NEW_CG), w("/a2", cg=NEW_CG), w("/b1", cg=OTHER_NEW_CG)])
    assert [brief(r)[3] for r in sink.records] == ["/a1", "/a2"]  # b1 still waits
    assert pipeline.summary.pending_timeouts == 2


def test_unreadable_path_is_unresolved_not_the_cwd():
    pipeline, sink = make()
    pipeline.process([chdir_record("/app", cgroup_id=WEB_CG, tgid=10), w("", cg=WEB_CG, tgid=10)])
    (record,) = sink.records
    assert record.path == "" and record.path_resolved is False
    assert pipeline.summary.unresolved_paths == 1


# -- filters ---------------------------------------------------------------------


def _mixed() -> list[bytes]:
    return [
        exec_record("/bin/ls", ["ls"], cgroup_id=HOST_CG, tgid=1, comm="ls"),
        w("/etc/host-file", cg=HOST_CG, tgid=1),
        exec_record("/bin/sh", ["sh"], cgroup_id=WEB_CG, tgid=10, comm="sh"),
        connect_record(family=2, addr=ipv4("1.1.1.1"), port=53, sock_type=2, cgroup_id=DB_CG,
                       tgid=20),
        w("/var/lib/db", cg=DB_CG, tgid=20),
    ]


def test_host_events_filtered_by_default():
    pipeline, sink = make([_mixed()])
    summary = pipeline.run()
    assert [brief(r)[:2] for r in sink.records] == [("exec", 10), ("connect", 20), ("write", 20)]
    assert dict(summary.filtered) == {"host": 2}


def test_include_host():
    pipeline, sink = make([_mixed()], trace_filter=TraceFilter(include_host=True))
    summary = pipeline.run()
    assert [brief(r)[:3] for r in sink.records][:2] == [("exec", 1, "host"), ("write", 1, "host")]
    assert len(sink.records) == 5
    assert dict(summary.filtered) == {}


def test_kind_filter():
    pipeline, sink = make([_mixed()], trace_filter=TraceFilter(kinds=frozenset({"exec"})))
    summary = pipeline.run()
    assert [brief(r)[:2] for r in sink.records] == [("exec", 10)]
    # kind is checked first: the host's write counts as "kind", its exec as "host"
    assert dict(summary.filtered) == {"kind": 3, "host": 1}
    assert dict(summary.shown) == {"exec": 1}


@pytest.mark.parametrize(("selectors", "tgids"), [
    (("web",), [10]),
    (("/web",), [10]),
    (("db",), [20, 20]),
    (("f00dcafe",), [10]),
    (("0123",), [20, 20]),
    ((WEB_ID,), [10]),
    (("web", "0123abcd0123"), [10, 20, 20]),
    (("f00",), []),  # id prefixes need at least 4 characters
    (("nginx:1.25",), []),  # an image is not a container selector
    (("we",), []),
])
def test_container_selector(selectors, tgids):
    pipeline, sink = make([_mixed()], trace_filter=TraceFilter(containers=selectors))
    summary = pipeline.run()
    assert [r.event.header.tgid for r in sink.records] == tgids
    assert summary.filtered["container"] == 3 - len(tgids)
    assert summary.filtered["host"] == 2


def test_container_view_matches():
    web = VIEWS[WEB_CG]
    assert web.matches("web") and web.matches("/web")
    assert web.matches("f00d") and web.matches(WEB_ID)
    assert not web.matches("f00") and not web.matches("web2") and not web.matches("cafe")
    unnamed = ContainerView(state="container", cgroup_id=5)
    assert not unnamed.matches("abcd")
    assert not unnamed.matches("")


def test_view_dict_round_trip():
    for view in VIEWS.values():
        assert ContainerView.from_dict(view.to_dict()) == view


# -- runtime setup ---------------------------------------------------------------


def _runc_batch() -> list[bytes]:
    return [
        w("/proc/self/attr/exec", tgid=30, comm="runc:[2:INIT]"),
        chdir_record("/app", cgroup_id=WEB_CG, tgid=30, comm="runc:[2:INIT]"),
        w("relative", tgid=30, comm="runc"),
        exec_record("/app/server", ["server"], cgroup_id=WEB_CG, tgid=30, comm="server"),
        w("/app/server.pid", tgid=30, comm="server"),
        w("/late", tgid=30, comm="runc:[2:INIT]"),  # comm alone does not make it setup
        w("/other", tgid=31, comm="runc:[1:CHILD]"),  # a tgid that never exec'd
    ]


def test_runtime_setup_filtered_and_counted():
    pipeline, sink = make([_runc_batch()])
    summary = pipeline.run()
    assert [(r.kind, r.path) for r in sink.records] == [
        ("exec", "/app/server"), ("write", "/app/server.pid"), ("write", "/late")]
    assert not any(r.runtime_setup for r in sink.records)
    assert dict(summary.filtered) == {"runtime_setup": 3}


def test_runtime_setup_is_known_by_the_process_not_by_its_pid():
    """After a pid wrap, runc's next container setup may get the pid of a process that exec'd
    long ago: it is still setup (and a pid that exec'd stays so only for that process)."""
    first = {"tgid": 30, "start_ns": 5 * S}
    reused = {"tgid": 30, "start_ns": 900 * S}
    batch = [
        w("/merged/dev/null", comm="runc:[2:INIT]", **first),
        exec_record("/app/server", ["server"], cgroup_id=WEB_CG, comm="server", **first),
        w("/late", comm="runc:[2:INIT]", **first),
        exit_record(cgroup_id=WEB_CG, comm="server", **first),
        w("/var/lib/docker/overlay2/x/merged/dev/null", comm="runc:[2:INIT]", **reused),
        file_record(FileOp.CHMOD, "/var/lib/docker/overlay2/x/merged/dev", mode=0o755,
                    cgroup_id=WEB_CG, comm="runc:[2:INIT]", **reused),
    ]
    pipeline, sink = make([batch], trace_filter=TraceFilter(show_runtime_setup=True))
    pipeline.run()
    assert [(r.path, r.runtime_setup) for r in sink.records] == [
        ("/merged/dev/null", True), ("/app/server", False), ("/late", False),
        ("/var/lib/docker/overlay2/x/merged/dev/null", True),
        ("/var/lib/docker/overlay2/x/merged/dev", True)]


def test_runtime_setup_shown_when_asked():
    pipeline, sink = make([_runc_batch()], trace_filter=TraceFilter(show_runtime_setup=True))
    pipeline.run()
    assert [(r.path, r.runtime_setup) for r in sink.records] == [
        ("/proc/self/attr/exec", True), ("/app/relative", True), ("/app/server", False),
        ("/app/server.pid", False), ("/late", False), ("/other", True)]


# -- paths -----------------------------------------------------------------------


def test_chdir_updates_cwd_for_later_relative_writes():
    proc = FakeProc(cwd={40: "/proc-says-elsewhere"})
    batch = [
        chdir_record("/srv/app", cgroup_id=WEB_CG, tgid=40),
        w("logs/a.log", tgid=40),
        chdir_record("/nonexistent", retval=-2, cgroup_id=WEB_CG, tgid=40),  # failed: ignored
        w("./b", tgid=40),
        chdir_record("..", cgroup_id=WEB_CG, tgid=40),
        file_record(FileOp.RENAME, "app/c", "../d", cgroup_id=WEB_CG, tgid=40),
    ]
    pipeline, sink = make([batch], proc=proc)
    summary = pipeline.run()
    assert [(r.path, r.path_resolved) for r in sink.records] == [
        ("/srv/app/logs/a.log", True), ("/srv/app/b", True), ("/srv/app/c", True)]
    assert (sink.records[2].path2, sink.records[2].path2_resolved) == ("/d", True)
    assert proc.calls == [("snapshot",)]  # chdir events were enough
    assert dict(summary.decoded) == {"chdir": 3, "file": 3}
    assert dict(summary.shown) == {"write": 3}  # chdir is bookkeeping, never shown
    assert dict(summary.filtered) == {}
    assert summary.unresolved_paths == 0


def test_unresolved_and_fd_paths():
    proc = FakeProc(fds={(41, 5): "/data"})
    batch = [
        w("nowhere", tgid=41),
        file_record(FileOp.UNLINK, "x", dirfd=5, cgroup_id=WEB_CG, tgid=41),
        file_record(FileOp.CHMOD, None, dirfd=5, mode=0o755, cgroup_id=WEB_CG, tgid=41),
        file_record(FileOp.CHMOD, None, dirfd=6, mode=0o755, cgroup_id=WEB_CG, tgid=41),
        file_record(FileOp.SYMLINK, "../target", "link", cgroup_id=WEB_CG, tgid=41),
    ]
    pipeline, sink = make([batch], proc=proc)
    summary = pipeline.run()
    assert [(r.path, r.path_resolved, r.path2, r.path2_resolved) for r in sink.records] == [
        ("nowhere", False, None, True),
        ("/data/x", True, None, True),
        ("/data", True, None, True),
        ("", False, None, True),
        ("../target", True, "link", False),  # a symlink target is kept verbatim
    ]
    assert summary.unresolved_paths == 3


S = 1_000_000_000  # a process's start_ns: seconds after boot


def test_exec_exe_sources():
    """What ran comes from the exec and the process table, never from /proc/PID/exe (which
    would say python3.11 here, or another process's binary after a pid wrap); only an exec of a
    file descriptor, which names no path, asks /proc."""
    proc = FakeProc(cwd={50: "/opt"}, exe={52: "/usr/bin/python3.11", 55: "/tmp/x (deleted)"},
                    fds={(54, 5): "/memfd:payload (deleted)"})
    h = {"cgroup_id": WEB_CG}
    batch = [
        exec_record("bin/tool", ["tool"], tgid=50, start_ns=50 * S, **h),  # a relative path
        fork_record(51, 51 * S, tgid=50, start_ns=50 * S, **h),
        exec_record("/proc/self/exe", ["child"], tgid=51, start_ns=51 * S, ppid=50,
                    parent_start_ns=50 * S, **h),  # a re-exec of what it ran: the parent's
        exec_record("/usr/bin/python3", ["python3"], tgid=52, start_ns=52 * S, **h),
        exec_record("missing", ["missing"], retval=-2, tgid=53, start_ns=53 * S, **h),
        exec_record("", ["payload"], dirfd=5, tgid=54, start_ns=54 * S, **h),  # fexecve
        exec_record("/proc/self/fd/4", ["x"], tgid=55, **h),  # its fd is closed by now
    ]
    pipeline, sink = make([batch], proc=proc)
    pipeline.run()
    assert [(r.path, r.exe) for r in sink.records] == [
        ("/opt/bin/tool", "/opt/bin/tool"),
        ("/proc/self/exe", "/opt/bin/tool"),
        ("/usr/bin/python3", "/usr/bin/python3"),
        ("missing", None),  # failed exec: no exe, and the cwd is unknown
        ("/memfd:payload (deleted)", "/memfd:payload (deleted)"),
        ("/proc/self/fd/4", "/tmp/x (deleted)"),
    ]
    assert [r.program for r in sink.records] == [
        Program("/opt/bin/tool", "tool"), Program("/opt/bin/tool", "child", self_exec=True),
        Program("/usr/bin/python3", "python3"), None,
        Program("/memfd:payload (deleted)", "payload"), Program("/tmp/x (deleted)", "x")]
    assert sink.records[1].parent_program == Program("/opt/bin/tool", "tool")
    assert sink.records[3].path_resolved is False
    assert ("exe", 52) not in proc.calls and ("exe", 50) not in proc.calls


def test_programs_and_lineage_from_fork_exec_exit():
    """A shell forks; the child re-execs busybox as nc (exec chain: nc's lineage parent is the
    shell it ran before), connects and exits; the pid is reused by an unrelated process that
    must inherit none of it. No /proc at all."""
    proc = FakeProc()
    h = {"cgroup_id": WEB_CG}
    sh = {"tgid": 60, "start_ns": 60 * S}
    nc = {"tgid": 61, "start_ns": 61 * S, "ppid": 60, "parent_start_ns": 60 * S}
    batch = [
        exec_record("/bin/sh", ["sh", "-c", "nc ..."], **sh, **h),
        fork_record(61, 61 * S, **sh, **h),
        exec_record("/proc/self/exe", ["nc", "10.0.0.9", "80"], **nc, **h),
        connect_record(family=2, addr=ipv4("10.0.0.9"), port=80, **nc, **h),
        w("/tmp/out", **nc),
        exit_record(**nc, **h),
        # pid 61 again, forked by someone the agent never saw: nothing of nc is left for it
        connect_record(family=2, addr=ipv4("10.0.0.9"), port=81, tgid=61, start_ns=99 * S,
                       ppid=7, parent_start_ns=7 * S, **h),
    ]
    pipeline, sink = make([batch], proc=proc)
    pipeline.run()
    shell = Program("/bin/sh", "sh")
    applet = Program("/bin/sh", "nc", self_exec=True)
    assert [(r.kind, r.program, r.parent_program) for r in sink.records] == [
        ("exec", shell, None),
        ("exec", applet, shell),
        ("connect", applet, shell),
        ("write", applet, shell),
        ("connect", None, None),
    ]
    assert [r.ppid for r in sink.records] == [1, 60, 60, 60, 7]
    assert proc.calls == [("snapshot",)]
    assert pipeline.summary.decoded["fork"] == pipeline.summary.decoded["exit"] == 1
    assert dict(pipeline.summary.shown) == {"exec": 2, "connect": 2, "write": 1}
    assert len(pipeline.processes) == 2  # the shell and the new 61; nc's entry went at exit


def _job_run(loop: dict, job: int, child: int, *, repeat: bool, key: int = 0xC0FFEE) -> list:
    """The loop forks `job`, which execs /app/job.sh (in full, or as the kernel's compact
    repeat of the exec with `key`), then forks `child`, which execs sha256sum."""
    h = {"cgroup_id": WEB_CG}
    jobp = {"tgid": job, "start_ns": job * S, "ppid": loop["tgid"],
            "parent_start_ns": loop["start_ns"]}
    kid = {"tgid": child, "start_ns": child * S, "ppid": job, "parent_start_ns": job * S}
    run = exec_repeat_record(key, **jobp, **h) if repeat else exec_record(
        "/app/job.sh", ["/bin/sh", "/app/job.sh"], dedup_key=key, **jobp, **h)
    return [
        fork_record(job, job * S, **loop, **h),
        run,
        fork_record(child, child * S, **jobp, **h),
        exec_record("/bin/sha256sum", ["sha256sum"], dedup_key=child, **kid, **h),
        exit_record(**kid, **h),
        exit_record(**jobp, **h),
    ]


def test_a_suppressed_repeat_exec_names_the_program_its_children_run_under():
    """A loop runs /app/job.sh twice a second: the kernel sends the second exec as a compact
    repeat (same key). The table updates as for the full exec, so the second sha256sum is the
    script's child too, never the loop's; the repeat itself is not delivered as an exec."""
    loop = {"tgid": 50, "start_ns": 50 * S}
    batch = [exec_record("/app/cron.sh", ["/bin/sh", "/app/cron.sh"], dedup_key=1, **loop,
                         cgroup_id=WEB_CG),
             *_job_run(loop, 51, 52, repeat=False), *_job_run(loop, 53, 54, repeat=True),
             # a repeat of an exec the agent never got (a ring-buffer drop): unknown, not cron
             *_job_run(loop, 55, 56, repeat=True, key=0xBAD)]
    pipeline, sink = make([batch])
    pipeline.run()
    cron, job = Program("/app/cron.sh", "/bin/sh"), Program("/app/job.sh", "/bin/sh")
    sha = Program("/bin/sha256sum", "sha256sum")
    assert [(r.event.header.tgid, r.program, r.parent_program) for r in sink.records] == [
        (50, cron, None), (51, job, cron), (52, sha, job), (54, sha, job), (56, sha, None)]
    assert pipeline.summary.decoded["exec_repeat"] == 2
    assert dict(pipeline.summary.shown) == {"exec": 5}
    assert pipeline.exec_repeats.stats == {"remembered": 5, "repeated": 1, "unknown": 1,
                                           "evicted": 0}


def test_the_start_up_snapshot_names_processes_running_before_the_probes():
    running = [snap(70, 1, "/bin/busybox", "httpd", "-f", cwd="/www", ticks=3)]
    proc = FakeProc(running=running)
    h = {"cgroup_id": WEB_CG}
    batch = [
        w("log/access", tgid=70),  # start_ns 0: the snapshot's process, its cwd
        fork_record(71, 71 * S, tgid=70, **h),
        exec_record("/www/cgi-bin/app", ["app"], tgid=71, start_ns=71 * S, ppid=70, **h),
    ]
    pipeline, sink = make([batch], proc=proc)
    pipeline.run()
    httpd = Program("/bin/busybox", "httpd")
    assert pipeline.snapshot == running
    assert [(r.path, r.program, r.parent_program, r.ppid, r.before_agent)
            for r in sink.records] == [
        ("/bin/busybox", httpd, None, 1, True),  # the synthetic exec of what ran before
        ("/www/log/access", httpd, None, 1, False),
        ("/www/cgi-bin/app", Program("/www/cgi-bin/app", "app"), httpd, 70, False),
    ]
    assert proc.calls == [("snapshot",)]


# -- record, then replay ------------------------------------------------------------


def _scenario():
    """Batches, a /proc that changes between batches, a start-up snapshot, and an attribution
    with a slow container."""
    proc = FakeProc(cwd={60: "/home/a"}, exe={61: "/bin/busybox"}, fds={(62, 4): "/var/log"},
                    running=[snap(64, 1, "/bin/busybox", "httpd", cwd="/www", ticks=9)])
    batches = [
        [
            exec_record("/bin/busybox", ["sh", "-c", "x y"], cgroup_id=WEB_CG, tgid=61, ppid=60,
                        dedup_key=0x51),
            w("rel/f", tgid=60),  # /proc cwd
            chdir_record(None, fd=3, cgroup_id=WEB_CG, tgid=62),  # fchdir: /proc says /first
            w("g", tgid=62),
            w("h", cg=DB_CG, tgid=62),
            file_record(FileOp.OPEN, "app.log", dirfd=4, open_flags=0o2101, cgroup_id=DB_CG,
                        tgid=62),
            w("/etc/hostfile", cg=HOST_CG, tgid=1),
        ],
        [
            chdir_record(None, fd=3, cgroup_id=WEB_CG, tgid=62),  # fchdir again: /second
            w("g2", tgid=62),
            w("child-file", tgid=63, ppid=60),  # gone from /proc: its parent's cwd
            connect_record(family=1, unix_path=b"\0abstract", cgroup_id=DB_CG, tgid=62),
            # the kernel suppressed 66's exec as a repeat of 61's: 66 runs what 61 ran
            fork_record(66, 66 * S, cgroup_id=WEB_CG, tgid=64),
            exec_repeat_record(0x51, cgroup_id=WEB_CG, tgid=66, start_ns=66 * S, ppid=64),
            w("rep", tgid=66, start_ns=66 * S, ppid=64),
            fork_record(65, 65 * S, cgroup_id=WEB_CG, tgid=64),
            exec_record("cgi", ["cgi"], cgroup_id=WEB_CG, tgid=65, start_ns=65 * S, ppid=64),
            b"\x00" * 3,
        ],
    ]

    def first():
        proc.cwds[62] = "/first"

    def second():
        proc.cwds[62] = "/second"

    return proc, batches, {0: first, 1: second}


def _record_and_replay(tmp_path, attribution, trace_filter=None):
    proc, batches, before = _scenario()
    path = tmp_path / "trace.dwcap"
    writer = CaptureWriter(path, LIMITS, OFFSET)
    live, live_sink = make(batches, proc=proc, attribution=attribution, recorder=writer,
                           before=before, trace_filter=trace_filter)
    live_summary = live.run()

    replay_source = ReplayCapture(path)
    assert replay_source.complete
    replay_sink = ListSink()
    replay = TracePipeline(
        replay_source,
        proc=ReplayProcReader(replay_source.facts),
        attribution=ReplayAttribution(replay_source.facts),
        sinks=[replay_sink],
        trace_filter=trace_filter,
        clock=FakeClock(),
        pending_timeout=0.0,  # as `driftwarden trace --replay` runs it
    )
    replay_summary = replay.run()
    live_out = [record_to_dict(r, OFFSET) | {"programs": [r.program, r.parent_program]}
                for r in live_sink.records]
    replay_out = [record_to_dict(r, replay_source.clock_offset_ns)
                  | {"programs": [r.program, r.parent_program]} for r in replay_sink.records]
    return live_out, replay_out, live_summary, replay_summary


def test_record_then_replay_is_identical(tmp_path):
    live, replayed, live_summary, replay_summary = _record_and_replay(
        tmp_path, FakeAttribution(), TraceFilter(include_host=True))
    assert len(live) == 12  # with the synthetic exec of the snapshot's httpd first
    assert [d["before_agent"] for d in live] == [True] + [False] * 11
    assert replayed == live
    # the start-up snapshot was recorded and seeds the replay's table: the CGI's program,
    # lineage and working directory come from it
    cgi = live[-1]
    assert cgi["exec"]["path"] == "/www/cgi"
    assert cgi["programs"] == [Program("/www/cgi", "cgi"), Program("/bin/busybox", "httpd")]
    # the /proc answers changed between the batches; the replay saw each at its place
    assert [d["write"]["path"] for d in live if d["kind"] == "write"] == [
        "/home/a/rel/f", "/first/g", "/first/h", "/var/log/app.log", "/etc/hostfile",
        "/second/g2", "/home/a/child-file", "/www/rep"]
    assert live[-2]["programs"] == [Program("/bin/busybox", "sh"), Program("/bin/busybox", "httpd")]
    for field in ("decoded", "decode_errors", "shown", "filtered", "unresolved_paths",
                  "pending_timeouts", "kernel"):
        assert getattr(replay_summary, field) == getattr(live_summary, field), field
    assert replay_summary.kernel == COUNTERS
    assert dict(live_summary.decode_errors) == {"unknown:short-header": 1}


def _by_cgroup(out: list[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = {}
    for d in out:
        groups.setdefault(d["cgroup_id"], []).append(d)
    return groups


def test_record_then_replay_with_a_slow_container(tmp_path):
    attribution = FakeAttribution(pending_for={WEB_CG: 3})
    live, replayed, live_summary, replay_summary = _record_and_replay(tmp_path, attribution)
    assert {d["container"]["attribution"] for d in live} == {"container"}
    assert len(live) == 11
    # every record identical, in the same order per container
    assert _by_cgroup(replayed) == _by_cgroup(live)
    assert sorted(_by_cgroup(live)) == [WEB_CG, DB_CG]
    assert live_summary.pending_timeouts == replay_summary.pending_timeouts == 0
    assert dict(replay_summary.filtered) == dict(live_summary.filtered) == {"host": 1}
    assert replay_summary.shown == live_summary.shown


@pytest.mark.xfail(strict=True, reason=(
    "known gap: attribution facts hold only delivered views (keyed by the record they were "
    "delivered for), so a replay sends a slow container's events at their own place while the "
    "live run sent them after the other containers' events (the pending answers and the batch "
    "boundaries are not in the capture)"))
def test_record_then_replay_keeps_cross_container_order(tmp_path):
    attribution = FakeAttribution(pending_for={WEB_CG: 3})
    live, replayed, *_ = _record_and_replay(tmp_path, attribution)
    assert replayed == live


def test_replay_of_a_timed_out_container(tmp_path):
    attribution = FakeAttribution(pending_for={WEB_CG: 10**6})
    live, replayed, live_summary, replay_summary = _record_and_replay(tmp_path, attribution)
    states = [(d["kind"], d["container"]["attribution"]) for d in live]
    assert ("write", "pending") in states and ("write", "container") in states
    assert replayed == live
    assert live_summary.pending_timeouts == replay_summary.pending_timeouts == 8



def test_only_label_selects_containers_with_every_pair():
    """`agent --only-label`: a container is watched when its labels hold every pair given."""
    from driftwarden.agent.pipeline import labels_match

    labels = (("app", "web"), ("node", "a"), ("tier", "front"))
    assert labels_match((("node", "a"),), labels)
    assert labels_match((("app", "web"), ("node", "a")), labels)
    assert not labels_match((("node", "b"),), labels)
    assert not labels_match((("node", "a"), ("zone", "x")), labels)
    assert not labels_match((("node", "a"),), ())
    assert labels_match((), labels)


def test_absolute_paths_are_normalised_and_a_symlink_target_kept_verbatim():
    # the absolute-path shortcut of _enrich_file answers what ProcessTable.resolve would
    batch = [
        w("/var//log/./app/../x.log", tgid=41),
        w("/plain/path", tgid=41),
        file_record(FileOp.SYMLINK, "/abs//target/.", "/links//l", cgroup_id=WEB_CG, tgid=41),
        file_record(FileOp.RENAME, "/a/./b", "/c//d/", cgroup_id=WEB_CG, tgid=41),
    ]
    pipeline, sink = make([batch])
    summary = pipeline.run()
    assert [(r.path, r.path_resolved, r.path2, r.path2_resolved) for r in sink.records] == [
        ("/var/log/x.log", True, None, True),
        ("/plain/path", True, None, True),
        ("/abs//target/.", True, "/links/l", True),
        ("/a/b", True, "/c/d", True),
    ]
    assert summary.unresolved_paths == 0
