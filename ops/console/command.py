"""`driftwarden console`: the web console (:mod:`driftwarden.ops.console.app`) for the
collector at ``--collector``.

It listens on loopback (``--listen``, default 127.0.0.1:8080) unless it serves HTTPS
(``--web-cert`` and ``--web-key``): a non-loopback ``--listen`` without them is refused, since
the operator token would cross the network in clear. The collector connection takes the
client flags every operator command takes (:mod:`driftwarden.ops.client`); here
``--token-file`` names the token a login must present (see
:mod:`driftwarden.ops.console.gateway`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from driftwarden.core.errors import UsageError
from driftwarden.core.lifecycle import stop_on_signals
from driftwarden.core.netaddr import is_loopback, parse_host_port
from driftwarden.ops.client import (
    add_client_flags,
    collector_address,
    operator_target,
    read_token,
    tls_files,
)
from driftwarden.ops.console.gateway import ConsoleSettings

DEFAULT_LISTEN = "127.0.0.1:8080"
CONSOLE_PORT = 8080


def settings_from_args(args: argparse.Namespace) -> ConsoleSettings:
    """The console's settings; UsageError (one line) for anything it cannot use."""
    if bool(args.web_cert) != bool(args.web_key):
        raise UsageError("--web-cert and --web-key go together (the console's HTTPS "
                         "certificate and its key)")
    for flag, path in (("--web-cert", args.web_cert), ("--web-key", args.web_key)):
        if path and not Path(path).is_file():
            raise UsageError(f"{flag} {path}: no such file")
    host, port = parse_host_port(args.listen, flag="--listen", listen=True,
                                 allow_non_loopback=True, example_port=CONSOLE_PORT)
    if not is_loopback(host) and not args.web_cert:
        raise UsageError(f"--listen {args.listen!r}: {host} is not a loopback address; the "
                         f"console serves other hosts over HTTPS only (give --web-cert and "
                         f"--web-key), or listen on 127.0.0.1")
    return ConsoleSettings(
        collector=collector_address(args), target=operator_target(args), tls=tls_files(args),
        required_token=read_token(args.token_file) if args.token_file else None,
        listen_host=host, listen_port=port, web_cert=args.web_cert, web_key=args.web_key)


def run_console(args: argparse.Namespace, *, out: TextIO | None = None) -> int:
    from driftwarden.ops.console.server import ConsoleServer

    out = out or sys.stdout
    settings = settings_from_args(args)
    stop = stop_on_signals()
    with ConsoleServer(settings) as server:
        login = ("log in with the token in " + args.token_file if args.token_file
                 else "log in with the collector's operator token")
        print(f"driftwarden console at {server.url}/ for the collector at {settings.collector} "
              f"({login}); Ctrl-C stops it", file=out, flush=True)
        stop.wait()
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "console", help="the web console: fleet, live alerts, baselines, response, audit",
        description="Serve the web console for a collector: log in at /login with the "
        "operator token; alerts at /alerts. It talks to the collector's API only, with the "
        "token typed at login (and the --tls-* files). It listens on loopback unless given "
        "--web-cert and --web-key.")
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to serve the console (default {DEFAULT_LISTEN}; port 0 picks "
                   "one; a non-loopback host needs --web-cert and --web-key)")
    p.add_argument("--web-cert", default=None, metavar="FILE",
                   help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--web-key", default=None, metavar="FILE", help="its private key (PEM)")
    add_client_flags(p)
    p.set_defaults(func=run_console)
    return p


__all__ = ["add_parser", "run_console", "settings_from_args"]
