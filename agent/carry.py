"""Carry-over across image versions, the agent's side: which records of a carried baseline's
image are learned, and which are judged at once.

A fleet baseline carried from the previous version of its image (collector.baselines,
``FleetBaselines.carry``) starts with that version's items and says how many of the image's
layers, from the base, the two share (``carried_layers``). While it learns, a record is learned
only when it involves a file that the other, new, layers bring; every other record is judged as
outside learning: its novel items raise NOVEL at once and are neither learned nor reported to
the collector.

The files a record involves: the binary of the process that acted (the record's program, as
the detector names it through the layers) and the files its items name: an exec's exe, a
lineage's parent and child programs, a connect's exe, a write's path. So what the new binary
does (its execs, children, connects, writes), who starts it, and a write to a file a new layer
ships are learned; what the old binaries do with the old files is judged. A file is brought by
the new layers when one of their directories holds it (added, replaced or deleted there): they
lie above the shared layers, so theirs is the copy the container sees.

Which overlay lower directory is which layer: a container's lower directories, top first, end
with its image's layers (the base last); above them a runtime may add a layer of its own that is
no image layer (Docker's ``-init``). So the image's layer ``i`` (base first) is
``lowers[len(lowers) - 1 - i]``. With fewer lowers than layers, or no overlay, nothing can be
attributed and every record is judged (the carried part is the whole image).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from driftwarden.models.drift import normalize_container_path

MAX_CACHED = 8192  # (container, path) attributions remembered (LRU)


@dataclass(frozen=True)
class CarriedScope:
    """What a carried baseline shares with the version it was carried from."""

    carried_from: str  # that version's image key
    layers: tuple[str, ...]  # this image's layer digests, base first
    shared: int  # how many of them, from the base, the two images share

    def __post_init__(self) -> None:
        if not 0 <= self.shared <= len(self.layers):
            raise ValueError(f"{self.shared} shared layers of {len(self.layers)}")

    def new_layer_dirs(self, lowers: Sequence[Path]) -> tuple[Path, ...] | None:
        """The lower directories of the layers the carried version did not have (top first);
        None when `lowers` cannot be this image's (fewer of them than its layers)."""
        count = len(self.layers)
        if len(lowers) < count:
            return None
        return tuple(lowers[len(lowers) - count:len(lowers) - self.shared])

    def to_obj(self) -> dict[str, Any]:
        return {"carried_from": self.carried_from, "layers": list(self.layers),
                "shared": self.shared}

    @classmethod
    def from_obj(cls, obj: Any) -> CarriedScope:
        """ValueError for anything but what to_obj wrote."""
        if not isinstance(obj, dict):
            raise ValueError("a carried scope is a map")
        layers = obj.get("layers")
        if not (isinstance(obj.get("carried_from"), str) and isinstance(layers, list)
                and all(isinstance(layer, str) for layer in layers)
                and type(obj.get("shared")) is int):
            raise ValueError(f"not a carried scope: {obj!r}")
        return cls(obj["carried_from"], tuple(layers), obj["shared"])


def record_files(items: Iterable[Any], program_exe: str | None) -> list[str]:
    """The files a record involves (module docstring): its program's binary and what its items
    (models.items) name. Only absolute paths: ``?`` and sockets' addresses name no file."""
    files = [program_exe] if program_exe else []
    for item in items:
        kind = item.KIND
        if kind in ("exec", "connect"):
            files.append(item.exe)
        elif kind == "lineage":
            files.extend(compact.rsplit(":", 1)[0] for compact in (item.parent, item.child))
        elif kind == "write":
            files.append(item.path)
    return list(dict.fromkeys(f for f in files if f.startswith("/")))


class CarryJudge:
    """Decides per record whether a carried baseline learns it (module docstring); remembers
    each (container, shared layers, path) answer, since a path asks one stat per new layer."""

    def __init__(self, max_cached: int = MAX_CACHED) -> None:
        self._max_cached = max_cached
        self._cache: OrderedDict[tuple[str, int, str], bool] = OrderedDict()

    def learns(self, scope: CarriedScope, container_id: str, lowers: Sequence[Path] | None,
               files: Iterable[str]) -> bool:
        """True when one of `files` comes from a layer `scope` says is new; False (judged)
        otherwise, and when the layers cannot be told apart (`lowers` None or too few)."""
        dirs = scope.new_layer_dirs(lowers) if lowers is not None else None
        if not dirs:
            return False
        for path in files:
            key = (container_id, scope.shared, path)
            found = self._cache.get(key)
            if found is None:
                relative = normalize_container_path(path).lstrip("/")
                found = bool(relative) and any(os.path.lexists(d / relative) for d in dirs)
                self._cache[key] = found
                if len(self._cache) > self._max_cached:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            if found:
                return True
        return False

    def forget(self) -> None:
        """Drop every remembered answer."""
        self._cache.clear()


__all__ = ["CarriedScope", "CarryJudge", "record_files"]
