"""Baseline items: extraction from trace records, the bounded set, msgpack, diff, nearest."""

from __future__ import annotations

import msgpack
import pytest
from driftwarden.core.records import ContainerView, Program, TraceRecord
from driftwarden.models.items import (
    ConnectItem,
    ExecItem,
    ItemSet,
    LineageItem,
    WriteItem,
    address_class,
    extract_items,
    item_from_key,
    named_item,
)
from driftwarden.probes._layout import AT_FDCWD, RESULT_UNKNOWN, EventKind, FileOp, Flag
from driftwarden.probes.events import (
    ConnectEvent,
    ExecEvent,
    Family,
    FileEvent,
    Header,
    SockType,
)

WEB = ContainerView(state="container", cgroup_id=777, id="f00dcafe" * 8, name="web",
                    image="busybox", image_id="sha256:" + "ab" * 32, runtime="docker")
TGID, PPID = 4242, 4000
SH = Program("/bin/busybox", "sh")
HTTPD = Program("/bin/busybox", "httpd")
# what a detector does with a container's layers: /bin/sh and /bin/nc are busybox there
LINKS = {"/bin/sh": "/bin/busybox", "/bin/nc": "/bin/busybox"}


def through_layers(program: Program) -> ExecItem:
    return named_item(program, LINKS.get(program.exe, program.exe))


def header(kind: EventKind, comm: str = "sh") -> Header:
    return Header(kind=kind, ts_ns=1, cgroup_id=777, pid=TGID, tgid=TGID, ppid=PPID, uid=0,
                  gid=0, comm=comm, flags=Flag(0), suppressed=0)


def exec_rec(filename: str, argv: tuple[str, ...], *, program: Program | None,
             parent: Program | None = HTTPD, path: str | None = None, retval: int = 0,
             runtime_setup: bool = False, resolved: bool = True) -> TraceRecord:
    event = ExecEvent(header=header(EventKind.EXEC), filename=filename, argv=argv,
                      retval=retval, dirfd=AT_FDCWD)
    return TraceRecord(event=event, kind="exec", container=WEB, ppid=PPID,
                       path=path or filename, path_resolved=resolved,
                       exe=program.exe if program else None, runtime_setup=runtime_setup,
                       program=program, parent_program=parent)


def file_rec(op: FileOp, path: str | None, *, path2: str | None = None, flags: int = 0,
             mode: int = 0, retval: int = RESULT_UNKNOWN, resolved: bool = True,
             runtime_setup: bool = False) -> TraceRecord:
    event = FileEvent(header=header(EventKind.FILE), op=op, path=path, path2=path2,
                      dirfd=AT_FDCWD, dirfd2=AT_FDCWD, open_flags=flags, mode=mode,
                      retval=retval)
    return TraceRecord(event=event, kind="write", container=WEB, ppid=PPID, path=path,
                       path_resolved=resolved, path2=path2, runtime_setup=runtime_setup,
                       program=SH, parent_program=HTTPD)


def connect_rec(family: Family, address: str, port: int, sock: SockType = SockType.TCP,
                retval: int = 0, program: Program | None = SH) -> TraceRecord:
    number = {Family.INET: 2, Family.INET6: 10, Family.UNIX: 1}.get(family, 99)
    event = ConnectEvent(header=header(EventKind.CONNECT), family=family, family_number=number,
                         address=address, port=port, sock_type=sock, retval=retval, fd=3)
    return TraceRecord(event=event, kind="connect", container=WEB, ppid=PPID, program=program,
                       parent_program=HTTPD)


# -- exec ---------------------------------------------------------------------------------------

def test_busybox_applet_through_proc_self_exe() -> None:
    # /proc/self/exe re-runs what the process ran: the process table kept it (/bin/sh here)
    record = exec_rec("/proc/self/exe", ("nc", "127.0.0.1", "4444", "-e", "/bin/sh"),
                      program=Program("/bin/sh", "nc", self_exec=True))
    assert extract_items(record, through_layers) == [
        ExecItem("/bin/busybox", "nc"),
        LineageItem("/bin/busybox:httpd", "/bin/busybox:nc"),
    ]
    # the same applet exec'd by its path is the same item: one item per program
    by_path = exec_rec("/bin/nc", ("nc", "127.0.0.1", "4444"), program=Program("/bin/nc", "nc"))
    assert extract_items(by_path, through_layers)[0] == ExecItem("/bin/busybox", "nc")


def test_argv0_is_the_basename_of_argv0() -> None:
    record = exec_rec("/proc/self/exe", ("/bin/nc",),
                      program=Program("/bin/busybox", "/bin/nc", self_exec=True))
    assert extract_items(record)[0] == ExecItem("/bin/busybox", "nc")


def test_real_binary() -> None:
    record = exec_rec("cat", ("cat", "/etc/hosts"), program=Program("/bin/cat", "cat"),
                      parent=Program("/bin/sh", None), path="/bin/cat")
    assert extract_items(record) == [
        ExecItem("/bin/cat", "cat"),
        LineageItem("/bin/sh:sh", "/bin/cat:cat"),  # no argv[0]: the exe's basename
    ]


def test_an_unknown_parent_makes_no_lineage() -> None:
    """A parent the agent never saw (None) or whose binary it never knew says nothing about
    the program: only its own exec item is checked."""
    for parent in (None, Program(None, "sh")):
        record = exec_rec("/usr/bin/python3.11", (), program=Program("/usr/bin/python3.11", None),
                          parent=parent)
        assert extract_items(record) == [ExecItem("/usr/bin/python3.*", "python3.*")]


def test_exec_whose_program_is_unknown_is_named_by_its_path() -> None:
    unresolved = exec_rec("bin/tool", ("tool",), program=Program(None, "tool"), resolved=False)
    assert extract_items(unresolved)[0] == ExecItem("?rel:bin/tool", "tool")
    reexec = exec_rec("/proc/self/exe", ("nc",), program=Program(None, "nc", self_exec=True))
    assert extract_items(reexec)[0] == ExecItem("/proc/self/exe", "nc")


def test_failed_exec_gives_nothing() -> None:
    assert extract_items(exec_rec("/bin/nope", ("nope",), program=SH, retval=-2)) == []


def test_runtime_setup_gives_nothing() -> None:
    assert extract_items(exec_rec("/bin/cat", ("cat",), program=Program("/bin/cat", "cat"),
                                  runtime_setup=True)) == []
    assert extract_items(file_rec(FileOp.MKDIR, "/proc/x", runtime_setup=True)) == []


# -- write --------------------------------------------------------------------------------------

O_WRONLY, O_CREAT, O_TRUNC, O_APPEND = 0o1, 0o100, 0o1000, 0o2000


@pytest.mark.parametrize(("record", "expected"), [
    (file_rec(FileOp.OPEN, "/tmp/tmp.k3J9xQ2p1Z", flags=O_WRONLY | O_CREAT | O_TRUNC),
     [WriteItem("/tmp/tmp.*", "create")]),
    (file_rec(FileOp.OPEN, "/etc/app.conf", flags=O_WRONLY | O_TRUNC),
     [WriteItem("/etc/app.conf", "truncate")]),
    (file_rec(FileOp.OPEN, "/var/log/app-3.log", flags=O_WRONLY | O_APPEND | O_CREAT),
     [WriteItem("/var/log/app-*.log", "create")]),
    (file_rec(FileOp.OPEN, "/var/log/app-3.log", flags=O_WRONLY | O_APPEND),
     [WriteItem("/var/log/app-*.log", "append")]),
    (file_rec(FileOp.OPEN, "/data/db", flags=0o2), [WriteItem("/data/db", "write")]),
    (file_rec(FileOp.OPEN, "/tmp/suid", flags=O_CREAT, mode=0o4755),
     [WriteItem("/tmp/suid", "setuid")]),
    (file_rec(FileOp.RENAME, "/var/log/access.log", path2="/var/log/access.log.1", retval=0),
     [WriteItem("/var/log/access.log", "rename-from"),
      WriteItem("/var/log/access.log.*", "rename-to")]),
    (file_rec(FileOp.UNLINK, "/tmp/sh-thd.aB3dEf", retval=0), [WriteItem("/tmp/sh-thd.*",
                                                                         "unlink")]),
    (file_rec(FileOp.RMDIR, "/tmp/d", retval=0), [WriteItem("/tmp/d", "rmdir")]),
    (file_rec(FileOp.CHMOD, "/tmp/x", mode=0o644, retval=0), [WriteItem("/tmp/x", "chmod")]),
    (file_rec(FileOp.CHMOD, "/tmp/x", mode=0o755, retval=0), [WriteItem("/tmp/x", "chmod+x")]),
    (file_rec(FileOp.CHMOD, "/tmp/x", mode=0o100, retval=0), [WriteItem("/tmp/x", "chmod+x")]),
    (file_rec(FileOp.CHMOD, "/tmp/x", mode=0o4755, retval=0), [WriteItem("/tmp/x", "setuid")]),
    (file_rec(FileOp.CHMOD, "/tmp/x", mode=0o2750, retval=0), [WriteItem("/tmp/x", "setuid")]),
    (file_rec(FileOp.LINK, "/bin/sh", path2="/tmp/sh", retval=0), [WriteItem("/tmp/sh", "link")]),
    (file_rec(FileOp.SYMLINK, "../bin/sh", path2="/usr/local/bin/sh", retval=0),
     [WriteItem("/usr/local/bin/sh", "symlink")]),
    (file_rec(FileOp.MKDIR, "/run/user/1000/x", mode=0o700, retval=0),
     [WriteItem("/run/user/*/x", "mkdir")]),
    (file_rec(FileOp.MKNOD, "/tmp/fifo", mode=0o10644, retval=0),
     [WriteItem("/tmp/fifo", "mknod")]),
    (file_rec(FileOp.TRUNCATE, "/var/log/app.log", retval=0),
     [WriteItem("/var/log/app.log", "truncate")]),
    # unresolved relative paths never collide with absolute ones
    (file_rec(FileOp.OPEN, "out/tmp.k3J9xQ2p1Z", flags=O_CREAT, resolved=False),
     [WriteItem("?rel:out/tmp.*", "create")]),
    (file_rec(FileOp.CHMOD, None, mode=0o755, retval=0, resolved=False),
     [WriteItem("?unknown", "chmod+x")]),
], ids=lambda v: v.event.op.name.lower() if isinstance(v, TraceRecord) else "")
def test_write_items(record: TraceRecord, expected: list[WriteItem]) -> None:
    assert extract_items(record) == expected


def test_failed_file_op_gives_nothing_but_unknown_result_counts() -> None:
    assert extract_items(file_rec(FileOp.UNLINK, "/etc/x", retval=-13)) == []
    assert extract_items(file_rec(FileOp.OPEN, "/etc/x", flags=O_WRONLY)) == [
        WriteItem("/etc/x", "write")]


# -- connect ------------------------------------------------------------------------------------

def test_connect_loopback_tcp() -> None:
    assert extract_items(connect_rec(Family.INET, "127.0.0.1", 5432)) == [
        ConnectItem("inet", "loopback", "127.0.0.1", 5432, "tcp", "/bin/busybox")]


def test_connect_private_refused_is_still_an_item() -> None:
    # the address is only data: nothing connects anywhere
    record = connect_rec(Family.INET, "10.1.2.3", 8080, retval=-111, program=None)
    assert extract_items(record) == [
        ConnectItem("inet", "private", "10.1.2.3", 8080, "tcp", "?")]


def test_connect_public_udp() -> None:
    assert extract_items(connect_rec(Family.INET, "8.8.8.8", 53, SockType.UDP)) == [
        ConnectItem("inet", "public", "8.8.8.8", 53, "udp", "/bin/busybox")]


def test_connect_unix_socket_with_pid() -> None:
    record = connect_rec(Family.UNIX, "/run/app/4242.sock", 0, SockType.OTHER,
                         program=Program("/bin/sh", "sh"))
    assert extract_items(record, through_layers) == [
        ConnectItem("unix", "unix", "/run/app/*.sock", 0, "other", "/bin/busybox")]


@pytest.mark.parametrize(("family", "address", "expected"), [
    (Family.INET, "0.0.0.0", ("unspecified", "0.0.0.0")),
    (Family.INET, "169.254.169.254", ("link-local", "169.254.169.254")),
    (Family.INET, "224.0.0.251", ("multicast", "224.0.0.251")),
    (Family.INET, "192.168.1.1", ("private", "192.168.1.1")),
    (Family.INET6, "::1", ("loopback", "::1")),
    (Family.INET6, "fe80::1", ("link-local", "fe80::1")),
    (Family.INET6, "fd00::1", ("private", "fd00::1")),
    (Family.INET6, "::ffff:127.0.0.1", ("loopback", "::ffff:7f00:1")),
    (Family.INET6, "2001:4860:4860::8888", ("public", "2001:4860:4860::8888")),
    (Family.INET, "not-an-ip", ("other", "not-an-ip")),
    (Family.OTHER, "", ("other", "")),
])
def test_address_class(family: Family, address: str, expected: tuple[str, str]) -> None:
    assert address_class(family, address) == expected


# -- items, keys --------------------------------------------------------------------------------

ALL = [
    ExecItem("/bin/busybox", "nc"),
    LineageItem("/bin/busybox:httpd", "/bin/busybox:sh"),
    ConnectItem("inet", "loopback", "127.0.0.1", 5432, "tcp", "/usr/bin/psql"),
    ConnectItem("inet6", "public", "2001:db8::1", 443, "tcp", "?"),
    WriteItem("/tmp/tmp.*", "create"),
]


@pytest.mark.parametrize("item", ALL, ids=lambda i: i.KIND)
def test_key_round_trip_and_describe(item) -> None:
    key = item.key()
    assert all(type(v) in (str, int) for v in key)
    assert type(item).from_key(key) == item
    assert item_from_key(item.KIND, list(key)) == item
    assert hash(item) == hash(type(item).from_key(key))
    assert 0 < len(item.describe()) < 120


def test_describe_texts() -> None:
    assert ExecItem("/bin/busybox", "nc").describe() == "exec /bin/busybox as nc"
    assert ExecItem("/bin/cat", "cat").describe() == "exec /bin/cat"
    assert ALL[2].describe() == "tcp connect to 127.0.0.1:5432 (loopback) by /usr/bin/psql"
    assert ALL[3].describe() == "tcp connect to [2001:db8::1]:443 (public) by ?"
    assert WriteItem("/bin/x", "chmod+x").describe() == "chmod+x /bin/x"


@pytest.mark.parametrize(("kind", "key"), [
    ("exec", ("/bin/sh",)),
    ("exec", ("/bin/sh", 3)),
    ("connect", ("inet", "public", "1.1.1.1", "53", "udp", "?")),
    ("connect", ("inet", "public", "1.1.1.1", True, "udp", "?")),
    ("write", "ab"),
    ("nope", ("a", "b")),
])
def test_bad_keys_are_rejected(kind: str, key) -> None:
    with pytest.raises(ValueError):
        item_from_key(kind, key)


# -- ItemSet ------------------------------------------------------------------------------------

def test_add_contains_len() -> None:
    items = ItemSet()
    assert items.add(ALL[0]) is True
    assert items.add(ExecItem("/bin/busybox", "nc")) is False
    assert ALL[0] in items and ALL[1] not in items and "x" not in items
    assert items.update(ALL) == 4
    assert len(items) == 5 and list(items) == ALL
    assert items.count("connect") == 2


def test_caps_and_overflow() -> None:
    items = ItemSet({"write": 2})
    assert items.caps["exec"] == 4096
    assert items.add(WriteItem("/a", "create")) and items.add(WriteItem("/b", "create"))
    assert items.is_full("write")
    assert items.add(WriteItem("/c", "create")) is True  # new, but not kept
    assert WriteItem("/c", "create") not in items
    assert items.add(WriteItem("/a", "create")) is False  # known: not an overflow
    assert items.overflowed == {"exec": 0, "lineage": 0, "connect": 0, "write": 1}
    assert items.add(ALL[0])  # other kinds are unaffected
    with pytest.raises(ValueError):
        ItemSet({"bogus": 1})


def test_msgpack_round_trip() -> None:
    items = ItemSet({"write": 1})
    items.update(ALL)
    items.add(WriteItem("/over", "unlink"))
    data = msgpack.packb(items.to_msgpack_obj())
    back = ItemSet.from_msgpack_obj(msgpack.unpackb(data))
    assert list(back) == list(items)
    assert back.caps == items.caps and back.overflowed == items.overflowed
    assert back.to_msgpack_obj() == items.to_msgpack_obj()
    smaller = ItemSet.from_msgpack_obj(msgpack.unpackb(data), caps={"connect": 1})
    assert smaller.count("connect") == 1 and smaller.overflowed["connect"] == 1


@pytest.mark.parametrize("obj", [
    None,
    [],
    {"version": 99, "items": {}},
    {"version": 1, "items": []},
    {"version": 1, "items": {"exec": [["/bin/sh"]]}},
    {"version": 1, "items": {"exec": ["/bin/sh"]}},
    {"version": 1, "items": {"bogus": []}},
    {"version": 1, "items": {}, "overflowed": {"exec": -1}},
    {"version": 1, "items": {}, "caps": {"exec": "many"}},
])
def test_corrupt_msgpack_obj_is_rejected(obj) -> None:
    with pytest.raises(ValueError):
        ItemSet.from_msgpack_obj(obj)


def test_diff() -> None:
    a, b = ItemSet(), ItemSet()
    a.update(ALL)
    b.update(ALL[:2])
    b.add(WriteItem("/only/in/b", "create"))
    assert a.diff(b) == {"exec": [], "lineage": [], "connect": ALL[2:4], "write": [ALL[4]]}
    assert b.diff(a)["write"] == [WriteItem("/only/in/b", "create")]


def test_nearest() -> None:
    items = ItemSet()
    items.update([
        ExecItem("/bin/busybox", "httpd"),
        ExecItem("/bin/busybox", "sh"),
        ExecItem("/usr/bin/curl", "curl"),
        LineageItem("/bin/busybox:httpd", "/bin/busybox:sh"),
        ConnectItem("inet", "loopback", "127.0.0.1", 5432, "tcp", "/bin/busybox"),
        ConnectItem("inet", "public", "8.8.8.8", 53, "udp", "/bin/busybox"),
        WriteItem("/var/log/app-*.log", "append"),
        WriteItem("/tmp/tmp.*", "create"),
    ])
    # same exe, another applet; ties go to the first learned
    assert items.nearest(ExecItem("/bin/busybox", "nc")) == ExecItem("/bin/busybox", "httpd")
    assert items.nearest(ExecItem("/usr/bin/wget", "wget")) == ExecItem("/usr/bin/curl", "curl")
    assert items.nearest(ExecItem("/opt/x", "x")) is None
    assert items.nearest(LineageItem("/bin/busybox:httpd", "/bin/busybox:nc")) == (
        LineageItem("/bin/busybox:httpd", "/bin/busybox:sh"))
    # same address, another port
    assert items.nearest(ConnectItem("inet", "loopback", "127.0.0.1", 4444, "tcp", "?")) == (
        ConnectItem("inet", "loopback", "127.0.0.1", 5432, "tcp", "/bin/busybox"))
    assert items.nearest(ConnectItem("unix", "unix", "/run/x.sock", 0, "other", "?")) is None
    # same directory, another file; same path, another op
    assert items.nearest(WriteItem("/var/log/other.log", "append")) == (
        WriteItem("/var/log/app-*.log", "append"))
    assert items.nearest(WriteItem("/tmp/tmp.*", "chmod+x")) == WriteItem("/tmp/tmp.*", "create")
    assert items.nearest(WriteItem("/etc/passwd", "append")) is None
    assert items.nearest(WriteItem("/tmp/tmp.*", "create")) is None  # itself is excluded


def test_learned_wildcard_write_covers_a_name_canonicalisation_kept():
    from driftwarden.models.canonical import canonical_path

    items = ItemSet()
    items.add(WriteItem("/tmp/req.*", "create"))
    # a mktemp suffix of one letter case is kept verbatim by canonicalisation
    assert canonical_path("/tmp/req.JADRCI") == "/tmp/req.JADRCI"
    assert items.covers(WriteItem("/tmp/req.JADRCI", "create"))
    assert not items.covers(WriteItem("/tmp/req.JADRCI", "unlink"))  # another op
    assert not items.covers(WriteItem("/tmp/sub/req.JADRCI", "create"))  # * stops at /
    assert not items.covers(WriteItem("/etc/req.JADRCI", "create"))


def test_lineages_are_covered_only_when_learned():
    """No lineage is made with an unknown parent any more (extract_items gives none), so a
    "?" lineage a baseline kept from before is an ordinary item: nothing covers another."""
    items = ItemSet()
    items.add(LineageItem("/bin/busybox:httpd", "/www/cgi-bin/app:app"))
    assert not items.covers(LineageItem("?", "/www/cgi-bin/app:app"))
    assert not items.covers(LineageItem("/bin/busybox:nc", "/www/cgi-bin/app:app"))


def test_profile_observe_treats_covered_writes_as_known():
    from driftwarden.core.modes import Mode
    from driftwarden.models.profile import LearningPolicy, Profile

    profile = Profile(image_id="sha256:" + "1" * 64, image_name="web", items=ItemSet(),
                      created_at=0.0, updated_at=0.0)
    policy = LearningPolicy()
    assert profile.observe([WriteItem("/tmp/req.*", "create")], 1.0, policy)
    profile.set_mode(Mode.MONITOR, reason="test", who="test", now=2.0)
    assert profile.observe([WriteItem("/tmp/req.JADRCI", "create")], 3.0, policy) == []
    assert profile.observe([WriteItem("/tmp/other", "create")], 3.0, policy) == [
        WriteItem("/tmp/other", "create")]


def test_a_write_seen_with_and_without_its_directory_is_the_same_write():
    """gzip writes `openat(dirfd, "app.log.1.gz")`: its directory is known only while the
    process is there to ask. Learned either way, the other form is covered (same op only)."""
    learned_relative = ItemSet()
    learned_relative.add(WriteItem("?rel:app.log.*.gz", "create"))
    assert learned_relative.covers(WriteItem("/var/log/app/app.log.*.gz", "create"))
    assert not learned_relative.covers(WriteItem("/var/log/app/app.log.*.gz", "unlink"))
    assert not learned_relative.covers(WriteItem("/var/log/app/other.gz", "create"))
    learned_absolute = ItemSet()
    learned_absolute.add(WriteItem("/var/log/app/app.log.*.gz", "create"))
    for rel in ("app.log.*.gz", "app/app.log.*.gz", "var/log/app/app.log.*.gz"):
        assert learned_absolute.covers(WriteItem(f"?rel:{rel}", "create")), rel
    assert not learned_absolute.covers(WriteItem("?rel:log.*.gz", "create"))
    assert not learned_absolute.covers(WriteItem("?rel:app.log.*.gz", "unlink"))
    # the index survives a round trip
    again = ItemSet.from_msgpack_obj(learned_relative.to_msgpack_obj())
    assert again.covers(WriteItem("/data/app.log.*.gz", "create"))


def test_a_connect_of_unknown_protocol_is_covered_by_the_same_connect_learned():
    """A socket made before the probes (an agent joining a busy node, or restarting) has no
    protocol: the same connect learned as tcp (or udp) covers it; another address does not."""
    items = ItemSet()
    items.add(ConnectItem("inet", "loopback", "127.0.0.1", 8080, "tcp", "/bin/app"))
    assert items.covers(ConnectItem("inet", "loopback", "127.0.0.1", 8080, "unknown", "/bin/app"))
    assert not items.covers(ConnectItem("inet", "loopback", "127.0.0.1", 8081, "unknown",
                                        "/bin/app"))
    assert not items.covers(ConnectItem("inet", "loopback", "127.0.0.1", 8080, "unknown",
                                        "/bin/other"))
    assert not items.covers(ConnectItem("inet", "loopback", "127.0.0.1", 8080, "udp", "/bin/app"))
