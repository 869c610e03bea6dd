"""What probes/driftwarden.bpf.c defines, read from the source: every TRACEPOINT_PROBE in it,
and those a set of -D flags compiles in (gcc's preprocessor, so the #if structure is the one
bcc sees). Tests compare both with probes/loader.py's tables and with what bcc attaches."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

from driftwarden.probes.loader import BPF_SOURCE

_TRACEPOINT_PROBE = re.compile(r"(?<![A-Za-z_])TRACEPOINT_PROBE\(\s*(\w+)\s*,\s*(\w+)\s*\)")


def _tracepoints_in(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(f"{cat}:{ev}" for cat, ev in _TRACEPOINT_PROBE.findall(text)))


def source_tracepoints(source: Path = BPF_SOURCE) -> tuple[str, ...]:
    """"category:event" of every TRACEPOINT_PROBE in the source, whatever its #if, in order."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", " ", source.read_text(), flags=re.S)
    return _tracepoints_in(text)


def compiled_tracepoints(cflags: Sequence[str], source: Path = BPF_SOURCE) -> tuple[str, ...]:
    """The TRACEPOINT_PROBEs left after preprocessing the source with `cflags` (its -D flags);
    #include lines are dropped, as the #if conditions use only the source's own defines."""
    text = "".join(line for line in source.read_text().splitlines(keepends=True)
                   if not line.lstrip().startswith("#include"))
    defines = [flag for flag in cflags if flag.startswith("-D")]
    out = subprocess.run(["gcc", "-E", "-P", *defines, "-x", "c", "-"], input=text,
                         capture_output=True, text=True, check=True, timeout=60)
    return _tracepoints_in(out.stdout)
