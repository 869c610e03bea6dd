"""deploy/Dockerfile built for real, and the image run the way the manifests run it.

No registry is reachable here, so the base image (`debian:bookworm-slim`) is made once per host
with debootstrap from the Debian archive apt uses, and pip gets the project's wheels from the
host (tests/support/image_build.py). The image is then run as deploy/daemonset.yaml and
deploy/collector.yaml run it (tests/support/pod_docker.py: privileged or locked down as the
pod says, host pid, the same mounts and arguments), against this host's Docker and the test
session's containerd with its CRI plugin (mounted where a node's containerd socket would be):
a drop-and-execute in a Kubernetes pod's container and in a Docker container each raise a
DRIFT alert, which the agent streams over mutual TLS to the collector running from the same
image, and which the image's own operator CLI then lists.

The build time and the image's size are printed in the test output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from driftwarden.ops.certs import CertBundle, init_certs

from tests.conftest import missing_prerequisite
from tests.support.containerd import TestContainerd, unique_pod_name
from tests.support.containers import run_container
from tests.support.image_build import ImageBuildError, build_image
from tests.support.k8s import (
    SERVICE_HOST,
    Pod,
    dockerfile,
    exec_form,
    final_stage,
    load,
    only,
    pod_of,
    secrets_of,
)
from tests.support.pod_docker import PodRun, logs, running, state

pytestmark = pytest.mark.integration

NODE = "node-img"
# The image must stay below this. What it holds (measured, MB): Debian bookworm-slim 75; bcc
# with its LLVM, clang and their libraries (z3, ICU) 225; Python 3.11 35; kernel headers 57;
# numpy + scipy + scikit-learn 200 (wheels: each carries its own OpenBLAS); grpc, protobuf and
# the rest 60: about 660 MB. 500 MB would need a smaller anomaly model than scikit-learn's.
MAX_IMAGE_MB = 700
SLEEPER = ["/bin/sh", "-c", "mkdir -p /tmp && exec sleep 600"]
DROP_AND_RUN = ["/bin/sh", "-c", "cp /bin/busybox /tmp/true && /tmp/true"]
AGENT_READY = "agent running"
START_TIMEOUT = 120.0  # bcc compiles the probes at the agent's start (~15 s; more when busy)


def say(request: pytest.FixtureRequest, text: str) -> None:
    """A line in the test output, captured or not."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if capture is None:
        print(text)
        return
    with capture.global_and_fixture_disabled():
        print(f"\n{text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def image(request: pytest.FixtureRequest, docker_ok) -> str:
    if os.geteuid() != 0:
        missing_prerequisite("building the image needs root (debootstrap, docker)")
    tag = only(pod_of(load("daemonset.yaml"), "DaemonSet",
                      "driftwarden-agent")[1]["containers"])["image"]
    try:
        built = build_image(tag, log=lambda line: say(request, line))
    except ImageBuildError as exc:
        pytest.fail(str(exc), pytrace=False)
    say(request, f"[image] {tag}: built in {built.seconds:.0f} s, "
                 f"{built.size_bytes / 1e6:.0f} MB")
    return tag


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> CertBundle:
    return init_certs(tmp_path_factory.mktemp("pki") / "dw-certs", [NODE], days=2,
                      collector_names=[SERVICE_HOST])


@pytest.fixture(scope="module")
def cluster(bundle: CertBundle) -> list[dict[str, Any]]:
    """What the README applies: the Secrets of scripts/k8s-secrets.sh, then the manifests."""
    return [*secrets_of(bundle.directory), *load("collector.yaml"), *load("daemonset.yaml")]


def test_image_size_and_entrypoint(image: str) -> None:
    inspect = json.loads(subprocess.run(["docker", "image", "inspect", image],
                                        capture_output=True, text=True, check=True).stdout)[0]
    assert inspect["Size"] < MAX_IMAGE_MB * 1e6, inspect["Size"]
    assert inspect["Config"]["Entrypoint"] == exec_form(final_stage(dockerfile()),
                                                        "ENTRYPOINT")
    # the kernel headers the image carries, where deploy/entrypoint.sh links them from
    listed = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c",
         "test -f /opt/kernel-headers/source/include/linux/kconfig.h && "
         "test -d /opt/kernel-headers/build/include/generated && ls /lib/modules 2>&1; "
         "driftwarden --version"],
        capture_output=True, text=True, timeout=120, check=False)
    assert listed.returncode == 0, listed.stderr
    assert "driftwarden " in listed.stdout
    assert "No such file" in listed.stdout  # the image has no /lib/modules of its own


@pytest.fixture
def collector(image: str, cluster: list[dict[str, Any]], tmp_path: Path) -> Iterator[int]:
    """deploy/collector.yaml's pod: yields the port it listens on (on loopback: --listen and
    --metrics are the only args replaced)."""
    _, spec = pod_of(cluster, "Deployment", "driftwarden-collector")
    container = only(spec["containers"])
    port = free_port()
    run = PodRun(spec, container, Pod(spec, container, cluster, tmp_path / "collector"), image,
                 NODE, replace_args={"--listen 0.0.0.0:50051": f"127.0.0.1:{port}",
                                     "--metrics 127.0.0.1:9464": f"127.0.0.1:{free_port()}"})
    with running(run):
        deadline = time.monotonic() + 60
        while not _listening(port):
            assert state(run) == "running", f"the collector exited:\n{logs(run)}"
            assert time.monotonic() < deadline, f"the collector does not listen:\n{logs(run)}"
            time.sleep(0.2)
        yield port
        assert state(run) == "running", f"the collector stopped:\n{logs(run)}"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def agent(image: str, cluster: list[dict[str, Any]], collector: int,
          containerd: TestContainerd, tmp_path: Path) -> Iterator[PodRun]:
    """deploy/daemonset.yaml's pod on this node: the harness's containerd where the node's
    would be (/run/containerd), the agent's state in a temp dir instead of the node's
    /var/lib/driftwarden/agent, the collector's Service name resolving to loopback."""
    _, spec = pod_of(cluster, "DaemonSet", "driftwarden-agent")
    container = only(spec["containers"])
    run = PodRun(
        spec, container, Pod(spec, container, cluster, tmp_path / "agent"), image, NODE,
        host_paths={"/var/lib/driftwarden/agent": tmp_path / "agent-state"},
        extra_mounts=[(containerd.base, "/run/containerd", True)],
        add_hosts={SERVICE_HOST: "127.0.0.1"},
        replace_args={f"--collector {SERVICE_HOST}:50051": f"{SERVICE_HOST}:{collector}",
                      "--metrics 127.0.0.1:9465": f"127.0.0.1:{free_port()}"})
    with running(run):
        deadline = time.monotonic() + START_TIMEOUT
        while AGENT_READY not in logs(run):
            assert state(run) == "running", f"the agent exited:\n{logs(run)}"
            assert time.monotonic() < deadline, f"the agent is not ready:\n{logs(run)}"
            time.sleep(0.5)
        yield run
        assert state(run) == "running", f"the agent stopped:\n{logs(run)}"


def stored_alerts(image: str, bundle: CertBundle, collector: int) -> list[dict[str, Any]]:
    """`driftwarden alerts --json --kind drift` from the image, with the operator's
    certificate, against the collector."""
    certs = bundle.directory
    done = subprocess.run(
        ["docker", "run", "--rm", "--network", "host", "--label", "driftwarden.test=1",
         "-v", f"{certs}:/certs:ro", image, "alerts", "--json", "--kind", "drift",
         "--collector", f"127.0.0.1:{collector}", "--tls-ca", "/certs/ca.crt",
         "--tls-cert", "/certs/operator.crt", "--tls-key", "/certs/operator.key"],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def test_agent_image_detects_drift_and_streams_it_to_the_collector_image(
        image: str, bundle: CertBundle, collector: int, agent: PodRun,
        containerd: TestContainerd, bb_image: str, request: pytest.FixtureRequest) -> None:
    started = time.monotonic()
    with containerd.pod(unique_pod_name("image"), namespace="shop",
                        labels={"app": "web"}) as pod, \
            run_container(bb_image, SLEEPER) as docker_container:
        in_pod = pod.run(bb_image, SLEEPER, name="app")
        for target in (in_pod, docker_container):
            code, out = target.exec(DROP_AND_RUN)
            assert code == 0, out
        wanted = {in_pod.id, docker_container.id}
        deadline = time.monotonic() + 90
        while True:
            alerts = {a["container"]["id"]: a for a in stored_alerts(image, bundle, collector)
                      if a["container"]["id"] in wanted}
            if set(alerts) == wanted:
                break
            assert time.monotonic() < deadline, (
                f"drift alerts at the collector for {sorted(set(wanted) - set(alerts))} "
                f"missing; agent log:\n{logs(agent)[-4000:]}")
            time.sleep(2)
    say(request, f"[image] drift in a pod and in a Docker container reached the collector "
                 f"{time.monotonic() - started:.0f} s after the drop-and-execute")
    for alert in alerts.values():
        assert alert["kind"] == "drift"
        assert alert["reasons"][0]["code"] == "exec-added-binary", alert["reasons"]
        assert alert["process"]["exe"] == "/tmp/true"
        assert alert["node"] == NODE  # the agent certificate's CN
        assert alert["container"]["image"] == bb_image
    from_pod = alerts[in_pod.id]["container"]
    assert (from_pod["name"], from_pod["pod"], from_pod["namespace"], from_pod["pod_uid"]) == (
        "app", pod.name, "shop", pod.uid)
    from_docker = alerts[docker_container.id]["container"]
    assert (from_docker["name"], from_docker["pod"]) == (docker_container.name, None)
    # the image of the pod (containerd) and of the Docker container is one baseline key
    assert from_pod["image_id"] == from_docker["image_id"]
