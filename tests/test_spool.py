"""The alert spool: order, acks by id and by seq, restarts, torn writes, compaction, full,
texts from the kernel kept exactly."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import msgpack
import pytest
from driftwarden.agent import spool as spool_module
from driftwarden.agent.spool import ACKS_NAME, DATA_NAME, AlertSpool
from driftwarden.core.errors import SpoolError, SpoolFull
from driftwarden.probes.decode import Decoder

from tests.test_decode import LIMITS, exec_record

A, B, C, D = ("a" * 24, "b" * 24, "c" * 24, "d" * 24)


def alert(alert_id: str, count: int = 1, **extra) -> dict:
    return {"v": 1, "id": alert_id, "kind": "drift", "count": count,
            "reasons": [{"code": "exec-added-binary", "text": "ran /tmp/x",
                         "details": {"path": "/tmp/x"}}], **extra}


def ids(pending: list[tuple[int, dict]]) -> list[tuple[int, str, int]]:
    return [(seq, a["id"], a["count"]) for seq, a in pending]


def test_append_pending_ack_in_order(tmp_path: Path) -> None:
    with AlertSpool(tmp_path, fsync=False) as spool:
        assert spool.append([alert(A), alert(B)]) == [0, 1]
        assert spool.append([alert(C, time=1.5)]) == [2]
        assert spool.depth == 3
        assert spool.pending() == [(0, alert(A)), (1, alert(B)), (2, alert(C, time=1.5))]
        assert ids(spool.pending(limit=2)) == [(0, A, 1), (1, B, 1)]
        assert spool.ack([B, D]) == 1
        assert ids(spool.pending()) == [(0, A, 1), (2, C, 1)]
        assert spool.ack_seqs([2, 2, 99]) == 1
        assert ids(spool.pending()) == [(0, A, 1)]
        assert spool.stats.to_dict() == {
            "appended": 3, "acked": 2, "ack_unknown": 2, "recovered": 0, "replayed": 8,
            "dropped_full": 0, "corrupt_skipped": 0, "compactions": 0, "syncs": 0,
            "sync_errors": 0}


def test_started_spool_syncs_in_its_own_thread_and_stop_syncs_the_rest(tmp_path: Path) -> None:
    spool = AlertSpool(tmp_path)
    assert spool.append([alert(A)]) == [0]  # not started: this call synced itself
    assert (spool.sync(timeout=0), spool.stats.syncs) == (True, 0)
    with spool:
        assert spool.append([alert(B), alert(C)]) == [1, 2]
        assert spool.ack([A]) == 1
        assert spool.sync(timeout=30) is True  # both files' writes are on the disk now
        assert spool.stats.syncs >= 1
        assert spool.stats.sync_errors == 0
        threads = {t.name for t in threading.enumerate()}
        assert "driftwarden-spool-sync" in threads
        spool.append([alert(D)])
    assert "driftwarden-spool-sync" not in {t.name for t in threading.enumerate()}
    with AlertSpool(tmp_path) as spool:
        assert ids(spool.pending()) == [(1, B, 1), (2, C, 1), (3, D, 1)]


def test_ack_by_id_takes_the_oldest_pending_entry_per_occurrence(tmp_path: Path) -> None:
    with AlertSpool(tmp_path, fsync=False) as spool:
        spool.append([alert(A), alert(B), alert(A, count=5), alert(A, count=9)])
        assert spool.ack([A]) == 1
        assert ids(spool.pending()) == [(1, B, 1), (2, A, 5), (3, A, 9)]
        assert spool.ack([A, A, A]) == 2  # the third occurrence matches nothing
        assert ids(spool.pending()) == [(1, B, 1)]
        assert spool.stats.ack_unknown == 1


def test_ack_refuses_a_bare_string(tmp_path: Path) -> None:
    with AlertSpool(tmp_path, fsync=False) as spool:
        spool.append([alert(A)])
        with pytest.raises(TypeError, match="iterable of alert ids"):
            spool.ack(A)
        assert spool.depth == 1


def test_bad_alerts_refuse_the_whole_batch(tmp_path: Path) -> None:
    with AlertSpool(tmp_path, fsync=False) as spool:
        size = spool.bytes
        with pytest.raises(ValueError, match="alert #1 is not a dict with a non-empty string"):
            spool.append([alert(A), {"kind": "drift"}])
        with pytest.raises(TypeError, match=f"alert {B} cannot be encoded"):
            spool.append([alert(A), alert(B, bad=object())])
        assert (spool.depth, spool.bytes, spool.stats.appended) == (0, size, 0)
        assert spool.append([]) == []
        assert spool.append([alert(A)]) == [0]


def test_pending_survives_a_restart_and_seqs_continue(tmp_path: Path) -> None:
    with AlertSpool(tmp_path) as spool:
        spool.append([alert(A), alert(B), alert(C)])
        spool.ack([B])
    with AlertSpool(tmp_path) as spool:
        assert spool.pending() == [(0, alert(A)), (2, alert(C))]
        assert spool.stats.recovered == 2
        assert spool.stats.compactions == 1  # the acked record was dropped on open
        assert spool.append([alert(D)]) == [3]
        spool.ack([A, C, D])
        assert spool.depth == 0
    with AlertSpool(tmp_path) as spool:
        assert spool.pending() == []
        assert spool.append([alert(A)]) == [4]  # never reused, even with nothing left on disk


def test_torn_last_record_is_skipped_and_earlier_ones_kept(tmp_path: Path) -> None:
    with AlertSpool(tmp_path, fsync=False) as spool:
        spool.append([alert(A), alert(B)])
        spool.append([alert(C)])
    data = tmp_path / DATA_NAME
    os.truncate(data, data.stat().st_size - 5)  # a crash in the middle of the last write
    with AlertSpool(tmp_path, fsync=False) as spool:
        assert ids(spool.pending()) == [(0, A, 1), (1, B, 1)]
        assert spool.stats.corrupt_skipped == 1
        assert spool.append([alert(D)]) == [2]
    with AlertSpool(tmp_path, fsync=False) as spool:
        assert ids(spool.pending()) == [(0, A, 1), (1, B, 1), (2, D, 1)]
        assert spool.stats.corrupt_skipped == 0  # the open rewrote a clean file


def test_damaged_record_in_the_middle_is_skipped_and_reading_resumes(tmp_path: Path) -> None:
    with AlertSpool(tmp_path, fsync=False) as spool:
        spool.append([alert(A), alert(B, marker="XYZXYZ"), alert(C)])
    data = tmp_path / DATA_NAME
    raw = bytearray(data.read_bytes())
    where = raw.index(b"XYZXYZ")
    raw[where] ^= 0xFF
    data.write_bytes(bytes(raw))
    with AlertSpool(tmp_path, fsync=False) as spool:
        assert ids(spool.pending()) == [(0, A, 1), (2, C, 1)]
        assert spool.stats.corrupt_skipped == 1


def test_garbage_file_header_still_salvages_records(tmp_path: Path) -> None:
    with AlertSpool(tmp_path, fsync=False) as spool:
        spool.append([alert(A), alert(B)])
    data = tmp_path / DATA_NAME
    raw = bytearray(data.read_bytes())
    raw[0:8] = b"garbage!"
    data.write_bytes(bytes(raw))
    with AlertSpool(tmp_path, fsync=False) as spool:
        assert ids(spool.pending()) == [(0, A, 1), (1, B, 1)]
        assert spool.stats.corrupt_skipped == 1
        assert spool.append([alert(C)]) == [2]


def test_torn_ack_record_only_replays_those_alerts(tmp_path: Path) -> None:
    with AlertSpool(tmp_path, fsync=False, compact_min_bytes=1 << 30) as spool:
        spool.append([alert(A), alert(B), alert(C)])
        spool.ack([A])
        spool.ack([B])
    acks = tmp_path / ACKS_NAME
    os.truncate(acks, acks.stat().st_size - 1)
    with AlertSpool(tmp_path, fsync=False) as spool:
        assert ids(spool.pending()) == [(1, B, 1), (2, C, 1)]
        assert spool.stats.corrupt_skipped == 1


def test_stale_acks_after_a_crash_during_compaction_are_harmless(tmp_path: Path) -> None:
    with AlertSpool(tmp_path, fsync=False, compact_min_bytes=1 << 30) as spool:
        spool.append([alert(A), alert(B), alert(C), alert(D)])
        spool.ack([A, B])
    stale = (tmp_path / ACKS_NAME).read_bytes()
    with AlertSpool(tmp_path, fsync=False) as spool:  # compacts on open, empties the ack log
        assert spool.stats.compactions == 1
    assert (tmp_path / ACKS_NAME).stat().st_size == 0
    # As if the process died after os.replace of the data file, before the ack log was emptied.
    (tmp_path / ACKS_NAME).write_bytes(stale)
    with AlertSpool(tmp_path, fsync=False) as spool:
        assert ids(spool.pending()) == [(2, C, 1), (3, D, 1)]
        assert spool.append([alert(A)]) == [4]


def test_compaction_after_more_than_half_is_acked(tmp_path: Path) -> None:
    with AlertSpool(tmp_path, fsync=False, compact_min_bytes=0) as spool:
        spool.append([alert(x) for x in (A, B, C, D)])
        full = spool.bytes
        spool.ack([A, B])  # 2 of 4: not more than half
        assert spool.stats.compactions == 0
        assert spool.bytes > full
        spool.ack([C])  # 3 of 4
        assert spool.stats.compactions == 1
        assert spool.bytes < full
        assert (tmp_path / ACKS_NAME).stat().st_size == 0
        assert spool.bytes == (tmp_path / DATA_NAME).stat().st_size
        assert ids(spool.pending()) == [(3, D, 1)]
        assert not (tmp_path / (DATA_NAME + ".tmp")).exists()
        spool.append([alert(A)])
    with AlertSpool(tmp_path, fsync=False) as spool:
        assert ids(spool.pending()) == [(3, D, 1), (4, A, 1)]


def test_full_spool_refuses_new_batches_and_keeps_the_accepted(tmp_path: Path) -> None:
    filler = "x" * 800
    with AlertSpool(tmp_path, max_bytes=4096, fsync=False) as spool:
        accepted = []
        with pytest.raises(SpoolFull, match=r"is full .* refused 2 new alerts") as err:
            for i in range(10):
                accepted += spool.append([alert(f"{i:024x}", pad=filler)] * 2)
        assert err.value.refused == 2
        assert accepted == [0, 1, 2, 3]
        assert spool.stats.dropped_full == 2
        assert spool.bytes <= 4096
        assert [seq for seq, _ in spool.pending()] == accepted
        spool.ack_seqs([0, 1])  # acked bytes are reclaimed by compaction when needed
        assert spool.append([alert(A, pad=filler)] * 2) == [4, 5]
        assert spool.stats.compactions == 1
        with pytest.raises(SpoolFull):
            spool.append([alert(B, pad="y" * 5000)])  # bigger than the whole spool
        assert spool.stats.dropped_full == 3
    with AlertSpool(tmp_path, max_bytes=4096, fsync=False) as spool:
        assert [seq for seq, _ in spool.pending()] == [2, 3, 4, 5]


def test_failed_write_is_cut_off_and_raises(tmp_path: Path, monkeypatch) -> None:
    with AlertSpool(tmp_path, fsync=False) as spool:
        spool.append([alert(A)])
        size = spool.bytes

        def half_then_enospc(fd: int, data: bytes) -> None:
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(spool_module, "_write_all", half_then_enospc)
        with pytest.raises(SpoolError, match="write failed: No space left on device"):
            spool.append([alert(B), alert(C)])
        monkeypatch.undo()
        assert (tmp_path / DATA_NAME).stat().st_size == size
        assert spool.depth == 1
        assert spool.append([alert(D)]) == [1]
    with AlertSpool(tmp_path, fsync=False) as spool:
        assert ids(spool.pending()) == [(0, A, 1), (1, D, 1)]
        assert spool.stats.corrupt_skipped == 0


def test_second_open_of_the_same_directory_is_refused(tmp_path: Path) -> None:
    with AlertSpool(tmp_path, fsync=False), pytest.raises(SpoolError, match="in use by another"):
        AlertSpool(tmp_path, fsync=False)
    with AlertSpool(tmp_path, fsync=False) as spool:  # released on close
        assert spool.depth == 0


def test_closed_spool_refuses_use(tmp_path: Path) -> None:
    spool = AlertSpool(tmp_path, fsync=False)
    spool.close()
    assert spool.closed
    with pytest.raises(SpoolError, match="is closed"):
        spool.append([alert(A)])
    spool.close()  # idempotent


def test_files_are_private(tmp_path: Path) -> None:
    directory = tmp_path / "state" / "spool"
    with AlertSpool(directory) as spool:
        spool.append([alert(A)])
        spool.ack([A])
    assert directory.stat().st_mode & 0o777 == 0o700
    for name in (DATA_NAME, ACKS_NAME):
        assert (directory / name).stat().st_mode & 0o777 == 0o600


def test_concurrent_append_and_ack_lose_nothing(tmp_path: Path) -> None:
    batches, per_batch = 200, 10
    with AlertSpool(tmp_path, fsync=False, compact_min_bytes=4096) as spool:
        done = threading.Event()
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                for b in range(batches):
                    spool.append([alert(f"{b:012x}{i:012x}") for i in range(per_batch)])
            except BaseException as exc:
                errors.append(exc)
            finally:
                done.set()

        seen: list[int] = []
        thread = threading.Thread(target=produce)
        thread.start()
        while not (done.is_set() and spool.depth == 0):
            batch = spool.pending(limit=50)
            seen += [seq for seq, _ in batch]
            spool.ack(a["id"] for _, a in batch)
        thread.join()
        assert errors == []
        assert seen == list(range(batches * per_batch))
        assert spool.stats.acked == spool.stats.appended == batches * per_batch
        assert spool.stats.compactions >= 1


def test_copy_of_a_live_spool_opens(tmp_path: Path) -> None:
    # What a crash leaves behind: files as they are between writes, lock not released.
    with AlertSpool(tmp_path / "live", fsync=False) as spool:
        spool.append([alert(A), alert(B)])
        spool.ack([A])
        shutil.copytree(tmp_path / "live", tmp_path / "copy")
    with AlertSpool(tmp_path / "copy", fsync=False) as copy:
        assert ids(copy.pending()) == [(1, B, 1)]


def test_killed_writer_loses_nothing_it_reported(tmp_path: Path) -> None:
    # A real crash: SIGKILL a process in the middle of appending, then recover its spool.
    script = (
        "import sys\n"
        "from driftwarden.agent.spool import AlertSpool\n"
        "spool = AlertSpool(sys.argv[1], fsync=False)\n"
        "b = 0\n"
        "while True:\n"
        "    seqs = spool.append([{'id': f'{b:012x}{i:012x}', 'pad': 'x' * 300}"
        " for i in range(100)])\n"
        "    print(seqs[-1], flush=True)\n"
        "    b += 1\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        reported = [int(child.stdout.readline()) for _ in range(30)]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert reported[-1] == 30 * 100 - 1
    with AlertSpool(tmp_path, fsync=False) as spool:
        seqs = [seq for seq, _ in spool.pending()]
        assert len(seqs) >= 30 * 100
        assert seqs == list(range(len(seqs)))  # nothing lost, nothing out of order
        assert spool.append([alert(A)]) == [len(seqs)]


# -- texts from the kernel -----------------------------------------------------------------------


def test_undecodable_kernel_bytes_and_lone_surrogates_round_trip_exactly(tmp_path: Path) -> None:
    # an exec whose filename and argv hold bytes that are not UTF-8, decoded as the probes do
    event = Decoder(LIMITS).decode(exec_record(b"/tmp/\xff\xfe-x", [b"x", b"caf\xe9", "na\xefve"]))
    assert (event.filename, event.argv) == ("/tmp/\udcff\udcfe-x", ("x", "caf\udce9", "na\xefve"))
    lone = "/srv/\ud800odd"  # a surrogate no decoder made: kept as well
    written = alert(A, events=[{"kind": "exec", "path": event.filename,
                                "argv": list(event.argv)}],
                    process={"exe": event.filename, "argv": list(event.argv)},
                    paths={lone: "\udc80", "emoji": "\U0001f600"})
    with AlertSpool(tmp_path, fsync=False) as spool:
        assert spool.append([written, alert(B)]) == [0, 1]
        assert spool.pending() == [(0, written), (1, alert(B))]
    with AlertSpool(tmp_path, fsync=False) as spool:
        (seq, back), _ = spool.pending()
        assert (seq, back) == (0, written)
        assert back["events"][0]["path"].encode("utf-8", "surrogateescape") == b"/tmp/\xff\xfe-x"
        assert back["process"]["argv"][1].encode("utf-8", "surrogateescape") == b"caf\xe9"
        assert spool.stats.corrupt_skipped == 0
    data = (tmp_path / DATA_NAME).read_bytes()
    assert "/tmp/\udcff\udcfe-x".encode("utf-8", "surrogatepass") in data


def test_a_spool_written_before_surrogatepass_still_reads(tmp_path: Path) -> None:
    # the former format: strict UTF-8 strings, framed the same way
    old = [alert(A, text="na\xefve \u65e5\u672c"), alert(B)]
    records = [spool_module._frame(msgpack.packb([seq, a], use_bin_type=True))
               for seq, a in enumerate(old)]
    (tmp_path / DATA_NAME).write_bytes(spool_module._file_header(0) + b"".join(records))
    with AlertSpool(tmp_path, fsync=False) as spool:
        assert spool.pending() == [(0, old[0]), (1, old[1])]
        assert spool.append([alert(C, path="/tmp/\udcff")]) == [2]
        assert spool.stats.to_dict()["recovered"] == 2
    with AlertSpool(tmp_path, fsync=False) as spool:
        assert spool.pending() == [(0, old[0]), (1, old[1]), (2, alert(C, path="/tmp/\udcff"))]
