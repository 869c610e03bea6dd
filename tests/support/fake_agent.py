"""A fake agent for collector tests: a real gRPC client speaking AgentChannel.Connect with the
generated stubs (no probes, no Docker), plus builders for alerts and heartbeats."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from driftwarden.core import wire
from driftwarden.core.alerts import Alert, AlertKind, AlertReason, Severity
from driftwarden.proto.v1 import agent_pb2, agent_pb2_grpc, common_pb2

_END = object()


def container_id(tag: str) -> str:
    """A 64-hex container id derived from `tag` (stable across calls)."""
    return hashlib.sha256(tag.encode()).hexdigest()


def make_alert(key: str, *, when: float = 1_700_000_000.0, kind: str = "drift",
               severity: str = "high", mode: str = "protect", cid: str | None = None,
               name: str = "web", image: str = "nginx:1.25", image_id: str | None = None,
               namespace: str | None = "prod", node: str = "", count: int = 1,
               last_seen: float | None = None, padding: int = 0) -> common_pb2.Alert:
    """An alert message; `key` makes its id; `padding` adds that many bytes of event data."""
    events: tuple[dict[str, Any], ...] = ({"kind": "exec", "path": "/tmp/x"},)
    if padding:
        events = ({"kind": "exec", "path": "/tmp/x", "pad": "p" * padding},)
    alert = Alert(
        id=hashlib.sha256(key.encode()).hexdigest()[:24], time=when, kind=AlertKind(kind),
        severity=Severity.parse(severity), score=1.0,
        reasons=(AlertReason("exec-added-binary", "ran /tmp/x", (("path", "/tmp/x"),)),),
        container={"id": cid or container_id(name), "name": name, "image": image,
                   "image_id": image_id or "sha256:" + "ab" * 32, "pod": None,
                   "namespace": namespace},
        process={"pid": 42, "ppid": 1, "exe": "/tmp/x", "argv": ["x"], "uid": 0, "comm": "x"},
        events=events, baseline_version=3, baseline_mode=mode, count=count,
        first_seen=when, last_seen=last_seen if last_seen is not None else when)
    return wire.alert_to_proto(alert, node)


def hello(node: str, *, hostname: str = "host-1") -> agent_pb2.Hello:
    return agent_pb2.Hello(node=node, agent_version="0.1.0", mode=common_pb2.MODE_MONITOR,
                           hostname=hostname, started_at=wire.to_timestamp(1_700_000_000.0))


def heartbeat(containers: Sequence[tuple[str, ...]] = (), *, spool_depth: int = 0,
              ) -> agent_pb2.Heartbeat:
    """A heartbeat listing `containers` as (id, name) or (id, name, image key) tuples."""
    return agent_pb2.Heartbeat(
        sent_at=wire.to_timestamp(1_700_000_000.0),
        counters=[common_pb2.KindCounters(kind="exec", emitted=5, suppressed=2, dropped=1,
                                            over_budget=9, known=40)],
        containers_watched=len(containers), spool_depth=spool_depth,
        containers=[common_pb2.Container(id=c[0], name=c[1],
                                         image=common_pb2.Image(id=c[2]) if c[2:] else None)
                    for c in containers])


class FakeAgent:
    """One Connect stream. ``send(hello=...)`` numbers messages from 1; ``recv()`` returns the
    next CollectorCommand; ``status()`` waits for the stream's end and returns (code, details).
    """

    def __init__(self, channel: grpc.Channel, *, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self._outgoing: queue.Queue[Any] = queue.Queue()
        self._incoming: queue.Queue[Any] = queue.Queue()
        self._seq = 0
        self.code: grpc.StatusCode | None = None
        self.details: str | None = None
        self._call = agent_pb2_grpc.AgentChannelStub(channel).Connect(
            self._requests(), metadata=tuple(metadata) or None)
        self._reader = threading.Thread(target=self._read, daemon=True, name="fake-agent")
        self._reader.start()

    def _requests(self) -> Iterator[agent_pb2.AgentMessage]:
        while True:
            item = self._outgoing.get()
            if item is _END:
                return
            yield item

    def _read(self) -> None:
        try:
            for command in self._call:
                self._incoming.put(command)
        except grpc.RpcError:
            pass
        self.code = self._call.code()
        self.details = self._call.details()
        self._incoming.put(_END)

    def send(self, **body: Any) -> int:
        """Send one message with the next seq, e.g. ``send(alert_batch=...)``."""
        self._seq += 1
        self.send_raw(agent_pb2.AgentMessage(seq=self._seq, **body))
        return self._seq

    def send_raw(self, message: agent_pb2.AgentMessage) -> None:
        self._outgoing.put(message)

    def send_alerts(self, alerts: Sequence[common_pb2.Alert],
                    spool_seqs: Sequence[int] = ()) -> int:
        return self.send(alert_batch=agent_pb2.AlertBatch(alerts=alerts, spool_seqs=spool_seqs))

    def recv(self, timeout: float = 5.0) -> agent_pb2.CollectorCommand:
        try:
            item = self._incoming.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no command from the collector within {timeout} s") from None
        if item is _END:
            self._incoming.put(_END)
            raise AssertionError(f"the stream ended: {self.code} {self.details}")
        return item

    def recv_kind(self, kind: str, timeout: float = 5.0) -> Any:
        """The next command, which must be of `kind` (ack | action | notice): its body."""
        command = self.recv(timeout)
        got = command.WhichOneof("body")
        assert got == kind, f"expected {kind}, got {command}"
        return getattr(command, kind)

    def pending(self, wait: float = 0.2) -> list[agent_pb2.CollectorCommand]:
        """Commands that arrive within `wait` seconds (for asserting there are none)."""
        out = []
        while True:
            try:
                item = self._incoming.get(timeout=wait)
            except queue.Empty:
                return out
            if item is _END:
                self._incoming.put(_END)
                return out
            out.append(item)

    def status(self, timeout: float = 5.0) -> tuple[grpc.StatusCode | None, str | None]:
        """Wait for the stream to end (commands still queued are discarded)."""
        self._reader.join(timeout)
        assert not self._reader.is_alive(), f"the stream did not end within {timeout} s"
        return self.code, self.details

    def close(self) -> None:
        """Half-close: no more messages (the collector then ends the stream)."""
        self._outgoing.put(_END)

    def cancel(self) -> None:
        self._call.cancel()
        self._outgoing.put(_END)
