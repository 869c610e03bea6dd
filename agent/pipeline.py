"""The trace pipeline: capture -> decode -> resolve paths -> attribute -> filter -> sinks.

One direction, one stage per module; this module wires them and owns only the small amount of
state that belongs to the flow itself (events waiting for container metadata, counts).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from driftwarden.agent.processes import PROC_SELF_EXE, ProcessTable, ResolvedPath
from driftwarden.agent.procfs import ProcReader
from driftwarden.core.records import ContainerView, TraceRecord
from driftwarden.probes._layout import AT_FDCWD, EventKind, FileOp
from driftwarden.probes.capture import CaptureSource, CaptureWriter
from driftwarden.probes.decode import Decoder
from driftwarden.probes.events import ChdirEvent, ConnectEvent, ExecEvent, FileEvent, KernelEvent

log = logging.getLogger(__name__)

KIND_NAMES = {EventKind.EXEC: "exec", EventKind.CONNECT: "connect", EventKind.FILE: "write",
              EventKind.CHDIR: "chdir"}
USER_KINDS = ("exec", "connect", "write")
# A brand-new container's first events can beat its cgroup directory into the index ("unknown")
# and its metadata into the cache ("pending"): both wait, up to pending_timeout.
_WAIT_STATES = frozenset({"pending", "unknown"})


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
        return None


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

    def ppid(self, tgid: int) -> int | None:
        return self._ask("ppid", tgid)

    def fd_path(self, tgid: int, fd: int) -> str | None:
        return self._ask("fd_path", tgid, fd)


class ReplayProcReader:
    """Answers /proc questions from a capture file's facts."""

    def __init__(self, facts) -> None:
        self._facts = facts

    def cwd(self, tgid: int) -> str | None:
        return self._facts.get(("cwd", tgid))

    def exe(self, tgid: int) -> str | None:
        return self._facts.get(("exe", tgid))

    def ppid(self, tgid: int) -> int | None:
        return self._facts.get(("ppid", tgid))

    def fd_path(self, tgid: int, fd: int) -> str | None:
        return self._facts.get(("fd_path", tgid, fd))


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
        self.processes = ProcessTable(proc)
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
        self._enrichers: dict[type, Callable[[KernelEvent, ContainerView], TraceRecord | None]]
        self._enrichers = {
            FileEvent: self._enrich_file,
            ExecEvent: self._enrich_exec,
            ConnectEvent: self._enrich_connect,
            ChdirEvent: self._enrich_chdir,
        }
        self._records_seen = 0

    # -- stages -------------------------------------------------------------

    def _resolve(self, tgid: int, ppid: int, path: str | None, dirfd: int) -> ResolvedPath | None:
        if path == "" and dirfd == AT_FDCWD:
            # the kernel could not read the path (or it was empty): never pretend it was the cwd
            return ResolvedPath("", False)
        if path is None:
            if dirfd == AT_FDCWD:
                return None
            # fd-only syscalls (fchmod): the fd's path, if the process is still there
            return self.processes.resolve(tgid, ppid, "", dirfd)
        return self.processes.resolve(tgid, ppid, path, dirfd)

    def enrich(self, event: KernelEvent, view: ContainerView) -> TraceRecord | None:
        """Resolves paths and lineage; `view` is the container as known now. None for
        bookkeeping events (chdir), which only update process state."""
        return self._enrichers[type(event)](event, view)

    def _runtime_setup(self, h) -> bool:
        return h.comm.startswith("runc") and _is_runtime_comm(h.comm) and (
            not self.processes.exec_seen(h.tgid))

    def _enrich_file(self, event: FileEvent, view: ContainerView) -> TraceRecord:
        h = event.header
        tgid, ppid = h.tgid, h.ppid
        first = self._resolve(tgid, ppid, event.path, event.dirfd)
        second = None
        if event.path2 is not None:
            second = self._resolve(tgid, ppid, event.path2, event.dirfd2)
        path, path_ok = (first.path, first.resolved) if first else (event.path, False)
        if event.op is FileOp.SYMLINK:
            # a symlink's target is stored verbatim; only the new link's path is resolved
            path, path_ok = event.path, True
        return self._count_unresolved(TraceRecord(
            event=event, kind="write", container=view, ppid=ppid,
            path=path, path_resolved=path_ok,
            path2=second.path if second else None,
            path2_resolved=second.resolved if second else True,
            runtime_setup=self._runtime_setup(h),
        ))

    def _enrich_exec(self, event: ExecEvent, view: ContainerView) -> TraceRecord:
        h = event.header
        tgid, ppid = h.tgid, h.ppid
        runtime_setup = self._runtime_setup(h)
        resolved = self._resolve(tgid, ppid, event.filename, event.dirfd)
        exe = None
        if event.ok:
            exe = self.processes.live_exe(tgid)
            if exe is None:
                if event.filename == PROC_SELF_EXE:
                    # the image it ran before this exec; on_exec below replaces it
                    exe = self.processes.exe_before_exec(tgid, ppid)
                elif resolved is not None and resolved.resolved:
                    exe = resolved.path
            self.processes.on_exec(tgid, ppid, exe)
        return self._count_unresolved(TraceRecord(
            event=event, kind="exec", container=view, ppid=ppid or 0,
            path=resolved.path if resolved else event.filename,
            path_resolved=resolved.resolved if resolved else False,
            exe=exe, runtime_setup=runtime_setup,
        ))

    def _enrich_connect(self, event: ConnectEvent, view: ContainerView) -> TraceRecord:
        h = event.header
        return TraceRecord(event=event, kind="connect", container=view, ppid=h.ppid,
                           runtime_setup=self._runtime_setup(h))

    def _enrich_chdir(self, event: ChdirEvent, view: ContainerView) -> None:
        if event.retval == 0:
            h = event.header
            self.processes.on_chdir(h.tgid, h.ppid, event.path, event.fd,
                                    base=event.cwd_base)

    def _count_unresolved(self, record: TraceRecord) -> TraceRecord:
        if not record.path_resolved or not record.path2_resolved:
            self.summary.unresolved_paths += 1
        return record

    def _attribute(self, record: TraceRecord, view: ContainerView, seq: int) -> TraceRecord:
        if self.recorder is not None and self._recorded_views.get(view.cgroup_id) != view:
            # only changes are written: replay answers with the latest view as of each record
            self._recorded_views[view.cgroup_id] = view
            if len(self._recorded_views) > 4096:
                self._recorded_views.pop(next(iter(self._recorded_views)))
            self.recorder.fact(("attr", view.cgroup_id), view.to_dict(), seq)
        if record.container is view:
            return record
        return record._replace(container=view)

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
        for raw in raws:
            seq = self._records_seen
            self._records_seen += 1
            if self._position_hook is not None:
                self._position_hook(seq)
            if self.recorder is not None:
                self.recorder.record(raw)
            event = self.decoder.decode(raw)
            if event is None:
                continue
            cgid = event.header.cgroup_id
            # keep per-container order: behind the ones already waiting for metadata
            if cgid in pending:
                view = self._waiting_view
            else:
                view = views.get(cgid)
                if view is None:
                    view = views[cgid] = lookup(cgid)
            record = self.enrich(event, view)
            if record is None:
                continue
            if view.state in _WAIT_STATES:
                self._enqueue(cgid, now, seq, record)
            else:
                self._deliver(self._attribute(record, view, seq))
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
            poll_interval: float = 0.05) -> TraceSummary:
        started = self.clock()
        try:
            while True:
                if should_stop is not None and should_stop():
                    break
                if duration is not None and self.clock() - started >= duration:
                    break
                batch = self.source.read_batch(poll_interval)
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
