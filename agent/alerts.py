"""The agent's alerts: built from detection verdicts, sent to sinks, repeats aggregated.

:func:`build_alert` turns a detection verdict (a drift, a novel item, an anomalous window) and
the trace record that triggered it into an :class:`~driftwarden.core.alerts.Alert` (the record,
its id rule and JSON schema are in :mod:`driftwarden.core.alerts`). Alerts go to an
:class:`AlertSink` (JSON lines, the collector's gRPC stream: same interface), usually through an
:class:`AlertAggregator`, which sends the first occurrence of an alert at once and folds repeats
of the same alert (same id) into one alert with a count.

Aggregation (:class:`AlertAggregator`, window W = ``window_seconds``, times from its ``clock``)
    - An id not currently tracked is sent at once, unchanged (count 1), and opens a window
      ``[t, t + W)`` for that id.
    - A repeat (same id) submitted while the window is open is not sent; it is counted.
    - ``flush_due(now)``: for every id whose window has ended (``now >= start + W``):
      if repeats were counted, one aggregated alert is sent: the latest repeat (its time, event
      and reasons) with ``count`` = number of repeats since the last send and ``first_seen`` /
      ``last_seen`` = the first and last of those repeats; the sent aggregate opens a new window
      at ``now``, so a steady repeat is reported once per window. An id whose window ended with
      no repeats is forgotten.
    - A repeat submitted after its window ended (``flush_due`` not called in between) first
      sends the pending aggregate, if any, and is then sent at once like a first occurrence.
    - At most ``max_keys`` ids are tracked (LRU by the last submission); an evicted id with
      counted repeats has its aggregate sent first.
    - ``close()`` sends every pending aggregate whatever its window, then flushes and closes
      the sink.
    ``stats``: ``submitted`` (alerts given to submit), ``sent`` (alerts given to the sink,
    aggregates included), ``aggregated`` (repeats folded into a count rather than sent),
    ``aggregates_sent`` (aggregated alerts sent), ``evicted`` (ids dropped by the LRU bound).
    Always ``submitted == sent - aggregates_sent + aggregated``.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
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
from driftwarden.probes.events import ExecEvent


def container_key(view: ContainerView) -> str:
    return view.id or f"cgroup:{view.cgroup_id}"


def _container_dict(view: ContainerView) -> dict[str, Any]:
    return {"id": view.id, "name": view.name, "image": view.image, "image_id": view.image_id,
            "pod": view.pod, "namespace": view.namespace,
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
    aggregates_sent: int = 0
    evicted: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(slots=True)
class _Track:
    window_start: float  # aggregator clock time of the last send for this id
    pending: int = 0  # repeats counted since then
    latest: Alert | None = None  # the last of them
    first_seen: float = 0.0
    last_seen: float = 0.0


class AlertAggregator:
    """Sends each alert id at most once per window; repeats become one alert with a count.

    Exact rules in the module docstring. Also an AlertSink itself (``emit`` = ``submit``,
    ``flush`` = ``flush_due`` + the sink's flush), so it can stand wherever a sink does.
    Thread-safe; the sink is called with the aggregator's lock held.
    """

    def __init__(self, sink: AlertSink, *, window_seconds: float = 60.0,
                 clock: Callable[[], float] = time.time, max_keys: int = 10000) -> None:
        if window_seconds < 0:
            raise ValueError("window_seconds must be >= 0")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        self.sink = sink
        self.window_seconds = float(window_seconds)
        self.max_keys = max_keys
        self._clock = clock
        self._tracks: OrderedDict[str, _Track] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False
        self.stats = AggregatorStats()

    def __len__(self) -> int:
        return len(self._tracks)

    @property
    def pending(self) -> int:
        """Repeats counted and not yet sent, over all ids."""
        return sum(t.pending for t in self._tracks.values())

    def submit(self, alert: Alert) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("AlertAggregator is closed")
            now = self._clock()
            self.stats.submitted += 1
            track = self._tracks.get(alert.id)
            if track is not None and now < track.window_start + self.window_seconds:
                if track.pending == 0:
                    track.first_seen = alert.first_seen
                track.pending += alert.count
                track.latest = alert
                track.last_seen = alert.last_seen
                self.stats.aggregated += 1
                self._tracks.move_to_end(alert.id)
                return
            if track is not None:
                self._send_pending(track)
                del self._tracks[alert.id]
            while len(self._tracks) >= self.max_keys:
                _, oldest = self._tracks.popitem(last=False)
                self._send_pending(oldest)  # before the new alert: the sink sees time order
                self.stats.evicted += 1
            self._send(alert)
            self._tracks[alert.id] = _Track(window_start=now)

    emit = submit

    def flush_due(self, now: float | None = None) -> int:
        """Send the aggregates of windows that have ended; returns how many were sent."""
        with self._lock:
            now = self._clock() if now is None else now
            sent = 0
            for key in list(self._tracks):
                track = self._tracks[key]
                if now < track.window_start + self.window_seconds:
                    continue
                if track.pending:
                    self._send_pending(track)
                    track.window_start = now
                    sent += 1
                else:
                    del self._tracks[key]
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
        self.sink.flush()
        self.sink.close()

    def _send(self, alert: Alert) -> None:
        self.sink.emit(alert)
        self.stats.sent += 1

    def _send_pending(self, track: _Track) -> None:
        if not track.pending or track.latest is None:
            return
        self._send(track.latest.with_repeats(track.pending, track.first_seen, track.last_seen))
        self.stats.aggregates_sent += 1
        track.pending = 0
        track.latest = None


__all__ = [
    "AggregatorStats",
    "AlertAggregator",
    "AlertSink",
    "JsonLinesAlertSink",
    "ListAlertSink",
    "build_alert",
    "container_key",
]
