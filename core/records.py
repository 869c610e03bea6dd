"""Event records as the stages after the pipeline see them: a kernel event with its resolved
paths, the container it is attributed to and the programs involved. Shared by the agent, the
models and the tools, so none of them needs the agent's pipeline to read one."""

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
    # Kubernetes: the pod's uid, the workload owning it ("Deployment/web"); the image's repo
    # digest reference when the runtime knows one (image_id is the baseline's key)
    pod_uid: str | None = None
    workload: str | None = None
    image_digest: str | None = None

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
            "pod_uid": self.pod_uid,
            "workload": self.workload,
            "image_digest": self.image_digest,
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


class ProcKey(NamedTuple):
    """A process: its tgid and its start (kernel boot-clock ns at its fork). A reused pid is
    another process. ``start_ns`` 0: the probes never saw it fork (it was running before they
    attached): the start-up snapshot's entry for that tgid."""

    tgid: int
    start_ns: int


class Program(NamedTuple):
    """What a process runs, as the process sees it (paths inside its container), not
    canonicalised: detection names it through the image's layers.

    ``exe``: the exec'd path, resolved (None when unknown); ``argv0``: its argv[0] (busybox
    applets are told apart by it). ``self_exec``: it came from ``execve("/proc/self/exe")`` (or
    a fork of one), so ``exe`` is the program the process ran before and the binary that runs
    is the one behind it (a script's interpreter, not the script)."""

    exe: str | None
    argv0: str | None
    self_exec: bool = False


class TraceRecord(NamedTuple):
    """An event with its resolved paths and container; a NamedTuple for construction speed.

    ``program``: what the process runs at the event (for an exec: after it). ``parent_program``:
    for an exec, its lineage parent (what the same process ran before, if known, else what its
    parent process runs); for other records the parent process's; None when truly unknown.
    ``before_agent``: synthesised from the start-up snapshot, not a kernel event."""

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
    program: Program | None = None
    parent_program: Program | None = None
    before_agent: bool = False
