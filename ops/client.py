"""The operator's side of connecting to the collector: the client flags, the channel they
describe, and what a failed call tells the operator.

Client flags (every client command: `alerts`, `action`, `agents`, `baseline --collector`;
:func:`add_client_flags`)
    ``--collector ADDR`` (``host:port``, ``[::1]:port``, or a host alone for port 50051; default
    ``$DRIFTWARDEN_COLLECTOR`` or ``127.0.0.1:50051``), ``--token-file F`` (sends
    ``authorization: Bearer <token>``), ``--tls-ca F [--tls-cert F --tls-key F]`` (TLS, with the
    operator's client certificate for mutual TLS), ``--allow-non-loopback`` (this build talks to
    loopback addresses only unless given). :func:`operator_channel` dials the collector with
    them through :func:`driftwarden.core.dial.dial` (the agent's dial too: no HTTP proxy).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import TextIO

import grpc
from driftwarden.core.dial import dial
from driftwarden.core.errors import UsageError
from driftwarden.core.netaddr import COLLECTOR_PORT, host_port, parse_host_port
from driftwarden.core.tls import TlsFiles
from driftwarden.ops.tables import clean_text

log = logging.getLogger(__name__)

COLLECTOR_ENV = "DRIFTWARDEN_COLLECTOR"
COLLECTOR_FLAG = "--collector"
DEFAULT_COLLECTOR = f"127.0.0.1:{COLLECTOR_PORT}"
RECONNECT_BACKOFF = (0.5, 10.0)  # first and longest wait between reconnect attempts (seconds)


def collector_address(args: argparse.Namespace) -> str:
    """The collector address as the operator gave it: the flag, the variable or the default."""
    return args.collector or os.environ.get(COLLECTOR_ENV) or DEFAULT_COLLECTOR


def _collector_source(args: argparse.Namespace) -> str:
    """What named the address, for errors: the flag, or the variable when it came from there."""
    if not args.collector and os.environ.get(COLLECTOR_ENV):
        return f"${COLLECTOR_ENV}"
    return COLLECTOR_FLAG


def collector_target(address: str, *, source: str = COLLECTOR_FLAG,
                     allow_non_loopback: bool = False) -> str:
    """The gRPC target for an operator's collector address (a host alone: port 50051);
    UsageError naming `source` when malformed, or not loopback unless allowed."""
    host, port = parse_host_port(address, flag=source, default_port=COLLECTOR_PORT,
                                 allow_non_loopback=allow_non_loopback)
    return host_port(host, port)


def operator_target(args: argparse.Namespace) -> str:
    """The gRPC target the client flags (or ``$DRIFTWARDEN_COLLECTOR``) name."""
    return collector_target(collector_address(args), source=_collector_source(args),
                            allow_non_loopback=args.allow_non_loopback)


def read_token(path: str) -> str:
    """The operator token in ``--token-file`` `path`: one word of printable ASCII."""
    try:
        text = Path(path).read_bytes().decode("utf-8", "replace").strip()
    except OSError as exc:
        raise UsageError(f"--token-file {path}: cannot read it ({exc.strerror or exc})") from None
    if not text:
        raise UsageError(f"--token-file {path} is empty; it must hold the collector's operator "
                         f"token (driftwarden certs init writes one to operator.token)")
    if not text.isascii() or not text.isprintable() or " " in text:
        raise UsageError(f"--token-file {path}: the token must be one word of printable ASCII")
    return text


def tls_files(args: argparse.Namespace) -> TlsFiles | None:
    """The ``--tls-*`` flags as TlsFiles (the CA alone: TLS without a client certificate)."""
    return TlsFiles.from_flags(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key)


def uses_tls(args: argparse.Namespace) -> bool:
    return bool(args.tls_ca)


def operator_channel(args: argparse.Namespace) -> grpc.Channel:
    """A channel to the collector from the client flags (see the module docstring).

    UsageError for a malformed or non-loopback address (without --allow-non-loopback),
    unreadable files or an incomplete TLS flag set, before any connection. The caller closes
    the channel (it is a context manager).
    """
    target = operator_target(args)
    tls = tls_files(args)
    token = read_token(args.token_file) if args.token_file else None
    return dial(target, tls=tls, token=token,
                options=[("grpc.initial_reconnect_backoff_ms", int(RECONNECT_BACKOFF[0] * 1000)),
                         ("grpc.max_reconnect_backoff_ms", int(RECONNECT_BACKOFF[1] * 1000))])


@dataclasses.dataclass(frozen=True)
class Missing:
    """What a call asked for, to say when the collector answers NOT_FOUND (exit 2: the operator
    named something it lacks): its details when it gave some (they name what it lacks and what
    to do), else ``no {what} on the collector at ADDR: {hint}``."""

    what: str  # "baseline for image 'nginx'"
    hint: str  # "`driftwarden baseline list` shows the images it knows"


def describe_rpc_error(code: grpc.StatusCode, details: str, *, collector: str,
                       container: str | None = None, missing: Missing | None = None,
                       tls: bool = False) -> tuple[str, int]:
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
    if code == grpc.StatusCode.NOT_FOUND and missing is not None:
        if details:
            return f"the collector at {collector}: {details}", 2
        return f"no {missing.what} on the collector at {collector}: {missing.hint}", 2
    if code == grpc.StatusCode.FAILED_PRECONDITION and container is not None:
        return (f"container {container!r} is ambiguous{said}: give more of its id, or --node"), 1
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return f"the collector at {collector} cannot do that{said}", 1
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"the collector refused the request{said}", 2
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"the collector at {collector} did not answer in time{said}", 1
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (f"the collector at {collector} does not serve this call{said}: is it another "
                f"driftwarden version?"), 1
    return f"the call to the collector at {collector} failed: {code.name}{said}", 1


def report_rpc_error(exc: grpc.RpcError, args: argparse.Namespace, err: TextIO,
                     container: str | None = None, missing: Missing | None = None) -> int:
    """Print what a failed call means (:func:`describe_rpc_error`) on `err`; the exit code."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    log.debug("collector call failed: %s %s", code, details)
    line, exit_code = describe_rpc_error(code, clean_text(details or ""),
                                         collector=collector_address(args),
                                         container=container, missing=missing,
                                         tls=uses_tls(args))
    print(f"driftwarden: error: {line}", file=err, flush=True)
    return exit_code


class UnreachableError(grpc.RpcError):
    """The collector never answered (a stream that could not be opened): UNAVAILABLE."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return ""


def add_client_flags(parser: argparse.ArgumentParser, *, again: bool = False) -> None:
    """The client flags (module docstring) on a client command's parser.

    `again`: the same flags once more, on a subcommand of a parser that has them (`baseline
    --collector ADDR list` and `baseline list --collector ADDR`): given there they win, left
    out they keep the parent's value (argparse would otherwise reset it to the default)."""
    def default(value: object) -> object:
        return argparse.SUPPRESS if again else value

    group = parser.add_argument_group("collector connection")
    group.add_argument(COLLECTOR_FLAG, default=default(None), metavar="ADDR",
                       help=f"the collector's host:port (default ${COLLECTOR_ENV} or "
                       f"{DEFAULT_COLLECTOR})")
    group.add_argument("--token-file", default=default(None), metavar="FILE",
                       help="send the operator token in this file (authorization: Bearer)")
    group.add_argument("--tls-ca", default=default(None), metavar="FILE",
                       help="connect with TLS, trusting this CA (ca.crt of driftwarden certs init)")
    group.add_argument("--tls-cert", default=default(None), metavar="FILE",
                       help="operator client certificate for mutual TLS (operator.crt)")
    group.add_argument("--tls-key", default=default(None), metavar="FILE",
                       help="its private key (operator.key)")
    group.add_argument("--allow-non-loopback", action="store_true", default=default(False),
                       help="allow a collector address outside 127.0.0.0/8 and ::1 (real "
                       "deployments; this build is loopback-only by default)")


__all__ = [
    "COLLECTOR_ENV",
    "DEFAULT_COLLECTOR",
    "RECONNECT_BACKOFF",
    "Missing",
    "UnreachableError",
    "add_client_flags",
    "collector_address",
    "collector_target",
    "describe_rpc_error",
    "operator_channel",
    "operator_target",
    "read_token",
    "report_rpc_error",
    "tls_files",
]
