"""Stand-ins for an operator's terminal in tests of the operator commands: a StringIO that can
wait for what is written to it (:class:`Tap`), one that says it is a terminal
(:class:`FakeTerminal`), and what a terminal shows at the end of a live display
(:func:`screen`)."""

from __future__ import annotations

import io
import re
import threading

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Tap(io.StringIO):
    """A StringIO that can wait until it has received a number of lines, or a text."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()

    def write(self, text: str) -> int:
        with self._changed:
            written = super().write(text)
            self._changed.notify_all()
        return written

    def wait_lines(self, n: int, timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.getvalue().count("\n") >= n, timeout)

    def wait_for(self, text: str, timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: text in self.getvalue(), timeout)


class FakeTerminal(Tap):
    """What the commands and rich take for a terminal (``isatty()``). `gate` (when given) holds
    every write until set, like a terminal that stopped reading (Ctrl-S, a stuck ssh
    session); `first_write` is set when a write begins."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.first_write = threading.Event()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.first_write.set()
        if self.gate is not None:
            self.gate.wait()
        return super().write(text)


def screen(out: io.StringIO) -> list[str]:
    """What a terminal shows at the end: for a live display its last frame (what follows the
    last erase-line code), without colours, trailing spaces dropped."""
    text = _ANSI.sub("", out.getvalue().split("\x1b[2K")[-1])
    return [line.rstrip() for line in text.splitlines()]


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


__all__ = ["FakeTerminal", "Tap", "screen", "strip_ansi"]
