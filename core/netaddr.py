"""Network addresses as the project's network rule sees them: loopback or not, and the gRPC
target text for a host and port. One place, so the collector, the agent's channel, the operator
CLI and the metrics server agree on what "loopback" means."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """``localhost`` (any case), 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets (``[::1]:50051``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
