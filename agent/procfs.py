"""Reads per-process facts from /proc, behind an interface so tests and replays substitute it.

From the host, /proc/PID/cwd and /proc/PID/exe of a containerised process read as paths inside
the container (the kernel renders them against that process's root), which is what we report.

/proc is read at start (`snapshot`: the processes already running) and, later, only as a last
resort for a working directory or an fd's path; what a process runs comes from the kernel's
fork and exec events (agent/processes.py), never from /proc after the start.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)

DELETED = " (deleted)"


@dataclass(frozen=True)
class ProcessSnapshot:
    """One process as /proc showed it when the agent started.

    ``start_ticks``: /proc/PID/stat's starttime (clock ticks since boot); ``exe``: the
    /proc/PID/exe text (" (deleted)" kept: running a deleted binary is a signal); ``argv`` from
    /proc/PID/cmdline; ``cgroup_id``: the inode of its cgroup v2 directory (the id the probes
    report); ``script``: the script it runs when ``exe`` is that script's interpreter (the
    kernel rewrote argv to ``[interpreter, (its argument,) script, ...]``). None: unreadable."""

    tgid: int
    ppid: int
    start_ticks: int
    exe: str | None
    argv: tuple[str, ...]
    cwd: str | None
    cgroup_id: int | None
    script: str | None = None

    def to_dict(self) -> dict:
        return {"tgid": self.tgid, "ppid": self.ppid, "start_ticks": self.start_ticks,
                "exe": self.exe, "argv": list(self.argv), "cwd": self.cwd,
                "cgroup_id": self.cgroup_id, "script": self.script}

    @classmethod
    def from_dict(cls, data: dict) -> ProcessSnapshot:
        values = dict(data)
        values["argv"] = tuple(values.get("argv") or ())
        return cls(**values)


class ProcReader(Protocol):
    def cwd(self, tgid: int) -> str | None: ...

    def exe(self, tgid: int) -> str | None: ...

    def fd_path(self, tgid: int, fd: int) -> str | None: ...

    def start_ticks(self, tgid: int) -> int | None:
        """/proc/PID/stat's starttime: tells whether a pid still names the same process."""

    def snapshot(self) -> list[ProcessSnapshot]:
        """Every process running now, oldest first."""


def _stat_fields(raw: bytes) -> list[bytes]:
    """The fields of /proc/PID/stat after comm (which may hold spaces and parentheses):
    [state, ppid, pgrp, ...]; starttime is index 19."""
    return raw[raw.rfind(b")") + 2 :].split()


class LiveProcReader:
    """ProcReader over a real proc mount; every answer is None when the process is gone.

    ``cgroup_root``: the cgroup v2 mount the snapshot's cgroup ids are read under (None: found
    with probes.loader.find_cgroup2_root when the snapshot is taken)."""

    def __init__(self, proc_root: str = "/proc", cgroup_root: str | os.PathLike | None = None
                 ) -> None:
        self.proc_root = proc_root
        self.cgroup_root = cgroup_root

    def _readlink(self, tgid: int, name: str) -> str | None:
        try:
            return os.readlink(f"{self.proc_root}/{tgid}/{name}")
        except OSError:
            return None

    def cwd(self, tgid: int) -> str | None:
        target = self._readlink(tgid, "cwd")
        if target is not None and target.endswith(DELETED):
            target = target[: -len(DELETED)]
        return target

    def exe(self, tgid: int) -> str | None:
        # the kernel appends " (deleted)" to an unlinked binary: kept, it is itself a signal
        return self._readlink(tgid, "exe")

    def fd_path(self, tgid: int, fd: int) -> str | None:
        target = self._readlink(tgid, f"fd/{fd}")
        if target is None or not target.startswith("/"):
            return None  # socket:[...], pipe:[...], anon_inode:...
        return target

    def _stat(self, tgid: int) -> list[bytes] | None:
        try:
            with open(f"{self.proc_root}/{tgid}/stat", "rb") as fh:
                return _stat_fields(fh.read())
        except OSError:
            return None

    def start_ticks(self, tgid: int) -> int | None:
        fields = self._stat(tgid)
        try:
            return int(fields[19]) if fields else None
        except (IndexError, ValueError):
            return None

    # -- the start-up snapshot ---------------------------------------------------

    def snapshot(self) -> list[ProcessSnapshot]:
        cgroup_root = self._cgroup_root()
        out = []
        try:
            names = os.listdir(self.proc_root)
        except OSError as exc:
            log.warning("cannot list %s (%s): no start-up process snapshot", self.proc_root,
                        exc.strerror)
            return []
        for name in names:
            if name.isdigit():
                found = self.read_process(int(name), cgroup_root)
                if found is not None:
                    out.append(found)
        out.sort(key=lambda p: (p.start_ticks, p.tgid))
        return out

    def read_process(self, tgid: int, cgroup_root: Path | None) -> ProcessSnapshot | None:
        """One process, or None when it is gone (or is not a process: a thread id)."""
        fields = self._stat(tgid)
        try:
            ppid, start = int(fields[1]), int(fields[19])
        except (TypeError, IndexError, ValueError):
            return None  # vanished (or unreadable) mid-read
        argv = self._argv(tgid)
        cwd = self.cwd(tgid)
        exe = self.exe(tgid)
        return ProcessSnapshot(
            tgid=tgid, ppid=ppid, start_ticks=start, exe=exe, argv=argv, cwd=cwd,
            cgroup_id=self._cgroup_id(tgid, cgroup_root),
            script=self._script(tgid, argv, cwd) if exe is not None else None,
        )

    def _cgroup_root(self) -> Path | None:
        if self.cgroup_root is not None:
            return Path(self.cgroup_root)
        from driftwarden.core.errors import HostSupportError
        from driftwarden.probes.loader import find_cgroup2_root

        try:
            return find_cgroup2_root()
        except HostSupportError as exc:
            log.warning("start-up snapshot without cgroup ids: %s", exc)
            return None

    def _argv(self, tgid: int) -> tuple[str, ...]:
        try:
            with open(f"{self.proc_root}/{tgid}/cmdline", "rb") as fh:
                raw = fh.read()
        except OSError:
            return ()
        if raw.endswith(b"\0"):
            raw = raw[:-1]
        return tuple(a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")) if raw else ()

    def _cgroup_id(self, tgid: int, cgroup_root: Path | None) -> int | None:
        """The inode of the process's cgroup v2 directory: the `0::` line of /proc/PID/cgroup,
        under the v2 mount."""
        if cgroup_root is None:
            return None
        try:
            with open(f"{self.proc_root}/{tgid}/cgroup", "rb") as fh:
                lines = fh.read().decode("utf-8", "surrogateescape").splitlines()
        except OSError:
            return None
        for line in lines:
            if line.startswith("0::"):
                try:
                    return os.stat(cgroup_root / line[3:].lstrip("/")).st_ino
                except OSError:
                    return None
        return None

    def _script(self, tgid: int, argv: tuple[str, ...], cwd: str | None) -> str | None:
        """The script behind an interpreter process: argv[0] is the interpreter the script's
        `#!` line names (absolute, as the kernel put it there), then its optional argument,
        then the script as it was exec'd. Read through /proc/PID/root, regular files only."""
        if len(argv) < 2 or not argv[0].startswith("/"):
            return None
        for index in (1, 2):
            if index >= len(argv):
                break
            given = argv[index]
            path = given if given.startswith("/") else (
                posixpath.join(cwd, given) if cwd else None)
            if path is None:
                continue
            line = self._first_line(f"{self.proc_root}/{tgid}/root{path}")
            if line is None or not line.startswith(b"#!"):
                continue
            parts = line[2:].strip().split(None, 1)
            if not parts:
                continue
            words = [p.decode("utf-8", "surrogateescape") for p in parts]
            if list(argv[: len(words) + 1]) == [*words, given]:
                return posixpath.normpath(path)
        return None

    @staticmethod
    def _first_line(path: str) -> bytes | None:
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return None  # never open a fifo or a device
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return os.read(fd, 256).split(b"\n", 1)[0]
        except OSError:
            return None
        finally:
            os.close(fd)
