"""The `driftwarden` command line: the root parser, each role's commands under it, and the one
place that turns errors into exit codes (2: usage, 1: host or input, 0: done)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from driftwarden.agent import command as agent_commands
from driftwarden.cli import baseline as baseline_command
from driftwarden.collector import command as collector_commands
from driftwarden.core import __version__
from driftwarden.core.argtypes import CommandParser
from driftwarden.core.errors import DriftwardenError, UsageError
from driftwarden.ops import command as operator_commands
from driftwarden.ops.console import command as console_command

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(prog="driftwarden", description="Runtime security agent for containers.")
    parser.add_argument("--version", action="version", version=f"driftwarden {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND",
                                       parser_class=CommandParser)
    subparsers.required = True
    agent_commands.add_parsers(subparsers)
    baseline_command.add_parser(subparsers)  # the local form (agent) or the collector's (ops)
    collector_commands.add_parser(subparsers)
    operator_commands.add_parsers(subparsers)
    console_command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"driftwarden: error: {exc}", file=sys.stderr)
        return 2
    except DriftwardenError as exc:
        print(f"driftwarden: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `driftwarden trace | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
