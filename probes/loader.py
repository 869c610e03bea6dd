"""Compile, load and attach the BPF programs; drain the ring buffer; read the counters.

bcc compiles, loads and attaches in a short-lived child (probes/_compile.py), which hands over
only file descriptors; ProbeSet reads and writes the maps and the ring buffer through libbpf
(probes/_libbpf.py), so the agent never carries bcc's LLVM (about 130 MB of RSS).

Settings reach the C side only as -D defines (ProbeConfig.cflags), and so does what the kernel
offers: ProbePlan.cflags adds DW_HAVE_<SYSCALL> for each optional syscall, read from tracefs, so
a syscall the kernel lacks is neither compiled nor attached. The program text is the same file
for every configuration and kernel; `bpf_text()` shows what is compiled.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import math
import os
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from driftwarden.core.errors import HostSupportError, ProbeLoadError, UsageError
from driftwarden.core.lifecycle import Service
from driftwarden.core.mountinfo import parse_mountinfo
from driftwarden.probes._compile import compile_and_attach
from driftwarden.probes._layout import (
    COUNTER_MAX,
    MAP_LAYOUTS,
    RINGBUF_MAP,
    Counter,
    DedupKey,
    EventKind,
    KnownVal,
    Limits,
)
from driftwarden.probes._libbpf import BpfMap, Libbpf, RingBuffer

log = logging.getLogger(__name__)

PROBE_DIR = Path(__file__).resolve().parent
BPF_SOURCE = PROBE_DIR / "driftwarden.bpf.c"
EVENT_HEADER = PROBE_DIR / "dw_event.h"

# Kinds a user can select; fork, exit and chdir are bookkeeping and always on.
SELECTABLE_KINDS = {"exec": EventKind.EXEC, "connect": EventKind.CONNECT, "write": EventKind.FILE}
# Kinds with a per-container budget: the selectable ones, and chdir and fork (bookkeeping, but
# cheap enough to flood with: a shell loop of `cd` sends ~240K a second, one of subshells forks
# ~3,700 times a second). A process whose fork was not sent has no exit sent either.
BUDGET_KINDS = {**SELECTABLE_KINDS, "chdir": EventKind.CHDIR, "fork": EventKind.FORK}

MOUNTINFO = "/proc/self/mountinfo"
# Where tracefs usually is when mountinfo does not say (bcc 0.26 prefers debugfs's tracing/).
USUAL_TRACEFS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def _syscalls(*names: str, sides: tuple[str, ...] = ("enter", "exit")) -> tuple[str, ...]:
    return tuple(f"syscalls:sys_{side}_{name}" for name in names for side in sides)


# The tracepoints each part of driftwarden.bpf.c attaches (its DW_WITH_* sections), on a kernel
# that has every syscall. Bookkeeping is always attached: process identity and parents (fork,
# exit; clone and clone3 tell a thread from a process) and relative paths (chdir) need it.
BOOKKEEPING_TRACEPOINTS = ("sched:sched_process_fork", "sched:sched_process_exit",
                           *_syscalls("clone", "clone3", "chdir", "fchdir"))
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

# Syscalls a kernel the probes support (Linux 5.8+) may lack, by version or architecture, and
# which kernels lack them. Each is compiled in only under its DW_HAVE_<NAME> define, set from
# tracefs, so one the kernel lacks is neither compiled nor attached; no process can call it
# there, so nothing is missed. Every other tracepoint above is required.
_LEGACY = "legacy, not on arm64"  # arm64 has only the *at() forms
OPTIONAL_SYSCALLS: dict[str, str] = {
    "open": _LEGACY, "creat": _LEGACY, "rename": _LEGACY, "unlink": _LEGACY, "rmdir": _LEGACY,
    "chmod": _LEGACY, "link": _LEGACY, "symlink": _LEGACY, "mkdir": _LEGACY, "mknod": _LEGACY,
    "renameat": "superseded by renameat2, not on riscv64",
    "openat2": "Linux 5.6+",
    "fchmodat2": "Linux 6.6+",
}


def _syscall_of(tracepoint: str) -> str:
    """'syscalls:sys_exit_fchmodat2' -> 'fchmodat2'; '' for a tracepoint of another category."""
    category, _, event = tracepoint.partition(":")
    if category != "syscalls":
        return ""
    return event.removeprefix("sys_enter_").removeprefix("sys_exit_")


@dataclass(frozen=True)
class Budget:
    """What one container may send of one kind once the kernel's dedup let it through, as a
    token bucket: `rate` events/s sustained, `burst` at once. rate 0: no budget (unlimited)."""

    rate: int
    burst: int

    def __post_init__(self) -> None:
        if not 0 <= self.rate <= 1_000_000_000:
            raise UsageError(f"budget rate must be 0 (unlimited) to 1000000000 events/s, got "
                             f"{self.rate}")
        if self.burst < 1:
            raise UsageError(f"budget burst must be >= 1 event, got {self.burst}")

    def describe(self) -> str:
        return f"{self.rate}/s, burst {self.burst}" if self.rate else "unlimited"


UNLIMITED = Budget(0, 1)
# Per container and kind (README "Fairness under floods"): above what a busy service or a build
# step sends once dedup has folded its repeats, below what fills the 4 MiB ring buffer faster
# than the agent drains it. An exec over budget still sends its compact repeat record; a chdir
# over budget costs userspace that process's cwd, read again from /proc at its next event; a
# fork over budget, little: the child's first event sent says so and the child inherits its
# parent's program and cwd then, and its exit is not sent.
DEFAULT_BUDGETS: dict[str, Budget] = {
    "exec": Budget(1000, 2000), "connect": Budget(2000, 4000), "write": Budget(5000, 10000),
    "chdir": Budget(2000, 4000), "fork": Budget(5000, 10000)}


def parse_budget(text: str) -> tuple[tuple[str, Budget], ...]:
    """`--budget` values: "KIND=RATE[/BURST]" (burst defaults to twice the rate), "KIND=off",
    or "off" (every kind unlimited) -> (kind, Budget) pairs; UsageError naming what is wrong."""
    text = text.strip()
    if text == "off":
        return tuple((kind, UNLIMITED) for kind in BUDGET_KINDS)
    kind, sep, value = text.partition("=")
    kind = kind.strip()
    if not sep or kind not in BUDGET_KINDS:
        raise UsageError(f"--budget {text!r}: give KIND=RATE[/BURST], KIND=off or off, with "
                         f"KIND one of {','.join(BUDGET_KINDS)}")
    value = value.strip()
    if value == "off":
        return ((kind, UNLIMITED),)
    rate_text, _, burst_text = value.partition("/")
    try:
        rate = int(rate_text)
        burst = int(burst_text) if burst_text else max(2 * rate, 1)
    except ValueError:
        raise UsageError(f"--budget {text!r}: RATE and BURST are whole numbers of events "
                         "(e.g. write=5000/10000)") from None
    if rate == 0:
        raise UsageError(f"--budget {text!r}: a rate of 0 would send nothing; use {kind}=off "
                         "for no budget")
    return ((kind, Budget(rate, burst)),)


class BudgetUsage(NamedTuple):
    """What the budgets held back and the ring buffer lost, per (cgroup id, kind), since the
    probes were loaded (ProbeSet.budget_usage); `evicted`: (cgroup, kind) entries the bounded
    map dropped, their counts with them."""

    counts: dict[tuple[int, str], tuple[int, int]]  # -> (over budget, dropped)
    evicted: int


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
    # ... but at most one such wake-up per this many ns (0: one per event of those kinds)
    wake_gap_ns: int = 5_000_000
    open_result: bool = False  # True: report opens at syscall exit, with their result (costlier)
    limits: Limits = field(default_factory=Limits)
    cgroup_root: str = ""  # cgroup v2 mount; "" = detect
    extra_skip_cgroup_ids: tuple[int, ...] = ()
    # (kind, Budget) pairs; a kind not given keeps DEFAULT_BUDGETS'
    budgets: tuple[tuple[str, Budget], ...] = ()
    budget_entries: int = 16384  # (cgroup, kind) pairs the kernel tracks (LRU)
    # identities the baselines hold, counted in the kernel instead of sent (agent.known);
    # 0: no such filter (trace, or an agent without detection)
    known_entries: int = 0

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
        unknown_budget = {kind for kind, _ in self.budgets} - set(BUDGET_KINDS)
        if unknown_budget:
            raise UsageError(f"unknown event kind(s) {sorted(unknown_budget)} to budget: "
                             f"choose from {','.join(BUDGET_KINDS)}")
        if self.wake_gap_ns < 0:
            raise UsageError(f"wake gap must be >= 0 ns, got {self.wake_gap_ns}")
        if self.known_entries < 0:
            raise UsageError(f"known entries must be >= 0 (0: no kernel baseline filter), got "
                             f"{self.known_entries}")
        if self.budget_entries < 1:
            raise UsageError("budget entries must be >= 1")

    def budget(self, kind: str) -> Budget:
        """The budget of a selectable kind: the last one given in `budgets`, else the default."""
        return dict(self.budgets).get(kind, DEFAULT_BUDGETS[kind])

    def tracepoints(self) -> dict[str, tuple[str, ...]]:
        """What these settings attach on a kernel with every syscall, by part ("bookkeeping",
        then each selected kind); ProbePlan.tracepoints() leaves out what a kernel lacks."""
        parts = {"bookkeeping": BOOKKEEPING_TRACEPOINTS}
        for kind in SELECTABLE_KINDS:
            if kind in self.kinds:
                extra = OPEN_RESULT_TRACEPOINTS if kind == "write" and self.open_result else ()
                parts[kind] = KIND_TRACEPOINTS[kind] + extra
        return parts

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
            f"-DDW_WAKE_GAP_NS={self.wake_gap_ns}",
            f"-DDW_OPEN_RESULT={int(self.open_result)}",
            *(f"-DDW_BUDGET_{BUDGET_KINDS[kind].name}_{part}={value}"
              for kind in BUDGET_KINDS
              for part, value in (("RATE", self.budget(kind).rate),
                                  ("BURST", self.budget(kind).burst))),
            f"-DDW_BUDGET_ENTRIES={self.budget_entries}",
            f"-DDW_KNOWN_ENTRIES={self.known_entries}",
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


def find_tracefs(mountinfo: str | os.PathLike = MOUNTINFO,
                 usual: tuple[str, ...] = USUAL_TRACEFS) -> Path | None:
    """The tracing directory, the one that holds events/: a tracefs mount listed in
    `mountinfo`, else a debugfs mount's tracing/, else the first of `usual` that has events/.
    None when tracefs is not mounted; PermissionError when not root (tracefs is 0700)."""
    listed = []
    with contextlib.suppress(OSError):
        for mount in parse_mountinfo(Path(mountinfo).read_text()):
            if mount.fstype == "tracefs":
                listed.append(mount.mount_point)
            elif mount.fstype == "debugfs":
                listed.append(f"{mount.mount_point}/tracing")
    for candidate in dict.fromkeys([*listed, *usual]):
        if Path(candidate, "events").is_dir():
            return Path(candidate)
    return None


def require_tracefs(tracefs: str | os.PathLike | None = None) -> Path:
    """`tracefs`, or the one find_tracefs() finds, checked to hold syscall tracepoints."""
    root = Path(tracefs) if tracefs is not None else find_tracefs()
    if root is None or not (root / "events").is_dir():
        where = root or " or ".join(USUAL_TRACEFS)
        raise HostSupportError(
            f"no tracepoints under {where}: tracefs is not mounted; run "
            f"`mount -t tracefs nodev {USUAL_TRACEFS[0]}`"
        )
    if not (root / "events" / "syscalls").is_dir():
        raise HostSupportError(
            f"no syscall tracepoints under {root}/events: the kernel was built without "
            "CONFIG_FTRACE_SYSCALLS; use a kernel with syscall tracepoints"
        )
    return root


@dataclass(frozen=True)
class ProbePlan:
    """What one ProbeConfig compiles and attaches on one kernel: `absent` holds the optional
    syscalls (OPTIONAL_SYSCALLS) that kernel lacks. plan_probes() reads them from tracefs."""

    config: ProbeConfig
    absent: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.absent) - set(OPTIONAL_SYSCALLS)
        if unknown:
            raise ValueError(f"not optional syscalls: {sorted(unknown)}")

    def tracepoints(self) -> dict[str, tuple[str, ...]]:
        """What is attached, by part ("bookkeeping", then each selected kind)."""
        return {part: tuple(tp for tp in tps if _syscall_of(tp) not in self.absent)
                for part, tps in self.config.tracepoints().items()}

    def tracepoint_names(self) -> tuple[str, ...]:
        """Every "category:event" attached."""
        return tuple(tp for part in self.tracepoints().values() for tp in part)

    def absent_tracepoints(self) -> tuple[str, ...]:
        """The tracepoints the settings would use that this kernel lacks (compiled out)."""
        return tuple(tp for part in self.config.tracepoints().values() for tp in part
                     if _syscall_of(tp) in self.absent)

    def describe(self) -> str:
        """'60 tracepoints (bookkeeping 10, exec 4, connect 4, write 42)'."""
        parts = self.tracepoints()
        counts = ", ".join(f"{part} {len(tps)}" for part, tps in parts.items())
        return f"{sum(len(tps) for tps in parts.values())} tracepoints ({counts})"

    def describe_absent(self) -> str:
        """'sys_enter_fchmodat2, sys_exit_fchmodat2 (Linux 6.6+)', one group per reason joined
        by '; '; '' when nothing is left out."""
        by_reason: dict[str, list[str]] = {}
        for tp in self.absent_tracepoints():
            by_reason.setdefault(OPTIONAL_SYSCALLS[_syscall_of(tp)], []).append(
                tp.partition(":")[2])
        return "; ".join(f"{', '.join(tps)} ({why})" for why, tps in by_reason.items())

    def cflags(self, *, host_cgroup_id: int = 1, agent_tgid: int = 0) -> list[str]:
        """The settings' -D flags, then DW_HAVE_<SYSCALL> 1 or 0 for each optional syscall."""
        return [*self.config.cflags(host_cgroup_id=host_cgroup_id, agent_tgid=agent_tgid),
                *(f"-DDW_HAVE_{name.upper()}={int(name not in self.absent)}"
                  for name in OPTIONAL_SYSCALLS)]


def _has_tracepoint(tracefs: str | os.PathLike, tracepoint: str) -> bool:
    category, _, event = tracepoint.partition(":")
    return Path(tracefs, "events", category, event).is_dir()


def absent_syscalls(tracefs: str | os.PathLike) -> frozenset[str]:
    """The optional syscalls (OPTIONAL_SYSCALLS) this kernel lacks: one counts as present only
    with both its tracepoints under `tracefs`/events."""
    return frozenset(name for name in OPTIONAL_SYSCALLS
                     if not all(_has_tracepoint(tracefs, tp) for tp in _syscalls(name)))


def missing_required(config: ProbeConfig,
                     tracefs: str | os.PathLike) -> dict[str, tuple[str, ...]]:
    """The required tracepoints `config` uses that the kernel lacks, by part; {} when none."""
    missing = {part: tuple(tp for tp in tps if _syscall_of(tp) not in OPTIONAL_SYSCALLS
                           and not _has_tracepoint(tracefs, tp))
               for part, tps in config.tracepoints().items()}
    return {part: tps for part, tps in missing.items() if tps}


def describe_missing(missing: dict[str, tuple[str, ...]]) -> str:
    """'syscalls:sys_enter_openat, syscalls:sys_exit_openat (for write)', one group per part."""
    return "; ".join(f"{', '.join(tps)} (for {part})" for part, tps in missing.items())


def plan_probes(config: ProbeConfig, tracefs: str | os.PathLike) -> ProbePlan:
    """What `config` compiles and attaches on the kernel whose tracefs is at `tracefs`; a
    required tracepoint it lacks is a ProbeLoadError naming it."""
    missing = missing_required(config, tracefs)
    if missing:
        hint = "" if "bookkeeping" in missing else ", or leave those kinds out with --kinds"
        raise ProbeLoadError(
            f"this kernel lacks tracepoints the probes need (none under {tracefs}/events): "
            f"{describe_missing(missing)}; use Linux 5.8+ with CONFIG_FTRACE_SYSCALLS{hint}"
        )
    return ProbePlan(config, absent_syscalls(tracefs))


def bpf_text(config: ProbeConfig, *, host_cgroup_id: int | None = None,
             agent_tgid: int | None = None, tracefs: str | os.PathLike | None = None) -> str:
    """The final BPF program text: settings as defines, then the event header, then the program.
    Without explicit ids it shows what this process would load (its pid, this host's root);
    without `tracefs`, the syscalls of the kernel find_tracefs() finds (all of them when it
    cannot read one: not root, or not mounted)."""
    if host_cgroup_id is None:
        try:
            host_cgroup_id = os.stat(config.cgroup_root or find_cgroup2_root()).st_ino
        except (OSError, HostSupportError):
            host_cgroup_id = 1
    note = ""
    if tracefs is None:
        try:
            tracefs = find_tracefs()
        except PermissionError:
            tracefs = None
        if tracefs is None:
            note = "\n * (tracefs not readable here: shown as for a kernel with every syscall)"
    plan = plan_probes(config, tracefs) if tracefs is not None else ProbePlan(config)
    defines = []
    flags = plan.cflags(host_cgroup_id=host_cgroup_id,
                        agent_tgid=os.getpid() if agent_tgid is None else agent_tgid)
    for flag in flags:
        if flag.startswith("-D"):
            name, _, value = flag[2:].partition("=")
            defines.append(f"#define {name} {value}")
    header = EVENT_HEADER.read_text()
    program = BPF_SOURCE.read_text().replace('#include "dw_event.h"', header)
    attached = "".join(f"\n *   {tp}" for tp in plan.tracepoint_names())
    absent = plan.describe_absent()
    left_out = f"\n * not on this kernel, so not compiled: {absent}" if absent else ""
    return (f"/* driftwarden BPF program, as compiled; it attaches "
            f"{plan.describe()}:{attached}{left_out}{note}\n */\n"
            + "\n".join(defines) + "\n" + program)


class ProbeSet(Service):
    """The loaded BPF programs. Use as a context manager; `drain()` returns raw records;
    stopping detaches them."""

    def __init__(
        self,
        config: ProbeConfig,
        *,
        sys_fs_cgroup: str = "/sys/fs/cgroup",
        tracefs: str | None = None,  # None: find_tracefs()
    ) -> None:
        super().__init__()
        self.config = config
        self._sys_fs_cgroup = sys_fs_cgroup
        self._tracefs = tracefs
        self.plan: ProbePlan | None = None  # what start() compiled for this kernel
        self._maps: dict[str, BpfMap] | None = None  # None: not started (or stopped)
        self._attached: dict[str, int] = {}  # "category:event" -> the fd that keeps it attached
        self._events_fd = -1
        self._ring: RingBuffer | None = None
        self._ring_lock = threading.Lock()  # stop() never frees the ring buffer mid-poll
        self._batch: list[bytes] = []
        self.host_cgroup_ids: tuple[int, ...] = ()

    # -- lifecycle ------------------------------------------------------------

    def _start(self) -> None:
        if os.geteuid() != 0:
            raise HostSupportError(
                "loading BPF programs needs root (or CAP_BPF+CAP_PERFMON): re-run with sudo"
            )
        libbpf = Libbpf()
        cgroup_root = Path(self.config.cgroup_root) if self.config.cgroup_root else (
            find_cgroup2_root(self._sys_fs_cgroup)
        )
        self.plan = plan_probes(self.config, require_tracefs(self._tracefs))
        host_cgroup_id = os.stat(cgroup_root).st_ino
        cflags = self.plan.cflags(host_cgroup_id=host_cgroup_id, agent_tgid=os.getpid())
        log.info("compiling BPF program with %s", " ".join(cflags))
        # the identity hashes' seed: random per load, never logged (a container that knew it
        # could choose a path whose hash collides with a known one)
        cflags.append(f"-DDW_HASH_SEED={secrets.randbits(64)}ULL")
        names = [name for name in MAP_LAYOUTS if name != "known" or self.config.known_entries]
        compiled = compile_and_attach(BPF_SOURCE, cflags, [RINGBUF_MAP, *names])
        # from here on _stop() closes whatever was handed over, whatever fails next
        self._attached = dict(compiled.attached)
        self._events_fd = compiled.maps[RINGBUF_MAP]
        self._maps = {}
        try:
            for name in names:
                self._maps[name] = BpfMap(libbpf, compiled.maps[name], name, MAP_LAYOUTS[name])
        except BaseException:
            for name in set(names) - set(self._maps):
                with contextlib.suppress(OSError):
                    os.close(compiled.maps[name])
            raise
        self.host_cgroup_ids = (host_cgroup_id, *self.config.extra_skip_cgroup_ids)
        for cgid in self.config.extra_skip_cgroup_ids:
            self._maps["skip_cgroups"].update(ctypes.c_uint64(cgid), ctypes.c_uint8(1))

        def on_record(_ctx, data, size):
            self._batch.append(ctypes.string_at(data, size))
            return 0

        self._ring = RingBuffer(libbpf, self._events_fd, on_record)
        attached = self.attached_tracepoints()
        if set(attached) != set(self.plan.tracepoint_names()):
            log.warning("attached tracepoints differ from the plan: %s",
                        sorted(set(attached) ^ set(self.plan.tracepoint_names())))
        log.info("probes attached: %d tracepoints, skipping cgroups %s and pid %d%s",
                 len(attached), self.host_cgroup_ids, os.getpid(),
                 f"; not on this kernel: {self.plan.describe_absent()}"
                 if self.plan.absent_tracepoints() else "")

    def attached_tracepoints(self) -> tuple[str, ...]:
        """"category:event" of every tracepoint attached, as bcc attached them."""
        self._require()
        return tuple(self._attached)

    def open_tracepoints(self) -> int:
        """How many of the attachments this ProbeSet holds the kernel still has open as perf
        events or BPF links (each attached_tracepoints() name holds one)."""
        self._require()
        kinds = ("anon_inode:[perf_event]", "anon_inode:bpf-link")
        count = 0
        for fd in self._attached.values():
            with contextlib.suppress(OSError):
                count += os.readlink(f"/proc/self/fd/{fd}") in kinds
        return count

    def absent_tracepoints(self) -> tuple[str, ...]:
        """"category:event" of every tracepoint the settings would use that this kernel lacks,
        so it was neither compiled nor attached (ProbePlan.describe_absent() says why)."""
        self._require()
        return self.plan.absent_tracepoints()

    def _stop(self, timeout: float | None) -> None:
        # closing an attachment's last fd detaches its program; the maps go with the programs
        for fd in self._attached.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._attached = {}
        with self._ring_lock:
            if self._ring is not None:
                self._ring.free()
                self._ring = None
        for bpf_map in (self._maps or {}).values():
            bpf_map.close()
        self._maps = None
        if self._events_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._events_fd)
            self._events_fd = -1

    # -- data -----------------------------------------------------------------

    def drain(self) -> list[bytes]:
        """Every record currently in the ring buffer (never blocks)."""
        self._require()
        with self._ring_lock:
            if self._ring is not None:
                self._ring.consume()
            batch, self._batch = self._batch, []
        return batch

    def wait(self, timeout: float) -> None:
        """Sleep up to `timeout` seconds, less when the kernel wakes the reader (events of
        ProbeConfig.wake_kinds); what arrived is then taken by drain(). Rounded up to whole
        milliseconds (epoll's unit): rounded down, the last fraction of a millisecond before a
        deadline became a busy loop of zero-timeout polls (2% of a core on an idle node)."""
        self._require()
        with self._ring_lock:
            if self._ring is not None:
                self._ring.poll(max(0, math.ceil(timeout * 1000)))

    def counters(self) -> dict[str, dict[str, int]]:
        """Per kind: emitted, suppressed, dropped, read_failed, over_budget (summed over
        CPUs)."""
        # one batch lookup of the whole array (the agent reads it several times a second)
        totals = {int(key.value): sum(value.value for value in per_cpu)
                  for key, per_cpu in self._map("counters").items()}
        return {kind.name.lower(): {
                    counter.name.lower(): totals.get(int(kind) * COUNTER_MAX + int(counter), 0)
                    for counter in Counter}
                for kind in EventKind}

    def budget_usage(self) -> BudgetUsage:
        """What the per-container budgets held back and the ring buffer lost, per (cgroup id,
        kind name as in SELECTABLE_KINDS), cumulative since loading: a batch lookup of the
        whole map (0.3 ms for 600 entries here; read it a few times a second, not per event)."""
        names = {int(kind): name for name, kind in BUDGET_KINDS.items()}
        counts: dict[tuple[int, str], tuple[int, int]] = {}
        for key, value in self._map("budget").items():
            name = names.get(int(key.kind))
            if name is not None:
                counts[(int(key.cgroup_id), name)] = (int(value.over), int(value.dropped))
        made = sum(value.value for value in self._map("budget_made").lookup(
            ctypes.c_uint32(0)) or [])
        return BudgetUsage(counts, max(made - len(counts), 0))

    # -- the baseline filter (map `known`; agent.known decides what goes in) --------------

    def known_install(self, entries: Iterable[tuple[int, int, int, int]]) -> int:
        """Puts (cgroup id, kind number, known key, kernel time of the event judged) entries
        in the map: their later events are counted, not sent. Returns how many went in; the
        rest found the map full (ProbeConfig.known_entries)."""
        table = self._map("known")
        installed = 0
        for cgroup_id, kind, key, ts_ns in entries:
            try:  # the event itself was sent: its repeats within the dedup interval are not hits
                table.update(DedupKey(cgroup_id=cgroup_id, hash=key, kind=kind),
                             KnownVal(last_ns=ts_ns, hits=0))
            except OSError as exc:  # E2BIG when full
                log.debug("known map refused an entry: %s", exc)
                continue
            installed += 1
        return installed

    def known_hits(self) -> dict[tuple[int, int, int], tuple[int, int]]:
        """(cgroup id, kind number, known key) -> (hits counted since the entry went in, kernel
        time of the last): one batch lookup of the whole map (read it about once a second, not
        per event)."""
        return {(int(k.cgroup_id), int(k.kind), int(k.hash)): (int(v.hits), int(v.last_ns))
                for k, v in self._map("known").items()}

    def known_remove(self, keys: Iterable[tuple[int, int, int]]) -> None:
        """Takes (cgroup id, kind number, known key) entries out: their events are sent again."""
        table = self._map("known")
        for cgroup_id, kind, key in keys:
            table.delete(DedupKey(cgroup_id=cgroup_id, hash=key, kind=kind))

    def set_skip_tgid(self, tgid: int, skip: bool = True) -> None:
        table = self._map("skip_tgids")
        if skip:
            table.update(ctypes.c_uint32(tgid), ctypes.c_uint8(1))
        else:
            table.delete(ctypes.c_uint32(tgid))

    def _map(self, name: str) -> BpfMap:
        self._require()
        try:
            return self._maps[name]
        except KeyError:
            raise RuntimeError(f"map {name} is not loaded (ProbeConfig.known_entries is 0)"
                               ) from None

    def _require(self) -> None:
        if self._maps is None:
            raise RuntimeError("ProbeSet is not started")
