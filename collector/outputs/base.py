"""The one interface every alert output implements, and the runner that drives it.

A :class:`Sink` delivers alerts somewhere (an HTTP endpoint, a syslog receiver, a file): its
``send(alerts)`` delivers one batch (at most ``max_batch`` alerts) or raises
:class:`~driftwarden.core.errors.OutputError`. Everything else is the runner's:

:class:`OutputRunner` (one per configured output)
    ``offer(alert)`` runs on the collector's ingest thread: the output's filter (the subscribe
    filter language, :class:`~driftwarden.collector.filters.AlertFilter`), then a
    non-blocking put into a bounded queue; a full queue drops the alert for this output and
    counts it (``queue_full``). One worker thread per output takes batches from the queue and
    calls ``send``, retrying a failed batch with exponential backoff (``retry``) until it is
    delivered or the attempts are used up (then its alerts are dropped and counted,
    ``gave_up``); a failure the sink marks not retryable is given up at once. So a failing or
    slow output never slows ingest or the other outputs: it only fills its own queue.
    ``stop()`` lets the worker deliver what is queued for up to ``flush_seconds``; what is
    left then is dropped and counted (``shutdown``).

:class:`OutputSet`
    The configured outputs together: ``offer(alerts)`` hands each alert to every runner,
    ``register_metrics`` exports their counts through the collector's metrics registry.

Delivery is at least once: a receiver that handled a batch but failed to answer gets it again
on the retry. Every alert carries its stable ``id`` for receivers that must deduplicate.
"""

from __future__ import annotations

import abc
import logging
import queue
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from driftwarden.collector.filters import AlertFilter
from driftwarden.core.errors import OutputError, UsageError
from driftwarden.core.lifecycle import Service, join_or_warn, start_daemon_thread
from driftwarden.core.metrics import MetricsRegistry

log = logging.getLogger(__name__)

DROP_REASONS = ("queue_full", "gave_up", "shutdown")
_POLL_SECONDS = 0.2  # how often an idle worker looks whether it should stop


@dataclass(frozen=True)
class RetryPolicy:
    """How a batch that failed is tried again: ``attempts`` tries in all (the first one
    included), waiting ``backoff`` seconds before the first retry, doubling up to
    ``max_backoff``."""

    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1 = the first retry)."""
        return min(self.backoff * 2 ** (retry - 1), self.max_backoff)


class Sink(abc.ABC):
    """One output kind's delivery (module docstring). Used by one worker thread only."""

    max_batch: int = 1  # alerts per send()

    @abc.abstractmethod
    def send(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        """Deliver `alerts` (all or none, as far as the sink can tell) or raise OutputError."""

    def close(self) -> None:  # noqa: B027 (a sink without connections or files has nothing)
        """Release connections and files (the worker calls it once, when it ends)."""


class SinkConfig(abc.ABC):
    """One output kind's settings, parsed from its section of the outputs file."""

    type: ClassVar[str]  # the ``type:`` value that selects this kind

    @classmethod
    @abc.abstractmethod
    def parse(cls, fields: Fields) -> Self:
        """The settings from `fields` (UsageError on anything wrong)."""

    @abc.abstractmethod
    def make_sink(self) -> Sink:
        """A new sink with these settings (it connects or opens lazily, on its first send)."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where alerts go, for logs (no secrets)."""


@dataclass(frozen=True)
class OutputConfig:
    """One configured output: its name (the ``output`` label of its metrics), which alerts it
    takes, its queue and retries, and its kind's settings."""

    name: str
    sink: SinkConfig
    filter: AlertFilter = field(default_factory=AlertFilter)
    queue: int = 10_000
    retry: RetryPolicy = RetryPolicy()
    flush_seconds: float = 5.0

    @property
    def type(self) -> str:
        return self.sink.type


class OutputRunner(Service):
    """One output's filter, bounded queue and worker thread (module docstring)."""

    def __init__(self, config: OutputConfig, sink: Sink | None = None) -> None:
        super().__init__()
        self.config = config
        self.name = config.name
        self._sink = sink if sink is not None else config.sink.make_sink()
        self._queue: queue.Queue[Mapping[str, Any]] = queue.Queue(config.queue)
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # deliver what is queued, then end
        self._abort = threading.Event()  # the flush time is over: give up what is left
        self._thread: threading.Thread | None = None
        self._dropping = False  # the last offer was dropped (log a run of drops once)
        self.matched = 0  # alerts the filter let through
        self.sent = 0  # alerts delivered
        self.retries = 0  # batches tried again
        self.dropped = dict.fromkeys(DROP_REASONS, 0)
        self.last_error: str | None = None

    # - the ingest side --------------------------------------------------------------------

    def offer(self, alert: Mapping[str, Any]) -> bool:
        """Queue `alert` if the filter takes it; never blocks. False: filtered out, dropped
        (queue full, counted) or stopped."""
        if not self.config.filter.matches(alert):
            return False
        with self._lock:
            self.matched += 1
            if self._stopping.is_set():
                self.dropped["shutdown"] += 1
                return False
            try:
                self._queue.put_nowait(alert)
            except queue.Full:
                self.dropped["queue_full"] += 1
                if not self._dropping:
                    log.warning("output %s: its queue (%d alerts) is full; dropping alerts "
                                "until it drains (%s)", self.name, self.config.queue,
                                self.last_error or "the receiver is slow")
                self._dropping = True
                return False
            self._dropping = False
            return True

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"name": self.name, "type": self.config.type, "matched": self.matched,
                    "sent": self.sent, "retries": self.retries, "dropped": dict(self.dropped),
                    "pending": self.pending, "last_error": self.last_error}

    # - the worker -------------------------------------------------------------------------

    def _start(self) -> None:
        self._thread = start_daemon_thread(self._run, f"driftwarden-output-{self.name}")
        log.info("output %s: %s", self.name, self.config.sink.describe())

    def _stop(self, timeout: float | None) -> None:
        flush = self.config.flush_seconds if timeout is None else min(
            timeout, self.config.flush_seconds)
        with self._lock:  # no offer queues anything after this
            self._stopping.set()
        if self._thread is None:
            self._sink.close()
            return
        self._thread.join(flush)
        self._abort.set()
        # a send in progress ends within the sink's own timeout
        join_or_warn(self._thread, max(flush, 1.0), f"output {self.name}'s worker")
        self._thread = None

    def _run(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                if self._abort.is_set():  # this batch and all still queued: one count
                    self._count_drop("shutdown", len(batch) + self._discard_queued())
                else:
                    self._deliver(batch)
        finally:
            self._sink.close()

    def _next_batch(self) -> list[Mapping[str, Any]] | None:
        """Up to max_batch queued alerts; None once stopping and the queue is empty."""
        while True:
            try:
                first = self._queue.get(timeout=_POLL_SECONDS)
                break
            except queue.Empty:
                if self._stopping.is_set():
                    return None
        batch = [first]
        while len(batch) < self._sink.max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _discard_queued(self) -> int:
        discarded = 0
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return discarded
            discarded += 1

    def _deliver(self, batch: list[Mapping[str, Any]]) -> None:
        retry = self.config.retry
        attempt = 1
        while True:
            try:
                self._sink.send(batch)
            except OutputError as exc:
                error, retryable = str(exc), exc.retryable
            except Exception as exc:  # a sink bug must not end the worker
                log.exception("output %s: sending failed", self.name)
                error, retryable = f"{type(exc).__name__}: {exc}", True
            else:
                with self._lock:
                    self.sent += len(batch)
                    self.last_error = None
                return
            with self._lock:
                self.last_error = error
            if not retryable or attempt >= retry.attempts:
                why = "not retryable" if not retryable else f"after {attempt} attempts"
                log.error("output %s: gave up on %d alert(s) (%s): %s", self.name, len(batch),
                          why, error)
                self._count_drop("gave_up", len(batch))
                return
            delay = retry.delay(attempt)
            log.warning("output %s: %s; retry %d of %d in %.1f s", self.name, error, attempt,
                        retry.attempts - 1, delay)
            if self._abort.wait(delay):
                self._count_drop("shutdown", len(batch) + self._discard_queued())
                return
            with self._lock:
                self.retries += 1
            attempt += 1

    def _count_drop(self, reason: str, n: int) -> None:
        with self._lock:
            self.dropped[reason] += n
        if reason == "shutdown":
            log.warning("output %s: %d alert(s) not delivered before the collector stopped",
                        self.name, n)


class OutputSet(Service):
    """The configured outputs (module docstring); started and stopped together."""

    def __init__(self, runners: Iterable[OutputRunner] = ()) -> None:
        super().__init__()
        self.runners = tuple(runners)

    @classmethod
    def from_configs(cls, configs: Iterable[OutputConfig]) -> OutputSet:
        return cls(OutputRunner(config) for config in configs)

    def __len__(self) -> int:
        return len(self.runners)

    def offer(self, alerts: Iterable[Mapping[str, Any]]) -> None:
        """Hand each alert to every output (non-blocking; read-only from here on)."""
        for alert in alerts:
            for runner in self.runners:
                runner.offer(alert)

    def stats(self) -> list[dict[str, Any]]:
        return [runner.stats() for runner in self.runners]

    def register_metrics(self, registry: MetricsRegistry) -> None:
        prefix = "driftwarden_collector_output_"
        registry.counter_callback(
            prefix + "sent", "Alerts an output delivered, by output",
            lambda: {r.name: r.stats()["sent"] for r in self.runners}, ("output",))
        registry.counter_callback(
            prefix + "dropped", "Alerts an output did not deliver, by output and reason: "
            "queue_full (it fell behind), gave_up (retries used up, or the receiver refused "
            "them), shutdown (still queued when the collector stopped)",
            self._drops, ("output", "reason"))
        registry.counter_callback(
            prefix + "retries", "Batches an output tried again after a failure, by output",
            lambda: {r.name: r.stats()["retries"] for r in self.runners}, ("output",))
        registry.gauge_callback(
            prefix + "queued", "Alerts waiting in an output's queue, by output",
            lambda: {r.name: r.pending for r in self.runners}, ("output",))

    def _drops(self) -> dict[tuple[str, str], int]:
        return {(r.name, reason): count for r in self.runners
                for reason, count in r.stats()["dropped"].items()}

    def _start(self) -> None:
        for runner in self.runners:
            runner.start()

    def _stop(self, timeout: float | None) -> None:
        # stop them side by side: one slow receiver does not eat the others' flush time
        threads = [threading.Thread(target=r.stop, args=(timeout,), daemon=True,
                                    name=f"driftwarden-output-stop-{r.name}")
                   for r in self.runners]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 2 * max(
            [r.config.flush_seconds for r in self.runners], default=0.0) + 1.0
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


# -- reading one output's section of the outputs file --------------------------------------------

_MISSING: Any = object()


class Fields:
    """One mapping of the outputs file, read key by key with one-line errors that name the
    place (``--outputs FILE: outputs[0] (webhook siem).timeout: ...``); ``done()`` refuses
    keys nobody read."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        self.data = data
        self.where = where
        self._read: set[str] = set()

    def error(self, key: str | None, problem: str) -> UsageError:
        place = f"{self.where}.{key}" if key else self.where
        return UsageError(f"{place}: {problem}")

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self._read.add(key)
        if key not in self.data or self.data[key] is None:
            if default is _MISSING:
                raise self.error(key, "missing; it is required")
            return default
        return self.data[key]

    def text(self, key: str, default: Any = _MISSING, *,
             choices: Sequence[str] | None = None) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        value = value.strip()
        if choices is not None and value not in choices:
            raise self.error(key, f"unknown value {value!r}; allowed: {', '.join(choices)}")
        return value

    def number(self, key: str, default: float, *, minimum: float, maximum: float | None = None,
               integer: bool = False) -> Any:
        value = self.raw(key, default)
        wanted = "an integer" if integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int | float) or (
                integer and not isinstance(value, int)):
            raise self.error(key, f"must be {wanted}, got {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"{minimum:g}..{maximum:g}" if maximum is not None else f">= {minimum:g}"
            raise self.error(key, f"must be {bound}, got {value!r}")
        return value

    def mapping(self, key: str) -> Fields:
        value = self.raw(key, {})
        if not isinstance(value, Mapping):
            raise self.error(key, f"must be a mapping (key: value lines), got {value!r}")
        return Fields(value, f"{self.where}.{key}")

    def done(self) -> None:
        unknown = sorted(str(k) for k in self.data if k not in self._read)
        if unknown:
            raise self.error(None, f"unknown key {unknown[0]!r}; allowed: "
                                   + ", ".join(sorted(self._read)))


__all__ = [
    "DROP_REASONS",
    "Fields",
    "OutputConfig",
    "OutputRunner",
    "OutputSet",
    "RetryPolicy",
    "Sink",
    "SinkConfig",
]
