"""What every bench shares: its error type and the way a run ends (interrupted, failed, or a
report printed and written)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

_Result = TypeVar("_Result")


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


def _raise_interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt


def run_bench(run: Callable[[], _Result], render: Callable[[_Result], str], *,
              out: str | Path | None, cleaned_up: str) -> tuple[int, _Result | None]:
    """Runs `run()` with SIGTERM as Ctrl-C, prints the rendered report and writes it to `out`.
    Returns (exit code, result): 130 when interrupted (`cleaned_up` says what was undone), 1 on
    a BenchError, else 0."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        result = run()
    except KeyboardInterrupt:
        print(f"bench: interrupted; {cleaned_up}", file=sys.stderr)
        return 130, None
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1, None
    report = render(result)
    print(report)
    if out:
        Path(out).write_text(report)
        print(f"bench: report written to {out}", file=sys.stderr)
    return 0, result
