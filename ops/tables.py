"""The operator commands' one table engine: column sets, one width algorithm, and the same rows
drawn either as plain text lines or as rich tables.

A :class:`ColumnSet` names its columns in order; each :class:`Column` has a narrowest and a
widest width on a terminal, and the last column (the alerts' REASON, the agents' LAST
HEARTBEAT) has no widest: it takes the rest of the line. A row is one rich ``Text`` per column
(styles for the terminal; ``.plain`` for plain text), made by :func:`alert_row`,
:func:`action_row`, :func:`notice_row`, :func:`info_row`, :func:`agent_row` or the baseline
rows (:func:`baseline_row`, :func:`item_row`, :func:`unconfirmed_row`, :func:`history_row`,
:func:`diff_row`, :func:`held_baseline_row`) from the collector's messages, every text cleaned
of control characters (:func:`clean_text`).

:func:`layout` gives the columns' widths:

- plain text (no width: a pipe, a file, ``--plain``): nothing is cut or hidden. Each column is
  as wide as its widest cell; while rows are not known yet (``alerts --follow``) as wide as
  its widest width on a terminal, and a longer cell then pushes the rest of its line right
  (:class:`driftwarden.ops.printers.PlainPrinter` widens the column from there on).
  :func:`plain_line` joins the cells two spaces apart, an empty cell as ``-``, the last column
  unpadded: every field before the last is one word for ``awk``, and the last runs to the end
  of the line.
- a terminal (its width): columns are as wide as their widest cell up to their widest width
  (fixed ones always that wide, so a live view does not jump), and the last column gets the
  rest. When the last would get less than its narrowest width, the set's ``shrink`` columns
  shrink to their narrowest, then its ``hide`` columns are hidden, in order; the last column
  always keeps what is left. :func:`rich_table` draws them: a cell that does not fit ends in
  ``…``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TextIO

from driftwarden.core import wire
from driftwarden.ops.format import (
    action_target,
    action_time,
    alert_time,
    clean_text,
    container_ref_text,
    container_text,
    dropped_total,
    enum_text,
    format_epoch,
    format_time,
    heartbeat_text,
    image_text,
    item_text,
    notice_text,
    notice_time,
    reason_text,
    requested_by_text,
    short_key,
)
from driftwarden.proto.v1 import actions_pb2, agent_pb2, alerts_pb2, baselines_pb2, common_pb2
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

GAP = 2  # columns between cells
EMPTY_PLAIN = "-"  # an empty cell in plain text, so every line has the same fields

SEVERITY_STYLES = {"critical": "bold white on red", "high": "bold red", "medium": "yellow",
                   "low": "cyan"}
MODE_STYLES = {"learn": "cyan", "monitor": "", "protect": "bold magenta"}
STATUS_STYLES = {"done": "green", "already": "green", "pending": "dim", "skipped": "yellow",
                 "failed": "bold red", "refused": "red", "container-gone": "red"}
ACTION_STYLE = "magenta"
NOTICE_STYLE = "bold red"
INFO_STYLE = "dim italic"
HEADER_STYLE = "bold"

Row = list[Text]


@dataclasses.dataclass(frozen=True)
class Column:
    name: str
    min_width: int  # on a terminal: shrunk no further (hidden instead, if it may be)
    max_width: int | None  # on a terminal: the widest it gets; None: the rest of the line
    right: bool = False

    @property
    def fixed(self) -> bool:
        return self.min_width == self.max_width


@dataclasses.dataclass(frozen=True)
class ColumnSet:
    """Columns in order, the last one taking the rest of the line; on a narrow terminal the
    `shrink` columns shrink to their narrowest, then the `hide` columns go, in these orders."""

    columns: tuple[Column, ...]
    shrink: tuple[str, ...] = ()
    hide: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        rest = [c.name for c in self.columns if c.max_width is None]
        if rest != [self.columns[-1].name]:
            raise ValueError(f"the last column, and only it, takes the rest of the line; got "
                             f"{rest or 'none'} in {self.names}")
        unknown = [n for n in (*self.shrink, *self.hide) if n not in self.names[:-1]]
        if unknown:
            raise ValueError(f"shrink/hide name columns {unknown} that are not in {self.names} "
                             f"(or the last column, which always stays)")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def row(self, cells: Mapping[str, Text]) -> Row:
        """A row from cells by column name; a column not named is an empty cell."""
        unknown = set(cells) - set(self.names)
        if unknown:
            raise ValueError(f"no column {sorted(unknown)} in {self.names}")
        return [cells.get(name) or Text() for name in self.names]


def cell(text: str, style: str = "") -> Text:
    """One cell: `text` cleaned of control characters, in `style` on a terminal."""
    return Text(clean_text(text), style=style)


# -- widths --------------------------------------------------------------------------------------


def _widest(index: int, column: Column, rows: Sequence[Row]) -> int:
    return max([cell_len(column.name), *(cell_len(r[index].plain) for r in rows)])


def layout(columns: ColumnSet, rows: Sequence[Row] | None, width: int | None = None, *,
           fill: bool = False) -> dict[str, int]:
    """Each shown column's width, in column order (see the module docstring).

    `width` None: plain text, nothing cut or hidden; `rows` None: rows not known yet (a
    stream). `width` given: a terminal that wide; `fill` gives the last column the whole rest
    of the line (a live view, whose rows change) instead of as much as its widest cell needs.
    """
    cols = columns.columns
    if width is None:
        if rows is None:
            return {c.name: max(cell_len(c.name), c.max_width or 0) for c in cols}
        return {c.name: _widest(i, c, rows) for i, c in enumerate(cols)}
    rows = rows or []
    widths: dict[str, int] = {}
    for i, col in enumerate(cols[:-1]):
        assert col.max_width is not None  # only the last column has none (ColumnSet checks)
        widths[col.name] = col.max_width if col.fixed else min(col.max_width,
                                                               _widest(i, col, rows))
    last = cols[-1]
    narrowest = {c.name: c.min_width for c in cols}

    def left() -> int:  # what the shown columns leave for the last one
        return width - sum(widths.values()) - GAP * len(widths)

    for name in columns.shrink:
        short = last.min_width - left()
        if short <= 0:
            break
        widths[name] = max(widths[name] - short, min(narrowest[name], widths[name]))
    for name in columns.hide:
        if left() >= last.min_width:
            break
        del widths[name]
    rest = max(left(), 1)
    if not fill:
        rest = min(rest, _widest(len(cols) - 1, last, rows))
    widths[last.name] = rest
    return {c.name: widths[c.name] for c in cols if c.name in widths}


# -- plain text ----------------------------------------------------------------------------------


def plain_line(columns: ColumnSet, widths: Mapping[str, int], cells: Sequence[str]) -> str:
    """One plain line: the shown columns' `cells` (texts in column order) padded to `widths`,
    two spaces apart, an empty cell as ``-``; never cut, the last cell never padded."""
    shown = [(col, text) for col, text in zip(columns.columns, cells, strict=True)
             if col.name in widths]
    parts = []
    for n, (col, text) in enumerate(shown):
        text = clean_text(text) or EMPTY_PLAIN
        pad = " " * max(widths[col.name] - cell_len(text), 0)
        if n == len(shown) - 1:
            parts.append(pad + text if col.right else text)
        else:
            parts.append(pad + text if col.right else text + pad)
    return (" " * GAP).join(parts)


def plain_header(columns: ColumnSet, widths: Mapping[str, int]) -> str:
    return plain_line(columns, widths, columns.names)


def plain_row(columns: ColumnSet, widths: Mapping[str, int], row: Row) -> str:
    return plain_line(columns, widths, [c.plain for c in row])


def plain_lines(columns: ColumnSet, rows: Sequence[Row]) -> list[str]:
    """A whole plain table: the header, then every row, aligned by the widest cells."""
    widths = layout(columns, rows)
    return [plain_header(columns, widths), *(plain_row(columns, widths, r) for r in rows)]


# -- rich ----------------------------------------------------------------------------------------


def rich_table(columns: ColumnSet, rows: Sequence[Row], widths: Mapping[str, int]) -> Table:
    """The rows as a rich table with the columns in `widths` (from :func:`layout` with the
    terminal's width), one line a row: cells that do not fit end with an ellipsis."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  header_style=HEADER_STYLE, collapse_padding=False)
    shown = [i for i, col in enumerate(columns.columns) if col.name in widths]
    for i in shown:
        col = columns.columns[i]
        table.add_column(col.name, width=widths[col.name], no_wrap=True, overflow="ellipsis",
                         justify="right" if col.right else "left")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table


def terminal_console(file: TextIO, env: Mapping[str, str]) -> Console:
    """A rich console on `file`, which the caller found to be a terminal. ``NO_COLOR`` (set,
    not empty) turns colours off; bold and dim stay. No markup, emoji or highlighting: every
    text is drawn as given."""
    return Console(file=file, force_terminal=True, no_color=bool(env.get("NO_COLOR")),
                   markup=False, emoji=False, highlight=False)


# -- alerts, actions, notices --------------------------------------------------------------------


ALERTS = ColumnSet(
    columns=(Column("TIME", 20, 20), Column("KIND", 7, 7), Column("SEV", 8, 8),
             Column("CONTAINER", 10, 18), Column("IMAGE", 10, 24), Column("NODE", 8, 12),
             Column("COUNT", 5, 5, right=True), Column("REASON", 16, None)),
    shrink=("IMAGE", "CONTAINER", "NODE"),
    hide=("COUNT", "NODE", "IMAGE", "CONTAINER", "KIND"))


def alert_row(msg: common_pb2.Alert) -> Row:
    severity = enum_text(wire.SEVERITY, msg.severity)
    container = msg.container
    return ALERTS.row({
        "TIME": cell(format_time(alert_time(msg))),
        "KIND": cell(enum_text(wire.ALERT_KIND, msg.kind)),
        "SEV": cell(severity, SEVERITY_STYLES.get(severity, "")),
        "CONTAINER": cell(container_text(container)), "IMAGE": cell(image_text(container.image)),
        "NODE": cell(container.node or "-"), "COUNT": cell(str(msg.count)),
        "REASON": cell(reason_text(msg))})


def action_row(action: actions_pb2.Action) -> Row:
    """KIND ``action``; REASON ``quarantine done: message (policy rule R)``, status coloured."""
    status = enum_text(wire.ACTION_STATUS, action.status)
    reason = Text.assemble((clean_text(enum_text(wire.ACTION_TYPE, action.type)), "bold"), " ",
                           (clean_text(status), STATUS_STYLES.get(status, "")))
    if action.message:
        reason.append(": " + clean_text(action.message))
    who = requested_by_text(action.requested_by)
    if who:
        reason.append(f" ({clean_text(who)})")
    return ALERTS.row({"TIME": cell(format_time(action_time(action))),
                       "KIND": cell("action", ACTION_STYLE),
                       "CONTAINER": cell(action_target(action)),
                       "NODE": cell(action.node or "-"), "REASON": reason})


def notice_row(notice: alerts_pb2.StreamNotice) -> Row:
    """KIND ``notice``: alerts the collector dropped for this reader."""
    return ALERTS.row({"TIME": cell(format_time(notice_time(notice))),
                       "KIND": cell("notice", NOTICE_STYLE),
                       "REASON": cell(notice_text(notice), NOTICE_STYLE)})


def info_row(when: float, text: str) -> Row:
    """A line about the connection (lost, reconnected, ended)."""
    return ALERTS.row({"TIME": cell(format_epoch(when)), "REASON": cell(text, INFO_STYLE)})


# -- agents --------------------------------------------------------------------------------------


AGENTS = ColumnSet(
    columns=(Column("NODE", 8, 32), Column("CONNECTED", 9, 9), Column("VERSION", 7, 16),
             Column("MODE", 7, 7), Column("CONTAINERS", 10, 10, right=True),
             Column("BASELINES", 9, 9, right=True), Column("SPOOL", 5, 10, right=True),
             Column("DROPPED", 7, 12, right=True), Column("LAST HEARTBEAT", 14, None)),
    shrink=("NODE",),
    hide=("BASELINES", "VERSION", "SPOOL", "CONTAINERS"))


def _count(number: int, style: str = "yellow") -> Text:
    """A count, in `style` above zero."""
    return cell(str(number), style if number > 0 else "")


def _mode_cell(mode: int) -> Text:
    text = enum_text(wire.MODE, mode)
    return cell(text, MODE_STYLES.get(text, ""))


def agent_row(agent: agent_pb2.Agent, now: float) -> Row:
    """CONNECTED ``yes`` green, ``no`` red; SPOOL and DROPPED yellow above zero; BASELINES the
    fleet baselines the agent holds (``agents --baselines`` lists them)."""
    return AGENTS.row({
        "NODE": cell(agent.node or "-"),
        "CONNECTED": cell("yes", "green") if agent.connected else cell("no", "red"),
        "VERSION": cell(agent.agent_version or "-"),
        "MODE": cell(enum_text(wire.MODE, agent.mode)),
        "CONTAINERS": cell(str(agent.containers_watched)),
        "BASELINES": cell(str(len(agent.baselines))),
        "SPOOL": _count(agent.spool_depth),
        "DROPPED": _count(dropped_total(agent)),
        "LAST HEARTBEAT": cell(heartbeat_text(agent, now))})


HELD_BASELINES = ColumnSet(
    columns=(Column("NODE", 8, 32), Column("KEY", 19, 19), Column("MODE", 7, 7),
             Column("VERSION", 7, 10, right=True), Column("FLEET", 5, 10, right=True),
             Column("IMAGE", 10, None)),
    shrink=("NODE",),
    hide=("KEY",))


def held_baseline_row(node: str, held: baselines_pb2.BaselineVersion,
                      fleet: baselines_pb2.BaselineSummary | None) -> Row:
    """What one node holds of one image; FLEET the collector's version (``-``: it has none),
    VERSION yellow while the node's is older."""
    behind = fleet is not None and held.version < fleet.version
    return HELD_BASELINES.row({
        "NODE": cell(node or "-"), "KEY": cell(short_key(held.image_key)),
        "MODE": _mode_cell(held.mode),
        "VERSION": cell(str(held.version), "yellow" if behind else ""),
        "FLEET": cell(str(fleet.version) if fleet is not None else "-"),
        "IMAGE": cell(fleet.image_name if fleet is not None and fleet.image_name else "-")})


# -- fleet baselines -----------------------------------------------------------------------------


BASELINES = ColumnSet(
    columns=(Column("IMAGE", 10, 40), Column("KEY", 19, 19), Column("MODE", 7, 7),
             Column("VERSION", 7, 10, right=True), Column("ITEMS", 5, 7, right=True),
             Column("UNCONFIRMED", 11, 11, right=True), Column("WINDOWS", 7, 8, right=True),
             Column("UPDATED", 20, 20), Column("NODES", 5, None)),
    shrink=("IMAGE",),
    hide=("WINDOWS", "UPDATED", "KEY", "UNCONFIRMED"))


def baseline_row(summary: baselines_pb2.BaselineSummary) -> Row:
    """One baseline of `baseline list`; UNCONFIRMED yellow above zero, NODES comma-separated
    (the nodes whose agents sent what they learned)."""
    updated = summary.updated_at if summary.HasField("updated_at") else None
    return BASELINES.row({
        "IMAGE": cell(summary.image_name or "-"), "KEY": cell(short_key(summary.image_key)),
        "MODE": _mode_cell(summary.mode), "VERSION": cell(str(summary.version)),
        "ITEMS": cell(str(summary.items)), "UNCONFIRMED": _count(summary.unconfirmed),
        "WINDOWS": cell(str(summary.windows)), "UPDATED": cell(format_time(updated)),
        "NODES": cell(",".join(summary.nodes) or "-")})


ITEMS = ColumnSet(columns=(Column("KIND", 7, 7), Column("ITEM", 16, None)))


def item_row(item: baselines_pb2.BaselineItem) -> Row:
    return ITEMS.row({"KIND": cell(item.kind or "?"), "ITEM": cell(item_text(item))})


UNCONFIRMED = ColumnSet(
    columns=(Column("KIND", 7, 7), Column("SHOWN BY", 12, 40), Column("ITEM", 16, None)),
    shrink=("SHOWN BY",))


def unconfirmed_row(evidence: baselines_pb2.ItemEvidence) -> Row:
    """An item held back by consensus, with the containers that showed it (``name@node``)."""
    shown_by = ",".join(container_ref_text(c) for c in evidence.containers)
    return UNCONFIRMED.row({"KIND": cell(evidence.item.kind or "?"),
                            "SHOWN BY": cell(shown_by or "-", "yellow"),
                            "ITEM": cell(item_text(evidence.item))})


HISTORY = ColumnSet(
    columns=(Column("TIME", 20, 20), Column("FROM", 7, 7), Column("TO", 7, 7),
             Column("BY", 8, 24), Column("REASON", 16, None)),
    shrink=("BY",))


def history_row(change: baselines_pb2.ModeChange) -> Row:
    when = change.changed_at if change.HasField("changed_at") else None
    return HISTORY.row({"TIME": cell(format_time(when)),
                        "FROM": _mode_cell(getattr(change, "from")),
                        "TO": _mode_cell(change.to), "BY": cell(change.by or "-"),
                        "REASON": cell(change.reason)})


DIFF = ColumnSet(
    columns=(Column("ONLY IN", 7, 7), Column("KIND", 7, 7), Column("ITEM", 16, None)))


def diff_row(side: str, item: baselines_pb2.BaselineItem) -> Row:
    """An item only image `side` (``A`` or ``B``) has."""
    return DIFF.row({"ONLY IN": cell(side, "bold"), "KIND": cell(item.kind or "?"),
                     "ITEM": cell(item_text(item))})


__all__ = [
    "AGENTS",
    "ALERTS",
    "BASELINES",
    "DIFF",
    "GAP",
    "HELD_BASELINES",
    "HISTORY",
    "ITEMS",
    "UNCONFIRMED",
    "Column",
    "ColumnSet",
    "Row",
    "action_row",
    "agent_row",
    "alert_row",
    "baseline_row",
    "cell",
    "clean_text",
    "diff_row",
    "held_baseline_row",
    "history_row",
    "info_row",
    "item_row",
    "layout",
    "notice_row",
    "plain_header",
    "plain_line",
    "plain_lines",
    "plain_row",
    "rich_table",
    "terminal_console",
    "unconfirmed_row",
]
