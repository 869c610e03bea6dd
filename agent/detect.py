"""Detection stage: trace records -> items, novelty, drift, windows, anomaly scores -> alerts.

A pipeline Sink. Per record: the items it contributes are checked against its image's profile
(novel items are learned while the image is learning, and raise NOVEL alerts afterwards); execs
and writes are checked for drift against the container's own overlay layers (DRIFT in every
mode: learning never makes a binary the image did not ship acceptable). Per window tick: closed
feature windows are learned (clean ones, while learning) or scored in one batch per image by
the isolation forest (ANOMALY). Profiles step through learn -> monitor on their own and are
saved periodically and at close.

Processes running before the agent started arrive as synthetic exec records (``before_agent``,
agent/startup.py): their items are learned or checked like any exec's, and a drift among them
says "(running before the agent started)"; they stay out of the windows (they are not this
window's activity) and the latency metric.

A container's start (its first ``startup_seconds`` after the runtime's start time; until the
runtime has told it, after the run's first event: a restart into a new cgroup, a new container's
first exec) is part of its image's behaviour. While a profile has not seen a start
(``Profile.starts_seen``: the first start of a new container of the image, not a restart, that
began after the agent did, watched through its startup), the novel items of its containers'
startups are learned as start-up items (recorded with the container, shown by `baseline show`)
instead of raising NOVEL, whatever the mode; once such a start has run its course (by event
time) the profile has seen a start, and later starts are checked like anything else. A start
that began while the image learned is learning's own: what it does after learning ended is
checked. Drift is never learned, during a start either (nor the items of a record that
drifted).

A fleet baseline carried from another version of its image (agent.carry) learns only the
records that involve a file of the layers that version did not have; the others are judged as
outside learning while it learns (NOVEL at once, nothing learned or reported), and a window in
which such a NOVEL was raised is not learned.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from driftwarden.agent.alerts import build_alert, container_key
from driftwarden.agent.carry import CarryJudge, record_files
from driftwarden.agent.fleet import FleetBaselines, carried_scope, profile_from_baseline
from driftwarden.agent.flood import FLOOD_CODE, FloodWatch, flood_reason
from driftwarden.agent.forests import PENDING, ChildForests, InlineForests
from driftwarden.agent.known import KnownFilter
from driftwarden.core.alerts import AlertKind, AlertReason, Severity
from driftwarden.core.errors import InvalidMessage, UsageError
from driftwarden.core.modes import Mode
from driftwarden.core.records import ContainerView, ProcKey, Program, TraceRecord
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
    named_item,
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
MAX_IMAGES = 32768  # processes the detector remembers (LRU)
_WINDOW_NOVELTY = frozenset({"exec", "connect", "write"})  # the novel_* window features
_NOVELTY_FEATURES = frozenset(f"novel_{kind}" for kind in _WINDOW_NOVELTY)
_NO_KINDS: frozenset[str] = frozenset()
MAX_PROGRAM_ITEMS = 8192  # (container, program) -> its ExecItem, asked for most records
# exact identities of connect and write records judged known (Detector._known_again)
MAX_KNOWN_RECORDS = 16384
MAX_UNSCORED_WINDOWS = 256  # an image's windows kept while its forest is fitted (newest kept)
# a container's first exec may precede the runtime's recorded start time by a few ms
_START_SLACK_SECONDS = 2.0
_MAX_TREE_HOPS = 64  # a process tree's depth walked up to its root (a pid cycle ends it)
# live, an idle container's window closes this long after it ended at the least: the agent's
# lag (how late records reach the detector) when that is longer (Detector._window_horizon)
MIN_LAG_ALLOWANCE_SECONDS = 1.0
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
    # Records count in the window of their event's own time, live and replayed. Live, a
    # window closes once the newest event or the wall clock (minus the agent's lag) is past
    # its end; True (recorded captures): the events' time alone closes windows.
    event_time_windows: bool = False
    # A container's first seconds after it (re)started are its startup: it creates its dirs,
    # runs its entrypoint and first requests at once. Windows that begin then are neither
    # learned by nor scored with the forest (the exact sets and drift still check every
    # event): a steady-state model would flag every new replica and restart. The start time
    # is the runtime's (Docker State.StartedAt, updated by its start events).
    startup_seconds: float = 10.0
    # With the collector's fleet baselines: a new image's records wait this long (at most, and
    # only while connected) for the collector's answer, so a node never learns what the fleet
    # already knows; at most hold_capacity records wait in all (beyond: released, counted).
    hold_seconds: float = 3.0
    hold_capacity: int = 10_000


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


def _exact(record: TraceRecord, items: list[Item], ops) -> bool:
    """Whether a connect or write record's items name exactly what its kernel identity does,
    so the kernel may count its repeats from the first (agent.known): no item canonicalised
    into a pattern (a family of files or sockets mostly never repeats exactly: offered at once,
    its members would only fill the map; one that does repeat is offered when it comes again,
    Detector._known_again), and a connect's program known."""
    if record.kind == "connect":
        program = record.program
        return (program is not None and program.exe is not None and len(items) == 1
                and items[0].address == record.event.address)
    if record.kind == "write" and ops and len(items) == len(ops):
        return all(item.path == path for item, (path, _, _) in zip(items, ops, strict=True))
    return False


def _identity(record: TraceRecord, container_id: str) -> tuple | None:
    """Everything a connect or write record's items, novelty and drift verdicts depend on
    besides its container's profile and layers (Detector._known_again), or None when the
    record is not judged that way (a failed write has no items: nothing to remember). A
    connect's item names its program; a write's items name only its paths and op."""
    event = record.event
    if record.kind == "connect":
        return (container_id, event.family, event.address, event.port, event.sock_type,
                record.program)
    if event.retval < 0:  # RESULT_UNKNOWN (an open reported at entry) is positive
        return None
    return (container_id, event.op, record.path, record.path_resolved, record.path2,
            record.path2_resolved, event.open_flags, event.mode)


def restates_novelty(outside: dict[str, float], alerted: dict[str, int]) -> bool:
    """Whether an anomalous window only restates novelty already alerted: its out-of-range
    features (`outside`: name -> value) are all novel_* counts, each no higher than the number of
    that window's records whose novelty the container's NOVEL alerts reported (`alerted`)."""
    return bool(outside) and all(name in _NOVELTY_FEATURES and value <= alerted.get(name, 0)
                                 for name, value in outside.items())


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
        layers_of: Callable[[str, int], Layers | None],
        clock_offset_ns: int = 0,
        drops: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.time,
        event_seen: Callable[[int], None] | None = None,
        fleet: FleetBaselines | None = None,
        flood: FloodWatch | None = None,
        known: KnownFilter | None = None,
        forests: InlineForests | ChildForests | None = None,
    ) -> None:
        self.config = config
        # the baseline in the kernel (agent.known): known identities counted there, not sent
        self._known = known
        # containers over their kernel budget (agent.flood): sensor-flood alerts, tainted windows
        self._flood = flood
        # the collector's baselines (agent.fleet): learned together, applied here; None: this
        # node alone (the local learning rule ends learning)
        self._fleet = fleet
        self._fleet_seen: set[str] = set()
        self._carry = CarryJudge()  # a carried baseline's learned and judged parts
        # image id -> (release deadline, its records waiting for the collector's answer)
        self._held: OrderedDict[str, tuple[float, deque[TraceRecord]]] = OrderedDict()
        self._held_count = 0
        # called with each record's kernel timestamp as it arrives (the agent's latency metric)
        self._event_seen = event_seen
        self.store = store
        # an AlertAggregator groups alerts of one cause (its incident argument); a bare sink not
        submit = getattr(alerts, "submit", None)
        self._submit = submit if submit is not None else (
            lambda alert, incident=None: alerts.emit(alert))
        self._alerts = alerts
        self._layers_of = layers_of
        self._clock_offset_ns = clock_offset_ns
        self._drops = drops
        self._last_drops = drops() if drops else 0
        self._clock = clock
        # the same clock as the runtime's container start times (startup_seconds)
        self.windows = WindowAggregator(config.window_seconds, clock=clock)
        self.profiles: OrderedDict[str, Profile] = OrderedDict()
        # (image id, windows learned) -> its model, None when too few windows to fit one
        self._models: dict[tuple[str, int], WindowModel | None] = {}
        self._forests = forests if forests is not None else InlineForests()
        # windows of images whose model is still being fitted, scored once it is
        self._unscored: dict[str, deque] = {}
        self._dirty: set[str] = set()
        self._last_save = clock()
        self._last_housekeeping = 0.0
        self.stats: defaultdict[str, int] = defaultdict(int)
        self.recent_alerts: OrderedDict[str, tuple] = OrderedDict()
        self._real_exes: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._program_items: dict[tuple[str, Program], tuple[Layers | None, ExecItem]] = {}
        self._current: tuple[str, Layers | None] = ("", None)
        # _identity(record) -> (profile, layers, write ops, exact) of a record judged known
        self._judged_known: OrderedDict[tuple, tuple] = OrderedDict()
        # latest view per container: window alerts name the container like event alerts do
        self._views: OrderedDict[str, ContainerView] = OrderedDict()
        self._latest_event = 0.0  # the newest event's time (wall-clock seconds)
        # how late records reach the detector (wall clock - event time): the largest since the
        # last tick (-inf: none), and the allowance the last tick that had records measured
        self._tick_lag = float("-inf")
        self._lag = 0.0
        self._writers: OrderedDict[tuple[str, str], tuple] = OrderedDict()  # -> (record, program)
        # process -> (its container id, its parent) for those seen acting in a container: the
        # process trees alerts are grouped by (_process_tree)
        self._parents: OrderedDict[ProcKey, tuple[str, ProcKey]] = OrderedDict()
        # container id -> [cgroup id, runtime start time seen, this run's start] (_run_start)
        self._runs: OrderedDict[str, list] = OrderedDict()
        # event times (epoch s) of the first and the latest kernel record: the agent's start,
        # and how far the events have come (first starts end by it, whatever the lag)
        self._agent_started: float | None = None
        self._latest_live = 0.0
        # image id -> (start, container id, began while learning) of the first start its
        # profile watches, not yet over (_first_start)
        self._first_starts: dict[str, tuple[float, str, bool]] = {}

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

    def _model_for(self, profile: Profile) -> WindowModel | object | None:
        """The image's model for its current windows; PENDING while it is being fitted."""
        key = (profile.image_id, profile.progress.windows_learned)
        if key in self._models:
            return self._models[key]
        model = self._forests.model(key, profile.windows)
        if model is not PENDING:
            for older in [k for k in self._models if k[0] == profile.image_id]:
                del self._models[older]
            self._models[key] = model
        return model

    # -- per record (Sink.write) ---------------------------------------------------

    def write(self, record: TraceRecord) -> None:
        before = record.before_agent
        at = (record.event.header.ts_ns + self._clock_offset_ns) / 1e9  # epoch s
        if not before:
            if self._event_seen is not None:
                self._event_seen(record.event.header.ts_ns)
            if self._agent_started is None:
                self._agent_started = at
            if at > self._latest_live:
                self._latest_live = at
            if self._first_starts:
                self._end_first_starts()
        view = record.container
        if (self._fleet is not None and view.image_id and view.state == "container" and view.id
                and self._hold(record, view.image_id)):
            return
        self._process(record, at)

    def _process(self, record: TraceRecord, at: float) -> None:
        before = record.before_agent
        view = record.container
        if view.state == "container" and view.id:
            run = self._runs.get(view.id)
            if run is not None and run[0] == view.cgroup_id and (
                    view.started_at is None or view.started_at == run[1]):
                self._runs.move_to_end(view.id)  # _run_start's answer as it was (most records)
            else:
                self._run_start(view, at, before, record.runtime_setup or record.kind == "exec")
        if record.runtime_setup or view.state != "container" or not view.id:
            if view.state == "unknown" and not record.runtime_setup and not before:
                # an event we could not attribute may belong to any container's window
                self.windows.mark_all_tainted("unattributed events",
                                              now=self._window_time(at))
                self.stats["unattributed"] += 1
            self.stats["skipped"] += 1
            return
        profile = self.profiles.get(view.image_id)  # profile_for's answer once loaded
        if profile is None:
            profile = self.profile_for(view)
            if profile is None:
                self.stats["no_image"] += 1
                return
        if self._views.get(view.id) is not view:
            self._views[view.id] = view
            self._views.move_to_end(view.id)
            if len(self._views) > MAX_VIEWS:
                self._views.popitem(last=False)
        h = record.event.header
        known = self._parents.get((h.tgid, h.start_ns))
        if (known is None or known[0] != view.id or known[1][0] != record.ppid
                or known[1][1] != h.parent_start_ns):
            self._remember_parent(view.id, record)
        else:  # the same as before (most records): _remember_parent would only reorder
            self._parents.move_to_end((h.tgid, h.start_ns))
        layers = self._layers_of(view.id, h.tgid)
        self._current = (view.id, layers)
        kind = record.kind
        identity = None
        if kind != "exec" and not before:
            identity = _identity(record, view.id)
            if identity is not None:
                judged = self._judged_known.get(identity)
                if (judged is not None and judged[0] is profile and judged[1] is layers
                        and (self._fleet is None or profile.mode is not Mode.LEARN)):
                    self._known_again(record, profile, view, at, judged)
                    return
        now = self._clock()
        if kind == "exec":
            record = self._canonical_exe(record, layers)
        ops = write_ops(record) if kind == "write" else None
        items = items_of(record, self._program_item, ops=ops)
        # a carried baseline judges what its shared layers' files do, even while it learns
        # (only a fleet baseline is ever carried)
        learning = profile.mode is Mode.LEARN and (
            self._fleet is None or not self._judged(profile, view, record, items, layers))
        novel = profile.observe(items, now, self.config.policy, learn=learning)
        if learning:
            if novel:
                self._dirty.add(profile.image_id)
            if self._fleet is not None:  # the fleet learns (item, container) pairs
                self._fleet.learned(profile.image_id, profile.image_name, items, view.id,
                                    view.name)
        verdicts = self._drift(record, layers, ops) if kind != "connect" else []
        # a start the profile never saw teaches its items, except a drifting record's
        if self._first_start(profile, view, at, before) and novel and not verdicts and (
                not learning):
            learned = profile.learn_startup(novel, container=view.id, now=at)
            self.stats["startup_items"] += len(learned)
            self._dirty.add(profile.image_id)
            novel = []
        novel_kinds = (frozenset(item.KIND for item in novel) & _WINDOW_NOVELTY if novel
                       else _NO_KINDS)
        if not before:
            self.windows.add(record, novel_kinds, now=self._window_time(at),
                             alerted=novel_kinds if not learning else ())
            if identity is not None and not novel and not verdicts:
                exact = _exact(record, items, ops)
                self._remember_known(identity, (profile, layers, ops, exact))
                if (self._known is not None and not learning
                        and profile.mode is not Mode.LEARN and exact):
                    self._known.offer(record, profile.image_id, view.id)
        if ops:
            self._remember_writes(view.id, record, ops)
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
            if before:
                text += " (running before the agent started)"
                details.append(("before_agent", True))
            self._raise(AlertKind.DRIFT, _DRIFT_SEVERITY[verdict.kind], 1.0,
                        [AlertReason(code=verdict.kind.value, text=text,
                                     details=tuple(details))],
                        record, view, profile, dedup_key=f"drift:{verdict.kind}:{verdict.path}",
                        related=related, drifted=verdict.path)
        if not learning:
            for item in novel:
                nearest = profile.items.nearest(item)
                text = f"new {item.describe()}, never seen for {profile.image_name}"
                # kind and key: what the collector adds to the baseline when it is accepted
                details = [("item", item.describe()), ("item_kind", item.KIND),
                           ("item_key", tuple(item.key()))]
                if nearest is not None:
                    details.append(("nearest_baseline_item", nearest.describe()))
                    text += f" (nearest learned: {nearest.describe()})"
                if before:
                    text += " (running before the agent started)"
                    details.append(("before_agent", True))
                self._raise(AlertKind.NOVEL, novel_severity(item), 1.0,
                            [AlertReason(code=f"new-{item.KIND}", text=text,
                                         details=tuple(details))],
                            record, view, profile, dedup_key=f"novel:{item.KIND}:{item.key()}",
                            items=(item,))

    def _remember_known(self, identity: tuple, judged: tuple) -> None:
        known = self._judged_known
        known[identity] = judged
        if len(known) > MAX_KNOWN_RECORDS:
            # the oldest judgement (hits do not reorder: a FIFO). An OrderedDict: taking a
            # plain dict's first key again and again scans the deleted slots before it
            known.popitem(last=False)

    def _known_again(self, record: TraceRecord, profile: Profile, view: ContainerView,
                     at: float, judged: tuple) -> None:
        """A record whose exact identity (_identity) was judged known in this container, by
        this profile object, with these layers: its items, novelty and drift are what they
        were then (a baseline's items only grow; a replaced or forgotten baseline is another
        object; the image's layers do not change under one Layers object). What is left is what
        every record does: the window, the kernel offer, provenance and a first start's claim.
        The userspace twin of the kernel's map ``known`` (agent.known), but per record: the
        windows count it at its own time and provenance names the latest write. An identity
        whose items were canonicalised (a rotated log's name) is offered to the kernel now that
        it came again: it repeats exactly, so its entry is not one of a family that never does."""
        _, _, ops, _ = judged
        if not profile.starts_seen:
            self._first_start(profile, view, at, False)  # its claim on the image's first start
        self.windows.add(record, _NO_KINDS, now=self._window_time(at), alerted=())
        if self._known is not None and profile.mode is not Mode.LEARN:
            self._known.offer(record, profile.image_id, view.id)
        if ops:
            self._remember_writes(view.id, record, ops)
        self.stats["known_again"] += 1

    def _judged(self, profile: Profile, view: ContainerView, record: TraceRecord,
                items: list[Item], layers: Layers | None) -> bool:
        """Whether a record of a learning image is judged rather than learned: its baseline
        was carried from another version and the record involves no file of the layers that
        version did not have (agent.carry)."""
        scope = self._fleet.carried(profile.image_id) if self._fleet is not None else None
        if scope is None:
            return False
        program = record.program
        exe = self._program_exe(program) if program is not None else None
        if self._carry.learns(scope, view.id, layers.lowers if layers is not None else None,
                              record_files(items, exe)):
            self.stats["carried_learned"] += 1
            return False
        self.stats["carried_judged"] += 1
        return True

    def _canonical_exe(self, record: TraceRecord, layers: Layers | None) -> TraceRecord:
        """An exec record's `exe` as drift checks it: the binary of its program (see
        _program_exe), a real path, not an item pattern. A deleted binary or a memfd (what a
        process found at start-up runs, as /proc named it) is kept: that is the finding."""
        if record.kind != "exec" or layers is None or record.event.retval != 0:
            return record
        if record.exe is not None and (record.exe.endswith(" (deleted)")
                                       or record.exe.startswith("/memfd:")):
            return record
        exe = self._program_exe(record.program)
        if exe is None:
            exe = _real_exe(record.path if record.path_resolved else record.exe, layers)
        return record if exe == record.exe else record._replace(exe=exe)

    def _program_exe(self, program: Program | None) -> str | None:
        """A program's binary named through its container's layers, so a baseline learns one
        item per program whatever path ran it:

        * ``execve(path)``: the file named, symlinks followed (/bin/sh -> /bin/busybox); a
          script stays the script (its identity);
        * ``execve("/proc/self/exe")`` (busybox applets): the binary behind the program the
          process ran before (the process table keeps it), and for a script its interpreter.

        Cached per (container, path): asked for every record, and each resolution stats every
        path component in every layer."""
        if program is None or program.exe is None:
            return None
        container_id, layers = self._current
        if layers is None:
            return program.exe
        if program.self_exec:
            return self._binary(program.exe, layers)
        key = (container_id, program.exe)
        real = self._real_exes.get(key)
        if real is None:
            real = self._real_exes[key] = _real_exe(program.exe, layers)
            if len(self._real_exes) > 8192:
                self._real_exes.popitem(last=False)
        return real

    def _program_item(self, program: Program) -> ExecItem:
        """A program's ExecItem (models.items.ProgramItem) in the current container. Cached
        per (container, program) while the container's layers are the same object: most
        records name their process's program, and naming it canonicalises two paths."""
        container_id, layers = self._current
        key = (container_id, program)
        found = self._program_items.get(key)
        if found is not None and found[0] is layers:
            return found[1]
        item = named_item(program, self._program_exe(program))
        self._program_items[key] = (layers, item)
        if len(self._program_items) > MAX_PROGRAM_ITEMS:
            del self._program_items[next(iter(self._program_items))]
        return item

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

    def _drift(self, record: TraceRecord, layers: Layers | None, ops) -> list:
        kind = record.kind
        if kind not in ("exec", "write"):
            return []
        if kind == "exec":
            if record.event.retval != 0:
                return []
            verdict = classify_exec(record.path or "", record.exe, layers, written=lambda p: (
                self._current[0], p) in self._writers)  # its layer gone: what it wrote (--rm)
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

    def _window_time(self, t: float) -> float:
        """The time a record counts at in the feature windows: its event's own (`t`: kernel
        time as wall time, through the capture's clock offset, as write() computes it), live
        and replayed alike, so a backlog that reaches a lagging agent at once still falls into
        the windows it happened in. Notes the newest event time and, live, how late the record
        arrived."""
        if t > self._latest_event:
            self._latest_event = t
        if not self.config.event_time_windows:
            self._tick_lag = max(self._tick_lag, self._clock() - t)
        return t

    def _window_horizon(self) -> float:
        """Windows that ended by this time are complete and close. The newest event processed
        says so (the ring buffer delivers in order: nothing older is still on its way); so does,
        for idle containers, the wall clock minus the lag allowance: max(1 s, how late the
        records of the last tick that had any arrived), since records that late may still be
        queued. A replay (event_time_windows) has no wall clock: its newest event alone."""
        if self.config.event_time_windows:
            return self._latest_event
        if self._tick_lag != float("-inf"):
            self._lag, self._tick_lag = self._tick_lag, float("-inf")
        return max(self._latest_event,
                   self._clock() - max(MIN_LAG_ALLOWANCE_SECONDS, self._lag))

    def _remember_writes(self, container_id: str, record: TraceRecord, ops) -> None:
        """The last write that created or changed each file (bounded LRU), so a drift alert
        about running that file can name who wrote it."""
        program = None
        for path, resolved, op in ops:
            if resolved and op in _WRITER_OPS:
                key = (container_id, path)
                if program is None:  # the writer may be gone when its file runs
                    known = record.program
                    program = self._program_item(known) if known and known.exe else "?"
                self._writers[key] = (record, program)
                self._writers.move_to_end(key)
        while len(self._writers) > MAX_WRITERS:
            self._writers.popitem(last=False)

    def _raise(self, kind, severity, score, reasons, record, view, profile, *, dedup_key,
               items=(), related=(), drifted=None):
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
        self._submit(alert, self._incident_of(view, record, drifted))
        return alert

    def _incident_of(self, view: ContainerView, record: TraceRecord | None,
                     drifted: str | None) -> tuple | None:
        """The cause an alert belongs to (AlertAggregator folds one cause's alerts into one
        incident): its container and process tree, and for a drift the file it is about (a
        drift is never folded into novelty, nor into a drift about another file: chmod +x and
        then the exec of one file are one cause, two dropped binaries are two). None for a
        window's anomaly: it has no process."""
        if record is None:
            return None
        return (container_key(view), self._process_tree(record), drifted)

    def _remember_parent(self, container_id: str, record: TraceRecord) -> None:
        """A process's container and parent, new or changed (_process skips the ones that are
        the same as before: most records)."""
        h = record.event.header
        parents = self._parents
        key = (h.tgid, h.start_ns)  # a ProcKey's equal: only looked up, never handed out
        parents[key] = (container_id, ProcKey(record.ppid, h.parent_start_ns))
        parents.move_to_end(key)
        if len(parents) > MAX_IMAGES:
            parents.popitem(last=False)

    def _process_tree(self, record: TraceRecord) -> ProcKey:
        """The root of the record's process tree: walking up its parents, the last process
        this detector saw act in the same container (the next one is outside it, or never acted
        in it). The one place a process tree is named: walking the process table's parents
        instead (agent.processes.ProcessTable.parent) would also join the processes that forked
        without acting (a subshell between two of its children)."""
        h = record.event.header
        key, unseen = ProcKey(h.tgid, h.start_ns), ("", ProcKey(0, 0))
        for _ in range(_MAX_TREE_HOPS):
            parent = self._parents.get(key, unseen)[1]
            if parent == key or self._parents.get(parent, unseen)[0] != record.container.id:
                break
            key = parent
        return key

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
        self._judged_known.clear()  # judged by the profile forgotten (and a few others)
        if self._known is not None:
            self._known.forget_image(image_id)
        self._models = {key: model for key, model in self._models.items()
                        if key[0] != image_id}
        self.store.path_for(image_id).unlink(missing_ok=True)
        if self._fleet is not None:
            self._fleet.forget(image_id)

    # -- fleet baselines (agent.fleet) ------------------------------------------------

    def _hold(self, record: TraceRecord, image_id: str) -> bool:
        """Whether `record` waits for the collector's answer about its image (see
        DetectorConfig.hold_seconds); records of a held image queue in order."""
        held = self._held.get(image_id)
        if held is None:
            if image_id in self._fleet_seen:
                return False
            self._fleet_seen.add(image_id)
            view = record.container
            if not self._fleet.see(image_id, view.image or image_id, view.id):
                return False
            held = self._held[image_id] = (self._clock() + self.config.hold_seconds, deque())
            self.stats["fleet_images_held"] += 1
            log.info("baseline %s: asking the collector for the fleet's baseline; its records "
                     "wait up to %g s", view.image or image_id, self.config.hold_seconds)
        if self._held_count >= self.config.hold_capacity:
            self.stats["fleet_hold_overflows"] += 1
            oldest = next(iter(self._held))
            self._release(oldest, "full")
            if oldest == image_id:
                return False
        held[1].append(record)
        self._held_count += 1
        self.stats["fleet_records_held"] += 1
        return True

    def _release(self, image_id: str, why: str) -> None:
        """Process an image's held records (the fleet's baseline in place when it came)."""
        _, records = self._held.pop(image_id)
        self._held_count -= len(records)
        if why != "answered":
            self.stats[f"fleet_hold_{why}"] += 1
        if why in ("timeout", "full"):
            log.warning("no answer from the collector about image %s within %g s%s; its %d "
                        "records are checked against the local baseline", image_id,
                        self.config.hold_seconds, " (hold queue full)" if why == "full" else "",
                        len(records))
        for record in records:
            self._process(record, (record.event.header.ts_ns + self._clock_offset_ns) / 1e9)

    def _apply_fleet_updates(self) -> None:
        """The collector's answers: a newer fleet baseline replaces the local one (saved at
        once); "not found" leaves the image learning here (and reporting)."""
        for update in self._fleet.take_updates():
            image_id = update.image_key
            if not update.found:
                log.info("the collector has no baseline for %s yet; learning it here and "
                         "reporting", image_id)
                continue
            version = update.baseline.summary.version
            if version <= self._fleet.version(image_id):
                continue
            local = self.profiles.get(image_id) or self.store.load(image_id)
            try:
                profile = profile_from_baseline(update.baseline, local, now=self._clock())
            except InvalidMessage as exc:
                self.stats["fleet_updates_refused"] += 1
                log.error("the collector's baseline %s of %s is unusable here: %s", version,
                          image_id, exc)
                continue
            self.profiles[image_id] = profile
            self._judged_known.clear()  # judged by the profile it replaces (and a few others)
            if self._known is not None:  # what it holds may have changed: judge afresh
                self._known.forget_image(image_id)
            self._models = {key: model for key, model in self._models.items()
                            if key[0] != image_id}
            self.store.save(profile)
            self._dirty.discard(image_id)
            self._fleet.applied(image_id, version, profile.mode,
                                carried_scope(update.baseline))
            self.stats["fleet_updates_applied"] += 1
            before = local.mode if local is not None else None
            level = logging.WARNING if before is not None and before is not profile.mode \
                else logging.INFO
            log.log(level, "baseline %s: the fleet's version %d, mode %s%s (%d items, %d "
                    "windows)", profile.image_name, version, profile.mode.value,
                    f" (was {before.value})" if before not in (None, profile.mode) else "",
                    len(profile.items), len(profile.windows))

    # -- per tick (Sink.flush) -------------------------------------------------

    def flush(self) -> None:
        now = self._clock()
        if self._fleet is not None:
            self._apply_fleet_updates()
            for image_id in list(self._held):
                if self._fleet.answered(image_id):
                    self._release(image_id, "answered")
                elif now >= self._held[image_id][0]:
                    self._release(image_id, "timeout")
        if self._known is not None:
            self._known_tick(now)
        windows = self.windows.tick(self._window_horizon())
        if self._flood is not None:
            windows = self._check_floods(now, windows)
        self._handle_windows(windows)
        if now - self._last_housekeeping >= 1.0:
            self._last_housekeeping = now
            if self._drops is not None:
                drops = self._drops()
                if drops > self._last_drops:  # lost events: this window cannot be trusted
                    self.windows.mark_all_tainted("kernel dropped events")
                    self._last_drops = drops
            # with the fleet, the collector ends learning (its mode comes with its baseline)
            for profile in self.profiles.values() if self._fleet is None else ():
                transition = profile.step(now, self.config.policy)
                if transition is not None:
                    self._dirty.add(profile.image_id)
                    log.warning("baseline %s: %s -> %s (%s)", profile.image_name,
                                Mode.LEARN.value, transition.mode.value, transition.reason)
        # every tick, not each second: an incident's merged alert goes out when it ends
        flush_due = getattr(self._alerts, "flush_due", None)
        if flush_due is not None:
            flush_due()
        if now - self._last_save >= self.config.save_interval:
            self.save()

    def _known_tick(self, now: float, *, read: bool = False) -> None:
        """Installs what was judged known; about once a second (or when `read`), adds what the
        kernel counted to the windows (each hit as its exemplar record, at the last hit's time)
        and takes the identities of images that learn out of the kernel."""
        known = self._known
        known.flush()
        if not read and not known.due(now):
            return
        for image_id in known.images():
            profile = self.profiles.get(image_id)
            if profile is None or profile.mode is Mode.LEARN:
                known.forget_image(image_id)
        for exemplar, hits, last_ns in known.poll(now):
            at = (last_ns + self._clock_offset_ns) / 1e9
            if at > self._latest_event:
                self._latest_event = at
            if at > self._latest_live:  # live events too: a first start ends by their time
                self._latest_live = at
            for _ in range(hits):
                self.windows.add(exemplar, _NO_KINDS, now=at)
        if self._first_starts:  # a container the kernel filters entirely sends nothing else
            self._end_first_starts()

    def _check_floods(self, now: float, windows: list) -> list:
        """Reads the budgets' counts when due, or before windows that ended after the last
        read are handed over (their flood must be known first); one alert per episode; the
        windows of a flood tainted."""
        flood = self._flood
        if flood.due(now) or any(w.end > flood.last_poll for w in windows):
            for episode in flood.poll(now):
                view = episode.view
                profile = self.profile_for(view) if view.state == "container" else None
                alert = build_alert(
                    AlertKind.ANOMALY, Severity.MEDIUM, 1.0, [flood_reason(episode)], None,
                    container_view=view, baseline_version=profile.version if profile else 0,
                    baseline_mode=(profile.mode if profile else self.config.initial_mode).value,
                    dedup_key=f"{FLOOD_CODE}:{episode.started:.3f}",
                    clock_offset_ns=self._clock_offset_ns, now=now)
                self.stats["alerts_anomaly"] += 1
                self._submit(alert, None)
        return flood.taint(windows)

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
                if window.alerted_novelty:  # a carried part's NOVEL in it: not what is normal
                    self.stats["windows_alerted_not_learned"] += 1
                    continue
                if profile.learn_window(window.vector, tainted=window.tainted, now=now):
                    self._dirty.add(profile.image_id)
                    if self._fleet is not None:
                        self._fleet.window(profile.image_id, window.vector)
            elif not window.tainted:
                by_image[profile.image_id].append(window)
        for image_id in list(self._unscored):
            profile = self.profiles.get(image_id)
            waiting = self._unscored.pop(image_id)
            if profile is not None and profile.mode is not Mode.LEARN:
                by_image[image_id][:0] = waiting
        for image_id, image_windows in by_image.items():
            profile = self.profiles[image_id]
            model = self._model_for(profile)
            if model is PENDING:
                waiting = self._unscored[image_id] = deque(maxlen=MAX_UNSCORED_WINDOWS)
                self.stats["windows_unscored_dropped"] += max(
                    0, len(image_windows) - MAX_UNSCORED_WINDOWS)
                waiting.extend(image_windows)
                continue
            if model is None:
                continue
            scores = model.score(np.array([w.vector for w in image_windows], dtype=float))
            for window, score, bad in zip(image_windows, scores, model.is_anomalous(scores),
                                          strict=True):
                if not bad:
                    continue
                # every out-of-range feature decides; the top three explain
                explained = model.explain(window.vector, top=len(model.feature_names))
                outside = {r.feature: r.value for r in explained if r.outside}
                if restates_novelty(outside, dict(window.alerted_novelty)):
                    self.stats["anomaly_restating_novelty"] += 1
                    continue
                explained = explained[:3]
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
        run = self._runs.get(window.container_id)
        if run is not None:
            started = run[2]
        else:
            view = self._views.get(window.container_id)
            started = view.started_at if view is not None else None
        return started is not None and window.start < started + self.config.startup_seconds

    # -- container starts ------------------------------------------------------------

    def _run_start(self, view: ContainerView, at: float, before: bool, opens: bool
                   ) -> float | None:
        """When the container's current run began: the runtime's start time; until the
        runtime has told it, the run's first event (`at`) when that shows a new run: a
        restart into a new cgroup whose metadata still shows the previous run's start, or a
        container described before it started whose first event opens a run (`opens`: the
        runtime setting it up, or its first exec; a container that ran before the agent
        shows its running processes first, `before`)."""
        run = self._runs.get(view.id)
        if run is None or run[0] != view.cgroup_id:
            start = view.started_at
            if run is not None and start is not None and start == run[1]:
                start = None if before else at  # restarted: the start is the previous run's
            elif start is None:
                start = at if opens and not before else None
            # [cgroup id, the runtime's start time as seen, this run's start, a restart]
            run = self._runs[view.id] = [view.cgroup_id, view.started_at, start,
                                         run is not None]
            if len(self._runs) > MAX_VIEWS:
                self._runs.popitem(last=False)
        elif view.started_at != run[1] and view.started_at is not None:
            run[1] = run[2] = view.started_at  # the runtime's own answer for this run
        self._runs.move_to_end(view.id)
        return run[2]

    def _first_start(self, profile: Profile, view: ContainerView, at: float,
                     before: bool) -> bool:
        """Whether a record at `at` (epoch s) is in a container's startup that `profile`,
        which has not seen a start, learns outside learning (module doc). The first start of a
        new container (not a restart: a restart finds its dirs made) that began after the agent
        did is watched until it is over (_end_first_starts); a restart, or a start seen in part
        (it began before the agent), teaches what it shows but does not count as seen. A start
        that began while the image learned belongs to learning: what it does after learning
        ended is checked, and it counts as the start seen once over."""
        grace = self.config.startup_seconds
        if profile.starts_seen or grace <= 0:
            return False
        run = self._runs.get(view.id)
        start = run[2] if run is not None else None
        if start is None or not start - _START_SLACK_SECONDS <= at < start + grace:
            return False
        claim = self._first_starts.get(profile.image_id)
        if (claim is None and not before and not run[3] and self._agent_started is not None
                and start >= self._agent_started):
            learning = profile.mode is Mode.LEARN
            claim = self._first_starts[profile.image_id] = (start, view.id, learning)
            if learning:
                log.info("baseline %s: first container start seen while learning (%s)",
                         profile.image_name, view.name or view.id[:12])
            else:
                log.warning("baseline %s: first container start seen (%s): its start-up "
                            "items for %g s are learned, not alerted", profile.image_name,
                            view.name or view.id[:12], grace)
        return not (claim is not None and claim[2] and profile.mode is not Mode.LEARN)

    def _end_first_starts(self) -> None:
        """Watched first starts whose startup is over by event time: their profiles have now
        seen a start."""
        for image_id, (start, container_id, _) in list(self._first_starts.items()):
            if self._latest_live < start + self.config.startup_seconds:
                continue
            del self._first_starts[image_id]
            profile = self.profiles.get(image_id)
            if profile is not None and profile.saw_start(container=container_id,
                                                         now=self._clock()):
                self._dirty.add(image_id)
                log.warning("baseline %s: first container start learned (%d start-up items "
                            "outside learning); later starts are checked", profile.image_name,
                            sum(1 for e in profile.startup_items
                                if e["container"] == container_id))

    def save(self) -> None:
        for image_id in sorted(self._dirty):
            profile = self.profiles.get(image_id)
            if profile is not None:
                self.store.save(profile)
        self._dirty.clear()
        self._last_save = self._clock()

    def close(self) -> None:
        if self._fleet is not None:
            self._apply_fleet_updates()
            for image_id in list(self._held):
                self._release(image_id, "stop")
        if self._known is not None:  # the hits since the last read count too
            self._known_tick(self._clock(), read=True)
        self._handle_windows(self.windows.flush())
        self.save()
        closer = getattr(self._alerts, "close", None)
        if closer is not None:
            closer()


class LayersCache:
    """Container id -> its overlay layers (bounded LRU), read from /proc/PID/mountinfo, or,
    when that process is already gone or not yet inside the container's root (runc init), from
    the runtime's record of the container (`graph_driver_of`: Docker's GraphDriver data, from
    runtimes.docker.DockerGraphDriver).

    Both give the layers' paths on the node. `host_root` is where the node's / is seen from
    here: "/" for an agent on the node, `/proc/1/root` for one in a container (the DaemonSet's
    pod, which shares the node's pid namespace but not its files). None: found out once, for
    the real /proc (`node_root`)."""

    MISS_SECONDS = 5.0  # a container the runtime could not describe is not asked again sooner

    def __init__(self, proc_root: str = "/proc", capacity: int = 1024,
                 graph_driver_of: Callable[[str], dict | None] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 host_root: str | None = None) -> None:
        self._proc_root = proc_root
        self._host_root = Path(node_root(proc_root) if host_root is None else host_root)
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
        if self._host_root != Path("/"):
            layers = Layers(upper=_under(self._host_root, layers.upper),
                            lowers=tuple(_under(self._host_root, p) for p in layers.lowers))
        self._cache[container_id] = layers
        if len(self._cache) > self._capacity:
            self._cache.popitem(last=False)
        return layers


def node_root(proc_root: str = "/proc") -> str:
    """Where the node's / is seen from this process: "/" on the node itself (or for a test's
    fake /proc), else `<proc_root>/<pid>/root` of the nearest ancestor in another mount
    namespace: in a pod or container that shares the node's pid namespace, the runtime's shim
    (containerd-shim, conmon) that started it, which lives in the node's (pid 1 may not be
    ours to look at, even for root)."""
    if proc_root != "/proc":
        return "/"  # a test's fake /proc: its paths are this host's
    try:
        own = os.readlink(f"{proc_root}/self/ns/mnt")
        pid = os.getppid()
        while pid > 1:
            if os.readlink(f"{proc_root}/{pid}/ns/mnt") != own:
                root = f"{proc_root}/{pid}/root"
                os.stat(root)  # reachable (root with CAP_SYS_PTRACE)
                return root
            with open(f"{proc_root}/{pid}/stat", "rb") as fh:
                pid = int(fh.read().rsplit(b")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        log.warning("cannot tell where the node's files are seen from here; reading container "
                    "layers at their node paths", exc_info=log.isEnabledFor(logging.DEBUG))
    return "/"


def _under(root: Path, path: Path) -> Path:
    return root / str(path).lstrip("/")


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
