"""Fleet baselines, the agent's side: what this node's containers show while an image learns goes
up to the collector as increments; the collector's merged baseline comes back down, replaces the
local copy and is kept under STATE_DIR/baselines, so a collector outage changes nothing.

:class:`FleetBaselines` sits between the detector (pipeline thread) and the collector channel
(its own threads); one lock guards it, and it never calls out while holding it.

The detector tells it
    ``see``       the first record of an image in this run: the image is asked for (a
                  BaselineRequest on the open stream, and again on every new stream); the answer
                  says whether the detector should hold the image's records until the answer
                  (connected, and no fleet copy held);
    ``learned``   the items of a record while the image learns, with the container that showed
                  them: each (item, container) pair is reported once;
    ``window``    a clean window the image learned;
    ``applied``   a fleet baseline it put in place (its version and mode are kept in
                  STATE_DIR/fleet.json and sent in Hello).
    It takes the collector's answers with ``take_updates`` (the pipeline thread applies them).

The channel asks it for ``hello_baselines``, calls ``stream_started``/``stream_ended``, takes
``next_message`` (requests first, then increments every ``increment_seconds``, everything at
stop) and hands it every ``BaselineUpdate`` (``on_update``). The collector takes an image's
increments only from a stream whose heartbeat listed a container of it: the channel says which
images each heartbeat listed (``listed``), an image's increments wait for that, and
``heartbeat_wanted`` asks for an early heartbeat (at most ``_EARLY_HEARTBEATS`` per image and
stream, a second apart) when a new image has something to report.

Nothing is lost across a reconnect: a reported (item, container) pair stays pending until an
update shows it merged (the item among the baseline's items, or among its unconfirmed items with
that container), and is sent again on the next stream until then; windows sent on a stream count
as merged once an update for their image arrives on that stream after them, else they are sent
again. While the collector is away, increments accumulate (bounded: ``max_pairs`` pairs per
image, the profile's MAX_WINDOWS windows). Once the fleet's mode for an image is not ``learn``,
what was still pending for it is dropped (learning is over; what one node saw last is not
learned).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driftwarden.agent.carry import CarriedScope
from driftwarden.core.errors import BaselineError, InvalidMessage, UsageError
from driftwarden.core.modes import Mode
from driftwarden.core.wire import (
    DEFAULT_LIMITS,
    MAX_MESSAGE_BYTES,
    MODE,
    baseline_from_proto,
    baseline_item_from_proto,
    baseline_item_to_proto,
)
from driftwarden.models.features import FEATURES
from driftwarden.models.items import ItemSet
from driftwarden.models.profile import MAX_WINDOWS, Profile, write_atomic
from driftwarden.proto.v1 import baselines_pb2

log = logging.getLogger(__name__)

FLEET_FILE = "fleet.json"  # STATE_DIR/fleet.json: the fleet versions the local copies hold
_FORMAT = 1
# an increment stays well below the message limit (its texts are bounded by the wire's)
_INCREMENT_BYTES = MAX_MESSAGE_BYTES // 2

_EARLY_HEARTBEATS = 3  # early heartbeats asked per image and stream (then: the regular ones)
_EARLY_HEARTBEAT_SECONDS = 1.0
ItemKey = tuple[str, tuple[Any, ...]]  # (kind, key()) of a models.items item


@dataclass(frozen=True)
class FleetConfig:
    node: str
    increment_seconds: float = 2.0  # how often a learning image's increment goes up
    max_pairs: int = 50_000  # (item, container) pairs remembered per learning image

    def __post_init__(self) -> None:
        if not self.increment_seconds > 0:
            raise UsageError(f"increment_seconds must be > 0, got {self.increment_seconds}")
        if self.max_pairs < 1:
            raise UsageError(f"max_pairs must be >= 1, got {self.max_pairs}")


class _Image:
    """What the fleet side knows of one image (guarded by FleetBaselines' lock)."""

    def __init__(self, key: str, name: str) -> None:
        self.key = key
        self.name = name
        self.container_id: str | None = None  # one of its containers here (for its layers)
        self.layers: tuple[str, ...] | None = None
        self.layers_asked = False
        self.version = 0  # the fleet version of the local copy (0: none)
        self.mode: str | None = None  # that copy's mode
        self.carried: CarriedScope | None = None  # that copy's carry-over (agent.carry)
        self.fleet_mode: str | None = None  # the mode of the newest baseline the fleet sent
        self.requested_on = 0  # the stream it was asked for on (0: not on this one yet)
        self.listed_on = 0  # the stream whose heartbeat listed a container of it
        self.heartbeat_asks = 0  # early heartbeats asked for it on this stream
        self.last_ask = float("-inf")
        self.answered = False  # an answer came in this run
        self.known: set[tuple[str, tuple[Any, ...], str]] = set()  # (kind, key, container)
        self.pending: dict[ItemKey, dict[str, baselines_pb2.ContainerRef]] = {}
        self.sent: dict[ItemKey, dict[str, baselines_pb2.ContainerRef]] = {}
        self.windows: list[tuple[float, ...]] = []  # not yet sent
        self.in_flight: list[tuple[int, list[tuple[float, ...]]]] = []  # (stream, windows)
        self.containers: dict[str, baselines_pb2.ContainerRef] = {}  # seen here while learning
        self.containers_reported = 0  # how many the last increment listed
        self.last_increment = float("-inf")
        self.pairs_dropped = 0

    def has_increment(self) -> bool:
        return bool(self.pending or self.windows
                    or len(self.containers) != self.containers_reported)

    def drop_learning(self) -> None:
        self.known.clear()
        self.pending.clear()
        self.sent.clear()
        self.windows.clear()
        self.in_flight.clear()
        self.containers.clear()
        self.containers_reported = 0


class FleetBaselines:
    """See the module docstring. ``image_layers(container_id)`` returns the layer digests of
    the container's image, base first (None: the runtime cannot say); it is called on the
    channel's thread, once per image."""

    def __init__(self, config: FleetConfig, state_dir: str | os.PathLike, *,
                 has_copy: Callable[[str], bool] = lambda _key: True,
                 image_layers: Callable[[str], tuple[str, ...] | None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.path = Path(state_dir) / FLEET_FILE
        self._image_layers = image_layers
        self._clock = clock
        self._lock = threading.Lock()
        self._wake: Callable[[], None] = lambda: None
        self._images: dict[str, _Image] = {}
        self._stream = 0  # the open stream's number (0: none)
        self._updates: dict[str, baselines_pb2.BaselineUpdate] = {}  # for the detector
        self.stats: dict[str, int] = {"requests": 0, "increments": 0, "updates": 0,
                                      "pairs_reported": 0, "windows_reported": 0,
                                      "pairs_dropped": 0}
        for key, held in self._load().items():
            if has_copy(key):
                image = self._images[key] = _Image(key, key)
                image.version, image.mode, image.carried = held
                image.fleet_mode = image.mode

    # -- persistence ---------------------------------------------------------------------

    def _load(self) -> dict[str, tuple[int, str, CarriedScope | None]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("%s is unreadable (%s); the fleet baselines are asked for again",
                      self.path, exc)
            return {}
        held: dict[str, tuple[int, str, CarriedScope | None]] = {}
        entries = data.get("baselines") if isinstance(data, dict) else None
        for key, entry in (entries or {}).items():
            try:
                carried = entry.get("carried")
                held[str(key)] = (int(entry["version"]), Mode(entry["mode"]).value,
                                  None if carried is None else CarriedScope.from_obj(carried))
            except (AttributeError, KeyError, TypeError, ValueError):
                log.warning("%s: bad entry for %s, ignored", self.path, key)
        return held

    def _save_locked(self) -> bytes:
        return json.dumps({"format": _FORMAT, "baselines": {
            key: {"version": image.version, "mode": image.mode,
                  **({"carried": image.carried.to_obj()} if image.carried else {})}
            for key, image in sorted(self._images.items()) if image.version}},
            indent=1, sort_keys=True).encode()

    def _write(self, data: bytes) -> None:
        try:
            write_atomic(self.path, data)
        except OSError as exc:
            log.error("cannot write %s: %s", self.path, exc)

    # -- the channel ---------------------------------------------------------------------

    def attach(self, wake: Callable[[], None]) -> None:
        """The channel's wake-up: called (without this lock held) when a message is due."""
        self._wake = wake

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._stream != 0

    def hello_baselines(self) -> list[baselines_pb2.BaselineVersion]:
        limit = DEFAULT_LIMITS.max_node_baselines
        with self._lock:
            held = [baselines_pb2.BaselineVersion(image_key=i.key, version=i.version,
                                                  mode=MODE.to_proto(i.mode))
                    for i in self._images.values() if i.version and i.mode]
        return held[:limit]

    def stream_started(self, number: int) -> None:
        """A stream is up (its hello went out): every image is asked for again, and what the
        previous stream carried without a sign of its merge goes again."""
        with self._lock:
            self._stream = number
            for image in self._images.values():
                image.requested_on = image.listed_on = image.heartbeat_asks = 0
                image.last_ask = float("-inf")
                for item, refs in image.sent.items():
                    image.pending.setdefault(item, {}).update(refs)
                image.sent.clear()
                if image.in_flight:
                    again = [w for _, windows in image.in_flight for w in windows]
                    image.windows[:0] = again
                    del image.windows[:-MAX_WINDOWS]
                    image.in_flight.clear()
                image.containers_reported = 0
                image.last_increment = float("-inf")

    def stream_ended(self, number: int) -> None:
        with self._lock:
            if self._stream == number:
                self._stream = 0

    def listed(self, number: int, image_keys: Iterable[str]) -> None:
        """A heartbeat on stream `number` listed containers of these images."""
        with self._lock:
            for key in image_keys:
                image = self._images.get(key)
                if image is not None:
                    image.listed_on = number

    def heartbeat_wanted(self, number: int, now: float) -> bool:
        """Whether the channel should send a heartbeat now: an image with something to report
        was not listed on this stream yet (counted as asked)."""
        with self._lock:
            waiting = [i for i in self._waiting_for_listing_locked(number)
                       if now >= i.last_ask + _EARLY_HEARTBEAT_SECONDS]
            for image in waiting:
                image.heartbeat_asks += 1
                image.last_ask = now
            return bool(waiting)

    def _waiting_for_listing_locked(self, number: int) -> list[_Image]:
        return [i for i in self._images.values() if i.listed_on != number and i.has_increment()
                and i.heartbeat_asks < _EARLY_HEARTBEATS]

    def next_due(self, now: float) -> float | None:
        """When the next fleet message (or early heartbeat) is due (now: one is), None:
        nothing to send."""
        with self._lock:
            number = self._stream
            if not number:
                return None
            due: float | None = None
            for image in self._images.values():
                if not image.requested_on:
                    return now
                if image.has_increment() and image.listed_on == number:
                    at = image.last_increment + self.config.increment_seconds
                    due = at if due is None else min(due, at)
            for image in self._waiting_for_listing_locked(number):
                at = image.last_ask + _EARLY_HEARTBEAT_SECONDS
                due = at if due is None else min(due, at)
            return due

    def next_message(self, number: int, now: float, *, final: bool = False
                     ) -> dict[str, Any] | None:
        """The next fleet message for stream `number` as AgentMessage body fields, or None.
        `final`: the agent stops; every increment is due."""
        with self._lock:
            if self._stream != number:
                return None
            for image in self._images.values():
                if not image.requested_on:
                    asked = image
                    break
            else:
                asked = None
            if asked is None:
                ready = [i for i in self._images.values()
                         if i.has_increment() and i.listed_on == number
                         and (final or now >= i.last_increment + self.config.increment_seconds)]
                if not ready:
                    return None
                image = min(ready, key=lambda i: i.last_increment)
            else:
                image = asked
            need_layers = not image.layers_asked and image.container_id is not None
            container_id = image.container_id
        layers = self._layers(container_id) if need_layers else None
        with self._lock:
            if need_layers:
                image.layers_asked = True
                image.layers = layers
            if self._stream != number:
                return None
            if asked is not None:
                image.requested_on = number
                self.stats["requests"] += 1
                return {"baseline_request": baselines_pb2.BaselineRequest(
                    image_key=image.key, image_name=image.name, layers=image.layers or ())}
            return {"baseline_increment": self._increment_locked(image, number, now)}

    def _layers(self, container_id: str | None) -> tuple[str, ...] | None:
        if self._image_layers is None or container_id is None:
            return None
        try:
            layers = self._image_layers(container_id)
        except Exception as exc:  # the runtime's answer only helps the collector's carry-over
            log.debug("no layers for %s: %s", container_id[:12], exc)
            return None
        return tuple(layers)[:DEFAULT_LIMITS.max_layers] if layers else None

    def _increment_locked(self, image: _Image, number: int, now: float
                          ) -> baselines_pb2.BaselineIncrement:
        limits = DEFAULT_LIMITS
        increment = baselines_pb2.BaselineIncrement(
            image_key=image.key, image_name=image.name, based_on_version=image.version,
            containers=list(image.containers.values())[:limits.max_evidence_containers],
            layers=image.layers or ())
        size = increment.ByteSize()
        for item in list(image.pending):
            if len(increment.items) >= limits.max_increment_items:
                break
            refs = image.pending[item]
            chosen = list(refs.values())[:limits.max_evidence_containers]
            evidence = baselines_pb2.ItemEvidence(item=baseline_item_to_proto(*item),
                                                  containers=chosen)
            size += evidence.ByteSize() + 8
            if size > _INCREMENT_BYTES and increment.items:
                break
            increment.items.append(evidence)
            sent = image.sent.setdefault(item, {})
            for ref in chosen:
                sent[ref.container_id] = ref
                del refs[ref.container_id]
            if not refs:
                del image.pending[item]
        windows = image.windows[:limits.max_increment_windows]
        del image.windows[:len(windows)]
        increment.windows.extend(baselines_pb2.FeatureWindow(values=w) for w in windows)
        if windows:
            image.in_flight.append((number, windows))
        image.containers_reported = len(image.containers)
        image.last_increment = now
        self.stats["increments"] += 1
        self.stats["pairs_reported"] += sum(len(e.containers) for e in increment.items)
        self.stats["windows_reported"] += len(windows)
        return increment

    def on_update(self, number: int, update: baselines_pb2.BaselineUpdate) -> None:
        """A BaselineUpdate on stream `number` (validated by the channel)."""
        with self._lock:
            self.stats["updates"] += 1
            image = self._images.get(update.image_key)
            if image is None:
                name = update.baseline.summary.image_name if update.found else ""
                image = self._images[update.image_key] = _Image(update.image_key,
                                                                name or update.image_key)
                image.requested_on = number  # it is answered already
            image.answered = True
            image.in_flight = [(n, w) for n, w in image.in_flight if n != number]
            if update.found:
                self._merged_locked(image, update.baseline)
            queued = self._updates.get(update.image_key)
            if queued is None or not queued.found or not update.found or (
                    update.baseline.summary.version >= queued.baseline.summary.version):
                self._updates[update.image_key] = update

    def _merged_locked(self, image: _Image, baseline: baselines_pb2.Baseline) -> None:
        """Forget the pairs the baseline shows merged; all pending data once it stopped
        learning."""
        image.fleet_mode = MODE.from_proto(baseline.summary.mode)
        if image.fleet_mode != Mode.LEARN.value:
            image.drop_learning()
            return
        if not (image.sent or image.pending):
            return
        try:
            confirmed = {baseline_item_from_proto(item) for item in baseline.items}
            unconfirmed = {baseline_item_from_proto(e.item): {c.container_id
                                                              for c in e.containers}
                           for e in baseline.unconfirmed}
        except InvalidMessage:
            return  # the channel validated it; nothing to learn from a bad one anyway
        for table in (image.sent, image.pending):
            for item in list(table):
                if item in confirmed:
                    del table[item]
                    continue
                shown_by = unconfirmed.get(item)
                if shown_by:
                    refs = table[item]
                    for cid in shown_by & refs.keys():
                        del refs[cid]
                    if not refs:
                        del table[item]

    # -- the detector --------------------------------------------------------------------

    def see(self, key: str, name: str, container_id: str | None) -> bool:
        """The detector's first record of image `key` in this run. True: hold its records until
        the collector answers (connected, and no fleet copy here)."""
        with self._lock:
            image = self._images.get(key)
            if image is None:
                image = self._images[key] = _Image(key, name or key)
            elif name and image.name == image.key:
                image.name = name
            if image.container_id is None:
                image.container_id = container_id
            hold = bool(self._stream) and not image.version and not image.answered
            due = bool(self._stream) and not image.requested_on
        if due:
            self._wake()
        return hold

    def answered(self, key: str) -> bool:
        with self._lock:
            image = self._images.get(key)
            return image is not None and image.answered

    def version(self, key: str) -> int:
        """The fleet version of the local copy of `key` (0: none)."""
        with self._lock:
            image = self._images.get(key)
            return image.version if image is not None else 0

    def carried(self, key: str) -> CarriedScope | None:
        """The carry-over of the local copy of `key` (None: not a carried baseline)."""
        with self._lock:
            image = self._images.get(key)
            return image.carried if image is not None else None

    def learned(self, key: str, name: str, items: Iterable[Any], container_id: str,
                container_name: str | None) -> None:
        """Items (models.items) one of this node's containers showed while `key` learns."""
        wake = False
        with self._lock:
            image = self._images.get(key)
            if image is None:
                image = self._images[key] = _Image(key, name or key)
            if image.fleet_mode not in (None, Mode.LEARN.value):
                return  # the fleet ended learning; the local copy follows it
            if container_id not in image.containers:
                ref = baselines_pb2.ContainerRef(container_id=container_id,
                                                 node=self.config.node)
                if container_name:
                    ref.name = container_name
                image.containers[container_id] = ref
                wake = True
            ref = image.containers[container_id]
            for item in items:
                pair = (item.KIND, item.key(), container_id)
                if pair in image.known:
                    continue
                if len(image.known) >= self.config.max_pairs:
                    image.pairs_dropped += 1
                    self.stats["pairs_dropped"] += 1
                    if image.pairs_dropped == 1:
                        log.warning("baseline %s: more than %d (item, container) pairs while "
                                    "learning; the others are not reported to the collector",
                                    image.name, self.config.max_pairs)
                    continue
                image.known.add(pair)
                image.pending.setdefault((pair[0], pair[1]), {})[container_id] = ref
                wake = True
        if wake and self._stream:
            self._wake()

    def window(self, key: str, vector: Iterable[float]) -> None:
        """A clean window image `key` learned here."""
        with self._lock:
            image = self._images.get(key)
            if image is None or image.fleet_mode not in (None, Mode.LEARN.value):
                return
            image.windows.append(tuple(float(v) for v in vector))
            del image.windows[:-MAX_WINDOWS]

    def take_updates(self) -> list[baselines_pb2.BaselineUpdate]:
        """The collector's answers not yet applied (the newest per image)."""
        with self._lock:
            if not self._updates:
                return []
            updates = list(self._updates.values())
            self._updates.clear()
            return updates

    def applied(self, key: str, version: int, mode: Mode | str,
                carried: CarriedScope | None = None) -> None:
        """The detector now uses the fleet's version `version` of `key` (saved already);
        `carried`: what it shares with the version it was carried from (agent.carry)."""
        with self._lock:
            image = self._images.get(key)
            if image is None:
                image = self._images[key] = _Image(key, key)
            image.version, image.mode = version, Mode(mode).value
            image.carried = carried
            image.fleet_mode = image.mode
            if image.mode != Mode.LEARN.value:
                image.drop_learning()
            data = self._save_locked()
        self._write(data)

    def forget(self, key: str) -> None:
        """The local copy of `key` is gone (an operator reset it here)."""
        with self._lock:
            image = self._images.get(key)
            if image is None or not image.version:
                return
            image.version, image.mode, image.carried = 0, None, None
            data = self._save_locked()
        self._write(data)


def profile_from_baseline(baseline: baselines_pb2.Baseline, local: Profile | None, *,
                          now: float | None = None) -> Profile:
    """The local profile a fleet baseline becomes: its (confirmed) items, windows, mode,
    version and history (core.wire.baseline_from_proto, in the baseline file's format); what
    only this node tracks (when it first saw the image, its start-up items, whether it saw a
    start) from `local`. A fleet baseline outside learning has seen its image start (the fleet
    learned it, or CI ran it from its start): a new node detects from its first container's
    first event. InvalidMessage when it is malformed or its windows are not this agent's."""
    now = time.time() if now is None else now
    for i, window in enumerate(baseline.windows):
        if len(window.values) != len(FEATURES):
            raise InvalidMessage(f"baseline.windows[{i}]: {len(window.values)} values, this "
                                 f"agent's windows have {len(FEATURES)}")
    obj = baseline_from_proto(baseline).to_file_obj()
    if not baseline.summary.HasField("updated_at"):
        obj["updated_at"] = now
    try:
        profile = Profile.from_obj(obj, ItemSet)
    except BaselineError as exc:
        raise InvalidMessage(f"baseline: {exc}") from None
    if not profile.image_name:
        profile.image_name = local.image_name if local is not None else profile.image_id
    profile.created_at = local.created_at if local is not None else now
    # a carried baseline's starts were seen by the version it comes from (agent.carry)
    profile.starts_seen = (local is not None and local.starts_seen) or (
        profile.mode is not Mode.LEARN) or carried_scope(baseline) is not None
    profile.startup_items = list(local.startup_items) if local is not None else []
    if profile.mode is not Mode.LEARN and profile.progress.end_reason is None:
        # the wire has no learning progress: when and why learning ended is the history's
        # last step out of learn
        left = [h for h in profile.history if h.get("from") == Mode.LEARN.value
                and h.get("to") != Mode.LEARN.value]
        if left:
            profile.progress.ended_at = left[-1].get("at")
            profile.progress.end_reason = left[-1].get("reason")
    return profile


def carried_scope(baseline: baselines_pb2.Baseline) -> CarriedScope | None:
    """What a fleet baseline carried from another version shares with it (agent.carry); None
    for one that was not carried (or shares no layer)."""
    summary = baseline.summary
    if not (summary.HasField("carried_from") and 0 < baseline.carried_layers
            <= len(baseline.layers)):
        return None
    return CarriedScope(summary.carried_from, tuple(baseline.layers), baseline.carried_layers)


__all__ = ["FLEET_FILE", "FleetBaselines", "FleetConfig", "carried_scope",
           "profile_from_baseline"]
