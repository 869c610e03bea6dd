"""Response policy: strict parsing with exact error messages, rule matching, and the brakes."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from driftwarden.collector.policy import (
    DEFAULT_POLICY,
    DEFAULT_POLICY_YAML,
    Action,
    Brake,
    Decision,
    Exempt,
    Limits,
    Match,
    Outcome,
    PastAction,
    Policy,
    PolicyEngine,
    RateLimit,
    Rule,
    load_policy,
    parse_policy,
)
from driftwarden.core.errors import PolicyError, UsageError

REPO = Path(__file__).resolve().parents[1]
CID = "0123456789ab" + "cd" * 26
CID2 = "fedcba987654" + "32" * 26
CID3 = "a1b2c3d4e5f6" + "00" * 26
IMAGE_ID = "sha256:" + "3f1c" * 16
RULE = "quarantine-protect-drift"


def alert(*, kind: str = "drift", severity: str = "high", mode: str = "protect",
          cid: str | None = CID, name: str | None = "web", namespace: str | None = "prod",
          image: str | None = "nginx:1.25", image_id: str | None = IMAGE_ID,
          labels: dict[str, str] | None = None, score: float = 1.0,
          node: str = "node-1") -> dict[str, Any]:
    container: dict[str, Any] = {"id": cid, "name": name, "image": image, "image_id": image_id,
                                 "pod": None, "namespace": namespace}
    if labels is not None:
        container["labels"] = labels
    return {"v": 1, "id": "a" * 24, "time": 1.0, "kind": kind, "severity": severity,
            "score": score, "reasons": [], "container": container, "process": None,
            "events": [], "baseline_version": 1, "baseline_mode": mode, "count": 1,
            "first_seen": 1.0, "last_seen": 1.0, "node": node}


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def policy(limits: str = "", rules: str = "", *, dry_run: bool = False, exempt: str = "") -> Policy:
    rules = rules or f"""
  - name: {RULE}
    match: {{kinds: [drift], min_severity: high, modes: [protect]}}
    action: quarantine"""
    return parse_policy(f"version: 1\ndry_run: {str(dry_run).lower()}\n"
                        f"exempt: {exempt or '{}'}\nlimits: {limits or '{}'}\nrules:{rules}\n")


def decide_reason(engine: PolicyEngine, a: dict[str, Any]) -> tuple[str, str]:
    d = engine.decide(a)
    return d.outcome.value, d.reason


# -- parsing -------------------------------------------------------------------------------------


def test_default_yaml_is_the_default_policy() -> None:
    parsed = parse_policy(DEFAULT_POLICY_YAML)
    assert parsed == DEFAULT_POLICY
    assert DEFAULT_POLICY.limits == Limits(RateLimit(1, 300.0), RateLimit(10, 60.0), 600.0)
    assert DEFAULT_POLICY.exempt == Exempt(frozenset({"kube-system", "driftwarden"}),
                                           (("driftwarden.io/exempt", "true"),))
    assert [(r.name, r.action) for r in DEFAULT_POLICY.rules] == [(RULE, Action.QUARANTINE)]


def test_example_file_loads() -> None:
    p = load_policy(REPO / "deploy" / "policy.example.yaml")
    assert p.source == str(REPO / "deploy" / "policy.example.yaml")
    assert p.dry_run is False
    assert p.exempt == DEFAULT_POLICY.exempt
    assert p.limits == DEFAULT_POLICY.limits
    assert [(r.name, r.action.value, r.with_pause) for r in p.rules] == [
        ("hands-off-payments-db", "none", False),
        ("freeze-edge-critical", "quarantine", True),
        (RULE, "quarantine", False),
        ("pause-protect-anomaly", "pause", False),
    ]
    assert p.rules[3].match == Match(kinds=frozenset({"anomaly"}), modes=frozenset({"protect"}),
                                     max_score=-1.0)


def test_minimal_policy_gets_defaults() -> None:
    p = parse_policy("version: 1\n")
    assert p == Policy(version=1, dry_run=False, exempt=Exempt(), limits=Limits(), rules=())
    # null sections mean "left out"; a partial limits mapping keeps the other defaults
    p = parse_policy("version: 1\nexempt:\nrules:\nlimits: {global: {per_seconds: 5}}\n")
    assert p.limits == Limits(global_limit=RateLimit(10, 5.0))
    assert p.rules == () and p.exempt == Exempt()


def test_values_are_normalised() -> None:
    p = parse_policy("""
version: 1
rules:
  - name: r
    match:
      kinds: [DRIFT, anomaly]
      min_severity: Critical
      labels: {b: "2", a: "1"}
      min_score: 0
    action: Kill
""")
    rule = p.rules[0]
    assert rule.action is Action.KILL
    assert rule.match == Match(kinds=frozenset({"drift", "anomaly"}), min_severity="critical",
                               labels=(("a", "1"), ("b", "2")), min_score=0.0)


V = "version: 1\n"
R = V + "rules:\n  - name: r\n    match: {}\n    action: quarantine\n"

BAD = [
    ("", "p.yaml: the policy is empty; it needs at least 'version: 1' "
         "(see deploy/policy.example.yaml)"),
    ("# only a comment\n\n", "p.yaml: the policy is empty; it needs at least 'version: 1' "
                             "(see deploy/policy.example.yaml)"),
    ("- version: 1\n", "p.yaml: the policy must be a mapping with keys "
                       "version, dry_run, exempt, limits, rules; got a list"),
    ("quarantine\n", "p.yaml: the policy must be a mapping with keys "
                     "version, dry_run, exempt, limits, rules; got the string 'quarantine'"),
    (V + "rules:\n  - name: r\n    match: {kinds: [drift}\n",
     "p.yaml: line 4, column 26: invalid YAML: expected ',' or ']', but got '}' "
     "(while parsing a flow sequence)"),
    (V + "dry_run: true\nlimits: {}\ndry_run: false\n",
     "p.yaml: line 4, column 1: invalid YAML: duplicate key 'dry_run' (first at line 2)"),
    ("dry_run: true\n", "p.yaml: version: required key is missing (write 'version: 1')"),
    ("version: 2\n", "p.yaml: version: unsupported version 2; this driftwarden reads version 1"),
    (V + "dryrun: true\n", "p.yaml: dryrun: unknown key (did you mean 'dry_run'?); "
                           "allowed keys here: version, dry_run, exempt, limits, rules"),
    (V + "dry_run: 'yes'\n", "p.yaml: dry_run: must be true or false, got the string 'yes'"),
    (V + "dry_run: 1\n", "p.yaml: dry_run: must be true or false, got the number 1"),
    (V + "exempt: {namespace: [kube-system]}\n",
     "p.yaml: exempt.namespace: unknown key (did you mean 'namespaces'?); "
     "allowed keys here: namespaces, labels"),
    (V + "exempt: {namespaces: kube-system}\n",
     "p.yaml: exempt.namespaces: must be a list (e.g. [kube-system]), "
     "got the string 'kube-system'"),
    (V + "exempt: {labels: {driftwarden.io/exempt: true}}\n",
     "p.yaml: exempt.labels.driftwarden.io/exempt: label values are strings, got the boolean "
     "true; quote it in YAML (e.g. \"true\")"),
    (V + "limits: {cooldown_seconds: -5}\n",
     "p.yaml: limits.cooldown_seconds: must be >= 0, got -5"),
    (V + "limits: {per_container: {max_actions: 0}}\n",
     "p.yaml: limits.per_container.max_actions: must be >= 1, got 0"),
    (V + "limits: {global: {max_actions: -3, per_seconds: 60}}\n",
     "p.yaml: limits.global.max_actions: must be >= 1, got -3"),
    (V + "limits: {global: {per_seconds: -1.5}}\n",
     "p.yaml: limits.global.per_seconds: must be > 0, got -1.5"),
    (V + "limits: {global: {max_actions: ten}}\n",
     "p.yaml: limits.global.max_actions: must be a whole number >= 1, got the string 'ten'"),
    (V + "limits: {global: {max_actions: 2.5}}\n",
     "p.yaml: limits.global.max_actions: must be a whole number >= 1, got the number 2.5"),
    (V + "limits: {per_container: 5}\n",
     "p.yaml: limits.per_container: must be a mapping with keys max_actions, per_seconds; "
     "got the number 5"),
    (V + "limits: {cooldown_seconds: '600'}\n",
     "p.yaml: limits.cooldown_seconds: must be a number >= 0, got the string '600'"),
    (V + "limits: {rate: 1}\n", "p.yaml: limits.rate: unknown key; allowed keys here: "
                                "per_container, global, cooldown_seconds"),
    (V + "rules: {name: r}\n", "p.yaml: rules: must be a list of rules, got a mapping"),
    (V + "rules: [quarantine]\n", "p.yaml: rules[0]: must be a mapping with keys name, match, "
                                  "action, with_pause; got the string 'quarantine'"),
    (R.replace("quarantine", "quarantaine"),
     "p.yaml: rules[0].action: unknown action 'quarantaine' (did you mean 'quarantine'?); "
     "allowed: none, pause, kill, quarantine"),
    (R.replace("quarantine", "delete"),
     "p.yaml: rules[0].action: unknown action 'delete'; allowed: none, pause, kill, quarantine"),
    (R.replace("action: quarantine", "action:"),
     "p.yaml: rules[0].action: must be one of none, pause, kill, quarantine; got null"),
    (R.replace("    action: quarantine\n", ""),
     "p.yaml: rules[0].action: required key is missing (one of none, pause, kill, quarantine)"),
    (R.replace("match: {}", "match:"),
     "p.yaml: rules[0].match: is null; write 'match: {}' to match every alert"),
    (R.replace("  - name: r\n", "  - action: kill\n").replace("    action: quarantine\n", ""),
     "p.yaml: rules[0].name: required key is missing (a unique name for the rule)"),
    (R + "  - name: r\n    match: {}\n    action: kill\n",
     "p.yaml: rules[1].name: duplicate rule name 'r' (also rules[0])"),
    (R + "  - name: s\n    match: {severity: high}\n    action: kill\n",
     "p.yaml: rules[1].match.severity: unknown key (did you mean 'min_severity'?); allowed keys "
     "here: kinds, min_severity, modes, images, namespaces, nodes, labels, min_score, max_score"),
    (R.replace("{}", "{min_severity: hi}"),
     "p.yaml: rules[0].match.min_severity: unknown severity 'hi' (did you mean 'high'?); "
     "allowed: low, medium, high, critical"),
    (R.replace("{}", "{min_severity: severe}"),
     "p.yaml: rules[0].match.min_severity: unknown severity 'severe'; "
     "allowed: low, medium, high, critical"),
    (R.replace("{}", "{kinds: [drift, anomally]}"),
     "p.yaml: rules[0].match.kinds[1]: unknown kind 'anomally' (did you mean 'anomaly'?); "
     "allowed: drift, novel, anomaly"),
    (R.replace("{}", "{modes: [protected]}"),
     "p.yaml: rules[0].match.modes[0]: unknown mode 'protected' (did you mean 'protect'?); "
     "allowed: learn, monitor, protect"),
    (R.replace("{}", "{kinds: []}"),
     "p.yaml: rules[0].match.kinds: is empty, so nothing could match; leave the key out to "
     "match any"),
    (R.replace("{}", "{namespaces: [prod, 7]}"),
     "p.yaml: rules[0].match.namespaces[1]: must be a string, got the number 7"),
    (R.replace("{}", "{max_score: low}"),
     "p.yaml: rules[0].match.max_score: must be a number, got the string 'low'"),
    (R.replace("{}", "{min_score: 0.5, max_score: -0.2}"),
     "p.yaml: rules[0].match: min_score 0.5 is greater than max_score -0.2, "
     "so no alert could match"),
    (R.replace("{}", "{labels: [app]}"),
     "p.yaml: rules[0].match.labels: must be a mapping of label: value, got a list"),
    (R.replace("action: quarantine", "action: kill\n    with_pause: true"),
     "p.yaml: rules[0].with_pause: only applies to action quarantine "
     "(this rule's action is kill)"),
    (R.replace("action: quarantine", "action: quarantine\n    with_pause: 'no'"),
     "p.yaml: rules[0].with_pause: must be true or false, got the string 'no'"),
    (V + "true: 1\n", "p.yaml: key the boolean true is not a string (quote it); allowed keys: "
                      "version, dry_run, exempt, limits, rules"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[m.split(": ", 2)[-1][:40] for _, m in BAD])
def test_bad_policy_message_is_exact(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source="p.yaml")
    assert str(info.value) == message
    assert isinstance(info.value, ValueError) and isinstance(info.value, UsageError)


def test_load_policy_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(R.replace("{}", "{kinds: [drfit]}"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == (f"{path}: rules[0].match.kinds[0]: unknown kind 'drfit' "
                               "(did you mean 'drift'?); allowed: drift, novel, anomaly")
    assert (info.value.source, info.value.path) == (str(path), "rules[0].match.kinds[0]")
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError) as info:
        load_policy(missing)
    assert str(info.value) == f"{missing}: cannot read the policy file: No such file or directory"


# -- matching ------------------------------------------------------------------------------------


def test_default_policy_decisions() -> None:
    engine = PolicyEngine(DEFAULT_POLICY, clock=Clock())
    assert engine.decide(alert()) == Decision(
        Action.QUARANTINE, RULE, Outcome.ACT, f"rule {RULE}: quarantine", False)
    assert engine.decide(alert(cid=CID2, severity="critical")).outcome is Outcome.ACT
    no_match = Decision(Action.NONE, None, Outcome.NO_MATCH, "no rule matched")
    for other in (alert(cid=CID3, severity="medium"), alert(cid=CID3, mode="monitor"),
                  alert(cid=CID3, mode="learn"), alert(cid=CID3, kind="novel"),
                  alert(cid=CID3, kind="anomaly", severity="critical", score=-2.0)):
        assert engine.decide(other) == no_match
    assert engine.stats() == {"act": 2, "skip": 0, "no-match": 5, "containers_tracked": 2,
                              "global_recent_actions": 2}


def test_first_matching_rule_wins() -> None:
    p = policy(rules="""
  - name: spare-db
    match: {labels: {app: db, tier: data}}
    action: none
  - name: kill-critical
    match: {min_severity: critical}
    action: kill
  - name: pause-drift
    match: {kinds: [drift]}
    action: pause
  - name: freeze-edge
    match: {kinds: [drift], namespaces: [edge]}
    action: quarantine
    with_pause: true
""", limits="{cooldown_seconds: 0, per_container: {max_actions: 100}, "
            "global: {max_actions: 100}}")
    engine = PolicyEngine(p, clock=Clock())
    d = engine.decide(alert(severity="critical", labels={"app": "db", "tier": "data"}))
    assert d == Decision(Action.NONE, "spare-db", Outcome.NO_MATCH, "rule spare-db: action none")
    # one label of two is not enough for the all-labels match
    d = engine.decide(alert(severity="critical", labels={"app": "db"}))
    assert (d.action, d.rule, d.outcome) == (Action.KILL, "kill-critical", Outcome.ACT)
    d = engine.decide(alert(namespace="edge"))
    assert (d.action, d.rule) == (Action.PAUSE, "pause-drift")  # freeze-edge never reached
    d = engine.decide(alert(kind="novel", severity="low"))
    assert (d.action, d.rule, d.outcome) == (Action.NONE, None, Outcome.NO_MATCH)


def test_with_pause_is_carried() -> None:
    p = policy(rules="""
  - name: freeze
    match: {}
    action: quarantine
    with_pause: true""")
    d = PolicyEngine(p, clock=Clock()).decide(alert(kind="novel", severity="low"))
    assert d == Decision(Action.QUARANTINE, "freeze", Outcome.ACT,
                         "rule freeze: quarantine with pause", True)
    assert d.to_dict() == {"action": "quarantine", "rule": "freeze", "outcome": "act",
                           "reason": "rule freeze: quarantine with pause", "with_pause": True,
                           "brake": None}


@pytest.mark.parametrize(("match", "hits", "misses"), [
    ("{images: [nginx]}", [{}, {"image": "nginx@sha256:00"}],
     [{"image": "nginx-extra:1"}, {"image": None, "image_id": None}]),
    ("{images: ['nginx:1.25']}", [{}], [{"image": "nginx:1.26"}]),
    ("{images: ['registry:5000/team/app']}", [{"image": "registry:5000/team/app:2"}],
     [{"image": "registry:5000/team/other:2"}]),
    ("{images: ['3f1c3f1c3f1c']}", [{"image": "other"}], [{"image": "x", "image_id": "sha256:3f"}]),
    (f"{{images: ['{IMAGE_ID}']}}", [{"image": None}], [{"image_id": "sha256:" + "ab" * 32}]),
    ("{namespaces: [prod, stage]}", [{}, {"namespace": "stage"}],
     [{"namespace": None}, {"namespace": "dev"}]),
    ("{nodes: [node-1]}", [{}], [{"node": "node-2"}]),
    ("{labels: {app: web}}", [{"labels": {"app": "web", "x": "y"}}],
     [{}, {"labels": {"app": "Web"}}]),
    ("{min_score: 0.5}", [{"score": 0.5}, {}], [{"score": 0.49}]),
    ("{max_score: -0.7}", [{"kind": "anomaly", "score": -0.7}],
     [{"kind": "anomaly", "score": -0.69}, {}]),
    ("{min_severity: medium}", [{"severity": "medium"}, {"severity": "critical"}],
     [{"severity": "low"}, {"severity": "bogus"}]),
    ("{modes: [monitor, protect]}", [{"mode": "monitor"}, {}], [{"mode": "learn"}]),
])
def test_match_conditions(match: str, hits: list[dict[str, Any]],
                          misses: list[dict[str, Any]]) -> None:
    engine = PolicyEngine(policy(rules=f"\n  - name: r\n    match: {match}\n    action: kill",
                                 limits="{cooldown_seconds: 0, per_container: {max_actions: 99}, "
                                        "global: {max_actions: 99}}"), clock=Clock())
    assert [engine.decide(alert(**h)).outcome.value for h in hits] == ["act"] * len(hits)
    assert [engine.decide(alert(**m)).outcome.value for m in misses] == ["no-match"] * len(misses)


# -- brakes --------------------------------------------------------------------------------------


def test_dry_run_skips_and_does_not_count() -> None:
    engine = PolicyEngine(policy(dry_run=True), clock=Clock())
    for _ in range(3):  # skips start no cooldown and use no rate budget
        d = engine.decide(alert())
        assert d == Decision(Action.QUARANTINE, RULE, Outcome.SKIP,
                             f"dry run: would quarantine (rule {RULE})", False, Brake.DRY_RUN)
    assert engine.decide(alert(mode="monitor")).outcome is Outcome.NO_MATCH
    assert engine.stats()["containers_tracked"] == 0


def test_exempt_namespace_and_label() -> None:
    engine = PolicyEngine(DEFAULT_POLICY, clock=Clock())
    d = engine.decide(alert(namespace="kube-system"))
    assert d == Decision(Action.QUARANTINE, RULE, Outcome.SKIP, "exempt: namespace kube-system",
                         False, Brake.EXEMPT_NAMESPACE)
    d = engine.decide(alert(labels={"driftwarden.io/exempt": "true", "app": "web"}))
    assert d == Decision(Action.QUARANTINE, RULE, Outcome.SKIP,
                         "exempt: label driftwarden.io/exempt=true", False, Brake.EXEMPT_LABEL)
    # another value of the label does not exempt; exemptions did not count against anything
    d = engine.decide(alert(labels={"driftwarden.io/exempt": "false"}))
    assert d.outcome is Outcome.ACT
    # an exempt container with no matching rule is no-match, not a skip
    assert engine.decide(alert(namespace="kube-system", mode="monitor")).outcome.value == \
        "no-match"


def test_labels_may_be_pairs() -> None:
    engine = PolicyEngine(DEFAULT_POLICY, clock=Clock())
    a = alert()
    a["container"]["labels"] = [["app", "web"], ["driftwarden.io/exempt", "true"]]
    assert engine.decide(a).brake is Brake.EXEMPT_LABEL


def test_any_exempt_label_exempts() -> None:
    engine = PolicyEngine(policy(exempt="{labels: {a: '1', b: '2'}}"), clock=Clock())
    assert decide_reason(engine, alert(labels={"b": "2"})) == ("skip", "exempt: label b=2")
    assert decide_reason(engine, alert(labels={"a": "1", "b": "2"})) == ("skip",
                                                                         "exempt: label a=1")


def test_unidentified_container_is_not_acted_on() -> None:
    engine = PolicyEngine(DEFAULT_POLICY, clock=Clock())
    d = engine.decide(alert(cid=None))
    assert (d.outcome, d.brake, d.reason) == (
        Outcome.SKIP, Brake.NO_CONTAINER_ID,
        f"no container id: cannot quarantine a container that is not identified (rule {RULE})")


def test_cooldown() -> None:
    clock = Clock()
    engine = PolicyEngine(policy("{cooldown_seconds: 600, per_container: {max_actions: 100}}"),
                          clock=clock)
    assert engine.decide(alert()).outcome is Outcome.ACT
    clock.advance(42.7)
    d = engine.decide(alert())
    assert d == Decision(Action.QUARANTINE, RULE, Outcome.SKIP,
                         "cooldown: container 0123456789ab (web) acted on 42 s ago "
                         "(cooldown 600 s)", False, Brake.COOLDOWN)
    assert engine.decide(alert(cid=CID2, name=None)).outcome is Outcome.ACT  # other container
    clock.advance(600 - 42.7 - 0.001)
    assert engine.decide(alert()).reason == ("cooldown: container 0123456789ab (web) acted on "
                                             "599 s ago (cooldown 600 s)")
    clock.advance(0.001)
    assert engine.decide(alert()).outcome is Outcome.ACT  # exactly 600 s later


def test_cooldown_from_the_store_holds_for_actions_this_engine_never_saw() -> None:
    """`recorded`: what the store holds (another replica's action, or one before a restart).
    The engine asks it for the container and the alert being decided."""
    wall = Clock(1_700_000_000.0)
    asked: list[tuple[str, str]] = []
    stored = {CID: PastAction(wall.now - 42.7, "quarantine", "policy"),
              CID2: PastAction(wall.now - 5, "pause", "alice")}

    def recorded(cid: str, alert_id: str) -> PastAction | None:
        asked.append((cid, alert_id))
        return stored.get(cid)

    engine = PolicyEngine(policy("{cooldown_seconds: 600, per_container: {max_actions: 100}}"),
                          clock=Clock(), recorded=recorded, wall_clock=wall)
    d = engine.decide(alert())
    assert d == Decision(Action.QUARANTINE, RULE, Outcome.SKIP,
                         "cooldown: container 0123456789ab (web) acted on (quarantine) 42 s ago, "
                         "by another collector replica or before a restart (cooldown 600 s)",
                         False, Brake.COOLDOWN)
    assert engine.decide(alert(cid=CID2, name=None)).reason.startswith(
        f"cooldown: container {CID2[:12]} acted on by alice (pause) 5 s ago")
    assert engine.decide(alert(cid=CID3)).outcome is Outcome.ACT  # nothing stored
    assert asked == [(CID, "a" * 24), (CID2, "a" * 24), (CID3, "a" * 24)]
    wall.advance(600)
    assert engine.decide(alert()).outcome is Outcome.ACT  # the stored action is long past
    assert engine.decide(alert(cid=CID3)).outcome is Outcome.SKIP  # this engine's own: local
    assert len(asked) == 4


def test_operator_action_starts_cooldown_but_uses_no_budget() -> None:
    clock = Clock()
    engine = PolicyEngine(policy("{cooldown_seconds: 300, global: {max_actions: 1}}"),
                          clock=clock)
    engine.record_manual(CID, "release")
    clock.advance(10)
    assert decide_reason(engine, alert()) == (
        "skip", "cooldown: container 0123456789ab (web) acted on by an operator (release) "
                "10 s ago (cooldown 300 s)")
    # the global budget (1) is still there for another container
    assert engine.decide(alert(cid=CID2)).outcome is Outcome.ACT
    assert engine.decide(alert(cid=CID3)).reason == "global rate limit: 1 action in the last 60 s"
    clock.advance(290)  # 300 s after the release
    assert engine.decide(alert()).outcome is Outcome.ACT
    with pytest.raises(ValueError, match="container id"):
        engine.record_manual("")


def test_per_container_rate_limit() -> None:
    clock = Clock()
    engine = PolicyEngine(policy("{cooldown_seconds: 0, per_container: {max_actions: 2, "
                                 "per_seconds: 300}}"), clock=clock)
    assert engine.decide(alert()).outcome is Outcome.ACT
    clock.advance(100)
    assert engine.decide(alert()).outcome is Outcome.ACT
    clock.advance(100)
    d = engine.decide(alert())
    assert d == Decision(Action.QUARANTINE, RULE, Outcome.SKIP,
                         "rate limit: container 0123456789ab (web) had 2 actions in the last "
                         "300 s", False, Brake.CONTAINER_RATE)
    assert engine.decide(alert(cid=CID2)).outcome is Outcome.ACT  # its own budget
    clock.advance(100)  # the first action is now 300 s old: out of the window
    assert engine.decide(alert()).outcome is Outcome.ACT
    assert engine.decide(alert()).reason == ("rate limit: container 0123456789ab (web) had "
                                             "2 actions in the last 300 s")


def test_per_container_limit_of_one_says_one_action() -> None:
    engine = PolicyEngine(policy("{cooldown_seconds: 0}"), clock=Clock())
    engine.decide(alert(name=None))
    assert engine.decide(alert(name=None)).reason == (
        "rate limit: container 0123456789ab had 1 action in the last 300 s")


def test_global_rate_limit() -> None:
    clock = Clock()
    engine = PolicyEngine(policy("{cooldown_seconds: 0, global: {max_actions: 2, "
                                 "per_seconds: 60}}"), clock=clock)
    assert engine.decide(alert(cid=CID)).outcome is Outcome.ACT
    clock.advance(30)
    assert engine.decide(alert(cid=CID2)).outcome is Outcome.ACT
    d = engine.decide(alert(cid=CID3))
    assert d == Decision(Action.QUARANTINE, RULE, Outcome.SKIP,
                         "global rate limit: 2 actions in the last 60 s", False,
                         Brake.GLOBAL_RATE)
    clock.advance(30)  # the first is 60 s old
    assert engine.decide(alert(cid=CID3)).outcome is Outcome.ACT
    assert engine.stats() == {"act": 3, "skip": 1, "no-match": 0, "containers_tracked": 3,
                              "global_recent_actions": 2}


def test_brake_order_exempt_before_cooldown_before_dry_run() -> None:
    clock = Clock()
    engine = PolicyEngine(DEFAULT_POLICY, clock=clock)
    assert engine.decide(alert()).outcome is Outcome.ACT
    engine.set_policy(parse_policy(DEFAULT_POLICY_YAML.replace("dry_run: false",
                                                               "dry_run: true")))
    # the history survives a policy switch; a cooled-down container is a cooldown skip, not a
    # "would quarantine"
    assert engine.decide(alert()).brake is Brake.COOLDOWN
    assert engine.decide(alert(namespace="kube-system")).brake is Brake.EXEMPT_NAMESPACE
    assert engine.decide(alert(cid=CID2)).brake is Brake.DRY_RUN


def test_containers_remembered_are_bounded() -> None:
    clock = Clock()
    engine = PolicyEngine(policy("{global: {max_actions: 100}}"), clock=clock, max_containers=2)
    for cid in (CID, CID2, CID3):
        assert engine.decide(alert(cid=cid)).outcome is Outcome.ACT
    assert engine.stats()["containers_tracked"] == 2
    # CID was acted on longest ago and was forgotten; CID2 and CID3 are still cooling down
    assert engine.decide(alert(cid=CID2)).brake is Brake.COOLDOWN
    assert engine.decide(alert(cid=CID3)).brake is Brake.COOLDOWN
    assert engine.decide(alert(cid=CID)).outcome is Outcome.ACT


def test_concurrent_decisions_act_once_per_container() -> None:
    engine = PolicyEngine(DEFAULT_POLICY, clock=Clock())
    start = threading.Barrier(8)
    results: list[Decision] = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait()
        for _ in range(50):
            d = engine.decide(alert())
            with lock:
                results.append(d)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [d.outcome for d in results].count(Outcome.ACT) == 1
    assert {d.brake for d in results if d.outcome is Outcome.SKIP} == {Brake.COOLDOWN}
    assert len(results) == 400


def test_rule_and_policy_objects_are_frozen() -> None:
    rule = Rule("r", Match(), Action.KILL)
    with pytest.raises(AttributeError):
        rule.action = Action.NONE  # type: ignore[misc]
    with pytest.raises(AttributeError):
        DEFAULT_POLICY.dry_run = True  # type: ignore[misc]
