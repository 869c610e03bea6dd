"""Network addresses as the project's network rule sees them: loopback or not, the one parser
of ``HOST:PORT`` flags, and the gRPC target text for a host and port. One place, so the
collector (``--listen``, ``--metrics``), the agent (``--collector``, ``--metrics``) and the
operator CLI (``--collector``, ``$DRIFTWARDEN_COLLECTOR``) agree on what an address and
"loopback" are, and say so in the same words.

Forms :func:`parse_host_port` takes: ``127.0.0.1:50051``, ``localhost:50051``,
``collector.example:50051``, ``[::1]:50051`` (an IPv6 address always in brackets with a port),
and, where the flag has a default port, a host alone (``localhost``, ``::1``, ``[::1]``). A
listening address may use port 0 (the system picks a free port). Not taken: URIs
(``dns:...``, ``unix:...``, ``http://...``) and an IPv6 address with a port outside brackets
(``::1:50051`` could be either).

The loopback rule: unless the flag's command was given ``--allow-non-loopback``, the host must
be ``localhost``, 127.0.0.0/8 or ::1. A host name other than ``localhost`` is not loopback (it
may resolve anywhere).
"""

from __future__ import annotations

import ipaddress
import re

from driftwarden.core.errors import UsageError

COLLECTOR_PORT = 50051  # the collector's gRPC port: its default --listen, the operator's default
METRICS_PORT = 9464  # the usual Prometheus exporter port, for examples
LOOPBACK_SPACE = "127.0.0.0/8, ::1 and localhost"
# gRPC target schemes and URL schemes: a target is not an address (and names no loopback host).
_URI_PREFIX = re.compile(r"^(?:[A-Za-z][A-Za-z0-9+.-]*://|(?:unix|unix-abstract|dns|ipv4|ipv6|"
                         r"vsock|xds):)")
# A host name as resolvers take it: letters, digits, '-', '_' and dots (a trailing dot is FQDN).
_HOST_NAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})$")
_PORT = re.compile(r"^[0-9]{1,5}$")


def is_loopback(host: str) -> bool:
    """``localhost`` (any case), 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    address = _ip_address(host)
    return address is not None and address.is_loopback


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (``[::1]:50051``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def loopback_host(host: str) -> str:
    """`host` when it is a loopback address (``localhost`` -> ``127.0.0.1``, so a listener
    binds one known family), else ValueError. For servers that never listen beyond loopback
    whatever the flags say (the metrics endpoint)."""
    if not is_loopback(host):
        raise ValueError(f"metrics server host {host!r} is not a loopback address; by the "
                         f"project's network rule it listens only on 127.0.0.0/8 or ::1 (put "
                         f"a proxy in front to expose it)")
    return "127.0.0.1" if host.lower() == "localhost" else host


def parse_host_port(text: str, *, flag: str, default_port: int | None = None,
                    listen: bool = False, allow_non_loopback: bool = False,
                    loopback_only: bool = False,
                    example_port: int | None = None) -> tuple[str, int]:
    """A ``HOST:PORT`` flag's text -> ``(host, port)``, the host without brackets.

    ``flag`` names the flag (or variable) in errors. ``default_port``: a host alone means this
    port. ``listen``: the address is one to listen on, so port 0 is allowed. The loopback rule
    applies unless ``allow_non_loopback``; ``loopback_only`` says the flag has no
    ``--allow-non-loopback`` (its error then does not offer it). ``example_port``: the port the
    error's examples show (default ``default_port``, else :data:`COLLECTOR_PORT`).

    UsageError, one line naming the flag, the text and what to give instead.
    """
    example = example_port or default_port or COLLECTOR_PORT

    def malformed(problem: str) -> UsageError:
        forms = f"HOST:PORT (e.g. 127.0.0.1:{example} or [::1]:{example}"
        if default_port is not None:
            forms += f"; a HOST alone means port {default_port}"
        if listen:
            forms += "; port 0 picks a free port"
        return UsageError(f"{flag} {text!r}: {problem}; expected {forms})")

    cleaned = text.strip()
    if not cleaned:
        raise malformed("empty")
    if _URI_PREFIX.match(cleaned):
        raise malformed("a URI, not an address")
    if cleaned.startswith("["):
        host, bracket, rest = cleaned[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise malformed("unbalanced brackets")
        if not _is_ipv6(host):
            raise malformed(f"{host!r} in brackets is not an IPv6 address")
        port_text: str | None = rest[1:] if rest else None
    elif cleaned.count(":") > 1:  # an IPv6 address without brackets: no room for a port
        if not _is_ipv6(cleaned):
            raise malformed("an IPv6 address with a port goes in brackets ([::1]:PORT)")
        host, port_text = cleaned, None
    else:
        host, colon, after = cleaned.partition(":")
        port_text = after if colon else None
        if not host:
            raise malformed("no host")
        if not colon and _PORT.match(host):
            raise malformed("a port alone, no host")
        if not _is_host(host):
            raise malformed(f"{host!r} is neither an IP address nor a host name")
    if port_text is None:
        if default_port is None:
            raise malformed("no port")
        port = default_port
    else:
        lowest = 0 if listen else 1
        if not _PORT.match(port_text) or not lowest <= int(port_text) <= 65535:
            raise malformed(f"port {port_text!r} is not {lowest}-65535")
        port = int(port_text)
    if not allow_non_loopback and not is_loopback(host):
        verb = "listens on" if listen else "talks to"
        if loopback_only:
            raise UsageError(f"{flag} {text!r}: {host} is not a loopback address; it {verb} "
                             f"{LOOPBACK_SPACE} only (put a proxy in front to expose it)")
        raise UsageError(f"{flag} {text!r}: {host} is not a loopback address; this build "
                         f"{verb} {LOOPBACK_SPACE} only (pass --allow-non-loopback for a real "
                         f"deployment, with TLS: the --tls-* flags)")
    return host, port


def parse_metrics_address(text: str) -> tuple[str, int]:
    """``--metrics HOST:PORT`` of the agent and the collector: a loopback address to serve
    Prometheus metrics on (port 0 picks one); ``localhost`` becomes ``127.0.0.1``."""
    host, port = parse_host_port(text, flag="--metrics", listen=True, loopback_only=True,
                                 example_port=METRICS_PORT)
    return loopback_host(host), port


def _ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _is_host(text: str) -> bool:
    """An IP address or a host name; not a mistyped IPv4 address (10.0.0.256: a host name's
    last label is never all digits)."""
    if _ip_address(text) is not None:
        return True
    return bool(_HOST_NAME.match(text)) and not text.rstrip(".").rpartition(".")[2].isdigit()


def _is_ipv6(text: str) -> bool:
    return isinstance(_ip_address(text), ipaddress.IPv6Address)


__all__ = [
    "COLLECTOR_PORT",
    "METRICS_PORT",
    "host_port",
    "is_loopback",
    "loopback_host",
    "parse_host_port",
    "parse_metrics_address",
]
