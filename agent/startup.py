"""The start-up snapshot as detection sees it: one synthetic exec record per process that was
already running in a container when the agent started.

The probes never saw those processes exec, yet they are what the container does (its init, its
long-lived children): detection treats each as the exec it was (learned while its image learns,
checked afterwards, drift in every mode). A record is ``before_agent=True``; its program and
lineage parent come from the process table the snapshot seeded (agent/processes.py); its argv,
exe and working directory from the snapshot; its time is the process's start converted to the
events' clock (:class:`SnapshotClock`). Parents come before their children.

Lineage: the parent is the process's parent when that parent is in the same container (a
parent outside it, the runtime's shim, says nothing about the image: the probes do not name
one either when a container starts). A process with its parent's exe and argv is taken for a
fork that did not exec (a subshell): its exec item is its parent's, and it has no lineage of
its own, as a live fork has none.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Iterable
from dataclasses import dataclass

from driftwarden.agent.procfs import DELETED, ProcessSnapshot
from driftwarden.core.records import ContainerView, ProcKey, TraceRecord
from driftwarden.probes._layout import AT_FDCWD, COMM_LEN, EventKind, Flag
from driftwarden.probes.events import ExecEvent, Header

SNAPSHOT_CLOCK_FACT = ("snapshot_clock",)
_NS_PER_SECOND = 1_000_000_000


@dataclass(frozen=True)
class SnapshotClock:
    """How the snapshot's start times map onto the events' clock.

    /proc/PID/stat's starttime counts clock ticks since boot (CLOCK_BOOTTIME); the probes stamp
    events with CLOCK_MONOTONIC, which stops while the host is suspended. ``boot_offset_ns``:
    CLOCK_BOOTTIME - CLOCK_MONOTONIC when the snapshot was taken (the time spent suspended
    until then, which a process started before a suspend over-counts by the later suspends:
    as best as can be done); ``taken_ns``: CLOCK_MONOTONIC then, the agent's start on the
    events' clock."""

    boot_offset_ns: int
    ticks_per_second: int
    taken_ns: int

    @classmethod
    def now(cls) -> SnapshotClock:
        mono = time.monotonic_ns()
        boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        return cls(boot_offset_ns=max(boot - mono, 0),
                   ticks_per_second=os.sysconf("SC_CLK_TCK"), taken_ns=mono)

    def event_ns(self, start_ticks: int) -> int:
        """A process's start on the events' clock: never before boot, never after the
        snapshot."""
        boot_ns = start_ticks * _NS_PER_SECOND // self.ticks_per_second
        return min(max(boot_ns - self.boot_offset_ns, 0), self.taken_ns)

    def to_dict(self) -> dict:
        return {"boot_offset_ns": self.boot_offset_ns,
                "ticks_per_second": self.ticks_per_second, "taken_ns": self.taken_ns}

    @classmethod
    def from_dict(cls, data: dict) -> SnapshotClock:
        return cls(int(data["boot_offset_ns"]), int(data["ticks_per_second"]),
                   int(data["taken_ns"]))


def parents_first(snapshot: Iterable[ProcessSnapshot]) -> list[ProcessSnapshot]:
    """The snapshot oldest first, every process after its parent (start times tie at a tick's
    resolution, and a wrapped pid counter makes pid order meaningless)."""
    ordered = sorted(snapshot, key=lambda p: (p.start_ticks, p.tgid))
    by_tgid = {p.tgid: p for p in ordered}
    out: list[ProcessSnapshot] = []
    placed: set[int] = set()
    for snap in ordered:
        chain = []
        current: ProcessSnapshot | None = snap
        while current is not None and current.tgid not in placed:
            placed.add(current.tgid)  # also ends a ppid cycle
            chain.append(current)
            current = by_tgid.get(current.ppid)
        out.extend(reversed(chain))
    return out


def is_runtime_init(snap: ProcessSnapshot) -> bool:
    """runc setting a container up (`runc init`, running from runc's memfd copy of itself):
    the runtime's work, not the image's (live, such events are runtime_setup too)."""
    return (len(snap.argv) >= 2 and posixpath.basename(snap.argv[0]) == "runc"
            and snap.argv[1] == "init")


def _forked_copy(snap: ProcessSnapshot, parent: ProcessSnapshot) -> bool:
    return snap.exe == parent.exe and snap.argv == parent.argv and snap.script == parent.script


def snapshot_record(snap: ProcessSnapshot, parent: ProcessSnapshot | None, view: ContainerView,
                    table, clock: SnapshotClock | None) -> TraceRecord | None:
    """The synthetic exec record of one running process (`parent`: its parent's snapshot entry,
    None when not found; `table`: the seeded ProcessTable; `clock` None: time 0, unknown). None
    for what never exec'd anything readable (a kernel thread, a process gone mid-read)."""
    key = ProcKey(snap.tgid, 0)
    program = table.program(key)
    if program is None or snap.exe is None or snap.cgroup_id is None:
        return None
    parent_program = None
    if parent is not None and parent.cgroup_id == snap.cgroup_id and not _forked_copy(
            snap, parent):
        parent_program = table.parent_program(key)
    named = program.exe or snap.exe
    path = named[: -len(DELETED)] if named.endswith(DELETED) else named
    header = Header(
        kind=EventKind.EXEC, ts_ns=clock.event_ns(snap.start_ticks) if clock else 0,
        cgroup_id=snap.cgroup_id, pid=snap.tgid, tgid=snap.tgid, ppid=snap.ppid, uid=0, gid=0,
        comm=posixpath.basename(path)[: COMM_LEN - 1], flags=Flag(0), suppressed=0)
    event = ExecEvent(header=header, filename=path, argv=tuple(snap.argv), retval=0,
                      dirfd=AT_FDCWD)
    return TraceRecord(event=event, kind="exec", container=view, ppid=snap.ppid, path=path,
                       path_resolved=path.startswith("/"), exe=snap.exe,
                       runtime_setup=is_runtime_init(snap), program=program,
                       parent_program=parent_program, before_agent=True)


__all__ = ["SNAPSHOT_CLOCK_FACT", "SnapshotClock", "is_runtime_init", "parents_first",
           "snapshot_record"]
