"""The collector's store on both backends, a real SQLite file and a real PostgreSQL server (the
`store` and `open_store` fixtures run each test on each): alerts (repeats, paging), actions,
agents, audit, retention, container resolution, persistence, schema, threads; and that each is
what the collector's store interface says (tests/test_collector_filters.py: the filter
language). Tests of what only SQLite has (pragmas, WAL checkpoints, the file) are marked
``sqlite_only`` and take the `db_path` fixture."""

from __future__ import annotations

import inspect
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from driftwarden.collector.filters import ActionFilter, AlertFilter
from driftwarden.collector.migrations import ACTION_STATUSES_V1, MIGRATIONS, SCHEMA_VERSION
from driftwarden.collector.store import (
    AlertStore,
    CollectorStore,
    ContainerMatch,
    InsertOutcome,
    PruneResult,
    SqlStore,
)
from driftwarden.core.actions import ActionStatus
from driftwarden.core.alerts import Severity
from driftwarden.core.errors import (
    AmbiguousContainer,
    DriftwardenError,
    StoreError,
    UnknownAction,
    UnknownContainer,
)

from tests.support.store_alerts import CID_API, CID_CACHE, CID_JOB, CID_WEB, make_alert

NEW, UPDATED, DUPLICATE = InsertOutcome.NEW, InsertOutcome.UPDATED, InsertOutcome.DUPLICATE


sqlite_only = pytest.mark.sqlite_only  # the others take open_store (tests/conftest.py)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "collector.db"


@pytest.fixture
def store(open_store):
    with open_store(clock=lambda: 5000.0) as s:
        yield s


def ids(alerts: list[dict]) -> list[str]:
    return [a["id"] for a in alerts]


# -- repeats -------------------------------------------------------------------------------------


def test_replay_of_the_same_alert_is_a_duplicate_and_changes_nothing(store):
    alert = make_alert("a1")
    assert store.insert_alert(alert) is NEW
    assert store.insert_alert(dict(alert)) is DUPLICATE
    assert store.stats()["alerts"] == 1
    assert store.get_alert("a1") == alert
    assert store.get_alert("nope") is None


def test_aggregated_repeat_adds_its_count_and_keeps_the_first_time(store):
    assert store.insert_alert(make_alert("a1", 100.0)) is NEW
    aggregate = make_alert("a1", 130.0, count=5, first_seen=101.0, last_seen=130.0,
                           severity=Severity.CRITICAL, text="ran /tmp/x again")
    assert store.insert_alert(aggregate) is UPDATED
    stored = store.get_alert("a1")
    assert (stored["time"], stored["count"], stored["first_seen"], stored["last_seen"]) == (
        100.0, 6, 100.0, 130.0)
    assert stored["severity"] == "critical"
    assert stored["reasons"][0]["text"] == "ran /tmp/x again"
    # the aggregate replayed, and an older aggregate arriving late: both ignored
    assert store.insert_alert(aggregate) is DUPLICATE
    older = make_alert("a1", 120.0, count=2, first_seen=110.0, last_seen=120.0)
    assert store.insert_alert(older) is DUPLICATE
    assert store.get_alert("a1")["count"] == 6
    second = make_alert("a1", 160.0, count=3, first_seen=140.0, last_seen=160.0)
    assert store.insert_alert(second) is UPDATED
    assert store.get_alert("a1")["count"] == 9
    # the severity column follows the update: the filter sees it
    assert ids(store.list_alerts(AlertFilter(min_severity="critical"))[0]) == []
    assert ids(store.list_alerts(AlertFilter(min_severity="high"))[0]) == ["a1"]


def test_batch_outcomes_follow_the_batch_order(store):
    a = make_alert("a", 10.0)
    b = make_alert("b", 20.0)
    a_agg = make_alert("a", 30.0, count=2, first_seen=25.0, last_seen=30.0)
    outcomes = store.insert_alerts([a, b, dict(a), a_agg, dict(a_agg)])
    assert outcomes == [NEW, NEW, DUPLICATE, UPDATED, DUPLICATE]
    assert store.get_alert("a")["count"] == 3
    assert store.stats()["alerts"] == 2
    assert store.insert_alerts([]) == []


def test_a_batch_with_one_bad_alert_stores_nothing(store):
    bad = make_alert("bad")
    del bad["node"]
    with pytest.raises(ValueError, match=r"alert #1 \(id 'bad'\): 'node'"):
        store.insert_alerts([make_alert("good"), bad])
    assert store.stats()["alerts"] == 0


@pytest.mark.parametrize(("change", "message"), [
    ({"id": None}, "alert #0: 'id' must be a non-empty string"),
    ({"id": ""}, "alert #0: 'id' must be a non-empty string"),
    ({"time": "now"}, "'time' must be a finite number"),
    ({"kind": "weird"}, "'kind' must be one of drift, novel, anomaly"),
    ({"severity": "huge"}, "unknown severity 'huge'"),
    ({"score": float("nan")}, "'score' must be a finite number"),
    ({"node": ""}, "'node' must be the agent's node name"),
    ({"count": 0}, "'count' must be an integer >= 1"),
    ({"container": {"id": 7}}, "'container.id' must be a string or null"),
    ({"container": {"pod_uid": 7}}, "'container.pod_uid' must be a string or null"),
    ({"container": {"workload": ["Deployment", "web"]}},
     "'container.workload' must be a string or null"),
    ({"container": {"image_digest": {}}}, "'container.image_digest' must be a string or null"),
    ({"first_seen": 2000.0}, "'first_seen' \\(2000.0\\) is after 'last_seen'"),
    ({"extra": object()}, "not JSON-serialisable"),
])
def test_alerts_that_would_corrupt_the_store_are_refused(store, change, message):
    alert = {**make_alert("x"), **change}
    with pytest.raises(ValueError, match=message):
        store.insert_alert(alert)
    with pytest.raises(ValueError, match="expected a dict"):
        store.insert_alerts(["not an alert"])
    assert store.stats()["alerts"] == 0


# -- paging --------------------------------------------------------------------------------------


def test_paging_has_no_duplicate_and_no_gap_while_alerts_arrive(store):
    # 25 alerts, three per second: equal times are ordered by id across page boundaries
    originals = [make_alert(f"p{i:02d}", 1000.0 + i // 3) for i in range(25)]
    store.insert_alerts(originals)
    expected = [a["id"] for a in sorted(originals, key=lambda a: (a["time"], a["id"]),
                                        reverse=True)]
    pages: list[list[str]] = []
    page, token = store.list_alerts(page_size=10)
    pages.append(ids(page))
    # between pages: newer alerts, a late one older than everything, a late one between rows
    # already returned, and an aggregate of an alert still to come
    store.insert_alerts([make_alert(f"new{i}", 2000.0 + i) for i in range(5)])
    store.insert_alerts([make_alert("late-old", 500.0), make_alert("late-mid", 1007.5)])
    assert store.insert_alert(make_alert("p01", 3000.0, count=4, first_seen=2900.0,
                                         last_seen=3000.0)) is UPDATED
    while token is not None:
        page, token = store.list_alerts(page_size=10, page_token=token)
        pages.append(ids(page))
    walked = [i for p in pages for i in p]
    assert [len(p) for p in pages] == [10, 10, 6]
    assert walked == [*expected, "late-old"]
    assert len(set(walked)) == len(walked)
    # a fresh walk sees everything, the newer alerts first
    everything, token = store.list_alerts(page_size=1000)
    assert token is None
    assert ids(everything)[:5] == ["new4", "new3", "new2", "new1", "new0"]
    assert len(everything) == 32


def test_paging_with_a_filter_and_an_exact_last_page(store):
    store.insert_alerts([make_alert(f"f{i}", 100.0 + i, node="node-1" if i % 2 else "node-2")
                         for i in range(8)])
    only = AlertFilter(nodes=("node-1",))
    first, token = store.list_alerts(only, page_size=2)
    second, token2 = store.list_alerts(only, page_size=2, page_token=token)
    assert (ids(first), ids(second), token2) == (["f7", "f5"], ["f3", "f1"], None)
    with pytest.raises(ValueError, match="another filter"):
        store.list_alerts(AlertFilter(nodes=("node-2",)), page_size=2, page_token=token)


@pytest.mark.parametrize("token", ["garbage", "v1.", "v1.!!!!", "v2.eyJ0IjoxfQ",
                                   "v1.eyJ0IjoxfQ", "v1.bnVsbA"])
def test_bad_page_tokens_raise_value_error(store, token):
    store.insert_alert(make_alert("a"))
    with pytest.raises(ValueError, match="invalid page token"):
        store.list_alerts(page_token=token)


def test_page_size_is_checked(store):
    for size in (0, 1001, "10"):
        with pytest.raises(ValueError, match="page_size must be an integer from 1 to 1000"):
            store.list_alerts(page_size=size)


# -- actions -------------------------------------------------------------------------------------


def test_action_lifecycle(store):
    action = store.record_action(container_id=CID_WEB, container_name="web", node="node-1",
                                 type="quarantine", reason="drift a1", requested_by="policy",
                                 alert_id="a1", now=10.0)
    assert (action.status, action.finished_at, action.finished, len(action.action_id)) == (
        ActionStatus.PENDING, None, False, 32)
    assert store.get_action(action.action_id) == action
    assert store.stats()["actions_pending"] == 1
    done = store.finish_action(action.action_id, "done", "cgroup programs attached", now=12.0)
    assert (done.status, done.message, done.finished_at, done.created_at) == (
        ActionStatus.DONE, "cgroup programs attached", 12.0, 10.0)
    # a replayed or conflicting result does not overwrite the first
    again = store.finish_action(action.action_id, ActionStatus.FAILED, "late", now=20.0)
    assert again == done
    assert store.get_action(action.action_id) == done
    assert store.stats()["actions_pending"] == 0
    with pytest.raises(UnknownAction, match="no action with id 'nope'"):
        store.finish_action("nope", "done")
    with pytest.raises(ValueError, match="'pending' is not a result"):
        store.finish_action(action.action_id, "pending")
    with pytest.raises(ValueError, match="unknown action status 'ok'"):
        store.finish_action(action.action_id, "ok")
    assert store.get_action("nope") is None


def test_actions_decided_at_once_are_finished_and_lists_filter(store):
    first = store.record_action(container_id=CID_WEB, node="node-1", type="kill",
                                reason="operator", requested_by="alice", action_id="act-1",
                                now=1.0)
    skipped = store.record_action(container_id=CID_API, node="node-2", type="pause",
                                  reason="dry run", requested_by="policy",
                                  status="skipped", message="dry-run", now=2.0)
    third = store.record_action(container_id=CID_WEB, node="node-1", type="release",
                                reason="operator", requested_by="alice", now=2.0)
    assert (skipped.status, skipped.finished_at) == (ActionStatus.SKIPPED, 2.0)
    assert [a.action_id for a in store.list_actions()] == [
        third.action_id, skipped.action_id, "act-1"]
    assert [a.action_id for a in store.list_actions(container_id=CID_WEB)] == [
        third.action_id, "act-1"]
    assert store.list_actions(statuses=["skipped"]) == [skipped]
    assert store.list_actions(node="node-1", limit=1) == [third]
    assert store.list_actions(alert_id="zzz") == []
    assert first.to_dict()["status"] == "pending"
    with pytest.raises(StoreError, match="action id 'act-1' is already stored"):
        store.record_action(container_id=CID_WEB, node="node-1", type="kill", reason="x",
                            requested_by="alice", action_id="act-1")
    with pytest.raises(ValueError, match="container_id must be a non-empty string"):
        store.record_action(container_id="", node="node-1", type="kill", reason="x",
                            requested_by="alice")
    assert store.stats()["actions"] == 3


def test_actions_keep_with_pause(open_store):
    with open_store() as store:
        paused = store.record_action(container_id=CID_WEB, node="node-1", type="quarantine",
                                     reason="r", requested_by="policy", with_pause=True, now=1.0)
        plain = store.record_action(container_id=CID_WEB, node="node-1", type="quarantine",
                                    reason="r", requested_by="alice", now=2.0)
        assert (paused.with_pause, plain.with_pause) == (True, False)
        assert paused.to_dict()["with_pause"] is True
        assert [a.with_pause for a in store.list_actions()] == [False, True]
        done = store.finish_action(paused.action_id, "done", now=3.0)
        assert (done.with_pause, done.interrupted) == (True, False)
        with pytest.raises(ValueError, match="with_pause must be True or False, got 1"):
            store.record_action(container_id=CID_WEB, node="node-1", type="quarantine",
                                reason="r", requested_by="alice", with_pause=1)
    with open_store() as store:
        assert store.get_action(paused.action_id) == done
        assert store.get_action(plain.action_id) == plain


@sqlite_only
def test_a_schema_1_store_is_migrated_and_keeps_its_actions(db_path):
    raw = sqlite3.connect(db_path)
    raw.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, "
                "applied_at REAL NOT NULL)")
    raw.executescript(";\n".join(MIGRATIONS[0]))
    raw.execute("INSERT INTO schema_version VALUES (1, 0)")
    raw.execute("INSERT INTO actions VALUES ('old', 5.0, ?, 'web', 'node-1', 'quarantine', "
                "'r', 'alice', NULL, 'done', 'ok', 6.0)", (CID_WEB,))
    raw.commit()
    raw.close()
    with AlertStore.open(db_path) as store:
        assert store.schema_version() == SCHEMA_VERSION == 4
        old = store.get_action("old")
        assert (old.status, old.with_pause, old.interrupted, old.finished_at) == (
            ActionStatus.DONE, False, False, 6.0)
        assert store.page_actions() == ([old], None)


def test_pending_actions_of_a_stopped_collector_fail_once_audited(open_store):
    with open_store() as store:
        first = store.record_action(container_id=CID_WEB, container_name="web", node="node-1",
                                    type="quarantine", reason="r", requested_by="policy",
                                    alert_id="a1", with_pause=True, now=1.0)
        second = store.record_action(container_id=CID_API, node="node-2", type="kill",
                                     reason="r", requested_by="alice", now=2.0)
        done = store.record_action(container_id=CID_API, node="node-2", type="pause",
                                   reason="r", requested_by="alice", now=0.5)
        store.finish_action(done.action_id, "done", now=0.7)
    # the collector stopped before the agents answered; the next one opens the same file
    with open_store() as store:
        failed = store.fail_pending_actions("restarted", now=10.0)
        assert [(a.action_id, a.status, a.message, a.finished_at, a.interrupted, a.with_pause)
                for a in failed] == [
            (first.action_id, ActionStatus.FAILED, "restarted", 10.0, True, True),
            (second.action_id, ActionStatus.FAILED, "restarted", 10.0, True, False)]
        assert store.get_action(done.action_id).status is ActionStatus.DONE
        assert [(e.actor, e.action, e.target, e.decision, e.reason, e.details)
                for e in store.list_audit()] == [
            ("collector", "quarantine", CID_WEB, "failed", "restarted",
             {"action_id": first.action_id, "node": "node-1", "requested_by": "policy",
              "requested_at": 1.0}),
            ("collector", "kill", CID_API, "failed", "restarted",
             {"action_id": second.action_id, "node": "node-2", "requested_by": "alice",
              "requested_at": 2.0})]
        assert store.fail_pending_actions("again") == []
        assert store.stats()["actions_pending"] == 0
        # the agent's late result replaces the guess; after that the first result wins again
        late = store.finish_action(first.action_id, "done", "quarantined", now=11.0)
        assert (late.status, late.message, late.finished_at, late.interrupted) == (
            ActionStatus.DONE, "quarantined", 11.0, False)
        assert store.finish_action(first.action_id, "failed", "replayed", now=12.0) == late
    with open_store() as store:
        assert store.get_action(second.action_id) == failed[1]
        assert store.get_action(first.action_id) == late


def test_actions_page_newest_first_filtered_in_sql(store):
    made = []
    for i in range(9):  # three per second: equal times are ordered by id across pages
        made.append(store.record_action(
            container_id=(CID_WEB, CID_API, CID_JOB)[i % 3],
            container_name=("web", "api", None)[i % 3], node=f"node-{i % 2}",
            type=("kill", "pause", "quarantine")[i % 3], reason="r", requested_by="alice",
            action_id=f"act-{i}", now=100.0 + i // 3))
    newest_first = [a.action_id for a in sorted(made, key=lambda a: (a.created_at, a.action_id),
                                                reverse=True)]
    walked, token, pages = [], None, 0
    while True:
        page, token = store.page_actions(page_size=4, page_token=token)
        walked += [a.action_id for a in page]
        pages += 1
        if token is None:
            break
    assert (walked, pages) == (newest_first, 3)

    def listed(**kwargs) -> list[str]:
        page, token = store.page_actions(ActionFilter(**kwargs), page_size=100)
        assert token is None
        return [a.action_id for a in page]

    assert listed(nodes=["node-1"]) == ["act-7", "act-5", "act-3", "act-1"]
    assert listed(containers=["web"]) == ["act-6", "act-3", "act-0"]  # a name
    assert listed(containers=["AAAA"]) == ["act-8", "act-6", "act-5", "act-3", "act-2",
                                           "act-0"]  # an id prefix of web and job
    assert listed(types=["pause", "quarantine"], nodes=["node-0"]) == ["act-8", "act-4", "act-2"]
    assert listed(since=101.0, until=102.0) == ["act-5", "act-4", "act-3"]
    first, token = store.page_actions(ActionFilter(nodes=["node-1"]), page_size=2)
    assert [a.action_id for a in first] == ["act-7", "act-5"]
    with pytest.raises(ValueError, match="another filter"):
        store.page_actions(ActionFilter(nodes=["node-0"]), page_size=2, page_token=token)
    store.insert_alerts([make_alert("a1", 1.0), make_alert("a2", 2.0)])
    _, alerts_token = store.list_alerts(page_size=1)
    with pytest.raises(ValueError, match="another filter"):  # an alert listing's token
        store.page_actions(page_token=alerts_token)
    with pytest.raises(ValueError, match="invalid page token"):
        store.page_actions(page_token="garbage")


def test_a_transaction_is_all_or_nothing_and_a_failed_write_inside_undoes_itself(store):
    with pytest.raises(RuntimeError, match="changed my mind"), store.transaction():
        store.audit("alice", "kill", CID_WEB, "request", "r")
        store.record_action(container_id=CID_WEB, node="node-1", type="kill", reason="r",
                            requested_by="alice", action_id="act-1")
        raise RuntimeError("changed my mind")
    assert (store.list_audit(), store.list_actions()) == ([], [])
    with store.transaction():
        store.record_action(container_id=CID_WEB, node="node-1", type="kill", reason="r",
                            requested_by="alice", action_id="act-1")
        with pytest.raises(RuntimeError), store.transaction():  # a savepoint
            store.audit("alice", "kill", CID_WEB, "request", "undone")
            raise RuntimeError("only this")
        with pytest.raises(StoreError, match="'act-1' is already stored"):
            store.record_action(container_id=CID_WEB, node="node-1", type="pause",
                                reason="r", requested_by="alice", action_id="act-1")
        store.audit("alice", "kill", CID_WEB, "request", "kept")
    assert [a.action_id for a in store.list_actions()] == ["act-1"]
    assert [e.reason for e in store.list_audit()] == ["kept"]


def test_get_alerts_reads_many_in_one_call(store):
    store.insert_alerts([make_alert(f"g{i}", 100.0 + i) for i in range(600)])
    found = store.get_alerts([f"g{i}" for i in range(0, 600, 2)] + ["nope", "g0"])
    assert sorted(found) == sorted(f"g{i}" for i in range(0, 600, 2))
    assert found["g4"] == store.get_alert("g4")


# -- agents --------------------------------------------------------------------------------------


def test_agent_connect_heartbeat_disconnect_reconnect(store):
    hello = store.upsert_agent("node-1", agent_version="0.1.0", mode="monitor",
                               peer="ipv4:127.0.0.1:40000", now=100.0)
    assert (hello.connected, hello.connected_at, hello.last_seen, hello.counters) == (
        True, 100.0, 100.0, {})
    beat = store.upsert_agent("node-1", counters={"events": 10, "dropped": 0},
                              containers_watched=3, spool_depth=0, now=110.0)
    assert (beat.connected_at, beat.last_seen, beat.agent_version, beat.peer) == (
        100.0, 110.0, "0.1.0", "ipv4:127.0.0.1:40000")
    assert store.get_agent("node-1") == beat
    assert (beat.counters, beat.containers_watched, beat.spool_depth) == (
        {"events": 10, "dropped": 0}, 3, 0)
    # a stale stream closing does not disconnect the current one
    assert store.mark_agent_disconnected("node-1", peer="ipv4:127.0.0.1:39999", now=111.0) is False
    assert store.get_agent("node-1").connected is True
    assert store.mark_agent_disconnected("node-1", peer="ipv4:127.0.0.1:40000", now=120.0)
    gone = store.get_agent("node-1")
    assert (gone.connected, gone.disconnected_at, gone.counters) == (False, 120.0,
                                                                    {"events": 10, "dropped": 0})
    assert store.mark_agent_disconnected("node-1", now=121.0) is False  # already
    back = store.upsert_agent("node-1", peer="ipv4:127.0.0.1:40001", now=130.0)
    assert (back.connected, back.connected_at, back.mode) == (True, 130.0, "monitor")
    # a new peer while still connected is a new session
    moved = store.upsert_agent("node-1", peer="ipv4:127.0.0.1:40002", now=140.0)
    assert moved.connected_at == 140.0


def test_agent_lists_and_collector_restart(store):
    for node in ("node-b", "node-a", "node-c"):
        store.upsert_agent(node, now=1.0)
    store.mark_agent_disconnected("node-c", now=2.0)
    assert [a.node for a in store.list_agents()] == ["node-a", "node-b", "node-c"]
    assert [a.node for a in store.list_agents(connected=True)] == ["node-a", "node-b"]
    assert [a.node for a in store.list_agents(connected=False)] == ["node-c"]
    assert store.stats()["agents_connected"] == 2
    assert store.mark_all_agents_disconnected(now=3.0) == 2
    assert store.list_agents(connected=True) == []
    assert store.get_agent("nobody") is None
    with pytest.raises(ValueError, match="spool_depth must be an integer >= 0"):
        store.upsert_agent("node-a", spool_depth=-1)
    with pytest.raises(ValueError, match="counters must be JSON-serialisable"):
        store.upsert_agent("node-a", counters={"x": object()})


# -- audit ---------------------------------------------------------------------------------------


def test_audit_is_appended_in_order_and_read_on_by_seq(store):
    s1 = store.audit("policy", "quarantine", CID_WEB, "act", "drift in prod",
                     {"alert": "a1"}, now=1.0)
    s2 = store.audit("alice", "kill", CID_API, "refused", "exempt namespace", now=2.0)
    s3 = store.audit("policy", "pause", CID_WEB, "skipped", "rate limit", now=3.0)
    assert s1 < s2 < s3
    entries = store.list_audit()
    assert [(e.seq, e.actor, e.action, e.decision) for e in entries] == [
        (s1, "policy", "quarantine", "act"), (s2, "alice", "kill", "refused"),
        (s3, "policy", "pause", "skipped")]
    assert entries[0].details == {"alert": "a1"}
    assert entries[1].details == {}
    assert [e.seq for e in store.list_audit(since_seq=s1)] == [s2, s3]
    assert [e.seq for e in store.list_audit(since_seq=s1, limit=1)] == [s2]
    assert store.list_audit(since_seq=s3) == []


# -- retention -----------------------------------------------------------------------------------


def test_prune_deletes_exactly_what_is_older(store):
    store.insert_alerts([
        make_alert("old", 100.0),
        make_alert("edge", 900.0, cid=CID_API, name="api"),  # last_seen == cutoff: kept
        make_alert("new", 950.0, cid=CID_CACHE, name="cache"),
        # first seen long ago, still repeating: kept
        make_alert("repeating", 50.0, cid=CID_JOB, name="job"),
    ])
    store.insert_alert(make_alert("repeating", 990.0, cid=CID_JOB, name="job", count=2,
                                  first_seen=980.0, last_seen=990.0))
    for when in (10.0, 899.0, 900.0, 999.0):
        store.audit("policy", "pause", "x", "act", now=when)
    result = store.prune(100.0, now=1000.0)
    assert result == PruneResult(alerts=1, audit=2, containers=1)
    assert sorted(ids(store.list_alerts()[0])) == ["edge", "new", "repeating"]
    assert [e.time for e in store.list_audit()] == [900.0, 999.0]
    with pytest.raises(UnknownContainer):
        store.find_container("web")  # only seen in the pruned alert
    assert store.prune(100.0, now=1000.0) == PruneResult(0, 0, 0)
    # audit sequence numbers are not reused after a prune
    last = store.list_audit()[-1].seq
    assert store.audit("policy", "pause", "x", "act", now=1001.0) == last + 1
    with pytest.raises(ValueError, match="older_than_seconds must be a number >= 0"):
        store.prune(-1, now=1.0)


# -- containers ----------------------------------------------------------------------------------


def test_find_container_by_id_name_and_prefix(store):
    store.insert_alerts([
        make_alert("w1", 100.0, cid=CID_WEB, name="web"),
        make_alert("j1", 200.0, cid=CID_JOB, name="job", node="node-2"),
        make_alert("c1", 300.0, cid=CID_CACHE, name="cache"),
    ])
    assert store.find_container(CID_WEB) == ContainerMatch(CID_WEB, "web", "node-1")
    assert store.find_container(" job ") == ContainerMatch(CID_JOB, "job", "node-2")
    assert store.find_container("cccc") == ContainerMatch(CID_CACHE, "cache", "node-1")
    cid, name, node = store.find_container("aaaa1")
    assert (cid, name, node) == (CID_WEB, "web", "node-1")
    with pytest.raises(AmbiguousContainer) as ambiguous:
        store.find_container("aaaa")
    assert ambiguous.value.candidates == (ContainerMatch(CID_JOB, "job", "node-2"),
                                          ContainerMatch(CID_WEB, "web", "node-1"))
    assert "job (aaaa4444aaaa) on node-2" in str(ambiguous.value)
    with pytest.raises(UnknownContainer) as unknown:
        store.find_container("aaa")  # too short to be a prefix
    assert [c.container_id for c in unknown.value.candidates] == [CID_JOB, CID_WEB]
    with pytest.raises(UnknownContainer) as unknown:
        store.find_container("zzzz")
    assert unknown.value.candidates == ()
    assert isinstance(unknown.value, StoreError)
    assert isinstance(unknown.value, DriftwardenError)
    with pytest.raises(ValueError, match="empty container reference"):
        store.find_container("  ")


def test_a_reused_name_means_the_latest_on_one_node_and_is_ambiguous_across_nodes(store):
    store.insert_alerts([make_alert("old-web", 100.0, cid=CID_WEB, name="web"),
                         make_alert("new-web", 200.0, cid=CID_API, name="web")])
    assert store.find_container("web") == ContainerMatch(CID_API, "web", "node-1")
    store.insert_alert(make_alert("old-web-2", 250.0, cid=CID_WEB, name="web"))
    assert store.find_container("web") == ContainerMatch(CID_WEB, "web", "node-1")
    # an alert replayed late does not move its container's last sighting back
    store.insert_alert(make_alert("old-web-3", 150.0, cid=CID_WEB, name="web"))
    assert store.find_container("web") == ContainerMatch(CID_WEB, "web", "node-1")
    store.insert_alert(make_alert("other-node", 120.0, cid=CID_CACHE, name="web",
                                  node="node-2"))
    with pytest.raises(AmbiguousContainer, match="the name is used on 2 nodes") as exc:
        store.find_container("web")
    assert exc.value.candidates == (ContainerMatch(CID_WEB, "web", "node-1"),
                                    ContainerMatch(CID_CACHE, "web", "node-2"))


# -- the file ------------------------------------------------------------------------------------


def test_everything_persists_across_close_and_reopen(open_store):
    alert = make_alert("a1", 100.0)
    with open_store() as store:
        store.insert_alert(alert)
        action = store.record_action(container_id=CID_WEB, node="node-1", type="kill",
                                     reason="r", requested_by="alice", now=1.0)
        agent = store.upsert_agent("node-1", agent_version="0.1.0", counters={"events": 1},
                                   now=2.0)
        seq = store.audit("alice", "kill", CID_WEB, "act", "r", {"k": [1, 2]}, now=3.0)
    assert store.closed
    with pytest.raises(StoreError, match="is closed"):
        store.get_alert("a1")
    with open_store() as store:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.get_alert("a1") == alert
        assert store.insert_alert(alert) is DUPLICATE
        assert store.get_action(action.action_id) == action
        assert store.get_agent("node-1") == agent
        assert [(e.seq, e.details) for e in store.list_audit()] == [(seq, {"k": [1, 2]})]
        assert store.find_container("web") == ContainerMatch(CID_WEB, "web", "node-1")


@sqlite_only
def test_wal_mode_and_synchronous_normal(db_path):
    with AlertStore.open(db_path) as store:
        store.insert_alert(make_alert("a1"))
        assert store.pragmas() == {"journal_mode": "wal", "synchronous": 1}
        other = sqlite3.connect(db_path)
        try:  # WAL is a property of the file: a plain connection sees it too
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("SELECT count(*) FROM alerts").fetchone()[0] == 1
        finally:
            other.close()
        assert Path(f"{db_path}-wal").exists()


def test_a_newer_schema_is_refused(open_store):
    with open_store() as store:
        assert store.schema_version() == SCHEMA_VERSION
        with store._write() as conn:  # what a newer collector would have left
            conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, 0)",
                         (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match=f"has schema version {SCHEMA_VERSION + 1}, newer "
                                         f"than this driftwarden supports \\({SCHEMA_VERSION}\\)"):
        open_store()


@sqlite_only
def test_a_foreign_file_or_a_missing_directory_is_refused(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="is it a driftwarden SQLite store"):
        AlertStore.open(junk)
    with pytest.raises(StoreError, match="does the directory exist"):
        AlertStore.open(tmp_path / "missing" / "x.db")


def test_concurrent_batches_from_four_threads_on_two_stores(open_store):
    """Two stores on one file or database (two collectors), two threads each."""
    shared = [make_alert(f"shared{i:03d}", 100.0 + i) for i in range(200)]
    outcomes: list[list[InsertOutcome]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(n: int, store: SqlStore) -> None:
        own = [make_alert(f"t{n}-{i:03d}", 500.0 + i, cid=f"{n:08d}" * 8,
                           name=f"own{n}") for i in range(100)]
        alerts = [a for pair in zip(shared, own + own, strict=True) for a in pair]
        try:
            start.wait()
            for i in range(0, len(alerts), 20):
                outcomes[n].extend(store.insert_alerts(alerts[i:i + 20]))
        except BaseException as exc:  # reported below: a thread's exception is otherwise lost
            errors.append(exc)

    with open_store() as store, open_store() as other:
        threads = [threading.Thread(target=work, args=(n, (store, other)[n % 2]))
                   for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        flat = [o for per in outcomes for o in per]
        # each thread sent the 200 shared, its 100 own, and its own again
        assert len(flat) == 4 * 400
        assert flat.count(NEW) == 200 + 4 * 100
        assert flat.count(DUPLICATE) == 3 * 200 + 4 * 100
        assert flat.count(UPDATED) == 0
        assert store.stats()["alerts"] == 600
        assert store.count_alerts(AlertFilter(containers=("web",))) == 200


# -- background WAL checkpoints ---------------------------------------------------------------


def _wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@sqlite_only
def test_background_checkpoints_replace_the_automatic_ones(db_path):
    with AlertStore.open(db_path, checkpoint_interval=0.05) as store:
        with store._read() as conn:
            assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        for i in range(120):  # ~19 pages an alert: well past the automatic 1000-page mark
            store.insert_alert(make_alert(f"c{i:03}"))
        _wait_until(lambda: store.checkpoint_stats["checkpoints"] >= 2, "two checkpoints")
        thread = store._checkpointer._thread
    assert not thread.is_alive()  # close() stopped it, after a last checkpoint
    assert store.checkpoint_stats["errors"] == 0
    with AlertStore.open(db_path) as reopened:
        assert len(reopened.list_alerts(page_size=500)[0]) == 120
        with reopened._read() as conn:  # without the option: SQLite's automatic checkpoints
            assert conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000


@sqlite_only
def test_checkpoint_interval_must_be_positive(db_path):
    with pytest.raises(ValueError, match=r"^checkpoint_interval must be > 0 seconds, got 0$"):
        AlertStore.open(db_path, checkpoint_interval=0)
    assert not db_path.exists()


# -- the interface and the schema ----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["AlertStore", "PostgresStore"])
def test_each_store_has_every_method_of_the_interface_with_its_signature(backend):
    from driftwarden.collector.store_pg import PostgresStore

    store_class = {"AlertStore": AlertStore, "PostgresStore": PostgresStore}[backend]

    def shown(signature: inspect.Signature) -> str:
        return str(signature.replace(return_annotation=inspect.Signature.empty))

    operations = [name for name, member in vars(CollectorStore).items()
                  if callable(member) and not name.startswith("_")]
    assert "insert_alerts" in operations and "find_container" in operations
    for name in operations:
        assert shown(inspect.signature(getattr(store_class, name))) == shown(
            inspect.signature(getattr(CollectorStore, name))), name
    assert {"path", "checkpoint_stats"} <= set(CollectorStore.__annotations__)


@sqlite_only
def test_schema_1_accepts_exactly_the_action_statuses(db_path):
    # the migration spells the statuses out: a new one needs a new migration
    assert tuple(s.value for s in ActionStatus) == ACTION_STATUSES_V1
    with AlertStore.open(db_path):
        pass
    conn = sqlite3.connect(db_path)
    try:
        conn.execute("INSERT INTO actions (action_id, created_at, container_id, node, type, "
                     "reason, requested_by, status, message) VALUES "
                     "('a', 1, 'c', 'n', 'kill', '', 'x', 'container_gone', '')")
        with pytest.raises(sqlite3.IntegrityError, match="CHECK constraint failed"):
            conn.execute("INSERT INTO actions (action_id, created_at, container_id, node, type, "
                         "reason, requested_by, status, message) VALUES "
                         "('b', 1, 'c', 'n', 'kill', '', 'x', 'container-gone', '')")
    finally:
        conn.close()
