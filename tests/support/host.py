"""What the host under test has, asked of the host instead of assumed from one machine.

- where cgroup v2 is mounted (/proc/self/mountinfo: /sys/fs/cgroup on a pure v2 host,
  /sys/fs/cgroup/unified on a hybrid one);
- which cgroup a process runs in (the "0::" line of /proc/PID/cgroup), and where Docker puts a
  container's cgroup (its cgroup driver and the container's CgroupParent: `/docker/<id>` with
  cgroupfs, `/system.slice/docker-<id>.scope` with systemd);
- what the kernel was built with (/proc/config.gz or /boot/config-RELEASE);
- which BPF program types load and attach here, tried the way a bcc user would, in a child
  process so that a clang crash or libbcc's stderr noise stays out of the test run.

The parsers take text and paths (tests/test_support_host.py feeds them fake hosts: hybrid, pure
v2, systemd driver); the few functions without parameters read the real host.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from driftwarden.core.mountinfo import parse_mountinfo

PROC = Path("/proc")
BOOT = Path("/boot")

# ---- cgroup v2 -------------------------------------------------------------------------------

def cgroup2_mount_points(mountinfo: str) -> list[Path]:
    """Mount points of whole cgroup2 hierarchies in a /proc/PID/mountinfo text, in mount order.
    A bind mount of a sub-tree (root field other than "/") is not the hierarchy's root."""
    found = []
    for mount in parse_mountinfo(mountinfo):
        if mount.fstype == "cgroup2" and mount.root == "/":
            found.append(Path(mount.mount_point))
    return found


def cgroup2_root(proc_root: Path = PROC) -> Path:
    """The cgroup v2 mount this process sees; FileNotFoundError when there is none."""
    mountinfo = proc_root / "self" / "mountinfo"
    mounts = cgroup2_mount_points(mountinfo.read_text())
    if not mounts:
        raise FileNotFoundError(
            f"no cgroup2 mount in {mountinfo}; mount one with "
            "`mount -t cgroup2 none /sys/fs/cgroup/unified` (hybrid host)"
        )
    return mounts[0]


def in_root_cgroup(argv: list[str], cgroup_root: Path | None = None) -> list[str]:
    """`argv` run by a shell that first moves itself into the cgroup v2 root: the host cgroup the
    probes filter and attribution calls "host". A test started on a host without systemd runs
    there already; on a systemd host it runs in a slice (/user.slice/.../session-1.scope), whose
    processes the agent reports as not_container."""
    root = cgroup2_root() if cgroup_root is None else cgroup_root
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(root), *argv]


def v2_cgroup_of(proc_cgroup: str) -> str | None:
    """The cgroup v2 path in a /proc/PID/cgroup text (its "0::/path" line), or None."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip()
    return None


def process_cgroup_dir(pid: int, *, proc_root: Path = PROC,
                       cgroup_root: Path | None = None) -> Path | None:
    """The cgroup v2 directory process `pid` runs in, or None (gone, or no v2 entry)."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    relative = v2_cgroup_of(text)
    if relative is None:
        return None
    root = cgroup2_root(proc_root) if cgroup_root is None else cgroup_root
    path = root / relative.lstrip("/")
    return path if path.is_dir() else None


def systemd_slice_path(name: str) -> str:
    """A systemd slice's cgroup path: "a-b.slice" is "/a.slice/a-b.slice", "-.slice" is ""."""
    stem = name.removesuffix(".slice")
    if stem == name or "/" in stem or not stem:
        raise ValueError(f"not a systemd slice name: {name!r} (expected NAME.slice)")
    if stem == "-":
        return ""
    parts = stem.split("-")
    if "" in parts:
        raise ValueError(f"not a systemd slice name: {name!r} (empty part between dashes)")
    return "".join(f"/{'-'.join(parts[: i + 1])}.slice" for i in range(len(parts)))


def docker_cgroup_path(container_id: str, driver: str, cgroup_parent: str = "") -> str:
    """Where Docker puts a container's cgroup, relative to the cgroup v2 root, from the daemon's
    cgroup driver (`docker info`) and the container's HostConfig.CgroupParent (empty: default)."""
    if driver == "cgroupfs":
        parent = (cgroup_parent or "/docker").strip("/")
        return f"/{parent}/{container_id}" if parent else f"/{container_id}"
    if driver == "systemd":
        return f"{systemd_slice_path(cgroup_parent or 'system.slice')}/docker-{container_id}.scope"
    raise ValueError(f"unknown Docker cgroup driver {driver!r} (expected cgroupfs or systemd)")


# ---- kernel ----------------------------------------------------------------------------------


def parse_kernel_config(text: str) -> dict[str, str]:
    """CONFIG_X -> its value ("y", "m", a number or string); "# CONFIG_X is not set" -> "n"."""
    options = {}
    for line in text.splitlines():
        if m := re.fullmatch(r"(CONFIG_\w+)=(.*)", line.strip()):
            options[m.group(1)] = m.group(2).strip('"')
        elif m := re.fullmatch(r"# (CONFIG_\w+) is not set", line.strip()):
            options[m.group(1)] = "n"
    return options


def kernel_config(release: str | None = None, *, proc_root: Path = PROC,
                  boot: Path = BOOT) -> dict[str, str] | None:
    """The running kernel's build options from /proc/config.gz or /boot/config-RELEASE, or None
    when the host keeps neither."""
    release = release or os.uname().release
    packed = proc_root / "config.gz"
    if packed.is_file():
        return parse_kernel_config(gzip.decompress(packed.read_bytes()).decode(errors="replace"))
    plain = boot / f"config-{release}"
    if plain.is_file():
        return parse_kernel_config(plain.read_text(errors="replace"))
    return None


# Each program type as a bcc user writes it. kprobe: attach_kprobe loads, then attaches to the
# syscall's entry function; fentry and LSM: the constructor loads and attaches kfunc__/lsm__.
_TRY_CHILD = r"""
import json, sys
from bcc import BPF

def attach(key):
    if key == "kprobe":
        b = BPF(text="int dw_try(void *ctx) { return 0; }")
        try:
            b.attach_kprobe(event=b.get_syscall_fnname("getpid"), fn_name="dw_try")
        finally:
            b.cleanup()
    elif key == "fentry":
        BPF(text="KFUNC_PROBE(do_sys_openat2) { return 0; }").cleanup()
    elif key == "lsm":
        BPF(text="LSM_PROBE(bpf, int cmd) { return 0; }").cleanup()
    else:
        raise ValueError("no such program type: " + key)

results = {}
for key in json.loads(sys.stdin.read()):
    try:
        attach(key)
        results[key] = None
    except Exception as exc:
        results[key] = str(exc) or type(exc).__name__
print("DWTRY " + json.dumps(results), flush=True)
"""
PROGRAM_TRY_KEYS = ("kprobe", "fentry", "lsm")


@dataclass(frozen=True)
class ProgramTry:
    """What happened when a program of one type was loaded and attached on this host."""

    key: str
    error: str | None  # bcc's message; None when it loaded and attached

    @property
    def attached(self) -> bool:
        return self.error is None

    @property
    def loaded(self) -> bool:
        # bcc raises "Failed to attach ..." only after load_func succeeded
        return self.error is None or self.error.startswith("Failed to attach")


def try_program_types(keys: tuple[str, ...] = PROGRAM_TRY_KEYS,
                      timeout: float = 180) -> dict[str, ProgramTry]:
    """Load and attach one program of each type in a child process (needs root and bcc)."""
    done = subprocess.run([sys.executable, "-c", _TRY_CHILD], input=json.dumps(list(keys)),
                          capture_output=True, text=True, timeout=timeout, check=False)
    line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("DWTRY ")),
                None)
    if line is None:
        raise RuntimeError(f"program-type try exited {done.returncode} without an answer: "
                           f"{done.stderr.strip()[-2000:]}")
    return {key: ProgramTry(key, error) for key, error in json.loads(line[6:]).items()}
