"""Live alerts for one open alerts page: `driftwarden alerts --follow --actions` (the
:class:`driftwarden.ops.follow.Follower`, with its reconnects and its backlog) on a thread,
every event handed to the page's server-sent event stream as a small JSON object.

The Follower calls a printer; :class:`FeedPrinter` turns those calls into ``(event, data)``
pairs on an asyncio queue (from the reader thread, through the event loop). Texts are
cleaned of control characters here; the page puts them in with ``textContent``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from driftwarden.core import wire
from driftwarden.ops.console.gateway import ConsoleSettings
from driftwarden.ops.follow import Follower
from driftwarden.ops.format import (
    action_dict,
    clean_text,
    container_text,
    enum_text,
    format_time,
    image_text,
    notice_text,
    reason_text,
)
from driftwarden.proto.v1 import actions_pb2, alerts_pb2, common_pb2

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], None]


def alert_summary(msg: common_pb2.Alert) -> dict[str, Any]:
    """What a row of the alert list shows (texts cleaned; the page escapes them)."""
    return {"id": clean_text(msg.id), "time": format_time(msg.time if msg.HasField("time")
                                                           else None),
            "kind": enum_text(wire.ALERT_KIND, msg.kind),
            "severity": enum_text(wire.SEVERITY, msg.severity),
            "mode": enum_text(wire.MODE, msg.baseline_mode),
            "container": clean_text(container_text(msg.container)),
            "container_id": clean_text(msg.container.id),
            "image": clean_text(image_text(msg.container.image)),
            "node": clean_text(msg.container.node),
            "namespace": clean_text(msg.container.namespace),
            "count": msg.count, "reason": clean_text(reason_text(msg))}


def action_summary(action: actions_pb2.Action) -> dict[str, Any]:
    data = action_dict(action)
    return {key: clean_text(value) if isinstance(value, str) else value
            for key, value in data.items()}


class FeedPrinter:
    """The Follower's printer (:class:`driftwarden.ops.printers.Printer`) for a page."""

    def __init__(self, emit: Emit, on_alert: Callable[[common_pb2.Alert], None]) -> None:
        self.emit = emit
        self.on_alert = on_alert

    def start(self) -> None:
        self.emit("status", {"state": "live", "text": "live"})

    def finish(self) -> None:
        pass

    def alert(self, msg: common_pb2.Alert) -> None:
        self.on_alert(msg)
        self.emit("alert", alert_summary(msg))

    def action(self, action: actions_pb2.Action) -> None:
        self.emit("action", action_summary(action))

    def notice(self, notice: alerts_pb2.StreamNotice) -> None:
        self.emit("status", {"state": "live", "text": notice_text(notice)})

    def info(self, text: str, state: str | None = None) -> None:
        if state in ("reconnecting", "ended"):  # lost, or the collector is shutting down
            self.emit("status", {"state": "unavailable", "text": "collector unavailable"})
        else:
            self.emit("status", {"state": "live", "text": clean_text(text)})


class _ErrorLines(io.TextIOBase):
    """The Follower's error output: each line becomes a status event."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        line = text.strip()
        if line:
            unavailable = "not reachable" in line
            self.emit("status", {"state": "unavailable" if unavailable else "error",
                                 "text": "collector unavailable" if unavailable
                                 else clean_text(line.removeprefix("driftwarden: error: "))})
        return len(text)


class AlertFeed:
    """One page's live stream: :meth:`start` runs the Follower on a thread, :meth:`stop`
    ends it (and waits for it, bounded). Events go to `queue` on `loop`."""

    def __init__(self, settings: ConsoleSettings, channel: grpc.Channel,
                 request_filter: alerts_pb2.AlertFilter, since: float | None,
                 loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
                 on_alert: Callable[[common_pb2.Alert], None], limit: int = 200) -> None:
        self.loop = loop
        self.queue = queue
        self.since = since
        self.stop_event = threading.Event()
        self.follower = Follower(settings.follower_args(limit), channel, request_filter,
                                 FeedPrinter(self._emit, on_alert), _ErrorLines(self._emit),
                                 self.stop_event, time.time)
        self._thread: threading.Thread | None = None

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        if self.stop_event.is_set():
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (event, data))
        except RuntimeError:  # the loop is closed: the page is gone
            self.stop_event.set()

    def _run(self) -> None:
        try:
            self.follower.run(self.since)
        except Exception:
            log.exception("the console's alert stream failed")
            self._emit("status", {"state": "error", "text": "the live stream failed"})
        finally:
            self._emit("end", {})

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="console-alert-feed",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the stream (the page's response ends too) and wait `timeout` for the thread."""
        if not self.stop_event.is_set():
            self.stop_event.set()
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                self.loop.call_soon_threadsafe(self.queue.put_nowait, ("end", {}))
        if self._thread is not None:
            self._thread.join(timeout)


__all__ = ["AlertFeed", "FeedPrinter", "action_summary", "alert_summary"]
