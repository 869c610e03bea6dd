"""A durable spool of alerts the collector has not acknowledged yet.

The agent appends every alert here *before* sending it to the collector; an alert leaves the spool
only when the collector acknowledges it. After a restart or a reconnect the channel replays
``pending()`` in order, so an alert is delivered at least once (the collector may see one twice).

Files (in the spool directory, created 0700)
    ``alerts.spool``  a file header, then one record per alert, append-only between compactions.
    ``acks.spool``    append-only records, each the list of sequence numbers one ``ack`` call
                      acknowledged.
    ``spool.lock``    ``flock``-ed while open: a second process opening the same spool gets a
                      clear :class:`SpoolError` instead of interleaving writes.

Framing (both files; integers little-endian)
    file header (``alerts.spool`` only): ``b"DWSPOOL1"``, u64 ``base_seq``, u32 CRC-32 of the
    previous 16 bytes. ``base_seq`` is the next sequence number when the file was written, so
    numbers never repeat across compactions and restarts.
    record: ``b"DWR1"``, u32 payload length, u32 CRC-32 of (length bytes + payload), payload.
    Payload: msgpack ``[seq, alert dict]`` in ``alerts.spool``, msgpack ``[seq, ...]`` in
    ``acks.spool``.

Texts are kept exactly
    Kernel paths and argv are bytes, decoded with ``surrogateescape``: an undecodable byte
    becomes a lone surrogate (U+DC80..U+DCFF), which strict UTF-8 cannot encode. msgpack strings
    are therefore written and read with the ``surrogatepass`` error handler: a lone surrogate is
    stored as the three bytes UTF-8 would give its code point and read back as that same code
    point, so an alert leaves the spool exactly as it came in. Valid text is plain UTF-8 either
    way, so spools written before this rule read unchanged.

Crash safety
    One ``append`` or ``ack`` call is one ``write``: once it returns, the record is in the
    kernel's page cache and survives a crash or kill of the agent. With ``fsync=True`` it also
    reaches the disk (it survives a power loss of the node):
    - started (``start()``, or ``with AlertSpool(...)``): a sync thread of the spool fsyncs
      both files as soon as they have new writes, one ``fsync`` for every write since the
      previous one (a group commit). The caller never waits for the disk: an fsync on a busy
      disk took 5-40 ms, and the alert's own send waited for it. A record is on the disk about
      one fsync after its write; ``sync()`` waits for that. A power loss in between loses the
      newest records only, and only those the collector did not have already (the agent sends
      an alert as soon as it is written). An fsync error is logged and counted
      (``stats.sync_errors``); the next write is synced again. ``stop()`` syncs what is left.
    - not started: each call fsyncs before it returns.
    On open,
    a record whose length, CRC or payload is wrong (a write torn by a crash, a flipped bit) is
    skipped and counted in ``stats.corrupt_skipped`` (one count per damaged stretch); reading
    resumes at the next record marker, so records before (and after) the damage are kept. A torn
    ack record only means its alerts are replayed once more. A failed write is cut back off the
    file before the error is raised.

Compaction
    Acknowledged records stay in ``alerts.spool`` until a compaction rewrites the file with the
    pending records only (their bytes and sequence numbers unchanged): into a temporary file,
    fsync-ed, then ``os.replace``, fsync of the directory, and only then the ack log is emptied
    (a crash in between leaves acks of sequence numbers that no longer exist: ignored). It runs
    on open when anything was acknowledged or damaged, after an ``ack`` when more records in the
    file are acknowledged than pending and the file has at least ``compact_min_bytes``, and when
    an ``append`` would not fit otherwise.

Acknowledgement by alert id (the decision)
    The collector acknowledges alert ids, and the same id can be pending more than once (an
    aggregated repeat of an alert carries the first one's id with a higher count). Each
    occurrence of an id in ``ack(ids)`` acknowledges the OLDEST pending entry with that id:
    deliveries happen in spool order, so the oldest pending one is the one the collector got
    first. The hazard: if a replay delivers the same entry twice and the collector acknowledges
    both copies, the second ack consumes the next entry with that id, which may not have been
    delivered yet. ``ack_seqs`` acknowledges exact entries by sequence number and has no such
    hazard; a wire protocol that echoes the spool sequence number in its acks should use it.

Full spool
    ``bytes`` (both files on disk) never exceeds ``max_bytes``: a batch that does not fit, even
    after compaction, is refused whole with :class:`SpoolFull` and its alerts are counted in
    ``stats.dropped_full``. Nothing already accepted is lost; the caller logs loudly.

Thread-safe: one lock; the pipeline appends while the channel thread reads and acknowledges.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import struct
import threading
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import msgpack
from driftwarden.core.errors import SpoolError, SpoolFull
from driftwarden.core.lifecycle import Service

log = logging.getLogger(__name__)

DATA_NAME = "alerts.spool"
ACKS_NAME = "acks.spool"
LOCK_NAME = "spool.lock"
DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_COMPACT_MIN_BYTES = 1 << 20

FILE_MAGIC = b"DWSPOOL1"
_FILE_HEADER = struct.Struct("<8sQI")
RECORD_MAGIC = b"DWR1"
_RECORD_HEADER = struct.Struct("<4sII")
_LENGTH = struct.Struct("<I")
MAX_RECORD_BYTES = 16 << 20  # a length above this is damage, not an alert
_TEXT_ERRORS = "surrogatepass"  # lone surrogates round-trip (module docstring)


@dataclass
class SpoolStats:
    appended: int = 0  # alerts accepted by append (this process)
    acked: int = 0  # pending entries acknowledged (by id or by seq)
    ack_unknown: int = 0  # ack ids/seqs that matched no pending entry (ignored)
    recovered: int = 0  # pending entries found on disk when the spool was opened
    replayed: int = 0  # entries handed out by pending() (a second replay counts again)
    dropped_full: int = 0  # alerts refused because the spool was full
    corrupt_skipped: int = 0  # damaged stretches skipped (on open, or a bad read later)
    compactions: int = 0
    syncs: int = 0  # fsync rounds of the sync thread (each covers every write before it)
    sync_errors: int = 0  # fsync rounds that failed (logged)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


class _Entry(NamedTuple):
    offset: int  # of the record header in alerts.spool
    length: int  # whole record, header included
    alert_id: str


class _Parsed(NamedTuple):
    records: list[tuple[int, int, int, Any]]  # (offset, length, seq, payload)
    corrupt: int  # damaged stretches
    base_seq: int | None  # None: no valid file header


def _frame(payload: bytes) -> bytes:
    length = _LENGTH.pack(len(payload))
    crc = zlib.crc32(payload, zlib.crc32(length))
    return _RECORD_HEADER.pack(RECORD_MAGIC, len(payload), crc) + payload


def _file_header(base_seq: int) -> bytes:
    head = struct.pack("<8sQ", FILE_MAGIC, base_seq)
    return head + struct.pack("<I", zlib.crc32(head))


def _valid_data_payload(obj: Any) -> bool:
    return (isinstance(obj, list) and len(obj) == 2 and isinstance(obj[0], int)
            and isinstance(obj[1], dict) and isinstance(obj[1].get("id"), str))


def _valid_ack_payload(obj: Any) -> bool:
    return isinstance(obj, list) and all(isinstance(s, int) for s in obj)


def _parse_records(data: bytes, start: int, valid) -> tuple[list[tuple[int, int, Any]], int]:
    """(offset, length, payload) of each intact record from `start`; damaged stretches counted."""
    out: list[tuple[int, int, Any]] = []
    corrupt = 0
    pos = start
    in_damage = False
    while pos < len(data):
        record = _record_at(data, pos, valid)
        if record is not None:
            out.append((pos, record[0], record[1]))
            pos += record[0]
            in_damage = False
            continue
        if not in_damage:
            corrupt += 1
            in_damage = True
        nxt = data.find(RECORD_MAGIC, pos + 1)
        if nxt < 0:
            break
        pos = nxt
    return out, corrupt


def _record_at(data: bytes, pos: int, valid) -> tuple[int, Any] | None:
    if len(data) - pos < _RECORD_HEADER.size:
        return None
    magic, length, crc = _RECORD_HEADER.unpack_from(data, pos)
    end = pos + _RECORD_HEADER.size + length
    if magic != RECORD_MAGIC or length > MAX_RECORD_BYTES or end > len(data):
        return None
    payload = data[pos + _RECORD_HEADER.size:end]
    if zlib.crc32(payload, zlib.crc32(_LENGTH.pack(length))) != crc:
        return None
    try:
        obj = msgpack.unpackb(payload, raw=False, unicode_errors=_TEXT_ERRORS)
    except Exception:
        return None
    return (end - pos, obj) if valid(obj) else None


def _parse_data_file(data: bytes) -> _Parsed:
    base_seq = None
    start = 0
    corrupt = 0
    if len(data) >= _FILE_HEADER.size:
        magic, seq, crc = _FILE_HEADER.unpack_from(data, 0)
        if magic == FILE_MAGIC and crc == zlib.crc32(data[:16]):
            base_seq = seq
            start = _FILE_HEADER.size
    if base_seq is None and data:
        corrupt += 1  # a damaged header: salvage whatever records follow it
        first = data.find(RECORD_MAGIC)
        start = first if first >= 0 else len(data)
    raw, damaged = _parse_records(data, start, _valid_data_payload)
    records: list[tuple[int, int, int, Any]] = []
    last_seq = -1
    for offset, length, (seq, alert) in raw:
        if seq <= last_seq:  # out of order: cannot be ours, treat as damage
            damaged += 1
            continue
        records.append((offset, length, seq, alert))
        last_seq = seq
    return _Parsed(records, corrupt + damaged, base_seq)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class AlertSpool(Service):
    """Alerts kept on disk until acknowledged; see the module docstring for format and rules.

    ``append(alerts)`` -> their sequence numbers; ``pending(limit)`` -> ``[(seq, alert)]`` oldest
    first; ``ack(ids)`` / ``ack_seqs(seqs)`` -> how many pending entries were acknowledged.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int = DEFAULT_MAX_BYTES,
                 fsync: bool = True,
                 compact_min_bytes: int = DEFAULT_COMPACT_MIN_BYTES) -> None:
        if max_bytes < 4096:
            raise ValueError(f"spool max_bytes must be at least 4096, got {max_bytes}")
        super().__init__()
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.fsync = fsync
        self.compact_min_bytes = compact_min_bytes
        self.stats = SpoolStats()
        self._lock = threading.Lock()
        # the sync thread's state (guarded by _lock): it runs while started with fsync=True
        self._sync_wake = threading.Condition(self._lock)
        self._syncer: threading.Thread | None = None
        self._sync_stopping = False
        self._unsynced: set[str] = set()  # "_data_fd" / "_acks_fd": written since their fsync
        self._writes = 0  # writes so far; _synced_writes: how many of them are on the disk
        self._synced_writes = 0
        self._pending: OrderedDict[int, _Entry] = OrderedDict()
        self._by_id: dict[str, deque[int]] = {}
        self._records_in_file = 0  # pending + acknowledged-but-not-compacted
        self._next_seq = 0
        self._data_fd = -1
        self._acks_fd = -1
        self._data_size = 0
        self._acks_size = 0
        self._lock_fd = self._take_lock()
        try:
            self._open_files()
        except BaseException:
            self._close_fds()
            raise

    # -- public --------------------------------------------------------------------------------

    @property
    def depth(self) -> int:
        """Pending (unacknowledged) entries."""
        with self._lock:
            return len(self._pending)

    @property
    def bytes(self) -> int:
        """Bytes on disk (both files); never above ``max_bytes``."""
        with self._lock:
            return self._data_size + self._acks_size

    @property
    def closed(self) -> bool:
        return self._lock_fd < 0

    def append(self, alerts: list[dict[str, Any]]) -> list[int]:
        """Spool a batch (one write; its fsync: module docstring); returns each alert's sequence
        number, in order.

        Raises :class:`SpoolFull` (nothing of the batch is kept) when it does not fit, and
        ``ValueError``/``TypeError`` for an alert without a string ``id`` or that msgpack cannot
        encode (nothing of the batch is kept either).
        """
        for i, alert in enumerate(alerts):
            if not isinstance(alert, dict) or not isinstance(alert.get("id"), str) \
                    or not alert["id"]:
                raise ValueError(f"spool append: alert #{i} is not a dict with a non-empty "
                                 f"string 'id' (got {type(alert).__name__})")
        if not alerts:
            return []
        with self._lock:
            self._check_open()
            seqs = list(range(self._next_seq, self._next_seq + len(alerts)))
            records = []
            for seq, alert in zip(seqs, alerts, strict=True):
                try:
                    payload = msgpack.packb([seq, alert], use_bin_type=True,
                                            unicode_errors=_TEXT_ERRORS)
                except (TypeError, ValueError, OverflowError) as exc:
                    raise TypeError(f"spool append: alert {alert['id']} cannot be encoded: "
                                    f"{exc}") from exc
                records.append(_frame(payload))
            size = sum(len(r) for r in records)
            if self._data_size + self._acks_size + size > self.max_bytes \
                    and self._records_in_file > len(self._pending):
                self._compact()
            if self._data_size + self._acks_size + size > self.max_bytes:
                self.stats.dropped_full += len(alerts)
                raise SpoolFull(
                    f"alert spool {self.directory} is full ({self._data_size + self._acks_size}"
                    f" of {self.max_bytes} bytes, {len(self._pending)} alerts waiting for the "
                    f"collector): refused {len(alerts)} new alerts; restore the connection to "
                    f"the collector or raise the spool size", refused=len(alerts))
            start = self._data_size
            self._write(self._data_fd, b"".join(records), start)
            offset = start
            for seq, alert, record in zip(seqs, alerts, records, strict=True):
                self._add_entry(seq, _Entry(offset, len(record), alert["id"]))
                offset += len(record)
            self._data_size = offset
            self._records_in_file += len(records)
            self._next_seq += len(alerts)
            self.stats.appended += len(alerts)
            return seqs

    def pending(self, limit: int | None = None) -> list[tuple[int, dict[str, Any]]]:
        """The oldest ``limit`` (all when None) unacknowledged entries, as ``(seq, alert)``."""
        if limit is not None and limit < 0:
            raise ValueError(f"spool pending: limit must be >= 0, got {limit}")
        with self._lock:
            self._check_open()
            out: list[tuple[int, dict[str, Any]]] = []
            damaged: list[int] = []
            for seq, entry in self._pending.items():
                if limit is not None and len(out) >= limit:
                    break
                data = os.pread(self._data_fd, entry.length, entry.offset)
                record = _record_at(data, 0, _valid_data_payload)
                if record is None or record[1][0] != seq:
                    damaged.append(seq)
                    continue
                out.append((seq, record[1][1]))
            for seq in damaged:
                # The file changed under us (disk error, someone else's write): say so, loudly.
                log.error("alert spool %s: record %d is damaged on disk; it is dropped",
                          self.directory, seq)
                self.stats.corrupt_skipped += 1
                self._remove_entry(seq)
            self.stats.replayed += len(out)
            return out

    def ack(self, ids: Iterable[str]) -> int:
        """Acknowledge by alert id: each occurrence acknowledges the oldest pending entry with
        that id (see the module docstring). Unknown ids are ignored and counted."""
        if isinstance(ids, str | bytes):
            raise TypeError("spool ack: give an iterable of alert ids, not one string")
        with self._lock:
            self._check_open()
            taken: dict[str, int] = {}
            seqs: list[int] = []
            for alert_id in ids:
                queue = self._by_id.get(alert_id)
                index = taken.get(alert_id, 0)
                if queue is None or index >= len(queue):
                    self.stats.ack_unknown += 1
                    continue
                taken[alert_id] = index + 1
                seqs.append(queue[index])
            return self._ack_locked(seqs)

    def ack_seqs(self, seqs: Iterable[int]) -> int:
        """Acknowledge exact entries by sequence number. Unknown ones are ignored and counted."""
        with self._lock:
            self._check_open()
            known: list[int] = []
            for seq in dict.fromkeys(seqs):
                if seq in self._pending:
                    known.append(seq)
                else:
                    self.stats.ack_unknown += 1
            return self._ack_locked(known)

    def compact(self) -> None:
        """Rewrite the data file with the pending entries only (normally automatic)."""
        with self._lock:
            self._check_open()
            self._compact()

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until every record written before this call is on the disk (fsync); False
        after `timeout` seconds. Immediate when not started or ``fsync=False`` (each write
        synced itself, or nothing is synced)."""
        with self._lock:
            target = self._writes
            return self._sync_wake.wait_for(
                lambda: self._syncer is None or self._synced_writes >= target, timeout)

    def _start(self) -> None:
        if self.fsync:
            self._syncer = threading.Thread(target=self._sync_loop, daemon=True,
                                            name="driftwarden-spool-sync")
            self._syncer.start()

    def _stop(self, timeout: float | None) -> None:
        with self._lock:
            self._sync_stopping = True
            self._sync_wake.notify_all()
        syncer = self._syncer
        if syncer is not None:
            syncer.join(timeout)
            if syncer.is_alive():
                log.warning("alert spool %s: the sync thread did not stop within %.1fs",
                            self.directory, timeout)
        with self._lock:
            self._syncer = None
            self._sync_once_locked()  # what the thread had not synced yet
            self._sync_wake.notify_all()
            self._close_fds()

    # -- internals -----------------------------------------------------------------------------

    def _take_lock(self) -> int:
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"cannot create the alert spool directory {self.directory}: "
                             f"{exc.strerror}") from exc
        fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolError(f"alert spool {self.directory} is in use by another process; "
                             f"stop it or give this one another state directory") from None
        return fd

    def _open_files(self) -> None:
        data_path = self.directory / DATA_NAME
        acks_path = self.directory / ACKS_NAME
        # Left by a crash during compaction; alerts.spool is still the old, complete file.
        (self.directory / (DATA_NAME + ".tmp")).unlink(missing_ok=True)
        data = data_path.read_bytes() if data_path.exists() else b""
        acks = acks_path.read_bytes() if acks_path.exists() else b""
        parsed = _parse_data_file(data)
        ack_records, ack_damage = _parse_records(acks, 0, _valid_ack_payload)
        acked = {seq for _, _, seqs in ack_records for seq in seqs}
        corrupt = parsed.corrupt + ack_damage
        if corrupt:
            log.warning("alert spool %s: skipped %d damaged stretch(es) (a torn write after a "
                        "crash?); the intact records are kept", self.directory, corrupt)
        self.stats.corrupt_skipped += corrupt
        highest = max([seq for *_, seq, _ in parsed.records] + list(acked), default=-1)
        self._next_seq = max(parsed.base_seq or 0, highest + 1)

        self._data_fd = os.open(data_path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                0o600)
        self._acks_fd = os.open(acks_path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                                0o600)
        self._data_size = len(data)
        self._acks_size = len(acks)
        for offset, length, seq, alert in parsed.records:
            if seq not in acked:
                self._add_entry(seq, _Entry(offset, length, alert["id"]))
        self._records_in_file = len(parsed.records)
        self.stats.recovered = len(self._pending)
        if self._pending:
            log.info("alert spool %s: %d alerts not yet acknowledged by the collector will be "
                     "replayed", self.directory, len(self._pending))
        if not data:
            self._compact(data, count=False)  # a new spool: write the file header
        elif parsed.base_seq is None or corrupt or len(parsed.records) > len(self._pending):
            self._compact(data)

    def _add_entry(self, seq: int, entry: _Entry) -> None:
        self._pending[seq] = entry
        self._by_id.setdefault(entry.alert_id, deque()).append(seq)

    def _remove_entry(self, seq: int) -> None:
        entry = self._pending.pop(seq)
        queue = self._by_id[entry.alert_id]
        queue.remove(seq)
        if not queue:
            del self._by_id[entry.alert_id]

    def _ack_locked(self, seqs: list[int]) -> int:
        if not seqs:
            return 0
        record = _frame(msgpack.packb(seqs))
        self._write(self._acks_fd, record, self._acks_size)
        self._acks_size += len(record)
        for seq in seqs:
            self._remove_entry(seq)
        self.stats.acked += len(seqs)
        acked_in_file = self._records_in_file - len(self._pending)
        if acked_in_file > len(self._pending) and self._data_size >= self.compact_min_bytes:
            self._compact()
        return len(seqs)

    def _write(self, fd: int, data: bytes, old_size: int) -> None:
        """Write a record to `fd` (must hold the lock); synced now, or by the sync thread."""
        try:
            _write_all(fd, data)
            if self.fsync and self._syncer is None:
                os.fsync(fd)
        except OSError as exc:
            # Cut a partial write back off, so the next record does not follow garbage.
            try:
                os.ftruncate(fd, old_size)
            except OSError:
                log.exception("alert spool %s: cannot truncate after a failed write",
                              self.directory)
            raise SpoolError(f"alert spool {self.directory}: write failed: {exc.strerror}; "
                             f"free disk space or check the state directory") from exc
        self._writes += 1
        if self._syncer is None:
            self._synced_writes = self._writes
        else:
            self._unsynced.add("_data_fd" if fd == self._data_fd else "_acks_fd")
            self._sync_wake.notify_all()

    def _sync_loop(self) -> None:
        """The sync thread: fsync what was written, without holding the lock meanwhile (writes
        go on; those that come during an fsync are taken by the next one)."""
        while True:
            with self._lock:
                self._sync_wake.wait_for(lambda: self._unsynced or self._sync_stopping)
                if self._sync_stopping:
                    return  # _stop syncs the rest
                # duplicates: a compaction may replace and close a file meanwhile
                fds = [os.dup(getattr(self, name)) for name in sorted(self._unsynced)]
                self._unsynced.clear()
                target = self._writes
            self._sync_fds(fds, target)

    def _sync_fds(self, fds: list[int], target: int) -> None:
        failed = None
        try:
            for fd in fds:
                try:
                    os.fsync(fd)
                except OSError as exc:
                    failed = exc
        finally:
            for fd in fds:
                os.close(fd)
        with self._lock:
            if failed is None:
                self.stats.syncs += 1
                self._synced_writes = max(self._synced_writes, target)
            else:
                self.stats.sync_errors += 1
                self._unsynced.update(("_data_fd", "_acks_fd"))  # try again with what follows
            self._sync_wake.notify_all()
        if failed is not None:
            log.error("alert spool %s: fsync failed: %s; the spooled alerts survive an agent "
                      "crash but maybe not a power loss until a later fsync succeeds",
                      self.directory, failed.strerror)
            time.sleep(0.1)  # a failing disk: do not spin

    def _sync_once_locked(self) -> None:
        """fsync what is unsynced now, on this thread (must hold the lock; at stop)."""
        if not self._unsynced or self._data_fd < 0:
            return
        for name in sorted(self._unsynced):
            try:
                os.fsync(getattr(self, name))
            except OSError as exc:
                self.stats.sync_errors += 1
                log.error("alert spool %s: fsync at close failed: %s", self.directory,
                          exc.strerror)
        self._unsynced.clear()
        self._synced_writes = self._writes

    def _compact(self, data: bytes | None = None, *, count: bool = True) -> None:
        """Rewrite alerts.spool with the pending records (must hold the lock)."""
        if data is None:
            data = os.pread(self._data_fd, self._data_size, 0)
        path = self.directory / DATA_NAME
        tmp = path.with_name(DATA_NAME + ".tmp")
        parts = [_file_header(self._next_seq)]
        offset = len(parts[0])
        moved: list[tuple[int, _Entry]] = []
        for seq, entry in self._pending.items():
            parts.append(data[entry.offset:entry.offset + entry.length])
            moved.append((seq, entry._replace(offset=offset)))
            offset += entry.length
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                _write_all(fd, b"".join(parts))
                os.fsync(fd)  # always: the replace below must never expose an unwritten file
            finally:
                os.close(fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise SpoolError(f"alert spool {self.directory}: compaction failed: "
                             f"{exc.strerror}; free disk space") from exc
        os.replace(tmp, path)
        # From here the new file is the truth: switch to it before anything else can fail.
        os.close(self._data_fd)
        self._data_fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        self._pending = OrderedDict(moved)
        self._data_size = offset
        self._records_in_file = len(moved)
        self.stats.compactions += int(count)
        _fsync_dir(self.directory)
        # Only now drop the acks: a crash before this line leaves acks of seqs that no longer
        # exist in alerts.spool, which are ignored.
        os.ftruncate(self._acks_fd, 0)
        self._acks_size = 0
        if self.fsync:
            os.fsync(self._acks_fd)

    def _check_open(self) -> None:
        if self._lock_fd < 0:
            raise SpoolError(f"alert spool {self.directory} is closed")

    def _close_fds(self) -> None:
        for name in ("_data_fd", "_acks_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


__all__ = ["AlertSpool", "SpoolError", "SpoolFull", "SpoolStats"]
