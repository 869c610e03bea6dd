"""Prometheus metrics through prometheus-client, one registry per process, served on loopback.

:class:`MetricsRegistry` owns a ``prometheus_client.CollectorRegistry`` of its own (never the
library's global default registry) and makes the metrics on it: counters, gauges and histograms
set by the code that counts (prometheus-client's own classes), and callback metrics read at
scrape time from the stats objects the pipeline, spool, channel and store already keep (a
custom collector yielding a ``CounterMetricFamily`` or ``GaugeMetricFamily`` per scrape).
:class:`MetricsServer` serves the registry at ``GET /metrics`` through prometheus-client's WSGI
exposition (the text format 0.0.4, or OpenMetrics when the scraper asks for it; gzip when
accepted) on a loopback address only (the project's network rule: nothing listens beyond
loopback); every other path is 404.

Rules kept from the hand-written exporter: names and label names are the classic Prometheus
ones (letters, digits, ``_``; ``:`` in names), checked when a metric is made; a counter is
exposed as ``<name>_total`` whether or not the name given ends so (prometheus-client's
counters also expose ``<name>_created``, the time the series started); a callback that raises
or returns the wrong shape is logged and its metric left out of that scrape, the others are
still served. Latencies are histograms in seconds over :data:`LATENCY_BUCKETS`.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Real
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from driftwarden.core.lifecycle import Service, start_daemon_thread
from driftwarden.core.netaddr import host_port, loopback_host
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest, make_wsgi_app
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
# Seconds; the benches measure each hop at 1-20 ms, a spool replayed after an outage at minutes.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0, 30.0, 60.0, 300.0)
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Number = int | float
CallbackResult = Number | Mapping[Any, Number]


class _CallbackCollector(Collector):
    """One metric family read at scrape time: ``fn()`` returns a number, or (with labels) a
    mapping of label-value tuples (a plain value for one label) to numbers."""

    def __init__(self, family: type[CounterMetricFamily] | type[GaugeMetricFamily], name: str,
                 help: str, labelnames: tuple[str, ...], fn: Callable[[], CallbackResult]) -> None:
        self.family = family
        self.name = name
        self.help = help
        self.labelnames = labelnames
        self.fn = fn

    def describe(self) -> Iterable[Metric]:
        # the names this collector exposes, so the registry refuses a second metric of that name
        return [self.family(self.name, self.help, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        try:
            family = self.family(self.name, self.help, labels=self.labelnames)
            for labels, value in self._samples():
                family.add_metric(labels, value)
        except Exception as exc:
            log.warning("%s left out of this scrape: %s", self.name, exc)
            return []
        return [family]

    def _samples(self) -> list[tuple[list[str], Number]]:
        result = self.fn()
        if not self.labelnames:
            if isinstance(result, Mapping):
                raise TypeError("it has no labels, so its callback must return a number, not a "
                                "mapping")
            return [([], _number(result))]
        if not isinstance(result, Mapping):
            raise TypeError(f"it has labels {list(self.labelnames)}, so its callback must "
                            "return a mapping of label values to numbers")
        samples = []
        for key, value in result.items():
            values = key if isinstance(key, tuple) else (key,)
            if len(values) != len(self.labelnames):
                raise ValueError(f"expected {len(self.labelnames)} label values "
                                 f"{list(self.labelnames)}, got {len(values)}: {values!r}")
            samples.append(([str(v) for v in values], _number(value)))
        return samples


def _number(value: Any) -> Number:
    if not isinstance(value, Real):
        raise TypeError(f"a value must be a number, got {type(value).__name__} {value!r}")
    return value  # type: ignore[return-value]


class MetricsRegistry:
    """The metrics one process exposes (module docstring). Thread-safe: a scrape may run while
    others count. A name registered twice is a ValueError."""

    def __init__(self) -> None:
        self.prometheus = CollectorRegistry(auto_describe=True)

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return Counter(_metric_name(name), help, _labelnames(name, labelnames),
                       registry=self.prometheus)

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return Gauge(_metric_name(name), help, _labelnames(name, labelnames),
                     registry=self.prometheus)

    def histogram(self, name: str, help: str, labelnames: Sequence[str] = (),
                  buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
        return Histogram(_metric_name(name), help, _labelnames(name, labelnames),
                         buckets=buckets, registry=self.prometheus)

    def gauge_callback(self, name: str, help: str, fn: Callable[[], CallbackResult],
                       labelnames: Sequence[str] = ()) -> None:
        """A gauge read at scrape time: ``fn()`` returns a number, or (with labels) a mapping
        of label-value tuples (a plain value for one label) to numbers."""
        self.prometheus.register(_CallbackCollector(
            GaugeMetricFamily, _metric_name(name), help, _labelnames(name, labelnames), fn))

    def counter_callback(self, name: str, help: str, fn: Callable[[], CallbackResult],
                         labelnames: Sequence[str] = ()) -> None:
        """Like :meth:`gauge_callback` for a count that only goes up (e.g. a stats field)."""
        self.prometheus.register(_CallbackCollector(
            CounterMetricFamily, _metric_name(name), help, _labelnames(name, labelnames), fn))

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """One sample's current value as a scrape would show it (``foo_total``,
        ``foo_bucket`` with ``le``, ...), or None when there is none (tests, status output)."""
        return self.prometheus.get_sample_value(name, dict(labels or {}))

    def render(self) -> str:
        """The text exposition (format 0.0.4), as ``GET /metrics`` serves it by default."""
        return generate_latest(self.prometheus).decode("utf-8")


def _metric_name(name: str) -> str:
    # prometheus-client would accept (and escape) any UTF-8 name; ours stay classic
    if not _METRIC_NAME.match(name):
        raise ValueError(f"metric name {name!r} is invalid: use letters, digits, '_' and ':', "
                         f"not starting with a digit")
    return name


def _labelnames(metric: str, labelnames: Sequence[str]) -> tuple[str, ...]:
    if isinstance(labelnames, str):
        raise TypeError(f"metric {metric}: labelnames must be a sequence of names, not a string")
    names = tuple(labelnames)
    for label in names:
        if not _LABEL_NAME.match(label) or label.startswith("__"):
            raise ValueError(f"metric {metric}: label name {label!r} is invalid: use letters, "
                             f"digits and '_', not starting with a digit or '__'")
    if len(set(names)) != len(names):
        raise ValueError(f"metric {metric}: label names {list(names)} repeat")
    return names


# -- HTTP ----------------------------------------------------------------------------------------


def _metrics_path_only(app: Callable) -> Callable:
    """prometheus-client's app answers on every path; ours only on /metrics."""

    def serve(environ: dict[str, Any], start_response: Callable) -> list[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: metrics are at /metrics\n"]
        return app(environ, start_response)

    return serve


class _Handler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s: " + format, self.address_string(), *args)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress does not hold up the process's exit

    def __init__(self, address: tuple[str, int], family: socket.AddressFamily) -> None:
        self.address_family = family
        super().__init__(address, _Handler)


class MetricsServer(Service):
    """Serves ``GET /metrics`` from `registry` on a loopback address; a context manager.

    The socket is bound by ``start()`` (or entering the context); ``port`` is then the bound
    port (useful with ``port=0``). ``close()`` (or ``stop()``) waits for the serving thread.
    """

    def __init__(self, registry: MetricsRegistry, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        self.registry = registry
        self.host = loopback_host(host)
        self.requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("metrics server is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{host_port(self.host, self.port)}{METRICS_PATH}"

    def _start(self) -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._server = _Server((self.host, self.requested_port), family)
        self._server.set_app(_metrics_path_only(make_wsgi_app(self.registry.prometheus)))
        self._thread = start_daemon_thread(self._server.serve_forever, "driftwarden-metrics",
                                           poll_interval=0.5)
        log.info("metrics at %s", self.url)

    def _stop(self, timeout: float | None) -> None:
        if self._server is None:
            return
        if self._thread is not None:  # shutdown() waits for serve_forever: only once it ran
            self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None
        self._thread = None


__all__ = [
    "LATENCY_BUCKETS",
    "METRICS_PATH",
    "MetricsRegistry",
    "MetricsServer",
    "loopback_host",
]
