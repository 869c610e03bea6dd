"""A minimal AgentChannel collector for agent-side tests, on real gRPC over 127.0.0.1.

It records every message each stream carries (and any that fail wire validation), acknowledges
alert batches (by spool seqs, by alert ids, or not at all: ``ack`` and ``ack_by`` may change
while it runs), sends commands to the newest stream, and stops and starts again on the same
port. Fleet baselines: it answers each ``baseline_request`` from ``baselines`` (image key ->
a ``Baseline``; an image not there is answered "not found"; ``answer_requests`` False: no
answer at all). No storage, no merging, no policy: that is the real collector's job.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from driftwarden.core.errors import InvalidMessage
from driftwarden.core.wire import MAX_MESSAGE_BYTES, validate_agent_message
from driftwarden.proto.v1 import agent_pb2, agent_pb2_grpc, baselines_pb2


@dataclass
class StreamLog:
    """One Connect call as the collector saw it."""

    number: int
    auth: dict[str, list[bytes]]
    messages: list[agent_pb2.AgentMessage] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # wire validation errors
    ended: bool = False
    outbox: queue.Queue[agent_pb2.CollectorCommand | None] = field(default_factory=queue.Queue)

    def bodies(self) -> list[str]:
        return [m.WhichOneof("body") for m in self.messages]


class FakeCollector(agent_pb2_grpc.AgentChannelServicer):
    def __init__(self, *, port: int = 0, ack: bool = True, ack_by: str = "seqs",
                 credentials: grpc.ServerCredentials | None = None,
                 reject: tuple[grpc.StatusCode, str] | None = None) -> None:
        if ack_by not in ("seqs", "ids"):
            raise ValueError(f"ack_by must be 'seqs' or 'ids', got {ack_by!r}")
        self.port = port
        self.reject = reject  # abort every stream with this status after its first message
        self.ack = ack
        self.ack_by = ack_by
        self.credentials = credentials
        self.baselines: dict[str, baselines_pb2.Baseline] = {}
        self.answer_requests = True
        self.streams: list[StreamLog] = []
        self._cond = threading.Condition()
        self._server: grpc.Server | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeCollector:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        agent_pb2_grpc.add_AgentChannelServicer_to_server(self, server)
        target = f"127.0.0.1:{self.port}"
        if self.credentials is None:
            bound = server.add_insecure_port(target)
        else:
            bound = server.add_secure_port(target, self.credentials)
        if not bound:
            raise RuntimeError(f"fake collector cannot listen on {target}")
        self.port = bound
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Abort every stream at once (no grace) and release the port."""
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None
        with self._cond:
            for stream in self.streams:
                stream.outbox.put(None)

    def __enter__(self) -> FakeCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what arrived ----------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def messages(self, body: str | None = None) -> list[agent_pb2.AgentMessage]:
        with self._cond:
            return [m for s in self.streams for m in s.messages
                    if body is None or m.WhichOneof("body") == body]

    def batches(self) -> list[agent_pb2.AlertBatch]:
        return [m.alert_batch for m in self.messages("alert_batch")]

    def alert_ids(self) -> list[str]:
        return [a.id for b in self.batches() for a in b.alerts]

    def increments(self) -> list[baselines_pb2.BaselineIncrement]:
        return [m.baseline_increment for m in self.messages("baseline_increment")]

    def requests(self) -> list[baselines_pb2.BaselineRequest]:
        return [m.baseline_request for m in self.messages("baseline_request")]

    def invalid(self) -> list[str]:
        with self._cond:
            return [e for s in self.streams for e in s.invalid]

    # -- commands --------------------------------------------------------------------------

    def send(self, command: agent_pb2.CollectorCommand) -> None:
        """To the newest stream still open."""
        with self._cond:
            open_streams = [s for s in self.streams if not s.ended]
            if not open_streams:
                raise RuntimeError("no agent stream is open")
            open_streams[-1].outbox.put(command)

    def send_action(self, **fields: Any) -> None:
        self.send(agent_pb2.CollectorCommand(action=agent_pb2.ActionCommand(**fields)))

    def send_baseline(self, baseline: baselines_pb2.Baseline) -> None:
        """A merged baseline (or a mode change) for the agent, as the collector sends one."""
        self.send(agent_pb2.CollectorCommand(baseline=baselines_pb2.BaselineUpdate(
            image_key=baseline.summary.image_key, found=True, baseline=baseline)))

    def _answer(self, request: baselines_pb2.BaselineRequest) -> agent_pb2.CollectorCommand:
        with self._cond:
            baseline = self.baselines.get(request.image_key)
        update = baselines_pb2.BaselineUpdate(image_key=request.image_key,
                                              found=baseline is not None)
        if baseline is not None:
            update.baseline.CopyFrom(baseline)
        return agent_pb2.CollectorCommand(baseline=update)

    # -- the service -----------------------------------------------------------------------

    def Connect(self, request_iterator, context):  # the generated servicer's method name
        auth = {k: list(v) for k, v in context.auth_context().items()}
        with self._cond:
            stream = StreamLog(number=len(self.streams) + 1, auth=auth)
            self.streams.append(stream)
            self._cond.notify_all()
        if self.reject is not None:
            first = next(request_iterator, None)
            with self._cond:
                if first is not None:
                    stream.messages.append(first)
                stream.ended = True
                self._cond.notify_all()
            context.abort(*self.reject)
        reader = threading.Thread(target=self._read, args=(stream, request_iterator),
                                  daemon=True)
        reader.start()
        while True:
            command = stream.outbox.get()
            if command is None:
                return
            yield command

    def _read(self, stream: StreamLog, requests) -> None:
        try:
            for msg in requests:
                try:
                    validate_agent_message(msg)
                except InvalidMessage as exc:
                    error = str(exc)
                else:
                    error = None
                with self._cond:
                    stream.messages.append(msg)
                    if error is not None:
                        stream.invalid.append(error)
                    ack, ack_by = self.ack, self.ack_by
                    self._cond.notify_all()
                if msg.WhichOneof("body") == "baseline_request" and self.answer_requests:
                    stream.outbox.put(self._answer(msg.baseline_request))
                if msg.WhichOneof("body") == "alert_batch" and ack:
                    batch = msg.alert_batch
                    if ack_by == "seqs":
                        reply = agent_pb2.Ack(alert_ids=[a.id for a in batch.alerts],
                                              spool_seqs=batch.spool_seqs)
                    else:
                        reply = agent_pb2.Ack(alert_ids=[a.id for a in batch.alerts])
                    stream.outbox.put(agent_pb2.CollectorCommand(ack=reply))
        except grpc.RpcError:
            pass  # the stream was cancelled (stop(), or the agent went away)
        finally:
            with self._cond:
                stream.ended = True
                self._cond.notify_all()
            stream.outbox.put(None)
