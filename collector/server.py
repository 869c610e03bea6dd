"""The collector process's gRPC server: the driftwarden.v1 services plus health and reflection.

:class:`CollectorServer` owns everything the collector runs: the store (a SQLite file, or a
PostgreSQL database with ``store_url``), the fan-out hub,
the policy engine, the fleet's baselines, the metrics registry (and, with ``metrics_listen``, a
loopback HTTP server for it) and a ``grpc.server``. It is a context manager (``start()`` /
``stop()``); ``port`` is the bound port (useful with port 0).

Transport
    - Thread pool of ``max_workers`` threads. Every stream (an agent's Connect, an operator's
      Subscribe) holds one pool thread for its life (a Connect stream also runs one reader
      thread of its own), so at most ``max_streams`` streams run at once (default: all workers
      but 4, kept for unary calls); more get RESOURCE_EXHAUSTED. Size ``max_workers`` for the
      number of agents plus subscribers.
    - Messages are limited to ``wire.MAX_MESSAGE_BYTES`` both ways (grpc answers
      RESOURCE_EXHAUSTED beyond). SO_REUSEPORT is off, so a port in use is an error.
    - With ``tls`` (:class:`~driftwarden.core.tls.TlsFiles`: its CA is ``--tls-client-ca``) the
      server listens with TLS only and requires a client certificate issued by that CA
      (``driftwarden certs init`` makes them).
    - Loopback addresses only, unless ``allow_non_loopback`` (which then requires TLS).
    - ``grpc.health.v1.Health`` reports SERVING for "" and each service until ``stop()``
      (NOT_SERVING meanwhile while a PostgreSQL store is unreachable: its calls would fail),
      and server reflection (v1alpha) lists every service.

Stopping ends agent streams (UNAVAILABLE: agents reconnect and replay their spool), ends
subscriber streams cleanly, then stops gRPC with ``stop_grace`` seconds for unary calls.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from driftwarden.collector.baselines import FleetSettings
from driftwarden.collector.fanout import DEFAULT_MAX_QUEUE, FanoutHub
from driftwarden.collector.outputs import OutputConfig, OutputSet
from driftwarden.collector.policy import DEFAULT_POLICY, PastAction, Policy, PolicyEngine
from driftwarden.collector.service import CollectorService, ServiceConfig
from driftwarden.collector.servicers import add_servicers
from driftwarden.collector.store import SqlStore, is_postgres_url, open_store, redact
from driftwarden.core.actions import ActionStatus
from driftwarden.core.errors import CollectorError, UsageError
from driftwarden.core.lifecycle import Service
from driftwarden.core.metrics import MetricsRegistry, MetricsServer
from driftwarden.core.netaddr import (
    COLLECTOR_PORT,
    host_port,
    is_loopback,
    parse_host_port,
    parse_metrics_address,
)
from driftwarden.core.tls import TlsFiles
from driftwarden.core.wire import MAX_MESSAGE_BYTES
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

DEFAULT_LISTEN = f"127.0.0.1:{COLLECTOR_PORT}"
UNARY_RESERVE = 4  # pool threads kept free of streams by default
STOP_SLACK_SECONDS = 5.0  # past stop_grace, how long stop() waits for gRPC to finish
CHECKPOINT_SECONDS = 1.0  # the store's WAL is checkpointed by a thread this often
STORE_CHECK_SECONDS = 0.5  # how often the health service follows the store's reachability


@dataclass(frozen=True)
class CollectorConfig:
    """Everything a collector needs; validated on construction (UsageError)."""

    db_path: str | os.PathLike[str] | None  # the SQLite file; None with store_url
    listen: str = DEFAULT_LISTEN
    policy: Policy = DEFAULT_POLICY
    tls: TlsFiles | None = None
    operator_token: str | None = None
    metrics_listen: str | None = None  # HOST:PORT (loopback) for GET /metrics; None = off
    allow_non_loopback: bool = False
    max_workers: int = 32
    max_streams: int | None = None  # None: max_workers - UNARY_RESERVE
    subscriber_queue: int = DEFAULT_MAX_QUEUE
    action_timeout: float = 10.0
    hello_timeout: float = 30.0
    stop_grace: float = 5.0
    poll_seconds: float = 0.5
    fleet: FleetSettings = field(default_factory=FleetSettings)  # baselines: consensus, learning
    baseline_tick: float = 1.0  # how often the fleet's end of learning is checked
    store_url: str | None = None  # postgresql://USER@HOST:PORT/DB instead of db_path
    outputs: tuple[OutputConfig, ...] = ()  # webhook, syslog, file (collector.outputs)

    def __post_init__(self) -> None:
        host, _ = self.listen_address
        if not is_loopback(host) and self.tls is None:
            raise UsageError(f"--listen {self.listen}: listening beyond loopback needs TLS "
                             "(--tls-cert, --tls-key, --tls-client-ca)")
        if self.tls is not None and not self.tls.has_pair:
            raise UsageError("a TLS collector presents its certificate: give --tls-cert and "
                             "--tls-key with --tls-client-ca")
        if self.metrics_listen is not None:
            parse_metrics_address(self.metrics_listen)  # malformed or beyond loopback: refuse now
        if self.max_workers < 2:
            raise UsageError(f"max_workers must be >= 2, got {self.max_workers}")
        streams = self.streams
        if not 1 <= streams < self.max_workers:
            raise UsageError(f"max_streams must be 1..{self.max_workers - 1} (fewer than the "
                             f"{self.max_workers} workers), got {streams}")
        if self.operator_token is not None and not self.operator_token.strip():
            raise UsageError("the operator token is empty")
        if self.store_url is not None:
            if self.db_path is not None:
                raise UsageError("--db and --store are exclusive: give the SQLite file (--db) "
                                 "or the PostgreSQL database (--store), not both")
            if not is_postgres_url(self.store_url):
                raise UsageError(f"--store {redact(self.store_url)}: give a PostgreSQL URL, "
                                 "postgresql://USER@HOST:PORT/DB")
        elif self.db_path is None or not str(self.db_path):
            raise UsageError("--db: give the path of the collector's SQLite file "
                             "(or --store postgresql://USER@HOST:PORT/DB)")

    @property
    def data_location(self) -> str:
        """Where the data lives, for messages: the SQLite file, or the URL without password."""
        if self.store_url is not None:
            return redact(self.store_url)
        return os.path.realpath(os.fspath(self.db_path or ""))

    @property
    def listen_address(self) -> tuple[str, int]:
        """``--listen`` as (host, port); UsageError when malformed or not allowed."""
        return parse_host_port(self.listen, flag="--listen", listen=True,
                               allow_non_loopback=self.allow_non_loopback)

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """``--metrics`` as (loopback host, port), None when off."""
        if self.metrics_listen is None:
            return None
        return parse_metrics_address(self.metrics_listen)

    @property
    def streams(self) -> int:
        if self.max_streams is not None:
            return self.max_streams
        return max(1, self.max_workers - UNARY_RESERVE)


_TAKEN = tuple(s for s in ActionStatus if s is not ActionStatus.SKIPPED)


def _last_recorded_action(store: SqlStore) -> Callable[[str, str], PastAction | None]:
    """The policy's view of the store: the newest action taken on a container (by any replica,
    policy or operator) for an alert other than the one being decided."""
    def last(container_id: str, alert_id: str) -> PastAction | None:
        for record in store.list_actions(container_id=container_id, statuses=_TAKEN, limit=5):
            if record.alert_id != alert_id or not alert_id:
                return PastAction(record.created_at, record.type, record.requested_by)
        return None

    return last


class CollectorServer(Service):
    """The running collector (module docstring). ``start()`` binds and serves (a failed start
    tears down what it made, with no grace); ``stop()`` (idempotent) ends streams, stops gRPC
    and closes the store."""

    def __init__(self, config: CollectorConfig, *,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.config = config
        self._clock = clock
        self.store: SqlStore | None = None
        self.hub: FanoutHub | None = None
        self.engine: PolicyEngine | None = None
        self.service: CollectorService | None = None
        self.metrics = MetricsRegistry()
        self.metrics_server: MetricsServer | None = None
        self.outputs = OutputSet.from_configs(config.outputs)
        self._server: grpc.Server | None = None
        self._health: health.HealthServicer | None = None
        self._health_names: tuple[str, ...] = ()
        self._store_watch: threading.Thread | None = None
        self._store_watch_stop = threading.Event()
        self._port: int | None = None

    # - lifecycle --------------------------------------------------------------------------

    def _start(self) -> None:
        config = self.config
        host, port = config.listen_address
        credentials = config.tls.server_credentials() if config.tls is not None else None
        self.store = open_store(db_path=config.db_path, url=config.store_url, clock=self._clock,
                                checkpoint_interval=CHECKPOINT_SECONDS)
        stale = self.store.mark_all_agents_disconnected()
        if stale:
            log.info("marked %d agents disconnected (streams do not survive a restart)", stale)
        self.hub = FanoutHub()
        self.engine = PolicyEngine(config.policy, recorded=_last_recorded_action(self.store),
                                   wall_clock=self._clock)
        self.outputs.register_metrics(self.metrics)
        self.outputs.start()
        self.service = CollectorService(
            self.store, self.hub, self.engine,
            ServiceConfig(operator_token=config.operator_token, tls=credentials is not None,
                          subscriber_queue=config.subscriber_queue,
                          action_timeout=config.action_timeout,
                          hello_timeout=config.hello_timeout, max_streams=config.streams,
                          poll_seconds=config.poll_seconds, fleet=config.fleet,
                          baseline_tick=config.baseline_tick),
            self.metrics, self.outputs)
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers,
                                       thread_name_prefix="driftwarden-grpc"),
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                     ("grpc.so_reuseport", 0),
                     # find dead peers of idle streams (agents also heartbeat)
                     ("grpc.keepalive_time_ms", 30_000),
                     ("grpc.keepalive_timeout_ms", 10_000),
                     ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
                     ("grpc.keepalive_permit_without_calls", 1)])
        self._server = server
        names = add_servicers(self.service, server)
        self._health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        self._health_names = ("", *names)
        for name in self._health_names:
            self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        address = host_port(host, port)
        try:
            if credentials is not None:
                bound = server.add_secure_port(address, credentials)
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError:  # grpc's text only says to turn on its debug log
            bound = 0
        if not bound:
            raise CollectorError(f"cannot listen on {address}: the port is in use or the "
                                 "address is not on this host")
        self._port = bound
        server.start()
        self._store_watch = threading.Thread(target=self._watch_store, daemon=True,
                                             name="driftwarden-store-health")
        self._store_watch.start()
        if config.metrics_address is not None:
            m_host, m_port = config.metrics_address
            try:
                self.metrics_server = MetricsServer(self.metrics, m_host, m_port).start()
            except OSError as exc:
                raise CollectorError(f"--metrics {config.metrics_listen}: cannot listen "
                                     f"({exc.strerror})") from None
        log.info("collector listening on %s (%s), store %s", self.address,
                 "mTLS" if credentials is not None else "plaintext", self.store.path)

    def stop(self, grace: float | None = None) -> None:
        """`grace`: seconds unary calls get to finish (None: ``config.stop_grace``)."""
        super().stop(grace)

    def _stop(self, timeout: float | None) -> None:
        grace = self.config.stop_grace if timeout is None else timeout
        self._store_watch_stop.set()
        if self._store_watch is not None:
            self._store_watch.join(STORE_CHECK_SECONDS + 5.0)
        if self._health is not None:
            self._health.enter_graceful_shutdown()
        if self.service is not None:
            self.service.close()
        # grpcio can leave a call it failed to deserialize counted as running (seen with a
        # malformed message on a stream): its shutdown event then never fires. The streams are
        # ended and the store is about to close, so a stop that waits is bounded.
        if (self._server is not None
                and not self._server.stop(grace).wait(grace + STOP_SLACK_SECONDS)):
            log.warning("gRPC server still not stopped %.0f s after the stop; going on",
                        grace + STOP_SLACK_SECONDS)
        self.outputs.stop(0.0 if timeout == 0 else None)  # each flushes, bounded (its config)
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.store is not None:
            self.store.close()
        self._server = None
        self._health = None
        self.metrics_server = None

    def _watch_store(self) -> None:
        """Health follows the store: NOT_SERVING for every service while it is unreachable
        (a load balancer or a probe then prefers another replica), SERVING again once back."""
        serving = True
        while not self._store_watch_stop.wait(STORE_CHECK_SECONDS):
            health_servicer, service = self._health, self.service
            if health_servicer is None or service is None:
                return
            reachable = service.store_reachable
            if reachable == serving:
                continue
            serving = reachable
            status = (health_pb2.HealthCheckResponse.SERVING if serving
                      else health_pb2.HealthCheckResponse.NOT_SERVING)
            for name in self._health_names:
                health_servicer.set(name, status)
            if serving:
                log.warning("store %s is reachable again: health SERVING", self.store.path)
            else:
                log.warning("store %s is unreachable: health NOT_SERVING until it is back",
                            self.store.path)

    # - where ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the collector is not started")
        return self._port

    @property
    def host(self) -> str:
        host, _ = self.config.listen_address
        return host

    @property
    def address(self) -> str:
        """``HOST:PORT`` clients dial (with the bound port)."""
        return host_port(self.host, self.port)

    @property
    def metrics_url(self) -> str | None:
        return self.metrics_server.url if self.metrics_server is not None else None


__all__ = [
    "DEFAULT_LISTEN",
    "CollectorConfig",
    "CollectorError",
    "CollectorServer",
]
