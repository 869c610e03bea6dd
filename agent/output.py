"""Trace output: one JSON object per line (schema in README), or one human-readable line."""

from __future__ import annotations

import datetime as dt
import errno
import json
import shlex
from typing import TextIO

from driftwarden.agent.pipeline import TraceSummary
from driftwarden.core.records import TraceRecord
from driftwarden.probes._layout import FileOp, Flag
from driftwarden.probes.events import ConnectEvent, ExecEvent, FileEvent, open_flag_names

SCHEMA_VERSION = 1
_ANY_PATH_TRUNCATED = int(Flag.PATH_TRUNCATED | Flag.PATH2_TRUNCATED)


def _errno_name(retval: int) -> str | None:
    if retval >= 0:
        return None
    return errno.errorcode.get(-retval, f"E{-retval}")


def _wall(ts_ns: int, clock_offset_ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp((ts_ns + clock_offset_ns) / 1e9, tz=dt.UTC)


class WallClock:
    """Kernel monotonic ns -> RFC 3339 UTC text; the seconds part is formatted once a second."""

    def __init__(self, clock_offset_ns: int) -> None:
        self.clock_offset_ns = clock_offset_ns
        self._second: int | None = None
        self._prefix = ""

    def iso(self, ts_ns: int) -> str:
        second, ns = divmod(ts_ns + self.clock_offset_ns, 1_000_000_000)
        if second != self._second:
            self._second = second
            self._prefix = dt.datetime.fromtimestamp(second, tz=dt.UTC).strftime(
                "%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{ns // 1000:06d}Z"


def container_to_dict(view) -> dict | None:
    if view.state == "host":
        return None
    return {
        "id": view.id, "name": view.name, "image": view.image, "image_id": view.image_id,
        "image_digest": view.image_digest, "runtime": view.runtime, "pod": view.pod,
        "namespace": view.namespace, "pod_uid": view.pod_uid, "workload": view.workload,
        "labels": dict(view.labels), "attribution": view.state,
        "metadata_error": view.metadata_error,
    }


def record_to_dict(record: TraceRecord, clock_offset_ns: int, *, clock: WallClock | None = None,
                   container: dict | None = None) -> dict:
    """The JSON object of one record. `clock` and `container` let a sink reuse work across
    records (the container dict must then not be mutated by the caller)."""
    event = record.event
    h = event.header
    view = record.container
    out: dict = {
        "v": SCHEMA_VERSION,
        "time": (clock or WallClock(clock_offset_ns)).iso(h.ts_ns),
        "ts_ns": h.ts_ns,
        "kind": record.kind,
        "container": container if container is not None else container_to_dict(view),
        "cgroup_id": h.cgroup_id,
        "process": {"pid": h.tgid, "tid": h.pid, "ppid": record.ppid, "uid": h.uid,
                    "gid": h.gid, "comm": h.comm},
        "suppressed_before": h.suppressed,
        "runtime_setup": record.runtime_setup,
        "before_agent": record.before_agent,
    }
    if isinstance(event, ExecEvent):
        out["exec"] = {
            "filename": event.filename,
            "path": record.path,
            "path_resolved": record.path_resolved,
            "exe": record.exe,
            "argv": list(event.argv),
            "argv_truncated": event.argv_truncated,
            "result": event.retval,
            "error": _errno_name(event.retval),
        }
        out["process"]["exe"] = record.exe
    elif isinstance(event, ConnectEvent):
        out["connect"] = {
            "family": event.family.value,
            "protocol": event.sock_type.value,
            "address": event.address,
            "port": event.port if event.family.value in ("inet", "inet6") else None,
            "result": event.result.value,
            "errno": _errno_name(event.retval),
            "fd": event.fd,
        }
    elif isinstance(event, FileEvent):
        write = {
            "op": event.op.name.lower(),
            "path": record.path,
            "path_as_given": event.path,
            "path_resolved": record.path_resolved,
            "dirfd": event.dirfd,
            "result": event.retval if event.result_known else None,
            "error": _errno_name(event.retval) if event.result_known else None,
            "truncated": bool(int(event.header.flags) & _ANY_PATH_TRUNCATED),
        }
        if event.path2 is not None:
            write.update(path2=record.path2, path2_as_given=event.path2,
                         path2_resolved=record.path2_resolved, dirfd2=event.dirfd2)
        if event.op is FileOp.OPEN:
            write["flags"] = open_flag_names(event.open_flags)
        if event.op in (FileOp.OPEN, FileOp.CHMOD, FileOp.MKDIR, FileOp.MKNOD):
            write["mode"] = f"{event.mode:o}"
        out["write"] = write
    return out


class JsonSink:
    def __init__(self, stream: TextIO, clock_offset_ns: int) -> None:
        self.stream = stream
        self.clock_offset_ns = clock_offset_ns
        self._clock = WallClock(clock_offset_ns)
        self._containers: dict[int, tuple[object, dict | None]] = {}  # cgroup -> (view, dict)
        self._encode = json.JSONEncoder(check_circular=False).encode

    def write(self, record: TraceRecord) -> None:
        view = record.container
        cached = self._containers.get(view.cgroup_id)
        if cached is None or cached[0] is not view:
            if len(self._containers) > 4096:
                self._containers.clear()
            cached = self._containers[view.cgroup_id] = (view, container_to_dict(view))
        out = record_to_dict(record, self.clock_offset_ns, clock=self._clock,
                             container=cached[1] if cached[1] is not None else None)
        self.stream.write(self._encode(out) + "\n")

    def flush(self) -> None:
        self.stream.flush()


def _who(record: TraceRecord) -> str:
    view = record.container
    if view.state == "host":
        return "host"
    name = view.name or (view.id[:12] if view.id else f"cgroup:{view.cgroup_id}")
    return f"{name}[{view.image}]" if view.image else name


def format_line(record: TraceRecord, clock_offset_ns: int) -> str:
    event = record.event
    h = event.header
    stamp = _wall(h.ts_ns, clock_offset_ns).strftime("%H:%M:%S.%f")[:-3]
    head = f"{stamp} {record.kind:<7} {_who(record)} pid={h.tgid} ppid={record.ppid} uid={h.uid}"
    if isinstance(event, ExecEvent):
        target = record.path or event.filename
        if record.exe and record.exe != target:
            target = f"{target} ({record.exe})"
        result = "ok" if event.ok else _errno_name(event.retval)
        body = f"{target} {shlex.join(event.argv)}{' …' if event.argv_truncated else ''} {result}"
    elif isinstance(event, ConnectEvent):
        where = (f"[{event.address}]:{event.port}" if event.family.value == "inet6"
                 else f"{event.address}:{event.port}" if event.family.value == "inet"
                 else event.address)
        body = f"{h.comm} {event.sock_type.value} {event.family.value} {where} {event.result.value}"
    elif isinstance(event, FileEvent):
        path = record.path or f"fd:{event.dirfd}"
        if not record.path_resolved:
            path += " (unresolved)"
        if event.path2 is not None:
            path2 = record.path2 + ("" if record.path2_resolved else " (unresolved)")
            path = f"{path} <- {path2}" if event.op is FileOp.SYMLINK else f"{path} -> {path2}"
        extra = ""
        if event.op is FileOp.OPEN:
            extra = " " + "|".join(open_flag_names(event.open_flags))
        elif event.op in (FileOp.CHMOD, FileOp.MKDIR, FileOp.MKNOD):
            extra = f" mode={event.mode:o}"
        if not event.result_known:
            result = ""
        else:
            result = " ok" if event.retval >= 0 else f" {_errno_name(event.retval)}"
        body = f"{h.comm} {event.op.name.lower()} {path}{extra}{result}"
    else:
        body = ""
    suffix = f" (+{h.suppressed} repeats)" if h.suppressed else ""
    if record.before_agent:
        suffix += " [running before the agent started]"
    return f"{head} {body}{suffix}"


class HumanSink:
    def __init__(self, stream: TextIO, clock_offset_ns: int) -> None:
        self.stream = stream
        self.clock_offset_ns = clock_offset_ns

    def write(self, record: TraceRecord) -> None:
        self.stream.write(format_line(record, self.clock_offset_ns) + "\n")

    def flush(self) -> None:
        self.stream.flush()


def format_summary(summary: TraceSummary) -> str:
    lines = ["summary:"]
    lines.append(f"  {'kind':<8} {'emitted':>9} {'suppressed':>11} {'dropped':>8} "
                 f"{'over budget':>12} {'shown':>7}")
    # fork's "over budget" is forks held back; exit's, the exits of those processes (not sent:
    # userspace never heard of them)
    for kind, label in (("exec", "exec"), ("connect", "connect"), ("file", "write"),
                        ("chdir", "chdir"), ("fork", "fork"), ("exit", "exit")):
        k = summary.kernel.get(kind, {})
        lines.append(
            f"  {label:<8} {k.get('emitted', 0):>9} {k.get('suppressed', 0):>11} "
            f"{k.get('dropped', 0):>8} {k.get('over_budget', 0):>12} "
            f"{summary.shown.get(label, 0):>7}"
        )
    if summary.filtered:
        parts = ", ".join(f"{k}={v}" for k, v in sorted(summary.filtered.items()))
        lines.append(f"  filtered: {parts}")
    if summary.decode_errors:
        parts = ", ".join(f"{k}={v}" for k, v in sorted(summary.decode_errors.items()))
        lines.append(f"  decode errors: {parts}")
    if summary.unresolved_paths:
        lines.append(f"  unresolved relative paths: {summary.unresolved_paths}")
    if summary.pending_timeouts:
        lines.append(f"  sent without container metadata (timeout): {summary.pending_timeouts}")
    return "\n".join(lines)
