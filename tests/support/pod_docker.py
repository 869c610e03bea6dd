"""Run one container of a Kubernetes pod spec with `docker run`, as a kubelet would run it on
this host: its image and entrypoint, its args expanded, its env, its volumes (materialised
Secrets and ConfigMaps, host paths), its securityContext, hostPID.

What differs from a node, and why (each is a parameter, never hidden):

- Network: `--network host` (the tests' network rule allows only host or none), so a pod that
  would dial a Service gets `--add-host SERVICE:127.0.0.1` instead of cluster DNS, and ports
  in its args may be replaced (two tests must not fight over 50051).
- `privileged: true` is every capability this host's root has (its bounding set; root here
  lacks CAP_SYS_RESOURCE, and Docker's --privileged asks for all of them and fails), with
  seccomp, AppArmor and the masked /proc paths off, as --privileged has them.
- Host paths may be redirected (the agent's state to a temp dir, not the host's
  /var/lib/driftwarden) and more mounts added (the test harness's containerd socket where the
  node's would be).
- fsGroup: the volumes' files are given that group and group access, as the kubelet does.
- mountPropagation is kept only where the host's mount allows it (`propagating_mount`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .containers import TEST_LABEL, unique_name
from .k8s import Doc, Pod, container_env, expand

# capability numbers Docker knows (capabilities(7)); the host's bounding set says which it has
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)  # fmt: skip


def bounding_capabilities(status: str | None = None) -> set[str]:
    """The capabilities in this process's bounding set (/proc/self/status CapBnd)."""
    text = status if status is not None else Path("/proc/self/status").read_text()
    mask = int(next(line.split()[1] for line in text.splitlines() if line.startswith("CapBnd:")),
               16)
    return {name for bit, name in enumerate(CAPABILITIES) if mask >> bit & 1}


def privileged_flags(status: str | None = None) -> list[str]:
    """`--privileged` as far as this host's root allows."""
    missing = sorted(set(CAPABILITIES) - bounding_capabilities(status))
    flags = ["--cap-add", "ALL"]
    for name in missing:
        flags += ["--cap-drop", name]
    return [*flags, "--security-opt", "seccomp=unconfined", "--security-opt",
            "apparmor=unconfined", "--security-opt", "systempaths=unconfined"]


def propagating_mount(path: Path, mountinfo: str | None = None) -> bool:
    """Whether the mount `path` is on is shared or a slave: what Docker needs for rslave or
    rshared. A node's / is shared (systemd makes it so); this host's is private, so a pod's
    mountPropagation cannot be reproduced here for paths on it."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    best, tags = "", []
    for line in text.splitlines():
        left = line.partition(" - ")[0].split()
        if len(left) < 6:
            continue
        point = left[4]
        inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, tags = point, left[6:]
    return any(tag.startswith(("shared:", "master:")) for tag in tags)


@dataclass
class PodRun:
    """How to run `container` of `spec` here; `command()` is the `docker run` line."""

    spec: Doc
    container: Doc
    pod: Pod  # its volumes, materialised
    image: str
    node: str
    name: str = field(default_factory=lambda: unique_name("pod"))
    host_paths: Mapping[str, Path] = field(default_factory=dict)  # hostPath -> path used here
    extra_mounts: Sequence[tuple[Path, str, bool]] = ()  # (here, in the container, read-only)
    add_hosts: Mapping[str, str] = field(default_factory=dict)
    replace_args: Mapping[str, str] = field(default_factory=dict)  # "$flag" value -> new value

    def args(self) -> list[str]:
        env = container_env(self.container, self.node)
        words = [expand(w, env) for w in self.container.get("args", [])]
        out = []
        for i, word in enumerate(words):
            flag = words[i - 1] if i else ""
            out.append(self.replace_args.get(f"{flag} {word}", word))
        return out

    def volume_flags(self) -> list[str]:
        flags = []
        for mount in self.container.get("volumeMounts", []):
            volume = self.pod.volumes[mount["name"]]
            if "hostPath" in volume:
                source = Path(self.host_paths.get(volume["hostPath"]["path"],
                                                  volume["hostPath"]["path"]))
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    source.mkdir(parents=True, exist_ok=True)
            else:
                source = self.pod.local(mount["mountPath"])
            options = "ro" if mount.get("readOnly") else "rw"
            propagation = mount.get("mountPropagation", "None")
            if propagation != "None" and propagating_mount(source):
                options += ",rslave" if propagation == "HostToContainer" else ",rshared"
            flags += ["-v", f"{source}:{mount['mountPath']}:{options}"]
        for here, there, read_only in self.extra_mounts:
            flags += ["-v", f"{here}:{there}:{'ro' if read_only else 'rw'}"]
        return flags

    def security_flags(self) -> list[str]:
        pod_security = self.spec.get("securityContext", {})
        security = self.container.get("securityContext", {})
        if security.get("privileged"):
            return privileged_flags()
        flags = []
        user = security.get("runAsUser", pod_security.get("runAsUser"))
        group = security.get("runAsGroup", pod_security.get("runAsGroup"))
        if user is not None:
            flags += ["--user", f"{user}:{group if group is not None else user}"]
        if "fsGroup" in pod_security:
            flags += ["--group-add", str(pod_security["fsGroup"])]
            self._apply_fs_group(int(pod_security["fsGroup"]))
        if security.get("readOnlyRootFilesystem"):
            flags.append("--read-only")
        for cap in security.get("capabilities", {}).get("drop", []):
            flags += ["--cap-drop", cap]
        for cap in security.get("capabilities", {}).get("add", []):
            flags += ["--cap-add", cap]
        if security.get("allowPrivilegeEscalation") is False:
            flags += ["--security-opt", "no-new-privileges"]
        return flags

    def _apply_fs_group(self, gid: int) -> None:
        """The kubelet's fsGroup: volume files owned by the group, group-readable (and
        group-writable where writable), directories setgid."""
        for mount in self.container.get("volumeMounts", []):
            volume = self.pod.volumes[mount["name"]]
            if "hostPath" in volume:
                continue
            top = self.pod.local(mount["mountPath"])
            for path in [top, *top.rglob("*")]:
                os.chown(path, -1, gid)
                mode = path.stat().st_mode & 0o7777
                if path.is_dir():
                    path.chmod(mode | 0o2070)
                elif "secret" not in volume and "configMap" not in volume:
                    path.chmod(mode | 0o060)

    def command(self) -> list[str]:
        line = ["docker", "run", "--detach", "--name", self.name, "--label", f"{TEST_LABEL}=1",
                "--network", "host"]
        if self.spec.get("hostPID"):
            line += ["--pid", "host"]
        for host, address in self.add_hosts.items():
            line += ["--add-host", f"{host}:{address}"]
        for key, value in container_env(self.container, self.node).items():
            line += ["--env", f"{key}={value}"]
        line += [*self.security_flags(), *self.volume_flags()]
        if "command" in self.container:
            line += ["--entrypoint", self.container["command"][0]]
        return [*line, self.image, *self.container.get("command", [])[1:], *self.args()]


@contextmanager
def running(run: PodRun) -> Iterator[PodRun]:
    """The container for the block; removed at its end (its log is kept in `run.log_text`)."""
    started = subprocess.run(run.command(), capture_output=True, text=True, timeout=120,
                             check=False)
    if started.returncode != 0:
        raise AssertionError(f"docker run of {run.container['name']} failed: {started.stderr}\n"
                             f"{' '.join(run.command())}")
    try:
        yield run
    finally:
        subprocess.run(["docker", "rm", "--force", run.name], capture_output=True, check=False,
                       timeout=60)


def logs(run: PodRun) -> str:
    done = subprocess.run(["docker", "logs", run.name], capture_output=True, text=True,
                          timeout=60, check=False)
    return done.stdout + done.stderr


def state(run: PodRun) -> str:
    done = subprocess.run(["docker", "inspect", "--format", "{{.State.Status}}", run.name],
                          capture_output=True, text=True, timeout=60, check=False)
    return done.stdout.strip()


__all__ = ["PodRun", "bounding_capabilities", "logs", "privileged_flags", "propagating_mount",
           "running", "state"]
