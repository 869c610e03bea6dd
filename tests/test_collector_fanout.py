"""Fan-out hub: exact filters, bounded queues with overflow notices, isolation, close."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from driftwarden.collector.fanout import FanoutHub, SubscriberFilter
from driftwarden.collector.filters import AlertFilter, image_repository
from driftwarden.core.errors import FilterError, UsageError

CID = "0123456789ab" + "cd" * 26
CID2 = "fedcba987654" + "32" * 26
IMAGE_ID = "sha256:" + "3f1c" * 16


def alert(n: int = 0, *, kind: str = "drift", severity: str = "high", node: str = "node-1",
          cid: str | None = CID, name: str | None = "web", namespace: str | None = "prod",
          image: str | None = "nginx:1.25", image_id: str | None = IMAGE_ID) -> dict[str, Any]:
    return {"v": 1, "id": f"{n:024x}", "time": float(n), "kind": kind, "severity": severity,
            "score": 1.0, "reasons": [],
            "container": {"id": cid, "name": name, "image": image, "image_id": image_id,
                          "pod": None, "namespace": namespace},
            "process": None, "events": [], "baseline_version": 1, "baseline_mode": "protect",
            "count": 1, "first_seen": float(n), "last_seen": float(n), "node": node}


def drain(sub: Any) -> list[tuple[str, Any]]:
    items = []
    while (item := sub.get(timeout=0)) is not None:
        items.append(item)
    return items


# -- filters -------------------------------------------------------------------------------------


def test_image_repository() -> None:
    assert image_repository("nginx:1.25") == "nginx"
    assert image_repository("nginx") == "nginx"
    assert image_repository("registry:5000/team/app:2@sha256:ab") == "registry:5000/team/app"
    assert image_repository("registry:5000/team/app") == "registry:5000/team/app"


def test_empty_filter_matches_everything() -> None:
    f = SubscriberFilter(kinds=[], min_severity="", nodes=None)
    assert f.unfiltered
    assert f.matches(alert()) and f.matches({"kind": "weird"})


@pytest.mark.parametrize(("kwargs", "hits", "misses"), [
    ({"kinds": ["drift", "NOVEL"]}, [{}, {"kind": "novel"}], [{"kind": "anomaly"}]),
    ({"min_severity": "high"}, [{}, {"severity": "critical"}],
     [{"severity": "medium"}, {"severity": "low"}, {"severity": "bogus"}]),
    ({"min_severity": "LOW"}, [{"severity": "low"}], [{"severity": "bogus"}]),
    ({"nodes": ["node-1", "node-3"]}, [{}, {"node": "node-3"}], [{"node": "node-2"}]),
    ({"namespaces": ["prod"]}, [{}], [{"namespace": "dev"}, {"namespace": None}]),
    ({"images": ["nginx"]}, [{}, {"image": "nginx:1.26"}, {"image": "nginx@sha256:00"}],
     [{"image": "nginx-extra:1"}, {"image": "library/nginx:1"}]),
    ({"images": ["nginx:1.25"]}, [{}], [{"image": "nginx:1.26"}, {"image": "nginx"}]),
    ({"images": [IMAGE_ID]}, [{"image": "renamed:1"}], [{"image_id": "sha256:" + "0" * 64}]),
    ({"images": ["3F1C3f1c"]}, [{"image": "x"}], [{"image": "x", "image_id": None}]),
    ({"images": ["sha256:3f1"]}, [{"image": "sha256:3f1"}], [{}]),  # 3 hex digits: no prefix
    ({"containers": ["web"]}, [{}], [{"name": "web-2", "cid": CID2}]),
    ({"containers": [CID]}, [{"name": None}], [{"cid": CID2}]),
    ({"containers": ["0123"]}, [{"name": "db"}], [{"cid": CID2, "name": "0123x"}]),
    ({"containers": ["012"]}, [{"name": "012"}], [{"name": "db"}]),  # too short to be an id
    ({"exclude_namespaces": ["kube-system"]}, [{}, {"namespace": None}],
     [{"namespace": "kube-system"}]),
    ({"exclude_images": ["nginx"]}, [{"image": "redis:7", "image_id": None}],
     [{}, {"image": "nginx:1.26"}]),
    ({"exclude_containers": ["0123456789ab"]}, [{"cid": CID2}], [{}, {"name": "other"}]),
])
def test_filter_allow_and_deny(kwargs: dict[str, Any], hits: list[dict[str, Any]],
                               misses: list[dict[str, Any]]) -> None:
    f = SubscriberFilter(**kwargs)
    assert not f.unfiltered
    assert [f.matches(alert(**h)) for h in hits] == [True] * len(hits)
    assert [f.matches(alert(**m)) for m in misses] == [False] * len(misses)


def test_filters_combine_and_deny_wins() -> None:
    f = SubscriberFilter(kinds=["drift"], min_severity="medium", namespaces=["prod", "edge"],
                         images=["nginx", "redis"], exclude_containers=["web-canary"],
                         exclude_images=["redis:debug"])
    assert f.matches(alert())
    assert f.matches(alert(namespace="edge", image="redis:7"))
    assert not f.matches(alert(name="web-canary"))  # excluded although everything else fits
    assert not f.matches(alert(image="redis:debug"))
    assert not f.matches(alert(kind="novel"))
    assert not f.matches(alert(severity="low"))
    assert not f.matches(alert(image="postgres:16", image_id=None))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"kinds": ["drift", "drfit"]}, "kinds[1]: unknown kind 'drfit'; allowed: drift, novel, "
                                    "anomaly"),
    ({"min_severity": "severe"}, "min_severity: unknown severity 'severe'; allowed: low, medium, "
                                 "high, critical"),
    ({"namespaces": ["prod", " "]}, "namespaces[1]: empty value; leave the list empty to match "
                                    "any"),
    ({"containers": [7]}, "containers[0]: must be a string, got int"),
    ({"actions": "some"}, "actions: unknown value 'some'; allowed: matching, all, none"),
])
def test_filter_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(FilterError) as info:
        SubscriberFilter(**kwargs)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError) and isinstance(info.value, UsageError)


def test_the_matching_rules_are_the_stores_alert_filter() -> None:
    # one definition (store.AlertFilter); test_collector_store runs one table through both
    f = SubscriberFilter(kinds=["DRIFT"], min_severity=" ", containers=[" web "],
                         images=["nginx"])
    assert f.alert_filter == AlertFilter(kinds=("drift",), containers=("web",),
                                         images=("nginx",))
    assert (f.unfiltered, SubscriberFilter(min_severity="").unfiltered) == (False, True)


def test_a_lone_string_is_one_value() -> None:
    assert SubscriberFilter(namespaces="prod").matches(alert())
    assert not SubscriberFilter(namespaces="prod").matches(alert(namespace="p"))


# -- hub -----------------------------------------------------------------------------------------


def test_publish_goes_to_matching_subscribers_only() -> None:
    hub = FanoutHub()
    everything = hub.subscribe(name="all")
    drift = hub.subscribe(SubscriberFilter(kinds=["drift"]), name="drift")
    edge = hub.subscribe(SubscriberFilter(nodes=["edge-1"]), name="edge")
    a, n = alert(1), alert(2, kind="novel")
    assert hub.publish(a) == 2
    assert hub.publish(n) == 1
    assert drain(everything) == [("alert", a), ("alert", n)]
    assert drain(drift) == [("alert", a)]
    assert drain(edge) == []
    stats = hub.stats()
    assert {k: v for k, v in stats.items() if k != "per_subscriber"} == {
        "subscribers": 3, "published": 2, "events": 0, "delivered": 3, "dropped": 0}
    assert stats["per_subscriber"] == [
        {"id": everything.id, "name": "all", "max_queue": 1000, "pending": 0, "matched": 2,
         "delivered": 2, "dropped": 0},
        {"id": drift.id, "name": "drift", "max_queue": 1000, "pending": 0, "matched": 1,
         "delivered": 1, "dropped": 0},
        {"id": edge.id, "name": "edge", "max_queue": 1000, "pending": 0, "matched": 0,
         "delivered": 0, "dropped": 0},
    ]


def test_overflow_drops_and_notice_marks_the_gap() -> None:
    hub = FanoutHub()
    sub = hub.subscribe(max_queue=3)
    alerts = [alert(i) for i in range(20)]
    assert [hub.publish(a) for a in alerts[:10]] == [1, 1, 1] + [0] * 7
    assert sub.get(timeout=0) == ("alert", alerts[0])
    hub.publish(alerts[10])  # room for one again: queued after the gap
    assert sub.pending == 3
    assert drain(sub) == [
        ("alert", alerts[1]),
        ("alert", alerts[2]),
        ("notice", {"dropped": 7, "total_dropped": 7,
                    "text": "7 items dropped here: this subscriber fell behind and its queue "
                            "(3 items) was full"}),
        ("alert", alerts[10]),
    ]
    for a in alerts[11:20]:  # 3 fit, 6 dropped: a second notice with its own count
        hub.publish(a)
    items = drain(sub)
    assert items[:3] == [("alert", a) for a in alerts[11:14]]
    assert items[3][0] == "notice"
    assert (items[3][1]["dropped"], items[3][1]["total_dropped"]) == (6, 13)
    assert len(items) == 4
    assert sub.stats() == {"id": sub.id, "name": "", "max_queue": 3, "pending": 0,
                           "matched": 20, "delivered": 7, "dropped": 13}


def test_slow_subscriber_does_not_affect_a_fast_one() -> None:
    hub = FanoutHub()
    slow = hub.subscribe(max_queue=100, name="slow")  # never reads while publishing
    fast = hub.subscribe(max_queue=10_000, name="fast")
    received: list[tuple[str, Any]] = []

    def read_fast() -> None:
        for item in fast:
            received.append(item)
            if len(received) == 10_000:
                return

    def publish_all() -> None:
        for i in range(10_000):
            hub.publish(alert(i))

    reader = threading.Thread(target=read_fast)
    publisher = threading.Thread(target=publish_all)
    reader.start()
    publisher.start()
    publisher.join(timeout=120)
    reader.join(timeout=120)
    assert not publisher.is_alive() and not reader.is_alive()  # nobody blocked
    assert [kind for kind, _ in received] == ["alert"] * 10_000
    assert [a["time"] for _, a in received] == [float(i) for i in range(10_000)]
    slow_items = drain(slow)
    assert [a["time"] for _, a in slow_items[:100]] == [float(i) for i in range(100)]
    assert slow_items[100][0] == "notice" and slow_items[100][1]["dropped"] == 9_900
    assert len(slow_items) == 101
    stats = hub.stats()
    assert (stats["published"], stats["delivered"], stats["dropped"]) == (10_000, 10_100, 9_900)


def test_unsubscribe() -> None:
    hub = FanoutHub()
    with hub.subscribe(name="a") as a:
        b = hub.subscribe(name="b")
        hub.publish(alert(1))
        assert a.get(timeout=0) == ("alert", alert(1))
        hub.publish(alert(2))  # left queued in a when it closes
    assert a.closed and len(hub) == 1
    assert a.discarded == 1
    assert hub.publish(alert(3)) == 1
    assert a.get(timeout=0) is None
    assert [x["time"] for _, x in drain(b)] == [1.0, 2.0, 3.0]
    b.close()
    b.close()  # idempotent
    stats = hub.stats()
    # totals keep what closed subscriptions delivered
    assert {k: v for k, v in stats.items() if k != "per_subscriber"} == {
        "subscribers": 0, "published": 3, "events": 0, "delivered": 4, "dropped": 0}


def test_close_wakes_a_blocked_get_and_ends_iteration() -> None:
    hub = FanoutHub()
    sub = hub.subscribe()
    other = hub.subscribe()
    results: list[Any] = []
    iterated: list[Any] = []
    waiting = threading.Event()

    def blocked_get() -> None:
        waiting.set()
        results.append(sub.get())  # no timeout: only close can end it

    def iterate() -> None:
        iterated.extend(other)

    threads = [threading.Thread(target=blocked_get), threading.Thread(target=iterate)]
    for t in threads:
        t.start()
    waiting.wait()
    hub.close()
    for t in threads:
        t.join(timeout=60)
    assert [t.is_alive() for t in threads] == [False, False]
    assert results == [None] and iterated == []
    assert sub.closed and other.closed and len(hub) == 0
    assert hub.publish(alert()) == 0
    with pytest.raises(RuntimeError, match="closed"):
        hub.subscribe()


def test_get_timeout_and_stop_callback() -> None:
    hub = FanoutHub()
    sub = hub.subscribe()
    assert sub.get(timeout=0.01) is None
    assert not sub.closed
    hub.publish(alert(1))
    stops = iter([False, False, True])
    assert list(sub.items(poll_seconds=0.01, stop=lambda: next(stops))) == [("alert", alert(1))]


def test_action_events_follow_the_filter() -> None:
    hub = FanoutHub()
    matching = hub.subscribe(SubscriberFilter(namespaces=["prod"]), name="prod")
    unfiltered = hub.subscribe(name="unfiltered")
    every = hub.subscribe(SubscriberFilter(namespaces=["dev"], actions="all"), name="all")
    quiet = hub.subscribe(SubscriberFilter(actions="none"), name="quiet")
    prod_alert, dev_alert = alert(1), alert(2, namespace="dev")
    taken = {"action": "quarantine", "container": CID, "reason": "rule r: quarantine"}
    assert hub.publish_event("taken", taken, match_alert=prod_alert) == 3
    assert hub.publish_event("skipped", {"action": "kill"}, match_alert=dev_alert) == 2
    assert hub.publish_event("failed", {"action": "pause"}) == 2  # no related alert
    event = ("action", {"event": "taken", **taken})
    assert drain(matching) == [event]
    assert drain(unfiltered) == [event, ("action", {"event": "skipped", "action": "kill"}),
                                 ("action", {"event": "failed", "action": "pause"})]
    assert [x[1]["event"] for x in drain(every)] == ["taken", "skipped", "failed"]
    assert drain(quiet) == []
    assert hub.stats()["events"] == 3
    with pytest.raises(ValueError, match="conflicts"):
        hub.publish_event("taken", {"event": "failed"})


def test_action_events_count_against_the_queue() -> None:
    hub = FanoutHub()
    sub = hub.subscribe(max_queue=1)
    hub.publish(alert(1))
    hub.publish_event("taken", {"action": "kill"}, match_alert=alert(1))
    assert drain(sub)[1] == ("notice", {
        "dropped": 1, "total_dropped": 1,
        "text": "1 item dropped here: this subscriber fell behind and its queue (1 item) "
                "was full"})


def test_bad_max_queue() -> None:
    with pytest.raises(ValueError, match="max_queue must be >= 1, got 0"):
        FanoutHub().subscribe(max_queue=0)
