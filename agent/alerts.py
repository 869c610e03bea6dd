"""The agent's alerts: built from detection verdicts, sent to sinks, one cause one incident.

:func:`build_alert` turns a detection verdict (a drift, a novel item, an anomalous window) and
the trace record that triggered it into an :class:`~driftwarden.core.alerts.Alert` (the record,
its id rule and JSON schema are in :mod:`driftwarden.core.alerts`). Alerts go to an
:class:`AlertSink` (JSON lines, the collector's gRPC stream: same interface), usually through an
:class:`AlertAggregator`, which sends the first alert of a cause at once, folds the other alerts
of that cause (an incident) into it, and folds repeats of the same alert (same id) into one
alert with a count.

Aggregation (:class:`AlertAggregator`, window W = ``window_seconds``, times from its ``clock``)
    - An id not currently tracked is sent at once, unchanged (count 1), and opens a window
      ``[t, t + W)`` for that id.
    - A repeat (same id) submitted while the window is open is not sent; it is counted.
    - ``flush_due(now)``: for every id whose window has ended (``now >= start + W``):
      if repeats were counted, one aggregated alert is sent: the latest repeat (its time and
      event; its reasons: see Incidents) with ``count`` = number of repeats since the last send
      and ``first_seen`` / ``last_seen`` = the first and last of those repeats; the sent
      aggregate opens a new window at ``now``, so a steady repeat is reported once per window.
      An id whose window ended with no repeats is forgotten.
    - A repeat submitted after its window ended (``flush_due`` not called in between) first
      sends the pending aggregate, if any, and is then sent at once like a first occurrence.
    - At most ``max_keys`` ids are tracked (LRU by the last submission); an evicted id with
      counted repeats has its aggregate sent first.
    - ``close()`` sends every pending aggregate whatever its window, then flushes and closes
      the sink.

Incidents (window Wi = ``incident_seconds``; 0 = no grouping)
    ``submit(alert, incident)`` names the alert's cause: a hashable key (the detector's is the
    container, the process tree and, for a drift, its file; ``None`` = a cause of its own).
    - The first alert of a cause opens an incident ``[t, t + Wi)`` under its id (it is sent at
      once when its id is new: an incident never delays its first alert; a repeat still counts).
    - An alert of another id and the same kind submitted for that cause while the incident is
      open is folded into it: the incident keeps the first alert's id, time, process and
      events; its reasons become the union in arrival order (identical reasons once), ``count``
      grows by the folded alert's count and ``severity`` is the highest. ``flush_due`` sends
      the merged alert when the incident ends (count = occurrences since the last send; this
      starts a new repeat window W); while it is open, its id's repeat aggregate waits for it
      too. A folded DRIFT is never delayed: the merged alert is sent at once.
    - Every send of an id carries the union of the reasons of the alerts it stands for while
      it is tracked (of each alert id, its latest occurrence's: a repeat's reasons replace
      its own), at most ``max_reasons`` (the wire's bound): beyond it the last reason is
      ``more-reasons`` "... and N more reasons" (N distinct reasons not shown).
    - A re-send's ``last_seen`` is later than the previous send's (by one float step at least),
      so the collector stores it as an update of the same alert, never as a duplicate delivery.
    ``stats``: ``submitted`` (alerts given to submit), ``sent`` (alerts given to the sink,
    aggregates included), ``aggregated`` (repeats folded into a count rather than sent),
    ``folded`` (alerts of another id folded into an incident), ``aggregates_sent`` (aggregated
    or merged alerts sent), ``incidents`` (incidents opened), ``evicted`` (ids dropped by the LRU
    bound). Always ``submitted == sent - aggregates_sent + aggregated + folded``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from driftwarden.agent.output import record_to_dict
from driftwarden.core.alerts import (
    MAX_LABEL_CHARS,
    MAX_LABELS,
    Alert,
    AlertKind,
    AlertReason,
    Severity,
    alert_id,
)
from driftwarden.core.records import ContainerView, TraceRecord
from driftwarden.core.wire import WireLimits
from driftwarden.probes.events import ExecEvent

DEFAULT_INCIDENT_SECONDS = 2.0  # the agent's --incident-window
MORE_REASONS_CODE = "more-reasons"  # the last reason of an alert with more than the wire carries
MAX_REASON_SOURCES = 10_000  # alert ids whose reasons one merged alert keeps apart


def container_key(view: ContainerView) -> str:
    return view.id or f"cgroup:{view.cgroup_id}"


def _container_dict(view: ContainerView) -> dict[str, Any]:
    return {"id": view.id, "name": view.name, "image": view.image, "image_id": view.image_id,
            "image_digest": view.image_digest, "pod": view.pod, "namespace": view.namespace,
            "pod_uid": view.pod_uid, "workload": view.workload,
            "labels": {key[:MAX_LABEL_CHARS]: value[:MAX_LABEL_CHARS]
                       for key, value in view.labels[:MAX_LABELS]}}  # sorted pairs already


def _process_dict(record: TraceRecord, exe: str | None) -> dict[str, Any]:
    event = record.event
    h = event.header
    argv = list(event.argv) if isinstance(event, ExecEvent) else []
    return {"pid": h.tgid, "ppid": record.ppid, "exe": record.exe or exe, "argv": argv,
            "uid": h.uid, "comm": h.comm}


def build_alert(
    kind: AlertKind,
    severity: Severity,
    score: float,
    reasons: Iterable[AlertReason],
    record: TraceRecord | None,
    *,
    container_view: ContainerView | None = None,
    baseline_version: int,
    baseline_mode: str = "monitor",
    dedup_key: str,
    clock_offset_ns: int,
    now: float | None = None,
    related: Sequence[TraceRecord] = (),
    exe: str | None = None,
) -> Alert:
    """An alert about `record` (or, with ``record=None``, about a window of `container_view`).

    ``container_view`` defaults to the record's; it is required without a record.
    ``time`` is the record's event time (kernel ns + ``clock_offset_ns``), else ``now``
    (default ``time.time()``). ``related`` records (e.g. the write that created a drifted
    binary) follow the trigger in ``events``. ``exe`` fills ``process.exe`` when the record has
    none (connects and writes carry no exe; the caller may know it from /proc).
    """
    view = container_view if container_view is not None else (
        record.container if record is not None else None)
    if view is None:
        raise ValueError("build_alert: container_view is required when record is None")
    kind = AlertKind(kind)
    if record is not None:
        seconds, ns = divmod(record.event.header.ts_ns + clock_offset_ns, 1_000_000_000)
        when = seconds + ns / 1e9  # not total / 1e9: epoch ns exceed a double's 53 bits
        process = _process_dict(record, exe)
        events = tuple(record_to_dict(r, clock_offset_ns) for r in (record, *related))
    else:
        when = time.time() if now is None else now
        process = None
        events = tuple(record_to_dict(r, clock_offset_ns) for r in related)
    return Alert(
        id=alert_id(container_key(view), kind, dedup_key),
        time=when,
        kind=kind,
        severity=Severity(severity),
        score=float(score),
        reasons=tuple(reasons),
        container=_container_dict(view),
        process=process,
        events=events,
        baseline_version=int(baseline_version),
        baseline_mode=str(baseline_mode),
    )


# -- sinks ---------------------------------------------------------------------------------------


class AlertSink(Protocol):
    """Where alerts go: JSON lines now, the collector's stream later."""

    def emit(self, alert: Alert) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class JsonLinesAlertSink:
    """One JSON object (``Alert.to_dict()``) per line. Each line is flushed as written unless
    ``flush_each=False`` (alerts are rare and a reader tailing the file wants them now). The
    stream is closed by ``close()`` only when ``owns_stream`` (a file opened for it; not stdout).
    """

    def __init__(self, stream: TextIO, *, owns_stream: bool = False,
                 flush_each: bool = True) -> None:
        self.stream = stream
        self.owns_stream = owns_stream
        self.flush_each = flush_each
        self.closed = False

    def emit(self, alert: Alert) -> None:
        self.stream.write(json.dumps(alert.to_dict(), ensure_ascii=False) + "\n")
        if self.flush_each:
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.stream.flush()
        if self.owns_stream:
            self.stream.close()


class ListAlertSink:
    """Keeps alerts in a list (tests, and callers that batch)."""

    def __init__(self) -> None:
        self.alerts: list[Alert] = []
        self.flushes = 0
        self.closed = False

    def emit(self, alert: Alert) -> None:
        self.alerts.append(alert)

    def flush(self) -> None:
        self.flushes += 1

    def close(self) -> None:
        self.closed = True


# -- aggregation ---------------------------------------------------------------------------------


@dataclass
class AggregatorStats:
    submitted: int = 0
    sent: int = 0
    aggregated: int = 0
    folded: int = 0
    aggregates_sent: int = 0
    incidents: int = 0
    evicted: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class ReasonUnion:
    """The reasons of the alerts an id stands for: per alert id, its latest occurrence's reasons
    (a repeat's replace its own, as the aggregate of repeats always said), the ids in arrival
    order, identical reasons once, shown within ``limit``: past it, the last one shown is a
    ``more-reasons`` count of the rest. At most ``MAX_REASON_SOURCES`` alert ids are kept per
    id; the reasons of further ids are only counted (N is then a lower bound)."""

    __slots__ = ("_by_source", "_limit", "_uncounted")

    def __init__(self, limit: int, alert: Alert) -> None:
        if limit < 2:
            raise ValueError("a reason bound must be >= 2 (one reason and the count of more)")
        self._limit = limit
        self._by_source: dict[str, tuple[AlertReason, ...]] = {}
        self._uncounted = 0  # reasons of alert ids past MAX_REASON_SOURCES
        self.add(alert)

    def add(self, alert: Alert) -> None:
        if alert.id in self._by_source or len(self._by_source) < MAX_REASON_SOURCES:
            self._by_source[alert.id] = alert.reasons  # a known id keeps its place
        else:
            self._uncounted += len(alert.reasons)

    def shown(self) -> tuple[AlertReason, ...]:
        union = tuple(dict.fromkeys(r for reasons in self._by_source.values() for r in reasons))
        if len(union) <= self._limit and not self._uncounted:
            return union
        more = len(union) - (self._limit - 1) + self._uncounted
        return (*union[:self._limit - 1],
                AlertReason(code=MORE_REASONS_CODE, text=f"... and {more} more reasons",
                            details=(("more", more),)))


@dataclass(slots=True)
class _Track:
    window_start: float  # aggregator clock time of the last send for this id
    sent: Alert  # the last alert sent for this id: what an incident's merge builds on
    reasons: ReasonUnion  # of the alerts counted for this id while it is tracked
    severity: Severity  # the highest of them
    pending: int = 0  # occurrences counted since the last send (repeats and folded alerts)
    latest: Alert | None = None  # the last repeat of this id among them
    first_seen: float = 0.0
    last_seen: float = 0.0
    incident: Hashable | None = None  # the cause whose alerts fold into this id, while open
    incident_end: float = 0.0
    folded: bool = False  # alerts of other ids folded in since the last send

    def due(self, window_seconds: float) -> float:
        """When flush_due has something to do for this id."""
        return self.incident_end if self.incident is not None else (
            self.window_start + window_seconds)


class AlertAggregator:
    """Sends the first alert of a cause at once; the other alerts of that cause within
    ``incident_seconds`` become one incident; repeats of an id become one alert with a count.

    Exact rules in the module docstring. Also an AlertSink itself (``emit`` = ``submit``,
    ``flush`` = ``flush_due`` + the sink's flush), so it can stand wherever a sink does.
    Thread-safe; the sink is called with the aggregator's lock held.
    """

    def __init__(self, sink: AlertSink, *, window_seconds: float = 60.0,
                 incident_seconds: float = DEFAULT_INCIDENT_SECONDS,
                 clock: Callable[[], float] = time.time, max_keys: int = 10000,
                 max_reasons: int = WireLimits.max_reasons) -> None:
        if window_seconds < 0:
            raise ValueError("window_seconds must be >= 0")
        if not incident_seconds >= 0:
            raise ValueError("incident_seconds must be >= 0 (0 = no grouping)")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        if max_reasons < 2:
            raise ValueError("max_reasons must be >= 2")
        self.sink = sink
        self.window_seconds = float(window_seconds)
        self.incident_seconds = float(incident_seconds)
        self.max_keys = max_keys
        self.max_reasons = max_reasons
        self._clock = clock
        self._tracks: OrderedDict[str, _Track] = OrderedDict()
        self._incidents: dict[Hashable, str] = {}  # open incident's cause -> its alert id
        self._next_due = float("inf")  # no track is due before this (flush_due's shortcut)
        self._lock = threading.Lock()
        self._closed = False
        self.stats = AggregatorStats()

    def __len__(self) -> int:
        return len(self._tracks)

    @property
    def pending(self) -> int:
        """Occurrences (repeats and folded alerts) counted and not yet sent, over all ids."""
        return sum(t.pending for t in self._tracks.values())

    def submit(self, alert: Alert, incident: Hashable | None = None) -> None:
        """Send or count `alert`; `incident` names its cause (None: a cause of its own)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("AlertAggregator is closed")
            now = self._clock()
            self.stats.submitted += 1
            if not self.incident_seconds:
                incident = None
            if incident is not None:
                target = self._open_incident(incident, now)
                # one kind per incident: a drift never hides in novelty (nor the reverse)
                if target is not None and target.sent.id != alert.id and \
                        target.sent.kind is alert.kind:
                    self._fold(target, alert, now)
                    return
            track = self._tracks.get(alert.id)
            if track is not None:
                self._settle(track, now)
            if track is not None and now < track.window_start + self.window_seconds:
                if track.pending == 0:
                    track.first_seen = alert.first_seen
                track.pending += alert.count
                track.latest = alert
                track.last_seen = alert.last_seen
                track.reasons.add(alert)
                track.severity = max(track.severity, alert.severity)
                self.stats.aggregated += 1
                self._tracks.move_to_end(alert.id)
            else:
                if track is not None:
                    self._send_pending(track)
                    self._drop(alert.id)
                while len(self._tracks) >= self.max_keys:
                    oldest_id = next(iter(self._tracks))
                    # before the new alert: the sink sees time order
                    self._send_pending(self._tracks[oldest_id])
                    self._drop(oldest_id)
                    self.stats.evicted += 1
                self._send(alert)
                track = _Track(window_start=now, sent=alert,
                               reasons=ReasonUnion(self.max_reasons, alert),
                               severity=alert.severity)
                self._tracks[alert.id] = track
            if incident is not None and self._open_incident(incident, now) is None and (
                    track.incident is None or now >= track.incident_end):
                track.incident, track.incident_end = incident, now + self.incident_seconds
                self._incidents[incident] = alert.id
                self.stats.incidents += 1
            self._next_due = min(self._next_due, track.due(self.window_seconds))

    emit = submit

    def flush_due(self, now: float | None = None) -> int:
        """Send the merged alerts of incidents and the aggregates of windows that have ended;
        returns how many were sent."""
        with self._lock:
            now = self._clock() if now is None else now
            if now < self._next_due:
                return 0
            sent = 0
            next_due = float("inf")
            for key in list(self._tracks):
                track = self._tracks[key]
                sent += self._settle(track, now)
                # an open incident holds its id's sends until it ends (Wi at most)
                if track.incident is None and now >= track.window_start + self.window_seconds:
                    if not track.pending:
                        self._drop(key)
                        continue
                    self._send_pending(track)
                    track.window_start = now
                    sent += 1
                next_due = min(next_due, track.due(self.window_seconds))
            self._next_due = next_due
            return sent

    def flush(self) -> None:
        self.flush_due()
        self.sink.flush()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for track in self._tracks.values():
                self._send_pending(track)
            self._tracks.clear()
            self._incidents.clear()
        self.sink.flush()
        self.sink.close()

    # -- internals (lock held) --

    def _open_incident(self, incident: Hashable, now: float) -> _Track | None:
        """The track of the cause's open incident, if any."""
        alert_id = self._incidents.get(incident)
        track = self._tracks.get(alert_id) if alert_id is not None else None
        if track is None or track.incident != incident or now >= track.incident_end:
            return None
        return track

    def _fold(self, track: _Track, alert: Alert, now: float) -> None:
        if track.pending == 0:
            track.first_seen, track.last_seen = alert.first_seen, alert.last_seen
        else:
            track.first_seen = min(track.first_seen, alert.first_seen)
            track.last_seen = max(track.last_seen, alert.last_seen)
        track.pending += alert.count
        track.reasons.add(alert)
        track.severity = max(track.severity, alert.severity)
        track.folded = True
        self.stats.folded += 1
        self._tracks.move_to_end(track.sent.id)
        if alert.kind is AlertKind.DRIFT:  # never delayed: policy may act on it now
            self._send_pending(track)
            track.window_start = now

    def _settle(self, track: _Track, now: float) -> int:
        """An incident that has ended: its merged alert is sent (1) and the cause forgotten."""
        if track.incident is None or now < track.incident_end:
            return 0
        if self._incidents.get(track.incident) == track.sent.id:
            del self._incidents[track.incident]
        track.incident = None
        if not track.folded:
            return 0
        self._send_pending(track)
        track.window_start = now
        return 1

    def _drop(self, alert_id: str) -> None:
        track = self._tracks.pop(alert_id)
        if track.incident is not None and self._incidents.get(track.incident) == alert_id:
            del self._incidents[track.incident]

    def _send(self, alert: Alert) -> None:
        self.sink.emit(alert)
        self.stats.sent += 1

    def _send_pending(self, track: _Track) -> None:
        if not track.pending:
            return
        base = track.latest if track.latest is not None else track.sent
        # later than the previous send, or the collector takes it for a replay of it
        last_seen = max(track.last_seen, math.nextafter(track.sent.last_seen, math.inf))
        alert = dataclasses.replace(
            base, severity=track.severity, reasons=track.reasons.shown(), count=track.pending,
            first_seen=min(track.first_seen, last_seen), last_seen=last_seen)
        self._send(alert)
        self.stats.aggregates_sent += 1
        track.sent = alert
        track.pending = 0
        track.latest = None
        track.folded = False


__all__ = [
    "DEFAULT_INCIDENT_SECONDS",
    "MORE_REASONS_CODE",
    "AggregatorStats",
    "AlertAggregator",
    "AlertSink",
    "JsonLinesAlertSink",
    "ListAlertSink",
    "ReasonUnion",
    "build_alert",
    "container_key",
]
