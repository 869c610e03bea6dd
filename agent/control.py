"""Baseline operations, served by a running agent over a unix socket, or on the files directly.

`driftwarden baseline ...` talks to STATE_DIR/control.sock when an agent is running (so the
change applies to the live profiles and is not overwritten by the agent's next save), and works
on the baseline files when none is. Requests and responses are one JSON object per line:
  {"op": "list" | "show" | "mode" | "accept" | "reset" | "export" | "import" | "diff", ...}
  {"ok": true, "result": ...}  or  {"ok": false, "error": "one line: what and what to do"}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from driftwarden.core.errors import DriftwardenError, UsageError
from driftwarden.core.lifecycle import Service, serve_accepts, start_daemon_thread
from driftwarden.core.modes import Mode
from driftwarden.models.items import ItemSet, item_from_key
from driftwarden.models.profile import Profile, ProfileStore

if TYPE_CHECKING:
    from driftwarden.agent.detect import Detector

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_REQUEST = 1 << 20


class ProfileSource(Protocol):
    """Where profiles live: the files, or a running agent's memory (then saved by it)."""

    def get(self, image: str) -> Profile: ...

    def all(self) -> list[Profile]: ...

    def put(self, profile: Profile) -> None: ...

    def drop(self, image_id: str) -> None: ...


class FileProfiles:
    def __init__(self, store: ProfileStore) -> None:
        self.store = store

    def all(self) -> list[Profile]:
        return self.store.list()

    def get(self, image: str) -> Profile:
        return resolve_image(image, self.all())

    def put(self, profile: Profile) -> None:
        self.store.save(profile)

    def drop(self, image_id: str) -> None:
        path = self.store.path_for(image_id)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class LiveProfiles:
    """The running agent's profiles (callers hold the lock the pipeline writes under)."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector

    def all(self) -> list[Profile]:
        live = dict(self.detector.profiles)
        for profile in self.detector.store.list():
            live.setdefault(profile.image_id, profile)
        return list(live.values())

    def get(self, image: str) -> Profile:
        profile = resolve_image(image, self.all())
        return self.detector.profiles.setdefault(profile.image_id, profile)

    def put(self, profile: Profile) -> None:
        self.detector.profiles[profile.image_id] = profile
        self.detector.store.save(profile)

    def accept(self, alert_id: str) -> tuple[Profile, list]:
        return self.detector.accept(alert_id)

    def drop(self, image_id: str) -> None:
        self.detector.forget(image_id)


def resolve_image(image: str, profiles: list[Profile]) -> Profile:
    """An image by id (sha256:..., or a unique prefix of its hex) or by name[:tag]."""
    wanted = image.removeprefix("sha256:")
    by_id = [p for p in profiles if p.image_id.removeprefix("sha256:").startswith(wanted)]
    by_name = [p for p in profiles if image in (p.image_name, p.image_name.split(":")[0])]
    matches = {p.image_id: p for p in (by_id if len(wanted) >= 4 else []) + by_name}
    if not matches:
        known = ", ".join(sorted(p.image_name for p in profiles)) or "none yet"
        raise UsageError(f"no baseline for image {image!r} (known: {known})")
    if len(matches) > 1:
        raise UsageError(f"{image!r} matches {len(matches)} baselines; give the image id")
    return next(iter(matches.values()))


def summary(profile: Profile) -> dict[str, Any]:
    p = profile.progress
    return {
        "image_id": profile.image_id,
        "image": profile.image_name,
        "mode": profile.mode.value,
        "version": profile.version,
        "items": len(profile.items),
        "windows": len(profile.windows),
        "unstable": p.unstable,
        "learning_ended": p.end_reason,
        "updated_at": profile.updated_at,
        "starts_seen": profile.starts_seen,
    }


def startup_items(profile: Profile) -> list[dict[str, Any]]:
    """The items a first container start taught outside learning, with that container."""
    out = []
    for entry in profile.startup_items:
        try:
            what = item_from_key(entry["kind"], entry["key"]).describe()
        except ValueError:
            what = f"{entry['kind']} {entry['key']!r}"
        out.append({"item": what, "kind": entry["kind"], "container": entry["container"],
                    "at": entry["at"]})
    return out


# what changes a baseline: refused by an agent that follows the fleet's baselines
_CHANGES = frozenset({"mode", "reset", "import", "accept"})


class BaselineService:
    """The operations. `fleet_collector`: the collector whose baselines this agent follows
    (`agent --collector`); a change here would be replaced by the fleet's next version, so
    changes are refused with the command that makes them on the collector."""

    def __init__(self, source: ProfileSource, store: ProfileStore, *,
                 fleet_collector: str | None = None) -> None:
        self.source = source
        self.store = store
        self.fleet_collector = fleet_collector

    def handle(self, request: dict[str, Any]) -> Any:
        op = request.get("op")
        handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
        if handler is None:
            raise UsageError(f"unknown operation {op!r}")
        if op in _CHANGES and self.fleet_collector is not None:
            verb = "push FILE" if op == "import" else f"{op} ..."
            raise UsageError(
                f"this agent follows the fleet's baselines on the collector "
                f"{self.fleet_collector}, whose next version would replace a change made "
                f"here: run `driftwarden baseline {verb} --collector {self.fleet_collector}`")
        return handler(request)

    def op_list(self, _request) -> list[dict[str, Any]]:
        return [summary(p) for p in sorted(self.source.all(), key=lambda p: p.image_name)]

    def op_show(self, request) -> dict[str, Any]:
        profile = self.source.get(_arg(request, "image"))
        out = summary(profile)
        out["items_by_kind"] = {
            kind: sorted(item.describe() for item in profile.items.items(kind))
            for kind in ("exec", "lineage", "connect", "write")
        }
        out["history"] = profile.history
        out["startup_items"] = startup_items(profile)
        return out

    def op_mode(self, request) -> dict[str, Any]:
        profile = self.source.get(_arg(request, "image"))
        profile.set_mode(_arg(request, "mode"), reason=request.get("reason") or "operator",
                         who=request.get("who") or "operator", now=time.time())
        self.source.put(profile)
        return summary(profile)

    def op_reset(self, request) -> dict[str, Any]:
        profile = self.source.get(_arg(request, "image"))
        self.source.drop(profile.image_id)
        return {"image_id": profile.image_id, "image": profile.image_name, "reset": True}

    def op_export(self, request) -> dict[str, Any]:
        profile = self.source.get(_arg(request, "image"))
        self.source.put(profile)  # the file holds what the agent knows now
        path = self.store.export(profile.image_id, _arg(request, "file"))
        return {"image_id": profile.image_id, "file": str(path)}

    def op_import(self, request) -> dict[str, Any]:
        """An imported baseline starts in monitor (whatever mode it was exported in: a file
        exported in protect would switch automatic response on at once), or in the mode the
        operator names."""
        mode = request.get("mode") or Mode.MONITOR.value
        if mode not in {m.value for m in Mode}:
            raise UsageError(f"unknown mode {mode!r}: choose learn, monitor or protect")
        profile = self.store.import_file(_arg(request, "file"), image_id=request.get("image_id"),
                                         force=bool(request.get("force")), mode=Mode(mode),
                                         who=request.get("who") or "operator")
        self.source.put(profile)
        return summary(profile)

    def op_accept(self, request) -> dict[str, Any]:
        accept = getattr(self.source, "accept", None)
        if accept is None:
            raise UsageError(
                "accept needs the running agent (it keeps the recent alerts): start "
                "`driftwarden agent` with this --state-dir"
            )
        profile, added = accept(_arg(request, "alert_id"))
        out = summary(profile)
        out["added"] = sorted(item.describe() for item in added)
        return out

    def op_diff(self, request) -> dict[str, list[str]]:
        a = self.source.get(_arg(request, "a"))
        b = self.source.get(_arg(request, "b"))
        return {kind: sorted(item.describe() for item in items)
                for kind, items in a.items.diff(b.items).items() if items}


def _arg(request: dict[str, Any], name: str) -> str:
    value = request.get(name)
    if not isinstance(value, str) or not value:
        raise UsageError(f"missing argument {name!r}")
    return value


class ControlServer(Service):
    """Serves a BaselineService on STATE_DIR/control.sock (root-only: mode 0600)."""

    STOP_TIMEOUT = 2.0

    def __init__(self, service: BaselineService, state_dir: str | os.PathLike,
                 lock: threading.Lock) -> None:
        super().__init__()
        self.service = service
        self.path = Path(state_dir) / SOCKET_NAME
        self.lock = lock
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def _start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a previous run
        self._sock = sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        os.chmod(self.path, 0o600)
        sock.listen(8)  # blocking: an idle agent's control thread never wakes; _stop wakes it
        self._thread = start_daemon_thread(self._serve, "driftwarden-control")

    def _serve(self) -> None:
        serve_accepts(self._sock, self._stopping, self._answer)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        data = b""
        try:
            while not data.endswith(b"\n") and len(data) <= MAX_REQUEST:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            if len(data) > MAX_REQUEST:
                raise UsageError(f"request larger than {MAX_REQUEST} bytes")
            try:
                request = json.loads(data)
            except ValueError as exc:
                raise UsageError(f"request is not JSON ({exc})") from exc
            if not isinstance(request, dict):
                raise UsageError("request must be a JSON object")
            with self.lock:
                result = self.service.handle(request)
            reply = {"ok": True, "result": result}
        except DriftwardenError as exc:
            reply = {"ok": False, "error": str(exc)}
        except OSError as exc:
            log.warning("control connection failed: %s", exc)
            return
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def _stop(self, timeout: float | None) -> None:
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):  # wakes the accept() it waits in (Linux: EINVAL)
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(state_dir: str | os.PathLike, payload: dict[str, Any]) -> Any:
    """Ask the running agent; without one, do it on the files. Raises UsageError on failure."""
    path = Path(state_dir) / SOCKET_NAME
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        store = ProfileStore(state_dir, ItemSet)
        return BaselineService(FileProfiles(store), store).handle(payload)
    with sock:
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        reply = json.loads(data)
    except ValueError as exc:
        raise DriftwardenError(f"the agent gave an unreadable answer ({exc})") from exc
    if not reply.get("ok"):
        raise UsageError(reply.get("error", "the agent refused the request"))
    return reply["result"]
