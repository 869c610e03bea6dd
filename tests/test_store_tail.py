"""The store tail (collector/tail.py) and batched subscriptions, on both store backends: what
this replica stores is published from memory in store order, a change stored elsewhere (another
replica, or a hole before this replica's own) is read from the store, each exactly once; a
subscription hands out what is queued in batches with its overflow notice where the gap is."""

from __future__ import annotations

from driftwarden.collector.fanout import FanoutHub, SubscriberFilter
from driftwarden.collector.servicers import _events
from driftwarden.collector.tail import StoreTail, published_alert
from driftwarden.core import wire
from driftwarden.proto.v1 import alerts_pb2

from tests.support.fake_agent import make_alert


def doc(key: str, node: str = "node-a", **kw) -> dict:
    return wire.alert_dict_from_proto(make_alert(key, node=node, **kw))


def drain(sub) -> list[tuple[str, int]]:
    out = []
    while (item := sub.get(0.0)) is not None:
        out.append((item[1]["id"], item[1].seq))
    return out


def test_own_changes_are_published_from_memory_and_a_hole_is_read_from_the_store(open_store):
    with open_store() as store:
        hub = FanoutHub()
        tail = StoreTail(store, hub, poll_seconds=3600.0).start()
        try:
            sub, start = tail.subscribe(None, 100)
            assert start == 0
            a, b = doc("a"), doc("b")
            (_, seq_a), (_, seq_b) = store.store_alerts([a, b])
            tail.stored([published_alert(seq_a, a), published_alert(seq_b, b)])
            assert drain(sub) == [(a["id"], 1), (b["id"], 2)]
            assert tail.read_count == 0  # from memory
            # another writer stores c (seq 3), then this replica d (seq 4): the hole before d
            # is read from the store, c first
            c, d = doc("c"), doc("d")
            store.insert_alerts([c])
            [(_, seq_d)] = store.store_alerts([d])
            tail.stored([published_alert(seq_d, d)])
            assert drain(sub) == [(c["id"], 3), (d["id"], 4)]
            assert tail.read_count == 1
            # an update is a change: the alert again, with its new count, at the next seq
            [(outcome, seq)] = store.store_alerts([doc("a", count=2, last_seen=1_700_000_009.0)])
            assert (outcome.value, seq) == ("updated", 5)
            tail.wake()  # as another replica's announcement would
            sub_item = sub.get(5.0)
            assert (sub_item[1]["id"], sub_item[1]["count"], sub_item[1].seq) == (a["id"], 3, 5)
            event = sub_item[1].event
            assert (event.alert.count, event.resume_token) == (3, "5")
            # a subscriber joining now starts at the cursor
            later, start = tail.subscribe(None, 100)
            assert start == 5
            assert store.alerts_after(3) == [(4, store.get_alert(d["id"])),
                                             (5, store.get_alert(a["id"]))]
            later.close()
        finally:
            tail.stop()
            hub.close()


def test_a_reader_takes_what_is_queued_in_batches_with_the_notice_where_the_gap_is():
    hub = FanoutHub()
    sub = hub.subscribe(SubscriberFilter(), max_queue=3)
    docs = [doc(f"x{i}") for i in range(5)]
    for i, d in enumerate(docs):
        hub.publish(published_alert(i + 1, d))  # x3, x4 do not fit: one gap of 2
    request = alerts_pb2.SubscribeRequest(include_notices=True, max_batch=100)
    events = []
    for event in _events(sub, request, None, 0.01, lambda: True, lambda _: None):
        events.append(event)
        if len(events) == 2:
            break
    assert [e.WhichOneof("event") for e in events] == ["batch", "notice"]
    assert [a.id for a in events[0].batch.alerts] == [d["id"] for d in docs[:3]]
    assert (events[0].resume_token, events[1].notice.dropped) == ("3", 2)
    # one alert per event without max_batch; the ones already sent (skip_through) are not
    hub.publish(published_alert(6, docs[0]))
    hub.publish(published_alert(7, docs[1]))
    single = alerts_pb2.SubscribeRequest()
    got = next(iter(_events(sub, single, None, 0.01, lambda: True, lambda _: None, 6)))
    assert (got.WhichOneof("event"), got.alert.id, got.resume_token) == (
        "alert", docs[1]["id"], "7")
    hub.close()


def test_an_alert_that_cannot_be_sent_is_skipped_and_the_stream_goes_on(open_store):
    with open_store() as store:
        hub = FanoutHub()
        tail = StoreTail(store, hub, poll_seconds=3600.0).start()
        try:
            sub, _ = tail.subscribe(None, 100)
            bad, good = {**doc("bad"), "reasons": 7}, doc("good")  # the store keeps any reasons
            store.insert_alerts([bad, good])
            tail.catch_up()
            assert drain(sub) == [(good["id"], 2)]
            assert tail.cursor == 2
        finally:
            tail.stop()
            hub.close()
