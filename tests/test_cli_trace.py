"""`driftwarden trace` as a user runs it: a subprocess, its exit code, its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.support.containers import run_container

PY = sys.executable


def trace(*args: str, timeout: float = 60, user: int | None = None, stdin=None):
    cmd = [PY, "-m", "driftwarden", "trace", *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=stdin,
                          cwd="/")


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    return lines[0]


@pytest.mark.parametrize(("args", "expected"), [
    (["--kinds", "exec,bogus"], "unknown kind(s) bogus"),
    (["--kinds", ""], "unknown kind(s) (empty)"),
    (["--duration", "-1"], "must be > 0"),
    (["--duration", "soon"], "expected a number of seconds"),
    (["--dedup-interval", "-0.5"], "must be >= 0"),
    (["--record", "a.cap", "--replay", "b.cap"], "not allowed with argument"),
    (["--json", "--summary-only"], "not allowed with argument"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--budget", "write=lots"], "RATE and BURST are whole numbers of events"),
    (["--budget", "exit=10"], "KIND one of exec,connect,write,chdir,fork"),
])
def test_bad_flags_give_one_line_and_exit_2(args, expected):
    result = trace(*args)
    assert result.returncode == 2
    line = one_error_line(result)
    assert expected in line and "see `driftwarden" in line
    assert result.stdout == ""


def test_ring_buffer_pages_must_be_power_of_two():
    result = trace("--ringbuf-pages", "3", "--print-bpf")
    assert result.returncode == 2
    assert "power of two, got 3" in one_error_line(result)


def _plan_on_this_host(kinds: str):
    from driftwarden.probes.loader import ProbeConfig, find_tracefs, plan_probes

    return plan_probes(ProbeConfig(kinds=frozenset(kinds.split(","))), find_tracefs())


def test_print_bpf_shows_settings_and_program():
    result = trace("--print-bpf", "--kinds", "exec,write", "--dedup-interval", "0.25",
                   "--budget", "write=300/600", "--budget", "exec=off")
    assert result.returncode == 0
    text = result.stdout
    assert "#define DW_DEDUP_NS 250000000" in text
    assert ("#define DW_BUDGET_EXEC_RATE 0\n#define DW_BUDGET_EXEC_BURST 1\n"
            "#define DW_BUDGET_CONNECT_RATE 2000\n#define DW_BUDGET_CONNECT_BURST 4000\n"
            "#define DW_BUDGET_FILE_RATE 300\n#define DW_BUDGET_FILE_BURST 600\n") in text
    assert "#define DW_WITH_EXEC 1\n#define DW_WITH_CONNECT 0\n#define DW_WITH_FILE 1\n" in text
    plan = _plan_on_this_host("exec,write")
    assert text.startswith(f"/* driftwarden BPF program, as compiled; it attaches "
                           f"{plan.describe()}:\n *   sched:sched_process_fork\n")
    for name in ("fchmodat2", "open", "openat2"):  # what this kernel has, as the loader saw it
        have = int(name not in plan.absent)
        assert f"#define DW_HAVE_{name.upper()} {have}\n" in text
    assert "struct dw_exec_event {" in text  # the shared header is inlined
    assert '#include "dw_event.h"' not in text
    assert "TRACEPOINT_PROBE(syscalls, sys_enter_execve)" in text


@pytest.mark.parametrize("kinds", ["exec", "connect", "exec,connect,write"])
def test_print_bpf_counts_and_names_the_tracepoints_the_kinds_attach(kinds):
    """Counted on this host's kernel (its tracefs), with what it lacks named."""
    plan = _plan_on_this_host(kinds)
    result = trace("--print-bpf", "--kinds", kinds)
    assert result.returncode == 0, result.stderr
    comment = result.stdout.split("*/", 1)[0].splitlines()
    assert comment[0].endswith(f"it attaches {plan.describe()}:")
    absent = plan.describe_absent()
    if absent:
        assert comment.pop(-2) == f" * not on this kernel, so not compiled: {absent}"
    listed = [line.removeprefix(" *   ") for line in comment[1:-1]]
    assert listed == list(plan.tracepoint_names())
    assert ("syscalls:sys_enter_openat" in listed) == ("write" in kinds)


def test_replay_missing_file(tmp_path):
    result = trace("--replay", str(tmp_path / "nope.dwcap"))
    assert result.returncode == 1
    line = one_error_line(result)
    assert "cannot open capture file" in line and "nope.dwcap" in line


def test_replay_not_a_capture(tmp_path):
    bogus = tmp_path / "bogus.dwcap"
    bogus.write_bytes(b"hello world\n")
    result = trace("--replay", str(bogus))
    assert result.returncode == 1
    assert "not a driftwarden capture (bad magic)" in one_error_line(result)


@pytest.mark.integration
def test_not_root_is_one_clear_line(kernel_ok):
    result = trace("--duration", "1", user=65534)
    assert result.returncode == 1
    line = one_error_line(result)
    assert "needs root" in line and "sudo" in line


@pytest.mark.integration
def test_unknown_container_is_refused_before_loading(kernel_ok, docker_ok):
    started = time.monotonic()
    result = trace("--container", "no-such-container-dw", "--duration", "5")
    assert result.returncode == 2
    assert "no container named or with id 'no-such-container-dw'" in one_error_line(result)
    assert time.monotonic() - started < 5  # refused up front, probes never compiled


@pytest.mark.integration
def test_missing_tracefs_is_a_clear_error(kernel_ok):
    from driftwarden.core.errors import HostSupportError
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    with pytest.raises(HostSupportError, match=r"^no tracepoints under /nonexistent/tracing: "
                                               r"tracefs is not mounted; run `mount -t tracefs"):
        ProbeSet(ProbeConfig(), tracefs="/nonexistent/tracing").start()


@pytest.mark.integration
def test_record_then_replay_gives_the_same_events(kernel_ok, bb_image, tmp_path):
    capture = tmp_path / "run.dwcap"
    with run_container(bb_image, ["sleep", "3600"], name="recrep") as c:
        agent = subprocess.Popen(
            [PY, "-m", "driftwarden", "trace", "--json", "--container", c.name,
             "--record", str(capture), "--duration", "25"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        )
        try:
            _wait_for_line(agent, "tracing")
            c.exec(["/bin/sh", "-c", "mkdir -p /data/r && cd /data/r && echo a > one && "
                    "mv one two && chmod 755 two && ln -s two three && rm three && "
                    "nc -w1 127.0.0.1 7 </dev/null; cat two"])
            time.sleep(1.0)
        finally:
            agent.send_signal(2)  # Ctrl-C: drains, prints the summary, closes the capture
            live_out, live_err = agent.communicate(timeout=30)
    assert agent.returncode == 0, live_err
    live = [json.loads(line) for line in live_out.splitlines()]
    assert any(e["kind"] == "write" and e["write"]["path"] == "/data/r/two"
               and e["write"]["op"] == "chmod" for e in live)
    assert {e["container"]["name"] for e in live} == {c.name}

    replay = trace("--json", "--replay", str(capture), "--container", c.name)
    assert replay.returncode == 0, replay.stderr
    replayed = [json.loads(line) for line in replay.stdout.splitlines()]
    assert replayed == live
    summary = json.loads(replay.stderr.strip().splitlines()[-1])["summary"]
    assert summary["shown"] == {k: v for k, v in _count_kinds(live).items()}


def _count_kinds(events) -> dict:
    counts: dict[str, int] = {}
    for e in events:
        counts[e["kind"]] = counts.get(e["kind"], 0) + 1
    return counts


def _wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stderr.fileno(), True)
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if needle in line:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"agent exited early: {proc.stderr.read()}")
    raise AssertionError(f"agent did not print {needle!r} in {timeout}s")


@pytest.mark.integration
def test_docker_down_keeps_tracing_with_cgroup_only_attribution(kernel_ok, bb_image, tmp_path):
    dead = tmp_path / "no-docker.sock"
    with run_container(bb_image, ["sleep", "3600"], name="nodocker") as c:
        agent = subprocess.Popen(
            [PY, "-m", "driftwarden", "trace", "--json", "--kinds", "write",
             "--docker-host", f"unix://{dead}", "--duration", "25"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/",
        )
        try:
            # not just "tracing": the warning naming the dead socket's path (this test's
            # tmp_path, ".../test_docker_down_keeps_tracing0/...") comes before the probes load
            _wait_for_line(agent, "driftwarden: tracing")
            c.exec(["/bin/sh", "-c", "echo x > /data/while-docker-is-down"])
            time.sleep(2.5)  # past the 1 s wait for metadata
        finally:
            agent.send_signal(2)
            out, err = agent.communicate(timeout=30)
    assert agent.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    hit = [e for e in events if e["write"]["path"] == "/data/while-docker-is-down"]
    assert len(hit) == 1
    container = hit[0]["container"]
    assert container["id"] == c.id and container["runtime"] == "docker"
    assert container["name"] is None and container["attribution"] == "container"
    assert "docker unreachable" in container["metadata_error"]
