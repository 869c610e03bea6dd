"""``alerts --follow`` on a terminal: a live table of the newest alerts, actions, overflow
notices and connection events, with a status line.

Two objects. :class:`LiveAlertView` keeps the newest rows (bounded; an updated alert replaces
its row and moves to the bottom) and the counts; the stream reader only appends to it under a
short lock. :class:`LiveDisplay` owns every write to the terminal: from its own thread it starts
rich's ``Live``, redraws at most `refresh_per_second` times a second and only when the view or
the terminal size changed, and stops it. A slow or stalled terminal therefore delays the
picture, never the reader (the collector drops alerts for a subscriber that does not read, and
says so with an overflow notice).

Each frame is the alerts table of :mod:`driftwarden.ops.tables` laid out for the terminal's
width with the REASON column filling the rest of the line, so the reason shows at any width.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Hashable

from driftwarden.ops.format import clean_text
from driftwarden.ops.tables import (
    ALERTS,
    NOTICE_STYLE,
    Row,
    action_row,
    alert_row,
    info_row,
    layout,
    notice_row,
    rich_table,
)
from driftwarden.proto.v1 import actions_pb2, alerts_pb2, common_pb2
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.text import Text

log = logging.getLogger(__name__)

REFRESH_PER_SECOND = 4.0
LIVE_CAPACITY = 1000  # rows the live view remembers (more than any terminal shows)
# Lines of the live frame that are not rows: header, its rule, the status line, and one spare
# so a full frame never scrolls the terminal.
LIVE_CHROME_LINES = 4

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


def _check_state(state: str) -> None:
    if state not in _STATES:
        raise ValueError(f"unknown live view state {state!r} (one of {', '.join(_STATES)})")


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
        _check_state(state)
        with self._lock:
            self._state = state
            self._note = ""
            self._version += 1

    def _put(self, key: Hashable | None, row: Row, *, alerts: int = 0, actions: int = 0,
             dropped: int = 0, state: str | None = None, note: str = "") -> None:
        if state is not None:
            _check_state(state)
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
        """The table of the newest rows that fit `height` lines, then the status line; the
        REASON column gets the rest of the `width`."""
        rows = self.rows(max(height - LIVE_CHROME_LINES, 1))
        return Group(rich_table(ALERTS, rows, layout(ALERTS, rows, width, fill=True)),
                     self.status())


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
    "LIVE_CAPACITY",
    "LiveAlertView",
    "LiveDisplay",
    "status_text",
]
