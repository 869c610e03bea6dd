"""Canonical path patterns: which real paths map to which pattern, and what must not collapse."""

from __future__ import annotations

import pytest
from driftwarden.models.canonical import (
    MAX_PATTERN,
    canonical_path,
    canonical_unix_socket,
    pattern_matches,
)

HEX64 = "3f9a1c" * 10 + "ab12"
CGROUP = f"/sys/fs/cgroup/system.slice/docker-{HEX64}.scope/cgroup.procs"

MAPPINGS = [
    # temp files (mktemp, shell here-docs, Python tempfile)
    ("/tmp/tmp.k3J9xQ2p1Z", "/tmp/tmp.*"),
    ("/tmp/tmp.Qw8ErT5yUi", "/tmp/tmp.*"),
    ("/tmp/sh-thd.aB3dEf", "/tmp/sh-thd.*"),
    ("/tmp/file.Zx9Yw8", "/tmp/file.*"),
    ("/tmp/upload_Xq9TzA.txt", "/tmp/upload_*.txt"),
    ("/tmp/tmpk3j9x2qz", "/tmp/tmp*"),
    ("/tmp/k3J9xQ2p1Z", "/tmp/*"),
    # rotated logs, dated logs
    ("/var/log/nginx/access.log.1", "/var/log/nginx/access.log.*"),
    ("/var/log/nginx/access.log.12.gz", "/var/log/nginx/access.log.*.gz"),
    ("/var/log/app/2026-11-23.log", "/var/log/app/*.log"),
    ("/var/log/app/20261123.log", "/var/log/app/*.log"),
    ("/var/log/app-2026-11-23T04:10:01.log", "/var/log/app-*.log"),
    ("/var/log/app-20261123T041001Z.log", "/var/log/app-*.log"),
    ("/var/log/app-3.log", "/var/log/app-*.log"),
    ("/core.12345", "/core.*"),
    ("/var/crash/core12345", "/var/crash/core*"),
    # per-process, per-container, per-user
    ("/proc/1234/status", "/proc/*/status"),
    ("/proc/1/task/17/comm", "/proc/*/task/*/comm"),
    ("/proc/self/exe", "/proc/self/exe"),
    (f"/run/containerd/{HEX64}/x", "/run/containerd/*/x"),
    (CGROUP, "/sys/fs/cgroup/system.slice/docker-*.scope/cgroup.procs"),
    ("/run/0f8fad5b-d9cb-469f-a165-70867728950e/lock", "/run/*/lock"),
    ("/run/user/1000/bus", "/run/user/*/bus"),
    ("/app/cache/5f3a9c.bin", "/app/cache/*.bin"),
    ("/var/www/sess/sess_a1b2c3", "/var/www/sess/sess_*"),
    # libraries and versioned interpreters (documented: versions become *)
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.*"),
    ("/usr/lib/x86_64-linux-gnu/libssl.so.3", "/usr/lib/x86_64-linux-gnu/libssl.so.*"),
    ("/lib64/ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.*"),
    ("/usr/bin/python3.11", "/usr/bin/python3.*"),
    ("/usr/bin/python3.12", "/usr/bin/python3.*"),
    ("/usr/lib/libQt5Core.so.5", "/usr/lib/libQt5Core.so.*"),
    # unchanged
    ("/home/u/.bash_history", "/home/u/.bash_history"),
    ("/bin/busybox", "/bin/busybox"),
    ("/bin/sh", "/bin/sh"),
    ("/usr/bin/python3", "/usr/bin/python3"),
    ("/usr/bin/sha256sum", "/usr/bin/sha256sum"),
    ("/sbin/e2fsck", "/sbin/e2fsck"),
    ("/usr/bin/base64", "/usr/bin/base64"),
    ("/etc/nginx/nginx.conf", "/etc/nginx/nginx.conf"),
    ("/usr/share/doc/x/README.Debian", "/usr/share/doc/x/README.Debian"),
    ("/tmp/deadbeef", "/tmp/deadbeef"),
    ("/etc/cron.daily/logrotate", "/etc/cron.daily/logrotate"),
    ("relative/dir/app.pid", "relative/dir/app.pid"),
    ("", ""),
]


@pytest.mark.parametrize(("path", "pattern"), MAPPINGS)
def test_canonical_path(path: str, pattern: str) -> None:
    assert canonical_path(path) == pattern
    assert canonical_path(pattern) == pattern  # idempotent
    assert pattern_matches(pattern, path)


DISTINCT = [
    ("/bin/sh", "/bin/bash"),
    ("/usr/bin/python3", "/usr/bin/python2"),
    ("/usr/bin/sha256sum", "/usr/bin/sha512sum"),
    ("/usr/bin/md5sum", "/usr/bin/sha1sum"),
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libm.so.6"),
    ("/etc/passwd", "/etc/shadow"),
    ("/usr/bin/nc", "/usr/bin/ncat"),
    ("/var/log/nginx/access.log.1", "/var/log/nginx/error.log.1"),
    ("/var/log/nginx/access.log", "/var/log/nginx/access.log.1"),
    ("/tmp/tmp.k3J9xQ2p1Z", "/var/tmp/tmp.k3J9xQ2p1Z"),
    ("/proc/1/status", "/proc/1/environ"),
]


@pytest.mark.parametrize(("a", "b"), DISTINCT)
def test_distinct_paths_do_not_collapse(a: str, b: str) -> None:
    assert canonical_path(a) != canonical_path(b)


def test_consecutive_wildcards_collapse() -> None:
    assert canonical_path("/x/2026-11-23_5f3a9c1d") == "/x/*_*"
    assert "**" not in canonical_path("/x/" + "1" * 9 + "abcdef12")


def test_output_is_bounded() -> None:
    long = "/data/" + "/".join(["segment"] * 200)
    out = canonical_path(long)
    assert len(out) == MAX_PATTERN and out.endswith("…")
    assert pattern_matches(out, long)
    assert not pattern_matches(out, "/other" + long)


def test_unix_socket() -> None:
    assert canonical_unix_socket("/run/app/4242.sock") == "/run/app/*.sock"
    assert canonical_unix_socket("/var/run/docker.sock") == "/var/run/docker.sock"
    assert canonical_unix_socket(f"@/containerd-shim/{HEX64}.sock") == "@/containerd-shim/*.sock"
    assert canonical_unix_socket("@") == "@"


@pytest.mark.parametrize(("pattern", "path", "expected"), [
    ("/proc/*/status", "/proc/1/status", True),
    ("/proc/*/status", "/proc/1/task/2/status", False),  # * does not cross /
    ("/tmp/*", "/tmp/", True),
    ("/tmp/*.log", "/tmp/a.log", True),
    ("/tmp/*.log", "/tmp/a.logx", False),
    ("/a?b[c]", "/a?b[c]", True),  # ? and [ are literal
    ("/a?b", "/axb", False),
    ("/a.b", "/axb", False),  # so is .
])
def test_pattern_matches(pattern: str, path: str, expected: bool) -> None:
    assert pattern_matches(pattern, path) is expected
