"""Detection driven by recorded event files (no kernel, root or Docker): the same capture replayed
through the real pipeline and Detector. Covers export -> import verdict equality, tainting by
unattributed events, and drift provenance (who wrote the binary that ran)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from driftwarden.agent.alerts import ListAlertSink
from driftwarden.agent.detect import Detector, DetectorConfig
from driftwarden.agent.pipeline import (
    SNAPSHOT_FACT,
    ReplayAttribution,
    ReplayProcReader,
    TracePipeline,
)
from driftwarden.agent.procfs import ProcessSnapshot
from driftwarden.core.modes import Mode
from driftwarden.core.records import ContainerView, TraceRecord
from driftwarden.models.drift import Layers
from driftwarden.models.items import ItemSet
from driftwarden.models.profile import LearningPolicy, ProfileStore
from driftwarden.probes._layout import FileOp, Limits
from driftwarden.probes.capture import CaptureWriter, ReplayCapture

from tests.test_decode import connect_record, exec_record, exit_record, file_record, fork_record

CG, UNKNOWN_CG = 4242, 9999
CID = "c" * 64
IMAGE_ID = "sha256:" + "e" * 64
# running since long before the recordings (a container whose start time the runtime did not
# tell, first seen by an exec, would be a new one starting: tests/test_startup.py)
VIEW = ContainerView(state="container", cgroup_id=CG, id=CID, name="web", image="shop/web:1",
                     image_id=IMAGE_ID, runtime="docker", started_at=-1000.0)
SECOND = 1_000_000_000
# what ran when the recordings began: a shell (900) and its five busybox httpd workers
RUNNING = [ProcessSnapshot(tgid=900, ppid=1, start_ticks=5, exe="/bin/busybox", argv=("sh",),
                           cwd="/", cgroup_id=CG)] + [
    ProcessSnapshot(tgid=tgid, ppid=900, start_ticks=6, exe="/bin/busybox",
                    argv=("httpd", "-f"), cwd="/www", cgroup_id=CG)
    for tgid in range(1000, 1005)]


def _normal(t0_s: float, seconds: int) -> list[bytes]:
    """A web-ish loop: a log append, a temp file and a backend connect every 100 ms."""
    out = []
    for i in range(seconds * 10):
        hdr = {"cgroup_id": CG, "tgid": 1000 + i % 5, "pid": 1000 + i % 5, "ppid": 900,
               "ts_ns": int((t0_s + i / 10) * SECOND)}
        out.append(file_record(int(FileOp.OPEN), "/var/log/app.log", open_flags=0o2101,
                               mode=0o644, **hdr))
        out.append(file_record(int(FileOp.OPEN), f"/tmp/req.k{i:05d}x9", open_flags=0o1101,
                               mode=0o600, **hdr))
        out.append(connect_record(family=2, addr=bytes([127, 0, 0, 1]), port=5432, **hdr))
    return out


def _attacks(t0_s: float) -> list[bytes]:
    def hdr(tgid: int, dt: float) -> dict:
        return {"cgroup_id": CG, "tgid": tgid, "pid": tgid, "ppid": 900,
                "ts_ns": int((t0_s + dt) * SECOND)}

    return [
        exec_record("/proc/self/exe", ["cp", "/bin/busybox", "/tmp/dropper"], **hdr(2001, 0.05)),
        file_record(int(FileOp.OPEN), "/tmp/dropper", open_flags=0o1101, mode=0o755,
                    **hdr(2001, 0.1)),
        exec_record("/tmp/dropper", ["dropper", "-x"], **hdr(2002, 0.5)),
        connect_record(family=2, addr=bytes([127, 0, 0, 1]), port=4444, **hdr(2003, 0.6)),
        file_record(int(FileOp.OPEN), "/etc/passwd", open_flags=0o2101, mode=0o644,
                    **hdr(2004, 0.7)),
        *_normal(t0_s + 1, 2),
    ]


def _capture(path: Path, raws: list[bytes], *, unknown: bool = False,
             view: ContainerView = VIEW) -> Path:
    writer = CaptureWriter(path, Limits(), 0)
    writer.fact(("attr", CG), view.to_dict(), 0)
    if unknown:
        writer.fact(("attr", UNKNOWN_CG), ContainerView(state="unknown",
                                                         cgroup_id=UNKNOWN_CG).to_dict(), 0)
    writer.fact(SNAPSHOT_FACT, [p.to_dict() for p in RUNNING], -1)
    for raw in raws:
        writer.record(raw)
    writer.close({})
    return path


def _replay(capture: Path, store: ProfileStore, *, layers: Layers | None = None,
            clock=lambda: 1e9, forests=None, before_close=None
            ) -> tuple[Detector, ListAlertSink]:
    source = ReplayCapture(capture, batch_size=256)
    pipeline = TracePipeline(source, proc=ReplayProcReader(source.facts),
                             attribution=ReplayAttribution(source.facts), sinks=[],
                             pending_timeout=0)
    sink = ListAlertSink()
    config = DetectorConfig(window_seconds=1.0, policy=LearningPolicy(), event_time_windows=True)
    detector = Detector(config, store, sink, layers_of=lambda _c, _t: layers, clock=clock,
                        forests=forests)
    pipeline.sinks.append(detector)
    pipeline.run(poll_interval=0)
    if before_close is not None:
        before_close(detector)
    detector.close()
    return detector, sink


def _verdicts(sink: ListAlertSink) -> list[tuple]:
    return [(a.id, a.kind.value, a.severity.text, a.score,
             json.dumps([r.to_dict() for r in a.reasons], sort_keys=True)) for a in sink.alerts]


def test_export_import_gives_identical_verdicts_on_the_same_replay(tmp_path):
    learn = _capture(tmp_path / "learn.dwcap", _normal(0, 30))
    attack = _capture(tmp_path / "attack.dwcap", _attacks(100))

    store_a = ProfileStore(tmp_path / "a", ItemSet)
    detector, sink = _replay(learn, store_a)
    assert sink.alerts == []
    profile = detector.profiles[IMAGE_ID]
    assert profile.progress.windows_learned >= 25
    profile.set_mode(Mode.MONITOR, reason="test", who="test", now=1e9)
    store_a.save(profile)
    exported = store_a.export(IMAGE_ID, tmp_path / "web.baseline")

    store_b = ProfileStore(tmp_path / "b", ItemSet)  # a fresh state dir: no learning at all
    imported = store_b.import_file(exported, image_id=IMAGE_ID)
    assert imported.mode is Mode.MONITOR

    _, alerts_a = _replay(attack, store_a)
    _, alerts_b = _replay(attack, store_b)
    assert _verdicts(alerts_a) == _verdicts(alerts_b)
    codes = sorted({(a.kind.value, a.reasons[0].code) for a in alerts_a.alerts})
    # novelty, and the window of the attack scored by a model re-fitted from the imported data
    assert codes == [("anomaly", "feature-out-of-range"), ("novel", "new-connect"),
                     ("novel", "new-exec"), ("novel", "new-lineage"), ("novel", "new-write")]
    assert len(alerts_a.alerts) == len(alerts_b.alerts) >= 4


def test_startup_windows_are_neither_learned_nor_scored(tmp_path):
    """A container's first startup_seconds (10 s by default) after the runtime's start time
    stay out of the forest: not learned from, not scored. Novelty still alerts then."""
    plain_store, startup_store = (ProfileStore(tmp_path / d, ItemSet) for d in ("p", "s"))
    plain, _ = _replay(_capture(tmp_path / "p.dwcap", _normal(0, 30)), plain_store)
    started = dataclasses.replace(VIEW, started_at=0.0)
    startup, _ = _replay(_capture(tmp_path / "s.dwcap", _normal(0, 30), view=started),
                         startup_store)
    assert plain.stats["startup_windows"] == 0
    assert startup.stats["startup_windows"] == 10  # the windows beginning at 0 s .. 9 s
    learned = plain.profiles[IMAGE_ID].progress.windows_learned
    assert startup.profiles[IMAGE_ID].progress.windows_learned == learned - 10

    profile = plain.profiles[IMAGE_ID]
    profile.set_mode(Mode.MONITOR, reason="test", who="test", now=1e9)
    profile.starts_seen = True  # a start's novelty is checked (tests/test_startup.py: the first)
    plain_store.save(profile)
    kinds = {}
    for name, view in (("steady", VIEW), ("restarted", dataclasses.replace(VIEW, started_at=99.5))):
        _, sink = _replay(_capture(tmp_path / f"{name}.dwcap", _attacks(100), view=view),
                          plain_store)
        kinds[name] = sorted({(a.kind.value, a.reasons[0].code) for a in sink.alerts})
    novel = [("novel", "new-connect"), ("novel", "new-exec"), ("novel", "new-lineage"),
             ("novel", "new-write")]
    assert kinds == {"steady": [("anomaly", "feature-out-of-range"), *novel], "restarted": novel}


def test_unattributed_events_taint_the_open_windows(tmp_path):
    raws = _normal(0, 10)
    stray = file_record(int(FileOp.OPEN), "/x", open_flags=0o1101, mode=0o600,
                        cgroup_id=UNKNOWN_CG, tgid=7, pid=7, ppid=1, ts_ns=int(4.05 * SECOND))
    clean_store = ProfileStore(tmp_path / "clean", ItemSet)
    clean, _ = _replay(_capture(tmp_path / "clean.dwcap", raws), clean_store)
    store = ProfileStore(tmp_path / "t", ItemSet)
    tainted, _ = _replay(_capture(tmp_path / "t.dwcap", [*raws[:120], stray, *raws[120:]],
                                  unknown=True), store)
    assert tainted.stats["unattributed"] == 1
    progress, clean_progress = (d.profiles[IMAGE_ID].progress for d in (tainted, clean))
    # the one window open when the stray event came, besides the partial one at the end
    assert progress.windows_tainted == clean_progress.windows_tainted + 1
    assert progress.windows_learned == clean_progress.windows_learned - 1 >= 8


def test_drift_alert_names_the_process_that_wrote_the_binary(tmp_path):
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    (upper / "tmp").mkdir(parents=True)
    (upper / "tmp/dropper").write_bytes(b"\x7fELF")
    (lower / "bin").mkdir(parents=True)
    (lower / "bin/busybox").write_bytes(b"\x7fELF")
    layers = Layers(upper=upper, lowers=(lower,))
    capture = _capture(tmp_path / "attack.dwcap", _attacks(100))
    _, sink = _replay(capture, ProfileStore(tmp_path / "s", ItemSet), layers=layers)
    [drift] = [a for a in sink.alerts if a.kind.value == "drift"]
    reason = drift.reasons[0]
    assert reason.code == "exec-added-binary"
    details = dict(reason.details)
    assert details["path"] == "/tmp/dropper"
    assert details["written_by_pid"] == 2001
    assert details["written_by_exe"] == "/bin/busybox" and details["written_by_argv0"] == "cp"
    assert details["written_at"] == 100.1
    assert reason.text == ("ran /tmp/dropper, which the image does not contain (added at run "
                           "time); written by pid 2001 (/bin/busybox as cp) in this container "
                           "0.400 s earlier")
    # the trigger first, then the write that created the file
    assert [e["kind"] for e in drift.events] == ["exec", "write"]
    assert drift.events[1]["write"]["path"] == "/tmp/dropper"
    assert drift.events[1]["process"]["pid"] == 2001


def test_layers_cache_falls_back_to_the_runtimes_record_and_never_caches_a_miss(tmp_path):
    from driftwarden.agent.detect import LayersCache

    proc = tmp_path / "proc"
    (proc / "10").mkdir(parents=True)
    (proc / "10/mountinfo").write_text("1 0 8:1 / / rw - ext4 /dev/sda1 rw\n")  # runc init
    asked = []
    graph = {"Name": "overlay2", "Data": {"UpperDir": str(tmp_path / "up"),
                                          "LowerDir": f"{tmp_path / 'l1'}:{tmp_path / 'l2'}"}}

    def graph_driver_of(cid):
        asked.append(cid)
        return graph if cid == CID else None

    now = [100.0]
    cache = LayersCache(str(proc), graph_driver_of=graph_driver_of, clock=lambda: now[0])
    assert cache.get("gone" * 16, 99) is None and cache.get("gone" * 16, 99) is None
    assert asked == ["gone" * 16]  # a miss is not asked again for MISS_SECONDS...
    now[0] += LayersCache.MISS_SECONDS
    assert cache.get("gone" * 16, 99) is None
    assert asked == ["gone" * 16] * 2  # ...and then it is: the container may have started
    layers = cache.get(CID, 10)  # mountinfo shows no overlay root yet
    assert layers == Layers(upper=tmp_path / "up", lowers=(tmp_path / "l1", tmp_path / "l2"))
    assert cache.get(CID, 12345) is layers and asked.count(CID) == 1
    assert cache.stats == {"mountinfo": 0, "graph_driver": 1, "unknown": 2}


def test_the_detector_reports_each_records_kernel_timestamp_as_it_takes_it_up(tmp_path):
    """The agent's kernel -> agent latency histogram is fed from here (agent/command.py)."""
    raws = _normal(0, 1)
    stray = file_record(int(FileOp.OPEN), "/x", open_flags=0o1101, mode=0o600,
                        cgroup_id=UNKNOWN_CG, tgid=7, pid=7, ppid=1, ts_ns=int(0.55 * SECOND))
    source = ReplayCapture(_capture(tmp_path / "c.dwcap", [*raws[:15], stray, *raws[15:]],
                                    unknown=True), batch_size=256)
    pipeline = TracePipeline(source, proc=ReplayProcReader(source.facts),
                             attribution=ReplayAttribution(source.facts), sinks=[],
                             pending_timeout=0)
    seen: list[int] = []
    detector = Detector(DetectorConfig(event_time_windows=True),
                        ProfileStore(tmp_path / "s", ItemSet), ListAlertSink(),
                        layers_of=lambda _c, _t: None, clock=lambda: 1e9, event_seen=seen.append)
    pipeline.sinks.append(detector)
    pipeline.run(poll_interval=0)
    detector.close()
    # every record once, in the order it reaches the detector: the unattributed one last (it
    # waited for its container's metadata until the end of its batch)
    assert seen == [*(int(i / 10 * SECOND) for i in range(10) for _ in range(3)),
                    int(0.55 * SECOND)]


def _applet_run(t0_s: float, shell: int, child: int) -> list[bytes]:
    """A shell (forked after the recording began) forks a child that re-execs busybox as nc,
    which connects, is refused and exits at once."""
    def h(tgid: int, start: int, dt: float, ppid: int = 1, pstart: int = 0) -> dict:
        return {"cgroup_id": CG, "tgid": tgid, "pid": tgid, "start_ns": start, "ppid": ppid,
                "parent_start_ns": pstart, "ts_ns": int((t0_s + dt) * SECOND)}

    sh_start, nc_start = int(t0_s * SECOND) + 1, int(t0_s * SECOND) + 2
    return [
        exec_record("/bin/sh", ["sh", "-c", "nc 127.0.0.1 1"], **h(shell, sh_start, 0.0)),
        fork_record(child, nc_start, **h(shell, sh_start, 0.1)),
        exec_record("/proc/self/exe", ["nc", "127.0.0.1", "1"],
                    **h(child, nc_start, 0.2, shell, sh_start)),
        connect_record(family=2, addr=bytes([127, 0, 0, 1]), port=1, retval=-111,
                       **h(child, nc_start, 0.3, shell, sh_start)),
        exit_record(**h(child, nc_start, 0.4, shell, sh_start)),
        exit_record(**h(shell, sh_start, 0.5)),
    ]


def test_busybox_applets_are_named_by_their_binary_without_proc(tmp_path):
    """Issue 9, class 1: `nc` is a busybox applet re-exec'd through /proc/self/exe and gone at
    once. The captures hold no /proc answer at all: the program comes from the fork and exec
    records (the shell ran /bin/sh, a symlink to busybox in the image). Learned as `exec
    /bin/busybox as nc`, the same applet on a reused pid later is known, never `/proc/self/exe`."""
    lower = tmp_path / "lower"
    (lower / "bin").mkdir(parents=True)
    (lower / "bin/busybox").write_bytes(b"\x7fELF")
    (lower / "bin/sh").symlink_to("busybox")
    layers = Layers(upper=tmp_path / "upper", lowers=(lower,))
    store = ProfileStore(tmp_path / "s", ItemSet)
    learn = _capture(tmp_path / "learn.dwcap", _applet_run(10, 3000, 3001) + _normal(11, 2))
    detector, sink = _replay(learn, store, layers=layers)
    profile = detector.profiles[IMAGE_ID]
    items = {item.describe() for item in profile.items}
    assert {"exec /bin/busybox as nc", "exec /bin/busybox as sh",
            "/bin/busybox:sh started /bin/busybox:nc",
            "tcp connect to 127.0.0.1:1 (loopback) by /bin/busybox"} <= items, items
    assert not [i for i in items if "/proc/self/exe" in i or "?" in i], items
    profile.set_mode(Mode.MONITOR, reason="test", who="test", now=1e9)
    store.save(profile)
    # later: the same pids again (reused), each a new process of the same programs
    again = _capture(tmp_path / "again.dwcap", _applet_run(50, 3001, 3000) + _normal(51, 2))
    _, sink = _replay(again, store, layers=layers)
    assert [a for a in sink.alerts if a.kind.value != "anomaly"] == []


class _WallClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _failed_exec(t: float, offset_ns: int) -> TraceRecord:
    """A failed exec (a PATH search miss) at wall time `t` through the clock offset."""
    from driftwarden.probes.decode import Decoder

    raw = exec_record("/usr/local/bin/job", ["job"], retval=-2, cgroup_id=CG, tgid=1000,
                      pid=1000, ppid=900, ts_ns=round(t * SECOND) - offset_ns)
    return TraceRecord(event=Decoder(Limits()).decode(raw), kind="exec", container=VIEW,
                       ppid=900, path="/usr/local/bin/job")


def test_live_windows_go_by_event_time_when_the_agent_lags(tmp_path):
    """Issue 9 (the host under CPU load): 30 events over 3 s of kernel time reach a starved
    agent in one batch 5 s late. Each counts in the window it happened in (10, 10, 10), not
    all in one (`execs_failed = 30`); a window closes once the newest event, or the wall clock
    minus the observed lag (at least 1 s), is past its end, so idle windows still close."""
    offset = 1_700_000_000 * SECOND  # wall = monotonic + offset
    clock = _WallClock(999.55)
    detector = Detector(DetectorConfig(window_seconds=1.0, policy=LearningPolicy()),
                        ProfileStore(tmp_path / "s", ItemSet), ListAlertSink(),
                        layers_of=lambda _c, _t: None, clock_offset_ns=offset, clock=clock)
    closed: list = []
    detector._handle_windows = closed.extend  # the windows the forest would learn or score

    def shape() -> list[tuple]:
        return [(w.start - 1_700_000_000, w.end - 1_700_000_000, w.events) for w in closed]

    base = 1_700_000_000.0
    clock.t = base + 999.55
    detector.write(_failed_exec(base + 999.5, offset))  # in time: lag 0.05 s
    detector.flush()
    assert closed == []
    clock.t = base + 1000.9  # the window [999, 1000) is 0.9 s old: the 1 s allowance holds it
    detector.flush()
    assert closed == []
    clock.t = base + 1001.05
    detector.flush()
    assert shape() == [(999.0, 1000.0, 1)]
    # starved: 3 s of events (10 a second) arrive at once, 5 s after the first of them
    clock.t = base + 1005.0
    for i in range(30):
        detector.write(_failed_exec(base + 1000.0 + i / 10, offset))
    detector.flush()
    # the two windows the newest event (1002.9) is past close; [1002, 1003) may still get
    # events: the wall clock minus the 5 s lag is 1000.0
    assert shape()[1:] == [(1000.0, 1001.0, 10), (1001.0, 1002.0, 10)]
    assert [w.vector[-1] for w in closed[1:]] == [10.0, 10.0]  # execs_failed
    clock.t = base + 1007.9  # idle, 4.9 s later: 1002.9 still within the lag allowance
    detector.flush()
    assert len(closed) == 3
    clock.t = base + 1008.1
    detector.flush()
    assert shape()[3:] == [(1002.0, 1003.0, 10)]
    clock.t = base + 1010.2  # idle windows close on the wall clock too
    detector.flush()
    assert shape()[4:] == [(1003.0, 1004.0, 0), (1004.0, 1005.0, 0)]
    assert detector.windows.stats.late == 0
