"""The CRI provider against a real containerd (its CRI plugin on, beside Docker's; one per
session: tests/conftest.py's `containerd`), with pods and containers made through the CRI API as
the kubelet makes them: metadata, events, the image key Docker and containerd share, `doctor`,
`driftwarden trace` / `driftwarden agent` attributing a pod's container and containers that
live a few milliseconds (Docker's `run --rm` too), actions on a pod's container (the cgroup
freezer, quarantine, StopContainer), and a pod's alert through the real collector with its
Kubernetes fields."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import string
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from driftwarden.agent.attribution import AttributionState, Attributor
from driftwarden.agent.cgroups import CgroupIndex, ContainerRef
from driftwarden.agent.runtimes.base import ContainerEvent, ContainerEventAction, ContainerInfo
from driftwarden.agent.runtimes.cri import CriEventWatcher, CriMetadata
from driftwarden.agent.runtimes.docker import DockerMetadata
from driftwarden.agent.runtimes.registry import RuntimeSet, resolve_endpoints

from tests.support.agent_proc import AgentProcess
from tests.support.containerd import CriContainer, CriPod, TestContainerd
from tests.support.containers import run_container
from tests.support.host import cgroup2_root
from tests.support.scenario import baselines, image_id, wait_until
from tests.support.trace_proc import tracing

pytestmark = pytest.mark.integration

PY = sys.executable
DOCKER = "unix:///var/run/docker.sock"
TEMPLATE_HASH = "7d4b9c8f6d"
SLEEPER = ["/bin/sh", "-c", "mkdir -p /tmp && exec sleep 600"]
# busybox copied to a path the image never shipped and run as `true`: drift in every mode
DROP_AND_RUN = ["/bin/sh", "-c", "cp /bin/busybox /tmp/true && /tmp/true"]
# Docker's own containerd: no CRI plugin (where dockerd started it, or a system one)
DOCKERS_CONTAINERD = ("/var/run/docker/containerd/containerd.sock",
                      "/run/containerd/containerd.sock")


def deployment_pod_name() -> str:
    suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
    return f"web-{TEMPLATE_HASH}-{suffix}"


@pytest.fixture(scope="module")
def web(containerd: TestContainerd, bb_image: str) -> Iterator[tuple[CriPod, CriContainer]]:
    """A Deployment's pod (namespace shop) with one running container, "app"."""
    with containerd.pod(deployment_pod_name(), namespace="shop",
                        labels={"app": "web", "pod-template-hash": TEMPLATE_HASH}) as pod:
        yield pod, pod.run(bb_image, SLEEPER, name="app")


def expected_info(pod: CriPod, container: CriContainer, image: str) -> ContainerInfo:
    status = container.status.status
    return ContainerInfo(
        id=container.id, name="app", image_id=image_id(image), image_name=image,
        labels={"app": "web", "pod-template-hash": TEMPLATE_HASH,
                "io.kubernetes.pod.name": pod.name, "io.kubernetes.pod.namespace": "shop",
                "io.kubernetes.pod.uid": pod.uid, "io.kubernetes.container.name": "app"},
        pod=pod.name, namespace="shop", runtime="containerd", started_at=status.started_at / 1e9,
        image_digest=None, pod_uid=pod.uid, workload="Deployment/web", pid=container.pid)


# --------------------------------------------------------------------------- metadata


def test_metadata_of_a_pods_container(containerd, web, bb_image) -> None:
    pod, container = web
    with CriMetadata(containerd.endpoint) as metadata:
        info = metadata.inspect(container.id)
        assert info == expected_info(pod, container, bb_image)
        assert metadata.inspect("app") == info  # trace --container takes the name
        assert metadata.inspect(container.id[:12]) == info
        assert metadata.inspect("0" * 64) is None
        version = metadata.identify()
    assert (version.runtime_name, version.runtime_api_version) == ("containerd", "v1")
    assert info.pid > 0 and Path(f"/proc/{info.pid}/cgroup").read_text().splitlines()[-1] == (
        f"0::{pod.cgroup_parent}/{container.id}")


def test_docker_and_containerd_give_the_same_image_one_key(containerd, web, bb_image) -> None:
    """One baseline serves an image whatever runs it: a locally built image has no repo
    digest under either runtime, and its config digest is Docker's image id and the CRI's."""
    pod, container = web
    root = cgroup2_root()
    endpoints = resolve_endpoints([containerd.endpoint], DOCKER)
    with (
        run_container(bb_image, ["sleep", "600"]) as docker_container,
        RuntimeSet.open(endpoints) as runtimes,
        Attributor(CgroupIndex(root), runtimes) as attributor,
    ):
        with DockerMetadata(DOCKER) as docker:
            docker_info = docker.inspect(docker_container.id)
        assert docker_info is not None
        ids = {"docker": docker_container.cgroup_id, "containerd": container.cgroup_id}
        for cgroup_id in ids.values():
            attributor.lookup(cgroup_id)
        assert attributor.wait_idle(10)
        results = {name: attributor.lookup(cgroup_id) for name, cgroup_id in ids.items()}
        wait_until(lambda: attributor.watching, 10, "the runtimes' event watchers")
    assert docker_info.image_id == image_id(bb_image)
    for name, result in results.items():
        assert result.state is AttributionState.CONTAINER, result
        assert result.metadata_error is None
        assert (result.info.runtime, result.info.image_id, result.info.image_name) == (
            name, docker_info.image_id, docker_info.image_name)
    assert results["containerd"].ref == ContainerRef("containerd", container.id, pod.uid)
    assert results["containerd"].info == expected_info(pod, container, bb_image)
    assert results["docker"].info == docker_info


def test_events_of_containerd_1_6_come_from_polling(containerd, bb_image) -> None:
    """containerd 1.6 has no GetContainerEvents: the watcher lists containers instead."""
    seen: list[ContainerEvent] = []
    with CriEventWatcher(containerd.endpoint, seen.append, poll_interval=0.2) as watcher:
        wait_until(lambda: watcher.connected, 10, "the watcher to connect")
        assert watcher.polling
        with containerd.pod(f"events-{random.randrange(1 << 30):x}", namespace="ci") as pod:
            started = pod.run(bb_image, SLEEPER, name="short")
            wait_until(lambda: ContainerEvent(ContainerEventAction.START, started.id) in seen,
                       10, "its start")
            started.stop(0)
            wait_until(lambda: ContainerEvent(ContainerEventAction.DIE, started.id) in seen,
                       10, "its stop")
            started.remove()
            wait_until(lambda: ContainerEvent(ContainerEventAction.DESTROY, started.id) in seen,
                       10, "its removal")
    resync = ContainerEvent(ContainerEventAction.RESYNC, None, runtime="containerd")
    assert seen[0] == resync
    assert seen.count(resync) == 1


# --------------------------------------------------------------------------- doctor


def doctor(*args: str) -> tuple[int, dict[str, dict]]:
    result = subprocess.run([PY, "-m", "driftwarden", "doctor", "--no-load-tests", "--json",
                             *args], capture_output=True, text=True, timeout=120, cwd="/")
    rows: dict[str, dict] = {}
    for row in json.loads(result.stdout):
        rows.setdefault(row["name"], row)
    return result.returncode, rows


def test_doctor_lists_the_runtime_and_its_containers(containerd, web) -> None:
    code, rows = doctor("--runtime-endpoint", containerd.endpoint)
    assert code == 0, rows
    runtime = rows["runtime containerd"]
    assert (runtime["status"], runtime["required"]) == ("ok", True)
    assert runtime["detail"] == f"{containerd.endpoint} answers: containerd 1.6.20~ds1 (CRI v1)"
    containers = rows["container runtimes"]
    assert containers["status"] == "ok", containers
    assert " under containerd" in containers["detail"]


def test_doctor_says_dockers_containerd_serves_no_cri(docker_ok) -> None:
    socket_path = next((p for p in DOCKERS_CONTAINERD if os.path.exists(p)), None)
    assert socket_path is not None, f"Docker runs, but none of {DOCKERS_CONTAINERD} exists"
    code, rows = doctor("--runtime-endpoint", f"unix://{socket_path}")
    row = rows["runtime containerd"]
    assert (code, row["status"]) == (1, "fail")
    assert row["detail"] == (
        f"containerd at unix://{socket_path} does not serve the CRI (runtime.v1): unknown "
        "service runtime.v1.RuntimeService; its CRI plugin is off (as in Docker's own "
        "containerd, whose containers are asked through Docker)")
    assert row["fix"].startswith("if this node's containers run under it, enable its CRI "
                                 "plugin")
    # probed rather than given, it is left out of what the agent asks
    probed = resolve_endpoints(probe=lambda: [
        *resolve_endpoints([f"unix://{socket_path}"]), *resolve_endpoints([], DOCKER)])
    assert [e.url for e in probed] == [DOCKER]


# --------------------------------------------------------------------------- short-lived containers


# A Job's pod (the owner labels its controller writes): its container lives a few milliseconds
JOB = "migrate-28999"
JOB_LABELS = {"batch.kubernetes.io/job-name": JOB, "job-name": JOB,
              "batch.kubernetes.io/controller-uid": "0d3f6a1e-2c1b-4f3a-9b7e-5d6c7b8a9f01"}
# drop-and-execute with the host image's real binaries (exec'd directly, not busybox applets)
HOST_DROP_AND_RUN = ["/bin/sh", "-c", "mkdir -p /tmp && cp /bin/true /tmp/true && /tmp/true"]
SHORT_SCRIPT = "mkdir -p /tmp && cp /bin/busybox /tmp/true && /tmp/true"  # busybox image


def job_pod_name() -> str:
    return f"{JOB}-{''.join(random.choices(string.ascii_lowercase + string.digits, k=5))}"


def docker_run_rm(image: str, script: str) -> tuple[str, float]:
    """`docker run --rm IMAGE sh -c SCRIPT`, as `make run` suggests: (the container's id, its
    life from Docker's start event to its die event, seconds)."""
    name = f"dwtest-short-{random.randrange(1 << 32):08x}"
    since = time.time() - 1
    subprocess.run(["docker", "run", "--rm", "--name", name, image, "sh", "-c", script],
                   check=True, capture_output=True, timeout=60)
    events = subprocess.run(
        ["docker", "events", "--since", f"{since:.3f}", "--until", f"{time.time() + 0.3:.3f}",
         "--filter", "type=container", "--filter", f"container={name}", "--format",
         "{{.Action}} {{.TimeNano}} {{.ID}}"], capture_output=True, text=True, check=True,
        timeout=30).stdout.split("\n")
    times = {action: (int(ns), cid) for action, ns, cid in
             (line.split() for line in events if line)}
    assert {"create", "start", "die", "destroy"} <= times.keys(), events
    return times["start"][1], (times["die"][0] - times["start"][0]) / 1e9


def run_short_lived(pod: CriPod, image: str, command: list[str], name: str = "job"
                    ) -> tuple[CriContainer, float]:
    """A container of `pod` that runs `command` and exits: (it, its life from the runtime's
    start to its exit, seconds), once it has exited."""
    container = pod.run(image, command, name=name)
    status = wait_until(lambda: (s := container.status.status).finished_at and s, 20,
                        "the container's exit")
    assert (status.state, status.exit_code) == (pod.containerd.api.CONTAINER_EXITED, 0)
    return container, (status.finished_at - status.started_at) / 1e9


# --------------------------------------------------------------------------- trace and agent


def test_trace_attributes_a_pods_container_and_short_lived_ones(containerd, web, bb_image,
                                                                host_image, tmp_path) -> None:
    """A pod's container; and containers that live less than 100 ms, under Docker (`docker run
    --rm`) and containerd (a Job pod's container made through the CRI): their events carry the
    container's name and image although it is gone (Docker's) or exited (containerd's) when
    they are looked at."""
    pod, container = web
    port = random.randrange(20000, 30000)
    script = (f"echo hi > /tmp/dw-cri-trace && nc -w 1 127.0.0.1 {port}; "
              "cat /tmp/dw-cri-trace")
    with open(tmp_path / "trace.jsonl", "w+", encoding="utf-8") as lines, \
            containerd.pod(job_pod_name(), namespace="batch", labels=JOB_LABELS) as job:
        with tracing(["--runtime-endpoint", containerd.endpoint, "--runtime-endpoint", DOCKER],
                     lines):
            code, out = container.exec(["/bin/sh", "-c", script])
            assert (code, out) == (0, "hi\nnc: can't connect to remote host (127.0.0.1): "
                                      "Connection refused\n")
            docker_id, docker_life = docker_run_rm(bb_image, SHORT_SCRIPT)
            in_job, job_life = run_short_lived(job, host_image, HOST_DROP_AND_RUN)
            time.sleep(2.5)  # past the agent's 1 s wait for metadata
        lines.seek(0)
        events = [json.loads(line) for line in lines]
    print(f"lifetimes: docker --rm {docker_life * 1000:.1f} ms, CRI {job_life * 1000:.1f} ms")
    ours = [e for e in events if e["cgroup_id"] == container.cgroup_id]
    expected = {
        "id": container.id, "name": "app", "image": bb_image,
        "image_id": image_id(bb_image), "image_digest": None, "runtime": "containerd",
        "pod": pod.name, "namespace": "shop", "pod_uid": pod.uid, "workload": "Deployment/web",
        "labels": dict(expected_info(pod, container, bb_image).labels),
        "attribution": "container", "metadata_error": None,
    }
    assert ours and all(e["container"] == expected for e in ours), ours[:3]
    kinds = {(e["kind"], e.get("exec", {}).get("argv", [None])[0],
              e.get("write", {}).get("path"), e.get("connect", {}).get("port")) for e in ours}
    assert ("exec", "nc", None, None) in kinds
    assert ("connect", None, None, port) in kinds
    assert ("write", None, "/tmp/dw-cri-trace", None) in kinds

    assert docker_life < 0.1 and job_life < 0.1

    def execs_of(container_id: str) -> dict[str, dict]:
        return {e["exec"]["argv"][0]: e["container"] for e in events
                if e["kind"] == "exec" and (e["container"] or {}).get("id") == container_id}

    ran = execs_of(docker_id)
    assert ran["/tmp/true"] == ran["sh"]
    assert (ran["/tmp/true"]["attribution"], ran["/tmp/true"]["image"],
            ran["/tmp/true"]["runtime"], ran["/tmp/true"]["metadata_error"]) == (
        "container", bb_image, "docker", None)
    short = execs_of(in_job.id)["/tmp/true"]
    assert (short["attribution"], short["name"], short["image"], short["pod"],
            short["namespace"], short["pod_uid"], short["workload"], short["metadata_error"]) == (
        "container", "job", host_image, job.name, "batch", job.uid, f"Job/{JOB}", None)


def test_agent_drift_in_a_pod_and_one_baseline_for_both_runtimes(containerd, web, bb_image,
                                                                   kernel_ok,
                                                                   tmp_path) -> None:
    pod, container = web
    state = tmp_path / "state"
    agent = AgentProcess(state, tmp_path / "alerts.jsonl",
                         ["--runtime-endpoint", containerd.endpoint, "--docker-host", DOCKER,
                          "--window", "1"])
    key = image_id(bb_image)

    def drift_in(container_id: str) -> Callable[[dict], bool]:
        return lambda a: a["kind"] == "drift" and a["container"]["id"] == container_id

    with agent, run_container(bb_image, SLEEPER) as docker_container:
        for target, marker in ((docker_container, "from-docker"), (container, "from-pod")):
            code, out = target.exec(["/bin/sh", "-c", f"echo x > /tmp/{marker}"])
            assert code == 0, out
            code, out = target.exec(DROP_AND_RUN)
            assert code == 0, out
        in_pod = agent.wait_for_alerts(drift_in(container.id), timeout=30,
                                       what="the pod's drift")[0]
        in_docker = agent.wait_for_alerts(drift_in(docker_container.id), timeout=30,
                                          what="the Docker container's drift")[0]
        shown = subprocess.run(
            [PY, "-m", "driftwarden", "baseline", "--state-dir", str(state), "--json", "show",
             key], capture_output=True, text=True, timeout=60, cwd="/")
        listed = wait_until(lambda: baselines(state), 30, "the baseline list")
    assert in_pod["reasons"][0]["code"] == "exec-added-binary"
    assert in_pod["process"]["exe"] == "/tmp/true"
    assert (in_pod["container"]["name"], in_pod["container"]["pod"],
            in_pod["container"]["namespace"], in_pod["container"]["image_id"],
            in_pod["container"]["image"]) == ("app", pod.name, "shop", key, bb_image)
    assert in_docker["container"]["image_id"] == key
    # one baseline, which both containers taught
    assert shown.returncode == 0, shown.stderr
    assert [found for found, b in listed.items() if b["image"] == bb_image] == [key]
    writes = json.loads(shown.stdout)["items_by_kind"]["write"]
    assert any("/tmp/from-docker" in w for w in writes) and any("/tmp/from-pod" in w
                                                                 for w in writes), writes


# --------------------------------------------------------------------------- actions


# a loop that counts into a file: it stops counting while the container is frozen
COUNTER = ["/bin/sh", "-c",
           "mkdir -p /tmp; i=0; while true; do i=$((i+1)); echo $i > /tmp/count; usleep 20000; "
           "done"]


def test_actions_on_a_pods_container(containerd, bb_image, kernel_ok) -> None:
    """pause/resume through the cgroup freezer, quarantine/release through the container's
    cgroup, kill by StopContainer: each by the runtime that owns the container, Docker's
    beside it."""
    from driftwarden.agent.actions import ContainerActions
    from driftwarden.core.actions import ActionStatus

    done, already = ActionStatus.DONE, ActionStatus.ALREADY
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted: list[bytes] = []

    def serve() -> None:  # take one line, hang up
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                with conn:
                    accepted.append(conn.recv(64))

    threading.Thread(target=serve, daemon=True).start()
    connect = ["/bin/sh", "-c", f"echo hi | nc -w 2 127.0.0.1 {port}"]
    endpoints = resolve_endpoints([containerd.endpoint], DOCKER)
    with listener, containerd.pod(f"act-{random.randrange(1 << 30):x}", namespace="ci") as pod, \
            ContainerActions.for_endpoints(endpoints) as actions:
        container = pod.run(bb_image, COUNTER, name="counter")
        count_file = Path(f"/proc/{container.pid}/root/tmp/count")
        wait_until(count_file.exists, 10, "the counter")

        def counting() -> bool:
            before = count_file.read_text()
            time.sleep(0.3)
            return count_file.read_text() != before

        steps = [(actions.pause(container.id).status, counting(),
                  actions.status(container.id).paused)]
        frozen = (container.cgroup_path / "cgroup.events").read_text()
        steps.append((actions.pause(container.id).status, counting(),
                      actions.status(container.id).paused))
        steps.append((actions.resume(container.id).status, counting(),
                      actions.status(container.id).paused))
        quarantined = actions.quarantine(container.id)
        denied = container.exec(connect)
        released = actions.release(container.id)
        allowed = container.exec(connect)
        paused_then_killed = (actions.pause(container.id).status,
                              actions.kill(container.id).status)
        status = container.status.status
        again = actions.kill(container.id)
    assert steps == [(done, False, True), (already, False, True), (done, True, False)]
    assert "frozen 1" in frozen.splitlines()
    assert (quarantined.status, quarantined.detail("cgroup")) == (done,
                                                                  str(container.cgroup_path))
    assert denied == (1, "nc: can't connect to remote host (127.0.0.1): Operation not "
                         "permitted\n")
    assert (released.status, released.detail("detached")) == (done, "4")
    assert allowed == (0, "")
    assert accepted == [b"hi\n"]
    # a frozen container dies of StopContainer's SIGKILL too
    assert paused_then_killed == (done, done)
    assert (status.state, status.exit_code) == (containerd.api.CONTAINER_EXITED, 137)
    assert (again.status, again.message) == (already, "already stopped (status exited)")


# --------------------------------------------------------------------------- end to end


def test_collector_gets_a_pods_alert_with_its_kubernetes_fields(containerd, bb_image,
                                                                 host_image, kernel_ok,
                                                                 tmp_path) -> None:
    """Through the real collector: a short-lived Job container's DRIFT carries pod uid,
    workload and image digest, and so does the stored alert and `alerts --json`; a short-lived
    `docker run --rm` raises its DRIFT too; the heartbeats list a pod's running container, so
    an operator's pause reaches it although it never raised an alert."""
    import grpc
    from driftwarden.proto.v1 import (
        actions_pb2,
        actions_pb2_grpc,
        alerts_pb2,
        common_pb2,
    )

    from tests.support.collector_proc import CollectorProcess
    from tests.support.e2e import Subscriptions, query

    digest = containerd.add_repo_digest(host_image)
    collector = CollectorProcess(tmp_path / "c.db", tmp_path / "collector.log")
    agent = AgentProcess(tmp_path / "state", tmp_path / "alerts.jsonl",
                         ["--runtime-endpoint", containerd.endpoint, "--docker-host", DOCKER,
                          "--node", "node-k", "--heartbeat", "1", "--window", "1"])
    with collector:
        agent.extra += ["--collector", collector.address]
        channel = grpc.insecure_channel(collector.address)
        with channel, Subscriptions(channel) as subscriptions, agent, \
                containerd.pod(job_pod_name(), namespace="batch", labels=JOB_LABELS) as job, \
                containerd.pod(deployment_pod_name(), namespace="shop",
                               labels={"pod-template-hash": TEMPLATE_HASH}) as web:
            sub = subscriptions.open(alerts_pb2.SubscribeRequest(
                filter=alerts_pb2.AlertFilter(kinds=[common_pb2.ALERT_KIND_DRIFT])))
            sleeper = web.run(bb_image, SLEEPER, name="app")
            in_job, _ = run_short_lived(job, host_image, HOST_DROP_AND_RUN)
            docker_id, _ = docker_run_rm(bb_image, SHORT_SCRIPT)

            def drift_of(container_id: str) -> common_pb2.Alert:
                try:
                    return wait_until(lambda: next((a for a in sub.alerts()
                                                    if a.container.id == container_id), None),
                                      30, f"the drift of {container_id[:12]}")
                except AssertionError as exc:
                    raise AssertionError(f"{exc} (job {in_job.id[:12]}, docker "
                                         f"{docker_id[:12]})\n{agent.log()[-5000:]}") from None

            job_alert, docker_alert = drift_of(in_job.id), drift_of(docker_id)
            listed = subprocess.run(
                [PY, "-m", "driftwarden", "alerts", "--collector", collector.address, "--json",
                 "--container", in_job.id], capture_output=True, text=True, timeout=60, cwd="/")
            stored = query(collector.db, "SELECT json FROM alerts WHERE id = ?",
                           [job_alert.id])
            actions = actions_pb2_grpc.ActionsStub(channel)

            def request(action: int) -> actions_pb2.ActionResponse | None:
                try:
                    return actions.Request(actions_pb2.ActionRequest(
                        container=sleeper.id, type=action, reason="e2e"), timeout=60)
                except grpc.RpcError as exc:  # not in a heartbeat yet
                    assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
                    return None

            results = [wait_until(lambda a=action: request(a), 10, "the action's routing")
                       for action in (actions_pb2.ACTION_TYPE_PAUSE,
                                      actions_pb2.ACTION_TYPE_RESUME)]
    c = job_alert.container
    assert job_alert.reasons[0].code == "exec-added-binary"
    assert job_alert.process.exe == "/tmp/true"
    assert (c.name, c.pod, c.namespace, c.pod_uid, c.workload, c.node) == (
        "job", job.name, "batch", job.uid, f"Job/{JOB}", "node-k")
    assert (c.image.name, c.image.digest, c.image.id) == (
        host_image, digest, digest.rsplit("@", 1)[1])
    # /tmp/true from the container's upper layer; a loaded agent may find it already deleted
    assert docker_alert.reasons[0].code in ("exec-added-binary", "exec-deleted-binary")
    assert (docker_alert.container.image.name, docker_alert.container.HasField("pod_uid")) == (
        bb_image, False)
    assert listed.returncode == 0, listed.stderr
    shown = [json.loads(line) for line in listed.stdout.splitlines()]
    [stored_container] = [json.loads(row[0])["container"] for row in stored]
    for container in (*(a["container"] for a in shown), stored_container):
        assert (container["pod_uid"], container["workload"], container["image_digest"]) == (
            job.uid, f"Job/{JOB}", digest)
    assert [a["id"] for a in shown] == [job_alert.id]
    assert [(r.status, r.container_id) for r in results] == [
        (actions_pb2.ACTION_STATUS_DONE, sleeper.id)] * 2, results
