"""Adapts the Attributor (agent/attribution.py) to the pipeline's ContainerView."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from driftwarden.agent.attribution import Attribution, AttributionState, Attributor
from driftwarden.agent.cgroups import CgroupIndex, CgroupWatcher
from driftwarden.agent.runtimes.registry import RuntimeEndpoint, RuntimeSet, resolve_endpoints
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
        # the cgroup path names a pod's uid even when the runtime could not be asked
        pod_uid=(info.pod_uid if info else None) or (ref.pod_uid if ref else None),
        workload=info.workload if info else None,
        image_digest=info.image_digest if info else None,
    )


class LiveAttribution(Service):
    """cgroup id -> ContainerView from the cgroup tree and the node's container runtimes.

    `endpoints` are the runtimes to ask (runtimes.registry.resolve_endpoints: those given with
    --runtime-endpoint / --docker-host, else the usual sockets that exist); a string is taken
    as a Docker Engine API URL, as before there were other runtimes."""

    def __init__(self, cgroup_root: str,
                 endpoints: Sequence[RuntimeEndpoint] | str | None = None) -> None:
        super().__init__()
        if isinstance(endpoints, str):
            endpoints = resolve_endpoints(docker_host=endpoints)
        elif endpoints is None:
            endpoints = resolve_endpoints()
        self.endpoints = list(endpoints)
        self.metadata = RuntimeSet.open(self.endpoints)
        host_ids = frozenset({os.stat(cgroup_root).st_ino})
        index = CgroupIndex(cgroup_root)
        # new cgroups as they are made: a container that lives a few ms is still named
        self.cgroup_watcher = CgroupWatcher(index)
        self.attributor = Attributor(index, self.metadata, host_cgroup_ids=host_ids)

    def _start(self) -> None:
        log.info("container runtimes: %s", self.metadata.describe())
        self.cgroup_watcher.start()
        self.attributor.start()

    def _stop(self, timeout: float | None) -> None:
        self.attributor.stop(timeout)
        self.cgroup_watcher.stop(timeout)
        self.metadata.close()

    def lookup(self, cgroup_id: int) -> ContainerView:
        return view_of(self.attributor.lookup(cgroup_id))

    def check_selector(self, selector: str) -> None:
        """Fail early, with one clear line, on a --container no runtime knows."""
        try:
            info = self.metadata.inspect(selector)
        except MetadataUnavailableError as exc:
            raise UsageError(
                f"cannot check --container {selector!r}: the container runtime is unreachable "
                f"({exc}); start it, give its socket with --runtime-endpoint, or drop "
                "--container"
            ) from exc
        if info is None:
            listing = " or ".join(
                "`crictl ps`" if endpoint.api == "cri" else f"`{endpoint.runtime} ps`"
                for endpoint in self.endpoints)
            raise UsageError(
                f"no container named or with id {selector!r}; {listing} lists the running ones"
            )


__all__ = ["AttributionState", "LiveAttribution", "view_of"]
