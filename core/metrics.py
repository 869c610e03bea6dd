"""Prometheus metrics in the text exposition format 0.0.4, without a client library.

:class:`MetricsRegistry` holds counters and gauges (set by the code that counts) and callbacks
(read at scrape time from the stats objects the pipeline, spool and channel already keep);
``render()`` produces the exposition text; :class:`MetricsServer` serves it at ``GET /metrics``
on a loopback address only (the project's network rule: nothing listens beyond loopback).

Output rules: one ``# HELP`` and one ``# TYPE`` line per metric, metrics sorted by name,
samples sorted by label values, counters named with a ``_total`` suffix (added when missing),
label values escaped (``\\`` -> ``\\\\``, ``"`` -> ``\\"``, newline -> ``\\n``), help text
escaped (``\\`` and newline). Integers print as integers, floats as Python's shortest repr,
infinities and NaN as ``+Inf``, ``-Inf``, ``NaN``. A callback that raises or returns the wrong
shape is logged and its metric left out of that scrape; the others are still served.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from numbers import Real
from typing import Any, TypeVar
from urllib.parse import urlsplit

from driftwarden.core.netaddr import is_loopback

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

Number = int | float
CallbackResult = Number | Mapping[Any, Number]


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    number = float(value)
    if math.isnan(number):
        return "NaN"
    if math.isinf(number):
        return "+Inf" if number > 0 else "-Inf"
    return repr(number)


def escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels_text(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    pairs = ",".join(f'{n}="{escape_label_value(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + pairs + "}"


class _Metric:
    """A metric family: name, help, type, label names, and where its samples come from."""

    kind = "untyped"

    def __init__(self, name: str, help: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)

    def samples(self) -> list[tuple[tuple[str, ...], Any]]:
        raise NotImplementedError

    def render(self) -> list[str]:
        samples = sorted(self.samples(), key=lambda s: s[0])
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        lines += [f"{self.name}{_labels_text(self.labelnames, labels)} {format_value(value)}"
                  for labels, value in samples]
        return lines

    def _label_values(self, values: Sequence[Any], named: Mapping[str, Any]) -> tuple[str, ...]:
        if values and named:
            raise ValueError(f"metric {self.name}: give label values by position or by name, "
                             f"not both")
        if named:
            unknown = set(named) - set(self.labelnames)
            missing = set(self.labelnames) - set(named)
            if unknown or missing:
                raise ValueError(f"metric {self.name}: labels are {list(self.labelnames)}, got "
                                 f"{sorted(named)}")
            values = [named[n] for n in self.labelnames]
        if len(values) != len(self.labelnames):
            raise ValueError(f"metric {self.name}: expected {len(self.labelnames)} label values "
                             f"{list(self.labelnames)}, got {len(values)}")
        return tuple(str(v) for v in values)


class _ValueMetric(_Metric):
    def __init__(self, name: str, help: str, labelnames: Sequence[str]) -> None:
        super().__init__(name, help, labelnames)
        self._lock = threading.Lock()
        self._values: dict[tuple[str, ...], Number] = {} if labelnames else {(): 0}

    def samples(self) -> list[tuple[tuple[str, ...], Any]]:
        with self._lock:
            return list(self._values.items())

    def _add(self, key: tuple[str, ...], amount: Number) -> None:
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def _set(self, key: tuple[str, ...], value: Number) -> None:
        with self._lock:
            self._values[key] = value

    def _unlabeled(self) -> tuple[str, ...]:
        if self.labelnames:
            raise ValueError(f"metric {self.name} has labels {list(self.labelnames)}: use "
                             f".labels(...) first")
        return ()

    def value(self, *labelvalues: Any) -> Number:
        """The current value (tests and status output)."""
        with self._lock:
            return self._values.get(self._label_values(labelvalues, {}), 0)


def _check_number(name: str, value: Any) -> Number:
    if not isinstance(value, Real):
        raise TypeError(f"metric {name}: value must be a number, got {type(value).__name__}")
    return value  # type: ignore[return-value]


class Counter(_ValueMetric):
    kind = "counter"

    def inc(self, amount: Number = 1) -> None:
        self._inc(self._unlabeled(), amount)

    def labels(self, *values: Any, **named: Any) -> _CounterChild:
        return _CounterChild(self, self._label_values(values, named))

    def _inc(self, key: tuple[str, ...], amount: Number) -> None:
        _check_number(self.name, amount)
        if amount < 0:
            raise ValueError(f"counter {self.name} can only go up; got inc({amount})")
        self._add(key, amount)


class _CounterChild:
    def __init__(self, metric: Counter, key: tuple[str, ...]) -> None:
        self._metric = metric
        self._key = key

    def inc(self, amount: Number = 1) -> None:
        self._metric._inc(self._key, amount)


class Gauge(_ValueMetric):
    kind = "gauge"

    def set(self, value: Number) -> None:
        self._set(self._unlabeled(), _check_number(self.name, value))

    def inc(self, amount: Number = 1) -> None:
        self._add(self._unlabeled(), _check_number(self.name, amount))

    def dec(self, amount: Number = 1) -> None:
        self._add(self._unlabeled(), -_check_number(self.name, amount))

    def labels(self, *values: Any, **named: Any) -> _GaugeChild:
        return _GaugeChild(self, self._label_values(values, named))


class _GaugeChild:
    def __init__(self, metric: Gauge, key: tuple[str, ...]) -> None:
        self._metric = metric
        self._key = key

    def set(self, value: Number) -> None:
        self._metric._set(self._key, _check_number(self._metric.name, value))

    def inc(self, amount: Number = 1) -> None:
        self._metric._add(self._key, _check_number(self._metric.name, amount))

    def dec(self, amount: Number = 1) -> None:
        self._metric._add(self._key, -_check_number(self._metric.name, amount))


class _CallbackMetric(_Metric):
    def __init__(self, name: str, help: str, labelnames: Sequence[str], kind: str,
                 fn: Callable[[], CallbackResult]) -> None:
        super().__init__(name, help, labelnames)
        self.kind = kind
        self.fn = fn

    def samples(self) -> list[tuple[tuple[str, ...], Any]]:
        result = self.fn()
        if not self.labelnames:
            if isinstance(result, Mapping):
                raise TypeError(f"metric {self.name} has no labels, so its callback must "
                                f"return a number, not a mapping")
            return [((), _check_number(self.name, result))]
        if not isinstance(result, Mapping):
            raise TypeError(f"metric {self.name} has labels {list(self.labelnames)}, so its "
                            f"callback must return a mapping of label values to numbers")
        out = []
        for key, value in result.items():
            values = key if isinstance(key, tuple) else (key,)
            out.append((self._label_values(values, {}), _check_number(self.name, value)))
        return out


_M = TypeVar("_M", bound=_Metric)


class MetricsRegistry:
    """The metrics one process exposes. Thread-safe; ``render()`` may run while others count."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._register(Counter(_counter_name(name), help, _labelnames(name, labelnames)))

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._register(Gauge(_metric_name(name), help, _labelnames(name, labelnames)))

    def gauge_callback(self, name: str, help: str, fn: Callable[[], CallbackResult],
                       labelnames: Sequence[str] = ()) -> None:
        """A gauge read at scrape time: ``fn()`` returns a number, or (with labels) a mapping
        of label-value tuples (a plain string for one label) to numbers."""
        self._register(_CallbackMetric(_metric_name(name), help, _labelnames(name, labelnames),
                                       "gauge", fn))

    def counter_callback(self, name: str, help: str, fn: Callable[[], CallbackResult],
                         labelnames: Sequence[str] = ()) -> None:
        """Like :meth:`gauge_callback` for a count that only goes up (e.g. a stats field)."""
        self._register(_CallbackMetric(_counter_name(name), help, _labelnames(name, labelnames),
                                       "counter", fn))

    def render(self) -> str:
        with self._lock:
            metrics = sorted(self._metrics.values(), key=lambda m: m.name)
        lines: list[str] = []
        for metric in metrics:
            try:
                lines += metric.render()
            except Exception as exc:
                log.warning("metric %s left out of this scrape: %s", metric.name, exc)
        return "".join(line + "\n" for line in lines)

    def _register(self, metric: _M) -> _M:
        with self._lock:
            if metric.name in self._metrics:
                raise ValueError(f"metric {metric.name} is registered twice")
            self._metrics[metric.name] = metric
        return metric


def _metric_name(name: str) -> str:
    if not _METRIC_NAME.match(name):
        raise ValueError(f"metric name {name!r} is invalid: use letters, digits, '_' and ':', "
                         f"not starting with a digit")
    return name


def _counter_name(name: str) -> str:
    name = _metric_name(name)
    return name if name.endswith("_total") else name + "_total"


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


def loopback_host(host: str) -> str:
    """`host` when it is a loopback address ("localhost" -> "127.0.0.1"), else ValueError."""
    if not is_loopback(host):
        raise ValueError(f"metrics server host {host!r} is not a loopback address; by the "
                         f"project's network rule it listens only on 127.0.0.0/8 or ::1 (put "
                         f"a proxy in front to expose it)")
    return "127.0.0.1" if host.lower() == "localhost" else host


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if urlsplit(self.path).path != METRICS_PATH:
            self._reply(404, b"not found: metrics are at /metrics\n", "text/plain; charset=utf-8")
            return
        try:
            body = self.server.registry.render().encode("utf-8")
        except Exception:
            log.exception("rendering metrics failed")
            self._reply(500, b"rendering metrics failed; see the agent log\n",
                        "text/plain; charset=utf-8")
            return
        self._reply(200, body, CONTENT_TYPE)

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics %s: " + format, self.address_string(), *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry: MetricsRegistry, family) -> None:
        self.address_family = family
        self.registry = registry
        super().__init__(address, _Handler)


class MetricsServer:
    """Serves ``GET /metrics`` from `registry` on a loopback address; a context manager.

    The socket is bound by ``start()`` (or entering the context); ``port`` is then the bound
    port (useful with ``port=0``).
    """

    def __init__(self, registry: MetricsRegistry, host: str = "127.0.0.1", port: int = 0) -> None:
        self.registry = registry
        self.host = loopback_host(host)
        self.requested_port = port
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MetricsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("metrics server is not started")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{METRICS_PATH}"

    def start(self) -> MetricsServer:
        if self._server is not None:
            return self
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._server = _Server((self.host, self.requested_port), self.registry, family)
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.5},
                                        name="driftwarden-metrics", daemon=True)
        self._thread.start()
        log.info("metrics at %s", self.url)
        return self

    def close(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = None
        self._thread = None


__all__ = [
    "CONTENT_TYPE",
    "Counter",
    "Gauge",
    "MetricsRegistry",
    "MetricsServer",
    "escape_help",
    "escape_label_value",
    "format_value",
    "loopback_host",
]
