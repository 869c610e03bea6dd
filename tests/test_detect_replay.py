"""Detection driven by recorded event files (no kernel, root or Docker): the same capture replayed
through the real pipeline and Detector. Covers export -> import verdict equality, tainting by
unattributed events, and drift provenance (who wrote the binary that ran)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from driftwarden.agent.alerts import ListAlertSink
from driftwarden.agent.detect import Detector, DetectorConfig
from driftwarden.agent.pipeline import ReplayAttribution, ReplayProcReader, TracePipeline
from driftwarden.core.modes import Mode
from driftwarden.core.records import ContainerView
from driftwarden.models.drift import Layers
from driftwarden.models.items import ItemSet
from driftwarden.models.profile import LearningPolicy, ProfileStore
from driftwarden.probes._layout import FileOp, Limits
from driftwarden.probes.capture import CaptureWriter, ReplayCapture

from tests.test_decode import connect_record, exec_record, file_record

CG, UNKNOWN_CG = 4242, 9999
CID = "c" * 64
IMAGE_ID = "sha256:" + "e" * 64
VIEW = ContainerView(state="container", cgroup_id=CG, id=CID, name="web", image="shop/web:1",
                     image_id=IMAGE_ID, runtime="docker")
SECOND = 1_000_000_000


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
    for tgid in (*range(1000, 1005), 2001, 2003, 2004):
        writer.fact(("exe", tgid), "/bin/busybox", 0)
    for raw in raws:
        writer.record(raw)
    writer.close({})
    return path


def _replay(capture: Path, store: ProfileStore, *, layers: Layers | None = None,
            clock=lambda: 1e9) -> tuple[Detector, ListAlertSink]:
    source = ReplayCapture(capture, batch_size=256)
    pipeline = TracePipeline(source, proc=ReplayProcReader(source.facts),
                             attribution=ReplayAttribution(source.facts), sinks=[],
                             pending_timeout=0)
    sink = ListAlertSink()
    config = DetectorConfig(window_seconds=1.0, policy=LearningPolicy(), event_time_windows=True)
    detector = Detector(config, store, sink,
                        exe_of=pipeline.processes.exe_before_exec,
                        layers_of=lambda _c, _t: layers, clock=clock)
    pipeline.sinks.append(detector)
    pipeline.run(poll_interval=0)
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
                        exe_of=pipeline.processes.exe_before_exec,
                        layers_of=lambda _c, _t: None, clock=lambda: 1e9, event_seen=seen.append)
    pipeline.sinks.append(detector)
    pipeline.run(poll_interval=0)
    detector.close()
    # every record once, in the order it reaches the detector: the unattributed one last (it
    # waited for its container's metadata until the end of its batch)
    assert seen == [*(int(i / 10 * SECOND) for i in range(10) for _ in range(3)),
                    int(0.55 * SECOND)]
