"""runtimes/cri.py and runtimes/registry.py without a real runtime: parsing recorded CRI answers
(tests/data/cri/, recorded from containerd 1.6.20 by tests/support/containerd.py), the provider
and the event watcher against an in-process gRPC server replaying them, the image key, owner
workloads, endpoint flags and routing between runtimes.

The real containerd is in tests/test_cri_live.py."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc
from driftwarden.agent.runtimes.base import (
    ContainerEvent,
    ContainerEventAction,
    ContainerInfo,
    RuntimeState,
    familiar_image_name,
    image_key,
    owner_workload,
    pick_repo_digest,
)
from driftwarden.agent.runtimes.cri import (
    CriActions,
    CriContainers,
    CriEventWatcher,
    CriMetadata,
    CriRuntime,
    VerboseInfo,
    container_events_between,
    container_info_from_cri,
    guess_runtime_name,
    parse_container_event,
    parse_verbose_info,
    sandbox_info_from_cri,
)
from driftwarden.agent.runtimes.registry import (
    DEFAULT_ENDPOINTS,
    RunningContainers,
    RuntimeEndpoint,
    RuntimeRouter,
    RuntimeSet,
    docker_endpoint,
    parse_runtime_endpoint,
    probe_endpoints,
    resolve_endpoints,
)
from driftwarden.core.errors import (
    ContainerNotFoundError,
    MetadataUnavailableError,
    RuntimeActionError,
    RuntimeNotServedError,
    UsageError,
)
from google.protobuf import json_format

RECORDED = Path(__file__).parent / "data" / "cri" / "containerd-1.6.20"
CID = "107a5e7c980f7add458bd03e485382115c0fd19ad6d5dcbb1eafccf9a62d0145"
SANDBOX = "d4697e1ba96d3ba426781d84f63ae970f2d222fc7691bba197f75e8e2f882c2a"
POD_UID = "4f0ab913-49bd-4781-bd74-62f4d49f3374"
CONFIG_DIGEST = "sha256:215b129bc08dcb448a93964677cc242c17df566c4761a56d87b92d480e001003"
INDEX_DIGEST = "sha256:" + "9f" * 32


def recorded(name: str, message_type):
    return json_format.Parse((RECORDED / f"{name}.json").read_text(), message_type())


@pytest.fixture(scope="module")
def answers() -> dict:
    return {
        "list": recorded("list_containers", api_pb2.ListContainersResponse),
        "status": recorded("container_status", api_pb2.ContainerStatusResponse),
        "pod": recorded("pod_sandbox_status", api_pb2.PodSandboxStatusResponse),
        "image": recorded("image_status", api_pb2.ImageStatusResponse),
        "version": recorded("version", api_pb2.VersionResponse),
    }


EXPECTED = ContainerInfo(
    id=CID, name="app", image_id=CONFIG_DIGEST, image_name="dw-bb:947704673a0b",
    labels={"app": "web", "pod-template-hash": "7d4b9c8f6d",
            "io.kubernetes.pod.name": "web-7d4b9c8f6d-x2k9q",
            "io.kubernetes.pod.namespace": "shop", "io.kubernetes.pod.uid": POD_UID,
            "io.kubernetes.container.name": "app"},
    pod="web-7d4b9c8f6d-x2k9q", namespace="shop", runtime="containerd",
    started_at=1796490737.000513116, image_digest=None, pod_uid=POD_UID,
    workload="Deployment/web", pid=17369)


# --------------------------------------------------------------------------- parsing


def test_recorded_answers_make_the_container_info(answers) -> None:
    status = answers["status"]
    info = container_info_from_cri(status.status, pod=answers["pod"].status,
                                   image=answers["image"].image,
                                   verbose=parse_verbose_info(status.info), runtime="containerd")
    assert info == EXPECTED


def test_without_pod_and_image_the_kubelet_labels_still_name_the_pod(answers) -> None:
    """The pod removed first, the image removed while the container runs: the container's own
    labels say pod, namespace and uid; containerd's image_ref is the config digest."""
    info = container_info_from_cri(answers["status"].status, runtime="containerd")
    assert (info.pod, info.namespace, info.pod_uid, info.name) == (
        "web-7d4b9c8f6d-x2k9q", "shop", POD_UID, "app")
    assert (info.image_id, info.image_name, info.pid) == (CONFIG_DIGEST, "dw-bb:947704673a0b", 0)
    assert info.workload is None  # the owner's labels are the pod's
    assert dict(info.labels) == {k: v for k, v in EXPECTED.labels
                                 if k.startswith("io.kubernetes.")}


def test_a_repo_digest_is_the_image_key(answers) -> None:
    image = api_pb2.Image()
    image.CopyFrom(answers["image"].image)
    image.repo_digests.append(f"docker.io/library/dw-bb@{INDEX_DIGEST}")
    info = container_info_from_cri(answers["status"].status, pod=answers["pod"].status,
                                   image=image, runtime="containerd")
    assert (info.image_id, info.image_digest) == (INDEX_DIGEST,
                                                  f"docker.io/library/dw-bb@{INDEX_DIGEST}")


def test_kubelet_style_container_made_from_the_image_id(answers) -> None:
    """The kubelet creates containers from the image id and passes the name the user wrote in
    user_specified_image (CRI 1.29+); CRI-O answers a repo digest as image_ref."""
    status = api_pb2.ContainerStatus()
    status.CopyFrom(answers["status"].status)
    status.image.image = CONFIG_DIGEST
    status.image.user_specified_image = "registry.example:5000/shop/web:2.1"
    status.image_ref = f"registry.example:5000/shop/web@{INDEX_DIGEST}"
    info = container_info_from_cri(status, runtime="cri-o")
    assert info.image_name == "registry.example:5000/shop/web:2.1"
    assert (info.image_id, info.image_digest, info.runtime) == (
        INDEX_DIGEST, f"registry.example:5000/shop/web@{INDEX_DIGEST}", "cri-o")


@pytest.mark.parametrize(("info", "expected"), [
    ({}, VerboseInfo()),
    ({"info": "not json"}, VerboseInfo()),
    ({"info": "[1, 2]"}, VerboseInfo()),
    ({"info": json.dumps({"pid": 42, "sandboxID": "ab",
                          "runtimeSpec": {"linux": {"cgroupsPath": "/kubepods/x"}}})},
     VerboseInfo(42, "/kubepods/x", "ab")),
    ({"info": json.dumps({"pid": -1, "runtimeSpec": None})}, VerboseInfo()),
    # CRI-O with the systemd driver writes the slice:prefix:id form
    ({"info": json.dumps({"pid": 7, "runtimeSpec": {"linux": {
        "cgroupsPath": "kubepods-besteffort-podX.slice:crio:abc"}}})},
     VerboseInfo(7, "kubepods-besteffort-podX.slice:crio:abc", None)),
])
def test_parse_verbose_info(info: dict, expected: VerboseInfo) -> None:
    assert parse_verbose_info(info) == expected


@pytest.mark.parametrize(("kind", "action"), [
    (api_pb2.CONTAINER_CREATED_EVENT, ContainerEventAction.CREATE),
    (api_pb2.CONTAINER_STARTED_EVENT, ContainerEventAction.START),
    (api_pb2.CONTAINER_STOPPED_EVENT, ContainerEventAction.DIE),
    (api_pb2.CONTAINER_DELETED_EVENT, ContainerEventAction.DESTROY),
])
def test_parse_container_event(kind, action) -> None:
    raw = api_pb2.ContainerEventResponse(container_id=CID, container_event_type=kind,
                                         created_at=1_700_000_000_500_000_000)
    assert parse_container_event(raw) == ContainerEvent(action, CID, time=1_700_000_000.5)
    assert parse_container_event(api_pb2.ContainerEventResponse(
        container_event_type=api_pb2.CONTAINER_STARTED_EVENT)) is None


def test_container_events_between_listings() -> None:
    created, running, exited = (api_pb2.CONTAINER_CREATED, api_pb2.CONTAINER_RUNNING,
                                api_pb2.CONTAINER_EXITED)
    before = {"a": running, "b": running, "c": created, "d": exited, "e": running,
              "h": created}
    after = {"a": running, "b": exited, "c": running, "d": exited, "f": running, "g": created,
             "h": exited, "i": exited}
    create, start, die, destroy = (ContainerEventAction.CREATE, ContainerEventAction.START,
                                   ContainerEventAction.DIE, ContainerEventAction.DESTROY)
    assert container_events_between(before, after) == [
        ContainerEvent(die, "b"),
        ContainerEvent(start, "c"),
        ContainerEvent(destroy, "e"),
        ContainerEvent(create, "f"), ContainerEvent(start, "f"),
        ContainerEvent(create, "g"),
        ContainerEvent(start, "h"), ContainerEvent(die, "h"),
        # lived less than a listing's interval: all of its life at once
        ContainerEvent(create, "i"), ContainerEvent(start, "i"), ContainerEvent(die, "i"),
    ]
    assert container_events_between({}, {}) == []


# --------------------------------------------------------------------------- image key, names


def test_image_key_prefers_the_repo_digest() -> None:
    assert image_key(CONFIG_DIGEST, None) == CONFIG_DIGEST
    assert image_key(CONFIG_DIGEST, f"nginx@{INDEX_DIGEST}") == INDEX_DIGEST
    assert image_key(CONFIG_DIGEST, "nginx@sha256:short") == CONFIG_DIGEST


def test_pick_repo_digest() -> None:
    one, two = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    digests = [f"mirror.example/web@{one}", f"docker.io/library/web@{two}", "junk"]
    assert pick_repo_digest(digests, "web:1") == f"docker.io/library/web@{two}"
    assert pick_repo_digest(digests, "other:1") == f"mirror.example/web@{one}"
    assert pick_repo_digest(digests) == f"mirror.example/web@{one}"
    assert pick_repo_digest(["junk"], "web:1") is None
    assert pick_repo_digest([]) is None


@pytest.mark.parametrize(("reference", "familiar"), [
    ("docker.io/library/nginx:1.25", "nginx:1.25"),
    ("docker.io/org/app:2", "org/app:2"),
    ("registry.example:5000/app:1", "registry.example:5000/app:1"),
    ("nginx:1.25", "nginx:1.25"),
])
def test_familiar_image_name(reference: str, familiar: str) -> None:
    assert familiar_image_name(reference) == familiar


@pytest.mark.parametrize(("pod", "labels", "workload"), [
    ("web-7d4b9c8f6d-x2k9q", {"pod-template-hash": "7d4b9c8f6d", "app": "web"},
     "Deployment/web"),
    ("db-2", {"statefulset.kubernetes.io/pod-name": "db-2", "controller-revision-hash": "db-5"},
     "StatefulSet/db"),
    ("fluentd-4x7qz", {"controller-revision-hash": "6b9d", "pod-template-generation": "3"},
     "DaemonSet/fluentd"),
    ("backup-28999-kq2x7", {"batch.kubernetes.io/job-name": "backup-28999"}, "Job/backup-28999"),
    ("migrate-abcde", {"job-name": "migrate"}, "Job/migrate"),
    ("debug", {"run": "debug"}, None),
    ("web-x", {"pod-template-hash": "7d4b9c8f6d"}, None),  # the hash is not in its name
    (None, {"job-name": "x"}, None),
])
def test_owner_workload(pod, labels, workload) -> None:
    assert owner_workload(pod, labels) == workload


# --------------------------------------------------------------------------- a replaying runtime


class ReplayRuntime(api_pb2_grpc.RuntimeServiceServicer, api_pb2_grpc.ImageServiceServicer):
    """Answers the recorded responses for the recorded container, NOT_FOUND for others, and
    streams whatever events a test puts in `events` (None ends the stream)."""

    def __init__(self, answers: dict, *, events_served: bool = True) -> None:
        self.answers = answers
        self.events_served = events_served
        self.events: queue.Queue = queue.Queue()
        self.calls: list[str] = []

    def Version(self, request, context):
        self.calls.append("Version")
        return self.answers["version"]

    def ListContainers(self, request, context):
        self.calls.append("ListContainers")
        wanted = request.filter.id
        state = request.filter.state.state if request.filter.HasField("state") else None
        containers = [c for c in self.answers["list"].containers
                      if (not wanted or c.id == wanted) and state in (None, c.state)]
        return api_pb2.ListContainersResponse(containers=containers)

    def StopContainer(self, request, context):
        self.calls.append(f"StopContainer timeout={request.timeout}")
        if request.container_id != CID:
            context.abort(grpc.StatusCode.NOT_FOUND, f"container {request.container_id!r}: "
                          "not found")
        return api_pb2.StopContainerResponse()

    def ContainerStatus(self, request, context):
        self.calls.append("ContainerStatus")
        if request.container_id != CID:
            context.abort(grpc.StatusCode.NOT_FOUND, f"container {request.container_id!r}: "
                          "not found")
        return self.answers["status"]

    def PodSandboxStatus(self, request, context):
        self.calls.append("PodSandboxStatus")
        if request.pod_sandbox_id != SANDBOX:
            context.abort(grpc.StatusCode.NOT_FOUND, "sandbox not found")
        return self.answers["pod"]

    def ImageStatus(self, request, context):
        self.calls.append("ImageStatus")
        return self.answers["image"]

    def GetContainerEvents(self, request, context):
        self.calls.append("GetContainerEvents")
        if not self.events_served:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "method GetContainerEvents not "
                          "implemented")
        while context.is_active():
            try:
                event = self.events.get(timeout=0.1)
            except queue.Empty:
                continue
            if event is None:
                return
            yield event


@pytest.fixture
def replay(tmp_path: Path, answers) -> Iterator[tuple[str, ReplayRuntime]]:
    with _serve(tmp_path, ReplayRuntime(answers)) as served:
        yield served


@contextlib.contextmanager
def _serve(tmp_path: Path, servicer: ReplayRuntime, *,
           cri: bool = True) -> Iterator[tuple[str, ReplayRuntime]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    if cri:
        api_pb2_grpc.add_RuntimeServiceServicer_to_server(servicer, server)
        api_pb2_grpc.add_ImageServiceServicer_to_server(servicer, server)
    endpoint = f"unix://{tmp_path}/containerd.sock"
    server.add_insecure_port(endpoint)
    server.start()
    try:
        yield endpoint, servicer
    finally:
        server.stop(0)


def test_metadata_inspects_by_id_prefix_and_name(replay) -> None:
    endpoint, runtime = replay
    with CriMetadata(endpoint) as metadata:
        assert metadata.runtime == "containerd"
        assert metadata.inspect(CID) == EXPECTED
        assert runtime.calls == ["Version", "ListContainers", "ContainerStatus",
                                 "PodSandboxStatus", "ImageStatus"]
        runtime.calls.clear()
        assert metadata.inspect(CID[:8]) == EXPECTED
        assert metadata.inspect("app") == EXPECTED
        # the pod and the image were cached; each container is asked for
        assert runtime.calls == ["ListContainers", "ContainerStatus"] * 2
        assert metadata.inspect("f" * 64) is None
        assert metadata.inspect("nosuch") is None
        assert metadata.inspect("107") is None  # a prefix needs 4 digits


def test_a_pod_sandbox_is_described_as_the_pods_container(tmp_path: Path, answers) -> None:
    """The CRI lists sandboxes apart from containers, but the pause process has a cgroup of
    its own: asked by its id, the sandbox is the pod's "POD" container, with the pod's fields
    and the image containerd's verbose info names."""
    pod = api_pb2.PodSandboxStatusResponse()
    pod.CopyFrom(answers["pod"])
    pod.info["info"] = json.dumps({"pid": 17301, "image": "dw-bb:947704673a0b"})
    with _serve(tmp_path, ReplayRuntime({**answers, "pod": pod})) as (endpoint, runtime), \
            CriMetadata(endpoint) as metadata:
        info = metadata.inspect(SANDBOX)
    assert info == ContainerInfo(
        id=SANDBOX, name="POD", image_id=CONFIG_DIGEST, image_name="dw-bb:947704673a0b",
        labels={"app": "web", "pod-template-hash": "7d4b9c8f6d",
                "io.kubernetes.pod.name": "web-7d4b9c8f6d-x2k9q",
                "io.kubernetes.pod.namespace": "shop", "io.kubernetes.pod.uid": POD_UID},
        pod="web-7d4b9c8f6d-x2k9q", namespace="shop", runtime="containerd",
        started_at=1796490736.715584281, image_digest=None, pod_uid=POD_UID,
        workload="Deployment/web", pid=17301)
    assert runtime.calls == ["Version", "ListContainers", "PodSandboxStatus", "ImageStatus"]
    # without the verbose info: still the pod's, without an image (no detection, but named)
    assert sandbox_info_from_cri(answers["pod"].status).image_id == ""


def test_a_runtime_back_from_a_restart_is_asked_at_once(tmp_path: Path, answers) -> None:
    """gRPC waits before it reconnects after a failed connect, and fails calls meanwhile;
    a call that finds the runtime unavailable tries once more on a new connection, so the
    first container made after a restart is described, not given up on."""
    endpoint = f"unix://{tmp_path}/containerd.sock"
    # and another user of the endpoint in this process (as the agent's event watcher is)
    with CriMetadata(endpoint, timeout=2) as metadata, CriRuntime(endpoint) as watcher:
        for _ in range(4):  # the connection's wait grows with each failure
            with pytest.raises(MetadataUnavailableError):
                metadata.inspect(CID)
            with pytest.raises(RuntimeActionError):
                watcher.version()
        with _serve(tmp_path, ReplayRuntime(answers)):
            assert metadata.inspect(CID) == EXPECTED


def test_metadata_takes_the_layers_of_the_running_init(replay, tmp_path: Path) -> None:
    """While the container's init runs, its root mount is the container's overlay: kept with
    the metadata, so drift can be judged after the container exited."""
    endpoint, _ = replay
    proc = tmp_path / "proc"
    (proc / "17369").mkdir(parents=True)
    (proc / "17369" / "mountinfo").write_text(
        "2 1 0:50 / / rw - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/u,workdir=/w\n")
    with CriMetadata(endpoint, proc_root=str(proc)) as metadata:
        info = metadata.inspect(CID)
    assert info == EXPECTED
    assert info.graph_driver == {"Name": "overlay", "Data": {"UpperDir": "/u",
                                                             "LowerDir": "/l1:/l2"}}
    with CriMetadata(endpoint, proc_root=str(tmp_path / "none")) as metadata:
        assert metadata.inspect(CID).graph_driver is None  # the init is gone


def test_metadata_of_an_unreachable_runtime(tmp_path: Path) -> None:
    endpoint = f"unix://{tmp_path}/crio/crio.sock"
    with CriMetadata(endpoint, timeout=2) as metadata:
        assert metadata.runtime == "cri-o"
        with pytest.raises(MetadataUnavailableError) as raised:
            metadata.inspect(CID)
    assert str(raised.value) == (f"cri-o unreachable at {endpoint}: No such file or directory")


def test_a_socket_without_the_cri_is_not_served(tmp_path: Path, answers) -> None:
    with _serve(tmp_path, ReplayRuntime(answers), cri=False) as (endpoint, _):
        with CriRuntime(endpoint, timeout=2) as client, \
                pytest.raises(RuntimeNotServedError) as raised:
            client.version()
        # a Go server (Docker's containerd, tests/test_cri_live.py) says "unknown service"
        assert str(raised.value) == (
            f"containerd at {endpoint} does not serve the CRI (runtime.v1): Method not found!; "
            "its CRI plugin is off (as in Docker's own containerd, whose containers are asked "
            "through Docker)")
        assert resolve_endpoints(probe=lambda e=endpoint: [parse_runtime_endpoint(e)]) == [
            docker_endpoint("unix:///var/run/docker.sock")]


def test_not_found_is_its_own_error(replay) -> None:
    endpoint, _ = replay
    with CriRuntime(endpoint) as client, pytest.raises(ContainerNotFoundError) as raised:
        client.call("container status", lambda rt, _: rt.ContainerStatus(
            api_pb2.ContainerStatusRequest(container_id="nope"), timeout=2))
    assert str(raised.value) == "containerd container status: container 'nope': not found"
    assert isinstance(raised.value, RuntimeActionError)


# what a containerd watcher says when it (re)connects
RESYNC = ContainerEvent(ContainerEventAction.RESYNC, None, runtime="containerd")


def _collect(watcher_events: list, wanted: int, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    while len(watcher_events) < wanted and time.monotonic() < deadline:
        time.sleep(0.02)
    return list(watcher_events)


def test_event_watcher_follows_the_event_stream(replay) -> None:
    endpoint, runtime = replay
    seen: list[ContainerEvent] = []
    watcher = CriEventWatcher(endpoint, seen.append, initial_backoff=0.05)
    with watcher:
        assert _collect(seen, 1) == [RESYNC]
        assert watcher.connected and not watcher.polling
        for kind in (api_pb2.CONTAINER_CREATED_EVENT, api_pb2.CONTAINER_STARTED_EVENT,
                     api_pb2.CONTAINER_DELETED_EVENT):
            runtime.events.put(api_pb2.ContainerEventResponse(
                container_id=CID, container_event_type=kind, created_at=2_000_000_000))
        assert _collect(seen, 4)[1:] == [
            ContainerEvent(ContainerEventAction.CREATE, CID, time=2.0),
            ContainerEvent(ContainerEventAction.START, CID, time=2.0),
            ContainerEvent(ContainerEventAction.DESTROY, CID, time=2.0)]
        runtime.events.put(None)  # the stream ends (a runtime restart): reconnect, resync
        assert _collect(seen, 5)[4] == RESYNC
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 2.0
    assert not watcher.connected


def test_event_watcher_polls_a_runtime_without_the_stream(tmp_path: Path, answers) -> None:
    with _serve(tmp_path, ReplayRuntime(answers, events_served=False)) as (endpoint, runtime):
        seen: list[ContainerEvent] = []
        watcher = CriEventWatcher(endpoint, seen.append, poll_interval=0.05)
        with watcher:
            assert _collect(seen, 1) == [RESYNC]
            assert watcher.polling and watcher.connected
            listed = runtime.answers["list"]
            runtime.answers["list"] = api_pb2.ListContainersResponse()
            assert _collect(seen, 2)[1] == ContainerEvent(ContainerEventAction.DESTROY, CID)
            runtime.answers["list"] = listed
            assert _collect(seen, 4)[2:] == [ContainerEvent(ContainerEventAction.CREATE, CID),
                                             ContainerEvent(ContainerEventAction.START, CID)]
        assert runtime.calls.count("GetContainerEvents") == 1


def test_event_watcher_says_when_the_runtime_is_away_and_when_it_is_back(tmp_path: Path,
                                                                       answers) -> None:
    """Every failed try is an UNREACHABLE naming the runtime and why (the attributor's outage
    and gauge); once the runtime listens on its socket again (a restart), the watcher's next
    try connects at once: a RESYNC, within a second or so, not after gRPC's growing wait."""
    endpoint = f"unix://{tmp_path}/containerd.sock"
    seen: list[ContainerEvent] = []
    watcher = CriEventWatcher(endpoint, seen.append, poll_interval=0.05, initial_backoff=0.05,
                              max_backoff=0.2)
    with watcher:
        assert _collect(seen, 3)[:3] == [ContainerEvent(
            ContainerEventAction.UNREACHABLE, None, runtime="containerd",
            error=f"containerd unreachable at {endpoint}: No such file or directory")] * 3
        time.sleep(5)  # gRPC alone would wait 2.6 s by now before its next try
        with _serve(tmp_path, ReplayRuntime(answers, events_served=False)):
            back = time.monotonic()
            deadline = back + 10
            while RESYNC not in seen and time.monotonic() < deadline:
                time.sleep(0.02)
            took = time.monotonic() - back
            assert watcher.connected
    assert RESYNC in seen and took < 1.5, took
    assert {e.action for e in seen[:seen.index(RESYNC)]} == {ContainerEventAction.UNREACHABLE}


# --------------------------------------------------------------------------- endpoints, routing


@pytest.mark.parametrize(("text", "expected"), [
    ("unix:///run/containerd/containerd.sock",
     RuntimeEndpoint("unix:///run/containerd/containerd.sock", "cri", "containerd")),
    ("/run/crio/crio.sock", RuntimeEndpoint("unix:///run/crio/crio.sock", "cri", "cri-o")),
    ("unix:///var/run/docker.sock",
     RuntimeEndpoint("unix:///var/run/docker.sock", "docker", "docker")),
    ("unix:///run/podman/podman.sock",
     RuntimeEndpoint("unix:///run/podman/podman.sock", "docker", "podman")),
    ("unix:///run/cri-dockerd.sock",
     RuntimeEndpoint("unix:///run/cri-dockerd.sock", "cri", "containerd")),
    ("unix:///run/k3s/containerd/containerd.sock",
     RuntimeEndpoint("unix:///run/k3s/containerd/containerd.sock", "cri", "containerd")),
])
def test_parse_runtime_endpoint(text: str, expected: RuntimeEndpoint) -> None:
    assert parse_runtime_endpoint(text) == expected


@pytest.mark.parametrize("text", ["tcp://127.0.0.1:2375", "containerd.sock", "unix://relative",
                                  "unix:///run/"])
def test_parse_runtime_endpoint_refuses(text: str) -> None:
    with pytest.raises(UsageError, match=r"^--runtime-endpoint '.*': .*unix:///"):
        parse_runtime_endpoint(text)


def test_resolve_endpoints() -> None:
    containerd = parse_runtime_endpoint(DEFAULT_ENDPOINTS[0])
    docker = docker_endpoint("unix:///var/run/docker.sock")

    def probe() -> list[RuntimeEndpoint]:
        return [containerd, docker]

    assert resolve_endpoints(probe=probe, served=lambda e: True) == [containerd, docker]
    assert resolve_endpoints(probe=probe, served=lambda e: False) == [docker]
    assert resolve_endpoints(probe=lambda: []) == [docker]  # "docker unreachable" as before
    given = resolve_endpoints(["/run/crio/crio.sock", "unix:///run/crio/crio.sock"],
                              "tcp://127.0.0.1:2375", probe=probe)
    assert given == [RuntimeEndpoint("unix:///run/crio/crio.sock", "cri", "cri-o"),
                     RuntimeEndpoint("tcp://127.0.0.1:2375", "docker", "docker")]


def test_probe_endpoints_lists_the_sockets_that_exist() -> None:
    present = {"/run/crio/crio.sock", "/var/run/docker.sock"}
    assert [e.url for e in probe_endpoints(exists=present.__contains__)] == [
        "unix:///run/crio/crio.sock", "unix:///var/run/docker.sock"]


class FakeProvider:
    def __init__(self, runtime: str, known: dict[str, ContainerInfo] | None = None,
                 down: str | None = None) -> None:
        self.runtime = runtime
        self.endpoint = f"unix:///{runtime}.sock"
        self.known = known or {}
        self.down = down
        self.asked: list[str] = []

    def inspect(self, container_id: str) -> ContainerInfo | None:
        self.asked.append(container_id)
        if self.down:
            raise MetadataUnavailableError(self.down)
        return self.known.get(container_id)

    def close(self) -> None:
        pass


def test_runtime_set_asks_the_named_runtime_first() -> None:
    ours = ContainerInfo(id="c" * 64, name="app", image_id=CONFIG_DIGEST, image_name="x",
                         runtime="cri-o")
    docker, crio = FakeProvider("docker"), FakeProvider("cri-o", {ours.id: ours})
    runtimes = RuntimeSet([docker, crio])
    # a kubelet cgroupfs path says "containerd" for any CRI runtime
    assert runtimes.inspect_for(ours.id, "containerd") == ours
    assert (docker.asked, crio.asked) == ([], [ours.id])
    assert runtimes.inspect_for("d" * 64, "docker") is None
    assert docker.asked == ["d" * 64]
    with pytest.raises(MetadataUnavailableError, match=r"^no runtime endpoint for podman"):
        runtimes.inspect_for("e" * 64, "podman")


def test_runtime_set_outage_of_the_containers_own_runtime() -> None:
    docker = FakeProvider("docker", down="docker unreachable at unix:///x: gone")
    containerd = FakeProvider("containerd")
    runtimes = RuntimeSet([docker, containerd])
    # docker down: a container containerd does not know is simply not found
    assert runtimes.inspect_for("a" * 64, "containerd") is None
    with pytest.raises(MetadataUnavailableError, match=r"^docker unreachable"):
        runtimes.inspect_for("a" * 64, "docker")
    with pytest.raises(MetadataUnavailableError, match=r"^docker unreachable"):
        runtimes.inspect("a" * 64)


def test_guess_runtime_name() -> None:
    assert guess_runtime_name("unix:///run/crio/crio.sock") == "cri-o"
    assert guess_runtime_name("unix:///var/run/crio.sock") == "cri-o"
    assert guess_runtime_name("unix:///run/containerd/containerd.sock") == "containerd"


def test_stubs_are_the_registry_package() -> None:
    """cri_api comes from PyPI (pip install --no-deps): never a copy in this repository."""
    import cri_api

    assert "site-packages" in cri_api.__file__
    root = Path(__file__).resolve().parents[1]
    copies = [path for folder in ("agent", "core", "probes", "models", "collector", "ops",
                                  "cli", "proto", "tests")
              for path in (root / folder).rglob("api_pb2*.py")]
    assert copies == []


def test_watcher_threads_end(replay) -> None:
    endpoint, _ = replay
    for _ in range(3):
        with CriEventWatcher(endpoint, lambda event: None):
            pass
    assert [t.name for t in threading.enumerate() if t.name == "driftwarden-cri-events"] == []


# --------------------------------------------------------------------------- actions, heartbeats


POD_CGROUP = f"/kubepods/besteffort/pod{POD_UID}/{CID}"


class FakeFreezer:
    def __init__(self) -> None:
        self.frozen_paths: set = set()
        self.calls: list[tuple[str, Any]] = []

    def frozen(self, paths) -> bool:
        return paths in self.frozen_paths

    def freeze(self, paths) -> None:
        self.calls.append(("freeze", paths))
        self.frozen_paths.add(paths)

    def thaw(self, paths) -> None:
        self.calls.append(("thaw", paths))
        self.frozen_paths.discard(paths)


def test_cri_actions_pause_through_the_freezer_and_kill_by_stop(replay, tmp_path: Path) -> None:
    from driftwarden.agent.freezer import CgroupPaths

    endpoint, runtime = replay
    proc = tmp_path / "proc"
    (proc / "17369").mkdir(parents=True)
    (proc / "17369" / "cgroup").write_text(f"6:freezer:{POD_CGROUP}\n0::{POD_CGROUP}\n")
    freezer = FakeFreezer()
    paths = CgroupPaths(POD_CGROUP, POD_CGROUP)
    with CriActions(endpoint, freezer=freezer, proc_root=str(proc)) as actions:
        assert actions.state(CID) == RuntimeState("running", True, False, pid=17369)
        actions.pause(CID)
        assert actions.state(CID) == RuntimeState("paused", True, True, pid=17369)
        actions.unpause(CID)
        (proc / "17369" / "cgroup").unlink()  # the init gone: the spec's cgroupsPath says
        actions.pause(CID)
        actions.kill(CID)
        with pytest.raises(ContainerNotFoundError):
            actions.state("f" * 64)
        with pytest.raises(ContainerNotFoundError):
            actions.kill("f" * 64)
    assert freezer.calls == [("freeze", paths), ("thaw", paths), ("freeze", paths)]
    # ours, then the unknown one's (NOT_FOUND)
    assert [c for c in runtime.calls if c.startswith("Stop")] == ["StopContainer timeout=0"] * 2


def test_cri_containers_lists_the_running_ones(replay) -> None:
    endpoint, runtime = replay
    with CriContainers(endpoint) as containers:
        assert containers() == ((CID, "app", CONFIG_DIGEST, "dw-bb:947704673a0b"),)
        exited = api_pb2.ListContainersResponse()
        exited.CopyFrom(runtime.answers["list"])
        exited.containers[0].state = api_pb2.CONTAINER_EXITED
        runtime.answers = {**runtime.answers, "list": exited}
        assert containers() == ()


class FakeRuntime:
    def __init__(self, runtime: str, known: dict[str, RuntimeState] | None = None,
                 down: str | None = None) -> None:
        self.runtime = runtime
        self.endpoint = f"unix:///{runtime}.sock"
        self.known = dict(known or {})
        self.down = down
        self.calls: list[tuple[str, str]] = []

    def state(self, container_id: str) -> RuntimeState:
        self.calls.append(("state", container_id))
        if self.down:
            raise RuntimeActionError(self.down)
        if container_id not in self.known:
            raise ContainerNotFoundError(f"{self.runtime}: no such container")
        return self.known[container_id]

    def _act(self, action: str, container_id: str) -> None:
        self.calls.append((action, container_id))
        if container_id not in self.known:
            raise ContainerNotFoundError(f"{self.runtime}: no such container")

    def pause(self, container_id: str) -> None:
        self._act("pause", container_id)

    def unpause(self, container_id: str) -> None:
        self._act("unpause", container_id)

    def kill(self, container_id: str) -> None:
        self._act("kill", container_id)

    def close(self) -> None:
        self.calls.append(("close", ""))


RUNNING = RuntimeState("running", True, False, pid=7)


def test_runtime_router_sends_each_container_to_its_runtime() -> None:
    docker = FakeRuntime("docker", {"d" * 64: RUNNING})
    containerd = FakeRuntime("containerd", {"c" * 64: RUNNING})
    router = RuntimeRouter([docker, containerd])
    assert router.state("c" * 64) == RUNNING
    router.pause("c" * 64)
    router.kill("d" * 64)
    assert docker.calls == [("state", "c" * 64), ("state", "d" * 64), ("kill", "d" * 64)]
    assert containerd.calls == [("state", "c" * 64), ("pause", "c" * 64)]  # owner remembered
    with pytest.raises(ContainerNotFoundError, match=r"^no runtime knows container eeeeeeeeeeee "
                       r"\(asked docker at unix:///docker.sock, containerd at "):
        router.state("e" * 64)
    del containerd.known["c" * 64]  # removed: asked of every runtime again next time
    with pytest.raises(ContainerNotFoundError):
        router.unpause("c" * 64)
    with pytest.raises(ContainerNotFoundError):
        router.state("c" * 64)
    router.close()
    assert ("close", "") in docker.calls and ("close", "") in containerd.calls


def test_runtime_router_says_which_runtime_could_not_be_asked() -> None:
    router = RuntimeRouter([FakeRuntime("docker", down="docker unreachable at unix:///x: gone"),
                            FakeRuntime("containerd", {"c" * 64: RUNNING})])
    assert router.state("c" * 64) == RUNNING  # another runtime knows it: fine
    with pytest.raises(RuntimeActionError, match=r"^docker unreachable at unix:///x: gone$"):
        router.state("e" * 64)


def test_running_containers_of_every_runtime_and_the_last_list_of_one_away(
        replay, tmp_path: Path) -> None:
    endpoint, _ = replay
    away = docker_endpoint(f"unix://{tmp_path}/no-docker.sock")
    running = RunningContainers([parse_runtime_endpoint(endpoint), away])
    try:
        ours = (CID, "app", CONFIG_DIGEST, "dw-bb:947704673a0b")
        assert running() == (ours,)
        running._last[away.url] = (("d" * 64, "web", None, "shop/web:1"), ours)
        assert running() == (ours, ("d" * 64, "web", None, "shop/web:1"))
        assert running._failing == {away.url}
    finally:
        running.close()
