"""`driftwarden baseline`: on the files when no agent runs, and through a running agent's
control socket (the change lands in its live profiles)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest
from driftwarden.agent.control import SOCKET_NAME, BaselineService, ControlServer, LiveProfiles
from driftwarden.agent.detect import Detector, DetectorConfig
from driftwarden.core.modes import Mode
from driftwarden.core.records import Program
from driftwarden.models.items import ConnectItem, ExecItem, ItemSet, WriteItem
from driftwarden.models.profile import LearningPolicy, Profile, ProfileStore

WEB = "sha256:" + "1a" * 32
DB = "sha256:" + "2b" * 32
T0 = 1_700_000_000.0


def cli(state_dir, *args: str, env: dict | None = None, cwd=None):
    return subprocess.run([sys.executable, "-m", "driftwarden", "baseline", "--state-dir",
                           str(state_dir), *args], capture_output=True, text=True, timeout=60,
                          env=env, cwd=cwd)


def seed(state_dir) -> ProfileStore:
    store = ProfileStore(state_dir, ItemSet)
    policy = LearningPolicy()
    web = Profile(image_id=WEB, image_name="shop/web:1.2", items=ItemSet(), created_at=T0)
    web.observe([ExecItem("/bin/busybox", "httpd"), WriteItem("/var/log/*.log", "append"),
                 ConnectItem("inet", "loopback", "127.0.0.1", 5432, "tcp", "/bin/busybox")],
                T0 + 1, policy)
    db = Profile(image_id=DB, image_name="shop/db:16", items=ItemSet(), created_at=T0)
    db.observe([ExecItem("/usr/bin/postgres", "postgres")], T0 + 1, policy)
    store.save(web)
    store.save(db)
    return store


def test_list_show_and_unknown_image_on_files(tmp_path):
    seed(tmp_path)
    listing = cli(tmp_path, "list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["IMAGE", "MODE", "VERSION", "ITEMS", "WINDOWS", "ID"]
    assert lines[1].split()[:4] == ["shop/db:16", "learn", "2", "1"]
    assert lines[2].split()[:4] == ["shop/web:1.2", "learn", "2", "3"]

    show = cli(tmp_path, "show", "shop/web")
    assert show.returncode == 0, show.stderr
    shown = json.loads(show.stdout)
    assert shown["items_by_kind"]["exec"] == ["exec /bin/busybox as httpd"]
    assert shown["items_by_kind"]["connect"] == [
        "tcp connect to 127.0.0.1:5432 (loopback) by /bin/busybox"]

    missing = cli(tmp_path, "show", "nginx")
    assert missing.returncode == 2
    assert missing.stderr.strip() == ("driftwarden: error: no baseline for image 'nginx' "
                                      "(known: shop/db:16, shop/web:1.2)")


def test_mode_reset_diff_export_import_on_files(tmp_path):
    store = seed(tmp_path / "a")
    assert cli(tmp_path / "a", "mode", "1a1a", "protect").returncode == 0
    assert store.load(WEB).mode is Mode.PROTECT
    assert store.load(WEB).history[-1]["to"] == "protect"

    diff = cli(tmp_path / "a", "diff", "shop/web:1.2", "shop/db:16")
    assert json.loads(diff.stdout) == {
        "connect": ["tcp connect to 127.0.0.1:5432 (loopback) by /bin/busybox"],
        "exec": ["exec /bin/busybox as httpd"],
        "write": ["append /var/log/*.log"],
    }

    exported = tmp_path / "web.baseline"
    assert cli(tmp_path / "a", "export", "shop/web", str(exported)).returncode == 0
    refused = cli(tmp_path / "b", "import", str(exported), "--image", DB)
    assert refused.returncode == 2 and "pass --force" in refused.stderr
    imported = cli(tmp_path / "b", "import", str(exported), "--image", WEB)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["mode"] == "monitor"  # exported in protect: not kept

    assert cli(tmp_path / "a", "reset", "shop/db").returncode == 0
    assert store.load(DB) is None


def exported_in_protect(tmp_path):
    store = seed(tmp_path / "ci")
    web = store.load(WEB)
    web.set_mode(Mode.PROTECT, reason="ci said so", who="ci", now=T0 + 10)
    store.save(web)
    return store.export(WEB, tmp_path / "web.baseline")


def test_import_starts_in_monitor_whatever_mode_the_file_was_exported_in(tmp_path):
    exported = exported_in_protect(tmp_path)
    env = dict(os.environ, USER="alice")
    env.pop("SUDO_USER", None)
    # a relative file name is the operator's, not the agent's working directory
    imported = cli(tmp_path / "node", "import", "web.baseline", env=env, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["mode"] == "monitor"
    stored = ProfileStore(tmp_path / "node", ItemSet).load(WEB)
    assert stored.mode is Mode.MONITOR
    assert [(h["from"], h["to"], h["by"]) for h in stored.history] == [
        ("learn", "protect", "ci"), ("protect", "monitor", "alice")]
    assert stored.history[-1]["reason"] == f"imported from {exported}"


@pytest.mark.parametrize(("mode", "history"), [
    ("protect", [("learn", "protect", "ci")]),  # already there: no change to record
    ("learn", [("learn", "protect", "ci"), ("protect", "learn", "bob")]),
])
def test_import_in_the_mode_the_operator_names(tmp_path, mode, history):
    exported = exported_in_protect(tmp_path)
    env = dict(os.environ, SUDO_USER="bob")
    imported = cli(tmp_path / "node", "import", str(exported), "--mode", mode, env=env)
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["mode"] == mode
    stored = ProfileStore(tmp_path / "node", ItemSet).load(WEB)
    assert stored.mode is Mode(mode)
    assert [(h["from"], h["to"], h["by"]) for h in stored.history] == history


def test_import_with_an_unknown_mode_is_a_usage_error(tmp_path):
    exported = exported_in_protect(tmp_path)
    result = cli(tmp_path / "node", "import", str(exported), "--mode", "enforce")
    assert result.returncode == 2
    assert "argument --mode: invalid choice: 'enforce'" in result.stderr
    assert ProfileStore(tmp_path / "node", ItemSet).load(WEB) is None


@pytest.fixture
def running_agent(tmp_path):
    """A Detector (no kernel needed) whose live profiles are served on the control socket."""
    store = seed(tmp_path)

    class NoAlerts:
        def emit(self, alert):
            raise AssertionError("no alerts expected")

    detector = Detector(DetectorConfig(), store, NoAlerts(), layers_of=lambda _c, _t: None)
    lock = threading.Lock()
    with ControlServer(BaselineService(LiveProfiles(detector), store), tmp_path, lock):
        yield detector, store


def test_mode_change_reaches_the_running_agent(running_agent, tmp_path):
    detector, store = running_agent
    result = cli(tmp_path, "mode", "shop/web", "monitor", "--reason", "rolled out v1.2")
    assert result.returncode == 0, result.stderr
    live = detector.profiles[WEB]
    assert live.mode is Mode.MONITOR  # in the agent's memory, not only on disk
    assert live.history[-1]["reason"] == "rolled out v1.2"
    assert store.load(WEB).mode is Mode.MONITOR


def test_an_agent_of_a_fleet_refuses_local_changes(tmp_path):
    """With --collector the fleet's baselines rule: a change here would be replaced by the
    collector's next version, so it is refused with the command that makes it there; reading
    works as ever."""
    store = seed(tmp_path)
    detector = Detector(DetectorConfig(), store, None, layers_of=lambda _c, _t: None)
    service = BaselineService(LiveProfiles(detector), store, fleet_collector="127.0.0.1:50051")
    with ControlServer(service, tmp_path, threading.Lock()):
        refused = cli(tmp_path, "mode", "shop/web", "protect", "--reason", "x")
        imported = cli(tmp_path, "import", str(exported_in_protect(tmp_path / "other")),
                       "--image", WEB)
        listed = cli(tmp_path, "list")
    assert (refused.returncode, refused.stderr.strip()) == (2, (
        "driftwarden: error: this agent follows the fleet's baselines on the collector "
        "127.0.0.1:50051, whose next version would replace a change made here: run "
        "`driftwarden baseline mode ... --collector 127.0.0.1:50051`"))
    assert imported.returncode == 2
    assert "run `driftwarden baseline push FILE --collector 127.0.0.1:50051`" in imported.stderr
    assert store.load(WEB).mode is Mode.LEARN
    assert listed.returncode == 0 and "shop/web" in listed.stdout


def test_import_through_the_running_agent_lands_in_its_live_profiles(running_agent, tmp_path):
    detector, store = running_agent
    exported = exported_in_protect(tmp_path / "elsewhere")
    result = cli(tmp_path, "import", str(exported), "--image", WEB)
    assert result.returncode == 0, result.stderr
    live = detector.profiles[WEB]
    assert live.mode is Mode.MONITOR
    assert live.history[-1]["reason"] == f"imported from {exported}"
    assert store.load(WEB).mode is Mode.MONITOR


def test_reset_through_the_running_agent_forgets_the_live_profile(running_agent, tmp_path):
    detector, store = running_agent
    assert cli(tmp_path, "show", "shop/web").returncode == 0
    assert WEB in detector.profiles  # asked for: now held live
    result = cli(tmp_path, "reset", "shop/web")
    assert result.returncode == 0, result.stderr
    assert WEB not in detector.profiles
    assert store.load(WEB) is None


def test_control_socket_rejects_bad_requests(running_agent, tmp_path):
    def ask(raw: bytes) -> dict:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(tmp_path / SOCKET_NAME))
            s.sendall(raw)
            return json.loads(s.makefile().readline())

    bad_json = ask(b"not json\n")
    assert bad_json["ok"] is False and bad_json["error"].startswith("request is not JSON")
    assert ask(b"[1, 2]\n") == {"ok": False, "error": "request must be a JSON object"}
    assert ask(b'{"op": "drop-tables"}\n') == {"ok": False,
                                              "error": "unknown operation 'drop-tables'"}
    assert ask(b'{"op": "show"}\n') == {"ok": False, "error": "missing argument 'image'"}
    assert (tmp_path / SOCKET_NAME).stat().st_mode & 0o777 == 0o600


def test_accept_a_novel_alert_through_the_running_agent(tmp_path):
    """A NOVEL alert's behaviour accepted by an operator is learned: it stays quiet after."""
    from driftwarden.agent.alerts import ListAlertSink

    from tests.test_alerts import WEB as VIEW
    from tests.test_alerts import exec_record

    store = ProfileStore(tmp_path, ItemSet)
    image_id = VIEW.image_id
    profile = Profile(image_id=image_id, image_name=VIEW.image, items=ItemSet(), created_at=T0)
    profile.set_mode(Mode.MONITOR, reason="test", who="test", now=T0)
    profile.starts_seen = True  # its image's start is known: a new container's is checked
    store.save(profile)
    sink = ListAlertSink()
    detector = Detector(DetectorConfig(), store, sink, layers_of=lambda _c, _t: None)
    started_by_sh = exec_record()._replace(parent_program=Program("/bin/sh", "sh"))
    detector.write(started_by_sh)  # a shell runs /tmp/x
    novel = [a for a in sink.alerts if a.kind.value == "novel"]
    assert {r.code for a in novel for r in a.reasons} == {"new-exec", "new-lineage"}
    exec_alert = next(a for a in novel if a.reasons[0].code == "new-exec")

    lock = threading.Lock()
    with ControlServer(BaselineService(LiveProfiles(detector), store), tmp_path, lock):
        accepted = cli(tmp_path, "accept", exec_alert.id)
        assert accepted.returncode == 0, accepted.stderr
        assert json.loads(accepted.stdout)["added"] == ["exec /tmp/x"]
        again = cli(tmp_path, "accept", "0" * 24)
        assert again.returncode == 2
        assert "no recent alert '000000000000000000000000' in this agent" in again.stderr

    before = len(sink.alerts)
    detector.write(started_by_sh)
    fresh = [a.reasons[0].code for a in sink.alerts[before:]]
    assert fresh == ["new-lineage"]  # the exec is learned; its lineage was not accepted
    assert store.load(image_id).history[-1]["reason"] == f"accepted alert {exec_alert.id}"


def test_accept_without_an_agent_says_what_to_do(tmp_path):
    seed(tmp_path)
    result = cli(tmp_path, "accept", "a" * 24)
    assert result.returncode == 2
    assert "accept needs the running agent" in result.stderr
