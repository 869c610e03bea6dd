"""Operator commands: `driftwarden alerts`, `action`, `agents` and `certs init`.

The first three are clients of the collector's operator API (driftwarden.v1 Alerts, Actions,
Agents); `certs init` makes the certificates for mutual TLS
(:func:`driftwarden.core.certs.init_certs`).
:func:`add_parsers` registers them all; each command's ``func(args)`` returns the exit code.

Client flags (every client command)
    ``--collector ADDR`` (``host:port``, ``[::1]:port``; default ``$DRIFTWARDEN_COLLECTOR`` or
    ``127.0.0.1:50051``), ``--token-file F`` (sends ``authorization: Bearer <token>``),
    ``--tls-ca F [--tls-cert F --tls-key F]`` (TLS, with the operator's client certificate for
    mutual TLS), ``--allow-non-loopback`` (this build talks to loopback addresses only unless
    given). :func:`operator_channel` builds the channel from them.

Output
    On a terminal (stdout a TTY, not ``--json`` or ``--plain``, TERM not ``dumb``): rich tables
    (driftwarden.ops.tables): ``alerts`` and ``agents`` print one; ``alerts --follow`` keeps
    a live table of the newest alerts, actions, overflow notices and connection events, bounded
    to the terminal's height, with a status line, redrawn at most 4 times a second from a
    thread of its own so a slow terminal never holds up the stream. ``NO_COLOR`` turns colours
    off.

    Otherwise (a pipe or a file, or ``--plain``), ``alerts`` prints plain lines: a table (TIME
    KIND SEV CONTAINER IMAGE NODE REASON; UTC times; one line per alert, cut to the terminal
    width) or, with ``--json``, one ``wire.alert_dict_from_proto`` object per line; action
    events are ``{"action": {...}}`` lines and stream notices ``{"notice": {...}}``.
    In the table, action events and notices are lines of their own after the time:
    ``>> quarantine web-1: done (policy rule R)`` and ``!! 12 alerts dropped (slow reader)``.
    Lines about the connection start with ``--`` (on stderr with ``--json``). Every line is
    flushed as written. Texts from the collector are printed with control characters replaced
    by ``?`` (a container name must not drive the terminal), in every output.

Exit codes: 0 success; 1 a failed call or action (the reason is one line on stderr, or the
action's outcome on stdout); 2 bad input (:class:`UsageError`, printed by the CLI; also a request
the collector refused as INVALID_ARGUMENT).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import grpc
from driftwarden.core import wire
from driftwarden.core.argtypes import POSITIVE_INT
from driftwarden.core.errors import UsageError
from driftwarden.core.netaddr import host_port, is_loopback
from driftwarden.ops import tables as rich_table
from driftwarden.ops.tables import (
    action_target,
    action_time,
    alert_cells,
    clean_text,
    format_time,
    notice_text,
    requested_by_text,
)
from driftwarden.ops.tables import enum_text as _enum_text
from driftwarden.proto.v1 import (
    actions_pb2,
    actions_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    alerts_pb2,
    alerts_pb2_grpc,
    common_pb2,
)
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console

log = logging.getLogger(__name__)

COLLECTOR_ENV = "DRIFTWARDEN_COLLECTOR"
DEFAULT_PORT = 50051
DEFAULT_COLLECTOR = f"127.0.0.1:{DEFAULT_PORT}"
DEFAULT_LIMIT = 50
CALL_TIMEOUT = 20.0  # list calls
ACTION_TIMEOUT = 30.0  # the collector itself waits up to 10 s for the agent's result
FIRST_CONNECT_TIMEOUT = 10.0  # --follow: how long the first connection may take
RECONNECT_BACKOFF = (0.5, 10.0)  # --follow: first and longest wait between reconnect attempts
_POLL = 0.2  # how often waits look at the stop event

_DURATION = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DONE = (wire.ACTION_STATUS.to_proto("done"), wire.ACTION_STATUS.to_proto("already"))
_PENDING = wire.ACTION_STATUS.to_proto("pending")
_GAP = "  "
_MAX_PAGE = wire.DEFAULT_LIMITS.max_page_size


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


def split_collector_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:50051"``, ``"[::1]:50051"``, ``"localhost"`` -> ``(host, port)``."""
    text = address.strip()
    if "://" in text or text.startswith(("unix:", "dns:", "ipv4:", "ipv6:")):
        raise UsageError(f"collector address {address!r}: give host:port (e.g. "
                         f"{DEFAULT_COLLECTOR} or [::1]:{DEFAULT_PORT}), not a URI")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise UsageError(f"collector address {address!r}: expected [IPv6]:port")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:  # a bare host name, IPv4 or IPv6 address: the default port
        host, port_text = text, ""
    if not host:
        raise UsageError(f"collector address {address!r} has no host")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"collector address {address!r}: port {port_text!r} is not 1-65535")
    return host, int(port_text)


def collector_target(address: str, *, allow_non_loopback: bool = False) -> str:
    """The gRPC target for `address`; UsageError for a non-loopback host unless allowed."""
    host, port = split_collector_address(address)
    if not allow_non_loopback and not is_loopback(host):
        raise UsageError(f"collector address {address!r} is not a loopback address: this build "
                         f"talks only to 127.0.0.0/8, ::1 or localhost (pass "
                         f"--allow-non-loopback for a real deployment)")
    return host_port(host, port)


def describe_rpc_error(code: grpc.StatusCode, details: str, *, collector: str,
                       container: str | None = None, tls: bool = False) -> tuple[str, int]:
    """A failed call -> (one line saying what went wrong and what to do, exit code)."""
    said = f" ({details})" if details else ""
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = ("check that --tls-ca, --tls-cert and --tls-key belong to its CA" if tls
                else "if it runs with TLS, pass --tls-ca, --tls-cert and --tls-key")
        return (f"collector not reachable at {collector} — is `driftwarden collector` running? "
                f"({hint})"), 1
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (f"the collector at {collector} refused our credentials{said}: check --token-file "
                f"(or the operator certificate given with --tls-cert/--tls-key)"), 1
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return (f"the collector at {collector} does not allow this call{said}: use the operator "
                f"certificate (OU=operator) or the operator token"), 1
    if code == grpc.StatusCode.NOT_FOUND and container is not None:
        return (f"no container matches {container!r}{said}: give its name, full id or an id "
                f"prefix of at least 4 characters"), 1
    if code == grpc.StatusCode.FAILED_PRECONDITION and container is not None:
        return (f"container {container!r} is ambiguous{said}: give more of its id, or --node"), 1
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"the collector refused the request{said}", 2
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the collector at {collector} did not answer in time{said}", 1
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (f"the collector at {collector} does not serve this call{said}: is it another "
                f"driftwarden version?"), 1
    return f"the call to the collector at {collector} failed: {code.name}{said}", 1


def format_age(seconds: float) -> str:
    """Seconds since something -> ``"4s ago"``, ``"12m ago"``, ``"3h ago"``, ``"2d ago"``."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _fit(text: str, width: int) -> str:
    """`text` cut to `width` characters, the cut marked with ``...``."""
    if len(text) <= width:
        return text
    return text[:width - 3] + "..." if width > 3 else text[:width]


# -- tables --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    max_width: int | None  # None: the rest of the line
    right: bool = False


def _widths(columns: Sequence[Column], rows: Sequence[Sequence[str]] | None) -> list[int]:
    """Each column's width: its cap, or with `rows` the widest cell (header included) up to it."""
    out = []
    for i, col in enumerate(columns):
        if rows is None:
            out.append(col.max_width or len(col.name))
            continue
        natural = max([len(col.name), *(len(r[i]) for r in rows)])
        out.append(min(natural, col.max_width) if col.max_width else natural)
    return out


def _row(columns: Sequence[Column], widths: Sequence[int], cells: Sequence[str]) -> str:
    parts = []
    for i, (col, width, cell) in enumerate(zip(columns, widths, cells, strict=True)):
        text = _fit(cell, width)
        if i == len(columns) - 1 and not col.right:
            parts.append(text)
        else:
            parts.append(text.rjust(width) if col.right else text.ljust(width))
    return _GAP.join(parts).rstrip()


ALERT_COLUMNS = (Column("TIME", 20), Column("KIND", 7), Column("SEV", 8),
                 Column("CONTAINER", 18), Column("IMAGE", 24), Column("NODE", 12),
                 Column("REASON", None))


class AlertTable:
    """The alert table's lines for a terminal `width`. ``fit_rows``: size the middle columns to
    these rows (a listing); None: fixed widths (a live view, rows unknown in advance)."""

    def __init__(self, width: int, fit_rows: Sequence[Sequence[str]] | None = None) -> None:
        self.width = max(width, 20)
        self.widths = _widths(ALERT_COLUMNS, fit_rows)
        used = sum(self.widths[:-1]) + len(_GAP) * (len(ALERT_COLUMNS) - 1)
        self.widths[-1] = max(self.width - used, len("REASON"))

    def _line(self, cells: Sequence[str]) -> str:
        return _fit(_row(ALERT_COLUMNS, self.widths, cells), self.width)

    def header(self) -> str:
        return self._line([c.name for c in ALERT_COLUMNS])

    def alert(self, msg: common_pb2.Alert) -> str:
        return self._line(alert_cells(msg))

    def event(self, when: Timestamp | None, text: str) -> str:
        """A notice or action line: the time column, then `text` (never cut: it is rare and
        says what happened to a container)."""
        return format_time(when).ljust(self.widths[0]) + _GAP + text


def action_event_text(action: actions_pb2.Action) -> str:
    """``quarantine web-1: done (policy rule quarantine-protect-drift)``."""
    status = _enum_text(wire.ACTION_STATUS, action.status)
    text = f"{_enum_text(wire.ACTION_TYPE, action.type)} {action_target(action)}: {status}"
    if action.message:
        text += f": {action.message}"
    who = requested_by_text(action.requested_by)
    if who:
        text += f" ({who})"
    return clean_text(text)


def _timestamp_json(msg: Any, field: str) -> float | None:
    return wire.from_timestamp(getattr(msg, field)) if msg.HasField(field) else None


def action_dict(action: actions_pb2.Action) -> dict[str, Any]:
    return {"action_id": action.action_id, "type": _enum_text(wire.ACTION_TYPE, action.type),
            "status": _enum_text(wire.ACTION_STATUS, action.status), "message": action.message,
            "container_id": action.container_id, "container_name": action.container_name,
            "node": action.node, "reason": action.reason, "requested_by": action.requested_by,
            "with_pause": action.with_pause, "alert_id": action.alert_id,
            "requested_at": _timestamp_json(action, "requested_at"),
            "finished_at": _timestamp_json(action, "finished_at")}


def notice_dict(notice: alerts_pb2.StreamNotice) -> dict[str, Any]:
    return {"dropped": notice.dropped, "text": notice.text,
            "time": _timestamp_json(notice, "time")}


# -- the channel ---------------------------------------------------------------------------------


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call on the channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = [*(details.metadata or ()), self._header]
        return _CallDetails(details.method, details.timeout, metadata, details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


def collector_address(args: argparse.Namespace) -> str:
    return args.collector or os.environ.get(COLLECTOR_ENV) or DEFAULT_COLLECTOR


def _read_file(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def _read_token(path: str) -> str:
    token = _read_file(path, "--token-file").decode("utf-8", "replace").strip()
    if not token:
        raise UsageError(f"--token-file {path} is empty; it must hold the collector's operator "
                         f"token (driftwarden certs init writes one to operator.token)")
    if not token.isascii() or not token.isprintable() or " " in token:
        raise UsageError(f"--token-file {path}: the token must be one word of printable ASCII")
    return token


def _tls_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together (the operator certificate and "
                         "its key, e.g. operator.crt and operator.key from driftwarden certs init)")
    if args.tls_cert and not args.tls_ca:
        raise UsageError("--tls-cert needs --tls-ca (the CA that signed the collector's "
                         "certificate, ca.crt from driftwarden certs init)")
    if not args.tls_ca:
        return None
    key = _read_file(args.tls_key, "--tls-key") if args.tls_key else None
    cert = _read_file(args.tls_cert, "--tls-cert") if args.tls_cert else None
    return grpc.ssl_channel_credentials(root_certificates=_read_file(args.tls_ca, "--tls-ca"),
                                        private_key=key, certificate_chain=cert)


def operator_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the collector from the client flags (see the module docstring).

    UsageError for a non-loopback address (without --allow-non-loopback), unreadable files or
    an incomplete TLS flag set. The caller closes the channel (it is a context manager).
    """
    target = collector_target(collector_address(args),
                              allow_non_loopback=args.allow_non_loopback)
    credentials = _tls_credentials(args)
    token = _read_token(args.token_file) if args.token_file else None
    options = [("grpc.max_receive_message_length", wire.MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", wire.MAX_MESSAGE_BYTES),
               ("grpc.enable_http_proxy", 0),  # never route through a proxy from the env
               ("grpc.initial_reconnect_backoff_ms", int(RECONNECT_BACKOFF[0] * 1000)),
               ("grpc.max_reconnect_backoff_ms", int(RECONNECT_BACKOFF[1] * 1000))]
    if credentials is not None:
        channel = grpc.secure_channel(target, credentials, options)
    else:
        channel = grpc.insecure_channel(target, options)
    if token is not None:
        channel = grpc.intercept_channel(channel, _BearerToken(token))
    return channel


def _uses_tls(args: argparse.Namespace) -> bool:
    return bool(args.tls_ca)


def _report_rpc_error(exc: grpc.RpcError, args: argparse.Namespace, err: TextIO,
                      container: str | None = None) -> int:
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    log.debug("collector call failed: %s %s", code, details)
    line, exit_code = describe_rpc_error(code, clean_text(details or ""),
                                         collector=collector_address(args),
                                         container=container, tls=_uses_tls(args))
    print(f"driftwarden: error: {line}", file=err, flush=True)
    return exit_code


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


def _list_alerts(stub: alerts_pb2_grpc.AlertsStub, request_filter: alerts_pb2.AlertFilter,
                 since: float | None, limit: int) -> list[common_pb2.Alert]:
    """Up to `limit` stored alerts, newest first, page by page."""
    out: list[common_pb2.Alert] = []
    token = ""
    while len(out) < limit:
        request = alerts_pb2.ListAlertsRequest(
            filter=request_filter, page_size=min(limit - len(out), _MAX_PAGE), page_token=token)
        if since is not None:
            request.since.CopyFrom(wire.to_timestamp(since))
        response = stub.List(request, timeout=CALL_TIMEOUT)
        out += response.alerts
        token = response.next_page_token
        if not token:
            break
    return out[:limit]


def _list_actions(stub: actions_pb2_grpc.ActionsStub, args: argparse.Namespace,
                  since: float | None, limit: int) -> list[actions_pb2.Action]:
    out: list[actions_pb2.Action] = []
    token = ""
    while len(out) < limit:
        request = actions_pb2.ListActionsRequest(
            nodes=args.node, containers=args.container,
            page_size=min(limit - len(out), _MAX_PAGE), page_token=token)
        if since is not None:
            request.since.CopyFrom(wire.to_timestamp(since))
        response = stub.List(request, timeout=CALL_TIMEOUT)
        out += response.actions
        token = response.next_page_token
        if not token:
            break
    return out[:limit]


class _Printer:
    """Writes alerts, notices, actions and connection lines as a table or JSON lines."""

    def __init__(self, out: TextIO, err: TextIO, *, json_lines: bool, table: AlertTable) -> None:
        self.out = out
        self.err = err
        self.json_lines = json_lines
        self.table = table

    def _write(self, line: str, stream: TextIO | None = None) -> None:
        stream = stream or self.out
        stream.write(line + "\n")
        stream.flush()

    def start(self) -> None:
        if not self.json_lines:
            self._write(self.table.header())

    def finish(self) -> None:
        pass

    def alert(self, msg: common_pb2.Alert) -> None:
        if not self.json_lines:
            self._write(self.table.alert(msg))
            return
        try:
            data = wire.alert_dict_from_proto(msg)
        except wire.InvalidMessage as exc:
            self._write(f"-- skipped a malformed alert {clean_text(msg.id)!r} from the collector: "
                        f"{clean_text(str(exc))}", self.err)
            return
        self._write(json.dumps(data))

    def action(self, action: actions_pb2.Action) -> None:
        if self.json_lines:
            self._write(json.dumps({"action": action_dict(action)}))
        else:
            self._write(self.table.event(action_time(action), ">> " + action_event_text(action)))

    def notice(self, notice: alerts_pb2.StreamNotice) -> None:
        if self.json_lines:
            self._write(json.dumps({"notice": notice_dict(notice)}))
        else:
            when = notice.time if notice.HasField("time") else None
            self._write(self.table.event(when, "!! " + notice_text(notice)))

    def info(self, text: str, state: str | None = None) -> None:
        """A line about the connection: stdout in the table, stderr beside JSON lines."""
        self._write(f"-- {text}", self.err if self.json_lines else self.out)


class _LivePrinter:
    """``alerts --follow`` on a terminal: the same calls as :class:`_Printer`, drawn as a live
    table (driftwarden.ops.tables). Adding a row never waits for the terminal."""

    def __init__(self, console: Console, collector: str, clock: Callable[[], float]) -> None:
        self.view = rich_table.LiveAlertView(collector)
        self.display = rich_table.LiveDisplay(console, self.view)
        self.clock = clock

    def start(self) -> None:
        self.view.set_state("following")
        self.display.start()

    def finish(self) -> None:
        if self.view.state != "ended":
            self.view.set_state("stopped")
        self.display.stop()

    def alert(self, msg: common_pb2.Alert) -> None:
        self.view.add_alert(msg)

    def action(self, action: actions_pb2.Action) -> None:
        self.view.add_action(action)

    def notice(self, notice: alerts_pb2.StreamNotice) -> None:
        self.view.add_notice(notice)

    def info(self, text: str, state: str | None = None) -> None:
        self.view.add_info(self.clock(), text, state)


def _rich_console(args: argparse.Namespace, out: TextIO) -> Console | None:
    """A rich console when `out` is a terminal and neither --json nor --plain was given
    (TERM=dumb counts as no terminal); None: the plain output."""
    if args.json or args.plain or os.environ.get("TERM") == "dumb":
        return None
    isatty = getattr(out, "isatty", None)
    if isatty is None or not isatty():
        return None
    return rich_table.terminal_console(out, os.environ)


def run_alerts(args: argparse.Namespace, *, out: TextIO | None = None,
               err: TextIO | None = None, clock: Callable[[], float] = time.time,
               stop: threading.Event | None = None) -> int:
    """`driftwarden alerts`: list stored alerts, or follow the live stream (``--follow``)."""
    out = out or sys.stdout
    err = err or sys.stderr
    since = parse_since(args.since, clock()) if args.since else None
    request_filter = alert_filter(args)
    console = _rich_console(args, out)
    with operator_channel(args) as channel:
        if args.follow:
            printer: _Printer | _LivePrinter
            if console is not None:
                printer = _LivePrinter(console, collector_address(args), clock)
            else:
                printer = _Printer(out, err, json_lines=args.json,
                                   table=AlertTable(shutil.get_terminal_size().columns))
            with _stop_event(stop) as halt:
                return _Follower(args, channel, request_filter, printer, err, halt,
                                 clock).run(since)
        try:
            alerts = _list_alerts(alerts_pb2_grpc.AlertsStub(channel), request_filter, since,
                                  args.limit)
            actions = (_list_actions(actions_pb2_grpc.ActionsStub(channel), args, since,
                                     args.limit) if args.actions else [])
        except grpc.RpcError as exc:
            return _report_rpc_error(exc, args, err)
    if not alerts and not actions:
        if not args.json:
            print("no alerts", file=out, flush=True)
        return 0
    if console is not None:
        rows = [rich_table.alert_row(item) if isinstance(item, common_pb2.Alert)
                else rich_table.action_row(item) for _, _, item in _oldest_first(alerts, actions)]
        console.print(rich_table.alerts_table(rows, rich_table.column_widths(console.width,
                                                                             rows)))
        return 0
    table = AlertTable(shutil.get_terminal_size().columns, [alert_cells(a) for a in alerts])
    printer = _Printer(out, err, json_lines=args.json, table=table)
    printer.start()
    for _, _, item in _oldest_first(alerts, actions):
        if isinstance(item, common_pb2.Alert):
            printer.alert(item)
        else:
            printer.action(item)
    return 0


def _oldest_first(alerts: Sequence[common_pb2.Alert],
                  actions: Sequence[actions_pb2.Action]) -> list[tuple[int, int, Any]]:
    """Alerts and actions (each newest first from the collector) merged, oldest first."""
    items: list[tuple[int, int, Any]] = []
    for i, alert in enumerate(reversed(alerts)):
        items.append((alert.time.ToNanoseconds(), i, alert))
    for i, action in enumerate(reversed(actions)):
        when = action_time(action)
        items.append((when.ToNanoseconds() if when else 0, len(alerts) + i, action))
    items.sort(key=lambda item: (item[0], item[1]))
    return items


@contextlib.contextmanager
def _stop_event(given: threading.Event | None) -> Iterator[threading.Event]:
    """`given`, or an event Ctrl-C and SIGTERM set (handlers restored afterwards)."""
    if given is not None or threading.current_thread() is not threading.main_thread():
        yield given or threading.Event()
        return
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda _signum, _frame: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Follower:
    """``alerts --follow``: Alerts.Subscribe until stop or the stream ends, reconnecting with
    backoff when the collector goes away."""

    def __init__(self, args: argparse.Namespace, channel: grpc.Channel,
                 request_filter: alerts_pb2.AlertFilter, printer: _Printer | _LivePrinter,
                 err: TextIO, stop: threading.Event, clock: Callable[[], float]) -> None:
        self.args = args
        self.clock = clock
        self.channel = channel
        self.stub = alerts_pb2_grpc.AlertsStub(channel)
        self.request_filter = request_filter
        self.request = alerts_pb2.SubscribeRequest(filter=request_filter, include_notices=True,
                                                   include_actions=args.actions)
        self.printer = printer
        self.err = err
        self.stop = stop
        self.address = collector_address(args)
        self._lock = threading.Lock()
        self._call: Any = None
        self._done = threading.Event()

    def run(self, since: float | None) -> int:
        if not self._first_connect():
            if self.stop.is_set():
                return 0
            return _report_rpc_error(_UnreachableError(), self.args, self.err)
        watcher = threading.Thread(target=self._cancel_on_stop, name="alerts-follow-stop",
                                   daemon=True)
        watcher.start()
        try:
            return self._loop(since)
        finally:
            self._done.set()
            self._set_call(None)
            watcher.join()
            self.printer.finish()

    def _loop(self, since: float | None) -> int:
        self.printer.start()
        backlog = since is not None
        delay = RECONNECT_BACKOFF[0]
        while not self.stop.is_set():
            call = self.stub.Subscribe(self.request)
            self._set_call(call)
            if self.stop.is_set():  # stopped before the watcher could see this call
                call.cancel()
            try:
                shown = self._print_backlog(since) if backlog else set()
                backlog = False
                for event in call:
                    self._print_event(event, shown)
                    delay = RECONNECT_BACKOFF[0]
            except grpc.RpcError as exc:
                if self.stop.is_set():
                    return 0
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    self.printer.finish()  # the last frame first, then the error below it
                    return _report_rpc_error(exc, self.args, self.err)
                lost_at = self.clock()
                self.printer.info(f"lost the collector at {self.address}; reconnecting...",
                                  "reconnecting")
                if not self._reconnect(delay):
                    return 0
                delay = min(delay * 2, RECONNECT_BACKOFF[1])
                since_text = datetime.fromtimestamp(int(lost_at), UTC).strftime(
                    "%Y-%m-%dT%H:%M:%SZ")
                self.printer.info(f"reconnected to {self.address}; alerts stored meanwhile may "
                                  f"be missing here (driftwarden alerts --since {since_text})",
                                  "following")
                continue
            if self.stop.is_set():
                return 0
            self.printer.info("the collector ended the stream", "ended")
            return 0
        return 0

    def _print_backlog(self, since: float | None) -> set[tuple[str, int, int]]:
        """``--since`` with ``--follow``: the stored alerts first (the live stream is already
        open, so an alert in both is shown once)."""
        alerts = _list_alerts(self.stub, self.request_filter, since, self.args.limit)
        for alert in reversed(alerts):
            self.printer.alert(alert)
        return {_alert_key(a) for a in alerts}

    def _print_event(self, event: alerts_pb2.AlertEvent, shown: set[tuple[str, int, int]]) -> None:
        kind = event.WhichOneof("event")
        if kind == "alert":
            if _alert_key(event.alert) in shown:
                return
            self.printer.alert(event.alert)
        elif kind == "notice":
            self.printer.notice(event.notice)
        elif kind == "action":
            self.printer.action(event.action)

    def _set_call(self, call: Any) -> None:
        with self._lock:
            self._call = call

    def _cancel_on_stop(self) -> None:
        """Watcher thread: cancel the open call when stop is set (wakes the reading loop)."""
        while not self._done.is_set():
            if self.stop.wait(_POLL):
                with self._lock:
                    if self._call is not None:
                        self._call.cancel()
                return

    def _first_connect(self) -> bool:
        """Wait until the channel is up: True when ready, False when it fails (fast: a
        refused connection or TLS handshake) or takes too long."""
        states: list[grpc.ChannelConnectivity] = []
        changed = threading.Event()

        def note(state: grpc.ChannelConnectivity) -> None:
            states.append(state)
            changed.set()

        self.channel.subscribe(note, try_to_connect=True)
        try:
            deadline = time.monotonic() + FIRST_CONNECT_TIMEOUT
            while not self.stop.is_set() and time.monotonic() < deadline:
                changed.wait(_POLL)
                changed.clear()
                if grpc.ChannelConnectivity.READY in states:
                    return True
                if grpc.ChannelConnectivity.TRANSIENT_FAILURE in states or \
                        grpc.ChannelConnectivity.SHUTDOWN in states:
                    return False
            return False
        finally:
            self.channel.unsubscribe(note)

    def _reconnect(self, delay: float) -> bool:
        """Wait `delay`, then until the channel is ready again (gRPC retries the connection
        with backoff meanwhile); False when stopped first."""
        if self.stop.wait(delay):
            return False
        while not self.stop.is_set():
            ready = grpc.channel_ready_future(self.channel)
            try:
                ready.result(timeout=_POLL * 5)
                return True
            except grpc.FutureTimeoutError:
                ready.cancel()
        return False


def _alert_key(alert: common_pb2.Alert) -> tuple[str, int, int]:
    return alert.id, alert.count, alert.last_seen.ToNanoseconds()


class _UnreachableError(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return ""


# -- action --------------------------------------------------------------------------------------


def operator_name() -> str:
    """Who asks, for the audit trail: the user behind sudo, else the login user."""
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or "operator"


def action_outcome_line(action_type: str, asked_for: str,
                        response: actions_pb2.ActionResponse) -> str:
    """``quarantine web-1 (abc123def456) on node-a: done``."""
    short = response.container_id[:12]
    if not short or response.container_id.startswith(asked_for):
        target = short or asked_for
    else:
        target = f"{asked_for} ({short})"
    line = f"{action_type} {target}"
    if response.node:
        line += f" on {response.node}"
    line += f": {_enum_text(wire.ACTION_STATUS, response.status)}"
    if response.message:
        line += f": {response.message}"
    if response.status == _PENDING:
        line += (f" (action {response.action_id}: the agent has not answered yet; its result "
                 f"will show in `driftwarden alerts --actions`)")
    return clean_text(line)


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
            return _report_rpc_error(exc, args, err, container=args.container)
    print(action_outcome_line(args.type, args.container, response), file=out, flush=True)
    return 0 if response.status in _DONE else 1


# -- agents --------------------------------------------------------------------------------------


AGENT_COLUMNS = (Column("NODE", None), Column("CONNECTED", None), Column("VERSION", None),
                 Column("MODE", None), Column("CONTAINERS", None, right=True),
                 Column("SPOOL", None, right=True), Column("DROPPED", None, right=True),
                 Column("LAST HEARTBEAT", None))


def agent_cells(agent: agent_pb2.Agent, now: float) -> list[str]:
    heartbeat = (format_age(now - wire.from_timestamp(agent.last_heartbeat))
                 if agent.HasField("last_heartbeat") else "never")
    cells = [agent.node or "-", "yes" if agent.connected else "no", agent.agent_version or "-",
             _enum_text(wire.MODE, agent.mode), str(agent.containers_watched),
             str(agent.spool_depth), str(sum(c.dropped for c in agent.counters)), heartbeat]
    return [clean_text(c) for c in cells]


def agent_dict(agent: agent_pb2.Agent) -> dict[str, Any]:
    return {"node": agent.node, "connected": agent.connected,
            "agent_version": agent.agent_version, "mode": _enum_text(wire.MODE, agent.mode),
            "hostname": agent.hostname, "peer": agent.peer,
            "connected_at": _timestamp_json(agent, "connected_at"),
            "last_heartbeat": _timestamp_json(agent, "last_heartbeat"),
            "containers_watched": agent.containers_watched, "spool_depth": agent.spool_depth,
            "counters": [{"kind": c.kind, "emitted": c.emitted, "suppressed": c.suppressed,
                          "dropped": c.dropped} for c in agent.counters]}


def run_agents(args: argparse.Namespace, *, out: TextIO | None = None,
               err: TextIO | None = None, clock: Callable[[], float] = time.time) -> int:
    """`driftwarden agents`: every agent the collector knows, by node name."""
    out = out or sys.stdout
    err = err or sys.stderr
    with operator_channel(args) as channel:
        try:
            response = agent_pb2_grpc.AgentsStub(channel).List(agent_pb2.ListAgentsRequest(),
                                                               timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return _report_rpc_error(exc, args, err)
    agents = sorted(response.agents, key=lambda a: a.node)
    if args.json:
        for agent in agents:
            print(json.dumps(agent_dict(agent)), file=out, flush=True)
        return 0
    if not agents:
        print("no agents have connected to this collector", file=out, flush=True)
        return 0
    now = clock()
    rows = [agent_cells(a, now) for a in agents]
    console = _rich_console(args, out)
    if console is not None:
        console.print(rich_table.agents_table([(c.name, c.right) for c in AGENT_COLUMNS], rows))
        return 0
    widths = _widths(AGENT_COLUMNS, rows)
    for cells in [[c.name for c in AGENT_COLUMNS], *rows]:
        print(_row(AGENT_COLUMNS, widths, cells), file=out, flush=True)
    return 0


# -- certs ---------------------------------------------------------------------------------------


def _node_list(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def run_certs(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    """`driftwarden certs init DIR`: make the certificates and say how to use them."""
    from driftwarden.core.certs import init_certs, parse_collector_names

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


def _add_client_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("collector connection")
    group.add_argument("--collector", default=None, metavar="ADDR",
                       help=f"the collector's host:port (default ${COLLECTOR_ENV} or "
                       f"{DEFAULT_COLLECTOR})")
    group.add_argument("--token-file", default=None, metavar="FILE",
                       help="send the operator token in this file (authorization: Bearer)")
    group.add_argument("--tls-ca", default=None, metavar="FILE",
                       help="connect with TLS, trusting this CA (ca.crt of driftwarden certs init)")
    group.add_argument("--tls-cert", default=None, metavar="FILE",
                       help="operator client certificate for mutual TLS (operator.crt)")
    group.add_argument("--tls-key", default=None, metavar="FILE",
                       help="its private key (operator.key)")
    group.add_argument("--allow-non-loopback", action="store_true",
                       help="allow a collector address outside 127.0.0.0/8 and ::1 (real "
                       "deployments; this build is loopback-only by default)")


def _add_output_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", help="one JSON object per line")
    group.add_argument("--plain", action="store_true",
                       help="plain text lines even on a terminal (the output for pipes and "
                       "files; NO_COLOR only turns colours off)")


def _add_alerts(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "alerts", help="list stored alerts, or follow new ones live",
        description="List the collector's stored alerts (newest last), or with --follow show "
        "alerts as they arrive until Ctrl-C (on a terminal: a live table). Filters apply on "
        "the collector.")
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream new alerts (with --since: the stored ones first)")
    _add_output_flags(p)
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
    _add_client_flags(p)
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
    _add_client_flags(p)
    p.set_defaults(func=run_action)


def _add_agents(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "agents", help="the agents the collector knows",
        description="Every agent that connected since the collector started: connection, "
        "version, mode, containers watched, spool depth, dropped events, last heartbeat.")
    _add_output_flags(p)
    _add_client_flags(p)
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
    "ALERT_COLUMNS",
    "AlertTable",
    "action_event_text",
    "action_outcome_line",
    "add_parsers",
    "alert_filter",
    "collector_target",
    "describe_rpc_error",
    "format_age",
    "operator_channel",
    "parse_duration",
    "parse_since",
    "run_action",
    "run_agents",
    "run_alerts",
    "run_certs",
    "split_collector_address",
]
