"""Reads per-process facts from /proc, behind an interface so tests and replays substitute it.

From the host, /proc/PID/cwd and /proc/PID/exe of a containerised process read as paths inside
the container (the kernel renders them against that process's root), which is what we report.
"""

from __future__ import annotations

import os
from typing import Protocol


class ProcReader(Protocol):
    def cwd(self, tgid: int) -> str | None: ...

    def exe(self, tgid: int) -> str | None: ...

    def ppid(self, tgid: int) -> int | None: ...

    def fd_path(self, tgid: int, fd: int) -> str | None: ...


class LiveProcReader:
    """ProcReader over a real proc mount; every answer is None when the process is gone."""

    def __init__(self, proc_root: str = "/proc") -> None:
        self.proc_root = proc_root

    def _readlink(self, tgid: int, name: str) -> str | None:
        try:
            target = os.readlink(f"{self.proc_root}/{tgid}/{name}")
        except OSError:
            return None
        # The kernel appends " (deleted)" to unlinked targets; keep the path, drop the marker
        # only for cwd (exe keeps it: an exec of a deleted file is itself a signal).
        return target

    def cwd(self, tgid: int) -> str | None:
        target = self._readlink(tgid, "cwd")
        if target is not None and target.endswith(" (deleted)"):
            target = target[: -len(" (deleted)")]
        return target

    def exe(self, tgid: int) -> str | None:
        return self._readlink(tgid, "exe")

    def fd_path(self, tgid: int, fd: int) -> str | None:
        target = self._readlink(tgid, f"fd/{fd}")
        if target is None or not target.startswith("/"):
            return None  # socket:[...], pipe:[...], anon_inode:...
        return target

    def ppid(self, tgid: int) -> int | None:
        try:
            with open(f"{self.proc_root}/{tgid}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            return None
        # comm may contain spaces and parentheses: fields start after the last ')'
        rest = stat[stat.rfind(b")") + 2 :].split()
        try:
            return int(rest[1])
        except (IndexError, ValueError):
            return None
