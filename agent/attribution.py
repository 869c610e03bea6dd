"""Attribution: kernel cgroup id -> cgroup path -> container -> runtime metadata.

Every kernel event carries the cgroup v2 id of the task. `Attributor` turns it into "which
container, which image, which pod" for the event pipeline:

1. `cgroups.CgroupIndex` maps the id to its cgroup path;
2. `cgroups.parse_cgroup_path` recognises the container in the path;
3. a `runtimes.base.MetadataProvider` names the container, its image and its Kubernetes pod:
   one runtime's (`runtimes.docker.DockerMetadata`, `runtimes.cri.CriMetadata`), or a node's
   runtimes together (`runtimes.registry.RuntimeSet`), which is asked with the runtime the
   cgroup path names so that runtime answers first.

`Attributor.lookup` never waits for the container runtime: metadata is fetched by a background
worker, cached with a TTL and kept current by runtime events. A container is described when the
runtime says it was created (or started), before its first exec, and what was said is kept for
its whole life and `removed_grace` seconds after the runtime removed it: a container that lives
a few milliseconds (`docker run --rm`, a Kubernetes Job, an attacker's one-shot run) is gone
before its events are looked at, and they are still attributed. While metadata is missing,
lookups say PENDING; when the runtime cannot be reached or does not know the container they
still say CONTAINER (cgroup-only attribution) with `metadata_error` set, so tracing goes on
without the runtime. Such a container has no image, so detection skips it: each one is counted once,
per runtime its cgroup path names (`without_metadata`). An outage is kept per runtime when the
provider routes by runtime (one runtime down does not hold up the others' new containers).

Outages: a runtime is taken as unreachable when asking it failed, or when its event watcher
could not reach it (an UNREACHABLE event); it is back once asking it works again or its watcher
reconnects (RESYNC). Containers the runtime described before it went away keep their metadata
(served from the cache, refreshed once it is back), so a runtime restart loses no attribution
of the containers that keep running. During an outage a container seen for the first time is
answered at once without metadata, unless its cgroup was made after the runtime last failed:
a runtime that makes containers is back, so that one is asked (PENDING), not given up on.

Layers: drift needs a container's overlay layers, and a short-lived container's processes are
gone when detection asks. `graph_driver(container_id)` answers from the runtime's record
(`ContainerInfo.graph_driver`: Docker's GraphDriver, a CRI container's init's root), else from
what a lookup saw: the first lookups of a container without layers read the root mount of a
process in its cgroup (cheap, on the caller's thread, retried with a backoff).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from driftwarden.agent.cgroups import RUNTIMES, CgroupIndex, ContainerRef, parse_cgroup_path
from driftwarden.agent.runtimes.base import (
    ContainerEvent,
    ContainerEventAction,
    ContainerInfo,
    EventWatcher,
    MetadataProvider,
    RoutingMetadataProvider,
    WatchableMetadataProvider,
    root_overlay,
    short_reason,
)
from driftwarden.core.errors import MetadataUnavailableError
from driftwarden.core.lifecycle import Service, join_or_warn, start_daemon_thread

log = logging.getLogger(__name__)

__all__ = [
    "NOT_FOUND_ERROR",
    "NO_PROVIDER_ERROR",
    "Attribution",
    "AttributionState",
    "Attributor",
]


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
ANY_RUNTIME = "*"  # the outage key of a provider that does not route by runtime
NOT_FOUND_ERROR = "container not found by the runtime"


@dataclass(frozen=True, slots=True)
class _Outage:
    error: str
    confirmed_at: float  # wall-clock seconds when asking the runtime last failed


@dataclass(frozen=True, slots=True)
class _CachedMetadata:
    info: ContainerInfo | None  # None: not found, or never fetched because of an error
    error: str | None
    expires_at: float
    # the runtime removed it: served as it was until expires_at (the grace), never refreshed
    removed: bool = False


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
    removed_hits: int = 0  # lookups answered with a removed container's kept metadata
    layers_captured: int = 0  # containers whose layers a lookup read from their processes


class Attributor(Service):
    """cgroup id -> Attribution, without ever waiting on the container runtime.

    `start()` runs the metadata worker (and the runtime event watcher when the provider has one);
    without it, container lookups stay PENDING. An expired entry is still served while its
    refresh is queued, so long-lived containers never flap back to PENDING.
    """

    STOP_TIMEOUT = 5.0

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
        removed_grace: float = 60.0,
        proc_root: str = "/proc",
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self._cgroups = cgroups
        self._metadata = metadata
        self._ttl = ttl
        self._negative_ttl = negative_ttl
        self._removed_grace = removed_grace
        self._proc_root = proc_root
        self._clock = clock
        self._wall_clock = wall_clock  # compared with cgroup folders' times (see _outage_for)
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
        # while a runtime cannot be asked: its name (ANY_RUNTIME for a provider that does not
        # route by runtime) -> the error, and when it last failed
        self._outages: dict[str, _Outage] = {}
        self._routing = isinstance(metadata, RoutingMetadataProvider)
        # container id -> the runtime its cgroup path names, for the worker to route by
        self._runtime_of: OrderedDict[str, str] = OrderedDict()
        self._counters = _Counters()
        # containers served without metadata (no image: no detection), counted once each, by
        # the runtime their cgroup path names
        self._without_metadata: Counter[str] = Counter()
        # ids already counted there, or described by the runtime once (a later "not found" is
        # a removal, not a runtime the agent cannot ask); bounded like the cache
        self._accounted: OrderedDict[str, None] = OrderedDict()
        # container id -> layers read from one of its processes (see graph_driver), and when to
        # try again for one whose processes showed none yet: (next try, backoff)
        self._layers: OrderedDict[str, Mapping[str, Any]] = OrderedDict()
        self._layer_tries: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._running = False
        self._worker: threading.Thread | None = None
        self._watcher: EventWatcher | None = None

    # ---- lifecycle

    def _start(self) -> None:
        with self._cond:
            self._running = True
        if self._metadata is None:
            return
        self._worker = start_daemon_thread(self._work, "driftwarden-attribution", self._metadata)
        if isinstance(self._metadata, WatchableMetadataProvider):
            try:
                self._watcher = self._metadata.watch(self.on_container_event)
                self._watcher.start()
            except Exception as exc:  # events only sharpen the cache; TTLs still work
                log.warning("container events unavailable, relying on TTLs: %s", exc)
                self._watcher = None

    def _stop(self, timeout: float | None) -> None:
        with self._cond:
            self._running = False
            self._cond.notify_all()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
        worker, self._worker = self._worker, None
        # it may be stuck in a runtime call that has its own timeout
        join_or_warn(worker, timeout, "attribution worker")

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
                return self._without_metadata_locked(cgroup_id, path, ref, NO_PROVIDER_ERROR)
            result = self._container_attribution_locked(cgroup_id, path, ref)
            capture = self._layers_due_locked(ref.container_id, result.info)
        if capture:
            self._capture_layers(ref.container_id, path)
        return result

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
        if container_id not in self._runtime_of:
            self._runtime_of[container_id] = ref.runtime
            if len(self._runtime_of) > self._max_containers:
                self._runtime_of.popitem(last=False)
        cached = self._entries.get(container_id)
        now = self._clock()
        if cached is not None and cached.removed and now >= cached.expires_at:
            del self._entries[container_id]  # its grace is over: late events ask again
            cached = None
        if cached is not None:
            self._entries.move_to_end(container_id)
            if cached.removed:
                self._counters.removed_hits += 1
            elif now >= cached.expires_at:
                self._counters.stale_hits += 1
                self._enqueue_locked(container_id, even_if_in_flight=False)
            else:
                self._counters.hits += 1
            if cached.info is None:
                return self._without_metadata_locked(cgroup_id, path, ref, cached.error)
            return Attribution(AttributionState.CONTAINER, cgroup_id, cgroup_path=path, ref=ref,
                               info=cached.info, metadata_error=cached.error)
        self._enqueue_locked(container_id, even_if_in_flight=False)
        outage = self._outage_for_locked(ref.runtime, path)
        if outage is not None:
            # Known outage: say so now instead of making the caller buffer for nothing.
            self._counters.unavailable += 1
            return self._without_metadata_locked(cgroup_id, path, ref, outage)
        self._counters.pending += 1
        return Attribution(AttributionState.PENDING, cgroup_id, cgroup_path=path, ref=ref)

    def _outage_for_locked(self, runtime: str, path: str) -> str | None:
        """The error of a known outage of the container's runtime; None when there is none,
        or when the container's cgroup was made after the runtime last failed (a runtime that
        makes containers answers again, or will by the time it is asked). kernfs stamps a
        folder with the time it was made, and a container's folder keeps it (its mtime moves
        only if a folder is made inside it: then it is asked about, which is safe). A folder
        that is gone already (a container that lived a few milliseconds) is asked about as
        well: a runtime that is down fails at once."""
        outage = self._outages.get(self._outage_key(runtime) or ANY_RUNTIME)
        if outage is None:
            return None
        try:
            made = (self._cgroups.root / path.lstrip("/")).stat().st_mtime
        except OSError:
            return None
        return outage.error if made <= outage.confirmed_at else None

    def _runtime_failed_locked(self, key: str, error: str) -> None:
        if key not in self._outages:
            log.warning("container metadata unavailable: %s", error)
        self._outages[key] = _Outage(error, self._wall_clock())

    def _runtime_answered_locked(self, key: str) -> None:
        if self._outages.pop(key, None) is not None:
            log.info("container metadata available again%s",
                     "" if key == ANY_RUNTIME else f" ({key})")

    def _without_metadata_locked(self, cgroup_id: int, path: str, ref: ContainerRef,
                                 error: str | None) -> Attribution:
        """A container the runtime did not describe: attributed by its cgroup only, counted."""
        self._count_without_metadata_locked(ref)
        return Attribution(AttributionState.CONTAINER, cgroup_id, cgroup_path=path, ref=ref,
                           metadata_error=error)

    def _count_without_metadata_locked(self, ref: ContainerRef) -> None:
        if self._remember_accounted_locked(ref.container_id):
            self._without_metadata[ref.runtime] += 1

    def _remember_accounted_locked(self, container_id: str) -> bool:
        """True when the container was not accounted for before."""
        if container_id in self._accounted:
            self._accounted.move_to_end(container_id)
            return False
        self._accounted[container_id] = None
        if len(self._accounted) > self._max_containers:
            self._accounted.popitem(last=False)
        return True

    # ---- layers

    def graph_driver(self, container_id: str) -> Mapping[str, Any] | None:
        """The container's layers, GraphDriver-shaped (see the module docstring); None when
        neither its runtime nor its processes showed them."""
        with self._cond:
            cached = self._entries.get(container_id)
            if cached is not None and cached.info is not None and cached.info.graph_driver:
                return cached.info.graph_driver
            return self._layers.get(container_id)

    _LAYER_RETRY_FIRST = 0.005  # seconds; doubling up to _LAYER_RETRY_MAX
    _LAYER_RETRY_MAX = 5.0

    def _layers_due_locked(self, container_id: str, info: ContainerInfo | None) -> bool:
        if container_id in self._layers or (info is not None and info.graph_driver):
            return False
        now = self._clock()
        next_try, backoff = self._layer_tries.get(container_id, (now, 0.0))
        if now < next_try:
            return False
        backoff = min(max(backoff * 2, self._LAYER_RETRY_FIRST), self._LAYER_RETRY_MAX)
        self._layer_tries[container_id] = (now + backoff, backoff)
        self._layer_tries.move_to_end(container_id)
        if len(self._layer_tries) > self._max_containers:
            self._layer_tries.popitem(last=False)
        return True

    def _capture_layers(self, container_id: str, cgroup_path: str) -> None:
        """The overlay at the root of a process of the container's cgroup, kept. None found
        (runc still setting it up, a root that is no overlay, every process gone): the next
        lookups try again (`_layers_due_locked`)."""
        procs = self._cgroups.root / cgroup_path.lstrip("/") / "cgroup.procs"
        try:
            pids = procs.read_text().split()
        except OSError:
            return
        for pid in pids[:8]:
            try:
                with open(f"{self._proc_root}/{pid}/mountinfo", encoding="utf-8",
                          errors="surrogateescape") as mountinfo:
                    data = root_overlay(mountinfo.read())
            except OSError:
                continue
            if data is not None:
                with self._cond:
                    self._layers[container_id] = data
                    self._layer_tries.pop(container_id, None)
                    self._counters.layers_captured += 1
                    while len(self._layers) > self._max_containers:
                        self._layers.popitem(last=False)
                return

    # ---- runtime events

    def on_container_event(self, event: ContainerEvent) -> None:
        """Keep the cache current; called from the watcher thread (or by tests)."""
        now = self._clock()
        with self._cond:
            self._counters.events += 1
            if event.action is ContainerEventAction.UNREACHABLE:
                key = self._outage_key(event.runtime)
                if key is not None:
                    self._runtime_failed_locked(key, event.error or "runtime unreachable")
                return
            if event.action is ContainerEventAction.RESYNC:
                # The runtime answers. Events may have been missed: serve what we have, but
                # refresh on next use.
                key = self._outage_key(event.runtime)
                if key is not None:
                    self._runtime_answered_locked(key)
                for container_id, cached in self._entries.items():
                    if cached.expires_at > now and not cached.removed:
                        self._entries[container_id] = replace(cached, expires_at=now)
                return
            container_id = event.container_id
            if not container_id:
                return
            cached = self._entries.get(container_id)
            if event.action is ContainerEventAction.CREATE:
                # Described before it starts: its first exec may come a few ms after the start
                self._enqueue_locked(container_id, even_if_in_flight=True)
            elif event.action is ContainerEventAction.START:
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
                self._entries[container_id] = self._removed_locked(cached, now)
            # DIE: a stopped container can be restarted as is; its metadata stays valid (and
            # once it is removed, it is kept for the grace period).

    def _removed_locked(self, cached: _CachedMetadata, now: float) -> _CachedMetadata:
        """What stays of a container the runtime removed: its metadata, if it had any, for
        `removed_grace` seconds (late and held-back events are still attributed); a negative
        entry otherwise."""
        if cached.removed:
            return cached
        if cached.info is None:
            return replace(cached, expires_at=min(cached.expires_at, now + self._negative_ttl))
        return _CachedMetadata(cached.info, None, now + self._removed_grace, removed=True)

    # ---- background fetching

    def _outage_key(self, runtime: str | None) -> str | None:
        """Whose outage an answer tells: the runtime asked (routing), or the provider as a
        whole; None for a routed lookup of a container no cgroup path named yet (a runtime
        event's), which tells nothing about any one runtime."""
        if not self._routing:
            return ANY_RUNTIME
        return runtime

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
                runtime = self._runtime_of.get(container_id)
            info: ContainerInfo | None = None
            error: str | None = None
            try:
                if isinstance(provider, RoutingMetadataProvider):
                    info = provider.inspect_for(container_id, runtime)
                else:
                    info = provider.inspect(container_id)
            except MetadataUnavailableError as exc:
                error = str(exc)
            except Exception as exc:  # a provider bug must not kill attribution
                log.exception("metadata provider failed for %s", container_id)
                error = f"metadata lookup failed: {short_reason(exc)}"
            self._store_result(container_id, info, error, runtime)

    def _store_result(
        self, container_id: str, info: ContainerInfo | None, error: str | None,
        runtime: str | None = None,
    ) -> None:
        now = self._clock()
        outage_key = self._outage_key(runtime)
        with self._cond:
            self._in_flight = None
            self._counters.inspects += 1
            if error is not None:
                self._counters.inspect_errors += 1
                if outage_key is not None:
                    self._runtime_failed_locked(outage_key, error)
                previous = self._entries.get(container_id)
                # Keep what we knew: an old name beats no name while the runtime is away.
                known = previous.info if previous is not None else None
                entry = (previous if previous is not None and previous.removed
                         else _CachedMetadata(known, error, now + self._negative_ttl))
            else:
                if outage_key is not None:
                    self._runtime_answered_locked(outage_key)
                previous = self._entries.get(container_id)
                if info is None and previous is not None and previous.info is not None:
                    # removed since it was described (a short-lived container, or a refresh
                    # after its removal): what it was stays for the grace period
                    entry = self._removed_locked(previous, now)
                elif info is None:
                    self._counters.not_found += 1
                    entry = _CachedMetadata(None, NOT_FOUND_ERROR, now + self._negative_ttl)
                else:
                    if info.graph_driver is None and previous is not None \
                            and previous.info is not None and previous.info.graph_driver:
                        # asked again after its processes exited: the layers seen before hold
                        info = replace(info, graph_driver=previous.info.graph_driver)
                    entry = _CachedMetadata(info, None, now + self._ttl)
                    self._remember_accounted_locked(container_id)
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

    def without_metadata(self) -> dict[str, int]:
        """Containers served without metadata so far (their events have no image, so no
        detection), per runtime named by their cgroup path; every runtime is listed."""
        with self._cond:
            return {runtime: self._without_metadata[runtime] for runtime in sorted(RUNTIMES)}

    @property
    def metadata_unavailable(self) -> bool:
        """True while the metadata provider (or one of the runtimes it asks) cannot be
        reached."""
        with self._cond:
            return bool(self._outages)

    def unavailable_runtimes(self) -> dict[str, str]:
        """The runtimes that cannot be asked now and why ("*": the provider as a whole)."""
        with self._cond:
            return {key: outage.error for key, outage in self._outages.items()}

    def metadata_unavailable_by_runtime(self) -> dict[str, int]:
        """1 for each runtime whose containers cannot be described now (it cannot be asked, or
        no endpoint serves it), else 0; every runtime is listed. A provider that does not
        route by runtime stands for all of them."""
        with self._cond:
            everything = ANY_RUNTIME in self._outages
            return {runtime: int(everything or runtime in self._outages)
                    for runtime in sorted(RUNTIMES)}

    def stats(self) -> dict[str, int]:
        with self._cond:
            counters = asdict(self._counters)
            counters["cached_containers"] = len(self._entries)
            counters["queued"] = len(self._queue)
            counters["metadata_unavailable"] = int(bool(self._outages))
            counters["without_metadata"] = sum(self._without_metadata.values())
        cgroup_stats = self._cgroups.stats
        counters["rescans"] = cgroup_stats["rescans"]
        counters["cgroup_misses"] = cgroup_stats["misses"]
        return counters
