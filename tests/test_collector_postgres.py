"""The collector on a real PostgreSQL server (the session's `postgres` fixture): `driftwarden
collector --store postgresql://...` as a real process stores what an agent sends over gRPC, an
in-process server answers operators from the database, and the flags' errors are one line.
(tests/test_collector_store.py runs every store test on both backends.)"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from driftwarden.collector.command import add_parser, config_from_args
from driftwarden.collector.migrations import SCHEMA_VERSION
from driftwarden.collector.policy import parse_policy
from driftwarden.collector.server import CollectorConfig, CollectorServer
from driftwarden.collector.store_pg import PostgresStore
from driftwarden.core import wire
from driftwarden.core.argtypes import CommandParser
from driftwarden.core.errors import StoreError, UsageError
from driftwarden.proto.v1 import agent_pb2, agent_pb2_grpc, alerts_pb2, alerts_pb2_grpc

from tests.support.collector_proc import LISTENING
from tests.support.fake_agent import FakeAgent, hello, make_alert
from tests.support.processes import FAULTHANDLER_ENV, terminate

NO_RULES = parse_policy("version: 1\n")


def _wait_for_line(log_path, proc: subprocess.Popen, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if LISTENING.search(text):
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    pytest.fail(f"the collector did not start:\n{log_path.read_text(errors='replace')}")


def test_the_collector_process_with_store_postgresql_stores_an_agents_alert(
        postgres, tmp_path, channels):
    now = time.time()  # retention (30 days by default) keeps it
    alert = make_alert("one", when=now, mode="monitor")  # the default policy stays quiet
    with postgres.database() as url:
        log_path = tmp_path / "collector.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "driftwarden", "collector", "--store", url,
                 "--listen", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT, cwd="/",
                env={**os.environ, **FAULTHANDLER_ENV})
        try:
            text = _wait_for_line(log_path, proc)
            assert f"(plaintext, no operator auth), data in {url}\n" in text
            channel = channels(f"127.0.0.1:{LISTENING.search(text).group(1)}")
            agent = FakeAgent(channel)
            agent.send(hello=hello("node-a"))
            agent.send_alerts([alert], [1])
            ack = agent.recv_kind("ack")
            assert (list(ack.alert_ids), list(ack.spool_seqs)) == ([alert.id], [1])
            listed = alerts_pb2_grpc.AlertsStub(channel).List(alerts_pb2.ListAlertsRequest(),
                                                              timeout=5)
            assert [a.id for a in listed.alerts] == [alert.id]
            agent.close()
        finally:
            code = terminate(proc, 20.0, "collector", lambda: log_path.read_text())
        assert code == 0
        # what the process stored is in the database, read by a store of the test's own
        with PostgresStore.open(url) as store:
            assert store.get_alert(alert.id) == wire.alert_dict_from_proto(
                make_alert("one", when=now, mode="monitor", node="node-a"))
            assert [(a.node, a.connected) for a in store.list_agents()] == [("node-a", False)]


def test_an_in_process_collector_on_postgres_serves_agents_and_operators(
        postgres, make_server, channels):
    with postgres.database() as url:
        server = make_server(db_path=None, store_url=url, policy=NO_RULES)
        assert server.store.path == url
        channel = channels(server)
        agent = FakeAgent(channel)
        agent.send(hello=hello("node-a"))
        alerts = [make_alert("one", when=100.0), make_alert("two", when=200.0)]
        agent.send_alerts(alerts, [1, 2])
        agent.recv_kind("ack")
        agent.send_alerts(alerts, [3, 4])  # a replay: stored once
        agent.recv_kind("ack")
        listed = alerts_pb2_grpc.AlertsStub(channel).List(alerts_pb2.ListAlertsRequest(),
                                                          timeout=5)
        assert [a.id for a in listed.alerts] == [alerts[1].id, alerts[0].id]
        agents = agent_pb2_grpc.AgentsStub(channel).List(agent_pb2.ListAgentsRequest(),
                                                         timeout=5)
        assert [(a.node, a.connected) for a in agents.agents] == [("node-a", True)]
        assert server.store.stats()["alerts"] == 2


def _parser() -> CommandParser:
    parser = CommandParser(prog="driftwarden")
    add_parser(parser.add_subparsers(dest="command", parser_class=CommandParser))
    return parser


def test_store_and_db_flags_are_exclusive_and_checked(tmp_path, capsys):
    parser = _parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["collector", "--db", "x.db", "--store", "postgresql://u@h/db"])
    assert capsys.readouterr().err == (
        "driftwarden collector: error: argument --store: not allowed with argument --db "
        "(see `driftwarden collector --help`)\n")
    with pytest.raises(SystemExit):
        parser.parse_args(["collector"])
    assert "one of the arguments --db --store is required" in capsys.readouterr().err
    with pytest.raises(UsageError) as info:
        config_from_args(parser.parse_args(["collector", "--store", "mysql://u:pw@h/db"]))
    assert str(info.value) == ("--store mysql://u:***@h/db: give a PostgreSQL URL, "
                               "postgresql://USER@HOST:PORT/DB")
    with pytest.raises(UsageError, match=r"^--db and --store are exclusive"):
        CollectorConfig(db_path=tmp_path / "c.db", store_url="postgresql://u@h/db")
    config = config_from_args(parser.parse_args(
        ["collector", "--store", "postgresql://alice:s3cret@127.0.0.1:5432/dw"]))
    assert (config.db_path, config.data_location) == (
        None, "postgresql://alice:***@127.0.0.1:5432/dw")


def test_a_database_that_cannot_be_reached_fails_the_start_in_one_line(postgres):
    missing = postgres.url("no_such_db")
    with pytest.raises(StoreError) as info:
        CollectorServer(CollectorConfig(db_path=None, store_url=missing,
                                        listen="127.0.0.1:0")).start()
    assert str(info.value).startswith(f"cannot open store {missing}: ")
    assert 'database "no_such_db" does not exist' in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(StoreError) as info:  # nothing listens on port 1
        PostgresStore.open("postgresql://alice:s3cret@127.0.0.1:1/dw")
    assert "s3cret" not in str(info.value)
    assert str(info.value).startswith("cannot open store postgresql://alice:***@127.0.0.1:1/dw: ")
    assert str(info.value).endswith("(is the server running, and does the database exist?)")


def test_collectors_opening_one_new_database_together_migrate_it_once(postgres):
    with postgres.database() as url:
        start = threading.Barrier(4)

        def open_together(_: int) -> PostgresStore:
            start.wait()
            return PostgresStore.open(url)

        with ThreadPoolExecutor(4) as pool:
            opened = list(pool.map(open_together, range(4)))
        try:
            with opened[0]._read() as conn:
                versions = [r[0] for r in conn.execute(
                    "SELECT version FROM schema_version ORDER BY version").fetchall()]
            assert versions == list(range(1, SCHEMA_VERSION + 1))
        finally:
            for store in opened:
                store.close()
