"""The subscriber hub: every alert the collector receives, fanned out to filtered subscribers.

A subscriber (an ``Alerts.Subscribe`` stream) gets a :class:`Subscription` from
:meth:`FanoutHub.subscribe`, with a :class:`SubscriberFilter` built once from the request's
plain arguments. :meth:`FanoutHub.publish` hands an alert (an ``Alert.to_dict()`` dict plus
``"node"``) to every subscriber whose filter matches it; it never blocks and costs
O(subscribers): each subscriber has its own bounded queue, and a full queue drops the item for
that subscriber only.

Items a subscription yields (2-tuples; the dicts are shared between subscribers: read-only)
    ``("alert", alert_dict)``
        a published alert that matched the filter.
    ``("action", {"event": kind, **payload})``
        an action event from :meth:`FanoutHub.publish_event` (``kind``: "taken", "skipped",
        "failed", ...; the payload is the caller's, e.g. the action, container and reason).
    ``("notice", {"dropped": N, "total_dropped": M, "text": "..."})``
        the subscriber fell behind: its queue was full and N items (alerts and action events)
        published at this point were dropped for it (M: dropped over the subscription's life).
        The notice stands exactly where the gap is: after the items queued before the drops and
        before every item queued after them. Notices are never dropped (consecutive drops add
        up in one notice), so a slow subscriber always learns how much it missed.

Filter semantics (:class:`SubscriberFilter`; every argument optional, empty = no constraint)
    Exactly those of :class:`driftwarden.collector.filters.AlertFilter` (kinds, min_severity,
    nodes, namespaces, images, containers and the exclude lists), which the store's SQL applies
    too, so a subscription and an ``Alerts.List`` with the same filter select the same alerts.
    ``actions`` says which action events the subscriber gets: "matching" (default: events whose
    related alert matches the filter, and, for an unfiltered subscriber, events without a
    related alert too), "all" (every action event), or "none".

A reader takes one item at a time (``get``, ``items()``) or everything queued up to a bound
(``get_batch``, ``batches()``: one wake-up and one lock round for many alerts, which is how a
gRPC stream keeps up with thousands of alerts a second); the order and the notices are the
same either way.

Subscriptions are context managers; ``close()`` (or leaving the ``with``) unsubscribes, and
:meth:`FanoutHub.close` closes every subscription and wakes any reader blocked in ``get``.
Threads only (gRPC servicers run in a thread pool); every method is thread-safe.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from driftwarden.collector.filters import AlertFilter
from driftwarden.core.alerts import Severity
from driftwarden.core.errors import FilterError
from driftwarden.core.lifecycle import Service

log = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 1000
ACTION_SCOPES = ("matching", "all", "none")


class SubscriberFilter:
    """Which alerts (and action events) a subscriber wants: an :class:`AlertFilter` (the one
    definition of the matching rules) plus the ``actions`` scope.

    Arguments are plain values as a request carries them (empty list / None / "" = any);
    bad values raise :class:`FilterError`. Semantics in the module docstring.
    """

    __slots__ = ("actions", "alert_filter", "unfiltered")

    def __init__(
        self,
        *,
        kinds: Iterable[str] | None = None,
        min_severity: str | Severity | None = None,
        nodes: Iterable[str] | None = None,
        namespaces: Iterable[str] | None = None,
        images: Iterable[str] | None = None,
        containers: Iterable[str] | None = None,
        exclude_images: Iterable[str] | None = None,
        exclude_namespaces: Iterable[str] | None = None,
        exclude_containers: Iterable[str] | None = None,
        actions: str = "matching",
    ) -> None:
        if isinstance(min_severity, str) and not min_severity.strip():
            min_severity = None
        try:
            self.alert_filter = AlertFilter(
                kinds=kinds, min_severity=min_severity, nodes=nodes, namespaces=namespaces,
                images=images, containers=containers, exclude_images=exclude_images,
                exclude_namespaces=exclude_namespaces, exclude_containers=exclude_containers)
        except ValueError as exc:
            raise FilterError(str(exc)) from None
        if actions not in ACTION_SCOPES:
            raise FilterError(f"actions: unknown value {actions!r}; allowed: "
                              + ", ".join(ACTION_SCOPES))
        self.actions = actions
        self.unfiltered = self.alert_filter.empty

    def matches(self, alert: Mapping[str, Any]) -> bool:
        """Whether `alert` (an ``Alert.to_dict()`` dict with ``"node"``) passes the filter."""
        return self.unfiltered or self.alert_filter.matches(alert)

    def wants_event(self, match_alert: Mapping[str, Any] | None) -> bool:
        """Whether an action event (about `match_alert`, or about none) goes to this subscriber."""
        if self.actions == "all":
            return True
        if self.actions == "none":
            return False
        return self.unfiltered if match_alert is None else self.matches(match_alert)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class _Gap:
    """Where a run of dropped items would have been, in a subscriber's queue."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 1


class Subscription(Service):
    """One subscriber's bounded queue. Made by :meth:`FanoutHub.subscribe`.

    ``get(timeout)`` returns the next item, or None on timeout or once closed; ``items()`` (and
    iterating the subscription) yields items until it is closed. Pending items are discarded
    when it closes.
    """

    def __init__(self, hub: FanoutHub, sub_id: int, filter: SubscriberFilter,
                 max_queue: int, name: str) -> None:
        super().__init__()
        self.id = sub_id
        self.name = name
        self.filter = filter
        self.max_queue = max_queue
        self._hub = hub
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[tuple[str, Any] | _Gap] = deque()
        self._queued = 0  # items in _queue, gaps not counted
        self._closed = False
        self.matched = 0  # items offered to this subscriber (its filter matched)
        self.delivered = 0  # alerts and action events returned by get()
        self.dropped = 0  # items dropped because the queue was full
        self.discarded = 0  # items still queued when the subscription closed

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def pending(self) -> int:
        """Items queued and not yet taken (notices not counted)."""
        return self._queued

    def _offer(self, item: tuple[str, Any]) -> bool:
        """Queue `item` unless the queue is full (then count a drop); never blocks for long."""
        with self._cond:
            if self._closed:
                return False
            self.matched += 1
            if self._queued >= self.max_queue:
                self.dropped += 1
                tail = self._queue[-1] if self._queue else None
                if isinstance(tail, _Gap):
                    tail.count += 1
                else:
                    self._queue.append(_Gap())
                return False
            self._queue.append(item)
            self._queued += 1
            self._cond.notify()
            return True

    def get(self, timeout: float | None = None) -> tuple[str, Any] | None:
        """The next item; None after `timeout` seconds without one (None = wait) or if closed."""
        batch = self.get_batch(1, timeout)
        return batch[0] if batch else None

    def get_batch(self, max_items: int, timeout: float | None = None) -> list[tuple[str, Any]]:
        """Up to `max_items` items at once, in order (waiting up to `timeout` for the first;
        none after it, or if closed): a reader that takes what is queued in one go keeps up
        with more alerts per second. A notice stands where its gap is, as with ``get``."""
        with self._cond:
            if not self._queue and not self._closed:
                self._cond.wait_for(lambda: self._queue or self._closed, timeout)
            if self._closed:
                return []
            out: list[tuple[str, Any]] = []
            while self._queue and len(out) < max_items:
                entry = self._queue.popleft()
                if isinstance(entry, _Gap):
                    out.append(("notice", {
                        "dropped": entry.count,
                        "total_dropped": self.dropped,
                        "text": f"{_plural(entry.count, 'item')} dropped here: this subscriber "
                                f"fell behind and its queue ({_plural(self.max_queue, 'item')}) "
                                f"was full",
                    }))
                    continue
                self._queued -= 1
                self.delivered += 1
                out.append(entry)
            return out

    def items(self, poll_seconds: float | None = None,
              stop: Callable[[], bool] | None = None) -> Iterator[tuple[str, Any]]:
        """Yield items until closed, or until `stop()` is true (checked every `poll_seconds`,
        e.g. a gRPC context's ``lambda: not context.is_active()``)."""
        for batch in self.batches(1, poll_seconds, stop):
            yield from batch

    def batches(self, max_items: int, poll_seconds: float | None = None,
                stop: Callable[[], bool] | None = None) -> Iterator[list[tuple[str, Any]]]:
        """:meth:`items` taken up to `max_items` at a time (:meth:`get_batch`)."""
        while True:
            if stop is not None and stop():
                return
            batch = self.get_batch(max_items, poll_seconds)
            if batch:
                yield batch
            elif self._closed:
                return

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self.items()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {"id": self.id, "name": self.name, "max_queue": self.max_queue,
                    "pending": self._queued, "matched": self.matched,
                    "delivered": self.delivered, "dropped": self.dropped}

    def _stop(self, timeout: float | None) -> None:
        """Unsubscribe, discard what is queued and wake a reader blocked in ``get``."""
        with self._cond:
            self._closed = True
            self.discarded = self._queued
            self._queue.clear()
            self._queued = 0
            self._cond.notify_all()
        self._hub._retire(self)

    def __repr__(self) -> str:
        return (f"Subscription(id={self.id}, name={self.name!r}, pending={self._queued}, "
                f"dropped={self.dropped}, closed={self._closed})")


class FanoutHub(Service):
    """Fans published alerts and action events out to subscriptions (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._subs: tuple[Subscription, ...] = ()  # replaced, never mutated: publish reads it
        self._ids = itertools.count(1)
        self._closed = False
        self._published = 0
        self._events = 0
        self._retired_delivered = 0
        self._retired_dropped = 0

    def subscribe(self, filter: SubscriberFilter | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                  *, name: str = "") -> Subscription:
        """A new subscription (a context manager) getting what `filter` matches from now on."""
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the fan-out hub is closed; no new subscriptions")
            sub = Subscription(self, next(self._ids), filter or SubscriberFilter(), max_queue,
                               name)
            self._subs = (*self._subs, sub)
        log.debug("subscriber %d (%s) joined", sub.id, name or "unnamed")
        return sub

    def publish(self, alert: Mapping[str, Any]) -> int:
        """Offer `alert` to every matching subscriber; returns how many queued it."""
        if self._closed:
            return 0
        with self._lock:
            self._published += 1
        item = ("alert", alert)
        return sum(sub._offer(item) for sub in self._subs if sub.filter.matches(alert))

    def publish_event(self, kind: str, payload: Mapping[str, Any],
                      match_alert: Mapping[str, Any] | None = None) -> int:
        """Offer an action event ``{"event": kind, **payload}`` to the subscribers that want it
        (:meth:`SubscriberFilter.wants_event`); returns how many queued it."""
        if "event" in payload and payload["event"] != kind:
            raise ValueError(f"payload key 'event' ({payload['event']!r}) conflicts with "
                             f"kind {kind!r}; leave it out")
        if self._closed:
            return 0
        with self._lock:
            self._events += 1
        item = ("action", {"event": kind, **payload})
        return sum(sub._offer(item) for sub in self._subs if sub.filter.wants_event(match_alert))

    def stats(self) -> dict[str, Any]:
        """Counts: alerts published, action events published, delivered and dropped (totals
        include closed subscriptions), and each open subscription's own counts."""
        with self._lock:
            subs = self._subs
            totals = {"published": self._published, "events": self._events,
                      "delivered": self._retired_delivered, "dropped": self._retired_dropped}
        per = [sub.stats() for sub in subs]
        totals["delivered"] += sum(s["delivered"] for s in per)
        totals["dropped"] += sum(s["dropped"] for s in per)
        return {"subscribers": len(per), **totals, "per_subscriber": per}

    def _stop(self, timeout: float | None) -> None:
        """Close every subscription (waking blocked readers); later publishes are ignored."""
        with self._lock:
            self._closed = True
            subs = self._subs
        for sub in subs:
            sub.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._subs)

    def _retire(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs = tuple(s for s in self._subs if s is not sub)
                self._retired_delivered += sub.delivered
                self._retired_dropped += sub.dropped
        log.debug("subscriber %d left: delivered %d, dropped %d", sub.id, sub.delivered,
                  sub.dropped)


__all__ = [
    "ACTION_SCOPES",
    "DEFAULT_MAX_QUEUE",
    "FanoutHub",
    "SubscriberFilter",
    "Subscription",
]
