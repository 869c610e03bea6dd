"""Incidents (issue 9, "one finding, many alerts"): the alerts of one cause (a container's process
tree within --incident-window) are one alert with all its reasons, a count and the highest
severity; drift is never folded into novelty nor delayed; an anomaly that only restates the
novelty its window already alerted is not raised."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
from driftwarden.agent.alerts import (
    MORE_REASONS_CODE,
    AlertAggregator,
    ListAlertSink,
    build_alert,
)
from driftwarden.agent.command import add_parsers, options_from_args
from driftwarden.agent.detect import Detector, DetectorConfig, restates_novelty
from driftwarden.agent.pipeline import ReplayAttribution, ReplayProcReader, TracePipeline
from driftwarden.core import wire
from driftwarden.core.alerts import Alert, AlertKind, AlertReason, Severity
from driftwarden.core.modes import Mode
from driftwarden.core.records import ProcKey, Program, TraceRecord
from driftwarden.models.drift import Layers
from driftwarden.models.features import WindowAggregator
from driftwarden.models.items import ItemSet
from driftwarden.models.profile import LearningPolicy, ProfileStore
from driftwarden.ops.format import reason_text
from driftwarden.probes._layout import AT_FDCWD, EventKind, FileOp, Flag, Limits
from driftwarden.probes.capture import CaptureWriter, ReplayCapture
from driftwarden.probes.events import ExecEvent, FileEvent, Header

from tests.test_alerts import OFFSET, TS, WEB, FakeClock, exec_record
from tests.test_decode import connect_record, file_record
from tests.test_decode import exec_record as raw_exec
from tests.test_detect_replay import CG, IMAGE_ID, SECOND, VIEW

APPEND = 0o2101  # O_CREAT | O_APPEND | O_WRONLY
# what Detector._incident_of names: the container, its process tree's root, a drift's file
NOVEL_TREE = (WEB.id, ProcKey(4000, 0), None)
DRIFT_TREE = (WEB.id, ProcKey(4000, 0), "/tmp/x")


def novel(key: str, *, severity: Severity = Severity.MEDIUM, seconds: float = 0.0,
          code: str = "new-exec", kind: AlertKind = AlertKind.NOVEL) -> Alert:
    """An alert about `key` `seconds` after TS (its reason: code, "new KEY", the item)."""
    reason = AlertReason(code=code, text=f"new {key}", details=(("item", key),))
    return build_alert(kind, severity, 1.0, [reason],
                       exec_record(ts_ns=TS + int(seconds * SECOND)), baseline_version=7,
                       dedup_key=f"{kind.value}:{key}", clock_offset_ns=OFFSET)


def grouping(**kw) -> tuple[AlertAggregator, ListAlertSink, FakeClock]:
    clock, sink = FakeClock(), ListAlertSink()
    return AlertAggregator(sink, clock=clock, **kw), sink, clock


# -- grouping (AlertAggregator) --------------------------------------------------------------


def test_the_first_alert_goes_at_once_and_the_rest_of_its_incident_is_merged_at_window_end():
    agg, sink, clock = grouping()
    first = novel("exec /srv/app")
    agg.submit(first, NOVEL_TREE)
    assert sink.alerts == [first]  # at once, unchanged
    clock.t += 0.5
    agg.submit(novel("lineage ? -> /srv/app", severity=Severity.HIGH, seconds=0.1,
                     code="new-lineage"), NOVEL_TREE)
    agg.submit(novel("write /data", seconds=0.2, code="new-write"), NOVEL_TREE)
    agg.submit(novel("lineage ? -> /srv/app", severity=Severity.HIGH, seconds=0.3,
                     code="new-lineage"), NOVEL_TREE)  # the same reason again: shown once
    agg.submit(novel("connect db:5432", severity=Severity.LOW, seconds=0.4, code="new-connect"),
               NOVEL_TREE)
    clock.t += 1.49
    assert agg.flush_due() == 0 and sink.alerts == [first]  # the window is still open
    clock.t += 0.01  # 2 s after the first alert
    assert agg.flush_due() == 1
    merged = sink.alerts[1]
    assert (merged.id, merged.kind, merged.time, merged.process, merged.events) == (
        first.id, AlertKind.NOVEL, first.time, first.process, first.events)
    assert [(r.code, r.text) for r in merged.reasons] == [
        ("new-exec", "new exec /srv/app"), ("new-lineage", "new lineage ? -> /srv/app"),
        ("new-write", "new write /data"), ("new-connect", "new connect db:5432")]
    assert merged.reasons[2].details == (("item", "write /data"),)
    assert merged.severity is Severity.HIGH  # the highest
    assert (merged.count, merged.first_seen, merged.last_seen) == (
        4, first.time + 0.1, first.time + 0.4)  # the folded ones, since the first was sent
    assert agg.stats.to_dict() == {"submitted": 5, "sent": 2, "aggregated": 0, "folded": 4,
                                   "aggregates_sent": 1, "incidents": 1, "evicted": 0}
    # the incident is over: the tree's next alert starts another one, sent at once
    later = novel("exec /bin/other", seconds=3)
    agg.submit(later, NOVEL_TREE)
    assert sink.alerts[2] == later and agg.stats.incidents == 2


def test_drift_is_never_folded_into_novelty_nor_delayed():
    agg, sink, clock = grouping()
    first = novel("exec /tmp/x")
    agg.submit(first, NOVEL_TREE)
    chmod = novel("chmod /tmp/x", kind=AlertKind.DRIFT, code="chmod-x-new-file", seconds=0.1)
    agg.submit(chmod, DRIFT_TREE)
    assert sink.alerts == [first, chmod]  # its own incident, at once
    clock.t += 0.2
    ran = novel("ran /tmp/x", kind=AlertKind.DRIFT, severity=Severity.HIGH,
                code="exec-added-binary", seconds=0.2)
    agg.submit(ran, DRIFT_TREE)  # the same cause: folded into the drift, and sent now
    assert len(sink.alerts) == 3
    drift = sink.alerts[2]
    assert (drift.id, drift.kind, drift.severity, drift.count) == (
        chmod.id, AlertKind.DRIFT, Severity.HIGH, 1)
    assert [r.code for r in drift.reasons] == ["chmod-x-new-file", "exec-added-binary"]
    assert drift.last_seen == ran.time > chmod.last_seen
    # a drift never joins a novel incident, even under the novel incident's cause
    agg.submit(novel("ran /tmp/y", kind=AlertKind.DRIFT, seconds=0.3), NOVEL_TREE)
    assert sink.alerts[3].kind is AlertKind.DRIFT and sink.alerts[3].count == 1
    agg.submit(novel("lineage sh -> /tmp/x", code="new-lineage", seconds=0.3), NOVEL_TREE)
    clock.t += 2
    assert agg.flush_due() == 1
    assert [a.id for a in sink.alerts] == [first.id, chmod.id, chmod.id,
                                           sink.alerts[3].id, first.id]
    assert [r.code for r in sink.alerts[4].reasons] == ["new-exec", "new-lineage"]
    # nothing left for the drift incident to send: it was sent when it grew
    clock.t += 60
    agg.flush_due()
    assert len(sink.alerts) == 5


def test_another_process_tree_or_container_is_another_incident():
    agg, sink, _ = grouping()
    alerts = [novel("exec /srv/app"), novel("exec /bin/sh", seconds=0.1),
              novel("exec /bin/id", seconds=0.2)]
    agg.submit(alerts[0], NOVEL_TREE)
    agg.submit(alerts[1], (WEB.id, ProcKey(5000, 0), None))  # `docker exec sh`: its own tree
    agg.submit(alerts[2], ("other-container", ProcKey(4000, 0), None))
    assert sink.alerts == alerts
    agg.submit(novel("exec /bin/ls", seconds=0.3))  # no cause named: never folded
    assert len(sink.alerts) == 4 and agg.stats.folded == 0


def test_a_repeat_of_the_first_alert_opens_the_next_incident_of_its_cause():
    """A replica's second restart within the repeat window: its first alert is a counted
    repeat, and the others fold into it rather than going out as alerts of their own."""
    agg, sink, clock = grouping()
    first = novel("exec /srv/app")
    agg.submit(first, NOVEL_TREE)
    clock.t += 30
    restart = (WEB.id, ProcKey(4100, 0), None)  # a new init process
    agg.submit(novel("exec /srv/app", seconds=30), restart)
    agg.submit(novel("write /data", code="new-write", seconds=30.1), restart)
    assert sink.alerts == [first]
    clock.t += 2
    assert agg.flush_due() == 1
    merged = sink.alerts[1]
    assert (merged.id, merged.count, [r.code for r in merged.reasons]) == (
        first.id, 2, ["new-exec", "new-write"])
    assert merged.time == first.time + 30  # the latest repeat's event


def test_a_repeat_replaces_its_own_reasons_and_keeps_the_folded_ones():
    agg, sink, clock = grouping()
    first = novel("exec /srv/app")
    agg.submit(first, NOVEL_TREE)
    agg.submit(novel("write /data", code="new-write", seconds=0.1), NOVEL_TREE)
    again = dataclasses.replace(novel("exec /srv/app", seconds=0.2), reasons=(
        AlertReason(code="new-exec", text="new exec /srv/app (again)"),))
    agg.submit(again, NOVEL_TREE)  # a repeat of the first: its latest reasons stand for it
    clock.t += 2
    agg.flush_due()
    assert [r.text for r in sink.alerts[1].reasons] == ["new exec /srv/app (again)",
                                                        "new write /data"]
    assert (sink.alerts[1].count, sink.alerts[1].time) == (2, again.time)


def test_merged_reasons_stay_within_the_wire_bound():
    agg, sink, _ = grouping()
    assert agg.max_reasons == wire.WireLimits.max_reasons == 32
    agg.submit(novel("item-0"), NOVEL_TREE)
    for i in range(1, 41):
        agg.submit(novel(f"item-{i}", seconds=i / 100), NOVEL_TREE)
    agg.submit(novel("item-7", seconds=0.5), NOVEL_TREE)  # known: not counted again
    agg.close()
    merged = sink.alerts[1]
    assert merged.count == 41 and len(merged.reasons) == 32
    assert [r.text for r in merged.reasons[:31]] == [f"new item-{i}" for i in range(31)]
    assert merged.reasons[31] == AlertReason(code=MORE_REASONS_CODE,
                                             text="... and 10 more reasons",
                                             details=(("more", 10),))
    wire.validate_alert(wire.alert_to_proto(merged, "node-a"))  # the collector takes it
    one_more = dataclasses.replace(merged, reasons=(*merged.reasons, merged.reasons[0]))
    with pytest.raises(wire.InvalidMessage, match="reasons"):
        wire.validate_alert(wire.alert_to_proto(one_more, "node-a"))


def test_incident_window_zero_groups_nothing():
    agg, sink, clock = grouping(incident_seconds=0)
    alerts = [novel("exec /srv/app"), novel("write /data", code="new-write", seconds=0.1)]
    for alert in alerts:
        agg.submit(alert, NOVEL_TREE)
    clock.t += 5
    agg.flush_due()
    assert sink.alerts == alerts
    assert (agg.stats.folded, agg.stats.incidents) == (0, 0)
    with pytest.raises(ValueError, match="incident_seconds"):
        AlertAggregator(sink, incident_seconds=-1)


def test_the_agent_flag():
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    default = options_from_args(parser.parse_args(["agent", "--state-dir", "/tmp/s"]))
    off = options_from_args(parser.parse_args(["agent", "--state-dir", "/tmp/s",
                                               "--incident-window", "0"]))
    assert (default.incident_window, off.incident_window) == (2.0, 0.0)


def test_close_sends_an_open_incident():
    agg, sink, _ = grouping()
    agg.submit(novel("exec /srv/app"), NOVEL_TREE)
    agg.submit(novel("write /data", code="new-write", seconds=0.1), NOVEL_TREE)
    agg.close()
    assert [a.count for a in sink.alerts] == [1, 1]
    assert [r.code for r in sink.alerts[1].reasons] == ["new-exec", "new-write"]
    s = agg.stats
    assert s.submitted == s.sent - s.aggregates_sent + s.aggregated + s.folded == 2


# -- the detector names each alert's cause -------------------------------------------------


def _header(kind: EventKind, tgid: int, ppid: int, seconds: float, comm: str) -> Header:
    return Header(kind=kind, ts_ns=TS + int(seconds * SECOND), cgroup_id=CG, pid=tgid,
                  tgid=tgid, ppid=ppid, uid=0, gid=0, comm=comm, flags=Flag(0), suppressed=0)


def _exec(tgid: int, ppid: int, exe: str, seconds: float, parent: str | None = None,
          ) -> TraceRecord:
    """An exec as the pipeline gives it: `parent` is what the parent process runs."""
    name = Path(exe).name
    event = ExecEvent(header=_header(EventKind.EXEC, tgid, ppid, seconds, name),
                      filename=exe, argv=(name,), retval=0, dirfd=AT_FDCWD)
    return TraceRecord(event=event, kind="exec", container=VIEW, ppid=ppid, path=exe, exe=exe,
                       program=Program(exe, name),
                       parent_program=Program(parent, Path(parent).name) if parent else None)


def _append(tgid: int, ppid: int, path: str, seconds: float) -> TraceRecord:
    event = FileEvent(header=_header(EventKind.FILE, tgid, ppid, seconds, "app"),
                      op=FileOp.OPEN, path=path, path2=None, dirfd=AT_FDCWD, dirfd2=0,
                      open_flags=APPEND, mode=0o644, retval=3)
    return TraceRecord(event=event, kind="write", container=VIEW, ppid=ppid, path=path)


def test_the_detector_groups_by_container_and_process_tree(tmp_path):
    agg, sink, clock = grouping()
    detector = Detector(DetectorConfig(initial_mode=Mode.MONITOR),
                        ProfileStore(tmp_path, ItemSet), agg, layers_of=lambda _c, _t: None,
                        clock=lambda: 1e9)
    # the container's init (its parent, the runtime's shim, is outside), a child, a grandchild
    for record in (_exec(500, 10, "/srv/app", 0), _exec(501, 500, "/bin/mkdir", 0.1, "/srv/app"),
                   _exec(502, 501, "/bin/chown", 0.2, "/bin/mkdir")):
        detector.write(record)
    detector.write(_exec(600, 10, "/bin/sh", 0.3))  # `docker exec`: another tree
    assert [(a.reasons[0].text, a.process["pid"]) for a in sink.alerts] == [
        ("new exec /srv/app, never seen for shop/web:1", 500),
        ("new exec /bin/sh, never seen for shop/web:1", 600)]
    clock.t += 2
    detector.flush()  # each tick: the incident's merged alert goes when it ends
    # the `docker exec` tree had one alert: nothing more to send for it
    assert [(a.process["pid"], a.count) for a in sink.alerts[2:]] == [(500, 4)]
    assert [r.details[0][1] for r in sink.alerts[2].reasons] == [
        "exec /srv/app", "exec /bin/mkdir", "/srv/app:app started /bin/mkdir:mkdir",
        "exec /bin/chown", "/bin/mkdir:mkdir started /bin/chown:chown"]


def _chmod(tgid: int, ppid: int, path: str, seconds: float) -> TraceRecord:
    event = FileEvent(header=_header(EventKind.FILE, tgid, ppid, seconds, "chmod"),
                      op=FileOp.CHMOD, path=path, path2=None, dirfd=AT_FDCWD, dirfd2=0,
                      open_flags=0, mode=0o755, retval=0)
    return TraceRecord(event=event, kind="write", container=VIEW, ppid=ppid, path=path)


def test_the_detector_folds_the_drifts_of_one_file_and_keeps_other_files_apart(tmp_path):
    upper, lower = tmp_path / "upper", tmp_path / "lower"
    (upper / "tmp").mkdir(parents=True)
    lower.mkdir()
    for name in ("x", "y"):
        (upper / "tmp" / name).write_bytes(b"\x7fELF")
    agg, sink, _ = grouping()
    detector = Detector(DetectorConfig(), ProfileStore(tmp_path / "s", ItemSet), agg,
                        layers_of=lambda _c, _t: Layers(upper=upper, lowers=(lower,)),
                        clock=lambda: 1e9)
    # one shell (800, started by the runtime) drops two binaries: chmod +x and runs each
    for record in (_exec(800, 10, "/bin/sh", 0),
                   _chmod(801, 800, "/tmp/x", 0), _exec(802, 800, "/tmp/x", 0.1, "/bin/sh"),
                   _chmod(803, 800, "/tmp/y", 0.2), _exec(804, 800, "/tmp/y", 0.3, "/bin/sh")):
        detector.write(record)
    # learning: no novelty; each file's first drift at once, its exec folded in and sent now
    assert [(a.process["pid"], a.count, [r.code for r in a.reasons]) for a in sink.alerts] == [
        (801, 1, ["chmod-x-new-file"]), (801, 1, ["chmod-x-new-file", "exec-added-binary"]),
        (803, 1, ["chmod-x-new-file"]), (803, 1, ["chmod-x-new-file", "exec-added-binary"])]
    assert [a.severity for a in sink.alerts] == [Severity.MEDIUM, Severity.HIGH] * 2
    assert len({a.id for a in sink.alerts}) == 2


# -- an anomaly that only restates novelty ---------------------------------------------------


def test_restates_novelty_only_when_every_out_of_range_feature_is_alerted_novelty():
    alerted = {"novel_exec": 1, "novel_write": 3}
    assert restates_novelty({"novel_write": 3.0}, alerted)
    assert restates_novelty({"novel_write": 3.0, "novel_exec": 1.0}, alerted)
    assert not restates_novelty({"novel_write": 4.0}, alerted)  # one write was not alerted
    assert not restates_novelty({"novel_connect": 1.0}, alerted)
    assert not restates_novelty({"novel_write": 3.0, "shells_spawned": 1.0}, alerted)
    assert not restates_novelty({}, alerted)  # the forest's verdict alone: still an anomaly
    assert not restates_novelty({"novel_write": 3.0}, {})  # learned, not alerted


def test_windows_count_the_novelty_their_records_alerted():
    windows = WindowAggregator(1.0, clock=lambda: 0.0)
    for alerted in (("write",), ("write",), ()):  # the last one's novelty was learned
        windows.add(_append(700, 1, "/data/x", 0), ("write",), now=0.5, alerted=alerted)
    [window] = windows.tick(1.0)
    assert window.as_dict()["novel_write"] == 3.0
    assert window.alerted_novelty == (("novel_write", 2),)



# -- replay: a restart-like burst is one alert ------------------------------------------------


def _hdr(tgid: int, ppid: int, t: float) -> dict:
    return {"cgroup_id": CG, "tgid": tgid, "pid": tgid, "ppid": ppid, "ts_ns": int(t * SECOND)}


def _steady(t0: float, seconds: int) -> list[bytes]:
    """Per second: ten log appends and ten backend connects by the app's workers, two runs of
    date by one of them."""
    out = []
    for i in range(seconds * 10):
        t, worker = t0 + i / 10, 1000 + i % 5
        if i % 5 == 0:
            out.append(raw_exec("/usr/bin/date", ["date"], **_hdr(5000 + i, worker, t)))
        out.append(file_record(int(FileOp.OPEN), "/var/log/app.log", open_flags=APPEND,
                               mode=0o644, **_hdr(worker, 900, t + 0.01)))
        out.append(connect_record(family=2, addr=bytes([127, 0, 0, 1]), port=5432,
                                  **_hdr(worker, 900, t + 0.02)))
    return out


def _restart(t0: float) -> list[bytes]:
    """The app restarted as another program: the same shape of window, every item new (a new
    exec, its lineages, its writes and connects), in one process tree."""
    init, worker = 7000, 7001  # the init's parent (the runtime's shim) is outside
    out = [raw_exec("/usr/bin/app", ["app"], **_hdr(init, 1, t0)),
           raw_exec("/usr/bin/app", ["app"], **_hdr(worker, init, t0 + 0.05))]
    for i in range(10):
        t, pid = t0 + 0.1 + i / 12, (init, worker)[i % 2]
        out.append(file_record(int(FileOp.OPEN), "/data/app.log", open_flags=APPEND,
                               mode=0o644, **_hdr(pid, init, t)))
        out.append(connect_record(family=2, addr=bytes([127, 0, 0, 1]), port=5432,
                                  **_hdr(pid, init, t + 0.01)))
    return out


def _capture(path: Path, raws: list[bytes]) -> Path:
    writer = CaptureWriter(path, Limits(), 0)
    writer.fact(("attr", CG), VIEW.to_dict(), 0)
    for raw in raws:
        writer.record(raw)
    writer.close({})
    return path


def _replay(capture: Path, store: ProfileStore, alerts) -> Detector:
    source = ReplayCapture(capture, batch_size=256)
    pipeline = TracePipeline(source, proc=ReplayProcReader(source.facts),
                             attribution=ReplayAttribution(source.facts), sinks=[],
                             pending_timeout=0)
    detector = Detector(DetectorConfig(window_seconds=1.0, policy=LearningPolicy(),
                                       event_time_windows=True),
                        store, alerts, layers_of=lambda _c, _t: None, clock=lambda: 1e9)
    pipeline.sinks.append(detector)
    pipeline.run(poll_interval=0)
    detector.close()
    return detector


def test_a_restart_like_burst_is_one_novel_alert_with_every_reason_and_no_anomaly(tmp_path):
    store = ProfileStore(tmp_path / "s", ItemSet)
    learned = _replay(_capture(tmp_path / "learn.dwcap", _steady(0, 30)), store,
                      ListAlertSink())
    profile = learned.profiles[IMAGE_ID]
    assert profile.progress.windows_learned >= 25
    profile.set_mode(Mode.MONITOR, reason="test", who="test", now=1e9)
    store.save(profile)
    burst = _capture(tmp_path / "burst.dwcap", [*_restart(100), *_steady(101, 2)])

    ungrouped = ListAlertSink()
    detector = _replay(burst, store, ungrouped)
    assert detector.stats["anomaly_restating_novelty"] == 1
    assert {a.kind for a in ungrouped.alerts} == {AlertKind.NOVEL}
    assert len({a.id for a in ungrouped.alerts}) == 4  # one per new item, as before

    agg, sink, _ = grouping()
    detector = _replay(burst, store, agg)
    assert detector.stats["anomaly_restating_novelty"] == 1
    assert len({a.id for a in sink.alerts}) == 1
    first, merged = sink.alerts
    assert (first.kind, first.count, first.process["pid"]) == (AlertKind.NOVEL, 1, 7000)
    assert [(r.code, dict(r.details)["item"]) for r in merged.reasons] == [
        ("new-exec", "exec /usr/bin/app"),
        ("new-lineage", "/usr/bin/app:app started /usr/bin/app:app"),
        ("new-write", "create /data/app.log"),
        ("new-connect", "tcp connect to 127.0.0.1:5432 (loopback) by /usr/bin/app")]
    assert first.count + merged.count == len(ungrouped.alerts)
    assert merged.severity == max(a.severity for a in ungrouped.alerts)


def test_the_operator_table_says_how_many_more_reasons_an_alert_carries():
    merged = wire.alert_to_proto(
        dataclasses.replace(novel("exec /srv/app"), reasons=(
            AlertReason(code="new-exec", text="new exec /srv/app"),
            AlertReason(code="new-write", text="new write /data"),
            AlertReason(code="new-connect", text="new connect db:5432"))), "node-a")
    assert reason_text(merged) == "new exec /srv/app (+2 more)"
    assert reason_text(wire.alert_to_proto(novel("exec /srv/app"), "node-a")) == (
        "new exec /srv/app")
