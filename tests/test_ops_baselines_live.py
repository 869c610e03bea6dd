"""`driftwarden baseline ... --collector` and `agents --baselines` as an operator runs them
(separate processes) against a real collector process with an operator token: a file the local
form exported is pushed, listed, shown, tuned, diffed, exported back into a node's state dir and
reset; bad input is refused with nothing stored; an agent's held versions show beside the
fleet's. No root or Docker needed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from driftwarden.core import wire
from driftwarden.models.items import ConnectItem, ExecItem, ItemSet, LineageItem, WriteItem
from driftwarden.models.profile import LearningPolicy, Profile, ProfileStore
from driftwarden.proto.v1 import agent_pb2, baselines_pb2, common_pb2

from tests.support.collector_proc import CollectorProcess
from tests.support.fake_agent import FakeAgent, container_id, heartbeat

WEB = "sha256:" + "1a" * 32
DB = "sha256:" + "2b" * 32
T0 = 1_700_000_000.0
TOKEN = "op-token-123"
WEB_ITEMS = [ExecItem("/bin/busybox", "httpd"), WriteItem("/var/log/*.log", "append"),
             ConnectItem("inet", "loopback", "127.0.0.1", 5432, "tcp", "/bin/busybox"),
             LineageItem("/bin/sh:sh", "/bin/busybox:httpd")]
DB_ITEMS = [ExecItem("/usr/bin/postgres", "postgres"), WriteItem("/var/log/*.log", "append")]


def exported(state_dir: Path, image_id: str, name: str, items: list, dest: Path) -> Path:
    """A baseline learned on one host and exported with the local form, as CI would."""
    store = ProfileStore(state_dir, ItemSet)
    profile = Profile(image_id=image_id, image_name=name, items=ItemSet(), created_at=T0)
    profile.observe(items, T0 + 1, LearningPolicy())
    store.save(profile)
    local = subprocess.run([sys.executable, "-m", "driftwarden", "baseline", "--state-dir",
                            str(state_dir), "export", image_id, str(dest)],
                           capture_output=True, text=True, timeout=60)
    assert local.returncode == 0, local.stderr
    return dest


@pytest.fixture(scope="module")
def collector(tmp_path_factory) -> Iterator[CollectorProcess]:
    tmp = tmp_path_factory.mktemp("collector")
    (tmp / "token").write_text(TOKEN + "\n")
    with CollectorProcess(tmp / "c.db", tmp / "collector.log",
                          ["--token-file", str(tmp / "token")]) as process:
        yield process


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("files")
    (tmp / "token").write_text(TOKEN)
    (tmp / "wrong-token").write_text("nope")
    return {"token": tmp / "token", "wrong-token": tmp / "wrong-token",
            "web": exported(tmp / "ci-web", WEB, "shop/web:1.2", WEB_ITEMS, tmp / "web.baseline"),
            "db": exported(tmp / "ci-db", DB, "shop/db:16", DB_ITEMS, tmp / "db.baseline"),
            "dir": tmp}


def dw(collector: CollectorProcess, files: dict[str, Path], *argv: str,
       token: str = "token") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "driftwarden", *argv, "--collector",
                           collector.address, "--token-file", str(files[token])],
                          capture_output=True, text=True, timeout=60)


def shown(collector, files, image: str) -> dict:
    result = dw(collector, files, "baseline", "show", image, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_fleet_baseline_life_cycle(collector, files, tmp_path) -> None:
    pushed = dw(collector, files, "baseline", "push", str(files["web"]), "--image", WEB,
                "--reason", "learned in CI")
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.startswith(f"shop/web:1.2 (sha256:1a1a1a1a1a1a): pushed from "
                                    f"{files['web']} (mode monitor, version ")
    assert pushed.stdout.endswith(", 4 items)\n")
    assert dw(collector, files, "baseline", "push", str(files["db"]),
              "--mode", "learn").returncode == 0

    listing = dw(collector, files, "baseline", "list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["IMAGE", "KEY", "MODE", "VERSION", "ITEMS", "UNCONFIRMED",
                                "WINDOWS", "UPDATED", "NODES"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert sorted(rows) == ["shop/db:16", "shop/web:1.2"]
    assert rows["shop/web:1.2"][1:3] == ["sha256:1a1a1a1a1a1a", "monitor"]
    assert rows["shop/web:1.2"][4:7] == ["4", "0", "0"]
    assert rows["shop/db:16"][1:3] == ["sha256:2b2b2b2b2b2b", "learn"]

    # the collector form words items as the local form does
    local = subprocess.run([sys.executable, "-m", "driftwarden", "baseline", "--state-dir",
                            str(files["dir"] / "ci-web"), "show", WEB],
                           capture_output=True, text=True, timeout=60)
    by_kind = json.loads(local.stdout)["items_by_kind"]
    web = shown(collector, files, "shop/web:1.2")
    assert sorted(i["text"] for i in web["items"]) == sorted(t for texts in by_kind.values()
                                                            for t in texts)
    assert {"kind": "connect", "key": ["inet", "loopback", "127.0.0.1", 5432, "tcp",
                                       "/bin/busybox"],
            "text": "tcp connect to 127.0.0.1:5432 (loopback) by /bin/busybox"} in web["items"]
    assert web["summary"]["mode"] == "monitor" and web["unconfirmed"] == []

    version = web["summary"]["version"]
    mode = dw(collector, files, "baseline", "mode", "1a1a", "protect", "--reason", "reviewed")
    assert mode.returncode == 0, mode.stderr
    assert mode.stdout == (f"shop/web:1.2 (sha256:1a1a1a1a1a1a): mode protect, version "
                           f"{version + 1}\n")
    web = shown(collector, files, WEB)
    assert web["history"][-1]["from"] == "monitor"
    assert (web["history"][-1]["to"], web["history"][-1]["reason"]) == ("protect", "reviewed")

    diff = dw(collector, files, "baseline", "diff", "shop/web@" + WEB, "shop/db:16", "--json")
    assert diff.returncode == 0, diff.stderr
    result = json.loads(diff.stdout)
    assert [i["text"] for i in result["only_in_a"]] == [
        "exec /bin/busybox as httpd", "/bin/sh:sh started /bin/busybox:httpd",
        "tcp connect to 127.0.0.1:5432 (loopback) by /bin/busybox"]
    assert [i["text"] for i in result["only_in_b"]] == ["exec /usr/bin/postgres"]

    # export from the fleet, import on a host without a collector: the same items
    dest = tmp_path / "fleet-web.baseline"
    export = dw(collector, files, "baseline", "export", "shop/web:1.2", str(dest))
    assert export.returncode == 0, export.stderr
    imported = subprocess.run([sys.executable, "-m", "driftwarden", "baseline", "--state-dir",
                               str(tmp_path / "node"), "import", str(dest)],
                              capture_output=True, text=True, timeout=60)
    assert imported.returncode == 0, imported.stderr
    profile = ProfileStore(tmp_path / "node", ItemSet).load(WEB)
    assert sorted(i.describe() for i in profile.items) == sorted(i.describe() for i in WEB_ITEMS)

    reset = dw(collector, files, "baseline", "reset", "shop/web:1.2", "--reason", "new release")
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout.startswith("shop/web:1.2 (sha256:1a1a1a1a1a1a): reset, it learns again "
                                   "(mode learn, version ")
    web = shown(collector, files, WEB)
    assert (web["summary"]["mode"], web["items"]) == ("learn", [])


def test_bad_input_is_refused_and_nothing_is_stored(collector, files, tmp_path) -> None:
    before = dw(collector, files, "baseline", "list", "--json").stdout
    garbage = tmp_path / "garbage.baseline"
    garbage.write_bytes(b"\x92\x01\x02")  # msgpack, but a list
    cases = [
        (["baseline", "push", str(files["db"]), "--image", WEB], 2,
         f"driftwarden: error: {files['db']} is the baseline of image {DB} (shop/db:16), not "
         f"{WEB}; push the file learned for that image\n"),
        (["baseline", "push", str(garbage)], 2,
         f"driftwarden: error: {garbage}: not a baseline file (its top level is not a map); "
         f"push a file `driftwarden baseline export` or `driftwarden learn` wrote\n"),
        (["baseline", "mode", "shop/web:1.2", "monitor"], 2,
         "driftwarden: error: baseline mode needs --reason TEXT: why, for the audit trail and "
         "the baseline's mode history (it reaches every agent that runs the image)\n"),
        (["baseline", "accept", "zz"], 2,
         "driftwarden: error: the collector refused the request "
         "(accept_alert_request.alert_id: must be 24 lowercase hex characters, got 'zz')\n"),
    ]
    for argv, code, err in cases:
        result = dw(collector, files, *argv)
        assert (result.returncode, result.stdout, result.stderr) == (code, "", err), argv
    unknown = dw(collector, files, "baseline", "mode", "nginx", "protect", "--reason", "x")
    assert (unknown.returncode, unknown.stdout) == (2, "")
    assert unknown.stderr.startswith(f"driftwarden: error: the collector at {collector.address}: "
                                     f"no baseline matches image 'nginx'")
    assert unknown.stderr.count("\n") == 1
    refused = dw(collector, files, "baseline", "list", token="wrong-token")
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"driftwarden: error: the collector at {collector.address} "
                                     f"refused our credentials")
    assert dw(collector, files, "baseline", "list", "--json").stdout == before


def test_agents_show_the_versions_they_hold(collector, files) -> None:
    assert dw(collector, files, "baseline", "push", str(files["db"]), "--mode",
              "monitor").returncode == 0
    fleet = shown(collector, files, DB)["summary"]["version"]
    with grpc.insecure_channel(collector.address) as channel:
        agent = FakeAgent(channel)
        agent.send(hello=agent_pb2.Hello(
            node="node-x", agent_version="0.1.0", mode=common_pb2.MODE_MONITOR,
            hostname="x", started_at=wire.to_timestamp(T0),
            baselines=[baselines_pb2.BaselineVersion(image_key=DB, version=1,
                                                     mode=common_pb2.MODE_LEARN)]))
        agent.send(heartbeat=heartbeat([(container_id("db-1"), "db-1", DB)]))
        update = agent.recv()  # the node held version 1: the collector sends the fleet's
        while update.WhichOneof("body") != "baseline":
            update = agent.recv()
        assert (update.baseline.image_key, update.baseline.baseline.summary.version) == (
            DB, fleet)
        result = dw(collector, files, "agents", "--baselines")
        as_json = dw(collector, files, "agents", "--baselines", "--json")
        agent.cancel()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "NODE    KEY                  MODE     VERSION  FLEET  IMAGE",
        f"node-x  sha256:2b2b2b2b2b2b  monitor  {fleet:>7}  {fleet:>5}  shop/db:16"]
    assert json.loads(as_json.stdout) == {"node": "node-x", "image_key": DB,
                                          "image_name": "shop/db:16", "mode": "monitor",
                                          "version": fleet, "fleet_version": fleet}
