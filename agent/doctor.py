"""`driftwarden doctor`: check that this host has everything the agent needs.

Each check returns one `Check` row with a one-line fix hint. Required checks decide the
exit code; optional ones (BTF, Docker, each other container runtime found and whether it answers,
containers under runtimes nobody answers for, which extra BPF program types load) only inform;
a runtime endpoint given with --runtime-endpoint that does not answer is a failure.
With --collector (the agent's addresses, several for replicas) each collector is asked over
gRPC's health service, and a required row says which one an agent started now would stream to
(the first that answers, as the agent's failover picks it); none answering is a failure.
Every path the checks read comes from `DoctorEnv`, so unit tests run on fixture trees.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import errno
import importlib
import json
import logging
import os
import platform
import re
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from driftwarden.agent.cgroups import running_containers
from driftwarden.agent.runtimes.cri import CriRuntime
from driftwarden.agent.runtimes.docker import DockerEngine
from driftwarden.agent.runtimes.registry import RuntimeEndpoint, parse_runtime_endpoint
from driftwarden.core.errors import (
    HostSupportError,
    RuntimeActionError,
    RuntimeNotServedError,
    UsageError,
)
from driftwarden.core.tls import TlsFiles
from driftwarden.probes.loader import (
    ProbeConfig,
    ProbePlan,
    absent_syscalls,
    describe_missing,
    find_cgroup2_root,
    find_tracefs,
    missing_required,
)

log = logging.getLogger(__name__)

Status = Literal["ok", "fail", "warn", "info"]
STATUSES: tuple[str, ...] = ("ok", "fail", "warn", "info")

# Capability bit numbers (include/uapi/linux/capability.h).
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39

NOT_SUPPORTED = "not supported here"
LOAD_TIMEOUT_S = 60.0
_RESULT_MARKER = "DWDOCTOR "


@dataclass(frozen=True)
class Check:
    name: str
    required: bool
    status: Status
    detail: str
    fix: str


@dataclass(frozen=True)
class DoctorEnv:
    """Where the checks look. Defaults are the real host; tests point these at tmp_path."""

    proc_root: str = "/proc"
    sys_root: str = "/sys"
    modules_root: str = "/lib/modules"
    docker_socket: str = "/var/run/docker.sock"
    run_root: str = "/run"  # where containerd, CRI-O and podman put their sockets
    kernel_release: str = field(default_factory=lambda: os.uname().release)
    # --runtime-endpoint values; none: the usual sockets under run_root that exist
    runtime_endpoints: tuple[str, ...] = ()
    # --collector targets (host:port, in the agent's order) and the TLS files to dial them
    collectors: tuple[str, ...] = ()
    collector_tls: TlsFiles | None = None

    def sys(self, *parts: str) -> Path:
        return Path(self.sys_root, *parts)


@dataclass(frozen=True)
class ProgramType:
    """One optional BPF program type the load test tries (bcc source, how to load it)."""

    key: str
    label: str
    source: str
    func_prefix: str          # bcc names KFUNC/LSM functions itself: match by prefix
    bcc_type: str             # attribute of bcc.BPF
    attach_type: int = -1     # expected_attach_type, required at load by some types
    purpose: str = ""


# The C is deliberately include-free: kernel headers make clang ~5x slower (0.5 s vs 3 s).
PROGRAM_TYPES: tuple[ProgramType, ...] = (
    ProgramType("raw_tracepoint", "raw tracepoint",
                "int dw_doc_raw_tp(void *ctx) { return 0; }",
                "dw_doc_raw_tp", "RAW_TRACEPOINT", purpose="cheaper syscall hooks"),
    ProgramType("cgroup_sock_addr", "cgroup sock_addr",
                "int dw_doc_sock_addr(void *ctx) { return 1; }",
                "dw_doc_sock_addr", "CGROUP_SOCK_ADDR",
                attach_type=10,  # BPF_CGROUP_INET4_CONNECT: sock_addr needs one at load
                purpose="quarantine: deny connect()"),
    ProgramType("cgroup_skb", "cgroup skb",
                "int dw_doc_skb(void *ctx) { return 1; }",
                "dw_doc_skb", "CGROUP_SKB", purpose="quarantine: drop packets"),
    ProgramType("kprobe", "kprobe",
                "int dw_doc_kprobe(void *ctx) { return 0; }",
                "dw_doc_kprobe", "KPROBE", purpose="not used; informational"),
    ProgramType("fentry", "fentry (KFUNC_PROBE)",
                "KFUNC_PROBE(do_sys_openat2) { return 0; }",
                "kfunc__", "TRACING", purpose="not used; informational"),
    ProgramType("lsm", "LSM (LSM_PROBE)",
                "LSM_PROBE(bpf, int cmd) { return 0; }",
                "lsm__", "LSM", purpose="not used; informational"),
)


# ---------------------------------------------------------------- required checks

def _cap_eff(status_text: str) -> int | None:
    for line in status_text.splitlines():
        if line.startswith("CapEff:"):
            try:
                return int(line.split(":", 1)[1].strip(), 16)
            except ValueError:
                return None
    return None


def _uid(status_text: str) -> str:
    for line in status_text.splitlines():
        if line.startswith("Uid:"):
            fields = line.split()
            return fields[2] if len(fields) > 2 else fields[-1]  # effective uid
    return "?"


def check_privileges(env: DoctorEnv) -> Check:
    name = "privileges"
    fix = ("run as root (sudo), or grant CAP_BPF+CAP_PERFMON (+CAP_NET_ADMIN for quarantine), "
           "e.g. a privileged DaemonSet")
    path = Path(env.proc_root, "self", "status")
    try:
        text = path.read_text()
    except OSError as exc:
        return Check(name, True, "fail", f"cannot read {path}: {exc.strerror}", fix)
    caps = _cap_eff(text)
    if caps is None:
        return Check(name, True, "fail", f"no CapEff line in {path}", fix)
    uid = _uid(text)

    def has(bit: int) -> bool:
        return bool(caps >> bit & 1)

    if has(CAP_SYS_ADMIN):
        return Check(name, True, "ok", f"euid {uid}, CapEff has CAP_SYS_ADMIN", fix)
    if has(CAP_BPF) and has(CAP_PERFMON):
        if has(CAP_NET_ADMIN):
            return Check(name, True, "ok",
                         f"euid {uid}, CapEff has CAP_BPF+CAP_PERFMON+CAP_NET_ADMIN", fix)
        # Tracing works; quarantine (cgroup skb/sock_addr) needs CAP_NET_ADMIN.
        return Check(name, True, "warn",
                     f"euid {uid}, CAP_BPF+CAP_PERFMON but no CAP_NET_ADMIN: quarantine fails",
                     fix)
    return Check(name, True, "fail",
                 f"euid {uid}, CapEff {caps:#x} lacks CAP_SYS_ADMIN and CAP_BPF+CAP_PERFMON", fix)


# bpf(2) syscall numbers; the syscall is reached through libc's syscall() via ctypes so this
# check does not depend on bcc (a separate check) being installed.
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351,
            "riscv64": 280}
_BPF_MAP_CREATE = 0
_BPF_PROG_LOAD = 5
_BPF_MAP_TYPE_ARRAY = 2
_BPF_PROG_TYPE_TRACEPOINT = 5
_ATTR_SIZE = 128

BpfCall = Callable[[int, bytes], tuple[int, int]]  # (cmd, attr) -> (fd or -1, errno)


def _libc_bpf(cmd: int, attr: bytes) -> tuple[int, int]:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        return -1, errno.ENOSYS
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    buf = ctypes.create_string_buffer(attr, len(attr))
    ret = libc.syscall(ctypes.c_long(nr), ctypes.c_long(cmd), buf, ctypes.c_long(len(attr)))
    err = ctypes.get_errno()
    if ret >= 0:
        os.close(ret)
        return ret, 0
    return -1, err


def _map_create_attr() -> bytes:
    return struct.pack("=IIII", _BPF_MAP_TYPE_ARRAY, 4, 4, 1).ljust(_ATTR_SIZE, b"\0")


def _prog_load_attr(insns: ctypes.Array, license_: ctypes.Array) -> bytes:
    # union bpf_attr, BPF_PROG_LOAD: prog_type, insn_cnt, insns, license (rest zero).
    return struct.pack("=IIQQ", _BPF_PROG_TYPE_TRACEPOINT, len(insns) // 8,
                       ctypes.addressof(insns), ctypes.addressof(license_)).ljust(_ATTR_SIZE, b"\0")


def check_bpf_syscall(env: DoctorEnv, bpf_call: BpfCall | None = None) -> Check:
    """Create an array map and load `r0 = 0; exit` as a tracepoint program."""
    del env  # uniform signature; the syscall has no path to point elsewhere
    call = bpf_call or _libc_bpf
    name = "bpf syscall"
    fix_perm = ("needs root/CAP_BPF; if root already, check kernel lockdown and "
                "sysctl kernel.unprivileged_bpf_disabled")
    fd, err = call(_BPF_MAP_CREATE, _map_create_attr())
    if fd < 0:
        return Check(name, True, "fail", f"map create failed: {_errno_name(err)}",
                     _bpf_fix(err, fix_perm))
    # mov64 r0, 0; exit
    insns = ctypes.create_string_buffer(struct.pack("=BBhiBBhi", 0xB7, 0, 0, 0, 0x95, 0, 0, 0), 16)
    license_ = ctypes.create_string_buffer(b"GPL")
    fd, err = call(_BPF_PROG_LOAD, _prog_load_attr(insns, license_))
    if fd < 0:
        return Check(name, True, "fail", f"tracepoint program load failed: {_errno_name(err)}",
                     _bpf_fix(err, fix_perm))
    return Check(name, True, "ok", "map create and tracepoint program load work", fix_perm)


def _bpf_fix(err: int, fix_perm: str) -> str:
    if err == errno.ENOSYS:
        return "kernel built without CONFIG_BPF_SYSCALL: use a kernel with BPF enabled"
    return fix_perm


def _errno_name(err: int) -> str:
    return errno.errorcode.get(err, f"errno {err}")


def check_btf(env: DoctorEnv) -> Check:
    path = env.sys("kernel", "btf", "vmlinux")
    fix = "optional: a kernel with CONFIG_DEBUG_INFO_BTF=y (only fentry/LSM programs need it)"
    if path.exists():
        return Check("btf", False, "ok", f"{path} present", fix)
    return Check("btf", False, "info",
                 f"{path} absent: not needed, the probes do not use CO-RE", fix)


def _tracefs_root(env: DoctorEnv) -> Path | None:
    return find_tracefs(Path(env.proc_root, "self", "mountinfo"),
                        (str(env.sys("kernel", "tracing")),
                         str(env.sys("kernel", "debug", "tracing"))))


def _tracefs_fix(env: DoctorEnv) -> str:
    return f"mount -t tracefs nodev {env.sys('kernel', 'tracing')}"


def _denied(name: str, exc: PermissionError) -> Check:
    # tracefs is root-only (0700): a plain user cannot even tell whether it is mounted.
    return Check(name, True, "fail", f"permission denied: {exc.filename or exc}",
                 "run as root (tracefs is readable by root only)")


def check_tracefs(env: DoctorEnv) -> Check:
    fix = _tracefs_fix(env)
    try:
        root = _tracefs_root(env)
        has_syscalls = root is not None and (root / "events" / "syscalls").is_dir()
    except PermissionError as exc:
        return _denied("tracefs", exc)
    if root is None:
        return Check("tracefs", True, "fail",
                     f"not mounted (no {env.sys('kernel', 'tracing', 'events')})", fix)
    if not has_syscalls:
        return Check("tracefs", True, "fail",
                     f"{root} mounted but has no events/syscalls",
                     "kernel lacks CONFIG_FTRACE_SYSCALLS: use a kernel with syscall tracepoints")
    return Check("tracefs", True, "ok", f"{root}/events/syscalls present", fix)


def check_kernel_headers(env: DoctorEnv) -> Check:
    name = "kernel headers"
    build = Path(env.modules_root, env.kernel_release, "build")
    fix = (f"make setup (links {build} -> /usr/src/linux-headers-*-<arch>), "
           f"or install linux-headers-{env.kernel_release}")
    if build.is_symlink() and not build.exists():
        return Check(name, True, "fail", f"{build} -> {os.readlink(build)} is a dangling link", fix)
    if not build.exists():
        return Check(name, True, "fail", f"{build} missing", fix)
    if not (build / "include").is_dir():
        return Check(name, True, "fail", f"{build} has no include/ directory", fix)
    target = os.path.realpath(build)
    if env.kernel_release in Path(target).name or not build.is_symlink():
        return Check(name, True, "ok", f"{build} present", fix)
    # Mismatched headers are fine for these probes (they read no kernel structs); say so.
    return Check(name, True, "ok",
                 f"linked to {Path(target).name} (another kernel's: ok, no struct reads)", fix)


def check_bcc(env: DoctorEnv) -> Check:
    del env
    fix = ("apt-get install python3-bpfcc, and build the venv with --system-site-packages "
           "(make setup)")
    try:
        bcc = importlib.import_module("bcc")
    except Exception as exc:  # ImportError, or OSError when libbcc.so is missing
        return Check("bcc", True, "fail", f"import bcc failed: {type(exc).__name__}: {exc}", fix)
    version = getattr(bcc, "__version__", "?")
    where = os.path.dirname(getattr(bcc, "__file__", "") or "?")
    return Check("bcc", True, "ok", f"bcc {version} ({where})", fix)


def check_tracepoints(env: DoctorEnv) -> Check:
    """What the probes attach on this kernel with every kind, what --open-result adds, and the
    tracepoints of optional syscalls this kernel lacks (compiled out, so never attached)."""
    name = "tracepoints"
    fix = "use Linux 5.8+ with CONFIG_FTRACE_SYSCALLS (syscall tracepoints)"
    try:
        root = _tracefs_root(env)
        if root is None:
            return Check(name, True, "fail", "cannot check: tracefs not mounted",
                         _tracefs_fix(env))
        missing = missing_required(ProbeConfig(open_result=True), root)
        absent = absent_syscalls(root)
    except PermissionError as exc:
        return _denied(name, exc)
    if missing:
        count = sum(len(tps) for tps in missing.values())
        return Check(name, True, "fail", f"{count} required missing: {describe_missing(missing)}",
                     fix)
    every = ProbePlan(ProbeConfig(), absent)
    more = (len(ProbePlan(ProbeConfig(open_result=True), absent).tracepoint_names())
            - len(every.tracepoint_names()))
    detail = f"all kinds attach {every.describe()}, --open-result {more} more"
    if every.absent_tracepoints():
        detail += f"; not on this kernel: {every.describe_absent()}"
    return Check(name, True, "ok", detail, fix)


def check_cgroup_v2(env: DoctorEnv) -> Check:
    name = "cgroup v2"
    pure = env.sys("fs", "cgroup")
    hybrid = env.sys("fs", "cgroup", "unified")
    fix = (f"mount -t cgroup2 none {hybrid} (hybrid), or boot with "
           "systemd.unified_cgroup_hierarchy=1")
    if (pure / "cgroup.controllers").is_file():
        return Check(name, True, "ok", f"pure v2 at {pure}", fix)
    if (hybrid / "cgroup.controllers").is_file():
        return Check(name, True, "ok", f"hybrid: v2 at {hybrid}", fix)
    return Check(name, True, "fail",
                 f"no cgroup2 hierarchy at {pure} or {hybrid}", fix)


# ---------------------------------------------------------------- optional checks

def check_docker(env: DoctorEnv, timeout: float = 2.0) -> Check:
    """`GET /_ping` on the Engine API socket: attribution needs it for names and images."""
    name = "docker socket"
    path = env.docker_socket
    fix = "start dockerd (make setup); without it events keep cgroup ids but lose names/images"
    if not os.path.exists(path):
        return Check(name, False, "info", f"no socket at {path}", fix)
    try:
        with DockerEngine(f"unix://{path}", timeout=timeout) as engine:
            api = engine.ping()
    except RuntimeActionError as exc:
        return Check(name, False, "info", str(exc), fix)
    suffix = f" (API {api})" if api else ""
    return Check(name, False, "ok", f"{path} answers /_ping{suffix}", fix)


# Where the other runtimes listen, under DoctorEnv.run_root (Docker's is DoctorEnv.docker_socket).
RUNTIME_SOCKETS = {
    "containerd": "containerd/containerd.sock",
    "cri-o": "crio/crio.sock",
    "podman": "podman/podman.sock",
}
_CRI_KINDS = frozenset({"containerd", "cri-o"})  # cgroup paths may not tell these apart


def runtime_endpoints(env: DoctorEnv) -> list[tuple[RuntimeEndpoint, bool]]:
    """(endpoint, given) for each runtime the agent would ask besides env.docker_socket: those
    given with --runtime-endpoint, else the usual sockets under env.run_root that exist."""
    if env.runtime_endpoints:
        return [(parse_runtime_endpoint(text), True) for text in env.runtime_endpoints]
    found = []
    for relative in RUNTIME_SOCKETS.values():
        path = Path(env.run_root, relative)
        if path.exists():
            found.append((parse_runtime_endpoint(str(path)), False))
    return found


def check_runtime_endpoint(endpoint: RuntimeEndpoint, given: bool,
                           timeout: float = 2.0) -> Check:
    """Does the runtime at `endpoint` answer (CRI: Version; Docker API: /_ping)? A probed
    socket that does not answer only warns; one given with --runtime-endpoint fails."""
    name = f"runtime {endpoint.runtime}"
    fix = (f"start {endpoint.runtime}, or give the socket it listens on with "
           "--runtime-endpoint unix:///path; without it its containers keep cgroup ids but "
           "lose names, images and detection")
    try:
        if endpoint.api == "cri":
            with CriRuntime(endpoint.url, timeout=timeout) as client:
                version = client.version()
            detail = (f"{endpoint.url} answers: {version.runtime_name} "
                      f"{version.runtime_version} (CRI {version.runtime_api_version})")
        else:
            with DockerEngine(endpoint.url, timeout=timeout) as engine:
                api = engine.ping()
            detail = f"{endpoint.url} answers /_ping" + (f" (API {api})" if api else "")
    except RuntimeNotServedError as exc:
        return Check(name, given, "fail" if given else "warn", str(exc),
                     "if this node's containers run under it, enable its CRI plugin (remove "
                     '"cri" from disabled_plugins in its config.toml); Docker\'s own containerd '
                     "needs none")
    except RuntimeActionError as exc:
        return Check(name, given, "fail" if given else "warn", str(exc), fix)
    return Check(name, given, "ok", detail, fix)


def check_runtime_endpoints(env: DoctorEnv) -> list[Check]:
    """One row per runtime endpoint found or given (see runtime_endpoints)."""
    try:
        endpoints = runtime_endpoints(env)
    except UsageError as exc:
        return [Check("runtime endpoints", True, "fail", str(exc),
                      "give sockets as unix:///path/to.sock")]
    return [check_runtime_endpoint(endpoint, given) for endpoint, given in endpoints]


AGENT_SERVICE = "driftwarden.v1.AgentChannel"  # what the health check asks about


def ask_collector(address: str, tls: TlsFiles | None,
                  timeout: float = 3.0) -> tuple[str, str]:
    """``(status, detail)`` of the collector at `address`: its gRPC health service's answer for
    the agents' service, through the agent's own dial (TLS files, no proxy)."""
    import grpc
    from driftwarden.core.dial import dial
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with dial(address, tls=tls) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=AGENT_SERVICE), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return "fail", f"does not answer ({code.name}: {exc.details()})"
            return "warn", f"answers, but not as a collector ({code.name}: {exc.details()})"
    serving = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        return "warn", f"answers {serving}: it takes no agents now"
    return "ok", f"answers SERVING ({'mTLS' if tls is not None else 'plaintext'})"



def check_collectors(env: DoctorEnv,
                     ask: Callable[[str, TlsFiles | None], tuple[str, str]] = ask_collector,
                     ) -> list[Check]:
    """One row per --collector address (optional), then a required ``collector`` row: which
    one an agent started now streams to (the first that answers), failing when none does."""
    fix = ("start the collector, or correct --collector; several addresses: replicas on one "
           "PostgreSQL store (`driftwarden collector --store postgresql://...`)")
    rows = []
    first_ok = None
    for index, address in enumerate(env.collectors, 1):
        try:
            status, detail = ask(address, env.collector_tls)
        except Exception as exc:  # a certificate that cannot be read, a dial that fails
            status, detail = "fail", f"cannot ask it: {exc}"
        if status == "ok" and first_ok is None:
            first_ok = (index, address)
        # one dead replica is what failover is for: it warns; the summary row decides
        rows.append(Check(f"collector {address}", False, "warn" if status == "fail" else status,
                          detail, fix))
    total = len(env.collectors)
    down = [r.name.removeprefix("collector ") for r in rows if r.status != "ok"]
    if first_ok is None:
        summary = Check("collector", True, "fail",
                        f"none of the {total} collector address(es) answers; the agent would "
                        "keep its alerts in the spool and redial", fix)
    else:
        index, address = first_ok
        detail = f"an agent started now streams to {address}"
        if total > 1:
            detail += f" ({index} of {total})"
        if down:
            detail += f"; not answering: {', '.join(down)}"
        summary = Check("collector", True, "warn" if down else "ok", detail, fix)
    return [*rows, summary]


def check_container_runtimes(env: DoctorEnv, answering: frozenset[str] = frozenset()) -> Check:
    """Containers running under a runtime no endpoint answers for (`answering`: the runtimes
    whose endpoint answered): their events have no image, so they get no detection. Read from
    the cgroup tree, which names each container's runtime, so it needs no runtime to answer."""
    name = "container runtimes"
    fix = ("give each runtime's socket with --runtime-endpoint unix:///path (containerd: "
           "/run/containerd/containerd.sock, CRI-O: /run/crio/crio.sock, podman: "
           "/run/podman/podman.sock, after `podman system service`); the agent counts "
           "containers it cannot name in driftwarden_agent_containers_without_metadata_total")
    try:
        root = find_cgroup2_root(env.sys("fs", "cgroup"))
    except HostSupportError:
        return Check(name, False, "info", "cannot check: no cgroup v2 hierarchy", fix)
    try:
        refs = running_containers(root)
    except OSError as exc:
        return Check(name, False, "info", f"cannot read {root}: {exc.strerror or exc}", fix)
    counts = collections.Counter(ref.runtime for ref in refs)
    if not counts:
        return Check(name, False, "ok", "no containers running", fix)

    def answered(runtime: str) -> bool:
        return runtime in answering or (runtime in _CRI_KINDS and bool(answering & _CRI_KINDS))

    served = {runtime: count for runtime, count in counts.items() if answered(runtime)}
    unserved = {runtime: count for runtime, count in counts.items() if not answered(runtime)}
    if not unserved:
        under = ", ".join(f"{count} under {runtime}" for runtime, count in sorted(served.items()))
        return Check(name, False, "ok", f"{sum(counts.values())} running: {under}; their "
                     "runtimes answer", fix)
    others = []
    for runtime, count in sorted(unserved.items()):
        socket_path = (Path(env.docker_socket) if runtime == "docker"
                       else Path(env.run_root, RUNTIME_SOCKETS[runtime]))
        where = f" (socket {socket_path})" if socket_path.exists() else ""
        others.append(f"{count} under {runtime}{where}")
    asked = "these runtimes" if len(unserved) > 1 else "this runtime"
    detail = (f"{', '.join(others)}: no endpoint of {asked} answers, so these containers get "
              "no names, images or detection")
    if served:
        detail += "; " + ", ".join(f"{count} under {runtime}"
                                   for runtime, count in sorted(served.items())) + " are watched"
    return Check(name, False, "warn", detail, fix)


def kprobes_attachable(env: DoctorEnv) -> bool:
    """bcc attaches kprobes through the kprobe PMU or tracefs kprobe_events; need one."""
    if env.sys("bus", "event_source", "devices", "kprobe").exists():
        return True
    try:
        root = _tracefs_root(env)
        return root is not None and (root / "kprobe_events").exists()
    except PermissionError:
        return False


def load_reason(error: str) -> str:
    """Short reason for a bcc load failure message, e.g. 'EPERM'."""
    if "Need super-user privileges" in error:
        return "EPERM"  # bcc's load_func turns EPERM into this message
    m = re.search(r"Failed to load BPF program [^:]*: (.+)$", error)
    if m:
        by_text = {os.strerror(n): name for n, name in errno.errorcode.items()}
        return by_text.get(m.group(1).strip(), m.group(1).strip())
    if "Failed to compile" in error:
        return "compile failed"
    if "Unknown program" in error:
        return "program not generated by this bcc"
    return error.strip().splitlines()[-1][:80] if error.strip() else "unknown error"


@contextlib.contextmanager
def _quiet_fd2() -> Iterator[None]:
    """Send fd 2 to a temp file: libbcc prints clang and verifier noise straight to it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            noise = sink.read().decode(errors="replace").strip()
            if noise:
                log.debug("bcc stderr during load test: %s", noise)


def load_program_types(keys: Sequence[str]) -> dict[str, str | None]:
    """Load each program type in this process: key -> None (loaded) or the error text.

    Compiles all programs as one module (one clang run); if that fails, compiles each
    alone so one unsupported macro does not hide the others.
    """
    try:
        from bcc import BPF
    except Exception as exc:
        return {k: f"bcc not importable: {exc}" for k in keys}

    class _LoadOnly(BPF):
        # bcc attaches kfunc__/lsm__/kprobe__ functions in the constructor: load only.
        def _trace_autoload(self) -> None:
            return None

    wanted = [p for p in PROGRAM_TYPES if p.key in keys]
    results: dict[str, str | None] = {k: "unknown program type" for k in keys}

    def load(bpf: BPF, prog: ProgramType) -> str | None:
        from bcc import lib

        names = [lib.bpf_function_name(bpf.module, i)
                 for i in range(lib.bpf_num_functions(bpf.module))]
        func = next((n for n in names if n.decode().startswith(prog.func_prefix)), None)
        if func is None:
            return f"Unknown program {prog.func_prefix}"
        try:
            bpf.load_func(func, getattr(BPF, prog.bcc_type), attach_type=prog.attach_type)
        except Exception as exc:
            return str(exc) or type(exc).__name__
        return None

    with _quiet_fd2():
        try:
            bpf = _LoadOnly(text="\n".join(p.source for p in wanted).encode())
        except Exception as exc:
            log.debug("combined load-test module failed to compile: %s", exc)
            bpf = None
        if bpf is not None:
            try:
                for prog in wanted:
                    results[prog.key] = load(bpf, prog)
            finally:
                bpf.cleanup()
        else:
            for prog in wanted:
                try:
                    one = _LoadOnly(text=prog.source.encode())
                except Exception as exc:
                    results[prog.key] = f"Failed to compile: {exc}"
                    continue
                try:
                    results[prog.key] = load(one, prog)
                finally:
                    one.cleanup()
    return results


def _load_child() -> None:
    """Entry point of the load-test subprocess: keys on stdin, JSON result on stdout."""
    keys = json.loads(sys.stdin.read())
    print(_RESULT_MARKER + json.dumps(load_program_types(keys)), flush=True)


def _run_load_child(keys: Sequence[str], timeout: float) -> dict[str, str | None]:
    # A subprocess keeps a clang/LLVM crash or hang on a broken host from taking the
    # doctor down with it, and its stderr (verifier/compile noise) stays captured.
    code = "from driftwarden.agent.doctor import _load_child; _load_child()"
    try:
        proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(list(keys)),
                              capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        return {k: f"load test timed out after {timeout:.0f} s" for k in keys}
    except OSError as exc:
        return {k: f"load test did not start: {exc}" for k in keys}
    if proc.stderr.strip():
        log.debug("load-test stderr: %s", proc.stderr.strip())
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_MARKER):
            return json.loads(line[len(_RESULT_MARKER):])
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {k: f"load test exited {proc.returncode}: {last}" for k in keys}


def program_type_checks(env: DoctorEnv, *, timeout: float = LOAD_TIMEOUT_S,
                        runner: Callable[[Sequence[str], float], dict[str, str | None]]
                        | None = None) -> list[Check]:
    """One optional Check per PROGRAM_TYPES entry: 'loads' or 'not supported here: EPERM'."""
    run = runner or _run_load_child
    results = run([p.key for p in PROGRAM_TYPES], timeout)
    checks = []
    for prog in PROGRAM_TYPES:
        name = f"prog {prog.label}"
        fix = f"optional ({prog.purpose})"
        error = results.get(prog.key, "not tested")
        if error is None and prog.key == "kprobe" and not kprobes_attachable(env):
            checks.append(Check(name, False, "info",
                                f"{NOT_SUPPORTED}: loads, but no kprobe PMU or kprobe_events "
                                "(CONFIG_KPROBES off?)", fix))
        elif error is None:
            checks.append(Check(name, False, "ok", "loads", fix))
        else:
            checks.append(Check(name, False, "info", f"{NOT_SUPPORTED}: {load_reason(error)}",
                                fix))
    return checks


# ---------------------------------------------------------------- driver and output

def _guard(name: str, required: bool, fn: Callable[[], Check]) -> Check:
    # A doctor runs on broken hosts: a check that crashes becomes a row, not a traceback.
    try:
        return fn()
    except Exception as exc:
        log.debug("check %s crashed", name, exc_info=True)
        return Check(name, required, "fail" if required else "info",
                     f"check crashed: {type(exc).__name__}: {exc}",
                     "report this as a driftwarden bug")


def run_checks(env: DoctorEnv, *, probe_program_types: bool = True) -> list[Check]:
    """Every check in display order."""
    docker_row = _guard("docker socket", False, lambda: check_docker(env))
    checks = [
        _guard("privileges", True, lambda: check_privileges(env)),
        _guard("bpf syscall", True, lambda: check_bpf_syscall(env)),
        _guard("btf", False, lambda: check_btf(env)),
        _guard("tracefs", True, lambda: check_tracefs(env)),
        _guard("kernel headers", True, lambda: check_kernel_headers(env)),
        _guard("bcc", True, lambda: check_bcc(env)),
        _guard("tracepoints", True, lambda: check_tracepoints(env)),
        _guard("cgroup v2", True, lambda: check_cgroup_v2(env)),
        docker_row,
    ]
    try:
        runtime_rows = check_runtime_endpoints(env)
    except Exception as exc:  # as _guard does, for a list of rows
        log.debug("runtime endpoint checks crashed", exc_info=True)
        runtime_rows = [Check("runtime endpoints", False, "info",
                              f"check crashed: {type(exc).__name__}: {exc}",
                              "report this as a driftwarden bug")]
    checks.extend(runtime_rows)
    answering = frozenset(
        row.name.removeprefix("runtime ") for row in runtime_rows if row.status == "ok")
    if docker_row.status == "ok":
        answering |= {"docker"}
    checks.append(_guard("container runtimes", False,
                         lambda: check_container_runtimes(env, answering)))
    if env.collectors:
        checks.extend(check_collectors(env))
    if probe_program_types and checks[0].status == "fail":
        # Every load would fail with EPERM for lack of privilege, which says nothing
        # about what the kernel supports.
        checks.append(Check("prog types", False, "info",
                            "not tested: needs root or CAP_BPF+CAP_PERFMON", checks[0].fix))
    elif probe_program_types:
        try:
            checks.extend(program_type_checks(env))
        except Exception as exc:
            log.debug("program type checks crashed", exc_info=True)
            checks.append(Check("prog types", False, "info",
                                f"load test crashed: {type(exc).__name__}: {exc}",
                                "report this as a driftwarden bug"))
    else:
        checks.append(Check("prog types", False, "info", "skipped (--no-load-tests)",
                            "run without --no-load-tests to try each program type"))
    return checks


def exit_code(checks: Sequence[Check]) -> int:
    """1 when any required check failed; warnings and optional checks never fail."""
    return int(any(c.required and c.status == "fail" for c in checks))


def format_table(checks: Sequence[Check]) -> str:
    """Aligned CHECK / STATUS / DETAIL columns; a `fix:` line under each fail or warn row."""
    w_name = max([len("CHECK"), *(len(c.name) for c in checks)])
    w_status = max([len("STATUS"), *(len(c.status) for c in checks)])
    indent = " " * (w_name + 2 + w_status + 2)
    lines = [f"{'CHECK':<{w_name}}  {'STATUS':<{w_status}}  DETAIL"]
    for c in checks:
        lines.append(f"{c.name:<{w_name}}  {c.status:<{w_status}}  {c.detail}")
        if c.status in ("fail", "warn"):
            lines.append(f"{indent}fix: {c.fix}")
    failed = [c.name for c in checks if c.required and c.status == "fail"]
    if failed:
        lines.append(f"\n{len(failed)} required check(s) failed: {', '.join(failed)}")
    else:
        lines.append("\nall required checks passed")
    return "\n".join(lines)


def checks_to_json(checks: Sequence[Check]) -> str:
    return json.dumps([dataclasses.asdict(c) for c in checks], indent=2)


def run_command(args: argparse.Namespace) -> int:
    collectors, tls = _collector_flags(args)
    env = DoctorEnv(runtime_endpoints=tuple(getattr(args, "runtime_endpoint", None) or ()),
                    collectors=collectors, collector_tls=tls)
    checks = run_checks(env, probe_program_types=not args.no_load_tests)
    print(checks_to_json(checks) if args.json else format_table(checks))
    return exit_code(checks)


def _collector_flags(args: argparse.Namespace) -> tuple[tuple[str, ...], TlsFiles | None]:
    """The --collector targets and TLS files, by the agent's own rules (UsageError)."""
    from driftwarden.agent.command import collector_targets

    tls_values = {"--tls-cert": args.tls_cert, "--tls-key": args.tls_key,
                  "--tls-ca": args.tls_ca}
    if not args.collector:
        given = [flag for flag, value in (("--allow-non-loopback", args.allow_non_loopback),
                                          *tls_values.items()) if value]
        if given:
            raise UsageError(f"{', '.join(given)} only make(s) sense with --collector "
                             f"HOST:PORT")
        return (), None
    return collector_targets(",".join(args.collector),
                             allow_non_loopback=args.allow_non_loopback, tls_ca=args.tls_ca,
                             tls_cert=args.tls_cert, tls_key=args.tls_key)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "doctor",
        help="check this host has what the agent needs",
        description="Check privileges, BPF, tracefs, kernel headers, bcc, tracepoints, "
                    "cgroup v2, Docker, each container runtime found (does it answer?) and the "
                    "containers' runtimes; exit 1 when a required item fails.",
    )
    parser.add_argument("--json", action="store_true", help="print the checks as a JSON list")
    parser.add_argument("--no-load-tests", action="store_true",
                        help="skip loading test BPF programs of each optional type")
    parser.add_argument("--runtime-endpoint", action="append", default=[],
                        metavar="unix:///PATH",
                        help="check this container runtime socket (repeatable; default: the "
                        "usual containerd, CRI-O and podman sockets that exist)")
    parser.add_argument("--collector", action="append", default=[],
                        metavar="HOST:PORT[,HOST:PORT...]",
                        help="ask these collectors (the agent's --collector: repeatable or "
                        "comma-separated) whether they answer, and say which one an agent "
                        "started now would stream to")
    from driftwarden.agent.command import add_dial_flags

    add_dial_flags(parser)
    parser.set_defaults(func=run_command)
    return parser
