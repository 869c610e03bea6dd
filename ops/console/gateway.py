"""The console's side of the collector: its settings, one gRPC channel per login, the login
check, and what a failed call means on a page.

The console is an operator client like the CLI (:mod:`driftwarden.ops.client`): it dials the
collector with the operator token the person typed at login (and the ``--tls-*`` files when
given). A login is accepted when the collector accepts that token, and only when the token
proves something: with ``--token-file`` it must also equal that file's token; without it the
collector must refuse a made-up token (a collector that runs without an operator token, or
that accepts the console's operator certificate in its place, would let anyone in, so the
console then refuses every login and says to give it ``--token-file``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import secrets

import grpc
from driftwarden.core.dial import dial
from driftwarden.core.tls import TlsFiles
from driftwarden.ops.client import RECONNECT_BACKOFF, describe_rpc_error
from driftwarden.ops.console.sessions import same_secret
from driftwarden.ops.format import clean_text
from driftwarden.proto.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

LOGIN_TIMEOUT = 5.0
# The collector is down or unreachable: the page says so instead of showing an empty fleet.
UNAVAILABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

@dataclasses.dataclass(frozen=True)
class ConsoleSettings:
    """What `driftwarden console` was told. `collector` is the address as given (for texts),
    `target` the gRPC target; `required_token` the ``--token-file`` token, if any."""

    collector: str
    target: str
    tls: TlsFiles | None = None
    required_token: str | None = None
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    web_cert: str | None = None
    web_key: str | None = None

    @property
    def https(self) -> bool:
        return self.web_cert is not None

    def follower_args(self, limit: int) -> argparse.Namespace:
        """The `driftwarden alerts --follow --actions` arguments the live stream reuses
        (:class:`driftwarden.ops.follow.Follower` reads the address, TLS and limit there)."""
        return argparse.Namespace(collector=self.collector,
                                  tls_ca=str(self.tls.ca) if self.tls else None,
                                  token_file=None, tls_cert=None, tls_key=None,
                                  allow_non_loopback=True, actions=True, limit=limit)


@dataclasses.dataclass(frozen=True)
class CallFailure:
    """A failed collector call as a page shows it."""

    text: str
    unavailable: bool
    http_status: int


def call_failure(exc: grpc.RpcError, settings: ConsoleSettings,
                 container: str | None = None) -> CallFailure:
    """What a failed call means (`container`: the one an action named)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else ""
    if code in UNAVAILABLE_CODES:
        return CallFailure(f"collector unavailable at {settings.collector}: is `driftwarden "
                           f"collector` running?", True, 503)
    line, _ = describe_rpc_error(code, clean_text(details or ""), collector=settings.collector,
                                 container=container, tls=settings.tls is not None)
    status = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400,
              grpc.StatusCode.FAILED_PRECONDITION: 409,
              grpc.StatusCode.UNAUTHENTICATED: 401,
              grpc.StatusCode.PERMISSION_DENIED: 403}.get(code, 502)
    return CallFailure(line, False, status)


@dataclasses.dataclass(frozen=True)
class LoginRefusal:
    """Why a login was not accepted (shown on the login page) and the HTTP status."""

    text: str
    http_status: int


def open_channel(settings: ConsoleSettings, token: str) -> grpc.Channel:
    """A channel to the collector sending `token`; the caller closes it."""
    return dial(settings.target, tls=settings.tls, token=token,
                options=[("grpc.initial_reconnect_backoff_ms", int(RECONNECT_BACKOFF[0] * 1000)),
                         ("grpc.max_reconnect_backoff_ms", int(RECONNECT_BACKOFF[1] * 1000))])


def _accepted(settings: ConsoleSettings, token: str) -> bool:
    """Does the collector accept operator calls with `token`? (RpcError for anything but a
    yes or a refusal of the credentials.)"""
    with open_channel(settings, token) as channel:
        try:
            agent_pb2_grpc.AgentsStub(channel).List(agent_pb2.ListAgentsRequest(),
                                                    timeout=LOGIN_TIMEOUT)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED,
                              grpc.StatusCode.PERMISSION_DENIED):
                return False
            raise
    return True


def check_login(settings: ConsoleSettings, token: str) -> LoginRefusal | None:
    """None when `token` logs in (module docstring), else why not."""
    token = token.strip()
    wrong = LoginRefusal("wrong token: give the collector's operator token (the file its "
                         "--token-file names)", 401)
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        return wrong
    if settings.required_token is not None and not same_secret(token,
                                                               settings.required_token):
        return wrong
    try:
        if not _accepted(settings, token):
            return wrong
        if settings.required_token is None and _accepted(settings, secrets.token_urlsafe(24)):
            return LoginRefusal(
                f"the collector at {settings.collector} accepts any token (it runs without "
                f"--token-file, or accepts this console's operator certificate), so a token "
                f"proves nothing: start the console with --token-file FILE holding the "
                f"operator token", 403)
    except grpc.RpcError as exc:
        failure = call_failure(exc, settings)
        return LoginRefusal(failure.text, failure.http_status)
    return None


__all__ = [
    "UNAVAILABLE_CODES",
    "CallFailure",
    "ConsoleSettings",
    "LoginRefusal",
    "call_failure",
    "check_login",
    "open_channel",
]
