"""Operator commands: `driftwarden alerts`, `action`, `agents` and `certs init`.

The first three are clients of the collector's operator API (driftwarden.v1 Alerts, Actions,
Agents; `agents --baselines` also Baselines); `certs init` makes the certificates for mutual
TLS (:func:`driftwarden.ops.certs.init_certs`). `baseline --collector` is in
:mod:`driftwarden.ops.baselines`.
:func:`add_parsers` registers them all; each command's ``func(args)`` returns the exit code.

Client flags (every client command): :mod:`driftwarden.ops.client` (``--collector``,
    ``--token-file``, ``--tls-*``, ``--allow-non-loopback``) and :func:`operator_channel` there.

Output (one table engine, :mod:`driftwarden.ops.tables`, for both kinds of table)
    On a terminal (stdout a TTY, not ``--json`` or ``--plain``, TERM not ``dumb``): rich tables
    fitted to its width: ``alerts`` and ``agents`` print one; ``alerts --follow`` keeps a live
    table (:mod:`driftwarden.ops.live`) of the newest alerts, actions, overflow notices and
    connection events, bounded to the terminal's height, the reason in whatever width is left,
    with a status line, redrawn at most 4 times a second from a thread of its own so a slow
    terminal never holds up the stream. ``NO_COLOR`` turns colours off.

    Otherwise (a pipe or a file, or ``--plain``), plain lines that are never cut: the same
    columns (alerts: TIME KIND SEV CONTAINER IMAGE NODE COUNT REASON; UTC times), two or more
    spaces apart, aligned by the widest cell (``--follow``: by each column's usual width, a
    longer cell pushing its line right), an empty cell as ``-``, the last column whole to the
    end of the line; an action or an overflow notice is a row of KIND ``action`` or ``notice``.
    With ``--json``: one object per line (an alert as the agent writes it, ``{"action":
    {...}}``, ``{"notice": {...}}``; :mod:`driftwarden.ops.format`). Lines about the
    connection start with ``--`` (on stderr with ``--json``). Every line is flushed as
    written. Texts from the collector are printed with control characters replaced by ``?``
    (a container name must not drive the terminal), in every output; JSON escapes them.

Exit codes: 0 success; 1 a failed call or action (the reason is one line on stderr, or the
action's outcome on stdout); 2 bad input (:class:`UsageError`, printed by the CLI; also a request
the collector refused as INVALID_ARGUMENT).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TextIO

import grpc
from driftwarden.core import wire
from driftwarden.core.argtypes import POSITIVE_INT
from driftwarden.core.errors import UsageError
from driftwarden.ops.baselines import list_baselines
from driftwarden.ops.client import (
    add_client_flags,
    collector_address,
    operator_channel,
    report_rpc_error,
)
from driftwarden.ops.follow import Follower, stop_event
from driftwarden.ops.format import action_outcome_line, agent_dict, enum_text
from driftwarden.ops.listing import CALL_TIMEOUT, list_actions, list_alerts, oldest_first
from driftwarden.ops.printers import (
    LivePrinter,
    PlainPrinter,
    Printer,
    add_output_flags,
    print_table,
    rich_console,
)
from driftwarden.ops.tables import (
    AGENTS,
    ALERTS,
    HELD_BASELINES,
    action_row,
    agent_row,
    alert_row,
    held_baseline_row,
    layout,
)
from driftwarden.proto.v1 import (
    actions_pb2,
    actions_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    alerts_pb2,
    alerts_pb2_grpc,
    baselines_pb2,
    baselines_pb2_grpc,
    common_pb2,
)

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 50
ACTION_TIMEOUT = 30.0  # the collector itself waits up to 10 s for the agent's result

_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DONE = (wire.ACTION_STATUS.to_proto("done"), wire.ACTION_STATUS.to_proto("already"))


# -- pure helpers --------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """``"30s"``, ``"10m"``, ``"2h"``, ``"1d"``, ``"1w"``, ``"1h30m"``, ``"1.5h"`` -> seconds."""
    cleaned = text.strip().lower()
    if not _DURATION.fullmatch(cleaned):
        raise UsageError(f"{text!r} is not a duration: use a number with a unit s, m, h, d or w "
                         f"(30s, 10m, 2h, 1h30m)")
    return float(sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(cleaned)))


def parse_since(text: str, now: float) -> float:
    """``--since``: a duration back from `now` (``10m``) or an ISO 8601 time
    (``2024-05-01T12:00:00Z``; without a zone: this machine's local time) -> epoch seconds."""
    cleaned = text.strip()
    if cleaned[:1].isdigit() and _DURATION.fullmatch(cleaned.lower()):
        return now - parse_duration(cleaned)
    try:
        when = datetime.fromisoformat(cleaned)
    except ValueError:
        raise UsageError(f"--since {text!r}: expected a duration like 30s, 10m, 2h, 1d (or "
                         f"1h30m) or an ISO time like 2024-05-01T12:00:00Z") from None
    seconds = when.timestamp()  # a naive time is local time
    if seconds > now:
        raise UsageError(f"--since {text!r} is in the future; give a past time or a duration")
    return seconds


# -- alerts --------------------------------------------------------------------------------------


def _kind_list(text: str) -> list[str]:
    kinds = [k.strip().lower() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in wire.ALERT_KIND.texts]
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown alert kind(s) {','.join(unknown) or '(empty)'}; choose from "
            f"{','.join(wire.ALERT_KIND.texts)}")
    return kinds


def alert_filter(args: argparse.Namespace) -> alerts_pb2.AlertFilter:
    """The server-side filter the `alerts` flags ask for."""
    kinds: list[str] = []
    for group in args.kind or ():
        kinds += [k for k in group if k not in kinds]
    severity = (wire.SEVERITY.to_proto(args.min_severity) if args.min_severity
                else common_pb2.SEVERITY_UNSPECIFIED)
    return alerts_pb2.AlertFilter(
        kinds=[wire.ALERT_KIND.to_proto(k) for k in kinds], min_severity=severity,
        nodes=args.node, namespaces=args.namespace, images=args.image,
        containers=args.container, exclude_images=args.exclude_image,
        exclude_namespaces=args.exclude_namespace, exclude_containers=args.exclude_container)


def run_alerts(args: argparse.Namespace, *, out: TextIO | None = None,
               err: TextIO | None = None, clock: Callable[[], float] = time.time,
               stop: threading.Event | None = None) -> int:
    """`driftwarden alerts`: list stored alerts, or follow the live stream (``--follow``)."""
    out = out or sys.stdout
    err = err or sys.stderr
    since = parse_since(args.since, clock()) if args.since else None
    request_filter = alert_filter(args)
    console = rich_console(args, out)
    with operator_channel(args) as channel:
        if args.follow:
            printer: Printer
            if console is not None:
                printer = LivePrinter(console, collector_address(args), clock)
            else:  # rows unknown yet: each column at its usual width, nothing cut
                printer = PlainPrinter(out, err, json_lines=args.json,
                                       widths=layout(ALERTS, None))
            with stop_event(stop) as halt:
                return Follower(args, channel, request_filter, printer, err, halt,
                                clock).run(since)
        try:
            alerts = list_alerts(alerts_pb2_grpc.AlertsStub(channel), request_filter, since,
                                 args.limit)
            actions = (list_actions(actions_pb2_grpc.ActionsStub(channel), args.node,
                                    args.container, since, args.limit) if args.actions else [])
        except grpc.RpcError as exc:
            return report_rpc_error(exc, args, err)
    if not alerts and not actions:
        if not args.json:
            print("no alerts", file=out, flush=True)
        return 0
    items = oldest_first(alerts, actions)
    if args.json:
        printer = PlainPrinter(out, err, json_lines=True, widths={})
        for item in items:
            if isinstance(item, common_pb2.Alert):
                printer.alert(item)
            else:
                printer.action(item)
        return 0
    rows = [alert_row(item) if isinstance(item, common_pb2.Alert) else action_row(item)
            for item in items]
    print_table(ALERTS, rows, console, out)
    return 0


# -- action --------------------------------------------------------------------------------------


def operator_name() -> str:
    """Who asks, for the audit trail: the user behind sudo, else the login user."""
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or "operator"


def run_action(args: argparse.Namespace, *, out: TextIO | None = None,
               err: TextIO | None = None) -> int:
    """`driftwarden action TYPE CONTAINER`: 0 when done or already so, else 1."""
    out = out or sys.stdout
    err = err or sys.stderr
    if args.with_pause and args.type != "quarantine":
        raise UsageError(f"--with-pause goes with quarantine only, not {args.type}")
    if not args.container.strip():
        raise UsageError("CONTAINER is empty: give a container name, id or id prefix")
    request = actions_pb2.ActionRequest(
        container=args.container, type=wire.ACTION_TYPE.to_proto(args.type),
        reason=args.reason or "", with_pause=args.with_pause, requested_by=operator_name(),
        node=args.node or "")
    with operator_channel(args) as channel:
        try:
            response = actions_pb2_grpc.ActionsStub(channel).Request(request,
                                                                     timeout=ACTION_TIMEOUT)
        except grpc.RpcError as exc:
            return report_rpc_error(exc, args, err, container=args.container)
    print(action_outcome_line(args.type, args.container, response), file=out, flush=True)
    return 0 if response.status in _DONE else 1


# -- agents --------------------------------------------------------------------------------------


def run_agents(args: argparse.Namespace, *, out: TextIO | None = None,
               err: TextIO | None = None, clock: Callable[[], float] = time.time) -> int:
    """`driftwarden agents`: every agent the collector knows, by node name; with
    ``--baselines`` the fleet baselines each holds beside the collector's versions."""
    out = out or sys.stdout
    err = err or sys.stderr
    with operator_channel(args) as channel:
        try:
            response = agent_pb2_grpc.AgentsStub(channel).List(agent_pb2.ListAgentsRequest(),
                                                               timeout=CALL_TIMEOUT)
            fleet = (list_baselines(baselines_pb2_grpc.BaselinesStub(channel))
                     if args.baselines else [])
        except grpc.RpcError as exc:
            return report_rpc_error(exc, args, err)
    agents = sorted(response.agents, key=lambda a: a.node)
    if args.baselines:
        return _print_held_baselines(args, agents, fleet, out)
    if args.json:
        for agent in agents:
            print(json.dumps(agent_dict(agent)), file=out, flush=True)
        return 0
    if not agents:
        print("no agents have connected to this collector", file=out, flush=True)
        return 0
    now = clock()
    print_table(AGENTS, [agent_row(a, now) for a in agents], rich_console(args, out), out)
    return 0


def _print_held_baselines(args: argparse.Namespace, agents: list[agent_pb2.Agent],
                          fleet: list[baselines_pb2.BaselineSummary], out: TextIO) -> int:
    """`agents --baselines`: one row per node and image it holds, by node then image."""
    by_key = {s.image_key: s for s in fleet}
    held = [(agent.node, version, by_key.get(version.image_key))
            for agent in agents
            for version in sorted(agent.baselines, key=lambda v: (
                by_key[v.image_key].image_name if v.image_key in by_key else "", v.image_key))]
    if args.json:
        for node, version, summary in held:
            print(json.dumps({"node": node, "image_key": version.image_key,
                              "image_name": summary.image_name if summary else None,
                              "mode": enum_text(wire.MODE, version.mode),
                              "version": version.version,
                              "fleet_version": summary.version if summary else None}),
                  file=out, flush=True)
        return 0
    if not held:
        print("no agent holds a fleet baseline", file=out, flush=True)
        return 0
    print_table(HELD_BASELINES, [held_baseline_row(*row) for row in held],
                rich_console(args, out), out)
    return 0


# -- certs ---------------------------------------------------------------------------------------


def _node_list(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def run_certs(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """`driftwarden certs init DIR`: make the certificates and say how to use them."""
    from driftwarden.ops.certs import init_certs, parse_collector_names

    out = out or sys.stdout
    nodes = args.nodes if args.nodes is not None else [socket.gethostname()]
    names = (parse_collector_names(args.collector_names)
             if getattr(args, "collector_names", None) is not None else ())
    bundle = init_certs(Path(args.directory).absolute(), nodes, days=args.days,
                        force=args.force, collector_names=names)
    d = bundle.directory
    lines = [f"created certificates in {d} (valid {args.days} days):",
             "  ca.crt ca.key                  the CA (keep ca.key off the nodes)",
             "  collector.crt collector.key    the collector's server certificate",
             "  operator.crt operator.key      the operators' client certificate",
             "  operator.token                 the operators' bearer token"]
    lines += [f"  agents/{n}.crt agents/{n}.key  node {n}'s agent certificate"
              for n in bundle.agents]
    tls = f"--tls-ca {bundle.ca_cert}"
    lines += ["use them with:",
              f"  driftwarden collector --tls-client-ca {bundle.ca_cert} "
              f"--tls-cert {bundle.collector.cert} "
              f"--tls-key {bundle.collector.key} --token-file {bundle.operator_token}"]
    lines += [f"  driftwarden agent --node {n} {tls} --tls-cert {pair.cert} --tls-key {pair.key}"
              for n, pair in bundle.agents.items()]
    lines += [f"  driftwarden alerts|action|agents {tls} --tls-cert {bundle.operator.cert} "
              f"--tls-key {bundle.operator.key} --token-file {bundle.operator_token}"]
    if not bundle.agents:
        lines.append("no agent certificates were made: add --nodes n1,n2 (with --force)")
    for line in lines:
        print(line, file=out, flush=True)
    return 0


# -- registration --------------------------------------------------------------------------------


def _add_alerts(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "alerts", help="list stored alerts, or follow new ones live",
        description="List the collector's stored alerts (newest last), or with --follow show "
        "alerts as they arrive until Ctrl-C (on a terminal: a live table). Filters apply on "
        "the collector. Piped, redirected or with --plain, every alert is one line, never "
        "cut: TIME KIND SEV CONTAINER IMAGE NODE COUNT REASON, two or more spaces apart, an "
        "empty cell as -, REASON last and whole to the end of the line (awk '{print $4}' is "
        "the container); actions and overflow notices are lines of KIND action and notice, "
        "lines about the connection start with --.")
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream new alerts (with --since: the stored ones first)")
    add_output_flags(p)
    p.add_argument("--kind", type=_kind_list, action="append", default=[], metavar="LIST",
                   help=f"only these kinds: comma list of {','.join(wire.ALERT_KIND.texts)}")
    p.add_argument("--min-severity", choices=wire.SEVERITY.texts, default=None,
                   help="only alerts at least this severe")
    for flag, what in (("node", "node"), ("namespace", "Kubernetes namespace"),
                       ("image", "image (name[:tag], repository or id)"),
                       ("container", "container (name or id prefix)")):
        p.add_argument(f"--{flag}", action="append", default=[], metavar=flag.upper(),
                       help=f"only this {what}; repeatable")
    for flag, what in (("image", "image"), ("namespace", "namespace"),
                       ("container", "container")):
        p.add_argument(f"--exclude-{flag}", action="append", default=[], metavar=flag.upper(),
                       help=f"leave out this {what}; repeatable")
    p.add_argument("--since", default=None, metavar="WHEN",
                   help="alerts since a duration ago (30s, 10m, 2h, 1d) or an ISO time")
    p.add_argument("--limit", type=POSITIVE_INT, default=DEFAULT_LIMIT, metavar="N",
                   help=f"at most N stored alerts (default {DEFAULT_LIMIT})")
    p.add_argument("--actions", action="store_true",
                   help="also show actions taken, skipped or failed on the containers")
    add_client_flags(p)
    p.set_defaults(func=run_alerts)


def _add_action(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "action", help="pause, resume, kill, quarantine or release a container",
        description="Ask the collector to have the container's agent act on it; prints the "
        "outcome. Exit 0 when done (or already so), 1 otherwise.")
    p.add_argument("type", choices=wire.ACTION_TYPE.texts, metavar="ACTION",
                   help=" | ".join(wire.ACTION_TYPE.texts))
    p.add_argument("container", metavar="CONTAINER",
                   help="container name, id, or a unique id prefix (>= 4 characters)")
    p.add_argument("--reason", default=None, metavar="TEXT", help="why, for the audit trail")
    p.add_argument("--with-pause", action="store_true",
                   help="quarantine only: also pause the container")
    p.add_argument("--node", default=None, metavar="NODE",
                   help="look for the container on this node only")
    add_client_flags(p)
    p.set_defaults(func=run_action)


def _add_agents(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "agents", help="the agents the collector knows",
        description="Every agent that connected since the collector started: connection, "
        "version, mode, containers watched, fleet baselines held, spool depth, dropped events, "
        "last heartbeat. With --baselines: each node's baselines (NODE KEY MODE VERSION FLEET "
        "IMAGE), its version beside the collector's (FLEET) so a node that lags shows.")
    p.add_argument("--baselines", action="store_true",
                   help="list the baseline versions each node holds")
    add_output_flags(p)
    add_client_flags(p)
    p.set_defaults(func=run_agents)


def _add_certs(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "certs", help="make certificates for mutual TLS",
        description="Make a private CA and the certificates of the collector, the agents and "
        "the operators (with openssl).")
    ops = p.add_subparsers(dest="certs_op", metavar="OP", parser_class=type(p))
    ops.required = True
    init = ops.add_parser("init", help="make the CA and every certificate in DIR")
    init.add_argument("directory", metavar="DIR", help="where to write them (new or empty)")
    init.add_argument("--nodes", type=_node_list, default=None, metavar="LIST",
                      help="comma list of node names to make agent certificates for "
                      "(default: this host's name)")
    init.add_argument("--days", type=POSITIVE_INT, default=365, metavar="N",
                      help="validity in days (default 365)")
    init.add_argument("--force", action="store_true",
                      help="replace the certificates in a non-empty DIR")
    init.add_argument("--collector-names", default=None, metavar="LIST",
                      help="extra DNS names or IP addresses agents and operators reach the "
                      "collector by, comma list (e.g. driftwarden-collector.driftwarden.svc); "
                      "localhost, 127.0.0.1 and ::1 are always in its certificate")
    init.set_defaults(func=run_certs)


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register `alerts`, `action`, `agents` and `certs` on the CLI's subparsers."""
    _add_alerts(subparsers)
    _add_action(subparsers)
    _add_agents(subparsers)
    _add_certs(subparsers)


__all__ = [
    "DEFAULT_LIMIT",
    "add_parsers",
    "alert_filter",
    "operator_name",
    "parse_duration",
    "parse_since",
    "run_action",
    "run_agents",
    "run_alerts",
    "run_certs",
]
