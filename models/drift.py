"""Drift: a container running or writing what its image never shipped.

Decided from the container's own overlay layers, no learning needed:
- an exec whose file is in the upper (writable) layer: added, or modified, after the container
  started (copied in, downloaded, unpacked);
- an exec of a deleted file or of a memfd (fileless execution);
- writes, renames, links into the image's binary and library directories;
- chmod +x or setuid/setgid on a file the image did not ship (absent from every lower layer).

Layers come from /proc/PID/mountinfo (the overlay mounted at "/") or from Docker's GraphDriver
data; both give host paths of the lower layers and the upper directory. Every check is a stat
of a host path, so callers pass the layer directories in and tests use fixture trees.

A container removed with its upper layer (`docker run --rm` deletes it some 20-40 ms after the
exit, which a loaded agent may be slower than) leaves no upper to look in: then an exec of a
file the caller saw the container write at run time (`written`) and the image lacks is taken as
added (or, when the image has it, modified).
"""

from __future__ import annotations

import enum
import os
import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from driftwarden.core.mountinfo import parse_mountinfo

# Where an image's programs and libraries live. A write below one of these changes what the
# container will run.
BINARY_DIRS = (
    "/bin", "/sbin", "/usr/bin", "/usr/sbin", "/usr/local/bin", "/usr/local/sbin",
    "/lib", "/lib32", "/lib64", "/libx32", "/usr/lib", "/usr/lib32", "/usr/lib64",
    "/usr/libexec", "/usr/local/lib",
)
# Write operation classes (driftwarden.models.items.WriteItem.op) that put content or a new
# name into a directory.
_CONTENT_OPS = frozenset({"create", "truncate", "append", "write", "rename-to", "link",
                          "symlink", "mknod", "chmod+x", "setuid"})


class DriftKind(enum.StrEnum):
    EXEC_ADDED = "exec-added-binary"  # upper layer only: not in the image
    EXEC_MODIFIED = "exec-modified-binary"  # in the image, but changed since start
    EXEC_DELETED = "exec-deleted-binary"
    EXEC_MEMFD = "exec-memfd"
    WRITE_BINARY_DIR = "write-binary-dir"
    CHMOD_X_NEW_FILE = "chmod-x-new-file"
    SETUID_NEW_FILE = "setuid-new-file"


@dataclass(frozen=True)
class DriftVerdict:
    kind: DriftKind
    path: str
    reason: str  # one sentence a person can act on


@dataclass(frozen=True)
class Layers:
    """Host paths of a container's overlay: the writable upper dir and the image's lowers."""

    upper: Path
    lowers: tuple[Path, ...]

    def _host(self, base: Path, path: str) -> Path:
        return base / normalize_container_path(path).lstrip("/")

    def in_upper(self, path: str) -> bool:
        return os.path.lexists(self._host(self.upper, path))

    def in_image(self, path: str) -> bool:
        return any(os.path.lexists(self._host(lower, path)) for lower in self.lowers)

    def _top(self, path: str) -> Path | None:
        """The host path of `path` in the topmost layer that has it (upper first)."""
        for base in (self.upper, *self.lowers):
            host = self._host(base, path)
            if os.path.lexists(host):
                return host
        return None

    def realpath(self, path: str, *, max_links: int = 16) -> str:
        """`path` with symlinks followed as the container sees them (`/bin/sh` ->
        `/bin/busybox`, `/bin` -> `/usr/bin` on merged-usr images), read from the layers, so
        it works after the process, or the container, is gone. Unknown parts stay as given."""
        parts = [p for p in normalize_container_path(path).split("/") if p]
        resolved: list[str] = []
        links = 0
        while parts:
            resolved.append(parts.pop(0))
            current = "/" + "/".join(resolved)
            host = self._top(current)
            if host is None or not host.is_symlink():
                continue
            links += 1
            if links > max_links:
                break  # a loop: keep what we have
            target = os.readlink(host)
            base = "/" if target.startswith("/") else "/" + "/".join(resolved[:-1])
            merged = normalize_container_path(posixpath.join(base, target))
            parts = [p for p in merged.split("/") if p] + parts
            resolved = []
        return normalize_container_path("/" + "/".join(resolved))


    def interpreter(self, path: str) -> str | None:
        """For a script (``#!`` first line) the interpreter it names, symlinks followed; None
        for anything else. A process that exec'd a script runs the interpreter, so a later
        ``execve("/proc/self/exe")`` from it starts the interpreter, not the script."""
        host = self._top(normalize_container_path(path))
        if host is None:
            return None
        try:
            with open(host, "rb") as fh:
                head = fh.read(256)
        except OSError:
            return None
        if not head.startswith(b"#!"):
            return None
        words = head[2:].split(b"\n", 1)[0].split()
        if not words:
            return None
        return self.realpath(words[0].decode("utf-8", "surrogateescape"))


def normalize_container_path(path: str) -> str:
    """Lexically normalised and confined to the container root ('..' cannot climb out)."""
    if path[:1] == "/" and "//" not in path and "/." not in path and (
            len(path) == 1 or path[-1] != "/"):
        return path  # already normal (the common case): normpath would return it unchanged
    out = posixpath.normpath("/" + path.lstrip("/"))
    return "/" if out in ("/", "//") else out


def layers_from_mountinfo(text: str) -> Layers | None:
    """The overlay mounted at "/" in a /proc/PID/mountinfo text, or None (not overlay)."""
    for mount in parse_mountinfo(text):
        if mount.mount_point == "/":
            if mount.fstype != "overlay" or not mount.options:
                return None
            return _layers(mount.options.get("upperdir"), mount.options.get("lowerdir"))
    return None


def layers_from_graphdriver(graph_driver: Mapping) -> Layers | None:
    """From `docker inspect`'s GraphDriver {"Name": "overlay2", "Data": {...}}."""
    if graph_driver.get("Name") not in ("overlay2", "overlay", "fuse-overlayfs"):
        return None
    data = graph_driver.get("Data") or {}
    return _layers(data.get("UpperDir"), data.get("LowerDir"))


def _layers(upper: str | None, lower: str | None) -> Layers | None:
    if not upper:
        return None
    lowers = tuple(Path(p) for p in (lower or "").split(":") if p)
    return Layers(upper=Path(upper), lowers=lowers)


def classify_exec(path: str, exe: str | None, layers: Layers | None, *,
                  written: Callable[[str], bool] | None = None) -> DriftVerdict | None:
    """`path` is the exec'd file inside the container, `exe` the binary the kernel ran
    (/proc/PID/exe text, which says " (deleted)" or "/memfd:name" when it applies).
    `written(path)`: the container was seen writing that file at run time, asked only when its
    upper layer is gone (see the module docstring)."""
    if exe is not None:
        if exe.startswith("/memfd:"):
            return DriftVerdict(DriftKind.EXEC_MEMFD, exe,
                                f"ran {exe}, a memory-only file: nothing the image shipped")
        if exe.endswith(" (deleted)"):
            gone = exe[: -len(" (deleted)")]
            return DriftVerdict(DriftKind.EXEC_DELETED, gone,
                                f"ran {gone}, which was deleted after it started")
    if layers is None:
        return None
    binary = normalize_container_path(exe or path) if (exe or path).startswith("/") else None
    if binary is None:
        return None
    if not layers.in_upper(binary) and not (
            written is not None and not os.path.isdir(layers.upper) and written(binary)):
        return None
    if layers.in_image(binary):
        return DriftVerdict(DriftKind.EXEC_MODIFIED, binary,
                            f"ran {binary}, which was modified after the container started")
    return DriftVerdict(DriftKind.EXEC_ADDED, binary,
                        f"ran {binary}, which the image does not contain (added at run time)")


def in_binary_dir(path: str) -> str | None:
    """The binary/library directory `path` is under, if any."""
    path = normalize_container_path(path)
    if not path.startswith(BINARY_DIRS):  # a prefix of each answer: most paths are in none
        return None
    for directory in BINARY_DIRS:
        if path == directory or path.startswith(directory + "/"):
            return directory
    return None


def classify_write(path: str, op: str, layers: Layers | None) -> DriftVerdict | None:
    """`op` is a WriteItem op class (create, truncate, append, rename-to, chmod+x, setuid, ...)."""
    if not path.startswith("/"):
        return None  # unresolved relative path: the caller reports it as such
    path = normalize_container_path(path)
    directory = in_binary_dir(path) if path.startswith(BINARY_DIRS) else None
    if directory is not None and op in _CONTENT_OPS:
        return DriftVerdict(DriftKind.WRITE_BINARY_DIR, path,
                            f"{op} of {path}, inside {directory} where the image's programs live")
    if op in ("chmod+x", "setuid") and layers is not None and not layers.in_image(path):
        kind = DriftKind.SETUID_NEW_FILE if op == "setuid" else DriftKind.CHMOD_X_NEW_FILE
        what = "setuid/setgid" if op == "setuid" else "executable"
        return DriftVerdict(kind, path,
                            f"made {path} {what}; the image did not ship that file")
    return None


__all__ = [
    "BINARY_DIRS",
    "DriftKind",
    "DriftVerdict",
    "Layers",
    "classify_exec",
    "classify_write",
    "in_binary_dir",
    "layers_from_graphdriver",
    "layers_from_mountinfo",
    "normalize_container_path",
]
