"""The collector's gRPC services (driftwarden.v1): AgentChannel, Alerts, Actions, Agents and
Baselines.

Each servicer checks the caller (:class:`~driftwarden.collector.auth.Authorizer`), hands the
call to :class:`~driftwarden.collector.service.CollectorService` (whose docstring says what each
call does; :mod:`~driftwarden.collector.baselines` for Baselines) and maps known errors to
status codes: a bad request, filter or baseline file INVALID_ARGUMENT, an unknown container,
image or alert NOT_FOUND, an ambiguous one FAILED_PRECONDITION, a store failure
UNAVAILABLE. A Connect stream is read by a thread of its own while the gRPC thread writes the
agent's commands.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from driftwarden.collector.baselines import items_to_proto
from driftwarden.collector.convert import action_response, alert_message, filter_args
from driftwarden.collector.fanout import SubscriberFilter
from driftwarden.collector.service import AgentSession, Close, CollectorService, Outbox
from driftwarden.core import wire
from driftwarden.core.errors import (
    AmbiguousContainer,
    AmbiguousImage,
    BaselineError,
    FilterError,
    RpcAbort,
    StoreError,
    UnknownContainer,
    UnknownImage,
)
from driftwarden.core.lifecycle import join_or_warn, start_daemon_thread
from driftwarden.core.modes import Mode
from driftwarden.proto.v1 import (
    actions_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    alerts_pb2,
    alerts_pb2_grpc,
    baselines_pb2,
    baselines_pb2_grpc,
)

log = logging.getLogger(__name__)

SUBSCRIBED_METADATA = ("driftwarden-subscribed", "1")
RESUME_METADATA = "driftwarden-resume-token"  # initial metadata: the stream's start in the store
MAX_BATCH = 1000  # SubscribeRequest.max_batch at most
_BACKLOG_PAGE = 1000  # stored alerts read at once for a resumed subscriber


def _abort_on(exc: Exception) -> RpcAbort:
    """A known error -> the call's status."""
    if isinstance(exc, RpcAbort):
        return exc
    if isinstance(exc, wire.InvalidMessage | FilterError | ValueError | BaselineError):
        return RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    if isinstance(exc, UnknownContainer | UnknownImage):
        return RpcAbort(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, AmbiguousContainer | AmbiguousImage):
        return RpcAbort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, StoreError):
        return RpcAbort(grpc.StatusCode.UNAVAILABLE, f"collector store error: {exc}")
    raise exc


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    abort = _abort_on(exc)
    context.abort(abort.code, abort.details)


class _Servicer:
    """What every servicer shares: the service, and the shape of an operator's unary call."""

    def __init__(self, service: CollectorService) -> None:
        self._service = service

    def _operator_call(self, context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
        """Check the caller may make operator calls, then answer with `call()`; a known
        error ends the call with its status."""
        try:
            self._service.auth.operator(context)
            return call()
        except Exception as exc:
            _abort(context, exc)


# -- AgentChannel --------------------------------------------------------------------------------


class _AgentStream:
    """Reads one Connect stream in its own thread; the gRPC thread writes the outbox.

    Baseline increments and requests are handled in arrival order by a second thread of the
    stream (started with the first of them), so that alert batches never wait behind them: a
    merge rewrites the image's whole baseline, 7-20 ms for the increment a learning image
    sends every 2 s (measured), and the alert that came next waited that long. An increment is
    judged by the heartbeats that arrived before it (:meth:`CollectorService.lists_image` on
    the reader), as if it had been handled there. The stream ends (OK) after the fleet thread
    has handled everything read before the agent closed it."""

    FLEET_DRAIN_TIMEOUT = 30.0  # s the stream's end waits for queued increments

    def __init__(self, service: CollectorService, cert_node: str | None, peer: str) -> None:
        self.service = service
        self.cert_node = cert_node
        self.peer = peer
        self.outbox = Outbox(service.config.outbox_limit)
        self.session: AgentSession | None = None
        self.hello_seen = threading.Event()
        self._fleet_queue: queue.SimpleQueue[tuple[str, Any, bool] | None] = queue.SimpleQueue()
        self._fleet_thread: threading.Thread | None = None

    def read(self, messages: Iterator[agent_pb2.AgentMessage]) -> None:
        try:
            self._read(messages)
        except RpcAbort as exc:
            self.outbox.close(exc.code, exc.details)
        except Exception as exc:  # a bug: end the stream, the agent reconnects
            log.exception("agent stream from %s failed", self.peer)
            self.outbox.close(grpc.StatusCode.INTERNAL, f"collector error: {exc}")
        finally:
            self._drain_fleet()
            self.hello_seen.set()

    def _read(self, messages: Iterator[agent_pb2.AgentMessage]) -> None:
        expected = 1
        try:
            for msg in messages:
                if self.outbox.closed is not None:
                    return
                self._handle(msg, expected)
                expected += 1
        except grpc.RpcError:
            pass  # the call ended (cancelled by the agent or the server)
        self._drain_fleet()
        self.outbox.close(grpc.StatusCode.OK, "")

    def _fleet_later(self, body: str, message: Any, listed: bool) -> None:
        if self._fleet_thread is None:
            self._fleet_thread = start_daemon_thread(self._run_fleet,
                                                     f"driftwarden-fleet-{self.peer}")
        self._fleet_queue.put((body, message, listed))

    def _run_fleet(self) -> None:
        service = self.service
        while (item := self._fleet_queue.get()) is not None:
            body, message, listed = item
            try:
                if body == "baseline_increment":
                    service.baseline_increment(self.session, message, listed=listed)
                else:
                    service.baseline_request(self.session, message)
            except RpcAbort as exc:
                self.outbox.close(exc.code, exc.details)
            except (ValueError, StoreError) as exc:
                abort = _abort_on(exc)
                self.outbox.close(abort.code, abort.details)
            except Exception as exc:  # a bug: end the stream, the agent reconnects
                log.exception("agent stream from %s: %s failed", self.peer, body)
                self.outbox.close(grpc.StatusCode.INTERNAL, f"collector error: {exc}")

    def _drain_fleet(self) -> None:
        """Let the fleet thread handle what is queued, then end it (once)."""
        thread, self._fleet_thread = self._fleet_thread, None
        if thread is not None:
            self._fleet_queue.put(None)
            join_or_warn(thread, self.FLEET_DRAIN_TIMEOUT, f"the fleet thread of {self.peer}")

    def _handle(self, msg: agent_pb2.AgentMessage, expected: int) -> None:
        service = self.service
        body = msg.WhichOneof("body")
        if self.session is None and body != "hello":
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION,
                           f"the first message must be hello, got {body or 'an empty message'}")
        if self.session is not None and body == "hello":
            raise RpcAbort(grpc.StatusCode.FAILED_PRECONDITION,
                           "hello was already sent on this stream")
        try:
            wire.validate_agent_message(msg)
        except wire.InvalidMessage as exc:
            service.invalid_message("AgentChannel.Connect")
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        if msg.seq != expected:
            service.invalid_message("AgentChannel.Connect")
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT,
                           f"agent_message.seq: expected {expected}, got {msg.seq} (messages "
                           "are numbered from 1, one more each)")
        try:
            if body == "hello":
                self._hello(msg.hello)
            elif body == "alert_batch":
                service.alert_batch(self.session, msg.alert_batch)
            elif body == "heartbeat":
                service.heartbeat(self.session, msg.heartbeat)
            elif body == "baseline_increment":
                increment = msg.baseline_increment
                self._fleet_later(body, increment,
                                  service.lists_image(self.session, increment.image_key))
            elif body == "baseline_request":
                self._fleet_later(body, msg.baseline_request, True)
            else:
                service.action_result(self.session, msg.action_result)
        except (ValueError, StoreError) as exc:
            raise _abort_on(exc) from None

    def _hello(self, hello: agent_pb2.Hello) -> None:
        if self.cert_node is not None and hello.node != self.cert_node:
            raise RpcAbort(grpc.StatusCode.PERMISSION_DENIED,
                           f"hello.node {hello.node!r} is not the node of this agent's "
                           f"certificate ({self.cert_node!r})")
        self.session = self.service.attach(hello.node, self.peer, hello, self.outbox)
        self.hello_seen.set()


class AgentChannelServicer(_Servicer, agent_pb2_grpc.AgentChannelServicer):
    def Connect(self, request_iterator, context):
        service = self._service
        try:
            cert_node = service.auth.agent_node(context)
            service.acquire_stream()
        except RpcAbort as exc:
            _abort(context, exc)
        stream = _AgentStream(service, cert_node, context.peer())
        context.add_callback(lambda: stream.outbox.close(grpc.StatusCode.CANCELLED,
                                                         "the call ended"))
        reader = threading.Thread(target=stream.read, args=(request_iterator,), daemon=True,
                                  name=f"driftwarden-agent-{context.peer()}")
        try:
            reader.start()
            if not stream.hello_seen.wait(service.config.hello_timeout):
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED,
                              f"no hello within {service.config.hello_timeout:g} s")
            while True:
                item = stream.outbox.get(service.config.poll_seconds)
                if isinstance(item, Close):
                    if item.code is not grpc.StatusCode.OK:
                        context.abort(item.code, item.details)
                    return
                if item is not None:
                    yield item
        finally:
            if stream.session is not None:
                service.detach(stream.session)
            service.release_stream()


# -- operator calls ------------------------------------------------------------------------------


class AlertsServicer(_Servicer, alerts_pb2_grpc.AlertsServicer):
    def Subscribe(self, request, context):
        """Live alerts in store order; with ``resume_after``, first the stored ones after it
        (read from the store up to where the live queue starts, so none is missed or sent
        twice). A token beyond this replica's tail but stored (another replica's subscriber
        was ahead) skips the live ones up to it; one beyond the store's last alert (another
        store's) is ignored: from now on."""
        service = self._service
        try:
            who = service.auth.operator(context)
            wire.validate_subscribe_request(request)
            alert_filter, container_filter = _subscriber_filters(request)
            resume_after = _resume_token(request.resume_after)
            if request.max_batch > MAX_BATCH:
                raise ValueError(f"max_batch: at most {MAX_BATCH} alerts per event, got "
                                 f"{request.max_batch}")
            service.acquire_stream()
        except Exception as exc:
            _abort(context, exc)
        try:
            try:
                sub, start = service.tail.subscribe(alert_filter,
                                                    service.config.subscriber_queue,
                                                    name=f"{who}@{context.peer()}")
            except RuntimeError:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the collector is shutting down")
            with sub:
                context.add_callback(sub.close)
                context.send_initial_metadata((SUBSCRIBED_METADATA,
                                               (RESUME_METADATA, str(start))))
                skip_through = start
                if resume_after is not None and resume_after < start:
                    try:
                        yield from _backlog(service, resume_after, start, alert_filter,
                                            request.max_batch)
                    except StoreError as exc:
                        _abort(context, exc)
                elif resume_after is not None:
                    if resume_after <= service.store.last_alert_seq():
                        skip_through = resume_after
                    else:
                        log.info("subscriber %s@%s: resume token %d is beyond this store's "
                                 "last alert; following from now on", who, context.peer(),
                                 resume_after)
                yield from _events(sub, request, container_filter, service.config.poll_seconds,
                                   context.is_active, service.subscriber_latency.observe,
                                   skip_through)
            if service.closed:  # followers reconnect on UNAVAILABLE; a clean end means "done"
                context.abort(grpc.StatusCode.UNAVAILABLE, "the collector is shutting down")
        finally:
            service.release_stream()

    def List(self, request, context):
        return self._operator_call(context, lambda: self._service.list_alerts(request))


def _subscriber_filters(request: alerts_pb2.SubscribeRequest,
                        ) -> tuple[SubscriberFilter, SubscriberFilter | None]:
    """The alert filter (actions: all or none), and for action events the same filter without
    kinds and severity (an action is about a container, not a kind of alert)."""
    args = filter_args(request.filter)
    alert_filter = SubscriberFilter(**args,
                                    actions="all" if request.include_actions else "none")
    del args["kinds"], args["min_severity"]
    return alert_filter, SubscriberFilter(**args) if request.include_actions else None


def _resume_token(text: str) -> int | None:
    if not text:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise ValueError(f"resume_after: expected the resume_token of an AlertEvent (digits), "
                         f"got {text[:40]!r}")
    return int(text)


def _alert_events(alerts: list[tuple[int | None, Any]], max_batch: int,
                  ) -> Iterator[alerts_pb2.AlertEvent]:
    """Alerts as (seq, message or prebuilt AlertEvent) -> events: one each, or with
    `max_batch` > 1 one AlertGroup per batch."""
    if max_batch <= 1:
        for seq, message in alerts:
            if isinstance(message, alerts_pb2.AlertEvent):
                yield message
            else:
                yield alerts_pb2.AlertEvent(alert=message, resume_token=_token(seq))
        return
    group = [m.alert if isinstance(m, alerts_pb2.AlertEvent) else m for _, m in alerts]
    yield alerts_pb2.AlertEvent(batch=alerts_pb2.AlertGroup(alerts=group),
                                resume_token=_token(alerts[-1][0]))


def _token(seq: int | None) -> str:
    return "" if seq is None else str(seq)


def _backlog(service: CollectorService, after: int, until: int, alert_filter: SubscriberFilter,
             max_batch: int) -> Iterator[alerts_pb2.AlertEvent]:
    """The stored alerts (that `alert_filter` matches) with after < seq <= until, in store
    order."""
    while after < until:
        rows = [(seq, doc) for seq, doc in service.store.alerts_after(
            after, alert_filter.alert_filter, _BACKLOG_PAGE) if seq <= until]
        if not rows:
            return
        for start in range(0, len(rows), max(max_batch, 1)):
            chunk = rows[start:start + max(max_batch, 1)]
            yield from _alert_events([(seq, alert_message(doc)) for seq, doc in chunk],
                                     max_batch)
        after = rows[-1][0]


def _events(sub, request: alerts_pb2.SubscribeRequest, container_filter: SubscriberFilter | None,
            poll_seconds: float, is_active: Callable[[], bool],
            latency: Callable[[float], None], skip_through: int = 0,
            ) -> Iterable[alerts_pb2.AlertEvent]:
    """The subscription's items as events, taken up to max_batch at once; alerts with a seq
    up to `skip_through` were sent already."""
    max_batch = request.max_batch
    for items in sub.batches(max(max_batch, 1), poll_seconds, stop=lambda: not is_active()):
        alerts: list[tuple[int | None, Any]] = []
        for kind, item in items:
            if kind == "alert":
                seq = getattr(item, "seq", None)
                if seq is not None and seq <= skip_through:
                    continue
                stored_at = getattr(item, "stored_at", None)
                if stored_at is not None:  # the subscriber's stream takes it now
                    latency(time.monotonic() - stored_at)
                event = getattr(item, "event", None)
                alerts.append((seq, event if event is not None else alert_message(item)))
                continue
            if alerts:  # in order: the alerts before this notice or action
                yield from _alert_events(alerts, max_batch)
                alerts = []
            if kind == "notice":
                if request.include_notices:
                    yield alerts_pb2.AlertEvent(notice=alerts_pb2.StreamNotice(
                        dropped=item["dropped"], text=item["text"],
                        time=wire.to_timestamp(time.time())))
            elif container_filter is not None and container_filter.matches(item["match"]):
                yield item["message"]
        if alerts:
            yield from _alert_events(alerts, max_batch)


class ActionsServicer(_Servicer, actions_pb2_grpc.ActionsServicer):
    def Request(self, request, context):
        service = self._service
        try:
            who = service.auth.operator(context)
            record = service.request_action(request, who, context.is_active)
        except Exception as exc:
            _abort(context, exc)
        return action_response(record)

    def List(self, request, context):
        return self._operator_call(context, lambda: self._service.list_actions(request))


class AgentsServicer(_Servicer, agent_pb2_grpc.AgentsServicer):
    def List(self, request, context):
        return self._operator_call(context, self._service.list_agents)


class BaselinesServicer(_Servicer, baselines_pb2_grpc.BaselinesServicer):
    """Fleet baselines (collector.baselines): operator calls, audited with the caller's
    identity."""

    def _call(self, request: Any, context: grpc.ServicerContext,
              call: Callable[[str], Any]) -> Any:
        try:
            who = self._service.auth.operator(context)
            wire.validate_baselines_request(request)
            return call(who)
        except Exception as exc:
            _abort(context, exc)

    def _summary(self, doc) -> baselines_pb2.BaselineSummary:
        return wire.baseline_summary_to_proto(self._service.baselines.summary(doc))

    def List(self, request, context):
        fleet = self._service.baselines
        return self._call(request, context, lambda who: baselines_pb2.ListBaselinesResponse(
            baselines=[wire.baseline_summary_to_proto(s) for s in fleet.summaries()]))

    def Get(self, request, context):
        def get(who: str) -> baselines_pb2.GetBaselineResponse:
            fleet = self._service.baselines
            doc = fleet.load(request.image)
            return baselines_pb2.GetBaselineResponse(
                baseline=wire.baseline_to_proto(doc, fleet.summary(doc)))
        return self._call(request, context, get)

    def SetMode(self, request, context):
        def set_mode(who: str) -> baselines_pb2.SetBaselineModeResponse:
            doc = self._service.baselines.set_mode(
                request.image, Mode(wire.MODE.from_proto(request.mode)),
                request.reason.strip(), who)
            return baselines_pb2.SetBaselineModeResponse(baseline=self._summary(doc))
        return self._call(request, context, set_mode)

    def Diff(self, request, context):
        def diff(who: str) -> baselines_pb2.DiffBaselinesResponse:
            result = self._service.baselines.diff(request.a, request.b)
            return baselines_pb2.DiffBaselinesResponse(
                a=wire.baseline_summary_to_proto(result.a),
                b=wire.baseline_summary_to_proto(result.b),
                only_in_a=items_to_proto(result.only_in_a),
                only_in_b=items_to_proto(result.only_in_b))
        return self._call(request, context, diff)

    def Accept(self, request, context):
        def accept(who: str) -> baselines_pb2.AcceptAlertResponse:
            alert = self._service.store.get_alert(request.alert_id)
            if alert is None:
                raise RpcAbort(grpc.StatusCode.NOT_FOUND,
                               f"no alert {request.alert_id} is stored (`driftwarden alerts "
                               "--collector` lists them)")
            reason = request.reason.strip() or f"accepted alert {request.alert_id}"
            doc, added = self._service.baselines.accept(alert, reason, who)
            return baselines_pb2.AcceptAlertResponse(baseline=self._summary(doc),
                                                     added=items_to_proto(added))
        return self._call(request, context, accept)

    def Reset(self, request, context):
        def reset(who: str) -> baselines_pb2.ResetBaselineResponse:
            doc = self._service.baselines.reset(request.image, request.reason.strip(), who)
            return baselines_pb2.ResetBaselineResponse(baseline=self._summary(doc))
        return self._call(request, context, reset)

    def Export(self, request, context):
        return self._call(request, context, lambda who: baselines_pb2.ExportBaselineResponse(
            file=self._service.baselines.export(request.image)))

    def Push(self, request, context):
        def push(who: str) -> baselines_pb2.PushBaselineResponse:
            mode = Mode(wire.MODE.from_proto(request.mode)) if request.mode else None
            doc = self._service.baselines.push(request.file, request.image_key, mode,
                                               request.reason.strip(), who)
            return baselines_pb2.PushBaselineResponse(baseline=self._summary(doc))
        return self._call(request, context, push)


# -- registration --------------------------------------------------------------------------------


def add_servicers(service: CollectorService, server: grpc.Server) -> list[str]:
    """Register the five services on `server`; returns their full names."""
    agent_pb2_grpc.add_AgentChannelServicer_to_server(AgentChannelServicer(service), server)
    agent_pb2_grpc.add_AgentsServicer_to_server(AgentsServicer(service), server)
    alerts_pb2_grpc.add_AlertsServicer_to_server(AlertsServicer(service), server)
    actions_pb2_grpc.add_ActionsServicer_to_server(ActionsServicer(service), server)
    baselines_pb2_grpc.add_BaselinesServicer_to_server(BaselinesServicer(service), server)
    return service_names()


def service_names() -> list[str]:
    """The full names of the services add_servicers registers (health and reflection list
    them): ``driftwarden.v1.AgentChannel``, ..."""
    package = agent_pb2.DESCRIPTOR.package  # the package of every file of the API
    return [f"{package}.{name}"
            for name in ("AgentChannel", "Agents", "Alerts", "Actions", "Baselines")]


__all__ = [
    "MAX_BATCH",
    "RESUME_METADATA",
    "SUBSCRIBED_METADATA",
    "ActionsServicer",
    "AgentChannelServicer",
    "AgentsServicer",
    "AlertsServicer",
    "BaselinesServicer",
    "add_servicers",
    "service_names",
]
