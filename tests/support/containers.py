"""Run throwaway test containers that obey the network rule (loopback only).

Every container gets a unique ``dwtest-`` name and the ``driftwarden.test=1`` label, and is
force-removed when its ``run_container`` block ends. After a crashed session, leftovers can be
found with ``docker ps -a --filter label=driftwarden.test``.
"""

from __future__ import annotations

import io
import os
import re
import tarfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath
from typing import Any

import docker
import requests
from docker.errors import APIError, DockerException, NotFound
from docker.models.containers import Container

from .host import cgroup2_root, docker_cgroup_path, process_cgroup_dir

NAME_PREFIX = "dwtest-"
TEST_LABEL = "driftwarden.test"
# "none" keeps the container in its own netns with only lo; "host" shares the host's netns,
# where tests still talk only to 127.0.0.1/::1. Anything else could route off the machine.
ALLOWED_NETWORKS = frozenset({"none", "host"})
# kwargs that would bypass the network check above.
_FORBIDDEN_KWARGS = frozenset({"network_mode", "network", "networking_config", "ports"})
REQUIRE_ENV = "DRIFTWARDEN_REQUIRE_INTEGRATION"


class DockerUnavailableError(RuntimeError):
    """The Docker daemon cannot be reached."""


def docker_client(timeout: int = 120) -> docker.DockerClient:
    """A client for the local daemon, checked with a ping (fresh per call: cheap, no sharing)."""
    try:
        client = docker.from_env(timeout=timeout)
        client.ping()
    except (DockerException, requests.exceptions.RequestException, OSError) as exc:
        raise DockerUnavailableError(
            f"cannot reach the Docker daemon ({exc}); start it with `make setup` "
            "(scripts/setup-host.sh starts dockerd when none answers)"
        ) from exc
    return client


def require_docker() -> docker.DockerClient:
    """For integration tests: skip without Docker, but fail when integration is required."""
    import pytest  # only test code calls this; keep the module importable without pytest

    try:
        return docker_client()
    except DockerUnavailableError as exc:
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but Docker is unavailable: {exc}")
        pytest.skip(f"Docker unavailable: {exc}")


def unique_name(base: str | None = None) -> str:
    """``dwtest-<base or current test>-<random>``, valid as a Docker container name."""
    if base is None:
        # "tests/test_x.py::test_y[param] (call)" -> "test_y[param]"
        current = os.environ.get("PYTEST_CURRENT_TEST", "c")
        base = current.split("::")[-1].split(" ")[0]
    base = base.removeprefix(NAME_PREFIX)
    base = re.sub(r"[^a-zA-Z0-9_.-]+", "-", base).strip("-.")[:40] or "c"
    return f"{NAME_PREFIX}{base}-{uuid.uuid4().hex[:8]}"


def check_network(network: str, kwargs: dict[str, Any]) -> None:
    """Raise ValueError unless the container would be loopback-only."""
    if network not in ALLOWED_NETWORKS:
        raise ValueError(
            f"network {network!r} not allowed: test containers use only "
            f"{sorted(ALLOWED_NETWORKS)} (loopback-only traffic)"
        )
    bad = _FORBIDDEN_KWARGS & kwargs.keys()
    if bad:
        raise ValueError(f"pass the network via network=..., not {sorted(bad)}")


def cgroup_dir(container: Container) -> Path:
    """The container's cgroup v2 directory (its inode is bpf_get_current_cgroup_id()): where its
    init process runs, as /proc/PID/cgroup says; once the init is gone, where Docker's cgroup
    driver put it, while that directory lasts."""
    container.reload()
    pid = int(container.attrs["State"]["Pid"])
    found = process_cgroup_dir(pid) if pid else None
    if found is not None:
        return found
    root = cgroup2_root()
    path = root / docker_cgroup_path_of(container).lstrip("/")
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"no cgroup v2 directory for container {str(container.id)[:12]} (init pid {pid}, "
        f"tried /proc/{pid}/cgroup and {path}); has it exited?"
    )


def docker_cgroup_path_of(container: Container) -> str:
    """Where Docker put the container's cgroup, relative to the cgroup v2 root: from the daemon's
    cgroup driver and the container's CgroupParent, not from /proc."""
    driver = container.client.info()["CgroupDriver"]
    parent = container.attrs["HostConfig"].get("CgroupParent") or ""
    return docker_cgroup_path(str(container.id), driver, parent)


class RunningContainer:
    """A started test container (the object ``run_container`` yields)."""

    def __init__(self, container: Container) -> None:
        self.container = container
        self._cgroup_id: int | None = None

    @property
    def id(self) -> str:
        return str(self.container.id)

    @property
    def name(self) -> str:
        return str(self.container.name)

    @property
    def pid(self) -> int:
        """Host pid of the container's init process (0 once it has exited)."""
        self.container.reload()
        return int(self.container.attrs["State"]["Pid"])

    @property
    def cgroup_path(self) -> Path:
        return cgroup_dir(self.container)

    @property
    def docker_cgroup_path(self) -> str:
        """Docker's own idea of the cgroup path (e.g. /docker/ID, /system.slice/docker-ID.scope)."""
        return docker_cgroup_path_of(self.container)

    @property
    def cgroup_id(self) -> int:
        """cgroup v2 id; remembered once seen, so it still answers after the container exits."""
        if self._cgroup_id is None:
            self._cgroup_id = os.stat(self.cgroup_path).st_ino
        return self._cgroup_id

    def _remember_cgroup(self) -> None:
        # Best effort right after start: short-lived containers lose their cgroup dir soon.
        with suppress(OSError, APIError):
            _ = self.cgroup_id

    def exec(self, cmd: Sequence[str] | str, **kw: Any) -> tuple[int, str]:
        """Run cmd in the container; returns (exit code, stdout+stderr as text)."""
        result = self.container.exec_run(list(cmd) if not isinstance(cmd, str) else cmd, **kw)
        output = result.output or b""
        text = output.decode("utf-8", "replace") if isinstance(output, bytes) else str(output)
        return (-1 if result.exit_code is None else int(result.exit_code)), text

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the container to exit and return its exit code."""
        try:
            status = self.container.wait(timeout=timeout)
        except requests.exceptions.RequestException as exc:
            raise TimeoutError(f"container {self.name} still running after {timeout}s") from exc
        return int(status["StatusCode"])

    def logs(self, *, stdout: bool = True, stderr: bool = True) -> str:
        return self.container.logs(stdout=stdout, stderr=stderr).decode("utf-8", "replace")

    def put_file(self, path: str, data: bytes, mode: int = 0o755) -> None:
        """Copy bytes into the container at path (its directory must exist)."""
        target = PurePosixPath(path)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(target.name)
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))
        if not self.container.put_archive(str(target.parent), buf.getvalue()):
            raise RuntimeError(f"could not copy {path} into {self.name}")


@contextmanager
def run_container(
    image: str,
    cmd: Sequence[str],
    *,
    name: str | None = None,
    labels: dict[str, str] | None = None,
    network: str = "none",
    detach: bool = True,
    wait_timeout: float = 60.0,
    **kw: Any,
) -> Iterator[RunningContainer]:
    """Start a loopback-only container, yield it, and always force-remove it afterwards.

    detach=False waits (up to wait_timeout) for the command to finish before yielding, so
    logs() and wait() answer at once. Extra kwargs go to ``containers.create``.
    """
    check_network(network, kw)  # before touching Docker: a bad call never starts anything
    client = docker_client()
    container = client.containers.create(
        image,
        command=list(cmd),
        name=unique_name(name),
        labels={TEST_LABEL: "1", **(labels or {})},
        network_mode=network,
        **kw,
    )
    try:
        container.start()
        handle = RunningContainer(container)
        handle._remember_cgroup()
        if not detach:
            handle.wait(wait_timeout)
        yield handle
    finally:
        _force_remove(container)
        client.close()


def _force_remove(container: Container) -> None:
    try:
        container.remove(force=True, v=True)
    except NotFound:
        pass
    except APIError as exc:
        # 409: removal already in progress (auto_remove=True); anything else is a real leak.
        if exc.status_code != 409:
            raise
