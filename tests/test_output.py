"""Trace output: the JSON record schema, the human line, the summary table."""

from __future__ import annotations

import io
import json
from collections import Counter

import pytest
from driftwarden.agent.output import (
    HumanSink,
    JsonSink,
    format_line,
    format_summary,
    record_to_dict,
)
from driftwarden.agent.pipeline import TraceSummary
from driftwarden.core.records import ContainerView, TraceRecord
from driftwarden.probes._layout import AT_FDCWD, EventKind, FileOp, Flag
from driftwarden.probes.events import (
    ConnectEvent,
    ExecEvent,
    Family,
    FileEvent,
    Header,
    SockType,
)

OFFSET = 1_700_000_000_000_000_000  # 2023-11-14T22:13:20Z
TS = 3_250_000_000  # + 3.25 s
CID = "f00dcafe" * 8

WEB = ContainerView(
    state="container", cgroup_id=777, cgroup_path=f"/system.slice/docker-{CID}.scope", id=CID,
    name="web", image="nginx:1.25", image_id="sha256:" + "ab" * 32, runtime="docker",
    pod="web-0", namespace="prod", labels=(("app", "web"), ("tier", "front")),
)
HOST = ContainerView(state="host", cgroup_id=1)


def header(kind: EventKind, *, comm: str = "sh", flags: int = 0, suppressed: int = 0,
           ts_ns: int = TS) -> Header:
    return Header(kind=kind, ts_ns=ts_ns, cgroup_id=777, pid=4243, tgid=4242, ppid=4000,
                  uid=33, gid=34, comm=comm, flags=Flag(flags), suppressed=suppressed)


def exec_record(**kw) -> TraceRecord:
    event = ExecEvent(header=header(EventKind.EXEC, comm="curl", suppressed=2),
                      filename="../bin/curl", argv=("curl", "-s", "http://x/a b"), retval=0,
                      dirfd=AT_FDCWD, argv_truncated=False)
    return TraceRecord(event=event, kind="exec", container=WEB, ppid=4000,
                       path="/usr/bin/curl", path_resolved=True, exe="/usr/bin/curl", **kw)


def connect_record(**kw) -> TraceRecord:
    event = ConnectEvent(header=header(EventKind.CONNECT, comm="curl"), family=Family.INET,
                         family_number=2, address="10.0.0.5", port=8080,
                         sock_type=SockType.TCP, retval=-111, fd=5)
    return TraceRecord(event=event, kind="connect", container=WEB, ppid=4000, **kw)


def rename_record(**kw) -> TraceRecord:
    event = FileEvent(header=header(EventKind.FILE, comm="mv", flags=Flag.PATH2_TRUNCATED),
                      op=FileOp.RENAME, path="tmp/x", path2="/usr/bin/x", dirfd=AT_FDCWD,
                      dirfd2=9, open_flags=0, mode=0, retval=0, path2_truncated=True)
    return TraceRecord(event=event, kind="write", container=WEB, ppid=4000, path="/app/tmp/x",
                       path_resolved=True, path2="/usr/bin/x", path2_resolved=True, **kw)


WEB_JSON = {
    "id": CID, "name": "web", "image": "nginx:1.25", "image_id": "sha256:" + "ab" * 32,
    "image_digest": None, "runtime": "docker", "pod": "web-0", "namespace": "prod",
    "pod_uid": None, "workload": None,
    "labels": {"app": "web", "tier": "front"}, "attribution": "container",
    "metadata_error": None,
}


def _common(kind: str, comm: str, suppressed: int = 0) -> dict:
    return {
        "v": 1,
        "time": "2023-11-14T22:13:23.250000Z",
        "ts_ns": TS,
        "kind": kind,
        "container": WEB_JSON,
        "cgroup_id": 777,
        "process": {"pid": 4242, "tid": 4243, "ppid": 4000, "uid": 33, "gid": 34, "comm": comm},
        "suppressed_before": suppressed,
        "runtime_setup": False,
        "before_agent": False,
    }


def test_exec_to_dict():
    expected = _common("exec", "curl", suppressed=2)
    expected["process"]["exe"] = "/usr/bin/curl"
    expected["exec"] = {
        "filename": "../bin/curl", "path": "/usr/bin/curl", "path_resolved": True,
        "exe": "/usr/bin/curl", "argv": ["curl", "-s", "http://x/a b"], "argv_truncated": False,
        "result": 0, "error": None,
    }
    got = record_to_dict(exec_record(), OFFSET)
    assert got == expected
    assert list(got) == ["v", "time", "ts_ns", "kind", "container", "cgroup_id", "process",
                         "suppressed_before", "runtime_setup", "before_agent", "exec"]
    assert json.loads(json.dumps(got)) == expected


def test_connect_to_dict():
    expected = _common("connect", "curl")
    expected["connect"] = {"family": "inet", "protocol": "tcp", "address": "10.0.0.5",
                           "port": 8080, "result": "refused", "errno": "ECONNREFUSED", "fd": 5}
    assert record_to_dict(connect_record(), OFFSET) == expected


def test_unix_connect_has_no_port():
    event = ConnectEvent(header=header(EventKind.CONNECT), family=Family.UNIX, family_number=1,
                         address="@dbus", port=0, sock_type=SockType.UNKNOWN, retval=0, fd=3)
    got = record_to_dict(TraceRecord(event=event, kind="connect", container=WEB, ppid=1), 0)
    assert got["connect"] == {"family": "unix", "protocol": "unknown", "address": "@dbus",
                              "port": None, "result": "success", "errno": None, "fd": 3}


def test_rename_to_dict():
    expected = _common("write", "mv")
    expected["write"] = {
        "op": "rename", "path": "/app/tmp/x", "path_as_given": "tmp/x", "path_resolved": True,
        "dirfd": AT_FDCWD, "result": 0, "error": None, "truncated": True,
        "path2": "/usr/bin/x", "path2_as_given": "/usr/bin/x", "path2_resolved": True,
        "dirfd2": 9,
    }
    assert record_to_dict(rename_record(), OFFSET) == expected


def test_open_has_flags_and_mode_and_chmod_has_mode():
    event = FileEvent(header=header(EventKind.FILE), op=FileOp.OPEN, path="/etc/passwd",
                      path2=None, dirfd=AT_FDCWD, dirfd2=AT_FDCWD, open_flags=0o1101,
                      mode=0o644, retval=-13)
    record = TraceRecord(event=event, kind="write", container=WEB, ppid=1, path="/etc/passwd")
    assert record_to_dict(record, 0)["write"] == {
        "op": "open", "path": "/etc/passwd", "path_as_given": "/etc/passwd",
        "path_resolved": True, "dirfd": AT_FDCWD, "result": -13, "error": "EACCES",
        "truncated": False, "flags": ["O_WRONLY", "O_CREAT", "O_TRUNC"], "mode": "644",
    }
    chmod = FileEvent(header=header(EventKind.FILE), op=FileOp.CHMOD, path=None, path2=None,
                      dirfd=4, dirfd2=AT_FDCWD, open_flags=0, mode=0o4755, retval=0)
    record = TraceRecord(event=chmod, kind="write", container=WEB, ppid=1, path="",
                         path_resolved=False)
    write = record_to_dict(record, 0)["write"]
    assert (write["mode"], write["path_as_given"], write["path_resolved"], write["dirfd"]) == (
        "4755", None, False, 4)
    assert "flags" not in write and "path2" not in write


def test_host_and_pending_containers():
    record = TraceRecord(event=connect_record().event, kind="connect", container=HOST, ppid=1)
    assert record_to_dict(record, 0)["container"] is None
    pending = ContainerView(state="pending", cgroup_id=777, metadata_error="timeout")
    record = TraceRecord(event=connect_record().event, kind="connect", container=pending, ppid=1)
    assert record_to_dict(record, 0)["container"] == {
        "id": None, "name": None, "image": None, "image_id": None, "image_digest": None,
        "runtime": None, "pod": None, "namespace": None, "pod_uid": None, "workload": None,
        "labels": {}, "attribution": "pending", "metadata_error": "timeout",
    }


@pytest.mark.parametrize(("ts_ns", "offset", "text"), [
    (0, 0, "1970-01-01T00:00:00.000000Z"),
    (1_000, 0, "1970-01-01T00:00:00.000001Z"),
    (TS, OFFSET, "2023-11-14T22:13:23.250000Z"),
    (86_400_000_000_000, OFFSET, "2023-11-15T22:13:20.000000Z"),
    (500_000_000, OFFSET - 1_000_000_000, "2023-11-14T22:13:19.500000Z"),
])
def test_time_is_utc_from_clock_offset(ts_ns, offset, text):
    record = exec_record()
    event = record.event._replace(header=header(EventKind.EXEC, ts_ns=ts_ns))
    record = record._replace(event=event)
    got = record_to_dict(record, offset)
    assert got["time"] == text
    assert got["ts_ns"] == ts_ns


@pytest.mark.parametrize(("retval", "name"), [
    (0, None), (3, None), (-1, "EPERM"), (-2, "ENOENT"), (-13, "EACCES"), (-8, "ENOEXEC"),
    (-111, "ECONNREFUSED"), (-9999, "E9999"),
])
def test_errno_names(retval, name):
    event = ExecEvent(header=header(EventKind.EXEC), filename="/x", argv=("x",), retval=retval,
                      dirfd=AT_FDCWD)
    record = TraceRecord(event=event, kind="exec", container=WEB, ppid=1, path="/x")
    got = record_to_dict(record, 0)["exec"]
    assert (got["result"], got["error"]) == (retval, name)


# -- human lines --------------------------------------------------------------


def test_format_line_exec():
    assert format_line(exec_record(), OFFSET) == (
        "22:13:23.250 exec    web[nginx:1.25] pid=4242 ppid=4000 uid=33 "
        "/usr/bin/curl curl -s 'http://x/a b' ok (+2 repeats)"
    )


def test_format_line_exec_self_exe_truncated_and_failed():
    event = ExecEvent(header=header(EventKind.EXEC), filename="/proc/self/exe",
                      argv=("python3", "-c", "pass"), retval=0, dirfd=AT_FDCWD,
                      argv_truncated=True)
    record = TraceRecord(event=event, kind="exec", container=WEB, ppid=4000,
                         path="/proc/self/exe", exe="/usr/bin/python3.11")
    assert format_line(record, OFFSET) == (
        "22:13:23.250 exec    web[nginx:1.25] pid=4242 ppid=4000 uid=33 "
        "/proc/self/exe (/usr/bin/python3.11) python3 -c pass … ok"
    )
    failed = ExecEvent(header=header(EventKind.EXEC), filename="nope", argv=("nope",),
                       retval=-2, dirfd=AT_FDCWD)
    record = TraceRecord(event=failed, kind="exec", container=HOST, ppid=7, path="nope",
                         path_resolved=False)
    assert format_line(record, OFFSET) == (
        "22:13:23.250 exec    host pid=4242 ppid=7 uid=33 nope nope ENOENT")


def test_format_line_connect():
    assert format_line(connect_record(), OFFSET) == (
        "22:13:23.250 connect web[nginx:1.25] pid=4242 ppid=4000 uid=33 "
        "curl tcp inet 10.0.0.5:8080 refused"
    )
    v6 = ConnectEvent(header=header(EventKind.CONNECT), family=Family.INET6, family_number=10,
                      address="2001:db8::1", port=443, sock_type=SockType.UDP, retval=-115, fd=3)
    unnamed = ContainerView(state="container", cgroup_id=777, id=CID)
    record = TraceRecord(event=v6, kind="connect", container=unnamed, ppid=1)
    assert format_line(record, OFFSET) == (
        "22:13:23.250 connect f00dcafef00d pid=4242 ppid=1 uid=33 "
        "sh udp inet6 [2001:db8::1]:443 in-progress"
    )
    unix = ConnectEvent(header=header(EventKind.CONNECT), family=Family.UNIX, family_number=1,
                        address="/run/docker.sock", port=0, sock_type=SockType.TCP, retval=-13,
                        fd=3)
    bare = ContainerView(state="pending", cgroup_id=555)
    record = TraceRecord(event=unix, kind="connect", container=bare, ppid=1)
    assert format_line(record, OFFSET) == (
        "22:13:23.250 connect cgroup:555 pid=4242 ppid=1 uid=33 "
        "sh tcp unix /run/docker.sock denied"
    )


def test_format_line_writes():
    assert format_line(rename_record(), OFFSET) == (
        "22:13:23.250 write   web[nginx:1.25] pid=4242 ppid=4000 uid=33 "
        "mv rename /app/tmp/x -> /usr/bin/x ok"
    )
    symlink = FileEvent(header=header(EventKind.FILE, comm="ln"), op=FileOp.SYMLINK,
                        path="../lib/x", path2="lnk", dirfd=AT_FDCWD, dirfd2=AT_FDCWD,
                        open_flags=0, mode=0, retval=0)
    record = TraceRecord(event=symlink, kind="write", container=WEB, ppid=1, path="../lib/x",
                         path2="lnk", path2_resolved=False)
    assert format_line(record, OFFSET).endswith(" ln symlink ../lib/x <- lnk (unresolved) ok")
    opened = FileEvent(header=header(EventKind.FILE), op=FileOp.OPEN, path="a b", path2=None,
                       dirfd=AT_FDCWD, dirfd2=AT_FDCWD, open_flags=0o2102, mode=0o600,
                       retval=3)
    record = TraceRecord(event=opened, kind="write", container=WEB, ppid=1, path="a b",
                         path_resolved=False)
    assert format_line(record, OFFSET).endswith(
        " sh open a b (unresolved) O_RDWR|O_CREAT|O_APPEND ok")
    fchmod = FileEvent(header=header(EventKind.FILE, suppressed=4), op=FileOp.CHMOD, path=None,
                       path2=None, dirfd=6, dirfd2=AT_FDCWD, open_flags=0, mode=0o755,
                       retval=-1)
    record = TraceRecord(event=fchmod, kind="write", container=WEB, ppid=1, path="",
                         path_resolved=False)
    assert format_line(record, OFFSET).endswith(
        " sh chmod fd:6 (unresolved) mode=755 EPERM (+4 repeats)")


def test_sinks_write_one_line_per_record():
    out = io.StringIO()
    sink = JsonSink(out, OFFSET)
    sink.write(exec_record())
    sink.write(connect_record())
    sink.flush()
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["exec", "connect"]
    assert json.loads(lines[0]) == record_to_dict(exec_record(), OFFSET)
    out = io.StringIO()
    HumanSink(out, OFFSET).write(connect_record())
    assert out.getvalue() == format_line(connect_record(), OFFSET) + "\n"


# -- summary ------------------------------------------------------------------


def test_format_summary_table():
    summary = TraceSummary(
        kernel={"exec": {"emitted": 12, "suppressed": 3, "dropped": 0, "read_failed": 0},
                "connect": {"emitted": 7, "suppressed": 100000, "dropped": 2},
                "file": {"emitted": 1234567, "suppressed": 0, "dropped": 9,
                         "over_budget": 4321},
                "chdir": {"emitted": 80, "suppressed": 0, "dropped": 0, "over_budget": 199920},
                "fork": {"emitted": 50000, "suppressed": 0, "dropped": 0, "over_budget": 7000},
                "exit": {"emitted": 49990, "suppressed": 0, "dropped": 0, "over_budget": 6990}},
        shown=Counter({"exec": 5, "write": 40}),
        filtered=Counter({"host": 3, "kind": 1}),
        decode_errors=Counter({"file:file-op-11": 2}),
        unresolved_paths=4,
        pending_timeouts=6,
    )
    assert format_summary(summary).splitlines() == [
        "summary:",
        "  kind       emitted  suppressed  dropped  over budget   shown",
        "  exec            12           3        0            0       5",
        "  connect          7      100000        2            0       0",
        "  write      1234567           0        9         4321      40",
        "  chdir           80           0        0       199920       0",
        "  fork         50000           0        0         7000       0",
        "  exit         49990           0        0         6990       0",
        "  filtered: host=3, kind=1",
        "  decode errors: file:file-op-11=2",
        "  unresolved relative paths: 4",
        "  sent without container metadata (timeout): 6",
    ]


def test_format_summary_without_counters():
    assert format_summary(TraceSummary()).splitlines() == [
        "summary:",
        "  kind       emitted  suppressed  dropped  over budget   shown",
        "  exec             0           0        0            0       0",
        "  connect          0           0        0            0       0",
        "  write            0           0        0            0       0",
        "  chdir            0           0        0            0       0",
        "  fork             0           0        0            0       0",
        "  exit             0           0        0            0       0",
    ]
