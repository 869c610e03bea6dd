"""driftwarden.core.wire: alerts <-> driftwarden.v1 messages without loss, enum texts, checks."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from driftwarden.agent.alerts import build_alert
from driftwarden.agent.output import record_to_dict
from driftwarden.core.actions import AGENT_RESULTS, ActionStatus, ActionType
from driftwarden.core.alerts import Alert, AlertKind, AlertReason, Severity
from driftwarden.core.errors import InvalidMessage
from driftwarden.core.records import ContainerView, TraceRecord
from driftwarden.core.wire import (
    ACTION_STATUS,
    ACTION_TYPE,
    AGENT_ACTION_STATUSES,
    ALERT_KIND,
    MODE,
    SEVERITY,
    WireLimits,
    action_status_from_proto,
    action_status_to_proto,
    alert_dict_from_proto,
    alert_from_proto,
    alert_to_proto,
    from_timestamp,
    to_timestamp,
    validate_action_request,
    validate_agent_message,
    validate_alert,
    validate_collector_command,
    validate_list_actions_request,
    validate_list_alerts_request,
    validate_subscribe_request,
)
from driftwarden.probes._layout import AT_FDCWD, RESULT_UNKNOWN, EventKind, FileOp, Flag
from driftwarden.probes.events import ConnectEvent, ExecEvent, Family, FileEvent, Header, SockType
from driftwarden.proto.v1 import actions_pb2, agent_pb2, alerts_pb2, common_pb2
from google.protobuf.timestamp_pb2 import Timestamp

OFFSET = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z
TS = 3_250_000_123  # + 3.250000123 s
CID = "f00dcafe" * 8
NODE = "node-1"

WEB = ContainerView(
    state="container", cgroup_id=777, cgroup_path=f"/system.slice/docker-{CID}.scope", id=CID,
    name="web", image="nginx:1.25", image_id="sha256:" + "ab" * 32, runtime="docker",
    pod="web-7d4b9c8f6d-x2k9q", namespace="prod", labels=(("app", "web"),),
    pod_uid="4f0ab913-49bd-4781-bd74-62f4d49f3374", workload="Deployment/web",
    image_digest="docker.io/library/nginx@sha256:" + "cd" * 32,
)
BARE = dataclasses.replace(WEB, name=None, image=None, image_id=None, pod=None, namespace=None,
                           pod_uid=None, workload=None, image_digest=None)


def header(kind: EventKind, *, comm: str = "sh", ts_ns: int = TS, suppressed: int = 0) -> Header:
    return Header(kind=kind, ts_ns=ts_ns, cgroup_id=777, pid=4243, tgid=4242, ppid=4000,
                  uid=33, gid=34, comm=comm, flags=Flag(0), suppressed=suppressed)


def exec_record(exe: str = "/tmp/x", argv: tuple[str, ...] = ("./x", "-c", "id"),
                view: ContainerView = WEB) -> TraceRecord:
    event = ExecEvent(header=header(EventKind.EXEC, comm="x", suppressed=2), filename="./x",
                      argv=argv, retval=0, dirfd=AT_FDCWD, argv_truncated=True)
    return TraceRecord(event=event, kind="exec", container=view, ppid=4000, path=exe,
                       path_resolved=True, exe=exe)


def connect_record(family: Family = Family.INET, address: str = "127.0.0.1") -> TraceRecord:
    event = ConnectEvent(header=header(EventKind.CONNECT, comm="nc"), family=family,
                         family_number=2, address=address, port=5432, sock_type=SockType.TCP,
                         retval=-111, fd=5)
    return TraceRecord(event=event, kind="connect", container=WEB, ppid=4000)


def rename_record() -> TraceRecord:
    event = FileEvent(header=header(EventKind.FILE, comm="mv", ts_ns=TS - 10**9), op=FileOp.RENAME,
                      path="page.html", path2="index.html", dirfd=AT_FDCWD, dirfd2=AT_FDCWD,
                      open_flags=0, mode=0, retval=0)
    return TraceRecord(event=event, kind="write", container=WEB, ppid=4000,
                       path="/data/page.html", path2="/data/index.html")


def open_record() -> TraceRecord:
    event = FileEvent(header=header(EventKind.FILE, comm="sh"), op=FileOp.OPEN, path="/bin/ls",
                      path2=None, dirfd=AT_FDCWD, dirfd2=0, open_flags=0o1101, mode=0o4755,
                      retval=RESULT_UNKNOWN)
    return TraceRecord(event=event, kind="write", container=WEB, ppid=4000, path="/bin/ls")


REASON = AlertReason(code="exec-added-binary", text="ran /tmp/x, which the image does not contain",
                     details=(("path", "/tmp/x"),))


def make_alert(record: TraceRecord | None, kind: AlertKind = AlertKind.DRIFT, **kw) -> Alert:
    args = dict(container_view=record.container if record else WEB, baseline_version=7,
                dedup_key="k", clock_offset_ns=OFFSET, now=1_795_411_894.0081706)
    args.update(kw)
    return build_alert(kind, Severity.HIGH, 1.0, [REASON], record, **args)


def anomaly_alert() -> Alert:
    reasons = (
        AlertReason(code="feature-out-of-range", text="16 execs, learned 0..3", details=(
            ("feature", "execs"), ("value", 16), ("range", (0, 3.5)), ("flag", True),
            ("nearest", None), ("mixed", ("a", 1, 2.0, False, None)), ("score", -0.25))),
        AlertReason(code="feature-out-of-range", text="no details"),
    )
    alert = build_alert(AlertKind.ANOMALY, Severity.CRITICAL, -0.6125, reasons, None,
                        container_view=BARE, baseline_version=12, baseline_mode="protect",
                        dedup_key="window", clock_offset_ns=OFFSET, now=1_795_411_900.5,
                        related=[exec_record(view=BARE)])
    return alert.with_repeats(5, 1_795_411_890.25, 1_795_411_899.75)


def valid_alert_msg() -> common_pb2.Alert:
    return alert_to_proto(make_alert(exec_record(), related=[rename_record()]), NODE)


def wire_copy(msg):
    out = type(msg)()
    out.ParseFromString(msg.SerializeToString())
    return out


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("alert", [
    make_alert(exec_record(), related=[rename_record()]),
    make_alert(connect_record(), AlertKind.NOVEL, baseline_mode="learn"),
    make_alert(connect_record(Family.UNIX, "@dbus"), AlertKind.NOVEL),
    make_alert(open_record()),
    anomaly_alert(),
], ids=["exec+related", "connect", "connect-unix", "open", "anomaly-window"])
def test_alert_round_trips_exactly_through_the_wire(alert):
    msg = wire_copy(alert_to_proto(alert, NODE))
    validate_alert(msg)
    back = alert_from_proto(msg)
    assert back == alert
    assert back.to_dict() == alert.to_dict()
    assert json.dumps(back.to_dict()) == json.dumps(alert.to_dict())  # int/float/tuple types too


def test_alert_fields_on_the_wire():
    alert = make_alert(exec_record(), related=[rename_record()])
    msg = alert_to_proto(alert, NODE)
    assert msg.id == alert.id
    # the float's nearest ns: a double near 1.7e9 s steps by 238 ns
    assert (msg.time.seconds, msg.time.nanos) == (1_700_000_003, 250_000_238)
    assert msg.kind == common_pb2.ALERT_KIND_DRIFT
    assert msg.severity == common_pb2.SEVERITY_HIGH
    assert msg.score == 1.0
    assert [(r.code, r.text, [(d.key, d.value_json) for d in r.details]) for r in msg.reasons] == [
        ("exec-added-binary", REASON.text, [("path", '"/tmp/x"')])]
    c = msg.container
    assert (c.id, c.name, c.image.name, c.image.id, c.pod, c.namespace, c.node) == (
        CID, "web", "nginx:1.25", "sha256:" + "ab" * 32, "web-7d4b9c8f6d-x2k9q", "prod", NODE)
    assert (c.pod_uid, c.workload, c.image.digest) == (
        "4f0ab913-49bd-4781-bd74-62f4d49f3374", "Deployment/web",
        "docker.io/library/nginx@sha256:" + "cd" * 32)
    assert dict(c.labels) == {"app": "web"}
    p = msg.process
    assert (p.pid, p.ppid, p.exe, list(p.argv), p.uid, p.comm) == (
        4242, 4000, "/tmp/x", ["./x", "-c", "id"], 33, "x")
    assert (msg.baseline_version, msg.baseline_mode, msg.count) == (7, common_pb2.MODE_MONITOR, 1)
    assert msg.first_seen == msg.time and msg.last_seen == msg.time
    assert json.loads(msg.events_json) == [record_to_dict(exec_record(), OFFSET),
                                           record_to_dict(rename_record(), OFFSET)]


def test_window_alert_has_no_process_and_unset_texts_stay_null():
    msg = alert_to_proto(anomaly_alert(), NODE)
    assert not msg.HasField("process")
    assert msg.container.id == CID
    for field in ("name", "pod", "namespace", "pod_uid", "workload"):
        assert not msg.container.HasField(field)
    for field in ("name", "id", "digest"):
        assert not msg.container.image.HasField(field)
    assert msg.WhichOneof("event") == "exec"  # the related record (no trigger record)
    assert msg.count == 5
    assert from_timestamp(msg.first_seen) == 1_795_411_890.25
    assert [d.value_json for d in msg.reasons[0].details] == [
        '"execs"', "16", "[0, 3.5]", "true", "null", '["a", 1, 2.0, false, null]', "-0.25"]
    back = alert_from_proto(msg)
    assert back.reasons[0].details[2] == ("range", (0, 3.5))
    assert back.container == {"id": CID, "name": None, "image": None, "image_id": None,
                              "image_digest": None, "pod": None, "namespace": None,
                              "pod_uid": None, "workload": None, "labels": {"app": "web"}}


def test_alert_without_events_has_no_typed_event():
    alert = dataclasses.replace(anomaly_alert(), events=())
    msg = alert_to_proto(alert, NODE)
    assert msg.WhichOneof("event") is None
    assert msg.events_json == "[]"
    assert alert_from_proto(msg) == alert


def test_typed_exec_event_mirrors_the_trace_record():
    msg = alert_to_proto(make_alert(exec_record()), NODE)
    e = msg.exec
    h = e.header
    assert (h.time.seconds, h.time.nanos) == (1_700_000_003, 250_000_000)  # record: to the us
    assert (h.ts_ns, h.cgroup_id, h.pid, h.tid, h.ppid, h.uid, h.gid, h.comm) == (
        TS, 777, 4242, 4243, 4000, 33, 34, "x")
    assert (h.suppressed_before, h.runtime_setup) == (2, False)
    assert (e.filename, e.path, e.path_resolved, e.exe, list(e.argv), e.argv_truncated,
            e.result) == ("./x", "/tmp/x", True, "/tmp/x", ["./x", "-c", "id"], True, 0)
    assert not e.HasField("error")


def test_typed_connect_event_mirrors_the_trace_record():
    e = alert_to_proto(make_alert(connect_record()), NODE).connect
    assert (e.family, e.protocol, e.address, e.port, e.result, e.errno, e.fd) == (
        "inet", "tcp", "127.0.0.1", 5432, "refused", "ECONNREFUSED", 5)
    unix = alert_to_proto(make_alert(connect_record(Family.UNIX, "@dbus")), NODE).connect
    assert unix.address == "@dbus" and not unix.HasField("port")


def test_typed_write_events_mirror_the_trace_record():
    e = alert_to_proto(make_alert(rename_record()), NODE).file_write
    assert (e.op, e.path, e.path_as_given, e.path_resolved, e.dirfd, e.result, e.truncated) == (
        "rename", "/data/page.html", "page.html", True, -100, 0, False)
    assert (e.path2, e.path2_as_given, e.path2_resolved, e.dirfd2) == (
        "/data/index.html", "index.html", True, -100)
    assert not e.HasField("mode") and list(e.flags) == []
    e = alert_to_proto(make_alert(open_record()), NODE).file_write
    assert (e.op, list(e.flags), e.mode) == ("open", ["O_WRONLY", "O_CREAT", "O_TRUNC"], "4755")
    assert not e.HasField("result") and not e.HasField("error") and not e.HasField("path2")


def test_alert_dict_is_the_agent_json_plus_node():
    alert = anomaly_alert()
    out = alert_dict_from_proto(wire_copy(alert_to_proto(alert, NODE)))
    assert out == {**alert.to_dict(), "node": NODE}
    assert list(out) == [*alert.to_dict(), "node"]


def test_undecodable_bytes_become_replacement_chars_in_strings_and_stay_exact_in_json():
    exe = b"/tmp/\xff\xfeevil".decode("utf-8", "surrogateescape")
    alert = make_alert(exec_record(exe=exe, argv=(exe, "-x")))
    reason = AlertReason(code="exec-added-binary", text=f"ran {exe}", details=(("path", exe),))
    alert = dataclasses.replace(alert, reasons=(reason,))
    msg = wire_copy(alert_to_proto(alert, NODE))
    assert msg.process.exe == "/tmp/\ufffd\ufffdevil"
    assert list(msg.process.argv) == ["/tmp/\ufffd\ufffdevil", "-x"]
    assert msg.reasons[0].text == "ran /tmp/\ufffd\ufffdevil"
    assert msg.exec.path == "/tmp/\ufffd\ufffdevil"
    back = alert_from_proto(msg)
    assert back.reasons[0].details == (("path", exe),)  # JSON keeps the surrogates
    assert back.events == alert.events
    assert back.events[0]["exec"]["argv"][0] == exe


def test_alert_with_a_container_key_the_wire_cannot_carry_is_refused():
    alert = dataclasses.replace(anomaly_alert(), container={"id": CID, "colour": "red"})
    with pytest.raises(ValueError, match=r"^alert [0-9a-f]{24}: container has keys \['colour'\] "
                                         r"that driftwarden.v1 cannot carry$"):
        alert_to_proto(alert, NODE)


@pytest.mark.parametrize("seconds", [0.0, 123.0, 0.1, 1_700_000_003.250000123, -1.5,
                                     1_700_000_000.9999998, 4_102_444_800.000001])
def test_timestamps_hold_agent_times_exactly(seconds):
    ts = to_timestamp(seconds)
    assert 0 <= ts.nanos < 1_000_000_000
    assert from_timestamp(ts) == seconds


def test_timestamps_hold_every_epoch_time_after_april_1970_exactly():
    rng = random.Random(7)
    for _ in range(20_000):
        seconds = rng.uniform(2**23, 4_102_444_800)  # 1970-04-08 .. 2100
        assert from_timestamp(to_timestamp(seconds)) == seconds


def test_timestamp_rounding_up_to_the_next_second_carries():
    assert to_timestamp(0.9999999996) == Timestamp(seconds=1, nanos=0)


def test_timestamp_of_a_non_finite_time_is_an_error():
    with pytest.raises(ValueError, match=r"^time nan is not a finite number of seconds$"):
        to_timestamp(float("nan"))


# -- enum texts ------------------------------------------------------------------------------


def test_enum_texts_map_both_ways():
    assert ALERT_KIND.texts == ("drift", "novel", "anomaly")
    assert SEVERITY.texts == ("low", "medium", "high", "critical")
    assert MODE.texts == ("learn", "monitor", "protect")
    assert ACTION_TYPE.texts == ("pause", "resume", "kill", "quarantine", "release")
    assert ACTION_STATUS.texts == ("done", "already", "container-gone", "failed", "refused",
                                   "pending", "skipped")
    assert ALERT_KIND.to_proto(AlertKind.NOVEL) == common_pb2.ALERT_KIND_NOVEL
    assert SEVERITY.to_proto(Severity.CRITICAL) == common_pb2.SEVERITY_CRITICAL
    assert SEVERITY.to_proto("low") == int(Severity.LOW)  # same numbers as the IntEnum
    assert ACTION_STATUS.to_proto("container-gone") == actions_pb2.ACTION_STATUS_CONTAINER_GONE
    assert ACTION_TYPE.from_proto(actions_pb2.ACTION_TYPE_QUARANTINE) == "quarantine"
    assert MODE.from_proto(common_pb2.MODE_PROTECT) == "protect"
    assert AGENT_ACTION_STATUSES == (1, 2, 3, 4, 5)


def test_the_action_vocabulary_is_the_wire_s():
    # core.actions names what the proto enums carry; the store's texts use "_", the wire's "-"
    assert ACTION_TYPE.texts == tuple(t.value for t in ActionType)
    assert [action_status_to_proto(s) for s in ActionStatus] == [
        actions_pb2.ACTION_STATUS_PENDING, actions_pb2.ACTION_STATUS_DONE,
        actions_pb2.ACTION_STATUS_ALREADY, actions_pb2.ACTION_STATUS_CONTAINER_GONE,
        actions_pb2.ACTION_STATUS_FAILED, actions_pb2.ACTION_STATUS_REFUSED,
        actions_pb2.ACTION_STATUS_SKIPPED]
    assert action_status_to_proto("container_gone") == actions_pb2.ACTION_STATUS_CONTAINER_GONE
    for status in ActionStatus:
        assert action_status_from_proto(action_status_to_proto(status)) is status
    assert tuple(action_status_to_proto(s) for s in AGENT_RESULTS) == AGENT_ACTION_STATUSES
    with pytest.raises(InvalidMessage, match=r"^action status: unspecified$"):
        action_status_from_proto(0)
    with pytest.raises(ValueError, match="'container-gone' is not a valid ActionStatus"):
        action_status_to_proto("container-gone")


def test_enum_text_errors():
    with pytest.raises(ValueError, match=r"^unknown action type 'stop' \(one of pause, resume, "
                                         r"kill, quarantine, release\)$"):
        ACTION_TYPE.to_proto("stop")
    with pytest.raises(InvalidMessage, match=r"^alert kind: unspecified$"):
        ALERT_KIND.from_proto(0)
    with pytest.raises(InvalidMessage, match=r"^severity: unknown value 9$"):
        SEVERITY.from_proto(9)


# -- validation: alerts ----------------------------------------------------------------------


def _target(msg, dotted: str):
    """The message holding the last part of `dotted` ("reasons.0.code": msg.reasons[0])."""
    *parents, last = dotted.split(".")
    for part in parents:
        msg = msg[int(part)] if part.isdigit() else getattr(msg, part)
    return msg, last


def _set(dotted: str, value):
    def mutate(msg):
        target, field = _target(msg, dotted)
        setattr(target, field, value)
    return mutate


def _clear(dotted: str):
    def mutate(msg):
        target, field = _target(msg, dotted)
        target.ClearField(field)
    return mutate


def _add_reasons(n: int):
    def mutate(msg):
        for _ in range(n):
            msg.reasons.add(code="x", text="y")
    return mutate


def _detail(value_json: str, key: str = "k"):
    def mutate(msg):
        msg.reasons[0].details.add(key=key, value_json=value_json)
    return mutate


def _argv(n: int):
    def mutate(msg):
        msg.process.argv[:] = ["a"] * n
    return mutate


def _labels(labels: dict[str, str]):
    def mutate(msg):
        msg.container.labels.update(labels)
    return mutate


def _first_after_last(msg):
    msg.first_seen.seconds = msg.last_seen.seconds + 1


KINDS = "ALERT_KIND_DRIFT, ALERT_KIND_NOVEL, ALERT_KIND_ANOMALY"
ALERT_ERRORS = [
    (_set("id", "ABCDEF" * 4), "alert.id: must be 24 lowercase hex characters, got 'ABCDEF"
                               "ABCDEFABCDEFABCDEF'"),
    (_set("id", "ab" * 13), f"alert.id: must be 24 lowercase hex characters, got '{'ab' * 13}'"),
    (_set("id", ""), "alert.id: must be 24 lowercase hex characters, got ''"),
    (_clear("time"), "alert.time: missing"),
    (_set("time.nanos", -1), "alert.time.nanos: -1 is outside 0..999999999"),
    (_set("time.seconds", 253_402_300_800),
     "alert.time.seconds: 253402300800 is outside years 1..9999"),
    (_set("kind", 0), f"alert.kind: unspecified; set one of {KINDS}"),
    (_set("kind", 99), "alert.kind: unknown value 99 (not in AlertKind)"),
    (_set("severity", 0), "alert.severity: unspecified; set one of SEVERITY_LOW, "
                          "SEVERITY_MEDIUM, SEVERITY_HIGH, SEVERITY_CRITICAL"),
    (_set("score", float("nan")), "alert.score: must be a finite number, got nan"),
    (_set("score", float("-inf")), "alert.score: must be a finite number, got -inf"),
    (_add_reasons(32), "alert.reasons: 33 entries, at most 32"),
    (_set("reasons.0.code", ""), "alert.reasons[0].code: missing"),
    (_set("reasons.0.text", "x" * 4097), "alert.reasons[0].text: 4097 characters, at most 4096"),
    (_detail("1", key=""), "alert.reasons[0].details[1].key: missing"),
    (_detail("{oops"), "alert.reasons[0].details[1].value_json: not JSON (Expecting property "
                       "name enclosed in double quotes: line 1 column 2 (char 1))"),
    (_detail("[1, [2]]"), "alert.reasons[0].details[1].value_json: must be a JSON scalar or a "
                          "flat list of scalars, got '[1, [2]]'"),
    (_detail('{"a": 1}'), "alert.reasons[0].details[1].value_json: must be a JSON scalar or a "
                          "flat list of scalars, got '{\"a\": 1}'"),
    (_clear("container.id"), "alert.container.id: missing"),
    (_clear("container"), "alert.container.id: missing"),
    (_set("container.name", "n" * 5000), "alert.container.name: 5000 characters, at most 4096"),
    (_set("container.pod_uid", "u" * 4097),
     "alert.container.pod_uid: 4097 characters, at most 4096"),
    (_set("container.workload", "w" * 4097),
     "alert.container.workload: 4097 characters, at most 4096"),
    (_set("container.image.digest", "d" * 4097),
     "alert.container.image.digest: 4097 characters, at most 4096"),
    (_argv(257), "alert.process.argv: 257 entries, at most 256"),
    (_labels({f"k{i:02}": "v" for i in range(64)}),  # + the valid alert's "app"
     "alert.container.labels: 65 entries, at most 64"),
    (_labels({"": "v"}), "alert.container.labels: an empty key"),
    (_labels({"tier": "w" * 4097}),
     "alert.container.labels['tier']: 4097 characters, at most 4096"),
    (_labels({"k" * 4097: "v"}),
     f"alert.container.labels[{'k' * 64!r}] key: 4097 characters, at most 4096"),
    (_set("baseline_mode", 0), "alert.baseline_mode: unspecified; set one of MODE_LEARN, "
                               "MODE_MONITOR, MODE_PROTECT"),
    (_set("count", 0), "alert.count: must be at least 1, got 0"),
    (_clear("first_seen"), "alert.first_seen: missing"),
    (_clear("last_seen"), "alert.last_seen: missing"),
    (_first_after_last, "alert.first_seen: 2023-11-14T22:13:24.250000238Z is after last_seen "
                        "2023-11-14T22:13:23.250000238Z"),
    (_set("events_json", ""), "alert.events_json: not JSON (Expecting value: line 1 column 1 "
                              "(char 0))"),
    (_set("events_json", '{"kind": "exec"}'), "alert.events_json: must be a JSON list of "
                                              "objects, got '{\"kind\": \"exec\"}'"),
    (_set("events_json", "[1]"), "alert.events_json: must be a JSON list of objects, got '[1]'"),
    (_set("events_json", "[" + " " * 262_143 + "]"),
     "alert.events_json: 262145 characters, at most 262144"),
]


@pytest.mark.parametrize(("mutate", "message"), ALERT_ERRORS,
                         ids=[m.split(":")[0] for _, m in ALERT_ERRORS])
def test_invalid_alerts_are_refused_with_the_field_and_the_problem(mutate, message):
    msg = valid_alert_msg()
    mutate(msg)
    with pytest.raises(InvalidMessage) as err:
        validate_alert(msg)
    assert str(err.value) == message


def test_a_valid_alert_passes_and_limits_can_be_tightened():
    msg = valid_alert_msg()
    validate_alert(msg)
    size = msg.ByteSize()
    with pytest.raises(InvalidMessage, match=rf"^alert: {size} bytes, at most 100$"):
        validate_alert(msg, limits=WireLimits(max_message_bytes=100))
    msg.reasons.add(code="x", text="y")
    with pytest.raises(InvalidMessage, match=r"^alert.reasons: 2 entries, at most 1$"):
        validate_alert(msg, limits=WireLimits(max_reasons=1))
    with pytest.raises(InvalidMessage, match=rf"^alert.reasons\[0\].text: {len(REASON.text)} "
                                             r"characters, at most 30$"):
        validate_alert(msg, limits=WireLimits(max_text_chars=30))


# -- validation: the agent channel -----------------------------------------------------------

NOW = Timestamp(seconds=1_795_411_900)


def hello_msg() -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(seq=1, hello=agent_pb2.Hello(
        node=NODE, agent_version="0.1.0", mode=common_pb2.MODE_LEARN, hostname="host-1",
        started_at=NOW))


def batch_msg() -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(seq=2, alert_batch=agent_pb2.AlertBatch(
        alerts=[valid_alert_msg(), alert_to_proto(anomaly_alert(), NODE)], spool_seqs=[41, 42]))


def heartbeat_msg() -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(seq=3, heartbeat=agent_pb2.Heartbeat(
        sent_at=NOW, counters=[common_pb2.KindCounters(kind="exec", emitted=10, dropped=1),
                               common_pb2.KindCounters(kind="file", emitted=5, suppressed=3)],
        containers_watched=4, spool_depth=2))


def result_msg() -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(seq=4, action_result=agent_pb2.ActionResult(
        action_id="act-1", status=actions_pb2.ACTION_STATUS_DONE, message="paused",
        finished_at=NOW))


@pytest.mark.parametrize("make", [hello_msg, batch_msg, heartbeat_msg, result_msg])
def test_valid_agent_messages_pass(make):
    validate_agent_message(wire_copy(make()))


def _drop_spool_seq(msg):
    del msg.alert_batch.spool_seqs[1]


def _dup_counter(msg):
    msg.heartbeat.counters.add(kind="exec")


def _alert_in_batch(mutate):
    def apply(msg):
        mutate(msg.alert_batch.alerts[1])
    return apply


STATUSES = ("ACTION_STATUS_DONE, ACTION_STATUS_ALREADY, ACTION_STATUS_CONTAINER_GONE, "
            "ACTION_STATUS_FAILED, ACTION_STATUS_REFUSED")
AGENT_ERRORS = [
    (hello_msg, _set("seq", 0), "agent_message.seq: missing (messages are numbered from 1)"),
    (hello_msg, _clear("hello"), "agent_message: empty; set one of hello, alert_batch, "
                                 "heartbeat, action_result, baseline_increment, baseline_request"),
    (hello_msg, _set("hello.node", ""), "agent_message.hello.node: missing"),
    (hello_msg, _set("hello.node", "node 1"),
     "agent_message.hello.node: must be printable without spaces, got 'node 1'"),
    (hello_msg, _set("hello.node", "n\x00"),
     "agent_message.hello.node: must be printable without spaces, got 'n\\x00'"),
    (hello_msg, _set("hello.agent_version", ""), "agent_message.hello.agent_version: missing"),
    (hello_msg, _set("hello.mode", 0), "agent_message.hello.mode: unspecified; set one of "
                                       "MODE_LEARN, MODE_MONITOR, MODE_PROTECT"),
    (hello_msg, _set("hello.mode", 7), "agent_message.hello.mode: unknown value 7 (not in Mode)"),
    (hello_msg, _clear("hello.started_at"), "agent_message.hello.started_at: missing"),
    (batch_msg, _clear("alert_batch.alerts"), "agent_message.alert_batch.alerts: empty"),
    (batch_msg, _clear("alert_batch.spool_seqs"), None),  # spool_seqs are optional
    (batch_msg, _drop_spool_seq, "agent_message.alert_batch.spool_seqs: 1 entries for 2 alerts "
                                 "(one per alert, or none)"),
    (batch_msg, _alert_in_batch(_set("id", "x")), "agent_message.alert_batch.alerts[1].id: "
                                                  "must be 24 lowercase hex characters, got 'x'"),
    (batch_msg, _alert_in_batch(_set("severity", 0)),
     "agent_message.alert_batch.alerts[1].severity: unspecified; set one of SEVERITY_LOW, "
     "SEVERITY_MEDIUM, SEVERITY_HIGH, SEVERITY_CRITICAL"),
    (heartbeat_msg, _clear("heartbeat.sent_at"), "agent_message.heartbeat.sent_at: missing"),
    (heartbeat_msg, _set("heartbeat.counters.1.kind", ""),
     "agent_message.heartbeat.counters[1].kind: missing"),
    (heartbeat_msg, _dup_counter, "agent_message.heartbeat.counters[2].kind: 'exec' appears "
                                  "twice"),
    (result_msg, _set("action_result.action_id", ""),
     "agent_message.action_result.action_id: missing"),
    (result_msg, _set("action_result.status", 0),
     f"agent_message.action_result.status: unspecified; set one of {STATUSES}"),
    (result_msg, _set("action_result.status", actions_pb2.ACTION_STATUS_PENDING),
     f"agent_message.action_result.status: ACTION_STATUS_PENDING not allowed here; set one of "
     f"{STATUSES}"),
    (result_msg, _set("action_result.status", 40),
     "agent_message.action_result.status: unknown value 40 (not in ActionStatus)"),
    (result_msg, _clear("action_result.finished_at"),
     "agent_message.action_result.finished_at: missing"),
]


@pytest.mark.parametrize(("make", "mutate", "message"), AGENT_ERRORS,
                         ids=[(m or "valid").split(":")[0] for _, _, m in AGENT_ERRORS])
def test_invalid_agent_messages_are_refused(make, mutate, message):
    msg = make()
    mutate(msg)
    if message is None:
        validate_agent_message(msg)
        return
    with pytest.raises(InvalidMessage) as err:
        validate_agent_message(msg)
    assert str(err.value) == message


def test_oversize_agent_messages_are_refused():
    msg = batch_msg()
    too_many = WireLimits(max_batch_alerts=1)
    with pytest.raises(InvalidMessage, match=r"^agent_message.alert_batch.alerts: 2 entries, "
                                             r"at most 1$"):
        validate_agent_message(msg, limits=too_many)
    ack = agent_pb2.CollectorCommand(ack=agent_pb2.Ack(spool_seqs=[1, 2]))
    with pytest.raises(InvalidMessage, match=r"^collector_command.ack.spool_seqs: 2 entries, "
                                             r"at most 1$"):
        validate_collector_command(ack, limits=too_many)
    size = msg.ByteSize()
    with pytest.raises(InvalidMessage, match=rf"^agent_message: {size} bytes, at most {size - 1}$"):
        validate_agent_message(msg, limits=WireLimits(max_message_bytes=size - 1))
    validate_agent_message(msg, limits=WireLimits(max_message_bytes=size))


def test_collector_commands():
    alert_id = valid_alert_msg().id
    ack = agent_pb2.CollectorCommand(ack=agent_pb2.Ack(alert_ids=[alert_id], spool_seqs=[41]))
    action = agent_pb2.CollectorCommand(action=agent_pb2.ActionCommand(
        action_id="act-1", container_id=CID, type=actions_pb2.ACTION_TYPE_QUARANTINE,
        reason="drift", requested_by="policy:drift", with_pause=True))
    notice = agent_pb2.CollectorCommand(notice=agent_pb2.Notice(text="hello"))
    for msg in (ack, action, notice):
        validate_collector_command(wire_copy(msg))
    cases = [
        (agent_pb2.CollectorCommand(),
         "collector_command: empty; set one of ack, action, notice, baseline"),
        (agent_pb2.CollectorCommand(ack=agent_pb2.Ack(alert_ids=[alert_id, "nope"])),
         "collector_command.ack.alert_ids[1]: must be 24 lowercase hex characters, got 'nope'"),
        (agent_pb2.CollectorCommand(action=agent_pb2.ActionCommand(
            container_id=CID, type=actions_pb2.ACTION_TYPE_KILL)),
         "collector_command.action.action_id: missing"),
        (agent_pb2.CollectorCommand(action=agent_pb2.ActionCommand(
            action_id="a", type=actions_pb2.ACTION_TYPE_KILL)),
         "collector_command.action.container_id: missing"),
        (agent_pb2.CollectorCommand(action=agent_pb2.ActionCommand(
            action_id="a", container_id=CID, type=actions_pb2.ACTION_TYPE_KILL, with_pause=True)),
         "collector_command.action.with_pause: only for ACTION_TYPE_QUARANTINE, not "
         "ACTION_TYPE_KILL"),
    ]
    for msg, message in cases:
        with pytest.raises(InvalidMessage) as err:
            validate_collector_command(msg)
        assert str(err.value) == message


# -- validation: operator requests -----------------------------------------------------------

TYPES = ("ACTION_TYPE_PAUSE, ACTION_TYPE_RESUME, ACTION_TYPE_KILL, ACTION_TYPE_QUARANTINE, "
         "ACTION_TYPE_RELEASE")


def test_action_requests():
    ok = actions_pb2.ActionRequest(container="web", type=actions_pb2.ACTION_TYPE_QUARANTINE,
                                   reason="drift", with_pause=True, requested_by="alice")
    validate_action_request(ok)
    validate_action_request(actions_pb2.ActionRequest(container=CID[:6],
                                                      type=actions_pb2.ACTION_TYPE_RELEASE))
    cases = [
        (actions_pb2.ActionRequest(type=actions_pb2.ACTION_TYPE_KILL),
         "action_request.container: missing"),
        (actions_pb2.ActionRequest(container="web"),
         f"action_request.type: unspecified; set one of {TYPES}"),
        (actions_pb2.ActionRequest(container="web", type=42),
         "action_request.type: unknown value 42 (not in ActionType)"),
        (actions_pb2.ActionRequest(container="web", type=actions_pb2.ACTION_TYPE_PAUSE,
                                   with_pause=True),
         "action_request.with_pause: only for ACTION_TYPE_QUARANTINE, not ACTION_TYPE_PAUSE"),
        (actions_pb2.ActionRequest(container="web", type=actions_pb2.ACTION_TYPE_KILL,
                                   reason="r" * 4097),
         "action_request.reason: 4097 characters, at most 4096"),
    ]
    for msg, message in cases:
        with pytest.raises(InvalidMessage) as err:
            validate_action_request(msg)
        assert str(err.value) == message


def test_subscribe_requests():
    ok = alerts_pb2.SubscribeRequest(filter=alerts_pb2.AlertFilter(
        kinds=[common_pb2.ALERT_KIND_DRIFT], min_severity=common_pb2.SEVERITY_HIGH,
        nodes=[NODE], namespaces=["prod"], images=["nginx:1.25"], containers=["web"],
        exclude_images=["debug"], exclude_namespaces=["kube-system"],
        exclude_containers=["tools"]), include_notices=True, include_actions=True)
    validate_subscribe_request(wire_copy(ok))
    validate_subscribe_request(alerts_pb2.SubscribeRequest())  # everything, any severity
    cases = [
        (alerts_pb2.AlertFilter(kinds=[common_pb2.ALERT_KIND_NOVEL, 0]),
         f"subscribe_request.filter.kinds[1]: unspecified; set one of {KINDS}"),
        (alerts_pb2.AlertFilter(kinds=[5]),
         "subscribe_request.filter.kinds[0]: unknown value 5 (not in AlertKind)"),
        (alerts_pb2.AlertFilter(min_severity=9),
         "subscribe_request.filter.min_severity: unknown value 9 (not in Severity)"),
        (alerts_pb2.AlertFilter(images=["a", ""]), "subscribe_request.filter.images[1]: missing"),
        (alerts_pb2.AlertFilter(exclude_containers=[""]),
         "subscribe_request.filter.exclude_containers[0]: missing"),
        (alerts_pb2.AlertFilter(nodes=[f"n{i}" for i in range(65)]),
         "subscribe_request.filter.nodes: 65 entries, at most 64"),
    ]
    for flt, message in cases:
        with pytest.raises(InvalidMessage) as err:
            validate_subscribe_request(alerts_pb2.SubscribeRequest(filter=flt))
        assert str(err.value) == message


def test_list_requests():
    later = Timestamp(seconds=NOW.seconds + 60)
    validate_list_alerts_request(alerts_pb2.ListAlertsRequest(
        filter=alerts_pb2.AlertFilter(nodes=[NODE]), since=NOW, until=later, page_size=1000,
        page_token="abc"))
    validate_list_actions_request(actions_pb2.ListActionsRequest(
        nodes=[NODE], containers=["web"], types=[actions_pb2.ACTION_TYPE_KILL], since=NOW,
        page_size=10))
    cases = [
        (validate_list_alerts_request, alerts_pb2.ListAlertsRequest(page_size=1001),
         "list_alerts_request.page_size: 1001, at most 1000"),
        (validate_list_alerts_request, alerts_pb2.ListAlertsRequest(since=later, until=NOW),
         "list_alerts_request.since: 2026-11-23T05:32:40Z is after until 2026-11-23T05:31:40Z"),
        (validate_list_alerts_request, alerts_pb2.ListAlertsRequest(
            filter=alerts_pb2.AlertFilter(namespaces=[""])),
         "list_alerts_request.filter.namespaces[0]: missing"),
        (validate_list_actions_request, actions_pb2.ListActionsRequest(types=[0]),
         f"list_actions_request.types[0]: unspecified; set one of {TYPES}"),
        (validate_list_actions_request, actions_pb2.ListActionsRequest(containers=[""]),
         "list_actions_request.containers[0]: missing"),
        (validate_list_actions_request, actions_pb2.ListActionsRequest(page_size=5000),
         "list_actions_request.page_size: 5000, at most 1000"),
    ]
    for validate, msg, message in cases:
        with pytest.raises(InvalidMessage) as err:
            validate(msg)
        assert str(err.value) == message
