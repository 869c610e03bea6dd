"""Event records as the stages after the pipeline see them: a kernel event with its resolved
paths and the container it is attributed to. Shared by the agent, the models and the tools, so
none of them needs the agent's pipeline to read one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from driftwarden.probes.events import KernelEvent


@dataclass(frozen=True, slots=True)
class ContainerView:
    """What an event is attributed to, in a form that can be printed, recorded and replayed."""

    state: str  # host | container | pending | not-container | unknown
    cgroup_id: int
    cgroup_path: str | None = None
    id: str | None = None
    name: str | None = None
    image: str | None = None
    image_id: str | None = None
    runtime: str | None = None
    pod: str | None = None
    namespace: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    metadata_error: str | None = None
    started_at: float | None = None  # when the container's current run began (epoch s)

    def to_dict(self) -> dict:
        return {
            "state": self.state,
            "cgroup_id": self.cgroup_id,
            "cgroup_path": self.cgroup_path,
            "id": self.id,
            "name": self.name,
            "image": self.image,
            "image_id": self.image_id,
            "runtime": self.runtime,
            "pod": self.pod,
            "namespace": self.namespace,
            "labels": dict(self.labels),
            "metadata_error": self.metadata_error,
            "started_at": self.started_at,
        }

    @classmethod
    def from_dict(cls, data: dict) -> ContainerView:
        values = dict(data)
        values["labels"] = tuple(sorted((values.get("labels") or {}).items()))
        return cls(**values)

    def matches(self, selector: str) -> bool:
        """A --container selector: exact name, or a prefix of the container id."""
        if self.name is not None and selector.lstrip("/") == self.name:
            return True
        return bool(self.id) and len(selector) >= 4 and self.id.startswith(selector)


class TraceRecord(NamedTuple):
    """An event with its resolved paths and container; a NamedTuple for construction speed."""

    event: KernelEvent
    kind: str
    container: ContainerView
    ppid: int
    path: str | None = None
    path_resolved: bool = True
    path2: str | None = None
    path2_resolved: bool = True
    exe: str | None = None
    runtime_setup: bool = False
