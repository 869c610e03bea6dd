"""Tests of the test support: offline images, dwstorm, and the container helper."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import images
from tests.support.containers import (
    NAME_PREFIX,
    RunningContainer,
    check_network,
    require_docker,
    run_container,
    unique_name,
)
from tests.support.host import cgroup2_root

integration = pytest.mark.integration

BUILDERS: list[tuple[Callable[[], str], str]] = [
    (images.busybox_image, images.BUSYBOX_PREFIX),
    (images.host_binaries_image, images.HOST_PREFIX),
    (images.debian_image, images.DEBIAN_PREFIX),
    (images.storm_image, images.STORM_PREFIX),
]


@pytest.fixture(scope="module")
def docker_ready() -> None:
    require_docker()


@pytest.fixture(scope="module")
def storm(docker_ready: None) -> Iterator[RunningContainer]:
    """One idle storm container shared by the dwstorm mode tests (exec is cheap, start is not)."""
    with run_container(images.storm_image(), ["sleep", "120"], name="storm") as c:
        yield c


def wait_until(ready: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def storm_json(output: str) -> dict[str, int | str]:
    """dwstorm's summary: the last line, which must be one JSON object."""
    return json.loads(output.strip().splitlines()[-1])


# ---- no Docker needed ------------------------------------------------------------------------


def test_network_rule_is_enforced_before_docker() -> None:
    for network in ("bridge", "container:abc", "dwnet"):
        with pytest.raises(ValueError, match="not allowed"):
            check_network(network, {})
    with pytest.raises(ValueError, match="network"):
        check_network("none", {"network_mode": "bridge"})
    with pytest.raises(ValueError), run_container("no-such-image", ["true"], network="bridge"):
        pass  # raising before create means nothing ever started


def test_unique_names() -> None:
    a, b = unique_name("x y/z"), unique_name("x y/z")
    assert a != b
    assert a.startswith(f"{NAME_PREFIX}x-y-z-")
    assert unique_name().startswith(f"{NAME_PREFIX}test_unique_names-")


def test_context_digest_tracks_content_and_mode(tmp_path: Path) -> None:
    f = tmp_path / "rootfs" / "bin" / "tool"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"a")
    first = images.context_digest(tmp_path)
    assert images.context_digest(tmp_path) == first
    f.write_bytes(b"b")
    second = images.context_digest(tmp_path)
    assert second != first
    f.chmod(0o700)
    assert images.context_digest(tmp_path) != second


# ---- images ----------------------------------------------------------------------------------


@integration
@pytest.mark.parametrize(("builder", "prefix"), BUILDERS, ids=lambda v: getattr(v, "__name__", v))
def test_image_builds_then_cache_hits(
    docker_ready: None,
    builder: Callable[[], str],
    prefix: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tag = builder()
    assert tag.startswith(f"{prefix}:")

    def no_build(*_a: object, **_k: object) -> None:
        raise AssertionError("second call rebuilt the image")

    monkeypatch.setattr(images, "_build", no_build)
    start = time.monotonic()
    assert builder() == tag
    assert time.monotonic() - start < 2.0


@integration
def test_build_error_names_the_step(docker_ready: None, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text("FROM scratch\nCOPY missing-file /x\n")
    client = require_docker()
    with pytest.raises(images.ImageBuildError, match="docker build dw-broken:0 failed"):
        images._build(client, tmp_path, "dw-broken:0")


@integration
def test_busybox_image_runs_shell(docker_ready: None) -> None:
    script = "echo hi > /tmp/x && cat /tmp/x && stat -c %a /tmp && cat /etc/passwd"
    with run_container(images.busybox_image(), ["sh", "-c", script], detach=False) as c:
        assert c.wait(10) == 0
        lines = c.logs().splitlines()
    assert lines[:2] == ["hi", "1777"]
    assert lines[2].startswith("root:x:0:0:")


@integration
def test_host_image_runs_real_binaries(docker_ready: None) -> None:
    cmd = ["/bin/sh", "-c", "/bin/cat /etc/passwd; /bin/ls /bin"]
    with run_container(images.host_binaries_image(), cmd, detach=False) as c:
        assert c.wait(10) == 0
        out = c.logs()
    assert "root:x:0:0:" in out
    assert "busybox" not in out  # really the host's dash/coreutils, not applets


@integration
def test_host_image_bash_dev_tcp_to_loopback_listener(docker_ready: None) -> None:
    # network none: the container has its own lo, so the listener runs in the same container.
    script = (
        "/bin/dwstorm listen 1 127.0.0.1:9000 > /tmp/listen.json & "
        "for i in {1..100}; do "
        "  if exec 3<>/dev/tcp/127.0.0.1/9000; then exec 3>&-; break; fi 2>/dev/null; "
        "  sleep 0.05; "
        "done; wait; /bin/cat /tmp/listen.json"
    )
    with run_container(images.host_binaries_image(), ["/bin/sleep", "60"]) as c:
        c.put_file("/bin/dwstorm", images.storm_binary().read_bytes())
        code, out = c.exec(["/bin/bash", "-c", script])
    assert code == 0, out
    assert storm_json(out)["count"] == 1


# ---- dwstorm ---------------------------------------------------------------------------------


@integration
@pytest.mark.parametrize(
    "args",
    [
        ["exec", "20"],
        ["exec", "5", "/bin/true"],
        ["connect", "200"],
        ["open", "100", "/tmp/o1"],
        ["openuniq", "30", "/tmp/u1"],
    ],
    ids=lambda a: "-".join(a[:2]),
)
def test_dwstorm_modes_report_exact_count(storm: RunningContainer, args: list[str]) -> None:
    code, out = storm.exec(["/bin/dwstorm", *args])
    assert code == 0, out
    summary = storm_json(out)
    assert summary["mode"] == args[0]
    assert summary["count"] == int(args[1])
    assert summary["errors"] == 0
    assert isinstance(summary["elapsed_ns"], int) and summary["elapsed_ns"] > 0


@integration
def test_dwstorm_open_files_match_count(storm: RunningContainer) -> None:
    assert storm.exec(["/bin/dwstorm", "open", "40", "/tmp/o2"])[0] == 0
    assert storm.exec(["sh", "-c", "wc -c < /tmp/o2"])[1].strip() == "40"
    assert storm.exec(["/bin/dwstorm", "openuniq", "25", "/tmp/u2"])[0] == 0
    _, out = storm.exec(["sh", "-c", "ls /tmp/u2.* | wc -l; cat /tmp/u2.0 /tmp/u2.24"])
    assert out.split() == ["25", "xx"]


@integration
def test_dwstorm_rate_and_seconds(storm: RunningContainer) -> None:
    _, out = storm.exec(["/bin/dwstorm", "open", "50", "/tmp/r1", "--rate", "500"])
    assert 0.08e9 <= storm_json(out)["elapsed_ns"] < 2e9  # 49 gaps of 2 ms

    _, out = storm.exec(["/bin/dwstorm", "open", "--seconds", "0.3", "/tmp/r2", "--rate", "200"])
    summary = storm_json(out)
    assert 40 <= summary["count"] <= 70
    assert 0.25e9 <= summary["elapsed_ns"] < 1e9
    assert storm.exec(["sh", "-c", "wc -c < /tmp/r2"])[1].strip() == str(summary["count"])


@integration
def test_dwstorm_refuses_non_loopback(storm: RunningContainer) -> None:
    # Refused while parsing, before any socket exists; network none besides.
    for target in ("192.0.2.1:80", "[2001:db8::1]:80", "example.com:80"):
        code, out = storm.exec(["/bin/dwstorm", "connect", "1", target])
        assert code == 2 and "refusing" in out, out
    assert storm.exec(["/bin/dwstorm", "listen", "1", "0.0.0.0:9000"])[0] == 2


@integration
def test_dwstorm_listen_counts_connects(docker_ready: None) -> None:
    # The listener is not PID 1: its exit would kill the connecting exec mid-flight.
    script = "/bin/dwstorm listen 51 9100 > /tmp/listen.json; sleep 60"
    with run_container(images.storm_image(), ["sh", "-c", script]) as c:
        wait_until(lambda: c.exec(["/bin/dwstorm", "connect", "1", "9100"])[0] == 0)
        code, out = c.exec(["/bin/dwstorm", "connect", "50", "127.0.0.1:9100"])
        assert code == 0 and storm_json(out)["count"] == 50, out
        wait_until(lambda: bool(c.exec(["cat", "/tmp/listen.json"])[1].strip()))
        assert storm_json(c.exec(["cat", "/tmp/listen.json"])[1])["count"] == 51


# ---- containers ------------------------------------------------------------------------------


@integration
def test_cgroup_id_is_the_cgroup_dir_inode(storm: RunningContainer) -> None:
    path = storm.cgroup_path
    assert storm.cgroup_id == os.stat(path).st_ino
    # where /proc says the init runs is where Docker's cgroup driver says it put the container
    assert path == cgroup2_root() / storm.docker_cgroup_path.lstrip("/")
    assert str(storm.pid) in (path / "cgroup.procs").read_text().split()


@integration
def test_run_container_always_removes(docker_ready: None) -> None:
    client = require_docker()
    with (
        pytest.raises(RuntimeError, match="boom"),
        run_container(images.busybox_image(), ["sleep", "60"], labels={"dw.case": "removal"}) as c,
    ):
        assert c.name.startswith(NAME_PREFIX)
        assert c.container.labels["dw.case"] == "removal"
        raise RuntimeError("boom")
    assert not client.containers.list(all=True, filters={"name": c.name})
