"""Operator commands (`alerts`, `action`, `agents`, `certs init`) against a fake operator API
served over 127.0.0.1 (tests/support/fake_operator_api.py), with real openssl for certs."""

from __future__ import annotations

import argparse
import io
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import grpc
import pytest
from driftwarden.core import wire
from driftwarden.core.alerts import Alert, AlertKind, AlertReason, Severity
from driftwarden.core.errors import UsageError
from driftwarden.ops.client import collector_target, describe_rpc_error, operator_channel
from driftwarden.ops.command import (
    add_parsers,
    parse_duration,
    parse_since,
    run_action,
    run_agents,
    run_alerts,
    run_certs,
)
from driftwarden.ops.follow import FOLLOW_BATCH
from driftwarden.proto.v1 import actions_pb2, agent_pb2, alerts_pb2, baselines_pb2, common_pb2

from tests.support.fake_operator_api import FakeOperatorApi, ServerTls, SubscribeScript
from tests.support.terminal import FakeTerminal, Tap, screen

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z
NO_FILTER = alerts_pb2.AlertFilter()  # set, empty: every alert
WEB_ID = "abc123def456" + "0" * 52


def _alert(n: int, when: float, kind: AlertKind, severity: Severity, container: dict,
           node: str, text: str) -> common_pb2.Alert:
    return wire.alert_to_proto(Alert(
        id=f"{n:024x}", time=when, kind=kind, severity=severity, score=1.0,
        reasons=(AlertReason("code", text),), container=container, process=None, events=(),
        baseline_version=3), node)


def _container(cid: str, name: str | None, image: str | None, image_id: str | None) -> dict:
    return {"id": cid, "name": name, "image": image, "image_id": image_id, "pod": None,
            "namespace": None}


A1 = _alert(1, T0 + 5, AlertKind.DRIFT, Severity.HIGH,
            _container(WEB_ID, "web-1", "nginx:1.25", "sha256:" + "1" * 64), "node-a",
            "ran /tmp/x, which the image does not contain (added at run time)")
A2 = _alert(2, T0 + 65, AlertKind.NOVEL, Severity.MEDIUM,
            _container("f00dcafe" * 8, None, None, "sha256:" + "ab" * 32), "node-b",
            "connected to 127.0.0.1:4444, never seen for this image")
A3 = _alert(3, T0 + 125, AlertKind.ANOMALY, Severity.LOW,
            _container("9" * 64, "a-very-long-container-name-that-goes-on",
                       "registry.example:5000/team/some-image:1.2.3", None), "node-a",
            "exec rate 40/window is outside the learned range 0-3")

# Plain lines (pipes, files, --plain): aligned by the widest cell, never cut.
HEADER = ("TIME                  KIND     SEV     CONTAINER                                "
          "IMAGE                                        NODE    COUNT  REASON")
ROW1 = ("2023-11-14T22:13:25Z  drift    high    web-1                                    "
        "nginx:1.25                                   node-a      1  ran /tmp/x, which the "
        "image does not contain (added at run time)")
ROW2 = ("2023-11-14T22:14:25Z  novel    medium  f00dcafef00d                             "
        "sha256:abababababab                          node-b      1  connected to "
        "127.0.0.1:4444, never seen for this image")
ROW3 = ("2023-11-14T22:15:25Z  anomaly  low     a-very-long-container-name-that-goes-on  "
        "registry.example:5000/team/some-image:1.2.3  node-a      1  exec rate 40/window is "
        "outside the learned range 0-3")

QUARANTINE = actions_pb2.Action(
    action_id="act-1", type=actions_pb2.ACTION_TYPE_QUARANTINE,
    status=actions_pb2.ACTION_STATUS_DONE, container_id=WEB_ID, container_name="web-1",
    node="node-a", reason="drift in protect mode",
    requested_by="policy:quarantine-protect-drift", alert_id=A1.id,
    requested_at=wire.to_timestamp(T0 + 6), finished_at=wire.to_timestamp(T0 + 7))
NOTICE = alerts_pb2.StreamNotice(dropped=12, text="slow reader",
                                 time=wire.to_timestamp(T0 + 70))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="driftwarden")
    sub = p.add_subparsers(dest="command", required=True)
    add_parsers(sub)
    return p


def parse(*argv: str) -> argparse.Namespace:
    return parser().parse_args(list(argv))


@pytest.fixture(autouse=True)
def _environment(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "140")
    monkeypatch.setenv("LINES", "40")
    monkeypatch.delenv("DRIFTWARDEN_COLLECTOR", raising=False)
    monkeypatch.setenv("USER", "alice")
    monkeypatch.delenv("SUDO_USER", raising=False)


@pytest.fixture
def api() -> Iterator[FakeOperatorApi]:
    with FakeOperatorApi() as server:
        yield server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


# -- pure parts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("30s", 30.0), ("10m", 600.0), ("2h", 7200.0), ("1d", 86400.0), ("1w", 604800.0),
    ("1h30m", 5400.0), ("1.5h", 5400.0), (" 5M ", 300.0), ("0s", 0.0)])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["10", "m", "10x", "-5m", "1h 30m", ""])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="is not a duration: use a number with a unit"):
        parse_duration(text)


def test_parse_since() -> None:
    now = T0 + 1000.0
    assert parse_since("10m", now) == now - 600
    assert parse_since("2023-11-14T22:13:20Z", now) == T0
    assert parse_since("2023-11-14T23:13:20+01:00", now) == T0
    assert parse_since("2023-11-14T22:13:20.5Z", now) == T0 + 0.5
    assert parse_since("2023-11-14 22:13:20", now) == datetime(2023, 11, 14, 22, 13, 20).timestamp()
    with pytest.raises(UsageError, match=r"--since 'yesterday': expected a duration like 30s"):
        parse_since("yesterday", now)
    with pytest.raises(UsageError, match="is in the future"):
        parse_since("2023-11-14T23:13:20Z", now)


def test_collector_addresses_and_the_loopback_rule() -> None:
    assert collector_target("127.0.0.1:6000") == "127.0.0.1:6000"
    assert collector_target("[::1]:6000") == "[::1]:6000"
    assert collector_target("localhost") == "localhost:50051"  # a host alone: the default port
    assert collector_target("::1") == "[::1]:50051"
    assert collector_target("127.0.0.2:1") == "127.0.0.2:1"
    assert collector_target("10.1.2.3:50051", allow_non_loopback=True) == "10.1.2.3:50051"
    with pytest.raises(UsageError) as info:
        collector_target("10.1.2.3:50051")
    assert str(info.value) == (
        "--collector '10.1.2.3:50051': 10.1.2.3 is not a loopback address; this build talks to "
        "127.0.0.0/8, ::1 and localhost only (pass --allow-non-loopback for a real deployment, "
        "with TLS: the --tls-* flags)")
    with pytest.raises(UsageError, match="not a loopback address"):
        collector_target("collector.example.com:50051")
    for bad, message in (("127.0.0.1:99999", "port '99999' is not 1-65535"),
                         ("unix:///tmp/s", "a URI, not an address"),
                         ("[::1", r"unbalanced brackets"), (":50051", "no host")):
        with pytest.raises(UsageError, match=rf"^--collector '{re.escape(bad)}': {message}; "
                                             r"expected HOST:PORT \(e\.g\. 127\.0\.0\.1:50051"):
            collector_target(bad)


def test_a_bad_address_in_the_environment_names_the_variable(monkeypatch) -> None:
    monkeypatch.setenv("DRIFTWARDEN_COLLECTOR", "collector:notaport")
    with pytest.raises(UsageError, match=r"^\$DRIFTWARDEN_COLLECTOR 'collector:notaport': port "
                                         r"'notaport' is not 1-65535"):
        operator_channel(parse("agents"))
    # the flag wins over the variable, and is what the error names
    with pytest.raises(UsageError, match=r"^--collector '10\.0\.0\.1': 10\.0\.0\.1 is not"):
        operator_channel(parse("agents", "--collector", "10.0.0.1"))


def test_non_loopback_collector_is_refused_before_any_connection() -> None:
    args = parse("agents", "--collector", "192.0.2.1:50051")
    with pytest.raises(UsageError, match="not a loopback address"):
        operator_channel(args)
    with pytest.raises(UsageError, match="not a loopback address"):
        run_agents(args)


# -- alerts: listing -----------------------------------------------------------------------------


def test_alerts_table_newest_last_never_cut(api: FakeOperatorApi) -> None:
    api.alerts = [A3, A2, A1]
    out = io.StringIO()
    assert run_alerts(parse("alerts", "--collector", api.address), out=out) == 0
    assert lines(out) == [HEADER, ROW1, ROW2, ROW3]
    assert api.requests("Alerts.List") == [
        alerts_pb2.ListAlertsRequest(filter=NO_FILTER, page_size=50)]


LONG_REASON = "ran /tmp/" + "x" * 280 + ", which the image does not contain"  # 323 characters


@pytest.mark.parametrize("columns", ["40", "80", "140"])
def test_piped_alerts_lines_are_never_cut(api: FakeOperatorApi, monkeypatch,
                                          columns: str) -> None:
    monkeypatch.setenv("COLUMNS", columns)  # a terminal size in the environment changes nothing
    long = _alert(7, T0 + 5, AlertKind.DRIFT, Severity.HIGH,
                  _container(WEB_ID, "web-1", "nginx:1.25", None), "node-a", LONG_REASON)
    api.alerts = [long]
    api.subscribe_script = [SubscribeScript(events=[_event(alert=long)])]
    listed, followed = io.StringIO(), io.StringIO()
    assert run_alerts(parse("alerts", "--collector", api.address), out=listed) == 0
    assert run_alerts(parse("alerts", "-f", "--collector", api.address), out=followed,
                      stop=threading.Event()) == 0
    assert lines(listed) == [
        "TIME                  KIND   SEV   CONTAINER  IMAGE       NODE    COUNT  REASON",
        "2023-11-14T22:13:25Z  drift  high  web-1      nginx:1.25  node-a      1  " + LONG_REASON]
    assert lines(followed)[1] == (
        "2023-11-14T22:13:25Z  drift    high      web-1               nginx:1.25                "
        "node-a            1  " + LONG_REASON)
    for line in (lines(listed)[1], lines(followed)[1]):  # awk sees the same fields
        assert line.split(maxsplit=7) == ["2023-11-14T22:13:25Z", "drift", "high", "web-1",
                                          "nginx:1.25", "node-a", "1", LONG_REASON]


def test_following_plain_a_wider_cell_widens_its_column_from_there_on(
        api: FakeOperatorApi) -> None:
    wide = _alert(8, T0 + 1, AlertKind.DRIFT, Severity.LOW,
                  _container("8" * 64, "checkout-service-7d9f8b6c5-x2x4q", "shop/checkout:2.1",
                             None), "node-a", "ran /tmp/a")
    api.subscribe_script = [SubscribeScript(events=[_event(alert=A1), _event(alert=wide),
                                                    _event(alert=A2)])]
    out = io.StringIO()
    assert run_alerts(parse("alerts", "-f", "--collector", api.address), out=out,
                      stop=threading.Event()) == 0
    assert lines(out)[1:4] == [
        FOLLOW_ROW1,
        "2023-11-14T22:13:21Z  drift    low       checkout-service-7d9f8b6c5-x2x4q  "
        "shop/checkout:2.1         node-a            1  ran /tmp/a",
        "2023-11-14T22:14:25Z  novel    medium    f00dcafef00d                      "
        "sha256:abababababab       node-b            1  connected to 127.0.0.1:4444, never "
        "seen for this image"]


def test_alerts_control_characters_are_not_printed(api: FakeOperatorApi) -> None:
    evil = _alert(9, T0, AlertKind.DRIFT, Severity.CRITICAL,
                  _container("e" * 64, "x\x1b[2Jy", "img\nz", None), "n\t1",
                  "bad\rreason\x1b]0;title\x07" + "!" * 300)
    api.alerts = [evil]
    out = io.StringIO()
    run_alerts(parse("alerts", "--collector", api.address), out=out)
    assert lines(out)[1] == ("2023-11-14T22:13:20Z  drift  critical  x?[2Jy     img?z  n?1   "
                             "    1  bad?reason?]0;title?" + "!" * 300)
    out = io.StringIO()  # JSON keeps the texts, every control character escaped
    run_alerts(parse("alerts", "--json", "--collector", api.address), out=out)
    text = out.getvalue()
    assert [c for c in text if not c.isprintable()] == ["\n"]  # one line, no terminal codes
    assert json.loads(text)["container"]["name"] == "x\x1b[2Jy"
    assert json.loads(text)["reasons"][0]["text"].startswith("bad\rreason\x1b]0;title\x07")


def test_alerts_json_lines(api: FakeOperatorApi) -> None:
    api.alerts = [A2, A1]
    out = io.StringIO()
    assert run_alerts(parse("alerts", "--json", "--collector", api.address), out=out) == 0
    got = lines(out)
    assert got == [json.dumps(wire.alert_dict_from_proto(A1)),
                   json.dumps(wire.alert_dict_from_proto(A2))]
    first = json.loads(got[0])
    assert (first["id"], first["kind"], first["container"]["name"], first["node"]) == (
        A1.id, "drift", "web-1", "node-a")


def test_no_alerts(api: FakeOperatorApi) -> None:
    out = io.StringIO()
    assert run_alerts(parse("alerts", "--collector", api.address), out=out) == 0
    assert lines(out) == ["no alerts"]
    out = io.StringIO()
    assert run_alerts(parse("alerts", "--json", "--collector", api.address), out=out) == 0
    assert out.getvalue() == ""


def test_alerts_filters_become_the_request(api: FakeOperatorApi) -> None:
    args = parse("alerts", "--collector", api.address, "--kind", "drift,novel", "--kind",
                 "anomaly,drift", "--min-severity", "high", "--node", "node-a", "--node",
                 "node-b", "--namespace", "prod", "--image", "nginx", "--container", "web-1",
                 "--exclude-image", "busybox:latest", "--exclude-namespace", "kube-system",
                 "--exclude-container", "debug", "--since", "10m", "--limit", "7", "--actions")
    assert run_alerts(args, out=io.StringIO(), clock=lambda: T0 + 600.0) == 0
    expected_filter = alerts_pb2.AlertFilter(
        kinds=[common_pb2.ALERT_KIND_DRIFT, common_pb2.ALERT_KIND_NOVEL,
               common_pb2.ALERT_KIND_ANOMALY],
        min_severity=common_pb2.SEVERITY_HIGH, nodes=["node-a", "node-b"],
        namespaces=["prod"], images=["nginx"], containers=["web-1"],
        exclude_images=["busybox:latest"], exclude_namespaces=["kube-system"],
        exclude_containers=["debug"])
    assert api.requests("Alerts.List") == [alerts_pb2.ListAlertsRequest(
        filter=expected_filter, since=wire.to_timestamp(T0), page_size=7)]
    assert api.requests("Actions.List") == [actions_pb2.ListActionsRequest(
        nodes=["node-a", "node-b"], containers=["web-1"], since=wire.to_timestamp(T0),
        page_size=7)]


def test_alerts_pages_until_the_limit(api: FakeOperatorApi) -> None:
    api.alerts = [A3, A2, A1]
    api.page_cap = 2
    out = io.StringIO()
    assert run_alerts(parse("alerts", "--collector", api.address, "--limit", "3"), out=out) == 0
    assert lines(out) == [HEADER, ROW1, ROW2, ROW3]
    assert api.requests("Alerts.List") == [
        alerts_pb2.ListAlertsRequest(filter=NO_FILTER, page_size=3),
        alerts_pb2.ListAlertsRequest(filter=NO_FILTER, page_size=1, page_token="2")]
    out = io.StringIO()
    assert run_alerts(parse("alerts", "--collector", api.address, "--limit", "2"), out=out) == 0
    assert [line[:20] for line in lines(out)[1:]] == ["2023-11-14T22:14:25Z",
                                                      "2023-11-14T22:15:25Z"]  # the newest 2


def test_alerts_with_actions_are_merged_by_time(api: FakeOperatorApi) -> None:
    api.alerts = [A2, A1]
    api.actions = [QUARANTINE]
    out = io.StringIO()
    assert run_alerts(parse("alerts", "--actions", "--collector", api.address), out=out) == 0
    assert lines(out) == [  # the columns fit these rows; an action is a row of KIND action
        "TIME                  KIND    SEV     CONTAINER     IMAGE                NODE    COUNT  "
        "REASON",
        "2023-11-14T22:13:25Z  drift   high    web-1         nginx:1.25           node-a      1  "
        "ran /tmp/x, which the image does not contain (added at run time)",
        "2023-11-14T22:13:27Z  action  -       web-1         -                    node-a      -  "
        "quarantine done (policy rule quarantine-protect-drift)",
        "2023-11-14T22:14:25Z  novel   medium  f00dcafef00d  sha256:abababababab  node-b      1  "
        "connected to 127.0.0.1:4444, never seen for this image"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--kind", "drift,bogus"], "unknown alert kind(s) bogus"),
    (["--min-severity", "huge"], "invalid choice: 'huge'"),
    (["--limit", "0"], "must be >= 1, got 0"),
])
def test_alerts_bad_flags(flags: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse("alerts", *flags)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# -- alerts: following ---------------------------------------------------------------------------


def _event(**kw) -> alerts_pb2.AlertEvent:
    return alerts_pb2.AlertEvent(**kw)


# Following, plain: each column at its usual width (rows are not known yet), never cut.
FOLLOW_HEADER = ("TIME                  KIND     SEV       CONTAINER           IMAGE         "
                 "            NODE          COUNT  REASON")
FOLLOW_ROW1 = ("2023-11-14T22:13:25Z  drift    high      web-1               nginx:1.25    "
               "            node-a            1  ran /tmp/x, which the image does not contain "
               "(added at run time)")
FOLLOW_ROW2 = ("2023-11-14T22:14:25Z  novel    medium    f00dcafef00d        sha256:ababab"
               "ababab       node-b            1  connected to 127.0.0.1:4444, never seen for "
               "this image")


def test_follow_prints_alerts_notices_and_actions_until_the_stream_ends(
        api: FakeOperatorApi) -> None:
    api.subscribe_script = [SubscribeScript(events=[
        _event(alert=A1), _event(notice=NOTICE), _event(action=QUARANTINE), _event(alert=A2)])]
    out = io.StringIO()
    args = parse("alerts", "--follow", "--actions", "--kind", "drift", "--collector",
                 api.address)
    assert run_alerts(args, out=out, stop=threading.Event()) == 0
    assert lines(out) == [
        FOLLOW_HEADER, FOLLOW_ROW1,
        "2023-11-14T22:14:30Z  notice   -         -                   -                         "
        "-                 -  12 alerts dropped (slow reader)",
        "2023-11-14T22:13:27Z  action   -         web-1               -                         "
        "node-a            -  quarantine done (policy rule quarantine-protect-drift)",
        FOLLOW_ROW2,
        "-- the collector ended the stream"]
    assert api.requests("Alerts.Subscribe") == [alerts_pb2.SubscribeRequest(
        filter=alerts_pb2.AlertFilter(kinds=[common_pb2.ALERT_KIND_DRIFT]),
        include_notices=True, include_actions=True, max_batch=FOLLOW_BATCH)]
    assert api.requests("Alerts.List") == []


def test_follow_json_lines(api: FakeOperatorApi) -> None:
    api.subscribe_script = [SubscribeScript(events=[
        _event(alert=A1), _event(notice=NOTICE), _event(action=QUARANTINE)])]
    out, err = io.StringIO(), io.StringIO()
    args = parse("alerts", "-f", "--json", "--collector", api.address)
    assert run_alerts(args, out=out, err=err, stop=threading.Event()) == 0
    assert [json.loads(line) for line in lines(out)] == [
        wire.alert_dict_from_proto(A1),
        {"notice": {"dropped": 12, "text": "slow reader", "time": T0 + 70.0}},
        {"action": {"action_id": "act-1", "type": "quarantine", "status": "done",
                    "message": "", "container_id": WEB_ID, "container_name": "web-1",
                    "node": "node-a", "reason": "drift in protect mode",
                    "requested_by": "policy:quarantine-protect-drift", "with_pause": False,
                    "alert_id": A1.id, "requested_at": T0 + 6.0, "finished_at": T0 + 7.0}}]
    assert lines(err) == ["-- the collector ended the stream"]
    assert api.requests("Alerts.Subscribe")[0].include_actions is False


def _follow_in_thread(args: argparse.Namespace, out: io.StringIO, stop: threading.Event,
                      **kw) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(
        run_alerts(args, out=out, stop=stop, **kw)), daemon=True)
    thread.start()
    return thread, result


def test_follow_stops_on_the_stop_event(api: FakeOperatorApi) -> None:
    api.subscribe_script = [SubscribeScript(events=[_event(alert=A1)], end="hold")]
    out, stop = Tap(), threading.Event()
    thread, result = _follow_in_thread(parse("alerts", "-f", "--collector", api.address),
                                       out, stop)
    assert out.wait_lines(2)
    stop.set()
    thread.join(10)
    assert result == [0]
    assert lines(out) == [FOLLOW_HEADER, FOLLOW_ROW1]


_FOLLOW_MAIN = """
import argparse, sys
from driftwarden.ops.command import add_parsers
parser = argparse.ArgumentParser(prog="driftwarden")
add_parsers(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def test_follow_ends_cleanly_on_ctrl_c(api: FakeOperatorApi) -> None:
    api.subscribe_script = [SubscribeScript(events=[_event(alert=A1)], end="hold")]
    proc = subprocess.Popen(
        [sys.executable, "-c", _FOLLOW_MAIN, "alerts", "-f", "--collector", api.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None
        got = [proc.stdout.readline().rstrip("\n") for _ in range(2)]
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, got, rest, err) == (0, [FOLLOW_HEADER, FOLLOW_ROW1], "", "")


def test_follow_with_since_prints_stored_alerts_first_once(api: FakeOperatorApi) -> None:
    api.alerts = [A2, A1]
    api.subscribe_script = [SubscribeScript(events=[_event(alert=A2), _event(alert=A3)])]
    out = io.StringIO()
    args = parse("alerts", "-f", "--since", "1h", "--limit", "5", "--collector", api.address)
    assert run_alerts(args, out=out, stop=threading.Event(), clock=lambda: T0 + 3600.0) == 0
    assert [line[:30] for line in lines(out)] == [
        "TIME                  KIND    ", "2023-11-14T22:13:25Z  drift   ",
        "2023-11-14T22:14:25Z  novel   ", "2023-11-14T22:15:25Z  anomaly ",
        "-- the collector ended the str"]
    assert api.requests("Alerts.List") == [alerts_pb2.ListAlertsRequest(
        filter=NO_FILTER, since=wire.to_timestamp(T0), page_size=5)]


def _reconnect_lines(address: str) -> list[str]:
    return [f"-- lost the collector at {address}; reconnecting...",
            f"-- reconnected to {address}; alerts stored meanwhile may be missing here "
            f"(driftwarden alerts --since 2023-11-14T22:30:00Z)"]


def test_follow_reconnects_when_the_stream_breaks(api: FakeOperatorApi) -> None:
    api.subscribe_script = [
        SubscribeScript(events=[_event(alert=A1)],
                        end=(grpc.StatusCode.UNAVAILABLE, "collector shutting down")),
        SubscribeScript(events=[_event(alert=A2)])]
    out = io.StringIO()
    assert run_alerts(parse("alerts", "-f", "--collector", api.address), out=out,
                      stop=threading.Event(), clock=lambda: T0 + 1000.0) == 0
    assert lines(out) == [FOLLOW_HEADER, FOLLOW_ROW1, *_reconnect_lines(api.address),
                          FOLLOW_ROW2, "-- the collector ended the stream"]
    assert len(api.requests("Alerts.Subscribe")) == 2


def test_follow_survives_a_collector_restart() -> None:
    first = FakeOperatorApi(subscribe_script=[SubscribeScript([_event(alert=A1)], "hold")])
    first.start()
    address = first.address
    out, stop = Tap(), threading.Event()
    thread, result = _follow_in_thread(parse("alerts", "-f", "--collector", address), out, stop,
                                       clock=lambda: T0 + 1000.0)
    try:
        assert out.wait_lines(2)  # header, alert
        first.stop()
        assert out.wait_lines(3)  # "lost" line
        with FakeOperatorApi(port=first.port,
                             subscribe_script=[SubscribeScript([_event(alert=A2)])]):
            thread.join(20)
    finally:
        stop.set()
        first.stop()
    assert result == [0]
    assert lines(out) == [FOLLOW_HEADER, FOLLOW_ROW1, *_reconnect_lines(address), FOLLOW_ROW2,
                          "-- the collector ended the stream"]


def test_follow_fails_fast_when_the_collector_is_not_there() -> None:
    address = f"127.0.0.1:{free_port()}"
    out, err = io.StringIO(), io.StringIO()
    assert run_alerts(parse("alerts", "-f", "--collector", address), out=out, err=err,
                      stop=threading.Event()) == 1
    assert out.getvalue() == ""
    assert lines(err) == [f"driftwarden: error: collector not reachable at {address} — is "
                          f"`driftwarden collector` running? (if it runs with TLS, pass "
                          f"--tls-ca, --tls-cert and --tls-key)"]


def test_follow_reports_a_refused_subscription(api: FakeOperatorApi) -> None:
    api.errors["Alerts.Subscribe"] = (grpc.StatusCode.UNAUTHENTICATED, "missing token")
    err = io.StringIO()
    assert run_alerts(parse("alerts", "-f", "--collector", api.address), out=io.StringIO(),
                      err=err, stop=threading.Event()) == 1
    assert lines(err) == [f"driftwarden: error: the collector at {api.address} refused our "
                          f"credentials (missing token): check --token-file (or the operator "
                          f"certificate given with --tls-cert/--tls-key)"]


# -- token ---------------------------------------------------------------------------------------


def test_token_is_sent_as_bearer_metadata(api: FakeOperatorApi, tmp_path: Path) -> None:
    token = tmp_path / "operator.token"
    token.write_text("s3cret-token\n")
    api.subscribe_script = [SubscribeScript()]
    for argv in (["agents"], ["alerts"], ["alerts", "-f"], ["action", "pause", "web-1"]):
        args = parse(*argv, "--collector", api.address, "--token-file", str(token))
        args.func(args, out=io.StringIO(), err=io.StringIO(), **(
            {"stop": threading.Event()} if "-f" in argv else {}))
    assert [(c.method, c.metadata.get("authorization")) for c in api.calls] == [
        ("Agents.List", "Bearer s3cret-token"), ("Alerts.List", "Bearer s3cret-token"),
        ("Alerts.Subscribe", "Bearer s3cret-token"), ("Actions.Request", "Bearer s3cret-token")]
    args = parse("agents", "--collector", api.address)
    run_agents(args, out=io.StringIO())
    assert "authorization" not in api.calls[-1].metadata


def test_bad_token_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    for path, message in ((tmp_path / "missing", "--token-file .*: cannot read it"),
                          (empty, "is empty"), (spaced, "one word of printable ASCII")):
        with pytest.raises(UsageError, match=message):
            operator_channel(parse("agents", "--token-file", str(path)))


# -- action --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("status", "message", "argv_container", "line", "code"), [
    ("done", "", "web-1", "quarantine web-1 (abc123def456) on node-a: done", 0),
    ("already", "", "web-1", "quarantine web-1 (abc123def456) on node-a: already", 0),
    ("done", "", "abc123", "quarantine abc123def456 on node-a: done", 0),
    ("failed", "agent for node node-a is not connected", "web-1",
     "quarantine web-1 (abc123def456) on node-a: failed: agent for node node-a is not "
     "connected", 1),
    ("container-gone", "not on this node", "web-1",
     "quarantine web-1 (abc123def456) on node-a: container-gone: not on this node", 1),
    ("refused", "exempt namespace", "web-1",
     "quarantine web-1 (abc123def456) on node-a: refused: exempt namespace", 1),
    ("pending", "no result within 10 s", "web-1",
     "quarantine web-1 (abc123def456) on node-a: pending: no result within 10 s (action act-9: "
     "the agent has not answered yet; its result will show in `driftwarden alerts --actions`)",
     1),
])
def test_action_outcomes(api: FakeOperatorApi, status: str, message: str, argv_container: str,
                         line: str, code: int) -> None:
    api.action_response = actions_pb2.ActionResponse(
        action_id="act-9", status=wire.ACTION_STATUS.to_proto(status), message=message,
        container_id=WEB_ID, node="node-a")
    out = io.StringIO()
    args = parse("action", "quarantine", argv_container, "--collector", api.address,
                 "--reason", "suspicious exec", "--with-pause")
    assert run_action(args, out=out) == code
    assert lines(out) == [line]
    assert api.requests("Actions.Request") == [actions_pb2.ActionRequest(
        container=argv_container, type=actions_pb2.ACTION_TYPE_QUARANTINE,
        reason="suspicious exec", with_pause=True, requested_by="alice")]


def test_action_request_fields(api: FakeOperatorApi, monkeypatch) -> None:
    monkeypatch.setenv("SUDO_USER", "bob")
    api.action_response = actions_pb2.ActionResponse(
        status=actions_pb2.ACTION_STATUS_DONE, container_id="7" * 64, node="node-b")
    out = io.StringIO()
    assert run_action(parse("action", "kill", "db", "--node", "node-b", "--collector",
                            api.address), out=out) == 0
    assert lines(out) == ["kill db (777777777777) on node-b: done"]
    assert api.requests("Actions.Request") == [actions_pb2.ActionRequest(
        container="db", type=actions_pb2.ACTION_TYPE_KILL, requested_by="bob", node="node-b")]


def test_action_with_pause_only_for_quarantine() -> None:
    with pytest.raises(UsageError, match="--with-pause goes with quarantine only, not kill"):
        run_action(parse("action", "kill", "web-1", "--with-pause"))


def test_action_types_are_checked_by_the_parser(capsys) -> None:
    with pytest.raises(SystemExit):
        parse("action", "explode", "web-1")
    assert "invalid choice: 'explode'" in capsys.readouterr().err


@pytest.mark.parametrize(("code", "details", "line", "exit_code"), [
    (grpc.StatusCode.NOT_FOUND, "no container named or with id prefix 'web-9'",
     "no container matches 'web-9' (no container named or with id prefix 'web-9'): give its "
     "name, full id or an id prefix of at least 4 characters", 1),
    (grpc.StatusCode.FAILED_PRECONDITION, "candidates: abc123def456 (node-a), abc1ffff0000 "
     "(node-b)", "container 'web-9' is ambiguous (candidates: abc123def456 (node-a), "
     "abc1ffff0000 (node-b)): give more of its id, or --node", 1),
    (grpc.StatusCode.UNAUTHENTICATED, "bad token",
     "the collector at {addr} refused our credentials (bad token): check --token-file (or the "
     "operator certificate given with --tls-cert/--tls-key)", 1),
    (grpc.StatusCode.PERMISSION_DENIED, "agents may not call Actions",
     "the collector at {addr} does not allow this call (agents may not call Actions): use the "
     "operator certificate (OU=operator) or the operator token", 1),
    (grpc.StatusCode.INVALID_ARGUMENT, "action_request.type: unspecified",
     "the collector refused the request (action_request.type: unspecified)", 2),
    (grpc.StatusCode.INTERNAL, "database is locked",
     "the call to the collector at {addr} failed: INTERNAL (database is locked)", 1),
])
def test_action_errors_are_one_line(api: FakeOperatorApi, code: grpc.StatusCode, details: str,
                                    line: str, exit_code: int) -> None:
    api.errors["Actions.Request"] = (code, details)
    out, err = io.StringIO(), io.StringIO()
    assert run_action(parse("action", "pause", "web-9", "--collector", api.address),
                      out=out, err=err) == exit_code
    assert out.getvalue() == ""
    assert lines(err) == ["driftwarden: error: " + line.format(addr=api.address)]


@pytest.mark.parametrize("argv", [["action", "pause", "web-1"], ["agents"], ["alerts"]])
def test_unreachable_collector(argv: list[str]) -> None:
    address = f"127.0.0.1:{free_port()}"
    err = io.StringIO()
    args = parse(*argv, "--collector", address)
    assert args.func(args, out=io.StringIO(), err=err) == 1
    assert lines(err) == [f"driftwarden: error: collector not reachable at {address} — is "
                          f"`driftwarden collector` running? (if it runs with TLS, pass "
                          f"--tls-ca, --tls-cert and --tls-key)"]


def test_collector_address_from_the_environment(monkeypatch) -> None:
    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("DRIFTWARDEN_COLLECTOR", address)
    err = io.StringIO()
    assert run_agents(parse("agents"), out=io.StringIO(), err=err) == 1
    assert f"collector not reachable at {address} —" in err.getvalue()


def test_describe_rpc_error_without_a_container() -> None:
    assert describe_rpc_error(grpc.StatusCode.NOT_FOUND, "x", collector="c:1") == (
        "the call to the collector at c:1 failed: NOT_FOUND (x)", 1)
    assert describe_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "", collector="c:1") == (
        "the collector at c:1 did not answer in time", 1)
    assert describe_rpc_error(grpc.StatusCode.UNAVAILABLE, "", collector="c:1", tls=True) == (
        "collector not reachable at c:1 — is `driftwarden collector` running? (check that "
        "--tls-ca, --tls-cert and --tls-key belong to its CA)", 1)


# -- agents --------------------------------------------------------------------------------------


def _counters(*dropped: int) -> list[common_pb2.KindCounters]:
    return [common_pb2.KindCounters(kind=k, emitted=100, suppressed=5, dropped=d,
                                    over_budget=2 * d, known=7)
            for k, d in zip(("exec", "connect", "file"), dropped, strict=False)]


AGENTS = [
    agent_pb2.Agent(node="node-b", agent_version="0.4.0", mode=common_pb2.MODE_MONITOR,
                    connected=False, last_heartbeat=wire.to_timestamp(T0 - 7200),
                    counters=_counters(0, 0, 0), containers_watched=0, spool_depth=1234,
                    hostname="b", peer="ipv4:127.0.0.1:40001"),
    agent_pb2.Agent(node="node-a", agent_version="0.5.0", mode=common_pb2.MODE_LEARN,
                    connected=True, connected_at=wire.to_timestamp(T0 - 600),
                    last_heartbeat=wire.to_timestamp(T0 - 4), counters=_counters(3, 0, 11),
                    containers_watched=12, spool_depth=0, hostname="a",
                    peer="ipv4:127.0.0.1:40000",
                    baselines=[baselines_pb2.BaselineVersion(image_key="sha256:" + "1" * 64,
                                                             version=7, mode=common_pb2.MODE_LEARN),
                               baselines_pb2.BaselineVersion(image_key="sha256:" + "2" * 64,
                                                             version=3,
                                                             mode=common_pb2.MODE_PROTECT)]),
    agent_pb2.Agent(node="node-c"),
]


def test_agents_table(api: FakeOperatorApi) -> None:
    api.agents = AGENTS
    out = io.StringIO()
    assert run_agents(parse("agents", "--collector", api.address), out=out,
                      clock=lambda: float(T0)) == 0
    assert lines(out) == [
        "NODE    CONNECTED  VERSION  MODE     CONTAINERS  BASELINES  SPOOL  DROPPED  "
        "LAST HEARTBEAT",
        "node-a  yes        0.5.0    learn            12          2      0       14  4s ago",
        "node-b  no         0.4.0    monitor           0          0   1234        0  2h ago",
        "node-c  no         -        -                 0          0      0        0  never"]
    assert api.requests("Agents.List") == [agent_pb2.ListAgentsRequest()]


def test_agents_json(api: FakeOperatorApi) -> None:
    api.agents = AGENTS[1:2]
    out = io.StringIO()
    assert run_agents(parse("agents", "--json", "--collector", api.address), out=out) == 0
    assert [json.loads(line) for line in lines(out)] == [{
        "node": "node-a", "connected": True, "agent_version": "0.5.0", "mode": "learn",
        "hostname": "a", "peer": "ipv4:127.0.0.1:40000", "connected_at": T0 - 600.0,
        "last_heartbeat": T0 - 4.0, "containers_watched": 12, "spool_depth": 0,
        "counters": [{"kind": "exec", "emitted": 100, "suppressed": 5, "dropped": 3,
                      "over_budget": 6, "known": 7},
                     {"kind": "connect", "emitted": 100, "suppressed": 5, "dropped": 0,
                      "over_budget": 0, "known": 7},
                     {"kind": "file", "emitted": 100, "suppressed": 5, "dropped": 11,
                      "over_budget": 22, "known": 7}],
        "baselines": [{"image_key": "sha256:" + "1" * 64, "version": 7, "mode": "learn"},
                      {"image_key": "sha256:" + "2" * 64, "version": 3, "mode": "protect"}]}]


def test_no_agents(api: FakeOperatorApi) -> None:
    out = io.StringIO()
    assert run_agents(parse("agents", "--collector", api.address), out=out) == 0
    assert lines(out) == ["no agents have connected to this collector"]


# -- on a terminal: rich tables ------------------------------------------------------------------


@pytest.fixture
def terminal(monkeypatch) -> FakeTerminal:
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    return FakeTerminal()


def test_alerts_on_a_terminal_is_a_rich_table(api: FakeOperatorApi, terminal: FakeTerminal) -> None:
    api.alerts = [A2, A1]
    api.actions = [QUARANTINE]
    assert run_alerts(parse("alerts", "--actions", "--collector", api.address),
                      out=terminal) == 0
    assert screen(terminal) == [  # the plain table's columns, fitted to the terminal
        "TIME                  KIND     SEV       CONTAINER     IMAGE                NODE    "
        "COUNT  REASON",
        "─" * 140,
        "2023-11-14T22:13:25Z  drift    high      web-1         nginx:1.25           node-a  "
        "    1  ran /tmp/x, which the image does not contain (ad…",
        "2023-11-14T22:13:27Z  action             web-1                              node-a  "
        "       quarantine done (policy rule quarantine-protect-…",
        "2023-11-14T22:14:25Z  novel    medium    f00dcafef00d  sha256:abababababab  node-b  "
        "    1  connected to 127.0.0.1:4444, never seen for this…"]
    assert "\x1b[1;31mhigh" in terminal.getvalue()  # coloured


def test_plain_json_and_dumb_terminals_keep_the_plain_output(api: FakeOperatorApi,
                                                             terminal: FakeTerminal,
                                                             monkeypatch) -> None:
    api.alerts = [A3, A2, A1]
    assert run_alerts(parse("alerts", "--plain", "--collector", api.address), out=terminal) == 0
    assert lines(terminal) == [HEADER, ROW1, ROW2, ROW3]
    out = FakeTerminal()
    assert run_alerts(parse("alerts", "--json", "--collector", api.address), out=out) == 0
    assert [json.loads(line)["id"] for line in lines(out)] == [A1.id, A2.id, A3.id]
    monkeypatch.setenv("TERM", "dumb")
    out = FakeTerminal()
    assert run_alerts(parse("alerts", "--collector", api.address), out=out) == 0
    assert lines(out) == [HEADER, ROW1, ROW2, ROW3]


def test_json_and_plain_exclude_each_other(capsys) -> None:
    for command in ("alerts", "agents"):
        with pytest.raises(SystemExit):
            parse(command, "--json", "--plain")
        assert "argument --plain: not allowed with argument --json" in capsys.readouterr().err


def test_agents_on_a_terminal(api: FakeOperatorApi, terminal: FakeTerminal, monkeypatch) -> None:
    api.agents = AGENTS
    monkeypatch.setenv("NO_COLOR", "1")
    assert run_agents(parse("agents", "--collector", api.address), out=terminal,
                      clock=lambda: float(T0)) == 0
    assert screen(terminal) == [
        "NODE    CONNECTED  VERSION  MODE     CONTAINERS  BASELINES  SPOOL  DROPPED  "
        "LAST HEARTBEAT",
        "─" * 90,
        "node-a  yes        0.5.0    learn            12          2      0       14  4s ago",
        "node-b  no         0.4.0    monitor           0          0   1234        0  2h ago",
        "node-c  no         -        -                 0          0      0        0  never"]
    assert re.findall(r"\x1b\[[0-9;]*(?:3[0-7]|4[0-7])m", terminal.getvalue()) == []
    assert "\x1b[1mNODE" in terminal.getvalue()  # NO_COLOR keeps bold


def test_follow_on_a_terminal_is_a_live_table(api: FakeOperatorApi,
                                              terminal: FakeTerminal) -> None:
    api.subscribe_script = [SubscribeScript(events=[
        _event(alert=A1), _event(notice=NOTICE), _event(action=QUARANTINE), _event(alert=A2)])]
    args = parse("alerts", "--follow", "--actions", "--collector", api.address)
    assert run_alerts(args, out=terminal, stop=threading.Event(),
                      clock=lambda: T0 + 1000.0) == 0
    raw = terminal.getvalue()
    assert raw.startswith("\x1b[?25l")  # the cursor hidden while live,
    assert raw.endswith("\x1b[?25h")  # and back
    assert screen(terminal) == [
        "TIME                  KIND     SEV       CONTAINER     IMAGE                NODE    "
        "COUNT  REASON",
        "─" * 140,
        "2023-11-14T22:13:25Z  drift    high      web-1         nginx:1.25           node-a  "
        "    1  ran /tmp/x, which the image does not contain (ad…",
        "2023-11-14T22:14:30Z  notice                                                        "
        "       12 alerts dropped (slow reader)",
        "2023-11-14T22:13:27Z  action             web-1                              node-a  "
        "       quarantine done (policy rule quarantine-protect-…",
        "2023-11-14T22:14:25Z  novel    medium    f00dcafef00d  sha256:abababababab  node-b  "
        "    1  connected to 127.0.0.1:4444, never seen for this…",
        "2023-11-14T22:30:00Z                                                                "
        "       the collector ended the stream",
        "the collector ended the stream | 2 alerts, 1 action | 12 dropped by the collector "
        "(slow reader)"]


def test_follow_on_a_terminal_shows_the_newest_rows_that_fit(api: FakeOperatorApi,
                                                             terminal: FakeTerminal,
                                                             monkeypatch) -> None:
    monkeypatch.setenv("LINES", "10")
    alerts = [_alert(100 + n, T0 + n, AlertKind.DRIFT, Severity.LOW,
                     _container(f"{n:064x}", f"c{n}", "img", None), "n", f"r{n}")
              for n in range(12)]
    api.subscribe_script = [SubscribeScript(events=[_event(alert=a) for a in alerts])]
    assert run_alerts(parse("alerts", "-f", "--collector", api.address), out=terminal,
                      stop=threading.Event(), clock=lambda: T0 + 1000.0) == 0
    shown = screen(terminal)
    assert len(shown) == 10 - 1
    assert [line.split()[3] for line in shown[2:-2]] == ["c7", "c8", "c9", "c10", "c11"]
    assert shown[-2] == ("2023-11-14T22:30:00Z                                                    "
                         "the collector ended the stream")
    assert shown[-1] == "the collector ended the stream | 12 alerts, 0 actions"


def test_follow_on_a_terminal_reconnects(api: FakeOperatorApi, terminal: FakeTerminal) -> None:
    api.subscribe_script = [
        SubscribeScript(events=[_event(alert=A1)],
                        end=(grpc.StatusCode.UNAVAILABLE, "collector shutting down")),
        SubscribeScript(events=[_event(alert=A2)], end="hold")]
    stop = threading.Event()
    thread, result = _follow_in_thread(parse("alerts", "-f", "--collector", api.address),
                                       terminal, stop, clock=lambda: T0 + 1000.0)
    try:  # the status line has the whole hint (the row's reason column cuts it)
        assert terminal.wait_for(f"reconnected to {api.address}; alerts stored meanwhile may "
                                 f"be missing here (driftwarden alerts --since "
                                 f"2023-11-14T22:30:00Z)")
        assert terminal.wait_for("f00dcafef00d")
    finally:
        stop.set()
        thread.join(10)
    assert result == [0]
    shown = screen(terminal)
    assert [(line[:20], line[91:112]) for line in shown[2:-1]] == [
        ("2023-11-14T22:13:25Z", "ran /tmp/x, which the"),
        ("2023-11-14T22:30:00Z", "lost the collector at"),
        ("2023-11-14T22:30:00Z", "reconnected to 127.0."),
        ("2023-11-14T22:14:25Z", "connected to 127.0.0.")]
    assert shown[-1] == "stopped | 2 alerts, 0 actions"


def test_follow_on_a_terminal_reports_a_refused_subscription_below_the_table(
        api: FakeOperatorApi, terminal: FakeTerminal) -> None:
    api.errors["Alerts.Subscribe"] = (grpc.StatusCode.UNAUTHENTICATED, "missing token")
    err = io.StringIO()
    assert run_alerts(parse("alerts", "-f", "--collector", api.address), out=terminal,
                      err=err, stop=threading.Event()) == 1
    assert terminal.getvalue().endswith("\x1b[?25h")  # the display ended before the error
    assert screen(terminal)[-1] == "stopped | 0 alerts, 0 actions"
    assert lines(err) == [f"driftwarden: error: the collector at {api.address} refused our "
                          f"credentials (missing token): check --token-file (or the operator "
                          f"certificate given with --tls-cert/--tls-key)"]


def test_follow_on_a_pseudo_terminal_ends_cleanly_on_ctrl_c(api: FakeOperatorApi) -> None:
    api.subscribe_script = [SubscribeScript(events=[_event(alert=A1)], end="hold")]
    main, child = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "100", "LINES": "12"}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", _FOLLOW_MAIN, "alerts", "-f", "--collector", api.address],
            stdin=subprocess.DEVNULL, stdout=child, stderr=subprocess.PIPE, env=env,
            cwd=Path(__file__).resolve().parents[1])
    finally:
        os.close(child)
    shown = Tap()

    def read_terminal() -> None:
        while True:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            shown.write(data.decode("utf-8", "replace"))

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        assert shown.wait_for("web-1")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)
    assert (proc.returncode, err) == (0, b"")
    raw = shown.getvalue()
    assert raw.endswith("\x1b[?25h")  # the cursor is back
    assert screen(shown)[2].startswith("2023-11-14T22:13:25Z  drift    high      web-1  ")
    assert screen(shown)[-1] == "stopped | 1 alert, 0 actions"


# -- certs and mutual TLS ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory) -> tuple[Path, str]:
    if shutil.which("openssl") is None:
        pytest.fail("openssl is required (apt-get install openssl)")
    directory = tmp_path_factory.mktemp("pki") / "certs"
    out = io.StringIO()
    args = parse("certs", "init", str(directory), "--nodes", "node-a,node-b", "--days", "3")
    assert run_certs(args, out=out) == 0
    return directory, out.getvalue()


def test_certs_init_makes_the_files_and_says_how_to_use_them(certs_dir) -> None:
    d, output = certs_dir
    files = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    assert files == ["agents", "agents/node-a.crt", "agents/node-a.key", "agents/node-b.crt",
                     "agents/node-b.key", "ca.crt", "ca.key", "collector.crt", "collector.key",
                     "operator.crt", "operator.key", "operator.token"]
    assert output.splitlines() == [
        f"created certificates in {d} (valid 3 days):",
        "  ca.crt ca.key                  the CA (keep ca.key off the nodes)",
        "  collector.crt collector.key    the collector's server certificate",
        "  operator.crt operator.key      the operators' client certificate",
        "  operator.token                 the operators' bearer token",
        "  agents/node-a.crt agents/node-a.key  node node-a's agent certificate",
        "  agents/node-b.crt agents/node-b.key  node node-b's agent certificate",
        "use them with:",
        f"  driftwarden collector --tls-client-ca {d}/ca.crt --tls-cert {d}/collector.crt "
        f"--tls-key {d}/collector.key --token-file {d}/operator.token",
        f"  driftwarden agent --node node-a --tls-ca {d}/ca.crt --tls-cert "
        f"{d}/agents/node-a.crt --tls-key {d}/agents/node-a.key",
        f"  driftwarden agent --node node-b --tls-ca {d}/ca.crt --tls-cert "
        f"{d}/agents/node-b.crt --tls-key {d}/agents/node-b.key",
        f"  driftwarden alerts|action|agents --tls-ca {d}/ca.crt --tls-cert {d}/operator.crt "
        f"--tls-key {d}/operator.key --token-file {d}/operator.token"]


def test_certs_init_refuses_a_non_empty_directory(certs_dir) -> None:
    d, _ = certs_dir
    with pytest.raises(UsageError, match="is not empty; refusing to overwrite"):
        run_certs(parse("certs", "init", str(d), "--nodes", "x"), out=io.StringIO())


def test_certs_init_names_the_collector_as_agents_reach_it(tmp_path) -> None:
    d = tmp_path / "certs"
    run_certs(parse("certs", "init", str(d), "--nodes", "x", "--collector-names",
                    "driftwarden-collector.driftwarden.svc, 10.0.0.5"), out=io.StringIO())
    sans = subprocess.run(["openssl", "x509", "-in", str(d / "collector.crt"), "-noout", "-ext",
                           "subjectAltName"], capture_output=True, text=True, check=True).stdout
    assert sans.split("\n")[1].strip() == (
        "DNS:localhost, IP Address:127.0.0.1, IP Address:0:0:0:0:0:0:0:1, "
        "DNS:driftwarden-collector.driftwarden.svc, IP Address:10.0.0.5")
    with pytest.raises(UsageError, match=r"^--collector-names 'x:50051': 'x:50051' is neither"):
        run_certs(parse("certs", "init", str(tmp_path / "other"), "--nodes", "x",
                        "--collector-names", "x:50051"), out=io.StringIO())


@pytest.fixture
def tls_api(certs_dir) -> Iterator[FakeOperatorApi]:
    d, _ = certs_dir
    tls = ServerTls(ca_cert=(d / "ca.crt").read_bytes(),
                    cert=(d / "collector.crt").read_bytes(),
                    key=(d / "collector.key").read_bytes())
    with FakeOperatorApi(tls=tls, agents=AGENTS[2:]) as server:
        yield server


def test_operator_calls_over_mutual_tls(certs_dir, tls_api: FakeOperatorApi) -> None:
    d, _ = certs_dir
    out = io.StringIO()
    args = parse("agents", "--collector", tls_api.address, "--tls-ca", str(d / "ca.crt"),
                 "--tls-cert", str(d / "operator.crt"), "--tls-key", str(d / "operator.key"),
                 "--token-file", str(d / "operator.token"))
    assert run_agents(args, out=out, clock=lambda: float(T0)) == 0
    assert lines(out) == [
        "NODE    CONNECTED  VERSION  MODE  CONTAINERS  BASELINES  SPOOL  DROPPED  LAST HEARTBEAT",
        "node-c  no         -        -              0          0      0        0  never"]
    call = tls_api.calls[0]
    assert call.peer_subject == "CN=operator,OU=operator,O=driftwarden"
    assert call.metadata["authorization"] == "Bearer " + (d / "operator.token").read_text().strip()


def test_tls_mistakes(certs_dir, tls_api: FakeOperatorApi, tmp_path: Path) -> None:
    d, _ = certs_dir
    err = io.StringIO()
    no_client_cert = parse("agents", "--collector", tls_api.address, "--tls-ca", str(d / "ca.crt"))
    assert run_agents(no_client_cert, out=io.StringIO(), err=err) == 1
    assert lines(err) == [f"driftwarden: error: collector not reachable at {tls_api.address} — "
                          f"is `driftwarden collector` running? (check that --tls-ca, --tls-cert "
                          f"and --tls-key belong to its CA)"]
    err = io.StringIO()
    assert run_agents(parse("agents", "--collector", tls_api.address), out=io.StringIO(),
                      err=err) == 1
    assert "(if it runs with TLS, pass --tls-ca, --tls-cert and --tls-key)" in err.getvalue()
    assert tls_api.calls == []
    with pytest.raises(UsageError, match=r"^--tls-ca, --tls-cert given without --tls-key: a "
                                         r"client certificate needs --tls-cert, --tls-key and "
                                         r"--tls-ca \(`driftwarden certs init DIR` makes them\)$"):
        operator_channel(parse("agents", "--tls-ca", "x", "--tls-cert", "y"))
    with pytest.raises(UsageError, match=r"^--tls-cert, --tls-key given without --tls-ca: "):
        operator_channel(parse("agents", "--tls-cert", "y", "--tls-key", "z"))
    with pytest.raises(UsageError, match=r"^--tls-ca /nonexistent/ca\.crt: cannot read it \(No "
                                         r"such file or directory\); run `driftwarden certs"):
        operator_channel(parse("agents", "--tls-ca", "/nonexistent/ca.crt"))
    not_pem = tmp_path / "ca.crt"
    not_pem.write_text("not a certificate\n")
    with pytest.raises(UsageError, match=rf"^--tls-ca {re.escape(str(not_pem))}: not a PEM "):
        operator_channel(parse("agents", "--tls-ca", str(not_pem)))
