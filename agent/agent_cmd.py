"""`driftwarden agent`: probes -> attribution -> detection -> alerts.

Alerts go to an AlertSink (driftwarden.alerts): `--alerts-out` writes JSON lines, `--collector`
streams them to the collector through the spool in STATE_DIR/spool (driftwarden.channel); both
may be given. Without `--collector` alerts go to stdout unless `--alerts-out` says otherwise;
with it, to the collector only unless `--alerts-out` is given explicitly. The collector's action
commands run through ContainerActions.for_docker().

`--metrics HOST:PORT` serves Prometheus metrics (loopback only): ``driftwarden_agent_``
``events_total{kind,outcome=emitted|suppressed|dropped}`` (the probes' counters),
``alerts_total{kind}``; with `--collector` also ``spool_depth``, ``collector_connected``,
``alerts_sent_total``, ``alerts_acked_total``, ``collector_reconnects_total`` and
``actions_total{type,status}``.

The flags of this module (collector, TLS, heartbeat, metrics) are added to the `agent` parser by
:func:`add_collector_flags`; :func:`options_from_args` turns the parsed flags into
:class:`AgentOptions`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import logging
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from driftwarden.argtypes import POSITIVE_SECONDS
from driftwarden.errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_SECONDS = 5.0
_TLS_FLAGS = ("--tls-cert", "--tls-key", "--tls-ca")


@dataclass(frozen=True)
class AgentOptions:
    state_dir: str
    alerts_out: str | None = None  # None: stdout without a collector, no file with one
    window: float = 10.0
    startup_grace: float = 10.0  # seconds after a container's start the forest ignores
    learn_for: float | None = None
    mode: str = "learn"
    duration: float | None = None
    docker_host: str = "unix:///var/run/docker.sock"
    collector: str | None = None  # host:port of the collector's gRPC endpoint
    allow_non_loopback: bool = False
    node: str | None = None  # None: this host's name
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    heartbeat: float | None = None  # seconds; None: DEFAULT_HEARTBEAT_SECONDS
    metrics: str | None = None  # host:port for GET /metrics (loopback)

    @property
    def alerts_file(self) -> str | None:
        """Where JSON lines go ("-" = stdout), or None: the collector only."""
        if self.alerts_out is not None:
            return self.alerts_out
        return None if self.collector else "-"


def add_collector_flags(parser: argparse.ArgumentParser) -> None:
    """The `agent` flags for the collector connection and metrics (called from cli.py).

    Also makes `--alerts-out` default to "not given", so that with `--collector` alerts go to
    stdout only when `--alerts-out -` is given explicitly."""
    group = parser.add_argument_group("collector")
    group.add_argument("--collector", metavar="HOST:PORT", default=None,
                       help="stream alerts to this collector (loopback only unless "
                       "--allow-non-loopback); alerts wait in STATE_DIR/spool until it "
                       "acknowledges them; it may send container actions back")
    group.add_argument("--allow-non-loopback", action="store_true",
                       help="allow a --collector beyond loopback (real deployments; needs the "
                       "--tls-* files)")
    group.add_argument("--node", metavar="NAME", default=None,
                       help="this node's name towards the collector (default: the host name; "
                       "with TLS it must be the certificate's CN)")
    group.add_argument("--tls-cert", metavar="FILE", default=None,
                       help="this agent's client certificate (mutual TLS; with --tls-key and "
                       "--tls-ca, e.g. from `driftwarden certs`)")
    group.add_argument("--tls-key", metavar="FILE", default=None,
                       help="the client certificate's private key")
    group.add_argument("--tls-ca", metavar="FILE", default=None,
                       help="the CA certificate that signed the collector's certificate")
    group.add_argument("--heartbeat", type=POSITIVE_SECONDS, default=None, metavar="SECONDS",
                       help=f"heartbeat interval towards the collector (default "
                       f"{DEFAULT_HEARTBEAT_SECONDS:g})")
    group.add_argument("--metrics", metavar="HOST:PORT", default=None,
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback "
                       "only; port 0 picks one)")
    parser.set_defaults(alerts_out=None)


def options_from_args(args: argparse.Namespace) -> AgentOptions:
    """AgentOptions from the parsed `agent` flags (cli.py's and add_collector_flags')."""
    return AgentOptions(
        state_dir=args.state_dir, alerts_out=args.alerts_out, window=args.window,
        startup_grace=getattr(args, "startup_grace", 10.0), learn_for=args.learn_for,
        mode=args.mode, duration=args.duration,
        docker_host=args.docker_host,
        collector=getattr(args, "collector", None),
        allow_non_loopback=getattr(args, "allow_non_loopback", False),
        node=getattr(args, "node", None),
        tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None),
        tls_ca=getattr(args, "tls_ca", None),
        heartbeat=getattr(args, "heartbeat", None),
        metrics=getattr(args, "metrics", None),
    )


def channel_config(options: AgentOptions) -> Any:
    """The ChannelConfig the options ask for (None without --collector); UsageError, naming
    the flag, for anything wrong."""
    from driftwarden.certs import validate_node_names
    from driftwarden.channel import ChannelConfig, ChannelError, TlsFiles, parse_collector_address

    tls_values = (options.tls_cert, options.tls_key, options.tls_ca)
    if not options.collector:
        given = [flag for flag, value in (("--node", options.node),
                                          ("--heartbeat", options.heartbeat),
                                          ("--allow-non-loopback", options.allow_non_loopback),
                                          *zip(_TLS_FLAGS, tls_values, strict=True)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} only make(s) sense with --collector HOST:PORT")
        return None
    address = parse_collector_address(options.collector,
                                      allow_non_loopback=options.allow_non_loopback)
    tls = None
    if any(tls_values):
        missing = [flag for flag, value in zip(_TLS_FLAGS, tls_values, strict=True) if not value]
        if missing:
            raise UsageError(f"{', '.join(_TLS_FLAGS)} go together; missing {', '.join(missing)}")
        tls = TlsFiles(cert=Path(options.tls_cert or ""), key=Path(options.tls_key or ""),
                       ca=Path(options.tls_ca or ""))
        try:
            tls.read()
        except ChannelError as exc:
            raise UsageError(str(exc)) from None
    elif options.allow_non_loopback and not _is_loopback_target(address):
        raise UsageError(f"--collector {options.collector}: alerts would cross the network in "
                         f"plain text; give --tls-cert, --tls-key and --tls-ca")
    node = options.node or socket.gethostname()
    try:
        validate_node_names([node])
    except UsageError as exc:
        hint = "" if options.node else " (the host name; choose one with --node NAME)"
        raise UsageError(f"{exc}{hint}") from None
    return ChannelConfig(address=address, node=node, mode=options.mode, tls=tls,
                         heartbeat_seconds=options.heartbeat or DEFAULT_HEARTBEAT_SECONDS)


def _is_loopback_target(address: str) -> bool:
    from driftwarden.channel import parse_collector_address

    try:
        parse_collector_address(address)
    except UsageError:
        return False
    return True


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``host:port`` for --metrics -> (loopback host, port); UsageError otherwise."""
    from driftwarden.metrics import loopback_host

    host, _, port_text = text.strip().rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port_text.isdigit() or int(port_text) > 65535:
        raise UsageError(f"--metrics {text!r} is not HOST:PORT (e.g. 127.0.0.1:9464)")
    try:
        return loopback_host(host), int(port_text)
    except ValueError as exc:
        raise UsageError(f"--metrics {text!r}: {exc}") from None


class AlertCounter:
    """An AlertSink in front of another that counts alerts per kind (for metrics)."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink
        self._lock = threading.Lock()
        self._by_kind: collections.Counter[str] = collections.Counter()

    def emit(self, alert: Any) -> None:
        with self._lock:
            self._by_kind[str(alert.kind)] += 1
        self.sink.emit(alert)

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        self.sink.close()

    def by_kind(self) -> dict[str, int]:
        from driftwarden.alerts import AlertKind

        with self._lock:
            return {kind.value: self._by_kind[kind.value] for kind in AlertKind}


class DockerContainers:
    """``(id, name, image_id, image_name)`` of the containers running here, for heartbeats.

    When Docker cannot answer, the last list is returned again (the collector keeps routing
    actions here; they then report Docker's error) and the failure is logged once per streak.
    """

    def __init__(self, base_url: str, *, timeout: float = 5.0) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self._client: Any = None
        self._last: tuple[tuple[str, str | None, str | None, str | None], ...] = ()
        self._failing = False

    def __call__(self) -> tuple[tuple[str, str | None, str | None, str | None], ...]:
        import docker

        try:
            if self._client is None:
                self._client = docker.APIClient(base_url=self.base_url, timeout=self.timeout,
                                                version="auto")
            rows = self._client.containers()
        except Exception as exc:
            self.close()
            if not self._failing:
                log.warning("cannot list containers for the collector (%s); sending the last "
                            "known list", exc)
            self._failing = True
            return self._last
        self._failing = False
        self._last = tuple(
            (row["Id"], (row.get("Names") or ["/"])[0].lstrip("/") or None,
             row.get("ImageID") or None, row.get("Image") or None) for row in rows)
        return self._last

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def register_metrics(registry: Any, probes: Any, counter: AlertCounter,
                     channel: Any | None) -> None:
    """The agent's metrics (see the module docstring) on `registry`, read at scrape time."""
    outcomes = ("emitted", "suppressed", "dropped")

    def events() -> dict[tuple[str, str], int]:
        return {(kind, outcome): values.get(outcome, 0)
                for kind, values in probes.counters().items() for outcome in outcomes}

    registry.counter_callback(
        "driftwarden_agent_events_total", "Kernel events per kind: emitted to the agent, "
        "suppressed as repeats in the kernel, dropped (ring buffer full)", events,
        ("kind", "outcome"))
    registry.counter_callback("driftwarden_agent_alerts_total", "Alerts raised, per kind",
                              counter.by_kind, ("kind",))
    if channel is None:
        return
    registry.gauge_callback("driftwarden_agent_spool_depth",
                            "Alerts in the spool waiting for the collector's acknowledgement",
                            lambda: channel.stats.spool_depth)
    registry.gauge_callback("driftwarden_agent_collector_connected",
                            "1 while a stream to the collector is open",
                            lambda: int(channel.connected))
    registry.counter_callback("driftwarden_agent_alerts_sent_total",
                              "Alerts sent to the collector (a resend counts again)",
                              lambda: channel.stats.sent)
    registry.counter_callback("driftwarden_agent_alerts_acked_total",
                              "Alerts the collector acknowledged", lambda: channel.stats.acked)
    registry.counter_callback("driftwarden_agent_collector_reconnects_total",
                              "Dials to the collector after the first",
                              lambda: channel.stats.reconnects)
    registry.counter_callback("driftwarden_agent_actions_total",
                              "Collector actions answered, per type and status",
                              lambda: dict(channel.stats.actions), ("type", "status"))


def run_agent(options: AgentOptions, stop: threading.Event, *, stdout: TextIO,
              stderr: TextIO) -> int:
    from driftwarden.alerts import AlertAggregator, JsonLinesAlertSink
    from driftwarden.attribution_view import LiveAttribution
    from driftwarden.channel import TeeSink
    from driftwarden.control import BaselineService, ControlServer
    from driftwarden.detect import (
        Detector,
        DetectorConfig,
        LayersCache,
        LiveProfiles,
        LockedSink,
        docker_graph_driver,
    )
    from driftwarden.metrics import MetricsRegistry, MetricsServer
    from driftwarden.models.items import ItemSet
    from driftwarden.models.profile import LearningPolicy, Mode, ProfileStore
    from driftwarden.pipeline import TracePipeline
    from driftwarden.probes.capture import LiveCapture
    from driftwarden.probes.loader import ProbeConfig, ProbeSet, find_cgroup2_root
    from driftwarden.procfs import LiveProcReader

    try:
        mode = Mode(options.mode)
    except ValueError:
        raise UsageError(f"--mode must be learn or monitor, got {options.mode!r}") from None
    if mode is Mode.PROTECT:
        raise UsageError("--mode protect is set per image with `driftwarden baseline mode`")
    if options.window <= 0:
        raise UsageError(f"--window must be > 0 seconds, got {options.window}")
    if not options.startup_grace >= 0:
        raise UsageError(f"--startup-grace must be >= 0 seconds, got {options.startup_grace}")
    config = channel_config(options)
    metrics_address = parse_metrics_address(options.metrics) if options.metrics else None
    policy = LearningPolicy(learn_for=options.learn_for)
    state_dir = Path(options.state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        store = ProfileStore(state_dir, ItemSet)
    except OSError as exc:
        raise UsageError(f"cannot use --state-dir {state_dir}: {exc.strerror}") from exc
    with contextlib.ExitStack() as stack:
        sinks: list[Any] = []
        alerts_file = options.alerts_file
        if alerts_file == "-":
            sinks.append(JsonLinesAlertSink(stdout))
        elif alerts_file is not None:
            try:
                out = stack.enter_context(open(alerts_file, "a", encoding="utf-8"))
            except OSError as exc:
                raise UsageError(
                    f"cannot write --alerts-out {alerts_file}: {exc.strerror}") from exc
            sinks.append(JsonLinesAlertSink(out))
        attribution = stack.enter_context(
            LiveAttribution(str(find_cgroup2_root()), options.docker_host))
        probes = stack.enter_context(ProbeSet(ProbeConfig()))
        channel = None
        if config is not None:
            channel = stack.enter_context(_open_channel(config, state_dir, options, probes,
                                                        stack))
            sinks.append(channel)
        counter = AlertCounter(sinks[0] if len(sinks) == 1 else TeeSink(*sinks))
        aggregator = AlertAggregator(counter)
        if metrics_address is not None:
            registry = MetricsRegistry()
            register_metrics(registry, probes, counter, channel)
            try:
                server = stack.enter_context(MetricsServer(registry, *metrics_address))
            except OSError as exc:
                raise UsageError(f"cannot serve --metrics {options.metrics}: "
                                 f"{exc.strerror or exc}") from exc
            stderr.write(f"driftwarden: metrics at {server.url}\n")
        source = LiveCapture(probes)
        pipeline = TracePipeline(source, proc=LiveProcReader(), attribution=attribution,
                                 sinks=[])
        detector = Detector(
            DetectorConfig(window_seconds=options.window, policy=policy, initial_mode=mode,
                           startup_seconds=options.startup_grace),
            store, aggregator,
            exe_of=pipeline.processes.exe_before_exec,
            layers_of=LayersCache(graph_driver_of=docker_graph_driver(options.docker_host)).get,
            clock_offset_ns=source.clock_offset_ns,
            drops=lambda: sum(k["dropped"] for k in probes.counters().values()),
        )
        lock = threading.Lock()
        pipeline.sinks.append(LockedSink(detector, lock))
        stack.enter_context(ControlServer(BaselineService(LiveProfiles(detector), store),
                                          state_dir, lock))
        where = f"; alerts to collector {config.address} as node {config.node}" if config else ""
        stderr.write(f"driftwarden: agent running; baselines in {store.dir}{where}; "
                     f"Ctrl-C to stop\n")
        stderr.flush()
        try:
            pipeline.run(duration=options.duration, should_stop=stop.is_set)
        finally:
            with lock:
                detector.close()  # closes the aggregator, which closes the sinks
    stderr.write(f"driftwarden: agent stopped; {dict(detector.stats)}\n")
    if channel is not None:
        stats = channel.stats
        stderr.write(f"driftwarden: collector: {stats.sent} alerts sent, {stats.acked} "
                     f"acknowledged, {stats.spool_depth} kept in the spool\n")
    return 0


@contextlib.contextmanager
def _open_channel(config: Any, state_dir: Path, options: AgentOptions, probes: Any,
                  stack: contextlib.ExitStack):
    from driftwarden.actions import ContainerActions
    from driftwarden.channel import SPOOL_DIR_NAME, ChannelError, CollectorChannel
    from driftwarden.spool import SpoolError

    actions = stack.enter_context(ContainerActions.for_docker(options.docker_host))
    containers = DockerContainers(options.docker_host)
    stack.callback(containers.close)
    spool_dir = state_dir / SPOOL_DIR_NAME
    try:
        channel = CollectorChannel(config, spool_dir, actions=actions,
                                   counters=probes.counters, containers=containers)
    except (SpoolError, ChannelError) as exc:
        raise UsageError(f"cannot start the collector channel: {exc}") from exc
    with channel:
        yield channel
