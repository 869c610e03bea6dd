"""The console's web application (Starlette): pages rendered with Jinja2 (autoescape on, every
text also cleaned of control characters), one small script for the live alert list, and the
collector's gRPC API behind every page (:mod:`driftwarden.ops.console.gateway`).

Safety (the module :mod:`driftwarden.ops.console.sessions` keeps the sessions):
- every page but /login needs a session (cookie ``dw_session``: HttpOnly, SameSite=Strict,
  Secure over HTTPS); the operator token stays on the server;
- every POST needs a session and its CSRF token (form field ``csrf`` or header
  ``X-CSRF-Token``), and an Origin, when the browser sends one, naming this console: 403
  otherwise; the login form carries a one-use nonce that must match its cookie;
- the Host header must name the address the console listens on (no DNS rebinding);
- responses carry a Content-Security-Policy that allows this origin's scripts and styles only
  (no inline script), ``nosniff``, referrers to this origin only, and no framing;
- a collector that does not answer is shown as "collector unavailable", never as an empty
  fleet.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import grpc
import jinja2
from driftwarden.core import wire
from driftwarden.core.errors import UsageError
from driftwarden.ops.baselines import list_baselines, summary_fields
from driftwarden.ops.command import alert_filter
from driftwarden.ops.console.feed import AlertFeed, action_summary, alert_summary
from driftwarden.ops.console.gateway import (
    ConsoleSettings,
    call_failure,
    check_login,
    open_channel,
)
from driftwarden.ops.console.sessions import (
    CSRF_FIELD,
    CSRF_HEADER,
    LOGIN_COOKIE,
    SESSION_COOKIE,
    LoginThrottle,
    Session,
    SessionStore,
)
from driftwarden.ops.format import (
    action_outcome_line,
    alert_dict,
    clean_text,
    container_ref_text,
    counter_dicts,
    enum_text,
    format_epoch,
    format_time,
    item_order,
    item_text,
    short_key,
)
from driftwarden.ops.listing import CALL_TIMEOUT, list_actions, list_alerts
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
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, QueryParams
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
ALERT_LIMIT = 200  # alerts a list page shows
AUDIT_LIMIT = 500
CACHE_ALERTS = 5000  # alerts remembered for detail pages (Alerts has no get-by-id)
ACTION_TIMEOUT = 30.0  # Actions.Request waits up to 10 s for the agent's result
KEEPALIVE_SECONDS = 15.0
FILTER_FIELDS = ("node", "namespace", "image", "container")
EXCLUDE_FIELDS = ("exclude_image", "exclude_namespace", "exclude_container")
ACTION_WORDS = {"pause": "Pause", "resume": "Resume", "kill": "Kill",
                "quarantine": "Quarantine", "release": "Release"}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = [(b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY"),
                    (b"cache-control", b"no-store")]


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, with_headers)


def _environment() -> jinja2.Environment:
    """Autoescape on for every template; every printed string also cleaned of control and
    bidi characters (a container name must not reorder or hide text)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             finalize=lambda v: clean_text(v) if isinstance(v, str) else v)
    env.filters["short_key"] = short_key
    env.filters["fmt_epoch"] = lambda v: "-" if v is None else format_epoch(v)
    env.filters["detail_text"] = detail_text
    env.filters["tojson_text"] = json.dumps  # one line: JSON escapes control characters
    return env


def detail_text(value: Any, key: str) -> str:
    """A reason detail's value in words: a time for ``*_at`` numbers, a list space-separated,
    ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_at") and isinstance(value, int | float):
        return format_epoch(value)
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


def event_rows(events: Iterable[dict[str, Any]]) -> list[dict[str, str]]:
    """The triggering events (``trace --json`` records) as table rows: time, kind, process and
    what it did, in words."""
    rows = []
    for event in events:
        kind = str(event.get("kind") or "?")
        process = event.get("process") or {}
        body = event.get(kind) or {}
        if kind == "exec":
            argv = body.get("argv") or []
            what = f"{body.get('path') or body.get('filename') or '?'} argv {json.dumps(argv)}"
        elif kind == "connect":
            where = body.get("address") or "?"
            if body.get("port") is not None:
                where = f"{where}:{body['port']}"
            what = f"{body.get('protocol') or ''} {where} ({body.get('result') or '?'})".strip()
        elif kind == "write":
            what = f"{body.get('op') or '?'} {body.get('path') or body.get('path_as_given') or '?'}"
            if body.get("path2"):
                what += f" -> {body['path2']}"
        else:
            what = json.dumps(body) if body else "-"
        rows.append({"time": str(event.get("time") or "-"), "kind": kind,
                     "process": f"{process.get('pid', '?')} {process.get('comm') or ''}"
                                f"{' ' + process['exe'] if process.get('exe') else ''}",
                     "what": what})
    return rows


def _split(values: Iterable[str]) -> list[str]:
    """Form values, each a comma list, as one list without blanks."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def parse_alert_filter(query: QueryParams) -> tuple[alerts_pb2.AlertFilter, dict[str, Any]]:
    """The `driftwarden alerts` filters from a query string: ``kind`` (repeatable or a comma
    list), ``severity`` (the least severity), ``node``, ``namespace``, ``image``,
    ``container`` and ``exclude_image|namespace|container`` (each repeatable or a comma
    list). Returns the AlertFilter and the values for the form; UsageError on bad input."""
    kinds = [k.lower() for k in _split(query.getlist("kind"))]
    unknown = [k for k in kinds if k not in wire.ALERT_KIND.texts]
    if unknown:
        raise UsageError(f"unknown alert kind {unknown[0]!r}: choose from "
                          f"{', '.join(wire.ALERT_KIND.texts)}")
    severity = (query.get("severity") or "").strip().lower() or None
    if severity is not None and severity not in wire.SEVERITY.texts:
        raise UsageError(f"unknown severity {severity!r}: choose from "
                          f"{', '.join(wire.SEVERITY.texts)}")
    values: dict[str, Any] = {"kind": kinds, "severity": severity or ""}
    fields: dict[str, list[str]] = {}
    for name in (*FILTER_FIELDS, *EXCLUDE_FIELDS):
        fields[name] = _split(query.getlist(name))
        values[name] = ", ".join(fields[name])
    args = argparse.Namespace(kind=[kinds] if kinds else [], min_severity=severity,
                              **fields)
    return alert_filter(args), values


def filter_query(values: dict[str, Any]) -> str:
    """The query string of a filter's form values (for the live stream's URL)."""
    pairs: list[tuple[str, str]] = [("kind", k) for k in values.get("kind", [])]
    pairs += [(name, str(values[name])) for name in ("severity", *FILTER_FIELDS,
                                                     *EXCLUDE_FIELDS) if values.get(name)]
    return urlencode(pairs)


class AlertCache:
    """The newest alerts seen, by id (an update replaces the older state). Thread-safe."""

    def __init__(self, capacity: int = CACHE_ALERTS) -> None:
        self.capacity = capacity
        self._lock = threading.Lock()
        self._alerts: collections.OrderedDict[str, common_pb2.Alert] = collections.OrderedDict()

    def add(self, alert: common_pb2.Alert) -> None:
        with self._lock:
            self._alerts.pop(alert.id, None)
            self._alerts[alert.id] = alert
            while len(self._alerts) > self.capacity:
                self._alerts.popitem(last=False)

    def get(self, alert_id: str) -> common_pb2.Alert | None:
        with self._lock:
            return self._alerts.get(alert_id)


class Console:
    """The application and its state (sessions, alert cache). :attr:`app` is the ASGI app."""

    def __init__(self, settings: ConsoleSettings, *, sessions: SessionStore | None = None,
                 throttle: LoginThrottle | None = None,
                 allowed_hosts: Iterable[str] | None = None) -> None:
        self.settings = settings
        self.throttle = throttle or LoginThrottle()
        self.sessions = sessions or SessionStore(on_end=_close_channel)
        if self.sessions.on_end is None:
            self.sessions.on_end = _close_channel
        self.cache = AlertCache()
        self.templates = _environment()
        self.allowed_hosts = list(allowed_hosts or _hosts_for(settings.listen_host))
        self._feeds: set[AlertFeed] = set()
        self._feeds_lock = threading.Lock()
        routes = [
            Route("/", self.home),
            Route("/favicon.ico", lambda _request: Response(status_code=204)),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.logout, methods=["POST"]),
            Route("/overview", self.overview),
            Route("/alerts", self.alerts_page),
            Route("/alerts/stream", self.alerts_stream),
            Route("/alerts/{alert_id}", self.alert_page),
            Route("/alerts/{alert_id}/accept", self.accept, methods=["POST"]),
            Route("/respond", self.respond_page, methods=["GET"]),
            Route("/respond", self.respond, methods=["POST"]),
            Route("/audit", self.audit_page),
            Route("/baselines", self.baselines_page),
            Route("/baseline", self.baseline_page),
            Route("/baseline/mode", self.set_mode, methods=["POST"]),
            Route("/baseline/diff", self.diff_page),
            Route("/baseline/export", self.export),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: self.http_error},
                             middleware=[
            Middleware(SecurityHeaders),
            Middleware(TrustedHostMiddleware, allowed_hosts=self.allowed_hosts)])

    def close(self) -> None:
        """End every live stream and session (their channels close)."""
        with self._feeds_lock:
            feeds = list(self._feeds)
        for feed in feeds:
            feed.stop(timeout=2.0)
        self.sessions.end_all()

    # -- plumbing --------------------------------------------------------------------------------

    def render(self, request: Request, template: str, session: Session | None,
               http_status: int = 200, **context: Any) -> HTMLResponse:
        page = self.templates.get_template(template).render(
            session=session, csrf=session.csrf if session else "", path=request.url.path,
            collector=self.settings.collector, failure=context.pop("failure", None),
            notice=context.pop("notice", None), **context)
        return HTMLResponse(page, status_code=http_status)

    def session_of(self, request: Request) -> Session | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    def to_login(self, request: Request) -> Response:
        """A page without a session: to the login page, remembering where to go next."""
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?{urlencode({'next': target})}", status_code=303)

    def _origin_ok(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:  # same-origin navigations and older browsers send none
            return True
        host = request.headers.get("host", "")
        parts = urlsplit(origin)
        return parts.netloc == host and parts.scheme in ("http", "https")

    async def change(self, request: Request) -> tuple[Session, FormData]:
        """A state change's session and form: HTTPException 403 without a session, without the
        session's CSRF token, or from another origin."""
        form = await request.form()
        session = self.session_of(request)
        if session is None:
            raise HTTPException(403, "refused: not logged in (log in again at /login)")
        given = request.headers.get(CSRF_HEADER) or form.get(CSRF_FIELD)
        if not self.sessions.csrf_ok(session, given if isinstance(given, str) else None):
            raise HTTPException(403, "refused: missing or wrong CSRF token (reload the page and "
                                     "try again)")
        if not self._origin_ok(request):
            raise HTTPException(403, "refused: the request came from another site")
        return session, form

    def problem(self, request: Request, session: Session | None, http_status: int, *,
                title: str, message: str) -> HTMLResponse:
        """An error page: `title`, and `message` saying what was wrong and what to do."""
        return self.render(request, "error.html", session, http_status=http_status,
                           title=title, message=message)

    async def http_error(self, request: Request, exc: Exception) -> Response:
        """Starlette's HTTP errors (404 for an unknown page, 403 for a refused change) as the
        console's error page."""
        assert isinstance(exc, HTTPException)
        title = {403: "Refused", 404: "Not found"}.get(exc.status_code, "Error")
        return self.render(request, "error.html", self.session_of(request),
                           http_status=exc.status_code, title=title, message=str(exc.detail))

    async def grpc(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return await run_in_threadpool(fn, *args, **kwargs)

    def failed(self, request: Request, session: Session | None, exc: grpc.RpcError,
               title: str = "Collector error", container: str | None = None) -> HTMLResponse:
        failure = call_failure(exc, self.settings, container)
        return self.render(request, "error.html", session, http_status=failure.http_status,
                           title="Collector unavailable" if failure.unavailable else title,
                           message=failure.text, failure=failure)

    def remember(self, alerts: Iterable[common_pb2.Alert]) -> None:
        for alert in alerts:
            self.cache.add(alert)

    async def find_alert(self, session: Session, alert_id: str) -> common_pb2.Alert | None:
        alert = self.cache.get(alert_id)
        if alert is None:
            stub = alerts_pb2_grpc.AlertsStub(session.channel)
            self.remember(await self.grpc(list_alerts, stub, alerts_pb2.AlertFilter(), None,
                                          CACHE_ALERTS))
            alert = self.cache.get(alert_id)
        return alert

    # -- login -----------------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        if self.session_of(request) is None:
            return self.to_login(request)
        return RedirectResponse("/overview", status_code=303)

    def _login_form(self, request: Request, *, http_status: int = 200,
                    message: str | None = None, next_path: str = "/overview") -> Response:
        nonce = self.sessions.login_nonce()
        response = self.render(request, "login.html", None, http_status=http_status, nonce=nonce,
                               message=message, next_path=next_path, title="Log in")
        response.set_cookie(LOGIN_COOKIE, nonce, httponly=True, samesite="strict",
                            secure=self.settings.https, path="/login")
        return response

    async def login_page(self, request: Request) -> Response:
        return self._login_form(request, next_path=_safe_next(request.query_params.get("next")))

    async def login(self, request: Request) -> Response:
        form = await request.form()
        next_path = _safe_next(form.get("next") if isinstance(form.get("next"), str) else None)
        nonce = form.get(CSRF_FIELD)
        if not self.sessions.take_login_nonce(request.cookies.get(LOGIN_COOKIE),
                                              nonce if isinstance(nonce, str) else None):
            return self._login_form(request, http_status=403, next_path=next_path,
                                    message="refused: the login form expired or came from "
                                    "elsewhere; log in again")
        wait = self.throttle.wait_seconds()
        if wait > 0:
            return self._login_form(request, http_status=429, next_path=next_path,
                                    message=f"too many wrong tokens in the last minute: try "
                                    f"again in {int(wait) + 1} s")
        token = form.get("token")
        token = token if isinstance(token, str) else ""
        refusal = await self.grpc(check_login, self.settings, token)
        if refusal is not None:
            if refusal.http_status == 401:
                self.throttle.failed()
            log.info("console login refused: %s", refusal.text)
            return self._login_form(request, http_status=refusal.http_status, message=refusal.text,
                                    next_path=next_path)
        self.sessions.end(request.cookies.get(SESSION_COOKIE))  # a login is a new session
        self.sessions.sweep()  # and a moment to close the channels of expired ones
        session = self.sessions.create(token.strip(), open_channel(self.settings,
                                                                   token.strip()))
        response = RedirectResponse(next_path, status_code=303)
        response.set_cookie(SESSION_COOKIE, session.id, httponly=True, samesite="strict",
                            secure=self.settings.https, path="/")
        response.delete_cookie(LOGIN_COOKIE, path="/login")
        return response

    async def logout(self, request: Request) -> Response:
        session, _ = await self.change(request)
        self.sessions.end(session.id)
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # -- overview --------------------------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login(request)
        query = request.query_params
        wanted = {name: (query.get(name) or "").strip() for name in
                  ("node", "namespace", "image", "label")}
        channel = session.channel
        try:
            agents = (await self.grpc(agent_pb2_grpc.AgentsStub(channel).List,
                                      agent_pb2.ListAgentsRequest(), timeout=CALL_TIMEOUT)).agents
            baselines = await self.grpc(list_baselines, baselines_pb2_grpc.BaselinesStub(channel))
            alerts = await self.grpc(list_alerts, alerts_pb2_grpc.AlertsStub(channel),
                                     alerts_pb2.AlertFilter(), None, 1000)
            actions = await self.grpc(list_actions, actions_pb2_grpc.ActionsStub(channel), [],
                                      [], None, 10)
        except grpc.RpcError as exc:
            return self.failed(request, session, exc)
        self.remember(alerts)
        modes = {b.image_key: b for b in baselines}
        images = group_containers(alerts, wanted)
        counts = alert_counts(alerts)
        return self.render(
            request, "overview.html", session, title="Overview", wanted=wanted,
            agents=[agent_view(a, time.time()) for a in sorted(agents, key=lambda a: a.node)
                    if not wanted["node"] or wanted["node"] in a.node],
            images=[{**image, "baseline": baseline_view(modes[image["key"]])
                     if image["key"] in modes else None} for image in images],
            baselines=[baseline_view(b) for b in baselines], counts=counts,
            hours=alerts_by_hour(alerts), kinds=wire.ALERT_KIND.texts,
            actions=[action_summary(a) for a in actions], alert_total=len(alerts))

    # -- alerts ----------------------------------------------------------------------------------

    async def alerts_page(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login(request)
        try:
            request_filter, values = parse_alert_filter(request.query_params)
        except UsageError as exc:
            return self.problem(request, session, 400,
                               title="Bad filter", message=str(exc))
        opened = time.time()
        try:
            alerts = await self.grpc(list_alerts, alerts_pb2_grpc.AlertsStub(session.channel),
                                     request_filter, None, ALERT_LIMIT)
        except grpc.RpcError as exc:
            return self.failed(request, session, exc)
        self.remember(alerts)
        query = filter_query(values)
        stream = "/alerts/stream?" + urlencode([("since", f"{opened:.3f}")]) + (
            f"&{query}" if query else "")
        return self.render(request, "alerts.html", session, title="Alerts", values=values,
                           alerts=[alert_summary(a) for a in alerts], stream=stream,
                           kinds=wire.ALERT_KIND.texts, severities=wire.SEVERITY.texts)

    async def alerts_stream(self, request: Request) -> Response:
        """Server-sent events: ``alert``, ``action`` and ``status`` (JSON data)."""
        session = self.session_of(request)
        if session is None:
            return Response("not logged in\n", status_code=401, media_type="text/plain")
        try:
            request_filter, _ = parse_alert_filter(request.query_params)
            since = float(request.query_params.get("since") or time.time())
        except (UsageError, ValueError) as exc:
            return Response(f"{exc}\n", status_code=400, media_type="text/plain")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        feed = AlertFeed(self.settings, session.channel, request_filter, since, loop, queue,
                         self.cache.add)

        async def events() -> AsyncIterator[str]:
            with self._feeds_lock:
                self._feeds.add(feed)
            feed.start()
            try:
                yield "retry: 3000\n\n"
                while True:
                    try:
                        event, data = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                    except TimeoutError:
                        yield ": keepalive\n\n"
                        continue
                    if event == "end":
                        return
                    yield f"event: {event}\ndata: {json.dumps(data)}\n\n"
            finally:
                feed.stop(timeout=0)
                with self._feeds_lock:
                    self._feeds.discard(feed)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    async def alert_page(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login(request)
        alert_id = request.path_params["alert_id"]
        try:
            alert = await self.find_alert(session, alert_id)
            actions = [] if alert is None else await self.grpc(
                list_actions, actions_pb2_grpc.ActionsStub(session.channel), [],
                [alert.container.id], None, 100)
        except grpc.RpcError as exc:
            return self.failed(request, session, exc)
        if alert is None:
            return self.problem(request, session, 404, title="No such alert",
                               message=f"the collector has no alert {alert_id!r} among its "
                               f"newest {CACHE_ALERTS}")
        try:
            full = alert_dict(alert)
        except wire.InvalidMessage as exc:
            full = {"reasons": [], "process": None, "events": [],
                    "container": {}, "error": str(exc)}
        return self.render(
            request, "alert.html", session, title="Alert", alert=alert_summary(alert), full=full,
            events=event_rows(full.get("events") or []),
            policy=[action_summary(a) for a in actions if a.alert_id == alert.id],
            others=[action_summary(a) for a in actions if a.alert_id != alert.id][:10],
            respond=respond_links(alert.container.id, alert.id),
            accept=alert.kind == common_pb2.ALERT_KIND_NOVEL,
            image_key=alert.container.image.id)

    async def accept(self, request: Request) -> Response:
        session, form = await self.change(request)
        alert_id = request.path_params["alert_id"]
        reason = str(form.get("reason") or "").strip()
        if not reason:
            return self.problem(request, session, 400, title="Not accepted",
                               message="give a reason: it goes into the baseline's history")
        try:
            response = await self.grpc(
                baselines_pb2_grpc.BaselinesStub(session.channel).Accept,
                baselines_pb2.AcceptAlertRequest(alert_id=alert_id, reason=reason),
                timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return self.failed(request, session, exc, "Not accepted")
        return self.render(request, "accepted.html", session, title="Accepted",
                           baseline=baseline_view(response.baseline),
                           added=[item_text(i) for i in response.added], alert_id=alert_id)

    # -- response --------------------------------------------------------------------------------

    async def target_of(self, session: Session, query: Any) -> dict[str, str]:
        """The container an action is for, named by the collector's own data when an alert is
        given (its container), else by the request."""
        alert_id = str(query.get("alert") or "")
        alert = await self.find_alert(session, alert_id) if alert_id else None
        if alert is not None:
            return {"container_id": alert.container.id, "node": alert.container.node,
                    "name": alert.container.name or alert.container.id[:12],
                    "image": alert.container.image.name or short_key(alert.container.image.id),
                    "alert": alert.id}
        container = str(query.get("container") or "")
        return {"container_id": container, "node": str(query.get("node") or ""),
                "name": str(query.get("name") or container[:12]),
                "image": str(query.get("image") or "-"), "alert": ""}

    async def respond_page(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login(request)
        action = request.query_params.get("action", "")
        if action not in ACTION_WORDS:
            return self.problem(request, session, 400, title="No such action",
                               message=f"choose one of {', '.join(ACTION_WORDS)}")
        try:
            target = await self.target_of(session, request.query_params)
        except grpc.RpcError as exc:
            return self.failed(request, session, exc)
        if not target["container_id"]:
            return self.problem(request, session, 400, title="No container",
                               message="name the container (its id) to act on")
        return self.render(request, "confirm.html", session, title=f"{ACTION_WORDS[action]}?",
                           action=action, word=ACTION_WORDS[action], target=target)

    async def respond(self, request: Request) -> Response:
        session, form = await self.change(request)
        action = str(form.get("action") or "")
        container = str(form.get("container") or "").strip()
        if action not in ACTION_WORDS or not container:
            return self.problem(request, session, 400, title="Bad request",
                               message="an action and a container are needed")
        with_pause = action == "quarantine" and form.get("with_pause") == "on"
        request_msg = actions_pb2.ActionRequest(
            container=container, type=wire.ACTION_TYPE.to_proto(action),
            reason=str(form.get("reason") or "").strip() or f"{action} from the console",
            with_pause=with_pause, requested_by="console",
            node=str(form.get("node") or ""))
        try:
            response = await self.grpc(actions_pb2_grpc.ActionsStub(session.channel).Request,
                                       request_msg, timeout=ACTION_TIMEOUT)
        except grpc.RpcError as exc:
            return self.failed(request, session, exc, "Action failed", container)
        status = enum_text(wire.ACTION_STATUS, response.status)
        return self.render(request, "result.html", session, title="Action result",
                           action=action, outcome=status, line=action_outcome_line(
                               action, container, response),
                           response={"action_id": response.action_id, "status": status,
                                     "message": response.message, "node": response.node,
                                     "container_id": response.container_id},
                           name=str(form.get("name") or ""), image=str(form.get("image") or ""))

    async def audit_page(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login(request)
        query = request.query_params
        search = (query.get("q") or "").strip()
        node = (query.get("node") or "").strip()
        container = (query.get("container") or "").strip()
        kind = (query.get("type") or "").strip()
        try:
            actions = await self.grpc(list_actions, actions_pb2_grpc.ActionsStub(session.channel),
                                      [node] if node else [], [container] if container else [],
                                      None, AUDIT_LIMIT)
        except grpc.RpcError as exc:
            return self.failed(request, session, exc)
        rows = [action_summary(a) for a in actions]
        rows = [r for r in rows if (not kind or r["type"] == kind) and matches(r, search)]
        return self.render(request, "audit.html", session, title="Audit", rows=rows,
                           q=search, node=node, container=container, type=kind,
                           types=list(ACTION_WORDS))

    # -- baselines -------------------------------------------------------------------------------

    async def baselines_page(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login(request)
        try:
            baselines = await self.grpc(list_baselines,
                                        baselines_pb2_grpc.BaselinesStub(session.channel))
        except grpc.RpcError as exc:
            return self.failed(request, session, exc)
        return self.render(request, "baselines.html", session, title="Baselines",
                           baselines=[baseline_view(b) for b in baselines])

    async def baseline_page(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login(request)
        image = (request.query_params.get("image") or "").strip()
        if not image:
            return RedirectResponse("/baselines", status_code=303)
        stub = baselines_pb2_grpc.BaselinesStub(session.channel)
        try:
            baseline = (await self.grpc(stub.Get, baselines_pb2.GetBaselineRequest(image=image),
                                        timeout=CALL_TIMEOUT)).baseline
            others = await self.grpc(list_baselines, stub)
            alerts = await self.grpc(
                list_alerts, alerts_pb2_grpc.AlertsStub(session.channel),
                alerts_pb2.AlertFilter(images=[baseline.summary.image_key]), None, 20)
        except grpc.RpcError as exc:
            return self.failed(request, session, exc)
        self.remember(alerts)
        by_kind: dict[str, list[str]] = {}
        for item in sorted(baseline.items, key=item_order):
            by_kind.setdefault(item.kind, []).append(item_text(item))
        return self.render(
            request, "baseline.html", session, title="Baseline",
            summary=baseline_view(baseline.summary), fields=summary_fields(baseline),
            by_kind=by_kind,
            unconfirmed=[{"text": item_text(e.item),
                          "containers": ", ".join(container_ref_text(c) for c in e.containers)}
                         for e in sorted(baseline.unconfirmed, key=lambda e: item_order(e.item))],
            history=[{"when": format_time(c.changed_at), "from": enum_text(wire.MODE,
                                                                           getattr(c, "from")),
                      "to": enum_text(wire.MODE, c.to), "reason": c.reason, "by": c.by}
                     for c in baseline.history],
            modes=wire.MODE.texts, others=[baseline_view(b) for b in others
                                           if b.image_key != baseline.summary.image_key],
            alerts=[alert_summary(a) for a in alerts],
            changed=request.query_params.get("changed", ""))

    async def set_mode(self, request: Request) -> Response:
        session, form = await self.change(request)
        image = str(form.get("image") or "").strip()
        mode = str(form.get("mode") or "")
        reason = str(form.get("reason") or "").strip()
        if mode not in wire.MODE.texts or not image:
            return self.problem(request, session, 400, title="Bad request",
                               message=f"choose a mode: {', '.join(wire.MODE.texts)}")
        if not reason:
            return self.problem(request, session, 400,
                               title="Mode not changed",
                               message="a reason is required: say why the mode changes (it "
                               "goes into the baseline's history)")
        try:
            summary = (await self.grpc(
                baselines_pb2_grpc.BaselinesStub(session.channel).SetMode,
                baselines_pb2.SetBaselineModeRequest(image=image,
                                                     mode=wire.MODE.to_proto(mode),
                                                     reason=reason),
                timeout=CALL_TIMEOUT)).baseline
        except grpc.RpcError as exc:
            return self.failed(request, session, exc, "Mode not changed")
        target = urlencode({"image": summary.image_key, "changed": mode})
        return RedirectResponse(f"/baseline?{target}", status_code=303)

    async def diff_page(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login(request)
        a = (request.query_params.get("a") or "").strip()
        b = (request.query_params.get("b") or "").strip()
        if not a or not b:
            return self.problem(request, session, 400, title="Diff",
                               message="choose two images to compare")
        try:
            diff = await self.grpc(baselines_pb2_grpc.BaselinesStub(session.channel).Diff,
                                   baselines_pb2.DiffBaselinesRequest(a=a, b=b),
                                   timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return self.failed(request, session, exc, "No diff")
        return self.render(request, "diff.html", session, title="Diff",
                           a=baseline_view(diff.a), b=baseline_view(diff.b),
                           only_a=[item_text(i) for i in sorted(diff.only_in_a, key=item_order)],
                           only_b=[item_text(i) for i in sorted(diff.only_in_b, key=item_order)])

    async def export(self, request: Request) -> Response:
        session = self.session_of(request)
        if session is None:
            return self.to_login(request)
        image = (request.query_params.get("image") or "").strip()
        try:
            response = await self.grpc(
                baselines_pb2_grpc.BaselinesStub(session.channel).Export,
                baselines_pb2.ExportBaselineRequest(image=image), timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            return self.failed(request, session, exc, "No export")
        name = "".join(c for c in image.removeprefix("sha256:")[:12] if c.isalnum()) or "image"
        return Response(response.file, media_type="application/octet-stream", headers={
            "content-disposition": f'attachment; filename="baseline-{name}.msgpack"'})


# -- views (pure) --------------------------------------------------------------------------------


def _close_channel(session: Session) -> None:
    if session.channel is not None:
        session.channel.close()


def _hosts_for(listen_host: str) -> list[str]:
    """The Host names a browser may use for the console: the listen address, and the loopback
    names when it listens on loopback."""
    hosts = {listen_host, f"[{listen_host}]" if ":" in listen_host else listen_host}
    if listen_host in ("127.0.0.1", "::1", "localhost") or listen_host.startswith("127."):
        hosts |= {"127.0.0.1", "localhost", "[::1]", listen_host}
    if listen_host in ("0.0.0.0", "::"):
        return ["*"]
    return sorted(hosts)


def _safe_next(target: str | None) -> str:
    """Where to go after login: a path on this console only (never another site)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/overview"
    return target


def matches(row: dict[str, Any], search: str) -> bool:
    """Does an audit row hold `search` (case-insensitive) in any of its texts?"""
    if not search:
        return True
    needle = search.lower()
    return any(needle in str(value).lower() for value in row.values() if value is not None)


def respond_links(container_id: str, alert_id: str = "", **names: str) -> list[dict[str, str]]:
    """The links to each action's confirmation page for a container."""
    links = []
    for action, word in ACTION_WORDS.items():
        params = {"action": action, "container": container_id, **names}
        if alert_id:
            params["alert"] = alert_id
        links.append({"word": word, "href": "/respond?" + urlencode(params)})
    return links


def baseline_view(summary: baselines_pb2.BaselineSummary) -> dict[str, Any]:
    learning = summary.HasField("learning_started_at")
    return {"key": summary.image_key, "short": short_key(summary.image_key),
            "name": summary.image_name or "-", "mode": enum_text(wire.MODE, summary.mode),
            "version": summary.version, "items": summary.items,
            "unconfirmed": summary.unconfirmed, "windows": summary.windows,
            "containers": summary.containers, "nodes": ", ".join(summary.nodes) or "-",
            "updated": format_time(summary.updated_at),
            "learning": (f"learning since {format_time(summary.learning_started_at)}"
                         f"{', stable' if summary.stable else ', not yet stable'}")
            if learning else "-"}


def agent_view(agent: agent_pb2.Agent, now: float) -> dict[str, Any]:
    last = (f"{max(0, int(now - wire.from_timestamp(agent.last_heartbeat)))} s ago"
            if agent.HasField("last_heartbeat") else "never")
    return {"node": agent.node, "connected": agent.connected, "version": agent.agent_version,
            "mode": enum_text(wire.MODE, agent.mode), "hostname": agent.hostname,
            "containers": agent.containers_watched, "spool": agent.spool_depth,
            "baselines": len(agent.baselines), "heartbeat": last,
            "counters": counter_dicts(agent)}


def group_containers(alerts: Iterable[common_pb2.Alert],
                     wanted: dict[str, str]) -> list[dict[str, Any]]:
    """Containers seen in alerts, grouped by image (newest alert first), filtered by node,
    namespace, image and label (``key=value`` or a key) substrings."""
    images: dict[str, dict[str, Any]] = {}
    for alert in alerts:
        c = alert.container
        labels = [f"{k}={v}" for k, v in sorted(c.labels.items())]
        if ((wanted["node"] and wanted["node"] not in c.node)
                or (wanted["namespace"] and wanted["namespace"] not in c.namespace)
                or (wanted["image"] and wanted["image"] not in (c.image.name + " " + c.image.id))
                or (wanted["label"] and not any(wanted["label"] in label for label in labels))):
            continue
        key = c.image.id or c.image.name
        image = images.setdefault(key, {"key": c.image.id, "name": c.image.name or
                                        short_key(c.image.id), "containers": {}})
        entry = image["containers"].setdefault(c.id, {
            "id": c.id, "short": c.id[:12], "name": c.name or c.id[:12], "node": c.node,
            "pod": c.pod, "namespace": c.namespace, "labels": ", ".join(labels), "alerts": 0,
            "actions": respond_links(c.id, node=c.node, name=c.name or c.id[:12],
                                     image=c.image.name or short_key(c.image.id))})
        entry["alerts"] += 1
    return [{**image, "containers": list(image["containers"].values())}
            for image in images.values()]


def alert_counts(alerts: Iterable[common_pb2.Alert]) -> list[dict[str, Any]]:
    """Alert counts by kind and severity."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for alert in alerts:
        counts[(enum_text(wire.ALERT_KIND, alert.kind),
                enum_text(wire.SEVERITY, alert.severity))] += 1
    return [{"kind": kind, "severity": severity, "count": n}
            for (kind, severity), n in sorted(counts.items())]


def alerts_by_hour(alerts: Iterable[common_pb2.Alert], hours: int = 24) -> list[dict[str, Any]]:
    """Alert counts per hour (UTC) and kind, the newest `hours` hours that had any first."""
    rows: dict[str, collections.Counter[str]] = {}
    for alert in alerts:
        hour = format_time(alert.time)[:13] + ":00Z" if alert.HasField("time") else "-"
        rows.setdefault(hour, collections.Counter())[enum_text(wire.ALERT_KIND, alert.kind)] += 1
    return [{"hour": hour, "total": sum(counts.values()),
             **{kind: counts[kind] for kind in wire.ALERT_KIND.texts}}
            for hour, counts in sorted(rows.items(), reverse=True)[:hours]]


__all__ = [
    "Console",
    "SecurityHeaders",
    "alert_counts",
    "alerts_by_hour",
    "baseline_view",
    "detail_text",
    "event_rows",
    "group_containers",
    "matches",
    "parse_alert_filter",
]
