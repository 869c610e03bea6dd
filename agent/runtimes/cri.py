"""CRI: what a Kubernetes node's runtime (containerd's CRI plugin, CRI-O) says about its
containers, through the Container Runtime Interface (`runtime.v1`, gRPC on a unix socket): the
same calls the kubelet makes, read-only.

:class:`CriRuntime` is the one connection to one endpoint (stubs from the PyPI package
``container-runtime-interface-api``, module ``cri_api.v1``). It words every failure one way:

    ContainerNotFoundError   "<runtime> <call>: <the runtime's explanation>"         (NOT_FOUND)
    RuntimeNotServedError    "<runtime> at <endpoint> does not serve the CRI ..."    (no service)
    RuntimeActionError       "<runtime> unreachable at <endpoint>: <reason>"         (no answer)
    RuntimeActionError       "<runtime> <call>: <status code>: <explanation>"        (the rest)

:class:`CriGraphDriver` gives a container's storage layers (the overlay at its init process's
root) for drift detection when the event's own process is gone. :class:`CriActions` pauses
(the cgroup freezer: the CRI has no pause), resumes and kills (``StopContainer``, timeout 0)
for ``actions.ContainerActions``; :class:`CriContainers` lists the running containers for the
heartbeats.

:class:`CriMetadata` is the metadata provider (``runtimes.base.WatchableMetadataProvider``):
``ListContainers`` (the container's pod sandbox and image), ``ContainerStatus`` with verbose info
(names, start time, the init pid and cgroup path), ``PodSandboxStatus`` (pod name, namespace,
uid, labels), ``ImageStatus`` (the image's id and repo digests); pods and images are cached
briefly, containers are the attributor's to cache. While the container runs, its layers (the
overlay at its init's root) come with it, so drift can be judged after it exited (the runtime
keeps an exited container's snapshot until the container is removed, but says nothing of
where it is). :class:`CriEventWatcher` follows ``GetContainerEvents`` where the runtime serves
it (CRI-O, containerd 1.7+); containerd 1.6 does not (UNIMPLEMENTED), and then the watcher lists
the containers every `poll_interval` seconds and reports what was created, started, stopped
and went away (a container that came and went between two listings is still reported, as it
stays listed, exited, until it is removed).

The functions that turn CRI answers into records (`container_info_from_cri`,
`parse_verbose_info`, `parse_container_event`, `container_events_between`) are pure.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from driftwarden.agent.runtimes.base import (
    CONTAINER_NAME_LABEL,
    POD_NAME_LABEL,
    POD_NAMESPACE_LABEL,
    POD_UID_LABEL,
    Closeable,
    ContainerEvent,
    ContainerEventAction,
    ContainerInfo,
    RuntimeEventWatcher,
    RuntimeState,
    digest_of,
    familiar_image_name,
    image_key,
    normalize_image_reference,
    owner_workload,
    pick_repo_digest,
    root_overlay,
    short_reason,
)
from driftwarden.core.errors import (
    ContainerNotFoundError,
    MetadataUnavailableError,
    RuntimeActionError,
    RuntimeNotServedError,
)

log = logging.getLogger(__name__)

__all__ = [
    "REQUEST_TIMEOUT",
    "CriActions",
    "CriContainers",
    "CriEventWatcher",
    "CriGraphDriver",
    "CriImageLayers",
    "CriMetadata",
    "CriRuntime",
    "VerboseInfo",
    "container_events_between",
    "container_info_from_cri",
    "guess_runtime_name",
    "image_layers_from_verbose",
    "parse_container_event",
    "parse_verbose_info",
    "sandbox_info_from_cri",
]

REQUEST_TIMEOUT = 5.0  # seconds per call: the runtime answers these from memory
STUBS_HINT = ("the CRI stubs are missing: pip install --no-deps "
              "container-runtime-interface-api (`make setup` does)")
_FULL_ID_RE = re.compile(r"[0-9a-f]{64}")
_T = TypeVar("_T")
_CHANNEL_OPTIONS = (
    # a unix socket: no proxy applies; say so, whatever the environment holds
    ("grpc.enable_http_proxy", 0),
    # After a failed connect gRPC waits before it tries again, and fails every call meanwhile;
    # its default wait grows to 2 minutes, so an agent would keep calling a restarted runtime
    # unreachable long after it is back (4 s after a 20 s containerd restart, measured). A
    # local socket is cheap to try: at most every second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # gRPC shares connections between channels to the same address by default: a new channel
    # (CriRuntime.call's retry) would find the old connection still waiting to reconnect
    ("grpc.use_local_subchannel_pool", 1),
)


def guess_runtime_name(endpoint: str) -> str:
    """What a CRI socket's path says runs behind it, until the runtime's Version says."""
    return "cri-o" if "crio" in endpoint.rsplit("/", 1)[-1] or "/crio/" in endpoint \
        else "containerd"


def _connect_reason(details: str) -> str:
    """gRPC's "failed to connect to all addresses; last error: ...: connect failed: addr: ...
    error: No such file or directory" -> "No such file or directory"."""
    marker = " error: "
    if "connect failed" in details and marker in details:
        return details.rsplit(marker, 1)[-1].strip() or details
    return details


def _api() -> Any:
    try:
        from cri_api.v1 import api_pb2
    except ImportError as exc:
        raise RuntimeActionError(STUBS_HINT) from exc
    return api_pb2


# --------------------------------------------------------------------------- the client


class CriRuntime(Closeable):
    """One CRI endpoint ("unix:///run/containerd/containerd.sock"): `call` runs one request on
    the RuntimeService or ImageService stub and turns every failure into a RuntimeActionError.

    gRPC connects on the first call and reconnects by itself after the runtime restarts
    (within a second: `_CHANNEL_OPTIONS`), so an agent started before the runtime (or
    outliving a restart) needs nothing more."""

    def __init__(self, endpoint: str, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self._endpoint = endpoint
        self._timeout = timeout
        self.runtime_name = guess_runtime_name(endpoint)
        self._lock = threading.Lock()
        self._channel: Any = None
        self._runtime_stub: Any = None
        self._image_stub: Any = None

    @property
    def endpoint(self) -> str:
        return self._endpoint

    @property
    def timeout(self) -> float:
        return self._timeout

    @property
    def api(self) -> Any:
        """cri_api.v1's messages (RuntimeActionError with the fix when not installed)."""
        return _api()

    def _stubs(self, *, renew: Any = None) -> tuple[Any, Any, Any]:
        """(channel, runtime stub, image stub); `renew`: a channel a call found unavailable,
        replaced by a new one unless another thread did so already."""
        stale = None
        with self._lock:
            if renew is not None and self._channel is renew:
                stale, self._channel = self._channel, None
            if self._channel is None:
                import grpc

                try:
                    from cri_api.v1 import api_pb2_grpc
                except ImportError as exc:
                    raise RuntimeActionError(STUBS_HINT) from exc
                self._channel = grpc.insecure_channel(self._endpoint, options=_CHANNEL_OPTIONS)
                self._runtime_stub = api_pb2_grpc.RuntimeServiceStub(self._channel)
                self._image_stub = api_pb2_grpc.ImageServiceStub(self._channel)
            answer = (self._channel, self._runtime_stub, self._image_stub)
        if stale is not None:
            stale.close()  # its calls in flight end CANCELLED, worded as any failure
        return answer

    def call(self, what: str, request: Callable[[Any, Any], _T]) -> _T:
        """``request(runtime_service, image_service)``'s answer; `what` names the call.

        A call that finds the runtime unavailable is tried once more on a new channel: after
        a failed connect gRPC waits (up to a second here) before it connects again and fails
        every call meanwhile, so a runtime that has just come back would be called unreachable
        for that long, and a container made then would be given up on. A new channel connects
        at once, and a refused connect to a unix socket costs nothing."""
        import grpc

        channel, runtime_stub, image_stub = self._stubs()
        try:
            return request(runtime_stub, image_stub)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise self.error(what, exc) from exc
        except ValueError:  # "Cannot invoke RPC on closed channel": another call renewed it
            pass
        _, runtime_stub, image_stub = self._stubs(renew=channel)
        try:
            return request(runtime_stub, image_stub)
        except grpc.RpcError as exc:
            raise self.error(what, exc) from exc

    def error(self, what: str, exc: Any) -> RuntimeActionError:
        """A gRPC failure of call `what`, worded (see the module docstring)."""
        import grpc

        code = exc.code() if hasattr(exc, "code") else None
        details = (exc.details() if hasattr(exc, "details") else None) or short_reason(exc)
        name = self.runtime_name
        if code == grpc.StatusCode.NOT_FOUND:
            return ContainerNotFoundError(f"{name} {what}: {details}")
        # every CRI runtime serves Version: UNIMPLEMENTED there (or "unknown service" from a
        # Go server anywhere) means no RuntimeService at all
        if code == grpc.StatusCode.UNIMPLEMENTED and (what == "version"
                                                      or "unknown service" in details):
            return RuntimeNotServedError(
                f"{name} at {self._endpoint} does not serve the CRI (runtime.v1): {details}; "
                "its CRI plugin is off (as in Docker's own containerd, whose containers are "
                "asked through Docker)")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            reason = (f"no answer within {self._timeout:g} s"
                      if code == grpc.StatusCode.DEADLINE_EXCEEDED else _connect_reason(details))
            return RuntimeActionError(f"{name} unreachable at {self._endpoint}: {reason}")
        code_name = code.name if code is not None else type(exc).__name__
        return RuntimeActionError(f"{name} {what}: {code_name}: {details}")

    def container_events(self) -> Any:
        """An open GetContainerEvents stream (iterate it; `cancel()` ends it). Failures arrive
        while iterating, as grpc.RpcError (see `error`)."""
        _, runtime_stub, _ = self._stubs()
        return runtime_stub.GetContainerEvents(self.api.GetEventsRequest())

    def container_status(self, container_id: str) -> tuple[Any, VerboseInfo]:
        """ContainerStatus with its verbose info: (the ContainerStatus, what the info says)."""
        api = self.api
        answer = self.call("container status", lambda rt, _: rt.ContainerStatus(
            api.ContainerStatusRequest(container_id=container_id, verbose=True),
            timeout=self._timeout))
        return answer.status, parse_verbose_info(answer.info)

    def version(self) -> Any:
        """The runtime's VersionResponse; learns its name ("containerd", "cri-o")."""
        api = self.api
        answer = self.call("version", lambda rt, _: rt.Version(api.VersionRequest(),
                                                                 timeout=self._timeout))
        if answer.runtime_name:
            self.runtime_name = answer.runtime_name
        return answer

    def close(self) -> None:
        """Close the channel (ends any stream on it); the next call makes a new one."""
        with self._lock:
            channel, self._channel = self._channel, None
            self._runtime_stub = self._image_stub = None
        if channel is not None:
            channel.close()


# --------------------------------------------------------------------------- parsing


@dataclass(frozen=True, slots=True)
class VerboseInfo:
    """What ContainerStatus's verbose ``info["info"]`` JSON says (containerd and CRI-O both
    write these keys): the init process, the cgroup path runc was given, the pod sandbox."""

    pid: int = 0
    cgroup_path: str | None = None
    sandbox_id: str | None = None
    image: str | None = None  # a pod sandbox's image (containerd says it; "pause")


def parse_verbose_info(info: Mapping[str, str]) -> VerboseInfo:
    """ContainerStatusResponse.info -> VerboseInfo; missing or unreadable parts are left out."""
    try:
        data = json.loads(info.get("info") or "{}")
    except ValueError:
        return VerboseInfo()
    if not isinstance(data, dict):
        return VerboseInfo()
    linux = (data.get("runtimeSpec") or {}).get("linux") or {}
    pid = data.get("pid")
    return VerboseInfo(
        pid=pid if isinstance(pid, int) and pid > 0 else 0,
        cgroup_path=linux.get("cgroupsPath") or None,
        sandbox_id=data.get("sandboxID") or None,
        image=data.get("image") if isinstance(data.get("image"), str) and data["image"] else None,
    )


def _is_image_id(reference: str) -> bool:
    bare = reference.removeprefix("sha256:")
    return bool(_FULL_ID_RE.fullmatch(bare))


def _image_name(status: Any, image: Any) -> str:
    """The image's human name: what the container asked for when it is a name (the kubelet
    passes the image id and, since 1.29, the name the user wrote), else the image's first tag."""
    spec = status.image
    candidates = [spec.image, getattr(spec, "user_specified_image", ""),
                  *(image.repo_tags if image is not None else ())]
    for candidate in candidates:
        if candidate and not _is_image_id(candidate) and "@" not in candidate:
            return familiar_image_name(normalize_image_reference(candidate))
    for candidate in candidates:  # only digests: "name@sha256:..." still names the repository
        if candidate and not _is_image_id(candidate):
            return familiar_image_name(candidate)
    return status.image_ref or spec.image


def _config_digest(status: Any, image: Any) -> str:
    """The image's config digest ("sha256:..."): ImageStatus's id, else the container's
    image_id (CRI 1.31+), else its image_ref when that is one (containerd's is)."""
    return _config_digest_of(image.id if image is not None else "",
                             getattr(status, "image_id", ""), status.image_ref)


def _config_digest_of(*candidates: str) -> str:
    """The first of `candidates` that is an image id, as "sha256:..."; "" when none is."""
    for candidate in candidates:
        if candidate and _is_image_id(candidate):
            return candidate if candidate.startswith("sha256:") else f"sha256:{candidate}"
    return ""


def container_info_from_cri(status: Any, *, pod: Any = None, image: Any = None,
                            verbose: VerboseInfo | None = None,
                            runtime: str = "containerd",
                            graph_driver: Mapping[str, Any] | None = None) -> ContainerInfo:
    """ContainerInfo from CRI answers: a ContainerStatus, its PodSandboxStatus and the
    ImageStatus's Image (either may be None: the kubelet's labels on the container still
    name the pod), and the layers seen at its init's root when it runs. Pure; the messages
    may come from a recording."""
    container_labels = dict(status.labels)
    pod_labels = dict(pod.labels) if pod is not None else {}
    labels = {**pod_labels, **container_labels}
    pod_meta = pod.metadata if pod is not None else None
    pod_name = (pod_meta.name if pod_meta is not None else "") or labels.get(POD_NAME_LABEL)
    namespace = ((pod_meta.namespace if pod_meta is not None else "")
                 or labels.get(POD_NAMESPACE_LABEL))
    pod_uid = (pod_meta.uid if pod_meta is not None else "") or labels.get(POD_UID_LABEL)
    image_name = _image_name(status, image)
    repo_digests = list(image.repo_digests) if image is not None else []
    if digest_of(status.image_ref) and "@" in status.image_ref:
        repo_digests.append(status.image_ref)  # CRI-O's image_ref is a repo digest
    repo_digest = pick_repo_digest(repo_digests, image_name)
    config_digest = _config_digest(status, image)
    return ContainerInfo(
        id=status.id,
        name=status.metadata.name or labels.get(CONTAINER_NAME_LABEL) or status.id[:12],
        image_id=image_key(config_digest, repo_digest) or status.image_ref,
        image_name=image_name,
        labels=labels,
        pod=pod_name or None,
        namespace=namespace or None,
        runtime=runtime,
        started_at=status.started_at / 1e9 if status.started_at > 0 else None,
        image_digest=repo_digest,
        pod_uid=pod_uid or None,
        workload=owner_workload(pod_name, pod_labels or labels),
        pid=verbose.pid if verbose is not None else 0,
        graph_driver=graph_driver,
    )


SANDBOX_NAME = "POD"  # a pod sandbox's container name (as the kubelet named it under Docker)


def sandbox_info_from_cri(status: Any, *, verbose: VerboseInfo | None = None,
                          image: Any = None, runtime: str = "containerd",
                          graph_driver: Mapping[str, Any] | None = None) -> ContainerInfo:
    """ContainerInfo for a pod's sandbox (its "pause" container) from its PodSandboxStatus
    and, when the runtime names the sandbox's image in its verbose info, that ImageStatus's
    Image. The CRI lists sandboxes apart from containers, but a sandbox has a cgroup and a
    process of its own, and an attacker who gets into it is in the pod. Pure."""
    labels = dict(status.labels)
    meta = status.metadata
    image_ref = (verbose.image if verbose is not None else None) or ""
    image_name = familiar_image_name(normalize_image_reference(image_ref)) if image_ref else ""
    repo_digest = pick_repo_digest(list(image.repo_digests) if image is not None else [],
                                   image_name)
    config_digest = _config_digest_of(image.id if image is not None else "")
    return ContainerInfo(
        id=status.id,
        name=SANDBOX_NAME,
        image_id=image_key(config_digest, repo_digest) or "",
        image_name=image_name,
        labels=labels,
        pod=meta.name or labels.get(POD_NAME_LABEL) or None,
        namespace=meta.namespace or labels.get(POD_NAMESPACE_LABEL) or None,
        runtime=runtime,
        started_at=status.created_at / 1e9 if status.created_at > 0 else None,
        image_digest=repo_digest,
        pod_uid=meta.uid or labels.get(POD_UID_LABEL) or None,
        workload=owner_workload(meta.name, labels),
        pid=verbose.pid if verbose is not None else 0,
        graph_driver=graph_driver,
    )


_EVENT_ACTIONS = {
    0: ContainerEventAction.CREATE,  # CONTAINER_CREATED_EVENT: described before it starts
    1: ContainerEventAction.START,  # CONTAINER_STARTED_EVENT
    2: ContainerEventAction.DIE,  # CONTAINER_STOPPED_EVENT
    3: ContainerEventAction.DESTROY,  # CONTAINER_DELETED_EVENT
}


def parse_container_event(event: Any) -> ContainerEvent | None:
    """A GetContainerEvents ContainerEventResponse -> ContainerEvent, or None when it is not
    one we follow."""
    action = _EVENT_ACTIONS.get(int(event.container_event_type))
    if action is None or not event.container_id:
        return None
    return ContainerEvent(action, event.container_id,
                          time=event.created_at / 1e9 if event.created_at > 0 else None)


# ContainerState values (runtime.v1)
_CREATED = 0
_RUNNING = 1
_EXITED = 2
_STATE_NAMES = {_CREATED: "created", _RUNNING: "running", _EXITED: "exited"}


def container_events_between(before: Mapping[str, int], after: Mapping[str, int]
                             ) -> list[ContainerEvent]:
    """What happened between two listings ({container id: ContainerState}), as events, in the
    order they happened: a container not listed before was created; one now running that was
    not started; one now exited that was not (running before, or created, or new: a
    container that lived less than a listing's interval) started if it was not seen running,
    then died; one no longer listed was removed. Sorted by id, for stable output."""
    events = []
    for container_id in sorted(before.keys() | after.keys()):
        old, new = before.get(container_id), after.get(container_id)
        if new is None:
            events.append(ContainerEvent(ContainerEventAction.DESTROY, container_id))
            continue
        if old is None:
            events.append(ContainerEvent(ContainerEventAction.CREATE, container_id))
        if new in (_RUNNING, _EXITED) and old not in (_RUNNING, _EXITED):
            events.append(ContainerEvent(ContainerEventAction.START, container_id))
        if new == _EXITED and old != _EXITED:
            events.append(ContainerEvent(ContainerEventAction.DIE, container_id))
    return events


# --------------------------------------------------------------------------- metadata


class _TtlCache:
    """key -> value for `ttl` seconds, at most `capacity` entries (oldest dropped)."""

    def __init__(self, ttl: float, capacity: int, clock: Callable[[], float]) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, load: Callable[[], Any]) -> Any:
        now = self._clock()
        with self._lock:
            found = self._entries.get(key)
            if found is not None and found[0] > now:
                return found[1]
        value = load()
        with self._lock:
            self._entries[key] = (now + self._ttl, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
        return value


class _CriUser(Closeable):
    """A user of one CRI endpoint with a connection of its own (`_client`); closeable."""

    def __init__(self, endpoint: str, *, timeout: float = REQUEST_TIMEOUT) -> None:
        self._client = CriRuntime(endpoint, timeout=timeout)

    @property
    def endpoint(self) -> str:
        return self._client.endpoint

    @property
    def runtime(self) -> str:
        """"containerd" or "cri-o": the runtime's own word once it answered, else the
        socket's name."""
        return self._client.runtime_name

    def close(self) -> None:
        self._client.close()


class CriMetadata(_CriUser):
    """MetadataProvider over a CRI endpoint, with an event watcher (see the module docstring).

    `inspect` takes a full container id (what cgroup paths hold), an id prefix of at least 4
    digits or a container name (`trace --container`)."""

    def __init__(self, endpoint: str, *, timeout: float = REQUEST_TIMEOUT,
                 cache_seconds: float = 60.0, poll_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic, proc_root: str = "/proc") -> None:
        super().__init__(endpoint, timeout=timeout)
        self._poll_interval = poll_interval
        self._proc_root = proc_root
        self._pods = _TtlCache(cache_seconds, 1024, clock)
        self._images = _TtlCache(cache_seconds, 256, clock)
        self._identified = False

    def identify(self) -> Any:
        """The runtime's VersionResponse (raises RuntimeActionError and its subclasses)."""
        answer = self._client.version()
        self._identified = True
        return answer

    def inspect(self, container_id: str) -> ContainerInfo | None:
        """None when the runtime does not know the container; MetadataUnavailableError when
        it cannot be asked (unreachable, or no CRI served)."""
        try:
            if not self._identified:
                self.identify()
            return self._inspect(container_id)
        except ContainerNotFoundError:
            return None  # removed between two calls
        except RuntimeActionError as exc:
            raise MetadataUnavailableError(str(exc)) from exc

    def _inspect(self, wanted: str) -> ContainerInfo | None:
        container = self._find(wanted)
        if container is None:
            return self._sandbox(wanted) if _FULL_ID_RE.fullmatch(wanted) else None
        status, verbose = self._client.container_status(container.id)
        pod = self._pod(container.pod_sandbox_id)
        image = self._image(container.image_ref or status.image_ref)
        return container_info_from_cri(status, pod=pod, image=image, verbose=verbose,
                                       runtime=self.runtime,
                                       graph_driver=_layers_of_pid(self._proc_root, verbose.pid))

    def _find(self, wanted: str) -> Any:
        """The Container (ListContainers' record) by full id, else by id prefix or name (the
        running one first, then the newest)."""
        api = self._client.api
        if _FULL_ID_RE.fullmatch(wanted):
            request = api.ListContainersRequest(filter=api.ContainerFilter(id=wanted))
        else:
            request = api.ListContainersRequest()
        containers = self._client.call("list containers", lambda rt, _: rt.ListContainers(
            request, timeout=self._client.timeout)).containers
        if _FULL_ID_RE.fullmatch(wanted):
            matches = [c for c in containers if c.id == wanted]
        else:
            matches = [c for c in containers if c.metadata.name == wanted
                       or (len(wanted) >= 4 and c.id.startswith(wanted))]
        if not matches:
            return None
        return max(matches, key=lambda c: (c.state == _RUNNING, c.created_at))

    def _sandbox(self, sandbox_id: str) -> ContainerInfo | None:
        """A pod sandbox with this id (the CRI does not list sandboxes as containers); None
        when there is none."""
        api = self._client.api
        try:
            answer = self._client.call("pod sandbox status", lambda rt, _: rt.PodSandboxStatus(
                api.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id, verbose=True),
                timeout=self._client.timeout))
        except ContainerNotFoundError:
            return None
        verbose = parse_verbose_info(answer.info)
        image = self._image(verbose.image) if verbose.image else None
        return sandbox_info_from_cri(answer.status, verbose=verbose, image=image,
                                     runtime=self.runtime,
                                     graph_driver=_layers_of_pid(self._proc_root, verbose.pid))

    def _pod(self, sandbox_id: str) -> Any:
        if not sandbox_id:
            return None
        api = self._client.api

        def load() -> Any:
            try:
                return self._client.call("pod sandbox status", lambda rt, _: rt.PodSandboxStatus(
                    api.PodSandboxStatusRequest(pod_sandbox_id=sandbox_id),
                    timeout=self._client.timeout)).status
            except ContainerNotFoundError:
                return None  # the pod went first: the container's own labels name it

        return self._pods.get(sandbox_id, load)

    def _image(self, image_ref: str) -> Any:
        if not image_ref:
            return None
        api = self._client.api

        def load() -> Any:
            try:
                answer = self._client.call("image status", lambda _, im: im.ImageStatus(
                    api.ImageStatusRequest(image=api.ImageSpec(image=image_ref)),
                    timeout=self._client.timeout))
            except ContainerNotFoundError:
                return None
            # an image removed while a container still runs answers with no image
            return answer.image if answer.HasField("image") else None

        return self._images.get(image_ref, load)

    def watch(self, on_event: Callable[[ContainerEvent], None]) -> CriEventWatcher:
        return CriEventWatcher(self._client.endpoint, on_event, timeout=self._client.timeout,
                               poll_interval=self._poll_interval)


class CriGraphDriver(_CriUser):
    """`container id -> GraphDriver`-shaped layers ({"Name": "overlay", "Data": {"UpperDir",
    "LowerDir"}}) for detect.LayersCache when the event's own process is gone: the overlay at
    "/" of the container's init process (ContainerStatus's verbose pid), the snapshot the
    runtime mounted. None when the container, its init or an overlay root is not there."""

    def __init__(self, endpoint: str, *, timeout: float = REQUEST_TIMEOUT,
                 proc_root: str = "/proc") -> None:
        super().__init__(endpoint, timeout=timeout)
        self._proc_root = proc_root

    def __call__(self, container_id: str) -> dict | None:
        if not _FULL_ID_RE.fullmatch(container_id):
            return None
        try:
            _, verbose = self._client.container_status(container_id)
        except RuntimeActionError as exc:  # not ours, or not reachable: no layers from here
            log.debug("no layers for %s from %s: %s", container_id[:12],
                      self._client.endpoint, exc)
            return None
        return _layers_of_pid(self._proc_root, verbose.pid)


def _layers_of_pid(proc_root: str, pid: int) -> dict[str, Any] | None:
    """The overlay at a container init's root (runtimes.base.root_overlay); None when the
    process is gone (or was never known: pid 0)."""
    if pid <= 0:
        return None
    try:
        with open(f"{proc_root}/{pid}/mountinfo", encoding="utf-8",
                  errors="surrogateescape") as mountinfo:
            return root_overlay(mountinfo.read())
    except OSError:
        return None


# --------------------------------------------------------------------------- events


class CriEventWatcher(RuntimeEventWatcher):
    """Follows a CRI runtime's container events on a thread and hands them to a callback
    (runtimes.base.RuntimeEventWatcher: reconnects with backoff, a RESYNC on every connect).

    ``GetContainerEvents`` where served; where not (UNIMPLEMENTED: containerd 1.6), a poll of
    ``ListContainers`` every `poll_interval` seconds, diffed into the same events. `stop`
    cancels the stream, which ends a blocked read at once.
    """

    REFUSAL_WAIT = 0.2  # seconds a stream may take to be refused (UNIMPLEMENTED)

    def __init__(self, endpoint: str, on_event: Callable[[ContainerEvent], None], *,
                 timeout: float = REQUEST_TIMEOUT, poll_interval: float = 1.0,
                 initial_backoff: float = 0.5, max_backoff: float = 5.0) -> None:
        self._client = CriRuntime(endpoint, timeout=timeout)
        super().__init__(on_event, what=self._client.runtime_name,
                         initial_backoff=initial_backoff, max_backoff=max_backoff)
        self._poll_interval = poll_interval
        self._stream: Any = None
        self._stream_lock = threading.Lock()
        self.polling = False  # True once the runtime said it has no event stream

    def _stop(self, timeout: float | None) -> None:
        super()._stop(timeout)
        self._client.close()

    def _interrupt(self) -> None:
        with self._stream_lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.cancel()

    def _follow(self) -> bool:
        """One connection: the event stream, or the polls. Raises when the runtime cannot be
        asked; True once it answered."""
        self._client.version()  # answers at all, and serves the CRI
        if not self.polling:
            self._stream_events()
        if self.polling and not self._stopping.is_set():
            self._poll()
        return True

    def _stream_events(self) -> None:
        """One GetContainerEvents stream until it ends; sets `polling` when the runtime does
        not serve it. The stream is announced (RESYNC) once open: it says nothing until the
        first event, which may be far off; a runtime without it refuses it at once."""
        import grpc

        stream = self._client.container_events()
        with self._stream_lock:
            if self._stopping.is_set():
                stream.cancel()
                return
            self._stream = stream
        refused = threading.Event()
        stream.add_done_callback(lambda _: refused.set())
        try:
            if not refused.wait(self.REFUSAL_WAIT):
                self._announce()
            for raw in stream:
                if not self._connected.is_set():
                    self._announce()
                event = parse_container_event(raw)
                if event is not None:
                    self._deliver(event)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.info("%s at %s has no container event stream; listing its containers "
                         "every %g s instead", self._client.runtime_name, self._client.endpoint,
                         self._poll_interval)
                self.polling = True
                return
            if exc.code() == grpc.StatusCode.CANCELLED and self._stopping.is_set():
                return
            raise self._client.error("container events", exc) from exc
        finally:
            with self._stream_lock:
                self._stream = None

    def _poll(self) -> None:
        """List the containers every poll_interval until a call fails or the watcher stops."""
        api = self._client.api
        known: dict[str, int] | None = None
        while not self._stopping.is_set():
            listed = self._client.call("list containers", lambda rt, _: rt.ListContainers(
                api.ListContainersRequest(), timeout=self._client.timeout)).containers
            current = {c.id: int(c.state) for c in listed}
            if known is None:
                self._announce()
            else:
                for event in container_events_between(known, current):
                    self._deliver(event)
            known = current
            if self._stopping.wait(self._poll_interval):
                break



# --------------------------------------------------------------------------- the other users


ACTION_TIMEOUT = 30.0  # seconds: StopContainer waits for the container to exit


class CriActions(_CriUser):
    """actions.ContainerRuntime over a CRI endpoint. The CRI has no pause: pause and resume
    freeze and thaw the container's cgroup (agent/freezer.py; `paused` is the freezer's
    answer), found from ContainerStatus's verbose info (the init's /proc/PID/cgroup, else the
    spec's cgroupsPath). kill is ``StopContainer`` with timeout 0: SIGKILL at once; a frozen
    container dies as well (the v2 freezer lets SIGKILL through). Under Kubernetes the kubelet
    then starts a new container in its place (README, "Actions"). Raises
    ContainerNotFoundError and RuntimeActionError."""

    def __init__(self, endpoint: str, *, timeout: float = ACTION_TIMEOUT,
                 freezer: Any = None, proc_root: str = "/proc",
                 sys_fs_cgroup: str = "/sys/fs/cgroup") -> None:
        super().__init__(endpoint, timeout=timeout)
        self._freezer = freezer
        self._proc_root = proc_root
        self._sys_fs_cgroup = sys_fs_cgroup

    def freezer(self) -> Any:
        """The cgroup freezer (made on first use: this host's cgroup v2 and v1 freezer
        mounts)."""
        if self._freezer is None:
            from driftwarden.agent.freezer import CgroupFreezer, find_freezer_root
            from driftwarden.core.errors import HostSupportError
            from driftwarden.probes.loader import find_cgroup2_root

            try:
                v2_root = find_cgroup2_root(self._sys_fs_cgroup)
            except HostSupportError:
                v2_root = None
            try:
                with open(f"{self._proc_root}/self/mountinfo", encoding="utf-8",
                          errors="surrogateescape") as mountinfo:
                    v1_root = find_freezer_root(mountinfo.read())
            except OSError:
                v1_root = None
            self._freezer = CgroupFreezer(v2_root, v1_root)
        return self._freezer

    def _cgroup_paths(self, verbose: VerboseInfo) -> Any:
        from driftwarden.agent.freezer import (
            CgroupPaths,
            cgroup_path_of_spec,
            cgroup_paths_of_process,
        )

        from_process = CgroupPaths()
        if verbose.pid > 0:
            try:
                with open(f"{self._proc_root}/{verbose.pid}/cgroup", encoding="utf-8") as text:
                    from_process = cgroup_paths_of_process(text.read())
            except OSError:
                pass  # exited meanwhile: the spec says where it was
        spec = cgroup_path_of_spec(verbose.cgroup_path or "")
        return CgroupPaths(from_process.v2 or spec, from_process.freezer or spec)

    def state(self, container_id: str) -> RuntimeState:
        status, verbose = self._client.container_status(container_id)
        running = int(status.state) == _RUNNING
        paused = running and self.freezer().frozen(self._cgroup_paths(verbose))
        word = "paused" if paused else _STATE_NAMES.get(int(status.state), "unknown")
        return RuntimeState(status=word, running=running, paused=paused,
                            pid=verbose.pid if running else 0)

    def pause(self, container_id: str) -> None:
        _, verbose = self._client.container_status(container_id)
        self.freezer().freeze(self._cgroup_paths(verbose))

    def unpause(self, container_id: str) -> None:
        _, verbose = self._client.container_status(container_id)
        self.freezer().thaw(self._cgroup_paths(verbose))

    def kill(self, container_id: str) -> None:
        api = self._client.api
        self._client.call("stop container", lambda rt, _: rt.StopContainer(
            api.StopContainerRequest(container_id=container_id, timeout=0),
            timeout=self._client.timeout))


class CriContainers(_CriUser):
    """``(id, name, image_id, image_name)`` of the containers running under a CRI runtime, for
    the heartbeats (runtimes.registry.RunningContainers). Raises RuntimeActionError."""

    def __call__(self) -> tuple[tuple[str, str | None, str | None, str | None], ...]:
        api = self._client.api
        request = api.ListContainersRequest(filter=api.ContainerFilter(
            state=api.ContainerStateValue(state=api.CONTAINER_RUNNING)))
        listed = self._client.call("list containers", lambda rt, _: rt.ListContainers(
            request, timeout=self._client.timeout)).containers
        rows = []
        for container in listed:
            image_ref = container.image_ref
            image_id = (image_ref if image_ref.startswith("sha256:") else f"sha256:{image_ref}"
                        ) if _is_image_id(image_ref) else None
            wanted = container.image.image
            name = (familiar_image_name(normalize_image_reference(wanted))
                    if wanted and not _is_image_id(wanted) else None)
            rows.append((container.id, container.metadata.name or None, image_id, name))
        return tuple(rows)


class CriImageLayers(_CriUser):
    """`container id -> its image's layer digests` (the image config's rootfs diff_ids, base
    first, from the verbose ImageStatus), which the collector compares between two versions of
    an image; None when the runtime cannot say."""

    def __call__(self, container_id: str) -> tuple[str, ...] | None:
        if not _FULL_ID_RE.fullmatch(container_id):
            return None
        api = self._client.api
        try:
            status, _ = self._client.container_status(container_id)
            answer = self._client.call("image status", lambda _, im: im.ImageStatus(
                api.ImageStatusRequest(image=api.ImageSpec(image=status.image_ref),
                                       verbose=True), timeout=self._client.timeout))
        except RuntimeActionError as exc:
            log.debug("no image layers for %s from %s: %s", container_id[:12],
                      self._client.endpoint, exc)
            return None
        return image_layers_from_verbose(answer.info)


def image_layers_from_verbose(info: Mapping[str, str]) -> tuple[str, ...] | None:
    """The layer digests in a verbose ImageStatus's info (containerd and CRI-O put the image's
    OCI config under "info" as JSON: imageSpec.rootfs.diff_ids); None when it has none."""
    try:
        spec = json.loads(info.get("info") or "{}").get("imageSpec") or {}
        layers = (spec.get("rootfs") or {}).get("diff_ids") or ()
    except (ValueError, AttributeError):
        return None
    return tuple(str(layer) for layer in layers) or None
