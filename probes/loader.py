"""Compile, load and attach the BPF programs; drain the ring buffer; read the counters.

Settings reach the C side only as -D defines (ProbeConfig.cflags), so the program text is
the same file for every configuration; `bpf_text()` shows what is compiled.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from driftwarden.core.errors import HostSupportError, ProbeLoadError, UsageError
from driftwarden.probes._layout import COUNTER_MAX, Counter, EventKind, Limits

log = logging.getLogger(__name__)

PROBE_DIR = Path(__file__).resolve().parent
BPF_SOURCE = PROBE_DIR / "driftwarden.bpf.c"
EVENT_HEADER = PROBE_DIR / "dw_event.h"

# Kinds a user can select; chdir is bookkeeping and always on.
SELECTABLE_KINDS = {"exec": EventKind.EXEC, "connect": EventKind.CONNECT, "write": EventKind.FILE}


def _syscalls(*names: str, sides: tuple[str, ...] = ("enter", "exit")) -> tuple[str, ...]:
    return tuple(f"syscalls:sys_{side}_{name}" for name in names for side in sides)


# The tracepoints each part of driftwarden.bpf.c attaches (its DW_WITH_* sections). Bookkeeping
# is always attached: parent pids (fork, exit) and relative paths (chdir) need it.
BOOKKEEPING_TRACEPOINTS = ("sched:sched_process_fork", "sched:sched_process_exit",
                           *_syscalls("chdir", "fchdir"))
_OPENS = ("open", "openat", "openat2", "creat")  # reported at entry unless open_result
_FILE_OPS = ("truncate", "rename", "renameat", "renameat2", "unlink", "unlinkat", "rmdir",
             "chmod", "fchmod", "fchmodat", "fchmodat2", "link", "linkat", "symlink",
             "symlinkat", "mkdir", "mkdirat", "mknod", "mknodat")
KIND_TRACEPOINTS: dict[str, tuple[str, ...]] = {
    "exec": _syscalls("execve", "execveat"),
    "connect": _syscalls("socket", "connect"),  # socket(): TCP vs UDP per fd
    "write": _syscalls(*_OPENS, sides=("enter",)) + _syscalls(*_FILE_OPS),
}
OPEN_RESULT_TRACEPOINTS = _syscalls(*_OPENS, sides=("exit",))


@dataclass(frozen=True)
class ProbeConfig:
    kinds: frozenset[str] = frozenset(SELECTABLE_KINDS)
    include_host: bool = False
    dedup_interval_ns: int = 1_000_000_000  # 0 disables kernel dedup
    dedup_entries: int = 16384
    ringbuf_pages: int = 1024  # 4 MiB; must be a power of two
    wakeup: bool = False  # True: wake the reader per event (costly; for comparisons only)
    # kinds whose events wake the reader at once; the rest wait for the drain timer (~10 ms)
    wake_kinds: frozenset[str] = frozenset({"exec"})
    open_result: bool = False  # True: report opens at syscall exit, with their result (costlier)
    limits: Limits = field(default_factory=Limits)
    cgroup_root: str = ""  # cgroup v2 mount; "" = detect
    extra_skip_cgroup_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        unknown_wake = set(self.wake_kinds) - set(SELECTABLE_KINDS)
        if unknown_wake:
            raise UsageError(f"unknown event kind(s) {sorted(unknown_wake)} to wake on: "
                             f"choose from {','.join(SELECTABLE_KINDS)}")
        unknown = set(self.kinds) - set(SELECTABLE_KINDS)
        if unknown or not self.kinds:
            raise UsageError(
                f"unknown event kind(s) {sorted(unknown) or '(none given)'}: "
                f"choose from {','.join(SELECTABLE_KINDS)}"
            )
        pages = self.ringbuf_pages
        if pages < 1 or pages & (pages - 1):
            raise UsageError(f"ring buffer pages must be a power of two, got {pages}")
        if self.dedup_interval_ns < 0:
            raise UsageError("dedup interval must be >= 0 (0 disables suppression)")
        if self.dedup_entries < 1:
            raise UsageError("dedup entries must be >= 1")

    def tracepoints(self) -> dict[str, tuple[str, ...]]:
        """What these settings attach, by part ("bookkeeping", then each selected kind)."""
        parts = {"bookkeeping": BOOKKEEPING_TRACEPOINTS}
        for kind in SELECTABLE_KINDS:
            if kind in self.kinds:
                extra = OPEN_RESULT_TRACEPOINTS if kind == "write" and self.open_result else ()
                parts[kind] = KIND_TRACEPOINTS[kind] + extra
        return parts

    def tracepoint_names(self) -> tuple[str, ...]:
        """Every "category:event" these settings attach."""
        return tuple(tp for part in self.tracepoints().values() for tp in part)

    def describe_tracepoints(self) -> str:
        """'56 tracepoints (bookkeeping 6, exec 4, connect 4, write 42)'."""
        parts = self.tracepoints()
        counts = ", ".join(f"{part} {len(tps)}" for part, tps in parts.items())
        return f"{sum(len(tps) for tps in parts.values())} tracepoints ({counts})"

    @staticmethod
    def _mask(kinds: frozenset[str]) -> int:
        mask = 0
        for name in kinds:
            mask |= 1 << int(SELECTABLE_KINDS[name])
        return mask

    def cflags(self, *, host_cgroup_id: int = 1, agent_tgid: int = 0) -> list[str]:
        """The -D settings; the host cgroup and the agent's pid are known only at load time."""
        return [
            f"-I{PROBE_DIR}",
            f"-DDW_HOST_CGROUP_ID={host_cgroup_id}",
            f"-DDW_AGENT_TGID={agent_tgid}",
            f"-DDW_EXTRA_SKIP={int(bool(self.extra_skip_cgroup_ids))}",
            *(f"-DDW_WITH_{SELECTABLE_KINDS[kind].name}={int(kind in self.kinds)}"
              for kind in SELECTABLE_KINDS),
            f"-DDW_INCLUDE_HOST={int(self.include_host)}",
            f"-DDW_DEDUP_NS={self.dedup_interval_ns}",
            f"-DDW_DEDUP_ENTRIES={self.dedup_entries}",
            f"-DDW_RINGBUF_PAGES={self.ringbuf_pages}",
            f"-DDW_WAKEUP={0 if self.wakeup else 'BPF_RB_NO_WAKEUP'}",
            f"-DDW_WAKE_KINDS={self._mask(self.wake_kinds)}",
            f"-DDW_OPEN_RESULT={int(self.open_result)}",
            *self.limits.cflags(),
        ]


def find_cgroup2_root(sys_fs_cgroup: str | os.PathLike = "/sys/fs/cgroup") -> Path:
    """The cgroup v2 mount: /sys/fs/cgroup on a pure v2 host, .../unified on a hybrid one."""
    base = Path(sys_fs_cgroup)
    for candidate in (base, base / "unified"):
        if (candidate / "cgroup.controllers").exists():
            return candidate
    raise HostSupportError(
        f"no cgroup v2 hierarchy under {base} (looked for cgroup.controllers in {base} and "
        f"{base / 'unified'}): mount it with `mount -t cgroup2 none {base / 'unified'}`"
    )


def bpf_text(config: ProbeConfig, *, host_cgroup_id: int | None = None,
             agent_tgid: int | None = None) -> str:
    """The final BPF program text: settings as defines, then the event header, then the program.
    Without explicit ids it shows what this process would load (its pid, this host's root)."""
    if host_cgroup_id is None:
        try:
            host_cgroup_id = os.stat(config.cgroup_root or find_cgroup2_root()).st_ino
        except (OSError, HostSupportError):
            host_cgroup_id = 1
    defines = []
    flags = config.cflags(host_cgroup_id=host_cgroup_id,
                          agent_tgid=os.getpid() if agent_tgid is None else agent_tgid)
    for flag in flags:
        if flag.startswith("-D"):
            name, _, value = flag[2:].partition("=")
            defines.append(f"#define {name} {value}")
    header = EVENT_HEADER.read_text()
    program = BPF_SOURCE.read_text().replace('#include "dw_event.h"', header)
    attached = "".join(f"\n *   {tp}" for tp in config.tracepoint_names())
    return (f"/* driftwarden BPF program, as compiled; it attaches "
            f"{config.describe_tracepoints()}:{attached}\n */\n"
            + "\n".join(defines) + "\n" + program)


class ProbeSet:
    """The loaded BPF programs. Use as a context manager; `drain()` returns raw records."""

    def __init__(
        self,
        config: ProbeConfig,
        *,
        sys_fs_cgroup: str = "/sys/fs/cgroup",
        tracefs_dirs: tuple[str, ...] = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing"),
    ) -> None:
        self.config = config
        self._sys_fs_cgroup = sys_fs_cgroup
        self._tracefs_dirs = tracefs_dirs
        self._bpf = None
        self._batch: list[bytes] = []
        self._callback = None
        self.host_cgroup_ids: tuple[int, ...] = ()

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> ProbeSet:
        if os.geteuid() != 0:
            raise HostSupportError(
                "loading BPF programs needs root (or CAP_BPF+CAP_PERFMON): re-run with sudo"
            )
        try:
            from bcc import BPF
        except ImportError as exc:
            raise HostSupportError(
                f"bcc is not importable ({exc}): install python3-bpfcc and use a venv made with "
                "--system-site-packages (run `make setup`)"
            ) from exc
        cgroup_root = Path(self.config.cgroup_root) if self.config.cgroup_root else (
            find_cgroup2_root(self._sys_fs_cgroup)
        )
        if not any(Path(d, "events", "syscalls").is_dir() for d in self._tracefs_dirs):
            raise HostSupportError(
                f"no syscall tracepoints under {' or '.join(self._tracefs_dirs)}: tracefs is not "
                "mounted; run `mount -t tracefs nodev /sys/kernel/tracing`"
            )
        host_cgroup_id = os.stat(cgroup_root).st_ino
        cflags = self.config.cflags(host_cgroup_id=host_cgroup_id, agent_tgid=os.getpid())
        log.info("compiling BPF program with %s", " ".join(cflags))
        try:
            with _quiet_stderr():
                self._bpf = BPF(src_file=str(BPF_SOURCE).encode(), cflags=cflags)
        except Exception as exc:
            raise ProbeLoadError(
                f"BPF program failed to compile or load ({exc}); run `driftwarden doctor` to see "
                "which kernel feature is missing"
            ) from exc
        self.host_cgroup_ids = (host_cgroup_id, *self.config.extra_skip_cgroup_ids)
        skip_cgroups = self._bpf[b"skip_cgroups"]
        for cgid in self.config.extra_skip_cgroup_ids:
            skip_cgroups[ctypes.c_ulonglong(cgid)] = ctypes.c_ubyte(1)

        def on_record(_ctx, data, size):
            self._batch.append(ctypes.string_at(data, size))
            return 0

        self._callback = on_record  # keep a reference: bcc holds only a C pointer
        self._bpf[b"events"].open_ring_buffer(on_record)
        attached = self.attached_tracepoints()
        if set(attached) != set(self.config.tracepoint_names()):
            log.warning("attached tracepoints differ from KIND_TRACEPOINTS: %s",
                        sorted(set(attached) ^ set(self.config.tracepoint_names())))
        log.info("probes attached: %d tracepoints, skipping cgroups %s and pid %d",
                 len(attached), self.host_cgroup_ids, os.getpid())
        return self

    def attached_tracepoints(self) -> tuple[str, ...]:
        """"category:event" of every tracepoint bcc attached, as bcc reports them."""
        self._require()
        return tuple(tp.decode() for tp in self._bpf.tracepoint_fds)

    def stop(self) -> None:
        if self._bpf is not None:
            with contextlib.suppress(Exception):
                self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> ProbeSet:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- data -----------------------------------------------------------------

    def drain(self) -> list[bytes]:
        """Every record currently in the ring buffer (never blocks)."""
        self._require()
        self._bpf.ring_buffer_consume()
        batch, self._batch = self._batch, []
        return batch

    def wait(self, timeout: float) -> None:
        """Sleep up to `timeout` seconds, less when the kernel wakes the reader (events of
        ProbeConfig.wake_kinds); what arrived is then taken by drain()."""
        self._require()
        self._bpf.ring_buffer_poll(max(0, int(timeout * 1000)))

    def counters(self) -> dict[str, dict[str, int]]:
        """Per kind: emitted, suppressed, dropped, read_failed (summed over CPUs)."""
        self._require()
        table = self._bpf[b"counters"]
        out: dict[str, dict[str, int]] = {}
        for kind in EventKind:
            per_kind = {}
            for counter in Counter:
                idx = int(kind) * COUNTER_MAX + int(counter)
                per_kind[counter.name.lower()] = int(sum(table[ctypes.c_int(idx)]))
            out[kind.name.lower()] = per_kind
        return out

    def set_skip_tgid(self, tgid: int, skip: bool = True) -> None:
        self._require()
        table = self._bpf[b"skip_tgids"]
        if skip:
            table[ctypes.c_uint(tgid)] = ctypes.c_ubyte(1)
        else:
            with contextlib.suppress(KeyError):
                del table[ctypes.c_uint(tgid)]

    def _require(self) -> None:
        if self._bpf is None:
            raise RuntimeError("ProbeSet is not started")


@contextlib.contextmanager
def _quiet_stderr():
    """bcc prints compiler warnings to fd 2; keep them, but only show them on failure."""


    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except Exception:
            os.dup2(saved, 2)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            if text.strip():
                log.error("BPF compiler/verifier output:\n%s", text[-20000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
