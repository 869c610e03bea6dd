"""A second containerd beside Docker's, with its CRI plugin on, and pods made through the CRI API
the way the kubelet makes them.

`TestContainerd` runs Debian's containerd with its own root, state dir, socket, runc root and
CNI dirs under one temp dir (../shared/HOST.md, "More real parts", has the settings this host
needs: `restrict_oom_score_adj`, a locally built pause image, host-network pods). The test
session starts it once (tests/conftest.py's `containerd` fixture) and stops it at the end: every
pod removed, the daemon stopped, leftover mounts under the temp dir unmounted, the pods' cgroup
folders (the kubelet's job) removed, the temp dir deleted. `stop_daemon` and `start_daemon` stop
and start the daemon alone, as a node's runtime upgrade or crash does: its containers keep
running under their shims meanwhile, and it finds them again on the same root, state and socket
(a test that does this makes an instance of its own, which takes well under a second once the
pause image is built).

Pods and containers are made through `runtime.v1` itself: `RunPodSandbox` with a kubelet-style
`cgroup_parent` (`/kubepods/besteffort/pod<uid>`), the kubelet's labels and annotations, then
`CreateContainer`/`StartContainer`; `ExecSync` runs commands in them. A test image built by
Docker (tests/support/images.py) reaches containerd through `docker save | ctr import` once
per session (`import_image`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from driftwarden.agent.runtimes.base import (
    CONTAINER_NAME_LABEL,
    POD_NAME_LABEL,
    POD_NAMESPACE_LABEL,
    POD_UID_LABEL,
)
from driftwarden.agent.runtimes.cri import parse_verbose_info
from driftwarden.core.mountinfo import parse_mountinfo

from .host import cgroup2_root
from .images import (
    HOST_BUSYBOX,
    _base_rootfs,
    _copy_file,
    _ensure_image,
    _require_file,
    _write_dockerfile,
)

PAUSE_PREFIX = "dw-pause"
CRI_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin keeps its images in
CGROUP_QOS_PARENT = "/kubepods/besteffort"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
START_TIMEOUT = 30.0
CALL_TIMEOUT = 30.0  # seconds per CRI call (image import and runc can be slow on a busy host)



class ContainerdError(RuntimeError):
    """The test containerd could not be started or asked; the message says what to do."""


def pause_image() -> str:
    """The sandbox ("pause") image: FROM scratch, the static busybox, sleeping forever (the
    command is CMD, not part of ENTRYPOINT, so the build's smoke test can run `echo`)."""

    def populate(ctx: Path) -> None:
        root = _base_rootfs(ctx)
        _copy_file(_require_file(HOST_BUSYBOX, "busybox-static"), root / "bin/busybox")
        _write_dockerfile(ctx, "COPY rootfs/ /", 'ENTRYPOINT ["/bin/busybox"]',
                          'CMD ["sleep", "2147483647"]')

    return _ensure_image(PAUSE_PREFIX, populate, ["echo", "ok"])


def containerd_ref(docker_tag: str) -> str:
    """The name `ctr images import` gives a `docker save`d image: "dw-bb:1" ->
    "docker.io/library/dw-bb:1", "org/app:1" -> "docker.io/org/app:1"; a registry's is kept."""
    first, _, rest = docker_tag.partition("/")
    if not rest:
        return f"docker.io/library/{docker_tag}"
    if "." in first or ":" in first or first == "localhost":
        return docker_tag
    return f"docker.io/{docker_tag}"


def _config_toml(base: Path, sandbox_image: str) -> str:
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    runc = f"{cri}.containerd.runtimes.runc"
    return f"""version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{base}/containerd.sock"

[ttrpc]
  address = "{base}/containerd.sock.ttrpc"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{base}/opt"

  [{cri}]
    sandbox_image = "{sandbox_image}"
    # CRI gives sandboxes oom_score_adj -998; lowering it needs CAP_SYS_RESOURCE (not here)
    restrict_oom_score_adj = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"

    [{cri}.cni]
      bin_dir = "{CNI_BIN_DIR}"
      conf_dir = "{base}/cni"

    [{cri}.containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"

      [{runc}]
        runtime_type = "io.containerd.runc.v2"

        [{runc}.options]
          Root = "{base}/runc"
          SystemdCgroup = false
"""


@dataclass
class CriContainer:
    """A started container of a `CriPod`."""

    id: str
    name: str
    image: str  # the image reference it was made from
    pod: CriPod

    @property
    def status(self):
        """Its `ContainerStatusResponse` (verbose: with the runtime's `info`)."""
        return self.pod.containerd.runtime.ContainerStatus(
            self.pod.containerd.api.ContainerStatusRequest(container_id=self.id, verbose=True),
            timeout=CALL_TIMEOUT)

    @property
    def pid(self) -> int:
        """Its init process on this host (ContainerStatus's verbose info)."""
        return parse_verbose_info(self.status.info).pid

    @property
    def cgroup_path(self) -> Path:
        """Its cgroup v2 folder: the pod's folder and the container id, as runc makes it."""
        return cgroup2_root() / self.pod.cgroup_parent.lstrip("/") / self.id

    @property
    def cgroup_id(self) -> int:
        return os.stat(self.cgroup_path).st_ino

    def exec(self, cmd: Sequence[str], timeout: float = 20.0) -> tuple[int, str]:
        """`ExecSync`: (exit code, stdout + stderr as text)."""
        response = self.pod.containerd.runtime.ExecSync(
            self.pod.containerd.api.ExecSyncRequest(container_id=self.id, cmd=list(cmd),
                                                    timeout=int(timeout)),
            timeout=timeout + CALL_TIMEOUT)
        text = (response.stdout + response.stderr).decode("utf-8", "replace")
        return response.exit_code, text

    def stop(self, timeout: int = 0) -> None:
        self.pod.containerd.runtime.StopContainer(
            self.pod.containerd.api.StopContainerRequest(container_id=self.id, timeout=timeout),
            timeout=CALL_TIMEOUT + timeout)

    def remove(self) -> None:
        self.pod.containerd.runtime.RemoveContainer(
            self.pod.containerd.api.RemoveContainerRequest(container_id=self.id),
            timeout=CALL_TIMEOUT)


@dataclass
class CriPod:
    """A pod sandbox made by `TestContainerd.pod`."""

    id: str
    name: str
    namespace: str
    uid: str
    config: object  # the PodSandboxConfig, which CreateContainer needs again
    containerd: TestContainerd
    containers: list[CriContainer] = field(default_factory=list)

    @property
    def cgroup_parent(self) -> str:
        return f"{CGROUP_QOS_PARENT}/pod{self.uid}"

    def run(self, image: str, command: Sequence[str], *, name: str = "app",
            labels: Mapping[str, str] | None = None) -> CriContainer:
        """Create and start a container from a Docker image tag (imported if needed)."""
        api = self.containerd.api
        ref = self.containerd.import_image(image)
        container_labels = {CONTAINER_NAME_LABEL: name, POD_NAME_LABEL: self.name,
                            POD_NAMESPACE_LABEL: self.namespace, POD_UID_LABEL: self.uid,
                            **(labels or {})}
        namespaces = api.NamespaceOption(network=api.NODE, pid=api.CONTAINER, ipc=api.POD)
        config = api.ContainerConfig(
            metadata=api.ContainerMetadata(name=name, attempt=0),
            image=api.ImageSpec(image=ref),
            command=list(command),
            labels=container_labels,
            annotations={"io.kubernetes.container.restartCount": "0",
                         "io.kubernetes.container.terminationMessagePath": "/dev/termination-log"},
            log_path=f"{name}/0.log",
            linux=api.LinuxContainerConfig(
                security_context=api.LinuxContainerSecurityContext(namespace_options=namespaces)),
        )
        runtime = self.containerd.runtime
        created = runtime.CreateContainer(
            api.CreateContainerRequest(pod_sandbox_id=self.id, config=config,
                                       sandbox_config=self.config),
            timeout=CALL_TIMEOUT)
        container = CriContainer(created.container_id, name, ref, self)
        self.containers.append(container)
        runtime.StartContainer(api.StartContainerRequest(container_id=container.id),
                               timeout=CALL_TIMEOUT)
        return container

    def remove(self) -> None:
        """Stop and remove the sandbox (and so its containers), as the kubelet does."""
        api, runtime = self.containerd.api, self.containerd.runtime
        for container in self.containers:
            with contextlib.suppress(Exception):  # already gone: fine
                container.stop(0)
        runtime.StopPodSandbox(api.StopPodSandboxRequest(pod_sandbox_id=self.id),
                               timeout=CALL_TIMEOUT)
        runtime.RemovePodSandbox(api.RemovePodSandboxRequest(pod_sandbox_id=self.id),
                                 timeout=CALL_TIMEOUT)
        remove_pod_cgroups(self.cgroup_parent)


def remove_pod_cgroups(cgroup_parent: str, sys_fs_cgroup: Path = Path("/sys/fs/cgroup")) -> None:
    """Remove a removed pod's cgroup folders in every hierarchy (v1 controllers and v2): the
    kubelet's job, which no kubelet does here. Sub-folders first; a busy one is left alone."""
    relative = cgroup_parent.strip("/")
    for hierarchy in sorted(p for p in sys_fs_cgroup.iterdir() if p.is_dir()):
        pod_dir = hierarchy / relative
        if not pod_dir.is_dir():
            continue
        for child in sorted((p for p in pod_dir.iterdir() if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            pod_dir.rmdir()


def kill_pod(cgroup_parent: str) -> None:
    """Kill every process of a pod through its cgroup v2 folder (`cgroup.kill`), then remove
    its cgroup folders: for a pod the CRI could not remove."""
    kill = cgroup2_root() / cgroup_parent.lstrip("/") / "cgroup.kill"
    with contextlib.suppress(OSError):
        kill.write_text("1")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        remove_pod_cgroups(cgroup_parent)
        if not kill.parent.exists():
            return
        time.sleep(0.1)


class TestContainerd:
    """One containerd process with the CRI plugin, its files under `base`."""

    __test__ = False  # not a pytest class

    def __init__(self, base: Path | None = None) -> None:
        self.base = Path(base or tempfile.mkdtemp(prefix="dwctd-"))
        self.socket = self.base / "containerd.sock"
        self.log_path = self.base / "containerd.log"
        self.api: Any = None  # cri_api.v1.api_pb2 (messages and enums), once started
        self.process: subprocess.Popen | None = None
        self._channel = None
        self.runtime = None
        self.images = None
        self._imported: set[str] = set()
        self._import_lock = threading.Lock()
        self._pods: list[CriPod] = []
        self._binary = "containerd"  # its path, once `start` found it

    @property
    def endpoint(self) -> str:
        """crictl's form: unix:///path."""
        return f"unix://{self.socket}"

    # ---- lifecycle

    def start(self) -> TestContainerd:
        try:
            self._start()
        except BaseException:
            self.stop()  # no half-started daemon, no temp dir left behind
            raise
        return self

    def _start(self) -> None:
        containerd = shutil.which("containerd")
        ctr = shutil.which("ctr")
        if containerd is None or ctr is None:
            raise ContainerdError("containerd/ctr not found: apt-get install containerd "
                                  "(`make setup` does)")
        if not CNI_BIN_DIR.is_dir():
            raise ContainerdError(f"no CNI plugins in {CNI_BIN_DIR}: apt-get install "
                                  "containernetworking-plugins (`make setup` does)")
        try:
            from cri_api.v1 import api_pb2
        except ImportError as exc:
            raise ContainerdError(f"CRI stubs missing ({exc}): pip install --no-deps "
                                  "container-runtime-interface-api (`make setup` does)") from exc
        self.api = api_pb2
        self._binary = containerd
        sandbox = pause_image()
        for sub in ("root", "state", "cni", "runc", "opt", "logs"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        (self.base / "config.toml").write_text(_config_toml(self.base, containerd_ref(sandbox)))
        self.start_daemon()
        self.import_image(sandbox)

    def start_daemon(self) -> None:
        """Start the containerd process on this instance's config and wait until its CRI
        answers (after `stop_daemon`: on the same socket, root and state, where it finds the
        containers that kept running)."""
        if self.process is not None and self.process.poll() is None:
            raise ContainerdError("containerd is running already")
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [self._binary, "--config", str(self.base / "config.toml")], stdout=log,
                stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        self._connect()

    def stop_daemon(self, timeout: float = 15.0) -> None:
        """Stop the containerd process alone (SIGTERM, as systemd stops it): its containers
        keep running under their shims, its socket goes away."""
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def _connect(self) -> None:
        import grpc
        from cri_api.v1 import api_pb2_grpc

        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            if self.process is not None and self.process.poll() is not None:
                raise ContainerdError(f"containerd exited with {self.process.returncode}:\n"
                                      f"{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ContainerdError(f"containerd made no socket in {START_TIMEOUT:g} s:\n"
                                      f"{self.log_tail()}")
            time.sleep(0.05)
        self._channel = grpc.insecure_channel(self.endpoint)
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self._channel)
        self.images = api_pb2_grpc.ImageServiceStub(self._channel)
        while True:
            try:
                self.runtime.Version(self.api.VersionRequest(), timeout=2)
                return
            except grpc.RpcError as exc:
                if time.monotonic() > deadline:
                    raise ContainerdError(f"containerd's CRI does not answer: {exc.details()}\n"
                                          f"{self.log_tail()}") from exc
                time.sleep(0.1)

    def stop(self) -> None:
        """Remove every pod, stop containerd, unmount what it left, delete its files. A pod
        the CRI could not remove has its processes killed through its cgroup."""
        stuck = []
        for pod in self._pods:
            try:
                pod.remove()
            except Exception:  # containerd wedged or gone: clean up below, by hand
                stuck.append(pod)
        self._pods.clear()
        self.stop_daemon()
        self._kill_shims()
        for pod in stuck:
            kill_pod(pod.cgroup_parent)
        self._unmount_below(self.base)
        shutil.rmtree(self.base, ignore_errors=True)

    def _kill_shims(self) -> None:
        """containerd-shim-runc-v2 processes of this instance (their -address names our
        socket) outlive the daemon; a pod not removed would leave one."""
        needle = f"-address {self.socket}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            except OSError:
                continue
            if b"containerd-shim" in cmdline and needle in cmdline:
                with contextlib.suppress(OSError):
                    os.kill(int(entry.name), signal.SIGKILL)

    @staticmethod
    def _unmount_below(base: Path) -> None:
        text = Path("/proc/self/mountinfo").read_text()
        points = [m.mount_point for m in parse_mountinfo(text)
                  if m.mount_point == str(base) or m.mount_point.startswith(f"{base}/")]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no containerd log)"

    def __enter__(self) -> TestContainerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- images

    def import_image(self, docker_tag: str) -> str:
        """`docker save TAG | ctr -n k8s.io images import -` once per session; returns the
        name containerd knows the image by."""
        ref = containerd_ref(docker_tag)
        with self._import_lock:
            if docker_tag in self._imported:
                return ref
            save = subprocess.Popen(["docker", "save", docker_tag], stdout=subprocess.PIPE)
            imported = subprocess.run(
                ["ctr", "-a", str(self.socket), "-n", CRI_NAMESPACE, "images", "import",
                 "-"], stdin=save.stdout, capture_output=True, text=True,
                check=False)
            assert save.stdout is not None
            save.stdout.close()
            if save.wait() != 0 or imported.returncode != 0:
                raise ContainerdError(f"docker save {docker_tag} | ctr images import failed: "
                                      f"{imported.stderr.strip()}")
            self._imported.add(docker_tag)
        return ref

    def add_repo_digest(self, docker_tag: str) -> str:
        """Give an imported image the repo digest a registry pull would have given it (a
        "name@sha256:<manifest digest>" reference, what the CRI's ImageStatus lists as
        repo_digests); returns that reference. Every container of the image then has it as its
        image key and digest, so give it only to an image no other test runs here."""
        known = self.image_status(docker_tag).repo_digests
        if known:
            return known[0]
        ref = self.import_image(docker_tag)
        ctr = ["ctr", "-a", str(self.socket), "-n", CRI_NAMESPACE, "images"]
        listed = subprocess.run([*ctr, "ls", f"name=={ref}"], capture_output=True, text=True,
                                check=False)
        rows = listed.stdout.splitlines()
        if listed.returncode != 0 or len(rows) != 2:
            raise ContainerdError(f"ctr images ls {ref} failed: {listed.stderr.strip()}")
        digested = f"{ref.rsplit(':', 1)[0]}@{rows[1].split()[2]}"  # REF TYPE DIGEST ...
        tagged = subprocess.run([*ctr, "tag", ref, digested], capture_output=True, text=True,
                                check=False)
        if tagged.returncode != 0:
            raise ContainerdError(f"ctr images tag {ref} {digested} failed: "
                                  f"{tagged.stderr.strip()}")
        return digested

    def image_status(self, docker_tag: str):
        """`ImageStatus` of an imported image (its id and repo digests)."""
        ref = self.import_image(docker_tag)
        return self.images.ImageStatus(
            self.api.ImageStatusRequest(image=self.api.ImageSpec(image=ref)),
            timeout=CALL_TIMEOUT).image

    # ---- pods

    def run_pod(self, name: str, *, namespace: str = "default",
                labels: Mapping[str, str] | None = None,
                annotations: Mapping[str, str] | None = None) -> CriPod:
        """`RunPodSandbox` as the kubelet calls it for a host-network pod (no CNI result is
        needed, and no hostname: containerd 1.6 wants an eth0 otherwise)."""
        api = self.api
        uid = str(uuid.uuid4())
        namespaces = api.NamespaceOption(network=api.NODE, pid=api.CONTAINER, ipc=api.POD)
        config = api.PodSandboxConfig(
            metadata=api.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            log_directory=str(self.base / "logs" / uid),
            labels={POD_NAME_LABEL: name, POD_NAMESPACE_LABEL: namespace, POD_UID_LABEL: uid,
                    **(labels or {})},
            annotations={"kubernetes.io/config.source": "api", **(annotations or {})},
            linux=api.LinuxPodSandboxConfig(
                cgroup_parent=f"{CGROUP_QOS_PARENT}/pod{uid}",
                security_context=api.LinuxSandboxSecurityContext(namespace_options=namespaces)),
        )
        (self.base / "logs" / uid).mkdir(parents=True, exist_ok=True)
        response = self.runtime.RunPodSandbox(api.RunPodSandboxRequest(config=config),
                                              timeout=CALL_TIMEOUT * 2)
        pod = CriPod(response.pod_sandbox_id, name, namespace, uid, config, self)
        self._pods.append(pod)
        return pod

    @contextlib.contextmanager
    def pod(self, name: str, **kwargs) -> Iterator[CriPod]:
        """A pod for the block; removed at its end (containers and cgroup folders too)."""
        pod = self.run_pod(name, **kwargs)
        try:
            yield pod
        finally:
            if pod in self._pods:
                self._pods.remove(pod)
            pod.remove()


def unique_pod_name(base: str) -> str:
    return f"dwtest-{base}-{uuid.uuid4().hex[:6]}"


# What tests/data/cri/ holds: a Deployment's pod as the kubelet makes it.
RECORDED_POD = "web-7d4b9c8f6d-x2k9q"
RECORDED_LABELS = {"app": "web", "pod-template-hash": "7d4b9c8f6d"}


def record_cri_responses(containerd: TestContainerd, image: str, out_dir: Path) -> None:
    """Write the CRI answers CriMetadata reads about one container (ListContainers,
    ContainerStatus verbose, PodSandboxStatus, ImageStatus) as JSON, for the parsing tests
    (tests/test_runtimes_cri.py). Run: `.venv/bin/python -m tests.support.containerd DIR`."""
    from google.protobuf import json_format

    api, runtime = containerd.api, containerd.runtime
    out_dir.mkdir(parents=True, exist_ok=True)
    with containerd.pod(RECORDED_POD, namespace="shop", labels=RECORDED_LABELS) as pod:
        container = pod.run(image, ["/bin/sleep", "600"], name="app")
        answers = {
            "list_containers": runtime.ListContainers(api.ListContainersRequest(
                filter=api.ContainerFilter(id=container.id)), timeout=CALL_TIMEOUT),
            "container_status": container.status,
            "pod_sandbox_status": runtime.PodSandboxStatus(
                api.PodSandboxStatusRequest(pod_sandbox_id=pod.id), timeout=CALL_TIMEOUT),
            "image_status": containerd.images.ImageStatus(api.ImageStatusRequest(
                image=api.ImageSpec(image=container.image)), timeout=CALL_TIMEOUT),
            "version": runtime.Version(api.VersionRequest(), timeout=CALL_TIMEOUT),
        }
        for name, message in answers.items():
            (out_dir / f"{name}.json").write_text(json_format.MessageToJson(message) + "\n")


if __name__ == "__main__":
    import sys

    from .images import busybox_image

    with TestContainerd() as instance:
        record_cri_responses(instance, busybox_image(), Path(sys.argv[1]))


__all__ = [
    "ContainerdError",
    "CriContainer",
    "CriPod",
    "TestContainerd",
    "containerd_ref",
    "pause_image",
    "remove_pod_cgroups",
    "unique_pod_name",
]
