"""Compile, load and attach the BPF program in a short-lived child process, which hands the
loader only file descriptors: the maps it reads and writes, the attachments that keep the
programs running, and programs loaded for the caller to attach (the quarantine's cgroup
programs). bcc and LLVM (about 130 MB of RSS once a program is compiled) live and die
with the child; the agent keeps libbpf (probes/_libbpf.py) and the fds.

Parent: compile_and_attach(). Child: `python -m driftwarden.probes._compile FD`, FD one end of
a SOCK_SEQPACKET socketpair. The parent sends one JSON request (source, cflags, map names); the
child answers with messages of JSON and the fds they name (SCM_RIGHTS), or with an error. The
child then leaves with os._exit, skipping bcc's atexit cleanup: that would disable the perf
events the parent now shares, and detach every program.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from driftwarden.core.errors import ProbeLoadError

log = logging.getLogger(__name__)

# SCM_RIGHTS carries at most 253 fds a message (SCM_MAX_FD); stay well below it
FDS_PER_MESSAGE = 200
MESSAGE_BYTES = 1 << 20
COMPILE_TIMEOUT = 180.0  # seconds; a compile takes 2-4 s on an idle 2-core host
OUTPUT_SHOWN = 20000  # characters of compiler/verifier output logged on failure


@dataclass(frozen=True)
class Compiled:
    """What the child handed over: map fds by map name, attachment fds (perf events of
    tracepoints, raw tracepoint links) by "category:event" in the order bcc attached them,
    program fds by function name (loaded, not attached). The caller owns every fd;
    close_all() closes them."""

    maps: dict[str, int] = field(default_factory=dict)
    attached: dict[str, int] = field(default_factory=dict)
    programs: dict[str, int] = field(default_factory=dict)

    def close_all(self) -> None:
        for fd in (*self.attached.values(), *self.maps.values(), *self.programs.values()):
            with contextlib.suppress(OSError):
                os.close(fd)


def compile_and_attach(source: Path, cflags: Sequence[str], maps: Sequence[str], *,
                       programs: Sequence[tuple[str, int, int]] = (),
                       timeout: float = COMPILE_TIMEOUT) -> Compiled:
    """Compiles `source` with `cflags` in a child, which loads and attaches every tracepoint
    program; returns the fds of the maps named in `maps`, of every attachment, and of the
    `programs` (function name, bpf_prog_type, bpf_attach_type) it loads for the caller to
    attach. ProbeLoadError (the compiler's or verifier's output logged) when it fails."""
    request = json.dumps({"source": str(source), "cflags": list(cflags), "maps": list(maps),
                          "programs": [list(p) for p in programs]})
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, tempfile.TemporaryFile() as output:
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=output,
                stderr=output)
        finally:
            theirs.close()  # the child's end: EOF here once the child is gone
        compiled = Compiled()
        try:
            ours.sendall(request.encode())
            compiled = _receive(ours, child, timeout)
        except BaseException as exc:
            compiled.close_all()
            with contextlib.suppress(OSError):
                child.kill()
            child.wait()
            if isinstance(exc, ProbeLoadError):
                _log_output(output)
            raise
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        if code != 0:  # everything arrived: the programs run; only note it
            log.warning("the BPF compiling process ended with code %s after handing over", code)
    return compiled


def _receive(sock: socket.socket, child: subprocess.Popen, timeout: float) -> Compiled:
    deadline = time.monotonic() + timeout
    received = Compiled()
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            data, fds, flags, _ = socket.recv_fds(sock, MESSAGE_BYTES, FDS_PER_MESSAGE,
                                                  socket.MSG_CMSG_CLOEXEC)
        except TimeoutError:
            received.close_all()
            raise ProbeLoadError(
                f"BPF program failed to compile or load (no answer from the compiling process "
                f"in {timeout:g} s); is the host overloaded?") from None
        if not data:
            code = child.wait()
            received.close_all()
            raise ProbeLoadError(
                f"BPF program failed to compile or load (the compiling process ended with code "
                f"{code} before handing the programs over); run `driftwarden doctor` to see "
                "which kernel feature is missing")
        message = json.loads(data)
        if "error" in message:
            for fd in fds:
                os.close(fd)
            received.close_all()
            raise ProbeLoadError(
                f"BPF program failed to compile or load ({message['error']}); run "
                "`driftwarden doctor` to see which kernel feature is missing")
        names = [(what, name) for what in _SENT for name in message[what]]
        if flags & socket.MSG_CTRUNC or len(fds) != len(names):
            for fd in fds:
                os.close(fd)
            received.close_all()
            raise ProbeLoadError(f"BPF program failed to load: the compiling process sent "
                                 f"{len(names)} names but {len(fds)} fds arrived; is the fd "
                                 "limit (ulimit -n) too low?")
        for (what, name), fd in zip(names, fds, strict=True):
            getattr(received, what)[name] = fd
        if message["last"]:
            return received


def _log_output(output) -> None:
    output.seek(0)
    text = output.read().decode(errors="replace")
    if text.strip():
        log.error("BPF compiler/verifier output:\n%s", text[-OUTPUT_SHOWN:])


# -- the child ------------------------------------------------------------------------------


_SENT = ("maps", "attached", "programs")  # a message's name lists, in the order of its fds


def _send(sock: socket.socket, sent: dict[str, list[tuple[str, int]]]) -> None:
    entries = [(what, name, fd) for what in _SENT for name, fd in sent[what]]
    chunks = [entries[i:i + FDS_PER_MESSAGE]
              for i in range(0, len(entries), FDS_PER_MESSAGE)] or [[]]
    for number, chunk in enumerate(chunks):
        # grouped by kind within the chunk, as the entries are: the fds follow the names
        message = {what: [name for kind, name, _ in chunk if kind == what] for what in _SENT}
        message["last"] = number == len(chunks) - 1
        socket.send_fds(sock, [json.dumps(message).encode()], [fd for _, _, fd in chunk])


def _compile_and_send(sock: socket.socket) -> None:
    request = json.loads(sock.recv(MESSAGE_BYTES))
    try:
        from bcc import BPF, lib  # only here: the parent never imports bcc
    except ImportError as exc:
        raise RuntimeError(
            f"bcc is not importable ({exc}): install python3-bpfcc and use a venv made with "
            "--system-site-packages (run `make setup`)") from None

    bpf = BPF(src_file=request["source"].encode(), cflags=request["cflags"])
    maps = []
    for name in request["maps"]:
        fd = lib.bpf_table_fd(bpf.module, name.encode())
        if fd < 0:
            raise LookupError(f"the program has no map named {name}")
        maps.append((name, fd))
    attached = [(tp.decode(), fd) for tp, fd in bpf.tracepoint_fds.items()]
    attached += [(f"raw_tracepoint:{tp.decode()}", fd)
                 for tp, fd in bpf.raw_tracepoint_fds.items()]
    programs = [(name, bpf.load_func(name.encode(), prog_type, attach_type=attach_type).fd)
                for name, prog_type, attach_type in request.get("programs", ())]
    _send(sock, {"maps": maps, "attached": attached, "programs": programs})


def main(argv: Sequence[str]) -> None:
    """The child: never returns. Exits with os._exit so that bcc's atexit cleanup, which
    would detach what the parent now holds, never runs."""
    code = 1
    try:
        sock = socket.socket(fileno=int(argv[0]))
        try:
            _compile_and_send(sock)
            code = 0
        except BaseException as exc:  # every failure goes to the parent
            text = " ".join(str(exc).split()) or type(exc).__name__
            with contextlib.suppress(OSError):
                sock.send(json.dumps({"error": text}).encode())
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
