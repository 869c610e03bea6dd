"""/proc/PID/mountinfo, parsed once for everyone who needs a mount: the tracing directory, the
cgroup v2 hierarchy, a container's overlay root. The text is passed in; reading it is the
caller's business (a live file, a recorded one, a test's)."""

from __future__ import annotations

import re
from dataclasses import dataclass

# mountinfo writes space, tab, newline and backslash as \ooo (octal)
_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True, slots=True)
class Mount:
    root: str  # the part of the filesystem mounted here ("/" for a whole filesystem)
    mount_point: str
    fstype: str
    source: str
    options: dict[str, str]  # the superblock options: "upperdir" -> "/var/lib/...", "ro" -> ""


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a mountinfo text, in its order; malformed lines are skipped."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        options = {}
        for option in (tail[2] if len(tail) > 2 else "").split(","):
            if option:
                key, _, value = option.partition("=")
                options[key] = unescape(value)
        mounts.append(Mount(root=unescape(fields[3]), mount_point=unescape(fields[4]),
                            fstype=tail[0], source=unescape(tail[1]) if len(tail) > 1 else "",
                            options=options))
    return mounts
