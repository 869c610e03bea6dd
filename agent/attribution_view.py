"""Adapts the Attributor (agent/attribution.py) to the pipeline's ContainerView."""

from __future__ import annotations

import logging
import os

from driftwarden.agent.attribution import Attribution, AttributionState, Attributor
from driftwarden.agent.cgroups import CgroupIndex
from driftwarden.agent.runtimes.docker import DockerMetadata
from driftwarden.core.errors import MetadataUnavailableError, UsageError
from driftwarden.core.lifecycle import Service
from driftwarden.core.records import ContainerView

log = logging.getLogger(__name__)


def view_of(attribution: Attribution) -> ContainerView:
    info, ref = attribution.info, attribution.ref
    return ContainerView(
        state=attribution.state.value,
        cgroup_id=attribution.cgroup_id,
        cgroup_path=attribution.cgroup_path,
        id=ref.container_id if ref else None,
        name=info.name if info else None,
        image=info.image_name if info else None,
        image_id=info.image_id if info else None,
        runtime=ref.runtime if ref else None,
        pod=info.pod if info else None,
        namespace=info.namespace if info else None,
        labels=info.labels if info else (),
        metadata_error=attribution.metadata_error,
        started_at=info.started_at if info else None,
    )


class LiveAttribution(Service):
    """cgroup id -> ContainerView from the cgroup tree and the Docker Engine API."""

    def __init__(self, cgroup_root: str, docker_host: str) -> None:
        super().__init__()
        self.metadata = DockerMetadata(base_url=docker_host)
        host_ids = frozenset({os.stat(cgroup_root).st_ino})
        self.attributor = Attributor(CgroupIndex(cgroup_root), self.metadata,
                                     host_cgroup_ids=host_ids)

    def _start(self) -> None:
        self.attributor.start()

    def _stop(self, timeout: float | None) -> None:
        self.attributor.stop(timeout)
        self.metadata.close()

    def lookup(self, cgroup_id: int) -> ContainerView:
        return view_of(self.attributor.lookup(cgroup_id))

    def check_selector(self, selector: str) -> None:
        """Fail early, with one clear line, on a --container the runtime does not know."""
        try:
            info = self.metadata.inspect(selector)
        except MetadataUnavailableError as exc:
            raise UsageError(
                f"cannot check --container {selector!r}: the container runtime is unreachable "
                f"({exc}); start dockerd or drop --container"
            ) from exc
        if info is None:
            raise UsageError(
                f"no container named or with id {selector!r}; `docker ps` lists the running ones"
            )


__all__ = ["AttributionState", "LiveAttribution", "view_of"]
