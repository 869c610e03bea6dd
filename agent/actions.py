"""Response actions on containers of this host: pause/resume, kill, quarantine/release.

:class:`ContainerActions` carries out one action at a time and reports an :class:`ActionResult`;
it never raises for an outcome (only for programming errors). Every action is idempotent:

    action      DONE when it changed         ALREADY when                CONTAINER_GONE when
    pause       running -> paused            already paused              unknown to the runtime
    resume      paused -> running            running, not paused         unknown to the runtime
    kill        running/paused -> SIGKILL    not running (exited, ...)   unknown to the runtime
    quarantine  attached the missing hooks   all four hooks attached     no cgroup v2 directory
    release     detached our programs        none of ours attached       no cgroup v2 directory

FAILED carries the reason (pause/resume of a container that is not running, a runtime error, a
kernel error, a partial quarantine); REFUSED is a request this class will not run (an unknown
action or option, an id that is not a full 64-hex container id: names are resolved by the caller
and an id becomes part of a cgroup path, so it is checked strictly).

Pause/resume/kill go through a :class:`ContainerRuntime`: the node's runtimes together
(``runtimes.registry.RuntimeRouter``, :meth:`ContainerActions.for_endpoints`), each container by
the runtime that owns it. Docker (``runtimes.docker.DockerRuntime``): pause is the runtime's
cgroup freezer, kill is SIGKILL. A CRI runtime (``runtimes.cri.CriActions``), which has no
pause: pause/resume freeze the container's cgroup (``agent/freezer.py``: cgroup v2's
``cgroup.freeze``, else the v1 freezer), kill is ``StopContainer`` with timeout 0 (SIGKILL);
under Kubernetes the kubelet then starts a new container in its place.

Quarantine attaches the cgroup BPF programs of ``probes/quarantine.bpf.c`` to the container's
cgroup v2 directory (whatever runtime made it) with BPF_F_ALLOW_MULTI: connect4/connect6 deny
``connect()`` (EPERM) and cgroup_skb egress/ingress drop every packet; the container keeps
running. The programs stay attached when the agent exits. Quarantine state
is read from the kernel (BPF_PROG_QUERY on the cgroup, then each program's name: ours start with
``dw_q_``), so a restarted agent sees and releases what an earlier one attached, and release
detaches exactly our programs, never anyone else's.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from driftwarden.agent.runtimes.base import RuntimeState
from driftwarden.agent.runtimes.docker import DEFAULT_DOCKER_URL, DockerRuntime
from driftwarden.core.actions import ActionStatus, ActionType
from driftwarden.core.errors import (
    ContainerNotFoundError,
    DriftwardenError,
    HostSupportError,
    ProbeLoadError,
    RuntimeActionError,
)
from driftwarden.core.lifecycle import Service
from driftwarden.probes import _libbpf
from driftwarden.probes._compile import Compiled, compile_and_attach
from driftwarden.probes._libbpf import Libbpf
from driftwarden.probes.loader import PROBE_DIR, find_cgroup2_root

if TYPE_CHECKING:
    from driftwarden.agent.runtimes.registry import RuntimeEndpoint

log = logging.getLogger(__name__)

QUARANTINE_SOURCE = PROBE_DIR / "quarantine.bpf.c"
PROGRAM_PREFIX = "dw_q_"
_CONTAINER_ID = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ActionResult:
    """What one action did. ``details`` are ``(key, value)`` text pairs (cgroup, hooks, ...)."""

    action: str
    container_id: str
    status: ActionStatus
    message: str
    details: tuple[tuple[str, str], ...] = ()

    @property
    def ok(self) -> bool:
        """The container is now in the requested state."""
        return self.status in (ActionStatus.DONE, ActionStatus.ALREADY)

    def detail(self, key: str) -> str | None:
        return next((v for k, v in self.details if k == key), None)

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "container_id": self.container_id,
                "status": self.status.value, "message": self.message,
                "details": dict(self.details)}


@dataclass(frozen=True)
class ContainerState:
    """What is applied to a container now: the runtime's view plus the kernel's."""

    container_id: str
    exists: bool  # the runtime knows the container
    running: bool  # running (a paused container is running and paused)
    paused: bool
    quarantined: bool  # all four quarantine hooks carry our program
    quarantine_hooks: tuple[str, ...]  # hook names with our program attached (partial if < 4)
    cgroup_dir: str | None  # None when the container has no cgroup v2 directory
    problems: tuple[str, ...] = ()  # what could not be read (the fields above then say False)


# -- the runtime ---------------------------------------------------------------------------


class ContainerRuntime(Protocol):
    """Pause/unpause/kill/inspect by full container id. Raise ContainerNotFoundError for an
    unknown container and RuntimeActionError for any other failure."""

    def state(self, container_id: str) -> RuntimeState: ...

    def pause(self, container_id: str) -> None: ...

    def unpause(self, container_id: str) -> None: ...

    def kill(self, container_id: str) -> None: ...


# -- the kernel side of quarantine -----------------------------------------------------------


@dataclass(frozen=True)
class QuarantineHook:
    name: str  # short name used in results and status
    program: str  # function in quarantine.bpf.c; also the kernel's program name
    prog_type: int  # enum bpf_prog_type
    attach_type: int  # enum bpf_attach_type


_PROG_CGROUP_SKB, _PROG_CGROUP_SOCK_ADDR = 8, 18
_ATTACH_INGRESS, _ATTACH_EGRESS, _ATTACH_INET4_CONNECT, _ATTACH_INET6_CONNECT = 0, 1, 10, 11

QUARANTINE_HOOKS = (
    QuarantineHook("connect4", "dw_q_connect4", _PROG_CGROUP_SOCK_ADDR, _ATTACH_INET4_CONNECT),
    QuarantineHook("connect6", "dw_q_connect6", _PROG_CGROUP_SOCK_ADDR, _ATTACH_INET6_CONNECT),
    QuarantineHook("egress", "dw_q_egress", _PROG_CGROUP_SKB, _ATTACH_EGRESS),
    QuarantineHook("ingress", "dw_q_ingress", _PROG_CGROUP_SKB, _ATTACH_INGRESS),
)
HOOK_NAMES = tuple(h.name for h in QUARANTINE_HOOKS)


class QuarantineBackend(Protocol):
    """Attaches/finds/detaches the quarantine programs on a cgroup v2 directory.

    Raise FileNotFoundError when the directory is gone and OSError (or a DriftwardenError) for
    any other failure."""

    def attached(self, cgroup_dir: Path) -> tuple[str, ...]:
        """Names of the hooks that carry one of our programs."""
        ...

    def attach(self, cgroup_dir: Path, hooks: tuple[QuarantineHook, ...]) -> None: ...

    def detach(self, cgroup_dir: Path) -> int:
        """Detach every program of ours; returns how many were detached."""
        ...


@dataclass(frozen=True)
class AttachedProgram:
    prog_id: int
    prog_type: int
    name: str
    attach_type: int


_BPF_F_ALLOW_MULTI = 2  # uapi/linux/bpf.h


class BpfSyscalls:
    """The bpf(2) program commands of quarantine (query, get-by-id, info, attach, detach),
    through libbpf (probes/_libbpf.py)."""

    def __init__(self, lib: Libbpf | None = None) -> None:
        self._lib = lib if lib is not None else Libbpf()

    def prog_fd_by_id(self, prog_id: int) -> int:
        return _libbpf.prog_fd(self._lib, prog_id)

    def prog_attach(self, target_fd: int, prog_fd: int, attach_type: int, flags: int) -> None:
        _libbpf.prog_attach(self._lib, target_fd, prog_fd, attach_type, flags)

    def prog_detach(self, target_fd: int, prog_fd: int, attach_type: int) -> None:
        _libbpf.prog_detach(self._lib, target_fd, prog_fd, attach_type)

    def attached_programs(self, target_fd: int, attach_type: int) -> list[AttachedProgram]:
        """Every program attached to target_fd for attach_type, with its type and name."""
        programs = []
        for prog_id in _libbpf.prog_query(self._lib, target_fd, attach_type):
            try:
                info = _libbpf.prog_info(self._lib, prog_id)
            except FileNotFoundError:  # detached and freed since the query
                continue
            name = info.name.split(b"\0", 1)[0].decode("ascii", "replace")
            programs.append(AttachedProgram(prog_id, int(info.type), name, attach_type))
        return programs


def _is_ours(program: AttachedProgram) -> bool:
    # By prefix, not exact name, so that an agent also releases what another version attached.
    return program.name.startswith(PROGRAM_PREFIX) and any(
        program.prog_type == h.prog_type and program.attach_type == h.attach_type
        for h in QUARANTINE_HOOKS)


class BpfQuarantine:
    """QuarantineBackend on the real kernel. The programs are compiled on the first attach
    only (finding and detaching need no compiler), in a short-lived child process
    (probes._compile: bcc and LLVM never enter the agent), and reused for every container."""

    def __init__(self, source: Path = QUARANTINE_SOURCE, *,
                 syscalls: BpfSyscalls | None = None) -> None:
        self.source = Path(source)
        self._syscalls = syscalls
        self._compiled: Compiled | None = None
        self._prog_fds: dict[str, int] = {}

    @property
    def syscalls(self) -> BpfSyscalls:
        if self._syscalls is None:
            self._syscalls = BpfSyscalls()
        return self._syscalls

    def attached(self, cgroup_dir: Path) -> tuple[str, ...]:
        with _open_dir(cgroup_dir) as fd:
            found = set()
            for hook in QUARANTINE_HOOKS:
                programs = self.syscalls.attached_programs(fd, hook.attach_type)
                if any(_is_ours(p) for p in programs):
                    found.add(hook.name)
        return tuple(name for name in HOOK_NAMES if name in found)

    def attach(self, cgroup_dir: Path, hooks: tuple[QuarantineHook, ...]) -> None:
        prog_fds = self._load()
        with _open_dir(cgroup_dir) as fd:
            for hook in hooks:
                self.syscalls.prog_attach(fd, prog_fds[hook.name], hook.attach_type,
                                          _BPF_F_ALLOW_MULTI)

    def detach(self, cgroup_dir: Path) -> int:
        detached = 0
        with _open_dir(cgroup_dir) as fd:
            # packets flow again before connect() is allowed: the other way round, a connect
            # made in between loses its SYN and TCP retries only a second later
            for hook in reversed(QUARANTINE_HOOKS):
                for program in self.syscalls.attached_programs(fd, hook.attach_type):
                    if not _is_ours(program):
                        continue
                    try:
                        prog_fd = self.syscalls.prog_fd_by_id(program.prog_id)
                    except FileNotFoundError:
                        continue
                    try:
                        self.syscalls.prog_detach(fd, prog_fd, hook.attach_type)
                    except FileNotFoundError:  # ENOENT: someone else detached it meanwhile
                        continue
                    finally:
                        os.close(prog_fd)
                    detached += 1
        return detached

    def close(self) -> None:
        """Free the loaded programs; attached ones stay attached (the cgroups hold them)."""
        if self._compiled is not None:
            self._compiled.close_all()
        self._compiled, self._prog_fds = None, {}

    def _load(self) -> dict[str, int]:
        if self._compiled is not None:
            return self._prog_fds
        if os.geteuid() != 0:
            raise HostSupportError("quarantine loads BPF programs and needs root "
                                   "(or CAP_BPF+CAP_NET_ADMIN): run the agent as root")
        try:
            compiled = compile_and_attach(
                self.source, ["-Wno-unused-parameter"], (),
                programs=[(h.program, h.prog_type, h.attach_type) for h in QUARANTINE_HOOKS])
        except ProbeLoadError as exc:
            raise ProbeLoadError(f"quarantine programs from {self.source} failed to load: "
                                 f"{exc}") from exc
        log.info("loaded quarantine programs from %s", self.source)
        self._compiled = compiled
        self._prog_fds = {h.name: compiled.programs[h.program] for h in QUARANTINE_HOOKS}
        return self._prog_fds


@contextlib.contextmanager
def _open_dir(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


# -- the actions -----------------------------------------------------------------------------

ACTIONS = tuple(t.value for t in ActionType)
_OPTIONS = {"pause": (), "resume": (), "kill": (), "quarantine": ("with_pause",),
            "release": ("with_resume",)}


def container_cgroup_candidates(cgroup_root: Path, container_id: str) -> tuple[Path, ...]:
    """Where a Docker container's cgroup v2 directory is: cgroupfs driver, then systemd."""
    return (cgroup_root / "docker" / container_id,
            cgroup_root / "system.slice" / f"docker-{container_id}.scope")


def cgroup_dir_of_process(cgroup_root: Path, proc_root: Path, pid: int) -> Path | None:
    """The cgroup v2 directory of a process, from its ``/proc/PID/cgroup`` ("0::/path" line):
    where a container lives whatever made its cgroup (kubelet's kubepods slices, a runtime's
    own parent). None when the process is gone or has no v2 entry."""
    try:
        text = (proc_root / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::/"):
            path = cgroup_root / line[4:].strip()
            # "/" is the root cgroup: never a container's, and never quarantined
            return path if path != cgroup_root and path.is_dir() else None
    return None


class ContainerActions(Service):
    """Runs actions on this host's containers; see the module docstring for the outcomes.

    ``runtime`` does pause/resume/kill; ``cgroup_root`` is the cgroup v2 mount (None: found
    like the probes find it, on first use); ``quarantine`` attaches the BPF programs (default:
    the real kernel, compiled lazily once). Thread-safe: actions run one at a time.
    """

    def __init__(self, runtime: ContainerRuntime, *, cgroup_root: str | os.PathLike | None = None,
                 quarantine: QuarantineBackend | None = None,
                 proc_root: str | os.PathLike = "/proc") -> None:
        super().__init__()
        self.runtime = runtime
        self._cgroup_root = Path(cgroup_root) if cgroup_root is not None else None
        self._proc_root = Path(proc_root)
        self.quarantine_backend: QuarantineBackend = quarantine or BpfQuarantine()
        self._lock = threading.Lock()
        self._counts: collections.Counter[tuple[str, ActionStatus]] = collections.Counter()

    @classmethod
    def for_docker(cls, base_url: str = DEFAULT_DOCKER_URL, *,
                   cgroup_root: str | os.PathLike | None = None) -> ContainerActions:
        return cls(DockerRuntime(base_url), cgroup_root=cgroup_root)

    @classmethod
    def for_endpoints(cls, endpoints: Sequence[RuntimeEndpoint], *,
                      cgroup_root: str | os.PathLike | None = None) -> ContainerActions:
        """Actions on the containers of every runtime in `endpoints`
        (runtimes.registry.resolve_endpoints), each done by the runtime that owns it."""
        from driftwarden.agent.runtimes.registry import RuntimeRouter

        return cls(RuntimeRouter.open(endpoints), cgroup_root=cgroup_root)

    def _stop(self, timeout: float | None) -> None:
        for part in (self.quarantine_backend, self.runtime):
            close = getattr(part, "close", None)
            if close is not None:
                close()

    @property
    def counts(self) -> dict[str, int]:
        """Actions run so far, keyed ``"<action>.<status>"`` (e.g. ``"pause.done"``)."""
        with self._lock:
            return {f"{a}.{s.value}": n for (a, s), n in sorted(self._counts.items())}

    # -- public actions ----------------------------------------------------------------------

    def run(self, action: str, container_id: str, **options: Any) -> ActionResult:
        """Dispatch a requested action by name; bad requests are REFUSED, never raised."""
        if action not in _OPTIONS:
            return self._record(ActionResult(
                str(action), str(container_id), ActionStatus.REFUSED,
                f"unknown action {action!r}: choose from {', '.join(ACTIONS)}"))
        unknown = sorted(set(options) - set(_OPTIONS[action]))
        if unknown:
            allowed = ", ".join(_OPTIONS[action]) or "none"
            return self._record(ActionResult(
                action, str(container_id), ActionStatus.REFUSED,
                f"{action} does not take option(s) {', '.join(unknown)} (allowed: {allowed})"))
        not_bool = sorted(k for k, v in options.items() if not isinstance(v, bool))
        if not_bool:
            return self._record(ActionResult(
                action, str(container_id), ActionStatus.REFUSED,
                f"{action} option(s) {', '.join(not_bool)} must be true or false"))
        method: Callable[..., ActionResult] = getattr(self, action)
        return method(container_id, **options)

    def pause(self, container_id: str) -> ActionResult:
        return self._action("pause", container_id, self._pause)

    def resume(self, container_id: str) -> ActionResult:
        return self._action("resume", container_id, self._resume)

    def kill(self, container_id: str) -> ActionResult:
        return self._action("kill", container_id, self._kill)

    def quarantine(self, container_id: str, with_pause: bool = False) -> ActionResult:
        return self._action("quarantine", container_id,
                            lambda cid: self._quarantine(cid, with_pause))

    def release(self, container_id: str, with_resume: bool = False) -> ActionResult:
        return self._action("release", container_id,
                            lambda cid: self._release(cid, with_resume))

    def status(self, container_id: str) -> ContainerState:
        """Paused (the runtime's answer) and quarantined (the kernel's answer) right now."""
        if not _CONTAINER_ID.fullmatch(str(container_id)):
            raise ValueError(_bad_id_message(container_id))
        problems: list[str] = []
        exists = running = paused = False
        try:
            state = self.runtime.state(container_id)
            exists, running, paused = True, state.running, state.paused
        except ContainerNotFoundError:
            pass
        except RuntimeActionError as exc:
            problems.append(str(exc))
        hooks: tuple[str, ...] = ()
        cgroup_dir: Path | None = None
        try:
            cgroup_dir = self._cgroup_dir(container_id)
            if cgroup_dir is not None:
                hooks = self.quarantine_backend.attached(cgroup_dir)
        except FileNotFoundError:
            cgroup_dir = None
        except (OSError, DriftwardenError) as exc:
            problems.append(f"quarantine state unreadable: {exc}")
        return ContainerState(
            container_id=container_id, exists=exists, running=running, paused=paused,
            quarantined=len(hooks) == len(QUARANTINE_HOOKS), quarantine_hooks=hooks,
            cgroup_dir=str(cgroup_dir) if cgroup_dir is not None else None,
            problems=tuple(problems))

    # -- implementation ----------------------------------------------------------------------

    def _action(self, action: str, container_id: str,
                body: Callable[[str], ActionResult]) -> ActionResult:
        if not _CONTAINER_ID.fullmatch(str(container_id)):
            result = ActionResult(action, str(container_id), ActionStatus.REFUSED,
                                  _bad_id_message(container_id))
        else:
            with self._lock:
                result = body(container_id)
        return self._record(result)

    def _record(self, result: ActionResult) -> ActionResult:
        with self._lock:
            self._counts[(result.action, result.status)] += 1
        level = logging.WARNING if result.status in (ActionStatus.FAILED,
                                                     ActionStatus.REFUSED) else logging.INFO
        log.log(level, "action %s on %s: %s: %s", result.action, result.container_id[:12],
                result.status.value, result.message)
        return result

    def _pause(self, cid: str) -> ActionResult:
        return self._runtime_step(
            "pause", cid, already=lambda s: s.paused, applicable=lambda s: s.running,
            call=self.runtime.pause, already_text="already paused", done_text="paused (frozen)")

    def _resume(self, cid: str) -> ActionResult:
        return self._runtime_step(
            "resume", cid, already=lambda s: s.running and not s.paused,
            applicable=lambda s: s.paused, call=self.runtime.unpause,
            already_text="already running (not paused)", done_text="resumed (thawed)")

    def _kill(self, cid: str) -> ActionResult:
        return self._runtime_step(
            "kill", cid, already=lambda s: not s.running and s.status != "restarting",
            applicable=lambda s: True, call=self.runtime.kill,
            already_text="already stopped", done_text="killed (SIGKILL)")

    def _runtime_step(self, action: str, cid: str, *, already: Callable[[RuntimeState], bool],
                      applicable: Callable[[RuntimeState], bool], call: Callable[[str], None],
                      already_text: str, done_text: str) -> ActionResult:
        def result(status: ActionStatus, message: str, state: RuntimeState | None = None):
            details = (("runtime_status", state.status),) if state is not None else ()
            return ActionResult(action, cid, status, message, details)

        try:
            state = self.runtime.state(cid)
        except ContainerNotFoundError as exc:
            return result(ActionStatus.CONTAINER_GONE, f"no such container ({exc})")
        except RuntimeActionError as exc:
            return result(ActionStatus.FAILED, f"could not read the container's state: {exc}")
        if already(state):
            return result(ActionStatus.ALREADY, f"{already_text} (status {state.status})", state)
        if not applicable(state):
            return result(ActionStatus.FAILED,
                          f"cannot {action}: the container is {state.status}, not running", state)
        try:
            call(cid)
        except ContainerNotFoundError as exc:
            return result(ActionStatus.CONTAINER_GONE, f"no such container ({exc})")
        except RuntimeActionError as exc:
            # Lost a race with another actor? Then the requested state holds after all.
            try:
                after = self.runtime.state(cid)
            except ContainerNotFoundError:
                return result(ActionStatus.CONTAINER_GONE, f"container went away during {action}")
            except RuntimeActionError:
                after = None
            if after is not None and already(after):
                return result(ActionStatus.ALREADY, f"{already_text} (status {after.status})",
                              after)
            return result(ActionStatus.FAILED, f"{action} failed: {exc}", state)
        return result(ActionStatus.DONE, done_text, state)

    def _cgroup_dir(self, cid: str) -> Path | None:
        """Docker's usual places first (no runtime call); else where the container's init
        process is, which covers Kubernetes pods and other cgroup parents."""
        if self._cgroup_root is None:
            self._cgroup_root = find_cgroup2_root()
        found = next((p for p in container_cgroup_candidates(self._cgroup_root, cid)
                      if p.is_dir()), None)
        if found is not None:
            return found
        try:
            pid = self.runtime.state(cid).pid
        except (ContainerNotFoundError, RuntimeActionError):
            return None
        return cgroup_dir_of_process(self._cgroup_root, self._proc_root, pid) if pid > 0 else None

    def _locate(self, action: str, cid: str) -> Path | ActionResult:
        try:
            cgroup_dir = self._cgroup_dir(cid)
        except HostSupportError as exc:
            return ActionResult(action, cid, ActionStatus.FAILED, str(exc))
        if cgroup_dir is None:
            tried = ", ".join(str(p) for p in container_cgroup_candidates(
                self._cgroup_root or Path("?"), cid))
            return ActionResult(action, cid, ActionStatus.CONTAINER_GONE,
                                f"the container has no cgroup v2 directory (tried {tried} and its "
                                "init process's /proc/PID/cgroup): it does not exist or is not "
                                "running")
        return cgroup_dir

    def _quarantine(self, cid: str, with_pause: bool) -> ActionResult:
        located = self._locate("quarantine", cid)
        if isinstance(located, ActionResult):
            return located
        details = [("cgroup", str(located))]
        try:
            present = self.quarantine_backend.attached(located)
            missing = tuple(h for h in QUARANTINE_HOOKS if h.name not in present)
            if missing:
                self.quarantine_backend.attach(located, missing)
        except FileNotFoundError:
            return ActionResult("quarantine", cid, ActionStatus.CONTAINER_GONE,
                                "the container's cgroup went away (it exited)", tuple(details))
        except (OSError, DriftwardenError) as exc:
            partial = self._hooks_now(located)
            details.append(("hooks", ",".join(partial)))
            where = (f"; partially applied: {', '.join(partial)} attached" if partial
                     else "; nothing is attached")
            return ActionResult("quarantine", cid, ActionStatus.FAILED,
                                f"quarantine failed: {exc}{where}", tuple(details))
        details.append(("hooks", ",".join(HOOK_NAMES)))
        changed = bool(missing)
        message = (f"quarantined: {', '.join(h.name for h in missing)} attached" if changed
                   else "already quarantined")
        return self._combine("quarantine", cid, changed, message, details,
                             self._pause(cid) if with_pause else None, "pause")

    def _release(self, cid: str, with_resume: bool) -> ActionResult:
        located = self._locate("release", cid)
        if isinstance(located, ActionResult):
            return located
        details = [("cgroup", str(located))]
        try:
            detached = self.quarantine_backend.detach(located)
        except FileNotFoundError:
            return ActionResult("release", cid, ActionStatus.CONTAINER_GONE,
                                "the container's cgroup went away (it exited)", tuple(details))
        except (OSError, DriftwardenError) as exc:
            left = self._hooks_now(located)
            details.append(("hooks", ",".join(left)))
            return ActionResult("release", cid, ActionStatus.FAILED,
                                f"release failed: {exc}; still attached: "
                                f"{', '.join(left) or 'none'}", tuple(details))
        details.append(("detached", str(detached)))
        message = (f"released: {detached} quarantine program(s) detached" if detached
                   else "not quarantined")
        return self._combine("release", cid, bool(detached), message, details,
                             self._resume(cid) if with_resume else None, "resume")

    def _hooks_now(self, cgroup_dir: Path) -> tuple[str, ...]:
        try:
            return self.quarantine_backend.attached(cgroup_dir)
        except (OSError, DriftwardenError):
            return ()

    @staticmethod
    def _combine(action: str, cid: str, changed: bool, message: str,
                 details: list[tuple[str, str]], step: ActionResult | None,
                 step_name: str) -> ActionResult:
        """Fold the optional pause/resume step into the quarantine/release result."""
        if step is None:
            status = ActionStatus.DONE if changed else ActionStatus.ALREADY
            return ActionResult(action, cid, status, message, tuple(details))
        details.append((step_name, step.status.value))
        text = f"{message}; {step_name}: {step.message}"
        if step.ok:
            status = ActionStatus.DONE if changed or step.status == ActionStatus.DONE else (
                ActionStatus.ALREADY)
        else:
            status = step.status  # FAILED or CONTAINER_GONE: the combined request did not hold
        return ActionResult(action, cid, status, text, tuple(details))


def _bad_id_message(container_id: object) -> str:
    shown = repr(container_id) if len(repr(container_id)) <= 80 else repr(container_id)[:77] + "..."
    return (f"container id must be the full 64-hex-digit id (resolve names and short ids first), "
            f"got {shown}")
