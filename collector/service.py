"""The collector's domain service: agents' sessions, alert ingest, actions and the policy.

:class:`CollectorService` holds the state the gRPC services share (the store, the fan-out hub,
the policy engine, the connected agents' sessions, the actions waiting for a result) and does
the work; :mod:`~driftwarden.collector.servicers` adapts gRPC calls to it and maps errors to
status codes, :mod:`~driftwarden.collector.auth` says who may call what, and
:mod:`~driftwarden.collector.convert` turns records into messages. Semantics are those of
``notes/protocol.md``; in short:

AgentChannel.Connect
    The first message must be ``hello`` (else FAILED_PRECONDITION); with mutual TLS the node is
    the agent certificate's CN and a hello naming another node is PERMISSION_DENIED. Messages
    are numbered from 1, one more each (else INVALID_ARGUMENT), and validated with
    :mod:`driftwarden.core.wire` (INVALID_ARGUMENT with the validator's text; nothing is stored). A
    second stream for a node replaces the first (which ends ABORTED). An ``alert_batch`` is
    stored in one transaction, its NEW/UPDATED alerts are published to subscribers and run
    through the policy, then ``ack`` echoes its ids and ``spool_seqs``. A batch holding an alert
    of another node is rejected whole: a ``notice`` says why, nothing is stored or acked. Once
    stored, a batch is acked whatever fails after (a replay would be DUPLICATE and skip that
    work for good): such an error is logged, counted and audited. The policy's decisions for a
    batch (actions and audit entries) are stored in one transaction, then sent.
    ``heartbeat`` updates the agent's row and the node's container list (used to route
    actions, and to know which images the node runs); ``action_result`` finishes an action
    the collector sent to that node.

Fleet baselines on the stream (:mod:`~driftwarden.collector.baselines` merges and decides)
    ``hello.baselines`` says which versions the agent holds: each that changed meanwhile is
    sent at once. ``baseline_increment`` is merged into the image's baseline; it is refused
    (a ``notice``, counted, audited, nothing stored) for an image no heartbeat of this stream
    listed, or when it names another node's containers. ``baseline_request`` is answered at
    once with a ``baseline`` update (``found`` false: the agent learns the image). Every new
    version (a merge, an operator's change, the fleet's end of learning) is sent by one
    baseline thread, within ``baseline_delay`` plus the send, to every connected agent whose
    heartbeats listed the image or that asked for it or sent increments of it on its
    current stream, unless it holds that version already.

Actions left pending by a collector that stopped
    At start the service fails them (``INTERRUPTED_MESSAGE``, audited): nobody waits for them
    any more. An agent's late result for one still replaces that failure. (With replicas, only
    those a replica that is gone was to send.)

Replicas (several collectors sharing one PostgreSQL store)
    Alerts reach subscribers through the store tail (:mod:`~driftwarden.collector.tail`): each
    replica publishes every change any replica stores, once, in store order; this replica's
    own without reading them back, the others' when their commit's notification wakes it.
    An agent's row names the replica holding its stream. An operator's action for a node whose
    stream another live replica holds is stored pending, routed to that replica, which is told
    (``send``), takes it once (``claim_action``) and sends it; its result is stored and
    announced (``done``), and the caller's replica, waiting, reads it from the store. A node
    no live replica holds fails as "not connected". The policy's act decisions are claimed in
    the store per (alert, action): a second one, on any replica, is a skip.

Alerts.Subscribe / List, Actions.Request / List, Agents.List, Baselines.*
    Operator calls (Agents.List shows the baselines each agent holds; Baselines: see
    :mod:`~driftwarden.collector.baselines`, audited with the operator's identity).
    Subscribe sends initial metadata (``driftwarden-subscribed: 1``, and
    ``driftwarden-resume-token``: where the stream starts in store order) once the
    subscription is live, then alerts in store order (each event with its ``resume_token``;
    with ``resume_after``, the stored ones after it first; with ``max_batch``, several per
    event when several wait), overflow notices (``include_notices``) and action events
    (``include_actions``: events about containers the filter's node/namespace/image/container
    lists match) until the client cancels or the collector stops.

Threads: gRPC runs each call in its pool; a Connect stream also runs one reader thread of its
own (the gRPC thread writes the stream's responses); one baseline thread sends new baseline
versions and ends learning when the fleet's baselines are stable. Every stream (Connect and
Subscribe) holds a pool thread for its whole life, so at most ``max_streams`` run at once
(RESOURCE_EXHAUSTED beyond), leaving pool threads for unary calls.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from driftwarden.collector.auth import Authorizer
from driftwarden.collector.baselines import FleetBaselines, FleetSettings
from driftwarden.collector.convert import (
    action_command,
    action_message,
    agent_message,
    alert_message,
    baseline_not_found,
    baseline_update,
    filter_args,
)
from driftwarden.collector.fanout import DEFAULT_MAX_QUEUE, FanoutHub
from driftwarden.collector.filters import MIN_ID_PREFIX, ActionFilter, AlertFilter
from driftwarden.collector.outputs.base import OutputSet
from driftwarden.collector.policy import POLICY_ACTOR, Decision, Outcome, PolicyEngine
from driftwarden.collector.store import (
    ACTIONS_CHANNEL,
    ALERTS_CHANNEL,
    MAX_CANDIDATES,
    ActionRecord,
    CollectorStore,
    ContainerMatch,
    InsertOutcome,
)
from driftwarden.collector.tail import StoreTail, published_alert
from driftwarden.core import wire
from driftwarden.core.actions import ActionStatus
from driftwarden.core.baselines import FleetBaseline, HeldBaseline
from driftwarden.core.errors import AmbiguousContainer, RpcAbort, StoreError, UnknownContainer
from driftwarden.core.metrics import MetricsRegistry
from driftwarden.core.modes import Mode
from driftwarden.proto.v1 import actions_pb2, agent_pb2, alerts_pb2, baselines_pb2

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 100
INTERRUPTED_MESSAGE = ("the collector restarted before the agent reported a result; check the "
                       "container's state and repeat the action if needed (a late result from "
                       "the agent replaces this one)")


@dataclass(frozen=True)
class ServiceConfig:
    """How the services behave (the server's transport settings live in the server)."""

    operator_token: str | None = None  # operator calls need it as a bearer token
    tls: bool = False  # callers present verified client certificates
    subscriber_queue: int = DEFAULT_MAX_QUEUE  # alerts a subscriber may lag behind
    action_timeout: float = 10.0  # Actions.Request waits this long for the agent's result
    hello_timeout: float = 30.0  # a Connect stream must say hello within this
    max_streams: int = 28  # Connect + Subscribe streams at once (each holds a pool thread)
    outbox_limit: int = 10_000  # commands queued for an agent that does not read them
    poll_seconds: float = 0.5  # how often a waiting stream checks its client is still there
    # consensus and the fleet's end of learning
    fleet: FleetSettings = field(default_factory=FleetSettings)
    baseline_tick: float = 1.0  # how often the fleet's end of learning is checked
    baseline_delay: float = 0.05  # changes within this are sent to agents as one update

    def __post_init__(self) -> None:
        for name in ("subscriber_queue", "max_streams", "outbox_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServiceConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("action_timeout", "hello_timeout", "poll_seconds", "baseline_tick",
                     "baseline_delay"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ServiceConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.operator_token is not None and not self.operator_token.strip():
            raise ValueError("ServiceConfig.operator_token is empty; give a token or None")


# -- an agent's stream ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Close:
    """How an agent's stream ends (OK: the agent closed it)."""

    code: grpc.StatusCode
    details: str


class Outbox:
    """Commands for one agent stream, then (once) how the stream ends. Thread-safe."""

    def __init__(self, limit: int) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._items: collections.deque[agent_pb2.CollectorCommand] = collections.deque()
        self._limit = limit
        self.closed: Close | None = None

    def put(self, command: agent_pb2.CollectorCommand) -> bool:
        with self._cond:
            if self.closed is not None:
                return False
            if len(self._items) >= self._limit:
                self.closed = Close(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                    f"the agent did not read its commands ({self._limit} "
                                    "queued); reconnect")
                self._cond.notify_all()
                return False
            self._items.append(command)
            self._cond.notify()
            return True

    def close(self, code: grpc.StatusCode, details: str) -> bool:
        """End the stream after what is queued; the first close wins."""
        with self._cond:
            if self.closed is not None:
                return False
            self.closed = Close(code, details)
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> agent_pb2.CollectorCommand | Close | None:
        """The next command, else the close, else None after `timeout`."""
        with self._cond:
            if not self._items and self.closed is None:
                self._cond.wait(timeout)
            if self._items:
                return self._items.popleft()
            return self.closed


class AgentSession:
    """One Connect stream of one node, from its hello on."""

    def __init__(self, node: str, peer: str, hostname: str, outbox: Outbox) -> None:
        self.node = node
        self.peer = peer
        self.hostname = hostname
        self.outbox = outbox
        self.connected_at = time.time()
        # fleet baselines (guarded by the service's lock): the images this stream's heartbeats
        # listed, those it asked for or sent increments of, and the versions it holds
        self.images: set[str] = set()
        self.wanted: set[str] = set()
        self.held: dict[str, HeldBaseline] = {}

    def runs(self, image_key: str) -> bool:
        """Whether this agent gets the image's baseline updates."""
        return image_key in self.images or image_key in self.wanted

    def send(self, command: agent_pb2.CollectorCommand) -> bool:
        return self.outbox.put(command)

    def close(self, code: grpc.StatusCode, details: str) -> None:
        self.outbox.close(code, details)


class _Waiter:
    __slots__ = ("done", "record", "remote")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.record: ActionRecord | None = None
        self.remote = False  # another replica sends the action: its result is read back


# -- the service ---------------------------------------------------------------------------------


class CollectorService:
    """The collector's shared state and logic behind the servicers. Thread-safe."""

    def __init__(self, store: CollectorStore, hub: FanoutHub, engine: PolicyEngine,
                 config: ServiceConfig = ServiceConfig(),
                 metrics: MetricsRegistry | None = None,
                 outputs: OutputSet | None = None) -> None:
        self.store = store
        self.outputs = outputs  # webhook, syslog, file: each new alert is offered once
        self.hub = hub
        self.engine = engine
        self.config = config
        self.auth = Authorizer(config.operator_token, config.tls)
        self._lock = threading.Lock()
        self._sessions: dict[str, AgentSession] = {}
        self._live: dict[str, dict[str, ContainerMatch]] = {}  # node -> heartbeat containers
        self._host_of: dict[str, str] = {}  # container id -> the node whose heartbeat lists it
        self._hostnames: dict[str, str] = {}
        self._waiters: dict[str, _Waiter] = {}
        self._streams = threading.BoundedSemaphore(config.max_streams)
        self._closed = threading.Event()
        self.baselines = FleetBaselines(store, config.fleet, on_change=self._baseline_changed)
        self._changed_baselines: dict[str, None] = {}
        self._baselines_wake = threading.Condition(threading.Lock())
        self.metrics = metrics if metrics is not None else MetricsRegistry()
        self._register_metrics(self.metrics)
        self._fail_interrupted_actions()
        self.tail = StoreTail(store, hub).start()
        self._listener = store.listen(self._on_store_message)  # None: no other replica
        self._baseline_thread = threading.Thread(target=self._run_baselines, daemon=True,
                                                 name="driftwarden-baselines")
        self._baseline_thread.start()

    # - lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        """End every stream (agents and subscribers see UNAVAILABLE) and wake calls
        waiting for action results."""
        self._closed.set()
        with self._lock:
            sessions = list(self._sessions.values())
            waiters = list(self._waiters.values())
        for session in sessions:
            session.close(grpc.StatusCode.UNAVAILABLE, "the collector is shutting down")
        for waiter in waiters:
            waiter.done.set()
        with self._baselines_wake:
            self._baselines_wake.notify_all()
        if self._baseline_thread is not threading.current_thread():
            self._baseline_thread.join(10.0)
        if self._listener is not None:
            self._listener.stop(5.0)
        self.tail.stop(5.0)
        self.hub.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def store_reachable(self) -> bool:
        """False while a shared store's listening connection is down (PostgreSQL unreachable;
        it reconnects every second). A store no replica shares (SQLite) says True."""
        connected = getattr(self._listener, "connected", None)
        return connected is None or connected.is_set()

    def acquire_stream(self) -> None:
        """Take one of the stream slots (release_stream() when the stream ends)."""
        if not self._streams.acquire(blocking=False):
            raise RpcAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                           f"the collector serves at most {self.config.max_streams} streams at "
                           "once; retry later or raise its stream limit")

    def release_stream(self) -> None:
        self._streams.release()

    # - metrics ----------------------------------------------------------------------------

    def _register_metrics(self, registry: MetricsRegistry) -> None:
        prefix = "driftwarden_collector_"
        self._alerts_received = registry.counter(
            prefix + "alerts_received", "Alerts received from agents, by what the store did "
            "with them (new, updated, duplicate) or rejected", ("outcome",))
        self._actions_total = registry.counter(
            prefix + "actions", "Actions by type and final status (skipped: a policy brake; "
            "failed: includes agents not connected)", ("type", "status"))
        self._actions_interrupted = registry.counter(
            prefix + "actions_interrupted", "Actions a stopped collector left pending, failed "
            "at start (not in actions unless the agent's late result arrives)")
        self._invalid_messages = registry.counter(
            prefix + "invalid_messages", "Calls ended because a message was invalid", ("rpc",))
        self._batch_errors = registry.counter(
            prefix + "batch_errors", "Errors after an alert batch was stored (it is acked "
            "anyway; each is logged and audited), by stage: outputs, publish, policy, route",
            ("stage",))
        self._store_latency = registry.histogram(
            prefix + "alert_store_latency_seconds", "Seconds from a new alert's time (its "
            "triggering kernel event, or when the agent raised a window's alert; the agent's "
            "clock) to the commit of its batch in the store: the agent's detection, spool and "
            "send, the network, the collector's checks, and for alerts replayed from a spool the "
            "time they waited; a clock difference between the hosts adds to it (below 0 counts "
            "as 0)")
        self.subscriber_latency = registry.histogram(
            prefix + "subscriber_latency_seconds", "Seconds from the store's commit of an "
            "alert (new or updated) to a subscriber's stream taking it from its queue, once per "
            "subscriber: publishing, the queue wait, the stream thread's wake-up")
        registry.gauge_callback(prefix + "subscribers", "Open Alerts.Subscribe streams",
                                lambda: len(self.hub))
        registry.counter_callback(prefix + "subscriber_dropped",
                                  "Alerts and action events dropped for subscribers that fell "
                                  "behind", lambda: self.hub.stats()["dropped"])
        registry.gauge_callback(prefix + "agents_connected", "Agents with an open stream",
                                self.connected_count)
        registry.gauge_callback(prefix + "store_seq", "The store order number of the last "
                                "alert change published to this collector's subscribers",
                                lambda: self.tail.cursor)
        registry.counter_callback(prefix + "store_tail_reads", "Reads of the store by the "
                                  "store tail: alert changes another replica stored, "
                                  "announced or found by the periodic check",
                                  lambda: self.tail.read_count)
        registry.gauge_callback(prefix + "store_rows", "Rows in the collector's store, by table",
                                self._store_rows, ("table",))
        registry.counter_callback(prefix + "policy_decisions", "Policy decisions by outcome",
                                  self._policy_counts, ("outcome",))
        self._baseline_updates = registry.counter(
            prefix + "baseline_versions_sent", "Baseline versions sent to agents (BaselineUpdate), "
            "by cause: change (merge, mode, accept, reset, push, end of learning), request, "
            "hello (the agent held an older version)", ("cause",))
        self._baseline_increments = registry.counter(
            prefix + "baseline_increments", "Baseline increments taken from agents, by outcome: "
            "merged (a new version), unchanged, not_learning (the image no longer learns)",
            ("outcome",))
        self._increments_refused = registry.counter(
            prefix + "baseline_increments_refused", "Baseline increments refused (nothing of "
            "them stored), by reason: not_running (the node's heartbeats list no container of "
            "the image), other_node (they name another node's container)", ("reason",))
        registry.gauge_callback(prefix + "baselines", "Fleet baselines held, by mode",
                                self._baselines_by_mode, ("mode",))
        registry.counter_callback(prefix + "store_checkpoints", "Background WAL checkpoints "
                                  "of the store, by outcome (errors: the WAL grows until one "
                                  "succeeds)", lambda: {
                                      "done": self.store.checkpoint_stats["checkpoints"],
                                      "error": self.store.checkpoint_stats["errors"]},
                                  ("outcome",))

    def _store_rows(self) -> dict[str, int]:
        stats = self.store.stats()
        return {k: stats[k] for k in ("alerts", "actions", "agents", "audit", "containers",
                                      "baselines")}

    def _baselines_by_mode(self) -> dict[str, int]:
        counts = dict.fromkeys((m.value for m in Mode), 0)
        for summary in self.store.list_baselines():
            counts[summary.mode.value] += 1
        return counts

    def _policy_counts(self) -> dict[str, int]:
        stats = self.engine.stats()
        return {o.value: stats[o.value] for o in Outcome}

    def connected_count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def invalid_message(self, rpc: str) -> None:
        self._invalid_messages.labels(rpc).inc()

    # - agents -----------------------------------------------------------------------------

    def attach(self, node: str, peer: str, hello: agent_pb2.Hello, outbox: Outbox,
               ) -> AgentSession:
        """A stream said hello: it becomes the node's stream (closing an older one)."""
        session = AgentSession(node, peer, hello.hostname, outbox)
        held = [wire.held_baseline_from_proto(h) for h in hello.baselines]
        session.held = {h.image_key: h for h in held}
        with self._lock:
            if self._closed.is_set():
                raise RpcAbort(grpc.StatusCode.UNAVAILABLE, "the collector is shutting down")
            old = self._sessions.get(node)
            self._sessions[node] = session
            self._hostnames[node] = hello.hostname
            self.store.upsert_agent(node, agent_version=hello.agent_version,
                                    mode=wire.MODE.from_proto(hello.mode), peer=peer,
                                    baselines=held, replica=self.store.replica_id)
        if old is not None:
            log.info("agent %s: new stream from %s replaces the one from %s", node, peer,
                     old.peer)
            old.close(grpc.StatusCode.ABORTED,
                      f"replaced by a newer stream for node {node} from {peer}")
        log.info("agent %s connected from %s (version %s)", node, peer, hello.agent_version)
        if session.held:  # what changed while it was away
            stored = {s.image_key: HeldBaseline(s.image_key, s.version, s.mode)
                      for s in self.store.list_baselines()}
            for image_key, had in list(session.held.items()):
                if stored.get(image_key, had) != had:
                    self._publish_baseline(image_key, only=session, cause="hello")
        return session

    def detach(self, session: AgentSession) -> None:
        """The stream ended: the agent is disconnected unless a newer stream replaced it."""
        with self._lock:
            if self._sessions.get(session.node) is not session:
                return
            del self._sessions[session.node]
            try:
                self.store.mark_agent_disconnected(session.node,
                                                   baselines=list(session.held.values()),
                                                   replica=self.store.replica_id)
            except StoreError as exc:
                log.warning("agent %s: cannot mark it disconnected: %s", session.node, exc)
        log.info("agent %s disconnected (%s)", session.node, session.peer)

    def heartbeat(self, session: AgentSession, beat: agent_pb2.Heartbeat) -> None:
        counters = {c.kind: {f: getattr(c, f) for f in wire.KIND_COUNTER_FIELDS}
                    for c in beat.counters}
        # an empty name is as unknown as none (the store refuses "" as a name)
        live = {c.id: ContainerMatch(c.id, c.name or None, session.node)
                for c in beat.containers if c.HasField("id") and c.id}
        with self._lock:
            if self._sessions.get(session.node) is not session:
                return  # a replaced stream's late heartbeat
            known = self._live.get(session.node, {})
            gone = known.keys() - live.keys()
            for cid in gone:
                if self._host_of.get(cid) == session.node:
                    del self._host_of[cid]
            self._host_of.update(dict.fromkeys(live, session.node))
            self._live[session.node] = live
            session.images.update(c.image.id for c in beat.containers if c.image.id)
            self.store.upsert_agent(session.node, counters=counters,
                                    containers_watched=beat.containers_watched,
                                    spool_depth=beat.spool_depth, peer=session.peer,
                                    replica=self.store.replica_id)
        # new on this stream: in the store, so that operators on other replicas can name them
        self.store.note_containers([m for cid, m in live.items() if known.get(cid) != m])

    def alert_batch(self, session: AgentSession, batch: agent_pb2.AlertBatch) -> None:
        """Store, publish, run the policy, ack (module docstring).

        Once the batch is stored it is acked, whatever fails after: a replay would only be
        DUPLICATE and never published or decided again, so such a failure is logged, counted
        (``batch_errors``) and audited instead of ending the stream before the ack."""
        node = session.node
        for i, alert in enumerate(batch.alerts):
            named = alert.container.node
            if named and named != node:
                claimed, problem = named, f"claims node {named!r}"
            else:  # its own node or none named: still not a container another node runs
                claimed = self._connected_host_of(alert.container.id, node)
                problem = (f"is about container {alert.container.id[:12]}, which node "
                           f"{claimed!r} runs,")
            if claimed:
                reason = (f"alert_batch rejected: alerts[{i}] (id {alert.id}) {problem} "
                          f"but this stream is node {node!r}; nothing of the batch is stored "
                          "or acked")
                self._alerts_received.labels("rejected").inc(len(batch.alerts))
                self.store.audit(node, "alert-batch", node, "rejected", reason,
                                 {"alerts": len(batch.alerts), "claimed_node": claimed})
                log.warning("agent %s: %s", node, reason)
                session.send(agent_pb2.CollectorCommand(notice=agent_pb2.Notice(text=reason)))
                return
        docs = []
        for alert in batch.alerts:
            alert.container.node = node
            docs.append(wire.alert_dict_from_proto(alert))
        # ValueError: INVALID_ARGUMENT, not stored
        results = self.store.store_alerts(docs)
        outcomes = [outcome for outcome, _ in results]
        stored_at, stored_wall = time.monotonic(), time.time()
        for doc, outcome in zip(docs, outcomes, strict=True):
            self._alerts_received.labels(outcome.value).inc()
            if outcome is InsertOutcome.NEW:
                self._store_latency.observe(max(stored_wall - doc["time"], 0.0))
        if self.outputs is not None:  # NEW only: a replay or a repeat is not sent again
            with self._contained("outputs", node, f"batch of {len(docs)} alerts"):
                self.outputs.offer(d for d, o in zip(docs, outcomes, strict=True)
                                   if o is InsertOutcome.NEW)
        changed: list[tuple[dict[str, Any], int]] = []
        with self._contained("publish", node, f"batch of {len(docs)} alerts"):
            changed = self._changed_alerts(docs, results)
        # a NEW alert goes out as the message just validated (its node set above); an UPDATED
        # one as now stored (its count): rebuilding every message cost a third of ingest
        received = {id(doc): msg for doc, msg in zip(docs, batch.alerts, strict=True)}
        published = []
        for doc, seq in changed:
            with self._contained("publish", node, doc["id"]):
                published.append(published_alert(seq, doc, received.get(id(doc)), stored_at))
        self.tail.stored(published)  # the tail publishes them, in store order
        self._apply_policy(session, [doc for doc, _ in changed])
        session.send(agent_pb2.CollectorCommand(ack=agent_pb2.Ack(
            alert_ids=[a.id for a in batch.alerts], spool_seqs=list(batch.spool_seqs))))

    def _connected_host_of(self, container_id: str, asking: str) -> str | None:
        """Another connected node whose heartbeat lists the container: an agent reports and
        acts for its own node's containers only, whatever node its alert names (one lookup per
        alert: the heartbeats keep the container -> node index).
        (Only connected nodes count: a node renamed while its containers ran is not locked
        out of them by its old name's last heartbeat.)"""
        with self._lock:
            host = self._host_of.get(container_id)
            return host if host is not None and host != asking and host in self._sessions \
                else None

    def _changed_alerts(self, docs: list[dict[str, Any]],
                        results: list[tuple[InsertOutcome, int | None]],
                        ) -> list[tuple[dict[str, Any], int]]:
        """The NEW alerts as delivered and the UPDATED ones as now stored, in batch order,
        with their seq."""
        updated = [d["id"] for d, (o, _) in zip(docs, results, strict=True)
                   if o is InsertOutcome.UPDATED]
        stored = self.store.get_alerts(updated) if updated else {}
        return [(stored.get(d["id"], d) if o is InsertOutcome.UPDATED else d, seq)
                for d, (o, seq) in zip(docs, results, strict=True)
                if o is not InsertOutcome.DUPLICATE and seq is not None]

    @contextlib.contextmanager
    def _contained(self, stage: str, node: str, subject: str) -> Iterator[None]:
        """Work after a batch was stored: an error is logged, counted and audited, and the
        caller goes on (see alert_batch)."""
        try:
            yield
        except Exception as exc:
            log.exception("agent %s: %s for %s failed; the alerts stay stored and are acked",
                          node, stage, subject)
            self._batch_errors.labels(stage).inc()
            try:
                self.store.audit("collector", stage, subject, "error",
                                 f"{type(exc).__name__}: {exc}", {"node": node})
            except (StoreError, ValueError) as audit_exc:
                log.error("cannot audit that error either: %s", audit_exc)

    def action_result(self, session: AgentSession, result: agent_pb2.ActionResult) -> None:
        record = self.store.get_action(result.action_id)
        if record is None or record.node != session.node:
            why = ("no such action" if record is None
                   else f"the action was sent to node {record.node}")
            text = f"action_result for {result.action_id!r} ignored: {why}"
            self.store.audit(session.node, "action-result", result.action_id, "rejected", text)
            session.send(agent_pb2.CollectorCommand(notice=agent_pb2.Notice(text=text)))
            return
        if record.finished and not record.interrupted:
            log.debug("action %s: result replayed, already %s", record.action_id, record.status)
            self._wake(record)
            return
        status = wire.action_status_from_proto(result.status)
        details: dict[str, Any] = {"action_id": record.action_id,
                                   "requested_by": record.requested_by}
        if record.interrupted:  # failed by a collector restart: the agent knows better
            details["replaces"] = record.message
            log.info("action %s: the agent's late result (%s) replaces the failure recorded "
                     "when the collector restarted", record.action_id, status.value)
        with self.store.transaction():
            record = self.store.finish_action(record.action_id, status, result.message)
            self.store.audit(session.node, record.type, record.container_id, status.value,
                             result.message, details)
            self.store.announce_action("done", record.action_id)  # a waiting replica reads it
        self._finished(record)
        self._wake(record)

    # - actions ----------------------------------------------------------------------------

    def _fail_interrupted_actions(self) -> None:
        """Actions a stopped collector left pending have no waiter and no route any more:
        fail them, audited (the store's fail_pending_actions); the agent's late result still
        replaces that (action_result)."""
        records = self.store.fail_pending_actions(INTERRUPTED_MESSAGE)
        if not records:
            return
        self._actions_interrupted.inc(len(records))
        shown = ", ".join(f"{r.type} {r.container_id[:12]} on {r.node}" for r in records[:10])
        more = f" and {len(records) - 10} more" if len(records) > 10 else ""
        log.warning("%d actions were still pending when the collector stopped; marked failed "
                    "(check those containers): %s%s", len(records), shown, more)

    def resolve_container(self, text: str, node: str = "") -> ContainerMatch:
        """An operator's container reference -> the container and its node: the nodes'
        heartbeat lists first (full id, name, id prefix), then the store."""
        text = text.strip()
        with self._lock:
            live = [m for n, containers in self._live.items() if not node or n == node
                    for m in containers.values()]
        for how, found in (
                ("the id", [m for m in live if m.container_id == text]),
                ("the name", [m for m in live if m.name == text]),
                ("an id prefix", [m for m in live if len(text) >= MIN_ID_PREFIX
                                  and m.container_id.startswith(text)])):
            if len(found) == 1:
                return found[0]
            if found:
                raise AmbiguousContainer(text, sorted(found)[:MAX_CANDIDATES],
                                         f"{how} of {len(found)} running containers")
        match = self.store.find_container(text)
        if node and match.node != node:
            raise UnknownContainer(text, [match])
        return match

    def request_action(self, request: actions_pb2.ActionRequest, operator: str,
                       is_active: Callable[[], bool]) -> ActionRecord:
        """An operator's action: resolve, record, route, wait for the result (<= timeout)."""
        wire.validate_action_request(request)
        match = self.resolve_container(request.container, request.node)
        action_type = wire.ACTION_TYPE.from_proto(request.type)
        claimed = request.requested_by.strip()
        requested_by = f"{operator}:{claimed}" if claimed and claimed != operator else operator
        session = self._session(match.node)
        holder = None if session is not None else self._remote_holder(match.node)
        online = session is not None or holder is not None
        action_id = uuid.uuid4().hex
        waiter = _Waiter()
        waiter.remote = holder is not None
        with self._lock:  # before a result can be announced
            self._waiters[action_id] = waiter
        try:
            with self.store.transaction():
                self.store.audit(requested_by, action_type, match.container_id, "request",
                                 request.reason, {"node": match.node,
                                                  "with_pause": request.with_pause,
                                                  "container": request.container})
                record = self.store.record_action(
                    container_id=match.container_id, container_name=match.name,
                    node=match.node, type=action_type, reason=request.reason,
                    requested_by=requested_by, with_pause=request.with_pause,
                    action_id=action_id, replica=holder, **_unless_online(online, match.node))
                if not online:
                    self._audit_offline(record)
                elif holder is not None:  # told when the action is stored
                    self.store.announce_action("send", action_id)
            if not online:
                self._finished(record)
                return record
            if session is None:
                self.engine.record_manual(match.container_id, action_type)
                return self._await_remote(record, waiter, is_active)
            record = self._send(record, session)
            if record.finished:  # the stream closed meanwhile
                return record
            # the policy leaves a container an operator just acted on alone for its cooldown
            self.engine.record_manual(match.container_id, action_type)
            deadline = time.monotonic() + self.config.action_timeout
            while not waiter.done.is_set() and not self._closed.is_set() and is_active():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                waiter.done.wait(min(left, self.config.poll_seconds))
        finally:
            with self._lock:
                self._waiters.pop(action_id, None)
        return waiter.record or self.store.get_action(record.action_id) or record

    def _remote_holder(self, node: str) -> str | None:
        """The live replica, other than this one, holding `node`'s stream (None: none)."""
        agent = self.store.get_agent(node)
        if agent is None or not agent.connected or agent.replica in (
                None, self.store.replica_id):
            return None
        return agent.replica if agent.replica in self.store.live_replicas() else None

    def _await_remote(self, record: ActionRecord, waiter: _Waiter,
                      is_active: Callable[[], bool]) -> ActionRecord:
        """The result of an action another replica sends, read from the store when that
        replica announces it (and every poll_seconds), within the action timeout."""
        deadline = time.monotonic() + self.config.action_timeout
        while not self._closed.is_set() and is_active():
            current = self.store.get_action(record.action_id)
            if current is not None and current.finished:  # its events: from the sender
                return current
            left = deadline - time.monotonic()
            if left <= 0:
                break
            waiter.done.wait(min(left, self.config.poll_seconds))
            waiter.done.clear()
        return self.store.get_action(record.action_id) or record

    def _on_store_message(self, channel: str, payload: str) -> None:
        """What another replica announced (the store's listener thread; an empty payload:
        the listener (re)connected, and may have missed announcements)."""
        if channel == ALERTS_CHANNEL:
            if payload != self.store.replica_id:
                self.tail.wake()
            return
        if channel != ACTIONS_CHANNEL:
            return
        event, _, action_id = payload.partition(" ")
        action_id, _, details = action_id.partition(" ")
        if event == "event":
            replica, _, status = details.partition(" ")
            self._publish_remote_action(action_id, replica, status)
            return
        if event == "send":
            self._send_routed(action_id)
            return
        if not payload:  # announcements may have been missed: what is routed here waits
            for routed in self.store.routed_actions():
                self._send_routed(routed)
        with self._lock:  # "done", or possibly missed: the waiters read the store again
            waiters = (list(self._waiters.values()) if not action_id
                       else [w for w in (self._waiters.get(action_id),) if w is not None])
        for waiter in waiters:
            if waiter.remote:  # a local action's result wakes its waiter directly (_wake)
                waiter.done.set()

    def _send_routed(self, action_id: str) -> None:
        """An action another replica stored for a node whose stream this one holds: take it
        (once) and send it, or fail it when the stream is gone."""
        record = self.store.claim_action(action_id)
        if record is None:
            return
        session = self._session(record.node)
        if session is not None:
            self._send(record, session)
        else:
            self._fail_closed(record)

    def _apply_policy(self, session: AgentSession, alerts: list[dict[str, Any]]) -> None:
        """The policy for a stored batch's NEW/UPDATED alerts: decide each; record every
        decision (its action and audit entries) in one transaction; then send the actions and
        publish the events. Errors are contained per alert (see alert_batch)."""
        node = session.node
        decided: list[tuple[dict[str, Any], Decision]] = []
        for alert in alerts:
            with self._contained("policy", node, alert["id"]):
                decision = self.engine.decide(alert)
                if decision.outcome is not Outcome.NO_MATCH:
                    decided.append((alert, decision))
        if not decided:
            return
        online = self._session(node) is session
        recorded: list[tuple[dict[str, Any], ActionRecord]] = []
        with self._contained("policy", node, f"{len(decided)} decisions"):
            try:
                with self.store.transaction():
                    for alert, decision in decided:
                        # a savepoint each: one that fails is undone alone
                        with self._contained("policy", node, alert["id"]), \
                                self.store.transaction():
                            recorded.append(
                                (alert, self._record_decision(node, alert, decision, online)))
            except BaseException:
                recorded.clear()  # rolled back: nothing of it is stored
                raise
        for alert, record in recorded:
            with self._contained("route", node, record.action_id):
                if record.status is ActionStatus.PENDING:
                    record = self._send(record, session, alert)
                else:
                    self._finished(record, alert)
                if record.status is not ActionStatus.SKIPPED:
                    log.info("policy: %s %s on %s: %s", record.type, record.container_id[:12],
                             node, record.status.value)

    def _record_decision(self, node: str, alert: Mapping[str, Any], decision: Decision,
                         online: bool) -> ActionRecord:
        """Store one act/skip decision as an action, audited (call within a transaction)."""
        container = alert.get("container") or {}
        action_type = decision.action.value
        action_id = uuid.uuid4().hex
        if decision.outcome is Outcome.ACT and not self.store.claim_decision(
                alert["id"], action_type, action_id):
            decision = decision.already_decided(alert["id"])  # e.g. a replay on this replica
        details = {"rule": decision.rule, "alert_id": alert["id"], "node": node,
                   "with_pause": decision.with_pause,
                   "brake": decision.brake.value if decision.brake else None}
        status: dict[str, Any] = ({"status": ActionStatus.SKIPPED, "message": decision.reason}
                                  if decision.outcome is Outcome.SKIP
                                  else _unless_online(online, node))
        record = self.store.record_action(
            container_id=container.get("id"), container_name=container.get("name") or None,
            node=node, type=action_type, reason=decision.reason, requested_by=POLICY_ACTOR,
            alert_id=alert["id"], with_pause=decision.with_pause, action_id=action_id, **status)
        self.store.audit(POLICY_ACTOR, action_type, record.container_id,
                         "skip" if decision.outcome is Outcome.SKIP else "act", decision.reason,
                         {**details, "action_id": record.action_id})
        if decision.outcome is Outcome.ACT and not online:
            self._audit_offline(record)
        return record

    def _session(self, node: str) -> AgentSession | None:
        with self._lock:
            return self._sessions.get(node)

    def _audit_offline(self, record: ActionRecord) -> None:
        self.store.audit("collector", record.type, record.container_id, "failed",
                         record.message, {"action_id": record.action_id})

    def _send(self, record: ActionRecord, session: AgentSession,
              alert: Mapping[str, Any] | None = None) -> ActionRecord:
        """Publish a pending action and send it to its agent; it fails when the agent's
        stream closed meanwhile (then returned finished)."""
        self._publish_action(record, alert)
        if session.send(action_command(record)):
            return record
        return self._fail_closed(record, alert)

    def _fail_closed(self, record: ActionRecord,
                     alert: Mapping[str, Any] | None = None) -> ActionRecord:
        """A pending action whose agent's stream closed: failed, audited, announced."""
        with self.store.transaction():
            record = self.store.finish_action(
                record.action_id, ActionStatus.FAILED,
                f"{_offline_message(record.node)} (its stream closed)")
            self._audit_offline(record)
            self.store.announce_action("done", record.action_id)
        self._finished(record, alert)
        return record

    def _finished(self, record: ActionRecord,
                  match_alert: Mapping[str, Any] | None = None) -> None:
        """An action reached its final status: count it and tell subscribers."""
        self._actions_total.labels(record.type, record.status.value).inc()
        if match_alert is None and record.alert_id:
            match_alert = self.store.get_alert(record.alert_id)
        self._publish_action(record, match_alert)

    def _publish_action(self, record: ActionRecord, alert: Mapping[str, Any] | None) -> None:
        """Tell this replica's subscribers, and the other replicas (theirs)."""
        self._publish_action_here(record, alert)
        try:
            self.store.announce_action("event", record.action_id, self.store.replica_id,
                                       record.status.value)
        except StoreError as exc:
            log.warning("action %s: cannot tell the other replicas (%s); their subscribers "
                        "miss this event", record.action_id, exc)

    def _publish_action_here(self, record: ActionRecord,
                             alert: Mapping[str, Any] | None) -> None:
        match = alert if alert is not None else self._container_view(record)
        event = alerts_pb2.AlertEvent(action=action_message(record))
        self.hub.publish_event(record.status.value, {"action": record.to_dict(), "match": match,
                                                     "message": event}, match)

    def _publish_remote_action(self, action_id: str, replica: str, status: str) -> None:
        """Another replica published an action event: this one's subscribers get it too,
        after the alerts stored before it (the tail catches up first)."""
        if replica == self.store.replica_id:
            return
        self.tail.catch_up()
        record = self.store.get_action(action_id)
        if record is None:
            return
        if status == ActionStatus.PENDING.value and record.finished:  # as it was announced
            record = dataclasses.replace(record, status=ActionStatus.PENDING, message="",
                                         finished_at=None)
        alert = self.store.get_alert(record.alert_id) if record.alert_id else None
        self._publish_action_here(record, alert)

    def _container_view(self, record: ActionRecord) -> dict[str, Any]:
        """What a subscriber's container filter sees of an action without an alert: the
        container as its newest stored alert shows it, else its id, name and node."""
        alerts, _ = self.store.list_alerts(AlertFilter(containers=(record.container_id,)),
                                           page_size=1)
        if alerts:
            return alerts[0]
        return {"node": record.node,
                "container": {"id": record.container_id, "name": record.container_name}}

    def _wake(self, record: ActionRecord) -> None:
        with self._lock:
            waiter = self._waiters.get(record.action_id)
        if waiter is not None:
            waiter.record = record
            waiter.done.set()

    # - fleet baselines ---------------------------------------------------------------------

    def lists_image(self, session: AgentSession, image_key: str) -> bool:
        """Whether a heartbeat of this stream listed a container of the image (so far)."""
        with self._lock:
            return image_key in session.images

    def baseline_increment(self, session: AgentSession,
                           increment: baselines_pb2.BaselineIncrement, *,
                           listed: bool | None = None) -> None:
        """Merge what an image showed on this node (collector.baselines); refused (a notice,
        counted and audited, nothing stored) for an image no heartbeat of this stream listed
        (`listed`: what :meth:`lists_image` said when the increment arrived; None: ask now)
        or for another node's containers."""
        image_key = increment.image_key
        runs = self.lists_image(session, image_key) if listed is None else listed
        if not runs:
            self._refuse_increment(session, image_key, "not_running",
                                   "this node's heartbeats list no container of that image")
            return
        try:
            result = self.baselines.merge(session.node, increment)
        except ValueError as exc:
            self._refuse_increment(session, image_key, "other_node", str(exc))
            return
        with self._lock:
            session.wanted.add(image_key)
        if not result.learning:
            # the agent still learns an image the fleet no longer does: it gets the mode
            self._baseline_increments.labels("not_learning").inc()
            self._publish_baseline(image_key, only=session, cause="request", force=True)
            return
        self._baseline_increments.labels("merged" if result.changed else "unchanged").inc()

    def _refuse_increment(self, session: AgentSession, image_key: str, reason: str,
                          why: str) -> None:
        text = (f"baseline_increment for image {image_key} refused: {why}; nothing of it is "
                "stored")
        self._increments_refused.labels(reason).inc()
        log.warning("agent %s: %s", session.node, text)
        self.store.audit(session.node, "baseline-increment", image_key, "refused", text)
        session.send(agent_pb2.CollectorCommand(notice=agent_pb2.Notice(text=text)))

    def baseline_request(self, session: AgentSession,
                         request: baselines_pb2.BaselineRequest) -> None:
        """Answer at once with the image's baseline (found = false: the agent learns it). An
        image without one starts from its repository's previous version when they share
        layers (FleetBaselines.carry)."""
        with self._lock:
            session.wanted.add(request.image_key)
        if self.store.get_baseline(request.image_key) is None and not self.baselines.carry(
                request.image_key, request.image_name, request.layers):
            session.send(baseline_not_found(request.image_key))
            self._baseline_updates.labels("request").inc()
            return
        self._publish_baseline(request.image_key, only=session, cause="request", force=True)

    def _baseline_changed(self, doc: FleetBaseline) -> None:
        """A baseline has a new version: the baseline thread sends it shortly."""
        with self._baselines_wake:
            self._changed_baselines[doc.image_key] = None
            self._baselines_wake.notify()

    def _run_baselines(self) -> None:
        """The baseline thread: sends changed baselines to the agents that run them (changes
        within `baseline_delay` go as one), and every `baseline_tick` ends the learning of
        the baselines that are stable."""
        config = self.config
        next_step = time.monotonic() + config.baseline_tick
        while not self._closed.is_set():
            with self._baselines_wake:
                if not self._changed_baselines:
                    self._baselines_wake.wait(max(0.0, next_step - time.monotonic()))
            if self._closed.is_set():
                return
            if self._changed_baselines:
                time.sleep(config.baseline_delay)  # let a burst of merges settle
            with self._baselines_wake:
                changed, self._changed_baselines = list(self._changed_baselines), {}
            for image_key in changed:
                with self._logged("sending baseline", image_key):
                    self._publish_baseline(image_key, cause="change")
            if time.monotonic() >= next_step:
                with self._logged("ending learning", "fleet baselines"):
                    self.baselines.step()
                next_step = time.monotonic() + config.baseline_tick

    @contextlib.contextmanager
    def _logged(self, what: str, subject: str) -> Iterator[None]:
        try:
            yield
        except Exception:  # the thread goes on: the next change or tick tries again
            log.exception("%s for %s failed", what, subject)

    def _publish_baseline(self, image_key: str, *, only: AgentSession | None = None,
                          cause: str, force: bool = False) -> None:
        """Send the image's stored baseline to `only`, else to every connected agent that
        runs it, unless (without `force`) the agent holds that version and mode already."""
        doc = self.store.get_baseline(image_key)
        if doc is None:
            return
        current = HeldBaseline(image_key, doc.version, doc.mode)
        with self._lock:
            targets = [only] if only is not None else [
                s for s in self._sessions.values() if s.runs(image_key)]
            targets = [s for s in targets if force or s.held.get(image_key) != current]
        command = baseline_update(doc, self.baselines.summary(doc)) if targets else None
        for session in targets:
            if session.send(command):
                self._baseline_updates.labels(cause).inc()
                with self._lock:
                    session.held[image_key] = current

    # - listings ---------------------------------------------------------------------------

    def list_alerts(self, request: alerts_pb2.ListAlertsRequest) -> alerts_pb2.ListAlertsResponse:
        wire.validate_list_alerts_request(request)
        alert_filter = AlertFilter(
            **filter_args(request.filter),
            since=wire.from_timestamp(request.since) if request.HasField("since") else None,
            until=wire.from_timestamp(request.until) if request.HasField("until") else None)
        docs, token = self.store.list_alerts(alert_filter, request.page_size or DEFAULT_PAGE_SIZE,
                                             request.page_token or None)
        return alerts_pb2.ListAlertsResponse(alerts=[alert_message(d) for d in docs],
                                             next_page_token=token or "")

    def list_actions(self, request: actions_pb2.ListActionsRequest,
                     ) -> actions_pb2.ListActionsResponse:
        """Newest first by (requested time, id); filtered and paged by the store's SQL."""
        wire.validate_list_actions_request(request)
        action_filter = ActionFilter(
            nodes=tuple(request.nodes), containers=tuple(request.containers),
            types=tuple(wire.ACTION_TYPE.from_proto(t) for t in request.types),
            since=wire.from_timestamp(request.since) if request.HasField("since") else None,
            until=wire.from_timestamp(request.until) if request.HasField("until") else None)
        records, token = self.store.page_actions(
            action_filter, request.page_size or DEFAULT_PAGE_SIZE, request.page_token or None)
        return actions_pb2.ListActionsResponse(actions=[action_message(r) for r in records],
                                               next_page_token=token or "")

    def list_agents(self) -> agent_pb2.ListAgentsResponse:
        with self._lock:
            hostnames = dict(self._hostnames)
            held = {node: list(s.held.values()) for node, s in self._sessions.items()}
        agents = [agent_message(rec, hostnames.get(rec.node, ""), held.get(rec.node))
                  for rec in self.store.list_agents()]
        return agent_pb2.ListAgentsResponse(agents=agents)


def _offline_message(node: str) -> str:
    return f"agent for node {node} is not connected"


def _unless_online(online: bool, node: str) -> dict[str, Any]:
    """record_action arguments for an action to send: pending, or failed when its node's
    agent is not connected."""
    return {} if online else {"status": ActionStatus.FAILED, "message": _offline_message(node)}



__all__ = [
    "INTERRUPTED_MESSAGE",
    "POLICY_ACTOR",
    "AgentSession",
    "Close",
    "CollectorService",
    "Outbox",
    "ServiceConfig",
]
