"""The collector's outputs end to end: a real CollectorServer (and a real collector process),
synthetic agents on the real AgentChannel over loopback gRPC, and real receivers on loopback
sockets (an HTTP server, syslog over UDP and TCP, files)."""

from __future__ import annotations

import collections
import hmac
import http.server
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from driftwarden.collector.outputs import OutputSet, load_outputs, parse_outputs
from driftwarden.collector.outputs.webhook import SIGNATURE_HEADER, sign
from driftwarden.collector.policy import parse_policy
from driftwarden.collector.server import CollectorConfig, CollectorServer
from driftwarden.core import wire
from driftwarden.ops.certs import init_certs

from tests.support import rfc5424
from tests.support.fake_agent import FakeAgent, hello, make_alert
from tests.support.k8s import find, pod_of
from tests.test_helm import COLLECTOR, helm, render  # noqa: F401 (helm: the engine fixture)

REPO = Path(__file__).resolve().parents[1]
NO_RULES = parse_policy("version: 1\n")
SECRET = b"hmac-s3cret"
HOSTILE = 'we"b]\\\n\x1b[31m<1>1 - - - - - forged'
METRIC = "driftwarden_collector_output_"


def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def metric(server, name: str, **labels: str) -> float:
    value = server.metrics.sample(METRIC + name, labels)
    return 0.0 if value is None else value


def connect(channel, node: str = "node-a") -> FakeAgent:
    agent = FakeAgent(channel)
    agent.send(hello=hello(node))
    return agent


def send(agent: FakeAgent, alerts) -> None:
    """One batch, and its ack: the collector stored it and offered it to the outputs."""
    agent.send_alerts(alerts)
    assert list(agent.recv_kind("ack").alert_ids) == [a.id for a in alerts]


def stored(alert, node: str = "node-a") -> dict:
    return wire.alert_dict_from_proto(make_alert_copy(alert, node))


def make_alert_copy(alert, node: str):
    copy = type(alert)()
    copy.CopyFrom(alert)
    copy.container.node = node
    return copy


def hostile_alert(key: str, **kwargs):
    alert = make_alert(key, name=HOSTILE, image='img"] [x y="z"]', **kwargs)
    alert.process.argv[:] = ["sh", "-c", "echo x\n<13>1 - - - - - forged\r\n"]
    return alert


# -- receivers -----------------------------------------------------------------------------------


class HookReceiver:
    """A loopback HTTP server: answers `fail_status` to the first `fail_first` POSTs, 200 (and
    records headers and body) to the rest."""

    def __init__(self, fail_first: int = 0, fail_status: int = 503, tls=None) -> None:
        self.fail_first = fail_first
        self.fail_status = fail_status
        self.lock = threading.Lock()
        self.requests = 0
        self.accepted: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.requests += 1
                    failed = receiver.requests <= receiver.fail_first
                    if not failed:
                        receiver.accepted.append((dict(self.headers), body))
                self.send_response(receiver.fail_status if failed else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:  # (certificate, key): HTTPS
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}/hook"

    def alert_ids(self, signed: bool = True) -> list[str]:
        """The ids of every accepted alert; each body's signature checked if `signed`."""
        ids = []
        with self.lock:
            accepted = list(self.accepted)
        for headers, body in accepted:
            if signed:
                assert hmac.compare_digest(headers[SIGNATURE_HEADER], sign(SECRET, body))
            else:
                assert SIGNATURE_HEADER not in headers
            doc = json.loads(body)
            ids.extend(a["id"] for a in (doc if isinstance(doc, list) else [doc]))
        return ids

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class SyslogReceiver:
    """Loopback syslog: UDP datagrams, or TCP octet-counted frames on any connection."""

    def __init__(self, transport: str, port: int = 0) -> None:
        self.transport = transport
        kind = socket.SOCK_DGRAM if transport == "udp" else socket.SOCK_STREAM
        self.sock = socket.socket(socket.AF_INET, kind)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        if transport == "tcp":
            self.sock.listen(8)
        self.lock = threading.Lock()
        self.messages: list[bytes] = []
        self.leftover = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _run(self) -> None:
        try:
            while True:
                if self.transport == "udp":
                    data = self.sock.recv(65536)
                    with self.lock:
                        self.messages.append(data)
                else:
                    conn, _ = self.sock.accept()
                    threading.Thread(target=self._read, args=(conn,), daemon=True).start()
        except OSError:
            return

    def _read(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while data := conn.recv(65536):
                frames, buffer = rfc5424.split_octet_counted(buffer + data)
                with self.lock:
                    self.messages.extend(frames)
        self.leftover += buffer

    def count(self) -> int:
        with self.lock:
            return len(self.messages)

    def close(self) -> None:
        self.sock.close()


class HungReceiver:
    """Accepts TCP connections and never reads or answers."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                self.conns.append(self.sock.accept()[0])
        except OSError:
            return

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture
def receivers():
    made = []

    def make(cls, *args, **kwargs):
        made.append(cls(*args, **kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


# -- tests ---------------------------------------------------------------------------------------


def test_webhooks_that_fail_first_get_every_alert_once_signed(make_server, channels, receivers,
                                                              tmp_path):
    one, batched = receivers(HookReceiver, fail_first=3), receivers(HookReceiver, 2, 500)
    (tmp_path / "hmac").write_bytes(SECRET + b"\n")
    retry = {"attempts": 10, "backoff": 0.01, "max_backoff": 0.05}
    server = make_server(policy=NO_RULES, outputs=parse_outputs({"outputs": [
        {"type": "webhook", "name": "one", "url": one.url, "secret_file": str(tmp_path / "hmac"),
         "retry": retry, "headers": {"Authorization": "Bearer t0ken"}},
        {"type": "webhook", "name": "drift-batched", "url": batched.url, "batch": 4,
         "secret_file": str(tmp_path / "hmac"), "retry": retry, "filter": {"kinds": "drift"}},
    ]}))
    drift = [make_alert(f"d{i}", when=1000.0 + i) for i in range(12)]
    novel = [make_alert(f"n{i}", kind="novel", severity="medium") for i in range(3)]
    agent = connect(channels(server))
    send(agent, drift[:5])
    send(agent, drift[5:] + novel)
    wait_until(lambda: metric(server, "sent_total", output="one") == 15, "webhook one")
    wait_until(lambda: metric(server, "sent_total", output="drift-batched") == 12,
               "the batched webhook")

    # a replay after a reconnect (DUPLICATE) and a repeat (UPDATED) are not sent again
    agent.close()
    agent = connect(channels(server))
    send(agent, drift + novel)
    send(agent, [make_alert("d0", when=1000.0, count=5, last_seen=2000.0)])
    assert server.store.get_alert(drift[0].id)["count"] == 6
    runners = {r.name: r.stats() for r in server.outputs.runners}
    assert (runners["one"]["matched"], runners["drift-batched"]["matched"]) == (15, 12)

    assert collections.Counter(one.alert_ids()) == {a.id: 1 for a in drift + novel}
    assert collections.Counter(batched.alert_ids()) == {a.id: 1 for a in drift}
    assert (one.requests, batched.requests) == (15 + 3, len(batched.accepted) + 2)
    assert all(h["Authorization"] == "Bearer t0ken" for h, _ in one.accepted)
    first_headers, first_body = one.accepted[0]
    assert first_headers["Content-Type"] == "application/json"
    assert json.loads(first_body) == stored(drift[0])
    for name, retries in (("one", 3), ("drift-batched", 2)):
        assert metric(server, "retries_total", output=name) == retries
        for reason in ("queue_full", "gave_up", "shutdown"):
            assert metric(server, "dropped_total", output=name, reason=reason) == 0


def test_replicas_on_one_postgresql_send_each_alert_once_across_a_failover(
        postgres, channels, receivers):
    hook = receivers(HookReceiver)
    outputs = parse_outputs({"outputs": [{"type": "webhook", "url": hook.url}]})
    servers = []
    with postgres.database() as url:
        try:
            for _ in range(2):
                servers.append(CollectorServer(CollectorConfig(
                    db_path=None, store_url=url, listen="127.0.0.1:0", stop_grace=0.5,
                    poll_seconds=0.05, policy=NO_RULES, outputs=outputs)).start())
            a, b = servers
            first = [make_alert(f"r{i}", when=1000.0 + i) for i in range(10)]
            agent = connect(channels(a))
            send(agent, first)
            agent.cancel()  # the agent fails over to replica B and replays its spool
            agent = connect(channels(b))
            more = [make_alert(f"s{i}", when=2000.0 + i) for i in range(5)]
            send(agent, first + more)
            wait_until(lambda: len(hook.accepted) == 15, "15 POSTs")
            assert [r.stats()["matched"] for s in servers for r in s.outputs.runners] == [10, 5]
        finally:
            for server in servers:
                server.stop(0.5)
    assert collections.Counter(hook.alert_ids(signed=False)) == {
        a.id: 1 for a in first + more}


def test_syslog_receivers_parse_every_message_as_rfc5424(make_server, channels, receivers):
    udp, tcp = receivers(SyslogReceiver, "udp"), receivers(SyslogReceiver, "tcp")
    server = make_server(policy=NO_RULES, outputs=parse_outputs({"outputs": [
        {"type": "syslog", "name": "udp", "transport": "udp", "address": udp.address,
         "facility": "authpriv"},
        {"type": "syslog", "name": "tcp", "transport": "tcp", "address": tcp.address,
         "format": "summary"},
    ]}))
    alerts = [hostile_alert(f"h{i}", when=1_700_000_000.5 + i, severity=sev)
              for i, sev in enumerate(["low", "medium", "high", "critical"] * 5)]
    agent = connect(channels(server))
    for start in range(0, 20, 7):
        send(agent, alerts[start:start + 7])
    wait_until(lambda: udp.count() == 20 and tcp.count() == 20, "20 messages on each")
    codes = {"low": 5, "medium": 4, "high": 3, "critical": 2}
    for receiver, facility in ((udp, 10), (tcp, 16)):
        parsed = [rfc5424.parse(m) for m in receiver.messages]
        for message, alert in zip(parsed, alerts, strict=True):
            doc = stored(alert)
            assert message.pri == facility * 8 + codes[doc["severity"]]
            assert (message.hostname, message.app, message.msgid) == ("node-a", "driftwarden",
                                                                      "DRIFT")
            assert message.timestamp == time.strftime(
                "%Y-%m-%dT%H:%M:%S", time.gmtime(doc["time"])) + ".500000Z"
            (sd_id, params), = message.sd
            assert sd_id == "driftwarden@32473"
            assert params == {
                "kind": "drift", "severity": doc["severity"], "node": "node-a",
                "container": 'we"b]\\\\x0a\\x1b[31m<1>1 - - - - - forged',
                "container_id": doc["container"]["id"], "image": 'img"] [x y="z"]',
                "namespace": "prod", "alert_id": doc["id"]}
            if receiver is udp:
                assert json.loads(message.msg) == doc
            else:
                assert message.msg.startswith(
                    f"DRIFT {doc['severity']} node=node-a container=".encode())
                assert message.msg.endswith(f"id={doc['id']}: ran /tmp/x".encode())
    assert tcp.leftover == b""
    assert metric(server, "sent_total", output="udp") == 20
    assert metric(server, "sent_total", output="tcp") == 20


def test_a_hung_receiver_slows_neither_ingest_nor_the_other_outputs(make_server, channels,
                                                                   receivers, tmp_path):
    hung = receivers(HungReceiver)
    udp = receivers(SyslogReceiver, "udp")
    path = tmp_path / "alerts.jsonl"
    server = make_server(policy=NO_RULES, outputs=parse_outputs({"outputs": [
        {"type": "webhook", "name": "stuck", "url": hung.url, "timeout": 120, "queue": 5,
         "retry": {"attempts": 1}, "flush_seconds": 0.1},
        {"type": "jsonfile", "name": "file", "path": str(path), "max_bytes": 4096, "keep": 100},
        {"type": "syslog", "name": "udp", "address": udp.address},
    ]}))
    agent = connect(channels(server))
    send(agent, [make_alert("first")])
    stuck = next(r for r in server.outputs.runners if r.name == "stuck")
    # the stuck output's worker holds "first" in a POST that will never be answered
    wait_until(lambda: hung.conns and stuck.pending == 0, "the POST in flight")
    alerts = [hostile_alert(f"a{i:02d}", when=1000.0 + i) for i in range(40)]
    for start in range(0, 40, 10):
        send(agent, alerts[start:start + 10])  # each acked: ingest went on
    assert server.store.count_alerts() == 41
    assert stuck.stats() | {"last_error": None} == {
        "name": "stuck", "type": "webhook", "matched": 41, "sent": 0, "retries": 0,
        "dropped": {"queue_full": 35, "gave_up": 0, "shutdown": 0}, "pending": 5,
        "last_error": None}
    assert metric(server, "dropped_total", output="stuck", reason="queue_full") == 35
    assert metric(server, "queued", output="stuck") == 5

    wait_until(lambda: metric(server, "sent_total", output="file") == 41
               and udp.count() == 41, "the file and syslog outputs")
    rotated = sorted(tmp_path.glob("alerts.jsonl.*"), key=lambda p: int(p.suffix[1:]))
    files = [*reversed(rotated), path]  # oldest first
    assert len(rotated) > 2  # rotated: 41 lines of about 1 KB in files of 4 KB
    lines = [line for f in files for line in f.read_text().splitlines()]
    assert all(os.path.getsize(f) <= 4096 for f in files)
    assert [json.loads(line)["id"] for line in lines] == [
        a.id for a in [make_alert("first"), *alerts]]
    assert json.loads(lines[1]) == stored(alerts[0])
    assert [json.loads(rfc5424.parse(m).msg)["id"] for m in udp.messages] == [
        a.id for a in [make_alert("first"), *alerts]]


@pytest.mark.parametrize("status, retried", [(429, True), (408, True), (502, True),
                                            (400, False), (401, False), (302, False)])
def test_webhook_answers_decide_what_is_retried(receivers, status, retried):
    hook = receivers(HookReceiver, fail_first=1, fail_status=status)
    (config,) = parse_outputs({"outputs": [{"type": "webhook", "url": hook.url,
                                            "retry": {"attempts": 3, "backoff": 0.01}}]})
    with OutputSet.from_configs([config]) as outputs:
        outputs.offer([stored(make_alert("a")), stored(make_alert("b"))])
        runner = outputs.runners[0]
        wait_until(lambda: runner.stats()["sent"] + runner.stats()["dropped"]["gave_up"] == 2,
                   "both alerts handled")
        stats = runner.stats()
    assert (stats["sent"], stats["retries"], stats["dropped"]["gave_up"]) == (
        (2, 1, 0) if retried else (1, 0, 1))
    assert hook.requests == (3 if retried else 2)
    expected = ["a", "b"] if retried else ["b"]
    assert [json.loads(b)["id"] for _, b in hook.accepted] == [make_alert(k).id
                                                               for k in expected]


def test_webhook_to_a_closed_port_is_retried_then_given_up():
    with socket.socket() as probe:  # a loopback port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (config,) = parse_outputs({"outputs": [{"type": "webhook",
                                            "url": f"http://127.0.0.1:{port}/",
                                            "retry": {"attempts": 2, "backoff": 0.01}}]})
    with OutputSet.from_configs([config]) as outputs:
        outputs.offer([stored(make_alert("a"))])
        runner = outputs.runners[0]
        wait_until(lambda: runner.stats()["dropped"]["gave_up"] == 1, "giving up")
    assert runner.retries == 1
    assert runner.last_error.startswith("POST failed: connection failed (")


def test_webhook_over_https_trusts_the_ca_file_only(receivers, tmp_path):
    certs = init_certs(tmp_path / "pki", ["node-a"], days=1)
    hook = receivers(HookReceiver, tls=(certs.collector.cert, certs.collector.key))
    outputs = parse_outputs({"outputs": [
        {"type": "webhook", "name": "trusted", "url": hook.url, "ca_file": str(certs.ca_cert)},
        {"type": "webhook", "name": "untrusted", "url": hook.url, "retry": {"attempts": 1}},
    ]})
    with OutputSet.from_configs(outputs) as running:
        running.offer([stored(make_alert("a"))])
        trusted, untrusted = running.runners
        wait_until(lambda: trusted.stats()["sent"] == 1
                   and untrusted.stats()["dropped"]["gave_up"] == 1, "both outputs")
    assert [json.loads(b)["id"] for _, b in hook.accepted] == [make_alert("a").id]
    assert untrusted.last_error.startswith("POST failed: TLS failed (")
    assert untrusted.last_error.endswith(
        "; give ca_file the CA that signed the receiver's certificate")


def test_syslog_tcp_reconnects_when_the_receiver_comes_back():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (config,) = parse_outputs({"outputs": [{
        "type": "syslog", "transport": "tcp", "address": f"127.0.0.1:{port}",
        "retry": {"attempts": 50, "backoff": 0.05, "max_backoff": 0.1}}]})
    receiver = None
    with OutputSet.from_configs([config]) as outputs:
        outputs.offer([stored(make_alert("a"))])
        runner = outputs.runners[0]
        wait_until(lambda: runner.stats()["last_error"] is not None, "the first refusal")
        assert runner.last_error == "syslog tcp send failed: Connection refused"
        receiver = SyslogReceiver("tcp", port=port)
        try:
            outputs.offer([stored(make_alert("b"))])
            wait_until(lambda: receiver.count() == 2, "both messages")
        finally:
            receiver.close()
    assert [json.loads(rfc5424.parse(m).msg)["id"] for m in receiver.messages] == [
        make_alert("a").id, make_alert("b").id]
    assert runner.retries >= 1 and runner.dropped["gave_up"] == 0


CLI = [sys.executable, "-c", "import sys; from driftwarden.cli.main import main; "
       "sys.exit(main(sys.argv[1:]))"]


def test_the_collector_command_takes_an_outputs_file_and_flushes_on_sigterm(tmp_path,
                                                                            channels, receivers):
    hook = receivers(HookReceiver)
    (tmp_path / "hmac").write_bytes(SECRET)
    outputs = tmp_path / "outputs.yaml"
    outputs.write_text(f"""
outputs:
  - type: webhook
    url: {hook.url}
    secret_file: {tmp_path / "hmac"}
    filter: {{min_severity: high}}
  - type: jsonfile
    path: {tmp_path / "alerts.jsonl"}
""")
    argv = ["collector", "--db", str(tmp_path / "c.db"), "--listen", "127.0.0.1:0",
            "--outputs", str(outputs)]
    proc = subprocess.Popen([*CLI, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        port = re.match(r"driftwarden collector listening on 127\.0\.0\.1:(\d+) ", line)
        assert port, line + proc.stderr.read()
        assert line.endswith(f", output webhook: POST {hook.url} (json, signed, batch 1), "
                             f"output jsonfile: JSON lines to {tmp_path / 'alerts.jsonl'} "
                             "(rotated at 104857600 bytes, 5 kept)\n"), line
        agent = connect(channels(f"127.0.0.1:{port.group(1)}"))
        alerts = [make_alert(f"x{i}", severity=("high" if i % 2 else "low"), mode="monitor")
                  for i in range(10)]
        send(agent, alerts)
        agent.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = (tmp_path / "alerts.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [a.id for a in alerts]
    assert sorted(hook.alert_ids()) == sorted(a.id for a in alerts[1::2])


def test_a_bad_outputs_file_stops_the_collector_command_with_one_line(tmp_path):
    outputs = tmp_path / "outputs.yaml"
    outputs.write_text("outputs:\n  - type: webhook\n    url: http://127.0.0.1:9/\n"
                       "    filter: {kinds: [drfit]}\n")
    run = subprocess.run(
        [*CLI, "collector", "--db", str(tmp_path / "c.db"), "--outputs", str(outputs)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert run.returncode == 2, run.stderr
    assert run.stderr == (
        f"driftwarden: error: --outputs {outputs}: outputs[0] (webhook webhook).filter: "
        "kinds[0]: unknown kind 'drfit'; allowed: drift, novel, anomaly\n")
    assert not (tmp_path / "c.db").exists()


# -- the Helm chart ------------------------------------------------------------------------------


def test_helm_values_pass_the_outputs_file_to_the_collector(helm, tmp_path):  # noqa: F811
    outputs_yaml = ("outputs:\n  - type: webhook\n    url: https://siem.example/hook\n"
                    "    secret_file: /etc/driftwarden/outputs-secrets/hmac\n")
    docs = render(helm, {"collector": {"outputs": outputs_yaml,
                                       "outputsExtraSecret": "dw-output-keys"}})
    secret = find(docs, "Secret", f"{COLLECTOR}-outputs")
    assert secret["stringData"]["outputs.yaml"] == outputs_yaml
    _, spec = pod_of(docs, "Deployment", COLLECTOR)
    container = next(c for c in spec["containers"] if c["name"] == "collector")
    args = container["args"]
    assert args[args.index("--outputs") + 1] == "/etc/driftwarden/outputs/outputs.yaml"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert (mounts["outputs"], mounts["outputs-secrets"]) == (
        "/etc/driftwarden/outputs", "/etc/driftwarden/outputs-secrets")
    volumes = {v["name"]: v.get("secret", {}).get("secretName") for v in spec["volumes"]}
    assert (volumes["outputs"], volumes["outputs-secrets"]) == (f"{COLLECTOR}-outputs",
                                                                "dw-output-keys")
    # the rendered file is one the collector reads (with the key the Secret would hold)
    (tmp_path / "hmac").write_text("k")
    (tmp_path / "outputs.yaml").write_text(outputs_yaml.replace(
        "/etc/driftwarden/outputs-secrets", str(tmp_path)))
    (siem,) = load_outputs(tmp_path / "outputs.yaml")
    assert (siem.sink.url, siem.sink.secret) == ("https://siem.example/hook", b"k")
    default = render(helm)
    _, spec = pod_of(default, "Deployment", COLLECTOR)
    assert "--outputs" not in spec["containers"][0]["args"]
    assert not [d for d in default if d["metadata"]["name"].endswith("-outputs")]
