"""The trace pipeline: capture -> decode -> resolve paths -> attribute -> filter -> sinks.

One direction, one stage per module; this module wires them and owns only the small amount of
state that belongs to the flow itself (events waiting for container metadata, counts).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from driftwarden.agent.processes import (
    PROC_SELF_EXE,
    ExecRepeats,
    ExecTarget,
    ProcessTable,
    ResolvedPath,
    normalize,
)
from driftwarden.agent.procfs import ProcessSnapshot, ProcReader
from driftwarden.agent.startup import (
    SNAPSHOT_CLOCK_FACT,
    SnapshotClock,
    parents_first,
    snapshot_record,
)
from driftwarden.core.records import ContainerView, ProcKey, TraceRecord
from driftwarden.probes._layout import AT_FDCWD, EventKind, FileOp
from driftwarden.probes.capture import CaptureSource, CaptureWriter
from driftwarden.probes.decode import Decoder
from driftwarden.probes.events import (
    ChdirEvent,
    ConnectEvent,
    ExecEvent,
    ExecRepeatEvent,
    ExitEvent,
    FileEvent,
    ForkEvent,
    KernelEvent,
)

log = logging.getLogger(__name__)

KIND_NAMES = {EventKind.EXEC: "exec", EventKind.CONNECT: "connect", EventKind.FILE: "write",
              EventKind.CHDIR: "chdir", EventKind.FORK: "fork", EventKind.EXIT: "exit",
              EventKind.EXEC_REPEAT: "exec_repeat"}
USER_KINDS = ("exec", "connect", "write")
# A brand-new container's first events can beat its cgroup directory into the index ("unknown")
# and its metadata into the cache ("pending"): both wait, up to pending_timeout.
_WAIT_STATES = frozenset({"pending", "unknown"})
# an exec of another process's binary by its /proc link (a deleted file has no other name); the
# pid is the container's view of it, so only the exec'ing process's own /proc/PID/exe tells
_PROC_PID_EXE = re.compile(r"/proc/\d+/exe")
# a NamedTuple from all its values without the generated __new__'s Python frame (per record)
_new = tuple.__new__


class AttributionLookup(Protocol):
    def lookup(self, cgroup_id: int) -> ContainerView: ...


class Sink(Protocol):
    def write(self, record: TraceRecord) -> None: ...

    def flush(self) -> None: ...


@dataclass(frozen=True)
class TraceFilter:
    kinds: frozenset[str] = frozenset(USER_KINDS)
    containers: tuple[str, ...] = ()
    include_host: bool = False
    show_runtime_setup: bool = False
    # `agent --only-label KEY=VALUE`: only containers with every one of these labels; the
    # others' records are "not_selected" (an event not attributed to a container yet still
    # passes: it may be a selected one's, and it taints the windows as any unattributed event)
    labels: tuple[tuple[str, str], ...] = ()

    def accepts(self, record: TraceRecord) -> str | None:
        """None when the record is shown, else the reason it is filtered (a counter name)."""
        if record.kind not in self.kinds:
            return "kind"
        if record.runtime_setup and not self.show_runtime_setup:
            return "runtime_setup"
        view = record.container
        if view.state == "host" and not self.include_host:
            return "host"
        if self.containers and not any(view.matches(s) for s in self.containers):
            return "container"
        if self.labels and view.state == "container" and not labels_match(self.labels,
                                                                           view.labels):
            return "not_selected"
        return None


def labels_match(wanted: tuple[tuple[str, str], ...], labels: tuple[tuple[str, str], ...]
                 ) -> bool:
    """Whether `labels` (a container's, sorted pairs, one per key) hold every (key, value) of
    `wanted`. Per record with --only-label: membership in the tuple, nothing built."""
    return all(pair in labels for pair in wanted)


@dataclass
class TraceSummary:
    kernel: dict[str, dict[str, int]] = field(default_factory=dict)
    decoded: Counter = field(default_factory=Counter)
    decode_errors: Counter = field(default_factory=Counter)
    shown: Counter = field(default_factory=Counter)
    filtered: Counter = field(default_factory=Counter)
    unresolved_paths: int = 0
    pending_timeouts: int = 0
    elapsed: float = 0.0

    def to_dict(self) -> dict:
        return {
            "kernel": self.kernel,
            "decoded": dict(self.decoded),
            "decode_errors": dict(self.decode_errors),
            "shown": dict(self.shown),
            "filtered": dict(self.filtered),
            "unresolved_paths": self.unresolved_paths,
            "pending_timeouts": self.pending_timeouts,
            "elapsed_s": round(self.elapsed, 3),
        }


SNAPSHOT_FACT = ("snapshot",)


class RecordingProcReader:
    """Wraps a ProcReader and writes every answer to the capture file as a fact."""

    def __init__(self, inner: ProcReader, writer: CaptureWriter) -> None:
        self._inner = inner
        self._writer = writer

    def _ask(self, name: str, *args):
        value = getattr(self._inner, name)(*args)
        # asked while handling the record written last
        self._writer.fact((name, *args), value, self._writer.records - 1)
        return value

    def cwd(self, tgid: int) -> str | None:
        return self._ask("cwd", tgid)

    def exe(self, tgid: int) -> str | None:
        return self._ask("exe", tgid)

    def fd_path(self, tgid: int, fd: int) -> str | None:
        return self._ask("fd_path", tgid, fd)

    def start_ticks(self, tgid: int) -> int | None:
        return self._ask("start_ticks", tgid)

    def snapshot(self) -> list[ProcessSnapshot]:
        found = self._inner.snapshot()
        # before the first record (seq -1): a replay seeds its table from it as the run did
        self._writer.fact(SNAPSHOT_FACT, [p.to_dict() for p in found], self._writer.records - 1)
        return found

    def snapshot_clock(self) -> SnapshotClock | None:
        clock = read_snapshot_clock(self._inner)
        self._writer.fact(SNAPSHOT_CLOCK_FACT, clock.to_dict() if clock else None,
                          self._writer.records - 1)
        return clock


class ReplayProcReader:
    """Answers /proc questions from a capture file's facts."""

    def __init__(self, facts) -> None:
        self._facts = facts

    def cwd(self, tgid: int) -> str | None:
        return self._facts.get(("cwd", tgid))

    def exe(self, tgid: int) -> str | None:
        return self._facts.get(("exe", tgid))

    def fd_path(self, tgid: int, fd: int) -> str | None:
        return self._facts.get(("fd_path", tgid, fd))

    def start_ticks(self, tgid: int) -> int | None:
        return self._facts.get(("start_ticks", tgid))

    def snapshot(self) -> list[ProcessSnapshot]:
        return [ProcessSnapshot.from_dict(p) for p in self._facts.get(SNAPSHOT_FACT) or ()]

    def snapshot_clock(self) -> SnapshotClock | None:
        """None in a capture recorded without it: the synthetic records' times are 0."""
        data = self._facts.get(SNAPSHOT_CLOCK_FACT)
        return SnapshotClock.from_dict(data) if data else None


def read_snapshot_clock(proc) -> SnapshotClock | None:
    """The start-up snapshot's clock: the reader's (a replay's recorded one), else this host's
    now."""
    read = getattr(proc, "snapshot_clock", None)
    return read() if read is not None else SnapshotClock.now()


class ReplayAttribution:
    """Attribution from a capture file: the container views the live run reported."""

    def __init__(self, facts) -> None:
        self._facts = facts
        self._views: dict[int, tuple[dict, ContainerView]] = {}

    def lookup(self, cgroup_id: int) -> ContainerView:
        data = self._facts.get(("attr", cgroup_id))
        if data is None:
            return ContainerView(state="unknown", cgroup_id=cgroup_id)
        cached = self._views.get(cgroup_id)
        if cached is not None and cached[0] is data:
            return cached[1]
        view = ContainerView.from_dict(data)
        self._views[cgroup_id] = (data, view)
        return view


class TracePipeline:
    def __init__(
        self,
        source: CaptureSource,
        *,
        proc: ProcReader,
        attribution: AttributionLookup,
        sinks: Iterable[Sink],
        trace_filter: TraceFilter | None = None,
        recorder: CaptureWriter | None = None,
        pending_timeout: float = 1.0,
        pending_capacity: int = 10000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.decoder = Decoder(source.limits)
        self.recorder = recorder
        if recorder is not None:
            proc = RecordingProcReader(proc, recorder)
        self.proc = proc
        self.processes = ProcessTable(proc)
        # what recent execs ran, for the kernel's compact records of their suppressed repeats
        self.exec_repeats = ExecRepeats()
        # the processes running when the pipeline started (seed_processes): None until then
        self.snapshot: list[ProcessSnapshot] | None = None
        self.snapshot_clock: SnapshotClock | None = None
        self.attribution = attribution
        self.sinks = list(sinks)
        self.filter = trace_filter or TraceFilter()
        self.pending_timeout = pending_timeout
        self.pending_capacity = pending_capacity
        self.clock = clock
        self.summary = TraceSummary()
        # cgroup id -> records waiting for container metadata (arrival order kept)
        self._pending: OrderedDict[int, deque[tuple[float, int, TraceRecord]]] = OrderedDict()
        self._waiting_view = ContainerView(state="pending", cgroup_id=0)
        self._recorded_views: dict[int, ContainerView] = {}
        self._pending_count = 0
        self._position_hook = getattr(source, "set_position_for", None)
        self._enrichers: dict[type, Callable[[KernelEvent, ContainerView], TraceRecord]]
        self._enrichers = {
            FileEvent: self._enrich_file,
            ExecEvent: self._enrich_exec,
            ConnectEvent: self._enrich_connect,
        }
        # events that only update the process table: no record, no container lookup
        self._bookkeeping: dict[type, Callable[[KernelEvent], None]] = {
            ChdirEvent: self._on_chdir,
            ForkEvent: self._on_fork,
            ExitEvent: self._on_exit,
            ExecRepeatEvent: self._on_exec_repeat,
        }
        self._records_seen = 0
        # processes of the runtime that re-exec'd the runtime itself inside a container's cgroup
        # (runc's `runc init`, from its clone of its own binary): still the runtime's
        self._runtime_keys: OrderedDict[ProcKey, None] = OrderedDict()
        # the start-up snapshot's processes outside containers (the runtime's shims among them)
        self._host_keys: set[ProcKey] = set()

    # -- stages -------------------------------------------------------------

    def seed_processes(self) -> list[ProcessSnapshot]:
        """Reads the processes running now (the start-up snapshot, recorded into a capture and
        replayed from one) into the process table; once, before the first event. Called by
        run(); the probes must be attached already, so nothing starts unseen in between."""
        if self.snapshot is None:
            self.snapshot = self.proc.snapshot()
            self.snapshot_clock = read_snapshot_clock(self.proc)
            self.processes.seed(self.snapshot)
            log.info("process table seeded with %d running processes", len(self.snapshot))
            self._emit_snapshot()
        return self.snapshot

    def _emit_snapshot(self) -> None:
        """One synthetic exec record (before_agent) per process found in a container, parents
        first (agent/startup.py), attributed like the events: a container whose metadata is
        pending waits, in front of its first events. Their attribution is recorded as of
        before the first record (seq -1), so a replay sends them as the run did."""
        now = self.clock()
        lookup = self.attribution.lookup
        views: dict[int, ContainerView] = {}
        by_tgid = {p.tgid: p for p in self.snapshot}
        emitted = 0
        for snap in parents_first(self.snapshot):
            if snap.cgroup_id is None:
                continue
            view = views.get(snap.cgroup_id)
            if view is None:
                view = views[snap.cgroup_id] = lookup(snap.cgroup_id)
            if view.state != "container" and view.state not in _WAIT_STATES:
                self._record_view(view, -1)  # a replay skips them too
                self._host_keys.add(ProcKey(snap.tgid, 0))
                continue  # the host's own processes
            record = snapshot_record(snap, by_tgid.get(snap.ppid), view, self.processes,
                                     self.snapshot_clock)
            if record is None:
                continue
            emitted += 1
            if snap.cgroup_id in self._pending or view.state in _WAIT_STATES:
                self._enqueue(snap.cgroup_id, now, -1, record)
            else:
                self._deliver(self._attribute(record, view, -1))
        log.info("%d processes were running in containers before the agent started",
                 emitted)

    def _resolve(self, key: ProcKey, path: str | None, dirfd: int) -> ResolvedPath | None:
        if path == "" and dirfd == AT_FDCWD:
            # the kernel could not read the path (or it was empty): never pretend it was the cwd
            return ResolvedPath("", False)
        if path is None:
            if dirfd == AT_FDCWD:
                return None
            # fd-only syscalls (fchmod): the fd's path, if the process is still there
            return self.processes.resolve(key, "", dirfd)
        return self.processes.resolve(key, path, dirfd)

    def enrich(self, event: KernelEvent, view: ContainerView) -> TraceRecord | None:
        """Resolves paths and programs; `view` is the container as known now. None for
        bookkeeping events (chdir, fork, exit), which only update the process table."""
        bookkeeping = self._bookkeeping.get(type(event))
        if bookkeeping is not None:
            bookkeeping(event)
            return None
        return self._enrichers[type(event)](event, view)

    def _runtime_setup(self, h, key: ProcKey) -> bool:
        """runc preparing a container: its comm, and no exec by this very process (its key:
        a reused pid never inherits or loses that); or a process of the runtime (one whose
        program the agent never saw inside a container, or that re-exec'd the runtime there)
        under runc's names, "exe" included (runc's init runs as /proc/self/exe before it
        names itself)."""
        comm = h.comm
        if comm != "exe" and not comm.startswith("runc"):
            return False  # the common case: neither test below can hold
        if comm.startswith("runc") and _is_runtime_comm(comm) and (
                not self.processes.exec_seen(key)):
            return True
        return (comm == "exe" or _is_runtime_comm(comm)) and self._of_runtime(key)

    def _of_runtime(self, key: ProcKey) -> bool:
        """The process came into the container from the runtime: it re-exec'd the runtime
        there, or it runs nothing the agent saw and neither does its parent inside a
        container (a container's own processes inherit their programs at fork or come from
        the start-up snapshot; runc's are forked outside, by runc or the shim)."""
        if key in self._runtime_keys:
            return True
        table = self.processes
        program = table.program(key)
        if program is not None and program.exe is not None:
            return False
        parent = table.parent(key)
        if parent is None or parent in self._host_keys:
            return True
        known = table.program(parent)
        return known is None or known.exe is None

    def _record(self, event, kind: str, view: ContainerView, key: ProcKey,
                path: str | None = None, path_resolved: bool = True, path2: str | None = None,
                path2_resolved: bool = True) -> TraceRecord:
        """A connect or write record: the program its process runs, and its parent's."""
        h = event.header
        program, parent_program = self.processes.programs(key)
        comm = h.comm  # _runtime_setup's own fast exit, inlined (per record)
        setup = (comm == "exe" or comm.startswith("runc")) and self._runtime_setup(h, key)
        # every field, in TraceRecord's order (_new: no NamedTuple __new__ frame per event)
        return _new(TraceRecord, (event, kind, view, h.ppid or self._ppid(h, key), path,
                                  path_resolved, path2, path2_resolved, None, setup, program,
                                  parent_program, False))

    def _ppid(self, h, key: ProcKey) -> int:
        if h.ppid:
            return h.ppid
        parent = self.processes.parent(key)  # a process found at start-up: the snapshot's
        return parent.tgid if parent is not None else 0

    def _enrich_file(self, event: FileEvent, view: ContainerView) -> TraceRecord:
        key = self.processes.key_of(event.header)
        path = event.path
        if path and path[0] == "/" and event.op is not FileOp.SYMLINK:
            path, path_ok = normalize(path), True  # what _resolve answers (most records)
        else:
            first = self._resolve(key, path, event.dirfd)
            path, path_ok = (first.path, first.resolved) if first else (path, False)
            if event.op is FileOp.SYMLINK:
                # a symlink's target is stored verbatim; only the new link's path is resolved
                path, path_ok = event.path, True
        second = None
        if event.path2 is not None:
            second = self._resolve(key, event.path2, event.dirfd2)
        if second is None:
            path2, path2_ok = None, True
        else:
            path2, path2_ok = second
        if not path_ok or not path2_ok:
            self.summary.unresolved_paths += 1
        return self._record(event, "write", view, key, path, path_ok, path2, path2_ok)

    def _enrich_exec(self, event: ExecEvent, view: ContainerView) -> TraceRecord:
        h = event.header
        table = self.processes
        key = table.key_of(h)
        runtime_setup = self._runtime_setup(h, key)
        resolved = self._resolve(key, event.filename, event.dirfd)
        parent_program = table.prior_program(key)
        if event.ok and self._of_runtime(key):
            # the runtime starts the container's program: it has no lineage in the image,
            # unless this is runc re-exec'ing itself (`runc init`), which is setup
            parent_program = None
            if event.argv and event.argv[0].rsplit("/", 1)[-1] == "runc":
                runtime_setup = True
                self._runtime_keys[key] = None
                if len(self._runtime_keys) > 4096:
                    self._runtime_keys.popitem(last=False)
            else:
                self._runtime_keys.pop(key, None)
        exe = None
        if event.ok:
            self_exec = event.filename == PROC_SELF_EXE
            if not self_exec:
                exe = self._exec_target(key, event, resolved)
            target = ExecTarget(exe, event.argv[0] if event.argv else None, self_exec)
            self.exec_repeats.remember(h.cgroup_id, event.dedup_key, target)
            program = table.on_exec(key, target.exe, target.argv0, self_exec=self_exec)
            exe = program.exe
        else:
            program = table.program(key)  # it still runs what it ran
        # every field, in TraceRecord's order
        return self._count_unresolved(_new(TraceRecord, (
            event, "exec", view, h.ppid or self._ppid(h, key),
            resolved.path if resolved else event.filename,
            resolved.resolved if resolved else False, None, True, exe, runtime_setup, program,
            parent_program, False)))

    def _exec_target(self, key: ProcKey, event: ExecEvent, resolved: ResolvedPath | None
                     ) -> str | None:
        """The file a successful exec ran: its resolved path; for an exec of a file descriptor
        (execveat of an fd, /proc/self/fd/N), the fd's path, else, when the fd is already
        closed, /proc/PID/exe (a memfd or an unlinked file has no other name); for an exec of
        /proc/N/exe, the exec'ing process's /proc/PID/exe (N's binary, which may be deleted)."""
        by_fd = event.filename == "" and event.dirfd != AT_FDCWD
        if resolved is not None and resolved.resolved:
            fd = self.processes.fd_of_path(resolved.path)
            if fd is None:
                if _PROC_PID_EXE.fullmatch(resolved.path):
                    return self.processes.live_exe(key) or resolved.path
                return resolved.path
            target = self.processes.fd_path(key, fd)
            if target is not None:
                return target
            by_fd = True
        return self.processes.live_exe(key) if by_fd else None

    def _enrich_connect(self, event: ConnectEvent, view: ContainerView) -> TraceRecord:
        return self._record(event, "connect", view, self.processes.key_of(event.header))

    def _on_chdir(self, event: ChdirEvent) -> None:
        if event.retval == 0:
            key = self.processes.key_of(event.header)
            self.processes.on_chdir(key, event.path, event.fd, base=event.cwd_base)

    def _on_fork(self, event: ForkEvent) -> None:
        self.processes.on_fork(event.header, event.child_tgid, event.child_start_ns)

    def _on_exit(self, event: ExitEvent) -> None:
        h = event.header
        self._runtime_keys.pop(ProcKey(h.tgid, h.start_ns), None)
        self.processes.on_exit(event.header)

    def _on_exec_repeat(self, event: ExecRepeatEvent) -> None:
        """An exec the kernel's dedup suppressed: the process now runs what the full exec it
        repeats ran (a loop running one script twice a second: its second run's children are
        the script's). Not a record: detection counts it through the next full exec's
        `suppressed`, as before."""
        h = event.header
        key = self.processes.key_of(h)
        target = self.exec_repeats.lookup(h.cgroup_id, event.dedup_key)
        if target is None:
            self.processes.on_unknown_exec(key)
        else:
            self.processes.on_exec(key, target.exe, target.argv0, self_exec=target.self_exec)

    def _count_unresolved(self, record: TraceRecord) -> TraceRecord:
        if not record.path_resolved or not record.path2_resolved:
            self.summary.unresolved_paths += 1
        return record

    def _attribute(self, record: TraceRecord, view: ContainerView, seq: int) -> TraceRecord:
        self._record_view(view, seq)
        if record.container is view:
            return record
        return record._replace(container=view)

    def _record_view(self, view: ContainerView, seq: int) -> None:
        if self.recorder is not None and self._recorded_views.get(view.cgroup_id) != view:
            # only changes are written: replay answers with the latest view as of each record
            self._recorded_views[view.cgroup_id] = view
            if len(self._recorded_views) > 4096:
                self._recorded_views.pop(next(iter(self._recorded_views)))
            self.recorder.fact(("attr", view.cgroup_id), view.to_dict(), seq)

    def _deliver(self, record: TraceRecord) -> None:
        reason = self.filter.accepts(record)
        if reason is not None:
            self.summary.filtered[reason] += 1
            return
        self.summary.shown[record.kind] += 1
        for sink in self.sinks:
            sink.write(record)

    # -- driving ------------------------------------------------------------

    def process(self, raws: list[bytes]) -> None:
        now = self.clock()
        pending = self._pending
        views: dict[int, ContainerView] = {}  # one lookup per container per batch (~10 ms)
        lookup = self.attribution.lookup
        position_hook = self._position_hook
        recorder = self.recorder
        bookkeeping_of = self._bookkeeping.get
        enrichers = self._enrichers
        # _deliver, inlined below (per record)
        accepts = self.filter.accepts
        filtered, shown = self.summary.filtered, self.summary.shown
        sinks = self.sinks
        # the whole batch is decoded at once (no side effects but the decoder's counts); each
        # record's facts and recording stay in record order below
        events = self.decoder.decode_batch(raws)
        for raw, event in zip(raws, events, strict=True):
            seq = self._records_seen
            self._records_seen = seq + 1
            if position_hook is not None:
                position_hook(seq)
            if recorder is not None:
                recorder.record(raw)
            if event is None:
                continue
            kind = type(event)
            bookkeeping = bookkeeping_of(kind)
            if bookkeeping is not None:
                bookkeeping(event)
                continue
            cgid = event.header.cgroup_id
            # keep per-container order: behind the ones already waiting for metadata
            if cgid in pending:
                view = self._waiting_view
            else:
                view = views.get(cgid)
                if view is None:
                    view = views[cgid] = lookup(cgid)
            record = enrichers[kind](event, view)
            if view.state in _WAIT_STATES:
                self._enqueue(cgid, now, seq, record)
            else:
                if recorder is not None:
                    self._record_view(view, seq)
                if record.container is not view:
                    record = record._replace(container=view)
                reason = accepts(record)
                if reason is not None:
                    filtered[reason] += 1
                    continue
                shown[record.kind] += 1
                for sink in sinks:
                    sink.write(record)
        self._release_pending(now)
        if self.recorder is not None:
            self.recorder.flush()

    def _enqueue(self, cgid: int, now: float, seq: int, record: TraceRecord) -> None:
        if self._pending_count >= self.pending_capacity:
            # full: send the oldest container's waiting records with what is known, in order
            oldest = cgid if cgid in self._pending else next(iter(self._pending))
            self._flush_queue(oldest, self.attribution.lookup(oldest))
            if oldest == cgid:
                self.summary.pending_timeouts += 1
                self._deliver(self._attribute(record, self.attribution.lookup(cgid), seq))
                return
        self._pending.setdefault(cgid, deque()).append((now, seq, record))
        self._pending_count += 1

    def _release_pending(self, now: float, *, force: bool = False) -> None:
        for cgid in list(self._pending):
            queue = self._pending[cgid]
            view = self.attribution.lookup(cgid)
            expired = force or now - queue[0][0] >= self.pending_timeout
            if view.state in _WAIT_STATES and not expired:
                continue
            self._flush_queue(cgid, view)

    def _flush_queue(self, cgid: int, view: ContainerView) -> None:
        queue = self._pending.pop(cgid)
        if view.state in _WAIT_STATES:
            self.summary.pending_timeouts += len(queue)
        while queue:
            _, seq, record = queue.popleft()
            self._pending_count -= 1
            self._deliver(self._attribute(record, view, seq))

    def run(self, *, duration: float | None = None, should_stop: Callable[[], bool] | None = None,
            poll_interval: float = 0.05, idle_poll_interval: float | None = None) -> TraceSummary:
        """Reads and processes until the source ends, `duration` passed or `should_stop()`;
        each read waits up to `poll_interval` s, or `idle_poll_interval` s (None: the same)
        while no record waits for its container's metadata: fewer wake-ups of an idle agent,
        whose sinks' timers (windows, merged alerts) then run that much later at most."""
        started = self.clock()
        self.seed_processes()
        try:
            while True:
                if should_stop is not None and should_stop():
                    break
                if duration is not None and self.clock() - started >= duration:
                    break
                batch = self.source.read_batch(
                    poll_interval if idle_poll_interval is None or self._pending_count
                    else idle_poll_interval)
                if batch is None:
                    break
                self.process(batch)
                for sink in self.sinks:
                    sink.flush()
            # drain what the kernel still holds, then everything still waiting for metadata
            while True:
                tail = self.source.read_batch(0)
                if not tail:
                    break
                self.process(tail)
            self._release_pending(self.clock(), force=True)
        finally:
            for sink in self.sinks:
                sink.flush()
            self.summary.elapsed = self.clock() - started
            self.summary.decoded = Counter(self.decoder.decoded)
            self.summary.decode_errors = Counter(self.decoder.errors)
            self.summary.kernel = self.source.counters()
            if self.recorder is not None:
                self.recorder.close(self.summary.kernel)
        return self.summary



def _is_runtime_comm(comm: str) -> bool:
    """runc and its init stages write into a new container before its first exec."""
    return comm == "runc" or comm.startswith("runc:")
