"""The console's session, CSRF and login logic (Starlette's TestClient) against a real
CollectorServer on 127.0.0.1 (real gRPC), and its pure helpers."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterator

import pytest
from driftwarden.core.errors import UsageError
from driftwarden.ops.client import add_client_flags
from driftwarden.ops.console.app import (
    _safe_next,
    alert_counts,
    alerts_by_hour,
    detail_text,
    event_rows,
    group_containers,
    matches,
    parse_alert_filter,
)
from driftwarden.ops.console.command import add_parser, settings_from_args
from driftwarden.ops.console.gateway import ConsoleSettings
from driftwarden.ops.console.sessions import LoginThrottle, SessionStore
from driftwarden.proto.v1 import common_pb2
from starlette.datastructures import QueryParams
from starlette.testclient import TestClient

TOKEN = "s3cret-operator-token"
BASE = "http://127.0.0.1:8080"
NONCE = re.compile(r'name="csrf" value="([^"]+)"')


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- sessions ------------------------------------------------------------------------------------


def test_sessions_expire_when_idle_or_old_and_close_their_channel() -> None:
    clock = Clock()
    ended: list[str] = []
    store = SessionStore(idle=60, lifetime=300, clock=clock, on_end=lambda s: ended.append(s.id))
    first = store.create("t1")
    second = store.create("t2")
    assert first.id != second.id and first.csrf != second.csrf
    assert len(first.id) >= 40 and len(first.csrf) >= 40
    clock.now += 59
    assert store.get(first.id) is first  # seen: the idle clock restarts
    clock.now += 2
    assert store.get(second.id) is None  # idle 61 s
    assert ended == [second.id]
    for _ in range(4):
        clock.now += 50
        assert store.get(first.id) is first
    clock.now += 50  # 311 s old
    assert store.get(first.id) is None
    assert ended == [second.id, first.id]
    assert len(store) == 0


def test_csrf_and_logout() -> None:
    store = SessionStore()
    session = store.create("t")
    assert store.csrf_ok(session, session.csrf)
    assert not store.csrf_ok(session, None)
    assert not store.csrf_ok(session, "")
    assert not store.csrf_ok(session, session.csrf + "x")
    assert not store.csrf_ok(None, session.csrf)
    store.end(session.id)
    assert store.get(session.id) is None
    assert store.get("") is None and store.get(None) is None


def test_login_nonces_are_used_once_and_must_match_the_cookie() -> None:
    clock = Clock()
    store = SessionStore(clock=clock)
    nonce = store.login_nonce()
    assert not store.take_login_nonce(nonce, "other")
    assert not store.take_login_nonce(None, nonce)
    assert store.take_login_nonce(nonce, nonce)
    assert not store.take_login_nonce(nonce, nonce)  # used
    made_up = "x" * 32
    assert not store.take_login_nonce(made_up, made_up)  # never issued
    old = store.login_nonce()
    clock.now += 601
    assert not store.take_login_nonce(old, old)  # expired


def test_wrong_tokens_make_logins_wait() -> None:
    clock = Clock()
    throttle = LoginThrottle(max_failures=3, window=60, clock=clock)
    for _ in range(3):
        assert throttle.wait_seconds() == 0
        throttle.failed()
        clock.now += 10
    assert throttle.wait_seconds() == 30  # the first failure leaves the window at +60 s
    clock.now += 30
    assert throttle.wait_seconds() == 0


# -- pure helpers --------------------------------------------------------------------------------


def test_alert_filter_from_the_query_string() -> None:
    request_filter, values = parse_alert_filter(QueryParams(
        "kind=drift&kind=novel&severity=high&node=n1,n2&image=web&container=abc"
        "&exclude_namespace=kube-system"))
    assert list(request_filter.kinds) == [common_pb2.ALERT_KIND_DRIFT, common_pb2.ALERT_KIND_NOVEL]
    assert request_filter.min_severity == common_pb2.SEVERITY_HIGH
    assert list(request_filter.nodes) == ["n1", "n2"]
    assert list(request_filter.images) == ["web"]
    assert list(request_filter.containers) == ["abc"]
    assert list(request_filter.exclude_namespaces) == ["kube-system"]
    assert values["node"] == "n1, n2" and values["kind"] == ["drift", "novel"]
    with pytest.raises(UsageError, match="unknown alert kind 'bogus'"):
        parse_alert_filter(QueryParams("kind=bogus"))
    with pytest.raises(UsageError, match="unknown severity 'huge'"):
        parse_alert_filter(QueryParams("severity=huge"))


def test_next_page_after_login_stays_on_the_console() -> None:
    assert _safe_next("/alerts?kind=drift") == "/alerts?kind=drift"
    for bad in ("https://evil.example/", "//evil.example/", "/\\evil", "", None, "alerts"):
        assert _safe_next(bad) == "/overview"


def test_audit_search_matches_any_text() -> None:
    row = {"type": "quarantine", "node": "node-a", "reason": "Policy X", "finished_at": None}
    assert matches(row, "") and matches(row, "policy x") and matches(row, "NODE-A")
    assert not matches(row, "kill")


def _alert(container_id: str, name: str, image: str, node: str, kind: int, when: int,
           labels: dict[str, str] | None = None) -> common_pb2.Alert:
    alert = common_pb2.Alert(id=container_id[:4] + "0" * 20, kind=kind,
                             severity=common_pb2.SEVERITY_HIGH)
    alert.time.FromSeconds(when)
    alert.container.id = container_id
    alert.container.name = name
    alert.container.node = node
    alert.container.image.id = "sha256:" + image * 8
    alert.container.image.name = f"{image}:1"
    alert.container.labels.update(labels or {})
    return alert


def test_overview_groups_containers_by_image_and_counts_alerts() -> None:
    hour = 1796508000  # 2026-12-05T22:00:00Z
    alerts = [_alert("aaaa1111", "web-1", "web", "n1", common_pb2.ALERT_KIND_DRIFT, hour,
                     {"app": "web"}),
              _alert("aaaa1111", "web-1", "web", "n1", common_pb2.ALERT_KIND_NOVEL, hour + 60,
                     {"app": "web"}),
              _alert("bbbb2222", "web-2", "web", "n2", common_pb2.ALERT_KIND_DRIFT, hour + 3600),
              _alert("cccc3333", "db-1", "db", "n1", common_pb2.ALERT_KIND_DRIFT, hour + 3600)]
    everything = {"node": "", "namespace": "", "image": "", "label": ""}
    images = group_containers(alerts, everything)
    assert [(i["name"], [(c["name"], c["node"], c["alerts"]) for c in i["containers"]])
            for i in images] == [("web:1", [("web-1", "n1", 2), ("web-2", "n2", 1)]),
                                 ("db:1", [("db-1", "n1", 1)])]
    assert [link["word"] for link in images[0]["containers"][0]["actions"]] == [
        "Pause", "Resume", "Kill", "Quarantine", "Release"]
    assert "container=aaaa1111" in images[0]["containers"][0]["actions"][3]["href"]
    only_n1 = group_containers(alerts, {**everything, "node": "n1"})
    assert [(i["name"], len(i["containers"])) for i in only_n1] == [("web:1", 1), ("db:1", 1)]
    labelled = group_containers(alerts, {**everything, "label": "app=web"})
    assert [(i["name"], len(i["containers"])) for i in labelled] == [("web:1", 1)]
    assert alert_counts(alerts) == [{"kind": "drift", "severity": "high", "count": 3},
                                    {"kind": "novel", "severity": "high", "count": 1}]
    assert alerts_by_hour(alerts) == [
        {"hour": "2026-12-05T23:00Z", "total": 2, "drift": 2, "novel": 0, "anomaly": 0},
        {"hour": "2026-12-05T22:00Z", "total": 2, "drift": 1, "novel": 1, "anomaly": 0}]


def test_reason_details_in_words() -> None:
    assert detail_text(None, "x") == "-"
    assert detail_text(True, "before_agent") == "yes"
    assert detail_text(1796508000.5, "written_at") == "2026-12-05T22:00:00Z"
    assert detail_text(("/bin/busybox", "cat"), "item_key") == "/bin/busybox cat"
    assert detail_text(17036, "written_by_pid") == "17036"


def test_triggering_events_in_words() -> None:
    process = {"pid": 7, "comm": "sh", "exe": "/bin/busybox"}
    events = [{"time": "T1", "kind": "exec", "process": process,
               "exec": {"filename": "/tmp/x", "path": "/tmp/x", "argv": ["/tmp/x", "<b>"]}},
              {"time": "T2", "kind": "write", "process": {"pid": 8, "comm": "cp"},
               "write": {"op": "rename", "path": "/a", "path2": "/b"}},
              {"time": "T3", "kind": "connect", "process": process,
               "connect": {"protocol": "tcp", "address": "127.0.0.1", "port": 80,
                           "result": "refused"}}]
    assert event_rows(events) == [
        {"time": "T1", "kind": "exec", "process": "7 sh /bin/busybox",
         "what": '/tmp/x argv ["/tmp/x", "<b>"]'},
        {"time": "T2", "kind": "write", "process": "8 cp", "what": "rename /a -> /b"},
        {"time": "T3", "kind": "connect", "process": "7 sh /bin/busybox",
         "what": "tcp 127.0.0.1:80 (refused)"}]


def _console_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_parser(sub)
    return parser.parse_args(["console", *argv])


def test_listen_beyond_loopback_needs_https(tmp_path) -> None:
    with pytest.raises(UsageError, match="not a loopback address; the console serves other "
                                         "hosts over HTTPS only"):
        settings_from_args(_console_args("--listen", "0.0.0.0:8080"))
    with pytest.raises(UsageError, match="--web-cert and --web-key go together"):
        settings_from_args(_console_args("--web-cert", str(tmp_path / "c.pem")))
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    settings = settings_from_args(_console_args("--listen", "0.0.0.0:8443", "--web-cert",
                                                str(cert), "--web-key", str(key)))
    assert (settings.listen_host, settings.listen_port, settings.https) == ("0.0.0.0", 8443, True)
    settings = settings_from_args(_console_args())
    assert (settings.listen_host, settings.listen_port, settings.https) == ("127.0.0.1", 8080,
                                                                            False)
    assert settings.target == "127.0.0.1:50051"
    assert add_client_flags  # the console takes the CLI's client flags


# -- the app against a real collector ------------------------------------------------------------


@pytest.fixture
def console_for(make_server) -> Iterator[Callable[..., TestClient]]:
    """console_for(collector_token=..., required_token=..., address=...) -> a TestClient of a
    console for a fresh real collector (or for `address`)."""
    from driftwarden.ops.console.app import Console

    made: list[tuple[Console, TestClient]] = []

    def make(*, collector_token: str | None = TOKEN, required_token: str | None = None,
             address: str | None = None) -> TestClient:
        if address is None:
            address = make_server(operator_token=collector_token).address
        settings = ConsoleSettings(collector=address, target=address,
                                   required_token=required_token)
        console = Console(settings)
        client = TestClient(console.app, base_url=BASE, follow_redirects=False)
        made.append((console, client))
        return client

    yield make
    for console, client in made:
        client.close()
        console.close()


def login(client: TestClient, token: str) -> object:
    page = client.get("/login")
    assert page.status_code == 200
    nonce = NONCE.search(page.text).group(1)
    return client.post("/login", data={"token": token, "csrf": nonce, "next": "/alerts"})


def csrf_of(client: TestClient, path: str = "/alerts") -> str:
    return NONCE.search(client.get(path).text).group(1)


def test_a_wrong_token_cannot_log_in(console_for) -> None:
    client = console_for()
    response = login(client, "wrong-token")
    assert response.status_code == 401
    assert "wrong token" in response.text
    assert "dw_session" not in response.cookies
    assert client.get("/alerts").status_code == 303  # still to the login page
    assert client.get("/alerts").headers["location"] == "/login?next=%2Falerts"
    for _ in range(9):  # ten wrong tokens in a minute: even the right one waits
        assert login(client, "wrong-token").status_code == 401
    waiting = login(client, TOKEN)
    assert waiting.status_code == 429 and "too many wrong tokens" in waiting.text


def test_the_right_token_logs_in_with_a_strict_httponly_cookie(console_for) -> None:
    client = console_for()
    response = login(client, TOKEN)
    assert response.status_code == 303 and response.headers["location"] == "/alerts"
    cookie = next(v for k, v in response.headers.multi_items()
                  if k == "set-cookie" and v.startswith("dw_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    page = client.get("/alerts")
    assert page.status_code == 200 and 'id="alerts"' in page.text
    headers = page.headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"


def test_a_login_form_from_elsewhere_is_refused(console_for) -> None:
    client = console_for()
    response = client.post("/login", data={"token": TOKEN, "csrf": "made-up"})
    assert response.status_code == 403 and "dw_session" not in response.cookies


def test_state_changes_need_a_session_and_its_csrf_token(console_for) -> None:
    client = console_for()
    change = {"image": "sha256:" + "a" * 64, "mode": "protect", "reason": "r"}
    # no session at all
    response = client.post("/baseline/mode", data={**change, "csrf": "x"})
    assert response.status_code == 403 and "not logged in" in response.text
    assert login(client, TOKEN).status_code == 303
    token = csrf_of(client)
    for path, data in (("/baseline/mode", change),
                       ("/respond", {"action": "kill", "container": "abcd1234"}),
                       ("/alerts/" + "0" * 24 + "/accept", {"reason": "r"}),
                       ("/logout", {})):
        missing = client.post(path, data=data)
        assert missing.status_code == 403, path
        assert "missing or wrong CSRF token" in missing.text
        wrong = client.post(path, data={**data, "csrf": token[:-1] + "x"})
        assert wrong.status_code == 403, path
    # another site's page posting with the right token (it could not read it, but still)
    cross = client.post("/baseline/mode", data={**change, "csrf": token},
                        headers={"origin": "http://evil.example"})
    assert cross.status_code == 403 and "another site" in cross.text
    # with the token the request reaches the collector (which has no such image: 404)
    done = client.post("/baseline/mode", data={**change, "csrf": token})
    assert done.status_code == 404 and "no baseline" in done.text.lower()
    # a reason is required
    no_reason = client.post("/baseline/mode", data={**change, "reason": " ", "csrf": token})
    assert no_reason.status_code == 400 and "a reason is required" in no_reason.text
    # the header form of the token works too (fetch)
    via_header = client.post("/baseline/mode", data=change, headers={"x-csrf-token": token})
    assert via_header.status_code == 404
    assert client.post("/logout", data={"csrf": token}).status_code == 303
    assert client.get("/alerts").status_code == 303  # logged out
    again = client.post("/baseline/mode", data={**change, "csrf": token})
    assert again.status_code == 403 and "not logged in" in again.text


def test_a_collector_that_accepts_any_token_lets_nobody_in(console_for) -> None:
    client = console_for(collector_token=None)
    response = login(client, "anything")
    assert response.status_code == 403
    assert "accepts any token" in response.text and "--token-file" in response.text
    # with --token-file the console checks the token itself
    client = console_for(collector_token=None, required_token=TOKEN)
    assert login(client, "anything").status_code == 401
    assert login(client, TOKEN).status_code == 303


def test_a_collector_that_is_down_is_shown_as_unavailable(make_server, console_for) -> None:
    server = make_server(operator_token=TOKEN)
    client = console_for(address=server.address)
    assert login(client, TOKEN).status_code == 303
    assert client.get("/overview").status_code == 200
    server.stop(0.5)
    for path in ("/overview", "/alerts", "/audit", "/baselines"):
        page = client.get(path)
        assert page.status_code == 503, path
        assert "collector unavailable" in page.text, path
        assert "No agent has connected" not in page.text
    client.cookies.clear()
    response = login(client, TOKEN)
    assert response.status_code == 503 and "collector unavailable" in response.text


def test_a_foreign_host_header_is_refused(console_for) -> None:
    client = console_for()
    response = client.get("/login", headers={"host": "attacker.example:8080"})
    assert response.status_code == 400


def test_the_console_command_prints_its_url_and_stops_on_sigterm(make_server, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import urllib.request

    server = make_server(operator_token=TOKEN)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    proc = subprocess.Popen(
        [sys.executable, "-m", "driftwarden", "console", "--collector", server.address,
         "--listen", "127.0.0.1:0", "--token-file", str(token_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        line = proc.stdout.readline()
        match = re.fullmatch(r"driftwarden console at (http://127\.0\.0\.1:(\d+))/ for the "
                             r"collector at (\S+) \(log in with the token in (\S+)\); Ctrl-C "
                             r"stops it\n", line)
        assert match, (line, proc.stderr.read() if proc.poll() is not None else "")
        assert int(match.group(2)) > 0
        assert (match.group(3), match.group(4)) == (server.address, str(token_file))
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(f"{match.group(1)}/login", timeout=10) as response:
            assert response.status == 200 and b'name="token"' in response.read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_https_sets_secure_cookies(make_server, tmp_path) -> None:
    import ssl
    import urllib.request

    from driftwarden.ops.certs import init_certs
    from driftwarden.ops.console.server import ConsoleServer

    bundle = init_certs(tmp_path / "certs", [], days=1, force=False)
    address = make_server(operator_token=TOKEN).address
    settings = ConsoleSettings(collector=address, target=address, listen_port=0,
                               web_cert=str(bundle.collector.cert),
                               web_key=str(bundle.collector.key))
    with ConsoleServer(settings) as server:
        assert server.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(bundle.ca_cert))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=context))
        with opener.open(f"{server.url}/login", timeout=10) as response:
            assert response.status == 200
            cookie = response.headers["set-cookie"]
    assert cookie.startswith("dw_login=") and "Secure" in cookie and "HttpOnly" in cookie


def test_bad_requests_get_a_page_that_says_what_was_wrong(console_for) -> None:
    client = console_for()
    assert login(client, TOKEN).status_code == 303
    token = csrf_of(client)
    for path, status, words in (
            ("/alerts?kind=bogus", 400, "unknown alert kind"),
            ("/alerts?severity=huge", 400, "unknown severity"),
            ("/respond?action=explode&container=abcd", 400, "choose one of pause, resume"),
            ("/respond?action=kill", 400, "name the container"),
            ("/baseline/diff?a=x", 400, "choose two images"),
            ("/alerts/" + "0" * 24, 404, "has no alert"),
            ("/baseline?image=nosuch", 404, "nosuch"),
            ("/baseline/export?image=nosuch", 404, "nosuch"),
            ("/respond?action=kill&container=abcd1234&node=n1&name=web&image=img", 200,
             "Kill container <strong id=\"confirm-container\">web</strong>")):
        page = client.get(path)
        assert (page.status_code, words in page.text) == (status, True), (path, page.text)
    no_reason = client.post("/alerts/" + "0" * 24 + "/accept", data={"csrf": token})
    assert no_reason.status_code == 400 and "give a reason" in no_reason.text
    unknown = client.post("/respond", data={"csrf": token, "action": "kill",
                                            "container": "abcd1234"})
    assert unknown.status_code == 404 and "no container matches" in unknown.text
    stream = client.get("/alerts/stream?kind=bogus")
    assert stream.status_code == 400
    client.cookies.clear()
    assert client.get("/alerts/stream").status_code == 401


def test_over_mutual_tls_the_console_checks_the_token_itself(make_server, tmp_path) -> None:
    """With an operator certificate the collector takes any token, so a token proves nothing
    unless the console compares it with --token-file."""
    from driftwarden.core.tls import TlsFiles
    from driftwarden.ops.certs import init_certs
    from driftwarden.ops.console.app import Console

    bundle = init_certs(tmp_path / "certs", [], days=1, force=False)
    server = make_server(operator_token=TOKEN, tls=TlsFiles(
        ca=bundle.ca_cert, cert=bundle.collector.cert, key=bundle.collector.key,
        ca_flag="--tls-client-ca"))
    operator = TlsFiles(ca=bundle.ca_cert, cert=bundle.operator.cert, key=bundle.operator.key)
    for required, token, status in ((None, TOKEN, 403), (TOKEN, "wrong", 401),
                                    (TOKEN, TOKEN, 303)):
        console = Console(ConsoleSettings(collector=server.address, target=server.address,
                                          tls=operator, required_token=required))
        with TestClient(console.app, base_url=BASE, follow_redirects=False) as client:
            response = login(client, token)
            assert response.status_code == status, response.text
            if status == 303:
                assert client.get("/overview").status_code == 200
        console.close()
