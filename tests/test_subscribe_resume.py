"""Alerts.Subscribe's resume token and batches, on a real collector (SQLite, and PostgreSQL with
replicas) over real gRPC: a subscriber whose collector stopped resumes with its last token and
gets every alert stored meanwhile exactly once, in store order, then live ones; `driftwarden
alerts --follow` does it by itself across a collector restart."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator

import grpc
import pytest
from driftwarden.collector.policy import parse_policy
from driftwarden.collector.server import CollectorConfig, CollectorServer
from driftwarden.ops.command import add_parsers, run_alerts
from driftwarden.proto.v1 import alerts_pb2, alerts_pb2_grpc

from tests.support.fake_agent import FakeAgent, hello, make_alert
from tests.support.scenario import wait_until
from tests.support.subscriber import alert_events, subscribe
from tests.support.terminal import Tap

NO_RULES = parse_policy("version: 1\n")


@pytest.fixture(params=["sqlite", "postgresql"])
def collectors(request, tmp_path) -> Iterator:
    """start(**config) -> a started collector on this test's store: the same SQLite file (a
    restart), or another replica on the same PostgreSQL database. All stopped at the end."""
    started: list[CollectorServer] = []
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            store = {"db_path": tmp_path / "collector.db"}
        else:
            url = stack.enter_context(request.getfixturevalue("postgres").database())
            store = {"db_path": None, "store_url": url}

        def start(**overrides) -> CollectorServer:
            settings = {**store, "listen": "127.0.0.1:0", "stop_grace": 0.5,
                        "poll_seconds": 0.05, "policy": NO_RULES, **overrides}
            server = CollectorServer(CollectorConfig(**settings)).start()
            started.append(server)
            return server

        try:
            yield start
        finally:
            for server in started:
                server.stop(0.5)


def events_of(call, n: int) -> list[tuple[list[str], str]]:
    """The next `n` events as (alert ids, resume token)."""
    return [([a.id for a in alerts], token) for alerts, token in alert_events(call, n)]


def send(channel: grpc.Channel, node: str, keys: list[str]) -> list[str]:
    agent = FakeAgent(channel)
    agent.send(hello=hello(node))
    alerts = [make_alert(k, name=f"web-{node}") for k in keys]
    agent.send_alerts(alerts)
    agent.recv_kind("ack")
    agent.close()
    return [a.id for a in alerts]


def test_a_subscriber_resumes_after_its_collector_stopped_with_nothing_missed_or_repeated(
        collectors, channels):
    first = collectors()
    call, start = subscribe(channels(first))
    early = send(channels(first), "node-a", ["a1", "a2", "a3"])
    got = events_of(call, 3)
    assert got == [([early[i]], str(int(start) + i + 1)) for i in range(3)]
    token = got[-1][1]
    first.stop(0.5)
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    second = collectors()  # SQLite: the restart; PostgreSQL: another replica
    meanwhile = send(channels(second), "node-a", ["a4", "a5", "a6"])
    resumed, _ = subscribe(channels(second), resume_after=token)
    assert [ids for ids, _ in events_of(resumed, 3)] == [[i] for i in meanwhile]
    live = send(channels(second), "node-a", ["a7"])
    assert events_of(resumed, 1) == [(live, str(int(token) + 4))]


def test_resuming_applies_the_filter_and_batches(collectors, channels):
    server = collectors()
    channel = channels(server)
    a_ids = send(channel, "node-a", ["a1", "a2"])
    b_ids = send(channel, "node-b", ["b1", "b2", "b3"])
    call, start = subscribe(channel, resume_after="0", max_batch=2,
                            filter=alerts_pb2.AlertFilter(nodes=["node-b"]))
    assert start == "5"
    assert events_of(call, 2) == [(b_ids[:2], "4"), (b_ids[2:], "5")]
    send(channel, "node-a", ["a3"])  # filtered out
    live = send(channel, "node-b", ["b4"])
    assert events_of(call, 1) == [(live, "7")]
    # from a token: only what came after it
    call, _ = subscribe(channel, resume_after="2")
    assert [ids for ids, _ in events_of(call, 3)] == [[i] for i in b_ids]
    assert a_ids  # stored before the token: not sent again


def test_bad_resume_tokens_and_batch_sizes_are_refused_and_a_foreign_token_follows_from_now(
        collectors, channels):
    channel = channels(collectors())
    for request, text in (
            ({"resume_after": "abc"},
             "resume_after: expected the resume_token of an AlertEvent (digits), got 'abc'"),
            ({"max_batch": 1001}, "max_batch: at most 1000 alerts per event, got 1001")):
        call, _ = None, None
        with pytest.raises(grpc.RpcError) as info:
            call = alerts_pb2_grpc.AlertsStub(channel).Subscribe(
                alerts_pb2.SubscribeRequest(**request))
            next(call)
        assert (info.value.code(), info.value.details()) == (
            grpc.StatusCode.INVALID_ARGUMENT, text)
    send(channel, "node-a", ["a1"])
    call, _ = subscribe(channel, resume_after="99999")  # another store's token
    live = send(channel, "node-a", ["a2"])
    assert events_of(call, 1) == [(live, "2")]


def _parse(*argv: str):
    import argparse

    parser = argparse.ArgumentParser(prog="driftwarden")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(list(argv))


def test_alerts_follow_resumes_after_a_collector_restart(tmp_path, channels):
    db = tmp_path / "collector.db"
    first = CollectorServer(CollectorConfig(db_path=db, listen="127.0.0.1:0", stop_grace=0.5,
                                            policy=NO_RULES)).start()
    address = first.address
    out, err, stop = Tap(), Tap(), threading.Event()
    result: list[int] = []
    follower = threading.Thread(target=lambda: result.append(run_alerts(
        _parse("alerts", "-f", "--json", "--collector", address), out=out, err=err,
        stop=stop)), daemon=True)
    follower.start()
    second = None
    try:
        wait_until(lambda: len(first.hub) == 1, 10, "the follower's subscription")
        ids = send(channels(first), "node-a", ["a1"])
        assert out.wait_lines(1)
        first.stop(0.5)
        assert err.wait_for("lost the collector")
        # stored while the follower was away: the new collector has them, and the follower
        # gets them when it resubscribes with its token
        second = CollectorServer(CollectorConfig(db_path=db, listen=address, stop_grace=0.5,
                                                 policy=NO_RULES)).start()
        ids += send(channels(second), "node-a", ["a2", "a3"])
        assert err.wait_for("reconnected")
        ids += send(channels(second), "node-a", ["a4"])
        assert out.wait_lines(4)
    finally:
        stop.set()
        follower.join(10)
        if second is not None:
            second.stop(0.5)
        first.stop(0.5)
    assert result == [0]
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == ids
    assert f"reconnected to {address}; alerts stored since " in err.getvalue()
