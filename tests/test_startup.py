"""The start-up snapshot in detection and a container's first start (issue 9, piece S).

Processes running before the agent started become synthetic exec records (``before_agent``):
parents first, attributed like events (a pending container waits), timed at the process's start
on the events' clock, recorded and replayed. Detection learns them for an image in learn mode,
checks them afterwards, and reports a process that was already running an added, deleted or
memfd binary as DRIFT "(running before the agent started)" in every mode. A container start an
image's baseline never saw teaches its start-up items once (recorded with the container, shown
by `baseline show`); later starts are checked; drift fires during a start too.

The replays run the real pipeline and Detector on capture files built here (no kernel); the last
test runs the real `driftwarden agent` against containers started before it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
from driftwarden.agent.alerts import ListAlertSink
from driftwarden.agent.control import BaselineService, FileProfiles
from driftwarden.agent.detect import Detector, DetectorConfig
from driftwarden.agent.output import format_line, record_to_dict
from driftwarden.agent.pipeline import (
    SNAPSHOT_FACT,
    ReplayAttribution,
    ReplayProcReader,
    TracePipeline,
)
from driftwarden.agent.processes import ProcessTable
from driftwarden.agent.procfs import ProcessSnapshot
from driftwarden.agent.startup import (
    SNAPSHOT_CLOCK_FACT,
    SnapshotClock,
    parents_first,
    snapshot_record,
)
from driftwarden.core.modes import Mode
from driftwarden.core.records import ContainerView, Program
from driftwarden.models.drift import Layers
from driftwarden.models.items import ExecItem, ItemSet, LineageItem, WriteItem
from driftwarden.models.profile import LearningPolicy, ProfileStore
from driftwarden.probes._layout import FileOp, Limits
from driftwarden.probes.capture import CaptureWriter, ReplayCapture

from tests.test_decode import exec_record, file_record, fork_record
from tests.test_pipeline_unit import VIEWS, FakeAttribution, ListSink, make
from tests.test_processes import FakeProc

S = 1_000_000_000
HOST_CG, WEB, WEB2, WEB3, OTHER = 1, 10, 11, 12, 13
IMAGE = "sha256:" + "a" * 64
A_ID, B_ID, C_ID, D_ID = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
AGENT_START = 1000.0  # epoch s of the snapshot; the captures' clock offset is 0
CLOCK = SnapshotClock(boot_offset_ns=0, ticks_per_second=100, taken_ns=int(AGENT_START * S))
GRACE = 10.0


def view(cgroup: int, cid: str, name: str, started_at: float | None = 900.0,
         state: str = "container") -> ContainerView:
    return ContainerView(state=state, cgroup_id=cgroup, id=cid, name=name, image="shop/web:1",
                         image_id=IMAGE, runtime="docker", started_at=started_at)


def proc(tgid, ppid, exe, *argv, ticks=90_000, cg=WEB, script=None, cwd="/"):
    return ProcessSnapshot(tgid=tgid, ppid=ppid, start_ticks=ticks, exe=exe, argv=tuple(argv),
                           cwd=cwd, cgroup_id=cg, script=script)


SHIM = proc(50, 1, "/usr/bin/containerd-shim-runc-v2", "containerd-shim-runc-v2", "-id", "x",
            ticks=89_990, cg=HOST_CG)
HTTPD = proc(100, 50, "/bin/busybox", "httpd", "-f", ticks=90_000)  # start.sh exec'd it
CGI = proc(101, 100, "/bin/busybox", "/bin/sh", "/www/cgi-bin/app", ticks=99_000,
           script="/www/cgi-bin/app", cwd="/www/cgi-bin")
SUBSHELL = proc(102, 101, "/bin/busybox", "/bin/sh", "/www/cgi-bin/app", ticks=99_000,
                script="/www/cgi-bin/app", cwd="/www/cgi-bin")  # a fork, no exec of its own
DATE = proc(103, 102, "/bin/busybox", "date", "+%s", ticks=99_001)
RUNNING = [SHIM, DATE, SUBSHELL, CGI, HTTPD]  # any order: the records come parents first
httpd_p, cgi_p, date_p = (Program("/bin/busybox", "httpd"),
                          Program("/www/cgi-bin/app", "/www/cgi-bin/app"),
                          Program("/bin/busybox", "date"))


# -- the records ------------------------------------------------------------------------------


def test_snapshot_clock_maps_proc_start_ticks_onto_the_events_clock():
    clock = SnapshotClock(boot_offset_ns=3 * S, ticks_per_second=100, taken_ns=500 * S)
    assert clock.event_ns(40_000) == 397 * S  # 400 s after boot, 3 s of it suspended
    assert clock.event_ns(100) == 0  # started before the suspend it over-counts: at boot
    assert clock.event_ns(60_000) == 500 * S  # never after the snapshot itself
    assert SnapshotClock.from_dict(clock.to_dict()) == clock
    now = SnapshotClock.now()
    assert now.ticks_per_second > 0 and now.boot_offset_ns >= 0 and now.taken_ns > 0


def test_parents_come_before_their_children_whatever_the_pids_and_ticks():
    wrapped = [proc(5, 900, "/bin/busybox", "sleep", ticks=70),  # pid wrapped, same tick
               proc(900, 1, "/bin/busybox", "sh", ticks=70),
               proc(7, 8, "/x", "x", ticks=10), proc(8, 7, "/y", "y", ticks=10)]  # a cycle
    assert [p.tgid for p in parents_first(wrapped)] == [8, 7, 900, 5]
    assert [p.tgid for p in parents_first(RUNNING)] == [50, 100, 101, 102, 103]


def test_a_synthetic_record_has_the_tables_programs_and_a_lineage_only_inside_its_container():
    table = ProcessTable(FakeProc(), ticks_per_second=100)
    table.seed(RUNNING)
    by_tgid = {p.tgid: p for p in RUNNING}
    web = view(WEB, A_ID, "web-1")
    out = {p.tgid: snapshot_record(p, by_tgid.get(p.ppid), web, table, CLOCK)
           for p in RUNNING}
    assert [(t, r.program, r.parent_program) for t, r in sorted(out.items())] == [
        (50, Program("/usr/bin/containerd-shim-runc-v2", "containerd-shim-runc-v2"), None),
        (100, httpd_p, None),  # its parent, the shim, is outside the container
        (101, cgi_p, httpd_p),
        (102, cgi_p, None),  # its parent's exe and argv: a forked subshell, no lineage
        (103, date_p, cgi_p),
    ]
    cgi = out[101]
    assert cgi.before_agent and cgi.kind == "exec" and not cgi.runtime_setup
    assert (cgi.path, cgi.exe, cgi.ppid, cgi.event.argv) == (
        "/www/cgi-bin/app", "/bin/busybox", 100, ("/bin/sh", "/www/cgi-bin/app"))
    h = cgi.event.header
    assert (h.ts_ns, h.tgid, h.pid, h.cgroup_id, h.comm, h.start_ns) == (
        990 * S, 101, 101, WEB, "app", 0)
    # a deleted binary: the path it had, the exe as /proc named it
    gone = proc(200, 100, "/tmp/.gone (deleted)", "/tmp/.gone", "1000")
    table.seed([gone])
    record = snapshot_record(gone, HTTPD, web, table, None)
    assert (record.path, record.exe, record.event.header.ts_ns) == (
        "/tmp/.gone", "/tmp/.gone (deleted)", 0)
    # runc setting a container up is the runtime's work; a kernel thread is nothing
    runc = proc(201, 50, "/memfd:runc_cloned:/proc/self/exe (deleted)", "runc", "init")
    kthread = proc(2, 0, None, cg=HOST_CG)
    table.seed([runc, kthread])
    assert snapshot_record(runc, SHIM, web, table, CLOCK).runtime_setup
    assert snapshot_record(kthread, None, web, table, CLOCK) is None


def test_the_pipeline_emits_them_first_parents_first_and_a_pending_container_waits():
    """WEB answers at once, NEW_CG is pending for its first two lookups: its synthetic record
    waits, in front of its first event; the host's processes are never emitted."""
    new_cg = 700
    running = [proc(60, 50, "/bin/busybox", "sh", "-c", "loop", cg=new_cg, ticks=95_000),
               *RUNNING]
    fake = FakeProc(running=running)
    fake.snapshot_clock = lambda: CLOCK
    attribution = FakeAttribution({**VIEWS, WEB: view(WEB, A_ID, "web-1")},
                                  pending_for={new_cg: 2})
    batch = [file_record(int(FileOp.OPEN), "/tmp/x", open_flags=0o1101, cgroup_id=new_cg,
                         tgid=60, pid=60, ts_ns=1001 * S),
             file_record(int(FileOp.OPEN), "/tmp/y", open_flags=0o1101, cgroup_id=WEB,
                         tgid=100, pid=100, ts_ns=1001 * S)]
    pipeline, sink = make([[], batch, []], proc=fake, attribution=attribution)
    pipeline.run()
    got = [(r.event.header.tgid, r.kind, r.before_agent, r.container.state)
           for r in sink.records]
    assert got == [(100, "exec", True, "container"), (101, "exec", True, "container"),
                   (102, "exec", True, "container"), (103, "exec", True, "container"),
                   (100, "write", False, "container"),
                   (60, "exec", True, "container"), (60, "write", False, "container")]
    assert sink.records[5].event.header.ts_ns == 950 * S
    assert pipeline.summary.shown["exec"] == 5


def test_trace_output_marks_them():
    table = ProcessTable(FakeProc(), ticks_per_second=100)
    table.seed(RUNNING)
    record = snapshot_record(CGI, HTTPD, view(WEB, A_ID, "web-1"), table, CLOCK)
    data = record_to_dict(record, 0)
    assert data["before_agent"] is True and data["kind"] == "exec"
    assert data["exec"]["path"] == "/www/cgi-bin/app" and data["process"]["exe"] == "/bin/busybox"
    assert format_line(record, 0).endswith(
        "/www/cgi-bin/app (/bin/busybox) /bin/sh /www/cgi-bin/app ok "
        "[running before the agent started]")
    assert record_to_dict(record._replace(before_agent=False), 0)["before_agent"] is False


def test_record_then_replay_gives_the_same_synthetic_records(tmp_path):
    fake = FakeProc(running=RUNNING)
    fake.snapshot_clock = lambda: CLOCK
    attribution = FakeAttribution({**VIEWS, WEB: view(WEB, A_ID, "web-1")},
                                  pending_for={WEB: 3})
    path = tmp_path / "run.dwcap"
    batch = [file_record(int(FileOp.OPEN), "/tmp/y", open_flags=0o1101, cgroup_id=WEB,
                         tgid=100, pid=100, ts_ns=1001 * S)]
    live, live_sink = make([[], batch, []], proc=fake, attribution=attribution,
                           recorder=CaptureWriter(path, Limits(), 0))
    live.run()
    source = ReplayCapture(path)
    replay_sink = ListSink()
    TracePipeline(source, proc=ReplayProcReader(source.facts),
                  attribution=ReplayAttribution(source.facts), sinks=[replay_sink],
                  pending_timeout=0.0).run(poll_interval=0)

    def out(records):
        return [record_to_dict(r, 0) | {"programs": [r.program, r.parent_program]}
                for r in records]

    assert [r.before_agent for r in live_sink.records] == [True] * 4 + [False]
    assert out(replay_sink.records) == out(live_sink.records)
    assert source.facts.get(SNAPSHOT_CLOCK_FACT) == CLOCK.to_dict()


def test_runc_in_a_starting_container_is_setup_and_gives_the_entrypoint_no_lineage():
    """runc's init is forked outside the container (by runc, reparented to the shim), enters
    its cgroup, may re-exec runc there from its clone of itself (comm "exe"), writes its
    temp file and oom_score_adj, then execs the entrypoint: all of it but the entrypoint is
    setup, and the entrypoint's lineage is not runc. A container's own busybox applet (also
    comm "exe") is not setup."""
    fake = FakeProc(running=RUNNING)
    fake.snapshot_clock = lambda: CLOCK
    attribution = FakeAttribution({**VIEWS, WEB: view(WEB, A_ID, "web-1")})
    init = {"tgid": 600, "pid": 600, "ppid": 50, "start_ns": 600 * S, "cgroup_id": WEB}
    batch = [
        exec_record("/proc/self/exe", ["runc", "init"], comm="exe", **init),
        file_record(int(FileOp.OPEN), "/run/docker/runtime-runc/moby/x/runc.Ab12Cd",
                    open_flags=0o1101, comm="exe", **init),
        file_record(int(FileOp.OPEN), "/proc/self/oom_score_adj", open_flags=0o1001,
                    comm="runc:[2:INIT]", **init),
        exec_record("/app/start.sh", ["/app/start.sh"], comm="start.sh", **init),
        file_record(int(FileOp.OPEN), "/tmp/x", open_flags=0o1101, comm="exe", **init),
        fork_record(601, 601 * S, tgid=101, cgroup_id=WEB),  # the CGI (from the snapshot)
        file_record(int(FileOp.OPEN), "/tmp/y", open_flags=0o1101, comm="exe", tgid=601,
                    pid=601, ppid=101, start_ns=601 * S, parent_start_ns=0, cgroup_id=WEB),
    ]
    pipeline, sink = make([batch], proc=fake, attribution=attribution,
                          trace_filter=dataclasses.replace(make()[0].filter,
                                                           show_runtime_setup=True))
    pipeline.run()
    live = [r for r in sink.records if not r.before_agent]
    assert [(r.kind, r.path, r.runtime_setup) for r in live] == [
        ("exec", "/proc/self/exe", True),
        ("write", "/run/docker/runtime-runc/moby/x/runc.Ab12Cd", True),
        ("write", "/proc/self/oom_score_adj", True),
        ("exec", "/app/start.sh", False),
        ("write", "/tmp/x", False),
        ("write", "/tmp/y", False),
    ]
    assert live[3].parent_program is None
    assert live[5].program == cgi_p


# -- detection (replays) ---------------------------------------------------------------------


def _capture(path: Path, steps, *, running=RUNNING, views=()) -> Path:
    """`steps`: raw kernel records, and ContainerViews: the attribution from that point on."""
    writer = CaptureWriter(path, Limits(), 0)
    writer.fact(SNAPSHOT_FACT, [p.to_dict() for p in running], -1)
    writer.fact(SNAPSHOT_CLOCK_FACT, CLOCK.to_dict(), -1)
    writer.fact(("attr", HOST_CG), ContainerView(state="host", cgroup_id=HOST_CG).to_dict(), 0)
    for v in views:
        writer.fact(("attr", v.cgroup_id), v.to_dict(), 0)
    for step in steps:
        if isinstance(step, ContainerView):
            writer.fact(("attr", step.cgroup_id), step.to_dict(), writer.records)
        else:
            writer.record(step)
    writer.close({})
    return path


def _replay(capture: Path, store: ProfileStore, *, layers: Layers | None = None,
            mode: Mode = Mode.LEARN):
    source = ReplayCapture(capture)
    pipeline = TracePipeline(source, proc=ReplayProcReader(source.facts),
                             attribution=ReplayAttribution(source.facts), sinks=[],
                             pending_timeout=0)
    sink = ListAlertSink()
    config = DetectorConfig(window_seconds=1.0, policy=LearningPolicy(), initial_mode=mode,
                            event_time_windows=True, startup_seconds=GRACE)
    detector = Detector(config, store, sink, layers_of=lambda _c, _t: layers, clock=lambda: 1e9)
    pipeline.sinks.append(detector)
    pipeline.run(poll_interval=0)
    detector.close()
    return detector, sink


def _write(path: str, t: float, *, tgid: int = 100, cg: int = WEB, op=FileOp.OPEN,
           flags: int = 0o2101) -> bytes:
    return file_record(int(op), path, open_flags=flags, mode=0o644, cgroup_id=cg, tgid=tgid,
                       pid=tgid, ts_ns=int(t * S))


def _steady(t0: float, seconds: int, cg: int = WEB, tgid: int = 100) -> list[bytes]:
    return [_write("/var/log/web/access.log", t0 + i / 2, cg=cg, tgid=tgid)
            for i in range(seconds * 2)]


def _reasons(sink) -> list[tuple[str, str, str]]:
    return sorted((a.kind.value, r.code, r.text) for a in sink.alerts for r in a.reasons)


def _learned(tmp_path) -> ProfileStore:
    """The image learned from the snapshot of a host the agent joined (no start seen), then
    switched to monitor."""
    store = ProfileStore(tmp_path / "state", ItemSet)
    detector, sink = _replay(_capture(tmp_path / "learn.dwcap", _steady(1000, 20),
                                      views=[view(WEB, A_ID, "web-1")]), store)
    assert sink.alerts == []
    profile = detector.profiles[IMAGE]
    assert not profile.starts_seen
    profile.set_mode(Mode.MONITOR, reason="test", who="test", now=1e9)
    store.save(profile)
    return store


def test_learn_takes_the_running_processes_as_the_execs_they_were(tmp_path):
    store = _learned(tmp_path)
    profile = store.load(IMAGE)
    execs = {i.describe() for i in profile.items.items("exec")}
    lineages = {i.describe() for i in profile.items.items("lineage")}
    assert execs == {"exec /bin/busybox as httpd", "exec /www/cgi-bin/app",
                     "exec /bin/busybox as date"}
    assert lineages == {"/bin/busybox:httpd started /www/cgi-bin/app:app",
                        "/www/cgi-bin/app:app started /bin/busybox:date"}
    # what ran before the agent is no window's activity
    assert profile.progress.windows_learned > 0


def test_an_agent_restart_checks_them_quiet_when_learned_novel_when_not(tmp_path):
    store = _learned(tmp_path)
    _, sink = _replay(_capture(tmp_path / "same.dwcap", _steady(2000, 5),
                               views=[view(WEB, A_ID, "web-1")]), store)
    assert sink.alerts == []
    odd = proc(104, 101, "/bin/busybox", "nc", "10.0.0.9", "4444", ticks=99_002)
    _, sink = _replay(_capture(tmp_path / "odd.dwcap", _steady(2000, 5), running=[*RUNNING, odd],
                               views=[view(WEB, A_ID, "web-1")]), store)
    assert _reasons(sink) == [
        ("novel", "new-exec", "new exec /bin/busybox as nc, never seen for shop/web:1 (nearest "
         "learned: exec /bin/busybox as httpd) (running before the agent started)"),
        ("novel", "new-lineage", "new /www/cgi-bin/app:app started /bin/busybox:nc, never seen "
         "for shop/web:1 (nearest learned: /www/cgi-bin/app:app started /bin/busybox:date) "
         "(running before the agent started)"),
    ]
    assert all(dict(r.details)["before_agent"] is True for a in sink.alerts for r in a.reasons)


def _layers(tmp_path) -> Layers:
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    (upper / "tmp").mkdir(parents=True)
    (upper / "tmp/busybox.implant").write_bytes(b"\x7fELF")
    (upper / "tmp/dropper").write_bytes(b"\x7fELF")
    for name in ("bin/busybox", "app/start.sh", "www/cgi-bin/app"):
        (lower / name).parent.mkdir(parents=True, exist_ok=True)
        (lower / name).write_bytes(b"#!/bin/sh\n" if name.endswith(("sh", "app")) else b"\x7fE")
    (lower / "bin/sh").symlink_to("busybox")
    return Layers(upper=upper, lowers=(lower,))


@pytest.mark.parametrize("mode", [Mode.LEARN, Mode.MONITOR])
def test_a_process_already_running_a_dropped_deleted_or_memfd_binary_is_drift(tmp_path, mode):
    implants = [
        proc(300, 100, "/tmp/busybox.implant", "/tmp/busybox.implant", "sleep", "1000000"),
        proc(301, 100, "/tmp/.gone (deleted)", "/tmp/.gone", "1000000"),
        proc(302, 100, "/memfd:x (deleted)", "x"),
    ]
    store = ProfileStore(tmp_path / mode.value, ItemSet)
    _, sink = _replay(_capture(tmp_path / f"{mode.value}.dwcap", _steady(1000, 2),
                               running=[*RUNNING, *implants], views=[view(WEB, A_ID, "web-1")]),
                      store, layers=_layers(tmp_path), mode=mode)
    drifts = sorted((r.code, r.text, dict(r.details)["path"], dict(r.details)["before_agent"])
                    for a in sink.alerts if a.kind.value == "drift" for r in a.reasons)
    assert drifts == [
        ("exec-added-binary", "ran /tmp/busybox.implant, which the image does not contain "
         "(added at run time) (running before the agent started)", "/tmp/busybox.implant", True),
        ("exec-deleted-binary", "ran /tmp/.gone, which was deleted after it started (running "
         "before the agent started)", "/tmp/.gone", True),
        ("exec-memfd", "ran /memfd:x (deleted), a memory-only file: nothing the image shipped "
         "(running before the agent started)", "/memfd:x (deleted)", True),
    ]
    assert {a.severity.text for a in sink.alerts if a.kind.value == "drift"} == {
        "high", "critical"}


def test_a_deleted_binary_run_again_through_its_proc_exe_link_is_drift(tmp_path):
    """`/tmp/gone & p=$!; rm /tmp/gone; /proc/$p/exe`: the pid is the container's, so only
    the exec'ing process's own /proc/PID/exe names the binary (deleted) it now runs."""
    store = _learned(tmp_path)
    rerun = exec_record("/proc/7/exe", ["sleep", "2"], tgid=520, pid=520, ppid=100,
                        start_ns=520 * S, cgroup_id=WEB, ts_ns=int(2000.5 * S))
    path = tmp_path / "rerun.dwcap"
    writer = CaptureWriter(path, Limits(), 0)
    writer.fact(SNAPSHOT_FACT, [p.to_dict() for p in RUNNING], -1)
    writer.fact(("attr", WEB), view(WEB, A_ID, "web-1").to_dict(), 0)
    writer.fact(("exe", 520), "/tmp/gone (deleted)", 0)
    writer.record(rerun)
    writer.close({})
    _, sink = _replay(path, store, layers=_layers(tmp_path))
    drifts = [(r.code, dict(r.details)["path"]) for a in sink.alerts if a.kind.value == "drift"
              for r in a.reasons]
    assert drifts == [("exec-deleted-binary", "/tmp/gone")]


# -- the first start ---------------------------------------------------------------------------


def _start(t: float, cg: int, tgid: int, *, extra: list[bytes] = ()) -> list[bytes]:
    """A container's start: runc's init execs /app/start.sh (its parent unknown to the agent),
    which makes its dirs and execs httpd in place."""
    h = {"cgroup_id": cg}
    mkdir = tgid + 1
    return [
        exec_record("/app/start.sh", ["/app/start.sh"], tgid=tgid, pid=tgid, ppid=tgid - 1,
                    start_ns=tgid * S, ts_ns=int(t * S), **h),
        fork_record(mkdir, mkdir * S, tgid=tgid, start_ns=tgid * S, ts_ns=int((t + .01) * S),
                    **h),
        exec_record("/proc/self/exe", ["mkdir", "-p", "/var/log/web"], tgid=mkdir, pid=mkdir,
                    ppid=tgid, start_ns=mkdir * S, parent_start_ns=tgid * S,
                    ts_ns=int((t + .02) * S), **h),
        file_record(int(FileOp.MKDIR), "/var/log/web", mode=0o777, tgid=mkdir, pid=mkdir,
                    ppid=tgid, start_ns=mkdir * S, ts_ns=int((t + .03) * S), **h),
        *extra,
        exec_record("/proc/self/exe", ["httpd", "-f"], tgid=tgid, pid=tgid, ppid=tgid - 1,
                    start_ns=tgid * S, ts_ns=int((t + .05) * S), **h),
    ]


def test_the_first_start_teaches_its_items_once_and_later_starts_are_checked(tmp_path):
    store = _learned(tmp_path)
    layers = _layers(tmp_path)
    web1 = view(WEB, A_ID, "web-1")
    dropper = exec_record("/tmp/dropper", ["dropper"], tgid=560, pid=560, ppid=500,
                          start_ns=560 * S, cgroup_id=WEB2, ts_ns=int(3000.2 * S))
    # web-2 starts at 3000 (the agent runs since 2999); a later event (3011) ends its startup
    first = _capture(tmp_path / "first.dwcap", [
        *_steady(2999, 1), view(WEB2, B_ID, "web-2", started_at=3000.0),
        *_start(3000.0, WEB2, 500, extra=[dropper]), *_steady(3011, 1)], views=[web1])
    detector, sink = _replay(first, store, layers=layers)
    # drift fires during a start; the dropper's own items are not learned from it
    assert _reasons(sink) == [
        ("drift", "exec-added-binary",
         "ran /tmp/dropper, which the image does not contain (added at run time)"),
        ("novel", "new-exec", "new exec /tmp/dropper, never seen for shop/web:1"),
        ("novel", "new-lineage", "new /app/start.sh:start.sh started /tmp/dropper:dropper, "
         "never seen for shop/web:1 (nearest learned: /app/start.sh:start.sh started "
         "/bin/busybox:mkdir)"),
    ]
    profile = detector.profiles[IMAGE]
    assert profile.starts_seen
    assert [(e["kind"], e["container"]) for e in profile.startup_items] == [
        ("exec", B_ID), ("exec", B_ID), ("lineage", B_ID), ("write", B_ID), ("lineage", B_ID)]
    assert profile.history[-1]["reason"] == (
        "first container start seen (bbbbbbbbbbbb; 5 start-up items learned from it)")
    assert ExecItem("/app/start.sh", "start.sh") in profile.items
    assert LineageItem("/app/start.sh:start.sh", "/bin/busybox:httpd") in profile.items
    assert WriteItem("/var/log/web", "mkdir") in profile.items
    assert detector.stats["startup_items"] == 5

    # saved, and shown as start-up items with the container that taught them
    shown = BaselineService(FileProfiles(store), store).handle({"op": "show", "image": IMAGE})
    assert shown["starts_seen"] is True
    assert [(e["item"], e["container"]) for e in shown["startup_items"]] == [
        ("exec /app/start.sh", B_ID), ("exec /bin/busybox as mkdir", B_ID),
        ("/app/start.sh:start.sh started /bin/busybox:mkdir", B_ID),
        ("mkdir /var/log/web", B_ID),
        ("/app/start.sh:start.sh started /bin/busybox:httpd", B_ID)]

    # a third replica: the same start is known; a new item in it alerts
    wget = exec_record("/proc/self/exe", ["wget", "http://10.0.0.9/x"], tgid=701, pid=701,
                       ppid=700, start_ns=701 * S, parent_start_ns=700 * S, cgroup_id=WEB3,
                       ts_ns=int(4000.04 * S))
    fork = fork_record(701, 701 * S, tgid=700, start_ns=700 * S, cgroup_id=WEB3,
                       ts_ns=int(4000.035 * S))
    second = _capture(tmp_path / "second.dwcap", [
        *_steady(3999, 1), view(WEB3, C_ID, "web-3", started_at=4000.0),
        *_start(4000.0, WEB3, 700, extra=[fork, wget]), *_steady(4011, 1)], views=[web1])
    _, sink = _replay(second, store, layers=layers)
    assert sorted((a.kind.value, r.code) for a in sink.alerts for r in a.reasons) == [
        ("novel", "new-exec"), ("novel", "new-lineage")]
    assert {dict(r.details)["item"] for a in sink.alerts for r in a.reasons} == {
        "exec /bin/busybox as wget", "/app/start.sh:start.sh started /bin/busybox:wget"}


class _MonitorFrom:
    """A sink in front of the detector: the image's learning ends at event time `t`."""

    def __init__(self, detector: Detector, t: float) -> None:
        self.detector, self.t = detector, t

    def write(self, record) -> None:
        profile = self.detector.profiles.get(IMAGE)
        if profile is not None and record.event.header.ts_ns >= self.t * S:
            profile.set_mode(Mode.MONITOR, reason="test", who="test", now=1e9)

    def flush(self) -> None:
        pass


def test_a_start_that_began_while_learning_is_checked_once_learning_ended(tmp_path):
    fork = fork_record(520, 520 * S, tgid=500, start_ns=500 * S, cgroup_id=WEB2,
                       ts_ns=int(3001.9 * S))
    wget = exec_record("/proc/self/exe", ["wget", "http://10.0.0.9/x"], tgid=520, pid=520,
                       ppid=500, start_ns=520 * S, parent_start_ns=500 * S, cgroup_id=WEB2,
                       ts_ns=int(3002 * S))
    capture = _capture(tmp_path / "learning.dwcap", [
        *_steady(2999, 1), view(WEB2, B_ID, "web-2", started_at=3000.0),
        *_start(3000.0, WEB2, 500), fork, wget, *_steady(3011, 1)],
        views=[view(WEB, A_ID, "web-1")])
    source = ReplayCapture(capture)
    pipeline = TracePipeline(source, proc=ReplayProcReader(source.facts),
                             attribution=ReplayAttribution(source.facts), sinks=[],
                             pending_timeout=0)
    sink = ListAlertSink()
    detector = Detector(DetectorConfig(window_seconds=1.0, event_time_windows=True,
                                       startup_seconds=GRACE),
                        ProfileStore(tmp_path / "state", ItemSet), sink,
                        layers_of=lambda _c, _t: None, clock=lambda: 1e9)
    pipeline.sinks += [_MonitorFrom(detector, 3001.0), detector]
    pipeline.run(poll_interval=0)
    detector.close()
    # learned while learning; the wget after learning ended is checked, not a start-up item
    assert sorted(dict(r.details)["item"] for a in sink.alerts for r in a.reasons) == [
        "/app/start.sh:httpd started /app/start.sh:wget", "exec /app/start.sh as wget"]
    profile = detector.profiles[IMAGE]
    assert profile.starts_seen and profile.startup_items == []
    assert ExecItem("/app/start.sh", "start.sh") in profile.items


def test_a_restart_teaches_its_start_and_a_new_container_is_the_start_seen(tmp_path):
    """Docker restarts a container into a new cgroup; its start time may reach the agent after
    the new run's first events: the new cgroup's first event starts the run. A restart finds
    its dirs made, so it teaches what it shows without being the start seen; a new container
    (here described by the runtime before it started: no start time yet, and runc setting it
    up is its first event) is."""
    store = _learned(tmp_path)
    old = view(WEB, A_ID, "web-1", started_at=900.0)
    stale = dataclasses.replace(old, cgroup_id=WEB2)  # the new cgroup, the old start time
    fresh = dataclasses.replace(stale, started_at=3000.01)
    capture = _capture(tmp_path / "restart.dwcap", [
        *_steady(2999, 1), stale, *_start(3000.0, WEB2, 500)[:3], fresh,
        *_start(3000.0, WEB2, 500)[3:], *_steady(3011, 1)], views=[old])
    detector, sink = _replay(capture, store)
    assert sink.alerts == []
    profile = detector.profiles[IMAGE]
    assert not profile.starts_seen
    assert {e["container"] for e in profile.startup_items} == {A_ID}
    store.save(profile)

    described_early = view(WEB3, C_ID, "web-3", started_at=None)
    runc = file_record(int(FileOp.OPEN), "/proc/self/oom_score_adj", open_flags=0o1001,
                       comm="runc:[2:INIT]", tgid=700, pid=700, ppid=50, start_ns=700 * S,
                       cgroup_id=WEB3, ts_ns=int(3999.9 * S))
    capture = _capture(tmp_path / "new.dwcap", [
        *_steady(3999, 1), described_early, runc, *_start(4000.0, WEB3, 700),
        _write("/var/cache/web/index", 4000.5, tgid=700, cg=WEB3, flags=0o1101),
        dataclasses.replace(described_early, started_at=4000.0), *_steady(4011, 1)],
        views=[old])
    detector, sink = _replay(capture, store)
    assert sink.alerts == []
    profile = detector.profiles[IMAGE]
    assert profile.starts_seen
    assert [(e["kind"], e["key"], e["container"]) for e in profile.startup_items[-1:]] == [
        ("write", ["/var/cache/web/index", "create"], C_ID)]


def test_a_start_before_the_agent_teaches_but_is_not_a_start_seen(tmp_path):
    """web-2 started 3 s before the agent: the rest of its startup is learned (what the
    snapshot showed of it too), but the profile has not seen a whole start."""
    store = _learned(tmp_path)
    early = proc(400, 50, "/bin/busybox", "/bin/sh", "/app/start.sh", ticks=99_700, cg=WEB2,
                 script="/app/start.sh")
    capture = _capture(tmp_path / "early.dwcap", [*_steady(1000.0, 12, cg=WEB2, tgid=400)],
                       running=[*RUNNING, early],
                       views=[view(WEB, A_ID, "web-1"),
                              view(WEB2, B_ID, "web-2", started_at=997.0)])
    detector, sink = _replay(capture, store)
    assert sink.alerts == []
    profile = detector.profiles[IMAGE]
    assert not profile.starts_seen
    assert [(e["kind"], e["key"]) for e in profile.startup_items] == [
        ("exec", ["/app/start.sh", "start.sh"])]


def test_profiles_keep_starts_and_start_up_items(tmp_path):
    store = ProfileStore(tmp_path, ItemSet)
    detector, _ = _replay(_capture(tmp_path / "x.dwcap", _steady(1000, 1),
                                   views=[view(WEB, A_ID, "web-1")]), store)
    profile = detector.profiles[IMAGE]
    added = profile.learn_startup([ExecItem("/app/start.sh", "start.sh")], container=D_ID,
                                  now=5.0)
    assert added == [ExecItem("/app/start.sh", "start.sh")]
    assert profile.learn_startup([ExecItem("/app/start.sh", "start.sh")], container=D_ID,
                                 now=6.0) == []
    assert profile.saw_start(container=D_ID, now=7.0) and not profile.saw_start(
        container=D_ID, now=8.0)
    store.save(profile)
    loaded = store.load(IMAGE)
    assert loaded.starts_seen and loaded.startup_items == [
        {"kind": "exec", "key": ["/app/start.sh", "start.sh"], "container": D_ID, "at": 5.0}]
    listed = BaselineService(FileProfiles(store), store).handle({"op": "list"})
    assert [row["starts_seen"] for row in listed] == [True]
    # a baseline written before starts were tracked has seen none
    obj = profile.to_obj()
    del obj["starts_seen"], obj["startup_items"]
    old = type(profile).from_obj(obj, ItemSet)
    assert not old.starts_seen and old.startup_items == []


# -- live: the real agent joins containers already running --------------------------------------

BENIGN = """#!/bin/sh
mkdir -p /var/log/app
while true; do echo tick >> /var/log/app/app.log; sleep 0.3; done
"""
IMPLANT = ("cp /bin/busybox /tmp/busybox.implant && cp /bin/busybox /tmp/busybox.gone && "
           "(/tmp/busybox.gone sleep 1000000 &) && sleep 0.5 && rm /tmp/busybox.gone && "
           "exec /tmp/busybox.implant sleep 1000000")


@pytest.mark.integration
def test_live_compromise_running_before_the_agent_is_drift_and_learned_ones_stay_quiet(
        kernel_ok, docker_ok, bb_image, tmp_path):
    from tests.support.agent_proc import AgentProcess
    from tests.support.containers import run_container
    from tests.support.images import workload_image
    from tests.support.scenario import baseline_modes, has_reason, image_id, wait_until

    benign_image = workload_image("startup-benign", {"/app/run.sh": (BENIGN, 0o755)})
    state = tmp_path / "state"
    with (run_container(benign_image, ["/app/run.sh"], name="dw-startup-benign") as benign,
          run_container(bb_image, ["sh", "-c", IMPLANT], name="dw-startup-implant") as implant):
        time.sleep(2)  # both running, nothing watching

        def drifts(agent: AgentProcess) -> dict[str, dict]:
            found = {}
            for alert in agent.alerts():
                if alert["container"]["id"] != implant.id or alert["kind"] != "drift":
                    continue
                for code, path in (("exec-added-binary", "/tmp/busybox.implant"),
                                   ("exec-deleted-binary", "/tmp/busybox.gone")):
                    if has_reason(alert, code, text="(running before the agent started)",
                                  path=path, before_agent="True"):
                        found[code] = alert
            return found

        first = AgentProcess(state, tmp_path / "alerts-1.jsonl",
                             ["--window", "1", "--learn-for", "8"])
        with first:
            wait_until(lambda: len(drifts(first)) == 2, 15, "both drifts of the implant")
            benign_id = image_id(benign_image)
            wait_until(lambda: baseline_modes(state).get(benign_id) == "monitor", 30,
                       "the benign image's baseline to leave learning")
            time.sleep(2)
        assert [a for a in first.alerts() if a["container"]["id"] == benign.id] == []

        # the agent restarts: its baselines monitor; nothing that ran before may hide
        second = AgentProcess(state, tmp_path / "alerts-2.jsonl", ["--window", "1"])
        with second:
            wait_until(lambda: len(drifts(second)) == 2, 15, "the drifts again after a restart")
            time.sleep(6)
            quiet = [a for a in second.alerts() if a["container"]["id"] == benign.id]
        assert quiet == [], json.dumps(quiet, indent=1)[:2000]
