"""Pieces the end-to-end tests share: a live Alerts.Subscribe stream read by a thread, and
read-only queries of a running collector's SQLite file."""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest
from driftwarden.proto.v1 import actions_pb2, alerts_pb2, alerts_pb2_grpc, common_pb2


class HasLogs(Protocol):
    """Whatever can show the processes' logs when a wait fails."""

    def logs(self) -> str: ...


@dataclass
class Subscription:
    """One Alerts.Subscribe stream read by a background thread (:func:`read_subscription`)."""

    call: grpc.Future
    events: list[alerts_pb2.AlertEvent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    error: BaseException | None = None

    def alerts(self) -> list[common_pb2.Alert]:
        with self.lock:
            return [e.alert for e in self.events if e.HasField("alert")]

    def actions(self) -> list[actions_pb2.Action]:
        with self.lock:
            return [e.action for e in self.events if e.HasField("action")]

    def wait_for(self, predicate: Callable[[common_pb2.Alert], bool], what: str,
                 stack: HasLogs, timeout: float = 15.0) -> list[common_pb2.Alert]:
        """The alerts matching `predicate`, once there is at least one."""
        deadline = time.monotonic() + timeout
        while True:
            found = [a for a in self.alerts() if predicate(a)]
            if found:
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"no alert for {what} within {timeout} s (got "
                            f"{[(a.kind, a.container.name) for a in self.alerts()]}, "
                            f"stream error {self.error!r})\n{stack.logs()}")
            time.sleep(0.1)

    def wait_for_actions(self, predicate: Callable[[actions_pb2.Action], bool], count: int,
                         what: str, stack: HasLogs,
                         timeout: float = 20.0) -> list[actions_pb2.Action]:
        """The action events matching `predicate`, once there are at least `count`."""
        deadline = time.monotonic() + timeout
        while True:
            found = [a for a in self.actions() if predicate(a)]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                pytest.fail(f"{len(found)} of {count} action events for {what} within "
                            f"{timeout} s ({found}, stream error {self.error!r})\n"
                            f"{stack.logs()}")
            time.sleep(0.1)


def read_subscription(sub: Subscription) -> None:
    """Thread body: append every event; keep the error unless the test cancelled the call."""
    try:
        for event in sub.call:
            with sub.lock:
                sub.events.append(event)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.CANCELLED:
            sub.error = exc


class Subscriptions:
    """Opens subscriptions on one channel (each live at the collector when `open` returns) and
    cancels them all on close."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stub = alerts_pb2_grpc.AlertsStub(channel)
        self._opened: list[tuple[Subscription, threading.Thread]] = []

    def __enter__(self) -> Subscriptions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self, request: alerts_pb2.SubscribeRequest) -> Subscription:
        call = self._stub.Subscribe(request)
        call.initial_metadata()  # sent once the collector has registered the subscriber
        sub = Subscription(call)
        thread = threading.Thread(target=read_subscription, args=(sub,), daemon=True,
                                  name="e2e-subscription")
        thread.start()
        self._opened.append((sub, thread))
        return sub

    def close(self) -> None:
        for sub, thread in self._opened:
            sub.call.cancel()
            thread.join(timeout=5)
        self._opened.clear()


def query(db: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Rows of `sql` on the collector's store, opened read-only (the collector may be running:
    SQLite's WAL lets a reader see every committed transaction)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)) as conn:
        return conn.execute(sql, tuple(params)).fetchall()


def wait_until(predicate: Callable[[], Any], what: str, stack: HasLogs,
               timeout: float = 20.0, interval: float = 0.2) -> Any:
    """`predicate()`'s first true value (polled every `interval` s), else fail with the logs."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{stack.logs()}")
        time.sleep(interval)
