"""Response policy: which alerts make the collector pause, kill or quarantine a container.

A policy is a YAML file (``deploy/policy.example.yaml`` is a commented example), parsed by
:func:`load_policy` / :func:`parse_policy` into frozen dataclasses and validated strictly: an
unknown key, a wrong type or a bad value raises :class:`PolicyError`, whose message names the
file, the path inside it (``rules[2].match.min_severity``; list indices count from 0), what is
wrong and what is allowed. A typo must never silently disable a brake, so there are no ignored
keys, and a key given twice in one mapping is an error too.

Format (version 1)::

    version: 1                  # required; this format
    dry_run: false              # true: decide and report, never act (default false)
    exempt:                     # never act on these containers (default: none)
      namespaces: [kube-system] # Kubernetes namespaces
      labels: {driftwarden.io/exempt: "true"}   # ANY of these label=value pairs exempts
    limits:                     # each key optional; defaults shown
      per_container: {max_actions: 1, per_seconds: 300}   # at most N actions per container per T s
      global: {max_actions: 10, per_seconds: 60}          # at most N actions in all per T s
      cooldown_seconds: 600     # after an action on a container, no automatic action on it for
                                #   this long (0 = none); operator actions start it too
    rules:                      # first match wins; no match = no action (default: no rules)
      - name: quarantine-protect-drift        # required, unique
        match:                  # required; every key given must match ({} = every alert)
          kinds: [drift]        # drift | novel | anomaly
          min_severity: high    # low | medium | high | critical
          modes: [protect]      # the image's baseline mode: learn | monitor | protect
          images: [nginx]       # name (nginx:1.25), repository (nginx: any tag) or image id
          namespaces: [prod]
          nodes: [node-1]
          labels: {tier: web}   # ALL of these label=value pairs
          min_score: 0.0        # score >= min_score
          max_score: 0.4        # score <= max_score (anomaly: lower = more anomalous)
        action: quarantine      # none | pause | kill | quarantine (required)
        with_pause: false       # quarantine only: also pause the container (default false)

    Lists hold alternatives (any may match) and must not be empty (leave the key out to match
    anything). Label values are strings: quote ``"true"``, ``"1"`` (YAML reads them otherwise
    as a boolean or a number). Images are matched as in :mod:`driftwarden.collector.filters`.
    ``exempt``, ``limits`` and ``rules`` may be null (= left out); ``match`` may not (write
    ``{}`` to match every alert).

Decisions (:meth:`PolicyEngine.decide`)
    The first rule whose ``match`` matches picks the action. Then the brakes, in this order,
    each turning the decision into a ``skip`` with a reason: exempt namespace, exempt label,
    unknown container id, cooldown, per-container rate limit, global rate limit, dry run (so
    "dry run: would quarantine" means every other brake let it through). The collector adds
    one more when it records an ``act``: the store keeps one automatic decision per alert and
    action across all collector replicas (:meth:`Decision.already_decided`).
    Outcomes: ``act`` (do it), ``skip`` (a brake stopped it; report it), ``no-match`` (the policy
    wants nothing: no rule matched (``rule`` None), or the first match says ``action: none``).
    Only ``act`` decisions count against the rate limits and start a cooldown, recorded when
    decided (the engine is the only automatic actor). :meth:`PolicyEngine.record_manual` records
    an operator's action (pause, kill, quarantine, release, ...): it starts the cooldown, so a
    container an operator just released is not re-quarantined by the next repeat of the same
    alert, but it does not count against the rate limits, which budget automatic actions only.
    With ``recorded`` (the collector passes its store), the cooldown also holds for actions
    this engine never saw: taken by another replica on the same store, or before a restart.
"""

from __future__ import annotations

import difflib
import enum
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml
from driftwarden.collector.filters import ImageSelector
from driftwarden.core.actions import ActionType
from driftwarden.core.alerts import AlertKind, Severity
from driftwarden.core.errors import PolicyError
from driftwarden.core.modes import Mode

log = logging.getLogger(__name__)

POLICY_VERSION = 1
DEFAULT_MAX_CONTAINERS = 10_000  # containers whose action history is kept (LRU by last action)

_SEVERITY_RANK = {s.text: int(s) for s in Severity}


class Action(enum.StrEnum):
    """A rule's action: none, or one of the action types the policy takes on its own."""

    NONE = "none"
    PAUSE = ActionType.PAUSE.value
    KILL = ActionType.KILL.value
    QUARANTINE = ActionType.QUARANTINE.value


class Outcome(enum.StrEnum):
    """What a decision says (module docstring: decisions)."""

    ACT = "act"
    SKIP = "skip"
    NO_MATCH = "no-match"


class Brake(enum.StrEnum):
    """Which brake turned a decision into a skip (``Decision.brake``)."""

    EXEMPT_NAMESPACE = "exempt-namespace"
    EXEMPT_LABEL = "exempt-label"
    NO_CONTAINER_ID = "no-container-id"
    COOLDOWN = "cooldown"
    CONTAINER_RATE = "container-rate-limit"
    GLOBAL_RATE = "global-rate-limit"
    DRY_RUN = "dry-run"
    DECIDED = "already-decided"  # another decision (any replica) already acted on the alert


# -- the policy ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RateLimit:
    max_actions: int
    per_seconds: float


@dataclass(frozen=True)
class Limits:
    per_container: RateLimit = RateLimit(1, 300.0)
    global_limit: RateLimit = RateLimit(10, 60.0)  # `global` in the file
    cooldown_seconds: float = 600.0


@dataclass(frozen=True)
class Exempt:
    namespaces: frozenset[str] = frozenset()
    labels: tuple[tuple[str, str], ...] = ()  # any pair present on the container exempts it


@dataclass(frozen=True)
class Match:
    """Conditions on an alert; None = any. All given conditions must hold."""

    kinds: frozenset[str] | None = None
    min_severity: str | None = None
    modes: frozenset[str] | None = None
    images: tuple[str, ...] | None = None
    namespaces: frozenset[str] | None = None
    nodes: frozenset[str] | None = None
    labels: tuple[tuple[str, str], ...] | None = None  # all pairs must be present
    min_score: float | None = None
    max_score: float | None = None
    _image_selector: ImageSelector | None = field(default=None, init=False, repr=False,
                                                  compare=False)

    def __post_init__(self) -> None:
        if self.images is not None:
            object.__setattr__(self, "_image_selector", ImageSelector(self.images))

    def matches(self, alert: Mapping[str, Any]) -> bool:
        container = alert.get("container") or {}
        if self.kinds is not None and alert.get("kind") not in self.kinds:
            return False
        if (self.min_severity is not None
                and _SEVERITY_RANK.get(alert.get("severity"), 0)
                < _SEVERITY_RANK[self.min_severity]):
            return False
        if self.modes is not None and alert.get("baseline_mode") not in self.modes:
            return False
        if self.namespaces is not None and container.get("namespace") not in self.namespaces:
            return False
        if self.nodes is not None and alert.get("node") not in self.nodes:
            return False
        if self._image_selector is not None and not self._image_selector.matches(
                container.get("image"), container.get("image_id")):
            return False
        if self.labels is not None:
            labels = _labels_of(container)
            if any(labels.get(k) != v for k, v in self.labels):
                return False
        score = alert.get("score")
        if self.min_score is not None and not (isinstance(score, int | float)
                                               and score >= self.min_score):
            return False
        return self.max_score is None or (isinstance(score, int | float)
                                          and score <= self.max_score)


def _labels_of(container: Mapping[str, Any]) -> Mapping[str, Any]:
    """The container's labels: a mapping, or (as ContainerView keeps them) label pairs."""
    labels = container.get("labels") or {}
    return labels if isinstance(labels, Mapping) else dict(labels)


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    action: Action
    with_pause: bool = False


@dataclass(frozen=True)
class Policy:
    version: int = POLICY_VERSION
    dry_run: bool = False
    exempt: Exempt = Exempt()
    limits: Limits = Limits()
    rules: tuple[Rule, ...] = ()
    source: str = field(default="<string>", compare=False)  # where it was read from (messages)


DEFAULT_POLICY_YAML = """\
# driftwarden's default response policy: quarantine a container when its image is in protect
# mode and it drifts (high or critical); no automatic action on anything else.
version: 1
dry_run: false
exempt:
  namespaces: [kube-system, driftwarden]
  labels: {driftwarden.io/exempt: "true"}
limits:
  per_container: {max_actions: 1, per_seconds: 300}
  global: {max_actions: 10, per_seconds: 60}
  cooldown_seconds: 600
rules:
  - name: quarantine-protect-drift
    match: {kinds: [drift], min_severity: high, modes: [protect]}
    action: quarantine
    with_pause: false
"""

DEFAULT_POLICY = Policy(
    version=1,
    dry_run=False,
    exempt=Exempt(namespaces=frozenset({"kube-system", "driftwarden"}),
                  labels=(("driftwarden.io/exempt", "true"),)),
    limits=Limits(per_container=RateLimit(1, 300.0), global_limit=RateLimit(10, 60.0),
                  cooldown_seconds=600.0),
    rules=(Rule(name="quarantine-protect-drift",
                match=Match(kinds=frozenset({"drift"}), min_severity="high",
                            modes=frozenset({"protect"})),
                action=Action.QUARANTINE, with_pause=False),),
    source="<default policy>",
)


# -- parsing and validation ----------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping (YAML says keys are unique;
    PyYAML would silently keep the last one, e.g. a second ``dry_run: false``)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node)
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first_line[key]})",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _number_text(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


class _Reader:
    """Checks one parsed document; every error names the source and the path."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, problem: str) -> PolicyError:
        return PolicyError(self.source, path, problem)

    def mapping(self, value: Any, path: str, allowed: tuple[str, ...],
                required: Mapping[str, str] | None = None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a mapping with keys {', '.join(allowed)}; "
                                  f"got {_describe(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(path, f"key {_describe(key)} is not a string (quote it); "
                                      f"allowed keys: {', '.join(allowed)}")
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise self.fail(_join(path, key),
                                f"unknown key{hint}; allowed keys here: {', '.join(allowed)}")
        for key, hint in (required or {}).items():
            if key not in value:
                raise self.fail(_join(path, key), f"required key is missing ({hint})")
        return value

    def boolean(self, value: Any, path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(path, f"must be true or false, got {_describe(value)}")
        return value

    def integer(self, value: Any, path: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(path, f"must be a whole number >= {minimum}, got {_describe(value)}")
        if value < minimum:
            raise self.fail(path, f"must be >= {minimum}, got {value}")
        return value

    def number(self, value: Any, path: str, *, minimum: float | None = None,
               positive: bool = False) -> float:
        want = "a number > 0" if positive else (
            "a number" if minimum is None else f"a number >= {_number_text(minimum)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise self.fail(path, f"must be {want}, got {_describe(value)}")
        if (positive and value <= 0) or (minimum is not None and value < minimum):
            raise self.fail(path, f"must be {want.removeprefix('a number ')}, "
                                  f"got {_number_text(value)}")
        return float(value)

    def string(self, value: Any, path: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"must be a string, got {_describe(value)}")
        if not value.strip():
            raise self.fail(path, "must not be empty")
        return value.strip()

    def choice(self, value: Any, path: str, allowed: tuple[str, ...], what: str) -> str:
        if not isinstance(value, str):
            raise self.fail(path, f"must be one of {', '.join(allowed)}; "
                                  f"got {_describe(value)}")
        text = value.strip().lower()
        if text not in allowed:
            close = difflib.get_close_matches(text, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise self.fail(path, f"unknown {what} {value!r}{hint}; "
                                  f"allowed: {', '.join(allowed)}")
        return text

    def string_list(self, value: Any, path: str, allowed: tuple[str, ...] | None = None,
                    what: str = "") -> tuple[str, ...]:
        if not isinstance(value, list):
            hint = f" (e.g. [{value}])" if isinstance(value, str) else ""
            raise self.fail(path, f"must be a list{hint}, got {_describe(value)}")
        if not value:
            raise self.fail(path, "is empty, so nothing could match; leave the key out to "
                                  "match any")
        if allowed is None:
            return tuple(self.string(v, f"{path}[{i}]") for i, v in enumerate(value))
        return tuple(self.choice(v, f"{path}[{i}]", allowed, what) for i, v in enumerate(value))

    def labels(self, value: Any, path: str) -> tuple[tuple[str, str], ...]:
        if not isinstance(value, dict):
            raise self.fail(path, f"must be a mapping of label: value, got {_describe(value)}")
        if not value:
            raise self.fail(path, "is empty; leave the key out instead")
        pairs = []
        for key, label_value in value.items():
            if not isinstance(key, str) or not key.strip():
                raise self.fail(path, f"label name {_describe(key)} must be a non-empty string")
            if not isinstance(label_value, str):
                raise self.fail(_join(path, key),
                                f"label values are strings, got {_describe(label_value)}; "
                                f"quote it in YAML (e.g. \"true\")")
            pairs.append((key.strip(), label_value))
        return tuple(sorted(pairs))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_TOP_KEYS = ("version", "dry_run", "exempt", "limits", "rules")
_EXEMPT_KEYS = ("namespaces", "labels")
_LIMIT_KEYS = ("per_container", "global", "cooldown_seconds")
_RATE_KEYS = ("max_actions", "per_seconds")
_RULE_KEYS = ("name", "match", "action", "with_pause")
_RULE_REQUIRED = {
    "name": "a unique name for the rule",
    "match": "the alerts it applies to; 'match: {}' matches every alert",
    "action": "one of none, pause, kill, quarantine",
}
_MATCH_KEYS = ("kinds", "min_severity", "modes", "images", "namespaces", "nodes", "labels",
               "min_score", "max_score")
_KINDS = tuple(k.value for k in AlertKind)
_SEVERITIES = tuple(s.text for s in Severity)
_MODES = tuple(m.value for m in Mode)
_ACTIONS = tuple(a.value for a in Action)


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """The policy in YAML `text`; `source` names it in error messages. Raises PolicyError."""
    try:
        doc = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: safe
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        context = f" ({exc.context})" if exc.context else ""
        raise PolicyError(source, "", f"{where}invalid YAML: {exc.problem}{context}") from None
    except yaml.YAMLError as exc:
        raise PolicyError(source, "", f"invalid YAML: {exc}") from None
    if doc is None:
        raise PolicyError(source, "", "the policy is empty; it needs at least 'version: 1' "
                                      "(see deploy/policy.example.yaml)")
    r = _Reader(source)
    if not isinstance(doc, dict):
        raise PolicyError(source, "", f"the policy must be a mapping with keys "
                                      f"{', '.join(_TOP_KEYS)}; got {_describe(doc)}")
    r.mapping(doc, "", _TOP_KEYS, required={"version": "write 'version: 1'"})
    version = doc["version"]
    if isinstance(version, bool) or version != POLICY_VERSION:
        raise r.fail("version", f"unsupported version {version!r}; this driftwarden reads "
                                f"version {POLICY_VERSION}")
    return Policy(
        version=POLICY_VERSION,
        dry_run=r.boolean(doc["dry_run"], "dry_run") if "dry_run" in doc else False,
        exempt=_exempt(r, doc.get("exempt")),
        limits=_limits(r, doc.get("limits")),
        rules=_rules(r, doc.get("rules")),
        source=source,
    )


def load_policy(path: str | Path) -> Policy:
    """The policy in the YAML file at `path`. Raises PolicyError (unreadable or invalid)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(path), "", f"cannot read the policy file: "
                                         f"{exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise PolicyError(str(path), "", f"not UTF-8 text (byte {exc.start})") from None
    return parse_policy(text, source=str(path))


def _exempt(r: _Reader, value: Any) -> Exempt:
    if value is None:
        return Exempt()
    r.mapping(value, "exempt", _EXEMPT_KEYS)
    namespaces = (frozenset(r.string_list(value["namespaces"], "exempt.namespaces"))
                  if "namespaces" in value else frozenset())
    labels = r.labels(value["labels"], "exempt.labels") if "labels" in value else ()
    return Exempt(namespaces=namespaces, labels=labels)


def _rate(r: _Reader, value: Any, path: str, default: RateLimit) -> RateLimit:
    r.mapping(value, path, _RATE_KEYS)
    return RateLimit(
        max_actions=(r.integer(value["max_actions"], _join(path, "max_actions"), 1)
                     if "max_actions" in value else default.max_actions),
        per_seconds=(r.number(value["per_seconds"], _join(path, "per_seconds"), positive=True)
                     if "per_seconds" in value else default.per_seconds),
    )


def _limits(r: _Reader, value: Any) -> Limits:
    defaults = Limits()
    if value is None:
        return defaults
    r.mapping(value, "limits", _LIMIT_KEYS)
    return Limits(
        per_container=(_rate(r, value["per_container"], "limits.per_container",
                             defaults.per_container)
                       if "per_container" in value else defaults.per_container),
        global_limit=(_rate(r, value["global"], "limits.global", defaults.global_limit)
                      if "global" in value else defaults.global_limit),
        cooldown_seconds=(r.number(value["cooldown_seconds"], "limits.cooldown_seconds",
                                   minimum=0)
                          if "cooldown_seconds" in value else defaults.cooldown_seconds),
    )


def _rules(r: _Reader, value: Any) -> tuple[Rule, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise r.fail("rules", f"must be a list of rules, got {_describe(value)}")
    rules: list[Rule] = []
    first_index: dict[str, int] = {}
    for i, item in enumerate(value):
        path = f"rules[{i}]"
        r.mapping(item, path, _RULE_KEYS, required=_RULE_REQUIRED)
        name = r.string(item["name"], f"{path}.name")
        if name in first_index:
            raise r.fail(f"{path}.name", f"duplicate rule name {name!r} "
                                         f"(also rules[{first_index[name]}])")
        first_index[name] = i
        match = _match(r, item["match"], f"{path}.match")
        action = Action(r.choice(item["action"], f"{path}.action", _ACTIONS, "action"))
        with_pause = (r.boolean(item["with_pause"], f"{path}.with_pause")
                      if "with_pause" in item else False)
        if with_pause and action is not Action.QUARANTINE:
            raise r.fail(f"{path}.with_pause", f"only applies to action quarantine (this "
                                               f"rule's action is {action})")
        rules.append(Rule(name=name, match=match, action=action, with_pause=with_pause))
    return tuple(rules)


def _match(r: _Reader, value: Any, path: str) -> Match:
    if value is None:
        raise r.fail(path, "is null; write 'match: {}' to match every alert")
    r.mapping(value, path, _MATCH_KEYS)

    def get(key: str, read: Callable[[Any, str], Any]) -> Any:
        return read(value[key], _join(path, key)) if key in value else None

    def listed(allowed: tuple[str, ...] | None, what: str) -> Callable[[Any, str], Any]:
        return lambda v, p: r.string_list(v, p, allowed, what)

    kinds = get("kinds", listed(_KINDS, "kind"))
    modes = get("modes", listed(_MODES, "mode"))
    namespaces = get("namespaces", listed(None, ""))
    nodes = get("nodes", listed(None, ""))
    min_score = get("min_score", lambda v, p: r.number(v, p))
    max_score = get("max_score", lambda v, p: r.number(v, p))
    if min_score is not None and max_score is not None and min_score > max_score:
        raise r.fail(path, f"min_score {_number_text(min_score)} is greater than max_score "
                           f"{_number_text(max_score)}, so no alert could match")
    return Match(
        kinds=frozenset(kinds) if kinds is not None else None,
        min_severity=get("min_severity", lambda v, p: r.choice(v, p, _SEVERITIES, "severity")),
        modes=frozenset(modes) if modes is not None else None,
        images=get("images", listed(None, "")),
        namespaces=frozenset(namespaces) if namespaces is not None else None,
        nodes=frozenset(nodes) if nodes is not None else None,
        labels=get("labels", r.labels),
        min_score=min_score,
        max_score=max_score,
    )


# -- decisions -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """What the policy says about one alert (see the module docstring)."""

    action: Action  # for a skip: the action that was not taken
    rule: str | None  # the first matching rule, None when none matched
    outcome: Outcome
    reason: str
    with_pause: bool = False
    brake: Brake | None = None  # for a skip: which brake

    def already_decided(self, alert_id: str) -> Decision:
        """This act decision as a skip: the store holds an earlier automatic decision of the
        same action on the alert (made here or by another collector replica, e.g. for the
        alert replayed to it after a failover), so acting again would act twice."""
        return Decision(self.action, self.rule, Outcome.SKIP,
                        f"already decided: an earlier {self.action.value} decision on alert "
                        f"{alert_id} (the store keeps one per alert)", self.with_pause,
                        Brake.DECIDED)

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action.value, "rule": self.rule, "outcome": self.outcome.value,
                "reason": self.reason, "with_pause": self.with_pause,
                "brake": self.brake.value if self.brake is not None else None}


POLICY_ACTOR = "policy"  # who the store says asked for the engine's own actions


class PastAction(NamedTuple):
    """An action on a container as the store recorded it (any replica, any origin)."""

    at: float  # wall-clock time it was recorded (epoch s)
    action: str
    by: str  # "policy", or the operator who asked for it


@dataclass(slots=True)
class _History:
    acts: deque[float]  # times of the engine's own act decisions on this container
    last_time: float  # last action of any origin (cooldown)
    last_by_operator: str | None  # the operator's action when the last one was manual


def _container_label(container: Mapping[str, Any]) -> str:
    cid = str(container.get("id"))[:12]
    name = container.get("name")
    return f"{cid} ({name})" if name else cid


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class PolicyEngine:
    """Decides, alert by alert, whether to act; keeps the brakes' state. Thread-safe.

    State is bounded: timestamps older than a limit's window are pruned, and at most
    `max_containers` containers are remembered (the one acted on longest ago is forgotten
    first; with the global limit that is long past any cooldown in practice).
    """

    def __init__(self, policy: Policy = DEFAULT_POLICY, clock: Callable[[], float] = time.monotonic,
                 *, max_containers: int = DEFAULT_MAX_CONTAINERS,
                 recorded: Callable[[str, str], PastAction | None] | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if max_containers < 1:
            raise ValueError(f"max_containers must be >= 1, got {max_containers}")
        self._policy = policy
        self._clock = clock
        # (container id, alert id) -> the last action the store holds on that container for
        # another alert (None: no store, this engine alone; the same alert is the store's
        # one-decision-per-alert rule's to judge)
        self._recorded = recorded
        self._wall_clock = wall_clock
        self.max_containers = max_containers
        self._lock = threading.Lock()
        self._global: deque[float] = deque()
        self._containers: OrderedDict[str, _History] = OrderedDict()
        self._counts = {o.value: 0 for o in Outcome}

    @property
    def policy(self) -> Policy:
        return self._policy

    def set_policy(self, policy: Policy) -> None:
        """Switch to a new policy (a reload), keeping the action history behind the brakes."""
        with self._lock:
            self._policy = policy

    def decide(self, alert: Mapping[str, Any]) -> Decision:
        """The decision for `alert` (an ``Alert.to_dict()`` dict with ``"node"``); an ``act``
        is recorded at once against the rate limits and the cooldown."""
        with self._lock:
            decision = self._decide(alert, self._clock())
            self._counts[decision.outcome.value] += 1
            return decision

    def record_manual(self, container_id: str, action: str = "manual") -> None:
        """An operator acted on `container_id` (`action`: pause, release, ...): start its
        cooldown. Not counted against the rate limits."""
        if not container_id:
            raise ValueError("record_manual needs a container id")
        with self._lock:
            now = self._clock()
            history = self._history(container_id, now)
            history.last_time = now
            history.last_by_operator = action

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counts, "containers_tracked": len(self._containers),
                    "global_recent_actions": len(self._global)}

    # -- internals (lock held) --

    def _decide(self, alert: Mapping[str, Any], now: float) -> Decision:
        policy = self._policy
        rule = next((r for r in policy.rules if r.match.matches(alert)), None)
        if rule is None:
            return Decision(Action.NONE, None, Outcome.NO_MATCH, "no rule matched")
        if rule.action is Action.NONE:
            return Decision(Action.NONE, rule.name, Outcome.NO_MATCH,
                            f"rule {rule.name}: action none")

        def skip(brake: Brake, reason: str) -> Decision:
            return Decision(rule.action, rule.name, Outcome.SKIP, reason, rule.with_pause, brake)

        container = alert.get("container") or {}
        namespace = container.get("namespace")
        if namespace is not None and namespace in policy.exempt.namespaces:
            return skip(Brake.EXEMPT_NAMESPACE, f"exempt: namespace {namespace}")
        labels = _labels_of(container)
        for key, value in policy.exempt.labels:
            if labels.get(key) == value:
                return skip(Brake.EXEMPT_LABEL, f"exempt: label {key}={value}")
        cid = container.get("id")
        if not cid:
            return skip(Brake.NO_CONTAINER_ID,
                        f"no container id: cannot {rule.action} a container that is not "
                        f"identified (rule {rule.name})")
        label = _container_label(container)
        limits = policy.limits
        history = self._containers.get(cid)
        if history is not None:
            ago = now - history.last_time
            if ago < limits.cooldown_seconds:
                by = (f" by an operator ({history.last_by_operator})"
                      if history.last_by_operator else "")
                return skip(Brake.COOLDOWN,
                            f"cooldown: container {label} acted on{by} {int(ago)} s ago "
                            f"(cooldown {_number_text(limits.cooldown_seconds)} s)")
        if self._recorded is not None:  # what other replicas (or this one before a restart) did
            past = self._recorded(cid, str(alert.get("id") or ""))
            ago = self._wall_clock() - past.at if past is not None else None
            if ago is not None and ago < limits.cooldown_seconds:
                by = "" if past.by == POLICY_ACTOR else f" by {past.by}"
                return skip(Brake.COOLDOWN,
                            f"cooldown: container {label} acted on{by} ({past.action}) "
                            f"{int(max(ago, 0))} s ago, by another collector replica or before "
                            f"a restart (cooldown {_number_text(limits.cooldown_seconds)} s)")
        if history is not None:
            rate = limits.per_container
            _prune(history.acts, now - rate.per_seconds)
            if len(history.acts) >= rate.max_actions:
                return skip(Brake.CONTAINER_RATE,
                            f"rate limit: container {label} had "
                            f"{_plural(len(history.acts), 'action')} in the last "
                            f"{_number_text(rate.per_seconds)} s")
        rate = limits.global_limit
        _prune(self._global, now - rate.per_seconds)
        if len(self._global) >= rate.max_actions:
            return skip(Brake.GLOBAL_RATE,
                        f"global rate limit: {_plural(len(self._global), 'action')} in the "
                        f"last {_number_text(rate.per_seconds)} s")
        if policy.dry_run:
            return skip(Brake.DRY_RUN, f"dry run: would {rule.action} (rule {rule.name})")
        self._record_act(cid, now, limits)
        pause = " with pause" if rule.with_pause else ""
        return Decision(rule.action, rule.name, Outcome.ACT,
                        f"rule {rule.name}: {rule.action}{pause}", rule.with_pause)

    def _history(self, cid: str, now: float) -> _History:
        history = self._containers.get(cid)
        if history is None:
            while len(self._containers) >= self.max_containers:
                self._containers.popitem(last=False)
            history = self._containers[cid] = _History(deque(), now, None)
        else:
            self._containers.move_to_end(cid)
        return history

    def _record_act(self, cid: str, now: float, limits: Limits) -> None:
        history = self._history(cid, now)
        history.acts.append(now)
        history.last_time = now
        history.last_by_operator = None
        # Only the newest max_actions times can ever decide a limit.
        while len(history.acts) > limits.per_container.max_actions:
            history.acts.popleft()
        self._global.append(now)
        while len(self._global) > limits.global_limit.max_actions:
            self._global.popleft()


def _prune(times: deque[float], horizon: float) -> None:
    """Drop times at or before `horizon` (they are outside the window (horizon, now])."""
    while times and times[0] <= horizon:
        times.popleft()


__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_POLICY_YAML",
    "POLICY_VERSION",
    "Action",
    "Brake",
    "Decision",
    "Exempt",
    "Limits",
    "Match",
    "Outcome",
    "Policy",
    "PolicyEngine",
    "PolicyError",
    "RateLimit",
    "Rule",
    "load_policy",
    "parse_policy",
]
