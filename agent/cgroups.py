"""cgroup v2 ids and paths: the directory of a cgroup id, the container a path names.

Every kernel event carries the cgroup v2 id of the task, which is the inode number (kernfs node
id) of its cgroup directory:

1. `CgroupIndex` maps cgroup ids to paths: one open_by_handle_at for a new id, else a walk of
   the v2 hierarchy (cached, rescanned on a miss, rate limited). `CgroupWatcher` tells it of
   every directory as it is made (inotify), so a container that lives a few milliseconds is
   named even when its events are looked at after runc removed its cgroup.
2. `parse_cgroup_path` recognises the container id in a path (Docker, containerd/CRI, CRI-O and
   podman layouts, cgroupfs and systemd drivers). Pure.
3. `running_containers` walks the hierarchy once and lists the containers it holds (doctor).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import select
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from driftwarden.core.lifecycle import Service, join_or_warn, start_daemon_thread

log = logging.getLogger(__name__)

__all__ = [
    "RUNTIMES",
    "CgroupIndex",
    "CgroupWatcher",
    "ContainerRef",
    "child_dirs",
    "parse_cgroup_path",
    "running_containers",
    "walk_cgroups",
]

RUNTIMES = frozenset({"docker", "containerd", "cri-o", "podman"})


# --------------------------------------------------------------------------- cgroup path parsing


@dataclass(frozen=True, slots=True)
class ContainerRef:
    """What a cgroup path alone says about a container."""

    runtime: str  # one of RUNTIMES
    container_id: str  # 64 lowercase hex digits
    pod_uid: str | None = None  # Kubernetes pod UID (dashed form) when the path shows one

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown container runtime {self.runtime!r}")
        if not _BARE_ID_RE.fullmatch(self.container_id):
            raise ValueError(f"container id must be 64 lowercase hex digits: {self.container_id!r}")


_CONTAINER_ID = r"(?P<id>[0-9a-f]{64})"
# systemd driver names (and podman/CRI-O with cgroupfs, which drop ".scope"). The id must follow
# the prefix directly, so "libpod-conmon-<id>.scope" and "crio-conmon-<id>.scope" (the monitor
# processes, not containers) never match.
_RUNTIME_UNIT_RE = re.compile(
    rf"(?P<prefix>docker|cri-containerd|crio|libpod)-{_CONTAINER_ID}(?:\.scope)?"
)
_UNIT_PREFIX_RUNTIME = {
    "docker": "docker",
    "cri-containerd": "containerd",
    "crio": "cri-o",
    "libpod": "podman",
}
_BARE_ID_RE = re.compile(_CONTAINER_ID)
# "pod<uid>" (cgroupfs) or "kubepods[-<qos>]-pod<uid_with_underscores>.slice" (systemd). Static
# pods have a 32-hex UID without dashes, hence the optional separators.
_POD_RE = re.compile(
    r"(?:kubepods(?:-besteffort|-burstable)?-)?"
    r"pod(?P<uid>[0-9a-f]{8}(?:[-_]?[0-9a-f]{4}){3}[-_]?[0-9a-f]{12})(?:\.slice)?"
)


def parse_cgroup_path(path: str) -> ContainerRef | None:
    """The innermost container named by a cgroup v2 path, or None for non-container cgroups.

    Innermost wins so docker-in-docker attributes to the inner container; components below the
    container (e.g. a systemd inside it, podman's ".../container") still belong to it.
    """
    parts = [part for part in path.strip().split("/") if part]
    for index in range(len(parts) - 1, -1, -1):
        part = parts[index]
        parent = parts[index - 1] if index > 0 else ""
        pod = _POD_RE.fullmatch(parent)
        # Only a pod directly above the container counts: docker-in-docker inside a pod is not
        # a Kubernetes container.
        pod_uid = pod["uid"].replace("_", "-") if pod else None
        unit = _RUNTIME_UNIT_RE.fullmatch(part)
        if unit:
            return ContainerRef(_UNIT_PREFIX_RUNTIME[unit["prefix"]], unit["id"], pod_uid)
        if _BARE_ID_RE.fullmatch(part):
            if parent == "docker":
                return ContainerRef("docker", part, None)
            if pod_uid is not None:
                # kubelet's cgroupfs layout does not say which CRI runtime made it.
                return ContainerRef("containerd", part, pod_uid)
            # A bare id under any other parent (custom --cgroup-parent, containerd namespaces)
            # is ambiguous; keep looking outwards rather than guess a runtime.
    return None


# --------------------------------------------------------------------------- walking the tree


def child_dirs(directory: str | os.PathLike) -> list[tuple[str, int]]:
    """``(name, inode)`` of a directory's subdirectories; those that vanish while it is read
    (containers come and go) are left out. Raises OSError when `directory` cannot be read."""
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    found.append((entry.name, entry.stat(follow_symlinks=False).st_ino))
            except OSError:
                continue  # removed between readdir and stat
    return found


def walk_cgroups(root: str | Path) -> list[tuple[int, str]]:
    """``(inode, path relative to root)`` of every cgroup directory, the root itself as "/".

    Raises OSError when the root cannot be read; directories that vanish during the walk
    (containers come and go) are left out.
    """
    found = [(os.stat(root).st_ino, "/")]
    pending = [(os.fspath(root), "")]
    while pending:
        directory, relative = pending.pop()
        try:
            children = child_dirs(directory)
        except OSError:
            # Containers come and go during a walk; a vanished directory is normal.
            continue
        for name, inode in children:
            child = f"{relative}/{name}"
            found.append((inode, child))
            pending.append((os.path.join(directory, name), child))
    return found


def running_containers(root: str | Path) -> frozenset[ContainerRef]:
    """The containers that have a cgroup under `root` now (running or paused ones: a stopped
    container's directory is removed). Raises OSError when the root cannot be read."""
    refs = (parse_cgroup_path(path) for _, path in walk_cgroups(root))
    return frozenset(ref for ref in refs if ref is not None)


# --------------------------------------------------------------------------- cgroup id index


_FILEID_KERNFS = 0xFE


class _KernfsHandle(ctypes.Structure):
    """struct file_handle carrying a kernfs node id (what name_to_handle_at gives for cgroup2)."""

    _fields_ = (
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * 8),
    )


def _load_libc():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.open_by_handle_at.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


class CgroupIndex:
    """cgroup v2 id (directory inode) -> path relative to `root` ("/" for the root itself).

    A miss triggers a full walk of the hierarchy, at most once per `min_rescan_interval`
    seconds, so a storm of events from unknown cgroups cannot turn into a storm of walks.
    Entries of removed cgroups are kept (until evicted) because late events from a container
    that just exited still deserve attribution, and cgroup ids are not reused on 64-bit kernels.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        clock: Callable[[], float] = time.monotonic,
        min_rescan_interval: float = 0.5,
        max_entries: int = 65536,
        use_file_handles: bool = True,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._root = Path(root)
        self._clock = clock
        self._min_rescan_interval = min_rescan_interval
        self._max_entries = max_entries
        self._paths: OrderedDict[int, str] = OrderedDict()
        self._last_rescan: float | None = None
        self._lock = threading.Lock()
        self._libc = _load_libc() if use_file_handles else None
        self._stats = {
            "lookups": 0,
            "hits": 0,
            "misses": 0,
            "handle_hits": 0,
            "rescans": 0,
            "rescans_skipped": 0,
            "scan_errors": 0,
            "evicted": 0,
        }

    @property
    def root(self) -> Path:
        return self._root

    @property
    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._stats, "entries": len(self._paths)}

    def path_of(self, cgroup_id: int) -> str | None:
        """The cgroup's path, rescanning on a miss unless a rescan happened very recently."""
        with self._lock:
            self._stats["lookups"] += 1
            path = self._paths.get(cgroup_id)
            if path is not None:
                self._stats["hits"] += 1
                self._paths.move_to_end(cgroup_id)
                return path
            self._stats["misses"] += 1
            path = self._path_by_handle(cgroup_id)
            if path is not None:
                self._stats["handle_hits"] += 1
                self._remember_locked(cgroup_id, path)
                return path
            now = self._clock()
            if (
                self._last_rescan is not None
                and now - self._last_rescan < self._min_rescan_interval
            ):
                self._stats["rescans_skipped"] += 1
                return None
            self._rescan_locked(now)
            return self._paths.get(cgroup_id)

    def remember(self, cgroup_id: int, path: str) -> None:
        """Record a cgroup seen elsewhere (CgroupWatcher: a directory just made)."""
        with self._lock:
            self._remember_locked(cgroup_id, path)

    def _remember_locked(self, cgroup_id: int, path: str) -> None:
        self._paths[cgroup_id] = path
        self._paths.move_to_end(cgroup_id)
        while len(self._paths) > self._max_entries:
            self._paths.popitem(last=False)
            self._stats["evicted"] += 1

    def _path_by_handle(self, cgroup_id: int) -> str | None:
        """Exact and O(1): a cgroup v2 id is its kernfs node id, which open_by_handle_at takes
        as a file handle (type FILEID_KERNFS). A new container's directory is found in one
        syscall, before a short-lived container can remove it; no walk, no rate limit."""
        if self._libc is None:
            return None
        handle = _KernfsHandle(8, _FILEID_KERNFS,
                               (ctypes.c_ubyte * 8)(*cgroup_id.to_bytes(8, "little")))
        try:
            mount_fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return None
        try:
            fd = self._libc.open_by_handle_at(mount_fd, ctypes.byref(handle),
                                              os.O_RDONLY | os.O_DIRECTORY)
            if fd < 0:
                return None  # ESTALE: no such cgroup (any more); EPERM: no CAP_DAC_READ_SEARCH
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            finally:
                os.close(fd)
        finally:
            os.close(mount_fd)
        root = os.fspath(self._root).rstrip("/")
        if target == root:
            return "/"
        if not target.startswith(root + "/"):
            return None
        return target[len(root):]

    def rescan(self) -> int:
        """Walk the hierarchy now (ignores the rate limit); returns the number of entries."""
        with self._lock:
            self._rescan_locked(self._clock())
            return len(self._paths)

    def _rescan_locked(self, now: float) -> None:
        self._last_rescan = now
        self._stats["rescans"] += 1
        try:
            found = walk_cgroups(self._root)
        except OSError as exc:
            self._stats["scan_errors"] += 1
            log.warning("cgroup root %s unreadable: %s", self._root, exc)
            found = []
        for inode, relative_path in found:
            self._paths[inode] = relative_path
            self._paths.move_to_end(inode)
        while len(self._paths) > self._max_entries:
            self._paths.popitem(last=False)
            self._stats["evicted"] += 1


# --------------------------------------------------------------------------- new cgroups, as made


_IN_CREATE, _IN_ISDIR, _IN_Q_OVERFLOW, _IN_IGNORED = 0x100, 0x40000000, 0x4000, 0x8000
_IN_ONLYDIR = 0x01000000
_EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len


class CgroupWatcher(Service):
    """Tells a CgroupIndex of every cgroup directory as it is made: inotify (IN_CREATE) on each
    directory of the v2 hierarchy, a thread that stats each new one and watches it in turn.

    runc makes a container's cgroup some 50-100 ms before its first exec and removes it a few
    ms after its last process exits; the pipeline may look at the container's events later
    than that (it lags when the host is loaded), and a removed cgroup has no path to find. At
    most `max_watches` directories are watched (a warning says when the limit, or the kernel's
    fs.inotify.max_user_watches, is reached); an overflowed inotify queue triggers a rescan.
    Without inotify the index works as before (lookups, rescans)."""

    STOP_TIMEOUT = 2.0

    def __init__(self, index: CgroupIndex, *, max_watches: int = 65536) -> None:
        super().__init__()
        self._index = index
        self._root = os.fspath(index.root).rstrip("/") or "/"
        self._max_watches = max_watches
        self._fd = -1
        self._wake_r = self._wake_w = -1
        self._paths: dict[int, str] = {}  # watch descriptor -> path relative to the root
        self._warned = False
        self._thread: threading.Thread | None = None
        self.stats = {"created": 0, "watches": 0, "overflows": 0, "watch_errors": 0}

    def _start(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._libc = libc
        self._fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            log.warning("cannot watch for new cgroups (inotify: %s); short-lived containers may "
                        "be left unattributed", os.strerror(err))
            return
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._watch_tree("/")
        self._thread = start_daemon_thread(self._run, "driftwarden-cgroup-watch")

    def _stop(self, timeout: float | None) -> None:
        if self._wake_w >= 0:
            os.write(self._wake_w, b"x")
        thread, self._thread = self._thread, None
        join_or_warn(thread, timeout, "cgroup watcher")
        for fd in (self._fd, self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._fd = self._wake_r = self._wake_w = -1

    def _host_path(self, relative: str) -> str:
        return self._root if relative == "/" else f"{self._root}{relative}"

    def _watch(self, relative: str) -> bool:
        if len(self._paths) >= self._max_watches:
            self._warn_limit(f"{self._max_watches} directories are watched already")
            return False
        wd = self._libc.inotify_add_watch(self._fd, os.fsencode(self._host_path(relative)),
                                          _IN_CREATE | _IN_ONLYDIR)
        if wd < 0:
            err = ctypes.get_errno()
            if err == errno.ENOSPC:
                self._warn_limit("the kernel's fs.inotify.max_user_watches is reached")
            elif err not in (errno.ENOENT, errno.ENOTDIR):  # removed meanwhile: nothing to do
                self.stats["watch_errors"] += 1
                log.debug("cannot watch %s: %s", relative, os.strerror(err))
            return False
        self._paths[wd] = relative
        self.stats["watches"] = len(self._paths)
        return True

    def _warn_limit(self, why: str) -> None:
        if not self._warned:
            log.warning("new cgroups below some directories are not watched (%s): their "
                        "short-lived containers may be left unattributed", why)
            self._warned = True

    def _watch_tree(self, relative: str) -> None:
        """Watch a directory, then record and watch what it holds already (made before the
        watch was in place)."""
        if not self._watch(relative):
            return
        try:
            children = child_dirs(self._host_path(relative))
        except OSError:
            return
        for name, inode in children:
            child = f"{relative.rstrip('/')}/{name}"
            self._index.remember(inode, child)
            self._watch_tree(child)

    def _run(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self._fd, self._wake_r], [], [])
            except OSError:
                return
            if self._wake_r in ready:
                return
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                log.warning("cgroup watcher stops: %s", exc)
                return
            self._handle(data)

    def _handle(self, data: bytes) -> None:
        offset = 0
        while offset + _EVENT_HEADER.size <= len(data):
            wd, mask, _, length = _EVENT_HEADER.unpack_from(data, offset)
            name = data[offset + _EVENT_HEADER.size:offset + _EVENT_HEADER.size + length]
            offset += _EVENT_HEADER.size + length
            if mask & _IN_Q_OVERFLOW:
                self.stats["overflows"] += 1
                self._index.rescan()
                continue
            if mask & _IN_IGNORED:  # its directory was removed
                self._paths.pop(wd, None)
                self.stats["watches"] = len(self._paths)
                continue
            parent = self._paths.get(wd)
            if parent is None or not (mask & _IN_CREATE and mask & _IN_ISDIR):
                continue
            child = f"{parent.rstrip('/')}/{os.fsdecode(name.rstrip(bytes(1)))}"
            try:
                inode = os.stat(self._host_path(child), follow_symlinks=False).st_ino
            except OSError:
                continue  # gone already
            self.stats["created"] += 1
            self._index.remember(inode, child)
            self._watch_tree(child)
