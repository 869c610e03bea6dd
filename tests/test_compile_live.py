"""probes/_compile.py for real: a small BPF program compiled, loaded and attached by bcc in the
child, its maps and attachments handed over as fds. The programs keep running after the child
has exited (it skips bcc's cleanup), closing the attachments detaches them, and compiler and
verifier failures reach ProbeLoadError and the log with nothing left open."""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import threading

import pytest
from driftwarden.core.errors import ProbeLoadError

pytestmark = pytest.mark.integration

PROGRAM = """
BPF_RINGBUF_OUTPUT(events, 1);
BPF_ARRAY(hits, u64, 1);
TRACEPOINT_PROBE(syscalls, sys_enter_getppid)
{
    if (bpf_get_current_pid_tgid() >> 32 != DW_TEST_TGID)
        return 0;
    int zero = 0;
    u64 *count = hits.lookup(&zero);
    if (count)
        __sync_fetch_and_add(count, 1);
    u64 mark = 0xabc0de;
    events.ringbuf_output(&mark, sizeof(mark), 0);
    return 0;
}
"""


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def source(tmp_path):
    def write(text: str):
        path = tmp_path / "program.bpf.c"
        path.write_text(text)
        return path

    return write


def test_the_programs_run_on_after_the_child_and_stop_when_the_fds_close(kernel_ok, source):
    from driftwarden.probes._compile import compile_and_attach
    from driftwarden.probes._layout import MapLayout
    from driftwarden.probes._libbpf import BpfMap, Libbpf, RingBuffer

    compiled = compile_and_attach(source(PROGRAM), [f"-DDW_TEST_TGID={os.getpid()}"],
                                  ["events", "hits"])
    # the child has exited (compile_and_attach waited for it): what runs now is held by us
    assert list(compiled.attached) == ["syscalls:sys_enter_getppid"]
    assert set(compiled.maps) == {"events", "hits"}
    fd_kinds = {os.readlink(f"/proc/self/fd/{fd}") for fd in compiled.attached.values()}
    assert fd_kinds == {"anon_inode:[perf_event]"}
    libbpf = Libbpf()
    hits = BpfMap(libbpf, compiled.maps["hits"], "hits",
                  MapLayout(ctypes.c_uint32, ctypes.c_uint64))
    marks = []
    ring = RingBuffer(libbpf, compiled.maps["events"],
                      lambda _ctx, data, size: marks.append(ctypes.string_at(data, size)) or 0)
    try:
        for _ in range(5):
            os.getppid()
        assert hits.lookup(ctypes.c_uint32(0)).value == 5
        ring.consume()
        assert marks == [(0xabc0de).to_bytes(8, "little")] * 5
        for fd in compiled.attached.values():
            os.close(fd)  # detaches
        for _ in range(5):
            os.getppid()
        assert hits.lookup(ctypes.c_uint32(0)).value == 5
    finally:
        ring.free()
        hits.close()
        os.close(compiled.maps["events"])


def test_a_compiler_error_is_a_probe_load_error_with_the_output_logged(kernel_ok, source,
                                                                       caplog):
    from driftwarden.probes._compile import compile_and_attach

    path = source("int broken( {\n")
    before = _open_fds()
    with caplog.at_level(logging.ERROR), pytest.raises(ProbeLoadError) as info:
        compile_and_attach(path, [], ["events"])
    assert str(info.value) == (
        f"BPF program failed to compile or load (Failed to compile BPF module b'{path}'); run "
        "`driftwarden doctor` to see which kernel feature is missing")
    [record] = [r for r in caplog.records if r.name == "driftwarden.probes._compile"]
    assert record.getMessage().startswith("BPF compiler/verifier output:\n")
    assert "error: expected function body after function declarator" in record.getMessage()
    assert _open_fds() == before


def test_a_verifier_rejection_is_a_probe_load_error_with_the_log(kernel_ok, source, caplog):
    from driftwarden.probes._compile import compile_and_attach

    path = source("TRACEPOINT_PROBE(syscalls, sys_enter_getppid)\n"
                  "{ volatile char *p = 0; return p[args->__syscall_nr & 0]; }\n")
    before = _open_fds()
    with caplog.at_level(logging.ERROR), pytest.raises(ProbeLoadError) as info:
        compile_and_attach(path, [], [])
    assert str(info.value) == (
        "BPF program failed to compile or load (Failed to load BPF program "
        "b'tracepoint__syscalls__sys_enter_getppid': Permission denied); run `driftwarden "
        "doctor` to see which kernel feature is missing")
    [record] = [r for r in caplog.records if r.name == "driftwarden.probes._compile"]
    assert "R1 invalid mem access 'scalar'" in record.getMessage()
    assert _open_fds() == before


def test_a_map_the_program_lacks_is_named_and_nothing_stays_attached(kernel_ok, source):
    from driftwarden.probes._compile import compile_and_attach

    before = _open_fds()
    with pytest.raises(ProbeLoadError) as info:
        compile_and_attach(source(PROGRAM), [f"-DDW_TEST_TGID={os.getpid()}"],
                           ["hits", "nope"])
    assert str(info.value) == (
        "BPF program failed to compile or load (the program has no map named nope); run "
        "`driftwarden doctor` to see which kernel feature is missing")
    assert _open_fds() == before


def test_more_fds_than_one_message_carries_arrive_in_order():
    """SCM_RIGHTS takes at most 253 fds a message: 450 go in three, names and fds paired."""
    from driftwarden.probes._compile import _receive, _send

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    files = [open("/dev/null") for _ in range(450)]  # noqa: SIM115 - closed below
    maps = [(f"map{n}", files[n].fileno()) for n in range(50)]
    attached = [(f"tp:{n}", files[n].fileno()) for n in range(50, 440)]
    programs = [(f"prog{n}", files[n].fileno()) for n in range(440, 450)]
    sender = threading.Thread(target=_send, args=(
        theirs, {"maps": maps, "attached": attached, "programs": programs}))
    sender.start()
    try:
        received = _receive(ours, None, timeout=10)
        sender.join()
        assert list(received.maps) == [name for name, _ in maps]
        assert list(received.attached) == [name for name, _ in attached]
        assert list(received.programs) == [name for name, _ in programs]
        original = {name: os.fstat(fd).st_ino for name, fd in maps + attached + programs}
        assert {name: os.fstat(fd).st_ino for name, fd in
                {**received.maps, **received.attached, **received.programs}.items()} == original
        fds = [*received.maps.values(), *received.attached.values(),
               *received.programs.values()]
        assert not set(fds) & {f.fileno() for f in files}  # new fds, not the sender's
        received.close_all()
    finally:
        for f in files:
            f.close()
        ours.close()
        theirs.close()


def test_no_answer_in_time_is_a_probe_load_error():
    from driftwarden.probes._compile import _receive

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs, pytest.raises(ProbeLoadError) as info:
        _receive(ours, None, timeout=0.2)
    assert str(info.value) == ("BPF program failed to compile or load (no answer from the "
                               "compiling process in 0.2 s); is the host overloaded?")
