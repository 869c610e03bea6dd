"""Actions on real containers: Docker's freezer and kill, and the quarantine BPF programs on the
container's real cgroup. All traffic stays inside a `--network none` container (loopback only):
a busybox `nc -ll` echo listener on 127.0.0.1:7000, busybox `nc` to connect, busybox `ping` to
send raw ICMP packets (they never call connect(), so only the cgroup_skb programs stop them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from driftwarden.agent.actions import (
    HOOK_NAMES,
    QUARANTINE_HOOKS,
    ActionStatus,
    BpfSyscalls,
    ContainerActions,
    cgroup_dir_of_process,
)
from driftwarden.probes.loader import find_cgroup2_root

from tests.support.containers import RunningContainer, run_container

pytestmark = pytest.mark.integration

PORT = 7000
SERVE = ["sh", "-c", f"nc -ll -p {PORT} -e cat & exec sleep 300"]
CONNECT_V4 = ["sh", "-c", f"echo hello | nc -w 2 127.0.0.1 {PORT}"]
CONNECT_V6 = ["sh", "-c", f"echo hello | nc -w 2 ::1 {PORT}"]
PING = ["ping", "-c", "1", "-W", "2", "127.0.0.1"]
# What busybox prints when the quarantine programs say no (EPERM).
CONNECT_V4_DENIED = (1, "nc: can't connect to remote host (127.0.0.1): Operation not permitted\n")
CONNECT_V6_DENIED = (1, "nc: can't connect to remote host: Operation not permitted\n")
PING_DENIED_LINE = "ping: sendto: Operation not permitted"
PING_OK_LINE = "1 packets transmitted, 1 packets received, 0% packet loss"


@pytest.fixture(scope="module")
def actions(kernel_ok, docker_ok) -> Iterator[ContainerActions]:
    """One ContainerActions (one bcc compile) for the module."""
    with ContainerActions.for_docker() as acts:
        yield acts


@pytest.fixture
def server(bb_image, actions) -> Iterator[RunningContainer]:
    """A container with the loopback echo listener up; never left quarantined or paused."""
    with run_container(bb_image, SERVE) as c:
        try:
            _wait_listening(c)
            yield c
        finally:
            actions.release(c.id)


def _wait_listening(c: RunningContainer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = c.exec(CONNECT_V4)
        if result == (0, "hello\n"):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"echo listener in {c.name} never answered: {result}")
        time.sleep(0.1)


def _ping(c: RunningContainer) -> tuple[int, list[str]]:
    code, out = c.exec(PING)
    return code, out.splitlines()


def _assert_network_works(c: RunningContainer) -> None:
    assert c.exec(CONNECT_V4) == (0, "hello\n")
    code, lines = _ping(c)
    assert code == 0 and PING_OK_LINE in lines, lines


def _assert_network_cut(c: RunningContainer) -> None:
    assert c.exec(CONNECT_V4) == CONNECT_V4_DENIED
    assert c.exec(CONNECT_V6) == CONNECT_V6_DENIED
    code, lines = _ping(c)
    assert code == 1 and PING_DENIED_LINE in lines, lines


def _docker_state(c: RunningContainer) -> dict:
    c.container.reload()
    return c.container.attrs["State"]


def _programs_on(c: RunningContainer) -> dict[str, list[str]]:
    """Program names attached directly to the container's cgroup, per quarantine hook."""
    syscalls = BpfSyscalls()
    fd = os.open(c.cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {h.name: [p.name for p in syscalls.attached_programs(fd, h.attach_type)]
                for h in QUARANTINE_HOOKS}
    finally:
        os.close(fd)


def _in_fresh_process(action: str, cid: str) -> dict:
    """Run one action from a new Python process, like a restarted agent; its result as a dict."""
    script = ("import json, sys\n"
              "from driftwarden.agent.actions import ContainerActions\n"
              "with ContainerActions.for_docker() as acts:\n"
              "    print(json.dumps(acts.run(sys.argv[1], sys.argv[2]).to_dict()))\n")
    done = subprocess.run([sys.executable, "-c", script, action, cid], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_quarantine_cuts_the_network_and_release_restores_it(actions, server):
    cid = server.id
    _assert_network_works(server)

    result = actions.quarantine(cid)
    assert (result.status, result.detail("hooks")) == (ActionStatus.DONE, ",".join(HOOK_NAMES))
    assert result.detail("cgroup") == str(server.cgroup_path)
    _assert_network_cut(server)
    state = actions.status(cid)
    assert (state.running, state.paused, state.quarantined) == (True, False, True)
    assert state.quarantine_hooks == HOOK_NAMES
    assert _programs_on(server) == {h.name: [h.program] for h in QUARANTINE_HOOKS}
    assert actions.quarantine(cid).status is ActionStatus.ALREADY
    assert _programs_on(server) == {h.name: [h.program] for h in QUARANTINE_HOOKS}  # no second

    released = actions.release(cid)
    assert (released.status, released.detail("detached")) == (ActionStatus.DONE, "4")
    assert _programs_on(server) == {h.name: [] for h in QUARANTINE_HOOKS}
    _assert_network_works(server)
    assert actions.status(cid).quarantined is False
    assert actions.release(cid).status is ActionStatus.ALREADY


def test_quarantine_outlives_the_process_that_applied_it(actions, server):
    cid = server.id
    applied = _in_fresh_process("quarantine", cid)
    assert applied["status"] == "done", applied
    # That process has exited; the kernel still holds the programs.
    _assert_network_cut(server)
    assert actions.status(cid).quarantined is True
    assert actions.quarantine(cid).status is ActionStatus.ALREADY

    released = _in_fresh_process("release", cid)
    assert (released["status"], released["details"]["detached"]) == ("done", "4"), released
    _assert_network_works(server)
    assert actions.status(cid).quarantine_hooks == ()


def test_release_leaves_foreign_programs_attached(actions, server):
    from bcc import BPF, BPFAttachType

    foreign = BPF(text=b"int other_allow(struct __sk_buff *skb) { return 1; }")
    fn = foreign.load_func(b"other_allow", BPF.CGROUP_SKB)
    fd = os.open(server.cgroup_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        BPF.attach_func(fn, fd, BPFAttachType.CGROUP_INET_EGRESS, 2)  # BPF_F_ALLOW_MULTI
        assert actions.quarantine(server.id).status is ActionStatus.DONE
        _assert_network_cut(server)  # any program's drop wins over an allow
        assert _programs_on(server)["egress"] == ["other_allow", "dw_q_egress"]

        assert actions.release(server.id).detail("detached") == "4"
        assert _programs_on(server)["egress"] == ["other_allow"]
        assert actions.status(server.id).quarantine_hooks == ()
        _assert_network_works(server)
    finally:
        BPF.detach_func(fn, fd, BPFAttachType.CGROUP_INET_EGRESS)
        os.close(fd)
        foreign.cleanup()


def test_quarantine_with_pause_and_release_with_resume(actions, server):
    cid = server.id
    result = actions.quarantine(cid, with_pause=True)
    assert (result.status, result.detail("pause")) == (ActionStatus.DONE, "done")
    assert _docker_state(server)["Paused"] is True
    state = actions.status(cid)
    assert (state.paused, state.quarantined) == (True, True)

    released = actions.release(cid, with_resume=True)
    assert (released.status, released.detail("resume")) == (ActionStatus.DONE, "done")
    assert _docker_state(server)["Status"] == "running"
    _assert_network_works(server)


def test_pause_and_resume(actions, bb_image):
    with run_container(bb_image, ["sleep", "300"]) as c:
        try:
            paused = actions.pause(c.id)
            assert (paused.status, paused.message) == (ActionStatus.DONE, "paused (frozen)")
            assert (_docker_state(c)["Paused"], _docker_state(c)["Status"]) == (True, "paused")
            assert actions.pause(c.id).status is ActionStatus.ALREADY
            assert actions.status(c.id).paused is True

            assert actions.resume(c.id).status is ActionStatus.DONE
            assert (_docker_state(c)["Paused"], _docker_state(c)["Status"]) == (False, "running")
            assert actions.resume(c.id).status is ActionStatus.ALREADY
            assert actions.status(c.id).paused is False
        finally:
            actions.resume(c.id)


def test_kill_then_removed(actions, bb_image):
    """kill of an exited container is ALREADY (it still exists, stopped); once removed, every
    action is CONTAINER_GONE."""
    client = docker.from_env()
    try:
        with run_container(bb_image, ["sleep", "300"]) as c:
            cid = c.id
            killed = actions.kill(cid)
            assert (killed.status, killed.message) == (ActionStatus.DONE, "killed (SIGKILL)")
            assert c.wait(timeout=30) == 137  # 128 + SIGKILL
            assert _docker_state(c)["Status"] == "exited"
            again = actions.kill(cid)
            assert (again.status, again.message) == (ActionStatus.ALREADY,
                                                     "already stopped (status exited)")
            # Exited: no cgroup any more, so there is nothing to quarantine.
            assert actions.quarantine(cid).status is ActionStatus.CONTAINER_GONE
            assert actions.pause(cid).status is ActionStatus.FAILED
        with pytest.raises(docker.errors.NotFound):
            client.containers.get(cid)
        for action in ("pause", "resume", "kill", "quarantine", "release"):
            result = actions.run(action, cid)
            assert result.status is ActionStatus.CONTAINER_GONE, result
        gone = actions.kill(cid)
        assert gone.message == f"no such container (docker inspect: No such container: {cid})"
        state = actions.status(cid)
        assert (state.exists, state.running, state.quarantined, state.cgroup_dir) == (
            False, False, False, None)
    finally:
        client.close()


def test_the_init_process_names_the_cgroup_docker_made(actions, bb_image):
    # the fallback used where Docker's paths do not apply (Kubernetes pods) agrees with them
    with run_container(bb_image, ["sleep", "300"]) as c:
        state = actions.runtime.state(c.id)
        root = find_cgroup2_root()
        assert state.pid == c.pid > 0
        made_by_docker = root / c.docker_cgroup_path.lstrip("/")  # its driver and CgroupParent
        assert cgroup_dir_of_process(root, Path("/proc"), state.pid) == made_by_docker
