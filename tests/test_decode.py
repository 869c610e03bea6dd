"""Decoder: raw ring-buffer records (built here from the layout tables) -> typed events.

Records are built the way the kernel sends them: scratch buffers hold stale bytes after each
string's NUL, one-path file events end right after path[path_len], exec records end right after
args[args_size], connect records are sent whole.
"""

from __future__ import annotations

import struct

import pytest
from driftwarden.probes._layout import (
    AT_FDCWD,
    HEADER_SIZE,
    HEADER_STRUCT,
    EventKind,
    FileOp,
    Flag,
    Limits,
)
from driftwarden.probes.decode import Decoder
from driftwarden.probes.events import (
    ChdirEvent,
    ConnectEvent,
    ConnectResult,
    ExecEvent,
    ExecRepeatEvent,
    ExitEvent,
    Family,
    FileEvent,
    ForkEvent,
    Header,
    SockType,
)

LIMITS = Limits()
STALE = 0xA5  # what a reused per-CPU scratch buffer holds after the string's NUL

HEADER_DEFAULTS = {
    "ts_ns": 5_000_000_000,
    "cgroup_id": 4242,
    "flags": 0,
    "pid": 101,
    "tgid": 100,
    "ppid": 1,
    "uid": 1000,
    "gid": 1001,
    "suppressed": 0,
    "comm": "sh",
    "start_ns": 0,
    "parent_start_ns": 0,
}
KIND_OFFSET = LIMITS.offsets("dw_event_header")["kind"]


# -- record builder (shared with tests/test_pipeline_unit.py) -----------------


def header_values(kind: EventKind, **hdr) -> dict:
    unknown = set(hdr) - set(HEADER_DEFAULTS)
    assert not unknown, f"unknown header fields {unknown}"
    return {**HEADER_DEFAULTS, **hdr, "kind": int(kind)}


def expected_header(kind: EventKind, **hdr) -> Header:
    v = header_values(kind, **hdr)
    return Header(kind=kind, ts_ns=v["ts_ns"], cgroup_id=v["cgroup_id"], pid=v["pid"],
                  tgid=v["tgid"], ppid=v["ppid"], uid=v["uid"], gid=v["gid"], comm=v["comm"],
                  flags=Flag(v["flags"]), suppressed=v["suppressed"], start_ns=v["start_ns"],
                  parent_start_ns=v["parent_start_ns"])


def _pack(limits: Limits, name: str, kind: EventKind, hdr: dict, fields: dict,
          buffers: dict[str, bytes], length: int) -> bytes:
    """One struct per the layout tables, buffers filled with stale bytes, cut to `length`."""
    buf = bytearray(limits.size(name))
    offsets = limits.offsets(name)
    formats = dict(limits.structs[name])
    for field, fmt in limits.structs[name]:
        if fmt.endswith("s") and field not in ("addr",):
            size = struct.calcsize(fmt)
            buf[offsets[field] : offsets[field] + size] = bytes([STALE]) * size
    v = header_values(kind, **hdr)
    comm = v["comm"].encode() if isinstance(v["comm"], str) else v["comm"]
    HEADER_STRUCT.pack_into(buf, 0, v["ts_ns"], v["cgroup_id"], v["start_ns"],
                            v["parent_start_ns"], v["kind"], v["flags"], v["pid"], v["tgid"],
                            v["ppid"], v["uid"], v["gid"], v["suppressed"], 0, comm)
    for field, value in fields.items():
        struct.pack_into("<" + formats[field], buf, offsets[field], value)
    for field, data in buffers.items():
        buf[offsets[field] : offsets[field] + len(data)] = data
    return bytes(buf[:length])


def _c(s: bytes | str) -> bytes:
    return s.encode("utf-8", "surrogateescape") if isinstance(s, str) else s


def exec_record(filename: bytes | str, argv: list[bytes | str], *, retval: int = 0,
                dirfd: int = AT_FDCWD, limits: Limits = LIMITS, argc: int | None = None,
                args_size: int | None = None, filename_len: int | None = None,
                cut: int | None = None, dedup_key: int = 0, **hdr) -> bytes:
    fname = _c(filename) + b"\0"
    blob = b"".join(_c(a) + b"\0" for a in argv)
    args_size = len(blob) if args_size is None else args_size
    fields = {
        "retval": retval, "dirfd": dirfd,
        "argc": len(argv) if argc is None else argc,
        "args_size": args_size,
        "filename_len": len(fname) if filename_len is None else filename_len,
        "dedup_key": dedup_key,
    }
    length = limits.offsets("dw_exec_event")["args"] + min(args_size, limits.args_size)
    if cut is not None:
        length = cut
    return _pack(limits, "dw_exec_event", EventKind.EXEC, hdr, fields,
                 {"filename": fname[: limits.path_max], "args": blob[: limits.args_size]}, length)


def connect_record(*, family: int, addr: bytes = b"", port: int = 0, unix_path: bytes = b"",
                   path_len: int | None = None, sock_type: int = 1, retval: int = 0, fd: int = 3,
                   limits: Limits = LIMITS, cut: int | None = None, **hdr) -> bytes:
    fields = {"retval": retval, "fd": fd, "family": family, "port": port,
              "sock_type": sock_type,
              "path_len": len(unix_path) if path_len is None else path_len,
              "addr": addr.ljust(16, b"\0"), "unix_path": unix_path.ljust(108, b"\0")}
    size = limits.size("dw_connect_event")
    return _pack(limits, "dw_connect_event", EventKind.CONNECT, hdr, fields, {},
                 size if cut is None else cut)


def file_record(op: int, path: bytes | str | None, path2: bytes | str | None = None, *,
                retval: int = 0, dirfd: int = AT_FDCWD, dirfd2: int = AT_FDCWD,
                open_flags: int = 0, mode: int = 0, limits: Limits = LIMITS,
                path_len: int | None = None, path2_len: int | None = None,
                cut: int | None = None, **hdr) -> bytes:
    offsets = limits.offsets("dw_file_event")
    p1 = b"" if path is None else _c(path) + b"\0"
    p2 = None if path2 is None else _c(path2) + b"\0"
    if path is None:
        hdr["flags"] = hdr.get("flags", 0) | Flag.FD_ONLY
    fields = {"op": op, "path_len": len(p1) if path_len is None else path_len,
              "path2_len": (len(p2) if p2 is not None else 0) if path2_len is None else path2_len,
              "retval": retval, "dirfd": dirfd, "dirfd2": dirfd2, "open_flags": open_flags,
              "mode": mode}
    buffers = {"path": p1[: limits.path_max]}
    if p2 is not None:
        buffers["path2"] = p2[: limits.path_max]
        length = offsets["path2"] + len(buffers["path2"])
    else:
        length = offsets["path"] + len(buffers["path"])
    return _pack(limits, "dw_file_event", EventKind.FILE, hdr, fields, buffers,
                 length if cut is None else cut)


def chdir_record(path: bytes | str | None, *, fd: int = -1, retval: int = 0,
                 limits: Limits = LIMITS, path_len: int | None = None, cut: int | None = None,
                 cwd_base: int = 0, **hdr) -> bytes:
    p = b"" if path is None else _c(path) + b"\0"
    if path is None:
        hdr["flags"] = hdr.get("flags", 0) | Flag.FD_ONLY
    fields = {"retval": retval, "fd": fd, "path_len": len(p) if path_len is None else path_len,
              "cwd_base": cwd_base}
    length = limits.offsets("dw_chdir_event")["path"] + len(p)
    return _pack(limits, "dw_chdir_event", EventKind.CHDIR, hdr, fields, {"path": p},
                 length if cut is None else cut)


def fork_record(child_tgid: int, child_start_ns: int, *, limits: Limits = LIMITS,
                cut: int | None = None, **hdr) -> bytes:
    """A fork: the header is the parent's (tgid, start_ns, ...)."""
    fields = {"child_start_ns": child_start_ns, "child_tgid": child_tgid}
    size = limits.size("dw_fork_event")
    return _pack(limits, "dw_fork_event", EventKind.FORK, hdr, fields, {},
                 size if cut is None else cut)


def exec_repeat_record(dedup_key: int, *, retval: int = 0, limits: Limits = LIMITS,
                       cut: int | None = None, **hdr) -> bytes:
    """A suppressed successful exec: the exec'ing process's header and the repeated exec's key."""
    size = limits.size("dw_exec_repeat_event")
    return _pack(limits, "dw_exec_repeat_event", EventKind.EXEC_REPEAT, hdr,
                 {"dedup_key": dedup_key, "retval": retval}, {}, size if cut is None else cut)


def exit_record(*, limits: Limits = LIMITS, **hdr) -> bytes:
    return _pack(limits, "dw_exit_event", EventKind.EXIT, hdr, {}, {},
                 limits.size("dw_exit_event"))


def ipv4(text: str) -> bytes:
    return bytes(int(x) for x in text.split("."))


# -- the builder itself -------------------------------------------------------


def test_builder_follows_the_layout():
    raw = exec_record("/bin/ls", ["ls", "-l"], comm="ls")
    off = LIMITS.offsets("dw_exec_event")
    assert len(raw) == off["args"] + len(b"ls\0-l\0")
    assert raw[off["filename"] : off["filename"] + 8] == b"/bin/ls\0"
    assert raw[off["filename"] + 8] == STALE
    assert HEADER_STRUCT.unpack_from(raw)[:5] == (5_000_000_000, 4242, 0, 0, 1)
    assert struct.unpack_from("<iiHHH", raw, HEADER_SIZE) == (0, AT_FDCWD, 2, 6, 8)


# -- exec ---------------------------------------------------------------------


@pytest.fixture
def decoder() -> Decoder:
    return Decoder(LIMITS)


def test_exec_with_argv(decoder):
    raw = exec_record("/usr/bin/curl", ["curl", "-s", "http://example.com/x y"], comm="curl",
                      suppressed=3)
    event = decoder.decode(raw)
    assert event == ExecEvent(
        header=expected_header(EventKind.EXEC, comm="curl", suppressed=3),
        filename="/usr/bin/curl",
        argv=("curl", "-s", "http://example.com/x y"),
        retval=0,
        dirfd=AT_FDCWD,
        argv_truncated=False,
        filename_truncated=False,
    )
    assert event.ok
    assert dict(decoder.decoded) == {"exec": 1}
    assert dict(decoder.errors) == {}


def test_exec_empty_and_empty_string_arguments(decoder):
    assert decoder.decode(exec_record("/bin/true", [])).argv == ()
    assert decoder.decode(exec_record("/bin/sh", ["sh", "-c", ""])).argv == ("sh", "-c", "")
    assert decoder.decode(exec_record("/bin/x", ["", ""])).argv == ("", "")
    assert dict(decoder.errors) == {}


def test_exec_failed_retval(decoder):
    event = decoder.decode(exec_record("/nonexistent", ["nonexistent"], retval=-2))
    assert event.retval == -2
    assert not event.ok
    assert event.filename == "/nonexistent"


def test_exec_execveat_dirfd(decoder):
    event = decoder.decode(exec_record("run.sh", ["run.sh"], dirfd=7, flags=Flag.EXECVEAT))
    assert event.dirfd == 7
    assert event.header.flags == Flag.EXECVEAT
    assert not event.argv_truncated and not event.filename_truncated


@pytest.mark.parametrize(
    ("flags", "argv_truncated", "filename_truncated"),
    [
        (Flag.ARGS_TRUNCATED, True, False),
        (Flag.ARG_CLIPPED, True, False),
        (Flag.PATH_TRUNCATED, False, True),
        (Flag.ARGS_TRUNCATED | Flag.ARG_CLIPPED | Flag.PATH_TRUNCATED, True, True),
        (Flag.READ_FAILED, False, False),
    ],
)
def test_exec_truncation_flags(decoder, flags, argv_truncated, filename_truncated):
    event = decoder.decode(exec_record("/bin/echo", ["echo", "hi"], flags=flags))
    assert (event.argv_truncated, event.filename_truncated) == (argv_truncated, filename_truncated)
    assert event.header.flags == flags


def test_exec_filename_at_path_max(decoder):
    # bpf_probe_read_user_str keeps path_max - 1 bytes and the NUL, and returns path_max
    long_name = "/" + "d" * 1000
    raw = exec_record(long_name[: LIMITS.path_max - 1], ["x"], flags=Flag.PATH_TRUNCATED)
    event = decoder.decode(raw)
    assert event.filename == long_name[: LIMITS.path_max - 1]
    assert len(event.filename) == 511
    assert event.filename_truncated


def test_exec_clipped_argument_and_many_args(decoder):
    clipped = "a" * (LIMITS.max_arg_len - 1)
    argv = ["prog", clipped] + [f"arg{i}" for i in range(30)]
    event = decoder.decode(exec_record("/bin/prog", argv,
                                       flags=Flag.ARG_CLIPPED | Flag.ARGS_TRUNCATED))
    assert event.argv == tuple(argv)
    assert len(event.argv) == 32
    assert event.argv_truncated


def test_exec_record_is_trimmed_after_args(decoder):
    raw = exec_record("/bin/ls", ["ls", "-a"])
    assert len(raw) == LIMITS.offsets("dw_exec_event")["args"] + 6
    assert len(raw) < LIMITS.size("dw_exec_event")
    assert decoder.decode(raw).argv == ("ls", "-a")


def test_exec_non_utf8_argv(decoder):
    event = decoder.decode(exec_record(b"/bin/\xffcat", [b"cat", b"caf\xe9", "naïve"]))
    assert event.filename == "/bin/\udcffcat"
    assert event.argv == ("cat", "caf\udce9", "naïve")
    assert event.argv[1].encode("utf-8", "surrogateescape") == b"caf\xe9"


def test_exec_with_small_limits():
    small = Limits(path_max=256, max_args=16, max_arg_len=128, args_size=2048)
    decoder = Decoder(small)
    raw = exec_record("/bin/sh", ["sh", "-c", "id"], limits=small)
    assert len(raw) == small.offsets("dw_exec_event")["args"] + 9
    assert decoder.decode(raw).argv == ("sh", "-c", "id")
    # the same bytes are not a valid default-limits record (args sit elsewhere)
    default = Decoder(LIMITS)
    assert default.decode(raw) is None
    assert dict(default.errors) == {"exec:short-exec": 1}


# -- connect ------------------------------------------------------------------


def test_connect_inet(decoder):
    raw = connect_record(family=2, addr=ipv4("10.0.0.5"), port=8080, sock_type=1, retval=-111,
                         fd=4, comm="curl")
    event = decoder.decode(raw)
    assert event == ConnectEvent(
        header=expected_header(EventKind.CONNECT, comm="curl"),
        family=Family.INET, family_number=2, address="10.0.0.5", port=8080,
        sock_type=SockType.TCP, retval=-111, fd=4,
    )
    assert event.result is ConnectResult.REFUSED
    assert len(raw) == LIMITS.size("dw_connect_event")


def test_connect_inet6(decoder):
    addr = bytes.fromhex("20010db8000000000000000000000001")
    event = decoder.decode(connect_record(family=10, addr=addr, port=443, sock_type=2,
                                          retval=-115))
    assert (event.family, event.family_number, event.address, event.port) == (
        Family.INET6, 10, "2001:db8::1", 443)
    assert event.sock_type is SockType.UDP
    assert event.result is ConnectResult.IN_PROGRESS


def test_connect_inet6_loopback_ignores_port_bytes_elsewhere(decoder):
    event = decoder.decode(connect_record(family=10, addr=bytes(15) + b"\x01", port=65535))
    assert (event.address, event.port) == ("::1", 65535)


def test_connect_unix_path(decoder):
    # connect(fd, sun, sizeof(sa_family_t) + strlen + 1): the NUL is inside path_len
    event = decoder.decode(connect_record(family=1, unix_path=b"/var/run/docker.sock\0",
                                          sock_type=1))
    assert event.family is Family.UNIX
    assert event.family_number == 1
    assert event.address == "/var/run/docker.sock"
    assert event.port == 0


def test_connect_unix_path_full_sockaddr(decoder):
    # addrlen = sizeof(struct sockaddr_un): path_len 108, zero padded
    event = decoder.decode(connect_record(family=1, unix_path=b"/run/x.sock", path_len=108))
    assert event.address == "/run/x.sock"


def test_connect_unix_abstract(decoder):
    event = decoder.decode(connect_record(family=1, unix_path=b"\0dbus-session", sock_type=1))
    assert event.address == "@dbus-session"


def test_connect_unix_unnamed(decoder):
    assert decoder.decode(connect_record(family=1, path_len=0)).address == ""


@pytest.mark.parametrize(("number", "expected"), [
    (0, SockType.UNKNOWN), (1, SockType.TCP), (2, SockType.UDP), (5, SockType.OTHER),
])
def test_connect_sock_types(decoder, number, expected):
    raw = connect_record(family=2, addr=ipv4("1.2.3.4"), port=1, sock_type=number)
    assert decoder.decode(raw).sock_type is expected


@pytest.mark.parametrize(("retval", "expected"), [
    (0, ConnectResult.SUCCESS), (-115, ConnectResult.IN_PROGRESS),
    (-111, ConnectResult.REFUSED), (-101, ConnectResult.UNREACHABLE),
    (-113, ConnectResult.UNREACHABLE), (-110, ConnectResult.TIMED_OUT),
    (-1, ConnectResult.DENIED), (-13, ConnectResult.DENIED), (-9, ConnectResult.ERROR),
])
def test_connect_results(decoder, retval, expected):
    raw = connect_record(family=2, addr=ipv4("1.2.3.4"), port=80, retval=retval)
    event = decoder.decode(raw)
    assert event.retval == retval
    assert event.result is expected


def test_connect_other_family(decoder):
    event = decoder.decode(connect_record(family=16, addr=b"\x01\x02", port=0))
    assert (event.family, event.family_number, event.address) == (Family.OTHER, 16, "")


# -- file ---------------------------------------------------------------------


def _file(**overrides) -> dict:
    base = {"header": expected_header(EventKind.FILE), "op": FileOp.OPEN, "path": None,
            "path2": None, "dirfd": AT_FDCWD, "dirfd2": AT_FDCWD, "open_flags": 0, "mode": 0,
            "retval": 0, "path_truncated": False, "path2_truncated": False}
    return base | overrides


def test_file_open(decoder):
    raw = file_record(FileOp.OPEN, "/etc/passwd", open_flags=0o1101, mode=0o644, retval=3,
                      dirfd=AT_FDCWD)
    assert len(raw) == LIMITS.offsets("dw_file_event")["path"] + len(b"/etc/passwd\0")
    assert decoder.decode(raw) == FileEvent(**_file(op=FileOp.OPEN, path="/etc/passwd",
                                                    open_flags=0o1101, mode=0o644, retval=3))


@pytest.mark.parametrize("op", [FileOp.UNLINK, FileOp.RMDIR, FileOp.MKDIR, FileOp.TRUNCATE])
def test_file_single_path_ops(decoder, op):
    raw = file_record(op, "data/x", dirfd=9, retval=-2)
    assert decoder.decode(raw) == FileEvent(**_file(op=op, path="data/x", dirfd=9, retval=-2))


def test_file_chmod_and_mknod_keep_mode(decoder):
    chmod = decoder.decode(file_record(FileOp.CHMOD, "/usr/bin/tool", mode=0o4755))
    assert chmod == FileEvent(**_file(op=FileOp.CHMOD, path="/usr/bin/tool", mode=0o4755))
    mknod = decoder.decode(file_record(FileOp.MKNOD, "/tmp/fifo", mode=0o10644))
    assert mknod == FileEvent(**_file(op=FileOp.MKNOD, path="/tmp/fifo", mode=0o10644))


@pytest.mark.parametrize("op", [FileOp.RENAME, FileOp.LINK])
def test_file_two_path_ops(decoder, op):
    raw = file_record(op, "old.txt", "/srv/new.txt", dirfd=5, dirfd2=6, open_flags=1)
    offsets = LIMITS.offsets("dw_file_event")
    assert len(raw) == offsets["path2"] + len(b"/srv/new.txt\0")
    assert decoder.decode(raw) == FileEvent(**_file(
        op=op, path="old.txt", path2="/srv/new.txt", dirfd=5, dirfd2=6, open_flags=1))


def test_file_symlink(decoder):
    raw = file_record(FileOp.SYMLINK, "../lib/libx.so.1", "/usr/lib/libx.so", dirfd2=AT_FDCWD)
    assert decoder.decode(raw) == FileEvent(**_file(
        op=FileOp.SYMLINK, path="../lib/libx.so.1", path2="/usr/lib/libx.so"))


def test_file_path2_ignored_for_one_path_ops(decoder):
    # a stale path2_len in the scratch buffer does not matter for an unlink
    raw = file_record(FileOp.UNLINK, "/tmp/a", path2_len=40)
    event = decoder.decode(raw)
    assert (event.path, event.path2, event.dirfd2) == ("/tmp/a", None, AT_FDCWD)


def test_file_fd_only_chmod(decoder):
    raw = file_record(FileOp.CHMOD, None, dirfd=4, mode=0o755)
    assert len(raw) == LIMITS.offsets("dw_file_event")["path"]
    event = decoder.decode(raw)
    assert event == FileEvent(**_file(
        header=expected_header(EventKind.FILE, flags=Flag.FD_ONLY), op=FileOp.CHMOD, path=None,
        dirfd=4, mode=0o755))


def test_file_odd_bytes_round_trip(decoder):
    raw_path = b"/tmp/\xff\xfe-name"
    event = decoder.decode(file_record(FileOp.OPEN, raw_path, open_flags=1))
    assert event.path == "/tmp/\udcff\udcfe-name"
    assert event.path.encode("utf-8", "surrogateescape") == raw_path


def test_file_newline_and_spaces(decoder):
    event = decoder.decode(file_record(FileOp.RENAME, "/tmp/a b\nc", "/tmp/ d \n"))
    assert (event.path, event.path2) == ("/tmp/a b\nc", "/tmp/ d \n")


def test_file_truncation_flags(decoder):
    long = "/" + "p" * (LIMITS.path_max - 2)
    raw = file_record(FileOp.RENAME, long, long,
                      flags=Flag.PATH_TRUNCATED | Flag.PATH2_TRUNCATED)
    assert len(raw) == LIMITS.offsets("dw_file_event")["path2"] + LIMITS.path_max
    assert len(raw) == LIMITS.size("dw_file_event")
    event = decoder.decode(raw)
    assert event.path == event.path2 == long
    assert event.path_truncated and event.path2_truncated


def test_every_file_op_decodes(decoder):
    for op in FileOp:
        two = op in (FileOp.RENAME, FileOp.LINK, FileOp.SYMLINK)
        event = decoder.decode(file_record(op, "/a", "/b" if two else None))
        assert event.op is op
        assert event.path2 == ("/b" if two else None)
    assert dict(decoder.decoded) == {"file": len(FileOp)}
    assert len(FileOp) == 10


# -- chdir --------------------------------------------------------------------


def test_chdir(decoder):
    event = decoder.decode(chdir_record("/srv/app"))
    assert event == ChdirEvent(header=expected_header(EventKind.CHDIR), path="/srv/app", fd=-1,
                               retval=0)
    assert decoder.decode(chdir_record("sub/dir", retval=-2)).retval == -2
    assert decoder.decode(chdir_record("cgi-bin", cwd_base=4242)).cwd_base == 4242


def test_fchdir(decoder):
    raw = chdir_record(None, fd=5)
    assert len(raw) == LIMITS.offsets("dw_chdir_event")["path"]
    event = decoder.decode(raw)
    assert event == ChdirEvent(header=expected_header(EventKind.CHDIR, flags=Flag.FD_ONLY),
                               path=None, fd=5, retval=0)


# -- fork, exit ---------------------------------------------------------------


def test_fork(decoder):
    raw = fork_record(4243, 9_000_000_123, tgid=4242, pid=4242, ppid=4000, start_ns=8_000,
                      parent_start_ns=7_000, comm="sh")
    assert len(raw) == LIMITS.size("dw_fork_event") == HEADER_SIZE + 16
    event = decoder.decode(raw)
    assert event == ForkEvent(
        header=expected_header(EventKind.FORK, tgid=4242, pid=4242, ppid=4000, start_ns=8_000,
                               parent_start_ns=7_000),
        child_tgid=4243, child_start_ns=9_000_000_123)
    assert dict(decoder.decoded) == {"fork": 1}


def test_exit(decoder):
    raw = exit_record(tgid=4243, pid=4243, ppid=4242, start_ns=9_000_000_123,
                      parent_start_ns=8_000, comm="true")
    assert len(raw) == HEADER_SIZE == 80
    event = decoder.decode(raw)
    assert event == ExitEvent(header=expected_header(
        EventKind.EXIT, tgid=4243, pid=4243, ppid=4242, start_ns=9_000_000_123,
        parent_start_ns=8_000, comm="true"))
    assert (event.header.tgid, event.header.start_ns) == (4243, 9_000_000_123)
    assert dict(decoder.decoded) == {"exit": 1}


def test_exec_carries_its_dedup_key(decoder):
    event = decoder.decode(exec_record("/app/job.sh", ["job.sh"], dedup_key=2**64 - 3))
    assert (event.filename, event.argv, event.dedup_key) == ("/app/job.sh", ("job.sh",),
                                                             2**64 - 3)


def test_exec_repeat(decoder):
    raw = exec_repeat_record(0xDEADBEEF_12345678, tgid=4300, pid=4300, ppid=4242,
                             start_ns=9_500, parent_start_ns=8_000, comm="job.sh")
    assert len(raw) == LIMITS.size("dw_exec_repeat_event") == HEADER_SIZE + 16
    event = decoder.decode(raw)
    assert event == ExecRepeatEvent(
        header=expected_header(EventKind.EXEC_REPEAT, tgid=4300, pid=4300, ppid=4242,
                               start_ns=9_500, parent_start_ns=8_000, comm="job.sh"),
        dedup_key=0xDEADBEEF_12345678, retval=0)
    assert dict(decoder.decoded) == {"exec_repeat": 1}


def test_exec_repeat_short(decoder):
    _bad(decoder, exec_repeat_record(1, cut=HEADER_SIZE + 8), "exec_repeat:short-exec-repeat")


def test_fork_short(decoder):
    _bad(decoder, fork_record(5, 1, cut=HEADER_SIZE + 12), "fork:short-fork")


def test_fork_without_child(decoder):
    _bad(decoder, fork_record(0, 1), "fork:fork-child")


def test_exit_short_is_a_short_header(decoder):
    _bad(decoder, exit_record()[:-1], "unknown:short-header")


# -- malformed ----------------------------------------------------------------


def _bad(decoder: Decoder, raw: bytes, key: str) -> None:
    assert decoder.decode(raw) is None
    assert dict(decoder.errors) == {key: 1}
    assert dict(decoder.decoded) == {}


def test_short_header(decoder):
    _bad(decoder, exec_record("/bin/ls", ["ls"])[: HEADER_SIZE - 1], "unknown:short-header")


def test_empty_record(decoder):
    _bad(decoder, b"", "unknown:short-header")


@pytest.mark.parametrize("kind", [0, 8, 99, 0xFFFF])
def test_unknown_kind(decoder, kind):
    raw = bytearray(exec_record("/bin/ls", ["ls"]))
    struct.pack_into("<H", raw, KIND_OFFSET, kind)
    _bad(decoder, bytes(raw), f"kind-{kind}:unknown-kind")


def test_exec_short_fixed_part(decoder):
    _bad(decoder, exec_record("/bin/ls", ["ls"], cut=HEADER_SIZE + 4), "exec:short-exec")


def test_exec_cut_inside_filename(decoder):
    # no argv (args_size 0): the record must still reach args[]
    off = LIMITS.offsets("dw_exec_event")
    raw = exec_record("/bin/a-long-name", [], cut=off["filename"] + 4)
    _bad(decoder, raw, "exec:short-exec")


def test_exec_filename_len_out_of_bounds(decoder):
    _bad(decoder, exec_record("/bin/ls", ["ls"], filename_len=LIMITS.path_max + 1),
         "exec:exec-lengths")


def test_exec_args_size_out_of_bounds(decoder):
    raw = exec_record("/bin/ls", ["ls"], args_size=LIMITS.args_size + 1)
    _bad(decoder, raw, "exec:exec-lengths")


def test_exec_args_cut(decoder):
    raw = exec_record("/bin/ls", ["ls", "-l"])
    _bad(decoder, raw[:-1], "exec:short-exec-args")


@pytest.mark.parametrize("argc", [2, 3, 5])
def test_exec_argc_more_than_entries(decoder, argc):
    _bad(decoder, exec_record("/bin/ls", ["ls"], argc=argc), "exec:exec-argc")


def test_connect_short(decoder):
    raw = connect_record(family=2, addr=ipv4("1.1.1.1"), port=1)
    _bad(decoder, raw[: LIMITS.offsets("dw_connect_event")["unix_path"]], "connect:short-connect")


def test_connect_unix_path_len_out_of_bounds(decoder):
    _bad(decoder, connect_record(family=1, unix_path=b"/x", path_len=109),
         "connect:unix-path-length")


def test_file_short_fixed_part(decoder):
    raw = file_record(FileOp.OPEN, "/x")
    _bad(decoder, raw[: LIMITS.offsets("dw_file_event")["path"] - 1], "file:short-file")


@pytest.mark.parametrize("op", [0, 11, 200])
def test_file_unknown_op(decoder, op):
    _bad(decoder, file_record(op, "/x"), f"file:file-op-{op}")


def test_file_path_len_out_of_bounds(decoder):
    _bad(decoder, file_record(FileOp.OPEN, "/x", path_len=LIMITS.path_max + 1),
         "file:file-lengths")


def test_file_path2_len_out_of_bounds(decoder):
    _bad(decoder, file_record(FileOp.RENAME, "/x", "/y", path2_len=LIMITS.path_max + 1),
         "file:file-lengths")


def test_file_path_cut(decoder):
    _bad(decoder, file_record(FileOp.OPEN, "/etc/shadow")[:-1], "file:short-file-path")


def test_file_path2_cut(decoder):
    _bad(decoder, file_record(FileOp.RENAME, "/a", "/bbbb")[:-2], "file:short-file-path2")


def test_file_rename_without_path2_buffer(decoder):
    # a two-path op sent trimmed like a one-path event
    raw = file_record(FileOp.LINK, "/a", path2_len=3)
    _bad(decoder, raw, "file:short-file-path2")


def test_chdir_short(decoder):
    _bad(decoder, chdir_record("/x", cut=HEADER_SIZE + 2), "chdir:short-chdir")


def test_chdir_length_out_of_bounds(decoder):
    _bad(decoder, chdir_record("/x", path_len=LIMITS.path_max + 1), "chdir:chdir-length")


def test_chdir_path_cut(decoder):
    _bad(decoder, chdir_record("/srv")[:-1], "chdir:short-chdir-path")


def test_decoding_continues_after_errors(decoder):
    good1 = exec_record("/bin/ls", ["ls"], tgid=1)
    good2 = file_record(FileOp.UNLINK, "/tmp/x", tgid=2)
    good3 = connect_record(family=2, addr=ipv4("8.8.8.8"), port=53, tgid=3)
    good4 = chdir_record("/", tgid=4)
    good5 = fork_record(6, 60, tgid=5)
    good6 = exit_record(tgid=6, start_ns=60)
    bad_kind = bytearray(good1)
    struct.pack_into("<H", bad_kind, KIND_OFFSET, 42)
    records = [b"\x00" * 10, good1, bytes(bad_kind), file_record(77, "/x"), good2,
               good1[:-1], good3, chdir_record("/x", path_len=9999), good4, good5[:-1], good5,
               good6]
    events = decoder.decode_many(records)
    assert [e.header.tgid for e in events] == [1, 2, 3, 4, 5, 6]
    assert [type(e) for e in events] == [ExecEvent, FileEvent, ConnectEvent, ChdirEvent,
                                         ForkEvent, ExitEvent]
    assert dict(decoder.errors) == {
        "unknown:short-header": 1, "kind-42:unknown-kind": 1, "file:file-op-77": 1,
        "exec:short-exec-args": 1, "chdir:chdir-length": 1, "fork:short-fork": 1,
    }
    assert dict(decoder.decoded) == {"exec": 1, "file": 1, "connect": 1, "chdir": 1,
                                     "fork": 1, "exit": 1}


def test_header_fields_and_comm(decoder):
    raw = file_record(FileOp.OPEN, "/x", ts_ns=2**63 + 5, cgroup_id=2**64 - 1, pid=7, tgid=8,
                      ppid=9, uid=2**32 - 1, gid=0, suppressed=12, comm="a" * 16,
                      start_ns=2**64 - 2, parent_start_ns=2**63 + 1)
    h = decoder.decode(raw).header
    assert (h.ts_ns, h.cgroup_id, h.pid, h.tgid, h.ppid, h.uid, h.gid, h.suppressed) == (
        2**63 + 5, 2**64 - 1, 7, 8, 9, 2**32 - 1, 0, 12)
    assert (h.start_ns, h.parent_start_ns) == (2**64 - 2, 2**63 + 1)
    assert h.comm == "a" * 16  # comm fills all 16 bytes: no NUL, still decoded whole
    assert h.kind is EventKind.FILE
    assert decoder.decode(file_record(FileOp.OPEN, "/x", comm="runc:[2:INIT]")).header.comm == (
        "runc:[2:INIT]")
