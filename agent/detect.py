"""Detection stage: trace records -> items, novelty, drift, windows, anomaly scores -> alerts.

A pipeline Sink. Per record: the items it contributes are checked against its image's profile
(novel items are learned while the image is learning, and raise NOVEL alerts afterwards); execs
and writes are checked for drift against the container's own overlay layers (DRIFT in every
mode: learning never makes a binary the image did not ship acceptable). Per window tick: closed
feature windows are learned (clean ones, while learning) or scored in one batch per image by
the isolation forest (ANOMALY). Profiles step through learn -> monitor on their own and are
saved periodically and at close.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from driftwarden.agent.alerts import build_alert
from driftwarden.agent.processes import PROC_SELF_EXE
from driftwarden.core.alerts import AlertKind, AlertReason, Severity
from driftwarden.core.errors import NotEnoughWindowsError, UsageError
from driftwarden.core.modes import Mode
from driftwarden.core.records import ContainerView, TraceRecord
from driftwarden.models.drift import (
    DriftKind,
    Layers,
    classify_exec,
    classify_write,
    layers_from_graphdriver,
    layers_from_mountinfo,
)
from driftwarden.models.features import WindowAggregator
from driftwarden.models.forest import WindowModel
from driftwarden.models.items import (
    ConnectItem,
    ExecItem,
    Item,
    ItemSet,
    LineageItem,
    WriteItem,
    write_ops,
)
from driftwarden.models.items import extract_items as items_of
from driftwarden.models.profile import LearningPolicy, Profile, ProfileStore

log = logging.getLogger(__name__)

MAX_RECENT_ALERTS = 10_000
MAX_VIEWS = 4096
MAX_WRITERS = 16384  # (container, path) -> the write that made the file, for provenance
# write ops that put content or an exec bit on a path (write_ops names; a rename's target too)
_WRITER_OPS = frozenset({"create", "truncate", "append", "write", "rename-to", "link", "chmod+x",
                         "setuid"})
MAX_IMAGES = 32768  # processes whose program the detector remembers (LRU)
_WINDOW_NOVELTY = frozenset({"exec", "connect", "write"})  # the novel_* window features
_SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh", "ksh", "busybox"})
# writes here change who can log in, what runs at boot or how names resolve: never routine
_SENSITIVE_WRITE_DIRS = ("/etc/", "/root/.ssh/", "/var/spool/cron/", "/boot/")
_PROVENANCE_KINDS = frozenset({DriftKind.EXEC_ADDED, DriftKind.EXEC_MODIFIED,
                               DriftKind.CHMOD_X_NEW_FILE, DriftKind.SETUID_NEW_FILE})
_DRIFT_SEVERITY = {
    DriftKind.EXEC_ADDED: Severity.HIGH,
    DriftKind.EXEC_MODIFIED: Severity.HIGH,
    DriftKind.EXEC_DELETED: Severity.CRITICAL,
    DriftKind.EXEC_MEMFD: Severity.CRITICAL,
    DriftKind.WRITE_BINARY_DIR: Severity.HIGH,
    DriftKind.CHMOD_X_NEW_FILE: Severity.MEDIUM,
    DriftKind.SETUID_NEW_FILE: Severity.HIGH,
}


@dataclass(frozen=True)
class DetectorConfig:
    window_seconds: float = 10.0
    policy: LearningPolicy = field(default_factory=LearningPolicy)
    initial_mode: Mode = Mode.LEARN  # mode of an image seen for the first time
    save_interval: float = 30.0
    # windows follow event timestamps instead of the wall clock: for recorded captures
    event_time_windows: bool = False
    # A container's first seconds after it (re)started are its startup: it creates its dirs,
    # runs its entrypoint and first requests at once. Windows that begin then are neither
    # learned by nor scored with the forest (the exact sets and drift still check every
    # event): a steady-state model would flag every new replica and restart. The start time
    # is the runtime's (Docker State.StartedAt, updated by its start events).
    startup_seconds: float = 10.0


def _is_shell(item: ExecItem) -> bool:
    return item.argv0 in _SHELLS - {"busybox"} or Path(item.exe).name in _SHELLS - {"busybox"}


def _real_exe(exe: str | None, layers: Layers | None) -> str | None:
    if exe is None or layers is None or not exe.startswith("/") or exe.startswith("/memfd:"):
        return exe
    if exe.endswith(" (deleted)"):
        return exe
    try:
        return layers.realpath(exe)
    except OSError:
        return exe


def novel_severity(item: Item) -> Severity:
    if isinstance(item, LineageItem):
        child = item.child.rsplit(":", 1)[-1]
        return Severity.HIGH if child in _SHELLS - {"busybox"} else Severity.MEDIUM
    if isinstance(item, ExecItem):
        return Severity.HIGH if _is_shell(item) else Severity.MEDIUM
    if isinstance(item, ConnectItem):
        return Severity.MEDIUM if item.addr_class in ("public", "private") else Severity.LOW
    if isinstance(item, WriteItem) and item.path.startswith(_SENSITIVE_WRITE_DIRS):
        return Severity.HIGH
    return Severity.LOW


class Detector:
    def __init__(
        self,
        config: DetectorConfig,
        store: ProfileStore,
        alerts,  # AlertSink or AlertAggregator: .submit(alert) / .emit(alert)
        *,
        exe_of: Callable[[int], str | None],
        layers_of: Callable[[str, int], Layers | None],
        clock_offset_ns: int = 0,
        drops: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time,
        event_seen: Callable[[int], None] | None = None,
    ) -> None:
        self.config = config
        # called with each record's kernel timestamp as it arrives (the agent's latency metric)
        self._event_seen = event_seen
        self.store = store
        self._submit = getattr(alerts, "submit", None) or alerts.emit
        self._alerts = alerts
        self._exe_of = exe_of
        self._layers_of = layers_of
        self._clock_offset_ns = clock_offset_ns
        self._drops = drops
        self._last_drops = drops() if drops else 0
        self._clock = clock
        # the same clock as the runtime's container start times (startup_seconds)
        self.windows = WindowAggregator(config.window_seconds, clock=clock)
        self.profiles: OrderedDict[str, Profile] = OrderedDict()
        self._models: dict[tuple[str, int], WindowModel | None] = {}
        self._dirty: set[str] = set()
        self._last_save = clock()
        self._last_housekeeping = 0.0
        self.stats: defaultdict[str, int] = defaultdict(int)
        self.recent_alerts: OrderedDict[str, tuple] = OrderedDict()
        self._real_exes: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._current: tuple[str, Layers | None] = ("", None)
        # latest view per container: window alerts name the container like event alerts do
        self._views: OrderedDict[str, ContainerView] = OrderedDict()
        self._latest_event = 0.0  # seconds, for event_time_windows
        # tgid -> the program it runs, canonical (see _canonical_exe, _remember_image)
        self._images: OrderedDict[int, ExecItem] = OrderedDict()
        self._writers: OrderedDict[tuple[str, str], tuple] = OrderedDict()  # -> (record, program)

    # -- profiles ------------------------------------------------------------

    def profile_for(self, view: ContainerView) -> Profile | None:
        image_id = view.image_id
        if not image_id:
            return None
        profile = self.profiles.get(image_id)
        if profile is None:
            profile = self.store.load(image_id)
            if profile is None:
                now = self._clock()
                profile = Profile(image_id=image_id, image_name=view.image or image_id,
                                  items=ItemSet(), created_at=now, updated_at=now)
                if self.config.initial_mode is not Mode.LEARN:
                    profile.set_mode(self.config.initial_mode, reason="agent --mode",
                                     who="agent", now=now)
                log.info("new baseline for %s (%s), mode %s", profile.image_name, image_id,
                         profile.mode.value)
            self.profiles[image_id] = profile
            self._dirty.add(image_id)
        return profile

    def _model_for(self, profile: Profile) -> WindowModel | None:
        key = (profile.image_id, profile.progress.windows_learned)
        if key not in self._models:
            model = WindowModel()
            try:
                model.fit(profile.windows)
            except NotEnoughWindowsError:
                model = None
            self._models[key] = model
        return self._models[key]

    # -- per record (Sink.write) ---------------------------------------------------

    def write(self, record: TraceRecord) -> None:
        if self._event_seen is not None:
            self._event_seen(record.event.header.ts_ns)
        view = record.container
        if record.runtime_setup or view.state != "container" or not view.id:
            if view.state == "unknown" and not record.runtime_setup:
                # an event we could not attribute may belong to any container's window
                self.windows.mark_all_tainted("unattributed events",
                                              now=self._window_time(record))
                self.stats["unattributed"] += 1
            self.stats["skipped"] += 1
            return
        profile = self.profile_for(view)
        if profile is None:
            self.stats["no_image"] += 1
            return
        now = self._clock()
        if self._views.get(view.id) is not view:
            self._views[view.id] = view
            self._views.move_to_end(view.id)
            if len(self._views) > MAX_VIEWS:
                self._views.popitem(last=False)
        layers = self._layers_of(view.id, record.event.header.tgid)
        self._current = (view.id, layers)
        record = self._canonical_exe(record, layers)
        ops = write_ops(record) if record.kind == "write" else None
        items = items_of(record, self._exe_in_container, ops=ops)
        if record.kind == "exec" and items:
            self._remember_image(record, items)
        novel = profile.observe(items, now, self.config.policy)
        if novel and profile.mode is Mode.LEARN:
            self._dirty.add(profile.image_id)
        self.windows.add(record, frozenset(item.KIND for item in novel) & _WINDOW_NOVELTY,
                         now=self._window_time(record))
        if ops:
            self._remember_writes(view.id, record, ops)
        verdicts = self._drift(record, layers, ops)
        for verdict in verdicts:
            text, details, related = verdict.reason, [("path", verdict.path)], ()
            writer = (self._writers.get((view.id, verdict.path))
                      if verdict.kind in _PROVENANCE_KINDS else None)
            if writer is not None:  # provenance: who put this file here
                record_w, program = writer
                h = record_w.event.header
                exe = program.exe if isinstance(program, ExecItem) else program
                argv0 = program.argv0 if isinstance(program, ExecItem) else None
                who = f"{exe} as {argv0}" if exe and argv0 and argv0 != Path(exe).name else exe
                when = (h.ts_ns + self._clock_offset_ns) / 1e9
                text += (f"; written by pid {h.tgid} ({who or h.comm}) in this container "
                         f"{max(record.event.header.ts_ns - h.ts_ns, 0) / 1e9:.3f} s earlier")
                details += [("written_by_pid", h.tgid), ("written_by_exe", exe),
                            ("written_by_argv0", argv0), ("written_by_comm", h.comm),
                            ("written_at", when)]
                related = (record_w,)
            self._raise(AlertKind.DRIFT, _DRIFT_SEVERITY[verdict.kind], 1.0,
                        [AlertReason(code=verdict.kind.value, text=text,
                                     details=tuple(details))],
                        record, view, profile, dedup_key=f"drift:{verdict.kind}:{verdict.path}",
                        related=related)
        if profile.mode is not Mode.LEARN:
            for item in novel:
                nearest = profile.items.nearest(item)
                text = f"new {item.describe()}, never seen for {profile.image_name}"
                details = [("item", item.describe())]
                if nearest is not None:
                    details.append(("nearest_baseline_item", nearest.describe()))
                    text += f" (nearest learned: {nearest.describe()})"
                self._raise(AlertKind.NOVEL, novel_severity(item), 1.0,
                            [AlertReason(code=f"new-{item.KIND}", text=text,
                                         details=tuple(details))],
                            record, view, profile, dedup_key=f"novel:{item.KIND}:{item.key()}",
                            items=(item,))

    def _canonical_exe(self, record: TraceRecord, layers: Layers | None) -> TraceRecord:
        """An exec's program named the same however the race with /proc went, so a baseline
        learns one item per program:

        * ``execve(path)``: the file named, symlinks followed through the container's layers
          (/bin/sh -> /bin/busybox); a script stays the script (its identity);
        * ``execve("/proc/self/exe")`` (busybox applets): the binary the process was running,
          i.e. the image of the process or of the parent it was forked from, and for a script
          its interpreter.

        The program is remembered per process (``_remember_image``) for the lineage, connect
        and write items of its later events (``_exe_in_container``)."""
        if record.kind != "exec" or layers is None:
            return record
        tgid = record.event.header.tgid
        if record.event.retval != 0:
            return record
        if record.event.filename == PROC_SELF_EXE:
            before = self._images.get(tgid) or self._images.get(record.ppid)
            exe = self._binary(before.exe if before is not None else record.exe, layers)
        elif record.path_resolved:
            exe = _real_exe(record.path, layers)
        else:
            exe = _real_exe(record.exe, layers)
        return record if exe == record.exe else record._replace(exe=exe)

    def _remember_image(self, record: TraceRecord, items: list) -> None:
        """After an exec: the process now runs items[0]. When the same process ran something
        we saw before (``nc -e /bin/sh``, ``exec httpd`` in a start script), the lineage is
        "what it ran" -> "what it runs now": the parent process never saw this exec."""
        tgid = record.event.header.tgid
        before = self._images.get(tgid)
        program = items[0]
        if before is not None and len(items) > 1 and isinstance(items[1], LineageItem):
            items[1] = LineageItem(before.compact(), program.compact())
        self._images[tgid] = program
        self._images.move_to_end(tgid)
        if len(self._images) > MAX_IMAGES:
            self._images.popitem(last=False)

    def _binary(self, exe: str | None, layers: Layers) -> str | None:
        """The binary behind `exe`: a script's interpreter, else `exe` (cached per container)."""
        if exe is None or not exe.startswith("/"):
            return exe
        key = (self._current[0], "#!" + exe)
        found = self._real_exes.get(key)
        if found is None:
            real = _real_exe(exe, layers) or exe
            found = self._real_exes[key] = layers.interpreter(real) or real
            if len(self._real_exes) > 8192:
                self._real_exes.popitem(last=False)
        return found

    def _exe_in_container(self, tgid: int) -> str | None:
        """A process's exe with symlinks followed through its container's layers. Cached per
        (container, path): it is asked for every connect and write, and each resolution stats
        every path component in every layer."""
        program = self._images.get(tgid)
        if program is not None:
            return program
        exe = self._exe_of(tgid)
        container_id, layers = self._current
        if exe is None or layers is None:
            return exe
        key = (container_id, exe)
        real = self._real_exes.get(key)
        if real is None:
            real = self._real_exes[key] = _real_exe(exe, layers)
            if len(self._real_exes) > 8192:
                self._real_exes.popitem(last=False)
        return real

    def _drift(self, record: TraceRecord, layers: Layers | None, ops) -> list:
        kind = record.kind
        if kind not in ("exec", "write"):
            return []
        if kind == "exec":
            if record.event.retval != 0:
                return []
            verdict = classify_exec(record.path or "", record.exe, layers)
            return [verdict] if verdict else []
        if record.event.result_known and record.event.retval < 0:
            return []
        out = []
        for path, resolved, op in ops:
            if path and resolved:
                verdict = classify_write(path, op, layers)
                if verdict:
                    out.append(verdict)
        return out

    def _window_time(self, record: TraceRecord) -> float | None:
        """The time windows go by: the event's own (replays reproduce their windows) or, live,
        the aggregator's wall clock (None), so idle windows still close."""
        if not self.config.event_time_windows:
            return None
        h = record.event.header
        t = (h.ts_ns + self._clock_offset_ns) / 1e9
        self._latest_event = max(self._latest_event, t)
        return self._latest_event

    def _remember_writes(self, container_id: str, record: TraceRecord, ops) -> None:
        """The last write that created or changed each file (bounded LRU), so a drift alert
        about running that file can name who wrote it."""
        program = None
        for path, resolved, op in ops:
            if resolved and op in _WRITER_OPS:
                key = (container_id, path)
                if program is None:  # the writer may be gone when its file runs
                    program = self._exe_in_container(record.event.header.tgid) or "?"
                self._writers[key] = (record, program)
                self._writers.move_to_end(key)
        while len(self._writers) > MAX_WRITERS:
            self._writers.popitem(last=False)

    def _raise(self, kind, severity, score, reasons, record, view, profile, *, dedup_key,
               items=(), related=()):
        alert = build_alert(kind, severity, score, reasons, record, container_view=view,
                            related=related, baseline_version=profile.version,
                            baseline_mode=profile.mode.value, dedup_key=dedup_key,
                            clock_offset_ns=self._clock_offset_ns, now=self._clock())
        self.stats[f"alerts_{kind.value}"] += 1
        # remembered so an operator can accept it later (`driftwarden baseline accept ID`)
        self.recent_alerts[alert.id] = (alert.kind, profile.image_id, tuple(items))
        self.recent_alerts.move_to_end(alert.id)
        while len(self.recent_alerts) > MAX_RECENT_ALERTS:
            self.recent_alerts.popitem(last=False)
        self._submit(alert)
        return alert

    def accept(self, alert_id: str) -> tuple[Profile, list]:
        """Adds a NOVEL alert's items to its image's baseline. Drift is never learned."""
        found = self.recent_alerts.get(alert_id)
        if found is None:
            raise UsageError(
                f"no recent alert {alert_id!r} in this agent (it keeps the last "
                f"{MAX_RECENT_ALERTS}); check the id in the alert stream"
            )
        kind, image_id, items = found
        if kind is not AlertKind.NOVEL:
            raise UsageError(
                f"alert {alert_id} is {kind.value}: only novel behaviour can be accepted into a "
                "baseline; drift means the image itself must change"
            )
        profile = self.profiles[image_id]
        added = [item for item in items if profile.items.add(item)]
        if added:
            profile.version += 1
            profile.updated_at = self._clock()
            profile.history.append({"at": profile.updated_at, "from": profile.mode.value,
                                    "to": profile.mode.value, "by": "operator",
                                    "reason": f"accepted alert {alert_id}"})
            self._dirty.add(image_id)
            self.save()
        return profile, added

    def forget(self, image_id: str) -> None:
        """Drops an image's baseline (memory, fitted models and file): the image learns again."""
        self.profiles.pop(image_id, None)
        self._dirty.discard(image_id)
        self._models = {key: model for key, model in self._models.items()
                        if key[0] != image_id}
        self.store.path_for(image_id).unlink(missing_ok=True)

    # -- per tick (Sink.flush) -------------------------------------------------

    def flush(self) -> None:
        now = self._clock()
        self._handle_windows(self.windows.tick(
            self._latest_event if self.config.event_time_windows else None))
        if now - self._last_housekeeping >= 1.0:
            self._last_housekeeping = now
            if self._drops is not None:
                drops = self._drops()
                if drops > self._last_drops:  # lost events: this window cannot be trusted
                    self.windows.mark_all_tainted("kernel dropped events")
                    self._last_drops = drops
            for profile in self.profiles.values():
                transition = profile.step(now, self.config.policy)
                if transition is not None:
                    self._dirty.add(profile.image_id)
                    log.warning("baseline %s: %s -> %s (%s)", profile.image_name,
                                Mode.LEARN.value, transition.mode.value, transition.reason)
            flush_due = getattr(self._alerts, "flush_due", None)
            if flush_due is not None:
                flush_due()
        if now - self._last_save >= self.config.save_interval:
            self.save()

    def _handle_windows(self, windows) -> None:
        by_image: defaultdict[str, list] = defaultdict(list)
        now = self._clock()
        for window in windows:
            profile = self.profiles.get(window.image_id or "")
            if profile is None:
                continue
            if self._in_startup(window):
                self.stats["startup_windows"] += 1
                continue
            if profile.mode is Mode.LEARN:
                if profile.learn_window(window.vector, tainted=window.tainted, now=now):
                    self._dirty.add(profile.image_id)
            elif not window.tainted:
                by_image[profile.image_id].append(window)
        for image_id, image_windows in by_image.items():
            profile = self.profiles[image_id]
            model = self._model_for(profile)
            if model is None:
                continue
            scores = model.score(np.array([w.vector for w in image_windows], dtype=float))
            for window, score, bad in zip(image_windows, scores, model.is_anomalous(scores),
                                          strict=True):
                if not bad:
                    continue
                explained = model.explain(window.vector)
                reasons = [AlertReason(code="feature-out-of-range", text=r.text,
                                       details=tuple(sorted(r.to_dict().items())))
                           for r in explained]
                view = self._views.get(window.container_id) or ContainerView(
                    state="container", cgroup_id=0, id=window.container_id,
                    image=window.image, image_id=window.image_id)
                # one id per container and set of out-of-range features: a container that stays
                # odd the same way is one alert with a count, not one per window
                shape = ",".join(sorted(r.feature for r in explained if r.outside)) or "in-range"
                self._raise(AlertKind.ANOMALY, Severity.MEDIUM, float(score), reasons, None,
                            view, profile, dedup_key=f"anomaly:{shape}")

    def _in_startup(self, window) -> bool:
        view = self._views.get(window.container_id)
        started = view.started_at if view is not None else None
        return started is not None and window.start < started + self.config.startup_seconds

    def save(self) -> None:
        for image_id in sorted(self._dirty):
            profile = self.profiles.get(image_id)
            if profile is not None:
                self.store.save(profile)
        self._dirty.clear()
        self._last_save = self._clock()

    def close(self) -> None:
        self._handle_windows(self.windows.flush())
        self.save()
        closer = getattr(self._alerts, "close", None)
        if closer is not None:
            closer()


class LayersCache:
    """Container id -> its overlay layers (bounded LRU), read from /proc/PID/mountinfo, or,
    when that process is already gone or not yet inside the container's root (runc init), from
    the runtime's record of the container (`graph_driver_of`: Docker's GraphDriver data, from
    runtimes.docker.DockerGraphDriver)."""

    MISS_SECONDS = 5.0  # a container the runtime could not describe is not asked again sooner

    def __init__(self, proc_root: str = "/proc", capacity: int = 1024,
                 graph_driver_of: Callable[[str], dict | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._proc_root = proc_root
        self._capacity = capacity
        self._graph_driver_of = graph_driver_of
        self._clock = clock
        self._cache: OrderedDict[str, Layers] = OrderedDict()
        # container id -> when the runtime last had no layers for it: the lookup is an API
        # call on the pipeline thread, and a vanished container's late events must not repeat it
        self._misses: OrderedDict[str, float] = OrderedDict()
        self.stats = {"mountinfo": 0, "graph_driver": 0, "unknown": 0}

    def get(self, container_id: str, tgid: int) -> Layers | None:
        layers = self._cache.get(container_id)
        if layers is not None:
            self._cache.move_to_end(container_id)
            return layers
        try:
            layers = layers_from_mountinfo(
                Path(f"{self._proc_root}/{tgid}/mountinfo").read_text())
        except OSError:
            layers = None
        if layers is not None:
            self.stats["mountinfo"] += 1
        elif self._graph_driver_of is not None:
            now = self._clock()
            missed = self._misses.get(container_id)
            if missed is not None and now - missed < self.MISS_SECONDS:
                return None
            data = self._graph_driver_of(container_id)
            layers = layers_from_graphdriver(data) if data else None
            self.stats["graph_driver" if layers is not None else "unknown"] += 1
            if layers is None:
                self._misses[container_id] = now
                self._misses.move_to_end(container_id)
                if len(self._misses) > self._capacity:
                    self._misses.popitem(last=False)
        if layers is None:
            return None  # a live process of this container may tell us later
        self._cache[container_id] = layers
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return layers


class LockedSink:
    """Serialises the pipeline thread's writes with control requests on one lock."""

    def __init__(self, inner, lock) -> None:
        self.inner = inner
        self.lock = lock

    def write(self, record) -> None:
        with self.lock:
            self.inner.write(record)

    def flush(self) -> None:
        with self.lock:
            self.inner.flush()
