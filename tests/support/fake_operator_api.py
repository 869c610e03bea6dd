"""An in-test gRPC server for the operator API (Alerts, Actions, Agents, Baselines) with canned
answers.

It serves the generated driftwarden.v1 services on 127.0.0.1 (a free port, or a given one so a
test can "restart the collector"), optionally with mutual TLS, and records every call:
method, request and metadata. It does not filter: a test checks the request it received.

    with FakeOperatorApi() as api:
        api.alerts = [newest, ..., oldest]        # Alerts.List pages through these
        api.subscribe_script = [SubscribeScript(events=[...], end="close")]
        ... run the client against api.address ...
        assert api.requests("Alerts.List")[0].page_size == 50

``errors`` makes a method abort: ``api.errors["Actions.Request"] = (StatusCode.NOT_FOUND, "...")``.
Baselines answer from ``baseline_answers`` by method name (an empty response when not set):
``api.baseline_answers["Get"] = baselines_pb2.GetBaselineResponse(baseline=...)``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from driftwarden.proto.v1 import (
    actions_pb2,
    actions_pb2_grpc,
    agent_pb2,
    agent_pb2_grpc,
    alerts_pb2,
    alerts_pb2_grpc,
    baselines_pb2,
    baselines_pb2_grpc,
    common_pb2,
)
from google.protobuf.message import Message

DEFAULT_PAGE_SIZE = 100


@dataclass(frozen=True)
class RecordedCall:
    method: str  # "Alerts.List", "Alerts.Subscribe", "Actions.Request", ...
    request: Message
    metadata: dict[str, str]
    peer_subject: str | None  # the client certificate's subject under mutual TLS


@dataclass(frozen=True)
class SubscribeScript:
    """What one Alerts.Subscribe call does: send `events`, then `end`:
    "close" (end the stream, status OK), "hold" (stay open until the client cancels or
    :meth:`FakeOperatorApi.release_holds`), or (StatusCode, details) to abort with."""

    events: Sequence[alerts_pb2.AlertEvent] = ()
    end: Any = "close"


@dataclass(frozen=True)
class ServerTls:
    ca_cert: bytes
    cert: bytes
    key: bytes


@dataclass
class FakeOperatorApi:
    port: int = 0
    tls: ServerTls | None = None
    alerts: list[common_pb2.Alert] = field(default_factory=list)  # newest first
    actions: list[actions_pb2.Action] = field(default_factory=list)  # newest first
    agents: list[agent_pb2.Agent] = field(default_factory=list)
    action_response: actions_pb2.ActionResponse = field(
        default_factory=actions_pb2.ActionResponse)
    subscribe_script: list[SubscribeScript] = field(default_factory=list)  # per call, last repeats
    errors: dict[str, tuple[grpc.StatusCode, str]] = field(default_factory=dict)
    page_cap: int | None = None  # the most items a List page holds, whatever was asked
    baseline_answers: dict[str, Message] = field(default_factory=dict)  # "Get" -> response
    calls: list[RecordedCall] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.subscribed = threading.Semaphore(0)  # released once per Subscribe call started
        self._server: grpc.Server | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeOperatorApi:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        alerts_pb2_grpc.add_AlertsServicer_to_server(_Alerts(self), server)
        actions_pb2_grpc.add_ActionsServicer_to_server(_Actions(self), server)
        agent_pb2_grpc.add_AgentsServicer_to_server(_Agents(self), server)
        baselines_pb2_grpc.add_BaselinesServicer_to_server(_Baselines(self), server)
        target = f"127.0.0.1:{self.port}"
        if self.tls is None:
            port = server.add_insecure_port(target)
        else:
            credentials = grpc.ssl_server_credentials(
                [(self.tls.key, self.tls.cert)], root_certificates=self.tls.ca_cert,
                require_client_auth=True)
            port = server.add_secure_port(target, credentials)
        if port == 0:
            raise RuntimeError(f"fake operator API could not listen on {target}")
        self.port = port
        self._release.clear()
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        """Stop at once: open streams end with UNAVAILABLE, as when a collector exits."""
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> FakeOperatorApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def release_holds(self) -> None:
        """End every Subscribe call that is holding its stream open (status OK)."""
        self._release.set()

    # -- what the clients asked --------------------------------------------------------------

    def requests(self, method: str) -> list[Message]:
        with self._lock:
            return [c.request for c in self.calls if c.method == method]

    def record(self, method: str, request: Message, context: grpc.ServicerContext) -> int:
        """Note the call; abort it if `errors` says so; its number among calls of `method`."""
        metadata = {k: v for k, v in context.invocation_metadata()
                    if isinstance(v, str) and not k.startswith(("grpc-", "user-agent"))}
        subjects = context.auth_context().get("x509_subject") or []
        subject = subjects[0].decode() if subjects else None
        with self._lock:
            call_number = sum(1 for c in self.calls if c.method == method)
            self.calls.append(RecordedCall(method, request, metadata, subject))
        if method in self.errors:
            code, details = self.errors[method]
            context.abort(code, details)
        return call_number

    def script_for(self, call_number: int) -> SubscribeScript:
        if not self.subscribe_script:
            return SubscribeScript()
        return self.subscribe_script[min(call_number, len(self.subscribe_script) - 1)]

    def page_size(self, asked: int) -> int:
        size = asked or DEFAULT_PAGE_SIZE
        return min(size, self.page_cap) if self.page_cap else size

    def hold(self, context: grpc.ServicerContext) -> None:
        while context.is_active() and not self._release.wait(0.02):
            pass


def _page(items: list[Any], page_size: int, page_token: str) -> tuple[list[Any], str]:
    start = int(page_token or 0)
    end = start + page_size
    return items[start:end], (str(end) if end < len(items) else "")


class _Alerts(alerts_pb2_grpc.AlertsServicer):
    def __init__(self, api: FakeOperatorApi) -> None:
        self.api = api

    def Subscribe(self, request, context):
        number = self.api.record("Alerts.Subscribe", request, context)
        script = self.api.script_for(number)
        self.api.subscribed.release()
        yield from script.events
        if script.end == "hold":
            self.api.hold(context)
        elif script.end != "close":
            code, details = script.end
            context.abort(code, details)

    def List(self, request, context):
        self.api.record("Alerts.List", request, context)
        alerts, token = _page(self.api.alerts, self.api.page_size(request.page_size),
                              request.page_token)
        return alerts_pb2.ListAlertsResponse(alerts=alerts, next_page_token=token)


class _Actions(actions_pb2_grpc.ActionsServicer):
    def __init__(self, api: FakeOperatorApi) -> None:
        self.api = api

    def Request(self, request, context):
        self.api.record("Actions.Request", request, context)
        return self.api.action_response

    def List(self, request, context):
        self.api.record("Actions.List", request, context)
        actions, token = _page(self.api.actions, self.api.page_size(request.page_size),
                               request.page_token)
        return actions_pb2.ListActionsResponse(actions=actions, next_page_token=token)


class _Agents(agent_pb2_grpc.AgentsServicer):
    def __init__(self, api: FakeOperatorApi) -> None:
        self.api = api

    def List(self, request, context):
        self.api.record("Agents.List", request, context)
        return agent_pb2.ListAgentsResponse(agents=self.api.agents)


_BASELINE_RESPONSES = {
    "List": baselines_pb2.ListBaselinesResponse, "Get": baselines_pb2.GetBaselineResponse,
    "SetMode": baselines_pb2.SetBaselineModeResponse, "Diff": baselines_pb2.DiffBaselinesResponse,
    "Accept": baselines_pb2.AcceptAlertResponse, "Reset": baselines_pb2.ResetBaselineResponse,
    "Export": baselines_pb2.ExportBaselineResponse, "Push": baselines_pb2.PushBaselineResponse,
}


def _baseline_method(name: str):
    def method(self, request, context):
        self.api.record(f"Baselines.{name}", request, context)
        return self.api.baseline_answers.get(name) or _BASELINE_RESPONSES[name]()

    method.__name__ = name
    return method


class _Baselines(baselines_pb2_grpc.BaselinesServicer):
    """Every Baselines call answers ``api.baseline_answers[method]`` (or an empty response)."""

    def __init__(self, api: FakeOperatorApi) -> None:
        self.api = api

    List = _baseline_method("List")
    Get = _baseline_method("Get")
    SetMode = _baseline_method("SetMode")
    Diff = _baseline_method("Diff")
    Accept = _baseline_method("Accept")
    Reset = _baseline_method("Reset")
    Export = _baseline_method("Export")
    Push = _baseline_method("Push")
