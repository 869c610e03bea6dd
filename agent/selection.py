"""Which containers an agent watches: `driftwarden agent --only-label KEY=VALUE` (repeatable).

Only containers whose labels hold every given pair are watched: the pipeline's filter skips the
others' records (counted ``not_selected``: agent.pipeline.TraceFilter), and the heartbeats list
only the selected ones, so the collector routes actions and fleet baselines by what this agent
really watches. Useful for canaries, and for several agents on one host playing separate nodes.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable
from typing import Any

from driftwarden.agent.pipeline import labels_match
from driftwarden.core.errors import DriftwardenError

log = logging.getLogger(__name__)

Row = tuple[Any, ...]  # (id, name, image_id, image_name): runtimes.registry.RunningContainers


def label_pair(text: str) -> tuple[str, str]:
    """`--only-label KEY=VALUE` -> (key, value); argparse's error for anything else."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or key != key.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not KEY=VALUE (a container label and its value, e.g. app=web)")
    return key, value


class NodeContainers:
    """The heartbeat's containers (`rows()`: runtimes.registry.RunningContainers) as the
    detector names them: each container's image key and name from the runtime's description
    (`describe(container_id)`: a ContainerInfo or None; the key a baseline belongs to, which a
    runtime's container list may give as a config digest), and with `labels` only the containers
    that carry them all. Descriptions are cached per container; one the runtime cannot give
    yet is asked again at the next heartbeat (without `labels` its row is listed as it is)."""

    def __init__(self, rows: Callable[[], Iterable[Row]],
                 describe: Callable[[str], Any], *,
                 labels: tuple[tuple[str, str], ...] = ()) -> None:
        self._rows = rows
        self._describe = describe
        self.labels = labels
        self._infos: dict[str, Any] = {}
        self.not_selected = 0  # containers left out by the labels in the last list

    def __call__(self) -> tuple[Row, ...]:
        rows = [tuple(row) for row in self._rows()]
        self._infos = {row[0]: self._infos[row[0]] for row in rows if row[0] in self._infos}
        out: list[Row] = []
        skipped = 0
        for row in rows:
            info = self._info(row[0])
            if info is None:
                if self.labels:
                    skipped += 1  # its labels are not known: not known to be selected
                else:
                    out.append(row)
                continue
            if self.labels and not labels_match(self.labels, info.labels):
                skipped += 1
                continue
            out.append((row[0], row[1] or info.name, info.image_id or row[2],
                        info.image_name or row[3]))
        self.not_selected = skipped
        return tuple(out)

    def _info(self, container_id: str) -> Any:
        info = self._infos.get(container_id)
        if info is None:
            try:
                info = self._describe(container_id)
            except DriftwardenError as exc:
                log.debug("cannot describe %s for the heartbeat: %s", container_id[:12], exc)
                return None
            if info is not None:
                self._infos[container_id] = info
        return info


__all__ = ["NodeContainers", "label_pair"]
