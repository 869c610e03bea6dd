"""Where `driftwarden alerts` writes what it gets: alerts, actions, overflow notices and lines
about the connection.

:func:`rich_console` decides: a rich console when stdout is a terminal (not ``--json`` or
``--plain``, ``TERM`` not ``dumb``), else None and plain output. :class:`PlainPrinter` writes
the alerts table as plain lines (:func:`driftwarden.ops.tables.plain_row`: never cut; an action
or a notice is a row of its own, KIND ``action`` or ``notice``) or JSON lines (an alert as the
agent writes it, ``{"action": {...}}``, ``{"notice": {...}}``), and connection lines starting
with ``--`` (on stderr beside JSON lines); every line is flushed as written.
:class:`LivePrinter` takes the same calls for ``--follow`` on a terminal and draws them as a
live table (:mod:`driftwarden.ops.live`); adding a row never waits for the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, TextIO

from driftwarden.core import wire
from driftwarden.ops.format import action_dict, alert_dict, clean_text, notice_dict
from driftwarden.ops.live import LiveAlertView, LiveDisplay
from driftwarden.ops.tables import (
    ALERTS,
    ColumnSet,
    Row,
    action_row,
    alert_row,
    layout,
    notice_row,
    plain_header,
    plain_lines,
    plain_row,
    rich_table,
    terminal_console,
)
from driftwarden.proto.v1 import actions_pb2, alerts_pb2, common_pb2
from rich.cells import cell_len
from rich.console import Console
from rich.text import Text


class Printer(Protocol):
    def start(self) -> None: ...

    def finish(self) -> None: ...

    def alert(self, msg: common_pb2.Alert) -> None: ...

    def action(self, action: actions_pb2.Action) -> None: ...

    def notice(self, notice: alerts_pb2.StreamNotice) -> None: ...

    def info(self, text: str, state: str | None = None) -> None: ...


def add_output_flags(parser: argparse.ArgumentParser, *, again: bool = False) -> None:
    """``--json`` and ``--plain`` (one or the other) on a command that prints tables.
    `again`: on a subcommand of a parser that has them (see
    :func:`driftwarden.ops.client.add_client_flags`)."""
    default = argparse.SUPPRESS if again else False
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--json", action="store_true", default=default,
                       help="one JSON object per line")
    group.add_argument("--plain", action="store_true", default=default,
                       help="plain text lines even on a terminal, as for pipes and files: "
                       "never cut, columns two or more spaces apart, an empty cell as -, the "
                       "last column whole to the end of the line (grep, awk '{print $4}', "
                       "sort -k); NO_COLOR only turns colours off")


def print_table(columns: ColumnSet, rows: Sequence[Row], console: Console | None,
                out: TextIO) -> None:
    """A whole table: fitted to the terminal on `console`, else plain lines never cut."""
    if console is not None:
        console.print(rich_table(columns, rows, layout(columns, rows, console.width)))
        return
    for line in plain_lines(columns, rows):
        print(line, file=out, flush=True)


def print_line(text: str, console: Console | None, out: TextIO, style: str = "") -> None:
    """One line of text (cleaned of control characters): in `style` on a terminal."""
    if console is not None:
        console.print(Text(clean_text(text), style=style))
        return
    print(clean_text(text), file=out, flush=True)


def rich_console(args: argparse.Namespace, out: TextIO,
                 env: Mapping[str, str] | None = None) -> Console | None:
    """A rich console when `out` is a terminal and neither --json nor --plain was given
    (TERM=dumb counts as no terminal); None: the plain output."""
    env = os.environ if env is None else env
    if args.json or args.plain or env.get("TERM") == "dumb":
        return None
    isatty = getattr(out, "isatty", None)
    if isatty is None or not isatty():
        return None
    return terminal_console(out, env)


class PlainPrinter:
    """Alerts, actions and notices as plain table lines padded to `widths` (from
    :func:`driftwarden.ops.tables.layout`), or as JSON lines. A cell wider than its column
    (a stream's rows are not known in advance) widens the column from its line on, so the
    lines after it line up again."""

    def __init__(self, out: TextIO, err: TextIO, *, json_lines: bool,
                 widths: Mapping[str, int]) -> None:
        self.out = out
        self.err = err
        self.json_lines = json_lines
        self.widths = dict(widths)

    def _write(self, line: str, stream: TextIO | None = None) -> None:
        stream = stream or self.out
        stream.write(line + "\n")
        stream.flush()

    def _row(self, row: Row) -> None:
        for name, text in zip(ALERTS.names[:-1], row, strict=False):
            self.widths[name] = max(self.widths[name], cell_len(text.plain))
        self._write(plain_row(ALERTS, self.widths, row))

    def start(self) -> None:
        if not self.json_lines:
            self._write(plain_header(ALERTS, self.widths))

    def finish(self) -> None:
        pass

    def alert(self, msg: common_pb2.Alert) -> None:
        if not self.json_lines:
            self._row(alert_row(msg))
            return
        try:
            data = alert_dict(msg)
        except wire.InvalidMessage as exc:
            self._write(f"-- skipped a malformed alert {clean_text(msg.id)!r} from the collector: "
                        f"{clean_text(str(exc))}", self.err)
            return
        self._write(json.dumps(data))

    def action(self, action: actions_pb2.Action) -> None:
        if self.json_lines:
            self._write(json.dumps({"action": action_dict(action)}))
        else:
            self._row(action_row(action))

    def notice(self, notice: alerts_pb2.StreamNotice) -> None:
        if self.json_lines:
            self._write(json.dumps({"notice": notice_dict(notice)}))
        else:
            self._row(notice_row(notice))

    def info(self, text: str, state: str | None = None) -> None:
        """A line about the connection: stdout in the table, stderr beside JSON lines."""
        self._write(f"-- {clean_text(text)}", self.err if self.json_lines else self.out)


class LivePrinter:
    """``alerts --follow`` on a terminal: the calls of :class:`PlainPrinter`, drawn as a live
    table. Adding a row never waits for the terminal."""

    def __init__(self, console: Console, collector: str, clock: Callable[[], float]) -> None:
        self.view = LiveAlertView(collector)
        self.display = LiveDisplay(console, self.view)
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


__all__ = ["LivePrinter", "PlainPrinter", "Printer", "add_output_flags", "print_line",
           "print_table", "rich_console"]
