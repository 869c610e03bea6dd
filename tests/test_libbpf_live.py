"""probes/_libbpf.py on real kernel maps: made with libbpf's bpf_map_create, so no program is
compiled; what ProbeSet relies on (lookup, update, delete, batch lookup and walk agreeing,
per-CPU values, a full map refusing, a layout that does not match the kernel's map refused, an
empty ring buffer read without blocking)."""

from __future__ import annotations

import ctypes
import os

import pytest
from driftwarden.core.errors import ProbeLoadError
from driftwarden.probes._layout import BudgetKey, BudgetVal, DedupKey, KnownVal, MapLayout

pytestmark = pytest.mark.integration

HASH, ARRAY, PERCPU_ARRAY, LRU_HASH, RINGBUF = 1, 2, 6, 9, 27


@pytest.fixture
def libbpf(kernel_ok):
    from driftwarden.probes._libbpf import Libbpf

    return Libbpf()


@pytest.fixture
def make_map(libbpf):
    from driftwarden.probes._libbpf import BpfMap

    made = []

    def make(map_type: int, layout: MapLayout, max_entries: int, name: str = "dw_test"):
        key_size, value_size = ctypes.sizeof(layout.key), ctypes.sizeof(layout.value)
        fd = libbpf.map_create(map_type, name, key_size, value_size, max_entries)
        made.append(BpfMap(libbpf, fd, name, layout))
        return made[-1]

    yield make
    for bpf_map in made:
        bpf_map.close()


def test_update_lookup_delete_on_a_hash_map(make_map):
    known = make_map(HASH, MapLayout(DedupKey, KnownVal), 64)
    key = DedupKey(cgroup_id=4242, hash=0xDEADBEEFCAFEF00D, kind=3)
    assert known.lookup(key) is None
    known.update(key, KnownVal(last_ns=17, hits=0))
    value = known.lookup(key)
    assert (value.last_ns, value.hits) == (17, 0)
    known.update(key, KnownVal(last_ns=18, hits=5))
    assert known.lookup(key).hits == 5
    assert known.lookup(DedupKey(cgroup_id=4242, hash=0xDEADBEEFCAFEF00D, kind=2)) is None
    assert known.delete(key) is True
    assert known.delete(key) is False
    assert known.items() == []


@pytest.mark.parametrize("map_type", [HASH, LRU_HASH])
def test_batch_lookup_and_walk_return_the_same_entries(make_map, map_type):
    budget = make_map(map_type, MapLayout(BudgetKey, BudgetVal), 1024)
    for n in range(600):
        budget.update(BudgetKey(cgroup_id=1000 + n, kind=n % 3 + 1),
                      BudgetVal(tat=n, over=2 * n, dropped=n % 7))

    def as_tuples(items):
        return sorted((k.cgroup_id, k.kind, v.tat, v.over, v.dropped) for k, v in items)

    batch = as_tuples(budget.items())
    assert batch == as_tuples(budget._items_walk())
    assert len(batch) == 600
    assert batch[0] == (1000, 1, 0, 0, 0)
    assert batch[-1] == (1599, 599 % 3 + 1, 599, 1198, 599 % 7)
    assert budget._batch_ok is True  # this kernel (Linux 5.6+) answered in batches


def test_per_cpu_values_come_one_per_possible_cpu(make_map, libbpf):
    counters = make_map(PERCPU_ARRAY, MapLayout(ctypes.c_uint32, ctypes.c_uint64,
                                                per_cpu=True), 48)
    values = counters.lookup(ctypes.c_uint32(5))
    assert len(values) == libbpf.possible_cpus == counters.cpus
    assert [v.value for v in values] == [0] * libbpf.possible_cpus
    items = counters.items()
    assert [k.value for k, _ in items] == list(range(48))
    assert all(len(v) == libbpf.possible_cpus for _, v in items)
    assert counters.lookup(ctypes.c_uint32(48)) is None  # past the end


def test_per_cpu_values_smaller_than_8_bytes_are_padded(make_map, libbpf):
    flags = make_map(PERCPU_ARRAY, MapLayout(ctypes.c_uint32, ctypes.c_uint8, per_cpu=True), 2)
    assert flags.value_bytes == 8 * libbpf.possible_cpus
    assert [v.value for v in flags.lookup(ctypes.c_uint32(1))] == [0] * libbpf.possible_cpus


def test_a_full_map_refuses_with_e2big_and_keeps_what_it_has(make_map):
    skip = make_map(HASH, MapLayout(ctypes.c_uint32, ctypes.c_uint8), 2)
    skip.update(ctypes.c_uint32(1), ctypes.c_uint8(1))
    skip.update(ctypes.c_uint32(2), ctypes.c_uint8(1))
    with pytest.raises(OSError) as info:
        skip.update(ctypes.c_uint32(3), ctypes.c_uint8(1))
    assert info.value.errno == 7  # E2BIG
    assert sorted(k.value for k, _ in skip.items()) == [1, 2]


def test_a_layout_that_does_not_match_the_kernels_map_is_refused(libbpf):
    from driftwarden.probes._libbpf import BpfMap

    fd = libbpf.map_create(HASH, "dw_test", 8, 1, 4)
    try:
        with pytest.raises(ProbeLoadError) as info:
            BpfMap(libbpf, fd, "skip_tgids", MapLayout(ctypes.c_uint32, ctypes.c_uint8))
        assert str(info.value) == (
            "map skip_tgids does not match probes/_layout.py: the kernel has key 8 and value 1 "
            "bytes, the layout 4 and 1; update MAP_LAYOUTS to the C program's declaration")
    finally:
        os.close(fd)


def test_map_info_reports_what_the_kernel_made(libbpf):
    fd = libbpf.map_create(LRU_HASH, "dw_info", 16, 24, 333)
    try:
        info = libbpf.map_info(fd)
        assert (info.type, info.key_size, info.value_size, info.max_entries) == (
            LRU_HASH, 16, 24, 333)
        assert info.name == b"dw_info"
    finally:
        os.close(fd)
    with open("/dev/null") as not_a_map, pytest.raises(OSError):
        libbpf.map_info(not_a_map.fileno())


def test_an_empty_ring_buffer_reads_nothing_without_blocking(libbpf):
    from driftwarden.probes._libbpf import RingBuffer

    fd = libbpf.map_create(RINGBUF, "dw_ring", 0, 0, 4096 * 4)
    seen = []
    ring = RingBuffer(libbpf, fd, lambda _ctx, _data, size: seen.append(size) or 0)
    try:
        assert ring.consume() == 0
        assert ring.poll(0) == 0
        assert seen == []
    finally:
        ring.free()
        ring.free()  # a second free is a no-op
        os.close(fd)


def test_a_ring_buffer_on_a_map_of_another_type_is_an_oserror(libbpf):
    from driftwarden.probes._libbpf import RingBuffer

    fd = libbpf.map_create(HASH, "dw_test", 4, 4, 4)
    try:
        with pytest.raises(OSError):
            RingBuffer(libbpf, fd, lambda _ctx, _data, _size: 0)
    finally:
        os.close(fd)
