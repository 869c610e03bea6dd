"""libbpf through ctypes: the map and ring buffer calls the agent makes on BPF objects another
process loaded (probes/_compile.py hands their fds over), so the long-lived agent never loads
bcc or LLVM.

What ProbeSet needs: map lookup, update, delete, batch lookup and walk (BpfMap), and the
ring buffer (RingBuffer); what quarantine needs (agent/actions.py): cgroup programs queried,
attached and detached (prog_query, prog_attach, prog_detach, prog_fd, prog_info). Debian's
libbpf1 (libbpf.so.1, 1.1+) provides it; its calls return a negative errno on failure.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from driftwarden.core.errors import HostSupportError, ProbeLoadError
from driftwarden.probes._layout import MapLayout

log = logging.getLogger(__name__)

LIBBPF = "libbpf.so.1"
BPF_ANY = 0
BPF_NOEXIST = 1
# bpf_map_type values (linux/bpf.h) whose maps hold one value per possible CPU
PER_CPU_MAP_TYPES = frozenset({5, 6, 10})  # PERCPU_HASH, PERCPU_ARRAY, LRU_PERCPU_HASH
BPF_OBJ_NAME_LEN = 16

# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class MapInfo(ctypes.Structure):
    """The leading fields of struct bpf_map_info (linux/bpf.h); the kernel fills what fits."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("key_size", ctypes.c_uint32), ("value_size", ctypes.c_uint32),
                ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
                ("name", ctypes.c_char * BPF_OBJ_NAME_LEN)]


class Libbpf:
    """libbpf.so.1 with the signatures of the calls used here."""

    def __init__(self, path: str = LIBBPF) -> None:
        try:
            lib = ctypes.CDLL(path, use_errno=True)
        except OSError as exc:
            raise HostSupportError(
                f"libbpf is not loadable ({exc}): install Debian's libbpf1 (run `make setup`)"
            ) from None
        vp, i, u32p = ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32)
        signatures: dict[str, tuple[Any, list[Any]]] = {
            "bpf_map_lookup_elem": (i, [i, vp, vp]),
            "bpf_map_update_elem": (i, [i, vp, vp, ctypes.c_uint64]),
            "bpf_map_delete_elem": (i, [i, vp]),
            "bpf_map_get_next_key": (i, [i, vp, vp]),
            "bpf_map_lookup_batch": (i, [i, vp, vp, vp, vp, u32p, vp]),
            "bpf_obj_get_info_by_fd": (i, [i, vp, u32p]),
            "bpf_map_create": (i, [i, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32,
                                   ctypes.c_uint32, vp]),
            "libbpf_num_possible_cpus": (i, []),
            # per-program run statistics (bench/kernel_cost.py)
            "bpf_enable_stats": (i, [i]),
            "bpf_prog_get_fd_by_id": (i, [ctypes.c_uint32]),
            "bpf_task_fd_query": (i, [i, i, ctypes.c_uint32, ctypes.c_char_p, u32p, u32p, u32p,
                                      ctypes.POINTER(ctypes.c_uint64),
                                      ctypes.POINTER(ctypes.c_uint64)]),
            # cgroup programs (agent/actions.py's quarantine)
            "bpf_prog_query": (i, [i, i, ctypes.c_uint32, u32p, u32p, u32p]),
            "bpf_prog_attach": (i, [i, i, i, ctypes.c_uint]),
            "bpf_prog_detach2": (i, [i, i, i]),
            "ring_buffer__new": (vp, [i, SAMPLE_FN, vp, vp]),
            "ring_buffer__poll": (i, [vp, i]),
            "ring_buffer__consume": (i, [vp]),
            "ring_buffer__free": (None, [vp]),
        }
        for name, (restype, argtypes) in signatures.items():
            func = getattr(lib, name)
            func.restype, func.argtypes = restype, argtypes
        self.lib = lib
        cpus = lib.libbpf_num_possible_cpus()
        if cpus < 1:
            raise HostSupportError(f"libbpf could not count the possible CPUs "
                                   f"({os.strerror(-cpus)}): is /sys mounted?")
        self.possible_cpus = cpus

    def map_info(self, fd: int) -> MapInfo:
        """What the kernel says of the map behind `fd`; OSError when it is no map."""
        info = MapInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        _check(self.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
               f"map info of fd {fd}")
        return info

    def map_create(self, map_type: int, name: str, key_size: int, value_size: int,
                   max_entries: int) -> int:
        """A new map's fd (tests make maps this way without compiling a program)."""
        return _check(self.lib.bpf_map_create(map_type, name.encode(), key_size, value_size,
                                              max_entries, None), f"create map {name}")


class ProgInfo(ctypes.Structure):
    """struct bpf_prog_info (linux/bpf.h) up to recursion_misses, the rest as padding: the
    kernel fills what fits; no pointer field is set, so it copies out no arrays."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32),
                ("_before_name", ctypes.c_char * 56), ("name", ctypes.c_char * BPF_OBJ_NAME_LEN),
                ("_before_stats", ctypes.c_char * 112),
                ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
                ("recursion_misses", ctypes.c_uint64)]


BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type


def prog_info(lib: Libbpf, prog_id: int) -> ProgInfo:
    """What the kernel says of the program with this id (run_time_ns and run_cnt count only
    while statistics are on: enable_prog_stats); OSError when it is gone."""
    fd = _check(lib.lib.bpf_prog_get_fd_by_id(prog_id), f"program {prog_id}")
    try:
        info = ProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        _check(lib.lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
               f"info of program {prog_id}")
        return info
    finally:
        os.close(fd)


def prog_fd(lib: Libbpf, prog_id: int) -> int:
    """A new fd of the program with this id (the caller closes it); FileNotFoundError when it
    is gone."""
    return _check(lib.lib.bpf_prog_get_fd_by_id(prog_id), f"program {prog_id}")


def prog_query(lib: Libbpf, target_fd: int, attach_type: int) -> list[int]:
    """Ids of the programs attached directly to `target_fd` (a cgroup directory) for
    `attach_type` (BPF_PROG_QUERY, as `bpftool cgroup show` does)."""
    count = ctypes.c_uint32(0)
    _check(lib.lib.bpf_prog_query(target_fd, attach_type, 0, None, None, ctypes.byref(count)),
           "program query")
    size = count.value
    while size:
        ids = (ctypes.c_uint32 * size)()
        count = ctypes.c_uint32(size)
        result = lib.lib.bpf_prog_query(target_fd, attach_type, 0, None, ids, ctypes.byref(count))
        if result == -errno.ENOSPC:  # more were attached since they were counted
            size = max(count.value, 2 * size)
            continue
        _check(result, "program query")
        return [int(ids[n]) for n in range(count.value)]
    return []


def prog_attach(lib: Libbpf, target_fd: int, prog_fd: int, attach_type: int,
                flags: int) -> None:
    _check(lib.lib.bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "program attach")


def prog_detach(lib: Libbpf, target_fd: int, prog_fd: int, attach_type: int) -> None:
    _check(lib.lib.bpf_prog_detach2(prog_fd, target_fd, attach_type), "program detach")


def enable_prog_stats(lib: Libbpf) -> int:
    """Turns per-program run statistics on until the returned fd is closed (BPF_ENABLE_STATS:
    unlike the sysctl, they go off again however this process ends)."""
    return _check(lib.lib.bpf_enable_stats(BPF_STATS_RUN_TIME), "enable BPF run statistics")


def task_fd_program(lib: Libbpf, pid: int, fd: int) -> tuple[int, str] | None:
    """(program id, tracepoint name) when fd `fd` of process `pid` is a perf event with a BPF
    program attached (BPF_TASK_FD_QUERY, as `bpftool perf` does); None otherwise."""
    name = ctypes.create_string_buffer(256)
    name_len = ctypes.c_uint32(ctypes.sizeof(name))
    prog_id, fd_type = ctypes.c_uint32(), ctypes.c_uint32()
    offset, addr = ctypes.c_uint64(), ctypes.c_uint64()
    result = lib.lib.bpf_task_fd_query(pid, fd, 0, name, ctypes.byref(name_len),
                                       ctypes.byref(prog_id), ctypes.byref(fd_type),
                                       ctypes.byref(offset), ctypes.byref(addr))
    if result < 0:
        return None
    return int(prog_id.value), name.value.decode(errors="replace")


def _check(result: int, what: str) -> int:
    if result < 0:
        raise OSError(-result, f"{what}: {os.strerror(-result)}")
    return result


class BpfMap:
    """A map known by its fd, with the key and value types its layout names. Owns the fd."""

    def __init__(self, lib: Libbpf, fd: int, name: str, layout: MapLayout) -> None:
        info = lib.map_info(fd)
        per_cpu = info.type in PER_CPU_MAP_TYPES
        key_size, value_size = ctypes.sizeof(layout.key), ctypes.sizeof(layout.value)
        if (info.key_size, info.value_size, per_cpu) != (key_size, value_size, layout.per_cpu):
            raise ProbeLoadError(
                f"map {name} does not match probes/_layout.py: the kernel has key {info.key_size}"
                f" and value {info.value_size} bytes{' per CPU' if per_cpu else ''}, the layout "
                f"{key_size} and {value_size}{' per CPU' if layout.per_cpu else ''}; update "
                "MAP_LAYOUTS to the C program's declaration")
        self._lib = lib.lib
        self.fd = fd
        self.name = name
        self.layout = layout
        self.max_entries = int(info.max_entries)
        self.cpus = lib.possible_cpus if per_cpu else 1
        # a per-CPU value is one 8-byte-aligned slot per possible CPU
        self._slot = (value_size + 7) // 8 * 8 if per_cpu else value_size
        self.value_bytes = self._slot * self.cpus
        self._batch_ok = True  # until the kernel refuses a batch lookup (Linux < 5.6)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _value(self, buf: Any, offset: int = 0) -> Any:
        if not self.layout.per_cpu:
            return self.layout.value.from_buffer_copy(buf, offset)
        return [self.layout.value.from_buffer_copy(buf, offset + cpu * self._slot)
                for cpu in range(self.cpus)]

    def lookup(self, key: Any) -> Any:
        """The value under `key` (per-CPU maps: a list, one per possible CPU); None if absent."""
        buf = ctypes.create_string_buffer(self.value_bytes)
        result = self._lib.bpf_map_lookup_elem(self.fd, ctypes.byref(key), buf)
        if result == -errno.ENOENT:
            return None
        _check(result, f"lookup in map {self.name}")
        return self._value(buf)

    def update(self, key: Any, value: Any, flags: int = BPF_ANY) -> None:
        """Sets `key` (one value; not for per-CPU maps); OSError (E2BIG when full, ...)."""
        _check(self._lib.bpf_map_update_elem(self.fd, ctypes.byref(key), ctypes.byref(value),
                                             flags), f"update of map {self.name}")

    def delete(self, key: Any) -> bool:
        """Removes `key`; False when it was not there."""
        result = self._lib.bpf_map_delete_elem(self.fd, ctypes.byref(key))
        if result == -errno.ENOENT:
            return False
        _check(result, f"delete from map {self.name}")
        return True

    def items(self) -> list[tuple[Any, Any]]:
        """Every (key, value): batch lookups (one syscall per batch, 6x cheaper than a walk at
        600 entries; Linux 5.6+), else a walk once the kernel refused a batch."""
        if self._batch_ok:
            try:
                return self._items_batch()
            except OSError as exc:
                self._batch_ok = False
                log.info("batch lookups unavailable on map %s (%s): walking it", self.name, exc)
        return self._items_walk()

    def _items_batch(self) -> list[tuple[Any, Any]]:
        key_size = ctypes.sizeof(self.layout.key)
        capacity = max(self.max_entries, 1)
        keys = ctypes.create_string_buffer(key_size * capacity)
        values = ctypes.create_string_buffer(self.value_bytes * capacity)
        token_size = max(key_size, 8)  # hash maps use a u32 bucket, arrays a key
        tokens = (ctypes.create_string_buffer(token_size), ctypes.create_string_buffer(token_size))
        total, first = 0, True
        while total < capacity:
            count = ctypes.c_uint32(capacity - total)
            result = self._lib.bpf_map_lookup_batch(
                self.fd, None if first else tokens[0], tokens[1],
                ctypes.byref(keys, key_size * total),
                ctypes.byref(values, self.value_bytes * total), ctypes.byref(count), None)
            if result < 0 and result != -errno.ENOENT:
                _check(result, f"batch lookup in map {self.name}")
            total += count.value
            if result == -errno.ENOENT:
                break
            ctypes.memmove(tokens[0], tokens[1], token_size)
            first = False
        return [(self.layout.key.from_buffer_copy(keys, n * key_size),
                 self._value(values, n * self.value_bytes)) for n in range(total)]

    def _items_walk(self) -> list[tuple[Any, Any]]:
        out = []
        key, next_key = self.layout.key(), self.layout.key()
        previous = None
        while True:
            result = self._lib.bpf_map_get_next_key(self.fd, previous, ctypes.byref(next_key))
            if result == -errno.ENOENT:
                return out
            _check(result, f"walk of map {self.name}")
            ctypes.memmove(ctypes.byref(key), ctypes.byref(next_key), ctypes.sizeof(key))
            previous = ctypes.byref(key)
            value = self.lookup(key)
            if value is not None:  # gone between the two calls
                out.append((self.layout.key.from_buffer_copy(key), value))


class RingBuffer:
    """libbpf's reader of one BPF_MAP_TYPE_RINGBUF map: `on_sample(ctx, data, size)` gets each
    record (data: its address, valid only during the call) and returns 0. The map's fd stays
    the caller's; free() before closing it."""

    def __init__(self, lib: Libbpf, map_fd: int,
                 on_sample: Callable[[Any, int, int], int]) -> None:
        self._lib = lib.lib
        self._callback = SAMPLE_FN(on_sample)  # referenced here: libbpf holds only the pointer
        pointer = self._lib.ring_buffer__new(map_fd, self._callback, None, None)
        if not pointer:
            code = ctypes.get_errno()
            raise OSError(code, f"ring buffer on fd {map_fd}: {os.strerror(code)}")
        self._rb = pointer

    def poll(self, timeout_ms: int) -> int:
        """Waits up to `timeout_ms` for a wake-up, then consumes; records consumed, or a
        negative errno (-EINTR when a signal came)."""
        return self._lib.ring_buffer__poll(self._rb, timeout_ms)

    def consume(self) -> int:
        """Consumes every record there now, never blocking."""
        return self._lib.ring_buffer__consume(self._rb)

    def free(self) -> None:
        if self._rb:
            self._lib.ring_buffer__free(self._rb)
            self._rb = None
