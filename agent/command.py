"""`driftwarden agent`: probes -> attribution -> detection -> alerts.

Alerts go to an AlertSink (driftwarden.agent.alerts): `--alerts-out` writes JSON lines,
`--collector` streams them to the collector through the spool in STATE_DIR/spool
(driftwarden.agent.channel); both may be given. Without `--collector` alerts go to stdout
unless `--alerts-out` says otherwise; with it, to the collector only unless `--alerts-out` is
given explicitly. The collector's action
commands run through ContainerActions.for_endpoints(): each container's runtime does it (Docker,
podman, or a CRI runtime, where pause is the cgroup freezer and kill is StopContainer), and the
heartbeats list the running containers of every runtime.

`--metrics HOST:PORT` serves Prometheus metrics (loopback only): ``driftwarden_agent_``
``events_total{kind,outcome=emitted|suppressed|dropped|over_budget|known}`` (the probes' counters),
``container_events_held_total{container,image,kind,outcome=over_budget|dropped}`` (per
container: the first 20 containers that went over their budget or lost events have their own
series, later ones add to container ``_other``; agent.flood), ``flood_episodes_total``,
``budget_entries_evicted_total``,
``alerts_total{kind}``, the histogram ``event_latency_seconds`` (kernel timestamp -> the
detector takes the event up), ``containers_without_metadata_total{runtime}`` (containers the
runtime did not describe: no image, so no detection) and
``container_metadata_unavailable{runtime}`` (1 while that runtime cannot be asked);
with `--collector` also ``spool_depth``, ``collector_connected``,
``collector_address_connected{address}`` (1 for the collector streamed to now, 0 for each other
address given), ``collector_failovers_total``,
``alerts_sent_total``, ``alerts_acked_total``, ``collector_reconnects_total`` and
``actions_total{type,status}``.

`--collector` takes several addresses (repeated, or comma-separated): replicas of one collector
store; the agent streams to one and fails over to the next when its stream breaks
(driftwarden.agent.channel).

The agent's commands (`trace`, `agent`, `doctor`) are added to the command line by
:func:`add_parsers`, and :func:`run_local_baseline` runs `baseline` on a node's state dir;
:func:`options_from_args` turns the parsed `agent` flags into :class:`AgentOptions`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from driftwarden.core.argtypes import NON_NEGATIVE_SECONDS, POSITIVE_SECONDS
from driftwarden.core.errors import UsageError
from driftwarden.core.lifecycle import settle_heap, shorten_switch_interval, stop_on_signals
from driftwarden.core.netaddr import (
    host_port,
    is_loopback,
    parse_host_port,
    parse_metrics_address,
)

log = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_SECONDS = 5.0
_TLS_FLAGS = ("--tls-cert", "--tls-key", "--tls-ca")


@dataclass(frozen=True)
class AgentOptions:
    state_dir: str
    alerts_out: str | None = None  # None: stdout without a collector, no file with one
    window: float = 10.0
    startup_grace: float = 10.0  # seconds after a container's start the forest ignores
    incident_window: float = 2.0  # seconds one cause's alerts fold into one (0 = no grouping)
    learn_for: float | None = None
    mode: str = "learn"
    duration: float | None = None
    docker_host: str | None = None  # one more runtime endpoint, for the Docker Engine API
    # CRI or Docker sockets (unix:///path); none given: the usual sockets that exist
    runtime_endpoints: tuple[str, ...] = ()
    # host:port of the collector's gRPC endpoint; several (replicas): comma-separated
    collector: str | None = None
    allow_non_loopback: bool = False
    node: str | None = None  # None: this host's name
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    heartbeat: float | None = None  # seconds; None: DEFAULT_HEARTBEAT_SECONDS
    metrics: str | None = None  # host:port for GET /metrics (loopback)
    # --only-label: watch only containers with every one of these (key, value) labels
    only_labels: tuple[tuple[str, str], ...] = ()
    # --budget: (kind, probes.loader.Budget) pairs; kinds not given keep the defaults
    budgets: tuple = ()
    # --known-entries: identities of learned baselines the kernel counts instead of sending
    known_entries: int = 16384

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
    group.add_argument("--collector", metavar="HOST:PORT[,HOST:PORT...]", action="append",
                       default=None,
                       help="stream alerts to this collector (loopback only unless "
                       "--allow-non-loopback); alerts wait in STATE_DIR/spool until it "
                       "acknowledges them; it may send container actions back. Several "
                       "addresses (repeat the flag or separate them with commas): replicas "
                       "sharing one store, tried in order; when a stream breaks the agent "
                       "fails over to the next and replays what was not acknowledged")
    group.add_argument("--node", metavar="NAME", default=None,
                       help="this node's name towards the collector (default: the host name; "
                       "with TLS it must be the certificate's CN)")
    add_dial_flags(group)
    group.add_argument("--heartbeat", type=POSITIVE_SECONDS, default=None, metavar="SECONDS",
                       help=f"heartbeat interval towards the collector (default "
                       f"{DEFAULT_HEARTBEAT_SECONDS:g})")
    group.add_argument("--metrics", metavar="HOST:PORT", default=None,
                       help="serve Prometheus metrics at http://HOST:PORT/metrics (loopback "
                       "only; port 0 picks one)")
    parser.set_defaults(alerts_out=None)


def add_dial_flags(group: Any) -> None:
    """`--allow-non-loopback` and the `--tls-*` files: how the agent (and `doctor
    --collector`) may dial its collectors; :func:`collector_targets` checks them."""
    group.add_argument("--allow-non-loopback", action="store_true",
                       help="allow a --collector beyond loopback (real deployments; needs the "
                       "--tls-* files)")
    group.add_argument("--tls-cert", metavar="FILE", default=None,
                       help="this agent's client certificate (mutual TLS; with --tls-key and "
                       "--tls-ca, e.g. from `driftwarden certs`)")
    group.add_argument("--tls-key", metavar="FILE", default=None,
                       help="the client certificate's private key")
    group.add_argument("--tls-ca", metavar="FILE", default=None,
                       help="the CA certificate that signed the collector's certificate")


def options_from_args(args: argparse.Namespace) -> AgentOptions:
    """AgentOptions from the parsed `agent` flags (cli.py's and add_collector_flags')."""
    return AgentOptions(
        state_dir=args.state_dir, alerts_out=args.alerts_out, window=args.window,
        startup_grace=getattr(args, "startup_grace", 10.0),
        incident_window=getattr(args, "incident_window", 2.0), learn_for=args.learn_for,
        mode=args.mode, duration=args.duration,
        docker_host=args.docker_host,
        runtime_endpoints=tuple(getattr(args, "runtime_endpoint", None) or ()),
        collector=_joined(getattr(args, "collector", None)),
        allow_non_loopback=getattr(args, "allow_non_loopback", False),
        node=getattr(args, "node", None),
        tls_cert=getattr(args, "tls_cert", None),
        tls_key=getattr(args, "tls_key", None),
        tls_ca=getattr(args, "tls_ca", None),
        heartbeat=getattr(args, "heartbeat", None),
        metrics=getattr(args, "metrics", None),
        only_labels=tuple(getattr(args, "only_label", None) or ()),
        budgets=tuple(pair for given in getattr(args, "budget", None) or () for pair in given),
        known_entries=getattr(args, "known_entries", AgentOptions.known_entries),
    )


def _joined(values: str | list[str] | None) -> str | None:
    """The `--collector` values (the flag may be repeated) as one comma-separated text."""
    if values is None or isinstance(values, str):
        return values
    return ",".join(values)


def parse_collector_addresses(text: str, *, allow_non_loopback: bool = False,
                              flag: str = "--collector") -> tuple[str, ...]:
    """`--collector` text (one address, or several separated by commas) -> the gRPC targets
    (``host:port``), in order. Each address passes the same parser and loopback rule as a
    single one; UsageError, one line naming the flag, for an empty entry, a malformed or
    non-loopback address, or one given twice."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 1 and not all(parts):
        raise UsageError(f"{flag} {text!r}: an empty address in the list; give "
                         f"HOST:PORT,HOST:PORT (e.g. 127.0.0.1:50051,127.0.0.1:50052)")
    targets: list[str] = []
    for part in parts:
        host, port = parse_host_port(part, flag=flag, allow_non_loopback=allow_non_loopback)
        target = host_port(host, port)
        if target in targets:
            raise UsageError(f"{flag} {text!r}: {target} is given twice; give each collector "
                             f"once")
        targets.append(target)
    return tuple(targets)


def collector_targets(text: str, *, allow_non_loopback: bool, tls_ca: str | None,
                      tls_cert: str | None, tls_key: str | None) -> tuple[tuple[str, ...], Any]:
    """`--collector` text and the `--tls-*` flags -> ``(targets, TlsFiles or None)`` by the
    agent's rules (also `doctor --collector`'s): :func:`parse_collector_addresses`, a TLS
    pair with its CA or none, and no plain text beyond loopback. UsageError naming the flag."""
    from driftwarden.core.tls import TlsFiles

    targets = parse_collector_addresses(text, allow_non_loopback=allow_non_loopback)
    tls = TlsFiles.from_flags(ca=tls_ca, cert=tls_cert, key=tls_key, pair_required=True)
    for target in targets:
        host = target.rpartition(":")[0].strip("[]")
        if tls is None and not is_loopback(host):
            raise UsageError(f"--collector {target}: alerts would cross the network in "
                             f"plain text; give --tls-cert, --tls-key and --tls-ca")
    return targets, tls


def channel_config(options: AgentOptions) -> Any:
    """The ChannelConfig the options ask for (None without --collector); UsageError, naming
    the flag, for anything wrong."""
    from driftwarden.agent.channel import ChannelConfig
    from driftwarden.core.tls import validate_node_names

    tls_values = (options.tls_cert, options.tls_key, options.tls_ca)
    if not options.collector:
        given = [flag for flag, value in (("--node", options.node),
                                          ("--heartbeat", options.heartbeat),
                                          ("--allow-non-loopback", options.allow_non_loopback),
                                          *zip(_TLS_FLAGS, tls_values, strict=True)) if value]
        if given:
            raise UsageError(f"{', '.join(given)} only make(s) sense with --collector HOST:PORT")
        return None
    targets, tls = collector_targets(options.collector,
                                     allow_non_loopback=options.allow_non_loopback,
                                     tls_ca=options.tls_ca, tls_cert=options.tls_cert,
                                     tls_key=options.tls_key)
    node = options.node or socket.gethostname()
    try:
        validate_node_names([node])
    except UsageError as exc:
        hint = "" if options.node else " (the host name; choose one with --node NAME)"
        raise UsageError(f"{exc}{hint}") from None
    return ChannelConfig(address=targets[0], failover=targets[1:], node=node,
                         mode=options.mode, tls=tls,
                         heartbeat_seconds=options.heartbeat or DEFAULT_HEARTBEAT_SECONDS)


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
        from driftwarden.core.alerts import AlertKind

        with self._lock:
            return {kind.value: self._by_kind[kind.value] for kind in AlertKind}


def register_flood_metrics(registry: Any, flood: Any) -> None:
    """What the per-container budgets held back and the ring buffer lost, by container
    (agent.flood.FloodWatch.series: bounded series), flood episodes and evicted counts."""
    registry.counter_callback(
        "driftwarden_agent_container_events_held_total", "Events per container and kind that "
        "its kernel budget held back (outcome over_budget) or the full ring buffer lost "
        "(dropped); the first 20 such containers by name, later ones as container _other",
        flood.series, ("container", "image", "kind", "outcome"))
    registry.counter_callback("driftwarden_agent_flood_episodes_total",
                              "Floods: a container over its budget (one sensor-flood alert "
                              "each)", lambda: flood.stats["episodes"])
    registry.counter_callback("driftwarden_agent_budget_entries_evicted_total",
                              "(cgroup, kind) counts the kernel's bounded budget map evicted",
                              lambda: flood.evicted)


def register_metrics(registry: Any, probes: Any, counter: AlertCounter,
                     channel: Any | None, attributor: Any | None = None) -> Any:
    """The agent's metrics (see the module docstring) on `registry`, read at scrape time.
    Returns the detector's ``event_seen``: called with each event's kernel timestamp (ns)."""
    from time import monotonic_ns

    outcomes = ("emitted", "suppressed", "dropped", "over_budget", "known")
    latency = registry.histogram(
        "driftwarden_agent_event_latency_seconds", "Seconds from a kernel event's timestamp "
        "(taken by the probe, CLOCK_MONOTONIC) to the detector taking it up: the ring buffer's "
        "drain wait, decoding, process table, attribution (a container's first events wait "
        "for its metadata)")

    def event_seen(ts_ns: int) -> None:
        latency.observe(max(monotonic_ns() - ts_ns, 0) / 1e9)

    def events() -> dict[tuple[str, str], int]:
        return {(kind, outcome): values.get(outcome, 0)
                for kind, values in probes.counters().items() for outcome in outcomes}

    registry.counter_callback(
        "driftwarden_agent_events_total", "Kernel events per kind: emitted to the agent, "
        "suppressed as repeats in the kernel, dropped (ring buffer full), held back by their "
        "container's budget (over_budget), counted in the kernel as its baseline's (known)",
        events,
        ("kind", "outcome"))
    registry.counter_callback("driftwarden_agent_alerts_total", "Alerts raised, per kind",
                              counter.by_kind, ("kind",))
    if attributor is not None:
        registry.counter_callback(
            "driftwarden_agent_containers_without_metadata_total",
            "Containers whose runtime did not describe them (unknown to it, or it could not be "
            "asked), counted once each by the runtime their cgroup path names: their events "
            "have no image, so no detection",
            attributor.without_metadata, ("runtime",))
        registry.gauge_callback(
            "driftwarden_agent_container_metadata_unavailable",
            "1 while this container runtime cannot be asked for metadata (asking it failed "
            "or its event stream cannot reach it; or no endpoint serves it): its containers "
            "first seen meanwhile get cgroup-only attribution and no detection",
            attributor.metadata_unavailable_by_runtime, ("runtime",))
    if channel is None:
        return event_seen
    registry.gauge_callback("driftwarden_agent_spool_depth",
                            "Alerts in the spool waiting for the collector's acknowledgement",
                            lambda: channel.stats.spool_depth)
    registry.gauge_callback("driftwarden_agent_collector_connected",
                            "1 while a stream to the collector is open",
                            lambda: int(channel.connected))

    def connected_to() -> dict[tuple[str], int]:
        now = channel.collector
        return {(address,): int(address == now) for address in channel.config.addresses}

    registry.gauge_callback("driftwarden_agent_collector_address_connected",
                            "1 for the collector address the agent streams to now, 0 for the "
                            "other --collector addresses", connected_to, ("address",))
    registry.counter_callback("driftwarden_agent_collector_failovers_total",
                              "Moves to the next --collector address after a stream failed",
                              lambda: channel.stats.failovers)
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
    return event_seen


def register_known_metrics(registry: Any, known: Any) -> None:
    """The baseline in the kernel (agent.known.KnownFilter): its entries and what it gave up."""
    registry.gauge_callback("driftwarden_agent_known_entries",
                            "Identities of learned baselines the kernel counts instead of "
                            "sending", lambda: len(known))
    registry.counter_callback(
        "driftwarden_agent_known_entries_lost_total", "Identities judged known that did not "
        "go into the kernel (refused: the map was full, --known-entries) or were taken out "
        "(idle: not seen for 10 minutes; forgotten: their image learns again or its baseline "
        "changed; gone: their container's cgroup is gone)", lambda: {
            (why,): known.stats[name] for why, name in (
                ("refused", "refused_full"), ("idle", "evicted_idle"),
                ("forgotten", "forgotten"), ("gone", "gone"))}, ("why",))


def register_watch_metrics(registry: Any, pipeline: Any, detector: Any,
                           fleet: Any | None) -> None:
    """What --only-label left out, and the fleet baselines' traffic (with --collector)."""
    registry.counter_callback(
        "driftwarden_agent_events_not_selected_total", "Events of containers --only-label "
        "does not select, skipped", lambda: pipeline.summary.filtered.get("not_selected", 0))
    if fleet is None:
        return
    registry.counter_callback(
        "driftwarden_agent_baseline_messages_total", "Fleet baseline messages: requests and "
        "increments sent, updates received", lambda: {
            (kind,): fleet.stats[name] for kind, name in (
                ("request", "requests"), ("increment", "increments"), ("update", "updates"))},
        ("kind",))
    registry.counter_callback(
        "driftwarden_agent_baseline_records_held_total", "Records of a new image that waited "
        "for the collector's baseline", lambda: detector.stats.get("fleet_records_held", 0))


def run_agent(options: AgentOptions, stop: threading.Event, *, stdout: TextIO,
              stderr: TextIO) -> int:
    from driftwarden.agent.alerts import AlertAggregator, JsonLinesAlertSink
    from driftwarden.agent.attribution_view import LiveAttribution
    from driftwarden.agent.channel import TeeSink
    from driftwarden.agent.control import BaselineService, ControlServer, LiveProfiles
    from driftwarden.agent.detect import (
        Detector,
        DetectorConfig,
        LayersCache,
        LockedSink,
    )
    from driftwarden.agent.fleet import FleetBaselines, FleetConfig
    from driftwarden.agent.flood import FloodWatch, ReadWhenMoved
    from driftwarden.agent.forests import ChildForests
    from driftwarden.agent.known import KnownFilter, cgroup_alive
    from driftwarden.agent.pipeline import TraceFilter, TracePipeline
    from driftwarden.agent.procfs import LiveProcReader
    from driftwarden.agent.runtimes.registry import GraphDrivers, ImageLayers, resolve_endpoints
    from driftwarden.core.metrics import MetricsRegistry, MetricsServer
    from driftwarden.core.modes import Mode
    from driftwarden.models.items import ItemSet
    from driftwarden.models.profile import LearningPolicy, ProfileStore
    from driftwarden.probes.capture import LiveCapture
    from driftwarden.probes.loader import ProbeConfig, ProbeSet, find_cgroup2_root

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
    if not options.incident_window >= 0:
        raise UsageError(f"--incident-window must be >= 0 seconds (0 = no grouping), got "
                         f"{options.incident_window}")
    if options.collector and options.learn_for is not None:
        raise UsageError("--learn-for: with --collector the collector ends learning for the "
                         "whole fleet; give it to the collector (`driftwarden collector "
                         "--learn-for SECONDS`) or set the mode with `driftwarden baseline mode "
                         "IMAGE monitor --collector ADDR`")
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
        endpoints = resolve_endpoints(options.runtime_endpoints, options.docker_host)
        attribution = stack.enter_context(LiveAttribution(str(find_cgroup2_root()), endpoints))
        probes = stack.enter_context(ProbeSet(ProbeConfig(
            budgets=options.budgets, known_entries=options.known_entries)))
        flood = FloodWatch(ReadWhenMoved(probes.budget_usage, lambda: sum(
            k["over_budget"] + k["dropped"] for k in probes.counters().values())),
            attribution.lookup)
        known = KnownFilter(probes.known_install, probes.known_hits, probes.known_remove,
                            capacity=options.known_entries,
                            alive=cgroup_alive(find_cgroup2_root()),
                            moved=lambda: sum(k["known"] for k in probes.counters().values())
                            ) if options.known_entries else None
        channel = fleet = None
        if config is not None:
            image_layers = ImageLayers(endpoints)
            stack.callback(image_layers.close)
            fleet = FleetBaselines(FleetConfig(node=config.node), state_dir,
                                   has_copy=lambda key: store.path_for(key).exists(),
                                   image_layers=image_layers)
            channel = stack.enter_context(_open_channel(
                config, state_dir, options, probes, stack, fleet=fleet,
                describe=attribution.metadata.inspect))
            sinks.append(channel)
        counter = AlertCounter(sinks[0] if len(sinks) == 1 else TeeSink(*sinks))
        aggregator = AlertAggregator(counter, incident_seconds=options.incident_window)
        event_seen = None
        if metrics_address is not None:
            registry = MetricsRegistry()
            event_seen = register_metrics(registry, probes, counter, channel,
                                          attribution.attributor)
            try:
                server = stack.enter_context(MetricsServer(registry, *metrics_address))
            except OSError as exc:
                raise UsageError(f"cannot serve --metrics {options.metrics}: "
                                 f"{exc.strerror or exc}") from exc
            stderr.write(f"driftwarden: metrics at {server.url}\n")
        source = LiveCapture(probes)
        pipeline = TracePipeline(source, proc=LiveProcReader(cgroup_root=find_cgroup2_root()),
                                 attribution=attribution, sinks=[],
                                 trace_filter=TraceFilter(labels=options.only_labels))
        graph_driver = GraphDrivers(endpoints, known=attribution.attributor.graph_driver)
        stack.callback(graph_driver.close)
        # forests are fitted in a child process: scikit-learn never enters the agent's memory
        forests = stack.enter_context(ChildForests())
        detector = Detector(
            DetectorConfig(window_seconds=options.window, policy=policy, initial_mode=mode,
                           startup_seconds=options.startup_grace),
            store, aggregator,
            layers_of=LayersCache(graph_driver_of=graph_driver).get,
            clock_offset_ns=source.clock_offset_ns,
            drops=lambda: sum(k["dropped"] for k in probes.counters().values()),
            event_seen=event_seen, fleet=fleet, flood=flood, known=known, forests=forests,
        )
        if metrics_address is not None:
            register_watch_metrics(registry, pipeline, detector, fleet)
            register_flood_metrics(registry, flood)
            if known is not None:
                register_known_metrics(registry, known)
        lock = threading.Lock()
        pipeline.sinks.append(LockedSink(detector, lock))
        stack.enter_context(ControlServer(
            BaselineService(LiveProfiles(detector), store,
                            fleet_collector=config.address if fleet is not None else None),
            state_dir, lock))
        where = ""
        if config is not None:
            where = f"; alerts to collector {config.address}"
            if config.failover:
                where += f" (failover: {', '.join(config.failover)})"
            where += f" as node {config.node}"
        if options.only_labels:
            where += "; only containers labelled " + ", ".join(
                f"{k}={v}" for k, v in options.only_labels)
        settle_heap()
        shorten_switch_interval()
        stderr.write(f"driftwarden: agent running; baselines in {store.dir}{where}; "
                     f"Ctrl-C to stop\n")
        stderr.flush()
        try:
            pipeline.run(duration=options.duration, should_stop=stop.is_set,
                         idle_poll_interval=source.idle_interval)
        finally:
            with lock:
                detector.close()  # closes the aggregator, which closes the sinks
            kernel = probes.counters()
    stderr.write(f"driftwarden: agent stopped; {dict(detector.stats)}\n")
    stderr.write(f"driftwarden: isolation forests fitted in child processes: "
                 f"{forests.stats['fitted']} in {forests.stats['children']} children, "
                 f"{forests.stats['child_failures']} children and "
                 f"{forests.stats['job_failures']} fits failed\n")
    if known is not None:
        stderr.write(f"driftwarden: kernel baseline filter: {len(known)} identities, "
                     f"{known.stats['hits']} events counted in the kernel, "
                     f"{known.stats['installed']} installed, {known.stats['refused_full']} "
                     f"refused (map full), {known.stats['evicted_idle']} idle taken out, "
                     f"{known.stats['gone']} of gone containers taken out\n")
    # one line a script can read (bench/probe_overhead.py's loss test)
    stderr.write(f"driftwarden: kernel counters {json.dumps(kernel, sort_keys=True)}\n")
    if channel is not None:
        stats = channel.stats
        stderr.write(f"driftwarden: collector: {stats.sent} alerts sent, {stats.acked} "
                     f"acknowledged, {stats.spool_depth} kept in the spool\n")
    return 0


@contextlib.contextmanager
def _open_channel(config: Any, state_dir: Path, options: AgentOptions, probes: Any,
                  stack: contextlib.ExitStack, *, fleet: Any, describe: Any):
    from driftwarden.agent.actions import ContainerActions
    from driftwarden.agent.channel import SPOOL_DIR_NAME, CollectorChannel
    from driftwarden.agent.runtimes.registry import RunningContainers, resolve_endpoints
    from driftwarden.agent.selection import NodeContainers
    from driftwarden.core.errors import ChannelError, SpoolError

    endpoints = resolve_endpoints(options.runtime_endpoints, options.docker_host)
    actions = stack.enter_context(ContainerActions.for_endpoints(endpoints))
    running = RunningContainers(endpoints)
    stack.callback(running.close)
    # the heartbeats list what this agent watches, by the keys its baselines have
    containers = NodeContainers(running, describe, labels=options.only_labels)
    spool_dir = state_dir / SPOOL_DIR_NAME
    try:
        channel = CollectorChannel(config, spool_dir, actions=actions,
                                   counters=probes.counters, containers=containers,
                                   fleet=fleet)
    except (SpoolError, ChannelError) as exc:
        raise UsageError(f"cannot start the collector channel: {exc}") from exc
    with channel:
        yield channel


# -- the command line ----------------------------------------------------------------------------


def _kinds(text: str) -> frozenset[str]:
    from driftwarden.agent.pipeline import USER_KINDS

    kinds = frozenset(k.strip() for k in text.split(",") if k.strip())
    unknown = kinds - set(USER_KINDS)
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {','.join(sorted(unknown)) or '(empty)'}; "
            f"choose from {','.join(USER_KINDS)}"
        )
    return kinds


def _runtime_endpoint(text: str) -> str:
    from driftwarden.agent.runtimes.registry import parse_runtime_endpoint

    try:
        parse_runtime_endpoint(text, flag="")
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).strip()) from None
    return text


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _budget(text: str) -> tuple:
    from driftwarden.probes.loader import parse_budget

    try:
        return parse_budget(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_budget_flag(parser: argparse.ArgumentParser) -> None:
    """`--budget KIND=RATE[/BURST]` (repeatable): the kernel's per-container budgets."""
    from driftwarden.probes.loader import DEFAULT_BUDGETS

    defaults = ", ".join(f"{kind}={b.rate}/{b.burst}" for kind, b in DEFAULT_BUDGETS.items())
    parser.add_argument("--budget", action="append", type=_budget, default=[],
                        metavar="KIND=RATE[/BURST]",
                        help="what one container may send of a kind (exec, connect, write) "
                        "after the kernel's dedup: RATE events/s, BURST at once (default twice "
                        "RATE); the excess is counted per container, not sent; KIND=off or "
                        f"off: no budget; repeatable (default {defaults})")


def add_runtime_flags(parser: argparse.ArgumentParser) -> None:
    """`--runtime-endpoint` (repeatable) and `--docker-host`: the runtimes asked for metadata."""
    parser.add_argument("--runtime-endpoint", action="append", type=_runtime_endpoint,
                        default=[], metavar="unix:///PATH",
                        help="a container runtime's socket, as crictl takes it (a CRI runtime: "
                        "containerd, CRI-O; or Docker's or podman's socket); repeatable. "
                        "Default: the usual sockets that exist (/run/containerd/containerd.sock, "
                        "/run/crio/crio.sock, /var/run/docker.sock, /run/podman/podman.sock)")
    parser.add_argument("--docker-host", default=None, metavar="URL",
                        help="the Docker Engine API address (one more endpoint; any URL Docker "
                        "takes; default: probed like the others)")


def _add_trace(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "trace",
        help="show exec, connect and file-write events from every container",
        description="Attach the probes and print every container's exec, connect and file "
        "writes, attributed to container and image. Ctrl-C stops and prints a summary.",
    )
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per line")
    out.add_argument("--summary-only", action="store_true",
                     help="run the whole pipeline but print only the summary at exit")
    p.add_argument("--container", action="append", default=[], metavar="NAME_OR_ID",
                   help="only this container (name or id prefix); repeatable")
    p.add_argument("--kinds", type=_kinds, default=None, metavar="LIST",
                   help="comma list of exec,connect,write (default: all)")
    p.add_argument("--duration", type=POSITIVE_SECONDS, default=None, metavar="SECONDS",
                   help="stop after this many seconds")
    p.add_argument("--include-host", action="store_true",
                   help="also report processes outside containers")
    p.add_argument("--show-runtime", action="store_true",
                   help="also show the container runtime's own setup writes (runc init)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--record", metavar="FILE", help="also write the raw events to FILE")
    src.add_argument("--replay", metavar="FILE", help="read events from FILE, not the kernel")
    p.add_argument("--dedup-interval", type=NON_NEGATIVE_SECONDS, default=1.0, metavar="SECONDS",
                   help="suppress repeats of an event within this interval in the kernel "
                   "(0 disables; default 1)")
    p.add_argument("--ringbuf-pages", type=int, default=1024, metavar="N",
                   help="ring buffer size in 4 KiB pages, a power of two (default 1024)")
    p.add_argument("--open-result", action="store_true",
                   help="report opens at syscall exit with their result (costs a second "
                   "tracepoint on every open; default: at entry, result null)")
    p.add_argument("--print-bpf", action="store_true",
                   help="print the final BPF program text and exit")
    add_budget_flag(p)
    add_runtime_flags(p)
    p.add_argument("--cgroup-root", default="", help="cgroup v2 mount (default: detect)")
    p.set_defaults(func=_run_trace)


def _run_trace(args: argparse.Namespace) -> int:
    from driftwarden.agent.trace import TraceOptions, run_trace

    options = TraceOptions(
        json=args.json,
        summary_only=args.summary_only,
        containers=tuple(args.container),
        kinds=args.kinds,
        duration=args.duration,
        include_host=args.include_host,
        show_runtime=args.show_runtime,
        record=args.record,
        replay=args.replay,
        dedup_interval_ns=int(args.dedup_interval * 1e9),
        ringbuf_pages=args.ringbuf_pages,
        print_bpf=args.print_bpf,
        open_result=args.open_result,
        docker_host=args.docker_host,
        runtime_endpoints=tuple(args.runtime_endpoint),
        cgroup_root=args.cgroup_root,
        budgets=tuple(pair for given in args.budget for pair in given),
    )
    return run_trace(options, stop_on_signals(), stdout=sys.stdout, stderr=sys.stderr)


def _add_agent(subparsers: argparse._SubParsersAction) -> None:
    from driftwarden.agent.selection import label_pair

    p = subparsers.add_parser(
        "agent",
        help="learn each image's behaviour and report drift, novelty and anomalies",
        description="Run the probes, learn a baseline per image (learn -> monitor), and send "
        "alerts to the collector (--collector) and/or JSON lines (--alerts-out). Baselines "
        "and unacknowledged alerts live in --state-dir and survive restarts.",
    )
    p.add_argument("--state-dir", required=True, metavar="DIR",
                   help="where baselines are kept (created if missing)")
    p.add_argument("--alerts-out", default="-", metavar="FILE",
                   help="append alerts here as JSON lines (default: stdout; with --collector: "
                   "none unless given, - = stdout)")
    p.add_argument("--window", type=POSITIVE_SECONDS, default=10.0, metavar="SECONDS",
                   help="feature window length (default 10)")
    p.add_argument("--startup-grace", type=NON_NEGATIVE_SECONDS, default=10.0, metavar="SECONDS",
                   help="a container's first SECONDS after it (re)started are left out of the "
                   "anomaly model: neither learned nor scored (novelty and drift still apply; "
                   "default 10, 0 = none)")
    p.add_argument("--incident-window", type=NON_NEGATIVE_SECONDS, default=2.0,
                   metavar="SECONDS",
                   help="alerts of one container and process tree within SECONDS are one "
                   "incident: the first is sent at once, the others fold into it (all reasons, "
                   "a count, the highest severity) and it is sent again when the window ends; "
                   "drift is never folded into novelty nor delayed (default 2, 0 = no grouping)")
    p.add_argument("--learn-for", type=POSITIVE_SECONDS, default=None, metavar="SECONDS",
                   help="end learning after this long even if not yet stable")
    p.add_argument("--mode", choices=("learn", "monitor"), default="learn",
                   help="mode of an image seen for the first time (default learn)")
    p.add_argument("--duration", type=POSITIVE_SECONDS, default=None, metavar="SECONDS",
                   help="stop after this many seconds")
    p.add_argument("--only-label", action="append", type=label_pair, default=[],
                   metavar="KEY=VALUE",
                   help="watch only containers with this label (repeatable: all of them); the "
                   "others are skipped and counted as not selected (canaries; several agents "
                   "on one host playing separate nodes)")
    add_budget_flag(p)
    p.add_argument("--known-entries", type=_non_negative_int, default=AgentOptions.known_entries,
                   metavar="N",
                   help="the baseline in the kernel: up to N (container, connect or write) "
                   "identities an image's baseline holds are counted in the kernel instead of "
                   "sent, once the image is out of learning (0: off; default %(default)s)")
    add_runtime_flags(p)
    add_collector_flags(p)
    p.set_defaults(func=_run_agent)


def _run_agent(args: argparse.Namespace) -> int:
    return run_agent(options_from_args(args), stop_on_signals(), stdout=sys.stdout,
                     stderr=sys.stderr)


def run_local_baseline(args: argparse.Namespace) -> int:
    """`driftwarden baseline --state-dir DIR OP ...` (the command line's `baseline` parser,
    driftwarden.cli.baseline): through the running agent's control socket, else on the
    files."""
    import json

    from driftwarden.agent.control import request

    payload = {k: v for k, v in vars(args).items()
               if k in ("op", "image", "mode", "reason", "file", "image_id", "force", "a", "b",
                        "alert_id")
               and v is not None}
    if args.op in ("mode", "import"):
        payload["who"] = os.environ.get("SUDO_USER") or os.environ.get("USER") or "operator"
    if "file" in payload:  # a running agent has its own working directory
        payload["file"] = os.path.abspath(payload["file"])
    result = request(args.state_dir, payload)
    if args.json or args.op in ("show", "diff"):
        print(json.dumps(result, indent=2, sort_keys=True))
    elif args.op == "list":
        print(f"{'IMAGE':<40} {'MODE':<8} {'VERSION':>7} {'ITEMS':>6} {'WINDOWS':>7}  ID")
        for row in result:
            flag = " (unstable)" if row["unstable"] else ""
            print(f"{row['image']:<40} {row['mode']:<8} {row['version']:>7} {row['items']:>6} "
                  f"{row['windows']:>7}  {row['image_id'][:19]}{flag}")
    else:
        print(json.dumps(result, sort_keys=True))
    return 0


def _add_learn(subparsers: argparse._SubParsersAction) -> None:
    from driftwarden.agent.learn import CONTAINER_ENV, NETWORKS

    p = subparsers.add_parser(
        "learn",
        help="learn an image's baseline while a command exercises it (CI)",
        description="Start a container of IMAGE with Docker under a learning agent, run CMD on "
        "this host while it learns (its tests, a load script; $" + CONTAINER_ENV + " names "
        "the container), and write the baseline file for `driftwarden baseline push FILE "
        "--collector ADDR` (or `baseline import`). CMD's exit ends learning unless --for is "
        "longer; a failing CMD fails learn with its exit code and writes nothing.",
        usage="%(prog)s IMAGE [--for SECONDS] [--out FILE] [--network {none,host}] -- CMD ...")
    p.add_argument("image", metavar="IMAGE", help="the image (name[:tag] or id) Docker has")
    p.add_argument("--for", dest="learn_for", type=POSITIVE_SECONDS, default=None,
                   metavar="SECONDS", help="learn at least this long after the container "
                   "started (default: until CMD exits)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="where the baseline goes (default ./<image>.baseline)")
    p.add_argument("--network", choices=NETWORKS, default="none",
                   help="the container's network: none (its own loopback only; default) or "
                   "host (the host's, loopback included)")
    p.add_argument("--window", type=POSITIVE_SECONDS, default=10.0, metavar="SECONDS",
                   help="feature window length (default 10, as the agent's)")
    p.add_argument("--startup-grace", type=NON_NEGATIVE_SECONDS, default=10.0,
                   metavar="SECONDS",
                   help="the container's first seconds stay out of the windows, as on the "
                   "agent (default 10; 0 learns windows from the start)")
    p.add_argument("--docker-host", default=None, metavar="URL",
                   help="the Docker Engine API (default unix:///var/run/docker.sock)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD",
                   help="after --: what exercises the image, run on this host")
    p.set_defaults(func=_run_learn, learn_parser=p)


def _run_learn(args: argparse.Namespace) -> int:
    from driftwarden.agent.learn import LearnOptions, run_learn

    command = list(args.cmd)
    if command and command[0].startswith("-") and "--" in command:
        # flags after IMAGE: argparse left them to CMD; they are learn's up to the first --
        split = command.index("--")
        args = args.learn_parser.parse_args([*command[:split], args.image])
        command = command[split + 1:]
    options = LearnOptions(image=args.image, command=tuple(command),
                           learn_for=args.learn_for, out=args.out, network=args.network,
                           window=args.window, docker_host=args.docker_host,
                           startup_grace=args.startup_grace)
    return run_learn(options, stop_on_signals(), stderr=sys.stderr)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """The agent's commands: trace, agent, learn and doctor (`baseline`, whose local form is
    :func:`run_local_baseline`, is parsed by driftwarden.cli.baseline)."""
    from driftwarden.agent import doctor

    _add_trace(subparsers)
    _add_agent(subparsers)
    _add_learn(subparsers)
    doctor.add_parser(subparsers)
