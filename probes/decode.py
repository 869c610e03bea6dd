"""Ring-buffer record -> typed event, by kind, through a registry with counted errors.

A malformed record never stops the pipeline: it is counted under its kind and reason
(`Decoder.errors`) and skipped.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter
from collections.abc import Callable

from driftwarden.core.errors import MalformedRecord
from driftwarden.probes._layout import (
    AT_FDCWD,
    HEADER_SIZE,
    HEADER_STRUCT,
    EventKind,
    FileOp,
    Flag,
    Limits,
)
from driftwarden.probes.events import (
    ChdirEvent,
    ConnectEvent,
    ExecEvent,
    ExecRepeatEvent,
    ExitEvent,
    Family,
    FileEvent,
    ForkEvent,
    Header,
    KernelEvent,
    SockType,
    format_address,
)

log = logging.getLogger(__name__)

_FILE_OPS = {int(op): op for op in FileOp}
_TWO_PATH_OPS = frozenset({FileOp.RENAME, FileOp.LINK, FileOp.SYMLINK})
# plain ints: IntFlag arithmetic goes through enum machinery on every event
_ARGS_TRUNCATED = int(Flag.ARGS_TRUNCATED | Flag.ARG_CLIPPED)
_PATH_TRUNCATED = int(Flag.PATH_TRUNCATED)
_PATH2_TRUNCATED = int(Flag.PATH2_TRUNCATED)
_FD_ONLY = int(Flag.FD_ONLY)
_FAMILIES = {1: Family.UNIX, 2: Family.INET, 10: Family.INET6}
_SOCK_TYPES = {0: SockType.UNKNOWN, 1: SockType.TCP, 2: SockType.UDP}
_U64 = struct.Struct("<Q")
# Events are NamedTuples: tuple.__new__(cls, values) builds one without the Python-level
# __new__ frame NamedTuple generates (0.2 us instead of 0.5 us a tuple, measured). Every field
# is given, in the class's order.
_new = tuple.__new__


def _text(raw: bytes) -> str:
    # Paths are bytes to the kernel; surrogateescape keeps odd bytes round-trippable.
    return raw.decode("utf-8", "surrogateescape")


def _cstr(buf: bytes, length: int) -> str:
    """A NUL-terminated string of `length` bytes (NUL included) from a kernel buffer."""
    chunk = buf[:length]
    nul = chunk.find(b"\0")
    return (chunk if nul < 0 else chunk[:nul]).decode("utf-8", "surrogateescape")


class Decoder:
    """Decodes raw records for one set of compile-time limits."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.decoded: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()  # "kind:reason" -> count
        self._registry: dict[int, Callable[[Header, bytes, int], KernelEvent]] = {}
        # enum construction costs ~1 us a call: look the members up by value instead
        self._kinds = {int(k): k for k in EventKind}
        self._kind_names = {int(k): k.name.lower() for k in EventKind}
        self._flags: dict[int, Flag] = {}
        self._comms: dict[bytes, str] = {}
        self._addresses: dict[tuple[int, bytes], str] = {}
        # the header is unpacked once in decode_batch(); each kind unpacks only its own fields
        self._exec = _payload_struct(limits, "dw_exec_event")
        self._connect = _payload_struct(limits, "dw_connect_event")
        self._file = _payload_struct(limits, "dw_file_event")
        self._chdir = _payload_struct(limits, "dw_chdir_event")
        self._fork = _payload_struct(limits, "dw_fork_event")
        self._fork_size = limits.size("dw_fork_event")
        self._repeat = _payload_struct(limits, "dw_exec_repeat_event")
        self._repeat_size = limits.size("dw_exec_repeat_event")
        self._connect_offsets = limits.offsets("dw_connect_event")
        self._file_offsets = limits.offsets("dw_file_event")
        # per file record (most records): read once here, not through three lookups each time
        self._file_size = HEADER_SIZE + self._file.size
        self._file_path = self._file_offsets["path"]
        self._path_max = limits.path_max
        self._chdir_path = limits.offsets("dw_chdir_event")["path"]
        self._exec_offsets = limits.offsets("dw_exec_event")
        self.register(EventKind.EXEC, self._decode_exec)
        self.register(EventKind.CONNECT, self._decode_connect)
        self.register(EventKind.FILE, self._decode_file)
        self.register(EventKind.CHDIR, self._decode_chdir)
        self.register(EventKind.FORK, self._decode_fork)
        self.register(EventKind.EXIT, self._decode_exit)
        self.register(EventKind.EXEC_REPEAT, self._decode_exec_repeat)

    def register(self, kind: EventKind, fn: Callable[[Header, bytes, int], KernelEvent]) -> None:
        """fn(header, raw record, header flags as a plain int) -> event."""
        self._registry[int(kind)] = fn

    def decode(self, raw: bytes) -> KernelEvent | None:
        return self.decode_batch([raw])[0]

    def _comm(self, raw: bytes) -> str:
        """A comm buffer's text; a process's comm repeats in all its events: cached (bounded)."""
        if len(self._comms) >= 4096:
            self._comms.clear()
        comm = self._comms[raw] = _cstr(raw, len(raw))
        return comm

    def decode_batch(self, records: list[bytes]) -> list[KernelEvent | None]:
        """One event per record, in order; None where a record was malformed (counted). The
        per-record work is one loop here (no call per record but the kind's decoder)."""
        unpack_header = HEADER_STRUCT.unpack_from
        registry, flag_cache, comms = self._registry, self._flags, self._comms
        kinds, kind_names = self._kinds, self._kind_names
        errors, decoded = self.errors, self.decoded
        out: list[KernelEvent | None] = []
        append = out.append
        for raw in records:
            if len(raw) < HEADER_SIZE:
                errors["unknown:short-header"] += 1
                append(None)
                continue
            fields = unpack_header(raw)
            kind_number = fields[4]
            fn = registry.get(kind_number)
            if fn is None:
                errors[f"kind-{kind_number}:unknown-kind"] += 1
                append(None)
                continue
            raw_flags = fields[5]
            flags = flag_cache.get(raw_flags)
            if flags is None:
                flags = flag_cache[raw_flags] = Flag(raw_flags)
            comm = comms.get(fields[13])
            if comm is None:
                comm = self._comm(fields[13])
            # positional, in Header's field order (keywords cost more per event)
            header = _new(Header, (kinds[kind_number], fields[0], fields[1], fields[6],
                                   fields[7], fields[8], fields[9], fields[10], comm, flags,
                                   fields[11], fields[2], fields[3]))
            try:
                event = fn(header, raw, raw_flags)
            except (MalformedRecord, ValueError) as exc:
                errors[f"{kind_names[kind_number]}:{exc}"] += 1
                append(None)
                continue
            decoded[kind_names[kind_number]] += 1
            append(event)
        return out

    def decode_many(self, records: list[bytes]) -> list[KernelEvent]:
        return [event for event in self.decode_batch(records) if event is not None]

    # -- per kind -------------------------------------------------------------

    @staticmethod
    def _need(raw: bytes, size: int, what: str) -> None:
        if len(raw) < size:
            raise MalformedRecord(f"short-{what}")

    def _decode_exec(self, h: Header, raw: bytes, flags: int) -> ExecEvent:
        s = self._exec
        off = self._exec_offsets
        # the kernel always sends the whole filename buffer: the record is trimmed after args
        self._need(raw, off["args"], "exec")
        retval, dirfd, argc, args_size, filename_len, _pad, dedup_key = s.unpack_from(
            raw, HEADER_SIZE)
        if filename_len > self.limits.path_max or args_size > self.limits.args_size:
            raise MalformedRecord("exec-lengths")
        fname_start = off["filename"]
        filename = _cstr(raw[fname_start : fname_start + self.limits.path_max], filename_len)
        args_start = off["args"]
        args_blob = raw[args_start : args_start + args_size]
        if len(args_blob) != args_size:
            raise MalformedRecord("short-exec-args")
        entries = args_blob.split(b"\0")
        if entries[-1] == b"":
            entries.pop()  # each entry ends with a NUL: nothing follows the last one
        argv = tuple(_text(a) for a in entries[:argc])
        if len(argv) != argc:
            raise MalformedRecord("exec-argc")
        # positional: header, filename, argv, retval, dirfd, argv_truncated,
        # filename_truncated, dedup_key
        return _new(ExecEvent, (h, filename, argv, retval, dirfd,
                                bool(flags & _ARGS_TRUNCATED), bool(flags & _PATH_TRUNCATED),
                                dedup_key))

    def _decode_connect(self, h: Header, raw: bytes, flags: int) -> ConnectEvent:
        s = self._connect
        off = self._connect_offsets
        self._need(raw, off["known_key"] + 8, "connect")
        retval, fd, family_no, port, sock_type, path_len = s.unpack_from(raw, HEADER_SIZE)
        (known_key,) = _U64.unpack_from(raw, off["known_key"])
        family = _FAMILIES.get(family_no, Family.OTHER)
        if family is Family.UNIX:
            if path_len > 108:
                raise MalformedRecord("unix-path-length")
            raw_path = raw[off["unix_path"] : off["unix_path"] + path_len]
            if raw_path.startswith(b"\0"):
                # abstract socket: shown as "@name", like ss(8) does
                address = "@" + _text(raw_path[1:].rstrip(b"\0"))
            else:
                address = _cstr(raw_path, len(raw_path))
        else:
            addr = raw[off["addr"] : off["addr"] + 16]
            address = self._addresses.get((family_no, addr))
            if address is None:
                # formatting goes through ipaddress (microseconds); a workload talks to few
                if len(self._addresses) >= 4096:
                    self._addresses.clear()
                address = self._addresses[family_no, addr] = format_address(family, addr)
        # positional: header, family, family_number, address, port, sock_type, retval, fd,
        # known_key
        return _new(ConnectEvent, (h, family, family_no, address, port,
                                   _SOCK_TYPES.get(sock_type, SockType.OTHER), retval, fd,
                                   known_key))

    def _decode_file(self, h: Header, raw: bytes, flags: int) -> FileEvent:
        if len(raw) < self._file_size:  # _need, inlined: most records are file records
            raise MalformedRecord("short-file")
        (op_no, path_len, path2_len, _pad, retval, dirfd, dirfd2, open_flags, mode, _pad2,
         known_key) = self._file.unpack_from(raw, HEADER_SIZE)
        op = _FILE_OPS.get(op_no)
        if op is None:
            raise MalformedRecord(f"file-op-{op_no}")
        pmax = self._path_max
        if path_len > pmax or path2_len > pmax:
            raise MalformedRecord("file-lengths")
        path = None
        if not flags & _FD_ONLY:
            start = self._file_path
            chunk = raw[start : start + path_len]
            if len(chunk) != path_len:
                raise MalformedRecord("short-file-path")
            nul = chunk.find(b"\0")  # _cstr, inlined: most records are file records
            path = (chunk if nul < 0 else chunk[:nul]).decode("utf-8", "surrogateescape")
        path2 = None
        if op in _TWO_PATH_OPS:
            start = self._file_offsets["path2"]
            chunk = raw[start : start + path2_len]
            if len(chunk) != path2_len:
                raise MalformedRecord("short-file-path2")
            path2 = _cstr(chunk, path2_len)
        # positional, in FileEvent's field order: header, op, path, path2, dirfd, dirfd2,
        # open_flags, mode, retval, path_truncated, path2_truncated, known_key
        return _new(FileEvent, (h, op, path, path2, dirfd,
                                dirfd2 if path2 is not None else AT_FDCWD, open_flags, mode,
                                retval, bool(flags & _PATH_TRUNCATED),
                                bool(flags & _PATH2_TRUNCATED), known_key))

    def _decode_chdir(self, h: Header, raw: bytes, flags: int) -> ChdirEvent:
        s = self._chdir
        self._need(raw, HEADER_SIZE + s.size, "chdir")
        retval, fd, path_len, _pad, cwd_base = s.unpack_from(raw, HEADER_SIZE)
        path = None
        if not flags & _FD_ONLY:
            if path_len > self.limits.path_max:
                raise MalformedRecord("chdir-length")
            chunk = raw[self._chdir_path : self._chdir_path + path_len]
            if len(chunk) != path_len:
                raise MalformedRecord("short-chdir-path")
            path = _cstr(chunk, path_len)
        return ChdirEvent(header=h, path=path, fd=fd, retval=retval, cwd_base=cwd_base)

    def _decode_fork(self, h: Header, raw: bytes, flags: int) -> ForkEvent:
        self._need(raw, self._fork_size, "fork")
        child_start_ns, child_tgid, _pad = self._fork.unpack_from(raw, HEADER_SIZE)
        if not child_tgid:
            raise MalformedRecord("fork-child")
        return ForkEvent(header=h, child_tgid=child_tgid, child_start_ns=child_start_ns)

    def _decode_exec_repeat(self, h: Header, raw: bytes, flags: int) -> ExecRepeatEvent:
        self._need(raw, self._repeat_size, "exec-repeat")
        dedup_key, retval, _pad = self._repeat.unpack_from(raw, HEADER_SIZE)
        return ExecRepeatEvent(header=h, dedup_key=dedup_key, retval=retval)

    def _decode_exit(self, h: Header, raw: bytes, flags: int) -> ExitEvent:
        return ExitEvent(header=h)  # the header is the whole record: decode() checked its size


def _payload_struct(limits: Limits, name: str) -> struct.Struct:
    """The kind's fixed fields after the common header (unpacked at offset HEADER_SIZE)."""
    header_format = HEADER_STRUCT.format.lstrip("<")
    full = limits.fixed_struct(name).format
    assert full.startswith("<" + header_format)
    return struct.Struct("<" + full[1 + len(header_format):])
