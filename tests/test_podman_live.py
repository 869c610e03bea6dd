"""podman for real (Debian's, rootful, cgroupfs): its containers are attributed through its
Docker-compatible API socket (/run/podman/podman.sock, one of the usual sockets the agent
probes; tests/support/podman.py starts and stops the service), their cgroups
(/libpod_parent/libpod-<id>) say podman, and a drop-and-execute raises a DRIFT alert. The image
key is the config digest, as under Docker: one baseline for the image whatever runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from driftwarden.agent.cgroups import ContainerRef, parse_cgroup_path
from driftwarden.agent.runtimes.base import pick_repo_digest
from driftwarden.agent.runtimes.docker import DockerMetadata
from driftwarden.agent.runtimes.registry import RuntimeEndpoint, probe_endpoints

from tests.conftest import missing_prerequisite
from tests.support.agent_proc import AgentProcess
from tests.support.containers import run_container
from tests.support.host import cgroup2_root
from tests.support.podman import ENDPOINT, PodmanError, TestPodman
from tests.support.scenario import image_id

SLEEPER = ["/bin/sh", "-c", "mkdir -p /tmp && exec sleep 600"]
DROP_AND_RUN = ["/bin/sh", "-c", "cp /bin/busybox /tmp/true && /tmp/true"]


def test_podmans_own_digest_of_a_local_image_is_not_a_repo_digest() -> None:
    """podman lists a digest under "localhost/" for an image it loaded or built (no registry
    served it): the key stays the config digest, as Docker's for the same image."""
    local = "localhost/dw-bb@sha256:" + "5d" * 32
    pulled = "docker.io/library/nginx@sha256:" + "ab" * 32
    assert pick_repo_digest([local], "localhost/dw-bb:1") is None
    assert pick_repo_digest([local, pulled], "nginx:1.25") == pulled
    # a registry on localhost has a port: its digests are real
    registry = "localhost:5000/app@sha256:" + "cd" * 32
    assert pick_repo_digest([registry], "localhost:5000/app:1") == registry


@pytest.fixture(scope="module")
def podman(docker_ok) -> Iterator[TestPodman]:
    if os.geteuid() != 0:
        missing_prerequisite("rootful podman needs root")
    instance = TestPodman()
    try:
        instance.start()
    except PodmanError as exc:
        missing_prerequisite(str(exc))
    try:
        yield instance
    finally:
        instance.stop()


@pytest.mark.integration
def test_metadata_and_cgroup_of_a_podman_container(podman: TestPodman, bb_image: str) -> None:
    with podman.run(bb_image, SLEEPER, name="meta") as container:
        cgroup = container.cgroup_path
        with DockerMetadata(ENDPOINT, runtime="podman") as metadata:
            info = metadata.inspect(container.id)
            by_name = metadata.inspect(container.name)
        pid = container.pid
    relative = "/" + str(cgroup.relative_to(cgroup2_root()))
    assert relative == f"/libpod_parent/libpod-{container.id}"
    assert parse_cgroup_path(relative) == ContainerRef("podman", container.id)
    assert info is not None and by_name == info
    assert (info.id, info.name, info.runtime, info.pid) == (
        container.id, container.name, "podman", pid)
    assert (info.image_name, info.image_id, info.image_digest) == (
        f"localhost/{bb_image}", image_id(bb_image), None)  # Docker's key for the image
    assert dict(info.labels)["driftwarden.test"] == "1"


@pytest.mark.integration
def test_podmans_socket_is_one_of_the_usual_sockets(podman: TestPodman) -> None:
    found = probe_endpoints()
    assert RuntimeEndpoint(ENDPOINT, "docker", "podman") in found
    doctor = subprocess.run([sys.executable, "-m", "driftwarden", "doctor", "--json",
                             "--no-load-tests"], capture_output=True, text=True, timeout=120,
                            cwd="/", check=False)
    rows = json.loads(doctor.stdout)
    podman_rows = [r for r in rows if "podman" in r["name"] or "podman" in r["detail"]]
    assert podman_rows and all(r["status"] == "ok" for r in podman_rows), podman_rows


@pytest.mark.integration
def test_agent_detects_drift_in_a_podman_container(podman: TestPodman, bb_image: str,
                                                    kernel_ok, tmp_path) -> None:
    """The agent as the DaemonSet runs it (no --runtime-endpoint: the usual sockets that exist,
    podman's among them); the same image in a Docker container is the same baseline."""
    agent = AgentProcess(tmp_path / "state", tmp_path / "alerts.jsonl", ["--window", "1"])

    def drift_of(container_id: str):
        return lambda a: a["kind"] == "drift" and a["container"]["id"] == container_id

    with agent, podman.run(bb_image, SLEEPER, name="drift") as in_podman, \
            run_container(bb_image, SLEEPER) as in_docker:
        for target in (in_podman, in_docker):
            code, out = target.exec(DROP_AND_RUN)
            assert code == 0, out
        from_podman = agent.wait_for_alerts(drift_of(in_podman.id), timeout=30,
                                            what="the podman container's drift")[0]
        from_docker = agent.wait_for_alerts(drift_of(in_docker.id), timeout=30,
                                            what="the Docker container's drift")[0]
    assert from_podman["reasons"][0]["code"] == "exec-added-binary"
    assert from_podman["process"]["exe"] == "/tmp/true"
    container = from_podman["container"]
    assert (container["name"], container["image"], container["image_id"]) == (
        in_podman.name, f"localhost/{bb_image}", image_id(bb_image))
    assert {e["container"]["runtime"] for e in from_podman["events"]} == {"podman"}
    assert {e["container"]["attribution"] for e in from_podman["events"]} == {"container"}
    assert from_docker["container"]["image_id"] == container["image_id"]  # one baseline
