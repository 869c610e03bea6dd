"""`driftwarden baseline ... --collector ADDR` (the fleet's baselines) and `agents --baselines`
against a fake Baselines service on 127.0.0.1 (tests/support/fake_operator_api.py): requests,
exact output (plain, JSON, a terminal), the choice between the local and the collector form,
and bad input."""

from __future__ import annotations

import io
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import msgpack
import pytest
from driftwarden.cli.main import build_parser, main
from driftwarden.core import wire
from driftwarden.models.items import ConnectItem, ExecItem, ItemSet, WriteItem
from driftwarden.models.profile import LearningPolicy, Profile
from driftwarden.ops.baselines import run_baseline
from driftwarden.ops.command import run_agents
from driftwarden.proto.v1 import agent_pb2, baselines_pb2, common_pb2

from tests.support.fake_operator_api import FakeOperatorApi
from tests.support.terminal import FakeTerminal

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z
WEB = "sha256:" + "1a" * 32
WEB2 = "sha256:" + "3c" * 32
DB = "sha256:" + "2b" * 32
LEARN, MONITOR, PROTECT = common_pb2.MODE_LEARN, common_pb2.MODE_MONITOR, common_pb2.MODE_PROTECT


def item(kind: str, *key: str) -> baselines_pb2.BaselineItem:
    return baselines_pb2.BaselineItem(kind=kind, key=key)


def summary(key: str, name: str, mode: int, version: int,
            **fields) -> baselines_pb2.BaselineSummary:
    return baselines_pb2.BaselineSummary(image_key=key, image_name=name, mode=mode,
                                         version=version, **fields)


S_WEB = summary(WEB, "shop/web:1.2", MONITOR, 12, items=5, unconfirmed=1, windows=40,
                containers=3, nodes=["node-a", "node-b"], updated_at=wire.to_timestamp(T0 + 60))
S_DB = summary(DB, "shop/db:16", LEARN, 3, items=1, windows=4, containers=1, nodes=["node-a"],
               updated_at=wire.to_timestamp(T0), learning_started_at=wire.to_timestamp(T0 - 600),
               stable=True)
S_WEB2 = summary(WEB2, "shop/web:1.3", LEARN, 2, items=6, carried_from=WEB)

WEB_ITEMS = [item("write", "/var/log/*.log", "append"), item("exec", "/bin/busybox", "httpd"),
             item("connect", "inet", "loopback", "127.0.0.1", "5432", "tcp", "/bin/busybox"),
             item("lineage", "/bin/sh:sh", "/bin/busybox:httpd"), item("exec", "/bin/sh", "sh")]
STRAY = baselines_pb2.ItemEvidence(
    item=item("exec", "/tmp/x", "x"),
    containers=[baselines_pb2.ContainerRef(container_id="c" * 64, node="node-b", name="web-2")])
LEARNED = baselines_pb2.ModeChange(changed_at=wire.to_timestamp(T0 + 30), to=MONITOR,
                                   reason="learning ended: stable", by="collector",
                                   **{"from": LEARN})
WEB_BASELINE = baselines_pb2.Baseline(summary=S_WEB, items=WEB_ITEMS, unconfirmed=[STRAY],
                                      history=[LEARNED], layers=["sha256:l1", "sha256:l2"])

LIST_LINES = [
    "IMAGE         KEY                  MODE     VERSION  ITEMS  UNCONFIRMED  WINDOWS  UPDATED"
    "               NODES",
    "shop/web:1.2  sha256:1a1a1a1a1a1a  monitor       12      5            1       40  "
    "2023-11-14T22:14:20Z  node-a,node-b",
    "shop/db:16    sha256:2b2b2b2b2b2b  learn          3      1            0        4  "
    "2023-11-14T22:13:20Z  node-a"]

SHOW_LINES = [
    "image       shop/web:1.2",
    f"key         {WEB}",
    "mode        monitor",
    "version     12",
    "updated     2023-11-14T22:14:20Z",
    "items       5 learned, 1 unconfirmed",
    "windows     40",
    "containers  3 ran it while it learned",
    "nodes       node-a, node-b",
    "layers      2",
    "",
    "items (5)",
    "KIND     ITEM",
    "exec     exec /bin/busybox as httpd",
    "exec     exec /bin/sh",
    "lineage  /bin/sh:sh started /bin/busybox:httpd",
    "connect  tcp connect to 127.0.0.1:5432 (loopback) by /bin/busybox",
    "write    append /var/log/*.log",
    "",
    "unconfirmed (1): shown by too few containers to be learned",
    "KIND  SHOWN BY      ITEM",
    "exec  web-2@node-b  exec /tmp/x",
    "",
    "mode history (1)",
    "TIME                  FROM   TO       BY         REASON",
    "2023-11-14T22:13:50Z  learn  monitor  collector  learning ended: stable"]


@pytest.fixture(autouse=True)
def _environment(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "140")
    monkeypatch.setenv("LINES", "40")
    monkeypatch.delenv("DRIFTWARDEN_COLLECTOR", raising=False)
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")


@pytest.fixture
def api() -> Iterator[FakeOperatorApi]:
    with FakeOperatorApi() as server:
        yield server


def parse(*argv: str):
    return build_parser().parse_args(["baseline", *argv])


def run(api: FakeOperatorApi, *argv: str, out: io.StringIO | None = None
        ) -> tuple[int, list[str], list[str]]:
    """The collector form with --collector at the end: exit code, stdout and stderr lines."""
    out = out if out is not None else io.StringIO()
    err = io.StringIO()
    code = run_baseline(parse(*argv, "--collector", api.address), out=out, err=err)
    return code, out.getvalue().splitlines(), err.getvalue().splitlines()


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """The whole command line in this process: exit code (UsageError -> 2), stdout, stderr."""
    code = main(["baseline", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def baseline_file(path: Path, image_id: str = WEB, name: str = "shop/web:1.2") -> Path:
    """A baseline file as the agent exports it (msgpack of Profile.to_obj())."""
    profile = Profile(image_id=image_id, image_name=name, items=ItemSet(), created_at=T0)
    profile.observe([ExecItem("/bin/busybox", "httpd"), WriteItem("/var/log/*.log", "append"),
                     ConnectItem("inet", "loopback", "127.0.0.1", 5432, "tcp", "/bin/busybox")],
                    T0 + 1, LearningPolicy())
    path.write_bytes(msgpack.packb(profile.to_obj(), use_bin_type=True))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- list, show ----------------------------------------------------------------------------------


def test_list_plain_newest_change_first(api: FakeOperatorApi) -> None:
    api.baseline_answers["List"] = baselines_pb2.ListBaselinesResponse(baselines=[S_WEB, S_DB])
    assert run(api, "list") == (0, LIST_LINES, [])
    assert api.requests("Baselines.List") == [baselines_pb2.ListBaselinesRequest()]


def test_list_json_and_empty(api: FakeOperatorApi) -> None:
    api.baseline_answers["List"] = baselines_pb2.ListBaselinesResponse(baselines=[S_DB])
    code, out, _ = run(api, "list", "--json")
    assert code == 0
    assert [json.loads(line) for line in out] == [{
        "image_key": DB, "image_name": "shop/db:16", "mode": "learn", "version": 3, "items": 1,
        "unconfirmed": 0, "windows": 4, "containers": 1, "nodes": ["node-a"],
        "updated_at": float(T0), "learning_started_at": T0 - 600.0, "stable": True,
        "carried_from": None}]
    api.baseline_answers["List"] = baselines_pb2.ListBaselinesResponse()
    assert run(api, "list") == (0, [
        "no baselines on this collector yet: agents send what images do while they learn, or "
        "push a file with `driftwarden baseline push`"], [])
    assert run(api, "list", "--json") == (0, [], [])


def test_list_on_a_terminal_is_a_rich_table(api: FakeOperatorApi) -> None:
    api.baseline_answers["List"] = baselines_pb2.ListBaselinesResponse(baselines=[S_WEB, S_DB])
    terminal = FakeTerminal()
    assert run(api, "list", out=terminal)[0] == 0
    shown = [re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip()
             for line in terminal.getvalue().splitlines()]
    assert shown[0] == LIST_LINES[0]
    assert shown[2:] == LIST_LINES[1:]
    assert re.search(r"\x1b\[33m *1\x1b\[0m", terminal.getvalue())  # unconfirmed stand out


def test_show_plain(api: FakeOperatorApi) -> None:
    api.baseline_answers["Get"] = baselines_pb2.GetBaselineResponse(baseline=WEB_BASELINE)
    assert run(api, "show", "shop/web") == (0, SHOW_LINES, [])
    assert api.requests("Baselines.Get") == [baselines_pb2.GetBaselineRequest(image="shop/web")]


def test_show_a_learning_carried_over_baseline_with_nothing_yet(api: FakeOperatorApi) -> None:
    api.baseline_answers["Get"] = baselines_pb2.GetBaselineResponse(
        baseline=baselines_pb2.Baseline(summary=summary(
            WEB2, "", LEARN, 1, learning_started_at=wire.to_timestamp(T0), stable=True,
            carried_from=WEB)))
    code, out, _ = run(api, "show", "3c3c")
    assert code == 0
    assert out == [
        "image         -",
        f"key           {WEB2}",
        "mode          learn (learning since 2023-11-14T22:13:20Z, stable)",
        "version       1",
        "updated       -",
        "items         0 learned, 0 unconfirmed",
        "windows       0",
        "containers    0 ran it while it learned",
        "nodes         -",
        f"carried from  {WEB}",
        "",
        "items: none",
        "",
        "unconfirmed: none",
        "",
        "mode history: none"]


def test_show_json(api: FakeOperatorApi) -> None:
    api.baseline_answers["Get"] = baselines_pb2.GetBaselineResponse(baseline=WEB_BASELINE)
    code, out, _ = run(api, "show", WEB, "--json")
    assert code == 0 and len(out) == 1
    shown = json.loads(out[0])
    assert shown["summary"]["image_key"] == WEB and shown["summary"]["nodes"] == [
        "node-a", "node-b"]
    assert [(i["kind"], i["text"]) for i in shown["items"]] == [
        ("exec", "exec /bin/busybox as httpd"), ("exec", "exec /bin/sh"),
        ("lineage", "/bin/sh:sh started /bin/busybox:httpd"),
        ("connect", "tcp connect to 127.0.0.1:5432 (loopback) by /bin/busybox"),
        ("write", "append /var/log/*.log")]
    # a key as a NOVEL alert's item_key carries it: the port a number
    assert shown["items"][3]["key"] == ["inet", "loopback", "127.0.0.1", 5432, "tcp",
                                        "/bin/busybox"]
    assert shown["unconfirmed"] == [{
        "kind": "exec", "key": ["/tmp/x", "x"], "text": "exec /tmp/x",
        "containers": [{"container_id": "c" * 64, "node": "node-b", "name": "web-2"}]}]
    assert shown["history"] == [{"changed_at": T0 + 30.0, "from": "learn", "to": "monitor",
                                 "reason": "learning ended: stable", "by": "collector"}]
    assert shown["layers"] == ["sha256:l1", "sha256:l2"]


def test_show_on_a_terminal(api: FakeOperatorApi, monkeypatch) -> None:
    monkeypatch.setenv("NO_COLOR", "1")
    api.baseline_answers["Get"] = baselines_pb2.GetBaselineResponse(baseline=WEB_BASELINE)
    terminal = FakeTerminal()
    assert run(api, "show", "shop/web", out=terminal)[0] == 0
    shown = [re.sub(r"\x1b\[[0-9;]*m", "", line).rstrip()
             for line in terminal.getvalue().splitlines()]
    assert shown[:12] == SHOW_LINES[:12]
    assert shown[12:15] == ["KIND     ITEM", "─" * 65, "exec     exec /bin/busybox as httpd"]
    assert "unconfirmed (1): shown by too few containers to be learned" in shown


def test_texts_from_the_collector_cannot_drive_the_terminal(api: FakeOperatorApi) -> None:
    evil = "web\x1b[2J\nnode-z  forged"
    api.baseline_answers["List"] = baselines_pb2.ListBaselinesResponse(
        baselines=[summary(WEB, evil, MONITOR, 1, nodes=["n\x07"])])
    code, out, _ = run(api, "list")
    assert code == 0
    assert out[1] == ("web?[2J?node-z  forged  sha256:1a1a1a1a1a1a  monitor        1      0       "
                      "     0        0  -        n?")
    api.baseline_answers["Get"] = baselines_pb2.GetBaselineResponse(baseline=baselines_pb2.Baseline(
        summary=summary(WEB, "ok", MONITOR, 1),
        unconfirmed=[baselines_pb2.ItemEvidence(
            item=item("exec", "/tmp/\x1b]0;x", "x"),
            containers=[baselines_pb2.ContainerRef(container_id="c" * 64, node="b",
                                                   name="a\rb")])]))
    code, out, _ = run(api, "show", "ok")
    assert "exec  a?b@b     exec /tmp/?]0;x as x" in out
    assert not any("\x1b" in line or "\r" in line for line in out)


# -- mode, reset, accept -------------------------------------------------------------------------


def test_mode_sends_image_mode_and_reason(api: FakeOperatorApi) -> None:
    api.baseline_answers["SetMode"] = baselines_pb2.SetBaselineModeResponse(
        baseline=summary(WEB, "shop/web:1.2", PROTECT, 13))
    assert run(api, "mode", "shop/web:1.2", "protect", "--reason", "reviewed") == (
        0, ["shop/web:1.2 (sha256:1a1a1a1a1a1a): mode protect, version 13"], [])
    assert api.requests("Baselines.SetMode") == [baselines_pb2.SetBaselineModeRequest(
        image="shop/web:1.2", mode=PROTECT, reason="reviewed")]
    code, out, _ = run(api, "mode", "shop/web@" + WEB, "protect", "--reason", "x", "--json")
    assert code == 0 and json.loads(out[0])["mode"] == "protect"
    assert api.requests("Baselines.SetMode")[-1].image == WEB  # name@digest: the digest


@pytest.mark.parametrize("argv", [["mode", "shop/web", "protect"],
                                  ["mode", "shop/web", "monitor", "--reason", "  "],
                                  ["reset", "shop/web"]])
def test_mode_and_reset_need_a_reason(api: FakeOperatorApi, capsys, argv: list[str]) -> None:
    code, out, err = cli(capsys, *argv, "--collector", api.address)
    assert (code, out) == (2, "")
    assert err == (f"driftwarden: error: baseline {argv[0]} needs --reason TEXT: why, for the "
                   f"audit trail and the baseline's mode history (it reaches every agent that "
                   f"runs the image)\n")
    assert api.calls == []  # refused before any call


def test_an_unknown_image_is_a_clear_error(api: FakeOperatorApi, capsys) -> None:
    api.errors["Baselines.SetMode"] = (grpc.StatusCode.NOT_FOUND, "no baseline matches 'nginx'")
    code, out, err = cli(capsys, "mode", "nginx", "monitor", "--reason", "x",
                         "--collector", api.address)
    assert (code, out) == (2, "")
    assert err == (f"driftwarden: error: the collector at {api.address}: no baseline matches "
                   f"'nginx'\n")
    api.errors["Baselines.SetMode"] = (grpc.StatusCode.NOT_FOUND, "")
    code, out, err = cli(capsys, "mode", "nginx", "monitor", "--reason", "x",
                         "--collector", api.address)
    assert (code, out) == (2, "")
    assert err == (f"driftwarden: error: no baseline for image 'nginx' on the collector at "
                   f"{api.address}: `driftwarden baseline list --collector ADDR` shows the "
                   f"images it holds baselines for\n")


def test_an_ambiguous_or_refused_image_is_the_collectors_word(api: FakeOperatorApi) -> None:
    api.errors["Baselines.Get"] = (grpc.StatusCode.INVALID_ARGUMENT,
                                   "'shop/web' matches 2 baselines\x1b[31m; give the key")
    assert run(api, "show", "shop/web") == (2, [], [
        "driftwarden: error: the collector refused the request ('shop/web' matches 2 "
        "baselines?[31m; give the key)"])


def test_reset(api: FakeOperatorApi) -> None:
    api.baseline_answers["Reset"] = baselines_pb2.ResetBaselineResponse(
        baseline=summary(DB, "shop/db:16", LEARN, 4))
    assert run(api, "reset", "shop/db", "--reason", "schema migration") == (0, [
        "shop/db:16 (sha256:2b2b2b2b2b2b): reset, it learns again (mode learn, version 4)"], [])
    assert api.requests("Baselines.Reset") == [baselines_pb2.ResetBaselineRequest(
        image="shop/db", reason="schema migration")]


def test_accept(api: FakeOperatorApi) -> None:
    alert_id = "291f438a24e6d0f03d2b0b1d"
    api.baseline_answers["Accept"] = baselines_pb2.AcceptAlertResponse(
        baseline=summary(WEB, "shop/web:1.2", MONITOR, 14),
        added=[item("lineage", "/bin/sh:sh", "/tmp/x:x"), item("exec", "/tmp/x", "x")])
    assert run(api, "accept", alert_id, "--reason", "the nightly job") == (0, [
        f"accepted alert {alert_id} into shop/web:1.2 (sha256:1a1a1a1a1a1a), version 14:",
        "  exec /tmp/x",
        "  /bin/sh:sh started /tmp/x:x"], [])
    assert api.requests("Baselines.Accept") == [baselines_pb2.AcceptAlertRequest(
        alert_id=alert_id, reason="the nightly job")]
    out = run(api, "accept", alert_id, "--json")[1]
    assert json.loads(out[0])["added"] == [
        {"kind": "exec", "key": ["/tmp/x", "x"], "text": "exec /tmp/x"},
        {"kind": "lineage", "key": ["/bin/sh:sh", "/tmp/x:x"],
         "text": "/bin/sh:sh started /tmp/x:x"}]
    api.baseline_answers["Accept"] = baselines_pb2.AcceptAlertResponse(
        baseline=summary(WEB, "shop/web:1.2", MONITOR, 14))
    assert run(api, "accept", alert_id)[1] == [
        f"alert {alert_id}: shop/web:1.2 (sha256:1a1a1a1a1a1a) already has its behaviour "
        f"(version 14)"]


def test_accept_errors(api: FakeOperatorApi) -> None:
    api.errors["Baselines.Accept"] = (grpc.StatusCode.NOT_FOUND, "")
    assert run(api, "accept", "0" * 24) == (2, [], [
        f"driftwarden: error: no alert '{'0' * 24}' on the collector at {api.address}: "
        f"`driftwarden alerts --kind novel` lists the stored NOVEL alerts"])
    api.errors["Baselines.Accept"] = (grpc.StatusCode.FAILED_PRECONDITION,
                                      "a drift alert cannot be accepted: the fix is a new image")
    assert run(api, "accept", "1" * 24) == (1, [], [
        f"driftwarden: error: the collector at {api.address} cannot do that (a drift alert "
        f"cannot be accepted: the fix is a new image)"])


# -- diff ----------------------------------------------------------------------------------------


def test_diff_both_ways(api: FakeOperatorApi) -> None:
    api.baseline_answers["Diff"] = baselines_pb2.DiffBaselinesResponse(
        a=S_WEB2, b=S_WEB, only_in_a=[item("exec", "/usr/bin/new", "new")],
        only_in_b=[item("write", "/tmp/cache", "create"), item("exec", "/bin/old", "old")])
    assert run(api, "diff", "shop/web:1.3", "shop/web:1.2") == (0, [
        "A = shop/web:1.3 (sha256:3c3c3c3c3c3c), version 2: 1 items B never had",
        "B = shop/web:1.2 (sha256:1a1a1a1a1a1a), version 12: 2 items A never had",
        "ONLY IN  KIND   ITEM",
        "A        exec   exec /usr/bin/new",
        "B        exec   exec /bin/old",
        "B        write  create /tmp/cache"], [])
    assert api.requests("Baselines.Diff") == [baselines_pb2.DiffBaselinesRequest(
        a="shop/web:1.3", b="shop/web:1.2")]
    out = run(api, "diff", "3c3c", "1a1a", "--json")[1]
    diff = json.loads(out[0])
    assert (diff["a"]["image_key"], diff["b"]["image_key"]) == (WEB2, WEB)
    assert diff["a"]["carried_from"] == WEB
    assert [i["text"] for i in diff["only_in_a"]] == ["exec /usr/bin/new"]
    assert [i["text"] for i in diff["only_in_b"]] == ["exec /bin/old", "create /tmp/cache"]


def test_diff_of_the_same_items(api: FakeOperatorApi) -> None:
    api.baseline_answers["Diff"] = baselines_pb2.DiffBaselinesResponse(a=S_WEB2, b=S_WEB)
    assert run(api, "diff", "a", "b")[1] == [
        "shop/web:1.3 (sha256:3c3c3c3c3c3c) and shop/web:1.2 (sha256:1a1a1a1a1a1a) have the "
        "same items"]


def test_diff_of_an_unknown_image(api: FakeOperatorApi) -> None:
    api.errors["Baselines.Diff"] = (grpc.StatusCode.NOT_FOUND, "")
    assert run(api, "diff", "x", "shop/web") == (2, [], [
        f"driftwarden: error: no baseline for image 'x' or 'shop/web' on the collector at "
        f"{api.address}: `driftwarden baseline list --collector ADDR` shows the images it holds "
        f"baselines for"])


# -- export, push --------------------------------------------------------------------------------


def test_export_writes_the_file(api: FakeOperatorApi, tmp_path: Path) -> None:
    data = baseline_file(tmp_path / "source").read_bytes()
    api.baseline_answers["Export"] = baselines_pb2.ExportBaselineResponse(file=data)
    dest = tmp_path / "web.baseline"
    assert run(api, "export", "shop/web", str(dest)) == (0, [
        f"wrote the baseline of shop/web:1.2 (sha256:1a1a1a1a1a1a) to {dest} "
        f"({len(data)} bytes)"], [])
    assert dest.read_bytes() == data
    assert api.requests("Baselines.Export") == [baselines_pb2.ExportBaselineRequest(
        image="shop/web")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "web.baseline"]  # no temp
    out = run(api, "export", "shop/web", str(dest), "--json")[1]
    assert json.loads(out[0]) == {"file": str(dest), "bytes": len(data), "image_key": WEB,
                                  "image_name": "shop/web:1.2"}


def test_export_refuses_what_is_not_a_baseline(api: FakeOperatorApi, tmp_path: Path) -> None:
    api.baseline_answers["Export"] = baselines_pb2.ExportBaselineResponse(file=b"\xc1garbage")
    dest = tmp_path / "web.baseline"
    code, out, err = run(api, "export", "shop/web", str(dest))
    assert (code, out) == (1, [])
    assert err[0].startswith("driftwarden: error: the collector sent a file that is not a "
                             "baseline file")
    assert err[0].endswith(f"; nothing written to {dest}")
    assert not dest.exists() and list(tmp_path.iterdir()) == []


def test_export_into_a_missing_directory(api: FakeOperatorApi, capsys, tmp_path: Path) -> None:
    code, _, err = cli(capsys, "export", "shop/web", str(tmp_path / "no" / "f"),
                       "--collector", api.address)
    assert code == 2
    assert err == (f"driftwarden: error: cannot write {tmp_path / 'no' / 'f'}: no directory "
                   f"{tmp_path / 'no'}\n")
    assert api.calls == []


def test_push_sends_the_file_for_its_image(api: FakeOperatorApi, tmp_path: Path) -> None:
    path = baseline_file(tmp_path / "web.baseline")
    api.baseline_answers["Push"] = baselines_pb2.PushBaselineResponse(
        baseline=summary(WEB, "shop/web:1.2", MONITOR, 1, items=3))
    assert run(api, "push", str(path)) == (0, [
        f"shop/web:1.2 (sha256:1a1a1a1a1a1a): pushed from {path} (mode monitor, version 1, 3 "
        f"items)"], [])
    assert api.requests("Baselines.Push") == [baselines_pb2.PushBaselineRequest(
        file=path.read_bytes(), image_key=WEB, mode=common_pb2.MODE_UNSPECIFIED, reason="")]
    assert run(api, "push", str(path), "--image", WEB, "--mode", "protect", "--reason", "ci",
               "--json")[0] == 0
    assert api.requests("Baselines.Push")[-1] == baselines_pb2.PushBaselineRequest(
        file=path.read_bytes(), image_key=WEB, mode=PROTECT, reason="ci")


def test_push_bad_files_are_refused_before_any_call(api: FakeOperatorApi, capsys,
                                                    tmp_path: Path) -> None:
    good = baseline_file(tmp_path / "web.baseline")
    (tmp_path / "garbage").write_bytes(b"\xc1\xc1 not msgpack")
    (tmp_path / "list.msgpack").write_bytes(msgpack.packb([1, 2, 3]))
    (tmp_path / "empty").write_bytes(b"")
    cases = [
        ([str(tmp_path / "missing")],
         f"cannot read {tmp_path / 'missing'} (No such file or directory)"),
        ([str(tmp_path)], f"cannot read {tmp_path} (Is a directory)"),
        ([str(tmp_path / "garbage")], f"{tmp_path / 'garbage'}: not a baseline file: corrupt "
         f"or truncated msgpack ("),
        ([str(tmp_path / "empty")], f"{tmp_path / 'empty'}: not a baseline file: corrupt or "
         f"truncated msgpack ("),
        ([str(tmp_path / "list.msgpack")], f"{tmp_path / 'list.msgpack'}: not a baseline file "
         f"(its top level is not a map); push a file `driftwarden baseline export` or "
         f"`driftwarden learn` wrote"),
        ([str(good), "--image", DB], f"{good} is the baseline of image {WEB} (shop/web:1.2), "
         f"not {DB}; push the file learned for that image"),
    ]
    for argv, message in cases:
        code, out, err = cli(capsys, "push", *argv, "--collector", api.address)
        assert (code, out) == (2, ""), argv
        assert err.startswith(f"driftwarden: error: {message}"), (argv, err)
        assert err.count("\n") == 1
    assert api.calls == []


def test_push_refused_by_the_collector(api: FakeOperatorApi, tmp_path: Path) -> None:
    path = baseline_file(tmp_path / "web.baseline")
    api.errors["Baselines.Push"] = (grpc.StatusCode.INVALID_ARGUMENT,
                                    f"the file is a baseline of {WEB}, not {DB}")
    assert run(api, "push", str(path)) == (2, [], [
        f"driftwarden: error: the collector refused the request (the file is a baseline of "
        f"{WEB}, not {DB})"])


# -- the two forms -------------------------------------------------------------------------------


def test_the_collector_flags_go_before_or_after_the_operation(api: FakeOperatorApi,
                                                              capsys) -> None:
    api.baseline_answers["List"] = baselines_pb2.ListBaselinesResponse(baselines=[S_WEB, S_DB])
    for argv in (["--collector", api.address, "list"], ["list", "--collector", api.address],
                 ["--plain", "--collector", api.address, "list"]):
        code, out, err = cli(capsys, *argv)
        assert (code, out.splitlines(), err) == (0, LIST_LINES, ""), argv
    code, out, _ = cli(capsys, "--json", "list", "--collector", api.address)
    assert [json.loads(line)["image_key"] for line in out.splitlines()] == [WEB, DB]


def test_the_environment_names_the_collector(api: FakeOperatorApi, capsys, monkeypatch,
                                             tmp_path: Path) -> None:
    api.baseline_answers["List"] = baselines_pb2.ListBaselinesResponse(baselines=[S_WEB, S_DB])
    monkeypatch.setenv("DRIFTWARDEN_COLLECTOR", api.address)
    assert cli(capsys, "list")[1].splitlines() == LIST_LINES
    # --state-dir wins over the variable: this host's baselines
    code, out, err = cli(capsys, "--state-dir", str(tmp_path), "list")
    assert (code, err) == (0, "")
    assert out.split() == ["IMAGE", "MODE", "VERSION", "ITEMS", "WINDOWS", "ID"]
    assert len(api.requests("Baselines.List")) == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["list"], "where are the baselines? give --state-dir DIR (this host's agent) or "
     "--collector ADDR (the fleet's, on the collector; or set $DRIFTWARDEN_COLLECTOR)"),
    (["list", "--state-dir", "{tmp}", "--collector", "127.0.0.1:1"],
     "give --state-dir DIR (this host's baselines) or --collector ADDR (the fleet's), not both"),
    (["import", "f", "--collector", "127.0.0.1:1"],
     "baseline import works on a --state-dir; on the collector use push FILE (the collector "
     "stores it for every node)"),
    (["--state-dir", "{tmp}", "push", "f"],
     "baseline push needs --collector ADDR; on a --state-dir use import FILE (into this node's "
     "state dir)"),
    (["--state-dir", "{tmp}", "list", "--token-file", "t", "--tls-ca", "ca"],
     "--token-file, --tls-ca only make(s) sense with --collector ADDR"),
])
def test_the_form_is_clear(capsys, tmp_path: Path, argv: list[str], message: str) -> None:
    code, out, err = cli(capsys, *(a.format(tmp=tmp_path) for a in argv))
    assert (code, out) == (2, "")
    assert err == f"driftwarden: error: {message}\n"


def test_bad_operands_are_usage_errors(api: FakeOperatorApi, capsys) -> None:
    code, _, err = cli(capsys, "show", " ", "--collector", api.address)
    assert code == 2
    assert err == ("driftwarden: error: IMAGE is empty: give an image key (sha256:<hex>), a "
                   "unique prefix of its hex, name[:tag] or name@sha256:<hex>\n")
    code, _, err = cli(capsys, "show", "shop/web@latest", "--collector", api.address)
    assert err == ("driftwarden: error: IMAGE 'shop/web@latest': after @ comes the image's "
                   "digest, sha256:...\n")
    with pytest.raises(SystemExit) as exited:
        main(["baseline", "mode", "shop/web", "enforce", "--collector", api.address])
    assert exited.value.code == 2
    assert "argument MODE: invalid choice: 'enforce'" in capsys.readouterr().err
    assert api.calls == []


def test_operator_credentials_reach_the_collector(api: FakeOperatorApi, tmp_path: Path) -> None:
    token = tmp_path / "operator.token"
    token.write_text("s3cret\n")
    api.baseline_answers["List"] = baselines_pb2.ListBaselinesResponse()
    assert run(api, "list", "--token-file", str(token))[0] == 0
    assert api.calls[0].metadata["authorization"] == "Bearer s3cret"


def test_an_unreachable_collector(capsys) -> None:
    address = f"127.0.0.1:{free_port()}"
    code, out, err = cli(capsys, "list", "--collector", address)
    assert (code, out) == (1, "")
    assert err == (f"driftwarden: error: collector not reachable at {address} — is `driftwarden "
                   f"collector` running? (if it runs with TLS, pass --tls-ca, --tls-cert and "
                   f"--tls-key)\n")


def test_a_collector_without_the_baselines_service(api: FakeOperatorApi) -> None:
    api.errors["Baselines.List"] = (grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
    assert run(api, "list") == (1, [], [
        f"driftwarden: error: the collector at {api.address} does not serve this call (Method "
        f"not found!): is it another driftwarden version?"])


# -- agents: the baselines each node holds -------------------------------------------------------


def _held(key: str, version: int, mode: int) -> baselines_pb2.BaselineVersion:
    return baselines_pb2.BaselineVersion(image_key=key, version=version, mode=mode)


NODES = [
    agent_pb2.Agent(node="node-b", connected=True,
                    baselines=[_held(WEB, 11, MONITOR), _held(WEB2, 2, LEARN)]),
    agent_pb2.Agent(node="node-a", connected=True,
                    baselines=[_held(WEB, 12, MONITOR), _held("sha256:" + "9" * 64, 1, LEARN)]),
    agent_pb2.Agent(node="node-c"),
]


def test_agents_baselines(api: FakeOperatorApi) -> None:
    api.agents = NODES
    api.baseline_answers["List"] = baselines_pb2.ListBaselinesResponse(
        baselines=[S_WEB, S_WEB2])
    out = io.StringIO()
    args = build_parser().parse_args(["agents", "--baselines", "--collector", api.address])
    assert run_agents(args, out=out) == 0
    assert out.getvalue().splitlines() == [
        "NODE    KEY                  MODE     VERSION  FLEET  IMAGE",
        "node-a  sha256:999999999999  learn          1      -  -",
        "node-a  sha256:1a1a1a1a1a1a  monitor       12     12  shop/web:1.2",
        "node-b  sha256:1a1a1a1a1a1a  monitor       11     12  shop/web:1.2",
        "node-b  sha256:3c3c3c3c3c3c  learn          2      2  shop/web:1.3"]
    out = io.StringIO()
    args = build_parser().parse_args(["agents", "--baselines", "--json",
                                      "--collector", api.address])
    assert run_agents(args, out=out) == 0
    assert json.loads(out.getvalue().splitlines()[2]) == {
        "node": "node-b", "image_key": WEB, "image_name": "shop/web:1.2", "mode": "monitor",
        "version": 11, "fleet_version": 12}
    terminal = FakeTerminal()
    args = build_parser().parse_args(["agents", "--baselines", "--collector", api.address])
    assert run_agents(args, out=terminal) == 0
    assert re.search(r"\x1b\[33m *11\x1b\[0m", terminal.getvalue())  # node-b lags behind


def test_agents_baselines_when_none_is_held(api: FakeOperatorApi) -> None:
    api.agents = NODES[2:]
    out = io.StringIO()
    args = build_parser().parse_args(["agents", "--baselines", "--collector", api.address])
    assert run_agents(args, out=out) == 0
    assert out.getvalue() == "no agent holds a fleet baseline\n"
