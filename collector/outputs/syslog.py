"""The syslog output: RFC 5424 messages over UDP (RFC 5426), TCP (RFC 6587 octet counting) or
a unix socket.

Keys in the outputs file (besides the common ones, see ``config``)::

    transport: udp                # udp | tcp | unix
    address: 127.0.0.1:514        # udp and tcp: HOST:PORT (a HOST alone: port 514)
    path: /dev/log                # unix: the socket (datagram, else stream)
    format: json                  # json (MSG = the alert's JSON) | summary (one line)
    facility: local0              # kern, user, daemon, auth, authpriv, syslog, local0..local7
    hostname: collector-1         # optional: HOSTNAME (default: the alert's node)
    app_name: driftwarden
    sd_id: driftwarden@32473      # the SD-ID (32473 is RFC 5612's example enterprise number)
    max_size: 8192                # bytes per message; udp at most 65000
    timeout: 5                    # seconds to connect and to send (tcp, unix)

One message per alert::

    <PRI>1 TIMESTAMP HOSTNAME driftwarden PROCID KIND [SD-ID kind=".." severity=".."
        node=".." container=".." container_id=".." image=".." namespace=".." pod=".."
        alert_id=".."] MSG

PRI is the facility times 8 plus the severity (critical 2, high 3 = error, medium 4 =
warning, low 5 = notice); TIMESTAMP is the alert's time in UTC with microseconds; the MSGID
is the alert kind in upper case. SD-PARAM values escape ``"``, ``\\`` and ``]`` with a
backslash (RFC 5424 section 6.3.3) and show control characters as ``\\xNN``, so text from a
container (names, image references) can neither end the element nor break a frame. The MSG is
ASCII (JSON escapes everything else; the summary shows it as backslash escapes), so there is
no BOM and no raw newline in any message. A message over ``max_size`` sends the summary
instead of the JSON, cut to fit if still too long.

Framing: a UDP datagram (or a unix datagram) is one message; on TCP and stream unix sockets
each message is ``LENGTH SP MESSAGE`` (octet counting). A connection that fails is dropped and
made again on the next try.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

from driftwarden.collector.outputs.base import Fields, Sink, SinkConfig
from driftwarden.core.errors import OutputError, UsageError
from driftwarden.core.netaddr import host_port, parse_host_port

TRANSPORTS = ("udp", "tcp", "unix")
FORMATS = ("json", "summary")
FACILITIES = {"kern": 0, "user": 1, "daemon": 3, "auth": 4, "syslog": 5, "authpriv": 10,
              **{f"local{i}": 16 + i for i in range(8)}}
SEVERITY_CODES = {"critical": 2, "high": 3, "medium": 4, "low": 5}  # RFC 5424 severities
DEFAULT_PORT = 514
MAX_UDP = 65_000
NIL = "-"
_SD_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "]": "\\]"})
_SD_VALUE_MAX = 512  # characters of one SD-PARAM value


def _controls_escaped(text: str) -> str:
    """Control characters (C0, DEL, C1) as ``\\xNN``; the rest kept."""
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F else c
                   for c in text)


def _ascii(text: str) -> str:
    """One line of printable ASCII: controls as ``\\xNN``, other characters as ``\\u....``."""
    return _controls_escaped(text).encode("ascii", "backslashreplace").decode("ascii")


def header_field(value: Any, limit: int) -> str:
    """A HOSTNAME / APP-NAME / PROCID / MSGID: printable ASCII without spaces, at most
    `limit` characters; NILVALUE when empty."""
    text = "".join(c if 33 <= ord(c) <= 126 else "_" for c in str(value or ""))[:limit]
    return text or NIL


def sd_value(value: Any) -> str:
    """A PARAM-VALUE: RFC 5424's three escapes, control characters as ``\\xNN``, valid
    UTF-8 (a lone surrogate as its backslash escape), at most _SD_VALUE_MAX characters."""
    text = str(value)[:_SD_VALUE_MAX].translate(_SD_ESCAPES)
    text = _controls_escaped(text)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def timestamp(when: Any) -> str:
    """RFC 5424 TIMESTAMP (UTC, microseconds) of seconds since the epoch; NIL if unusable."""
    try:
        moment = datetime.datetime.fromtimestamp(float(when), datetime.UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return NIL
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def summary(alert: Mapping[str, Any]) -> str:
    """One ASCII line about the alert: kind, severity, where, and its reasons."""
    container = alert.get("container") or {}
    reasons = "; ".join(str(r.get("text") or r.get("code") or "")
                        for r in alert.get("reasons") or () if isinstance(r, Mapping))
    line = (f"{str(alert.get('kind') or '?').upper()} {alert.get('severity') or '?'} "
            f"node={alert.get('node') or '?'} container={container.get('name') or '?'} "
            f"image={container.get('image') or '?'} id={alert.get('id') or '?'}: {reasons}")
    return _ascii(line)


def format_message(alert: Mapping[str, Any], *, facility: int = FACILITIES["local0"],
                   msg_format: str = "json", hostname: str | None = None,
                   app_name: str = "driftwarden", procid: Any = None,
                   sd_id: str = "driftwarden@32473", max_size: int = 8192) -> bytes:
    """The RFC 5424 message for one alert (module docstring), at most `max_size` bytes."""
    severity = SEVERITY_CODES.get(str(alert.get("severity")), 4)
    container = alert.get("container") or {}
    params = {"kind": alert.get("kind"), "severity": alert.get("severity"),
              "node": alert.get("node"), "container": container.get("name"),
              "container_id": container.get("id"), "image": container.get("image"),
              "namespace": container.get("namespace"), "pod": container.get("pod"),
              "alert_id": alert.get("id")}
    sd = "[" + sd_id + "".join(f' {k}="{sd_value(v)}"' for k, v in params.items()
                               if v not in (None, "")) + "]"
    fields = (f"<{facility * 8 + severity}>1", timestamp(alert.get("time")),
              header_field(hostname or alert.get("node"), 255), header_field(app_name, 48),
              header_field(procid, 128), header_field(str(alert.get("kind") or "").upper(), 32),
              sd)
    head = " ".join(fields).encode()
    if msg_format == "json":
        message = head + b" " + json.dumps(alert, separators=(",", ":")).encode("ascii")
        if len(message) <= max_size:
            return message
    message = head + b" " + summary(alert).encode("ascii")
    return message[:max(max_size, len(head))]  # the MSG is ASCII: any cut is clean


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 octet-counting frame: ``LENGTH SP MESSAGE``."""
    return str(len(message)).encode("ascii") + b" " + message


@dataclass(frozen=True)
class SyslogConfig(SinkConfig):
    type = "syslog"

    transport: str = "udp"
    host: str | None = None
    port: int = DEFAULT_PORT
    path: str | None = None
    format: str = "json"
    facility: int = FACILITIES["local0"]
    hostname: str | None = None
    app_name: str = "driftwarden"
    sd_id: str = "driftwarden@32473"
    max_size: int = 8192
    timeout: float = 5.0

    @classmethod
    def parse(cls, fields: Fields) -> Self:
        transport = fields.text("transport", "udp", choices=TRANSPORTS)
        host, port, path = None, DEFAULT_PORT, None
        if transport == "unix":
            path = fields.text("path")
        else:
            address = fields.text("address")
            try:
                host, port = parse_host_port(address, flag="address",
                                             default_port=DEFAULT_PORT, allow_non_loopback=True)
            except UsageError as exc:
                raise fields.error("address", str(exc).removeprefix("address ")) from None
        facility = fields.text("facility", "local0", choices=tuple(FACILITIES))
        sd_id = fields.text("sd_id", cls.sd_id)
        if len(sd_id) > 32 or any(not 33 <= ord(c) <= 126 or c in '= ]"' for c in sd_id):
            raise fields.error("sd_id", f"{sd_id!r}: up to 32 printable ASCII characters "
                                        "without '=', ' ', ']' or '\"' (e.g. name@PEN)")
        limit = MAX_UDP if transport == "udp" else 1 << 20
        return cls(transport=transport, host=host, port=port, path=path,
                   format=fields.text("format", "json", choices=FORMATS),
                   facility=FACILITIES[facility], hostname=fields.text("hostname", None),
                   app_name=fields.text("app_name", cls.app_name), sd_id=sd_id,
                   max_size=fields.number("max_size", 8192, minimum=480, maximum=limit,
                                          integer=True),
                   timeout=float(fields.number("timeout", 5.0, minimum=0.1, maximum=300)))

    def make_sink(self) -> SyslogSink:
        return SyslogSink(self)

    def describe(self) -> str:
        where = self.path if self.transport == "unix" else host_port(self.host or "", self.port)
        return f"syslog RFC 5424 over {self.transport} to {where} ({self.format})"


class SyslogSink(Sink):
    def __init__(self, config: SyslogConfig) -> None:
        self.config = config
        self._sock: socket.socket | None = None
        self._stream = False  # frames are octet-counted
        self._procid = os.getpid()

    def send(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        config = self.config
        for alert in alerts:
            message = format_message(alert, facility=config.facility, msg_format=config.format,
                                     hostname=config.hostname, app_name=config.app_name,
                                     procid=self._procid, sd_id=config.sd_id,
                                     max_size=config.max_size)
            try:
                sock = self._connect()
                if self._stream:
                    sock.sendall(octet_counted(message))
                else:
                    sock.send(message)
            except OSError as exc:
                self.close()
                raise OutputError(f"syslog {config.transport} send failed: "
                                  f"{exc.strerror or exc}") from None

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        config = self.config
        if config.transport == "tcp":
            self._sock = socket.create_connection((config.host, config.port), config.timeout)
            self._stream = True
        elif config.transport == "udp":
            family, kind, proto, _, address = socket.getaddrinfo(
                config.host, config.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, kind, proto)
            sock.settimeout(config.timeout)
            try:
                sock.connect(address)
            except OSError:
                sock.close()
                raise
            self._sock, self._stream = sock, False
        else:
            self._sock, self._stream = self._connect_unix(config.path or "")
        return self._sock

    def _connect_unix(self, path: str) -> tuple[socket.socket, bool]:
        """A datagram socket like /dev/log, else (EPROTOTYPE) a stream one."""
        for kind, stream in ((socket.SOCK_DGRAM, False), (socket.SOCK_STREAM, True)):
            sock = socket.socket(socket.AF_UNIX, kind)
            sock.settimeout(self.config.timeout)
            try:
                sock.connect(path)
            except OSError as exc:
                sock.close()
                if kind == socket.SOCK_DGRAM and exc.errno == errno.EPROTOTYPE:
                    continue
                raise
            return sock, stream
        raise OSError(f"{path}: neither a datagram nor a stream socket")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


__all__ = ["FACILITIES", "FORMATS", "TRANSPORTS", "SyslogConfig", "SyslogSink",
           "format_message", "octet_counted", "sd_value", "summary"]
