"""Python mirror of probes/dw_event.h.

Each struct is a list of (field, struct format) in declaration order; offsets come from
`struct.calcsize` over the little-endian, padding-free formats. tests/test_layout.py compiles
the C header with gcc and checks every offset and size against these tables, so the two cannot
drift apart silently.
"""

from __future__ import annotations

import ctypes
import enum
import struct
from dataclasses import dataclass
from functools import cached_property


class EventKind(enum.IntEnum):
    EXEC = 1
    CONNECT = 2
    FILE = 3
    CHDIR = 4
    FORK = 5
    EXIT = 6
    EXEC_REPEAT = 7


KIND_MAX = 8


class Counter(enum.IntEnum):
    EMITTED = 0
    SUPPRESSED = 1
    DROPPED = 2
    READ_FAILED = 3
    OVER_BUDGET = 4
    KNOWN = 5


COUNTER_MAX = 6


class FileOp(enum.IntEnum):
    OPEN = 1
    RENAME = 2
    UNLINK = 3
    RMDIR = 4
    CHMOD = 5
    LINK = 6
    SYMLINK = 7
    MKDIR = 8
    MKNOD = 9
    TRUNCATE = 10


class Flag(enum.IntFlag):
    PATH_TRUNCATED = 0x0001
    PATH2_TRUNCATED = 0x0002
    ARGS_TRUNCATED = 0x0004
    ARG_CLIPPED = 0x0008
    READ_FAILED = 0x0010
    FD_ONLY = 0x0020
    EXECVEAT = 0x0040
    CWD_LOST = 0x0080
    FORK_UNSENT = 0x0100


AT_FDCWD = -100
RESULT_UNKNOWN = 0x7FFFFFFF  # retval of an event sent before its syscall ran (opens, by default)
COMM_LEN = 16
UNIX_PATH_LEN = 108

HEADER_FIELDS: list[tuple[str, str]] = [
    ("ts_ns", "Q"),
    ("cgroup_id", "Q"),
    ("start_ns", "Q"),
    ("parent_start_ns", "Q"),
    ("kind", "H"),
    ("flags", "H"),
    ("pid", "I"),
    ("tgid", "I"),
    ("ppid", "I"),
    ("uid", "I"),
    ("gid", "I"),
    ("suppressed", "I"),
    ("_pad", "I"),
    ("comm", f"{COMM_LEN}s"),
]


@dataclass(frozen=True)
class Limits:
    """Compile-time bounds shared by the BPF program (-D defines) and the decoder."""

    path_max: int = 512
    max_args: int = 32
    max_arg_len: int = 256
    args_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("path_max", "args_size"):
            value = getattr(self, name)
            if value < 64 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 64, got {value}")
        if not 1 <= self.max_args <= 128:
            raise ValueError(f"max_args must be 1..128, got {self.max_args}")
        if not 16 <= self.max_arg_len <= self.args_size:
            raise ValueError(f"max_arg_len must be 16..args_size, got {self.max_arg_len}")

    def cflags(self) -> list[str]:
        return [
            f"-DDW_PATH_MAX={self.path_max}",
            f"-DDW_MAX_ARGS={self.max_args}",
            f"-DDW_MAX_ARG_LEN={self.max_arg_len}",
            f"-DDW_ARGS_SIZE={self.args_size}",
        ]

    def as_dict(self) -> dict[str, int]:
        return {
            "path_max": self.path_max,
            "max_args": self.max_args,
            "max_arg_len": self.max_arg_len,
            "args_size": self.args_size,
        }

    @cached_property
    def structs(self) -> dict[str, list[tuple[str, str]]]:
        p = self.path_max
        return {
            "dw_event_header": HEADER_FIELDS,
            "dw_exec_event": [
                ("hdr", "header"),
                ("retval", "i"),
                ("dirfd", "i"),
                ("argc", "H"),
                ("args_size", "H"),
                ("filename_len", "H"),
                ("_pad", "H"),
                ("dedup_key", "Q"),
                ("filename", f"{p}s"),
                ("args", f"{self.args_size}s"),
            ],
            "dw_connect_event": [
                ("hdr", "header"),
                ("retval", "i"),
                ("fd", "i"),
                ("family", "H"),
                ("port", "H"),
                ("sock_type", "H"),
                ("path_len", "H"),
                ("addr", "16s"),
                ("unix_path", f"{UNIX_PATH_LEN}s"),
                ("_pad", "I"),
                ("known_key", "Q"),
            ],
            "dw_file_event": [
                ("hdr", "header"),
                ("op", "H"),
                ("path_len", "H"),
                ("path2_len", "H"),
                ("_pad", "H"),
                ("retval", "i"),
                ("dirfd", "i"),
                ("dirfd2", "i"),
                ("open_flags", "I"),
                ("mode", "I"),
                ("_pad2", "I"),
                ("known_key", "Q"),
                ("path", f"{p}s"),
                ("path2", f"{p}s"),
            ],
            "dw_chdir_event": [
                ("hdr", "header"),
                ("retval", "i"),
                ("fd", "i"),
                ("path_len", "H"),
                ("_pad", "H"),
                ("cwd_base", "I"),
                ("path", f"{p}s"),
            ],
            "dw_fork_event": [
                ("hdr", "header"),
                ("child_start_ns", "Q"),
                ("child_tgid", "I"),
                ("_pad", "I"),
            ],
            "dw_exec_repeat_event": [
                ("hdr", "header"),
                ("dedup_key", "Q"),
                ("retval", "i"),
                ("_pad", "I"),
            ],
            "dw_exit_event": [
                ("hdr", "header"),
            ],
        }

    def _fmt(self, fields: list[tuple[str, str]]) -> str:
        header = "".join(f for _, f in HEADER_FIELDS)
        return "<" + "".join(header if f == "header" else f for _, f in fields)

    def offsets(self, struct_name: str) -> dict[str, int]:
        """Field -> byte offset, as C's offsetof would give it."""
        fields = self.structs[struct_name]
        out: dict[str, int] = {}
        for i, (name, _) in enumerate(fields):
            out[name] = struct.calcsize(self._fmt(fields[:i]))
        return out

    def size(self, struct_name: str) -> int:
        return struct.calcsize(self._fmt(self.structs[struct_name]))

    def fixed_struct(self, struct_name: str) -> struct.Struct:
        """The fixed-size leading part (header + scalars) before the first variable buffer."""
        fields = self.structs[struct_name]
        fixed = []
        for name, f in fields:
            if name in ("filename", "args", "path", "path2", "unix_path", "addr"):
                break
            fixed.append((name, f))
        return struct.Struct(self._fmt(fixed))


HEADER_STRUCT = struct.Struct("<" + "".join(f for _, f in HEADER_FIELDS))
HEADER_SIZE = HEADER_STRUCT.size


# -- the maps userspace reads and writes (ProbeSet through probes/_libbpf.py) ----------------
# Mirrors of the key/value structs declared in probes/driftwarden.bpf.c; tests/test_layout.py
# compiles those declarations with gcc and checks every size and offset against these.


class DedupKey(ctypes.Structure):
    """struct dw_dedup_key: the key of `dedup` and of `known`."""

    _fields_ = [("cgroup_id", ctypes.c_uint64), ("hash", ctypes.c_uint64),
                ("kind", ctypes.c_uint32), ("_pad", ctypes.c_uint32)]


class KnownVal(ctypes.Structure):
    """struct dw_known_val: an entry of `known` (the kernel's baseline filter)."""

    _fields_ = [("last_ns", ctypes.c_uint64), ("hits", ctypes.c_uint64)]


class BudgetKey(ctypes.Structure):
    """struct dw_budget_key: (cgroup, kind) of a token bucket."""

    _fields_ = [("cgroup_id", ctypes.c_uint64), ("kind", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32)]


class BudgetVal(ctypes.Structure):
    """struct dw_budget_val: a token bucket and what it held back and lost."""

    _fields_ = [("tat", ctypes.c_uint64), ("over", ctypes.c_uint64),
                ("dropped", ctypes.c_uint64)]


@dataclass(frozen=True)
class MapLayout:
    """A map's key and value types as declared in the C program; `per_cpu`: one value per
    possible CPU (BPF_PERCPU_*), each padded to 8 bytes."""

    key: type
    value: type
    per_cpu: bool = False


RINGBUF_MAP = "events"  # BPF_RINGBUF_OUTPUT: read through libbpf's ring_buffer__*
# Every other map userspace touches, by its name in the C program. `known` exists only when
# compiled with DW_KNOWN_ENTRIES > 0.
MAP_LAYOUTS: dict[str, MapLayout] = {
    "counters": MapLayout(ctypes.c_uint32, ctypes.c_uint64, per_cpu=True),
    "budget": MapLayout(BudgetKey, BudgetVal),
    "budget_made": MapLayout(ctypes.c_uint32, ctypes.c_uint64, per_cpu=True),
    "known": MapLayout(DedupKey, KnownVal),
    "skip_cgroups": MapLayout(ctypes.c_uint64, ctypes.c_uint8),
    "skip_tgids": MapLayout(ctypes.c_uint32, ctypes.c_uint8),
}
