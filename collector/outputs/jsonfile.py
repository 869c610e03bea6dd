"""The JSON-lines file output, rotated by size.

Keys in the outputs file (besides the common ones, see ``config``)::

    path: /var/log/driftwarden/alerts.jsonl   # its directory must exist
    max_bytes: 104857600                      # rotate before a line would pass this size
    keep: 5                                   # rotated files kept: PATH.1 (newest) .. PATH.5

One alert per line: its JSON object (the shape ``driftwarden alerts --json`` prints), ASCII
(text from containers is escaped, never a raw newline), so every line parses on its own.
Rotation renames PATH to PATH.1 (PATH.1 to PATH.2, ..., the oldest beyond ``keep`` is
deleted) and starts a new PATH; a single line longer than ``max_bytes`` is still written
whole, alone in its file. The file is made with mode 0640 and flushed after every line.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Self

from driftwarden.collector.outputs.base import Fields, Sink, SinkConfig
from driftwarden.core.errors import OutputError

FILE_MODE = 0o640


def rotated_name(path: str, n: int) -> str:
    return f"{path}.{n}"


@dataclass(frozen=True)
class JsonFileConfig(SinkConfig):
    type = "jsonfile"

    path: str
    max_bytes: int = 100 * 1024 * 1024
    keep: int = 5

    @classmethod
    def parse(cls, fields: Fields) -> Self:
        path = os.path.abspath(fields.text("path"))
        parent = os.path.dirname(path)
        if os.path.isdir(path):
            raise fields.error("path", f"{path} is a directory; give a file in it, e.g. "
                                       f"{path}/alerts.jsonl")
        if not os.path.isdir(parent):
            raise fields.error("path", f"directory {parent} does not exist; create it first")
        return cls(path=path,
                   max_bytes=fields.number("max_bytes", cls.max_bytes, minimum=1024,
                                           integer=True),
                   keep=fields.number("keep", cls.keep, minimum=1, maximum=1000, integer=True))

    def make_sink(self) -> JsonFileSink:
        return JsonFileSink(self)

    def describe(self) -> str:
        return (f"JSON lines to {self.path} (rotated at {self.max_bytes} bytes, "
                f"{self.keep} kept)")


class JsonFileSink(Sink):
    def __init__(self, config: JsonFileConfig) -> None:
        self.config = config
        self._file: IO[bytes] | None = None
        self._size = 0

    def send(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        try:
            for alert in alerts:
                self._write((json.dumps(alert, separators=(",", ":")) + "\n").encode("ascii"))
        except OSError as exc:
            self.close()
            raise OutputError(f"cannot write {self.config.path}: {exc.strerror or exc}") \
                from None

    def _write(self, line: bytes) -> None:
        if self._file is None:
            self._open()
        if self._size and self._size + len(line) > self.config.max_bytes:
            self._rotate()
        assert self._file is not None
        self._file.write(line)
        self._file.flush()
        self._size += len(line)

    def _open(self) -> None:
        fd = os.open(self.config.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                     FILE_MODE)
        self._file = os.fdopen(fd, "ab")
        self._size = os.fstat(fd).st_size

    def _rotate(self) -> None:
        self.close()
        path, keep = self.config.path, self.config.keep
        for n in range(keep - 1, 0, -1):
            if os.path.exists(rotated_name(path, n)):
                os.replace(rotated_name(path, n), rotated_name(path, n + 1))
        os.replace(path, rotated_name(path, 1))
        self._open()

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):  # a failed write's buffer: the retry rewrites it
                file.close()


__all__ = ["JsonFileConfig", "JsonFileSink", "rotated_name"]
