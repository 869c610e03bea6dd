"""The exact-set items a baseline learns, and a bounded set of them.

Four kinds, each a frozen, hashable dataclass whose ``key()`` is a tuple of str/int (stable, and
what goes into msgpack) and whose ``from_key()`` rebuilds it:

* ``ExecItem(exe, argv0)``: what ran. ``exe`` is the canonical path of the binary that actually
  ran (``/bin/busybox`` for every busybox applet, including re-execs through ``/proc/self/exe``),
  ``argv0`` the canonical basename of ``argv[0]`` (the applet: ``nc``, ``sh``, ...).
* ``LineageItem(parent, child)``: ``"exe:argv0"`` of the program that started it (what the
  process ran before, or its parent process) -> of the new program.
* ``ConnectItem(family, addr_class, address, port, protocol, exe)``: where a process connected.
* ``WriteItem(path, op)``: where something was written and how (see :func:`write_ops`).

:func:`extract_items` turns one :class:`~driftwarden.core.records.TraceRecord` into its items,
naming its programs (``record.program``, ``record.parent_program``) with a :data:`ProgramItem`.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, ClassVar

from driftwarden.models.canonical import canonical_path, canonical_unix_socket, pattern_matches
from driftwarden.probes._layout import FileOp
from driftwarden.probes.events import ConnectEvent, ExecEvent, Family, FileEvent

if TYPE_CHECKING:
    from driftwarden.core.records import Program, TraceRecord

UNKNOWN = "?"
UNRESOLVED_PREFIX = "?rel:"  # relative path the pipeline could not resolve (never starts "/")
UNKNOWN_PATH = "?unknown"  # no path at all (an fd-only syscall on a vanished fd)

O_APPEND, O_CREAT, O_TRUNC = 0o2000, 0o100, 0o1000
O_TMPFILE = 0o20000000  # __O_TMPFILE: an unnamed file is created

WRITE_OPS = ("create", "truncate", "append", "write", "rename-from", "rename-to", "unlink",
             "rmdir", "chmod", "chmod+x", "setuid", "link", "symlink", "mkdir", "mknod")
ADDR_CLASSES = ("loopback", "private", "link-local", "multicast", "public", "unspecified",
                "unix", "other")
KINDS = ("exec", "lineage", "connect", "write")


def _field(value: object, kind: type, what: str) -> object:
    if type(value) is not kind:  # bool is not an int here
        raise ValueError(f"{what}: expected {kind.__name__}, got {value!r}")
    return value


def _fields(key: Sequence, spec: tuple[tuple[str, type], ...], cls: str) -> list:
    if isinstance(key, str | bytes) or len(key) != len(spec):
        raise ValueError(f"{cls} key must have {len(spec)} fields, got {key!r}")
    return [_field(v, t, f"{cls}.{n}") for v, (n, t) in zip(key, spec, strict=True)]


@dataclass(frozen=True, slots=True)
class ExecItem:
    KIND: ClassVar[str] = "exec"
    exe: str
    argv0: str

    def key(self) -> tuple[str, str]:
        return (self.exe, self.argv0)

    @classmethod
    def from_key(cls, key: Sequence) -> ExecItem:
        return cls(*_fields(key, (("exe", str), ("argv0", str)), cls.__name__))

    def compact(self) -> str:
        """``exe:argv0``, the form a lineage item uses."""
        return f"{self.exe}:{self.argv0}"

    def describe(self) -> str:
        if os.path.basename(self.exe) == self.argv0:
            return f"exec {self.exe}"
        return f"exec {self.exe} as {self.argv0}"


@dataclass(frozen=True, slots=True)
class LineageItem:
    KIND: ClassVar[str] = "lineage"
    parent: str  # ExecItem.compact() of the program that started it
    child: str  # ExecItem.compact() of the program started

    def key(self) -> tuple[str, str]:
        return (self.parent, self.child)

    @classmethod
    def from_key(cls, key: Sequence) -> LineageItem:
        return cls(*_fields(key, (("parent", str), ("child", str)), cls.__name__))

    def describe(self) -> str:
        return f"{self.parent} started {self.child}"


@dataclass(frozen=True, slots=True)
class ConnectItem:
    KIND: ClassVar[str] = "connect"
    family: str  # inet | inet6 | unix | other
    addr_class: str  # one of ADDR_CLASSES
    address: str  # normalised IP text, or the canonical unix socket path
    port: int  # 0 for unix sockets
    protocol: str  # tcp | udp | other | unknown
    exe: str  # canonical exe of the connecting process, or "?"

    _SPEC: ClassVar = (("family", str), ("addr_class", str), ("address", str), ("port", int),
                       ("protocol", str), ("exe", str))

    def key(self) -> tuple[str, str, str, int, str, str]:
        return (self.family, self.addr_class, self.address, self.port, self.protocol, self.exe)

    @classmethod
    def from_key(cls, key: Sequence) -> ConnectItem:
        return cls(*_fields(key, cls._SPEC, cls.__name__))

    def destination(self) -> str:
        if self.family == Family.UNIX:
            return self.address
        if self.family == Family.INET6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"

    def describe(self) -> str:
        proto = "unix" if self.family == Family.UNIX else self.protocol
        return f"{proto} connect to {self.destination()} ({self.addr_class}) by {self.exe}"


@dataclass(frozen=True, slots=True)
class WriteItem:
    KIND: ClassVar[str] = "write"
    path: str
    op: str  # one of WRITE_OPS

    def key(self) -> tuple[str, str]:
        return (self.path, self.op)

    @classmethod
    def from_key(cls, key: Sequence) -> WriteItem:
        return cls(*_fields(key, (("path", str), ("op", str)), cls.__name__))

    def describe(self) -> str:
        return f"{self.op} {self.path}"


Item = ExecItem | LineageItem | ConnectItem | WriteItem
ITEM_TYPES: dict[str, type] = {t.KIND: t for t in (ExecItem, LineageItem, ConnectItem, WriteItem)}


def item_from_key(kind: str, key: Sequence) -> Item:
    try:
        cls = ITEM_TYPES[kind]
    except KeyError:
        raise ValueError(f"unknown item kind {kind!r}") from None
    return cls.from_key(key)


# -- extraction ---------------------------------------------------------------------------------

# A program's ExecItem: the detector names its binary through the container's layers
# (/bin/sh -> /bin/busybox); program_item is the same without layers.
ProgramItem = Callable[["Program"], ExecItem]


def canonical_location(path: str | None, resolved: bool) -> str:
    """A recorded path as an item path: canonical when resolved and absolute, else prefixed
    with ``?rel:`` (canonicalised the same way) so it can never collide with an absolute one."""
    if not path:
        return UNKNOWN_PATH
    if resolved and path.startswith("/"):
        return canonical_path(path)
    return UNRESOLVED_PREFIX + canonical_path(path)


def _argv0(name: str) -> str:
    return canonical_path(os.path.basename(name.rstrip("/")) or name) or UNKNOWN


def named_item(program: Program, binary: str | None) -> ExecItem:
    """The ExecItem of `program` whose binary is `binary` (a real path, canonicalised here;
    None: unknown). argv0 is the canonical basename of its argv[0], else of its exe."""
    return ExecItem(canonical_path(binary) if binary else UNKNOWN,
                    _argv0(program.argv0 or program.exe or ""))


def program_item(program: Program) -> ExecItem:
    """A program's ExecItem without the container's layers: its exe as the process named it."""
    return named_item(program, program.exe)


def exec_item(record: TraceRecord, item_of: ProgramItem = program_item) -> ExecItem:
    """The ExecItem of a successful exec record (see :func:`extract_items` for the rules)."""
    program = record.program
    if program is not None and program.exe:
        return item_of(program)
    # what ran is not known (a relative path that could not be resolved; a re-exec of a process
    # whose program was never seen): the path as exec'd names it
    event: ExecEvent = record.event
    exe = canonical_location(record.path or event.filename, record.path_resolved)
    name = event.argv[0] if event.argv and event.argv[0] else (event.filename or "")
    return ExecItem(exe, _argv0(name))


@lru_cache(maxsize=4096)
def address_class(family: Family | str, address: str) -> tuple[str, str]:
    """(addr_class, normalised address). IPv4-mapped IPv6 addresses are classed as their IPv4
    address; "private" is any non-global unicast (RFC 1918, ULA, CGNAT, reserved). Cached:
    parsing and classing an address costs microseconds and a workload talks to few."""
    if family == Family.UNIX:
        return "unix", canonical_unix_socket(address)
    if family not in (Family.INET, Family.INET6):
        return "other", address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "other", address
    probe = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    if probe.is_unspecified:
        cls = "unspecified"
    elif probe.is_loopback:
        cls = "loopback"
    elif probe.is_link_local:
        cls = "link-local"
    elif probe.is_multicast:
        cls = "multicast"
    elif probe.is_global:
        cls = "public"
    else:
        cls = "private"
    return cls, str(ip)


def connect_item(record: TraceRecord, item_of: ProgramItem = program_item) -> ConnectItem:
    event: ConnectEvent = record.event
    family = event.family
    if type(family) is not Family:  # the decoder's events carry the member already
        family = Family(family)
    addr_class, address = address_class(family, event.address)
    port = 0 if family == Family.UNIX else int(event.port)
    program = record.program
    exe = item_of(program).exe if program is not None and program.exe else UNKNOWN
    return _connect_item(family.value, addr_class, address, port, event.sock_type.value, exe)


# Items are immutable: one object per distinct item is handed out again (the set lookups that
# follow then also compare by identity first), and repeated events build nothing.
_connect_item = lru_cache(maxsize=4096)(ConnectItem)


@lru_cache(maxsize=8192)
def _write_item(path: str | None, resolved: bool, op: str) -> WriteItem:
    return _write_pattern_item(canonical_location(path, resolved), op)


# one object per pattern too: the new names of one family (a temp file per request) share it
_write_pattern_item = lru_cache(maxsize=4096)(WriteItem)


def open_op(flags: int, mode: int) -> str:
    """create if O_CREAT (or O_TMPFILE), else truncate if O_TRUNC, else append if O_APPEND,
    else write; a create whose mode sets S_ISUID/S_ISGID is "setuid"."""
    if flags & (O_CREAT | O_TMPFILE):
        return "setuid" if mode & (stat.S_ISUID | stat.S_ISGID) else "create"
    if flags & O_TRUNC:
        return "truncate"
    if flags & O_APPEND:
        return "append"
    return "write"


def chmod_op(mode: int) -> str:
    """setuid if the new mode has S_ISUID or S_ISGID, else chmod+x if it has any x bit, else
    chmod. The old mode is not known, so "gains x" means "the new mode has x"."""
    if mode & (stat.S_ISUID | stat.S_ISGID):
        return "setuid"
    if mode & 0o111:
        return "chmod+x"
    return "chmod"


_SIMPLE_OPS = {FileOp.UNLINK: "unlink", FileOp.RMDIR: "rmdir", FileOp.MKDIR: "mkdir",
               FileOp.MKNOD: "mknod", FileOp.TRUNCATE: "truncate"}


def write_ops(record: TraceRecord) -> list[tuple[str, bool, str]]:
    """(path, resolved, op class) per written location of a file record. A rename gives two
    (the old name as rename-from, the new as rename-to); link and symlink name the new link
    (path2: a symlink's target is not a write)."""
    event: FileEvent = record.event
    op = event.op
    if op is FileOp.RENAME:
        return [(record.path, record.path_resolved, "rename-from"),
                (record.path2, record.path2_resolved, "rename-to")]
    if op in (FileOp.LINK, FileOp.SYMLINK):
        return [(record.path2, record.path2_resolved, "link" if op is FileOp.LINK else "symlink")]
    if op is FileOp.OPEN:
        cls = open_op(event.open_flags, event.mode)
    elif op is FileOp.CHMOD:
        cls = chmod_op(event.mode)
    else:
        cls = _SIMPLE_OPS.get(op, "write")
    return [(record.path, record.path_resolved, cls)]


def extract_items(record: TraceRecord, item_of: ProgramItem = program_item, *,
                  ops: list[tuple[str, bool, str]] | None = None) -> list[Item]:
    """The items one record contributes; ``item_of(program)`` names a program (the detector
    follows its exe through the container's layers).

    * records with ``runtime_setup`` (runc preparing the container) give nothing;
    * exec: failed execs (retval != 0) give nothing; a successful one gives an ExecItem of
      ``record.program`` (when its exe is unknown: the path as exec'd) and a LineageItem
      ``item_of(record.parent_program)`` -> it; none when the parent is not known (a parent
      the agent never saw says nothing about the program: its own exec item is checked);
    * connect: one ConnectItem by ``record.program``'s exe (``?`` when unknown), failed
      connects included (a refused connect is behaviour);
    * write: one WriteItem per written location (two for a rename), none when the result is
      known and negative (an open reported at entry has no result yet and counts).

    ``ops`` is ``write_ops(record)`` when the caller already computed it.
    """
    if record.runtime_setup:
        return []
    event = record.event
    if isinstance(event, ExecEvent):
        if event.retval != 0:
            return []
        item = exec_item(record, item_of)
        parent = record.parent_program
        if parent is None or not parent.exe:
            return [item]
        return [item, LineageItem(item_of(parent).compact(), item.compact())]
    if isinstance(event, ConnectEvent):
        return [connect_item(record, item_of)]
    if isinstance(event, FileEvent):
        if event.result_known and event.retval < 0:
            return []
        if ops is None:
            ops = write_ops(record)
        return [_write_item(path, ok, op) for path, ok, op in ops]
    return []


# -- the bounded set ----------------------------------------------------------------------------

DEFAULT_CAP = 4096
FORMAT_VERSION = 1


def _similarity(a: Item, b: Item) -> int:
    """How alike two items of one kind are (0 = unrelated); used only by ItemSet.nearest."""
    if isinstance(a, ExecItem):
        return ((4 if a.exe == b.exe else 0) + (2 if a.argv0 == b.argv0 else 0)
                + (2 if os.path.dirname(a.exe) == os.path.dirname(b.exe) else 0))
    if isinstance(a, LineageItem):
        return (2 if a.parent == b.parent else 0) + (2 if a.child == b.child else 0)
    if isinstance(a, ConnectItem):
        if a.family != b.family:
            return 0
        return ((4 if a.address == b.address else 0) + (2 if a.port == b.port else 0)
                + (2 if a.exe == b.exe else 0) + (1 if a.addr_class == b.addr_class else 0)
                + (1 if a.protocol == b.protocol else 0))
    return ((4 if a.path == b.path else 0) + (1 if a.op == b.op else 0)
            + (2 if os.path.dirname(a.path) == os.path.dirname(b.path) else 0))


def _tails(path: str) -> list[str]:
    """``/a/b/c`` -> ``a/b/c``, ``b/c``, ``c``: the relative names the path could be given as."""
    parts = path.strip("/").split("/")
    return ["/".join(parts[i:]) for i in range(len(parts)) if parts[i]]


# A candidate must share more than its class/protocol/op to be called "nearest".
_MIN_SIMILARITY = 2


class ItemSet:
    """Items by kind, each kind capped (insertion order kept; nothing is evicted).

    ``add`` returns True when the item was not in the set (it is new), whether or not there was
    room to keep it; when a kind is full the item is dropped and ``overflowed[kind]`` counts it,
    so a profile that keeps growing past its cap stays visibly unstable rather than silently
    "stable".
    """

    def __init__(self, caps: dict[str, int] | None = None, *, cap: int = DEFAULT_CAP) -> None:
        self.caps = {kind: cap for kind in KINDS}
        if caps:
            for kind, value in caps.items():
                if kind not in self.caps:
                    raise ValueError(f"unknown item kind {kind!r}")
                self.caps[kind] = int(value)
        self._items: dict[str, dict[Item, None]] = {kind: {} for kind in KINDS}
        self.overflowed: dict[str, int] = dict.fromkeys(KINDS, 0)
        # learned write patterns with a wildcard, by op; (op, name) of learned writes whose
        # directory was not resolved, and (op, every tail of the path) of resolved ones: see
        # covers()
        self._wild_writes: dict[str, list[str]] = {}
        self._relative_writes: set[tuple[str, str]] = set()
        self._write_tails: set[tuple[str, str]] = set()

    def add(self, item: Item) -> bool:
        bucket = self._items[item.KIND]
        if item in bucket:
            return False
        if len(bucket) >= self.caps[item.KIND]:
            self.overflowed[item.KIND] += 1
        else:
            bucket[item] = None
            if isinstance(item, WriteItem):
                self._index_write(item)
        return True

    def _index_write(self, item: WriteItem) -> None:
        if "*" in item.path:
            self._wild_writes.setdefault(item.op, []).append(item.path)
        if item.path.startswith(UNRESOLVED_PREFIX):
            self._relative_writes.add((item.op, item.path[len(UNRESOLVED_PREFIX):]))
        elif item.path.startswith("/"):
            self._write_tails.update((item.op, tail) for tail in _tails(item.path))

    def covers(self, item: Item) -> bool:
        """Whether a learned pattern takes in `item` though its own pattern differs:

        * a write whose path a learned wildcard write of the same op matches (``/tmp/req.*``
          covers ``/tmp/req.JADRCI``, a mktemp name that canonicalisation could not tell from a
          word);
        * the same write seen with and without its directory: a relative path whose directory
          could not be resolved (``?rel:app.log.*.gz``: gzip's ``openat(dirfd, name)`` by a
          process gone before the agent could ask where its dirfd pointed) and an absolute
          path ending in it (``/var/log/app/app.log.*.gz``), same op, either way round;
        * a connect of protocol ``unknown`` (its socket was made before the probes: an agent
          that joins a busy node or restarts) and the same connect learned as tcp, udp or other.

        Called only for items not in the set, so the scans stay off the common path."""
        if isinstance(item, WriteItem):
            patterns = self._wild_writes.get(item.op)
            if patterns and any(pattern_matches(p, item.path) for p in patterns):
                return True
            if item.path.startswith(UNRESOLVED_PREFIX):
                return (item.op, item.path[len(UNRESOLVED_PREFIX):]) in self._write_tails
            if item.path.startswith("/") and self._relative_writes:
                return any((item.op, tail) in self._relative_writes
                           for tail in _tails(item.path))
        if isinstance(item, ConnectItem) and item.protocol == "unknown":
            learned = self._items[item.KIND]
            return any(ConnectItem(item.family, item.addr_class, item.address, item.port,
                                   protocol, item.exe) in learned
                       for protocol in ("tcp", "udp", "other"))
        return False

    def update(self, items: Iterable[Item]) -> int:
        """Adds all; returns how many were new."""
        return sum(self.add(item) for item in items)

    def __contains__(self, item: object) -> bool:
        bucket = self._items.get(getattr(item, "KIND", None))
        return bucket is not None and item in bucket

    def __len__(self) -> int:
        return sum(len(bucket) for bucket in self._items.values())

    def __iter__(self) -> Iterator[Item]:
        for bucket in self._items.values():
            yield from bucket

    def items(self, kind: str) -> list[Item]:
        return list(self._items[kind])

    def count(self, kind: str) -> int:
        return len(self._items[kind])

    def is_full(self, kind: str) -> bool:
        return len(self._items[kind]) >= self.caps[kind]

    def to_msgpack_obj(self) -> dict:
        """Plain dicts, lists, str and int: safe for msgpack.packb (no pickle)."""
        return {
            "version": FORMAT_VERSION,
            "caps": dict(self.caps),
            "overflowed": dict(self.overflowed),
            "items": {kind: [list(item.key()) for item in bucket]
                      for kind, bucket in self._items.items()},
        }

    @classmethod
    def from_msgpack_obj(cls, obj: object, caps: dict[str, int] | None = None) -> ItemSet:
        """Rebuilds a set; ValueError on anything malformed. `caps` overrides the stored caps
        (items beyond a smaller cap count as overflowed)."""
        if not isinstance(obj, dict) or obj.get("version") != FORMAT_VERSION:
            raise ValueError("not an item set (missing or unsupported version)")
        stored_caps, items = obj.get("caps", {}), obj.get("items")
        overflowed = obj.get("overflowed", {})
        if not (isinstance(stored_caps, dict) and isinstance(items, dict)
                and isinstance(overflowed, dict)):
            raise ValueError("item set: caps, items and overflowed must be maps")
        try:
            merged = {k: int(v) for k, v in stored_caps.items()} | dict(caps or {})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"item set: bad caps: {exc}") from None
        result = cls(merged)
        for kind, keys in items.items():
            if kind not in ITEM_TYPES or not isinstance(keys, list):
                raise ValueError(f"item set: bad item kind or list {kind!r}")
            for key in keys:
                if not isinstance(key, list | tuple):
                    raise ValueError(f"item set: bad {kind} key {key!r}")
                result.add(item_from_key(kind, key))
        for kind, count in overflowed.items():
            if kind not in result.overflowed or type(count) is not int or count < 0:
                raise ValueError(f"item set: bad overflow count {kind!r}: {count!r}")
            result.overflowed[kind] += count
        return result

    def diff(self, other: ItemSet) -> dict[str, list[Item]]:
        """Per kind, the items in this set that `other` does not have (insertion order)."""
        return {kind: [item for item in bucket if item not in other._items[kind]]
                for kind, bucket in self._items.items()}

    def nearest(self, item: Item) -> Item | None:
        """The most similar other known item of the same kind, or None when nothing shares
        more than its class. Scores (higher wins, first-learned wins ties):

        * exec: same exe +4, same argv0 +2, same directory +2;
        * lineage: same parent +2, same child +2;
        * connect (same family only): same address +4, same port +2, same exe +2, same
          address class +1, same protocol +1;
        * write: same path +4, same directory +2, same op +1.

        A linear scan over one kind: meant for explaining alerts, not the per-event path.
        """
        best, best_score = None, _MIN_SIMILARITY - 1
        for known in self._items[item.KIND]:
            if known == item:
                continue
            score = _similarity(item, known)
            if score > best_score:
                best, best_score = known, score
        return best
