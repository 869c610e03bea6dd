"""Per-container feature windows: what one container did in one fixed-length window, as numbers.

The anomaly model (driftwarden.models.forest) learns, per image, what these vectors look like and
flags windows that look different. Exact novelty (a never-seen executable, destination or write
location) is decided upstream by set lookups; the caller tells `WindowAggregator.add` which item
kinds of a record were new and the window counts them (`novel_*`), and which of those it raised
an alert for (`Window.alerted_novelty`: an anomaly that only restates them says nothing new).

Feature vector
--------------
`FEATURES` is the fixed order of the vector. It is APPEND-ONLY: stored baselines keep their
training vectors in this order, so a feature is never removed, renamed or moved; new features go
at the end (a model trained on an older, shorter list reads only the prefix it knows).

Every feature is a count per window. Windows have a fixed length (`window_seconds`), so a count is
a rate (events per window) and no division is needed; models must only compare windows of the
same length.

=====================  =====================================================================
execs                  successful execs (retval 0)
distinct_executables   distinct (executable path, basename(argv[0])) pairs among them; a
                       multi-call binary such as busybox counts once per applet
shells_spawned         successful execs of sh/bash/dash/ash/zsh/ksh/mksh, by basename of the
                       executable or of argv[0] (a leading "-" of login shells is ignored)
execs_from_writable    successful execs whose file or resolved executable lives under /tmp,
                       /var/tmp, /dev/shm, /run, /root or /home, or is a memfd
connects               connect() calls, whatever their result
distinct_destinations  distinct (family, address, port)
failed_connects        connects that were refused, unreachable, timed out, denied or errored
                       ("in-progress" is a normal non-blocking connect, not a failure)
connects_public        IPv4/IPv6 connects to an address that is not loopback, private,
                       link-local, multicast, reserved or unspecified
writes_create          open with O_CREAT or O_TMPFILE (and not O_APPEND)
writes_truncate        open with O_TRUNC but without O_CREAT/O_APPEND, or truncate()
writes_append          open with O_APPEND
writes_rename          rename
writes_unlink          unlink, rmdir
writes_chmod_x         chmod to a mode with an execute bit (and no setuid/setgid bit)
writes_setuid          chmod to a mode with the setuid or setgid bit
writes_other           every other write event (plain O_WRONLY/O_RDWR opens, chmod without
                       x bits, link, symlink, mkdir, mknod)
distinct_write_dirs    distinct parent directories of written paths (both paths of a rename)
novel_exec             records the caller marked as a new executable ("exec" in `novel`)
novel_connect          records the caller marked as a new destination ("connect" in `novel`)
novel_write            records the caller marked as a new write location ("write" in `novel`)
execs_failed           failed execs (PATH searches make many; kept apart from `execs`)
=====================  =====================================================================

The writes_* classes are exclusive: each write event adds to exactly one of them, so they sum to
the number of write events. Failed writes and connects count (an attempt is behaviour); failed
execs count only in execs_failed. Records flagged `runtime_setup` (the container runtime's own
setup before the entrypoint runs) and "chdir" records are not behaviour and are ignored.

Windows
-------
Windows are aligned to the clock (`[k*W, (k+1)*W)`), the same for every container, so one
`tick()` closes the windows of all containers at once and the model scores them in one batch.
A record counts in the window of the time the caller gives (`add(now=...)`: the agent gives the
event's own kernel time as wall time, so a burst that reaches a lagging agent late still falls
into the windows it happened in); a record whose window was already closed counts in its
container's open window (`stats.late`). `tick(t)` closes the windows that ended by `t`: the
caller decides when a window is complete (agent.detect: the newest event's time, or the wall
clock minus the agent's lag when the container is idle).
A container's state starts at its first record. A window in which the container did nothing is
still emitted (idle is normal behaviour and the model must learn it) for up to `idle_windows`
(default 3) consecutive silent windows; after more than that the container is dropped from the
state (it has stopped or sleeps; its next record starts a fresh state). State is an LRU of at
most `max_containers` containers: evicting one emits its partial window, tainted "evicted".
Distinct-counts saturate at `max_distinct` per window so a burst cannot grow memory.

A window is tainted (`mark_tainted`) when what it counted is known to be incomplete: the kernel
dropped events, or events could not be attributed to a container. Tainted windows are still
emitted and scored but must not be learned from.
"""

from __future__ import annotations

import enum
import ipaddress
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from driftwarden.core.records import TraceRecord
from driftwarden.probes._layout import FileOp
from driftwarden.probes.events import ConnectEvent, ConnectResult, ExecEvent, Family, FileEvent

# NEVER reorder, rename or remove: append new features at the end only (see the module docstring).
FEATURES: tuple[str, ...] = (
    "execs",
    "distinct_executables",
    "shells_spawned",
    "execs_from_writable",
    "connects",
    "distinct_destinations",
    "failed_connects",
    "connects_public",
    "writes_create",
    "writes_truncate",
    "writes_append",
    "writes_rename",
    "writes_unlink",
    "writes_chmod_x",
    "writes_setuid",
    "writes_other",
    "distinct_write_dirs",
    "novel_exec",
    "novel_connect",
    "novel_write",
    "execs_failed",
)
INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURES)}
NOVEL_KINDS = frozenset({"exec", "connect", "write"})

SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh", "ksh", "mksh"})
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/root", "/home")
MEMFD_PREFIX = "/memfd:"
_WRITABLE_PREFIXES = tuple(d + "/" for d in WRITABLE_DIRS)  # one startswith per exec
FAILED_CONNECTS = frozenset({ConnectResult.REFUSED, ConnectResult.UNREACHABLE,
                             ConnectResult.TIMED_OUT, ConnectResult.DENIED,
                             ConnectResult.ERROR})

O_APPEND = 0o2000
O_CREAT = 0o100
O_TRUNC = 0o1000
O_TMPFILE_DIR = 0o20000000
S_SETID = 0o6000
S_ANYX = 0o111

_I = INDEX
_EXECS, _SHELLS, _WRITABLE = _I["execs"], _I["shells_spawned"], _I["execs_from_writable"]
_EXECS_FAILED, _CONNECTS = _I["execs_failed"], _I["connects"]
_FAILED, _PUBLIC = _I["failed_connects"], _I["connects_public"]
_W_CREATE, _W_TRUNC, _W_APPEND = _I["writes_create"], _I["writes_truncate"], _I["writes_append"]
_W_RENAME, _W_UNLINK, _W_CHMODX = _I["writes_rename"], _I["writes_unlink"], _I["writes_chmod_x"]
_W_SETUID, _W_OTHER = _I["writes_setuid"], _I["writes_other"]
_NOVEL = {"exec": _I["novel_exec"], "connect": _I["novel_connect"], "write": _I["novel_write"]}
_DISTINCT_EXE, _DISTINCT_DST = _I["distinct_executables"], _I["distinct_destinations"]
_DISTINCT_DIRS = _I["distinct_write_dirs"]
_OPEN = FileOp.OPEN  # most writes: a module constant, not an enum class lookup per write
_MAX_CACHED_PARENTS = 4096  # WindowAggregator._parent_of: paths whose parent is remembered


def vector_dict(vector: Sequence[float]) -> dict[str, float]:
    """{feature name: value} for a vector in FEATURES order (a shorter, older vector gives the
    prefix it has)."""
    return {name: float(value) for name, value in zip(FEATURES, vector, strict=False)}


def _basename(path: str | None) -> str:
    if not path:
        return ""
    return path.rstrip("/").rsplit("/", 1)[-1]


def _parent_dir(path: str) -> str:
    """posixpath.dirname(path.rstrip("/")) or "/", without its generic overhead (per write)."""
    path = path.rstrip("/")
    head = path[: path.rfind("/") + 1]
    if head and head != "/" * len(head):
        head = head.rstrip("/")
    return head or "/"


def is_shell(*names: str | None) -> bool:
    """True when any of the paths/argv0s names a shell (by basename; "-sh" counts)."""
    return any(_basename(n).lstrip("-") in SHELLS for n in names if n)


def is_writable_location(path: str | None) -> bool:
    if not path:
        return False
    if path.startswith(MEMFD_PREFIX):
        return True
    return path in WRITABLE_DIRS or path.startswith(_WRITABLE_PREFIXES)


@lru_cache(maxsize=4096)
def is_public_address(address: str) -> bool:
    """Not loopback, private, link-local, multicast, reserved or unspecified (cached: parsing an
    address costs microseconds and a workload talks to few)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return not (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast
                or ip.is_reserved or ip.is_unspecified)


def write_class(event: FileEvent) -> int:
    """The writes_* feature index of one write event (exactly one class per event)."""
    op = event.op
    if op == _OPEN:
        flags = event.open_flags
        if flags & O_APPEND:
            return _W_APPEND
        if flags & (O_CREAT | O_TMPFILE_DIR):
            return _W_CREATE
        if flags & O_TRUNC:
            return _W_TRUNC
        return _W_OTHER
    if op == FileOp.TRUNCATE:
        return _W_TRUNC
    if op == FileOp.RENAME:
        return _W_RENAME
    if op in (FileOp.UNLINK, FileOp.RMDIR):
        return _W_UNLINK
    if op == FileOp.CHMOD:
        if event.mode & S_SETID:
            return _W_SETUID
        if event.mode & S_ANYX:
            return _W_CHMODX
    return _W_OTHER


@dataclass(frozen=True, slots=True)
class Window:
    """One closed window of one container. `vector` is in FEATURES order."""

    container_id: str
    image_id: str | None
    start: float
    end: float
    vector: tuple[float, ...]
    events: int
    tainted: bool = False
    taint_reasons: tuple[str, ...] = ()
    image: str | None = None  # name:tag, for people
    # (novel_* feature, records counted in it whose novelty the caller alerted), non-zero only
    alerted_novelty: tuple[tuple[str, int], ...] = ()

    def as_dict(self) -> dict[str, float]:
        return vector_dict(self.vector)


class _Acc:
    """The open window of one container."""

    __slots__ = ("alerted", "counts", "dirs", "dsts", "events", "exes", "idle", "image",
                 "image_id", "start", "taints")

    def __init__(self, start: float) -> None:
        self.start = start
        self.image_id: str | None = None
        self.image: str | None = None
        self.idle = 0  # consecutive silent windows already emitted
        self.reset(start)

    def reset(self, start: float) -> None:
        self.start = start
        self.counts = [0] * len(FEATURES)
        self.alerted: Counter[str] = Counter()  # novel_* feature -> records alerted
        self.exes: set = set()
        self.dsts: set = set()
        self.dirs: set = set()
        self.events = 0
        self.taints: list[str] = []


class WhyIgnored(enum.StrEnum):
    NO_CONTAINER = "no_container"
    RUNTIME_SETUP = "runtime_setup"
    KIND = "kind"


@dataclass
class AggregatorStats:
    ignored: Counter = field(default_factory=Counter)
    windows: int = 0
    idle_windows: int = 0
    dropped_silent: int = 0
    evicted: int = 0
    late: int = 0  # records whose window had closed: counted in the open one


class WindowAggregator:
    """Counts TraceRecords into fixed, clock-aligned windows per container (see module doc)."""

    def __init__(self, window_seconds: float = 10.0, *,
                 clock: Callable[[], float] = time.monotonic, max_containers: int = 4096,
                 idle_windows: int = 3, max_distinct: int = 4096) -> None:
        if not window_seconds > 0:
            raise ValueError("window_seconds must be > 0")
        if max_containers < 1:
            raise ValueError("max_containers must be >= 1")
        self.window_seconds = float(window_seconds)
        self.clock = clock
        self.max_containers = max_containers
        self.idle_windows = idle_windows
        self.max_distinct = max_distinct
        self.stats = AggregatorStats()
        self._state: OrderedDict[str, _Acc] = OrderedDict()
        self._closed: list[Window] = []
        self._parent_dirs: dict[str, str] = {}  # path -> its parent directory (_parent_of)

    def __len__(self) -> int:
        return len(self._state)

    def containers(self) -> list[str]:
        return list(self._state)

    def _aligned(self, t: float) -> float:
        w = self.window_seconds
        return math.floor(t / w) * w

    # -- input ------------------------------------------------------------------------------

    def add(self, record: TraceRecord, novel: Iterable[str] = frozenset(), *,
            now: float | None = None, alerted: Iterable[str] = frozenset()) -> None:
        """Count one record into its container's open window. `novel`: the item kinds of this
        record ("exec", "connect", "write") the caller found new for the image; `alerted`: those
        of them it raised an alert for."""
        cid = record.container.id
        if not cid:
            self.stats.ignored[WhyIgnored.NO_CONTAINER] += 1
            return
        if record.runtime_setup:
            self.stats.ignored[WhyIgnored.RUNTIME_SETUP] += 1
            return
        kind = record.kind
        if kind not in NOVEL_KINDS:
            self.stats.ignored[WhyIgnored.KIND] += 1
            return
        t = self.clock() if now is None else now
        state = self._state
        acc = state.get(cid)
        if acc is not None and t < acc.start + self.window_seconds:
            state.move_to_end(cid)  # its window is open: what _open would do
        else:
            acc = self._open(cid, t)
        if t < acc.start:
            self.stats.late += 1
        view = record.container
        if view.image_id is not None:
            acc.image_id = view.image_id
        if view.image is not None:
            acc.image = view.image
        acc.events += 1
        event = record.event
        if kind == "write":
            self._add_write(acc, record, event)
        elif kind == "connect":
            self._add_connect(acc, event)
        else:
            self._add_exec(acc, record, event)
        if novel:
            counts = acc.counts
            for k in novel:
                counts[_NOVEL[k]] += 1
        if alerted:
            for k in alerted:
                acc.alerted[FEATURES[_NOVEL[k]]] += 1

    def _add_exec(self, acc: _Acc, record: TraceRecord, event: ExecEvent) -> None:
        counts = acc.counts
        if event.retval != 0:
            counts[_EXECS_FAILED] += 1
            return
        counts[_EXECS] += 1
        argv0 = event.argv[0] if event.argv else None
        path = record.path or event.filename
        exe = record.exe or path
        if len(acc.exes) < self.max_distinct:
            acc.exes.add((exe, _basename(argv0)))
        if is_shell(exe, path, argv0):
            counts[_SHELLS] += 1
        if is_writable_location(path) or is_writable_location(record.exe):
            counts[_WRITABLE] += 1

    def _add_connect(self, acc: _Acc, event: ConnectEvent) -> None:
        counts = acc.counts
        counts[_CONNECTS] += 1
        if len(acc.dsts) < self.max_distinct:
            acc.dsts.add((event.family, event.address, event.port))
        if event.result in FAILED_CONNECTS:
            counts[_FAILED] += 1
        if event.family in (Family.INET, Family.INET6) and is_public_address(event.address):
            counts[_PUBLIC] += 1

    def _add_write(self, acc: _Acc, record: TraceRecord, event: FileEvent) -> None:
        acc.counts[write_class(event)] += 1
        dirs = acc.dirs
        p = record.path or event.path
        if p and len(dirs) < self.max_distinct:
            parent = self._parent_dirs.get(p)
            if parent is None:
                parent = self._parent_of(p)
            dirs.add(parent)
        p = record.path2 or event.path2
        if p and len(dirs) < self.max_distinct:
            dirs.add(_parent_dir(p))

    def _parent_of(self, path: str) -> str:
        """_parent_dir, cached (bounded): most writes go to paths written before."""
        parents = self._parent_dirs
        if len(parents) >= _MAX_CACHED_PARENTS:
            parents.clear()
        parent = parents[path] = _parent_dir(path)
        return parent

    def mark_tainted(self, container_id: str, reason: str, *, now: float | None = None) -> None:
        """Taint the container's open window (events dropped by the kernel, unattributed events,
        ...): it is still emitted and scored but must not be learned from. Without `now`, the
        window open now, as it is: the clock must not close windows whose events may still be
        on their way (windows go by the events' time)."""
        acc = self._state.get(container_id) if now is None else None
        if acc is None:
            acc = self._open(container_id, self.clock() if now is None else now)
        if reason not in acc.taints:
            acc.taints.append(reason)

    def mark_all_tainted(self, reason: str, *, now: float | None = None) -> None:
        """Taint every open window (e.g. the ring buffer dropped events of unknown containers)."""
        for cid in list(self._state):
            self.mark_tainted(cid, reason, now=now)

    # -- windows ----------------------------------------------------------------------------

    def _open(self, cid: str, t: float) -> _Acc:
        acc = self._state.get(cid)
        if acc is None:
            acc = _Acc(self._aligned(t))
            self._state[cid] = acc
            if len(self._state) > self.max_containers:
                old_cid, old = self._state.popitem(last=False)
                self.stats.evicted += 1
                old.taints.append("evicted")
                self._emit(old_cid, old, t)
            return acc
        self._state.move_to_end(cid)
        if acc.start + self.window_seconds <= t and not self._roll(cid, acc, t):
            # silent for too long: its state was dropped; start afresh
            acc = _Acc(self._aligned(t))
            self._state[cid] = acc
        return acc

    def _emit(self, cid: str, acc: _Acc, end: float) -> None:
        counts = acc.counts
        counts[_DISTINCT_EXE] = len(acc.exes)
        counts[_DISTINCT_DST] = len(acc.dsts)
        counts[_DISTINCT_DIRS] = len(acc.dirs)
        self._closed.append(Window(
            container_id=cid, image_id=acc.image_id, start=acc.start, end=end,
            vector=tuple(float(c) for c in counts), events=acc.events,
            tainted=bool(acc.taints), taint_reasons=tuple(acc.taints), image=acc.image,
            alerted_novelty=tuple(sorted(acc.alerted.items()))))
        self.stats.windows += 1

    def _roll(self, cid: str, acc: _Acc, t: float) -> bool:
        """Close the container's windows that ended by `t`. False when the container has been
        silent for more than `idle_windows` windows (its state is then removed)."""
        w = self.window_seconds
        while acc.start + w <= t:
            end = acc.start + w
            if acc.events == 0 and not acc.taints:
                if acc.idle >= self.idle_windows:
                    del self._state[cid]
                    self.stats.dropped_silent += 1
                    return False
                acc.idle += 1
                self.stats.idle_windows += 1
            else:
                acc.idle = 0
            self._emit(cid, acc, end)
            acc.reset(end)
        return True

    def tick(self, now: float | None = None) -> list[Window]:
        """Close every window that ended by `now` and return all windows closed since the last
        tick, ordered by end time then container id."""
        t = self.clock() if now is None else now
        for cid, acc in list(self._state.items()):
            self._roll(cid, acc, t)
        closed, self._closed = self._closed, []
        closed.sort(key=lambda win: (win.end, win.container_id))
        return closed

    def flush(self) -> list[Window]:
        """Close every open window now (shutdown), partial windows tainted "partial"."""
        t = self.clock()
        out = self.tick(t)
        for cid, acc in list(self._state.items()):
            if acc.events or acc.taints:
                acc.taints.append("partial")
                self._emit(cid, acc, t)
        self._state.clear()
        out.extend(self._closed)
        self._closed = []
        return out
