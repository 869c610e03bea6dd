"""Pausing a container through its cgroup, for runtimes that have no pause (the CRI has none).

:class:`CgroupFreezer` freezes every process of a cgroup and thaws them again:

- cgroup v2's ``cgroup.freeze`` in the container's v2 directory (Linux 5.2+; on a hybrid host
  too, where the v2 hierarchy holds no controllers: the freezer is part of the v2 core). This
  is the one used when it exists: a frozen process still dies of SIGKILL, so a paused
  container can be killed (StopContainer) without thawing it first;
- else the v1 freezer controller's ``freezer.state`` (a v1-only host, or a kernel before 5.2).

Both were checked on the development host (hybrid, Linux 6.18): each freezes the processes
(``/proc/PID/status`` State ``S`` under v2, ``D`` under v1) and thaws them. runc on a hybrid
host pauses through the v1 freezer (``docker pause``): either kind of freeze counts as paused,
and thawing undoes both. The container's cgroup path is the same under every hierarchy (the
kubelet's cgroupfs layout and the systemd driver's slices alike); see
:func:`cgroup_path_of_spec` and :func:`cgroup_paths_of_process`.

Freezing waits until the kernel says the cgroup is frozen (``cgroup.events`` ``frozen 1``,
``freezer.state`` FROZEN), at most `timeout` seconds; when it does not get there, the cgroup is
thawed again and the failure raised (a half-frozen container is worse than a running one).
Failures are RuntimeActionError, with the directory and what to do.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from driftwarden.core.errors import RuntimeActionError
from driftwarden.core.mountinfo import parse_mountinfo

log = logging.getLogger(__name__)

__all__ = [
    "CgroupFreezer",
    "CgroupPaths",
    "cgroup_path_of_spec",
    "cgroup_paths_of_process",
    "find_freezer_root",
]

FREEZE_TIMEOUT = 5.0  # seconds the kernel may take to stop every process of a cgroup


@dataclass(frozen=True, slots=True)
class CgroupPaths:
    """A process's cgroup paths (relative to each hierarchy's root, "/..."): its v2 one and its
    v1 freezer controller's; None where it has none."""

    v2: str | None = None
    freezer: str | None = None


def cgroup_paths_of_process(text: str) -> CgroupPaths:
    """``/proc/PID/cgroup`` text -> CgroupPaths ("0::/path" and "N:freezer:/path" lines; the
    freezer may share a line with other controllers, "N:cpu,freezer:/path"). A path outside
    the reader's cgroup namespace ("/../..") cannot be used from here and is left out."""
    v2 = freezer = None
    for line in text.splitlines():
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path.startswith("/") or path.startswith("/.."):
            continue
        if number == "0" and controllers == "":
            v2 = path
        elif "freezer" in controllers.split(","):
            freezer = path
    return CgroupPaths(v2, freezer)


_SLICE_RE = re.compile(r"[A-Za-z0-9_.\\:-]+\.slice")


def cgroup_path_of_spec(cgroups_path: str) -> str | None:
    """The cgroup path an OCI spec's ``linux.cgroupsPath`` makes (what ContainerStatus's
    verbose info holds), the same under every hierarchy:

    - cgroupfs driver: the path itself ("/kubepods/besteffort/pod<uid>/<id>");
    - systemd driver, "slice:prefix:name": the slice expanded the way systemd nests it
      ("kubepods-besteffort-pod<uid>.slice" -> "/kubepods.slice/kubepods-besteffort.slice/
      kubepods-besteffort-pod<uid>.slice") and the unit "<prefix>-<name>.scope".

    None for anything else (an empty or relative path)."""
    if cgroups_path.startswith("/"):
        return cgroups_path.rstrip("/") or None
    parts = cgroups_path.split(":")
    if len(parts) != 3 or not all(parts[1:]):
        return None
    slice_name, prefix, name = parts
    slice_name = slice_name or "system.slice"
    if not _SLICE_RE.fullmatch(slice_name) or "/" in prefix + name:
        return None
    nested = []
    stem = slice_name.removesuffix(".slice")
    if stem != "-":
        words = stem.split("-")
        nested = [f"{'-'.join(words[:i])}.slice" for i in range(1, len(words) + 1)]
    return "/" + "/".join([*nested, f"{prefix}-{name}.scope"])


def find_freezer_root(mountinfo: str) -> Path | None:
    """Where the v1 freezer controller is mounted, from a mountinfo text; None without one."""
    for mount in parse_mountinfo(mountinfo):
        if mount.fstype == "cgroup" and "freezer" in mount.options:
            return Path(mount.mount_point)
    return None


class CgroupFreezer:
    """Freeze/thaw a container's processes by cgroup path (see the module docstring).

    `cgroup2_root` is the v2 mount (/sys/fs/cgroup, or .../unified on a hybrid host);
    `freezer_root` the v1 freezer's mount, None when there is none."""

    def __init__(self, cgroup2_root: str | os.PathLike | None,
                 freezer_root: str | os.PathLike | None, *, timeout: float = FREEZE_TIMEOUT,
                 poll_interval: float = 0.01,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._v2_root = Path(cgroup2_root) if cgroup2_root is not None else None
        self._v1_root = Path(freezer_root) if freezer_root is not None else None
        self._timeout = timeout
        self._poll_interval = poll_interval
        self._clock = clock
        self._sleep = sleep

    def _v2_dir(self, paths: CgroupPaths) -> Path | None:
        if self._v2_root is None or paths.v2 is None or paths.v2 == "/":
            return None
        directory = self._v2_root / paths.v2.lstrip("/")
        return directory if (directory / "cgroup.freeze").exists() else None

    def _v1_dir(self, paths: CgroupPaths) -> Path | None:
        if self._v1_root is None or paths.freezer is None or paths.freezer == "/":
            return None
        directory = self._v1_root / paths.freezer.lstrip("/")
        return directory if (directory / "freezer.state").exists() else None

    def frozen(self, paths: CgroupPaths) -> bool:
        """True when either freezer holds the cgroup frozen (or freezing)."""
        v2 = self._v2_dir(paths)
        if v2 is not None and _read(v2 / "cgroup.freeze") == "1":
            return True
        v1 = self._v1_dir(paths)
        return v1 is not None and _read(v1 / "freezer.state") in ("FROZEN", "FREEZING")

    def freeze(self, paths: CgroupPaths) -> None:
        """Freeze and wait until the kernel says every process stopped."""
        v2 = self._v2_dir(paths)
        if v2 is not None:
            self._write(v2 / "cgroup.freeze", "1")
            self._wait(v2, lambda: "frozen 1" in _read(v2 / "cgroup.events").splitlines(),
                       paths)
            return
        v1 = self._v1_dir(paths)
        if v1 is not None:
            self._write(v1 / "freezer.state", "FROZEN")
            self._wait(v1, lambda: _read(v1 / "freezer.state") == "FROZEN", paths)
            return
        raise RuntimeActionError(self._no_freezer(paths))

    def thaw(self, paths: CgroupPaths) -> None:
        """Thaw under both freezers (whichever froze it: this one, or runc's v1 pause)."""
        v2, v1 = self._v2_dir(paths), self._v1_dir(paths)
        if v2 is None and v1 is None:
            raise RuntimeActionError(self._no_freezer(paths))
        if v2 is not None and _read(v2 / "cgroup.freeze") == "1":
            self._write(v2 / "cgroup.freeze", "0")
        if v1 is not None and _read(v1 / "freezer.state") != "THAWED":
            self._write(v1 / "freezer.state", "THAWED")

    def _wait(self, directory: Path, done: Callable[[], bool], paths: CgroupPaths) -> None:
        deadline = self._clock() + self._timeout
        while not done():
            if self._clock() >= deadline:
                try:
                    self.thaw(paths)
                except RuntimeActionError as exc:  # the error below says what matters
                    log.warning("thawing %s after a failed freeze: %s", directory, exc)
                raise RuntimeActionError(
                    f"{directory} did not freeze within {self._timeout:g} s (a process in it "
                    "may be in an uninterruptible wait); thawed it again")
            self._sleep(self._poll_interval)

    @staticmethod
    def _write(path: Path, value: str) -> None:
        try:
            path.write_text(value)
        except OSError as exc:
            raise RuntimeActionError(f"cannot write {value!r} to {path}: "
                                     f"{exc.strerror or exc} (the agent needs root and "
                                     "/sys/fs/cgroup mounted read-write)") from exc

    def _no_freezer(self, paths: CgroupPaths) -> str:
        tried = []
        if paths.v2 is not None:
            tried.append(f"{self._v2_root or '(no cgroup v2 mount)'}{paths.v2}/cgroup.freeze")
        if paths.freezer is not None:
            tried.append(f"{self._v1_root or '(no v1 freezer mount)'}{paths.freezer}/"
                         "freezer.state")
        where = "; tried " + ", ".join(tried) if tried else " (its cgroup path is not known)"
        return (f"no cgroup freezer for this container{where}: the cgroup v2 freezer needs "
                "Linux 5.2+, the v1 one the freezer controller mounted (or the container is "
                "not running)")


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
