"""Capture files: CaptureWriter -> ReplayCapture, FactStore, and every way a file can be bad."""

from __future__ import annotations

import io
import logging
import socket
import time
from pathlib import Path

import msgpack
import pytest
from driftwarden.core.errors import CaptureFileError
from driftwarden.probes._layout import Limits
from driftwarden.probes.capture import (
    FORMAT_VERSION,
    MAGIC,
    CaptureWriter,
    FactStore,
    ReplayCapture,
)

SMALL = Limits(path_max=256, max_args=16, max_arg_len=128, args_size=2048)
COUNTERS = {"exec": {"emitted": 5, "suppressed": 1, "dropped": 0, "read_failed": 0},
            "file": {"emitted": 2, "suppressed": 0, "dropped": 3, "read_failed": 1}}


def _records(n: int) -> list[bytes]:
    # raw bytes of every value, incl. NUL and 0xff: stored as msgpack bin, not text
    return [bytes([i % 256]) * (i + 1) + b"\0\xff" for i in range(n)]


def _write(path: Path, records: list[bytes], *, limits: Limits = SMALL,
           clock_offset_ns: int = 1_700_000_000_123_456_789, counters=COUNTERS,
           close: bool = True) -> list[int]:
    """Writes a capture; returns the file size after the header and after each record."""
    writer = CaptureWriter(path, limits, clock_offset_ns)
    writer.flush()
    sizes = [path.stat().st_size]
    for raw in records:
        writer.record(raw)
        writer.flush()
        sizes.append(path.stat().st_size)
    assert writer.records == len(records)
    if close:
        writer.close(counters)
    return sizes


def test_round_trip(tmp_path):
    path = tmp_path / "c.dwcap"
    records = _records(10)
    before = time.time()
    _write(path, records)
    replay = ReplayCapture(path, batch_size=4)
    assert replay.complete is True
    assert len(replay) == 10
    assert replay.limits == SMALL
    assert replay.clock_offset_ns == 1_700_000_000_123_456_789
    assert replay.header.version == FORMAT_VERSION == 3
    assert replay.header.host == socket.gethostname()
    assert before - 5 <= replay.header.created <= time.time()
    assert replay.counters() == COUNTERS
    batches = []
    while (batch := replay.read_batch(0.0)) is not None:
        batches.append(batch)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert [r for b in batches for r in b] == records
    assert replay.read_batch(0.0) is None  # stays exhausted
    replay.close()


def test_file_starts_with_magic_then_header(tmp_path):
    path = tmp_path / "c.dwcap"
    _write(path, [b"x"], clock_offset_ns=-5)
    data = path.read_bytes()
    assert data.startswith(MAGIC) and MAGIC == b"DWCAP\x01\n"
    entries = list(msgpack.Unpacker(io.BytesIO(data[len(MAGIC):]), raw=False))
    assert [e["t"] for e in entries] == ["hdr", "ev", "end"]
    assert entries[0]["limits"] == SMALL.as_dict()
    assert entries[0]["clock_offset_ns"] == -5
    assert entries[1] == {"t": "ev", "b": b"x"}
    assert ReplayCapture(path).clock_offset_ns == -5


def test_empty_capture(tmp_path):
    path = tmp_path / "c.dwcap"
    writer = CaptureWriter(path, Limits(), 0)
    writer.close()
    writer.close()  # idempotent
    replay = ReplayCapture(path)
    assert (len(replay), replay.complete, replay.counters(), replay.limits) == (
        0, True, {}, Limits())
    assert replay.read_batch(0.0) is None


def test_facts_answer_as_of_their_record(tmp_path):
    path = tmp_path / "c.dwcap"
    writer = CaptureWriter(path, Limits(), 0)
    assert writer.record(b"e0") == 0
    writer.fact(("cwd", 100), "/a", 0)
    writer.fact(("attr", 7), {"state": "pending", "cgroup_id": 7}, 0)
    assert writer.record(b"e1") == 1
    assert writer.record(b"e2") == 2
    writer.fact(("cwd", 100), "/b", 2)
    writer.fact(("fd_path", 100, 3), None, 2)
    assert writer.record(b"e3") == 3
    # written late (a view delivered after waiting) for an earlier record
    writer.fact(("attr", 7), {"state": "container", "cgroup_id": 7}, 1)
    writer.close()
    replay = ReplayCapture(path)
    facts = replay.facts
    assert len(facts) == 3  # distinct keys; list keys come back as tuples
    replay.set_position_for(0)
    assert facts.get(("cwd", 100)) == "/a"
    assert facts.get(("attr", 7)) == {"state": "pending", "cgroup_id": 7}
    assert facts.get(("fd_path", 100, 3), "default") == "default"  # not asked yet
    replay.set_position_for(1)
    assert facts.get(("cwd", 100)) == "/a"
    assert facts.get(("attr", 7)) == {"state": "container", "cgroup_id": 7}
    replay.set_position_for(2)
    assert facts.get(("cwd", 100)) == "/b"
    assert facts.get(("fd_path", 100, 3), "default") is None  # a recorded None is an answer
    replay.set_position_for(3)
    assert facts.get(("cwd", 100)) == "/b"  # the latest one
    assert facts.get(("attr", 7)) == {"state": "container", "cgroup_id": 7}
    assert facts.get(("cwd", 999)) is None
    assert facts.get(("cwd", 999), "x") == "x"


def test_fact_entries_carry_the_record_number(tmp_path):
    path = tmp_path / "c.dwcap"
    writer = CaptureWriter(path, Limits(), 0)
    writer.record(b"e0")
    writer.fact(("ppid", 5), 1, 0)
    writer.close()
    entries = list(msgpack.Unpacker(io.BytesIO(path.read_bytes()[len(MAGIC):]), raw=False))
    assert entries[2] == {"t": "fact", "k": ["ppid", 5], "v": 1, "s": 0}


def test_fact_store_semantics():
    store = FactStore()
    store.add("k", "a", 5)
    store.add("k", "b", 10)
    store.add("k", "c", 12)
    store.add("k", "d", 7)  # out of order: slotted in by record number
    store.add("k", "e", 12)  # same record, written later: wins
    store.add(("other", 1), 42, 3)
    expected = {0: None, 4: None, 5: "a", 6: "a", 7: "d", 9: "d", 10: "b", 11: "b", 12: "e",
                13: "e", 1000: "e"}
    for position, value in expected.items():
        store.position = position
        assert store.get("k") == value, position
    store.position = 2
    assert store.get(("other", 1), "none yet") == "none yet"
    store.position = 3
    assert store.get(("other", 1)) == 42
    assert store.get("missing") is None
    assert store.get("missing", 0) == 0
    assert len(store) == 2


def test_cut_mid_entry_replays_complete_entries(tmp_path, caplog):
    path = tmp_path / "c.dwcap"
    records = _records(6)
    sizes = _write(path, records)
    data = path.read_bytes()
    # cut inside record 4 (0-based 3): records 0..2 are whole, the end entry is gone
    cut = (sizes[3] + sizes[4]) // 2
    assert sizes[3] < cut < sizes[4]
    path.write_bytes(data[:cut])
    with caplog.at_level(logging.WARNING, logger="driftwarden.probes.capture"):
        replay = ReplayCapture(path)
    assert replay.complete is False
    assert len(replay) == 3
    assert replay.read_batch(0.0) == records[:3]
    assert replay.counters() == {}
    assert "no end marker" in caplog.text and "3 records" in caplog.text


def test_cut_before_end_entry(tmp_path):
    path = tmp_path / "c.dwcap"
    records = _records(4)
    sizes = _write(path, records)
    path.write_bytes(path.read_bytes()[: sizes[-1]])
    replay = ReplayCapture(path)
    assert replay.complete is False
    assert replay.read_batch(0.0) == records
    # a recorder that was killed: never closed
    path2 = tmp_path / "killed.dwcap"
    _write(path2, records, close=False)
    replay2 = ReplayCapture(path2)
    assert (replay2.complete, len(replay2)) == (False, 4)


def test_cut_inside_end_entry(tmp_path):
    path = tmp_path / "c.dwcap"
    records = _records(2)
    sizes = _write(path, records)
    data = path.read_bytes()
    assert len(data) > sizes[-1] + 1
    path.write_bytes(data[: len(data) - 1])
    replay = ReplayCapture(path)
    assert (replay.complete, len(replay), replay.counters()) == (False, 2, {})


@pytest.mark.parametrize("where", ["inside-header", "right-after-magic"])
def test_cut_in_header(tmp_path, where):
    path = tmp_path / "c.dwcap"
    sizes = _write(path, _records(2))
    data = path.read_bytes()
    cut = len(MAGIC) + 10 if where == "inside-header" else len(MAGIC)
    assert cut < sizes[0]
    path.write_bytes(data[:cut])
    with pytest.raises(CaptureFileError) as info:
        ReplayCapture(path)
    assert str(info.value) == f"{path}: no header; the file is empty or truncated"


@pytest.mark.parametrize("content", [b"", b"DWCAP", b"not a capture at all", b"DWCAP\x02\n"])
def test_bad_magic(tmp_path, content):
    path = tmp_path / "c.dwcap"
    path.write_bytes(content)
    with pytest.raises(CaptureFileError) as info:
        ReplayCapture(path)
    assert str(info.value) == (
        f"{path} is not a driftwarden capture (bad magic); record one with "
        "`driftwarden trace --record FILE`"
    )


def test_missing_file(tmp_path):
    path = tmp_path / "nope.dwcap"
    with pytest.raises(CaptureFileError) as info:
        ReplayCapture(path)
    assert str(info.value) == (
        f"cannot open capture file {path}: No such file or directory; check the path")


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(CaptureFileError) as info:
        ReplayCapture(tmp_path)
    assert str(info.value) == (
        f"cannot open capture file {tmp_path}: Is a directory; check the path")


def test_writer_cannot_create(tmp_path):
    path = tmp_path / "missing-dir" / "c.dwcap"
    with pytest.raises(CaptureFileError) as info:
        CaptureWriter(path, Limits(), 0)
    assert str(info.value) == (
        f"cannot write capture file {path}: No such file or directory; check the directory")


def _raw_capture(path: Path, *entries) -> None:
    packer = msgpack.Packer(use_bin_type=True)
    path.write_bytes(MAGIC + b"".join(
        e if isinstance(e, bytes) else packer.pack(e) for e in entries))


def _header(**overrides) -> dict:
    return {"t": "hdr", "version": 3, "limits": Limits().as_dict(), "clock_offset_ns": 0,
            "created": 0.0, "host": "h"} | overrides


@pytest.mark.parametrize("version", [4, 0, None, "3"])
def test_wrong_version(tmp_path, version):
    path = tmp_path / "c.dwcap"
    _raw_capture(path, _header(version=version), {"t": "ev", "b": b"x"})
    with pytest.raises(CaptureFileError) as info:
        ReplayCapture(path)
    assert str(info.value) == (
        f"{path}: capture format version {version}, this driftwarden reads 3; "
        "re-record with this version")


def test_a_version_1_file_says_what_changed(tmp_path):
    """Version 1 files (64-byte headers, no fork/exit records, no process snapshot) predate
    process identity: they cannot be replayed, and the error says why."""
    path = tmp_path / "old.dwcap"
    _raw_capture(path, _header(version=1), {"t": "ev", "b": b"x" * 64})
    with pytest.raises(CaptureFileError) as info:
        ReplayCapture(path)
    assert str(info.value) == (
        f"{path}: capture format version 1, this driftwarden reads 3 (version 2 added process "
        "start times, fork, exit and repeated-exec records and the start-up process snapshot); "
        "re-record with this version")


def test_bad_limits_in_header(tmp_path):
    path = tmp_path / "c.dwcap"
    _raw_capture(path, _header(limits={"path_max": 100}))
    with pytest.raises(CaptureFileError) as info:
        ReplayCapture(path)
    assert str(info.value) == (
        f"{path}: bad limits in header (path_max must be a power of two >= 64, got 100)")


@pytest.mark.parametrize(("garbage", "message"), [
    (b"\xc1", "{path}: corrupt at entry 1 (); re-record it"),
    (b"\xa3\xff\xfe\xfd", "{path}: corrupt at entry 1 ('utf-8' codec can't decode byte 0xff "
                          "in position 0: invalid start byte); re-record it"),
    (5, "{path}: entry 1 is not a capture entry; the file is corrupt"),
    ({"no": "t"}, "{path}: entry 1 is not a capture entry; the file is corrupt"),
    ({"t": "ev", "b": b"x"}, "{path}: entries before the header"),
])
def test_garbage_after_magic(tmp_path, garbage, message):
    path = tmp_path / "c.dwcap"
    _raw_capture(path, garbage)
    with pytest.raises(CaptureFileError) as info:
        ReplayCapture(path)
    assert str(info.value) == message.format(path=path)


@pytest.mark.parametrize(("entry", "detail"), [
    ({"t": "ev"}, "'b'"),
    ({"t": "fact", "v": 1, "s": 0}, "'k'"),
    ({"t": "fact", "k": ["cwd", 1], "v": 1}, "'s'"),
    ({"t": "fact", "k": [[1, 2]], "v": 1, "s": 0}, "unhashable type: 'list'"),
])
def test_malformed_entry_after_header(tmp_path, entry, detail):
    path = tmp_path / "c.dwcap"
    _raw_capture(path, _header(), {"t": "ev", "b": b"ok"}, entry)
    with pytest.raises(CaptureFileError) as info:
        ReplayCapture(path)
    assert str(info.value) == f"{path}: corrupt at entry 3 ({detail}); re-record it"


def test_garbage_in_the_middle(tmp_path):
    path = tmp_path / "c.dwcap"
    _raw_capture(path, _header(), {"t": "ev", "b": b"ok"}, b"\xc1",
                 {"t": "ev", "b": b"never"})
    with pytest.raises(CaptureFileError) as info:
        ReplayCapture(path)
    assert str(info.value) == f"{path}: corrupt at entry 3 (); re-record it"


def test_unknown_entry_type_is_skipped(tmp_path, caplog):
    path = tmp_path / "c.dwcap"
    _raw_capture(path, _header(), {"t": "future", "x": 1}, {"t": "ev", "b": b"a"},
                 {"t": "end", "counters": {"exec": {"emitted": 1}}})
    with caplog.at_level(logging.WARNING, logger="driftwarden.probes.capture"):
        replay = ReplayCapture(path)
    assert "skipping unknown entry type 'future'" in caplog.text
    assert (replay.complete, replay.read_batch(0.0), replay.counters()) == (
        True, [b"a"], {"exec": {"emitted": 1}})
