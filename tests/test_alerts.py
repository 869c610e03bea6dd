"""Alerts: stable ids, the JSON schema, severity order, sinks, aggregation of repeats."""

from __future__ import annotations

import dataclasses
import io
import json

import pytest
from driftwarden.agent.alerts import (
    AlertAggregator,
    JsonLinesAlertSink,
    ListAlertSink,
    build_alert,
)
from driftwarden.agent.output import record_to_dict
from driftwarden.core.alerts import (
    MAX_LABEL_CHARS,
    MAX_LABELS,
    Alert,
    AlertKind,
    AlertReason,
    Severity,
    alert_id,
)
from driftwarden.core.records import ContainerView, TraceRecord
from driftwarden.models.drift import DriftKind, DriftVerdict
from driftwarden.probes._layout import AT_FDCWD, EventKind, FileOp, Flag
from driftwarden.probes.events import ExecEvent, FileEvent, Header

OFFSET = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z
TS = 3_250_000_000  # + 3.25 s
CID = "f00dcafe" * 8
OTHER_CID = "deadbeef" * 8

WEB = ContainerView(
    state="container", cgroup_id=777, cgroup_path=f"/system.slice/docker-{CID}.scope", id=CID,
    name="web", image="nginx:1.25", image_id="sha256:" + "ab" * 32, runtime="docker",
    pod="web-0", namespace="prod", labels=(("app", "web"),),
    pod_uid="4f0ab913-49bd-4781-bd74-62f4d49f3374", workload="StatefulSet/web",
    image_digest="docker.io/library/nginx@sha256:" + "cd" * 32,
)
OTHER = dataclasses.replace(WEB, id=OTHER_CID, name="web-2", cgroup_id=778)


def header(kind: EventKind, *, comm: str = "x", ts_ns: int = TS) -> Header:
    return Header(kind=kind, ts_ns=ts_ns, cgroup_id=777, pid=4243, tgid=4242, ppid=4000,
                  uid=0, gid=0, comm=comm, flags=Flag(0), suppressed=0)


def exec_record(view: ContainerView = WEB, ts_ns: int = TS) -> TraceRecord:
    event = ExecEvent(header=header(EventKind.EXEC, ts_ns=ts_ns), filename="/tmp/x",
                      argv=("./x", "-c", "id"), retval=0, dirfd=AT_FDCWD)
    return TraceRecord(event=event, kind="exec", container=view, ppid=4000, path="/tmp/x",
                       path_resolved=True, exe="/tmp/x")


def create_record() -> TraceRecord:
    event = FileEvent(header=header(EventKind.FILE, comm="wget", ts_ns=TS - 1_000_000_000),
                      op=FileOp.OPEN, path="/tmp/x", path2=None, dirfd=AT_FDCWD, dirfd2=0,
                      open_flags=0o1101, mode=0o644, retval=3)
    return TraceRecord(event=event, kind="write", container=WEB, ppid=4000, path="/tmp/x")


VERDICT = DriftVerdict(DriftKind.EXEC_ADDED, "/tmp/x",
                       "ran /tmp/x, which the image does not contain (added at run time)")


def drift_alert(record: TraceRecord | None = None, **kw) -> Alert:
    record = record or exec_record()
    args = dict(container_view=record.container, baseline_version=7,
                dedup_key=f"drift:{VERDICT.kind}:{VERDICT.path}", clock_offset_ns=OFFSET,
                now=123.0)
    args.update(kw)
    reason = AlertReason(code=VERDICT.kind.value, text=VERDICT.reason,
                         details=(("path", VERDICT.path),))
    return build_alert(AlertKind.DRIFT, Severity.HIGH, 1.0, [reason], record, **args)


# -- ids -------------------------------------------------------------------------------------


def test_id_is_stable_and_distinguishes_container_kind_and_key():
    a = alert_id(CID, AlertKind.DRIFT, "drift:exec-added-binary:/tmp/x")
    assert a == alert_id(CID, "drift", "drift:exec-added-binary:/tmp/x")
    assert len(a) == 24 and int(a, 16) >= 0
    assert a != alert_id(OTHER_CID, AlertKind.DRIFT, "drift:exec-added-binary:/tmp/x")
    assert a != alert_id(CID, AlertKind.NOVEL, "drift:exec-added-binary:/tmp/x")
    assert a != alert_id(CID, AlertKind.DRIFT, "drift:exec-added-binary:/tmp/y")
    # the separator keeps the parts apart
    assert alert_id("ab", "drift", "c") != alert_id("a", "drift", "bc")


def test_built_alert_ids():
    first = drift_alert()
    # a later occurrence of the same finding: same id, different time
    again = drift_alert(exec_record(ts_ns=TS + 5_000_000_000), now=999.0)
    assert again.id == first.id and again.time != first.time
    assert drift_alert(exec_record(OTHER)).id != first.id
    assert drift_alert(dedup_key="drift:exec-added-binary:/tmp/y").id != first.id
    assert first.id == alert_id(CID, AlertKind.DRIFT, "drift:exec-added-binary:/tmp/x")


def test_container_without_id_keys_on_cgroup():
    view = ContainerView(state="pending", cgroup_id=55)
    alert = drift_alert(exec_record(view))
    assert alert.id == alert_id("cgroup:55", AlertKind.DRIFT, "drift:exec-added-binary:/tmp/x")


# -- schema ----------------------------------------------------------------------------------


def test_drift_alert_to_dict_exact():
    record = exec_record()
    alert = drift_alert(record)
    expected = {
        "v": 1,
        "id": alert_id(CID, "drift", "drift:exec-added-binary:/tmp/x"),
        "time": 1700000003.25,
        "kind": "drift",
        "severity": "high",
        "score": 1.0,
        "reasons": [{
            "code": "exec-added-binary",
            "text": "ran /tmp/x, which the image does not contain (added at run time)",
            "details": {"path": "/tmp/x"},
        }],
        "container": {"id": CID, "name": "web", "image": "nginx:1.25",
                      "image_id": "sha256:" + "ab" * 32,
                      "image_digest": "docker.io/library/nginx@sha256:" + "cd" * 32,
                      "pod": "web-0", "namespace": "prod",
                      "pod_uid": "4f0ab913-49bd-4781-bd74-62f4d49f3374",
                      "workload": "StatefulSet/web", "labels": {"app": "web"}},
        "process": {"pid": 4242, "ppid": 4000, "exe": "/tmp/x", "argv": ["./x", "-c", "id"],
                    "uid": 0, "comm": "x"},
        "events": [record_to_dict(record, OFFSET)],
        "baseline_version": 7,
        "baseline_mode": "monitor",
        "count": 1,
        "first_seen": 1700000003.25,
        "last_seen": 1700000003.25,
    }
    got = alert.to_dict()
    assert got == expected
    assert list(got) == list(expected)
    assert got["events"][0]["time"] == "2023-11-14T22:13:23.250000Z"
    assert got["events"][0]["exec"]["argv"] == ["./x", "-c", "id"]
    assert json.loads(json.dumps(got)) == expected
    # to_dict hands out copies: mutating them does not change the alert
    got["container"]["name"] = "changed"
    got["container"]["labels"]["app"] = "changed"
    got["events"][0]["kind"] = "changed"
    got["process"]["argv"].append("changed")
    assert alert.to_dict() == expected


def test_alerts_carry_at_most_64_labels_first_by_key_with_long_texts_cut():
    labels = tuple(sorted([(f"k{i:03}", "v") for i in range(70)]
                          + [("a-long", "x" * 5000), ("b" * 2000, "short")]))
    alert = drift_alert(exec_record(dataclasses.replace(WEB, labels=labels)))
    got = alert.to_dict()["container"]["labels"]
    assert len(got) == MAX_LABELS == 64
    assert list(got)[:3] == ["a-long", "b" * MAX_LABEL_CHARS, "k000"]
    assert got["a-long"] == "x" * MAX_LABEL_CHARS
    assert "k061" in got and "k062" not in got


def test_related_records_follow_the_trigger():
    record, created = exec_record(), create_record()
    alert = drift_alert(record, related=[created])
    kinds = [e["kind"] for e in alert.to_dict()["events"]]
    assert kinds == ["exec", "write"]
    assert alert.to_dict()["events"][1]["write"]["path"] == "/tmp/x"


def test_anomaly_alert_without_record():
    view = ContainerView(state="container", cgroup_id=0, id=CID, image="nginx:1.25",
                         image_id="sha256:" + "ab" * 32)
    reason = AlertReason(code="feature-out-of-range", text="shells_spawned 3, learned 0..0",
                         details=(("feature", "shells_spawned"), ("value", 3.0),
                                  ("baseline_max", 0.0), ("outside", True)))
    alert = build_alert(AlertKind.ANOMALY, Severity.MEDIUM, -0.81, [reason], None,
                        container_view=view, baseline_version=3, dedup_key="anomaly:60",
                        clock_offset_ns=OFFSET, now=1700000060.0)
    out = alert.to_dict()
    assert out["kind"] == "anomaly" and out["score"] == -0.81
    assert out["time"] == out["first_seen"] == out["last_seen"] == 1700000060.0
    assert out["process"] is None and out["events"] == []
    assert out["container"] == {"id": CID, "name": None, "image": "nginx:1.25",
                                "image_id": "sha256:" + "ab" * 32, "image_digest": None,
                                "pod": None, "namespace": None, "pod_uid": None,
                                "workload": None, "labels": {}}
    assert out["reasons"][0]["details"] == {"feature": "shells_spawned", "value": 3.0,
                                            "baseline_max": 0.0, "outside": True}
    with pytest.raises(ValueError, match="container_view"):
        build_alert(AlertKind.ANOMALY, Severity.MEDIUM, -0.8, [reason], None,
                    baseline_version=3, dedup_key="x", clock_offset_ns=0, now=1.0)


def test_write_trigger_has_no_argv_and_takes_the_callers_exe():
    alert = drift_alert(create_record(), exe="/usr/bin/wget")
    assert alert.process == {"pid": 4242, "ppid": 4000, "exe": "/usr/bin/wget", "argv": [],
                             "uid": 0, "comm": "wget"}


def test_reason_details_are_hashable_and_checked():
    reason = AlertReason(code="new-connect", text="t", details=[("item", ["inet", 80])])
    assert reason.details == (("item", ("inet", 80)),)
    assert hash(reason) == hash(AlertReason("new-connect", "t", (("item", ("inet", 80)),)))
    assert reason.to_dict() == {"code": "new-connect", "text": "t",
                                "details": {"item": ["inet", 80]}}
    np = pytest.importorskip("numpy")
    converted = AlertReason(code="c", text="t", details=(("n", np.int64(3)), ("b", np.bool_(1)),
                                                          ("v", [np.float64(0.5)])))
    assert converted.details == (("n", 3), ("b", True), ("v", (0.5,)))
    assert type(converted.details[0][1]) is int and type(converted.details[1][1]) is bool
    with pytest.raises(TypeError, match="not a scalar"):
        AlertReason(code="c", text="t", details=(("bad", {"a": 1}),))


def test_severity_order_and_text():
    assert Severity.LOW < Severity.MEDIUM < Severity.HIGH < Severity.CRITICAL
    assert sorted([Severity.CRITICAL, Severity.LOW, Severity.HIGH]) == [
        Severity.LOW, Severity.HIGH, Severity.CRITICAL]
    assert [s.text for s in Severity] == ["low", "medium", "high", "critical"]
    assert str(Severity.HIGH) == "high" and f"{Severity.LOW}" == "low"
    assert Severity.parse("Critical") is Severity.CRITICAL
    with pytest.raises(ValueError, match="unknown severity"):
        Severity.parse("urgent")
    assert [k.value for k in AlertKind] == ["drift", "novel", "anomaly"]
    assert AlertKind("novel") is AlertKind.NOVEL and AlertKind.DRIFT == "drift"


# -- sinks -----------------------------------------------------------------------------------


def test_json_lines_sink_writes_parseable_lines():
    stream = io.StringIO()
    sink = JsonLinesAlertSink(stream)
    first = drift_alert()
    second = drift_alert(exec_record(OTHER))
    sink.emit(first)
    sink.emit(second)
    sink.flush()
    sink.close()
    lines = stream.getvalue().splitlines()
    assert [json.loads(line) for line in lines] == [first.to_dict(), second.to_dict()]
    assert not stream.closed  # not ours to close


def test_json_lines_sink_flushes_each_line(tmp_path):
    path = tmp_path / "alerts.jsonl"
    with open(path, "w", encoding="utf-8") as stream:
        JsonLinesAlertSink(stream).emit(drift_alert())
        assert json.loads(path.read_text())["kind"] == "drift"  # readable before close


def test_json_lines_sink_closes_an_owned_stream():
    stream = io.StringIO()
    sink = JsonLinesAlertSink(stream, owns_stream=True)
    sink.close()
    sink.close()
    assert stream.closed


# -- aggregation -----------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def occurrence(i: int, view: ContainerView = WEB) -> Alert:
    return drift_alert(exec_record(view, ts_ns=TS + i * 1_000_000_000))


def test_first_sent_at_once_repeats_aggregated_after_the_window():
    clock, sink = FakeClock(), ListAlertSink()
    agg = AlertAggregator(sink, window_seconds=60.0, clock=clock)
    agg.submit(occurrence(0))
    assert len(sink.alerts) == 1 and sink.alerts[0].count == 1
    for i in range(1, 6):
        clock.t += 5
        agg.submit(occurrence(i))
    assert len(sink.alerts) == 1  # repeats are counted, not sent
    assert agg.pending == 5
    assert agg.flush_due() == 0  # window still open (t = 1025)
    clock.t = 1060.0
    assert agg.flush_due() == 1
    assert len(sink.alerts) == 2
    merged = sink.alerts[1]
    assert merged.id == sink.alerts[0].id
    assert merged.count == 5
    assert merged.first_seen == occurrence(1).time and merged.last_seen == occurrence(5).time
    assert merged.time == occurrence(5).time
    assert merged.events == occurrence(5).events
    assert agg.stats.to_dict() == {"submitted": 6, "sent": 2, "aggregated": 5, "folded": 0,
                                   "aggregates_sent": 1, "incidents": 0, "evicted": 0}
    # the aggregate opened a new window; nothing came in it, so the id is forgotten after it
    clock.t = 1120.0
    assert agg.flush_due() == 0 and len(agg) == 0


def test_repeat_after_the_window_is_sent_at_once():
    clock, sink = FakeClock(), ListAlertSink()
    agg = AlertAggregator(sink, window_seconds=60.0, clock=clock)
    agg.submit(occurrence(0))
    clock.t += 61
    agg.submit(occurrence(1))
    assert [a.count for a in sink.alerts] == [1, 1]
    assert sink.alerts[1].time == occurrence(1).time


def test_late_repeat_sends_the_pending_aggregate_first():
    clock, sink = FakeClock(), ListAlertSink()
    agg = AlertAggregator(sink, window_seconds=60.0, clock=clock)
    for i in range(3):
        agg.submit(occurrence(i))
    clock.t += 90  # flush_due never called
    agg.submit(occurrence(3))
    assert [(a.count, a.time) for a in sink.alerts] == [
        (1, occurrence(0).time), (2, occurrence(2).time), (1, occurrence(3).time)]
    assert sink.alerts[1].first_seen == occurrence(1).time


def test_ids_are_aggregated_independently():
    clock, sink = FakeClock(), ListAlertSink()
    agg = AlertAggregator(sink, window_seconds=60.0, clock=clock)
    agg.submit(occurrence(0))
    agg.submit(occurrence(0, OTHER))
    agg.submit(occurrence(1))
    assert [a.container["name"] for a in sink.alerts] == ["web", "web-2"]


def test_lru_eviction_flushes_pending():
    clock, sink = FakeClock(), ListAlertSink()
    agg = AlertAggregator(sink, window_seconds=60.0, clock=clock, max_keys=2)
    a, b = occurrence(0), occurrence(0, OTHER)
    c = drift_alert(dedup_key="drift:exec-added-binary:/tmp/other")
    agg.submit(a)
    agg.submit(b)
    agg.submit(occurrence(1))  # a repeat: a is now the most recently used
    agg.submit(occurrence(1, OTHER))
    agg.submit(occurrence(2, OTHER))  # b has 2 pending and is the most recent
    agg.submit(occurrence(2))  # a has 2 pending and is the most recent; b is the oldest
    assert len(sink.alerts) == 2
    agg.submit(c)  # a third id: evicts b (least recently used), which sends its aggregate
    assert [(x.id, x.count) for x in sink.alerts[2:]] == [(b.id, 2), (c.id, 1)]
    assert len(agg) == 2 and agg.stats.evicted == 1
    # b is no longer tracked: its next occurrence is sent at once
    agg.submit(occurrence(3, OTHER))  # ... and evicts a, whose aggregate goes first
    assert [(x.id, x.count) for x in sink.alerts[4:]] == [(a.id, 2), (b.id, 1)]
    assert agg.stats.evicted == 2 and agg.pending == 0


def test_close_flushes_everything_and_closes_the_sink():
    clock, sink = FakeClock(), ListAlertSink()
    agg = AlertAggregator(sink, window_seconds=60.0, clock=clock)
    agg.submit(occurrence(0))
    agg.submit(occurrence(1))
    agg.submit(occurrence(2))
    agg.close()
    assert [a.count for a in sink.alerts] == [1, 2]
    assert sink.closed and sink.flushes >= 1
    s = agg.stats
    assert s.submitted == s.sent - s.aggregates_sent + s.aggregated == 3
    agg.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        agg.submit(occurrence(3))


def test_aggregator_is_a_sink():
    clock, sink = FakeClock(), ListAlertSink()
    agg = AlertAggregator(sink, window_seconds=10.0, clock=clock)
    agg.emit(occurrence(0))
    agg.emit(occurrence(1))
    clock.t += 10
    agg.flush()
    assert [a.count for a in sink.alerts] == [1, 1] and sink.flushes == 1
