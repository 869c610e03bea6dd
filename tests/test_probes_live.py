"""Real probes on the real kernel, real containers: exact events, exact fields.

One probe load serves the session (`live_trace`); tests that need another configuration
(host included, a tiny ring buffer) load their own.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
import uuid

import pytest

from tests.support.containers import run_container
from tests.support.host import in_root_cgroup
from tests.support.probe_source import source_tracepoints

pytestmark = pytest.mark.integration

S_IFMT = 0o170000


def _writes(records, op=None, path=None):
    out = [r for r in records if r.kind == "write" and not r.runtime_setup]
    if op is not None:
        out = [r for r in out if r.event.op.name.lower() == op]
    if path is not None:
        out = [r for r in out if r.path == path]
    return out


def _one(items, what):
    assert len(items) == 1, f"expected exactly one {what}, got {len(items)}: {items}"
    return items[0]


def _execs(records, argv0=None):
    out = [r for r in records if r.kind == "exec" and not r.runtime_setup]
    if argv0 is not None:
        out = [r for r in out if r.event.argv and r.event.argv[0] == argv0]
    return out


def _sh(container, script: str) -> str:
    _, output = container.exec(["/bin/sh", "-c", script])
    return output


def _assert_attributed(record, container, image):
    view = record.container
    assert view.state == "container"
    assert view.id == container.id
    assert view.name == container.name
    assert view.image == image
    assert view.image_id and view.image_id.startswith("sha256:")


BUSYBOX_SCRIPT = (
    "mkdir -p /data/sub && cd /data/sub && echo hi > rel.txt && echo x >> /data/app.log && "
    "mv rel.txt moved && chmod 4755 moved && ln -s moved sl && ln moved hl && rm hl && "
    "mkfifo ff && mkdir d2 && rmdir d2; rmdir /data/nope; /nonexistent-binary; "
    "nc -w1 127.0.0.1 1 </dev/null; "
    "(nc -l -p 8080 >/dev/null &) ; sleep 0.3; echo hi | nc -w1 127.0.0.1 8080; "
    "dwstorm udp 1 127.0.0.1:5353; dwstorm unix 1 /tmp/app.sock; dwstorm unix 1 @dw-abstract; true"
)


def test_busybox_container_every_kind(live_trace, storm_image):
    """Busybox (plus the static dwstorm for udp and unix sockets)."""
    bb_image = storm_image
    with run_container(bb_image, ["sleep", "3600"], name="bbkinds") as c:
        _sh(c, BUSYBOX_SCRIPT)
        records = live_trace.wait_for(
            lambda rs: any(r.kind == "connect" and r.event.address == "@dw-abstract" for r in rs),
            c.cgroup_id,
        )
        records = live_trace.settle(c.cgroup_id)

    mkdir = _one(_writes(records, "mkdir", "/data/sub"), "mkdir /data/sub")
    assert mkdir.event.retval == 0 and mkdir.event.mode == 0o777
    _assert_attributed(mkdir, c, bb_image)

    created = _one(_writes(records, "open", "/data/sub/rel.txt"), "open rel.txt")
    assert created.event.path == "rel.txt" and created.path_resolved
    assert created.event.open_flags & 0o3 == os.O_WRONLY
    assert created.event.open_flags & (os.O_CREAT | os.O_TRUNC) == os.O_CREAT | os.O_TRUNC
    assert created.event.header.comm == "sh"
    assert not created.event.result_known  # opens are reported at entry by default

    appended = _one(_writes(records, "open", "/data/app.log"), "open app.log")
    assert appended.event.open_flags & os.O_APPEND

    rename = _one(_writes(records, "rename", "/data/sub/rel.txt"), "rename")
    assert rename.path2 == "/data/sub/moved" and rename.path2_resolved
    assert rename.event.header.comm == "mv" and rename.event.retval == 0

    chmod = _one(_writes(records, "chmod", "/data/sub/moved"), "chmod")
    assert chmod.event.mode == 0o4755  # setuid kept

    symlink = _one(_writes(records, "symlink"), "symlink")
    assert (symlink.path, symlink.path2) == ("moved", "/data/sub/sl")

    link = _one(_writes(records, "link"), "link")
    assert (link.path, link.path2) == ("/data/sub/moved", "/data/sub/hl")

    _one(_writes(records, "unlink", "/data/sub/hl"), "unlink hl")
    fifo = _one(_writes(records, "mknod", "/data/sub/ff"), "mkfifo")
    assert stat.S_ISFIFO(fifo.event.mode)
    _one(_writes(records, "rmdir", "/data/sub/d2"), "rmdir d2")
    missing = _one(_writes(records, "rmdir", "/data/nope"), "rmdir /data/nope")
    assert missing.event.retval == -2

    failed = _one([r for r in _execs(records) if r.event.filename == "/nonexistent-binary"],
                  "failed exec")
    assert failed.event.retval == -2 and failed.exe is None

    nc_refused = _one(_execs(records, "nc") and [
        r for r in _execs(records, "nc") if r.event.argv == ("nc", "-w1", "127.0.0.1", "1")
    ], "exec nc refused")
    assert nc_refused.event.filename == "/proc/self/exe" and nc_refused.event.retval == 0

    connects = [r for r in records if r.kind == "connect"]
    refused = _one([r for r in connects if r.event.port == 1], "connect :1")
    assert refused.event.result.value == "refused"
    assert refused.event.address == "127.0.0.1" and refused.event.family.value == "inet"
    assert refused.event.sock_type.value == "tcp"
    assert refused.event.header.tgid == nc_refused.event.header.tgid
    ok = _one([r for r in connects if r.event.port == 8080], "connect :8080")
    assert ok.event.result.value == "success"
    udp = _one([r for r in connects if r.event.port == 5353], "udp connect")
    assert udp.event.sock_type.value == "udp" and udp.event.result.value == "success"
    unix_path = _one([r for r in connects if r.event.address == "/tmp/app.sock"], "unix path")
    assert unix_path.event.family.value == "unix" and unix_path.event.sock_type.value == "tcp"
    assert unix_path.event.retval == -2  # ENOENT: nobody listens there
    abstract = _one([r for r in connects if r.event.address == "@dw-abstract"], "abstract")
    assert abstract.event.result.value == "refused"


def test_inet6_connect(live_trace, bb_image):
    """Containers here have IPv6 off, so this one shares the host's loopback (::1 only)."""
    with run_container(bb_image, ["sleep", "3600"], name="v6", network="host") as c:
        _sh(c, "nc -w1 ::1 1 </dev/null; true")
        records = live_trace.wait_for(
            lambda rs: any(r.kind == "connect" for r in rs), c.cgroup_id)
    connect = _one([r for r in records if r.kind == "connect"], "inet6 connect")
    assert connect.event.family.value == "inet6" and connect.event.address == "::1"
    assert connect.event.port == 1 and connect.event.result.value == "refused"


HOST_SCRIPT = (
    "cd /data && /bin/touch t1 && /bin/mkdir d1 && /bin/cp t1 d1/t2 && /bin/mv d1/t2 d1/t3 && "
    "/bin/chmod +x d1/t3 && /bin/ln -s t1 s1 && /bin/rm s1 && /bin/mkfifo p1 && "
    "cd /bin && ./true && /bin/bash -c 'exec 3<>/dev/tcp/127.0.0.1/9'; true"
)


def test_real_binaries_container(live_trace, host_image):
    """dash + coreutils exec /bin/x directly and use the *at() syscalls."""
    with run_container(host_image, ["/bin/sleep", "3600"], name="hostbins") as c:
        _sh(c, HOST_SCRIPT)
        live_trace.wait_for(
            lambda rs: any(r.kind == "connect" and r.event.port == 9 for r in rs), c.cgroup_id
        )
        records = live_trace.settle(c.cgroup_id)

    touch = _one(_execs(records, "/bin/touch"), "exec touch")
    assert touch.event.filename == "/bin/touch" and touch.path == "/bin/touch"
    assert touch.event.argv == ("/bin/touch", "t1")
    _assert_attributed(touch, c, host_image)

    relative_exec = _one([r for r in _execs(records) if r.event.filename == "./true"], "./true")
    assert relative_exec.path == "/bin/true" and relative_exec.path_resolved

    t1 = _writes(records, "open", "/data/t1")
    assert t1 and t1[0].event.open_flags & os.O_CREAT and t1[0].event.header.comm == "touch"
    _one(_writes(records, "mkdir", "/data/d1"), "mkdir d1")
    copy = _one(_writes(records, "open", "/data/d1/t2"), "cp target")
    assert copy.event.path == "d1/t2" and copy.event.header.comm == "cp"
    rename = _one(_writes(records, "rename", "/data/d1/t2"), "mv")
    assert rename.path2 == "/data/d1/t3"
    chmod = _one(_writes(records, "chmod", "/data/d1/t3"), "chmod +x")
    assert chmod.event.mode & 0o111 == 0o111
    symlink = _one(_writes(records, "symlink"), "ln -s")
    assert (symlink.path, symlink.path2) == ("t1", "/data/s1")
    _one(_writes(records, "unlink", "/data/s1"), "rm s1")
    fifo = _one(_writes(records, "mknod", "/data/p1"), "mkfifo")
    assert fifo.event.mode & S_IFMT == stat.S_IFIFO

    connect = _one([r for r in records if r.kind == "connect" and r.event.port == 9], "bash tcp")
    assert connect.event.header.comm == "bash"
    assert connect.event.result.value == "refused" and connect.event.sock_type.value == "tcp"


def test_host_processes_not_reported(live_trace, bb_image):
    marker = f"/tmp/dw-host-{uuid.uuid4().hex}"
    subprocess.run(in_root_cgroup(["touch", marker]), check=True)
    os.unlink(marker)
    with run_container(bb_image, ["sleep", "3600"], name="hostcheck") as c:
        _sh(c, "echo x > /tmp/container-marker")
        live_trace.wait_for(lambda rs: _writes(rs, "open", "/tmp/container-marker"), c.cgroup_id)
    all_records = live_trace.snapshot()
    assert not [r for r in all_records if r.path == marker]
    host_ids = set(live_trace.probes.host_cgroup_ids)
    assert not [r for r in all_records if r.event.header.cgroup_id in host_ids]


def test_include_host_reports_host_but_never_the_agent(kernel_ok, docker_ok):
    from driftwarden.probes.loader import ProbeConfig

    from tests.conftest import start_live_trace

    with start_live_trace(ProbeConfig(include_host=True, kinds=frozenset({"write"})),
                          include_host=True) as live:
        own = f"/tmp/dw-self-{uuid.uuid4().hex}"
        child = f"/tmp/dw-child-{uuid.uuid4().hex}"
        with open(own, "w") as fh:  # the agent's own process: skipped in the kernel
            fh.write("x")
        # another host process (in the root cgroup, also on a systemd host): reported
        subprocess.run(in_root_cgroup(["touch", child]), check=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if [r for r in live.snapshot() if r.path == child]:
                break
            time.sleep(0.05)
        records = live.snapshot()
    os.unlink(own)
    os.unlink(child)
    hit = [r for r in records if r.path == child]
    assert hit and hit[0].container.state == "host" and hit[0].event.header.comm == "touch"
    assert not [r for r in records if r.event.header.tgid == os.getpid()]
    assert not [r for r in records if r.path == own]


def test_identical_opens_emitted_plus_suppressed_add_up(live_trace, bb_image):
    script = (
        "i=0; while [ $i -lt 1000 ]; do echo x >> /data/dedup; i=$((i+1)); done; "
        "sleep 1.5; echo x >> /data/dedup"  # one more after the interval carries the rest
    )
    with run_container(bb_image, ["sleep", "3600"], name="dedup") as c:
        before = live_trace.probes.counters()["file"]["suppressed"]
        _sh(c, script)
        records = live_trace.wait_for(
            lambda rs: sum(1 + r.event.header.suppressed
                           for r in _writes(rs, "open", "/data/dedup")) >= 1001,
            c.cgroup_id,
        )
        after = live_trace.probes.counters()["file"]["suppressed"]
    emitted = _writes(records, "open", "/data/dedup")
    carried = sum(r.event.header.suppressed for r in emitted)
    assert len(emitted) + carried == 1001
    assert len(emitted) >= 2 and carried >= 990
    assert after - before >= carried


def test_open_result_mode_reports_the_outcome(kernel_ok, bb_image):
    from driftwarden.probes.loader import ProbeConfig

    from tests.conftest import start_live_trace

    config = ProbeConfig(open_result=True, kinds=frozenset({"write"}))
    with start_live_trace(config) as live, run_container(bb_image, ["sleep", "3600"]) as c:
        _sh(c, "echo a > /data/ok.txt; echo b > /nope/missing.txt; true")
        records = live.wait_for(lambda rs: _writes(rs, "open", "/nope/missing.txt"), c.cgroup_id)
        records = live.settle(c.cgroup_id)
    ok = _one(_writes(records, "open", "/data/ok.txt"), "open ok.txt")
    assert ok.event.result_known and ok.event.retval >= 0
    missing = _one(_writes(records, "open", "/nope/missing.txt"), "open missing")
    assert missing.event.retval == -2  # ENOENT


def test_tiny_ring_buffer_counts_drops(kernel_ok, bb_image):
    from driftwarden.probes.decode import Decoder
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    config = ProbeConfig(ringbuf_pages=1, dedup_interval_ns=0, kinds=frozenset({"write"}))
    with ProbeSet(config) as probes, run_container(bb_image, ["sleep", "3600"]) as c:
        probes.drain()
        base = probes.counters()["file"]
        _sh(c, "i=0; while [ $i -lt 2000 ]; do echo x > /tmp/f$i; i=$((i+1)); done")
        time.sleep(0.2)  # nobody drains meanwhile: the 4 KiB ring fills and overflows
        raws = []
        while True:
            batch = probes.drain()
            if not batch:
                break
            raws.extend(batch)
        counts = probes.counters()["file"]
        decoder = Decoder(config.limits)
        events = decoder.decode_many(raws)
    emitted = counts["emitted"] - base["emitted"]
    dropped = counts["dropped"] - base["dropped"]
    storm = [e for e in events if getattr(e, "path", None) and e.path.startswith("/tmp/f")]
    assert dropped > 0
    assert not decoder.errors
    file_events = [e for e in events if e.header.kind.name == "FILE"]
    assert len(file_events) == emitted  # every record the kernel sent arrived
    assert len(storm) + dropped >= 2000
    assert counts["suppressed"] == base["suppressed"]


BOOKKEEPING = {"sched:sched_process_fork", "sched:sched_process_exit",
               "syscalls:sys_enter_clone", "syscalls:sys_exit_clone",
               "syscalls:sys_enter_clone3", "syscalls:sys_exit_clone3",
               "syscalls:sys_enter_chdir", "syscalls:sys_exit_chdir",
               "syscalls:sys_enter_fchdir", "syscalls:sys_exit_fchdir"}
OPEN_EXITS = {"syscalls:sys_exit_open", "syscalls:sys_exit_openat", "syscalls:sys_exit_openat2",
              "syscalls:sys_exit_creat"}


def _on_this_kernel(tracepoints) -> set[str]:
    """Those of `tracepoints` that this host's tracefs lists."""
    from driftwarden.probes.loader import find_tracefs

    tracefs = find_tracefs()
    return {tp for tp in tracepoints if (tracefs / "events" / tp.replace(":", "/")).is_dir()}


def _tracefs_like_this_kernel(root, *, lacking: set[str]):
    """A tracefs tree listing this kernel's tracepoints of the probes less both sides of each
    syscall in `lacking`: the probes load as on a kernel without those syscalls."""

    gone = {f"syscalls:sys_{side}_{name}" for name in lacking for side in ("enter", "exit")}
    for tp in _on_this_kernel(source_tracepoints()) - gone:
        (root / "events" / tp.replace(":", "/")).mkdir(parents=True)
    return root


def test_every_kind_attaches_what_this_kernel_has_of_the_source_but_open_exits(live_trace):
    """All kinds: the source's tracepoints that this kernel's tracefs lists, less the open
    exits (opens are reported at entry unless --open-result), as bcc reports them; the source's
    others are reported absent, not attached."""

    source = set(source_tracepoints())
    probes = live_trace.probes
    attached = probes.attached_tracepoints()
    assert len(attached) == len(set(attached)) == probes.open_tracepoints()
    assert set(attached) == _on_this_kernel(source) - OPEN_EXITS
    assert set(probes.absent_tracepoints()) == source - _on_this_kernel(source) - OPEN_EXITS
    assert probes.plan.describe().startswith(f"{len(attached)} tracepoints (bookkeeping 10, ")


def test_kinds_exec_attaches_only_exec_and_bookkeeping(kernel_ok):
    """`--kinds exec`: the other kinds are not compiled in, so none of their tracepoints is
    attached (the README's promise); bookkeeping stays for process identity and relative paths.
    All fourteen are required tracepoints: every kernel the probes load on has them."""
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    config = ProbeConfig(kinds=frozenset({"exec"}))
    with ProbeSet(config) as probes:
        attached = probes.attached_tracepoints()
        assert probes.open_tracepoints() == 14
        assert set(attached) == set(probes.plan.tracepoint_names())
        assert probes.absent_tracepoints() == ()
    assert sorted(attached) == sorted(BOOKKEEPING | {
        "syscalls:sys_enter_execve", "syscalls:sys_exit_execve",
        "syscalls:sys_enter_execveat", "syscalls:sys_exit_execveat"})


def test_the_process_holding_the_probes_never_loads_bcc_or_llvm(kernel_ok):
    """bcc compiles in a child that hands over fds (issue 12, RSS): the process that started
    the probes reads them with libbpf alone; no bcc module, no libLLVM/libclang/libbcc mapped."""
    script = (
        "import json, sys\n"
        "from driftwarden.probes.loader import ProbeConfig, ProbeSet\n"
        "with ProbeSet(ProbeConfig(known_entries=64)) as probes:\n"
        "    maps = open('/proc/self/maps').read()\n"
        "    print(json.dumps({'bcc': sorted(m for m in sys.modules if m.split('.')[0] == 'bcc'),\n"
        "        'libs': sorted({lib for lib in ('libLLVM', 'libclang', 'libbcc', 'libbpf.so')\n"
        "                        if lib in maps}),\n"
        "        'attached': len(probes.attached_tracepoints()),\n"
        "        'open': probes.open_tracepoints()}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=300)
    report = json.loads(out.stdout)
    assert report["bcc"] == []
    assert report["libs"] == ["libbpf.so"]
    assert report["open"] == report["attached"] > 14


def test_stopping_detaches_every_program(kernel_ok):
    """After stop() the programs run no more: the counters, read through a copy of the map's
    fd, stay where they were whatever runs on the host; while started, a host exec counts."""
    import ctypes

    from driftwarden.probes._layout import COUNTER_MAX, MAP_LAYOUTS, Counter, EventKind
    from driftwarden.probes._libbpf import BpfMap, Libbpf
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    def execs_emitted(counters: BpfMap) -> int:
        index = EventKind.EXEC * COUNTER_MAX + Counter.EMITTED
        return sum(v.value for v in counters.lookup(ctypes.c_uint32(index)))

    probes = ProbeSet(ProbeConfig(kinds=frozenset({"exec"}), include_host=True)).start()
    counters = BpfMap(Libbpf(), os.dup(probes._maps["counters"].fd), "counters",
                      MAP_LAYOUTS["counters"])
    try:
        before = execs_emitted(counters)
        subprocess.run(["/bin/true"], check=True)
        assert execs_emitted(counters) >= before + 1
        assert probes.open_tracepoints() == 14
        probes.stop()
        stopped = execs_emitted(counters)
        for _ in range(5):
            subprocess.run(["/bin/true"], check=True)
        time.sleep(0.2)
        assert execs_emitted(counters) == stopped
    finally:
        probes.stop()
        counters.close()


def test_a_syscall_the_kernel_lacks_is_compiled_out_and_not_attached(kernel_ok, tmp_path):
    """As on Debian 12's 6.1: no fchmodat2 in tracefs -> DW_HAVE_FCHMODAT2=0, its two
    tracepoints neither compiled nor attached, every other one attached."""
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    fchmodat2 = {"syscalls:sys_enter_fchmodat2", "syscalls:sys_exit_fchmodat2"}
    tracefs = _tracefs_like_this_kernel(tmp_path / "tracing", lacking={"fchmodat2"})
    with ProbeSet(ProbeConfig(), tracefs=str(tracefs)) as probes:
        attached = set(probes.attached_tracepoints())
        assert "-DDW_HAVE_FCHMODAT2=0" in probes.plan.cflags()
        assert fchmodat2 <= set(probes.absent_tracepoints())
    assert not attached & fchmodat2
    assert attached == _on_this_kernel(source_tracepoints()) - OPEN_EXITS - fchmodat2


def test_only_required_syscalls_still_load_and_pass_the_verifier(kernel_ok, tmp_path):
    """Every optional syscall switched off, --open-result on: the smallest program the source
    compiles to (every DW_HAVE_* 0) passes the verifier and attaches exactly the required ones."""
    from driftwarden.probes.loader import OPTIONAL_SYSCALLS, ProbeConfig, ProbeSet

    tracefs = _tracefs_like_this_kernel(tmp_path / "tracing", lacking=set(OPTIONAL_SYSCALLS))
    with ProbeSet(ProbeConfig(open_result=True), tracefs=str(tracefs)) as probes:
        attached = set(probes.attached_tracepoints())
        absent = set(probes.absent_tracepoints())
    optional = {tp for tp in source_tracepoints()
                if tp.partition(":")[2].split("_", 2)[-1] in OPTIONAL_SYSCALLS}
    assert len(optional) == 2 * len(OPTIONAL_SYSCALLS)
    assert absent == optional
    assert attached == _on_this_kernel(source_tracepoints()) - optional


@pytest.mark.parametrize("settings", [
    {"ringbuf_pages": 1, "dedup_interval_ns": 0, "kinds": frozenset({"write"})},
    {"kinds": frozenset({"exec"}), "include_host": True},
    {"limits": (256, 16, 128, 2048)},
    {"limits": (4096, 32, 1024, 8192)},
    {"open_result": True, "dedup_interval_ns": 0},
    {"kinds": frozenset({"connect"})},
], ids=["tiny-ring-no-dedup", "exec-only-host", "small-limits", "large-limits", "open-result",
        "connect-only"])
def test_every_configuration_passes_the_verifier(kernel_ok, settings):
    """Settings are -D defines; each combination is its own program for the verifier."""
    from driftwarden.probes._layout import Limits
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    settings = dict(settings)
    if "limits" in settings:
        path_max, max_args, max_arg_len, args_size = settings["limits"]
        settings["limits"] = Limits(path_max=path_max, max_args=max_args,
                                    max_arg_len=max_arg_len, args_size=args_size)
    config = ProbeConfig(**settings)
    with ProbeSet(config) as probes:
        assert probes.counters()["exec"]["dropped"] == 0
        assert sorted(probes.attached_tracepoints()) == sorted(probes.plan.tracepoint_names())


def test_rare_file_syscalls_and_dirfd_relative_paths(live_trace, storm_image):
    """creat, openat2, truncate, fchmod and the *at() family relative to a directory fd.
    The process lingers so its directory fd can be read from /proc (see README limits)."""
    with run_container(storm_image, ["sleep", "3600"], name="fileops") as c:
        _sh(c, "mkdir -p /data/fo && dwstorm fileops 1 /data/fo --linger 1")
        live_trace.wait_for(lambda rs: _writes(rs, "unlink", "/data/fo/hardlink.txt"),
                            c.cgroup_id)
        records = live_trace.settle(c.cgroup_id)
    creat = _one(_writes(records, "open", "/data/fo/creat.txt"), "creat")
    assert creat.event.open_flags & (os.O_CREAT | os.O_TRUNC) == os.O_CREAT | os.O_TRUNC
    assert creat.event.mode == 0o640
    fchmod = _one([r for r in _writes(records, "chmod") if r.event.path is None], "fchmod")
    # an fd's path is read from /proc when the event is processed, so it is the file's name
    # by then: almost always the new one (dwstorm renames it a millisecond after the fchmod)
    assert fchmod.path in {"/data/fo/renamed.txt", "/data/fo/creat.txt"}
    assert fchmod.path_resolved and fchmod.event.mode == 0o750
    _one(_writes(records, "truncate", "/data/fo/creat.txt"), "truncate(2)")
    openat2 = _one(_writes(records, "open", "/data/fo/openat2.txt"), "openat2")
    assert openat2.event.mode == 0o600
    rename = _one(_writes(records, "rename", "/data/fo/creat.txt"), "renameat")
    assert rename.event.path == "creat.txt" and rename.event.dirfd >= 0
    assert rename.path2 == "/data/fo/renamed.txt" and rename.path2_resolved
    link = _one(_writes(records, "link", "/data/fo/renamed.txt"), "linkat")
    assert link.path2 == "/data/fo/hardlink.txt"
    symlink = _one(_writes(records, "symlink"), "symlinkat")
    assert (symlink.path, symlink.path2) == ("renamed.txt", "/data/fo/symlink.txt")
    setuid = _one([r for r in _writes(records, "chmod") if r.event.path == "renamed.txt"],
                  "fchmodat")
    assert setuid.path == "/data/fo/renamed.txt"
    assert setuid.event.mode == 0o4755
    _one(_writes(records, "mkdir", "/data/fo/subdir"), "mkdirat")
    _one(_writes(records, "rmdir", "/data/fo/subdir"), "unlinkat AT_REMOVEDIR")
    fifo = _one(_writes(records, "mknod", "/data/fo/fifo"), "mknodat")
    assert stat.S_ISFIFO(fifo.event.mode)
    _one(_writes(records, "unlink", "/data/fo/hardlink.txt"), "unlinkat")


def test_dirfd_relative_paths_of_a_closed_fd_are_marked_unresolved(live_trace, storm_image):
    """Without kernel struct reads, a directory fd closed before the event is processed cannot
    be resolved: the event keeps the path as given and its dirfd, marked unresolved."""
    with run_container(storm_image, ["sleep", "3600"], name="closedfd") as c:
        _sh(c, "mkdir -p /data/fo && dwstorm fileops 1 /data/fo")  # closes its fds at once
        live_trace.wait_for(lambda rs: [r for r in _writes(rs, "unlink")
                                        if r.event.path == "hardlink.txt"], c.cgroup_id)
        records = live_trace.settle(c.cgroup_id)
    rename = _one(_writes(records, "rename"), "renameat")
    assert rename.event.dirfd >= 0
    # Which one depends on whether the agent read /proc/PID/fd before the program closed the
    # fd (usually not); what must never happen is a wrong path.
    assert (rename.path, rename.path_resolved) in {("creat.txt", False),
                                                   ("/data/fo/creat.txt", True)}
    assert (rename.path2, rename.path2_resolved) in {("renamed.txt", False),
                                                     ("/data/fo/renamed.txt", True)}
    absolute = _one(_writes(records, "truncate"), "truncate(2) of an absolute path")
    assert (absolute.path, absolute.path_resolved) == ("/data/fo/creat.txt", True)


def test_an_exec_wakes_the_reader_at_once(kernel_ok, bb_image):
    """Execs are submitted with a wake-up (ProbeConfig.wake_kinds), so a reader waiting on the
    ring buffer returns with the exec instead of sleeping out its timeout. The 60 s wait and
    the 30 s bound only tell "woken" from "timed out"; they measure nothing."""
    from driftwarden.probes.decode import Decoder
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    config = ProbeConfig(kinds=frozenset({"exec"}))
    with ProbeSet(config) as probes, run_container(bb_image, ["sleep", "3600"]) as c:
        probes.drain()
        waited = []

        def wait_for_exec() -> None:
            started = time.monotonic()
            probes.wait(60.0)
            waited.append(time.monotonic() - started)

        waiter = threading.Thread(target=wait_for_exec)
        waiter.start()
        time.sleep(0.2)  # the waiter is in epoll by now
        c.exec(["/bin/true"])
        waiter.join(90)
        raws = probes.drain()
    assert waited and waited[0] < 30, waited
    execs = [e for e in Decoder(config.limits).decode_many(raws)
             if e.header.kind.name == "EXEC" and e.header.cgroup_id == c.cgroup_id]
    assert [e.filename for e in execs] == ["/bin/true"]


def test_fork_and_exit_events_key_every_process_by_its_start(kernel_ok, storm_image):
    """A shell in a container forks dwstorm twice: `dwstorm connect 1` starts a thread (its
    own listener: pthread_create, clone3 with CLONE_THREAD), `dwstorm exec 3` forks three
    children that exec /bin/true. Every process's events carry (tgid, start_ns) and its
    parent's, exactly as the fork named them; a thread is neither a fork nor an exit; each
    process exits once; start_ns is the kernel's own start time (/proc starttime, in ticks)."""
    from driftwarden.probes.decode import Decoder
    from driftwarden.probes.events import ExecEvent, ExitEvent, ForkEvent
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    config = ProbeConfig(kinds=frozenset({"exec"}), dedup_interval_ns=0)
    with ProbeSet(config) as probes, run_container(storm_image, ["sleep", "3600"]) as c:
        init_pid = c.pid
        with open(f"/proc/{init_pid}/stat", "rb") as fh:
            init_ticks = int(fh.read().rsplit(b")", 1)[1].split()[19])
        code, output = c.exec(["/bin/sh", "-c", "dwstorm connect 1 && dwstorm exec 3; echo ok"])
        assert (code, output.split()[-1]) == (0, "ok"), output
        time.sleep(0.3)
        raws = []
        while batch := probes.drain():
            raws.extend(batch)
        counters = probes.counters()
    decoder = Decoder(config.limits)
    events = [e for e in decoder.decode_many(raws) if e.header.cgroup_id == c.cgroup_id]
    assert not decoder.errors
    forks = [e for e in events if isinstance(e, ForkEvent)]
    exits = [e for e in events if isinstance(e, ExitEvent)]
    execs = [e for e in events if isinstance(e, ExecEvent) and e.ok]

    def key(h):
        return (h.tgid, h.start_ns)

    def parent(h):
        return (h.ppid, h.parent_start_ns)

    # the container's init: its start is the kernel's, a tick at most after /proc's starttime
    [init] = [e for e in execs if e.header.tgid == init_pid]
    assert init.header.start_ns > 0
    assert 0 <= init.header.start_ns * 100 // 1_000_000_000 - init_ticks <= 1
    now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    assert 0 < now - init.header.start_ns < 120 * 1_000_000_000

    [sh] = [e for e in execs if e.argv[:2] == ("/bin/sh", "-c")]
    children = {(f.child_tgid, f.child_start_ns): f for f in forks
                if key(f.header) == key(sh.header)}
    assert len(children) == 2
    by_key = {}
    for e in execs:
        if key(e.header) in children:
            by_key.setdefault(e.argv[1], []).append(e)
    [connect], [exec3] = by_key["connect"], by_key["exec"]
    for e in (connect, exec3):
        assert parent(e.header) == key(sh.header)
        assert e.header.pid == e.header.tgid and e.filename.endswith("dwstorm")
    # dwstorm exec's three children: forked, exec'd /bin/true, exited; keys all agree
    grandchildren = [f for f in forks if key(f.header) == key(exec3.header)]
    assert len(grandchildren) == 3
    trues = [e for e in execs if parent(e.header) == key(exec3.header)]
    assert sorted(key(e.header) for e in trues) == sorted(
        (f.child_tgid, f.child_start_ns) for f in grandchildren)
    assert {e.filename for e in trues} == {"/bin/true"}
    assert all(f.child_start_ns > sh.header.start_ns for f in grandchildren)
    # the threaded one forked nothing: its thread is no process
    assert [f for f in forks if f.header.tgid == connect.header.tgid] == []
    # one exit per process, each with its key (a thread's end would be a second one of its
    # process); every process here started after the probes attached, so has a start
    exit_keys = [key(e.header) for e in exits]
    for process in (connect, exec3, sh, *trues):
        assert exit_keys.count(key(process.header)) == 1, process
    assert all(e.header.pid == e.header.tgid and e.header.start_ns for e in exits)
    # fork and exit records are never suppressed, and counted like the other kinds
    assert counters["fork"]["suppressed"] == counters["exit"]["suppressed"] == 0
    assert counters["fork"]["emitted"] >= len(forks) and counters["exit"]["emitted"] >= len(exits)


JOB_LOOP = (
    "printf '#!/bin/sh\\n/bin/sha256sum /proc/$$/status > /dev/null\\n' > /tmp/job.sh && "
    "chmod +x /tmp/job.sh && i=0; "
    "while [ $i -lt 8 ]; do /tmp/job.sh; i=$((i + 1)); sleep 0.5; done"
)


def test_a_script_run_twice_a_second_is_its_childrens_parent_every_time(live_trace, bb_image):
    """Issue 9: a loop runs /tmp/job.sh twice a second, so the kernel's dedup (1 s) suppresses
    every other exec of it and sends only its compact repeat record. Each run's child
    (sha256sum by its path: busybox sh would run the applet in-process; its argv unique per
    run) still has the script as its lineage parent, never the loop; the suppressed runs are
    not exec records."""
    with run_container(bb_image, ["sleep", "3600"], name="jobloop") as c:
        before = dict(live_trace.pipeline.exec_repeats.stats)
        _sh(c, JOB_LOOP)
        records = live_trace.wait_for(lambda rs: len(_execs(rs, "/bin/sha256sum")) >= 8,
                                      c.cgroup_id)
        after = dict(live_trace.pipeline.exec_repeats.stats)
    children = _execs(records, "/bin/sha256sum")
    jobs = [r for r in _execs(records) if r.event.filename == "/tmp/job.sh"]
    assert len(children) == 8
    assert {(r.parent_program.exe, r.parent_program.argv0) for r in children} == {
        ("/tmp/job.sh", "/tmp/job.sh")}
    # the runs the kernel deduplicated reached the table as repeats, not as exec records
    assert 2 <= len(jobs) <= 6 and all(r.event.ok for r in jobs)
    assert after["repeated"] - before["repeated"] >= 8 - len(jobs)
    assert after["unknown"] == before["unknown"]


THREAD_EXEC_C = r"""
#include <pthread.h>
#include <unistd.h>
static void *run(void *arg) {
    (void)arg;
    char *argv[] = {"sh", "-c", "sleep 0.3; echo after > /tmp/after-exec", 0};
    execv("/bin/sh", argv);
    return 0;
}
int main(void) {
    pthread_t t;
    if (pthread_create(&t, 0, run, 0) != 0) return 1;
    for (;;) pause();  /* the exec ends this thread, the leader */
}
"""


def test_an_exec_by_a_thread_keeps_the_process(kernel_ok, gcc_ok, bb_image, tmp_path):
    """A thread that is not the leader execs (Go's syscall.Exec does, from any thread): the
    kernel ends the leader and gives the thread its pid. The exec is reported with the
    process's key, the leader's end is not the process's exit, and the program's later events
    keep that key until its one exit."""
    from driftwarden.probes.decode import Decoder
    from driftwarden.probes.events import ExecEvent, ExitEvent, FileEvent, ForkEvent
    from driftwarden.probes.loader import ProbeConfig, ProbeSet

    source, binary = tmp_path / "thread_exec.c", tmp_path / "thread-exec"
    source.write_text(THREAD_EXEC_C)
    subprocess.run(["gcc", "-O2", "-static", "-pthread", "-o", str(binary), str(source)],
                   check=True, capture_output=True, timeout=120)
    config = ProbeConfig(kinds=frozenset({"exec", "write"}), dedup_interval_ns=0)
    with ProbeSet(config) as probes, run_container(bb_image, ["sleep", "3600"]) as c:
        c.put_file("/bin/thread-exec", binary.read_bytes())
        code, output = c.exec(["/bin/sh", "-c", "/bin/thread-exec; cat /tmp/after-exec"])
        assert (code, output.strip()) == (0, "after"), output
        time.sleep(0.3)
        raws = []
        while batch := probes.drain():
            raws.extend(batch)
    events = [e for e in Decoder(config.limits).decode_many(raws)
              if e.header.cgroup_id == c.cgroup_id]
    [started] = [e for e in events if isinstance(e, ExecEvent) and e.ok
                 and e.filename == "/bin/thread-exec"]
    process = (started.header.tgid, started.header.start_ns)
    [forked] = [e for e in events if isinstance(e, ForkEvent)
                and (e.child_tgid, e.child_start_ns) == process]
    [by_thread] = [e for e in events if isinstance(e, ExecEvent) and e.filename == "/bin/sh"
                   and e.argv[:2] == ("sh", "-c") and "after-exec" in e.argv[2]]
    h = by_thread.header
    assert by_thread.ok and (h.tgid, h.start_ns) == process
    assert h.pid != h.tgid  # the thread that called execve, as it was then
    assert (h.ppid, h.parent_start_ns) == (forked.header.tgid, forked.header.start_ns)
    [write] = [e for e in events if isinstance(e, FileEvent) and e.path == "/tmp/after-exec"]
    # echo is the shell's builtin: the write is the process's own, after the leader ended
    assert (write.header.tgid, write.header.start_ns) == process
    exits = [i for i, e in enumerate(events) if isinstance(e, ExitEvent)
             and (e.header.tgid, e.header.start_ns) == process]
    assert len(exits) == 1 and exits[0] > events.index(write)
