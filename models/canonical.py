"""Canonical path patterns: the variable parts of paths become wildcards.

A baseline learns *patterns*, not paths, so that temp files, rotated logs, per-PID /proc paths and
per-container directories of one real-world family map to a single item. The rules are applied
to each ``/``-separated component, in this order (a "token" is a maximal run of ``[A-Za-z0-9]``,
so ``.``, ``-``, ``_`` and other punctuation separate tokens):

===  ==========================  =========================================  =====================
 #   rule                        example                                    pattern
===  ==========================  =========================================  =====================
 1   UUID                        ``/run/0f8fad5b-d9cb-469f-a165-70867728950e``  ``/run/*``
 2   ISO date / timestamp        ``/var/log/app/2026-11-23.log``            ``/var/log/app/*.log``
     (``YYYY-MM-DD``,            ``backup-20261123T041001Z.tar``            ``backup-*.tar``
     ``YYYYMMDD``, with an       ``2026-11-23T04:10:01``                    ``*``
     optional time and zone)
 3   hex token: 6+ hex chars     ``/run/containerd/<64 hex>/x``             ``/run/containerd/*/x``
     with at least one digit     ``/app/cache/5f3a9c.bin``                  ``/app/cache/*.bin``
                                 (``deadbeef`` has no digit: kept)
 4   ``tmp`` + 6 or more         ``/tmp/tmpk3j9x2qz`` (Python tempfile)     ``/tmp/tmp*``
     ``[A-Za-z0-9_]``
 5   mktemp suffix: the last     ``/tmp/tmp.k3J9xQ2p1Z``                    ``/tmp/tmp.*``
     token after ``.``/``-``/    ``/tmp/sh-thd.aB3dEf``                     ``/tmp/sh-thd.*``
     ``_`` (optionally before    ``/tmp/upload_Xq9TzA.txt``                 ``/tmp/upload_*.txt``
     a short extension), 6+      (``README.Debian``: only a leading
     chars, with a digit and a   capital, kept; ``libQt5Core``: not after
     letter, or inner mixed      a separator, kept)
     case
 6   random token: 8+ chars with ``/tmp/k3J9xQ2p1Z``                        ``/tmp/*``
     4+ letter/digit changes     (``sha256sum``, ``e2fsck``: kept)
 7   digit-only token            ``/proc/1234/status``                      ``/proc/*/status``
     (``/proc/<pid>/...`` is     ``/var/log/nginx/access.log.1``            ``.../access.log.*``
     the most common case)       ``app-3.log``, ``core.12345``              ``app-*.log``,``core.*``
                                 ``libc.so.6``, ``libssl.so.3``             ``libc.so.*``, ...
                                 ``python3.11`` / ``python3.12``            both ``python3.*``
                                 (``x86_64``/``x86-64`` keep their 64)
 8   digit runs of 5+ glued to   ``core12345``, ``log20261``                ``core*``, ``log*``
     letters
 9   ``**`` -> ``*``
===  ==========================  =========================================  =====================

Deliberate choices:

* Digits glued to letters in short runs are kept: ``python3`` vs ``python2``, ``sha256sum`` vs
  ``sha512sum``, ``md5sum``, ``base64`` stay distinct, and so do ``/bin/sh`` and ``/bin/bash``.
  The price: ``app3.log`` and ``app4.log`` do not collapse (``app-3.log`` and ``app-4.log`` do).
* Library sonames lose their version (``libssl.so.3`` -> ``libssl.so.*``): an image upgrade
  that bumps a minor version should not look new; distinct libraries keep distinct names.
  Likewise ``python3.11`` and ``python3.12`` collapse to ``python3.*``.
* mktemp names made only of letters of one case (about 1 in 60 of random 6-char suffixes) are
  not recognised; nor are random names without a separator shorter than 8 characters.
* Rule 3 also takes hex-looking words with a digit: ``ssh_host_ed25519_key`` ->
  ``ssh_host_*_key`` (stable, and the only such key name in practice).
* Output is bounded to ``MAX_PATTERN`` characters; a longer one ends in ``…`` (and
  :func:`pattern_matches` treats that ``…`` as "anything may follow").
"""

from __future__ import annotations

import itertools
import re
from functools import lru_cache

MAX_PATTERN = 256
ELLIPSIS = "…"

_UUID = re.compile(
    r"(?<![A-Za-z0-9])[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
    r"[0-9a-fA-F]{12}(?![A-Za-z0-9])"
)
_DATE = re.compile(
    r"(?<![0-9])(?:19|20)\d{2}(?:-\d{2}-\d{2}|\d{4})"  # 2026-11-23 or 20261123
    r"(?:[T_ ]?\d{2}[:\-]?\d{2}(?:[:\-]?\d{2})?(?:[.,]\d+)?)?"  # optional time
    r"(?:Z|[+-]\d{2}:?\d{2})?"  # optional zone
    r"(?![0-9])"
)
_HEX = re.compile(r"(?<![A-Za-z0-9])(?=[A-Za-z]*[0-9])[0-9a-fA-F]{6,}(?![A-Za-z0-9])")
_TMP_PREFIX = re.compile(r"^(\.?tmp)[A-Za-z0-9_]{6,}")
_MKTEMP = re.compile(r"(?<=[._-])([A-Za-z0-9]{6,})(?=(?:\.[A-Za-z0-9]{1,5})?$)")
_TOKEN = re.compile(r"[A-Za-z0-9]{8,}")
_DIGIT_TOKEN = re.compile(r"(?<![A-Za-z0-9])(?<!x86_)(?<!x86-)[0-9]+(?![A-Za-z0-9])")
_LONG_DIGITS = re.compile(r"[0-9]{5,}")
_STARS = re.compile(r"\*{2,}")
_NO_DIGIT = re.compile(r"[^0-9]*")


def _random_suffix(match: re.Match) -> str:
    # the token is ASCII letters and digits only (the pattern's class): "not all letters" is
    # "has a digit", and a case change shows an upper or lower case letter (no scans per char)
    token = match.group(1)
    has_digit = not token.isalpha()
    has_alpha = not token.isdigit()
    inner = token[1:]
    mixed_case = inner != inner.lower() and token != token.upper()
    if (has_digit and has_alpha) or mixed_case:
        return "*"
    return token


def _changes(token: str) -> int:
    kinds = [c.isdigit() for c in token]
    return sum(1 for a, b in itertools.pairwise(kinds) if a != b)


def _random_token(match: re.Match) -> str:
    token = match.group(0)
    return "*" if _changes(token) >= 4 else token


@lru_cache(maxsize=16384)
def canonical_component(part: str) -> str:
    """Rules 1-9 of the module docstring applied to one path component (no ``/``).

    Cached: the directories of a path repeat far more often than whole paths (a new temp file
    per request shares every component but its last with the others)."""
    if not part or part in (".", ".."):
        return part
    # the rules only ever replace characters with "*": a component without digits keeps none,
    # so the rules that need a digit (dates, hex, random tokens, digit runs) are skipped
    has_digit = not _NO_DIGIT.fullmatch(part)
    if len(part) >= 36:
        part = _UUID.sub("*", part)
    if has_digit:
        if "19" in part or "20" in part:  # every date starts with one
            part = _DATE.sub("*", part)
        part = _HEX.sub("*", part)
    if part.startswith(("tmp", ".tmp")):
        # anchored: at most one match, at the start (sub with a template costs a Python call)
        found = _TMP_PREFIX.match(part)
        if found is not None:
            part = found.group(1) + "*" + part[found.end():]
    if "." in part or "-" in part or "_" in part:  # a mktemp suffix follows one
        part = _MKTEMP.sub(_random_suffix, part)
        has_digit = has_digit and not _NO_DIGIT.fullmatch(part)
    if has_digit:
        part = _TOKEN.sub(_random_token, part)
        part = _DIGIT_TOKEN.sub("*", part)
        part = _LONG_DIGITS.sub("*", part)
    return _STARS.sub("*", part) if "**" in part else part


def _bound(pattern: str) -> str:
    if len(pattern) <= MAX_PATTERN:
        return pattern
    return pattern[: MAX_PATTERN - 1] + ELLIPSIS


@lru_cache(maxsize=16384)
def canonical_path(path: str) -> str:
    """The pattern of `path` (absolute or not): see the module docstring for the rules.

    >>> canonical_path("/proc/1234/status")
    '/proc/*/status'
    >>> canonical_path("/var/log/nginx/access.log.1")
    '/var/log/nginx/access.log.*'
    >>> canonical_path("/bin/busybox")
    '/bin/busybox'
    """
    if len(path) > 4 * MAX_PATTERN:
        path = path[: 4 * MAX_PATTERN]  # the rest cannot survive the bound anyway
    return _bound("/".join(map(canonical_component, path.split("/"))))


def canonical_unix_socket(path: str) -> str:
    """A unix socket address: a filesystem path, or an abstract name ``@name``; same rules.

    >>> canonical_unix_socket("/run/app/4242.sock")
    '/run/app/*.sock'
    >>> canonical_unix_socket("@/containerd-shim/0123abcd0123abcd.sock")
    '@/containerd-shim/*.sock'
    """
    if path.startswith("@"):
        return _bound("@" + canonical_path(path[1:]))
    return canonical_path(path)


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern:
    truncated = pattern.endswith(ELLIPSIS)
    if truncated:
        pattern = pattern[: -len(ELLIPSIS)]
    body = "[^/]*".join(re.escape(piece) for piece in pattern.split("*"))
    return re.compile(body + (".*" if truncated else ""), re.DOTALL)


def pattern_matches(pattern: str, path: str) -> bool:
    """Whether `path` matches `pattern` as a whole: ``*`` is any run of characters except
    ``/``; every other character (including ``?`` and ``[``) is literal. A pattern cut at the
    length bound (ending in ``…``) matches anything after its kept prefix.

    >>> pattern_matches("/proc/*/status", "/proc/1/status")
    True
    >>> pattern_matches("/tmp/*", "/tmp/a/b")
    False
    """
    return _compile(pattern).fullmatch(path) is not None
