"""argparse for every command: the parser class and the value types for numeric flags, so every
command reports a bad flag in one line with one wording.

``number(int, ...)`` or ``number(float, unit=...)`` returns a converter for ``type=``; a bad value
gives ``expected a whole number, got 'x'`` / ``expected a number of seconds, got 'x'``, and one out
of bounds ``must be > 0, got -1`` (NaN and infinities are always out of bounds).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def number(kind: type[int] | type[float], *, unit: str = "seconds", minimum: float = 0,
           exclusive: bool = False, maximum: float | None = None,
           bound: str | None = None) -> Callable[[str], float]:
    """A converter accepting `minimum` <= value (< with `exclusive`) <= `maximum`. `bound`
    replaces the "> 0" / ">= 1" / "1..N" part of the out-of-bounds message."""
    noun = "a whole number" if kind is int else f"a number of {unit}"
    if bound is None:
        low = f"{'>' if exclusive else '>='} {minimum:g}"
        bound = low if maximum is None else f"{minimum:g}..{maximum:g}"

    def convert(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        inside = (math.isfinite(value) and (value > minimum if exclusive else value >= minimum)
                  and (maximum is None or value <= maximum))
        if not inside:
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return convert


POSITIVE_SECONDS = number(float, exclusive=True)
NON_NEGATIVE_SECONDS = number(float)
POSITIVE_INT = number(int, minimum=1)


class CommandParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as one line (what was wrong, where to look)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")
