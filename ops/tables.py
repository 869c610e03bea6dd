"""Cells and rich tables for the operator CLI (`driftwarden alerts`, `agents`) on a terminal.

Pure parts, testable without a terminal: :func:`alert_cells` (the plain table's texts, shared
with operator_cmd), :func:`alert_row`, :func:`action_row`, :func:`notice_row` and
:func:`info_row` (one row of rich ``Text`` cells each, in :data:`COLUMNS` order, control
characters replaced), :func:`column_widths` (the columns laid out for a terminal width) and
:func:`status_text`. :func:`alerts_table` and :func:`agents_table` build ``rich.table.Table``s.

``alerts --follow`` on a terminal is two objects. :class:`LiveAlertView` keeps the newest rows
(bounded; an updated alert replaces its row and moves to the bottom) and counts; the stream
reader only appends to it under a short lock. :class:`LiveDisplay` owns every write to the
terminal: from its own thread it starts rich's ``Live``, redraws at most `refresh_per_second`
times a second and only when the view or the terminal size changed, and stops it. A slow or
stalled terminal therefore delays the picture, never the reader (the collector drops alerts
for a subscriber that does not read, and says so with an overflow notice).

Plain output for pipes and files and JSON lines stay in operator_cmd, unchanged.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
from collections.abc import Hashable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TextIO

from driftwarden.core import wire
from driftwarden.proto.v1 import actions_pb2, alerts_pb2, common_pb2
from google.protobuf.timestamp_pb2 import Timestamp
from rich import box
from rich.cells import cell_len
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

log = logging.getLogger(__name__)

SEVERITY_STYLES = {"critical": "bold white on red", "high": "bold red", "medium": "yellow",
                   "low": "cyan"}
STATUS_STYLES = {"done": "green", "already": "green", "pending": "dim", "skipped": "yellow",
                 "failed": "bold red", "refused": "red", "container-gone": "red"}
ACTION_STYLE = "magenta"
NOTICE_STYLE = "bold red"
INFO_STYLE = "dim italic"
HEADER_STYLE = "bold"
GAP = 2  # columns between cells
REFRESH_PER_SECOND = 4.0
LIVE_CAPACITY = 1000  # rows the live view remembers (more than any terminal shows)
# Lines of the live frame that are not rows: header, its rule, the status line, and one spare
# so a full frame never scrolls the terminal.
LIVE_CHROME_LINES = 4


# -- texts ---------------------------------------------------------------------------------------


def clean_text(text: str) -> str:
    """`text` with every non-printable character (newline, ESC, ...) as ``?``."""
    return "".join(c if c.isprintable() else "?" for c in text)


def format_time(ts: Timestamp | None) -> str:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return "-"
    return datetime.fromtimestamp(ts.seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_epoch(seconds: float) -> str:
    return datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def enum_text(enum: wire.EnumText, number: int) -> str:
    """An enum number's text; ``-`` for unspecified, the number for one this build lacks."""
    try:
        return enum.from_proto(number)
    except wire.InvalidMessage:
        return "-" if number == 0 else str(number)


def alert_cells(msg: common_pb2.Alert) -> list[str]:
    """TIME KIND SEV CONTAINER IMAGE NODE REASON (the plain table's order)."""
    container = msg.container
    if container.HasField("name"):
        name = container.name
    else:
        name = container.id[:12] if container.HasField("id") else "-"
    image = container.image
    if image.HasField("name"):
        image_text = image.name
    else:
        image_text = image.id[:19] if image.HasField("id") else "-"
    reason = "-"
    if msg.reasons:
        reason = msg.reasons[0].text or msg.reasons[0].code
    cells = [format_time(msg.time if msg.HasField("time") else None),
             enum_text(wire.ALERT_KIND, msg.kind), enum_text(wire.SEVERITY, msg.severity),
             name, image_text, container.node or "-", reason]
    return [clean_text(c) or "-" for c in cells]


def notice_text(notice: alerts_pb2.StreamNotice) -> str:
    noun = "alert" if notice.dropped == 1 else "alerts"
    return clean_text(f"{notice.dropped} {noun} dropped ({notice.text or 'slow reader'})")


def requested_by_text(who: str) -> str:
    """``"policy:R"`` -> ``"policy rule R"``; ``"operator:alice"`` -> ``"by operator alice"``."""
    if who.startswith("policy:"):
        return f"policy rule {who.removeprefix('policy:')}"
    return f"by {who.replace(':', ' ', 1)}" if who else ""


def action_target(action: actions_pb2.Action) -> str:
    return action.container_name or action.container_id[:12] or "?"


# -- rows ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TableColumn:
    name: str
    cap: int | None  # the widest it gets; None: the rest of the line
    narrowest: int  # shrunk no further (hidden instead, if it may be)
    right: bool = False


COLUMNS = (TableColumn("TIME", 20, 20), TableColumn("SEV", 8, 8), TableColumn("KIND", 7, 7),
           TableColumn("NODE", 12, 8), TableColumn("CONTAINER", 18, 10),
           TableColumn("IMAGE", 24, 10), TableColumn("REASON", None, 16),
           TableColumn("COUNT", 5, 5, right=True))
_REASON = next(i for i, c in enumerate(COLUMNS) if c.cap is None)
_SHRINK_ORDER = ("IMAGE", "CONTAINER", "NODE")  # when the reason would get too narrow
_HIDE_ORDER = ("COUNT", "NODE", "IMAGE")  # when shrinking is not enough

Row = list[Text]


def _cell(text: str, style: str = "") -> Text:
    return Text(clean_text(text), style=style)


def alert_row(msg: common_pb2.Alert) -> Row:
    time_text, kind, severity, name, image, node, reason = alert_cells(msg)
    return [_cell(time_text), _cell(severity, SEVERITY_STYLES.get(severity, "")), _cell(kind),
            _cell(node), _cell(name), _cell(image), _cell(reason), _cell(str(msg.count))]


def action_time(action: actions_pb2.Action) -> Timestamp | None:
    for field in ("finished_at", "requested_at"):
        if action.HasField(field):
            return getattr(action, field)
    return None


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
    return [_cell(format_time(action_time(action))), _cell(""), _cell("action", ACTION_STYLE),
            _cell(action.node or "-"), _cell(action_target(action)), _cell("-"), reason,
            _cell("")]


def notice_row(notice: alerts_pb2.StreamNotice) -> Row:
    when = notice.time if notice.HasField("time") else None
    return [_cell(format_time(when)), _cell(""), _cell("notice", NOTICE_STYLE), _cell(""),
            _cell(""), _cell(""), _cell(notice_text(notice), NOTICE_STYLE), _cell("")]


def info_row(when: float, text: str) -> Row:
    """A line about the connection (lost, reconnected, ended)."""
    return [_cell(format_epoch(when)), *(_cell("") for _ in range(_REASON - 1)),
            _cell(text, INFO_STYLE), _cell("")]


# -- layout --------------------------------------------------------------------------------------


def column_widths(width: int, rows: Sequence[Row], *, fill: bool = False) -> dict[str, int]:
    """Each shown column's width (in :data:`COLUMNS` order) for a terminal `width`.

    TIME, SEV, KIND and COUNT have fixed widths (so the live view's columns do not jump);
    NODE, CONTAINER and IMAGE are as wide as their widest cell in `rows` (header included) up
    to their caps; REASON as wide as needed up to the rest of the line, or with `fill` (the
    live view, whose rows change) the rest of the line. When REASON would get fewer than 16
    characters, IMAGE, CONTAINER and NODE shrink (to 10, 10, 8), then COUNT, NODE and IMAGE
    are hidden, in that order.
    """
    natural: dict[str, int] = {}
    for i, col in enumerate(COLUMNS):
        if col.cap is None:
            continue
        if col.cap == col.narrowest:
            natural[col.name] = col.cap
        else:
            natural[col.name] = min(col.cap, max([len(col.name),
                                                  *(cell_len(r[i].plain) for r in rows)]))
    narrowest = {c.name: c.narrowest for c in COLUMNS}
    reason_min = COLUMNS[_REASON].narrowest

    def rest() -> int:  # what is left for REASON
        return width - sum(natural.values()) - GAP * len(natural)

    for name in _SHRINK_ORDER:
        short = reason_min - rest()
        if short <= 0:
            break
        natural[name] = max(natural[name] - short, min(narrowest[name], natural[name]))
    for name in _HIDE_ORDER:
        if rest() >= reason_min:
            break
        del natural[name]
    reason = max(rest(), 1)
    if not fill:
        wanted = max([len(COLUMNS[_REASON].name), *(cell_len(r[_REASON].plain) for r in rows)])
        reason = min(reason, wanted)
    natural[COLUMNS[_REASON].name] = reason
    return {c.name: natural[c.name] for c in COLUMNS if c.name in natural}


def alerts_table(rows: Sequence[Row], widths: Mapping[str, int]) -> Table:
    """The alert table with the columns in `widths` (from :func:`column_widths`), one line a
    row: cells that do not fit end with an ellipsis."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  header_style=HEADER_STYLE, collapse_padding=False)
    shown = [i for i, col in enumerate(COLUMNS) if col.name in widths]
    for i in shown:
        col = COLUMNS[i]
        table.add_column(col.name, width=widths[col.name], no_wrap=True, overflow="ellipsis",
                         justify="right" if col.right else "left")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    return table


def agents_table(columns: Sequence[tuple[str, bool]], rows: Sequence[Sequence[str]]) -> Table:
    """`columns`: (name, right-aligned); `rows`: plain texts. CONNECTED ``yes`` is green and
    ``no`` red; a DROPPED or SPOOL count above zero is yellow."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0),
                  header_style=HEADER_STYLE, collapse_padding=False)
    for name, right in columns:
        table.add_column(name, no_wrap=True, overflow="ellipsis",
                         justify="right" if right else "left")
    names = [name for name, _ in columns]
    for cells in rows:
        styled = []
        for name, text in zip(names, cells, strict=True):
            style = ""
            if name == "CONNECTED":
                style = "green" if text == "yes" else "red"
            elif name in ("DROPPED", "SPOOL") and text.isdigit() and int(text) > 0:
                style = "yellow"
            styled.append(_cell(text, style))
        table.add_row(*styled)
    return table


def terminal_console(file: TextIO, env: Mapping[str, str]) -> Console:
    """A rich console on `file`, which the caller found to be a terminal. ``NO_COLOR`` (set,
    not empty) turns colours off; bold and dim stay. No markup, emoji or highlighting: every
    text is drawn as given."""
    return Console(file=file, force_terminal=True, no_color=bool(env.get("NO_COLOR")),
                   markup=False, emoji=False, highlight=False)


# -- the live view -------------------------------------------------------------------------------


_STATES = {"connecting": ("connecting to {collector}...", "yellow"),
           "following": ("following {collector}", "green"),
           "reconnecting": ("lost {collector}; reconnecting...", "bold yellow"),
           "ended": ("{collector} ended the stream", "dim"),
           "stopped": ("stopped", "dim")}


def status_text(collector: str, state: str, alerts: int, actions: int, dropped: int,
                note: str = "") -> Text:
    """``following 127.0.0.1:50051 | 3 alerts, 1 action | 12 dropped by the collector (slow
    reader) | Ctrl-C quits`` (one line; cut with an ellipsis on a narrow terminal). `note`,
    when given, replaces the state's words (in the state's colour)."""
    template, style = _STATES[state]
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(clean_text(note or template.format(collector=collector)), style)
    text.append(f" | {alerts} alert{'' if alerts == 1 else 's'}, "
                f"{actions} action{'' if actions == 1 else 's'}")
    if dropped:
        text.append(" | ")
        text.append(f"{dropped} dropped by the collector (slow reader)", NOTICE_STYLE)
    if state in ("connecting", "following", "reconnecting"):
        text.append(" | Ctrl-C quits", "dim")
    return text


class LiveAlertView:
    """The newest rows of ``alerts --follow`` and the status line's counts. Thread-safe: the
    stream reader adds, the display thread renders."""

    def __init__(self, collector: str, *, capacity: int = LIVE_CAPACITY) -> None:
        self.collector = collector
        self.capacity = capacity
        self._lock = threading.Lock()
        self._rows: collections.OrderedDict[Hashable, Row] = collections.OrderedDict()
        self._serial = itertools.count()
        self._version = 0
        self._state = "connecting"
        self._note = ""
        self._alerts = 0
        self._actions = 0
        self._dropped = 0

    @property
    def version(self) -> int:
        """Grows with every change (the display redraws when it moved)."""
        with self._lock:
            return self._version

    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    def add_alert(self, msg: common_pb2.Alert) -> None:
        """A new alert is a row at the bottom; a known one (same id) replaces its row there."""
        self._put(("alert", msg.id), alert_row(msg), alerts=1)

    def add_action(self, action: actions_pb2.Action) -> None:
        self._put(None, action_row(action), actions=1)

    def add_notice(self, notice: alerts_pb2.StreamNotice) -> None:
        self._put(None, notice_row(notice), dropped=notice.dropped)

    def add_info(self, when: float, text: str, state: str | None = None) -> None:
        """A row about the connection; with `state`, also the status line's state, worded as
        `text` (a row's reason may be cut; the status line has the width of the terminal)."""
        self._put(None, info_row(when, text), state=state, note=text)

    def set_state(self, state: str) -> None:
        if state not in _STATES:
            raise ValueError(f"unknown live view state {state!r} (one of {', '.join(_STATES)})")
        with self._lock:
            self._state = state
            self._note = ""
            self._version += 1

    def _put(self, key: Hashable | None, row: Row, *, alerts: int = 0, actions: int = 0,
             dropped: int = 0, state: str | None = None, note: str = "") -> None:
        if state is not None and state not in _STATES:
            raise ValueError(f"unknown live view state {state!r} (one of {', '.join(_STATES)})")
        with self._lock:
            if key is None:
                key = next(self._serial)
            else:
                self._rows.pop(key, None)
            self._rows[key] = row
            while len(self._rows) > self.capacity:
                self._rows.popitem(last=False)
            self._alerts += alerts
            self._actions += actions
            self._dropped += dropped
            if state is not None:
                self._state = state
                self._note = note
            self._version += 1

    def rows(self, limit: int | None = None) -> list[Row]:
        """The newest `limit` rows (all without), oldest first."""
        with self._lock:
            if limit is None:
                return list(self._rows.values())
            newest = list(itertools.islice(reversed(self._rows.values()), max(limit, 0)))
        newest.reverse()
        return newest

    def status(self) -> Text:
        with self._lock:
            return status_text(self.collector, self._state, self._alerts, self._actions,
                               self._dropped, self._note)

    def render(self, width: int, height: int) -> RenderableType:
        """The table of the newest rows that fit `height` lines, then the status line."""
        rows = self.rows(max(height - LIVE_CHROME_LINES, 1))
        return Group(alerts_table(rows, column_widths(width, rows, fill=True)), self.status())


class LiveDisplay:
    """Draws a :class:`LiveAlertView` with rich's ``Live`` from a thread of its own (see the
    module docstring); :meth:`start` and :meth:`stop` never write to the terminal themselves,
    though :meth:`stop` waits for the thread's last frame."""

    def __init__(self, console: Console, view: LiveAlertView, *,
                 refresh_per_second: float = REFRESH_PER_SECOND) -> None:
        if refresh_per_second <= 0:
            raise ValueError(f"refresh_per_second must be above 0, got {refresh_per_second}")
        self.console = console
        self.view = view
        self.interval = 1.0 / refresh_per_second
        self._live = Live(console=console, auto_refresh=False, transient=False,
                          redirect_stdout=False, redirect_stderr=False,
                          vertical_overflow="crop", get_renderable=self._frame)
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.frames = 0  # frames drawn, for tests and debugging

    def _frame(self) -> RenderableType:
        size = self.console.size
        return self.view.render(size.width, size.height)

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="alerts-live-display",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Draw the last frame, restore the cursor and end the thread (idempotent)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._halt.set()
        thread.join()

    def _run(self) -> None:
        try:
            self._live.start(refresh=False)
            drawn: tuple[int, object] | None = None
            while True:
                seen = (self.view.version, self.console.size)
                if seen != drawn:
                    self._live.refresh()
                    self.frames += 1
                    drawn = seen
                if self._halt.wait(self.interval):
                    break
        except Exception:  # the terminal went away; the reader goes on, nothing to show it on
            log.debug("live alert display failed", exc_info=True)
        finally:
            try:
                self._live.stop()  # the last frame, the cursor back
            except Exception:
                log.debug("live alert display could not stop cleanly", exc_info=True)


__all__ = [
    "COLUMNS",
    "LiveAlertView",
    "LiveDisplay",
    "action_row",
    "action_target",
    "action_time",
    "agents_table",
    "alert_cells",
    "alert_row",
    "alerts_table",
    "clean_text",
    "column_widths",
    "enum_text",
    "format_epoch",
    "format_time",
    "info_row",
    "notice_row",
    "notice_text",
    "requested_by_text",
    "status_text",
    "terminal_console",
]
