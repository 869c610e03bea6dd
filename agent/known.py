"""The baseline in the kernel, the agent's side: which identities the kernel stops sending.

Once the detector has judged a connect or file record of a container whose image is out of
learning (monitor or protect) as known (no novel item, no drift), it offers the record here; its
kernel identity (``known_key``: the address, result and socket type with the program that
connected; or the operation, absolute paths, flags and mode of a write) goes into the probes' map
``known`` for that container's cgroup (probes/driftwarden.bpf.c). From then on the kernel counts
that identity's events there instead of sending them: one *hit* whenever dedup would have let
one through, so what the feature windows count stays what it was; repeats within the dedup
interval stay suppressed as before.

What stays exact:

* the windows: :meth:`KnownFilter.poll` reads the hits about once a second and hands back the
  record that was judged (the *exemplar*) with the number of new hits; the detector adds it to
  its container's window that many times, at the time of the last hit. With ``moved`` (the
  kernel's total of hits, one small read) the map is read only when that total moved, when
  entries went in since the last read, or ``max_read_age`` seconds after it: an idle node's
  hundreds of entries are not read every second;
* novelty and drift: only what the baseline holds is filtered, and only for identities whose
  judgement cannot change: execs are never filtered (a binary replaced in the container's upper
  layer is drift under the same name), nor relative paths (their hash holds the process and its
  working directory), nor connects of a process whose program the kernel never saw exec;
* learning: nothing is filtered for an image that learns (:meth:`forget_image` takes its
  entries out when it goes back to learning, or when its baseline is replaced or reset).

Bounded: at most ``capacity`` entries (the map's size); an offer beyond it is refused and
counted. The entries of a cgroup that is gone (its container stopped, restarted: a restart is a
new cgroup, or scaled down) are taken out once ``alive`` says so, checked every
``gone_check_seconds`` for cgroups whose entries saw no hit since the last read (counted), so a
node whose containers come and go does not fill the map with the dead; an entry whose identity
has not been seen for ``idle_seconds`` is taken out too (counted). The provenance of a drift (who
wrote a file) names the write that was judged, not a later repeat of it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from driftwarden.core.records import TraceRecord
from driftwarden.probes._layout import EventKind

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 16384
DEFAULT_IDLE_SECONDS = 600.0
DEFAULT_POLL_SECONDS = 1.0
DEFAULT_GONE_CHECK_SECONDS = 5.0
DEFAULT_MAX_READ_AGE = 10.0  # a map read at least this often (an entry taken out behind our back)
_KIND_NUMBERS = {"connect": int(EventKind.CONNECT), "write": int(EventKind.FILE)}

MapKey = tuple[int, int, int]  # (cgroup id, kind number, known key)
CgroupAlive = Callable[[int, str | None], bool]  # (cgroup id, its path) -> still there


def cgroup_alive(cgroup_root: str | os.PathLike) -> CgroupAlive:
    """Whether a cgroup still exists: its directory under `cgroup_root` (the cgroup v2 mount)
    is there with the same inode, which is its id (a restarted Docker container gets a new
    directory at the same path). A cgroup whose path is not known counts as alive."""
    root = os.fspath(cgroup_root).rstrip("/")

    def alive(cgroup_id: int, path: str | None) -> bool:
        if not path:
            return True
        try:
            return os.stat(root + path).st_ino == cgroup_id
        except FileNotFoundError:
            return False
        except OSError:  # unreadable: keep its entries (idle eviction still applies)
            return True

    return alive


@dataclass(slots=True)
class _Entry:
    image_id: str
    container_id: str
    exemplar: TraceRecord
    hits: int  # as last read
    seen_at: float  # when its hits last moved (or it went in)


class KnownFilter:
    """Decides what goes into the kernel's map ``known`` and reads back what it counted.

    ``install(entries)`` puts (cgroup id, kind number, key, kernel time) entries in the map and
    returns how many went in; ``read()`` returns {(cgroup id, kind number, key): (hits, kernel
    time of the last hit)}; ``remove(keys)`` takes entries out (probes.loader.ProbeSet's
    known_install, known_hits and known_remove). ``alive(cgroup id, cgroup path)`` says whether
    a cgroup still exists (``cgroup_alive``; None: never asked, only idle entries go).
    ``moved()`` is the kernel's total of hits over every entry (the probes' ``known`` counters;
    None: the map is read at every poll). Not thread-safe: the detector's lock covers it.
    """

    def __init__(self, install: Callable[[list[tuple[int, int, int, int]]], int],
                 read: Callable[[], dict[MapKey, tuple[int, int]]],
                 remove: Callable[[Iterable[MapKey]], None], *,
                 capacity: int = DEFAULT_CAPACITY, idle_seconds: float = DEFAULT_IDLE_SECONDS,
                 poll_seconds: float = DEFAULT_POLL_SECONDS,
                 alive: CgroupAlive | None = None,
                 gone_check_seconds: float = DEFAULT_GONE_CHECK_SECONDS,
                 moved: Callable[[], int] | None = None,
                 max_read_age: float = DEFAULT_MAX_READ_AGE,
                 clock: Callable[[], float] = time.time) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._install = install
        self._read = read
        self._remove = remove
        self.capacity = capacity
        self.idle_seconds = idle_seconds
        self.poll_seconds = poll_seconds
        self._alive = alive
        self.gone_check_seconds = gone_check_seconds
        self._last_gone_check = 0.0
        self._clock = clock
        self._entries: dict[MapKey, _Entry] = {}
        self._pending: dict[MapKey, _Entry] = {}
        self._by_image: defaultdict[str, set[MapKey]] = defaultdict(set)
        self._last_poll = 0.0
        self._moved = moved
        self.max_read_age = max_read_age
        self._counted: dict[MapKey, tuple[int, int]] = {}  # the last read of the map
        self._counted_total = -1  # moved() before that read
        self._read_at = float("-inf")
        self._unread = False  # entries went in since the last read: their fate is unknown
        self.stats: defaultdict[str, int] = defaultdict(int)
        # container id -> known events counted in the kernel (hits), for metrics
        self.hits_by_container: defaultdict[str, int] = defaultdict(int)

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def key_of(record: TraceRecord) -> MapKey | None:
        """The map key of a record the kernel could filter, or None."""
        kind = _KIND_NUMBERS.get(record.kind)
        key = getattr(record.event, "known_key", 0)
        if kind is None or not key:
            return None
        return (record.event.header.cgroup_id, kind, key)

    def offer(self, record: TraceRecord, image_id: str, container_id: str) -> bool:
        """A record judged known: its identity goes into the map at the next flush(). False
        when it cannot (no kernel identity, already there, or the map is full: counted)."""
        key = self.key_of(record)
        if key is None or key in self._entries or key in self._pending:
            return False
        if len(self._entries) + len(self._pending) >= self.capacity:
            self.stats["refused_full"] += 1
            return False
        self._pending[key] = _Entry(image_id, container_id, record, 0, self._clock())
        return True

    def flush(self) -> None:
        """Installs the offers since the last call (one map update each)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        entries = [(*key, entry.exemplar.event.header.ts_ns) for key, entry in pending.items()]
        installed = self._install(entries)
        if installed < len(entries):
            self.stats["refused_full"] += len(entries) - installed
        # the map reports what went in at the next read; keep every offer until then
        for key, entry in pending.items():
            self._entries[key] = entry
            self._by_image[entry.image_id].add(key)
        self._unread = True
        self.stats["installed"] += installed

    def due(self, now: float) -> bool:
        return now - self._last_poll >= self.poll_seconds

    def poll(self, now: float) -> list[tuple[TraceRecord, int, int]]:
        """(exemplar, new hits, kernel time of the last hit) for each entry counted since the
        last poll; entries idle for idle_seconds, entries of cgroups that are gone (their last
        hits counted first), and offers the map refused, taken out."""
        self._last_poll = now
        read = self._read_counted(now)
        check_gone = (self._alive is not None
                      and now - self._last_gone_check >= self.gone_check_seconds)
        if check_gone:
            self._last_gone_check = now
        if not read and not check_gone:
            return []  # no hit since the last read, and nothing to check
        counted = self._counted
        out = []
        idle = []
        alive: dict[int, bool] = {}  # cgroup id -> there, asked once a check
        for key, entry in self._entries.items():
            found = counted.get(key)
            if found is None:  # refused when the map was full (or taken out behind our back)
                idle.append(key)
                continue
            hits, last_ns = found
            if hits > entry.hits:
                new = hits - entry.hits
                entry.hits = hits
                entry.seen_at = now
                self.stats["hits"] += new
                self.hits_by_container[entry.container_id] += new
                out.append((entry.exemplar, new, last_ns))
            elif now - entry.seen_at >= self.idle_seconds:
                idle.append(key)
                self.stats["evicted_idle"] += 1
            elif check_gone and not self._cgroup_alive(key[0], entry, alive):
                idle.append(key)
                self.stats["gone"] += 1
        if idle:
            self._drop(idle)
        return out

    def _read_counted(self, now: float) -> bool:
        """Reads the map into _counted unless the kernel's total of hits says nothing moved
        since the last read (and nothing went in, and that read is recent); whether it read."""
        total = self._moved() if self._moved is not None else -1
        if (total >= 0 and total == self._counted_total and not self._unread
                and now - self._read_at < self.max_read_age):
            self.stats["reads_skipped"] += 1
            return False
        # the total before the map: a hit between the two is seen again at the next poll
        self._counted = self._read()
        self._counted_total, self._read_at, self._unread = total, now, False
        return True

    def _cgroup_alive(self, cgroup_id: int, entry: _Entry, asked: dict[int, bool]) -> bool:
        there = asked.get(cgroup_id)
        if there is None:
            there = asked[cgroup_id] = self._alive(cgroup_id, entry.exemplar.container.cgroup_path)
        return there

    def forget_image(self, image_id: str) -> int:
        """Takes every entry of an image out (it learns again, or its baseline changed)."""
        keys = self._by_image.pop(image_id, None)
        pending = [key for key, entry in self._pending.items() if entry.image_id == image_id]
        for key in pending:
            del self._pending[key]
        if not keys:
            return len(pending)
        self._drop(list(keys))
        self.stats["forgotten"] += len(keys)
        return len(keys) + len(pending)

    def images(self) -> list[str]:
        return list(self._by_image)

    def cgroups(self) -> set[int]:
        """The cgroups that have entries (installed, or offered and not yet flushed)."""
        return {key[0] for key in self._entries} | {key[0] for key in self._pending}

    def _drop(self, keys: list[MapKey]) -> None:
        self._remove(keys)
        for key in keys:
            entry = self._entries.pop(key, None)
            if entry is None:
                continue
            image_keys = self._by_image.get(entry.image_id)
            if image_keys is not None:
                image_keys.discard(key)
                if not image_keys:
                    del self._by_image[entry.image_id]
