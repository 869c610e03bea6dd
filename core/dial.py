"""The one way to open a gRPC channel to the collector, for the agent and the operator tools.

:func:`dial` sets what every connection to the collector needs once: the message size limit
of the wire (``wire.MAX_MESSAGE_BYTES`` both ways), TLS from a :class:`~driftwarden.core.tls.
TlsFiles` (read at each dial, so a renewed certificate is used on the next connection), an
operator's bearer token on every call (``authorization: Bearer <token>``), and no HTTP proxy.

Why no proxy: gRPC would otherwise honour ``grpc_proxy``, ``https_proxy`` and ``http_proxy``
from the environment and tunnel the connection through that proxy (``no_proxy`` aside). The
collector is on loopback or an in-cluster Service, never behind a forward proxy, and nodes and
pods often inherit a cluster-wide ``HTTP_PROXY`` meant for egress to the internet: honouring it
would send the agent's security alerts (and an operator's token and actions) through a third
party, or fail to connect at all, silently. The address the operator or the manifest gives is
the address dialled; a collector reachable only through a proxy needs a direct route
(a Service, a port-forward) instead.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import grpc
from driftwarden.core.tls import TlsFiles
from driftwarden.core.wire import MAX_MESSAGE_BYTES

_BASE_OPTIONS = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_http_proxy", 0),  # never a proxy from the environment (module docstring)
)


def dial(target: str, *, tls: TlsFiles | None = None, token: str | None = None,
         options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to the collector at `target` (``host:port``, as
    :func:`~driftwarden.core.netaddr.host_port` writes it).

    ``tls``: TLS trusting its CA, presenting its certificate when it has one (CertError when a
    file cannot be read). ``token``: sent as ``authorization: Bearer`` on every call.
    ``options``: more gRPC channel options (e.g. reconnect backoff); one of the base options
    given again replaces it. The caller closes the channel (it is a context manager).
    """
    merged = dict(_BASE_OPTIONS)
    merged.update(options)
    channel_options = list(merged.items())
    if tls is None:
        channel = grpc.insecure_channel(target, channel_options)
    else:
        channel = grpc.secure_channel(target, tls.channel_credentials(), channel_options)
    if token is not None:
        channel = grpc.intercept_channel(channel, BearerToken(token))
    return channel


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                         "compression")), grpc.ClientCallDetails):
    pass


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call on the channel.

    An interceptor rather than call credentials: gRPC sends call credentials over TLS only, and
    an operator on loopback may use the token without TLS.
    """

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

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


__all__ = ["BearerToken", "dial"]
