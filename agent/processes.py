"""The process table: what each process runs, its parent and its working directory, bounded (LRU).

A process is a ProcKey(tgid, start_ns): the kernel stamps every event with the process's start
(its fork), so a reused pid is a new process that inherits nothing from the old one. The table
is kept from the kernel's events and the start-up snapshot only:

* fork: the child inherits its parent's program and working directory;
* exec: the process now runs the exec'd path (an ``execve("/proc/self/exe")`` keeps the program
  it ran before, with the new argv[0]: busybox applets);
* exit: the entry goes (the events before it were already handled, in order);
* an event of a process the table does not know creates its entry, its parent from the event
  (start_ns 0: the probes never saw it fork, so it is the start-up snapshot's entry of that
  tgid, or the newest entry of that tgid); when the event says its fork was held back
  (Flag.FORK_UNSENT: over its container's fork budget, or dropped), it inherits as at a fork;
* chdir events keep the working directory;
* a repeated exec the kernel's dedup suppressed arrives as a compact record naming the full exec
  it repeats (its dedup key, per cgroup): ExecRepeats remembers what each recent full exec ran
  and the repeat updates the table as that exec did; one it cannot name leaves the program
  unknown (not wrong).

/proc is never read for what a process runs. It is read, as a last resort, for a working
directory or an fd's path that the events did not tell (a relative path is resolved against
it); such a read is checked against the process's start time so a reused pid never answers. A
path that cannot be resolved is reported as given and marked unresolved; it is never dropped.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple, TypeVar

from driftwarden.agent.procfs import ProcessSnapshot, ProcReader
from driftwarden.core.records import ProcKey, Program
from driftwarden.probes._layout import AT_FDCWD, Flag
from driftwarden.probes.events import Header

_MAX_PARENT_HOPS = 8
PROC_SELF_EXE = "/proc/self/exe"
# an exec that names a file descriptor rather than a path (fexecve without execveat)
_FD_PATH = re.compile(r"/(?:proc/self|dev)/fd/(\d+)")
_new = tuple.__new__  # a NamedTuple built without its __new__ frame (every field)
_NS_PER_SECOND = 1_000_000_000

T = TypeVar("T")


@dataclass(slots=True)
class _Proc:
    parent: ProcKey | None
    program: Program | None = None
    # the parent's program when this process was forked: its lineage once the parent is gone
    parent_program: Program | None = None
    cwd: str | None = None
    cwd_lost: bool = False  # a chdir was not sent: read the cwd from /proc (Flag.CWD_LOST)
    exec_seen: bool = False  # an exec by this very process (not one inherited at fork)
    start_ticks: int | None = None  # the snapshot's /proc starttime (keys with start_ns 0)


class ResolvedPath(NamedTuple):
    path: str  # absolute inside the container when resolved, else as given
    resolved: bool


def normalize(path: str) -> str:
    """Collapse //, /./ and .. lexically (symlinks are not followed: the container may be gone)."""
    if "//" not in path and "/." not in path and (len(path) == 1 or path[-1] != "/"):
        return path  # already normal: the common case, so skip the full parse
    out = posixpath.normpath(path)
    return "/" + out.lstrip("/") if out.startswith("//") else out


def snapshot_program(snap: ProcessSnapshot) -> Program | None:
    """What a process found at start-up runs: its script when its exe is the script's
    interpreter (as an exec of the script names it), else its exe and argv[0]."""
    if snap.script is not None:
        return Program(snap.script, snap.script)
    if snap.exe is None and not snap.argv:
        return None  # a kernel thread, or gone
    return Program(snap.exe, snap.argv[0] if snap.argv else None)


class ExecTarget(NamedTuple):
    """What a successful exec made its process run, as ProcessTable.on_exec takes it."""

    exe: str | None
    argv0: str | None
    self_exec: bool


class ExecRepeats:
    """(cgroup id, kernel dedup key) -> what that full exec ran, for the compact repeat records
    the kernel sends instead of a suppressed exec (bounded LRU, `capacity` entries: as many as
    the kernel's dedup map, so a key the kernel still suppresses on is usually still here).
    Only what the process table needs is kept (not the argv: up to 4 KB each)."""

    def __init__(self, capacity: int = 16384) -> None:
        self._capacity = capacity
        self._targets: OrderedDict[tuple[int, int], ExecTarget] = OrderedDict()
        # remembered: full execs kept; repeated: repeats named; unknown: repeats whose full exec
        # is not here (evicted, or lost in a ring-buffer drop)
        self.stats = {"remembered": 0, "repeated": 0, "unknown": 0, "evicted": 0}

    def __len__(self) -> int:
        return len(self._targets)

    def remember(self, cgroup_id: int, dedup_key: int, target: ExecTarget) -> None:
        if not dedup_key:
            return  # no key (a record made without one): nothing can repeat it
        key = (cgroup_id, dedup_key)
        self._targets[key] = target
        self._targets.move_to_end(key)
        self.stats["remembered"] += 1
        if len(self._targets) > self._capacity:
            self._targets.popitem(last=False)
            self.stats["evicted"] += 1

    def lookup(self, cgroup_id: int, dedup_key: int) -> ExecTarget | None:
        target = self._targets.get((cgroup_id, dedup_key))
        if target is None:
            self.stats["unknown"] += 1
            return None
        self._targets.move_to_end((cgroup_id, dedup_key))
        self.stats["repeated"] += 1
        return target


class ProcessTable:
    """Processes by ProcKey (LRU, `capacity` entries; evictions counted in stats)."""

    def __init__(self, proc: ProcReader, *, capacity: int = 32768,
                 ticks_per_second: int | None = None) -> None:
        self._proc = proc
        self._capacity = capacity
        self._ticks = ticks_per_second or os.sysconf("SC_CLK_TCK")
        self._table: OrderedDict[ProcKey, _Proc] = OrderedDict()
        self._by_tgid: dict[int, ProcKey] = {}  # the newest key of each tgid in the table
        # proc_reads: /proc lookups; stale_proc: answers dropped because the pid was reused
        # cwd_lost: events that said a chdir of theirs was not sent (Flag.CWD_LOST)
        self.stats = {"proc_reads": 0, "unresolved": 0, "evicted": 0, "stale_proc": 0,
                      "cwd_lost": 0, "fork_unsent": 0}

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, key: object) -> bool:
        return key in self._table

    # -- keys -----------------------------------------------------------------

    def _add(self, key: ProcKey, entry: _Proc) -> None:
        self._table[key] = entry
        self._table.move_to_end(key)  # a replaced entry must not keep its old LRU slot
        self._by_tgid[key.tgid] = key
        if len(self._table) > self._capacity:
            old, _ = self._table.popitem(last=False)
            self._forget(old)
            self.stats["evicted"] += 1

    def _forget(self, key: ProcKey) -> None:
        if self._by_tgid.get(key.tgid) == key:
            del self._by_tgid[key.tgid]

    def _known(self, tgid: int, start_ns: int) -> ProcKey:
        """The key of (tgid, start_ns); start_ns 0 (the kernel never saw its fork) is the
        newest entry of that tgid: the start-up snapshot's, or one whose kernel-side record
        was evicted."""
        if start_ns:
            return ProcKey(tgid, start_ns)
        return self._by_tgid.get(tgid) or ProcKey(tgid, 0)

    def key_of(self, header: Header) -> ProcKey:
        """The process an event is about; an unknown one gets an entry, its parent from the
        event (its program is unknown: it may have exec'd where the probes do not report)."""
        start_ns = header.start_ns
        # _known, inlined for a process whose fork the probes saw (most events); a ProcKey
        # without NamedTuple's __new__ frame
        key = (_new(ProcKey, (header.tgid, start_ns)) if start_ns
               else self._known(header.tgid, 0))
        flags = header.flags
        table = self._table
        if key in table:
            table.move_to_end(key)
            if flags and flags & Flag.CWD_LOST:
                self._lost_cwd(table[key])
            return key
        parent = self._known(header.ppid, header.parent_start_ns) if header.ppid else None
        entry = _Proc(parent=parent)
        parent_entry = self._table.get(parent) if parent is not None else None
        if parent_entry is not None:
            entry.parent_program = parent_entry.program
            if flags & Flag.FORK_UNSENT:  # its fork was held back: what on_fork would give it
                entry.program, entry.cwd = parent_entry.program, parent_entry.cwd
                self.stats["fork_unsent"] += 1
        self._add(key, entry)
        if flags and flags & Flag.CWD_LOST:
            self._lost_cwd(entry)
        return key

    def _lost_cwd(self, entry: _Proc) -> None:
        """A chdir of this process was not sent (over its container's budget, or dropped):
        what the table holds may be stale, so the next relative path reads /proc again."""
        entry.cwd = None
        entry.cwd_lost = True
        self.stats["cwd_lost"] += 1

    def seed(self, snapshots: Iterable[ProcessSnapshot]) -> int:
        """Enters the processes running at start-up (keys (tgid, 0)); returns how many."""
        seeded = []
        for snap in snapshots:
            key = ProcKey(snap.tgid, 0)
            parent = ProcKey(snap.ppid, 0) if snap.ppid else None
            self._add(key, _Proc(parent=parent, program=snapshot_program(snap), cwd=snap.cwd,
                                 start_ticks=snap.start_ticks))
            seeded.append(key)
        for key in seeded:
            entry = self._table.get(key)
            parent = self._table.get(entry.parent) if entry and entry.parent else None
            if parent is not None:
                entry.parent_program = parent.program
        return len(seeded)

    # -- what the events say -----------------------------------------------------

    def on_fork(self, header: Header, child_tgid: int, child_start_ns: int) -> ProcKey:
        """`header` is the parent's; the child inherits its program and working directory."""
        parent_key = self.key_of(header)
        parent = self._table[parent_key]
        child = ProcKey(child_tgid, child_start_ns)
        self._add(child, _Proc(parent=parent_key, program=parent.program,
                               parent_program=parent.program, cwd=parent.cwd))
        return child

    def on_exit(self, header: Header) -> None:
        key = self._known(header.tgid, header.start_ns)
        if self._table.pop(key, None) is not None:
            self._forget(key)

    def on_exec(self, key: ProcKey, exe: str | None, argv0: str | None, *,
                self_exec: bool = False) -> Program:
        """A successful exec: the process runs `exe` (the resolved path; None when unknown)
        as `argv0`. `self_exec` (``execve("/proc/self/exe")``): it keeps the program it ran
        before (or, when that is unknown, its parent's), with the new argv[0]."""
        entry = self._table[key]
        if self_exec:
            before = entry.program or self.parent_program(key)
            program = Program(before.exe if before is not None else None, argv0, True)
        else:
            program = Program(exe, argv0)
        entry.program = program
        entry.exec_seen = True
        return program

    def on_chdir(self, key: ProcKey, path: str | None, fd: int, *, base: int = 0) -> None:
        """`base`: the tgid whose cwd this one had before the call, as the kernel tracked it
        through forks (0 when unknown)."""
        entry = self._table[key]
        if entry.cwd_lost:
            # an earlier chdir was not sent: this one's path may be relative to a directory
            # never seen, and /proc shows where the process is now
            entry.cwd_lost = False
            entry.cwd = self._read(key, entry, self._proc.cwd)
        elif path is not None:
            if entry.cwd is None and not path.startswith("/"):
                # /proc/PID/cwd, read after the fact, may already show this very chdir
                # (httpd's CGI child: chdir("cgi-bin") then exec "app"); the process it
                # inherited its directory from (often long-lived, unlike its parent) tells
                # where it started.
                start = (self._known(base, 0) if base > 1 and base != key.tgid
                         else entry.parent)
                if start is not None:
                    entry.cwd = self.cwd(start)
            resolved = self.resolve(key, path, AT_FDCWD)
            entry.cwd = resolved.path if resolved.resolved else None
        else:
            entry.cwd = self._read(key, entry, self._proc.cwd)  # fchdir: only /proc can tell

    # -- what the table knows ------------------------------------------------------

    def program(self, key: ProcKey) -> Program | None:
        entry = self._table.get(key)
        return entry.program if entry is not None else None

    def programs(self, key: ProcKey) -> tuple[Program | None, Program | None]:
        """(program(key), parent_program(key)) in one lookup: asked for every record."""
        entry = self._table.get(key)
        if entry is None:
            return None, None
        parent = self._table.get(entry.parent) if entry.parent is not None else None
        return entry.program, parent.program if parent is not None else entry.parent_program

    def parent(self, key: ProcKey) -> ProcKey | None:
        entry = self._table.get(key)
        return entry.parent if entry is not None else None

    def parent_program(self, key: ProcKey) -> Program | None:
        """What the parent process runs (what it ran when it forked this one, once gone)."""
        entry = self._table.get(key)
        if entry is None:
            return None
        parent = self._table.get(entry.parent) if entry.parent is not None else None
        return parent.program if parent is not None else entry.parent_program

    def prior_program(self, key: ProcKey) -> Program | None:
        """An exec's lineage parent: what the process ran before it (an exec chain: `exec
        httpd` in a start script, `nc -e /bin/sh`), else what its parent runs; None unknown."""
        entry = self._table.get(key)
        if entry is None or (entry.exec_seen and entry.program is None):
            return None  # unknown, or it exec'd something unknown (on_unknown_exec)
        return entry.program or self.parent_program(key)

    def on_unknown_exec(self, key: ProcKey) -> None:
        """A successful exec whose target is not known (a repeat whose full exec was evicted
        or dropped): the process no longer runs what it ran, and what it runs now is unknown."""
        entry = self._table[key]
        entry.program = None
        entry.exec_seen = True

    def exec_seen(self, key: ProcKey) -> bool:
        entry = self._table.get(key)
        return bool(entry and entry.exec_seen)

    # -- /proc, the last resort ----------------------------------------------------

    def _same_process(self, key: ProcKey, entry: _Proc | None) -> bool:
        """Whether /proc/TGID is still `key`'s process: its starttime against the key's start
        (start_ns is taken at the fork tracepoint, just after the kernel's own stamp: at most a
        tick later) or the snapshot's starttime."""
        if key.start_ns:
            expected, slack = key.start_ns * self._ticks // _NS_PER_SECOND, 1
        elif entry is not None and entry.start_ticks is not None:
            expected, slack = entry.start_ticks, 0
        else:
            return True  # nothing to compare with
        self.stats["proc_reads"] += 1
        actual = self._proc.start_ticks(key.tgid)
        return actual is None or abs(actual - expected) <= slack

    def _read(self, key: ProcKey, entry: _Proc | None, read: Callable[[int], T | None]
              ) -> T | None:
        """`read(tgid)` from /proc, kept only if the pid still names `key`'s process (read
        first, checked after: a process that is still there was there when it was read)."""
        self.stats["proc_reads"] += 1
        value = read(key.tgid)
        if value is None:
            return None
        if not self._same_process(key, entry):
            self.stats["stale_proc"] += 1
            return None
        return value

    def fd_path(self, key: ProcKey, fd: int) -> str | None:
        return self._read(key, self._table.get(key), lambda tgid: self._proc.fd_path(tgid, fd))

    def live_exe(self, key: ProcKey) -> str | None:
        """/proc/PID/exe now: only for an exec that named a file descriptor, which has no
        other name (a memfd, an unlinked file)."""
        return self._read(key, self._table.get(key), self._proc.exe)

    def cwd(self, key: ProcKey) -> str | None:
        """The working directory: tracked by chdir events and inherited at fork, else read
        from /proc for the process or, when it is gone, its nearest ancestor (bounded)."""
        entry = self._table.get(key)
        if entry is not None and entry.cwd is not None:
            return entry.cwd
        current_key, current, hops = key, entry, 0
        while True:
            if current is not None and current.cwd is not None:
                found = current.cwd
                break
            found = self._read(current_key, current, self._proc.cwd)
            if found is not None:
                if current is not None:
                    current.cwd = found
                break
            if (current is None or current.parent is None or hops >= _MAX_PARENT_HOPS
                    or current.parent == current_key):
                return None
            hops += 1
            current_key = current.parent
            current = self._table.get(current_key)
        if entry is not None:
            entry.cwd = found  # inherited at fork, or read again after a lost chdir
            entry.cwd_lost = False
        return found

    def resolve(self, key: ProcKey, path: str, dirfd: int) -> ResolvedPath:
        if path.startswith("/"):
            return ResolvedPath(normalize(path), True)
        base = self.cwd(key) if dirfd == AT_FDCWD else self.fd_path(key, dirfd)
        if base is None:
            self.stats["unresolved"] += 1
            return ResolvedPath(path, False)
        return ResolvedPath(normalize(posixpath.join(base, path) if path else base), True)

    @staticmethod
    def fd_of_path(path: str) -> int | None:
        """The fd a /proc/self/fd/N or /dev/fd/N path names (an exec of a file descriptor)."""
        match = _FD_PATH.fullmatch(path)
        return int(match.group(1)) if match else None
