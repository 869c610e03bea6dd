"""``driftwarden alerts --follow``: ``Alerts.Subscribe`` until Ctrl-C (or SIGTERM) or the end of
the stream, reconnecting with backoff when the collector goes away, every event handed to a
:class:`driftwarden.ops.printers.Printer`.

A first connection that fails or takes longer than FIRST_CONNECT_TIMEOUT is an error (the
collector is not there); a stream lost later is a line (``lost the collector ...``), a wait
while gRPC reconnects, and a line saying where it resumed: the follower keeps the resume token
of the last alert it got (or of the stream's start), and the new stream sends every alert
stored after it first, in store order, so a collector restart (or another replica of it
answering) loses and repeats nothing. With ``--since`` the stored alerts come first, after the
live stream is open, so none is lost and none shown twice. Alerts come in batches of up to
FOLLOW_BATCH when many wait (the collector drops for a reader that falls behind).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TextIO

import grpc
from driftwarden.ops.client import (
    RECONNECT_BACKOFF,
    UnreachableError,
    collector_address,
    report_rpc_error,
)
from driftwarden.ops.format import format_epoch
from driftwarden.ops.listing import list_alerts
from driftwarden.ops.printers import Printer
from driftwarden.proto.v1 import alerts_pb2, alerts_pb2_grpc, common_pb2

FIRST_CONNECT_TIMEOUT = 10.0  # how long the first connection may take
FOLLOW_BATCH = 500  # alerts per event at most (SubscribeRequest.max_batch)
RESUME_METADATA = "driftwarden-resume-token"  # the collector's token of a stream's start
_POLL = 0.2  # how often waits look at the stop event


@contextlib.contextmanager
def stop_event(given: threading.Event | None) -> Iterator[threading.Event]:
    """`given`, or an event Ctrl-C and SIGTERM set (handlers restored afterwards)."""
    if given is not None or threading.current_thread() is not threading.main_thread():
        yield given or threading.Event()
        return
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda _signum, _frame: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Follower:
    """``alerts --follow`` (the module docstring) for the `args` of `driftwarden alerts`:
    :meth:`run` returns the exit code."""

    def __init__(self, args: argparse.Namespace, channel: grpc.Channel,
                 request_filter: alerts_pb2.AlertFilter, printer: Printer,
                 err: TextIO, stop: threading.Event, clock: Callable[[], float]) -> None:
        self.args = args
        self.clock = clock
        self.channel = channel
        self.stub = alerts_pb2_grpc.AlertsStub(channel)
        self.request_filter = request_filter
        self.request = alerts_pb2.SubscribeRequest(filter=request_filter, include_notices=True,
                                                   include_actions=args.actions,
                                                   max_batch=FOLLOW_BATCH)
        self.resume_token = ""  # where the stream is in the collector's store
        self.printer = printer
        self.err = err
        self.stop = stop
        self.address = collector_address(args)
        self._lock = threading.Lock()
        self._call: Any = None
        self._done = threading.Event()

    def run(self, since: float | None) -> int:
        if not self._first_connect():
            if self.stop.is_set():
                return 0
            return report_rpc_error(UnreachableError(), self.args, self.err)
        watcher = threading.Thread(target=self._cancel_on_stop, name="alerts-follow-stop",
                                   daemon=True)
        watcher.start()
        try:
            return self._loop(since)
        finally:
            self._done.set()
            self._set_call(None)
            watcher.join()
            self.printer.finish()

    def _loop(self, since: float | None) -> int:
        self.printer.start()
        backlog = since is not None
        delay = RECONNECT_BACKOFF[0]
        while not self.stop.is_set():
            request = alerts_pb2.SubscribeRequest()
            request.CopyFrom(self.request)
            request.resume_after = self.resume_token
            call = self.stub.Subscribe(request)
            self._set_call(call)
            if self.stop.is_set():  # stopped before the watcher could see this call
                call.cancel()
            try:
                if not self.resume_token:
                    self.resume_token = dict(call.initial_metadata()).get(RESUME_METADATA, "")
                shown = self._print_backlog(since) if backlog else set()
                backlog = False
                for event in call:
                    self._print_event(event, shown)
                    delay = RECONNECT_BACKOFF[0]
            except grpc.RpcError as exc:
                if self.stop.is_set():
                    return 0
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    self.printer.finish()  # the last frame first, then the error below it
                    return report_rpc_error(exc, self.args, self.err)
                lost_at = self.clock()
                self.printer.info(f"lost the collector at {self.address}; reconnecting...",
                                  "reconnecting")
                if not self._reconnect(delay):
                    return 0
                delay = min(delay * 2, RECONNECT_BACKOFF[1])
                if self.resume_token:
                    self.printer.info(f"reconnected to {self.address}; alerts stored since "
                                      f"{format_epoch(lost_at)} follow first", "following")
                else:
                    self.printer.info(f"reconnected to {self.address}; alerts stored meanwhile "
                                      f"may be missing here (driftwarden alerts --since "
                                      f"{format_epoch(lost_at)})", "following")
                continue
            if self.stop.is_set():
                return 0
            self.printer.info("the collector ended the stream", "ended")
            return 0
        return 0

    def _print_backlog(self, since: float | None) -> set[tuple[str, int, int]]:
        """``--since`` with ``--follow``: the stored alerts first (the live stream is already
        open, so an alert in both is shown once)."""
        alerts = list_alerts(self.stub, self.request_filter, since, self.args.limit)
        for alert in reversed(alerts):
            self.printer.alert(alert)
        return {alert_key(a) for a in alerts}

    def _print_event(self, event: alerts_pb2.AlertEvent, shown: set[tuple[str, int, int]]) -> None:
        kind = event.WhichOneof("event")
        if event.resume_token:
            self.resume_token = event.resume_token
        if kind in ("alert", "batch"):
            for alert in (event.alert,) if kind == "alert" else event.batch.alerts:
                if alert_key(alert) not in shown:
                    self.printer.alert(alert)
        elif kind == "notice":
            self.printer.notice(event.notice)
        elif kind == "action":
            self.printer.action(event.action)

    def _set_call(self, call: Any) -> None:
        with self._lock:
            self._call = call

    def _cancel_on_stop(self) -> None:
        """Watcher thread: cancel the open call when stop is set (wakes the reading loop)."""
        while not self._done.is_set():
            if self.stop.wait(_POLL):
                with self._lock:
                    if self._call is not None:
                        self._call.cancel()
                return

    def _first_connect(self) -> bool:
        """Wait until the channel is up: True when ready, False when it fails (fast: a
        refused connection or TLS handshake) or takes too long."""
        states: list[grpc.ChannelConnectivity] = []
        changed = threading.Event()

        def note(state: grpc.ChannelConnectivity) -> None:
            states.append(state)
            changed.set()

        self.channel.subscribe(note, try_to_connect=True)
        try:
            deadline = time.monotonic() + FIRST_CONNECT_TIMEOUT
            while not self.stop.is_set() and time.monotonic() < deadline:
                changed.wait(_POLL)
                changed.clear()
                if grpc.ChannelConnectivity.READY in states:
                    return True
                if grpc.ChannelConnectivity.TRANSIENT_FAILURE in states or \
                        grpc.ChannelConnectivity.SHUTDOWN in states:
                    return False
            return False
        finally:
            self.channel.unsubscribe(note)

    def _reconnect(self, delay: float) -> bool:
        """Wait `delay`, then until the channel is ready again (gRPC retries the connection
        with backoff meanwhile); False when stopped first."""
        if self.stop.wait(delay):
            return False
        while not self.stop.is_set():
            ready = grpc.channel_ready_future(self.channel)
            try:
                ready.result(timeout=_POLL * 5)
                return True
            except grpc.FutureTimeoutError:
                ready.cancel()
        return False


def alert_key(alert: common_pb2.Alert) -> tuple[str, int, int]:
    """One state of an alert: an update of it (a higher count) is shown again."""
    return alert.id, alert.count, alert.last_seen.ToNanoseconds()


__all__ = ["FIRST_CONNECT_TIMEOUT", "FOLLOW_BATCH", "Follower", "alert_key", "stop_event"]
