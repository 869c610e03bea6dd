"""Alert records: what detection reports, with stable ids; shared by agent, collector and tools.

The agent builds an :class:`Alert` from a detection verdict (a drift, a novel item, an
anomalous window; :func:`driftwarden.agent.alerts.build_alert`); the wire codec
(:mod:`driftwarden.core.wire`) carries it to the collector, which stores and serves it.

Alert id
    ``sha256(container_key "\\0" kind "\\0" dedup_key).hexdigest()[:24]``, where
    ``container_key`` is the container id (``"cgroup:<cgroup id>"`` when the id is not known),
    ``kind`` the AlertKind value and ``dedup_key`` a caller-given text that names the finding
    (a drift kind and path, an item's kind and key, ...). The same finding in the same container
    always has the same id (across restarts too); a different container or finding never shares
    it (barring a 96-bit hash collision).

JSON schema (``Alert.to_dict()``; one object per line from the agent's JSON lines sink)
    Keys appear in this order::

        {
          "v": 1,                      # alert schema version
          "id": "3f1c...",             # 24 hex chars, stable (see above)
          "time": 1700000003.25,       # wall clock, float seconds since the epoch (UTC): the
                                       #   triggering event's time, or when the window was scored
          "kind": "drift",             # "drift" | "novel" | "anomaly"
          "severity": "high",          # "low" | "medium" | "high" | "critical" (ascending)
          "score": 1.0,                # 1.0 for exact findings (drift, novel); the isolation
                                       #   forest's score for anomaly (lower = more anomalous)
          "reasons": [                 # why, most important first; never empty in practice
            {"code": "exec-added-binary",          # machine-readable, see below
             "text": "ran /tmp/x, which the image does not contain (added at run time)",
             "details": {"path": "/tmp/x"}}        # str -> str/int/float/bool/null/list
          ],
          "container": {"id": "...", "name": "web", "image": "nginx:1.25",
                        "image_id": "sha256:...",
                        "image_digest": "docker.io/library/nginx@sha256:...",
                        "pod": "web-7d4b9c8f6d-x2k9q", "namespace": "prod",
                        "pod_uid": "0b5c...", "workload": "Deployment/web",
                        "labels": {"tier": "web"}},
                                       # any value may be null when not known; image_id: the
                                       #   image's key (its repo digest's digest where known,
                                       #   else its config digest); image_digest: the repo
                                       #   digest it came from; pod_uid, workload: Kubernetes
                                       #   (workload from the pod's owner labels: Deployment,
                                       #   StatefulSet, DaemonSet, Job); labels: the runtime's,
                                       #   at most 64 (first by key), {} if none. Alerts of an
                                       #   older agent may lack image_digest, pod_uid, workload
          "process": {"pid": 4242, "ppid": 4000, "exe": "/tmp/x", "argv": ["x", "-v"],
                      "uid": 0, "comm": "x"},
                                       # null for alerts about a window (anomaly); "exe" may be
                                       #   null; "argv" is [] unless the trigger was an exec
          "events": [ {...} ],         # the triggering event(s), each exactly one trace JSON
                                       #   record (the `driftwarden trace --json` schema)
          "baseline_version": 7,       # version of the image's baseline the verdict used
          "baseline_mode": "monitor",  # the image's mode then: "learn" | "monitor" | "protect"
          "count": 1,                  # occurrences this alert stands for (see aggregation)
          "first_seen": 1700000003.25, # time of the first of those `count` occurrences
          "last_seen": 1700000003.25   # time of the last of them
        }

    Reason codes: drift kinds (``exec-added-binary``, ``exec-modified-binary``,
    ``exec-deleted-binary``, ``exec-memfd``, ``write-binary-dir``, ``chmod-x-new-file``,
    ``setuid-new-file``), novel items (``new-exec``, ``new-lineage``, ``new-connect``,
    ``new-write``), and for anomalies ``feature-out-of-range`` (a window the forest scored) and
    ``sensor-flood`` (a container over its kernel event budget: agent.flood).
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ALERT_SCHEMA_VERSION = 1
ID_HEX_CHARS = 24
# The container's labels an alert carries: the first MAX_LABELS by key, values cut to
# MAX_LABEL_CHARS, so that a container with huge annotations still fits the wire's bounds.
MAX_LABELS = 64
MAX_LABEL_CHARS = 1024
_SCALARS = (str, int, float, bool, type(None))


class AlertKind(enum.StrEnum):
    DRIFT = "drift"  # the container runs or writes what its image never shipped
    NOVEL = "novel"  # an item (exec, lineage, connect, write) the baseline never saw
    ANOMALY = "anomaly"  # a window whose shape the image's model scores as abnormal


class Severity(enum.IntEnum):
    """Ordered: LOW < MEDIUM < HIGH < CRITICAL. The text form is the lower-case name."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    @property
    def text(self) -> str:
        return self.name.lower()

    def __str__(self) -> str:
        return self.text

    @classmethod
    def parse(cls, text: str) -> Severity:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(s.text for s in cls)
            raise ValueError(f"unknown severity {text!r} (one of {names})") from None


def _plain(value: Any) -> Any:
    # numpy scalars (np.int64 is no int, np.bool_ no bool) -> the Python value
    if not isinstance(value, _SCALARS) and callable(getattr(value, "item", None)):
        try:
            return value.item()
        except (TypeError, ValueError):
            return value
    return value


def _detail_value(key: str, value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, list | tuple):
        items = tuple(_plain(v) for v in value)
        if all(isinstance(v, _SCALARS) for v in items):
            return items
    raise TypeError(f"alert reason detail {key!r}: {value!r} is not a scalar or a flat sequence")


@dataclass(frozen=True, slots=True)
class AlertReason:
    """One reason for an alert: a machine code, a sentence, and structured details.

    ``details`` is a tuple of ``(key, value)`` pairs, values str/int/float/bool/None or a flat
    tuple of those (a list given is stored as a tuple), so it is hashable and msgpack/JSON-able.
    """

    code: str
    text: str
    details: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        pairs = tuple((str(k), _detail_value(str(k), v)) for k, v in self.details)
        object.__setattr__(self, "details", pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "text": self.text,
                "details": {k: list(v) if isinstance(v, tuple) else v for k, v in self.details}}


def alert_id(container_key: str, kind: AlertKind | str, dedup_key: str) -> str:
    """The stable id of a finding in a container (see the module docstring)."""
    text = f"{container_key}\0{AlertKind(kind).value}\0{dedup_key}"
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:ID_HEX_CHARS]


@dataclass(frozen=True)
class Alert:
    """An alert; ``container``, ``process`` and ``events`` are plain JSON-ready data."""

    id: str
    time: float
    kind: AlertKind
    severity: Severity
    score: float
    reasons: tuple[AlertReason, ...]
    container: dict[str, Any]
    process: dict[str, Any] | None
    events: tuple[dict[str, Any], ...]
    baseline_version: int
    baseline_mode: str = "monitor"  # the image's mode when the verdict was made
    count: int = 1
    first_seen: float | None = None  # None -> time
    last_seen: float | None = None  # None -> time

    def __post_init__(self) -> None:
        if self.first_seen is None:
            object.__setattr__(self, "first_seen", self.time)
        if self.last_seen is None:
            object.__setattr__(self, "last_seen", self.time)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the alert (schema in the module docstring); a fresh copy."""
        return {
            "v": ALERT_SCHEMA_VERSION,
            "id": self.id,
            "time": self.time,
            "kind": self.kind.value,
            "severity": self.severity.text,
            "score": float(self.score),
            "reasons": [r.to_dict() for r in self.reasons],
            "container": _copy_container(self.container),
            "process": _copy_process(self.process),
            "events": [json.loads(json.dumps(e)) for e in self.events],
            "baseline_version": self.baseline_version,
            "baseline_mode": self.baseline_mode,
            "count": self.count,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }

    def with_repeats(self, count: int, first_seen: float, last_seen: float) -> Alert:
        return dataclasses.replace(self, count=count, first_seen=first_seen,
                                   last_seen=last_seen)


def _copy_container(container: dict[str, Any]) -> dict[str, Any]:
    out = dict(container)
    if isinstance(out.get("labels"), dict):
        out["labels"] = dict(out["labels"])
    return out


def _copy_process(process: dict[str, Any] | None) -> dict[str, Any] | None:
    if process is None:
        return None
    out = dict(process)
    out["argv"] = list(out.get("argv") or ())
    return out


def alert_from_dict(data: Mapping[str, Any]) -> Alert:
    """The Alert of an ``Alert.to_dict()`` object (as read back from a spool or a store)."""
    return Alert(
        id=data["id"], time=float(data["time"]), kind=AlertKind(data["kind"]),
        severity=Severity.parse(data["severity"]), score=float(data["score"]),
        reasons=tuple(AlertReason(code=r["code"], text=r["text"],
                                  details=tuple((r.get("details") or {}).items()))
                      for r in data["reasons"]),
        container=dict(data["container"]),
        process=dict(data["process"]) if data.get("process") is not None else None,
        events=tuple(data.get("events") or ()),
        baseline_version=int(data["baseline_version"]),
        baseline_mode=str(data.get("baseline_mode", "monitor")),
        count=int(data.get("count", 1)),
        first_seen=data.get("first_seen"), last_seen=data.get("last_seen"))
