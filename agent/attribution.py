"""Attribution: kernel cgroup id -> cgroup path -> container -> runtime metadata.

Every kernel event carries the cgroup v2 id of the task, which is the inode number of its cgroup
directory. Attribution turns that number into "which container, which image, which pod":

1. `CgroupIndex` maps cgroup ids to paths by walking the v2 hierarchy (cached, rescanned on a
   miss, rate limited).
2. `parse_cgroup_path` recognises the container id in a path (Docker, containerd/CRI, CRI-O and
   podman layouts, cgroupfs and systemd drivers). Pure.
3. A `MetadataProvider` (here `DockerMetadata`, over the Docker Engine API) names the container,
   its image and its Kubernetes pod.
4. `Attributor` ties them together for the event pipeline. `Attributor.lookup` never waits for the
   container runtime: metadata is fetched by a background worker, cached with a TTL and kept
   current by runtime events. While it is missing, lookups say PENDING; when the runtime cannot
   be reached they still say CONTAINER (cgroup-only attribution) with `metadata_error` set, so
   tracing goes on without Docker.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import os
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from driftwarden.core.errors import MetadataUnavailableError

log = logging.getLogger(__name__)

__all__ = [
    "NOT_FOUND_ERROR",
    "NO_PROVIDER_ERROR",
    "RUNTIMES",
    "Attribution",
    "AttributionState",
    "Attributor",
    "CgroupIndex",
    "ContainerEvent",
    "ContainerEventAction",
    "ContainerInfo",
    "ContainerRef",
    "DockerEventWatcher",
    "DockerMetadata",
    "EventWatcher",
    "MetadataProvider",
    "MetadataUnavailableError",
    "WatchableMetadataProvider",
    "container_info_from_docker",
    "normalize_image_reference",
    "parse_cgroup_path",
    "parse_docker_event",
]

RUNTIMES = frozenset({"docker", "containerd", "cri-o", "podman"})
POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"


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
        for inode, relative_path in self._walk():
            self._paths[inode] = relative_path
            self._paths.move_to_end(inode)
        while len(self._paths) > self._max_entries:
            self._paths.popitem(last=False)
            self._stats["evicted"] += 1

    def _walk(self) -> list[tuple[int, str]]:
        try:
            root_inode = os.stat(self._root).st_ino
        except OSError as exc:
            self._stats["scan_errors"] += 1
            log.warning("cgroup root %s unreadable: %s", self._root, exc)
            return []
        found = [(root_inode, "/")]
        pending = [(os.fspath(self._root), "")]
        while pending:
            directory, relative = pending.pop()
            try:
                with os.scandir(directory) as entries:
                    for entry in entries:
                        try:
                            if not entry.is_dir(follow_symlinks=False):
                                continue
                            inode = entry.stat(follow_symlinks=False).st_ino
                        except OSError:
                            continue  # removed between readdir and stat
                        child = f"{relative}/{entry.name}"
                        found.append((inode, child))
                        pending.append((entry.path, child))
            except OSError:
                # Containers come and go during a walk; a vanished directory is normal.
                continue
        return found


# --------------------------------------------------------------------------- container metadata


def _frozen_labels(
    labels: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> tuple[tuple[str, str], ...]:
    if labels is None:
        return ()
    pairs = labels.items() if isinstance(labels, Mapping) else labels
    return tuple(sorted((str(key), str(value)) for key, value in pairs))


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """What the container runtime says about a container. Hashable; labels are sorted pairs."""

    id: str
    name: str
    image_id: str
    image_name: str
    labels: tuple[tuple[str, str], ...] = ()
    pod: str | None = None
    namespace: str | None = None
    runtime: str = "docker"
    # when its current run started (epoch seconds; the runtime's clock): the detector's
    # startup grace (see detect.DetectorConfig.startup_seconds); None when not known
    started_at: float | None = None

    def __post_init__(self) -> None:
        # Accept a mapping for convenience but store an immutable, order-independent form.
        object.__setattr__(self, "labels", _frozen_labels(self.labels))
        # Docker reports names as "/name"; the slash is an API artefact, not part of the name.
        object.__setattr__(self, "name", self.name.lstrip("/"))

    def label(self, key: str, default: str | None = None) -> str | None:
        for label_key, value in self.labels:
            if label_key == key:
                return value
        return default

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "image_id": self.image_id,
            "image_name": self.image_name,
            "labels": dict(self.labels),
            "pod": self.pod,
            "namespace": self.namespace,
            "runtime": self.runtime,
            "started_at": self.started_at,
        }


def parse_runtime_time(text: Any) -> float | None:
    """Docker's RFC 3339 time (``2026-11-23T10:00:00.123456789Z``) -> epoch seconds (to the
    microsecond); None for its zero time (never started), a missing or an unreadable value."""
    if not isinstance(text, str) or not text or text.startswith("0001-01-01"):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


_IMAGE_ID_REFERENCE_RE = re.compile(r"(?:sha256:)?(?P<hex>[0-9a-f]{12,64})")


def normalize_image_reference(reference: str) -> str:
    """Add the implicit ":latest" the way Docker resolves an untagged name; keep digests as is."""
    if not reference or "@" in reference:
        return reference
    last_component = reference.rsplit("/", 1)[-1]  # "registry:5000/app" has a port, not a tag
    return reference if ":" in last_component else f"{reference}:latest"


def _is_image_id_reference(reference: str, image_id: str) -> bool:
    match = _IMAGE_ID_REFERENCE_RE.fullmatch(reference)
    return bool(match) and image_id.removeprefix("sha256:").startswith(match["hex"])


def container_info_from_docker(
    attrs: Mapping[str, Any], *, image_tags: Sequence[str] = ()
) -> ContainerInfo:
    """Build ContainerInfo from a Docker `GET /containers/{id}/json` answer. Pure.

    `image_tags` (the image's RepoTags) is used only when the container was created from an
    image id, which carries no human name.
    """
    config = attrs.get("Config") or {}
    labels = config.get("Labels") or {}
    image_id = attrs.get("Image") or ""
    requested = config.get("Image") or ""
    if not requested or _is_image_id_reference(requested, image_id):
        image_name = image_tags[0] if image_tags else requested or image_id
    else:
        image_name = normalize_image_reference(requested)
    return ContainerInfo(
        id=attrs.get("Id") or "",
        name=attrs.get("Name") or "",
        image_id=image_id,
        image_name=image_name,
        labels=labels,
        pod=labels.get(POD_NAME_LABEL),
        namespace=labels.get(POD_NAMESPACE_LABEL),
        runtime="docker",
        started_at=parse_runtime_time((attrs.get("State") or {}).get("StartedAt")),
    )


class ContainerEventAction(enum.StrEnum):
    START = "start"
    DIE = "die"
    DESTROY = "destroy"
    RENAME = "rename"
    # The event stream (re)connected: anything that happened before may have been missed.
    RESYNC = "resync"


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    action: ContainerEventAction
    container_id: str | None  # None only for RESYNC
    name: str | None = None  # the (new) name, when the runtime says it
    time: float | None = None  # runtime's wall-clock timestamp, seconds


def parse_docker_event(raw: Mapping[str, Any]) -> ContainerEvent | None:
    """A Docker `/events` message -> ContainerEvent, or None when it is not one we follow."""
    if raw.get("Type", "container") != "container":
        return None
    try:
        action = ContainerEventAction(raw.get("Action") or raw.get("status") or "")
    except ValueError:
        return None
    if action is ContainerEventAction.RESYNC:
        return None  # ours, never Docker's
    actor = raw.get("Actor") or {}
    container_id = actor.get("ID") or raw.get("id")
    if not container_id:
        return None
    name = (actor.get("Attributes") or {}).get("name")
    time_nano = raw.get("timeNano")
    timestamp = time_nano / 1e9 if time_nano else raw.get("time")
    return ContainerEvent(
        action=action,
        container_id=container_id,
        name=name.lstrip("/") if name else None,
        time=float(timestamp) if timestamp is not None else None,
    )


@runtime_checkable
class MetadataProvider(Protocol):
    def inspect(self, container_id: str) -> ContainerInfo | None:
        """The container's metadata, or None when the runtime says it does not exist.

        Raises MetadataUnavailableError when the runtime cannot be asked.
        """
        ...


class EventWatcher(Protocol):
    @property
    def connected(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@runtime_checkable
class WatchableMetadataProvider(MetadataProvider, Protocol):
    def watch(self, on_event: Callable[[ContainerEvent], None]) -> EventWatcher:
        """A not-yet-started watcher calling `on_event` from its own thread."""
        ...


def _short_reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _docker_transport_errors() -> tuple[type[BaseException], ...]:
    import docker.errors
    import requests.exceptions

    return (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


def _new_docker_client(base_url: str, timeout: float) -> Any:
    """A DockerClient, or MetadataUnavailableError (API version negotiation connects)."""
    import docker

    try:
        return docker.DockerClient(base_url=base_url, timeout=timeout, version="auto")
    except _docker_transport_errors() as exc:
        raise MetadataUnavailableError(
            f"docker unreachable at {base_url}: {_short_reason(exc)}"
        ) from exc


class DockerMetadata:
    """MetadataProvider over the Docker Engine API, with an event watcher.

    The client is created on first use and again after a failure, so an agent started before
    dockerd (or outliving a dockerd restart) recovers by itself. `inspect` calls are serialised
    (requests sessions are not thread-safe); the event watcher has its own client.
    """

    runtime = "docker"

    def __init__(
        self, base_url: str = "unix:///var/run/docker.sock", *, timeout: float = 5.0
    ) -> None:
        self._base_url = base_url
        self._timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()  # guards _client
        self._request_lock = threading.Lock()  # one API conversation at a time

    @property
    def base_url(self) -> str:
        return self._base_url

    def inspect(self, container_id: str) -> ContainerInfo | None:
        """By id or name. Raises MetadataUnavailableError when Docker cannot answer."""
        with self._request_lock:
            return self._inspect(container_id)

    def _inspect(self, container_id: str) -> ContainerInfo | None:
        import docker.errors

        client = self._client_or_raise()
        try:
            attrs = client.api.inspect_container(container_id)
            image_tags: Sequence[str] = ()
            requested = (attrs.get("Config") or {}).get("Image") or ""
            if _is_image_id_reference(requested, attrs.get("Image") or ""):
                image_tags = self._image_tags(client, attrs.get("Image") or "")
            return container_info_from_docker(attrs, image_tags=image_tags)
        except docker.errors.NotFound:
            return None
        except docker.errors.APIError as exc:  # the daemon answered, but not usefully (5xx, ...)
            raise MetadataUnavailableError(f"docker API error: {_short_reason(exc)}") from exc
        except _docker_transport_errors() as exc:
            self._drop_client(client)
            raise MetadataUnavailableError(
                f"docker unreachable at {self._base_url}: {_short_reason(exc)}"
            ) from exc

    def watch(self, on_event: Callable[[ContainerEvent], None]) -> DockerEventWatcher:
        return DockerEventWatcher(self._base_url, on_event, timeout=self._timeout)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def __enter__(self) -> DockerMetadata:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _client_or_raise(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = _new_docker_client(self._base_url, self._timeout)
            return self._client

    def _drop_client(self, client: Any) -> None:
        # Re-negotiate on the next call: the daemon may come back as another version.
        with self._lock:
            if self._client is client:
                self._client = None
        try:
            client.close()
        except Exception:  # closing a broken client must not mask the real error
            log.debug("closing docker client failed", exc_info=True)

    @staticmethod
    def _image_tags(client: Any, image_id: str) -> Sequence[str]:
        import docker.errors

        try:
            return tuple(client.api.inspect_image(image_id).get("RepoTags") or ())
        except docker.errors.NotFound:
            return ()


class DockerEventWatcher:
    """Follows Docker container events on a thread and hands them to a callback.

    Reconnects with backoff when the daemon goes away and sends a RESYNC event on every
    (re)connect, because events during the gap are lost. `stop` closes the stream socket, which
    unblocks the reading thread, so it returns promptly.
    """

    _FOLLOWED = ("start", "die", "destroy", "rename")

    def __init__(
        self,
        base_url: str,
        on_event: Callable[[ContainerEvent], None],
        *,
        timeout: float = 5.0,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
    ) -> None:
        self._base_url = base_url
        self._on_event = on_event
        self._timeout = timeout
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._lock = threading.Lock()
        self._client: Any = None
        self._stream: Any = None
        self._thread: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._run, name="driftwarden-docker-events", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._close_connection()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("docker event watcher did not stop within %.1fs", timeout)

    def __enter__(self) -> DockerEventWatcher:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        backoff = self._initial_backoff
        reported_failure = False
        while not self._stopping.is_set():
            try:
                if self._follow():
                    backoff = self._initial_backoff
                    reported_failure = False
            except Exception as exc:  # the watcher outlives any daemon trouble
                if self._stopping.is_set():
                    break
                # Warn once per outage; the Attributor already reports metadata errors.
                log.log(
                    logging.DEBUG if reported_failure else logging.WARNING,
                    "docker events unavailable (retrying): %s",
                    _short_reason(exc),
                )
                reported_failure = True
            if self._stopping.wait(backoff):
                break
            backoff = min(backoff * 2, self._max_backoff)

    def _follow(self) -> bool:
        """Follow one connection until it ends; True if it connected."""
        client = _new_docker_client(self._base_url, self._timeout)
        with self._lock:
            if self._stopping.is_set():
                client.close()
                return False
            self._client = client
        try:
            stream = client.api.events(
                decode=True, filters={"type": "container", "event": list(self._FOLLOWED)}
            )
            with self._lock:
                if self._stopping.is_set():
                    stream.close()
                    return False
                self._stream = stream
            self._connected.set()
            self._deliver(ContainerEvent(ContainerEventAction.RESYNC, None))
            for raw in stream:
                event = parse_docker_event(raw)
                if event is not None:
                    self._deliver(event)
            return True
        finally:
            self._connected.clear()
            self._close_connection()

    def _deliver(self, event: ContainerEvent) -> None:
        try:
            self._on_event(event)
        except Exception:  # a faulty consumer must not end the stream
            log.exception("container event callback failed for %s", event)

    def _close_connection(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
            client, self._client = self._client, None
        for closeable in (stream, client):
            if closeable is None:
                continue
            try:
                closeable.close()
            except Exception:  # already broken; nothing more to release
                log.debug("closing docker event stream failed", exc_info=True)


# --------------------------------------------------------------------------- attributor


class AttributionState(enum.StrEnum):
    HOST = "host"  # a host cgroup the caller named (the root, by default)
    CONTAINER = "container"
    PENDING = "pending"  # a container whose metadata is being fetched
    NOT_CONTAINER = "not_container"  # a known cgroup that is not a container (ssh.service, ...)
    UNKNOWN = "unknown"  # the cgroup id was not found, even after a rescan


@dataclass(frozen=True, slots=True)
class Attribution:
    """The answer for one cgroup id. `ref` is set for CONTAINER and PENDING; `info` only when
    the runtime described the container; `metadata_error` says why `info` is missing or old."""

    state: AttributionState
    cgroup_id: int
    cgroup_path: str | None = None
    ref: ContainerRef | None = None
    info: ContainerInfo | None = None
    metadata_error: str | None = None

    @property
    def container_id(self) -> str | None:
        return self.ref.container_id if self.ref is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "cgroup_id": self.cgroup_id,
            "cgroup_path": self.cgroup_path,
            "runtime": self.ref.runtime if self.ref else None,
            "container_id": self.container_id,
            "pod_uid": self.ref.pod_uid if self.ref else None,
            "info": self.info.to_dict() if self.info else None,
            "metadata_error": self.metadata_error,
        }


NO_PROVIDER_ERROR = "no metadata provider configured"
NOT_FOUND_ERROR = "container not found by the runtime"


@dataclass(frozen=True, slots=True)
class _CachedMetadata:
    info: ContainerInfo | None  # None: not found, or never fetched because of an error
    error: str | None
    expires_at: float


@dataclass(slots=True)
class _Counters:
    lookups: int = 0
    hits: int = 0
    stale_hits: int = 0
    pending: int = 0
    host: int = 0
    not_container: int = 0
    unknown: int = 0
    unavailable: int = 0
    inspects: int = 0
    inspect_errors: int = 0
    not_found: int = 0
    events: int = 0
    queue_dropped: int = 0
    evicted: int = 0


class Attributor:
    """cgroup id -> Attribution, without ever waiting on the container runtime.

    `start()` runs the metadata worker (and the runtime event watcher when the provider has one);
    without it, container lookups stay PENDING. An expired entry is still served while its
    refresh is queued, so long-lived containers never flap back to PENDING.
    """

    def __init__(
        self,
        cgroups: CgroupIndex,
        metadata: MetadataProvider | None,
        *,
        ttl: float = 300.0,
        negative_ttl: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        host_cgroup_ids: frozenset[int] = frozenset({1}),
        max_containers: int = 4096,
        max_queued: int = 4096,
    ) -> None:
        self._cgroups = cgroups
        self._metadata = metadata
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._clock = clock
        self._host_cgroup_ids = frozenset(host_cgroup_ids)
        self._max_containers = max_containers
        self._max_queued = max_queued
        self._cond = threading.Condition(threading.Lock())
        self._entries: OrderedDict[str, _CachedMetadata] = OrderedDict()
        self._parsed: OrderedDict[str, ContainerRef | None] = OrderedDict()
        self._max_parsed_paths = 4 * max_containers
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._in_flight: str | None = None
        self._outage_error: str | None = None  # set while the provider is unreachable
        self._counters = _Counters()
        self._running = False
        self._worker: threading.Thread | None = None
        self._watcher: EventWatcher | None = None

    # ---- lifecycle

    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
        if self._metadata is None:
            return
        self._worker = threading.Thread(
            target=self._work, args=(self._metadata,), name="driftwarden-attribution", daemon=True
        )
        self._worker.start()
        if isinstance(self._metadata, WatchableMetadataProvider):
            try:
                self._watcher = self._metadata.watch(self.on_container_event)
                self._watcher.start()
            except Exception as exc:  # events only sharpen the cache; TTLs still work
                log.warning("container events unavailable, relying on TTLs: %s", exc)
                self._watcher = None

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.join(timeout)
            if worker.is_alive():
                # Stuck in a runtime call that has its own timeout; it is a daemon thread.
                log.warning("attribution worker did not stop within %.1fs", timeout)

    def __enter__(self) -> Attributor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def watching(self) -> bool:
        """True while a runtime event stream is connected."""
        watcher = self._watcher
        return watcher is not None and watcher.connected

    # ---- the hot path

    def lookup(self, cgroup_id: int) -> Attribution:
        if cgroup_id in self._host_cgroup_ids:
            with self._cond:
                self._counters.lookups += 1
                self._counters.host += 1
            return Attribution(
                AttributionState.HOST, cgroup_id, cgroup_path=self._cgroups.path_of(cgroup_id)
            )
        path = self._cgroups.path_of(cgroup_id)
        with self._cond:
            self._counters.lookups += 1
            if path is None:
                self._counters.unknown += 1
                return Attribution(AttributionState.UNKNOWN, cgroup_id)
            if path == "/":
                self._counters.host += 1
                return Attribution(AttributionState.HOST, cgroup_id, cgroup_path=path)
            ref = self._parse_locked(path)
            if ref is None:
                self._counters.not_container += 1
                return Attribution(AttributionState.NOT_CONTAINER, cgroup_id, cgroup_path=path)
            if self._metadata is None:
                self._counters.unavailable += 1
                return Attribution(
                    AttributionState.CONTAINER,
                    cgroup_id,
                    cgroup_path=path,
                    ref=ref,
                    metadata_error=NO_PROVIDER_ERROR,
                )
            return self._container_attribution_locked(cgroup_id, path, ref)

    def _parse_locked(self, path: str) -> ContainerRef | None:
        # Memoised: parsing costs more than the rest of a cached lookup put together.
        try:
            ref = self._parsed[path]
        except KeyError:
            ref = self._parsed[path] = parse_cgroup_path(path)
            if len(self._parsed) > self._max_parsed_paths:
                self._parsed.popitem(last=False)
            return ref
        self._parsed.move_to_end(path)
        return ref

    def _container_attribution_locked(
        self, cgroup_id: int, path: str, ref: ContainerRef
    ) -> Attribution:
        container_id = ref.container_id
        cached = self._entries.get(container_id)
        if cached is not None:
            self._entries.move_to_end(container_id)
            if self._clock() >= cached.expires_at:
                self._counters.stale_hits += 1
                self._enqueue_locked(container_id, even_if_in_flight=False)
            else:
                self._counters.hits += 1
            return Attribution(
                AttributionState.CONTAINER,
                cgroup_id,
                cgroup_path=path,
                ref=ref,
                info=cached.info,
                metadata_error=cached.error,
            )
        self._enqueue_locked(container_id, even_if_in_flight=False)
        if self._outage_error is not None:
            # Known outage: say so now instead of making the caller buffer for nothing.
            self._counters.unavailable += 1
            return Attribution(
                AttributionState.CONTAINER,
                cgroup_id,
                cgroup_path=path,
                ref=ref,
                metadata_error=self._outage_error,
            )
        self._counters.pending += 1
        return Attribution(AttributionState.PENDING, cgroup_id, cgroup_path=path, ref=ref)

    # ---- runtime events

    def on_container_event(self, event: ContainerEvent) -> None:
        """Keep the cache current; called from the watcher thread (or by tests)."""
        now = self._clock()
        with self._cond:
            self._counters.events += 1
            if event.action is ContainerEventAction.RESYNC:
                # Events may have been missed: serve what we have, but refresh on next use.
                for container_id, cached in self._entries.items():
                    if cached.expires_at > now:
                        self._entries[container_id] = replace(cached, expires_at=now)
                return
            container_id = event.container_id
            if not container_id:
                return
            cached = self._entries.get(container_id)
            if event.action is ContainerEventAction.START:
                # A restart: the cached metadata is right but for when this run began, which
                # the event says before the re-inspect below answers.
                if cached is not None and cached.info is not None and event.time is not None:
                    self._entries[container_id] = replace(
                        cached, info=replace(cached.info, started_at=event.time))
                # Warm the cache before the container's first exec reaches us.
                self._enqueue_locked(container_id, even_if_in_flight=True)
            elif event.action is ContainerEventAction.RENAME:
                if cached is not None and cached.info is not None and event.name:
                    self._entries[container_id] = replace(
                        cached, info=replace(cached.info, name=event.name)
                    )
                # Re-inspect as well: a fetch in flight may carry the old name.
                self._enqueue_locked(container_id, even_if_in_flight=True)
            elif event.action is ContainerEventAction.DESTROY and cached is not None:
                # Late events of the removed container keep their attribution for a short
                # grace period; after that a refresh finds it gone (negative entry).
                grace_end = min(cached.expires_at, now + self._negative_ttl)
                self._entries[container_id] = replace(cached, expires_at=grace_end)
            # DIE: a stopped container can be restarted as is; its metadata stays valid.

    # ---- background fetching

    def _enqueue_locked(self, container_id: str, *, even_if_in_flight: bool) -> None:
        if container_id in self._queued:
            return
        if container_id == self._in_flight and not even_if_in_flight:
            return
        if len(self._queue) >= self._max_queued:
            self._counters.queue_dropped += 1
            return
        self._queue.append(container_id)
        self._queued.add(container_id)
        self._cond.notify_all()

    def _work(self, provider: MetadataProvider) -> None:
        while True:
            with self._cond:
                while self._running and not self._queue:
                    self._cond.wait()
                if not self._running:
                    return
                container_id = self._queue.popleft()
                self._queued.discard(container_id)
                self._in_flight = container_id
            info: ContainerInfo | None = None
            error: str | None = None
            try:
                info = provider.inspect(container_id)
            except MetadataUnavailableError as exc:
                error = str(exc)
            except Exception as exc:  # a provider bug must not kill attribution
                log.exception("metadata provider failed for %s", container_id)
                error = f"metadata lookup failed: {_short_reason(exc)}"
            self._store_result(container_id, info, error)

    def _store_result(
        self, container_id: str, info: ContainerInfo | None, error: str | None
    ) -> None:
        now = self._clock()
        with self._cond:
            self._in_flight = None
            self._counters.inspects += 1
            if error is not None:
                self._counters.inspect_errors += 1
                if self._outage_error is None:
                    log.warning("container metadata unavailable: %s", error)
                self._outage_error = error
                previous = self._entries.get(container_id)
                # Keep what we knew: an old name beats no name while the runtime is away.
                known = previous.info if previous is not None else None
                entry = _CachedMetadata(known, error, now + self._negative_ttl)
            else:
                if self._outage_error is not None:
                    log.info("container metadata available again")
                    self._outage_error = None
                if info is None:
                    self._counters.not_found += 1
                    entry = _CachedMetadata(None, NOT_FOUND_ERROR, now + self._negative_ttl)
                else:
                    entry = _CachedMetadata(info, None, now + self._ttl)
            self._entries[container_id] = entry
            self._entries.move_to_end(container_id)
            while len(self._entries) > self._max_containers:
                self._entries.popitem(last=False)
                self._counters.evicted += 1
            self._cond.notify_all()

    # ---- observability

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no fetch is queued or running (for tests); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and self._in_flight is None, timeout)

    def stats(self) -> dict[str, int]:
        with self._cond:
            counters = asdict(self._counters)
            counters["cached_containers"] = len(self._entries)
            counters["queued"] = len(self._queue)
            counters["metadata_unavailable"] = int(self._outage_error is not None)
        cgroup_stats = self._cgroups.stats
        counters["rescans"] = cgroup_stats["rescans"]
        counters["cgroup_misses"] = cgroup_stats["misses"]
        return counters
