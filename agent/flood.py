"""Floods: containers over their kernel budget, as episodes, alerts, tainted windows and metrics.

The probes give every container a budget per kind (probes.loader.ProbeConfig.budgets: a token
bucket per cgroup and kind, decided in the kernel after dedup and before any ring-buffer space
is taken); what a container sends beyond it is counted per (cgroup, kind) and not sent, and so
are the ring buffer's drops of what was admitted (probes.loader.ProbeSet.budget_usage).
:class:`FloodWatch` reads those counts every ``poll_seconds`` (every ``idle_poll_seconds`` once
nothing grew for ``idle_after`` seconds and no episode is open: an idle node reads less; a flood
that starts then is seen up to that much later) and makes them episodes:

- An episode starts at the first poll that finds a container's held-back count grown, and
  ends once it has not grown for ``quiet_seconds``. Each episode is returned by :meth:`poll`
  once (the detector raises one ``anomaly`` alert, reason ``sensor-flood``, per episode:
  :func:`flood_reason`), as soon as the runtime has described its container (a container
  that floods from its first instant is still being looked up), or ``METADATA_WAIT_SECONDS``
  after it started; each end is logged with the episode's totals.
- The kernel counts at event time, so what a poll finds grown happened between the poll before
  and this one: that span (wall-clock seconds) is the flood's. :meth:`taint` marks the windows
  of the container that overlap a flood span "over budget": they are not learned. The detector
  polls again (``force``) before it hands over windows that ended after the last poll, so a
  window never closes before its flood is known.
- Counts are attributed to the container the cgroup belongs to (``lookup``: the agent's
  attribution) and added up per container (:meth:`series`): the first ``max_series``
  containers that went over budget or lost events get a series of their own in the metrics,
  later ones add to container ``_other``; each series only grows, and there are at most
  ``max_series + 1`` of them per kind and outcome.

A (cgroup, kind) entry the kernel's bounded map evicted starts again from 0: a count lower
than the last one read is taken as all new.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from driftwarden.core.alerts import AlertReason
from driftwarden.core.records import ContainerView
from driftwarden.probes.loader import BUDGET_KINDS

log = logging.getLogger(__name__)

KINDS = tuple(BUDGET_KINDS)  # the budgeted kinds, as the probes name them
FLOOD_CODE = "sensor-flood"
TAINT_REASON = "over budget"
OTHER_SERIES = ("_other", "")
DEFAULT_POLL_SECONDS = 0.25
DEFAULT_IDLE_POLL_SECONDS = 1.0
DEFAULT_IDLE_AFTER = 10.0
DEFAULT_QUIET_SECONDS = 10.0
DEFAULT_MAX_SERIES = 20
SPAN_KEEP_SECONDS = 300.0  # flood spans kept for windows that close late
MAX_SPANS = 64  # per container
METADATA_WAIT_SECONDS = 3.0  # an episode's alert waits this long at most for the container's name
_WAIT_STATES = frozenset({"pending", "unknown"})


class Usage(Protocol):
    """probes.loader.BudgetUsage: counts[(cgroup id, kind)] = (over budget, dropped)."""

    counts: Mapping[tuple[int, str], tuple[int, int]]
    evicted: int


def container_label(view: ContainerView) -> str:
    """How a container is named in metrics and summaries: its name, a short id, or its cgroup."""
    return view.name or (view.id[:12] if view.id else f"cgroup:{view.cgroup_id}")


def window_key(view: ContainerView) -> str:
    """The key the feature windows use for the container (its id), or its cgroup."""
    return view.id or f"cgroup:{view.cgroup_id}"


@dataclass
class Episode:
    """One container's flood: from the poll before the first growth (`started`) to the last
    poll that saw growth (`last`); counts held back (`over`) and lost (`dropped`) per kind."""

    cgroup_id: int
    view: ContainerView
    started: float
    last: float
    over: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    polls: int = 0  # polls that saw it grow
    alerted: bool = False  # returned by FloodWatch.poll (its alert raised)


def flood_reason(episode: Episode) -> AlertReason:
    """The alert's reason: what the container's budget held back so far, per kind."""
    held = ", ".join(f"{episode.over[k]} {k}" for k in KINDS if episode.over[k])
    seconds = max(episode.last - episode.started, 0.0)
    text = (f"sent more events than its budget: {held} held back in {seconds:.1f} s (counted "
            "in the kernel, not reported); its windows are not learned while the flood lasts")
    lost = sum(episode.dropped.values())
    if lost:
        text += f"; {lost} more lost, the ring buffer being full"
    details = [*((f"over_budget_{k}", episode.over[k]) for k in KINDS),
               *((f"dropped_{k}", episode.dropped[k]) for k in KINDS),
               ("seconds", round(seconds, 3)), ("cgroup_id", episode.cgroup_id)]
    return AlertReason(code=FLOOD_CODE, text=text, details=tuple(details))


class ReadWhenMoved:
    """A budget_usage reader that reads the whole (cgroup, kind) map only when the kernel's
    totals of what budgets held back and the ring buffer lost have moved since (``totals``:
    one small read of the probes' counters), or ``max_age`` seconds after the last full read
    (map evictions move no total). An idle node with 200 containers keeps ~800 entries there:
    read four times a second, they were most of what the agent did while nothing happened."""

    def __init__(self, read: Callable[[], Usage], totals: Callable[[], int], *,
                 max_age: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._read = read
        self._totals = totals
        self.max_age = max_age
        self._clock = clock
        self._last: Usage | None = None
        self._last_totals = -1
        self._read_at = 0.0
        self.skipped = 0

    def __call__(self) -> Usage:
        totals, now = self._totals(), self._clock()
        if (self._last is not None and totals == self._last_totals
                and now - self._read_at < self.max_age):
            self.skipped += 1
            return self._last
        self._last, self._last_totals, self._read_at = self._read(), totals, now
        return self._last


class FloodWatch:
    """Over-budget counts -> episodes, flood spans and per-container totals (module doc)."""

    def __init__(self, read: Callable[[], Usage], lookup: Callable[[int], ContainerView], *,
                 poll_seconds: float = DEFAULT_POLL_SECONDS,
                 quiet_seconds: float = DEFAULT_QUIET_SECONDS,
                 max_series: int = DEFAULT_MAX_SERIES,
                 idle_poll_seconds: float = DEFAULT_IDLE_POLL_SECONDS,
                 idle_after: float = DEFAULT_IDLE_AFTER,
                 clock: Callable[[], float] = time.time) -> None:
        if not poll_seconds > 0 or not quiet_seconds > 0:
            raise ValueError("poll_seconds and quiet_seconds must be > 0")
        self._read = read
        self._lookup = lookup
        self.poll_seconds = poll_seconds
        self.idle_poll_seconds = max(idle_poll_seconds, poll_seconds)
        self.idle_after = idle_after
        self.quiet_seconds = quiet_seconds
        self.max_series = max_series
        self._clock = clock
        self.last_poll = clock()
        self.last_growth = self.last_poll  # the last poll that found a count grown
        self._last: Mapping[tuple[int, str], tuple[int, int]] = {}
        self._last_read: object = None  # the counts object the last poll read
        self.episodes: dict[int, Episode] = {}  # cgroup id -> its open episode
        # window key -> flood spans [start, end] (wall s), merged, oldest first
        self._spans: OrderedDict[str, deque[list[float]]] = OrderedDict()
        # (container label, image) -> kind -> [over budget, dropped]
        self._series: OrderedDict[tuple[str, str], dict[str, list[int]]] = OrderedDict()
        self._series_of: dict[str, tuple[str, str]] = {}  # window key -> its series
        self.evicted = 0
        self.stats: Counter = Counter()

    # -- polling ------------------------------------------------------------------------------

    def due(self, now: float) -> bool:
        idle = not self.episodes and now - self.last_growth >= self.idle_after
        return now - self.last_poll >= (self.idle_poll_seconds if idle else self.poll_seconds)

    def poll(self, now: float | None = None) -> list[Episode]:
        """Reads the counts; returns the episodes to alert (each once, see the module doc)."""
        now = self._clock() if now is None else now
        usage = self._read()
        before, self.last_poll = self.last_poll, now
        self.evicted = usage.evicted
        grown: dict[int, tuple[Counter, Counter]] = {}
        # the very counts read last time (ReadWhenMoved: nothing moved): nothing grew
        unchanged = usage.counts is self._last_read
        self._last_read = usage.counts
        for key, (over, dropped) in () if unchanged else usage.counts.items():
            last_over, last_dropped = self._last.get(key, (0, 0))
            new_over = over - last_over if over >= last_over else over  # re-made: all new
            new_dropped = dropped - last_dropped if dropped >= last_dropped else dropped
            if new_over or new_dropped:
                cgid, kind = key
                counts = grown.setdefault(cgid, (Counter(), Counter()))
                counts[0][kind] += new_over
                counts[1][kind] += new_dropped
        if not unchanged:
            self._last = dict(usage.counts)
        if grown:
            self.last_growth = now
        for cgid, (over, dropped) in grown.items():
            view = self._lookup(cgid)
            self._count(view, over, dropped)
            if not sum(over.values()):
                continue  # lost in the ring buffer only: the agent's overload, not a flood
            self._add_span(window_key(view), before, now)
            episode = self.episodes.get(cgid)
            if episode is None:
                episode = self.episodes[cgid] = Episode(cgid, view, started=before, last=now)
                self.stats["episodes"] += 1
                log.warning("container %s (%s) is over its event budget: %s held back",
                            container_label(view), view.image or "no image",
                            dict(over))
            episode.view, episode.last = view, now
            episode.over.update(over)
            episode.dropped.update(dropped)
            episode.polls += 1
        due = []
        for cgid, episode in list(self.episodes.items()):
            if not episode.alerted:
                if cgid not in grown:
                    episode.view = self._lookup(cgid)
                if (episode.view.state not in _WAIT_STATES
                        or now - episode.started >= METADATA_WAIT_SECONDS):
                    episode.alerted = True
                    due.append(episode)
            if now - episode.last >= self.quiet_seconds:
                del self.episodes[cgid]
                log.warning("container %s: flood over after %.1f s: %s held back, %s lost",
                            container_label(episode.view), episode.last - episode.started,
                            dict(episode.over), dict(episode.dropped))
        return due

    def _add_span(self, key: str, start: float, end: float) -> None:
        spans = self._spans.get(key)
        if spans is None:
            spans = self._spans[key] = deque(maxlen=MAX_SPANS)
        self._spans.move_to_end(key)
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        else:
            spans.append([start, end])
        horizon = end - SPAN_KEEP_SECONDS
        for old_key in list(self._spans):
            old = self._spans[old_key]
            while old and old[0][1] < horizon:
                old.popleft()
            if not old:
                del self._spans[old_key]

    # -- windows ------------------------------------------------------------------------------

    def flooded(self, key: str, start: float, end: float) -> bool:
        """Whether the container's window [start, end) overlaps one of its flood spans."""
        return any(a < end and b > start for a, b in self._spans.get(key, ()))

    def taint(self, windows: Iterable[Any]) -> list[Any]:
        """The windows (models.features.Window), those of a flood's time tainted "over
        budget" (not learned)."""
        out = []
        for window in windows:
            if (self._spans and TAINT_REASON not in window.taint_reasons
                    and self.flooded(window.container_id, window.start, window.end)):
                window = dataclasses.replace(
                    window, tainted=True, taint_reasons=(*window.taint_reasons, TAINT_REASON))
                self.stats["windows_tainted"] += 1
            out.append(window)
        return out

    # -- totals -------------------------------------------------------------------------------

    def _count(self, view: ContainerView, over: Counter, dropped: Counter) -> None:
        key = window_key(view)
        series = self._series_of.get(key)
        if series is None:
            own = (container_label(view), view.image or "")
            series = own if len(self._series) < self.max_series or own in self._series \
                else OTHER_SERIES
            if len(self._series_of) < 16 * self.max_series:  # bounded; _other when past it
                self._series_of[key] = series
        totals = self._series.setdefault(series, {})
        for kind in KINDS:
            if over[kind] or dropped[kind]:
                pair = totals.setdefault(kind, [0, 0])
                pair[0] += over[kind]
                pair[1] += dropped[kind]

    def series(self) -> dict[tuple[str, str, str, str], int]:
        """(container, image, kind, outcome "over_budget" | "dropped") -> events since start."""
        out = {}
        for (container, image), kinds in list(self._series.items()):
            for kind, (over, dropped) in list(kinds.items()):
                out[(container, image, kind, "over_budget")] = over
                out[(container, image, kind, "dropped")] = dropped
        return out


def container_rows(usage: Usage, lookup: Callable[[int], ContainerView], *, top: int = 10
                   ) -> list[dict[str, Any]]:
    """`driftwarden trace`'s per-container summary: the `top` containers by events held back
    and lost, from one read of the kernel's counts (cumulative since the probes loaded)."""
    by_cgroup: dict[int, dict[str, list[int]]] = {}
    for (cgid, kind), (over, dropped) in usage.counts.items():
        if over or dropped:
            by_cgroup.setdefault(cgid, {})[kind] = [over, dropped]
    rows = []
    for cgid, kinds in by_cgroup.items():
        view = lookup(cgid)
        rows.append({
            "container": container_label(view), "image": view.image, "cgroup_id": cgid,
            "over_budget": {k: kinds[k][0] for k in KINDS if k in kinds},
            "dropped": {k: kinds[k][1] for k in KINDS if k in kinds}})
    rows.sort(key=lambda r: (-sum(r["over_budget"].values()) - sum(r["dropped"].values()),
                             r["container"]))
    return rows[:top]


def format_container_rows(rows: list[dict[str, Any]], evicted: int = 0) -> list[str]:
    """The human summary's lines for container_rows() (none when nothing was held back)."""
    if not rows and not evicted:
        return []
    lines = ["  held back by budget / lost (ring buffer full), per container:"]
    for row in rows:
        parts = [f"{k} {row['over_budget'].get(k, 0)}/{row['dropped'].get(k, 0)}"
                 for k in KINDS if k in row["over_budget"]]
        lines.append(f"    {row['container']:<24} {row['image'] or '-':<24} {', '.join(parts)}")
    if evicted:
        lines.append(f"    ({evicted} container counts evicted from the kernel's map)")
    return lines
