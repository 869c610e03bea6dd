"""Docker: every conversation the agent has with the Docker Engine API, through one client.

:class:`DockerEngine` is the only place that makes a Docker client (docker-py's low-level
``APIClient``). It connects on first use (docker-py asks the daemon for its API version when the
client is made, so the agent may start before dockerd), makes a new client after a transport
failure (dockerd restarted, maybe as another version), serialises calls (requests sessions are
not thread-safe) and words every failure one way:

    ContainerNotFoundError   "docker <call>: <the daemon's explanation>"       (404)
    RuntimeActionError       "docker <call>: <the daemon's explanation>"       (other API errors)
    RuntimeActionError       "docker unreachable at <url>: <OS error or text>" (no answer)

Each user below holds its own engine (its own connection and timeout), so a slow pause never
holds up the attribution worker:

- :class:`DockerMetadata` and :class:`DockerEventWatcher`: the runtime-metadata provider
  (``runtimes.base.WatchableMetadataProvider``) the attributor asks for names, images and pods.
- :class:`DockerRuntime`: pause, unpause, kill and state for ``actions.ContainerActions``.
- :class:`DockerContainers`: the running containers, for the heartbeats to the collector.
- :class:`DockerGraphDriver`: a container's storage layers, for ``detect.LayersCache``.
- :meth:`DockerEngine.ping`: ``GET /_ping`` for ``doctor``.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from driftwarden.agent.runtimes.base import (
    POD_NAME_LABEL,
    POD_NAMESPACE_LABEL,
    POD_UID_LABEL,
    Closeable,
    ContainerEvent,
    ContainerEventAction,
    ContainerInfo,
    RuntimeEventWatcher,
    RuntimeState,
    image_key,
    normalize_image_reference,
    owner_workload,
    parse_runtime_time,
    pick_repo_digest,
    short_reason,
)
from driftwarden.core.errors import (
    ContainerNotFoundError,
    MetadataUnavailableError,
    RuntimeActionError,
)

log = logging.getLogger(__name__)

__all__ = [
    "ACTION_TIMEOUT",
    "DEFAULT_DOCKER_URL",
    "REQUEST_TIMEOUT",
    "DockerContainers",
    "DockerEngine",
    "DockerEventWatcher",
    "DockerGraphDriver",
    "DockerImageLayers",
    "DockerMetadata",
    "DockerRuntime",
    "container_info_from_docker",
    "parse_docker_event",
]

DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
REQUEST_TIMEOUT = 5.0  # seconds: inspect, list, ping (answered from dockerd's memory)
ACTION_TIMEOUT = 30.0  # seconds: pause/unpause/kill wait on the freezer or the process

_T = TypeVar("_T")


# --------------------------------------------------------------------------- the client


def _transport_errors() -> tuple[type[BaseException], ...]:
    import docker.errors
    import requests.exceptions

    return (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


def _transport_reason(exc: BaseException) -> str:
    """The OS error under a transport failure ("Connection refused (ECONNREFUSED)"), found in
    the exception's causes and arguments (requests and urllib3 wrap it twice); else its text."""
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        code = current.errno if isinstance(current, OSError) else None
        if isinstance(code, int) and code > 0:
            return f"{os.strerror(code)} ({errno.errorcode.get(code, f'errno {code}')})"
        pending.extend(inner for inner in (current.__cause__, current.__context__, *current.args)
                       if isinstance(inner, BaseException))
    return short_reason(exc)


def _explanation(exc: Any) -> str:
    return getattr(exc, "explanation", None) or short_reason(exc)


def _close_quietly(closeable: Any, what: str) -> None:
    try:
        closeable.close()
    except Exception:  # already broken; closing must not mask the real error
        log.debug("closing %s failed", what, exc_info=True)


class DockerEngine(Closeable):
    """One Docker Engine API endpoint (see the module docstring): `call` runs a request on
    docker-py's ``APIClient`` and turns every failure into a RuntimeActionError."""

    def __init__(self, base_url: str = DEFAULT_DOCKER_URL, *,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self._base_url = base_url
        self._timeout = timeout
        self._client: Any = None
        self._lock = threading.Lock()  # guards _client; never held during a request
        self._request_lock = threading.Lock()  # one API conversation at a time

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def timeout(self) -> float:
        return self._timeout

    def call(self, what: str, request: Callable[[Any], _T]) -> _T:
        """``request(api_client)``'s answer. `what` names the call in error messages.

        Raises ContainerNotFoundError (the daemon answered 404) or RuntimeActionError (another
        API error, or no answer)."""
        import docker.errors

        with self._request_lock:
            client = self._client_or_raise()
            try:
                return request(client)
            except docker.errors.NotFound as exc:
                raise ContainerNotFoundError(f"docker {what}: {_explanation(exc)}") from exc
            except docker.errors.APIError as exc:  # answered, but not usefully (409, 5xx, ...)
                raise RuntimeActionError(f"docker {what}: {_explanation(exc)}") from exc
            except _transport_errors() as exc:
                self._drop_client(client)
                raise self._unreachable(exc) from exc

    def ping(self) -> str:
        """``GET /_ping``: the daemon's API version ("" when it does not say). One request
        without version negotiation, so any daemon that answers at all is seen answering."""
        import docker.constants

        with self._request_lock:
            try:
                client = self._new_client(docker.constants.MINIMUM_DOCKER_API_VERSION)
                try:
                    response = client.get(f"{client.base_url}/_ping", timeout=self._timeout)
                finally:
                    _close_quietly(client, "docker client")
            except _transport_errors() as exc:
                raise self._unreachable(exc) from exc
        if response.status_code != 200:
            raise RuntimeActionError(f"docker at {self._base_url} answered /_ping with "
                                     f"{response.status_code} {response.reason or ''}".rstrip())
        return response.headers.get("Api-Version", "")

    def close(self) -> None:
        """Drop the connection (the next call makes a new one); safe from any thread."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            _close_quietly(client, "docker client")

    def _new_client(self, version: str = "auto") -> Any:
        import docker

        return docker.APIClient(base_url=self._base_url, timeout=self._timeout, version=version)

    def _client_or_raise(self) -> Any:
        with self._lock:
            client = self._client
        if client is not None:
            return client
        try:
            client = self._new_client()  # connects: API version negotiation
        except _transport_errors() as exc:
            raise self._unreachable(exc) from exc
        with self._lock:
            self._client = client
        return client

    def _drop_client(self, client: Any) -> None:
        # Re-negotiate on the next call: the daemon may come back as another version.
        with self._lock:
            if self._client is client:
                self._client = None
        _close_quietly(client, "docker client")

    def _unreachable(self, exc: BaseException) -> RuntimeActionError:
        return RuntimeActionError(
            f"docker unreachable at {self._base_url}: {_transport_reason(exc)}")


class _EngineUser(Closeable):
    """A user of the Engine API with a connection of its own (`_engine`); closeable."""

    DEFAULT_TIMEOUT = REQUEST_TIMEOUT

    def __init__(self, base_url: str = DEFAULT_DOCKER_URL, *,
                 timeout: float | None = None) -> None:
        self._engine = DockerEngine(
            base_url, timeout=self.DEFAULT_TIMEOUT if timeout is None else timeout)

    @property
    def base_url(self) -> str:
        return self._engine.base_url

    def close(self) -> None:
        self._engine.close()


# --------------------------------------------------------------------------- metadata


_IMAGE_ID_REFERENCE_RE = re.compile(r"(?:sha256:)?(?P<hex>[0-9a-f]{12,64})")


def _is_image_id_reference(reference: str, image_id: str) -> bool:
    match = _IMAGE_ID_REFERENCE_RE.fullmatch(reference)
    return bool(match) and image_id.removeprefix("sha256:").startswith(match["hex"])


def container_info_from_docker(
    attrs: Mapping[str, Any], *, image_tags: Sequence[str] = (),
    repo_digests: Sequence[str] = (), runtime: str = "docker",
) -> ContainerInfo:
    """Build ContainerInfo from a Docker `GET /containers/{id}/json` answer. Pure.

    `image_tags` and `repo_digests` are the image's RepoTags and RepoDigests: the tags name an
    image a container was created from by id (which carries no human name); a repo digest, when
    the image came from a registry, is its key (runtimes.base.image_key).
    """
    config = attrs.get("Config") or {}
    labels = config.get("Labels") or {}
    image_id = attrs.get("Image") or ""
    requested = config.get("Image") or ""
    if not requested or _is_image_id_reference(requested, image_id):
        image_name = image_tags[0] if image_tags else requested or image_id
    else:
        image_name = normalize_image_reference(requested)
    repo_digest = pick_repo_digest(repo_digests, image_name)
    pod = labels.get(POD_NAME_LABEL)
    return ContainerInfo(
        id=attrs.get("Id") or "",
        name=attrs.get("Name") or "",
        image_id=image_key(image_id, repo_digest),
        image_name=image_name,
        labels=labels,
        pod=pod,
        namespace=labels.get(POD_NAMESPACE_LABEL),
        runtime=runtime,
        started_at=parse_runtime_time((attrs.get("State") or {}).get("StartedAt")),
        image_digest=repo_digest,
        pod_uid=labels.get(POD_UID_LABEL),
        workload=owner_workload(pod, labels),
        pid=int((attrs.get("State") or {}).get("Pid") or 0),
        graph_driver=attrs.get("GraphDriver") or None,
    )


# podman's Docker-compatible API names a removal "remove" (Docker: "destroy")
_EVENT_SYNONYMS = {"remove": ContainerEventAction.DESTROY}
_OURS = frozenset({ContainerEventAction.RESYNC, ContainerEventAction.UNREACHABLE})


def parse_docker_event(raw: Mapping[str, Any]) -> ContainerEvent | None:
    """A Docker `/events` message (or one of podman's Docker-compatible API) -> ContainerEvent,
    or None when it is not one we follow."""
    if raw.get("Type", "container") != "container":
        return None
    word = raw.get("Action") or raw.get("status") or ""
    try:
        action = _EVENT_SYNONYMS.get(word) or ContainerEventAction(word)
    except ValueError:
        return None
    if action in _OURS:
        return None  # the watcher's own words, never the runtime's
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


def _image_references(api: Any, image_id: str) -> tuple[Sequence[str], Sequence[str]]:
    """The image's (RepoTags, RepoDigests); empty when it was removed meanwhile."""
    import docker.errors

    try:
        image = api.inspect_image(image_id)
    except docker.errors.NotFound:
        return (), ()
    return tuple(image.get("RepoTags") or ()), tuple(image.get("RepoDigests") or ())


def _inspect(api: Any, container_id: str, runtime: str) -> ContainerInfo:
    attrs = api.inspect_container(container_id)
    image_id = attrs.get("Image") or ""
    tags, digests = _image_references(api, image_id) if image_id else ((), ())
    return container_info_from_docker(attrs, image_tags=tags, repo_digests=digests,
                                      runtime=runtime)


class DockerMetadata(_EngineUser):
    """MetadataProvider over the Docker Engine API, with an event watcher.

    An agent started before dockerd (or outliving a dockerd restart) recovers by itself: the
    engine reconnects on the next call. The event watcher has its own connection. `runtime`
    names what answers: "docker", or "podman" for podman's Docker-compatible socket.
    """

    def __init__(self, base_url: str = DEFAULT_DOCKER_URL, *, timeout: float | None = None,
                 runtime: str = "docker") -> None:
        super().__init__(base_url, timeout=timeout)
        self.runtime = runtime

    @property
    def endpoint(self) -> str:
        return self._engine.base_url

    def inspect(self, container_id: str) -> ContainerInfo | None:
        """By id or name. Raises MetadataUnavailableError when Docker cannot answer."""
        try:
            return self._engine.call(
                "inspect", lambda api: _inspect(api, container_id, self.runtime))
        except ContainerNotFoundError:
            return None
        except RuntimeActionError as exc:
            raise MetadataUnavailableError(str(exc)) from exc

    def watch(self, on_event: Callable[[ContainerEvent], None]) -> DockerEventWatcher:
        return DockerEventWatcher(self._engine.base_url, on_event, timeout=self._engine.timeout,
                                  runtime=self.runtime)


class DockerEventWatcher(RuntimeEventWatcher):
    """Follows Docker container events on a thread and hands them to a callback
    (runtimes.base.RuntimeEventWatcher: reconnects with backoff, a RESYNC on every connect).
    `stop` closes the stream socket, which unblocks the reading thread. `runtime` names what
    answers ("podman" behind podman's Docker-compatible socket), in its RESYNC and UNREACHABLE
    events and its messages."""

    # "create": a container is inspected before it starts, so one that lives a few
    # milliseconds (`docker run --rm`, `podman run --rm`) still has its name, image and layers
    # when its events come. podman filters on its own event names: its removal is "remove".
    _FOLLOWED = ("create", "start", "die", "destroy", "rename", "remove")

    def __init__(
        self,
        base_url: str,
        on_event: Callable[[ContainerEvent], None],
        *,
        timeout: float = REQUEST_TIMEOUT,
        initial_backoff: float = 0.5,
        max_backoff: float = 5.0,
        runtime: str = "docker",
    ) -> None:
        super().__init__(on_event, what=runtime, initial_backoff=initial_backoff,
                         max_backoff=max_backoff)
        self._base_url = base_url
        self._timeout = timeout
        self._lock = threading.Lock()
        self._engine: DockerEngine | None = None
        self._stream: Any = None

    def _follow(self) -> bool:
        """Follow one connection until it ends; True if it connected."""
        engine = DockerEngine(self._base_url, timeout=self._timeout)
        with self._lock:
            if self._stopping.is_set():
                return False
            self._engine = engine
        try:
            stream = engine.call("events", lambda api: api.events(
                decode=True, filters={"type": "container", "event": list(self._FOLLOWED)}))
            with self._lock:
                if self._stopping.is_set():
                    stream.close()
                    return False
                self._stream = stream
            self._announce()
            for raw in stream:
                event = parse_docker_event(raw)
                if event is not None:
                    self._deliver(event)
            return True
        finally:
            self._connected.clear()
            self._interrupt()
            engine.close()  # stop() may have closed it before its client was made

    def _interrupt(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
            engine, self._engine = self._engine, None
        if stream is not None:
            _close_quietly(stream, "docker event stream")
        if engine is not None:
            engine.close()


# --------------------------------------------------------------------------- the other users


class DockerRuntime(_EngineUser):
    """actions.ContainerRuntime over the Docker Engine API: pause is the runtime's cgroup
    freezer, kill is SIGKILL. Raises ContainerNotFoundError and RuntimeActionError."""

    DEFAULT_TIMEOUT = ACTION_TIMEOUT

    def __init__(self, base_url: str = DEFAULT_DOCKER_URL, *, timeout: float | None = None,
                 runtime: str = "docker") -> None:
        super().__init__(base_url, timeout=timeout)
        self.runtime = runtime  # "docker", or "podman" behind its Docker-compatible socket

    @property
    def endpoint(self) -> str:
        return self._engine.base_url

    def state(self, container_id: str) -> RuntimeState:
        info = self._engine.call("inspect", lambda api: api.inspect_container(container_id))
        state = info.get("State") or {}
        return RuntimeState(status=str(state.get("Status", "unknown")),
                            running=bool(state.get("Running")), paused=bool(state.get("Paused")),
                            pid=int(state.get("Pid") or 0))

    def pause(self, container_id: str) -> None:
        self._engine.call("pause", lambda api: api.pause(container_id))

    def unpause(self, container_id: str) -> None:
        self._engine.call("unpause", lambda api: api.unpause(container_id))

    def kill(self, container_id: str) -> None:
        self._engine.call("kill", lambda api: api.kill(container_id, signal="SIGKILL"))


ContainerRow = tuple[str, str | None, str | None, str | None]


class DockerContainers(_EngineUser):
    """``(id, name, image_id, image_name)`` of the containers running here, for the heartbeats
    (runtimes.registry.RunningContainers, which keeps the last list while Docker is away).
    Raises RuntimeActionError."""

    def __call__(self) -> tuple[ContainerRow, ...]:
        rows = self._engine.call("list containers", lambda api: api.containers())
        return tuple(
            (row["Id"], (row.get("Names") or ["/"])[0].lstrip("/") or None,
             row.get("ImageID") or None, row.get("Image") or None) for row in rows)


class DockerGraphDriver(_EngineUser):
    """`container id -> GraphDriver` (the storage driver's layer directories) for
    detect.LayersCache; None when the container is gone or Docker cannot answer."""

    def __call__(self, container_id: str) -> dict | None:
        try:
            attrs = self._engine.call("inspect", lambda api: api.inspect_container(container_id))
        except RuntimeActionError as exc:  # no layers; a live process may show them later
            log.debug("no GraphDriver for %s: %s", container_id[:12], exc)
            return None
        return attrs.get("GraphDriver")


class DockerImageLayers(_EngineUser):
    """`container id -> its image's layer digests` (RootFS.Layers, base first), which the
    collector compares between two versions of an image; None when Docker cannot say."""

    def __call__(self, container_id: str) -> tuple[str, ...] | None:
        def layers(api: Any) -> Any:
            image_id = api.inspect_container(container_id).get("Image")
            return (api.inspect_image(image_id).get("RootFS") or {}).get("Layers") \
                if image_id else None

        try:
            found = self._engine.call("image layers", layers)
        except RuntimeActionError as exc:
            log.debug("no image layers for %s: %s", container_id[:12], exc)
            return None
        return tuple(str(layer) for layer in found) if found else None
