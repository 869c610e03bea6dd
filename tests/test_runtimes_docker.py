"""runtimes/docker.py: the one Docker client and its users, against a missing or dead socket and
the real daemon (doctor's tests script /_ping answers)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from driftwarden.agent.runtimes.docker import (
    ACTION_TIMEOUT,
    DockerContainers,
    DockerEngine,
    DockerGraphDriver,
    DockerMetadata,
    DockerRuntime,
    _transport_reason,
)
from driftwarden.core.errors import (
    ContainerNotFoundError,
    MetadataUnavailableError,
    RuntimeActionError,
)

CID = "ab" * 32


def dead_socket(tmp_path: Path) -> str:
    """A socket file nobody listens on (connect: ECONNREFUSED)."""
    path = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    return str(path)


# --------------------------------------------------------------------------- one wording


def test_transport_reason_finds_the_os_error_under_the_wrappers() -> None:
    try:
        try:
            raise ConnectionRefusedError(111, "Connection refused")
        except OSError as inner:
            raise RuntimeError("('Connection aborted.', ...)", inner) from None
    except RuntimeError as outer:
        assert _transport_reason(outer) == "Connection refused (ECONNREFUSED)"
    assert _transport_reason(TimeoutError("Read timed out.")) == "Read timed out."


def test_unreachable_daemon_is_one_message_for_every_user(tmp_path: Path) -> None:
    missing = f"unix://{tmp_path}/no-docker.sock"
    expected = f"docker unreachable at {missing}: No such file or directory (ENOENT)"
    with DockerEngine(missing, timeout=2) as engine, \
            pytest.raises(RuntimeActionError) as raised:
        engine.call("inspect", lambda api: api.inspect_container(CID))
    assert str(raised.value) == expected
    assert not isinstance(raised.value, ContainerNotFoundError)

    runtime = DockerRuntime(missing, timeout=2)
    with pytest.raises(RuntimeActionError) as raised:
        runtime.state(CID)
    runtime.close()
    assert str(raised.value) == expected

    with DockerMetadata(missing, timeout=2) as metadata, \
            pytest.raises(MetadataUnavailableError) as unavailable:
        metadata.inspect(CID)
    assert str(unavailable.value) == expected

    refused = dead_socket(tmp_path)
    with DockerEngine(f"unix://{refused}", timeout=2) as engine, \
            pytest.raises(RuntimeActionError, match=r"Connection refused \(ECONNREFUSED\)$"):
        engine.ping()


def test_action_timeout_is_longer_than_requests() -> None:
    runtime = DockerRuntime()
    assert runtime.base_url == "unix:///var/run/docker.sock"
    assert runtime._engine.timeout == ACTION_TIMEOUT == 30.0
    assert DockerEngine().timeout == 5.0


# --------------------------------------------------------------------------- best-effort users


def test_containers_say_docker_is_away(tmp_path: Path) -> None:
    """The heartbeats' list keeps the last one meanwhile (runtimes.registry.RunningContainers,
    tests/test_runtimes_cri.py)."""
    containers = DockerContainers(f"unix://{tmp_path}/no-docker.sock", timeout=2)
    try:
        with pytest.raises(RuntimeActionError, match=r"^docker unreachable at unix://"):
            containers()
    finally:
        containers.close()


def test_graph_driver_is_none_while_docker_is_away(tmp_path: Path) -> None:
    graph_driver = DockerGraphDriver(f"unix://{tmp_path}/no-docker.sock", timeout=2)
    try:
        assert graph_driver(CID) is None
    finally:
        graph_driver.close()


# --------------------------------------------------------------------------- the real daemon


@pytest.mark.integration
def test_real_daemon_through_every_user(docker_ok: None, bb_image: str) -> None:
    from tests.support.containers import run_container

    with run_container(bb_image, ["sleep", "60"]) as container:
        with DockerEngine() as engine:
            assert engine.ping().count(".") == 1  # "1.47"
            with pytest.raises(ContainerNotFoundError, match=r"^docker inspect: No such "):
                engine.call("inspect", lambda api: api.inspect_container("0" * 64))
        containers = DockerContainers()
        graph_driver = DockerGraphDriver()
        runtime = DockerRuntime()
        try:
            rows = {row[0]: row for row in containers()}
            assert rows[container.id][:2] == (container.id, container.name)
            assert rows[container.id][3] == bb_image
            container.container.reload()  # the test's own client: what Docker says
            assert graph_driver(container.id) == container.container.attrs["GraphDriver"]
            state = runtime.state(container.id)
            assert (state.status, state.running, state.paused) == ("running", True, False)
            assert state.pid > 0
            assert graph_driver("0" * 64) is None
        finally:
            for user in (containers, graph_driver, runtime):
                user.close()
