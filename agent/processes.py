"""Process state kept apart from events: cwd and exe per process, bounded (LRU).

The kernel reports paths as the syscall received them. A relative path is resolved against the
process's working directory, which we know from, in order: the chdir events we saw for that
process, /proc/PID/cwd while it is alive, and the parent's (a forked child inherits it). A path
that cannot be resolved is reported as given and marked unresolved; it is never dropped.
"""

from __future__ import annotations

import posixpath
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from driftwarden.agent.procfs import ProcReader
from driftwarden.probes._layout import AT_FDCWD

_MAX_PARENT_HOPS = 8
PROC_SELF_EXE = "/proc/self/exe"


@dataclass
class _Proc:
    ppid: int
    cwd: str | None = None
    exe: str | None = None
    exec_seen: bool = False


class ResolvedPath(NamedTuple):
    path: str  # absolute inside the container when resolved, else as given
    resolved: bool


def normalize(path: str) -> str:
    """Collapse //, /./ and .. lexically (symlinks are not followed: the container may be gone)."""
    if "//" not in path and "/." not in path and (len(path) == 1 or path[-1] != "/"):
        return path  # already normal: the common case, so skip the full parse
    out = posixpath.normpath(path)
    return "/" + out.lstrip("/") if out.startswith("//") else out


class ProcessTable:
    def __init__(self, proc: ProcReader, *, capacity: int = 32768) -> None:
        self._proc = proc
        self._capacity = capacity
        self._table: OrderedDict[int, _Proc] = OrderedDict()
        self.stats = {"proc_reads": 0, "unresolved": 0, "evicted": 0}

    def __len__(self) -> int:
        return len(self._table)

    def _entry(self, tgid: int, ppid: int) -> _Proc:
        entry = self._table.get(tgid)
        if entry is not None:
            if ppid and entry.ppid and ppid != entry.ppid:
                entry = None  # pid reused by another process
            else:
                if ppid and not entry.ppid:
                    entry.ppid = ppid
                self._table.move_to_end(tgid)
                return entry
        if not ppid:
            self.stats["proc_reads"] += 1
            ppid = self._proc.ppid(tgid) or 0
        entry = _Proc(ppid=ppid)
        self._table[tgid] = entry
        self._table.move_to_end(tgid)  # a reused pid's old slot must not decide its eviction
        if len(self._table) > self._capacity:
            self._table.popitem(last=False)
            self.stats["evicted"] += 1
        return entry

    def cwd(self, tgid: int, ppid: int = 0) -> str | None:
        entry = self._entry(tgid, ppid)
        hops = 0
        current_tgid, current = tgid, entry
        while current.cwd is None:
            self.stats["proc_reads"] += 1
            live = self._proc.cwd(current_tgid)
            if live is not None:
                current.cwd = live
                break
            if hops >= _MAX_PARENT_HOPS or not current.ppid or current.ppid == current_tgid:
                return None
            hops += 1
            current_tgid = current.ppid
            current = self._entry(current_tgid, 0)
        if current is not entry:
            entry.cwd = current.cwd  # inherited at fork
        return entry.cwd

    def live_exe(self, tgid: int) -> str | None:
        self.stats["proc_reads"] += 1
        return self._proc.exe(tgid)

    def exe_before_exec(self, tgid: int, ppid: int = 0) -> str | None:
        """The image a process ran before its latest exec (what /proc/self/exe pointed to)."""
        entry = self._entry(tgid, ppid)
        current, hops = entry, 0
        while current.exe is None and hops < _MAX_PARENT_HOPS and current.ppid:
            hops += 1
            current = self._entry(current.ppid, 0)
        return current.exe

    def resolve(self, tgid: int, ppid: int, path: str, dirfd: int) -> ResolvedPath:
        if path.startswith("/"):
            return ResolvedPath(normalize(path), True)
        if dirfd == AT_FDCWD:
            base = self.cwd(tgid, ppid)
        else:
            self.stats["proc_reads"] += 1
            base = self._proc.fd_path(tgid, dirfd)
        if base is None:
            self.stats["unresolved"] += 1
            return ResolvedPath(path, False)
        return ResolvedPath(normalize(posixpath.join(base, path) if path else base), True)

    # -- bookkeeping from events -------------------------------------------

    def on_chdir(self, tgid: int, ppid: int, path: str | None, fd: int, *,
                 base: int = 0) -> None:
        """`base`: the process whose cwd this one had before the call, as the kernel tracked it
        through forks (0 when unknown)."""
        entry = self._entry(tgid, ppid)
        if path is not None:
            start = base if base > 1 and base != tgid else entry.ppid
            if entry.cwd is None and not path.startswith("/") and start > 1:
                # Our own /proc/PID/cwd is read after the fact and may already show this very
                # chdir (httpd's CGI child: chdir("cgi-bin") then exec "app"); the process it
                # inherited its directory from (often long-lived, unlike its parent) tells
                # where it started.
                entry.cwd = self.cwd(start)
            resolved = self.resolve(tgid, ppid, path, AT_FDCWD)
            entry.cwd = resolved.path if resolved.resolved else None
        else:
            self.stats["proc_reads"] += 1
            entry.cwd = self._proc.cwd(tgid)  # fchdir: only /proc can tell

    def on_exec(self, tgid: int, ppid: int, exe: str | None) -> None:
        entry = self._entry(tgid, ppid)
        entry.exe = exe
        entry.exec_seen = True

    def exec_seen(self, tgid: int) -> bool:
        entry = self._table.get(tgid)
        return bool(entry and entry.exec_seen)
