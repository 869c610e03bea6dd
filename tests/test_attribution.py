"""Attribution: cgroup path parsing, the cgroup id index, metadata caching, and real Docker."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from driftwarden.agent import cgroups
from driftwarden.agent.attribution import (
    NO_PROVIDER_ERROR,
    NOT_FOUND_ERROR,
    Attribution,
    AttributionState,
    Attributor,
)
from driftwarden.agent.cgroups import CgroupIndex, ContainerRef, parse_cgroup_path
from driftwarden.agent.runtimes.base import (
    ContainerEvent,
    ContainerEventAction,
    ContainerInfo,
    normalize_image_reference,
)
from driftwarden.agent.runtimes.docker import (
    DockerMetadata,
    container_info_from_docker,
    parse_docker_event,
)
from driftwarden.core.errors import AttributionError, MetadataUnavailableError

ID_A = "a" * 64
ID_B = "0123456789abcdef" * 4
ID_C = "c0ffee" + "1" * 58
ID_D = "d" * 64
POD_UID = "8f2c1b3e-5a6d-4e7f-9a0b-1c2d3e4f5a6b"
POD_UID_SYSTEMD = POD_UID.replace("-", "_")
STATIC_POD_UID = "6a4b0e0a9f3c2d1e8b7a6c5d4e3f2a1b"


# --------------------------------------------------------------------------- parse_cgroup_path

PARSE_CASES = [
    # docker, cgroupfs driver
    (f"/docker/{ID_A}", ContainerRef("docker", ID_A)),
    # docker, systemd driver
    (f"/system.slice/docker-{ID_B}.scope", ContainerRef("docker", ID_B)),
    # kubelet cgroupfs: the runtime is not in the path
    (f"/kubepods/burstable/pod{POD_UID}/{ID_C}", ContainerRef("containerd", ID_C, POD_UID)),
    (f"/kubepods/besteffort/pod{POD_UID}/{ID_C}", ContainerRef("containerd", ID_C, POD_UID)),
    (f"/kubepods/pod{POD_UID}/{ID_C}", ContainerRef("containerd", ID_C, POD_UID)),
    (f"/kubepods/pod{STATIC_POD_UID}/{ID_C}", ContainerRef("containerd", ID_C, STATIC_POD_UID)),
    # kubelet systemd with containerd, CRI-O and dockershim
    (
        "/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{POD_UID_SYSTEMD}.slice/cri-containerd-{ID_C}.scope",
        ContainerRef("containerd", ID_C, POD_UID),
    ),
    (
        f"/kubepods.slice/kubepods-pod{POD_UID_SYSTEMD}.slice/crio-{ID_D}.scope",
        ContainerRef("cri-o", ID_D, POD_UID),
    ),
    (
        "/kubepods.slice/kubepods-besteffort.slice/"
        f"kubepods-besteffort-pod{POD_UID_SYSTEMD}.slice/docker-{ID_A}.scope",
        ContainerRef("docker", ID_A, POD_UID),
    ),
    # CRI-O's monitor is not a container
    (f"/kubepods.slice/kubepods-pod{POD_UID_SYSTEMD}.slice/crio-conmon-{ID_D}.scope", None),
    # podman: root (machine.slice), rootless (user slice), cgroupfs, its inner "container" dir
    (f"/machine.slice/libpod-{ID_B}.scope", ContainerRef("podman", ID_B)),
    (
        f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{ID_B}.scope",
        ContainerRef("podman", ID_B),
    ),
    (f"/machine.slice/libpod-{ID_B}.scope/container", ContainerRef("podman", ID_B)),
    (f"/libpod_parent/libpod-{ID_B}", ContainerRef("podman", ID_B)),
    (f"/machine.slice/libpod-conmon-{ID_B}.scope", None),
    # docker-in-docker: the innermost container wins
    (f"/docker/{ID_A}/docker/{ID_B}", ContainerRef("docker", ID_B)),
    # a systemd running inside a container: its sub-cgroups belong to the container
    (f"/docker/{ID_A}/system.slice/cron.service", ContainerRef("docker", ID_A)),
    # docker-in-docker inside a pod: the inner container is not the pod's
    (f"/kubepods/pod{POD_UID}/{ID_C}/docker/{ID_A}", ContainerRef("docker", ID_A)),
    # host cgroups
    ("/", None),
    ("", None),
    ("/init.scope", None),
    ("/system.slice/ssh.service", None),
    ("/system.slice/docker.service", None),
    ("/system.slice/containerd.service", None),
    ("/user.slice/user-1000.slice/session-3.scope", None),
    ("/docker", None),
    (f"/kubepods/burstable/pod{POD_UID}", None),
    # near misses: short id, upper-case hex, a bare id under an unknown parent
    (f"/docker/{ID_A[:63]}", None),
    (f"/docker/{ID_A.upper()}", None),
    (f"/custom-parent/{ID_A}", None),
]


@pytest.mark.parametrize(
    ("path", "expected"), PARSE_CASES, ids=[c[0] or "empty" for c in PARSE_CASES]
)
def test_parse_cgroup_path(path: str, expected: ContainerRef | None) -> None:
    assert parse_cgroup_path(path) == expected


def test_parse_cgroup_path_tolerates_trailing_slash_and_newline() -> None:
    assert parse_cgroup_path(f"/docker/{ID_A}/\n") == ContainerRef("docker", ID_A)


# --------------------------------------------------------------------------- fixtures and fakes


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeMetadata:
    """MetadataProvider whose answers, failures and speed the test controls."""

    def __init__(self, containers: dict[str, ContainerInfo] | None = None) -> None:
        self.containers = dict(containers or {})
        self.unreachable: str | None = None
        self.crash: Exception | None = None
        self.gate: threading.Event | None = None  # when set, inspect blocks until it is set
        self.calls: list[str] = []

    def inspect(self, container_id: str) -> ContainerInfo | None:
        self.calls.append(container_id)
        if self.gate is not None:
            self.gate.wait(10)
        if self.unreachable is not None:
            raise MetadataUnavailableError(self.unreachable)
        if self.crash is not None:
            raise self.crash
        return self.containers.get(container_id)


def make_info(container_id: str, name: str = "web", **overrides: Any) -> ContainerInfo:
    fields: dict[str, Any] = {
        "id": container_id,
        "name": name,
        "image_id": "sha256:" + "e" * 64,
        "image_name": "shop/web:1.2",
        "labels": {"team": "blue"},
    }
    fields.update(overrides)
    return ContainerInfo(**fields)


CGROUP_DIRS = [
    f"docker/{ID_A}",
    f"docker/{ID_B}",
    f"docker/{ID_D}",
    "system.slice/ssh.service",
    "init.scope",
    f"kubepods/burstable/pod{POD_UID}/{ID_C}",
]


@pytest.fixture
def cgroup_root(tmp_path: Path) -> Path:
    """A cgroup-like tree; tmp_path directories have real, distinct inode numbers."""
    root = tmp_path / "cgroup"
    for relative in CGROUP_DIRS:
        (root / relative).mkdir(parents=True)
    (root / "cgroup.procs").write_text("")  # files must be ignored
    return root


def cgroup_id(root: Path, relative: str) -> int:
    return os.stat(root / relative.lstrip("/")).st_ino


def unused_inode(root: Path) -> int:
    used = {os.stat(path).st_ino for path in [root, *root.rglob("*")]}
    return max(used) + 1_000_003


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake() -> FakeMetadata:
    return FakeMetadata(
        {ID_A: make_info(ID_A, "web"), ID_C: make_info(ID_C, "api", pod="api-0", namespace="shop")}
    )


@pytest.fixture
def make_attributor(cgroup_root: Path, clock: FakeClock) -> Iterator[Callable[..., Attributor]]:
    created: list[Attributor] = []

    def build(metadata: Any, **options: Any) -> Attributor:
        options.setdefault("clock", clock)
        index = CgroupIndex(cgroup_root, clock=clock, min_rescan_interval=0.5)
        attributor = Attributor(index, metadata, **options)
        created.append(attributor)
        return attributor

    yield build
    for attributor in created:
        attributor.stop()


# --------------------------------------------------------------------------- CgroupIndex


def test_index_maps_ids_to_relative_paths(cgroup_root: Path, clock: FakeClock) -> None:
    index = CgroupIndex(cgroup_root, clock=clock)
    assert index.path_of(os.stat(cgroup_root).st_ino) == "/"
    for relative in CGROUP_DIRS:
        assert index.path_of(cgroup_id(cgroup_root, relative)) == "/" + relative
    assert index.path_of(cgroup_id(cgroup_root, "kubepods/burstable")) == "/kubepods/burstable"
    stats = index.stats
    assert stats["rescans"] == 1  # one walk answered everything
    assert stats["entries"] == 1 + len(CGROUP_DIRS) + 5  # root, leaves, intermediate dirs
    assert index.root == cgroup_root


def test_watcher_names_cgroups_made_and_removed_between_lookups(tmp_path: Path) -> None:
    """A container that lives a few ms: its cgroup is made and removed before its events are
    looked at. The watcher saw it made (inotify works on any directory tree, cgroupfs too)."""
    root = tmp_path / "cgroup"
    (root / "kubepods/besteffort").mkdir(parents=True)
    clock = FakeClock()
    index = CgroupIndex(root, clock=clock, min_rescan_interval=3600.0, use_file_handles=False)
    index.rescan()
    with cgroups.CgroupWatcher(index) as watcher:
        pod = root / f"kubepods/besteffort/pod{POD_UID}"
        pod.mkdir()
        (pod / ID_C).mkdir()  # at once: maybe before the pod's own watch is in place
        inode = (pod / ID_C).stat().st_ino
        deadline = time.monotonic() + 5
        while watcher.stats["created"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        later = pod / ID_D
        later.mkdir()
        later_inode = later.stat().st_ino
        while watcher.stats["created"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        (pod / ID_C).rmdir()  # (a test tree may reuse inode numbers; cgroupfs does not)
        later.rmdir()
    assert index.path_of(inode) == f"/kubepods/besteffort/pod{POD_UID}/{ID_C}"
    assert index.path_of(later_inode) == f"/kubepods/besteffort/pod{POD_UID}/{ID_D}"
    assert index.stats["rescans"] == 1  # the walk at the start only
    assert watcher.stats["watch_errors"] == 0


def test_index_finds_directory_created_after_first_scan(
    cgroup_root: Path, clock: FakeClock
) -> None:
    index = CgroupIndex(cgroup_root, clock=clock, min_rescan_interval=0.5)
    index.path_of(cgroup_id(cgroup_root, f"docker/{ID_A}"))
    new_dir = cgroup_root / "docker" / ("f" * 64)
    new_dir.mkdir()
    new_id = new_dir.stat().st_ino

    clock.advance(0.1)
    assert index.path_of(new_id) is None  # too soon after the last walk
    assert index.stats["rescans"] == 1
    assert index.stats["rescans_skipped"] == 1

    clock.advance(0.5)
    assert index.path_of(new_id) == f"/docker/{'f' * 64}"
    assert index.stats["rescans"] == 2
    assert index.stats["misses"] == 3  # first lookup, rate-limited one, the one that walked


def test_index_rate_limits_rescans_for_unknown_ids(cgroup_root: Path, clock: FakeClock) -> None:
    index = CgroupIndex(cgroup_root, clock=clock, min_rescan_interval=0.5)
    missing = unused_inode(cgroup_root)
    for _ in range(100):
        assert index.path_of(missing) is None
        clock.advance(0.01)  # 100 misses over one second
    assert index.stats["rescans"] == 2
    assert index.stats["rescans_skipped"] == 98


def test_index_keeps_removed_cgroups_for_late_events(cgroup_root: Path, clock: FakeClock) -> None:
    index = CgroupIndex(cgroup_root, clock=clock)
    gone = cgroup_root / "docker" / ID_D
    gone_id = gone.stat().st_ino
    index.rescan()
    gone.rmdir()
    clock.advance(10)
    index.rescan()
    assert index.path_of(gone_id) == f"/docker/{ID_D}"


def test_index_survives_directories_vanishing_mid_walk(
    cgroup_root: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_scandir = os.scandir
    victim = os.fspath(cgroup_root / "system.slice")

    def scandir_losing_victim(path: Any) -> Any:
        if os.fspath(path) == victim:
            raise FileNotFoundError(2, "No such file or directory", victim)
        return real_scandir(path)

    monkeypatch.setattr(cgroups.os, "scandir", scandir_losing_victim)
    index = CgroupIndex(cgroup_root, clock=clock)
    assert index.path_of(cgroup_id(cgroup_root, f"docker/{ID_B}")) == f"/docker/{ID_B}"
    # The vanished directory itself was listed before it went; its children were not.
    assert index.path_of(cgroup_id(cgroup_root, "system.slice")) == "/system.slice"
    clock.advance(1)
    assert index.path_of(cgroup_id(cgroup_root, "system.slice/ssh.service")) is None


def test_index_with_missing_root_reports_nothing(tmp_path: Path, clock: FakeClock) -> None:
    index = CgroupIndex(tmp_path / "absent", clock=clock)
    assert index.path_of(1) is None
    assert index.stats["scan_errors"] == 1


def test_index_is_bounded(cgroup_root: Path, clock: FakeClock) -> None:
    index = CgroupIndex(cgroup_root, clock=clock, max_entries=3)
    index.rescan()
    assert index.stats["entries"] == 3
    assert index.stats["evicted"] > 0
    with pytest.raises(ValueError):
        CgroupIndex(cgroup_root, max_entries=0)


# --------------------------------------------------------------------------- metadata values


def test_container_info_is_frozen_hashable_and_serialisable() -> None:
    info = ContainerInfo(
        id=ID_A,
        name="/web",
        image_id="sha256:" + "e" * 64,
        image_name="web:1",
        labels={"b": "2", "a": "1"},
    )
    assert info.name == "web"
    assert info.labels == (("a", "1"), ("b", "2"))
    assert info == make_info(ID_A, "web", labels=[("b", "2"), ("a", "1")], image_name="web:1")
    assert hash(info) == hash(
        make_info(ID_A, "web", labels={"a": "1", "b": "2"}, image_name="web:1")
    )
    assert info.label("a") == "1"
    assert info.label("missing") is None
    assert info.label("missing", "x") == "x"
    assert json.loads(json.dumps(info.to_dict()))["labels"] == {"a": "1", "b": "2"}
    with pytest.raises(AttributeError):
        info.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("dw-test-bb", "dw-test-bb:latest"),
        ("dw-test-bb:latest", "dw-test-bb:latest"),
        ("shop/web:1.2", "shop/web:1.2"),
        ("registry.local:5000/shop/web", "registry.local:5000/shop/web:latest"),
        ("registry.local:5000/shop/web:2", "registry.local:5000/shop/web:2"),
        ("web@sha256:" + "1" * 64, "web@sha256:" + "1" * 64),
        ("", ""),
    ],
)
def test_normalize_image_reference(reference: str, expected: str) -> None:
    assert normalize_image_reference(reference) == expected


def docker_inspect_answer(config_image: str = "dw-test-bb") -> dict[str, Any]:
    return {
        "Id": ID_A,
        "Name": "/shop-web-1",
        "Image": "sha256:882428fbc2d09972dcd7e6dd41154a913ab769e28cf714e633f27b49b7b40171",
        "Config": {
            "Image": config_image,
            "Labels": {
                "io.kubernetes.pod.name": "web-0",
                "io.kubernetes.pod.namespace": "shop",
                "team": "blue",
            },
        },
    }


def test_container_info_from_docker() -> None:
    info = container_info_from_docker(docker_inspect_answer())
    assert info.id == ID_A
    assert info.name == "shop-web-1"
    assert info.image_id.startswith("sha256:882428fb")
    assert info.image_name == "dw-test-bb:latest"
    assert (info.pod, info.namespace, info.runtime) == ("web-0", "shop", "docker")
    assert info.label("team") == "blue"


@pytest.mark.parametrize(
    ("started_at", "expected"),
    [
        ("2026-11-23T10:00:00.123456789Z", 1_795_428_000.123456),  # ns cut to us
        ("2026-11-23T11:00:00+01:00", 1_795_428_000.0),
        ("0001-01-01T00:00:00Z", None),  # Docker's zero time: created, never started
        ("yesterday", None),
        (None, None),
    ],
)
def test_container_info_from_docker_start_time(started_at: Any, expected: float | None) -> None:
    answer = docker_inspect_answer()
    if started_at is not None:
        answer["State"] = {"StartedAt": started_at}
    assert container_info_from_docker(answer).started_at == expected


def test_container_info_from_docker_created_by_image_id_uses_repo_tag() -> None:
    answer = docker_inspect_answer(config_image="882428fbc2d0")
    assert container_info_from_docker(answer, image_tags=["dw-test-bb:latest"]).image_name == (
        "dw-test-bb:latest"
    )
    assert container_info_from_docker(answer).image_name == "882428fbc2d0"  # untagged image


def test_container_info_from_docker_without_labels() -> None:
    answer = docker_inspect_answer()
    answer["Config"]["Labels"] = None
    info = container_info_from_docker(answer)
    assert (info.labels, info.pod, info.namespace) == ((), None, None)


def test_parse_docker_event() -> None:
    rename = {
        "status": "rename",
        "id": ID_A,
        "Type": "container",
        "Action": "rename",
        "Actor": {"ID": ID_A, "Attributes": {"name": "new-name", "oldName": "/old-name"}},
        "time": 1700000000,
        "timeNano": 1700000000123456789,
    }
    event = parse_docker_event(rename)
    assert event == ContainerEvent(
        ContainerEventAction.RENAME, ID_A, "new-name", pytest.approx(1700000000.123456789)
    )
    start = {"Type": "container", "Action": "start", "Actor": {"ID": ID_B, "Attributes": {}}}
    assert parse_docker_event(start) == ContainerEvent(ContainerEventAction.START, ID_B)
    # podman's Docker-compatible API says "remove" where Docker says "destroy"
    remove = {"Type": "container", "Action": "remove", "Actor": {"ID": ID_B, "Attributes": {}}}
    assert parse_docker_event(remove) == ContainerEvent(ContainerEventAction.DESTROY, ID_B)
    assert parse_docker_event({"Type": "container", "Action": "exec_start: sh"}) is None
    assert parse_docker_event({"Type": "network", "Action": "connect"}) is None
    for ours in ("resync", "unreachable"):  # the watcher's words, never a runtime's
        assert parse_docker_event({"Type": "container", "Action": ours,
                                   "Actor": {"ID": ID_B}}) is None


def test_container_ref_rejects_malformed_values() -> None:
    with pytest.raises(ValueError, match="runtime"):
        ContainerRef("rkt", ID_A)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        ContainerRef("docker", ID_A.upper())


def test_metadata_unavailable_is_an_attribution_error() -> None:
    assert issubclass(MetadataUnavailableError, AttributionError)


# --------------------------------------------------------------------------- Attributor


def test_attributor_host_unknown_and_non_container(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, fake: FakeMetadata
) -> None:
    attributor = make_attributor(fake)
    assert attributor.lookup(1).state is AttributionState.HOST
    root = attributor.lookup(os.stat(cgroup_root).st_ino)
    assert (root.state, root.cgroup_path) == (AttributionState.HOST, "/")
    ssh = attributor.lookup(cgroup_id(cgroup_root, "system.slice/ssh.service"))
    assert (ssh.state, ssh.cgroup_path, ssh.ref) == (
        AttributionState.NOT_CONTAINER,
        "/system.slice/ssh.service",
        None,
    )
    assert attributor.lookup(unused_inode(cgroup_root)).state is AttributionState.UNKNOWN
    assert fake.calls == []
    stats = attributor.stats()
    assert (stats["lookups"], stats["host"], stats["not_container"], stats["unknown"]) == (
        4,
        2,
        1,
        1,
    )


def test_attributor_pending_then_resolved(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, fake: FakeMetadata
) -> None:
    attributor = make_attributor(fake)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_A}")
    with attributor:
        first = attributor.lookup(cgid)
        assert first.state is AttributionState.PENDING
        assert first.ref == ContainerRef("docker", ID_A)
        assert first.cgroup_path == f"/docker/{ID_A}"
        assert first.info is None
        assert attributor.wait_idle(5)
        resolved = attributor.lookup(cgid)
    assert resolved == Attribution(
        AttributionState.CONTAINER,
        cgid,
        cgroup_path=f"/docker/{ID_A}",
        ref=ContainerRef("docker", ID_A),
        info=fake.containers[ID_A],
    )
    assert resolved.container_id == ID_A
    assert json.loads(json.dumps(resolved.to_dict()))["info"]["name"] == "web"
    stats = attributor.stats()
    assert (stats["pending"], stats["hits"], stats["inspects"]) == (1, 1, 1)
    assert stats["rescans"] >= 1


def test_attributor_kubernetes_container(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, fake: FakeMetadata
) -> None:
    attributor = make_attributor(fake)
    cgid = cgroup_id(cgroup_root, f"kubepods/burstable/pod{POD_UID}/{ID_C}")
    with attributor:
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)
        result = attributor.lookup(cgid)
    assert result.ref == ContainerRef("containerd", ID_C, POD_UID)
    assert result.info is not None
    assert (result.info.pod, result.info.namespace) == ("api-0", "shop")


def test_attributor_routes_by_runtime_and_keeps_outages_per_runtime(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, clock: FakeClock
) -> None:
    """A node's runtimes together (runtimes.registry.RuntimeSet): each container is asked of
    the runtime its cgroup path names, and Docker being down does not hold up containerd's."""
    from driftwarden.agent.runtimes.registry import RuntimeSet

    docker, containerd = FakeMetadata(), FakeMetadata({ID_C: make_info(ID_C, "api")})
    docker.runtime, containerd.runtime = "docker", "containerd"
    docker.endpoint, containerd.endpoint = "unix:///docker.sock", "unix:///containerd.sock"
    docker.unreachable = "docker unreachable at unix:///docker.sock: gone"
    attributor = make_attributor(RuntimeSet([docker, containerd]))
    cgid_a = cgroup_id(cgroup_root, f"docker/{ID_A}")
    cgid_c = cgroup_id(cgroup_root, f"kubepods/burstable/pod{POD_UID}/{ID_C}")
    with attributor:
        attributor.lookup(cgid_a)
        assert attributor.wait_idle(5)
        assert attributor.unavailable_runtimes() == {"docker": docker.unreachable}
        # a containerd container is still fetched, not answered with Docker's outage
        assert attributor.lookup(cgid_c).state is AttributionState.PENDING
        assert attributor.wait_idle(5)
        served = attributor.lookup(cgid_c)
        assert (served.info, served.metadata_error) == (containerd.containers[ID_C], None)
        during = attributor.lookup(cgid_a)
        assert (during.info, during.metadata_error) == (None, docker.unreachable)
        assert attributor.metadata_unavailable
        docker.unreachable = None
        docker.containers[ID_A] = make_info(ID_A)
        clock.advance(5.1)
        attributor.lookup(cgid_a)
        assert attributor.wait_idle(5)
        assert attributor.lookup(cgid_a).info == docker.containers[ID_A]
        assert not attributor.metadata_unavailable
    # with Docker down, containerd was asked about Docker's container too (a fallback)
    assert (docker.calls, containerd.calls) == ([ID_A, ID_A], [ID_A, ID_C])


def test_attributor_deduplicates_fetches(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, fake: FakeMetadata
) -> None:
    attributor = make_attributor(fake)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_A}")
    for _ in range(50):
        assert attributor.lookup(cgid).state is AttributionState.PENDING  # not started yet
    assert attributor.stats()["queued"] == 1
    with attributor:
        assert attributor.wait_idle(5)
        assert attributor.lookup(cgid).state is AttributionState.CONTAINER
    assert fake.calls == [ID_A]


def test_attributor_lookup_never_waits_for_the_provider(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, fake: FakeMetadata
) -> None:
    fake.gate = threading.Event()
    attributor = make_attributor(fake)
    cgid_a = cgroup_id(cgroup_root, f"docker/{ID_A}")
    cgid_b = cgroup_id(cgroup_root, f"docker/{ID_B}")
    with attributor:
        attributor.lookup(cgid_a)
        deadline = time.monotonic() + 5
        while not fake.calls and time.monotonic() < deadline:
            time.sleep(0.001)
        assert fake.calls == [ID_A]  # the worker is now stuck inside inspect
        started = time.perf_counter()
        during_a = attributor.lookup(cgid_a)
        during_b = attributor.lookup(cgid_b)
        elapsed = time.perf_counter() - started
        assert elapsed < 0.05
        assert during_a.state is AttributionState.PENDING
        assert during_b.state is AttributionState.PENDING
        fake.gate.set()
        assert attributor.wait_idle(5)
        assert attributor.lookup(cgid_a).state is AttributionState.CONTAINER
    assert fake.calls == [ID_A, ID_B]


def test_attributor_ttl_expiry_serves_stale_and_refreshes(
    make_attributor: Callable[..., Attributor],
    cgroup_root: Path,
    fake: FakeMetadata,
    clock: FakeClock,
) -> None:
    attributor = make_attributor(fake, ttl=10.0)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_A}")
    with attributor:
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)
        clock.advance(9)
        assert attributor.lookup(cgid).info == fake.containers[ID_A]
        assert fake.calls == [ID_A]  # still fresh: no refetch

        fake.containers[ID_A] = make_info(ID_A, "web-renamed-behind-our-back")
        clock.advance(2)
        stale = attributor.lookup(cgid)
        assert stale.state is AttributionState.CONTAINER
        assert stale.info is not None and stale.info.name == "web"  # served while refreshing
        assert attributor.wait_idle(5)
        fresh = attributor.lookup(cgid)
    assert fresh.info is not None and fresh.info.name == "web-renamed-behind-our-back"
    assert fake.calls == [ID_A, ID_A]
    assert attributor.stats()["stale_hits"] == 1


def test_attributor_vanished_container_is_negatively_cached(
    make_attributor: Callable[..., Attributor],
    cgroup_root: Path,
    fake: FakeMetadata,
    clock: FakeClock,
) -> None:
    attributor = make_attributor(fake, negative_ttl=5.0)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_B}")  # not known to the provider
    with attributor:
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)
        for _ in range(10):
            result = attributor.lookup(cgid)
            assert (result.state, result.info) == (AttributionState.CONTAINER, None)
            assert result.metadata_error == NOT_FOUND_ERROR
            assert result.ref == ContainerRef("docker", ID_B)
        assert fake.calls == [ID_B]

        fake.containers[ID_B] = make_info(ID_B, "late")
        clock.advance(5.1)
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)
        result = attributor.lookup(cgid)
    assert result.info is not None and result.info.name == "late"
    assert result.metadata_error is None
    assert fake.calls == [ID_B, ID_B]
    assert attributor.stats()["not_found"] == 1


def test_attributor_unreachable_provider_gives_cgroup_only_attribution(
    make_attributor: Callable[..., Attributor],
    cgroup_root: Path,
    fake: FakeMetadata,
    clock: FakeClock,
) -> None:
    fake.unreachable = "docker unreachable at unix:///nowhere: connection refused"
    attributor = make_attributor(fake, negative_ttl=5.0)
    cgid_a = cgroup_id(cgroup_root, f"docker/{ID_A}")
    cgid_c = cgroup_id(cgroup_root, f"kubepods/burstable/pod{POD_UID}/{ID_C}")
    with attributor:
        assert attributor.lookup(cgid_a).state is AttributionState.PENDING
        assert attributor.wait_idle(5)
        during = attributor.lookup(cgid_a)
        assert (during.state, during.info) == (AttributionState.CONTAINER, None)
        assert during.ref == ContainerRef("docker", ID_A)
        assert during.metadata_error == fake.unreachable
        # During a known outage a new container is not left PENDING.
        other = attributor.lookup(cgid_c)
        assert (other.state, other.metadata_error) == (AttributionState.CONTAINER, fake.unreachable)
        assert attributor.wait_idle(5)
        stats = attributor.stats()
        assert stats["inspect_errors"] == 2
        assert stats["metadata_unavailable"] == 1

        fake.unreachable = None  # docker is back
        clock.advance(5.1)
        attributor.lookup(cgid_a)
        assert attributor.wait_idle(5)
        recovered = attributor.lookup(cgid_a)
    assert recovered.info == fake.containers[ID_A]
    assert recovered.metadata_error is None
    assert attributor.stats()["metadata_unavailable"] == 0


def test_attributor_keeps_known_info_when_refresh_fails(
    make_attributor: Callable[..., Attributor],
    cgroup_root: Path,
    fake: FakeMetadata,
    clock: FakeClock,
) -> None:
    attributor = make_attributor(fake, ttl=10.0)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_A}")
    with attributor:
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)
        fake.unreachable = "docker unreachable: daemon restarting"
        clock.advance(11)
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)
        result = attributor.lookup(cgid)
    assert result.info == fake.containers[ID_A]
    assert result.metadata_error == "docker unreachable: daemon restarting"


ID_E = "e" * 64
ID_F = "f0" * 32
NO_CONTAINERS_WITHOUT_METADATA = {"containerd": 0, "cri-o": 0, "docker": 0, "podman": 0}


def test_attributor_counts_each_container_without_metadata_once_per_runtime(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, fake: FakeMetadata
) -> None:
    """Until a CRI and a podman provider exist, Docker is asked about every container and knows
    only its own: the others get no image (no detection), and are counted, not silent."""
    cri = f"kubepods.slice/kubepods-pod{POD_UID_SYSTEMD}.slice/cri-containerd-{ID_E}.scope"
    podman = f"machine.slice/libpod-{ID_F}.scope"
    for relative in (cri, podman):
        (cgroup_root / relative).mkdir(parents=True)
    cgids = [cgroup_id(cgroup_root, relative)
             for relative in (f"docker/{ID_A}", f"docker/{ID_B}", cri, podman)]
    attributor = make_attributor(fake)
    assert attributor.without_metadata() == NO_CONTAINERS_WITHOUT_METADATA
    with attributor:
        for cgid in cgids:
            assert attributor.lookup(cgid).state is AttributionState.PENDING
        assert attributor.wait_idle(5)
        for _ in range(3):  # every batch of events looks its container up again
            states = [(r.state, r.info is None, r.metadata_error)
                      for r in map(attributor.lookup, cgids)]
    assert states == [(AttributionState.CONTAINER, False, None)] + [
        (AttributionState.CONTAINER, True, NOT_FOUND_ERROR)] * 3
    assert attributor.without_metadata() == {"containerd": 1, "cri-o": 0, "docker": 1,
                                             "podman": 1}
    assert attributor.stats()["without_metadata"] == 3


def test_attributor_does_not_count_a_removed_container_it_once_described(
    make_attributor: Callable[..., Attributor],
    cgroup_root: Path,
    fake: FakeMetadata,
    clock: FakeClock,
) -> None:
    attributor = make_attributor(fake, ttl=10.0, removed_grace=30.0)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_A}")
    with attributor:
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)
        info = fake.containers.pop(ID_A)  # docker rm: its late events outlive the cache entry
        clock.advance(11)
        attributor.lookup(cgid)  # stale: asked again, and the runtime no longer knows it
        assert attributor.wait_idle(5)
        kept = attributor.lookup(cgid)  # what it was stays for the removal grace
        clock.advance(31)
        assert attributor.lookup(cgid).state is AttributionState.PENDING  # grace over
        assert attributor.wait_idle(5)
        gone = attributor.lookup(cgid)
    assert (kept.info, kept.metadata_error) == (info, None)
    assert (gone.info, gone.metadata_error) == (None, NOT_FOUND_ERROR)
    assert fake.calls == [ID_A, ID_A, ID_A]
    assert attributor.without_metadata() == NO_CONTAINERS_WITHOUT_METADATA
    assert attributor.stats()["removed_hits"] == 1


def test_attributor_counts_containers_first_seen_while_the_runtime_is_unreachable(
    make_attributor: Callable[..., Attributor],
    cgroup_root: Path,
    fake: FakeMetadata,
    clock: FakeClock,
) -> None:
    fake.unreachable = "docker unreachable at unix:///nowhere: Connection refused (ECONNREFUSED)"
    attributor = make_attributor(fake, negative_ttl=5.0)
    cgid_a = cgroup_id(cgroup_root, f"docker/{ID_A}")
    cgid_c = cgroup_id(cgroup_root, f"kubepods/burstable/pod{POD_UID}/{ID_C}")
    with attributor:
        assert not attributor.metadata_unavailable
        attributor.lookup(cgid_a)
        assert attributor.wait_idle(5)
        assert attributor.metadata_unavailable
        attributor.lookup(cgid_a)
        attributor.lookup(cgid_c)  # a known outage: answered at once, counted at once
        assert attributor.wait_idle(5)
        attributor.lookup(cgid_c)
        assert attributor.without_metadata() == {**NO_CONTAINERS_WITHOUT_METADATA,
                                                 "docker": 1, "containerd": 1}
        fake.unreachable = None  # back: they are described now, and stay counted once
        clock.advance(5.1)
        attributor.lookup(cgid_a)
        assert attributor.wait_idle(5)
        assert attributor.lookup(cgid_a).info == fake.containers[ID_A]
        assert not attributor.metadata_unavailable
    assert attributor.without_metadata() == {**NO_CONTAINERS_WITHOUT_METADATA,
                                             "docker": 1, "containerd": 1}


def test_attributor_takes_outages_from_the_watcher_and_asks_about_containers_made_since(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, clock: FakeClock
) -> None:
    """A runtime's watcher says it cannot reach it (UNREACHABLE) before any container needs
    asking: the runtime's gauge says so. A container whose cgroup was made before the runtime
    last failed is answered at once without metadata; one made after it is asked about, since
    a runtime that makes containers is back (a restarted containerd's first new pod)."""
    from driftwarden.agent.runtimes.registry import RuntimeSet

    docker = FakeMetadata()
    containerd = FakeMetadata({ID_C: make_info(ID_C, "api"), ID_E: make_info(ID_E, "new")})
    docker.runtime, containerd.runtime = "docker", "containerd"
    docker.endpoint, containerd.endpoint = "unix:///docker.sock", "unix:///containerd.sock"
    wall = FakeClock(start=2_000_000_000.0)
    attributor = make_attributor(RuntimeSet([docker, containerd]), wall_clock=wall)
    pod = cgroup_root / f"kubepods/burstable/pod{POD_UID}"
    before, after = pod / ID_C, pod / ID_E
    after.mkdir()
    os.utime(before, (wall.now - 10, wall.now - 10))  # kernfs: a folder's time is its making
    os.utime(after, (wall.now + 5, wall.now + 5))
    error = "containerd unreachable at unix:///containerd.sock: No such file or directory"
    unreachable = ContainerEvent(ContainerEventAction.UNREACHABLE, None, runtime="containerd",
                                 error=error)
    with attributor:
        attributor.on_container_event(unreachable)
        assert attributor.unavailable_runtimes() == {"containerd": error}
        assert attributor.metadata_unavailable_by_runtime() == {
            "containerd": 1, "cri-o": 0, "docker": 0, "podman": 0}
        containerd.unreachable = error
        old = attributor.lookup(before.stat().st_ino)
        assert (old.state, old.info, old.metadata_error) == (AttributionState.CONTAINER, None,
                                                             error)
        assert attributor.wait_idle(5)  # asked meanwhile, and still down
        containerd.unreachable = None
        assert attributor.lookup(after.stat().st_ino).state is AttributionState.PENDING
        assert attributor.wait_idle(5)
        new = attributor.lookup(after.stat().st_ino)
        assert (new.info, new.metadata_error) == (containerd.containers[ID_E], None)
        assert attributor.unavailable_runtimes() == {}  # it answered
        attributor.on_container_event(unreachable)
        assert attributor.metadata_unavailable
        attributor.on_container_event(
            ContainerEvent(ContainerEventAction.RESYNC, None, runtime="containerd"))
        assert not attributor.metadata_unavailable  # its watcher reconnected
    assert containerd.calls == [ID_C, ID_E]
    assert attributor.without_metadata() == {**NO_CONTAINERS_WITHOUT_METADATA, "containerd": 1}


def test_attributor_without_provider_counts_containers_without_metadata(
    make_attributor: Callable[..., Attributor], cgroup_root: Path
) -> None:
    attributor = make_attributor(None)
    for _ in range(2):
        result = attributor.lookup(cgroup_id(cgroup_root, f"docker/{ID_B}"))
        assert (result.state, result.metadata_error) == (AttributionState.CONTAINER,
                                                         NO_PROVIDER_ERROR)
    assert attributor.without_metadata() == {**NO_CONTAINERS_WITHOUT_METADATA, "docker": 1}


def test_attributor_survives_a_crashing_provider(
    make_attributor: Callable[..., Attributor],
    cgroup_root: Path,
    fake: FakeMetadata,
    clock: FakeClock,
) -> None:
    fake.crash = RuntimeError("bug in provider")
    attributor = make_attributor(fake, negative_ttl=1.0)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_A}")
    with attributor:
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)
        broken = attributor.lookup(cgid)
        assert broken.state is AttributionState.CONTAINER
        assert broken.metadata_error is not None and "bug in provider" in broken.metadata_error
        fake.crash = None
        clock.advance(1.1)
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)  # the worker is still alive
        assert attributor.lookup(cgid).info == fake.containers[ID_A]


def test_attributor_without_provider(
    make_attributor: Callable[..., Attributor], cgroup_root: Path
) -> None:
    with make_attributor(None) as attributor:
        result = attributor.lookup(cgroup_id(cgroup_root, f"docker/{ID_A}"))
        assert attributor.wait_idle(1)
    assert (result.state, result.info, result.metadata_error) == (
        AttributionState.CONTAINER,
        None,
        NO_PROVIDER_ERROR,
    )
    assert result.ref == ContainerRef("docker", ID_A)


def test_attributor_rename_event_updates_at_once(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, fake: FakeMetadata
) -> None:
    attributor = make_attributor(fake)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_A}")
    with attributor:
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)
        fake.gate = threading.Event()  # hold the re-inspect to see the event's own effect
        fake.containers[ID_A] = make_info(ID_A, "web-v2")
        attributor.on_container_event(
            ContainerEvent(ContainerEventAction.RENAME, ID_A, name="web-v2")
        )
        result = attributor.lookup(cgid)
        assert result.info is not None and result.info.name == "web-v2"
        fake.gate.set()
        assert attributor.wait_idle(5)
    assert fake.calls == [ID_A, ID_A]  # and it was re-inspected
    assert attributor.stats()["events"] == 1


def test_attributor_destroy_event_keeps_a_grace_period(
    make_attributor: Callable[..., Attributor],
    cgroup_root: Path,
    fake: FakeMetadata,
    clock: FakeClock,
) -> None:
    attributor = make_attributor(fake, negative_ttl=5.0, removed_grace=60.0)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_A}")
    with attributor:
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)
        info = fake.containers.pop(ID_A)
        attributor.on_container_event(ContainerEvent(ContainerEventAction.DESTROY, ID_A))
        attributor.on_container_event(ContainerEvent(ContainerEventAction.RESYNC, None))
        clock.advance(59)
        late = attributor.lookup(cgid)  # late events still attributed, never asked again
        assert fake.calls == [ID_A]
        clock.advance(2)
        assert attributor.lookup(cgid).state is AttributionState.PENDING
        assert attributor.wait_idle(5)
        gone = attributor.lookup(cgid)
    assert (late.state, late.info, late.metadata_error) == (
        AttributionState.CONTAINER, info, None)
    assert (gone.state, gone.info, gone.metadata_error) == (
        AttributionState.CONTAINER,
        None,
        NOT_FOUND_ERROR,
    )


def test_attributor_describes_a_container_from_its_create_event(
    make_attributor: Callable[..., Attributor],
    cgroup_root: Path,
    fake: FakeMetadata,
    clock: FakeClock,
) -> None:
    """`docker run --rm` of a container that lives a few ms: it is described when created, and
    removed before its events are looked at; they are attributed all the same, and its start
    (asked again: the runtime no longer knows it) keeps what it was."""
    attributor = make_attributor(fake, removed_grace=60.0)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_A}")
    info = fake.containers[ID_A]
    with attributor:
        attributor.on_container_event(ContainerEvent(ContainerEventAction.CREATE, ID_A))
        assert attributor.wait_idle(5)
        del fake.containers[ID_A]
        attributor.on_container_event(ContainerEvent(ContainerEventAction.START, ID_A,
                                                     time=1700000000.5))
        assert attributor.wait_idle(5)
        attributor.on_container_event(ContainerEvent(ContainerEventAction.DIE, ID_A))
        attributor.on_container_event(ContainerEvent(ContainerEventAction.DESTROY, ID_A))
        clock.advance(30)
        first = attributor.lookup(cgid)
    assert fake.calls == [ID_A, ID_A]
    assert (first.state, first.info, first.metadata_error) == (
        AttributionState.CONTAINER, replace(info, started_at=1700000000.5), None)
    stats = attributor.stats()
    assert (stats["pending"], stats["removed_hits"], stats["not_found"]) == (0, 1, 0)
    assert attributor.without_metadata() == NO_CONTAINERS_WITHOUT_METADATA


GRAPH_DRIVER = {"Name": "overlay2", "Data": {"UpperDir": "/var/lib/docker/overlay2/x/diff",
                                              "LowerDir": "/var/lib/docker/overlay2/y/diff"}}
OVERLAY_MOUNTINFO = (
    "1 0 8:1 / /host rw - ext4 /dev/sda1 rw\n"
    "2 1 0:50 / / rw,relatime - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/u,workdir=/w\n")


def test_attributor_keeps_the_layers_the_runtime_gave(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, fake: FakeMetadata
) -> None:
    """Docker's GraphDriver comes with the container's metadata; asked again once its
    processes are gone (a CRI runtime then has no root mount to show), the layers stay."""
    fake.containers[ID_A] = make_info(ID_A, graph_driver=GRAPH_DRIVER)
    attributor = make_attributor(fake)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_A}")
    with attributor:
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)
        assert attributor.graph_driver(ID_A) == GRAPH_DRIVER
        fake.containers[ID_A] = make_info(ID_A)  # no layers this time
        attributor.on_container_event(ContainerEvent(ContainerEventAction.START, ID_A))
        assert attributor.wait_idle(5)
        assert attributor.graph_driver(ID_A) == GRAPH_DRIVER
    assert attributor.graph_driver(ID_B) is None
    assert fake.calls == [ID_A, ID_A]


def test_attributor_reads_layers_from_a_process_of_the_container(
    make_attributor: Callable[..., Attributor],
    cgroup_root: Path,
    fake: FakeMetadata,
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """A container whose runtime gave no layers: a lookup reads the root mount of a process in
    its cgroup (runc's, before it pivots, is no overlay: tried again after a backoff)."""
    proc = tmp_path / "proc"
    for pid, text in (("41", "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n"), ("42", OVERLAY_MOUNTINFO)):
        (proc / pid).mkdir(parents=True)
        (proc / pid / "mountinfo").write_text(text)
    procs = cgroup_root / f"kubepods/burstable/pod{POD_UID}/{ID_C}" / "cgroup.procs"
    procs.write_text("41\n")  # runc init, before pivot_root
    attributor = make_attributor(fake, proc_root=str(proc))
    cgid = cgroup_id(cgroup_root, f"kubepods/burstable/pod{POD_UID}/{ID_C}")
    attributor.lookup(cgid)
    assert attributor.graph_driver(ID_C) is None
    procs.write_text("41\n42\n")
    attributor.lookup(cgid)  # within the backoff: not read again
    assert attributor.graph_driver(ID_C) is None
    clock.advance(0.01)
    attributor.lookup(cgid)
    assert attributor.graph_driver(ID_C) == {
        "Name": "overlay", "Data": {"UpperDir": "/u", "LowerDir": "/l1:/l2"}}
    procs.write_text("")  # gone: what was seen stays
    attributor.lookup(cgid)
    assert attributor.graph_driver(ID_C) is not None
    assert attributor.stats()["layers_captured"] == 1


def test_attributor_start_event_prefetches_and_resync_refreshes(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, fake: FakeMetadata
) -> None:
    attributor = make_attributor(fake)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_A}")
    with attributor:
        attributor.on_container_event(ContainerEvent(ContainerEventAction.START, ID_A))
        assert attributor.wait_idle(5)
        assert fake.calls == [ID_A]
        assert attributor.lookup(cgid).state is AttributionState.CONTAINER  # no PENDING at all

        attributor.on_container_event(ContainerEvent(ContainerEventAction.DIE, ID_A))
        attributor.on_container_event(ContainerEvent(ContainerEventAction.RESYNC, None))
        assert attributor.lookup(cgid).info == fake.containers[ID_A]  # served while refreshing
        assert attributor.wait_idle(5)
    assert fake.calls == [ID_A, ID_A]
    stats = attributor.stats()
    assert (stats["pending"], stats["stale_hits"], stats["events"]) == (0, 1, 3)


def test_attributor_start_event_of_a_restart_updates_the_start_time_at_once(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, fake: FakeMetadata
) -> None:
    attributor = make_attributor(fake)
    cgid = cgroup_id(cgroup_root, f"docker/{ID_A}")
    with attributor:
        attributor.lookup(cgid)
        assert attributor.wait_idle(5)
        assert attributor.lookup(cgid).info.started_at is None
        fake.gate = threading.Event()  # hold the re-inspect to see the event's own effect
        attributor.on_container_event(ContainerEvent(ContainerEventAction.START, ID_A,
                                                     time=1_795_399_200.5))
        result = attributor.lookup(cgid)
        assert result.info is not None and result.info.started_at == 1_795_399_200.5
        assert result.info.name == fake.containers[ID_A].name  # the rest is kept
        fake.gate.set()
        assert attributor.wait_idle(5)
    assert fake.calls == [ID_A, ID_A]


def test_attributor_cache_is_bounded(
    make_attributor: Callable[..., Attributor], cgroup_root: Path
) -> None:
    fake = FakeMetadata({cid: make_info(cid, cid[:4]) for cid in (ID_A, ID_B, ID_D)})
    attributor = make_attributor(fake, max_containers=2)
    with attributor:
        for cid in (ID_A, ID_B, ID_D):
            attributor.lookup(cgroup_id(cgroup_root, f"docker/{cid}"))
            assert attributor.wait_idle(5)
        stats = attributor.stats()
        assert (stats["cached_containers"], stats["evicted"]) == (2, 1)
        # The least recently used one (A) was evicted and is fetched again.
        again = attributor.lookup(cgroup_id(cgroup_root, f"docker/{ID_A}"))
        assert again.state is AttributionState.PENDING


def test_attributor_queue_is_bounded(
    make_attributor: Callable[..., Attributor], cgroup_root: Path, fake: FakeMetadata
) -> None:
    attributor = make_attributor(fake, max_queued=1)
    attributor.lookup(cgroup_id(cgroup_root, f"docker/{ID_A}"))
    attributor.lookup(cgroup_id(cgroup_root, f"docker/{ID_B}"))
    stats = attributor.stats()
    assert (stats["queued"], stats["queue_dropped"]) == (1, 1)


def test_attributor_start_stop_are_idempotent_and_quick(
    make_attributor: Callable[..., Attributor], fake: FakeMetadata
) -> None:
    attributor = make_attributor(fake)
    attributor.start()
    attributor.start()
    started = time.monotonic()
    attributor.stop()
    attributor.stop()
    assert time.monotonic() - started < 1.0
    assert not attributor.watching


# --------------------------------------------------------------------------- integration (Docker)
# conftest's `docker_ok` / `bb_image` fail (not skip) under DRIFTWARDEN_REQUIRE_INTEGRATION=1, and
# tests.support.containers.run_container always force-removes what it started.

REQUIRE_INTEGRATION = os.environ.get("DRIFTWARDEN_REQUIRE_INTEGRATION") == "1"


def prerequisite_missing(reason: str) -> None:
    """Skip on a developer machine; fail where integration tests are required (CI)."""
    if REQUIRE_INTEGRATION:
        pytest.fail(f"integration prerequisite missing: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cgroup2() -> Path:
    """The host's cgroup v2 mount, from /proc/self/mountinfo (.../unified on a hybrid host)."""
    from tests.support.host import cgroup2_root

    try:
        return cgroup2_root()
    except FileNotFoundError as exc:
        prerequisite_missing(str(exc))
    raise AssertionError("unreachable")


@pytest.fixture
def untagged_image(bb_image: str) -> Iterator[str]:
    """The busybox test image under a throwaway repository name that has only `:latest`.

    Running it by the bare name is what `docker run dw-test-bb` does: Docker records the
    reference without a tag and attribution must report "<name>:latest".
    """
    from docker.errors import NotFound

    from tests.support.containers import docker_client

    client = docker_client()
    repository = f"dwtest-attr-{uuid.uuid4().hex[:8]}"
    client.images.get(bb_image).tag(repository, "latest")
    try:
        yield repository
    finally:
        with contextlib.suppress(NotFound):
            client.images.remove(f"{repository}:latest", noprune=True)  # only the tag goes
        client.close()


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def wait_for_container(attributor: Attributor, cgid: int) -> Attribution:
    assert eventually(lambda: attributor.lookup(cgid).state is AttributionState.CONTAINER)
    return attributor.lookup(cgid)


@pytest.mark.integration
def test_real_container_is_attributed(docker_ok: None, untagged_image: str, cgroup2: Path) -> None:
    from tests.support.containers import docker_client, run_container

    labels = {
        "team": "blue",
        "io.kubernetes.pod.name": "web-0",
        "io.kubernetes.pod.namespace": "shop",
    }
    client = docker_client()
    try:
        expected_image_id = client.images.get(untagged_image).id
    finally:
        client.close()
    with (
        run_container(untagged_image, ["sleep", "60"], labels=labels) as container,
        DockerMetadata() as metadata,
        Attributor(CgroupIndex(cgroup2), metadata) as attributor,
    ):
        cgid = container.cgroup_id
        relative_path = "/" + container.cgroup_path.relative_to(cgroup2).as_posix()
        result = wait_for_container(attributor, cgid)
        host = attributor.lookup(1)

    assert result.ref == ContainerRef("docker", container.id)
    assert result.cgroup_path == relative_path
    assert result.metadata_error is None
    info = result.info
    assert info is not None
    assert info.id == container.id
    assert info.name == container.name
    assert info.image_name == f"{untagged_image}:latest"
    assert info.image_id == expected_image_id
    assert info.image_id.startswith("sha256:")
    for key, value in labels.items():
        assert info.label(key) == value
    assert (info.pod, info.namespace, info.runtime) == ("web-0", "shop", "docker")
    assert (host.state, host.cgroup_path) == (AttributionState.HOST, "/")


@pytest.mark.integration
def test_real_rename_is_reflected_through_events(
    docker_ok: None, bb_image: str, cgroup2: Path
) -> None:
    from tests.support.containers import run_container

    # ttl is long, so only a Docker event can make the new name appear.
    with (
        run_container(bb_image, ["sleep", "60"]) as container,
        DockerMetadata() as metadata,
        Attributor(CgroupIndex(cgroup2), metadata, ttl=3600) as attributor,
    ):
        cgid = container.cgroup_id
        before = wait_for_container(attributor, cgid)
        assert before.info is not None and before.info.name == container.name
        assert before.info.image_name == bb_image
        assert eventually(lambda: attributor.watching)
        new_name = f"{container.name}-renamed"
        container.container.rename(new_name)

        def renamed() -> bool:
            info = attributor.lookup(cgid).info
            return info is not None and info.name == new_name

        assert eventually(renamed)
        assert attributor.stats()["events"] >= 1


@pytest.mark.integration
def test_real_destroy_keeps_grace_then_not_found(
    docker_ok: None, bb_image: str, cgroup2: Path
) -> None:
    from tests.support.containers import run_container

    with (
        run_container(bb_image, ["sleep", "60"]) as container,
        DockerMetadata() as metadata,
        Attributor(CgroupIndex(cgroup2), metadata, ttl=3600, negative_ttl=1.0,
                   removed_grace=1.0) as attributor,
    ):
        cgid = container.cgroup_id
        wait_for_container(attributor, cgid)
        assert eventually(lambda: attributor.watching)
        container.container.remove(force=True)
        # The cgroup directory is gone, but late events are still attributed for a while.
        assert attributor.lookup(cgid).info is not None

        def reported_gone() -> bool:
            result = attributor.lookup(cgid)
            return result.info is None and result.metadata_error == NOT_FOUND_ERROR

        assert eventually(reported_gone)
        assert metadata.inspect(container.id) is None


@pytest.mark.integration
def test_unreachable_docker_gives_container_with_error(
    docker_ok: None, bb_image: str, cgroup2: Path, tmp_path: Path
) -> None:
    from tests.support.containers import run_container

    nowhere = f"unix://{tmp_path}/no-such-docker.sock"
    with (
        run_container(bb_image, ["sleep", "60"]) as container,
        DockerMetadata(nowhere, timeout=2) as metadata,
    ):
        with pytest.raises(MetadataUnavailableError, match="docker unreachable"):
            metadata.inspect(container.id)
        attributor = Attributor(CgroupIndex(cgroup2), metadata)
        attributor.start()
        try:
            attributor.lookup(container.cgroup_id)
            assert attributor.wait_idle(5)
            result = attributor.lookup(container.cgroup_id)
        finally:
            stopping = time.monotonic()
            attributor.stop()
            assert time.monotonic() - stopping < 2.0
    assert result.state is AttributionState.CONTAINER
    assert result.ref == ContainerRef("docker", container.id)
    assert result.info is None
    assert result.metadata_error is not None
    assert result.metadata_error.startswith("docker unreachable")
    assert not attributor.watching


@pytest.mark.integration
def test_docker_event_watcher_follows_and_stops_promptly(docker_ok: None, bb_image: str) -> None:
    from tests.support.containers import run_container

    events: list[ContainerEvent] = []
    with DockerMetadata() as metadata:
        watcher = metadata.watch(events.append)
        watcher.start()
        try:
            assert eventually(lambda: watcher.connected)
            with run_container(bb_image, ["sleep", "60"]) as container:
                assert eventually(
                    lambda: (
                        ContainerEvent(ContainerEventAction.START, container.id)
                        in [replace(e, name=None, time=None) for e in events]
                    )
                )
            assert eventually(
                lambda: any(
                    e.action is ContainerEventAction.DESTROY and e.container_id == container.id
                    for e in events
                )
            )
        finally:
            stopping = time.monotonic()
            watcher.stop()  # the stream is open and idle: stop must cut it, not wait on it
            assert time.monotonic() - stopping < 2.0
    assert events[0] == ContainerEvent(ContainerEventAction.RESYNC, None, runtime="docker")
    assert not watcher.connected
    # other containers (parallel tests) may start meanwhile: this one's event
    start = next(e for e in events
                 if e.action is ContainerEventAction.START and e.container_id == container.id)
    assert start.name == container.name
    assert start.time is not None and abs(start.time - time.time()) < 60


@pytest.mark.integration
def test_docker_metadata_inspect_by_id_and_unknown(docker_ok: None, bb_image: str) -> None:
    from tests.support.containers import run_container

    with run_container(bb_image, ["sleep", "60"]) as container, DockerMetadata() as metadata:
        by_name = metadata.inspect(container.name)  # the CLI's --container accepts names
        assert by_name is not None and by_name.id == container.id
        assert metadata.inspect("0" * 64) is None


@pytest.mark.integration
def test_new_cgroup_found_by_file_handle_without_a_walk(docker_ok, bb_image, cgroup2):
    """A new container's cgroup resolves in one syscall even while rescans are rate-limited."""
    from tests.support.containers import run_container

    now = [1000.0]
    index = CgroupIndex(str(cgroup2), clock=lambda: now[0], min_rescan_interval=3600.0)
    index.rescan()  # the walk happens once, before the container exists
    with run_container(bb_image, ["sleep", "60"]) as container:
        path = index.path_of(container.cgroup_id)
        real_path = "/" + container.cgroup_path.relative_to(cgroup2).as_posix()
    assert path == real_path  # /docker/ID (cgroupfs driver), /system.slice/docker-ID.scope, ...
    stats = index.stats
    assert stats["handle_hits"] == 1 and stats["rescans"] == 1
    assert index.path_of(987654321987) is None  # no such cgroup: ESTALE, then rate-limited
