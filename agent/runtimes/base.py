"""The runtime-neutral side of container runtimes: the records every provider returns and the
interfaces the attributor and the actions call.

A provider answers `inspect(container_id) -> ContainerInfo | None` (None: the runtime does not
know the container; MetadataUnavailableError: the runtime cannot be asked) and may offer
`watch(on_event)`, a thread following its lifecycle events (create, start, die, destroy,
rename) so cached metadata stays current: a container's metadata is asked for when it is
created, before its first exec, so that one which lives a few milliseconds is described too.
Times are epoch seconds on the runtime's clock. A node may run several runtimes:
`RoutingMetadataProvider.inspect_for` takes the runtime a container's cgroup path names, so the
right one is asked first (runtimes.registry.RuntimeSet).

The image's key (`ContainerInfo.image_id`, what a baseline belongs to) is the same for the same
image whatever runs it: `image_key` (a repo digest where the runtime knows one, else the config
digest, which is Docker's image id and the CRI's image id alike).
"""

from __future__ import annotations

import enum
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, Self, runtime_checkable

from driftwarden.core.errors import RuntimeActionError
from driftwarden.core.lifecycle import Service, join_or_warn, start_daemon_thread
from driftwarden.core.mountinfo import parse_mountinfo

log = logging.getLogger(__name__)

__all__ = [
    "CONTAINER_NAME_LABEL",
    "POD_NAMESPACE_LABEL",
    "POD_NAME_LABEL",
    "POD_UID_LABEL",
    "Closeable",
    "ContainerEvent",
    "ContainerEventAction",
    "ContainerInfo",
    "EventWatcher",
    "MetadataProvider",
    "RoutingMetadataProvider",
    "RuntimeEventWatcher",
    "RuntimeState",
    "WatchableMetadataProvider",
    "digest_of",
    "familiar_image_name",
    "image_key",
    "normalize_image_reference",
    "owner_workload",
    "parse_runtime_time",
    "pick_repo_digest",
    "root_overlay",
    "short_reason",
]

# The labels kubelet puts on every container it makes, whatever the runtime.
POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"
POD_UID_LABEL = "io.kubernetes.pod.uid"
CONTAINER_NAME_LABEL = "io.kubernetes.container.name"


def _frozen_labels(
    labels: Mapping[str, str] | Iterable[tuple[str, str]] | None,
) -> tuple[tuple[str, str], ...]:
    if labels is None:
        return ()
    pairs = labels.items() if isinstance(labels, Mapping) else labels
    return tuple(sorted((str(key), str(value)) for key, value in pairs))


@dataclass(frozen=True, slots=True)
class ContainerInfo:
    """What the container runtime says about a container. Hashable; labels are sorted pairs.

    `name` is the runtime's name for it (Docker's container name; the CRI's container name
    within its pod, e.g. "app"). `image_id` is the image's key (see `image_key`): the same image
    has the same key under every runtime, so one baseline serves it everywhere. `image_digest`
    is the repo digest reference it came from ("registry/app@sha256:..."), when known.
    `labels`: the container's labels, under a CRI runtime merged over its pod's.
    """

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
    image_digest: str | None = None
    pod_uid: str | None = None
    # the workload that owns the pod ("Deployment/web"), from the pod's labels; see
    # owner_workload
    workload: str | None = None
    pid: int = 0  # its init process on this host when the runtime said; 0 = not known
    # its storage layers in the shape of Docker's GraphDriver ({"Name": "overlay2", "Data":
    # {"UpperDir": ..., "LowerDir": ...}}), taken while the runtime could say (detect.py's
    # LayersCache asks for them once the container may be gone); not part of its identity
    graph_driver: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

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
            "image_digest": self.image_digest,
            "pod_uid": self.pod_uid,
            "workload": self.workload,
            "pid": self.pid,
        }


def parse_runtime_time(text: Any) -> float | None:
    """An RFC 3339 time (Docker's ``2026-11-23T10:00:00.123456789Z``) -> epoch seconds (to the
    microsecond); None for Go's zero time (never started), a missing or an unreadable value."""
    if not isinstance(text, str) or not text or text.startswith("0001-01-01"):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def normalize_image_reference(reference: str) -> str:
    """Add the implicit ":latest" the way runtimes resolve an untagged name; keep digests as is."""
    if not reference or "@" in reference:
        return reference
    last_component = reference.rsplit("/", 1)[-1]  # "registry:5000/app" has a port, not a tag
    return reference if ":" in last_component else f"{reference}:latest"


_DEFAULT_REGISTRY_PREFIXES = ("docker.io/library/", "docker.io/", "index.docker.io/library/",
                              "index.docker.io/")


def familiar_image_name(reference: str) -> str:
    """A reference as Docker shows it: "docker.io/library/nginx:1" -> "nginx:1",
    "docker.io/org/app:2" -> "org/app:2"; other registries are kept. The CRI runtimes name
    images fully qualified, Docker does not: the same image gets one name in alerts."""
    for prefix in _DEFAULT_REGISTRY_PREFIXES:
        if reference.startswith(prefix):
            return reference[len(prefix):]
    return reference


_DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")


# podman's name for images no registry served (built, loaded or imported): localhost/NAME
PODMAN_LOCAL_REGISTRY = "localhost/"


def digest_of(reference: str) -> str | None:
    """The "sha256:<hex>" of a digest reference ("name@sha256:..." or a bare digest)."""
    digest = reference.rsplit("@", 1)[-1]
    return digest if _DIGEST_RE.fullmatch(digest) else None


def _repository(reference: str) -> str:
    name = familiar_image_name(reference.split("@", 1)[0])
    last = name.rsplit("/", 1)[-1]
    return name.rsplit(":", 1)[0] if ":" in last else name


def pick_repo_digest(repo_digests: Iterable[str], image_name: str = "") -> str | None:
    """The repo digest (``name@sha256:...``) an image is known by: the one of the repository
    it was asked for by name, else the smallest digest (an image pushed to two registries
    lists two); None when there is none (an image built or imported locally). podman lists a
    digest of its own for such an image, under the registry name "localhost/" (no port: no
    registry serves it): not a registry's name for the content, so not one either."""
    valid = sorted((digest_of(ref) or "", ref) for ref in repo_digests
                   if digest_of(ref) and not ref.startswith(PODMAN_LOCAL_REGISTRY))
    if not valid:
        return None
    wanted = _repository(image_name) if image_name else None
    for _, ref in valid:
        if wanted is not None and _repository(ref) == wanted:
            return ref
    return valid[0][1]


def image_key(config_digest: str, repo_digest: str | None) -> str:
    """The image's key, which a baseline belongs to: the digest of its repo digest where the
    runtime knows one (the registry's name for that content, the same on every node that pulled
    it), else its config digest ("sha256:...": Docker's image id and the CRI's image id, the
    same for a locally built image under every runtime)."""
    return (digest_of(repo_digest) if repo_digest else None) or config_digest


# Kubernetes labels that name a pod's owner (set by the controllers on the pods they make).
_JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")
_STATEFULSET_POD_LABEL = "statefulset.kubernetes.io/pod-name"


def owner_workload(pod_name: str | None, labels: Mapping[str, str]) -> str | None:
    """The workload that owns a pod, "Kind/name", from what its controller wrote on it (the CRI
    carries no owner references): a Deployment's pods have ``pod-template-hash`` and are named
    ``<deployment>-<hash>-<suffix>``; a StatefulSet's carry ``statefulset.kubernetes.io/
    pod-name`` and are ``<set>-<ordinal>``; a DaemonSet's have ``controller-revision-hash`` and
    ``pod-template-generation``; a Job's a ``job-name`` label. None for a bare pod, a static
    pod, or one whose labels do not say."""
    if not pod_name:
        return None
    for key in _JOB_NAME_LABELS:
        if labels.get(key):
            return f"Job/{labels[key]}"
    template_hash = labels.get("pod-template-hash")
    if template_hash and f"-{template_hash}-" in pod_name:
        return f"Deployment/{pod_name.rsplit(f'-{template_hash}-', 1)[0]}"
    if labels.get(_STATEFULSET_POD_LABEL) == pod_name and re.search(r"-\d+$", pod_name):
        return f"StatefulSet/{pod_name.rsplit('-', 1)[0]}"
    if labels.get("controller-revision-hash") and labels.get("pod-template-generation") \
            and re.search(r"-[a-z0-9]{5}$", pod_name):
        return f"DaemonSet/{pod_name.rsplit('-', 1)[0]}"
    return None


def root_overlay(mountinfo: str) -> dict[str, Any] | None:
    """The overlay mounted at "/" in a process's ``/proc/PID/mountinfo`` text, in the shape of
    Docker's GraphDriver ({"Name": "overlay", "Data": {"UpperDir", "LowerDir"}}): a
    container's layers seen from one of its processes. None when its root is no overlay (a
    process outside a container, or runc before it pivots into the container's root)."""
    for mount in parse_mountinfo(mountinfo):
        if mount.mount_point == "/" and mount.fstype == "overlay" and mount.options:
            return {"Name": "overlay", "Data": {"UpperDir": mount.options.get("upperdir"),
                                                "LowerDir": mount.options.get("lowerdir")}}
    return None


def short_reason(exc: BaseException) -> str:
    """An exception's text for a one-line message, at most 200 characters."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class ContainerEventAction(enum.StrEnum):
    CREATE = "create"  # made, not started yet: its metadata can be asked for already
    START = "start"
    DIE = "die"
    DESTROY = "destroy"
    RENAME = "rename"
    # The event stream (re)connected: the runtime answers again, and anything that happened
    # while it was away may have been missed.
    RESYNC = "resync"
    # The watcher could not reach the runtime (it retries): its containers cannot be asked
    # about until a RESYNC; `error` says why.
    UNREACHABLE = "unreachable"


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    action: ContainerEventAction
    container_id: str | None  # None only for RESYNC and UNREACHABLE
    name: str | None = None  # the (new) name, when the runtime says it
    time: float | None = None  # runtime's wall-clock timestamp, seconds
    # RESYNC and UNREACHABLE: the runtime whose watcher sent it ("docker", "containerd", ...)
    runtime: str | None = None
    error: str | None = None  # UNREACHABLE: why the runtime could not be reached


@runtime_checkable
class MetadataProvider(Protocol):
    def inspect(self, container_id: str) -> ContainerInfo | None:
        """The container's metadata, or None when the runtime says it does not exist.

        Raises MetadataUnavailableError when the runtime cannot be asked.
        """
        ...


@runtime_checkable
class RoutingMetadataProvider(MetadataProvider, Protocol):
    def inspect_for(self, container_id: str, runtime: str | None) -> ContainerInfo | None:
        """Like inspect, asking first the runtime a cgroup path names ("containerd", ...).

        Raises MetadataUnavailableError when that runtime cannot be asked (and no other knows
        the container)."""
        ...


class EventWatcher(Protocol):
    @property
    def connected(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Closeable:
    """What holds a runtime connection: `close()` drops it (the next call may make a new one);
    as a context manager it closes at the block's end."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RuntimeEventWatcher(Service):
    """A thread following one runtime's container events, for a runtime's watcher to build on
    (`docker.DockerEventWatcher`, `cri.CriEventWatcher`): `_follow()` follows one connection
    until it ends (True: it did connect) and raises when it cannot; the thread tries again
    after a backoff that doubles up to `max_backoff`, resets once a connection was made, and
    warns once per outage. A connection announces itself with `_announce()`, which sends a
    RESYNC (what happened while it was down may have been missed); each try that fails because
    the runtime cannot be reached (a RuntimeActionError) sends an UNREACHABLE, so the attributor
    knows of an outage before it needs to ask, and when the runtime last failed. `stop` calls
    `_interrupt()` to unblock a follow in progress, so it returns promptly.

    The backoff stays short (`max_backoff` 5 s): a runtime's socket is local, so trying costs
    next to nothing, and a runtime that came back is followed again within seconds."""

    STOP_TIMEOUT = 5.0

    def __init__(self, on_event: Callable[[ContainerEvent], None], *, what: str,
                 initial_backoff: float = 0.5, max_backoff: float = 5.0) -> None:
        super().__init__()
        self._on_event = on_event
        self._what = what  # "docker", "containerd": the runtime, in messages and thread names
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _start(self) -> None:
        self._thread = start_daemon_thread(self._run, f"driftwarden-{self._what}-events")

    def _stop(self, timeout: float | None) -> None:
        self._stopping.set()
        self._interrupt()
        thread, self._thread = self._thread, None
        join_or_warn(thread, timeout, f"{self._what} event watcher")

    def _follow(self) -> bool:
        raise NotImplementedError

    def _interrupt(self) -> None:
        """Unblock a `_follow` in progress (close its connection); called by stop."""

    def _run(self) -> None:
        backoff = self._initial_backoff
        reported_failure = False
        while not self._stopping.is_set():
            try:
                if self._follow():
                    backoff = self._initial_backoff
                    reported_failure = False
            except Exception as exc:  # the watcher outlives any runtime trouble
                if self._stopping.is_set():
                    break
                # Warn once per outage; the Attributor already reports metadata errors.
                log.log(logging.DEBUG if reported_failure else logging.WARNING,
                        "%s events unavailable (retrying): %s", self._what, short_reason(exc))
                reported_failure = True
                if isinstance(exc, RuntimeActionError):  # the runtime, not a bug of ours
                    # every failed try says so: the attributor knows when it last failed
                    self._deliver(ContainerEvent(ContainerEventAction.UNREACHABLE, None,
                                                 runtime=self._what, error=str(exc)))
            finally:
                self._connected.clear()
            if self._stopping.wait(backoff):
                break
            backoff = min(backoff * 2, self._max_backoff)

    def _announce(self) -> None:
        self._connected.set()
        self._deliver(ContainerEvent(ContainerEventAction.RESYNC, None, runtime=self._what))

    def _deliver(self, event: ContainerEvent) -> None:
        try:
            self._on_event(event)
        except Exception:  # a faulty consumer must not end the stream
            log.exception("container event callback failed for %s", event)


@runtime_checkable
class WatchableMetadataProvider(MetadataProvider, Protocol):
    def watch(self, on_event: Callable[[ContainerEvent], None]) -> EventWatcher:
        """A not-yet-started watcher calling `on_event` from its own thread."""
        ...


@dataclass(frozen=True)
class RuntimeState:
    """A container's state as its runtime reports it (actions.ContainerRuntime.state)."""

    status: str  # the runtime's word: running, paused, exited, created, restarting, dead, ...
    running: bool
    paused: bool
    pid: int = 0  # the container's init process on this host; 0 when not running
