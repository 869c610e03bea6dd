"""What the scenario suites share (tests/test_scenarios.py, tests/test_scenarios_field.py): HTTP
traffic to workload containers from this (host, untraced) process, the attacker's end of a
reverse shell, waiting, the agent's baselines as `driftwarden baseline --json list` reports
them, and reading alerts (their reasons and details)."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.containers import docker_client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, query: str, timeout: float = 3.0) -> str | None:
    """GET /cgi-bin/app?query from a loopback web workload; None when it did not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/cgi-bin/app?{query}",
                                    timeout=timeout) as response:
            return response.read().decode()
    except OSError:
        return None


def inject(port: int, command: str, timeout: float = 10.0) -> str | None:
    """The web workloads' injectable CGI parameter (``debug=``) carrying a shell command."""
    return get(port, "debug=" + urllib.parse.quote(command, safe=""), timeout=timeout)


class Traffic:
    """HTTP GETs to the web containers from this (host, untraced) process at a set rate.
    ``ports`` may be changed while it runs (replicas come and go)."""

    def __init__(self, ports: list[int], interval: float) -> None:
        self.ports = list(ports)
        self.interval = interval
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            for port in list(self.ports):
                n += 1
                ok = get(port, f"page={n}") is not None
                self.sent += ok
                self.failed += not ok
            self._stop.wait(self.interval)


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def baselines(state_dir: Path) -> dict[str, dict]:
    """image id -> the baseline's `baseline --json list` entry ({} when the agent is busy)."""
    cmd = [sys.executable, "-m", "driftwarden", "baseline", "--state-dir", str(state_dir),
           "--json", "list"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        return {}
    return {b["image_id"]: b for b in json.loads(out.stdout)}


def baseline_modes(state_dir: Path) -> dict[str, str]:
    return {image_id: b["mode"] for image_id, b in baselines(state_dir).items()}


def image_id(tag: str) -> str:
    """The content id (sha256:...) of a local image tag."""
    client = docker_client()
    try:
        return str(client.images.get(tag).id)
    finally:
        client.close()


def files_in(container, directory: str) -> list[str]:
    """Names under `directory`, read through Docker's archive API (no exec in the container)."""
    stream, _ = container.container.get_archive(directory)
    data = io.BytesIO(b"".join(stream))
    with tarfile.open(fileobj=data) as tar:
        return [m.name for m in tar.getmembers() if m.isfile()]


def reasons(alert: dict[str, Any]) -> list[tuple[str, str]]:
    return [(r["code"], r["text"]) for r in alert["reasons"]]


def detail(alert: dict[str, Any], key: str) -> str:
    """A detail of the alert's first reason, as text ("" when absent)."""
    return str(alert["reasons"][0]["details"].get(key, ""))


def has_reason(alert: dict[str, Any], code: str, *, text: str | None = None,
               **details: Callable[[str], bool] | str) -> bool:
    """Whether any reason of the alert (an incident may carry several) has `code`, contains
    `text` in its sentence, and has each detail: equal to a given str, or passing a given
    predicate on the detail's text."""
    for reason in alert["reasons"]:
        if reason["code"] != code or (text is not None and text not in reason["text"]):
            continue
        found = reason.get("details") or {}
        if all(want(str(found.get(key, ""))) if callable(want) else str(found.get(key)) == want
               for key, want in details.items()):
            return True
    return False


class ReverseShellListener:
    """The attacker's end of a reverse shell, on the host loopback: accepts, sends `id` and
    `exit`."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.connected = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.sock.accept()
            self.connected.set()
            with conn:
                conn.sendall(b"id\nexit\n")
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(4096)

    def close(self) -> None:
        self.sock.close()
