"""`driftwarden trace`: wires a capture source, attribution and output for a person to watch."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import TextIO

from driftwarden.agent.flood import container_rows, format_container_rows
from driftwarden.agent.output import HumanSink, JsonSink, format_summary
from driftwarden.agent.pipeline import (
    USER_KINDS,
    ReplayAttribution,
    ReplayProcReader,
    TraceFilter,
    TracePipeline,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TraceOptions:
    json: bool = False
    summary_only: bool = False
    containers: tuple[str, ...] = ()
    kinds: frozenset[str] | None = None
    duration: float | None = None
    include_host: bool = False
    show_runtime: bool = False
    record: str | None = None
    replay: str | None = None
    dedup_interval_ns: int = 1_000_000_000
    ringbuf_pages: int = 1024
    print_bpf: bool = False
    open_result: bool = False
    docker_host: str | None = None  # one more endpoint, for the Docker Engine API
    # CRI or Docker sockets (unix:///path); none given: the usual sockets that exist
    runtime_endpoints: tuple[str, ...] = ()
    cgroup_root: str = ""
    # (kind, probes.loader.Budget) pairs: the kernel's per-container budgets (--budget)
    budgets: tuple = ()


def _probe_config(options: TraceOptions):
    from driftwarden.probes.loader import SELECTABLE_KINDS, ProbeConfig

    kinds = options.kinds or frozenset(USER_KINDS)
    return ProbeConfig(
        kinds=frozenset(k for k in kinds if k in SELECTABLE_KINDS),
        include_host=options.include_host,
        dedup_interval_ns=options.dedup_interval_ns,
        ringbuf_pages=options.ringbuf_pages,
        cgroup_root=options.cgroup_root,
        open_result=options.open_result,
        budgets=options.budgets,
    )


def run_trace(options: TraceOptions, stop: threading.Event, *, stdout: TextIO,
              stderr: TextIO) -> int:
    if options.print_bpf:
        from driftwarden.probes.loader import bpf_text

        stdout.write(bpf_text(_probe_config(options)))
        return 0
    trace_filter = TraceFilter(
        kinds=options.kinds or frozenset(USER_KINDS),
        containers=options.containers,
        include_host=options.include_host,
        show_runtime_setup=options.show_runtime,
    )
    if options.replay:
        return _replay(options, trace_filter, stop, stdout, stderr)
    return _live(options, trace_filter, stop, stdout, stderr)


def _sinks(options: TraceOptions, stdout: TextIO, clock_offset_ns: int):
    if options.summary_only:
        return []
    if options.json:
        return [JsonSink(stdout, clock_offset_ns)]
    return [HumanSink(stdout, clock_offset_ns)]


def _print_summary(options: TraceOptions, summary, stderr: TextIO, containers=None,
                   evicted: int = 0) -> None:
    """The summary; live, with `containers` (agent.flood.container_rows): what the kernel's
    budgets held back and the ring buffer lost, per container."""
    if options.json:
        data = summary.to_dict()
        if containers is not None:
            data["containers"] = containers
            data["budget_entries_evicted"] = evicted
        stderr.write(json.dumps({"summary": data}) + "\n")
    else:
        lines = [format_summary(summary), *format_container_rows(containers or [], evicted)]
        stderr.write("\n".join(lines) + "\n")


def _replay(options, trace_filter, stop, stdout, stderr) -> int:
    from driftwarden.probes.capture import ReplayCapture

    source = ReplayCapture(options.replay)
    pipeline = TracePipeline(
        source,
        proc=ReplayProcReader(source.facts),
        attribution=ReplayAttribution(source.facts),
        sinks=_sinks(options, stdout, source.clock_offset_ns),
        trace_filter=trace_filter,
        pending_timeout=0.0,  # a recording holds final answers: nothing to wait for
    )
    summary = pipeline.run(duration=options.duration, should_stop=stop.is_set, poll_interval=0)
    _print_summary(options, summary, stderr)
    return 0


def _live(options, trace_filter, stop, stdout, stderr) -> int:
    from driftwarden.agent.attribution_view import LiveAttribution
    from driftwarden.agent.procfs import LiveProcReader
    from driftwarden.agent.runtimes.registry import resolve_endpoints
    from driftwarden.probes.capture import CaptureWriter, LiveCapture
    from driftwarden.probes.loader import ProbeSet, find_cgroup2_root

    config = _probe_config(options)
    cgroup_root = options.cgroup_root or str(find_cgroup2_root())
    endpoints = resolve_endpoints(options.runtime_endpoints, options.docker_host)
    with LiveAttribution(cgroup_root, endpoints) as attribution:
        for selector in options.containers:
            attribution.check_selector(selector)  # raises UsageError for an unknown container
        with ProbeSet(config) as probes:
            source = LiveCapture(probes)
            recorder = None
            if options.record:
                recorder = CaptureWriter(options.record, config.limits, source.clock_offset_ns)
            pipeline = TracePipeline(
                source,
                proc=LiveProcReader("/proc", cgroup_root),
                attribution=attribution,
                sinks=_sinks(options, stdout, source.clock_offset_ns),
                trace_filter=trace_filter,
                recorder=recorder,
            )
            stderr.write("driftwarden: tracing; Ctrl-C to stop\n")
            stderr.flush()
            summary = pipeline.run(duration=options.duration, should_stop=stop.is_set)
            usage = probes.budget_usage()
            containers = container_rows(usage, attribution.lookup)
    _print_summary(options, summary, stderr, containers, usage.evicted)
    return 0

