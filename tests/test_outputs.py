"""Unit tests of the collector's outputs: the syslog formatter, the webhook body and signature,
the file's rotation, the outputs file, and the runner's queue, retries and drop counts."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from driftwarden.collector.filters import AlertFilter
from driftwarden.collector.outputs import OutputConfig, OutputRunner, OutputSet, RetryPolicy, Sink
from driftwarden.collector.outputs.config import load_outputs, parse_outputs
from driftwarden.collector.outputs.jsonfile import JsonFileConfig, JsonFileSink
from driftwarden.collector.outputs.syslog import (
    FACILITIES,
    SyslogConfig,
    SyslogSink,
    format_message,
    octet_counted,
    sd_value,
)
from driftwarden.collector.outputs.webhook import WebhookConfig, encode_body, sign
from driftwarden.core import wire
from driftwarden.core.errors import OutputError, UsageError
from driftwarden.core.metrics import MetricsRegistry

from tests.support import rfc5424
from tests.support.fake_agent import make_alert

HOSTILE = 'we"b]\\\n\x1b[31mx'  # a container name an attacker chose


def alert(key: str = "one", **kwargs) -> dict:
    return wire.alert_dict_from_proto(make_alert(key, node="node-a", **kwargs))


def wait_until(predicate, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


# -- syslog --------------------------------------------------------------------------------------


def test_syslog_message_is_exact_rfc5424():
    doc = alert(when=1_700_000_000.25, severity="critical")
    message = format_message(doc, facility=FACILITIES["local3"], procid=77)
    cid, image_id = doc["container"]["id"], doc["id"]
    head = (f'<154>1 2023-11-14T22:13:20.250000Z node-a driftwarden 77 DRIFT '
            f'[driftwarden@32473 kind="drift" severity="critical" node="node-a" '
            f'container="web" container_id="{cid}" image="nginx:1.25" namespace="prod" '
            f'alert_id="{image_id}"] ').encode()
    assert message == head + json.dumps(doc, separators=(",", ":")).encode()
    parsed = rfc5424.parse(message)
    assert (parsed.pri, parsed.hostname, parsed.msgid) == (19 * 8 + 2, "node-a", "DRIFT")
    assert json.loads(parsed.msg) == doc


@pytest.mark.parametrize("severity, code", [("low", 5), ("medium", 4), ("high", 3),
                                            ("critical", 2)])
def test_syslog_severity_maps_to_rfc5424_codes(severity, code):
    parsed = rfc5424.parse(format_message(alert(severity=severity)))
    assert parsed.pri == FACILITIES["local0"] * 8 + code


def test_sd_values_escape_what_would_end_the_element_and_show_controls():
    assert sd_value('a"b]c\\d') == 'a\\"b\\]c\\\\d'
    assert sd_value("x\ny\x1b\x85z") == "x\\x0ay\\x1b\\x85z"
    assert sd_value("caf\u00e9 \udcff") == "caf\u00e9 \\udcff"  # UTF-8; a lone surrogate shown


def test_hostile_text_keeps_the_frame_and_round_trips():
    doc = alert(name=HOSTILE, image='img"] [x y="z"]', namespace="ns\n")
    doc["process"]["argv"] = ["sh", "-c", "echo hi\n<1>1 - - - - - forged"]
    for fmt in ("json", "summary"):
        message = format_message(doc, msg_format=fmt)
        assert b"\n" not in message and message.isascii()
        parsed = rfc5424.parse(message)
        (sd_id, params), = parsed.sd
        assert sd_id == "driftwarden@32473"
        assert params["container"] == 'we"b]\\\\x0a\\x1b[31mx'
        assert params["image"] == 'img"] [x y="z"]'
        assert params["namespace"] == "ns\\x0a"
        if fmt == "json":
            assert json.loads(parsed.msg) == doc
        else:
            assert parsed.msg.startswith(b"DRIFT high node=node-a container=we\"b]\\\\x0a")


def test_an_oversize_message_falls_back_to_the_summary_then_is_cut():
    doc = alert(padding=20_000)
    message = format_message(doc, max_size=2048)
    parsed = rfc5424.parse(message)
    assert parsed.msg.startswith(b"DRIFT high node=node-a container=web image=nginx:1.25 id=")
    assert parsed.msg.endswith(b": ran /tmp/x")
    doc["reasons"][0]["text"] = "ran /tmp/" + "x" * 1000
    cut = format_message(doc, max_size=480)
    assert len(cut) == 480 and b": ran /tmp/xx" in cut and cut.endswith(b"xxxx")
    rfc5424.parse(cut)


def test_octet_counting_frames_split_back():
    messages = [format_message(alert(str(i), name=HOSTILE)) for i in range(3)]
    stream = b"".join(octet_counted(m) for m in messages)
    assert rfc5424.split_octet_counted(stream) == (messages, b"")
    assert rfc5424.split_octet_counted(stream[:-5]) == (messages[:2], octet_counted(
        messages[2])[:-5])


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM])
def test_syslog_over_a_unix_socket(tmp_path, kind):
    path = str(tmp_path / "log.sock")
    server = socket.socket(socket.AF_UNIX, kind)
    server.bind(path)
    server.settimeout(5)
    if kind == socket.SOCK_STREAM:
        server.listen(1)
    sink = SyslogSink(SyslogConfig(transport="unix", path=path))
    try:
        sink.send([alert("a")])
        sink.send([alert("b")])
        if kind == socket.SOCK_DGRAM:
            got = [server.recv(65536), server.recv(65536)]
        else:
            conn, _ = server.accept()
            conn.settimeout(5)
            data = b""
            while len(rfc5424.split_octet_counted(data)[0]) < 2:
                data += conn.recv(65536)
            conn.close()
            got, rest = rfc5424.split_octet_counted(data)
            assert rest == b""
        assert [json.loads(rfc5424.parse(m).msg)["id"] for m in got] == [alert("a")["id"],
                                                                         alert("b")["id"]]
    finally:
        sink.close()
        server.close()


def test_syslog_to_a_missing_unix_socket_is_a_retryable_error(tmp_path):
    sink = SyslogSink(SyslogConfig(transport="unix", path=str(tmp_path / "none.sock")))
    with pytest.raises(OutputError) as info:
        sink.send([alert()])
    assert info.value.retryable
    assert str(info.value) == "syslog unix send failed: No such file or directory"


# -- webhook -------------------------------------------------------------------------------------


def test_webhook_bodies_and_signature():
    docs = [alert("a"), alert("b")]
    one = encode_body(docs[:1], batch=1, format="json")
    assert json.loads(one) == docs[0]
    assert json.loads(encode_body(docs[:1], batch=10, format="json")) == docs[:1]
    assert json.loads(encode_body(docs, batch=10, format="json")) == docs
    hec = encode_body(docs, batch=10, format="splunk-hec").split(b"\n")
    assert [json.loads(line) for line in hec] == [
        {"time": d["time"], "host": "node-a", "source": "driftwarden",
         "sourcetype": "driftwarden:alert", "event": d} for d in docs]
    assert sign(b"k3y", one) == "sha256=" + hmac.new(b"k3y", one, hashlib.sha256).hexdigest()
    hostile = alert(name=HOSTILE)
    assert encode_body([hostile], batch=1, format="json").isascii()


# -- jsonfile ------------------------------------------------------------------------------------


def test_jsonfile_rotates_by_size_and_keeps_n_files(tmp_path):
    path = tmp_path / "alerts.jsonl"
    docs = [alert(f"{i:03d}", name=HOSTILE) for i in range(40)]
    line = len(json.dumps(docs[0], separators=(",", ":"))) + 1
    assert all(len(json.dumps(d, separators=(",", ":"))) + 1 == line for d in docs)
    per_file = 3
    sink = JsonFileSink(JsonFileConfig(path=str(path), max_bytes=line * per_file + 10, keep=2))
    for doc in docs:
        sink.send([doc])
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["alerts.jsonl", "alerts.jsonl.1", "alerts.jsonl.2"]
    read = {name: [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]
            for name in files}
    # 40 lines, 3 a file: the current file holds the last 1, .1 and .2 the 6 before
    assert read["alerts.jsonl"] == docs[39:]
    assert read["alerts.jsonl.1"] == docs[36:39]
    assert read["alerts.jsonl.2"] == docs[33:36]
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_jsonfile_appends_to_an_existing_file_and_counts_its_size(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"old":1}\n')
    line = len(json.dumps(alert(), separators=(",", ":"))) + 1
    sink = JsonFileSink(JsonFileConfig(path=str(path), max_bytes=line + 5, keep=1))
    sink.send([alert()])  # 10 + line bytes would pass max_bytes: rotate first
    sink.close()
    assert (tmp_path / "a.jsonl.1").read_text() == '{"old":1}\n'
    assert json.loads(path.read_text()) == alert()


# -- the outputs file ----------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "outputs.yaml"
    path.write_text(text)
    return str(path)


def test_outputs_file_parses_every_kind(tmp_path):
    (tmp_path / "hmac").write_text("s3cret\n")
    path = write(tmp_path, f"""
outputs:
  - type: webhook
    name: siem
    url: https://127.0.0.1:9443/hook
    secret_file: {tmp_path}/hmac
    headers: {{Authorization: "Splunk abc", X-Tenant: 7}}
    batch: 50
    format: splunk-hec
    filter: {{kinds: [drift, novel], min_severity: high, exclude_namespaces: kube-system}}
    retry: {{attempts: 3, backoff: 0.1}}
    queue: 100
  - type: syslog
    transport: tcp
    address: "[::1]:6514"
    facility: authpriv
    format: summary
  - type: jsonfile
    path: {tmp_path}/alerts.jsonl
    max_bytes: 2048
    keep: 3
""")
    siem, syslog, jsonfile = load_outputs(path)
    assert (siem.name, siem.queue, siem.retry) == ("siem", 100, RetryPolicy(3, 0.1, 30.0))
    assert siem.filter == AlertFilter(kinds=("drift", "novel"), min_severity="high",
                                      exclude_namespaces=("kube-system",))
    assert siem.sink == WebhookConfig(
        url="https://127.0.0.1:9443/hook", secret=b"s3cret", secret_file=f"{tmp_path}/hmac",
        headers=(("Authorization", "Splunk abc"), ("X-Tenant", "7")), batch=50,
        format="splunk-hec")
    assert "s3cret" not in repr(siem)
    assert syslog.name == "syslog" and syslog.sink == SyslogConfig(
        transport="tcp", host="::1", port=6514, facility=10, format="summary")
    assert jsonfile.sink == JsonFileConfig(path=f"{tmp_path}/alerts.jsonl", max_bytes=2048,
                                           keep=3)


@pytest.mark.parametrize("text, error", [
    ("outputs: []", "{f}: the list 'outputs' is empty; list at least one output or leave "
                    "--outputs out"),
    ("- type: webhook", "{f}: expected a mapping with a list 'outputs', for example\n"
                        "outputs:\n  - type: jsonfile\n"
                        "    path: /var/log/driftwarden/alerts.jsonl"),
    ("outputs: [{type: kafka}]", "{f}: outputs[0].type: unknown value 'kafka'; allowed: "
                                 "webhook, syslog, jsonfile"),
    ("outputs: [{type: webhook}]", "{f}: outputs[0] (webhook webhook).url: missing; it is "
                                   "required"),
    ("outputs: [{type: webhook, url: 'ftp://x/'}]",
     "{f}: outputs[0] (webhook webhook).url: 'ftp://x/' is not an http:// or https:// URL "
     "with a host"),
    ("outputs: [{type: webhook, url: 'http://h/', headers: {'Bad Name': x}}]",
     "{f}: outputs[0] (webhook webhook).headers.Bad Name: not a valid header name (letters, "
     "digits and !#$%&'*+-.^_`|~)"),
    ("outputs: [{type: webhook, url: 'http://h/', headers: {X-A: \"a\\r\\nb\"}}]",
     "{f}: outputs[0] (webhook webhook).headers.X-A: the value must be one line of text"),
    ("outputs: [{type: webhook, url: 'http://h/', secret_file: /nonexistent/k}]",
     "{f}: outputs[0] (webhook webhook).secret_file: /nonexistent/k: cannot read it (No such "
     "file or directory)"),
    ("outputs: [{type: webhook, url: 'http://h/', tiemout: 3}]",
     "{f}: outputs[0] (webhook webhook): unknown key 'tiemout'; allowed: batch, ca_file, "
     "filter, flush_seconds, format, headers, name, queue, retry, secret_file, timeout, type, "
     "url"),
    ("outputs: [{type: jsonfile, path: /tmp/x, filter: {kinds: [drfit]}}]",
     "{f}: outputs[0] (jsonfile jsonfile).filter: kinds[0]: unknown kind 'drfit'; allowed: "
     "drift, novel, anomaly"),
    ("outputs: [{type: jsonfile, path: /tmp/x, filter: {kind: drift}}]",
     "{f}: outputs[0] (jsonfile jsonfile).filter: unknown key 'kind'; allowed: containers, "
     "exclude_containers, exclude_images, exclude_kinds, exclude_namespaces, exclude_nodes, "
     "images, kinds, min_severity, namespaces, nodes"),
    ("outputs: [{type: jsonfile, path: /nodir/x}]",
     "{f}: outputs[0] (jsonfile jsonfile).path: directory /nodir does not exist; create it "
     "first"),
    ("outputs: [{type: jsonfile, path: /tmp/x, queue: 0}]",
     "{f}: outputs[0] (jsonfile jsonfile).queue: must be 1..1e+07, got 0"),
    ("outputs: [{type: jsonfile, path: /tmp/x, retry: {attempts: two}}]",
     "{f}: outputs[0] (jsonfile jsonfile).retry.attempts: must be an integer, got 'two'"),
    ("outputs: [{type: syslog, address: 'h:99999'}]",
     "{f}: outputs[0] (syslog syslog).address: 'h:99999': port '99999' is not 1-65535; "
     "expected HOST:PORT (e.g. 127.0.0.1:514 or [::1]:514; a HOST alone means port 514)"),
    ("outputs: [{type: syslog, transport: unix}]",
     "{f}: outputs[0] (syslog syslog).path: missing; it is required"),
    ("outputs: [{type: jsonfile, path: /tmp/a}, {type: jsonfile, path: /tmp/b}]",
     "{f}: outputs[1] and outputs[0] are both named 'jsonfile'; give each a distinct 'name'"),
    ("outputs: [{type: jsonfile, name: 'a b', path: /tmp/a}]",
     "{f}: outputs[0].name: 'a b': use letters, digits, '.', '_' and '-' (up to 63)"),
    ("outputs: [{type: jsonfile\n", "{f}: not valid YAML or JSON at line 2, column 1: "
                                    "expected ',' or '}}', but got '<stream end>'"),
])
def test_outputs_file_errors_are_one_line_and_name_the_place(tmp_path, text, error):
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as info:
        load_outputs(path)
    message = str(info.value)
    expected = error.format(f=f"--outputs {path}")
    assert message == expected


def test_an_empty_secret_file_is_refused(tmp_path):
    (tmp_path / "k").write_text("\n")
    with pytest.raises(UsageError, match=r"secret_file: .*/k: the file is empty; put the shared "
                                         r"secret in it$"):
        parse_outputs({"outputs": [{"type": "webhook", "url": "http://h/",
                                    "secret_file": str(tmp_path / "k")}]})


def test_a_missing_outputs_file_is_one_line(tmp_path):
    with pytest.raises(UsageError) as info:
        load_outputs(tmp_path / "nope.yaml")
    assert str(info.value) == (f"--outputs {tmp_path / 'nope.yaml'}: cannot read it (No such "
                               "file or directory)")


# -- the runner ----------------------------------------------------------------------------------


class ScriptedSink(Sink):
    """Fails the first `failures` sends (retryable or not), records the rest; `gate` holds
    every send until set."""

    def __init__(self, failures: int = 0, retryable: bool = True, max_batch: int = 1) -> None:
        self.failures = failures
        self.retryable = retryable
        self.max_batch = max_batch
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.calls = 0
        self.delivered: list[list[str]] = []
        self.closed = 0

    def send(self, alerts):
        self.entered.set()
        self.gate.wait()
        self.calls += 1
        if self.calls <= self.failures:
            raise OutputError(f"failure {self.calls}", retryable=self.retryable)
        self.delivered.append([a["id"] for a in alerts])

    def close(self):
        self.closed += 1


def runner_for(sink: Sink, **kwargs) -> OutputRunner:
    config = OutputConfig(**{
        "name": "t", "sink": JsonFileConfig(path="/unused"),
        "retry": RetryPolicy(attempts=4, backoff=0.001, max_backoff=0.002), **kwargs})
    return OutputRunner(config, sink)


def test_a_failing_batch_is_retried_until_delivered():
    sink = ScriptedSink(failures=3)
    docs = [alert(str(i)) for i in range(5)]
    with runner_for(sink) as runner:
        for doc in docs:
            assert runner.offer(doc)
        wait_until(lambda: runner.stats()["sent"] == 5, "delivery")
        stats = runner.stats()
    assert sink.delivered == [[d["id"]] for d in docs]
    assert (stats["matched"], stats["retries"], stats["dropped"]) == (
        5, 3, {"queue_full": 0, "gave_up": 0, "shutdown": 0})
    assert sink.closed == 1


def test_retries_are_bounded_and_a_refusal_is_not_retried():
    sink = ScriptedSink(failures=7)
    with runner_for(sink) as runner:
        runner.offer(alert("a"))
        runner.offer(alert("b"))
        wait_until(lambda: runner.stats()["dropped"]["gave_up"] == 1, "giving up")
        wait_until(lambda: runner.stats()["sent"] == 1, "the next alert")
    assert (sink.calls, runner.retries) == (4 + 4, 3 + 3)  # "a" 4 attempts, "b" 3 + 1 success
    assert runner.last_error is None
    refused = ScriptedSink(failures=1, retryable=False)
    with runner_for(refused) as runner:
        runner.offer(alert("a"))
        wait_until(lambda: runner.stats()["dropped"]["gave_up"] == 1, "giving up")
    assert (refused.calls, runner.retries, runner.last_error) == (1, 0, "failure 1")


def test_a_stuck_output_drops_what_its_queue_cannot_hold_and_counts_it():
    sink = ScriptedSink()
    sink.gate.clear()
    runner = runner_for(sink, queue=3, flush_seconds=0.0).start()
    try:
        runner.offer(alert("first"))
        assert sink.entered.wait(5)  # the worker holds "first" in its send
        results = [runner.offer(alert(str(i))) for i in range(10)]
        assert results == [True] * 3 + [False] * 7
        assert (runner.stats()["dropped"]["queue_full"], runner.pending) == (7, 3)
    finally:
        sink.gate.set()
        runner.stop()
    stats = runner.stats()
    assert stats["sent"] + sum(stats["dropped"].values()) == 11
    assert stats["dropped"]["queue_full"] == 7


def test_the_filter_decides_what_an_output_takes():
    sink = ScriptedSink()
    config = OutputConfig(name="drift-only", sink=JsonFileConfig(path="/unused"),
                          filter=AlertFilter(kinds=("drift",), min_severity="high"))
    with OutputRunner(config, sink) as runner:
        assert runner.offer(alert("a", kind="drift", severity="critical"))
        assert not runner.offer(alert("b", kind="novel", severity="critical"))
        assert not runner.offer(alert("c", kind="drift", severity="medium"))
        wait_until(lambda: runner.stats()["sent"] == 1, "delivery")
    assert (runner.matched, sink.delivered) == (1, [[alert("a")["id"]]])


def test_batches_take_what_is_queued_up_to_max_batch():
    sink = ScriptedSink(max_batch=4)
    sink.gate.clear()
    with runner_for(sink) as runner:
        runner.offer(alert("x"))
        assert sink.entered.wait(5)
        for i in range(6):
            runner.offer(alert(str(i)))
        sink.gate.set()
        wait_until(lambda: runner.stats()["sent"] == 7, "delivery")
    assert [len(b) for b in sink.delivered] == [1, 4, 2]


def test_stop_flushes_what_is_queued():
    sink = ScriptedSink()
    sink.gate.clear()
    runner = runner_for(sink, flush_seconds=5.0).start()
    for i in range(5):
        runner.offer(alert(str(i)))
    sink.gate.set()
    runner.stop()
    assert (runner.sent, len(sink.delivered), runner.offer(alert("late"))) == (5, 5, False)
    assert runner.dropped["shutdown"] == 1  # the late one


def test_metrics_are_exported_per_output():
    registry = MetricsRegistry()
    ok, failing = ScriptedSink(), ScriptedSink(failures=100)
    outputs = OutputSet([runner_for(ok, name="ok"), runner_for(failing, name="bad")])
    outputs.register_metrics(registry)
    with outputs:
        outputs.offer([alert("a"), alert("b")])
        wait_until(lambda: outputs.runners[1].stats()["dropped"]["gave_up"] == 2, "giving up")
        wait_until(lambda: outputs.runners[0].stats()["sent"] == 2, "delivery")
    prefix = "driftwarden_collector_output_"
    assert registry.sample(prefix + "sent_total", {"output": "ok"}) == 2
    assert registry.sample(prefix + "sent_total", {"output": "bad"}) == 0
    assert registry.sample(prefix + "dropped_total", {"output": "bad", "reason": "gave_up"}) == 2
    assert registry.sample(prefix + "retries_total", {"output": "bad"}) == 6
    assert registry.sample(prefix + "queued", {"output": "ok"}) == 0
