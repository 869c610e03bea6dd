"""The container runtimes of a node: which endpoints to ask, a provider for each, and one
metadata provider over them all.

A node may run two runtimes (Docker beside a Kubernetes containerd, say). Endpoints are given
the way crictl takes them (`--runtime-endpoint unix:///path/to.sock`, repeatable; `--docker-host`
is one more, for the Docker Engine API) or, when none is given, probed at the usual sockets
(`DEFAULT_ENDPOINTS`: those that exist). A socket's API follows from its name: Docker's and
podman's sockets speak the Docker Engine API, any other is a CRI runtime (containerd, CRI-O,
cri-dockerd).

:class:`RuntimeSet` asks the runtime a container's cgroup path names first (agent/cgroups.py
knows it from the path's pattern) and the others after it: a kubelet's cgroupfs layout does not
say whether containerd or CRI-O made a container, and a custom parent may hide it altogether.
The node's other runtime users span every endpoint the same way: :class:`RuntimeRouter` (pause,
resume, kill and state for ``actions.ContainerActions``, by the runtime that owns the
container), :class:`RunningContainers` (the heartbeats' container list) and
:class:`GraphDrivers` (a container's layers for drift detection).
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from driftwarden.agent.runtimes.base import (
    Closeable,
    ContainerEvent,
    ContainerInfo,
    EventWatcher,
    RuntimeState,
    WatchableMetadataProvider,
)
from driftwarden.core.errors import (
    ContainerNotFoundError,
    MetadataUnavailableError,
    RuntimeActionError,
    UsageError,
)
from driftwarden.core.lifecycle import Service

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DOCKER_HOST",
    "DEFAULT_ENDPOINTS",
    "GraphDrivers",
    "ImageLayers",
    "RunningContainers",
    "RuntimeEndpoint",
    "RuntimeRouter",
    "RuntimeSet",
    "docker_endpoint",
    "open_provider",
    "parse_runtime_endpoint",
    "probe_endpoints",
    "resolve_endpoints",
    "serves_cri",
]

Api = Literal["cri", "docker"]

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
# the usual sockets, in the order they are asked about a container whose runtime is unknown
DEFAULT_ENDPOINTS = (
    "unix:///run/containerd/containerd.sock",
    "unix:///run/crio/crio.sock",
    DEFAULT_DOCKER_HOST,
    "unix:///run/podman/podman.sock",
)


@dataclass(frozen=True, slots=True)
class RuntimeEndpoint:
    """One runtime socket: its URL (unix:///path, or for Docker any URL docker-py takes), the
    API it speaks, and the runtime that answers ("containerd", "cri-o", "docker", "podman";
    a CRI runtime's own Version may correct it)."""

    url: str
    api: Api
    runtime: str

    @property
    def path(self) -> str | None:
        """The socket's path for a unix URL, else None."""
        return self.url.removeprefix("unix://") if self.url.startswith("unix://") else None

    def describe(self) -> str:
        return f"{self.runtime} ({'CRI' if self.api == 'cri' else 'Docker API'}) at {self.url}"


def _runtime_of(path: str) -> tuple[Api, str]:
    name = os.path.basename(path)
    if "podman" in name:
        return "docker", "podman"
    if name.startswith("docker") and "cri" not in name:
        return "docker", "docker"
    return "cri", "cri-o" if "crio" in name or "/crio/" in path else "containerd"


def parse_runtime_endpoint(text: str, *, flag: str = "--runtime-endpoint") -> RuntimeEndpoint:
    """``unix:///run/containerd/containerd.sock`` (crictl's form; a bare absolute path is
    taken as well) -> RuntimeEndpoint. UsageError, naming `flag`, for anything else."""
    value = text.strip()
    if value.startswith("unix://"):
        path = value.removeprefix("unix://")
    elif value.startswith("/"):
        path = value
    else:
        raise UsageError(f"{flag} {text!r}: give a unix socket as unix:///path/to.sock "
                         "(for example unix:///run/containerd/containerd.sock)")
    if not path.startswith("/") or path.endswith("/"):
        raise UsageError(f"{flag} {text!r}: the socket path must be absolute, as in "
                         "unix:///run/containerd/containerd.sock")
    api, runtime = _runtime_of(path)
    return RuntimeEndpoint(f"unix://{path}", api, runtime)


def docker_endpoint(url: str) -> RuntimeEndpoint:
    """`--docker-host URL`: the Docker Engine API at any URL docker-py takes."""
    if url.startswith("unix://"):
        _, runtime = _runtime_of(url.removeprefix("unix://"))
        return RuntimeEndpoint(url, "docker", runtime if runtime == "podman" else "docker")
    return RuntimeEndpoint(url, "docker", "docker")


def probe_endpoints(candidates: Iterable[str] = DEFAULT_ENDPOINTS, *,
                    exists: Callable[[str], bool] = os.path.exists) -> list[RuntimeEndpoint]:
    """The usual sockets that exist on this node (whether they answer is for the caller)."""
    found = []
    for url in candidates:
        endpoint = parse_runtime_endpoint(url)
        if endpoint.path is not None and exists(endpoint.path):
            found.append(endpoint)
    return found


def serves_cri(endpoint: RuntimeEndpoint, timeout: float = 2.0) -> bool:
    """False only when the socket answers and says it has no CRI service (Docker's own
    containerd, at /run/containerd/containerd.sock on a Debian or Ubuntu Docker host); a
    runtime that does not answer (yet) may still."""
    from driftwarden.agent.runtimes.cri import CriRuntime
    from driftwarden.core.errors import RuntimeActionError, RuntimeNotServedError

    try:
        with CriRuntime(endpoint.url, timeout=timeout) as client:
            client.version()
    except RuntimeNotServedError as exc:
        log.info("not asking %s: %s", endpoint.url, exc)
        return False
    except RuntimeActionError:
        return True
    return True


def resolve_endpoints(runtime_endpoints: Sequence[str] = (), docker_host: str | None = None,
                      *, probe: Callable[[], list[RuntimeEndpoint]] = probe_endpoints,
                      served: Callable[[RuntimeEndpoint], bool] = serves_cri,
                      ) -> list[RuntimeEndpoint]:
    """The endpoints the agent asks: those given (`--runtime-endpoint`s, then `--docker-host`),
    else the usual sockets that exist (leaving out a containerd without its CRI plugin, see
    `serves_cri`), else Docker's default socket (so that a node without any runtime yet says
    "docker unreachable at ..." as before). Duplicates are dropped."""
    given = [parse_runtime_endpoint(text) for text in runtime_endpoints]
    if docker_host:
        given.append(docker_endpoint(docker_host))
    probed = [] if given else [e for e in probe() if e.api != "cri" or served(e)]
    endpoints = given or probed or [docker_endpoint(DEFAULT_DOCKER_HOST)]
    unique: dict[str, RuntimeEndpoint] = {}
    for endpoint in endpoints:
        unique.setdefault(endpoint.url, endpoint)
    return list(unique.values())


def open_provider(endpoint: RuntimeEndpoint, *, timeout: float | None = None) -> Any:
    """The metadata provider for one endpoint (closed by the caller)."""
    if endpoint.api == "cri":
        from driftwarden.agent.runtimes.cri import REQUEST_TIMEOUT, CriMetadata

        return CriMetadata(endpoint.url, timeout=REQUEST_TIMEOUT if timeout is None else timeout)
    from driftwarden.agent.runtimes.docker import DockerMetadata

    return DockerMetadata(endpoint.url, timeout=timeout, runtime=endpoint.runtime)


# A kubelet's cgroupfs layout does not say which CRI runtime made a container (cgroups.py calls
# it containerd): any CRI runtime may own such a container.
_CRI_RUNTIMES = frozenset({"containerd", "cri-o"})


def _same_kind(provider_runtime: str, runtime: str | None) -> bool:
    return provider_runtime == runtime or (
        provider_runtime in _CRI_RUNTIMES and runtime in _CRI_RUNTIMES)


class _Watchers(Service):
    """The event watchers of several providers as one; connected while all of them are."""

    def __init__(self, watchers: Sequence[EventWatcher]) -> None:
        super().__init__()
        self._watchers = list(watchers)

    @property
    def connected(self) -> bool:
        return all(watcher.connected for watcher in self._watchers)

    def _start(self) -> None:
        for watcher in self._watchers:
            watcher.start()

    def _stop(self, timeout: float | None) -> None:
        for watcher in self._watchers:
            watcher.stop()


class RuntimeSet(Closeable):
    """One metadata provider over a node's runtimes (`runtimes.base.RoutingMetadataProvider`).

    `inspect_for(id, runtime)` asks the providers of that runtime first, then the others; the
    first that knows the container answers. When none knows it: None if every provider
    answered, else MetadataUnavailableError with each failure (the container's own runtime may
    be the one that could not be asked)."""

    def __init__(self, providers: Sequence[Any]) -> None:
        if not providers:
            raise ValueError("a RuntimeSet needs at least one provider")
        self.providers = list(providers)

    @classmethod
    def open(cls, endpoints: Sequence[RuntimeEndpoint], *,
             timeout: float | None = None) -> RuntimeSet:
        return cls([open_provider(endpoint, timeout=timeout) for endpoint in endpoints])

    @property
    def runtimes(self) -> list[str]:
        return [provider.runtime for provider in self.providers]

    def describe(self) -> str:
        return ", ".join(f"{p.runtime} at {p.endpoint}" for p in self.providers)

    def inspect(self, container_id: str) -> ContainerInfo | None:
        return self.inspect_for(container_id, None)

    def inspect_for(self, container_id: str, runtime: str | None) -> ContainerInfo | None:
        own = sorted((p for p in self.providers if _same_kind(p.runtime, runtime)),
                     key=lambda p: p.runtime != runtime)
        others = [p for p in self.providers if p not in own]
        own_failures: list[str] = []
        other_failures: list[str] = []
        for provider, failures in [(p, own_failures) for p in own] + \
                [(p, other_failures) for p in others]:
            try:
                info = provider.inspect(container_id)
            except MetadataUnavailableError as exc:
                failures.append(str(exc))
                continue
            if info is not None:
                return info
        if own_failures or (not own and other_failures):
            # the container's own runtime (or, not knowing it, some runtime) was not asked
            raise MetadataUnavailableError("; ".join(own_failures + other_failures))
        if runtime is not None and not own:
            raise MetadataUnavailableError(
                f"no runtime endpoint for {runtime} (its cgroup path names it; asked "
                f"{self.describe()}): give its socket with --runtime-endpoint")
        return None

    def watch(self, on_event: Callable[[ContainerEvent], None]) -> EventWatcher:
        watchers = [p.watch(on_event) for p in self.providers
                    if isinstance(p, WatchableMetadataProvider)]
        return _Watchers(watchers)

    def close(self) -> None:
        for provider in self.providers:
            try:
                provider.close()
            except Exception:  # closing must go on for the others
                log.debug("closing %s failed", provider, exc_info=True)


class GraphDrivers(Closeable):
    """`container id -> GraphDriver` data for detect.LayersCache: what `known` kept of the
    container (the attributor's record, taken while the container ran: a container that lived
    a few milliseconds is gone by the time it is asked), else whichever runtime knows it:
    Docker's (and podman's) inspect, a CRI runtime's container init's root mount. None when
    none does. Each source has a connection of its own (the pipeline thread asks;
    attribution's worker is not held up)."""

    def __init__(self, endpoints: Sequence[RuntimeEndpoint], *,
                 known: Callable[[str], Mapping[str, Any] | None] | None = None) -> None:
        from driftwarden.agent.runtimes.cri import CriGraphDriver
        from driftwarden.agent.runtimes.docker import DockerGraphDriver

        self._known = known
        self._sources: list[Any] = [
            CriGraphDriver(e.url) if e.api == "cri" else DockerGraphDriver(e.url)
            for e in endpoints]

    def __call__(self, container_id: str) -> dict | None:
        if self._known is not None:
            data = self._known(container_id)
            if data:
                return dict(data)
        for source in self._sources:
            data = source(container_id)
            if data:
                return data
        return None

    def close(self) -> None:
        for source in self._sources:
            source.close()


class ImageLayers(Closeable):
    """`container id -> its image's layer digests`, base first, from whichever runtime knows
    the container (Docker's RootFS.Layers, a CRI image's rootfs diff_ids); None when none
    does. For the collector's carry-over between versions of an image (agent.fleet)."""

    def __init__(self, endpoints: Sequence[RuntimeEndpoint]) -> None:
        from driftwarden.agent.runtimes.cri import CriImageLayers
        from driftwarden.agent.runtimes.docker import DockerImageLayers

        self._sources: list[Any] = [
            CriImageLayers(e.url) if e.api == "cri" else DockerImageLayers(e.url)
            for e in endpoints]

    def __call__(self, container_id: str) -> tuple[str, ...] | None:
        return next((found for found in (source(container_id) for source in self._sources)
                     if found), None)

    def close(self) -> None:
        for source in self._sources:
            source.close()


def _describe_users(users: Sequence[Any]) -> str:
    return ", ".join(f"{user.runtime} at {user.endpoint}" for user in users)


class RuntimeRouter(Closeable):
    """``actions.ContainerRuntime`` over a node's runtimes: each container's pause, resume,
    kill and state go to the runtime that owns it (Docker's or podman's Engine API,
    runtimes.docker.DockerRuntime; a CRI runtime, runtimes.cri.CriActions). The owner is the
    first runtime whose state call knows the container (remembered, at most `capacity`).
    ContainerNotFoundError when every runtime answered that it does not know it;
    RuntimeActionError with each failure when one could not be asked (and none knew it)."""

    def __init__(self, runtimes: Sequence[Any], *, capacity: int = 4096) -> None:
        if not runtimes:
            raise ValueError("a RuntimeRouter needs at least one runtime")
        self.runtimes = list(runtimes)
        self._capacity = capacity
        self._owners: OrderedDict[str, Any] = OrderedDict()

    @classmethod
    def open(cls, endpoints: Sequence[RuntimeEndpoint]) -> RuntimeRouter:
        from driftwarden.agent.runtimes.cri import CriActions
        from driftwarden.agent.runtimes.docker import DockerRuntime

        return cls([CriActions(e.url) if e.api == "cri"
                    else DockerRuntime(e.url, runtime=e.runtime) for e in endpoints])

    def _route(self, container_id: str) -> tuple[Any, RuntimeState | None]:
        """The container's runtime, and its state when finding the owner asked for it."""
        owner = self._owners.get(container_id)
        if owner is not None:
            self._owners.move_to_end(container_id)
            return owner, None
        failures = []
        for runtime in self.runtimes:
            try:
                state = runtime.state(container_id)
            except ContainerNotFoundError:
                continue
            except RuntimeActionError as exc:
                failures.append(str(exc))
                continue
            self._owners[container_id] = runtime
            if len(self._owners) > self._capacity:
                self._owners.popitem(last=False)
            return runtime, state
        if failures:
            raise RuntimeActionError("; ".join(failures))
        raise ContainerNotFoundError(
            f"no runtime knows container {container_id[:12]} (asked "
            f"{_describe_users(self.runtimes)})")

    def _call(self, container_id: str, call: Callable[[Any], Any]) -> Any:
        owner, _ = self._route(container_id)
        try:
            return call(owner)
        except ContainerNotFoundError:
            self._owners.pop(container_id, None)  # removed: the next request asks them all
            raise

    def state(self, container_id: str) -> RuntimeState:
        _, state = self._route(container_id)
        if state is not None:
            return state
        return self._call(container_id, lambda runtime: runtime.state(container_id))

    def pause(self, container_id: str) -> None:
        self._call(container_id, lambda runtime: runtime.pause(container_id))

    def unpause(self, container_id: str) -> None:
        self._call(container_id, lambda runtime: runtime.unpause(container_id))

    def kill(self, container_id: str) -> None:
        self._call(container_id, lambda runtime: runtime.kill(container_id))

    def close(self) -> None:
        for runtime in self.runtimes:
            runtime.close()


ContainerRow = tuple[str, str | None, str | None, str | None]


class RunningContainers(Closeable):
    """``(id, name, image_id, image_name)`` of the containers running under every runtime of
    the node, for the heartbeats (the collector routes an operator's action to the node that
    lists the container). A runtime that cannot answer contributes its last list (actions
    routed here then report its error), and the failure is logged once per streak."""

    def __init__(self, endpoints: Sequence[RuntimeEndpoint]) -> None:
        from driftwarden.agent.runtimes.cri import CriContainers
        from driftwarden.agent.runtimes.docker import DockerContainers

        self._sources: list[tuple[RuntimeEndpoint, Any]] = [
            (e, CriContainers(e.url) if e.api == "cri" else DockerContainers(e.url))
            for e in endpoints]
        self._last: dict[str, tuple[ContainerRow, ...]] = {}
        self._failing: set[str] = set()

    def __call__(self) -> tuple[ContainerRow, ...]:
        rows: dict[str, ContainerRow] = {}
        for endpoint, source in self._sources:
            try:
                listed = self._last[endpoint.url] = tuple(source())
            except RuntimeActionError as exc:
                if endpoint.url not in self._failing:
                    log.warning("cannot list %s's containers for the collector (%s); sending "
                                "the last known list", endpoint.runtime, exc)
                self._failing.add(endpoint.url)
                listed = self._last.get(endpoint.url, ())
            else:
                self._failing.discard(endpoint.url)
            for row in listed:
                rows.setdefault(row[0], row)
        return tuple(rows.values())

    def close(self) -> None:
        for _, source in self._sources:
            source.close()
