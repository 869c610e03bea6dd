"""ContainerActions on fakes: a scripted runtime, a temp cgroup tree, an in-memory quarantine."""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from pathlib import Path

import pytest
from driftwarden.agent.actions import (
    HOOK_NAMES,
    QUARANTINE_HOOKS,
    ActionResult,
    AttachedProgram,
    BpfQuarantine,
    ContainerActions,
    ContainerState,
    QuarantineHook,
    RuntimeState,
)
from driftwarden.core.actions import ActionStatus
from driftwarden.core.errors import ContainerNotFoundError, ProbeLoadError, RuntimeActionError

CID = "ab" * 32
OTHER = "cd" * 32
RUNNING = RuntimeState("running", running=True, paused=False)
PAUSED = RuntimeState("paused", running=True, paused=True)
EXITED = RuntimeState("exited", running=False, paused=False)


class FakeRuntime:
    """Containers by id; a call applies its effect unless an error is scripted for it."""

    def __init__(self, states: dict[str, RuntimeState] | None = None) -> None:
        self.states = dict(states or {})
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[str, Exception] = {}  # op -> error raised instead of acting
        self.after_fail: RuntimeState | None = None  # state set when a scripted failure fires

    def state(self, container_id: str) -> RuntimeState:
        self.calls.append(("state", container_id))
        if "state" in self.fail:
            raise self.fail["state"]
        if container_id not in self.states:
            raise ContainerNotFoundError(f"No such container: {container_id}")
        return self.states[container_id]

    def _act(self, op: str, container_id: str, new: RuntimeState) -> None:
        self.calls.append((op, container_id))
        if op in self.fail:
            if self.after_fail is not None:
                self.states[container_id] = self.after_fail
            raise self.fail[op]
        if container_id not in self.states:
            raise ContainerNotFoundError(f"No such container: {container_id}")
        self.states[container_id] = new

    def pause(self, container_id: str) -> None:
        self._act("pause", container_id, PAUSED)

    def unpause(self, container_id: str) -> None:
        self._act("unpause", container_id, RUNNING)

    def kill(self, container_id: str) -> None:
        self._act("kill", container_id, EXITED)

    def acting_calls(self) -> list[str]:
        return [op for op, _ in self.calls if op != "state"]


class FakeQuarantine:
    """Hooks attached per cgroup directory; a missing directory behaves like the kernel's."""

    def __init__(self) -> None:
        self.hooks: dict[Path, list[str]] = {}
        self.attach_calls: list[tuple[Path, tuple[str, ...]]] = []
        self.fail_attach_after: int | None = None  # attach this many hooks, then fail
        self.fail_detach: Exception | None = None
        self.fail_attached: Exception | None = None

    def attached(self, cgroup_dir: Path) -> tuple[str, ...]:
        if self.fail_attached is not None:
            raise self.fail_attached
        if not cgroup_dir.is_dir():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(cgroup_dir))
        present = self.hooks.get(cgroup_dir, [])
        return tuple(n for n in HOOK_NAMES if n in present)

    def attach(self, cgroup_dir: Path, hooks: tuple[QuarantineHook, ...]) -> None:
        self.attach_calls.append((cgroup_dir, tuple(h.name for h in hooks)))
        for i, hook in enumerate(hooks):
            if self.fail_attach_after is not None and i >= self.fail_attach_after:
                raise OSError(errno.EPERM, f"bpf attach: {os.strerror(errno.EPERM)}")
            self.hooks.setdefault(cgroup_dir, []).append(hook.name)

    def detach(self, cgroup_dir: Path) -> int:
        if self.fail_detach is not None:
            raise self.fail_detach
        if not cgroup_dir.is_dir():
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(cgroup_dir))
        return len(self.hooks.pop(cgroup_dir, []))


@pytest.fixture
def cgroup_root(tmp_path: Path) -> Path:
    (tmp_path / "docker" / CID).mkdir(parents=True)
    return tmp_path


@pytest.fixture
def runtime() -> FakeRuntime:
    return FakeRuntime({CID: RUNNING})


@pytest.fixture
def quarantine() -> FakeQuarantine:
    return FakeQuarantine()


@pytest.fixture
def actions(runtime, cgroup_root, quarantine) -> ContainerActions:
    return ContainerActions(runtime, cgroup_root=cgroup_root, quarantine=quarantine)


# -- pause / resume / kill: the idempotency table ---------------------------------------------

@pytest.mark.parametrize(
    ("action", "before", "status", "message", "calls", "after"),
    [
        ("pause", RUNNING, ActionStatus.DONE, "paused (frozen)", ["pause"], PAUSED),
        ("pause", PAUSED, ActionStatus.ALREADY, "already paused (status paused)", [], PAUSED),
        ("pause", EXITED, ActionStatus.FAILED,
         "cannot pause: the container is exited, not running", [], EXITED),
        ("resume", PAUSED, ActionStatus.DONE, "resumed (thawed)", ["unpause"], RUNNING),
        ("resume", RUNNING, ActionStatus.ALREADY,
         "already running (not paused) (status running)", [], RUNNING),
        ("resume", EXITED, ActionStatus.FAILED,
         "cannot resume: the container is exited, not running", [], EXITED),
        ("kill", RUNNING, ActionStatus.DONE, "killed (SIGKILL)", ["kill"], EXITED),
        ("kill", PAUSED, ActionStatus.DONE, "killed (SIGKILL)", ["kill"], EXITED),
        ("kill", EXITED, ActionStatus.ALREADY, "already stopped (status exited)", [], EXITED),
    ],
)
def test_runtime_actions_idempotency(actions, runtime, action, before, status, message, calls,
                                     after):
    runtime.states[CID] = before
    result = getattr(actions, action)(CID)
    assert result == ActionResult(action, CID, status, message,
                                  (("runtime_status", before.status),))
    assert runtime.acting_calls() == calls
    assert runtime.states[CID] == after


@pytest.mark.parametrize("action", ["pause", "resume", "kill"])
def test_runtime_action_on_unknown_container_is_gone(actions, runtime, action):
    result = getattr(actions, action)(OTHER)
    assert result.status is ActionStatus.CONTAINER_GONE
    assert result.message == f"no such container (No such container: {OTHER})"
    assert runtime.acting_calls() == []


def test_runtime_unreachable_fails_with_reason(actions, runtime):
    runtime.fail["state"] = RuntimeActionError("docker inspect: cannot reach the Docker daemon")
    result = actions.pause(CID)
    assert result.status is ActionStatus.FAILED
    assert result.message == ("could not read the container's state: "
                              "docker inspect: cannot reach the Docker daemon")
    assert runtime.acting_calls() == []


def test_runtime_call_failure_is_failed_with_reason(actions, runtime):
    runtime.fail["pause"] = RuntimeActionError("docker pause: freezer unavailable")
    result = actions.pause(CID)
    assert result == ActionResult("pause", CID, ActionStatus.FAILED,
                                  "pause failed: docker pause: freezer unavailable",
                                  (("runtime_status", "running"),))


def test_runtime_call_lost_race_reports_already(actions, runtime):
    # Another actor paused it between our inspect and our pause: the request holds.
    runtime.fail["pause"] = RuntimeActionError("docker pause: container is already paused")
    runtime.after_fail = PAUSED
    result = actions.pause(CID)
    assert (result.status, result.message) == (ActionStatus.ALREADY,
                                               "already paused (status paused)")


def test_container_removed_during_call_is_gone(actions, runtime):
    runtime.fail["kill"] = ContainerNotFoundError("No such container: x")
    result = actions.kill(CID)
    assert (result.status, result.message) == (ActionStatus.CONTAINER_GONE,
                                               "no such container (No such container: x)")


# -- quarantine / release ---------------------------------------------------------------------

def test_quarantine_attaches_all_hooks_then_already(actions, quarantine, cgroup_root):
    cgroup = cgroup_root / "docker" / CID
    first = actions.quarantine(CID)
    assert first == ActionResult(
        "quarantine", CID, ActionStatus.DONE,
        "quarantined: connect4, connect6, egress, ingress attached",
        (("cgroup", str(cgroup)), ("hooks", "connect4,connect6,egress,ingress")))
    second = actions.quarantine(CID)
    assert (second.status, second.message) == (ActionStatus.ALREADY, "already quarantined")
    assert quarantine.attach_calls == [(cgroup, HOOK_NAMES)]  # the second attached nothing
    state = actions.status(CID)
    assert state == ContainerState(CID, exists=True, running=True, paused=False,
                                   quarantined=True, quarantine_hooks=HOOK_NAMES,
                                   cgroup_dir=str(cgroup))


def test_quarantine_completes_a_partial_one(actions, quarantine, cgroup_root):
    cgroup = cgroup_root / "docker" / CID
    quarantine.hooks[cgroup] = ["connect4", "egress"]
    assert actions.status(CID).quarantined is False
    assert actions.status(CID).quarantine_hooks == ("connect4", "egress")
    result = actions.quarantine(CID)
    assert (result.status, result.message) == (ActionStatus.DONE,
                                               "quarantined: connect6, ingress attached")
    assert quarantine.attach_calls == [(cgroup, ("connect6", "ingress"))]


def test_quarantine_attach_failure_reports_what_is_attached(actions, quarantine, cgroup_root):
    quarantine.fail_attach_after = 2
    result = actions.quarantine(CID)
    assert result == ActionResult(
        "quarantine", CID, ActionStatus.FAILED,
        "quarantine failed: [Errno 1] bpf attach: Operation not permitted; "
        "partially applied: connect4, connect6 attached",
        (("cgroup", str(cgroup_root / "docker" / CID)), ("hooks", "connect4,connect6")))


def test_quarantine_load_failure_attaches_nothing(actions, quarantine):
    quarantine.fail_attach_after = 0
    result = actions.quarantine(CID)
    assert result.status is ActionStatus.FAILED
    assert result.message.endswith("; nothing is attached")


def test_release_detaches_then_already(actions, quarantine, cgroup_root):
    cgroup = cgroup_root / "docker" / CID
    actions.quarantine(CID)
    result = actions.release(CID)
    assert result == ActionResult("release", CID, ActionStatus.DONE,
                                  "released: 4 quarantine program(s) detached",
                                  (("cgroup", str(cgroup)), ("detached", "4")))
    again = actions.release(CID)
    assert (again.status, again.message) == (ActionStatus.ALREADY, "not quarantined")
    assert actions.status(CID).quarantine_hooks == ()


def test_release_failure_says_what_is_still_attached(actions, quarantine):
    actions.quarantine(CID)
    quarantine.fail_detach = OSError(errno.EBADF, "bpf detach: Bad file descriptor")
    result = actions.release(CID)
    assert result.status is ActionStatus.FAILED
    assert result.message == ("release failed: [Errno 9] bpf detach: Bad file descriptor; "
                              "still attached: connect4, connect6, egress, ingress")


def test_quarantine_kernel_read_failure_is_failed(actions, quarantine):
    quarantine.fail_attached = ProbeLoadError("no bpf")
    result = actions.quarantine(CID)
    assert (result.status, result.message) == (
        ActionStatus.FAILED, "quarantine failed: no bpf; nothing is attached")


@pytest.mark.parametrize("action", ["quarantine", "release"])
def test_quarantine_without_cgroup_dir_is_gone(actions, cgroup_root, quarantine, action):
    (cgroup_root / "docker" / CID).rmdir()
    result = getattr(actions, action)(CID)
    assert result.status is ActionStatus.CONTAINER_GONE
    assert result.message == (
        f"the container has no cgroup v2 directory (tried {cgroup_root}/docker/{CID}, "
        f"{cgroup_root}/system.slice/docker-{CID}.scope and its init process's "
        "/proc/PID/cgroup): it does not exist or is not running")
    assert quarantine.attach_calls == []


POD_CGROUP = ("kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/"
              f"docker-{CID}.scope")


@pytest.mark.parametrize(("cgroup_file", "found"), [
    (f"12:pids:/{POD_CGROUP}\n0::/{POD_CGROUP}\n", True),  # hybrid host: the v2 line counts
    (f"12:pids:/{POD_CGROUP}\n", False),  # no cgroup v2 entry
    ("0::/\n", False),  # the root cgroup is never a container's
    (None, False),  # the process is gone
])
def test_quarantine_finds_a_pods_cgroup_through_the_init_process(tmp_path, quarantine,
                                                                   cgroup_file, found):
    cgroup_root, proc = tmp_path / "cgroup", tmp_path / "proc"
    (cgroup_root / POD_CGROUP).mkdir(parents=True)  # not where Docker alone would put it
    if cgroup_file is not None:
        (proc / "4242").mkdir(parents=True)
        (proc / "4242" / "cgroup").write_text(cgroup_file)
    runtime = FakeRuntime({CID: dataclasses.replace(RUNNING, pid=4242)})
    actions = ContainerActions(runtime, cgroup_root=cgroup_root, quarantine=quarantine,
                               proc_root=proc)
    result = actions.quarantine(CID)
    if found:
        assert result.status is ActionStatus.DONE, result
        assert dict(result.details)["cgroup"] == str(cgroup_root / POD_CGROUP)
        assert [path for path, _ in quarantine.attach_calls] == [cgroup_root / POD_CGROUP]
    else:
        assert result.status is ActionStatus.CONTAINER_GONE, result
        assert quarantine.attach_calls == []


def test_cgroup_removed_while_quarantining_is_gone(actions, quarantine):
    quarantine.fail_attached = FileNotFoundError(errno.ENOENT, "gone")
    result = actions.quarantine(CID)
    assert (result.status, result.message) == (
        ActionStatus.CONTAINER_GONE, "the container's cgroup went away (it exited)")


def test_systemd_cgroup_layout_is_found(runtime, quarantine, tmp_path):
    scope = tmp_path / "system.slice" / f"docker-{CID}.scope"
    scope.mkdir(parents=True)
    actions = ContainerActions(runtime, cgroup_root=tmp_path, quarantine=quarantine)
    result = actions.quarantine(CID)
    assert result.status is ActionStatus.DONE
    assert result.detail("cgroup") == str(scope)


@pytest.mark.parametrize(
    ("before", "q_status", "pause_status", "status"),
    [
        ([], "done", "done", ActionStatus.DONE),
        (list(HOOK_NAMES), "already", "done", ActionStatus.DONE),
        (list(HOOK_NAMES), "already", "already", ActionStatus.ALREADY),
    ],
)
def test_quarantine_with_pause(actions, runtime, quarantine, cgroup_root, before, q_status,
                               pause_status, status):
    quarantine.hooks[cgroup_root / "docker" / CID] = before
    if pause_status == "already":
        runtime.states[CID] = PAUSED
    result = actions.quarantine(CID, with_pause=True)
    assert result.status is status
    assert result.detail("pause") == pause_status
    assert runtime.states[CID] == PAUSED
    assert actions.status(CID).quarantined is True


def test_quarantine_with_failed_pause_is_failed(actions, runtime):
    runtime.fail["pause"] = RuntimeActionError("docker pause: no freezer")
    result = actions.quarantine(CID, with_pause=True)
    assert result.status is ActionStatus.FAILED
    assert result.message == ("quarantined: connect4, connect6, egress, ingress attached; "
                              "pause: pause failed: docker pause: no freezer")
    assert actions.status(CID).quarantined is True  # the network cut stays in force


def test_release_with_resume(actions, runtime):
    actions.quarantine(CID, with_pause=True)
    result = actions.release(CID, with_resume=True)
    assert (result.status, result.message) == (
        ActionStatus.DONE, "released: 4 quarantine program(s) detached; resume: resumed (thawed)")
    assert runtime.states[CID] == RUNNING


# -- status, ids, dispatcher, counts ------------------------------------------------------------

def test_status_of_removed_container(actions, runtime, cgroup_root):
    del runtime.states[CID]
    (cgroup_root / "docker" / CID).rmdir()
    assert actions.status(CID) == ContainerState(CID, exists=False, running=False, paused=False,
                                                 quarantined=False, quarantine_hooks=(),
                                                 cgroup_dir=None)


def test_status_reports_what_it_could_not_read(actions, runtime, quarantine):
    runtime.fail["state"] = RuntimeActionError("docker inspect: daemon down")
    quarantine.fail_attached = OSError(errno.EPERM, "bpf prog query: Operation not permitted")
    state = actions.status(CID)
    assert (state.exists, state.quarantined) == (False, False)
    assert state.problems == ("docker inspect: daemon down",
                              "quarantine state unreadable: [Errno 1] bpf prog query: "
                              "Operation not permitted")


@pytest.mark.parametrize("bad", ["web", "abababababab", "../../../etc", "AB" * 32, CID + "0", ""])
@pytest.mark.parametrize("action", ["pause", "resume", "kill", "quarantine", "release"])
def test_invalid_container_id_is_refused(actions, runtime, quarantine, action, bad):
    result = getattr(actions, action)(bad)
    assert result.status is ActionStatus.REFUSED
    assert result.message == ("container id must be the full 64-hex-digit id (resolve names "
                              f"and short ids first), got {bad!r}")
    assert runtime.calls == [] and quarantine.attach_calls == []


def test_status_rejects_invalid_id(actions):
    with pytest.raises(ValueError, match="full 64-hex-digit id"):
        actions.status("web")


def test_run_dispatches_with_options(actions, runtime):
    result = actions.run("quarantine", CID, with_pause=True)
    assert (result.action, result.status) == ("quarantine", ActionStatus.DONE)
    assert runtime.states[CID] == PAUSED
    assert actions.run("resume", CID).status is ActionStatus.DONE


@pytest.mark.parametrize(
    ("action", "options", "message"),
    [
        ("reboot", {}, "unknown action 'reboot': choose from pause, resume, kill, quarantine, "
                       "release"),
        ("status", {}, "unknown action 'status': choose from pause, resume, kill, quarantine, "
                       "release"),
        ("kill", {"with_pause": True}, "kill does not take option(s) with_pause (allowed: none)"),
        ("quarantine", {"force": True, "with_resume": True},
         "quarantine does not take option(s) force, with_resume (allowed: with_pause)"),
        ("quarantine", {"with_pause": "yes"},
         "quarantine option(s) with_pause must be true or false"),
    ],
)
def test_run_refuses_bad_requests(actions, runtime, action, options, message):
    result = actions.run(action, CID, **options)
    assert result == ActionResult(action, CID, ActionStatus.REFUSED, message)
    assert runtime.calls == []


def test_counts_and_log(actions, runtime, caplog):
    caplog.set_level(logging.INFO, logger="driftwarden.agent.actions")
    actions.pause(CID)
    actions.pause(CID)
    actions.kill(OTHER)
    actions.run("reboot", CID)
    assert actions.counts == {"kill.container_gone": 1, "pause.already": 1, "pause.done": 1,
                              "reboot.refused": 1}
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "action pause on abababababab: done: paused (frozen)"),
        ("INFO", "action pause on abababababab: already: already paused (status paused)"),
        ("INFO", "action kill on cdcdcdcdcdcd: container_gone: no such container "
                 f"(No such container: {OTHER})"),
        ("WARNING", "action reboot on abababababab: refused: unknown action 'reboot': choose "
                    "from pause, resume, kill, quarantine, release"),
    ]


def test_result_to_dict():
    result = ActionResult("release", CID, ActionStatus.DONE, "released", (("detached", "4"),))
    assert result.to_dict() == {"action": "release", "container_id": CID, "status": "done",
                                "message": "released", "details": {"detached": "4"}}
    assert result.ok is True
    assert ActionResult("kill", CID, ActionStatus.CONTAINER_GONE, "gone").ok is False


# -- the kernel layer on a fake syscall table ----------------------------------------------------

class FakeSyscalls:
    """attached_programs/prog_fd_by_id/prog_detach over a table; fds are real (from /dev/null)."""

    def __init__(self, programs: list[AttachedProgram]) -> None:
        self.programs = list(programs)
        self.detached: list[tuple[int, int]] = []  # (prog id, attach type)
        self._fd_to_id: dict[int, int] = {}
        self.open_fds: set[int] = set()

    def attached_programs(self, target_fd: int, attach_type: int) -> list[AttachedProgram]:
        return [p for p in self.programs if p.attach_type == attach_type]

    def prog_fd_by_id(self, prog_id: int) -> int:
        fd = os.open(os.devnull, os.O_RDONLY)
        self._fd_to_id[fd] = prog_id
        self.open_fds.add(fd)
        return fd

    def prog_detach(self, target_fd: int, prog_fd: int, attach_type: int) -> None:
        prog_id = self._fd_to_id[prog_fd]
        self.detached.append((prog_id, attach_type))
        self.programs = [p for p in self.programs
                         if not (p.prog_id == prog_id and p.attach_type == attach_type)]


def _ours(prog_id: int, hook: QuarantineHook) -> AttachedProgram:
    return AttachedProgram(prog_id, hook.prog_type, hook.program, hook.attach_type)


def test_bpf_backend_finds_and_detaches_only_ours(tmp_path):
    connect4, _, egress, _ = QUARANTINE_HOOKS
    foreign = [
        AttachedProgram(90, egress.prog_type, "docker_egress", egress.attach_type),
        AttachedProgram(91, connect4.prog_type, "dwq_connect4", connect4.attach_type),
        AttachedProgram(92, connect4.prog_type, "connect4_dw_q_", connect4.attach_type),
    ]
    # Ours by prefix: also a program another driftwarden version named differently.
    other_version = AttachedProgram(4, egress.prog_type, "dw_q_drop_v2", egress.attach_type)
    syscalls = FakeSyscalls([_ours(1, connect4), _ours(2, egress), *foreign, other_version])
    backend = BpfQuarantine(syscalls=syscalls)  # type: ignore[arg-type]
    assert backend.attached(tmp_path) == ("connect4", "egress")
    assert backend.detach(tmp_path) == 3
    # the packet drop first, then the connect block
    assert syscalls.detached == [(2, egress.attach_type), (4, egress.attach_type),
                                 (1, connect4.attach_type)]
    assert syscalls.programs == foreign
    assert backend.attached(tmp_path) == ()
    for fd in syscalls.open_fds:  # every program fd it opened was closed again
        with pytest.raises(OSError):
            os.fstat(fd)


def test_bpf_backend_on_missing_cgroup_raises_file_not_found(tmp_path):
    backend = BpfQuarantine(syscalls=FakeSyscalls([]))  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        backend.attached(tmp_path / "gone")


def test_prog_query_retries_when_more_programs_appear():
    from driftwarden.probes import _libbpf

    class ScriptedLibbpf:
        """bpf_prog_query as the kernel answers it: one program counted, three attached by the
        time the ids are read, then four."""

        def __init__(self) -> None:
            self.sizes: list[int | None] = []
            self.attached = [7]
            self.lib = self

        def bpf_prog_query(self, target_fd, attach_type, flags, attach_flags, ids, count):
            assert (target_fd, attach_type, flags, attach_flags) == (3, 1, 0, None)
            self.sizes.append(None if ids is None else count._obj.value)
            total = len(self.attached)
            size = count._obj.value
            count._obj.value = total
            if ids is None:
                self.attached = [7, 8, 9]
                return 0
            if size < total:
                self.attached = [7, 8, 9, 10]
                return -errno.ENOSPC
            for n, prog_id in enumerate(self.attached):
                ids[n] = prog_id
            return 0

    lib = ScriptedLibbpf()
    assert _libbpf.prog_query(lib, 3, 1) == [7, 8, 9, 10]  # type: ignore[arg-type]
    assert lib.sizes == [None, 1, 3, 6]  # the count the kernel gave, or twice the last try
