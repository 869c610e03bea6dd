"""Rootful podman (Debian's 4.3) and its Docker-compatible API socket, for the live tests.

`TestPodman` starts `podman system service --time=0 unix:///run/podman/podman.sock` (the
socket the agent probes among the usual ones) and stops it at the end, with every container it
ran removed. This host's root lacks CAP_SYS_RESOURCE, and podman asks for rlimits above the
hard ones by default ("error setting rlimit type 6/7"): a containers.conf of its own
(CONTAINERS_CONF, for the service and the CLI alike) sets `default_ulimits` to what root may
set here (nofile: the hard limit; nproc: kernel.pid_max). Test images built by Docker reach
podman with `docker save | podman load`, once (podman names them localhost/NAME:TAG).
Containers get `--network none` (loopback only) and the driftwarden.test label.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from driftwarden.agent.runtimes.base import PODMAN_LOCAL_REGISTRY

from .containers import TEST_LABEL, unique_name
from .host import cgroup2_root

SOCKET = Path("/run/podman/podman.sock")
ENDPOINT = f"unix://{SOCKET}"
START_TIMEOUT = 30.0
CALL_TIMEOUT = 120.0
PODMAN = "podman"


class PodmanError(RuntimeError):
    """podman could not be started or asked; the message says what to do."""


def containers_conf(pid_max_path: Path = Path("/proc/sys/kernel/pid_max")) -> str:
    """A containers.conf whose default ulimits root may set on this host."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = int(pid_max_path.read_text())
    return ("[containers]\n"
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n')


@dataclass
class PodmanContainer:
    id: str
    name: str
    image: str  # as podman names it: localhost/NAME:TAG
    podman: TestPodman

    @property
    def pid(self) -> int:
        return int(self.podman.cli("inspect", "--format", "{{.State.Pid}}", self.id).strip())

    @property
    def cgroup_path(self) -> Path:
        """Its cgroup v2 folder: /libpod_parent/libpod-<id> with the cgroupfs manager."""
        line = Path(f"/proc/{self.pid}/cgroup").read_text().splitlines()[-1]
        return cgroup2_root() / line.split("::", 1)[1].lstrip("/")

    def exec(self, cmd: Sequence[str]) -> tuple[int, str]:
        done = subprocess.run([PODMAN, "exec", self.id, *cmd],
                              capture_output=True, text=True, timeout=CALL_TIMEOUT,
                              env=self.podman.env, check=False)
        return done.returncode, done.stdout + done.stderr


class TestPodman:
    """podman's API service on the usual socket, started and stopped by the tests."""

    __test__ = False  # not a pytest class

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="dwpodman-"))
        self.conf = self.base / "containers.conf"
        self.log_path = self.base / "service.log"
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        self.process: subprocess.Popen | None = None
        self._containers: list[str] = []

    def cli(self, *args: str, stdin=None) -> str:
        done = subprocess.run([PODMAN, *args], capture_output=True, text=True,
                              timeout=CALL_TIMEOUT, env=self.env, stdin=stdin, check=False)
        if done.returncode != 0:
            raise PodmanError(f"podman {' '.join(args)} failed: {done.stderr.strip()}")
        return done.stdout

    # ---- lifecycle

    def start(self) -> TestPodman:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if shutil.which("podman") is None:
            raise PodmanError("podman not found: apt-get install podman (`make setup` does)")
        self.conf.write_text(containers_conf())
        if SOCKET.exists():
            if self._answers():
                raise PodmanError(f"a podman service already listens on {SOCKET}; stop it "
                                  "(the tests start and stop their own)")
            SOCKET.unlink()  # left by a crashed run
        SOCKET.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [PODMAN, "system", "service", "--time=0", ENDPOINT],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=self.env,
                start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._answers():
            if self.process.poll() is not None:
                raise PodmanError(f"podman system service exited with "
                                  f"{self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise PodmanError(f"podman's API does not answer on {SOCKET} after "
                                  f"{START_TIMEOUT:g} s:\n{self.log_tail()}")
            time.sleep(0.1)

    @staticmethod
    def _answers() -> bool:
        import docker

        try:
            client = docker.DockerClient(base_url=ENDPOINT, timeout=5)
        except Exception:
            return False
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        """Remove the containers it ran, stop the service, delete its files."""
        for container in self._containers:
            subprocess.run([PODMAN, "rm", "--force", "--time", "0", container],
                           capture_output=True, timeout=CALL_TIMEOUT, env=self.env, check=False)
        self._containers.clear()
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        if self.process is not None:
            SOCKET.unlink(missing_ok=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no service log)"

    def __enter__(self) -> TestPodman:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- images and containers

    def load_image(self, docker_tag: str) -> str:
        """`docker save TAG | podman load`, unless podman has it; podman's name for it."""
        name = f"{PODMAN_LOCAL_REGISTRY}{docker_tag}"
        exists = subprocess.run([PODMAN, "image", "exists", name], env=self.env,
                                capture_output=True, timeout=CALL_TIMEOUT, check=False)
        if exists.returncode == 0:
            return name
        save = subprocess.Popen(["docker", "save", docker_tag], stdout=subprocess.PIPE)
        try:
            self.cli("load", stdin=save.stdout)
        finally:
            assert save.stdout is not None
            save.stdout.close()
            if save.wait() != 0:
                raise PodmanError(f"docker save {docker_tag} failed")
        return name

    @contextlib.contextmanager
    def run(self, docker_tag: str, cmd: Sequence[str], *,
            name: str | None = None) -> Iterator[PodmanContainer]:
        """`podman run -d --network none IMAGE CMD...` for the block; removed at its end."""
        image = self.load_image(docker_tag)
        container_name = unique_name(name or "podman")
        container_id = self.cli("run", "--detach", "--network", "none", "--name",
                                container_name, "--label", f"{TEST_LABEL}=1", image,
                                *cmd).strip()
        self._containers.append(container_id)
        try:
            yield PodmanContainer(container_id, container_name, image, self)
        finally:
            subprocess.run([PODMAN, "rm", "--force", "--time", "0", container_id],
                           capture_output=True, timeout=CALL_TIMEOUT, env=self.env, check=False)
            with contextlib.suppress(ValueError):
                self._containers.remove(container_id)


__all__ = ["ENDPOINT", "SOCKET", "PodmanContainer", "PodmanError", "TestPodman",
           "containers_conf"]
