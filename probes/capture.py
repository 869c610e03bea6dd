"""Capture sources: the live ring buffer, or a recorded event file.

Everything downstream of the decoder reads from a `CaptureSource`, so the pipeline runs in tests
and benchmarks without the kernel (the falcosecurity/libs "capture file" idea).

Recorded file format (version 3): the magic line `DWCAP\\x01\\n`, then a msgpack stream of maps:
  {"t": "hdr", "version": 3, "limits": {...}, "clock_offset_ns": int, "created": float, "host": str}
  {"t": "ev", "b": <raw kernel record>}              (probes/dw_event.h layout of this version)
  {"t": "fact", "k": [name, *args], "v": value, "s": seq}
                                                     an answer the live pipeline got (from /proc,
                                                     attribution, ...) while handling record
                                                     number `seq` (0-based index of "ev" entries;
                                                     -1: before the first, e.g. the start-up
                                                     process snapshot, key ["snapshot"])
  {"t": "end", "counters": {...}}                    kernel counters when recording stopped
A file without "end" (the recorder was killed) replays everything it holds and says so.
Version 2 (process identity): 80-byte event headers with start times, fork and exit records,
exec records with their dedup key and the compact records of suppressed repeated execs, and the
start-up process snapshot. Version 3: connect and file records carry their key for the kernel's
baseline filter. An older file cannot be replayed (re-record it).
"""

from __future__ import annotations

import bisect
import logging
import os
import socket
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import msgpack
from driftwarden.core.errors import CaptureFileError
from driftwarden.probes._layout import EventKind, Limits
from driftwarden.probes.loader import ProbeSet

log = logging.getLogger(__name__)

MAGIC = b"DWCAP\x01\n"
# the header's kind: a u16, little-endian, every kind < 256: its first byte says it
_KIND_OFFSET = Limits().offsets("dw_event_header")["kind"]
_EXEC = int(EventKind.EXEC)
FORMAT_VERSION = 3
_VERSION_CHANGES = {1: "version 2 added process start times, fork, exit and repeated-exec "
                       "records and the start-up process snapshot",
                    2: "version 3 added the baseline filter's key to connect and file records"}


class CaptureSource(Protocol):
    limits: Limits
    clock_offset_ns: int  # add to a kernel monotonic timestamp to get wall-clock ns

    def read_batch(self, timeout: float) -> list[bytes] | None:
        """Records available now (waits up to `timeout` s); None when the source is exhausted."""

    def counters(self) -> dict[str, dict[str, int]]: ...

    def close(self) -> None: ...


def monotonic_to_wall_offset_ns() -> int:
    return time.time_ns() - time.monotonic_ns()


class LiveCapture:
    """The kernel ring buffer, drained on a short timer (the probes submit without wake-ups,
    except for the kinds of ProbeConfig.wake_kinds, execs by default, and those at most once per
    ProbeConfig.wake_gap_ns). After a batch with an exec the next wait is short
    (`follow_up_interval`): the exec that follows an exec (a dropped binary run right after
    its shell started) is taken up at once without waking the reader per exec in a storm. A node
    where nothing happened for `idle_after` seconds is drained every `idle_interval` instead
    (an exec still wakes the reader at once; the first connect or write waits up to that long):
    every wake-up of an idle agent costs about 0.1 ms of CPU (measured on the 2-core VM), so
    the 20 a second of a 50 ms timer were 0.2% of a core; read_batch's caller should wait as
    long too (TracePipeline.run's idle_poll_interval)."""

    def __init__(self, probes: ProbeSet, *, drain_interval: float = 0.01,
                 follow_up_interval: float = 0.002, idle_interval: float = 0.25,
                 idle_after: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.probes = probes
        self.limits = probes.config.limits
        self.drain_interval = drain_interval
        self.follow_up_interval = follow_up_interval
        self.idle_interval = idle_interval
        self.idle_after = idle_after
        self._clock = clock
        self.clock_offset_ns = monotonic_to_wall_offset_ns()
        self._follow_up = False
        self._last_records = clock()

    def read_batch(self, timeout: float) -> list[bytes] | None:
        deadline = self._clock() + timeout
        while True:
            batch = self.probes.drain()
            now = self._clock()
            if batch:
                self._follow_up = any(raw[_KIND_OFFSET] == _EXEC for raw in batch)
                self._last_records = now
                return batch
            left = deadline - now
            if left <= 0:
                return []
            # an epoll wait: the first exec after a quiet spell wakes it at once; anything
            # else is drained on the timer, sooner while execs come, later on an idle node
            if self._follow_up:
                interval = self.follow_up_interval
            elif now - self._last_records >= self.idle_after:
                interval = self.idle_interval
            else:
                interval = self.drain_interval
            self._follow_up = False
            self.probes.wait(min(interval, left))

    def counters(self) -> dict[str, dict[str, int]]:
        return self.probes.counters()

    def close(self) -> None:
        self.probes.stop()


class FactStore:
    """Answers recorded during a live run, looked up by key as of a record number.

    The live pipeline writes a fact when it asks a question while handling record `seq` (and for
    attribution, only when the answer changed), so as of record N the answer is the latest fact
    of that key with seq <= N.
    """

    def __init__(self) -> None:
        self._facts: dict[Hashable, tuple[list[int], list[Any]]] = {}
        self.position = 0

    def add(self, key: Hashable, value: Any, seq: int) -> None:
        seqs, values = self._facts.setdefault(key, ([], []))
        if seqs and seq < seqs[-1]:
            i = bisect.bisect_right(seqs, seq)
            seqs.insert(i, seq)
            values.insert(i, value)
            return
        seqs.append(seq)
        values.append(value)

    def get(self, key: Hashable, default: Any = None) -> Any:
        found = self._facts.get(key)
        if found is None:
            return default
        seqs, values = found
        i = bisect.bisect_right(seqs, self.position)
        return values[i - 1] if i else default

    def __len__(self) -> int:
        return len(self._facts)


def _freeze(key: list) -> Hashable:
    return tuple(key)  # keys are flat lists of scalars


@dataclass(frozen=True)
class CaptureHeader:
    version: int
    limits: Limits
    clock_offset_ns: int
    created: float
    host: str


class ReplayCapture:
    """A recorded event file as a capture source. Reads it whole: recordings are test-sized."""

    def __init__(self, path: str | os.PathLike, *, batch_size: int = 256) -> None:
        self.path = Path(path)
        self.batch_size = batch_size
        self.facts = FactStore()
        self.complete = False
        self._records: list[bytes] = []
        self._counters: dict[str, dict[str, int]] = {}
        self.header = self._load()
        self.limits = self.header.limits
        self.clock_offset_ns = self.header.clock_offset_ns
        self._next = 0

    def _load(self) -> CaptureHeader:
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            raise CaptureFileError(
                f"cannot open capture file {self.path}: {exc.strerror}; check the path"
            ) from exc
        with fh:
            if fh.read(len(MAGIC)) != MAGIC:
                raise CaptureFileError(
                    f"{self.path} is not a driftwarden capture (bad magic); record one with "
                    "`driftwarden trace --record FILE`"
                )
            unpacker = msgpack.Unpacker(fh, raw=False, strict_map_key=False)
            header = None
            position = 0
            in_entry = False  # False while msgpack reads the next entry, True while we check it
            try:
                for entry in unpacker:
                    position += 1
                    in_entry = True
                    if not isinstance(entry, dict) or "t" not in entry:
                        raise CaptureFileError(
                            f"{self.path}: entry {position} is not a capture entry; the file is "
                            "corrupt"
                        )
                    kind = entry["t"]
                    if kind == "hdr":
                        header = self._parse_header(entry)
                    elif header is None:
                        raise CaptureFileError(f"{self.path}: entries before the header")
                    elif kind == "ev":
                        self._records.append(entry["b"])
                    elif kind == "fact":
                        self.facts.add(_freeze(entry["k"]), entry["v"], int(entry["s"]))
                    elif kind == "end":
                        self._counters = entry.get("counters", {})
                        self.complete = True
                    else:
                        log.warning("%s: skipping unknown entry type %r", self.path, kind)
                    in_entry = False
            except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError,
                    msgpack.exceptions.StackError, ValueError, KeyError, TypeError) as exc:
                bad = position if in_entry else position + 1
                raise CaptureFileError(
                    f"{self.path}: corrupt at entry {bad} ({exc}); re-record it"
                ) from exc
        if header is None:
            raise CaptureFileError(f"{self.path}: no header; the file is empty or truncated")
        if not self.complete:
            log.warning(
                "%s: no end marker (recording was interrupted); replaying its %d records",
                self.path, len(self._records),
            )
        return header

    def _parse_header(self, entry: dict) -> CaptureHeader:
        version = entry.get("version")
        if version != FORMAT_VERSION:
            why = _VERSION_CHANGES.get(version) if isinstance(version, int) else None
            raise CaptureFileError(
                f"{self.path}: capture format version {version}, this driftwarden reads "
                f"{FORMAT_VERSION}{f' ({why})' if why else ''}; re-record with this version"
            )
        try:
            limits = Limits(**entry["limits"])
        except (TypeError, ValueError, KeyError) as exc:
            raise CaptureFileError(f"{self.path}: bad limits in header ({exc})") from exc
        return CaptureHeader(
            version=version,
            limits=limits,
            clock_offset_ns=int(entry.get("clock_offset_ns", 0)),
            created=float(entry.get("created", 0.0)),
            host=str(entry.get("host", "")),
        )

    def __len__(self) -> int:
        return len(self._records)

    def read_batch(self, timeout: float) -> list[bytes] | None:
        if self._next >= len(self._records):
            return None
        chunk = self._records[self._next : self._next + self.batch_size]
        self._next += len(chunk)
        return chunk

    def set_position_for(self, index: int) -> None:
        """Answer fact lookups as of the record with this overall index (0-based)."""
        self.facts.position = index

    def counters(self) -> dict[str, dict[str, int]]:
        return self._counters

    def close(self) -> None:
        pass


class CaptureWriter:
    """Writes a capture file. Flushes after every batch so a killed recorder loses little."""

    def __init__(self, path: str | os.PathLike, limits: Limits, clock_offset_ns: int) -> None:
        self.path = Path(path)
        try:
            self._fh = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise CaptureFileError(
                f"cannot write capture file {self.path}: {exc.strerror}; check the directory"
            ) from exc
        self._packer = msgpack.Packer(use_bin_type=True)
        self._fh.write(MAGIC)
        self._write({
            "t": "hdr",
            "version": FORMAT_VERSION,
            "limits": limits.as_dict(),
            "clock_offset_ns": clock_offset_ns,
            "created": time.time(),
            "host": socket.gethostname(),
        })
        self.records = 0

    def _write(self, entry: dict) -> None:
        self._fh.write(self._packer.pack(entry))

    def record(self, raw: bytes) -> int:
        """Writes a kernel record; returns its sequence number for the facts it needs."""
        self._write({"t": "ev", "b": raw})
        self.records += 1
        return self.records - 1

    def fact(self, key: tuple, value: Any, seq: int) -> None:
        self._write({"t": "fact", "k": list(key), "v": value, "s": seq})

    def flush(self) -> None:
        self._fh.flush()

    def close(self, counters: dict[str, dict[str, int]] | None = None) -> None:
        if self._fh.closed:
            return
        self._write({"t": "end", "counters": counters or {}})
        self._fh.close()
