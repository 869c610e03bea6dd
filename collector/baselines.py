"""Fleet baselines at the collector: merge what agents learn, consensus, fleet-wide end of
learning, and what operators do to baselines.

One baseline per image key (:class:`~driftwarden.core.baselines.FleetBaseline`), kept in the
store. :class:`FleetBaselines` changes them; every change bumps the version, is stored with an
audit entry (who, what, why) in one transaction, and is announced through ``on_change`` (the
service sends the new version to every connected agent that runs the image).

Merging an increment (an image in ``learn`` only)
    The increment's containers (and those that showed its items) join the containers that ran
    the image while it learned; each item's evidence gains the containers that showed it;
    windows are appended (at most MAX_WINDOWS, the oldest dropped). Merging is idempotent for
    items (a container shows an item once), so an agent may resend.

Consensus (``consensus`` = N, default 2)
    While an image learns, an item is confirmed when at least N distinct containers showed it,
    if at least N containers ran the image while it learned; else one container is enough (a
    single replica teaches alone). The rule is applied to all the evidence after every merge,
    so an item one early replica showed goes back to unconfirmed when more replicas turn up
    and do not show it. Items learned before (an earlier learning period, a push, an accepted
    alert) stay. When learning ends, the confirmed items are fixed and the unconfirmed keep
    their evidence (shown by ``baseline show``).

End of learning
    ``step`` applies :func:`~driftwarden.core.learning.next_mode` to each learning baseline's
    merged progress (its age, the windows of all nodes, the last time an item was confirmed);
    the change's history entry is "by collector".

Carry-over across image versions
    When an agent asks for an image key that has no baseline and names its layer digests,
    ``carry`` looks for the previous version: a baseline of the same repository (the name
    without tag or digest) that is not learning and shares at least one layer from the base
    (:func:`shared_layers`: the digests' common prefix); the newest such. The new key's
    baseline starts in learn with that one's confirmed items and windows, ``carried_from`` its
    key and ``carried_layers`` the count shared; its history says "carried from NAME (KEY)
    version V". Agents then judge at once what the files of the shared layers do and learn
    only what the other layers bring (agent.carry). A push or a reset drops the carry.

Operators (the Baselines service)
    An image is named by its key, a unique prefix of the key's digits (at least
    MIN_ID_PREFIX), ``name[:tag]`` (the newest key with that name) or ``NAME@KEY``.
    ``set_mode`` (a reason is required), ``accept`` (a NOVEL alert's items join its image's
    baseline), ``reset`` (items, evidence, windows forgotten; the image learns again),
    ``push`` (a baseline file for its key; mode ``monitor`` unless named; the version goes past
    both the stored one and the file's), ``export`` and ``diff``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from driftwarden.collector.filters import MIN_ID_PREFIX, image_repository
from driftwarden.collector.store import CollectorStore
from driftwarden.core import wire
from driftwarden.core.baselines import (
    BaselineSummary,
    ContainerRef,
    FleetBaseline,
    ItemKey,
    describe_item,
    item_key,
    pack_baseline,
    unpack_baseline,
)
from driftwarden.core.errors import AmbiguousImage, RpcAbort, UnknownImage
from driftwarden.core.learning import MAX_WINDOWS, LearningPolicy, LearningProgress, next_mode
from driftwarden.core.modes import Mode
from driftwarden.proto.v1 import baselines_pb2

log = logging.getLogger(__name__)

DEFAULT_CONSENSUS = 2
MAX_CONSENSUS = 32
MAX_EVIDENCE = MAX_CONSENSUS  # containers kept per item (enough to decide any consensus)
MAX_CONTAINERS = 4096  # containers remembered per image (the oldest dropped)
MAX_NODES = 1024  # nodes remembered per image (the oldest dropped)
MAX_HISTORY = 100
COLLECTOR_ACTOR = "collector"
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class FleetSettings:
    """How the collector learns baselines (``driftwarden collector`` flags)."""

    consensus: int = DEFAULT_CONSENSUS  # containers that must show an item (module docstring)
    policy: LearningPolicy = field(default_factory=LearningPolicy)
    max_items: int = 4 * 4096  # evidence entries kept per image (models.items' caps)

    def __post_init__(self) -> None:
        if not 1 <= self.consensus <= MAX_CONSENSUS:
            raise ValueError(f"consensus must be 1..{MAX_CONSENSUS} containers, got "
                             f"{self.consensus}")


@dataclass(frozen=True)
class MergeResult:
    """What ``merge`` did: the baseline after it, and whether it changed (a new version)."""

    doc: FleetBaseline
    changed: bool
    learning: bool  # False: the image is not learning, nothing was merged


@dataclass(frozen=True)
class DiffResult:
    a: BaselineSummary
    b: BaselineSummary
    only_in_a: list[ItemKey]
    only_in_b: list[ItemKey]


class FleetBaselines:
    """The fleet's baselines (module docstring). Thread-safe: changes are serialised."""

    def __init__(self, store: CollectorStore, settings: FleetSettings = FleetSettings(), *,
                 on_change: Callable[[FleetBaseline], None] = lambda doc: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.settings = settings
        self._on_change = on_change
        self._clock = clock
        self._lock = threading.RLock()

    # - reading ----------------------------------------------------------------------------

    def summaries(self) -> list[BaselineSummary]:
        """Every baseline, newest change first, ``stable`` computed now."""
        now = self._clock()
        return [self._with_stable(s, now) for s in self.store.list_baselines()]

    def _with_stable(self, summary: BaselineSummary, now: float) -> BaselineSummary:
        return dataclasses.replace(summary, stable=summary.is_stable(self.settings.policy, now))

    def summary(self, doc: FleetBaseline) -> BaselineSummary:
        return doc.summary(self.settings.policy, self._clock())

    def get(self, image_key: str) -> FleetBaseline | None:
        return self.store.get_baseline(image_key)

    def resolve(self, text: str) -> BaselineSummary:
        """An operator's image reference -> its baseline's summary (module docstring);
        UnknownImage or AmbiguousImage, both listing candidates."""
        text = text.strip()
        summaries = self.store.list_baselines()
        wanted = text.rpartition("@")[2] if "@" in text else text
        for summary in summaries:
            if summary.image_key == wanted:
                return summary
        if "@" not in text:
            newest = sorted(summaries, key=lambda s: (s.created_at, s.image_key), reverse=True)
            for same in ([s for s in newest if s.image_name == text],
                         [s for s in newest if s.image_name
                          and image_repository(s.image_name) == text]):
                if same:
                    return same[0]
        digits = wanted.lower().removeprefix("sha256:")
        if len(digits) >= MIN_ID_PREFIX and _HEX.issuperset(digits):
            found = [s for s in summaries
                     if s.image_key.lower().removeprefix("sha256:").startswith(digits)]
            if len(found) == 1:
                return found[0]
            if found:
                raise AmbiguousImage(text, found[:10],
                                     f"a prefix of {len(found)} baselines' keys")
        needle = wanted.lower()
        similar = [s for s in summaries
                   if needle and (needle in s.image_key.lower()
                                  or needle in s.image_name.lower())]
        raise UnknownImage(text, similar[:10], min_prefix=MIN_ID_PREFIX)

    def load(self, text: str) -> FleetBaseline:
        """The baseline an operator names (resolve), read whole."""
        summary = self.resolve(text)
        doc = self.store.get_baseline(summary.image_key)
        if doc is None:  # deleted between the two reads: as unknown as never stored
            raise UnknownImage(text, min_prefix=MIN_ID_PREFIX)
        return doc

    def export(self, text: str) -> bytes:
        return pack_baseline(self.load(text))

    def diff(self, a: str, b: str) -> DiffResult:
        doc_a, doc_b = self.load(a), self.load(b)
        return DiffResult(self.summary(doc_a), self.summary(doc_b),
                          [i for i in doc_a.items if i not in doc_b.items],
                          [i for i in doc_b.items if i not in doc_a.items])

    # - agents' increments -----------------------------------------------------------------

    def merge(self, node: str, increment: baselines_pb2.BaselineIncrement) -> MergeResult:
        """Merge one validated increment from `node` (module docstring). ValueError when it
        names a container of another node (nothing is stored)."""
        refs = [wire.container_ref_from_proto(r, node) for r in increment.containers]
        evidence = [(wire.baseline_item_from_proto(e.item),
                     [wire.container_ref_from_proto(r, node) for r in e.containers])
                    for e in increment.items]
        for ref in (*refs, *(r for _, shown in evidence for r in shown)):
            if ref.node != node:
                raise ValueError(f"container {ref.container_id[:12]} is named as one of node "
                                 f"{ref.node!r}, but this stream is node {node!r}: an agent "
                                 "reports its own containers only")
        with self._lock:
            now = self._clock()
            doc = self.store.get_baseline(increment.image_key)
            expect = None if doc is None else doc.version
            if doc is None:
                doc = FleetBaseline(image_key=increment.image_key,
                                    image_name=increment.image_name, created_at=now,
                                    updated_at=now, version=0)
            elif doc.mode is not Mode.LEARN:
                return MergeResult(doc, changed=False, learning=False)
            renamed = bool(increment.image_name) and increment.image_name != doc.image_name
            doc.image_name = increment.image_name or doc.image_name
            changed = _merge(doc, node, refs, evidence,
                             [tuple(w.values) for w in increment.windows],
                             tuple(increment.layers), self.settings)
            changed = _apply_consensus(doc, self.settings, now) or changed or expect is None
            if not changed and not renamed:
                return MergeResult(doc, changed=False, learning=True)
            if changed:
                doc.version += 1
                doc.updated_at = now
            self.store.put_baseline(doc, expect_version=expect)
        if changed:
            self._on_change(doc)
        return MergeResult(doc, changed=changed, learning=True)

    # - the fleet's end of learning ----------------------------------------------------------

    def step(self) -> list[FleetBaseline]:
        """End learning of every stable (or timed-out) baseline; returns those changed."""
        ended = []
        for summary in self.store.list_baselines():
            if summary.mode is not Mode.LEARN:
                continue
            with self._lock:
                doc = self.store.get_baseline(summary.image_key)
                if doc is None or doc.mode is not Mode.LEARN:
                    continue
                now = self._clock()
                transition = next_mode(doc.mode, doc.progress, self.settings.policy, now)
                if transition is None:
                    continue
                expect = doc.version
                _change_mode(doc, transition.mode, transition.reason, COLLECTOR_ACTOR, now)
                self._commit(doc, expect, now, COLLECTOR_ACTOR, "baseline-mode",
                             transition.mode.value, transition.reason,
                             {"from": Mode.LEARN.value, "items": len(doc.items),
                              "unconfirmed": len(doc.unconfirmed()),
                              "windows": len(doc.windows), "containers": len(doc.containers),
                              "nodes": list(doc.nodes)})
            log.info("baseline of %s (%s): learning ended fleet-wide: %s", doc.image_name,
                     doc.image_key[:19], transition.reason)
            self._on_change(doc)
            ended.append(doc)
        return ended

    # - carry-over ----------------------------------------------------------------------------

    def carry(self, image_key: str, image_name: str, layers: Sequence[str],
              ) -> FleetBaseline | None:
        """A new baseline for `image_key`, which has none, carried from the previous version of
        its repository (:func:`carry_source`, module docstring); None when there is nothing to
        carry from (or it has a baseline already). Stored (version 1, mode learn) with an
        audit entry, and announced."""
        layers = tuple(layers)
        if not layers or not image_name:
            return None
        repository = image_repository(image_name)
        with self._lock:
            if self.store.get_baseline(image_key) is not None:
                return None
            candidates = [self.store.get_baseline(s.image_key)
                          for s in self.store.list_baselines()
                          if s.image_key != image_key and s.mode is not Mode.LEARN
                          and s.image_name and image_repository(s.image_name) == repository]
            source = carry_source([c for c in candidates if c is not None], layers)
            if source is None:
                return None
            old, shared = source
            now = self._clock()
            doc = carried_baseline(old, image_key, image_name, layers, shared, now)
            self._commit(doc, None, now, COLLECTOR_ACTOR, "baseline-carry", "carried",
                         doc.history[-1]["reason"],
                         {"from": old.image_key, "from_version": old.version,
                          "shared_layers": shared, "layers": len(layers),
                          "items": len(doc.items)}, bump=False)
        log.info("baseline of %s (%s): carried from %s (%s) version %d, %d of %d layers "
                 "shared", image_name, image_key[:19], old.image_name, old.image_key[:19],
                 old.version, shared, len(layers))
        self._on_change(doc)
        return doc

    # - operators ----------------------------------------------------------------------------

    def set_mode(self, text: str, mode: Mode, reason: str, who: str) -> FleetBaseline:
        with self._lock:
            doc = self.load(text)
            now = self._clock()
            old = doc.mode
            if mode is old:
                self.store.audit(who, "baseline-mode", doc.image_key, "unchanged", reason,
                                 {"mode": mode.value, "version": doc.version})
                return doc
            expect = doc.version
            _change_mode(doc, mode, reason, who, now)
            self._commit(doc, expect, now, who, "baseline-mode", mode.value, reason,
                         {"from": old.value})
        self._on_change(doc)
        return doc

    def reset(self, text: str, reason: str, who: str) -> FleetBaseline:
        with self._lock:
            doc = self.load(text)
            now = self._clock()
            expect, old_mode = doc.version, doc.mode
            forgotten = {"items": len(doc.items), "unconfirmed": len(doc.unconfirmed()),
                         "windows": len(doc.windows), "from": old_mode.value}
            doc.items.clear()
            doc.evidence.clear()
            doc.windows.clear()
            doc.containers.clear()
            doc.nodes = ()
            doc.carried_from = None
            doc.carried_layers = 0
            doc.starts_seen = False
            doc.startup_items.clear()
            doc.overflowed.clear()
            _append_history(doc, old_mode, Mode.LEARN, f"reset: {reason}", who, now)
            doc.mode = Mode.LEARN
            doc.progress = LearningProgress(started_at=now, last_new_item_at=now)
            self._commit(doc, expect, now, who, "baseline-reset", "reset", reason, forgotten)
        self._on_change(doc)
        return doc

    def accept(self, alert: Mapping[str, Any], reason: str, who: str,
               ) -> tuple[FleetBaseline, list[ItemKey]]:
        """Add a stored NOVEL alert's items to its image's baseline; returns the baseline and
        the items it did not have. RpcAbort(FAILED_PRECONDITION) for an alert that carries no
        item; UnknownImage when its image has no baseline."""
        alert_id = alert.get("id", "?")
        items = alert_items(alert)
        if not items:
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION,
                           f"alert {alert_id} ({alert.get('kind')}) carries no baseline item: "
                           "only novel alerts (new exec, lineage, connect or write) can be "
                           "accepted")
        image_key = (alert.get("container") or {}).get("image_id")
        if not isinstance(image_key, str) or not image_key:
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION,
                           f"alert {alert_id} names no image key: its image's baseline is "
                           "not known")
        with self._lock:
            doc = self.store.get_baseline(image_key)
            if doc is None:
                raise UnknownImage(image_key, min_prefix=MIN_ID_PREFIX)
            added = [item for item in items if item not in doc.items]
            if not added:
                self.store.audit(who, "baseline-accept", image_key, "unchanged",
                                 reason, {"alert_id": alert_id, "version": doc.version})
                return doc, []
            now = self._clock()
            expect = doc.version
            for item in added:
                doc.items[item] = None
                doc.evidence.pop(item, None)  # learned now: no longer waits for consensus
            self._commit(doc, expect, now, who, "baseline-accept", "accepted", reason,
                         {"alert_id": alert_id, "added": [describe_item(i) for i in added]})
        self._on_change(doc)
        return doc, added

    def push(self, data: bytes, image: str, mode: Mode | None, reason: str, who: str,
             ) -> FleetBaseline:
        """Store a baseline file for its image key (module docstring). BaselineError for a
        corrupt file; ValueError when `image` names another image than the file."""
        pushed = unpack_baseline(data)
        key = pushed.image_key
        if image.strip() and image.strip() != key:
            try:
                named = self.resolve(image).image_key
            except (UnknownImage, AmbiguousImage):
                named = image.strip()
            if named != key:
                raise ValueError(
                    f"the file is a baseline of image {key}, not of {image.strip()}: push it "
                    "for its own image (give no image, or that key); a baseline is never "
                    "stored for another image's key")
        mode = mode or Mode.MONITOR
        by = f"push by {who}"
        why = reason or f"pushed by {who}"
        with self._lock:
            now = self._clock()
            old = self.store.get_baseline(key)
            expect = None if old is None else old.version
            pushed.version = max(pushed.version, expect or 0) + 1
            pushed.evidence.clear()  # the file is the truth: nothing waits for consensus
            pushed.carried_layers = 0  # nor is anything judged apart while it learns
            pushed.containers.clear()
            pushed.nodes = ()
            pushed.created_at = old.created_at if old is not None else now
            pushed.updated_at = now
            _append_history(pushed, pushed.mode, mode, why, by, now)
            if mode is Mode.LEARN:
                pushed.progress = LearningProgress(started_at=now, last_new_item_at=now,
                                                   windows_learned=len(pushed.windows))
            else:
                pushed.progress.ended_at = now
                pushed.progress.end_reason = why
            pushed.mode = mode
            self._commit(pushed, expect, now, who, "baseline-push", "stored", why,
                         {"version": pushed.version, "mode": mode.value,
                          "items": len(pushed.items), "windows": len(pushed.windows),
                          "replaced_version": expect}, bump=False)
        self._on_change(pushed)
        return pushed

    # - plumbing -----------------------------------------------------------------------------

    def _commit(self, doc: FleetBaseline, expect: int | None, now: float, who: str,
                action: str, decision: str, reason: str, details: Mapping[str, Any], *,
                bump: bool = True) -> None:
        """Store a changed baseline (a new version) with its audit entry, in one
        transaction."""
        if bump:
            doc.version += 1
        doc.updated_at = now
        with self.store.transaction():
            self.store.put_baseline(doc, expect_version=expect)
            self.store.audit(who, action, doc.image_key, decision, reason,
                             {**details, "image": doc.image_name, "version": doc.version})


# -- merging -------------------------------------------------------------------------------------


def _merge(doc: FleetBaseline, node: str, refs: Sequence[ContainerRef],
           evidence: Sequence[tuple[ItemKey, Sequence[ContainerRef]]],
           windows: Sequence[tuple[float, ...]], layers: tuple[str, ...],
           settings: FleetSettings) -> bool:
    """An increment's content into `doc` (learning); True when anything was new."""
    changed = False
    for ref in (*refs, *(r for _, shown in evidence for r in shown)):
        known = doc.containers.get(ref.container_id)
        if known is None or (ref.name and known.name != ref.name):
            doc.containers[ref.container_id] = ref
            changed = True
    while len(doc.containers) > MAX_CONTAINERS:
        del doc.containers[next(iter(doc.containers))]
    for item, shown in evidence:
        if item in doc.items and item not in doc.evidence:
            continue  # learned before this learning period: nothing to decide
        bucket = doc.evidence.get(item)
        if bucket is None:
            if len(doc.evidence) >= settings.max_items:
                doc.overflowed[item[0]] = doc.overflowed.get(item[0], 0) + 1
                continue
            bucket = doc.evidence[item] = {}
        for ref in shown:
            if ref.container_id not in bucket and len(bucket) < MAX_EVIDENCE:
                bucket[ref.container_id] = ref
                changed = True
    if node not in doc.nodes:
        doc.nodes = (*doc.nodes, node)[-MAX_NODES:]
        changed = True
    if windows:
        doc.windows.extend(windows)
        del doc.windows[:-MAX_WINDOWS]
        doc.progress.windows_learned += len(windows)
        changed = True
    if layers and layers != doc.layers:
        doc.layers = layers
        changed = True
    return changed


def shared_layers(a: Sequence[str], b: Sequence[str]) -> int:
    """How many layers two images share from the base: their layer digests' common prefix. A
    layer is the same file tree only on top of the same layers below it (what a chain id says),
    so a digest equal at one place but above different layers does not count."""
    count = 0
    for left, right in zip(a, b, strict=False):
        if left != right:
            break
        count += 1
    return count


def carry_source(candidates: Iterable[FleetBaseline], layers: Sequence[str],
                 ) -> tuple[FleetBaseline, int] | None:
    """The baseline a new version (its `layers`) starts from, among `candidates` (other keys of
    its repository): one that learned (not in learn: its items are settled) and shares at least
    one layer; the newest of those (created last), with how many layers it shares."""
    usable = [(doc, shared_layers(doc.layers, layers)) for doc in candidates
              if doc.mode is not Mode.LEARN and doc.layers]
    usable = [(doc, shared) for doc, shared in usable if shared]
    if not usable:
        return None
    return max(usable, key=lambda pair: (pair[0].created_at, pair[0].image_key))


def carried_baseline(old: FleetBaseline, image_key: str, image_name: str,
                     layers: Sequence[str], shared: int, now: float) -> FleetBaseline:
    """The new version's first baseline (version 1): `old`'s confirmed
    items and windows, in learn, with ``carried_from``/``carried_layers`` telling agents what
    is judged at once (what the shared layers' files do) and what is learned (what the other
    layers bring); its history says where it came from."""
    layers = tuple(layers)
    doc = FleetBaseline(
        image_key=image_key, image_name=image_name, mode=Mode.LEARN, version=1,
        created_at=now, updated_at=now, items=dict(old.items), windows=list(old.windows),
        progress=LearningProgress(started_at=now, last_new_item_at=now,
                                  windows_learned=len(old.windows)),
        layers=layers, carried_from=old.image_key, carried_layers=shared, starts_seen=True,
        caps=dict(old.caps))
    reason = (f"carried from {old.image_name or '?'} ({old.image_key}) version {old.version}: "
              f"{shared} of {len(layers)} layers shared; what the other {len(layers) - shared} "
              "bring is learned")
    _append_history(doc, old.mode, Mode.LEARN, reason, COLLECTOR_ACTOR, now)
    return doc


def required_containers(consensus: int, ran: int) -> int:
    """Containers that must show an item: `consensus` when that many ran, else one."""
    return consensus if ran >= consensus else 1


def _apply_consensus(doc: FleetBaseline, settings: FleetSettings, now: float) -> bool:
    """Recompute the confirmed items of a learning baseline from its evidence (module
    docstring); True when they changed."""
    need = required_containers(settings.consensus, len(doc.containers))
    confirmed = {item: None for item in doc.items
                 if item not in doc.evidence or len(doc.evidence[item]) >= need}
    confirmed.update((item, None) for item, shown in doc.evidence.items()
                     if item not in confirmed and len(shown) >= need)
    if list(confirmed) == list(doc.items):
        return False
    new = sum(1 for item in confirmed if item not in doc.items)
    if new:
        doc.progress.last_new_item_at = now
        doc.progress.items_seen += new
    doc.items = confirmed
    if len(doc.items) > settings.policy.max_items and not doc.progress.unstable:
        doc.progress.unstable = True
        log.warning("baseline of %s keeps growing (%d items): flagged unstable",
                    doc.image_name, len(doc.items))
    return True


def _append_history(doc: FleetBaseline, old: Mode, new: Mode, reason: str, by: str,
                    now: float) -> None:
    doc.history.append({"at": now, "from": old.value, "to": new.value, "reason": reason,
                        "by": by})
    del doc.history[:-MAX_HISTORY]


def _change_mode(doc: FleetBaseline, mode: Mode, reason: str, by: str, now: float) -> None:
    """A mode change as models.profile.Profile.set_mode makes it; leaving learn also fixes the
    confirmed items (their evidence is dropped: they no longer wait for consensus)."""
    _append_history(doc, doc.mode, mode, reason, by, now)
    progress = doc.progress
    if doc.mode is Mode.LEARN:
        progress.ended_at = now
        progress.end_reason = reason
        for item in doc.items:
            doc.evidence.pop(item, None)
    elif mode is Mode.LEARN:
        progress.started_at = progress.last_new_item_at = now
        progress.ended_at = progress.end_reason = None
        progress.unstable = False
    doc.mode = mode


# -- alerts --------------------------------------------------------------------------------------


def alert_items(alert: Mapping[str, Any]) -> list[ItemKey]:
    """The baseline items a stored alert's reasons carry (details ``item_kind`` and
    ``item_key``); reasons without them, or with unusable ones, are skipped."""
    out: list[ItemKey] = []
    reasons = alert.get("reasons")
    for reason in reasons if isinstance(reasons, list | tuple) else ():
        details = reason.get("details") if isinstance(reason, Mapping) else None
        if isinstance(details, list | tuple):  # (key, value) pairs, as AlertReason keeps them
            details = {d[0]: d[1] for d in details
                       if isinstance(d, list | tuple) and len(d) == 2}
        if not isinstance(details, Mapping):
            continue
        kind, key = details.get("item_kind"), details.get("item_key")
        if isinstance(key, str):  # the key as JSON text
            try:
                key = json.loads(key)
            except ValueError:
                continue
        try:
            item = item_key(kind, key)
        except ValueError as exc:
            log.debug("alert %s: reason %s carries no usable item: %s", alert.get("id"),
                      reason.get("code"), exc)
            continue
        if item not in out:
            out.append(item)
    return out


def items_to_proto(items: Iterable[ItemKey]) -> list[baselines_pb2.BaselineItem]:
    return [wire.baseline_item_to_proto(*item) for item in items]


__all__ = [
    "DEFAULT_CONSENSUS",
    "MAX_CONSENSUS",
    "DiffResult",
    "FleetBaselines",
    "FleetSettings",
    "MergeResult",
    "alert_items",
    "carried_baseline",
    "carry_source",
    "items_to_proto",
    "required_containers",
    "shared_layers",
]
