"""`driftwarden baseline`: one command, two forms, chosen by where the baselines are.

- ``--state-dir DIR``: this host's agent (its control socket, or the files when it does not
  run): :func:`driftwarden.agent.command.run_local_baseline`.
- ``--collector ADDR`` (or ``$DRIFTWARDEN_COLLECTOR`` and no ``--state-dir``): the fleet's
  baselines on the collector: :func:`driftwarden.ops.baselines.run_baseline`.

The agent and the operator tools never import each other, so the parser of both forms lives
here and :func:`run` dispatches. Operations: list, show, mode, diff, accept, reset, export in
both forms; ``import`` is local (a file into one node's state dir), ``push`` goes to the
collector (a file for the whole fleet). The form's flags may come before or after the
operation (``baseline --state-dir DIR list``, ``baseline list --collector ADDR``).
"""

from __future__ import annotations

import argparse
import os

from driftwarden.agent.command import run_local_baseline
from driftwarden.core.errors import UsageError
from driftwarden.ops.baselines import IMAGE_HELP, run_baseline
from driftwarden.ops.client import COLLECTOR_ENV, add_client_flags
from driftwarden.ops.printers import add_output_flags

MODES = ("learn", "monitor", "protect")
# flags of the collector form only: (dest, flag)
_COLLECTOR_ONLY = (("token_file", "--token-file"), ("tls_ca", "--tls-ca"),
                   ("tls_cert", "--tls-cert"), ("tls_key", "--tls-key"),
                   ("allow_non_loopback", "--allow-non-loopback"))
_LOCAL_ONLY_OPS = {"import": "push FILE (the collector stores it for every node)"}
_COLLECTOR_ONLY_OPS = {"push": "import FILE (into this node's state dir)"}


def _form_flags(parser: argparse.ArgumentParser, *, again: bool) -> None:
    """Where the baselines are, and how to print them (`again`: on an operation's parser,
    see :func:`driftwarden.ops.client.add_client_flags`)."""
    parser.add_argument("--state-dir", default=argparse.SUPPRESS if again else None,
                        metavar="DIR",
                        help="this host's agent state dir: the local form, through the running "
                        "agent's control socket or on the files")
    add_output_flags(parser, again=again)
    add_client_flags(parser, again=again)


def _operation(ops: argparse._SubParsersAction, name: str, help_text: str,
               form: str = "") -> argparse.ArgumentParser:
    suffix = f" ({form} only)" if form else ""
    p = ops.add_parser(name, help=help_text + suffix, description=help_text + suffix + ".")
    _form_flags(p, again=True)
    return p


def _image(p: argparse.ArgumentParser, dest: str = "image", metavar: str = "IMAGE") -> None:
    p.add_argument(dest, metavar=metavar, help=IMAGE_HELP)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `baseline` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "baseline", help="list, inspect and tune per-image baselines (a host's or the fleet's)",
        description="With --state-dir DIR: this host's baselines, through its running agent's "
        "STATE_DIR/control.sock, or on the baseline files when no agent runs. With --collector "
        f"ADDR (or ${COLLECTOR_ENV} and no --state-dir): the fleet's baselines, held by the "
        "collector, which sends every change to the agents that run the image. IMAGE is "
        f"{IMAGE_HELP}.")
    _form_flags(p, again=False)
    ops = p.add_subparsers(dest="op", metavar="OP", parser_class=type(p))
    ops.required = True
    _operation(ops, "list", "every baseline with its mode and size")
    _image(_operation(ops, "show", "one baseline's items, unconfirmed items and mode history"))
    mode = _operation(ops, "mode", "set a baseline's mode")
    _image(mode)
    mode.add_argument("mode", choices=MODES, metavar="MODE", help=" | ".join(MODES))
    mode.add_argument("--reason", default=None, metavar="TEXT",
                      help="why, for the mode history and the audit trail (required with "
                      "--collector)")
    diff = _operation(ops, "diff", "what image A's baseline has that B's never did (with "
                      "--collector: and the reverse)")
    _image(diff, "a", "A")
    _image(diff, "b", "B")
    accept = _operation(ops, "accept", "add a NOVEL alert's behaviour to its image's baseline")
    accept.add_argument("alert_id", metavar="ALERT_ID")
    accept.add_argument("--reason", default=None, metavar="TEXT",
                        help="why, for the audit trail (--collector)")
    reset = _operation(ops, "reset", "forget a baseline: the image learns again")
    _image(reset)
    reset.add_argument("--reason", default=None, metavar="TEXT",
                       help="why, for the audit trail (required with --collector)")
    export = _operation(ops, "export", "write a baseline to a file")
    _image(export)
    export.add_argument("file", metavar="FILE")
    imp = _operation(ops, "import", "load a baseline file (starts in monitor unless --mode "
                     "says otherwise)", "--state-dir")
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("--mode", choices=MODES, default=None,
                     help="the mode it starts in (default monitor, whatever mode the file was "
                     "exported in)")
    imp.add_argument("--image", dest="image_id", default=None, metavar="ID",
                     help="the image id it is for (refused if the file is another image's)")
    imp.add_argument("--force", action="store_true", help="use it for --image anyway")
    push = _operation(ops, "push", "store a baseline file (learned in CI, exported elsewhere) "
                      "for its image: every node then detects from it", "--collector")
    push.add_argument("file", metavar="FILE")
    push.add_argument("--image", dest="image_id", default=None, metavar="KEY",
                      help="the image key it must be for (refused if the file is another "
                      "image's)")
    push.add_argument("--mode", choices=MODES, default=None,
                      help="the mode it starts in (default monitor)")
    push.add_argument("--reason", default=None, metavar="TEXT", help="why, for the audit trail")
    p.set_defaults(func=run)


def uses_collector(args: argparse.Namespace, env: dict[str, str] | None = None) -> bool:
    """The form: True for the collector's baselines, False for --state-dir; UsageError when
    neither or both are named, or a flag or operation of the other form is given."""
    env = dict(os.environ) if env is None else env
    if args.state_dir and args.collector:
        raise UsageError("give --state-dir DIR (this host's baselines) or --collector ADDR "
                         "(the fleet's), not both")
    collector = bool(args.collector or (not args.state_dir and env.get(COLLECTOR_ENV)))
    if not collector and not args.state_dir:
        raise UsageError(f"where are the baselines? give --state-dir DIR (this host's agent) or "
                         f"--collector ADDR (the fleet's, on the collector; or set "
                         f"${COLLECTOR_ENV})")
    if collector and args.op in _LOCAL_ONLY_OPS:
        raise UsageError(f"baseline {args.op} works on a --state-dir; on the collector use "
                         f"{_LOCAL_ONLY_OPS[args.op]}")
    if not collector and args.op in _COLLECTOR_ONLY_OPS:
        raise UsageError(f"baseline {args.op} needs --collector ADDR; on a --state-dir use "
                         f"{_COLLECTOR_ONLY_OPS[args.op]}")
    if not collector:
        given = [flag for dest, flag in _COLLECTOR_ONLY if getattr(args, dest)]
        if given:
            raise UsageError(f"{', '.join(given)} only make(s) sense with --collector ADDR")
    return collector


def run(args: argparse.Namespace) -> int:
    if uses_collector(args):
        return run_baseline(args)
    return run_local_baseline(args)


__all__ = ["add_parser", "run", "uses_collector"]
