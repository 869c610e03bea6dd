"""A strict RFC 5424 parser for tests of the syslog output (the ABNF of section 6, with the
SD-PARAM escapes of 6.3.3), and RFC 6587 octet-counting frame splitting."""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEADER = re.compile(
    rb"<(?P<pri>0|[1-9]\d{0,2})>(?P<version>[1-9]\d{0,2}) "
    rb"(?P<timestamp>-|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
    rb"(?P<hostname>[!-~]{1,255}) (?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) "
    rb"(?P<msgid>[!-~]{1,32}) ")
_SD_NAME = re.compile(r'[!#-<>-\\^-~]{1,32}')  # PRINTUSASCII except '=', SP, ']', '"'


class Malformed(ValueError):
    pass


@dataclass
class Message:
    pri: int
    timestamp: str
    hostname: str
    app: str
    procid: str
    msgid: str
    sd: list[tuple[str, dict[str, str]]]
    msg: bytes


def parse(data: bytes) -> Message:
    """One RFC 5424 message; Malformed says where it breaks the grammar."""
    if b"\n" in data or b"\r" in data:
        raise Malformed(f"raw line break in the message: {data!r}")
    m = _HEADER.match(data)
    if m is None:
        raise Malformed(f"bad HEADER: {data[:120]!r}")
    pri = int(m["pri"])
    if pri > 191 or m["version"] != b"1":
        raise Malformed(f"PRI {pri} or VERSION {m['version']!r} out of range")
    rest = data[m.end():].decode("utf-8")  # SD is UTF-8 (PARAM-VALUE); strict decode
    sd, i = _structured_data(rest)
    tail = rest[i:]
    if tail and not tail.startswith(" "):
        raise Malformed(f"no SP between STRUCTURED-DATA and MSG: {tail[:40]!r}")
    return Message(pri, m["timestamp"].decode(), m["hostname"].decode(), m["app"].decode(),
                   m["procid"].decode(), m["msgid"].decode(), sd, tail[1:].encode())


def _structured_data(text: str) -> tuple[list[tuple[str, dict[str, str]]], int]:
    if text.startswith("-"):
        return [], 1
    elements, i = [], 0
    if not text.startswith("["):
        raise Malformed(f"STRUCTURED-DATA must be '-' or start with '[': {text[:40]!r}")
    while i < len(text) and text[i] == "[":
        name = _SD_NAME.match(text, i + 1)
        if name is None:
            raise Malformed(f"bad SD-ID at {i + 1}: {text[i:i + 40]!r}")
        i = name.end()
        params: dict[str, str] = {}
        while text[i] == " ":
            pname = _SD_NAME.match(text, i + 1)
            if pname is None or text[pname.end():pname.end() + 2] != '="':
                raise Malformed(f"bad SD-PARAM at {i + 1}: {text[i:i + 40]!r}")
            i = pname.end() + 2
            value = []
            while True:
                c = text[i]
                if c == "\\" and text[i + 1] in '"\\]':
                    value.append(text[i + 1])
                    i += 2
                elif c == '"':
                    i += 1
                    break
                elif c == "]":
                    raise Malformed(f"unescaped ']' in PARAM-VALUE at {i}")
                else:
                    value.append(c)
                    i += 1
            params[pname.group()] = "".join(value)
        if text[i] != "]":
            raise Malformed(f"SD-ELEMENT not closed at {i}: {text[i:i + 40]!r}")
        i += 1
        elements.append((name.group(), params))
    return elements, i


def split_octet_counted(stream: bytes) -> tuple[list[bytes], bytes]:
    """RFC 6587 octet-counting frames of `stream`: (complete messages, the rest)."""
    out = []
    while stream:
        m = re.match(rb"([1-9]\d*) ", stream)
        if m is None:
            if len(stream) > 10 or not stream.isdigit():
                raise Malformed(f"bad frame start: {stream[:40]!r}")
            break
        size = int(m[1])
        if len(stream) < m.end() + size:
            break
        out.append(stream[m.end():m.end() + size])
        stream = stream[m.end() + size:]
    return out, stream
