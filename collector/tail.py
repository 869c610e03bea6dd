"""The store tail: what any replica stores, published to this replica's subscribers, once, in
store order.

Every alert change gets the store's next ``seq`` (:mod:`~driftwarden.collector.store`: store
order, committed in that order). One :class:`StoreTail` per collector process keeps a cursor
(the last seq it published) and one thread that publishes every change after it to the local
:class:`~driftwarden.collector.fanout.FanoutHub`, in seq order, each once:

- changes this replica stored are handed over by the ingest (:meth:`StoreTail.stored`) with
  their message built once and published at once by the ingest's thread (so they reach
  subscribers before the policy's action events about them); while they continue the cursor
  without a hole they come from memory, with no read of the store (a single SQLite collector
  never reads it);
- changes of other replicas, announced by :meth:`StoreTail.wake` (PostgreSQL LISTEN/NOTIFY,
  wired by the service), a hole before this replica's own changes, and every `poll_seconds`
  anyway (a notification may be lost with a connection), make it read the store after the
  cursor (``alerts_after``) and publish what it finds, taking this replica's own messages
  where it has them.

:meth:`StoreTail.subscribe` joins the hub and returns the cursor at that moment (no publish
runs meanwhile), so a subscriber gets every change after that seq from its queue and, when it
resumes from an older seq, reads the ones up to it from the store.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from driftwarden.collector.convert import PublishedAlert, alert_message
from driftwarden.collector.fanout import FanoutHub, SubscriberFilter, Subscription
from driftwarden.collector.store import CollectorStore
from driftwarden.core.errors import StoreError
from driftwarden.core.lifecycle import Service
from driftwarden.proto.v1 import alerts_pb2

log = logging.getLogger(__name__)

READ_BATCH = 1000  # alerts per read of the store
DEFAULT_POLL_SECONDS = 1.0  # the store is read this often even when nothing announced a change
RETRY_SECONDS = 0.5  # after a failed read


def published_alert(seq: int, doc: dict[str, Any], message: Any = None,
                    stored_at: float | None = None) -> PublishedAlert:
    """An alert as the hub gets it: its AlertEvent (with `message`, else built from `doc`)
    built once for every subscriber, carrying the seq as its resume token."""
    published = PublishedAlert(doc)
    published.seq = seq
    published.stored_at = stored_at
    published.event = alerts_pb2.AlertEvent(
        alert=message if message is not None else alert_message(doc), resume_token=str(seq))
    return published


class StoreTail(Service):
    """One replica's tail of the store (module docstring). Thread-safe."""

    def __init__(self, store: CollectorStore, hub: FanoutHub, *,
                 poll_seconds: float = DEFAULT_POLL_SECONDS) -> None:
        super().__init__()
        if not poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self._store = store
        self._hub = hub
        self._poll = poll_seconds
        self._cond = threading.Condition(threading.Lock())
        self._own: dict[int, PublishedAlert] = {}  # seq -> this replica's, not yet published
        self._announced = False  # another replica stored changes
        self._stopping = False
        self._publishing = threading.Lock()  # publish + cursor, against subscribe()
        self._cursor = store.last_alert_seq()
        self.read_count = 0  # reads of the store (for tests and metrics)
        self.published = 0
        self._thread = threading.Thread(target=self._run, name="driftwarden-store-tail",
                                        daemon=True)

    @property
    def cursor(self) -> int:
        """The seq of the last change published."""
        return self._cursor

    def _start(self) -> None:
        self._thread.start()

    def _stop(self, timeout: float | None) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def stored(self, alerts: list[PublishedAlert]) -> None:
        """This replica committed these changes (each with its seq): publish them, and what
        other replicas committed before them, before returning."""
        with self._cond:
            for published in alerts:
                if published.seq > self._cursor:
                    self._own[published.seq] = published
        self._publish_now(False)

    def catch_up(self) -> None:
        """Publish what the store holds after the cursor now, before returning (e.g. before
        an event about those alerts)."""
        self._publish_now(True)

    def _publish_now(self, read: bool) -> None:
        """_catch_up in the caller's thread; a failed read is left to the tail's thread."""
        try:
            self._catch_up(read)
        except (StoreError, ValueError) as exc:
            log.warning("store tail: reading alerts after seq %d failed (%s); retrying",
                        self._cursor, exc)
            self.wake()

    def wake(self) -> None:
        """Another replica committed changes (or may have): read the store."""
        with self._cond:
            self._announced = True
            self._cond.notify()

    def subscribe(self, alert_filter: SubscriberFilter | None, max_queue: int, *,
                  name: str = "") -> tuple[Subscription, int]:
        """A hub subscription and the cursor when it joined: its queue gets every change
        after that seq."""
        with self._publishing:
            return self._hub.subscribe(alert_filter, max_queue, name=name), self._cursor

    def _run(self) -> None:
        next_poll = time.monotonic() + self._poll
        while True:
            with self._cond:
                if not self._own and not self._announced and not self._stopping:
                    self._cond.wait(max(0.0, next_poll - time.monotonic()))
                if self._stopping:
                    return
                read = self._announced or time.monotonic() >= next_poll
                self._announced = False
            if read:
                next_poll = time.monotonic() + self._poll
            try:
                self._catch_up(read)
            except (StoreError, ValueError) as exc:
                log.warning("store tail: reading alerts after seq %d failed (%s); retrying",
                            self._cursor, exc)
                with self._cond:
                    self._announced = True
                    self._cond.wait(RETRY_SECONDS)
            except Exception:  # a bug: keep publishing what comes next
                log.exception("store tail: publishing after seq %d failed", self._cursor)

    def _catch_up(self, read: bool) -> None:
        """Publish this replica's changes that continue the cursor; read the store when asked
        to, or when the next of them leaves a hole (another replica's change)."""
        with self._publishing:
            while True:
                with self._cond:
                    own = self._own.pop(self._cursor + 1, None)
                    hole = own is None and bool(self._own)
                if own is not None:
                    self._publish(own)
                    continue
                if not (read or hole):
                    return
                rows = self._store.alerts_after(self._cursor, limit=READ_BATCH)
                self.read_count += 1
                for seq, doc in rows:
                    with self._cond:
                        own = self._own.pop(seq, None)
                    if own is None:
                        try:
                            own = published_alert(seq, doc)
                        except Exception:  # one unreadable alert must not stop the stream
                            log.exception("store tail: alert %s (seq %d) cannot be sent to "
                                          "subscribers; skipped", doc.get("id"), seq)
                            self._cursor = seq
                            continue
                    self._publish(own)
                with self._cond:  # what the read passed (an alert changed again meanwhile)
                    for seq in [s for s in self._own if s <= self._cursor]:
                        del self._own[seq]
                if len(rows) < READ_BATCH and (not rows or not self._own):
                    return
                read = len(rows) == READ_BATCH

    def _publish(self, published: PublishedAlert) -> None:
        self._hub.publish(published)
        self._cursor = published.seq
        self.published += 1


__all__ = ["DEFAULT_POLL_SECONDS", "StoreTail", "published_alert"]
