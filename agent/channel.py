"""The agent's side of the collector connection: alerts spooled on disk, streamed, acknowledged.

:class:`CollectorChannel` is an AlertSink (``emit``/``flush``/``close``), so it stands where
:class:`~driftwarden.agent.alerts.JsonLinesAlertSink` does, behind the AlertAggregator. ``emit``
appends the alert to an :class:`~driftwarden.agent.spool.AlertSpool` and wakes the sender; it never
waits on the network. An alert leaves the spool only when the collector acknowledges it.

Threads
    caller           ``emit``: spool append (a write; the spool's own thread fsyncs it
                     right after, see agent.spool), then a wake-up. Nothing else.
    channel          dials the collector, runs one ``AgentChannel.Connect`` stream at a time,
                     reads its commands (ack, action, notice) and redials when it ends.
    gRPC's requests  runs this module's request generator: it sends hello, then batches,
                     heartbeats and action results as they are due, and sleeps between them.
    heartbeats       builds each periodic heartbeat when it is due (the runtime's container
                     list takes milliseconds: an alert must not wait for it).
    action worker    runs one action at a time, so reading the stream never waits on Docker.

What a stream carries (agent -> collector)
    1. ``hello`` (node, version, mode, hostname, started_at), always first;
    2. a ``heartbeat`` right away (the collector routes actions by the containers it lists),
       then one every ``heartbeat_seconds``;
    3. every alert still pending in the spool, oldest first (the replay), then new alerts as
       they are appended, batched: at most ``max_batch_alerts`` per ``alert_batch`` and an upper
       bound of the serialized message below ``max_batch_bytes`` (< wire.MAX_MESSAGE_BYTES).
       ``AlertBatch.spool_seqs`` gives each alert's spool sequence number;
    4. ``action_result`` for each action the collector asked for;
    5. with a :class:`~driftwarden.agent.fleet.FleetBaselines` (``fleet``): hello lists the
       fleet baselines held here, ``baseline_request`` asks for each image the agent sees (on
       every new stream again), ``baseline_increment`` reports what a learning image showed
       (every few seconds, and at stop); the collector's ``baseline`` commands go to it.
    An ``ack`` removes exactly the entries named by its ``spool_seqs`` (by ``alert_ids``, oldest
    sent first, when a collector sends no seqs). At most ``max_in_flight`` alerts wait for an ack
    on one stream; sending then pauses. A stream with alerts in flight and no ack for
    ``ack_timeout`` seconds is abandoned and redialed.

Delivery is at least once: when a stream ends, everything not acknowledged is sent again on the
next one (the collector deduplicates by alert id); an agent restart replays the spool the same
way. The one exception is an alert that can never be delivered: a spool record that is not an
alert, or one that fails wire validation (the collector would reject it, and every batch with it,
forever). It is logged as an error, counted in ``stats.invalid_dropped`` and removed from the
spool, so it cannot hold back the others.

Reconnects: exponential backoff with jitter (:class:`Backoff`: 0.5 s doubling to 30 s, each wait
between half and all of that), reset once a stream is healthy (the collector sent a command, or
the stream stayed up ``stable_seconds``). One warning per outage, not per retry; a warning
too when a collector takes the stream again (so a log that shows the outage shows its end).

Failover: ``ChannelConfig.failover`` lists more collectors (replicas sharing one store). Every
failed dial or ended stream moves to the next address in the list (round robin, after the same
backoff wait: a dead replica costs about half a second, never a tight loop), and the agent stays
on whichever address works: while its stream there lasts it does not move back to the first
address. The new stream replays every unacknowledged alert (the store deduplicates by id),
asks for the fleet baselines again and sends its heartbeat at once, so actions find the node on
its new replica. ``stats.collector`` names the address of the open stream, ``stats.failovers``
counts the moves. A collector that stops answering (a hung process, a node gone without closing
its connections) is noticed by HTTP/2 keepalive pings (``keepalive_seconds``, answered within
``keepalive_timeout``), not only when alerts wait ``ack_timeout`` for their ack. A host name
that resolves to several addresses (a headless Service) is left to gRPC's resolver, which tries
each of its addresses on every dial.

Actions: ``action`` commands run on the worker through ``actions.run(type, container_id,
[with_pause=True])`` (a :class:`~driftwarden.agent.actions.ContainerActions`) when
``is_local(container_id)`` says the container is on this host, else they are answered
CONTAINER_GONE. A command whose ``action_id`` was already run is answered with the earlier
result, not run again. Results not yet sent when a stream ends go out on the next stream.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from driftwarden.agent.alerts import AlertSink
from driftwarden.agent.spool import DEFAULT_MAX_BYTES, AlertSpool
from driftwarden.core import __version__
from driftwarden.core.alerts import Alert, alert_from_dict
from driftwarden.core.dial import dial
from driftwarden.core.errors import (
    CertError,
    ChannelError,
    DriftwardenError,
    InvalidMessage,
    SpoolFull,
    UsageError,
)
from driftwarden.core.lifecycle import Service
from driftwarden.core.tls import TlsFiles
from driftwarden.core.wire import (
    ACTION_STATUS,
    ACTION_TYPE,
    DEFAULT_LIMITS,
    KIND_COUNTER_FIELDS,
    MAX_MESSAGE_BYTES,
    MODE,
    alert_to_proto,
    to_timestamp,
    validate_alert,
    validate_collector_command,
)
from driftwarden.proto.v1 import agent_pb2, agent_pb2_grpc, common_pb2

log = logging.getLogger(__name__)

SPOOL_DIR_NAME = "spool"  # STATE_DIR/spool
# Upper bounds of what an AgentMessage adds around its alerts: the seq and body fields, the
# packed spool_seqs header; per alert its field tag and length and its spool seq (10 bytes).
_MESSAGE_OVERHEAD = 64
_PER_ALERT_OVERHEAD = 16
_MAX_RESULT_TEXT = 4000  # wire: texts of at most 4096 characters
_REMEMBERED_ACTIONS = 256  # action ids whose results are kept (a repeated command is not rerun)
_FRESH_LIMIT = 10_000  # new alerts queued in memory; beyond that the sender reads the spool
_FINAL_FLEET_MESSAGES = 64  # baseline increments sent at stop, at most
_REFUSALS = ("PERMISSION_DENIED", "UNAUTHENTICATED", "FAILED_PRECONDITION", "INVALID_ARGUMENT")


@dataclass(frozen=True)
class ChannelConfig:
    """Where the collector is and how to talk to it (defaults are the production values)."""

    address: str  # the gRPC target: host:port (netaddr.host_port); the first one dialled
    node: str
    # more collectors (replicas of one store), dialled in turn when a stream fails
    failover: tuple[str, ...] = ()
    mode: str = "learn"  # the agent's mode for images it sees first (hello.mode)
    hostname: str = field(default_factory=socket.gethostname)
    started_at: float = field(default_factory=time.time)
    tls: TlsFiles | None = None
    heartbeat_seconds: float = 5.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    stable_seconds: float = 10.0  # a stream up this long resets the backoff
    ack_timeout: float = 60.0
    max_batch_alerts: int = DEFAULT_LIMITS.max_batch_alerts
    max_batch_bytes: int = MAX_MESSAGE_BYTES - 1024
    max_in_flight: int = 5000
    spool_fsync: bool = True
    spool_max_bytes: int = DEFAULT_MAX_BYTES
    close_timeout: float = 3.0  # how long close() lets the stream end by itself
    # HTTP/2 pings on the stream: a collector that stops answering them (its node gone without
    # closing the connection, a hung process) ends the stream, so the agent fails over instead
    # of writing into a dead connection until TCP gives up (minutes). The collector accepts
    # pings 5 s apart (collector/server.py).
    keepalive_seconds: float = 15.0
    keepalive_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not self.address or any(not a for a in self.failover):
            raise UsageError("a collector address is empty")
        if len(set(self.addresses)) != len(self.addresses):
            raise UsageError(f"collector addresses {', '.join(self.addresses)}: one is given "
                             f"twice")
        if not self.node or not self.node.isprintable() or any(c.isspace() for c in self.node):
            raise UsageError(f"node name {self.node!r} must be printable text without spaces")
        if self.tls is not None and not self.tls.has_pair:  # the collector knows nodes by it
            raise UsageError("an agent with TLS presents its certificate: give --tls-cert and "
                             "--tls-key with --tls-ca")
        try:
            MODE.to_proto(self.mode)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        for name in ("heartbeat_seconds", "backoff_initial", "backoff_max", "stable_seconds",
                     "ack_timeout", "close_timeout", "keepalive_seconds", "keepalive_timeout"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.backoff_max < self.backoff_initial:
            raise UsageError(f"backoff_max {self.backoff_max} is below backoff_initial "
                             f"{self.backoff_initial}")
        if not 1 <= self.max_batch_alerts <= DEFAULT_LIMITS.max_batch_alerts:
            raise UsageError(f"max_batch_alerts must be 1..{DEFAULT_LIMITS.max_batch_alerts}, "
                             f"got {self.max_batch_alerts}")
        largest = MAX_MESSAGE_BYTES - _MESSAGE_OVERHEAD
        if not 4096 <= self.max_batch_bytes <= largest:
            raise UsageError(f"max_batch_bytes must be 4096..{largest}, got "
                             f"{self.max_batch_bytes}")
        if self.max_in_flight < self.max_batch_alerts:
            raise UsageError(f"max_in_flight {self.max_in_flight} is below max_batch_alerts "
                             f"{self.max_batch_alerts}")

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every collector address, in the order they are tried."""
        return (self.address, *self.failover)


class Backoff:
    """Waits between reconnects: ``base`` = ``initial`` doubling per failure up to ``maximum``;
    each wait is ``base * (0.5 + 0.5 * random())`` so agents do not redial in step."""

    def __init__(self, initial: float, maximum: float, *,
                 random: Callable[[], float] = random.random) -> None:
        self.initial = initial
        self.maximum = maximum
        self._random = random
        self.failures = 0

    def next_delay(self) -> tuple[float, float]:
        """Count one more failure; ``(base, wait)`` for it."""
        base = min(self.maximum, self.initial * 2 ** min(self.failures, 64))
        self.failures += 1
        return base, base * (0.5 + 0.5 * self._random())

    def reset(self) -> None:
        self.failures = 0


class Actions(Protocol):
    """What the channel needs of :class:`~driftwarden.agent.actions.ContainerActions`."""

    def run(self, action: str, container_id: str, **options: Any) -> Any: ...


def docker_is_local(actions: Any, cgroup_root: str | Path | None = None) -> Callable[[str], bool]:
    """``is_local`` for a ContainerActions: the runtime knows the container; when the runtime
    cannot answer, a cgroup v2 directory of the container exists; when neither can be checked,
    True (the action then reports what is wrong itself)."""
    from driftwarden.agent.actions import container_cgroup_candidates
    from driftwarden.core.errors import ContainerNotFoundError, RuntimeActionError
    from driftwarden.probes.loader import find_cgroup2_root

    def is_local(container_id: str) -> bool:
        runtime = getattr(actions, "runtime", None)
        if runtime is not None:
            try:
                runtime.state(container_id)
                return True
            except ContainerNotFoundError:
                return False
            except RuntimeActionError as exc:
                log.debug("runtime cannot say whether %s is local (%s); checking its cgroup",
                          container_id[:12], exc)
        try:
            root = Path(cgroup_root) if cgroup_root is not None else find_cgroup2_root()
        except DriftwardenError:
            return True
        return any(p.is_dir() for p in container_cgroup_candidates(root, container_id))

    return is_local


@dataclass(frozen=True)
class ChannelStats:
    connected: bool  # a stream is open and its hello went out
    sent: int  # alerts sent (a resend counts again)
    acked: int  # spool entries the collector acknowledged
    reconnects: int  # dials after the first one
    streams: int  # streams opened
    spool_depth: int  # alerts waiting for an ack
    last_error: str | None  # why the last stream ended or could not open
    failures_in_row: int  # stream failures since the last healthy stream
    collector: str | None  # the address of the open stream (None: not connected)
    failovers: int  # moves to another collector address after a failure
    backoff_seconds: float  # base wait (before jitter) of the latest retry; 0 before any
    heartbeats: int
    invalid_dropped: int  # undeliverable alerts removed from the spool (see module docstring)
    spool_refused: int  # alerts emit() could not spool (spool full): lost, and logged
    actions: Mapping[tuple[str, str], int]  # (type, status) -> actions answered

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["actions"] = {f"{t}.{s}": n for (t, s), n in sorted(self.actions.items())}
        return out


class _Stream:
    """One Connect call and what was sent on it (fields guarded by the channel's condition)."""

    def __init__(self, number: int, address: str) -> None:
        self.number = number
        self.address = address  # the collector dialled
        self.call: Any = None
        self.closed = False
        self.ready_at: float | None = None  # when hello went out on a live connection
        self.healthy = False
        self.next_seq = 1
        self.in_flight: collections.OrderedDict[int, str] = collections.OrderedDict()
        self.sent_upto = -1  # highest spool seq sent (or dropped as invalid) on this stream
        self.replaying = True  # reading the spool; False: taking new alerts from memory
        self.last_progress = time.monotonic()  # last ack, or the first send after none in flight

    def message(self, **body: Any) -> agent_pb2.AgentMessage:
        msg = agent_pb2.AgentMessage(seq=self.next_seq, **body)
        self.next_seq += 1
        return msg


class CollectorChannel(Service):
    """Alerts to the collector through the spool; see the module docstring.

    ``counters()`` -> ``{kind: {"emitted": n, "suppressed": n, "dropped": n, ...}}`` (the probes'
    counters); ``containers()`` -> ``(id, name, image_id, image_name)`` tuples of the containers
    running here; both are read for each heartbeat (a failure is logged, the heartbeat sent
    without them). ``actions`` runs action commands (None: they are answered REFUSED);
    ``is_local`` defaults to :func:`docker_is_local` of ``actions``.
    """

    def __init__(self, config: ChannelConfig, spool_dir: str | Path, *,
                 actions: Actions | None = None,
                 is_local: Callable[[str], bool] | None = None,
                 counters: Callable[[], Mapping[str, Mapping[str, int]]] | None = None,
                 containers: Callable[[], Iterable[tuple[Any, ...]]] | None = None,
                 fleet: Any | None = None,
                 random: Callable[[], float] = random.random) -> None:
        super().__init__()
        self.config = config
        self._fleet = fleet  # agent.fleet.FleetBaselines: baselines learned with the fleet
        if config.tls is not None:
            config.tls.read()  # fail now, with the file's name, not on every redial
        self.spool = AlertSpool(spool_dir, fsync=config.spool_fsync,
                                max_bytes=config.spool_max_bytes)
        self._actions = actions
        if is_local is None:
            is_local = docker_is_local(actions) if actions is not None else (lambda _cid: True)
        self._is_local = is_local
        self._counters = counters
        self._containers = containers
        self._backoff = Backoff(config.backoff_initial, config.backoff_max, random=random)
        self._target = 0  # index into config.addresses of the collector dialled next
        timeout_ms = int(config.keepalive_timeout * 1000)
        self._keepalive = (
            ("grpc.keepalive_time_ms", int(config.keepalive_seconds * 1000)),
            ("grpc.keepalive_timeout_ms", timeout_ms),
            ("grpc.http2.ping_timeout_ms", timeout_ms))  # else a 60 s default applies
        self._cond = threading.Condition()
        # guarded by _cond:
        self._fresh: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()
        self._fresh_overflow = False
        self._results: collections.deque[agent_pb2.ActionResult] = collections.deque()
        self._heartbeat_wanted = False  # the sender asked the heartbeat thread for one
        self._heartbeat_ready: agent_pb2.Heartbeat | Exception | None = None
        self._stream: _Stream | None = None
        self._counts: collections.Counter[str] = collections.Counter()
        self._action_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self._last_error: str | None = None
        self._backoff_seconds = 0.0
        self._outage_since: float | None = None
        self._warned: set[str] = set()
        self._spool_full_logged = False
        self._stopping = threading.Event()
        self._closed = False  # emit() reads it under _cond
        self._done_actions: collections.OrderedDict[str, agent_pb2.ActionResult] = (
            collections.OrderedDict())
        self._action_queue: queue.Queue[agent_pb2.ActionCommand | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="driftwarden-channel",
                                        daemon=True)
        self._action_thread = threading.Thread(target=self._run_actions,
                                               name="driftwarden-actions", daemon=True)
        self._heartbeat_thread = threading.Thread(target=self._build_heartbeats,
                                                  name="driftwarden-heartbeats", daemon=True)
        if fleet is not None:
            fleet.attach(self.flush)  # a fleet message is due: wake the sender

    # -- lifecycle -------------------------------------------------------------------------

    def _start(self) -> None:
        self.spool.start()  # its sync thread: emit() never waits for the disk
        self._thread.start()
        self._action_thread.start()
        self._heartbeat_thread.start()
        failover = (f" (failover: {', '.join(self.config.failover)})"
                    if self.config.failover else "")
        log.info("collector channel to %s%s as node %s; %d alerts pending in %s",
                 self.config.address, failover, self.config.node, self.spool.depth,
                 self.spool.directory)

    def _restart_refused(self) -> Exception:
        return ChannelError("the collector channel is closed")

    def _stop(self, timeout: float | None) -> None:
        """Stop the threads, send a last heartbeat if connected; pending alerts stay spooled."""
        with self._cond:
            self._closed = True
            self._stopping.set()
            self._cond.notify_all()
        bound = self.config.close_timeout if timeout is None else timeout
        if self._thread.is_alive():
            self._thread.join(bound)
            if self._thread.is_alive():
                self._cancel_stream()
                self._thread.join(bound)
        self._action_queue.put(None)
        if self._action_thread.is_alive():
            self._action_thread.join(bound)
        if self._heartbeat_thread.is_alive():
            self._heartbeat_thread.join(bound)
        depth = self.spool.depth
        self.spool.close()
        log.info("collector channel closed; %d alerts kept in the spool for the next start",
                 depth)

    # -- AlertSink -------------------------------------------------------------------------

    def emit(self, alert: Alert) -> None:
        """Spool the alert and wake the sender (no network I/O here)."""
        data = alert.to_dict()
        with self._cond:
            if self._closed:
                raise ChannelError(f"alert {alert.id} emitted after the collector channel "
                                   f"was closed")
            seq = self._append(data)
            if seq is None or self._stream is None:
                return  # without a stream, the next one replays the spool anyway
            if len(self._fresh) < _FRESH_LIMIT:
                self._fresh.append((seq, data))
            else:
                self._fresh.clear()
                self._fresh_overflow = True
            self._cond.notify_all()

    def flush(self) -> None:
        """Alerts are spooled once emitted (agent.spool says when they reach the disk); this
        only wakes the sender."""
        with self._cond:
            self._cond.notify_all()

    # -- status ----------------------------------------------------------------------------

    @property
    def stats(self) -> ChannelStats:
        depth = self.spool.depth  # also after close: what stays spooled
        with self._cond:
            stream = self._stream
            return ChannelStats(
                connected=self._connected(stream), sent=self._counts["sent"],
                acked=self._counts["acked"], reconnects=self._counts["reconnects"],
                streams=self._counts["streams"], spool_depth=depth,
                last_error=self._last_error, failures_in_row=self._backoff.failures,
                collector=stream.address if self._connected(stream) else None,
                failovers=self._counts["failovers"],
                backoff_seconds=self._backoff_seconds, heartbeats=self._counts["heartbeats"],
                invalid_dropped=self._counts["invalid_dropped"],
                spool_refused=self._counts["spool_refused"], actions=dict(self._action_counts))

    @property
    def connected(self) -> bool:
        with self._cond:
            return self._connected(self._stream)

    @property
    def collector(self) -> str | None:
        """The address of the collector this agent streams to now (None: not connected)."""
        with self._cond:
            stream = self._stream
            return stream.address if self._connected(stream) else None

    def wait_idle(self, timeout: float) -> bool:
        """Wait until the spool is empty (every alert acknowledged); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self.spool.depth == 0, timeout)

    # -- spool -----------------------------------------------------------------------------

    def _append(self, data: dict[str, Any]) -> int | None:
        try:
            seq = self.spool.append([data])[0]
        except SpoolFull as exc:
            self._counts["spool_refused"] += 1
            if not self._spool_full_logged:
                self._spool_full_logged = True
                log.error("%s (logged once until the spool has room again)", exc)
            return None
        self._spool_full_logged = False
        return seq

    # -- the channel thread ----------------------------------------------------------------

    def _run(self) -> None:
        first = True
        while not self._stopping.is_set():
            if not first:
                with self._cond:
                    self._counts["reconnects"] += 1
            first = False
            address = self.config.addresses[self._target]
            error = self._serve(address)
            if self._stopping.is_set():
                break
            following = self._fail_over()
            with self._cond:
                self._last_error = error
                base, wait = self._backoff.next_delay()
                self._backoff_seconds = base
                outage_start = self._outage_since is None
                if outage_start:
                    self._outage_since = time.monotonic()
            then = f"; trying {following} next" if following != address else ""
            if outage_start:
                # A refusal (wrong node, certificate, protocol) needs a person, not patience.
                level = logging.ERROR if error.startswith(_REFUSALS) else logging.WARNING
                log.log(level, "collector %s: %s; alerts stay in the spool (%d pending) and "
                        "the agent keeps redialing%s", address, error, self.spool.depth, then)
            else:
                log.debug("collector %s still unavailable: %s; next try%s in %.2f s",
                          address, error, f" ({following})" if following != address else "",
                          wait)
            self._stopping.wait(wait)

    def _fail_over(self) -> str:
        """After a failure: the next address in the list becomes the one dialled (the same
        one when there is only one). Returns it."""
        addresses = self.config.addresses
        if len(addresses) > 1:
            self._target = (self._target + 1) % len(addresses)
            with self._cond:
                self._counts["failovers"] += 1
        return addresses[self._target]

    def _serve(self, address: str) -> str:
        """Run one stream to the collector at `address` until it ends; returns why it ended."""
        stream = _Stream(self._counts["streams"] + 1, address)
        try:
            # TLS files are read again at each dial: a renewed certificate is used at once
            channel = dial(address, tls=self.config.tls, options=self._keepalive)
        except CertError as exc:
            return str(exc)
        with self._cond:
            self._stream = stream
            self._counts["streams"] += 1
        try:
            stub = agent_pb2_grpc.AgentChannelStub(channel)
            call = stub.Connect(self._requests(stream))
            with self._cond:
                stream.call = call
            for command in call:
                self._on_command(stream, command)
            return "the collector ended the stream"
        except grpc.RpcError as exc:
            return _describe(exc)
        except Exception as exc:  # a bug here must not end the channel: log, redial
            log.exception("collector channel: unexpected error on the stream")
            if stream.call is not None:
                stream.call.cancel()
            return f"internal error: {exc}"
        finally:
            with self._cond:
                stream.closed = True
                if self._stream is stream:
                    self._stream = None
                self._cond.notify_all()
            if self._fleet is not None:
                self._fleet.stream_ended(stream.number)
            channel.close()

    def _cancel_stream(self) -> None:
        with self._cond:
            stream = self._stream
        if stream is not None and stream.call is not None:
            stream.call.cancel()

    def _connected(self, stream: _Stream | None) -> bool:
        return stream is not None and not stream.closed and stream.ready_at is not None

    def _mark_healthy(self, stream: _Stream) -> None:
        """Called with the condition held: the collector accepted this stream."""
        if stream.healthy:
            return
        stream.healthy = True
        self._backoff.reset()
        where = self._where(stream.address)
        if self._outage_since is not None:
            # as loud as the outage's warning (module docstring)
            log.warning("collector %s: connected again after %.1f s%s; %d alerts still "
                        "spooled", stream.address, time.monotonic() - self._outage_since,
                        where, self.spool.depth)
            self._outage_since = None
        else:
            log.info("collector %s: connected%s", stream.address, where)

    def _where(self, address: str) -> str:
        addresses = self.config.addresses
        if len(addresses) == 1:
            return ""
        return f" (collector {addresses.index(address) + 1} of {len(addresses)})"

    # -- commands (collector -> agent) -----------------------------------------------------

    def _on_command(self, stream: _Stream, command: agent_pb2.CollectorCommand) -> None:
        with self._cond:
            self._mark_healthy(stream)
        try:
            validate_collector_command(command)
        except InvalidMessage as exc:
            log.warning("collector sent an invalid command, ignored: %s", exc)
            return
        body = command.WhichOneof("body")
        if body == "ack":
            self._on_ack(stream, command.ack)
        elif body == "action":
            self._action_queue.put(command.action)
        elif body == "notice":
            log.warning("collector notice: %s", command.notice.text)
        elif body == "baseline" and self._fleet is not None:
            self._fleet.on_update(stream.number, command.baseline)

    def _on_ack(self, stream: _Stream, ack: agent_pb2.Ack) -> None:
        by_id: list[str] = []
        with self._cond:
            seqs = list(ack.spool_seqs)
            if not seqs:
                seqs, by_id = _seqs_of_ids(stream.in_flight, ack.alert_ids)
            for seq in seqs:
                stream.in_flight.pop(seq, None)
            stream.last_progress = time.monotonic()
        acked = self.spool.ack_seqs(seqs) if seqs else 0
        if by_id:
            acked += self.spool.ack(by_id)
        with self._cond:
            self._counts["acked"] += acked
            self._cond.notify_all()

    # -- the request generator (runs on gRPC's thread) -------------------------------------

    def _requests(self, stream: _Stream) -> Iterator[agent_pb2.AgentMessage]:
        config = self.config
        fleet = self._fleet
        yield stream.message(hello=agent_pb2.Hello(
            node=config.node, agent_version=__version__, mode=MODE.to_proto(config.mode),
            hostname=config.hostname, started_at=to_timestamp(config.started_at),
            baselines=fleet.hello_baselines() if fleet is not None else ()))
        # gRPC asks for the next message only once the previous one went out on a live
        # connection (a call without wait_for_ready fails instead): the stream is up.
        if fleet is not None:
            fleet.stream_started(stream.number)
        with self._cond:
            stream.ready_at = time.monotonic()
            self._heartbeat_ready = None  # built for an earlier stream
            self._cond.notify_all()
        next_heartbeat = time.monotonic()
        beats = 0  # sent on this stream
        while True:
            with self._cond:
                if stream.closed:
                    return
                if self._stopping.is_set():
                    final = self._connected(stream)
                    break
                result = self._results.popleft() if self._results else None
            if result is not None:
                yield stream.message(action_result=result)
                continue
            now = time.monotonic()
            body = fleet.next_message(stream.number, now) if fleet is not None else None
            if body is not None:
                yield stream.message(**body)
                continue
            heartbeat = None
            if fleet is not None and fleet.heartbeat_wanted(stream.number, now):
                heartbeat = self._heartbeat()
            elif now >= next_heartbeat:
                # the stream's first one now; later ones built by the heartbeat thread
                heartbeat = self._prepared_heartbeat() if beats else self._heartbeat()
            if heartbeat is not None:
                yield stream.message(heartbeat=heartbeat)
                if fleet is not None:  # the collector takes increments of the images listed
                    fleet.listed(stream.number, {c.image.id for c in heartbeat.containers})
                next_heartbeat = now + config.heartbeat_seconds
                beats += 1
                continue
            batch, progressed = self._take_batch(stream)
            if batch:
                yield stream.message(alert_batch=batch)
                continue
            if progressed:
                continue
            with self._cond:
                if self._ack_overdue(stream, now):
                    break_stream = True
                else:
                    break_stream = False
                    if stream.ready_at is not None and \
                            now - stream.ready_at >= config.stable_seconds:
                        self._mark_healthy(stream)
                    if not self._work_waiting(stream):
                        self._cond.wait(self._sleep_for(stream, now, next_heartbeat))
            if break_stream:
                log.warning("collector %s has not acknowledged %d alerts for %.0f s; "
                            "redialing", stream.address, len(stream.in_flight),
                            config.ack_timeout)
                if stream.call is not None:
                    stream.call.cancel()
                return
        if final:
            heartbeat = self._heartbeat()
            yield stream.message(heartbeat=heartbeat)
            if fleet is not None:  # what learning images showed last goes with the agent's stop
                fleet.listed(stream.number, {c.image.id for c in heartbeat.containers})
                for _ in range(_FINAL_FLEET_MESSAGES):
                    body = fleet.next_message(stream.number, time.monotonic(), final=True)
                    if body is None:
                        break
                    yield stream.message(**body)

    def _work_waiting(self, stream: _Stream) -> bool:
        if self._results or self._stopping.is_set() or stream.closed:
            return True
        if self._fleet is not None:
            now = time.monotonic()
            due = self._fleet.next_due(now)
            if due is not None and due <= now:
                return True
        if len(stream.in_flight) >= self.config.max_in_flight:
            return False
        if self._fresh_overflow or stream.replaying:
            return True
        return bool(self._fresh) and self._fresh[-1][0] > stream.sent_upto

    def _ack_overdue(self, stream: _Stream, now: float) -> bool:
        return bool(stream.in_flight) and now - stream.last_progress > self.config.ack_timeout

    def _sleep_for(self, stream: _Stream, now: float, next_heartbeat: float) -> float:
        # while the heartbeat thread builds one, its notify ends the wait
        until = now + self.config.heartbeat_seconds if self._heartbeat_wanted \
            else next_heartbeat
        if stream.in_flight:
            until = min(until, stream.last_progress + self.config.ack_timeout)
        if stream.ready_at is not None and not stream.healthy:
            until = min(until, stream.ready_at + self.config.stable_seconds)
        if self._fleet is not None:
            due = self._fleet.next_due(now)
            if due is not None:
                until = min(until, due)
        return max(0.001, until - now)

    def _take_batch(self, stream: _Stream) -> tuple[agent_pb2.AlertBatch | None, bool]:
        """The next batch to send, or None; ``progressed`` when entries were consumed (also
        invalid ones dropped), i.e. calling again may give more."""
        config = self.config
        with self._cond:
            room = min(config.max_batch_alerts, config.max_in_flight - len(stream.in_flight))
            if room <= 0:
                return None, False
            if self._fresh_overflow:
                self._fresh_overflow = False
                stream.replaying = True
            if stream.replaying:
                # Everything appended until now is in the spool; what comes later is queued.
                self._fresh.clear()
                limit = len(stream.in_flight) + room
                candidates = None
            else:
                while self._fresh and self._fresh[0][0] <= stream.sent_upto:
                    self._fresh.popleft()  # also read from the spool by the replay
                candidates = list(itertools.islice(self._fresh, room))
        if candidates is None:
            candidates = [e for e in self.spool.pending(limit) if e[0] > stream.sent_upto]
            if not candidates:
                with self._cond:
                    stream.replaying = False
                return None, True
        candidates = candidates[:room]
        alerts: list[common_pb2.Alert] = []
        seqs: list[int] = []
        invalid: list[tuple[int, Any, str]] = []
        size = _MESSAGE_OVERHEAD
        consumed = stream.sent_upto
        for seq, data in candidates:
            try:
                msg = _alert_message(data, config.node)
            except (InvalidMessage, ValueError, TypeError, KeyError, AttributeError) as exc:
                invalid.append((seq, data.get("id") if isinstance(data, dict) else None,
                                str(exc)))
                consumed = seq
                continue
            item = msg.ByteSize() + _PER_ALERT_OVERHEAD
            if size + item > config.max_batch_bytes:
                if alerts:
                    break
                invalid.append((seq, msg.id, f"{item} bytes, more than a message may carry"))
                consumed = seq
                continue
            alerts.append(msg)
            seqs.append(seq)
            size += item
            consumed = seq
        with self._cond:
            stream.sent_upto = consumed
            if not stream.in_flight and seqs:
                stream.last_progress = time.monotonic()
            for seq, msg in zip(seqs, alerts, strict=True):
                stream.in_flight[seq] = msg.id
            while self._fresh and self._fresh[0][0] <= consumed:
                self._fresh.popleft()
            self._counts["sent"] += len(alerts)
        if invalid:
            self._drop_invalid(invalid)
        if not alerts:
            return None, bool(invalid)
        return agent_pb2.AlertBatch(alerts=alerts, spool_seqs=seqs), True

    def _drop_invalid(self, invalid: list[tuple[int, Any, str]]) -> None:
        for seq, alert_id, why in invalid:
            log.error("spooled alert %s (spool seq %d) can never be delivered and is dropped: "
                      "%s", alert_id, seq, why)
        acked = self.spool.ack_seqs([seq for seq, _, _ in invalid])
        with self._cond:
            self._counts["invalid_dropped"] += acked
            self._cond.notify_all()

    def _prepared_heartbeat(self) -> agent_pb2.Heartbeat | None:
        """The heartbeat the heartbeat thread built; None (and it is asked for one) when none
        is ready yet. Its failure to build one is raised here, as building it here would."""
        with self._cond:
            heartbeat, self._heartbeat_ready = self._heartbeat_ready, None
            if heartbeat is None and not self._heartbeat_wanted:
                self._heartbeat_wanted = True
                self._cond.notify_all()
        if isinstance(heartbeat, Exception):
            raise heartbeat
        return heartbeat

    def _build_heartbeats(self) -> None:
        """The heartbeat thread: builds each periodic heartbeat when the sender asks for it.
        Reading the node's containers from the runtime took 6-25 ms, and an alert emitted
        meanwhile waited for the sender (measured: bench/COLLECTOR.md)."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._heartbeat_wanted or self._stopping.is_set())
                if self._stopping.is_set():
                    return
            try:
                heartbeat: agent_pb2.Heartbeat | Exception = self._heartbeat()
            except Exception as exc:  # the sender raises it (the stream ends, and is redialed)
                heartbeat = exc
            with self._cond:
                self._heartbeat_wanted = False
                self._heartbeat_ready = heartbeat
                self._cond.notify_all()

    def _heartbeat(self) -> agent_pb2.Heartbeat:
        counters = self._read("counters", self._counters) or {}
        containers = list(self._read("containers", self._containers) or ())
        limit = DEFAULT_LIMITS.max_heartbeat_containers
        if len(containers) > limit:
            self._warn_once("containers", "heartbeat lists %d of %d containers (the wire's "
                            "limit); actions on the others cannot be routed here", limit,
                            len(containers))
        heartbeat = agent_pb2.Heartbeat(
            sent_at=to_timestamp(time.time()),
            counters=[common_pb2.KindCounters(
                kind=str(kind), **{f: int(c.get(f, 0)) for f in KIND_COUNTER_FIELDS})
                for kind, c in sorted(counters.items())],
            containers_watched=len(containers),
            spool_depth=self.spool.depth,
            containers=[_container_message(c, self.config.node) for c in containers[:limit]])
        with self._cond:
            self._counts["heartbeats"] += 1
        return heartbeat

    def _read(self, what: str, source: Callable[[], Any] | None) -> Any:
        if source is None:
            return None
        try:
            return source()
        except Exception as exc:
            self._warn_once(what, "heartbeat sent without %s: %s", what, exc)
            return None

    def _warn_once(self, key: str, text: str, *args: Any) -> None:
        with self._cond:
            first = key not in self._warned
            self._warned.add(key)
        log.log(logging.WARNING if first else logging.DEBUG, text, *args)

    # -- actions ---------------------------------------------------------------------------

    def _run_actions(self) -> None:
        while True:
            command = self._action_queue.get()
            if command is None:
                return
            result = self._done_actions.get(command.action_id)
            if result is None:
                result = self._run_action(command)
                self._done_actions[command.action_id] = result
                while len(self._done_actions) > _REMEMBERED_ACTIONS:
                    self._done_actions.popitem(last=False)
            else:
                log.info("action %s was already run; sending its result again",
                         command.action_id)
            with self._cond:
                self._results.append(result)
                self._cond.notify_all()

    def _run_action(self, command: agent_pb2.ActionCommand) -> agent_pb2.ActionResult:
        action = ACTION_TYPE.from_proto(command.type)
        cid = command.container_id
        status, message = self._execute(action, cid, command.with_pause)
        with self._cond:
            self._action_counts[(action, status)] += 1
        log.info("action %s (%s) %s on %s by %s: %s: %s", command.action_id, command.reason,
                 action, cid[:12], command.requested_by or "?", status, message)
        return agent_pb2.ActionResult(
            action_id=command.action_id, status=ACTION_STATUS.to_proto(status),
            message=message[:_MAX_RESULT_TEXT], finished_at=to_timestamp(time.time()))

    def _execute(self, action: str, cid: str, with_pause: bool) -> tuple[str, str]:
        """``(status text as in wire.ACTION_STATUS, message)``."""
        if self._actions is None:
            return "refused", "this agent runs without container actions"
        try:
            local = self._is_local(cid)
        except Exception as exc:
            return "failed", f"cannot tell whether container {cid} is on node " \
                             f"{self.config.node}: {exc}"
        if not local:
            return "container-gone", f"container {cid} is not on node {self.config.node}"
        options = {"with_pause": True} if with_pause else {}
        try:
            result = self._actions.run(action, cid, **options)
        except Exception as exc:
            log.exception("action %s on %s raised", action, cid[:12])
            return "failed", f"{action} failed: {exc}"
        return str(result.status.value).replace("_", "-"), str(result.message)


class TeeSink:
    """One AlertSink that hands every alert to several (e.g. --alerts-out and --collector).
    A sink that raises does not keep the alert from the others; the first error is re-raised."""

    def __init__(self, *sinks: AlertSink) -> None:
        self.sinks = sinks

    def emit(self, alert: Alert) -> None:
        self._each(lambda s: s.emit(alert))

    def flush(self) -> None:
        self._each(lambda s: s.flush())

    def close(self) -> None:
        self._each(lambda s: s.close())

    def _each(self, call: Callable[[AlertSink], None]) -> None:
        error: BaseException | None = None
        for sink in self.sinks:
            try:
                call(sink)
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error


# -- helpers ---------------------------------------------------------------------------------


def _alert_message(data: Any, node: str) -> common_pb2.Alert:
    if not isinstance(data, Mapping):
        raise TypeError(f"spool record is a {type(data).__name__}, not an alert")
    msg = alert_to_proto(alert_from_dict(data), node)
    validate_alert(msg)
    return msg


def _container_message(entry: tuple[Any, ...], node: str) -> common_pb2.Container:
    cid, name, image_id, image_name = (tuple(entry) + (None,) * 4)[:4]
    image = common_pb2.Image(**{k: str(v) for k, v in (("id", image_id), ("name", image_name))
                                if v})
    return common_pb2.Container(**{k: str(v) for k, v in (("id", cid), ("name", name)) if v},
                                image=image, node=node)


def _seqs_of_ids(in_flight: Mapping[int, str], ids: Iterable[str]) -> tuple[list[int], list[str]]:
    """Spool seqs for acked ids: per occurrence, the oldest one in flight with that id; ids
    not in flight are returned apart (the spool acks them by id)."""
    by_id: dict[str, collections.deque[int]] = {}
    for seq, alert_id in in_flight.items():
        by_id.setdefault(alert_id, collections.deque()).append(seq)
    seqs: list[int] = []
    rest: list[str] = []
    for alert_id in ids:
        queued = by_id.get(alert_id)
        if queued:
            seqs.append(queued.popleft())
        else:
            rest.append(alert_id)
    return seqs, rest


def _describe(exc: grpc.RpcError) -> str:
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else str(exc)
    return f"{code.name if code is not None else 'error'}: {details}"


__all__ = [
    "SPOOL_DIR_NAME",
    "Backoff",
    "ChannelConfig",
    "ChannelError",
    "ChannelStats",
    "CollectorChannel",
    "TeeSink",
    "docker_is_local",
]
