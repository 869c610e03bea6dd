"""driftwarden.core.mountinfo: one parser for /proc/PID/mountinfo."""

from __future__ import annotations

from driftwarden.core.mountinfo import Mount, parse_mountinfo, unescape

OVERLAY = ("1203 1100 0:98 / / rw,relatime master:1 - overlay overlay "
           "rw,lowerdir=/l/a:/l/b,upperdir=/u/diff,workdir=/u/work")
TRACEFS = "23 22 0:12 / /sys/kernel/tra\\040cing rw,nosuid - tracefs nodev rw"
CGROUP2_SUBTREE = "40 30 0:27 /kubepods /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate"


def test_fields_options_and_escapes():
    mounts = parse_mountinfo("\n".join([OVERLAY, TRACEFS, CGROUP2_SUBTREE]))
    assert mounts == [
        Mount(root="/", mount_point="/", fstype="overlay", source="overlay",
              options={"rw": "", "lowerdir": "/l/a:/l/b", "upperdir": "/u/diff",
                       "workdir": "/u/work"}),
        Mount(root="/", mount_point="/sys/kernel/tra cing", fstype="tracefs", source="nodev",
              options={"rw": ""}),
        Mount(root="/kubepods", mount_point="/sys/fs/cgroup", fstype="cgroup2",
              source="cgroup2", options={"rw": "", "nsdelegate": ""}),
    ]


def test_malformed_lines_are_skipped():
    assert parse_mountinfo("garbage\n1 2 3\n\n1 2 0:1 / /x rw - \n" + TRACEFS) == \
        parse_mountinfo(TRACEFS)


def test_unescape_octal_only():
    assert unescape(r"a\040b\011c\134d\012e") == "a b\tc\\d\ne"
    assert unescape(r"no\escape\9") == r"no\escape\9"
