"""Per-image behaviour profiles: what an image was learned to do, its mode, and persistence.

A profile belongs to an image id (shared by every container of that image). It holds the exact
item sets (driftwarden.models.items.ItemSet), the learned feature windows (the isolation forest
is re-fitted from them on load: state is data, the model is derived), the learning progress and
a version that increments on every change.

A container's start is part of its image's behaviour. ``starts_seen`` says whether the profile
has seen one (a container of the image that started while the agent watched, through its first
startup seconds). Until it has, the detector learns the items of the image's containers during
their startup even outside learning (:meth:`Profile.learn_startup`), each recorded in
``startup_items`` with the container that taught it, so an operator can see what was learned
that way (`baseline show`); later starts are checked like any other behaviour.

Learning ends (learn -> monitor) when the profile is stable: past the warm-up, with at least
`min_windows` clean windows, and no new item for `stable_seconds`; or after `learn_for` seconds;
or when an operator says so. A profile still growing past `max_items` is flagged unstable
instead of learning forever. Windows that saw kernel drops or unattributed events are tainted
and not learned from.

Files are msgpack (never pickle), written atomically (temp file, fsync, rename). A corrupt or
truncated file is moved aside (kept for inspection) and the image relearns.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
from driftwarden.core.errors import BaselineError, UsageError
from driftwarden.core.learning import (  # the rule is shared with the collector
    MAX_WINDOWS,
    LearningPolicy,
    LearningProgress,
    Transition,
    next_mode,
)
from driftwarden.core.modes import Mode

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_STARTUP_ITEMS = 1000  # start-up items remembered with their container (oldest dropped)


@dataclass
class Profile:
    """One image's baseline. Mutable; the agent owns it and saves it after changes."""

    image_id: str
    image_name: str
    items: Any  # driftwarden.models.items.ItemSet
    mode: Mode = Mode.LEARN
    version: int = 1
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    windows: list[tuple[float, ...]] = field(default_factory=list)
    progress: LearningProgress | None = None
    history: list[dict] = field(default_factory=list)  # mode changes: when, from, to, why, who
    # whether a container start of the image was seen through its startup (see the module doc)
    starts_seen: bool = False
    # items learned from a first start outside learning: {"kind", "key", "container", "at"}
    startup_items: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.progress is None:
            self.progress = LearningProgress(started_at=self.created_at,
                                             last_new_item_at=self.created_at)

    # -- learning -------------------------------------------------------------

    def _changed(self, now: float) -> None:
        self.version += 1
        self.updated_at = now

    def observe(self, items: Iterable[Any], now: float, policy: LearningPolicy, *,
                learn: bool = True) -> list[Any]:
        """Items of one event. Returns those the profile did not know. While learning they are
        added (and count as novelty for stability), unless `learn` is False (a carried
        baseline's judged part, agent.carry); otherwise the profile is left unchanged."""
        known = self.items
        novel = [item for item in items if item not in known and not known.covers(item)]
        if not novel or self.mode is not Mode.LEARN or not learn:
            return novel
        added = [item for item in novel if self.items.add(item)]
        if added:
            self.progress.last_new_item_at = now
            self.progress.items_seen += len(added)
            if len(self.items) > policy.max_items and not self.progress.unstable:
                self.progress.unstable = True
                log.warning("baseline of %s keeps growing (%d items): flagged unstable",
                            self.image_name, len(self.items))
            self._changed(now)
        return novel

    def learn_startup(self, items: Iterable[Any], *, container: str, now: float) -> list[Any]:
        """Items of a container's startup while the profile has not seen a start (see the
        module doc): added whatever the mode, each recorded with `container`, the container
        that taught it. Returns those that were new."""
        added = [item for item in items if self.items.add(item)]
        if not added:
            return added
        self.startup_items.extend({"kind": item.KIND, "key": list(item.key()),
                                   "container": container, "at": now} for item in added)
        del self.startup_items[:-MAX_STARTUP_ITEMS]
        self.progress.items_seen += len(added)
        self._changed(now)
        return added

    def saw_start(self, *, container: str, now: float) -> bool:
        """A container of the image went through its startup while the agent watched: later
        starts are checked like any other behaviour. Recorded in the history (mode unchanged).
        Returns whether this changed the profile."""
        if self.starts_seen:
            return False
        self.starts_seen = True
        learned = sum(1 for entry in self.startup_items if entry["container"] == container)
        self.history.append({"at": now, "from": self.mode.value, "to": self.mode.value,
                             "by": "agent", "reason": f"first container start seen "
                             f"({container[:12]}; {learned} start-up items learned from it)"})
        del self.history[:-100]
        self._changed(now)
        return True

    def learn_window(self, vector: Sequence[float], *, tainted: bool, now: float) -> bool:
        """A closed feature window; learned only while learning and only when clean."""
        if self.mode is not Mode.LEARN:
            return False
        if tainted:
            self.progress.windows_tainted += 1
            return False
        self.windows.append(tuple(float(v) for v in vector))
        if len(self.windows) > MAX_WINDOWS:
            del self.windows[: len(self.windows) - MAX_WINDOWS]
        self.progress.windows_learned += 1
        self._changed(now)
        return True

    def step(self, now: float, policy: LearningPolicy) -> Transition | None:
        """Apply the automatic transition, if any. Returns it."""
        transition = next_mode(self.mode, self.progress, policy, now)
        if transition is not None:
            self.set_mode(transition.mode, reason=transition.reason, who="agent", now=now)
        return transition

    def set_mode(self, mode: Mode | str, *, reason: str, who: str, now: float) -> None:
        try:
            mode = Mode(mode)
        except ValueError:
            raise UsageError(
                f"unknown mode {mode!r}: choose learn, monitor or protect"
            ) from None
        if mode is self.mode:
            return
        self.history.append({"at": now, "from": self.mode.value, "to": mode.value,
                             "reason": reason, "by": who})
        del self.history[:-100]
        if self.mode is Mode.LEARN and mode is not Mode.LEARN:
            self.progress.ended_at = now
            self.progress.end_reason = reason
        if mode is Mode.LEARN and self.mode is not Mode.LEARN:
            # relearning extends the baseline: the clock and the stability window restart
            self.progress.started_at = now
            self.progress.last_new_item_at = now
            self.progress.ended_at = None
            self.progress.end_reason = None
            self.progress.unstable = False
        self.mode = mode
        self._changed(now)

    # -- persistence ------------------------------------------------------------

    def to_obj(self) -> dict:
        p = self.progress
        return {
            "format": FORMAT_VERSION,
            "image_id": self.image_id,
            "image_name": self.image_name,
            "mode": self.mode.value,
            "version": self.version,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "items": self.items.to_msgpack_obj(),
            "windows": [list(w) for w in self.windows],
            "progress": {
                "started_at": p.started_at, "last_new_item_at": p.last_new_item_at,
                "windows_learned": p.windows_learned, "windows_tainted": p.windows_tainted,
                "items_seen": p.items_seen, "unstable": p.unstable, "ended_at": p.ended_at,
                "end_reason": p.end_reason,
            },
            "history": self.history,
            "starts_seen": self.starts_seen,
            "startup_items": self.startup_items,
        }

    @classmethod
    def from_obj(cls, obj: Any, item_set_type: Any) -> Profile:
        if not isinstance(obj, dict):
            raise BaselineError("not a baseline (top level is not a map)")
        if obj.get("format") != FORMAT_VERSION:
            raise BaselineError(
                f"baseline format {obj.get('format')!r}, this driftwarden reads {FORMAT_VERSION}"
            )
        try:
            progress = LearningProgress(**obj["progress"])
            return cls(
                image_id=str(obj["image_id"]),
                image_name=str(obj["image_name"]),
                items=item_set_type.from_msgpack_obj(obj["items"]),
                mode=Mode(obj["mode"]),
                version=int(obj["version"]),
                created_at=float(obj["created_at"]),
                updated_at=float(obj["updated_at"]),
                windows=[tuple(float(v) for v in w) for w in obj["windows"]],
                progress=progress,
                history=list(obj.get("history", [])),
                # absent from baselines written before starts were tracked: none seen yet
                starts_seen=bool(obj.get("starts_seen", False)),
                startup_items=_startup_items(obj.get("startup_items", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BaselineError(f"baseline is missing or has a bad field ({exc!r})") from exc


def _startup_items(value: Any) -> list[dict]:
    if not isinstance(value, list):
        raise TypeError(f"startup_items must be a list, got {type(value).__name__}")
    out = []
    for entry in value:
        if not (isinstance(entry, dict) and isinstance(entry.get("kind"), str)
                and isinstance(entry.get("key"), list | tuple)
                and isinstance(entry.get("container"), str)):
            raise ValueError(f"bad start-up item {entry!r}")
        out.append({"kind": entry["kind"], "key": list(entry["key"]),
                    "container": entry["container"], "at": float(entry.get("at") or 0.0)})
    return out


_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def baseline_filename(image_id: str) -> str:
    """sha256:abc... -> sha256-abc....msgpack; anything else is hashed (never a path)."""
    if re.fullmatch(r"sha256:[0-9a-f]{64}", image_id):
        return image_id.replace(":", "-") + ".msgpack"
    digest = hashlib.sha256(image_id.encode()).hexdigest()
    return f"id-{digest}.msgpack"


class ProfileStore:
    """Baselines under STATE_DIR/baselines, one msgpack file per image."""

    def __init__(self, state_dir: str | os.PathLike, item_set_type: Any) -> None:
        self.dir = Path(state_dir) / "baselines"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._item_set_type = item_set_type

    def path_for(self, image_id: str) -> Path:
        return self.dir / baseline_filename(image_id)

    def save(self, profile: Profile) -> Path:
        path = self.path_for(profile.image_id)
        write_atomic(path, msgpack.packb(profile.to_obj(), use_bin_type=True))
        return path

    def load(self, image_id: str) -> Profile | None:
        """The stored profile, None if there is none. A corrupt file is moved aside (never
        deleted), logged, and None is returned so the image relearns."""
        path = self.path_for(image_id)
        if not path.exists():
            return None
        try:
            profile = read_profile(path, self._item_set_type)
        except BaselineError as exc:
            kept = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            path.rename(kept)
            log.error("baseline for %s unusable (%s); kept as %s, the image relearns",
                      image_id, exc, kept)
            return None
        if profile.image_id != image_id:
            raise BaselineError(f"{path} holds image {profile.image_id}, expected {image_id}")
        return profile

    def list(self) -> list[Profile]:
        out = []
        for path in sorted(self.dir.glob("*.msgpack")):
            try:
                out.append(read_profile(path, self._item_set_type))
            except BaselineError as exc:
                log.warning("skipping %s: %s", path, exc)
        return out

    def export(self, image_id: str, dest: str | os.PathLike) -> Path:
        profile = self.load(image_id)
        if profile is None:
            raise UsageError(f"no baseline for image {image_id}; `driftwarden baseline list`")
        write_atomic(Path(dest), msgpack.packb(profile.to_obj(), use_bin_type=True))
        return Path(dest)

    def import_file(self, source: str | os.PathLike, *, image_id: str | None = None,
                    force: bool = False, now: float | None = None, mode: Mode = Mode.MONITOR,
                    who: str = "import") -> Profile:
        """Import an exported baseline. It starts in `mode` (monitor: no cold start, and no
        automatic response the file's own mode would bring), the change recorded in its
        history. Refused when `image_id` is given and differs, unless forced."""
        profile = read_profile(Path(source), self._item_set_type)
        if image_id is not None and profile.image_id != image_id:
            if not force:
                raise UsageError(
                    f"{source} is a baseline of image {profile.image_id}, not {image_id}; "
                    "pass --force to use it for this image anyway"
                )
            profile.image_id = image_id
        now = time.time() if now is None else now
        profile.set_mode(mode, reason=f"imported from {source}", who=who, now=now)
        self.save(profile)
        return profile


def read_profile(path: Path, item_set_type: Any) -> Profile:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BaselineError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError,
            msgpack.exceptions.StackError, ValueError) as exc:
        raise BaselineError(f"{path} is corrupt or truncated ({exc})") from exc
    return Profile.from_obj(obj, item_set_type)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers see old or new."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


__all__ = [
    "BaselineError",
    "LearningPolicy",
    "LearningProgress",
    "Mode",
    "Profile",
    "ProfileStore",
    "Transition",
    "baseline_filename",
    "next_mode",
]
