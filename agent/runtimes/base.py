"""The runtime-neutral side of container runtimes: the records every provider returns and the
interfaces the attributor and the actions call.

A provider answers `inspect(container_id) -> ContainerInfo | None` (None: the runtime does not
know the container; MetadataUnavailableError: the runtime cannot be asked) and may offer
`watch(on_event)`, a thread following its lifecycle events (start, die, destroy, rename) so
cached metadata stays current. Times are epoch seconds on the runtime's clock.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "POD_NAMESPACE_LABEL",
    "POD_NAME_LABEL",
    "ContainerEvent",
    "ContainerEventAction",
    "ContainerInfo",
    "EventWatcher",
    "MetadataProvider",
    "RuntimeState",
    "WatchableMetadataProvider",
    "normalize_image_reference",
    "parse_runtime_time",
    "short_reason",
]

# The labels kubelet puts on every container it makes, whatever the runtime.
POD_NAME_LABEL = "io.kubernetes.pod.name"
POD_NAMESPACE_LABEL = "io.kubernetes.pod.namespace"


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


def short_reason(exc: BaseException) -> str:
    """An exception's text for a one-line message, at most 200 characters."""
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


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


@dataclass(frozen=True)
class RuntimeState:
    """A container's state as its runtime reports it (actions.ContainerRuntime.state)."""

    status: str  # the runtime's word: running, paused, exited, created, restarting, dead, ...
    running: bool
    paused: bool
    pid: int = 0  # the container's init process on this host; 0 when not running
