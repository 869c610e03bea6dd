"""The agent's several collector addresses: `--collector` parsing (repeated and comma-separated,
each address under the single address's rules) and the channel's failover between collectors,
on real gRPC over 127.0.0.1 against tests/support/fake_collector (a replica that stops is a
fake that stops). tests/test_agent_failover.py runs the real processes on a real PostgreSQL."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from driftwarden.agent import command as agent_cmd
from driftwarden.agent import doctor
from driftwarden.agent.channel import ChannelConfig, CollectorChannel
from driftwarden.cli.main import build_parser
from driftwarden.core.errors import UsageError
from driftwarden.core.metrics import MetricsRegistry

from tests.support.fake_collector import FakeCollector
from tests.test_channel import config, free_port, make_alert, spooled_ids, wait_until

NODE = "node-1"


def agent_options(*argv: str) -> agent_cmd.AgentOptions:
    """The options of `driftwarden agent --state-dir /tmp/s ARGV`, through the real CLI."""
    return agent_cmd.options_from_args(build_parser().parse_args(
        ["agent", "--state-dir", "/tmp/s", "--node", NODE, *argv]))


# -- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "address", "failover"), [
    (["--collector", "127.0.0.1:50051"], "127.0.0.1:50051", ()),
    (["--collector", "127.0.0.1:1,127.0.0.1:2"], "127.0.0.1:1", ("127.0.0.1:2",)),
    (["--collector", "127.0.0.1:1", "--collector", "[::1]:2"], "127.0.0.1:1", ("[::1]:2",)),
    (["--collector", " 127.0.0.1:1 , localhost:2", "--collector", "127.0.0.3:3"],
     "127.0.0.1:1", ("localhost:2", "127.0.0.3:3")),
])
def test_collector_addresses_repeated_or_comma_separated_keep_their_order(argv, address,
                                                                          failover):
    config_ = agent_cmd.channel_config(agent_options(*argv))
    assert (config_.address, config_.failover) == (address, failover)
    assert config_.addresses == (address, *failover)


@pytest.mark.parametrize(("argv", "message"), [
    (["--collector", "127.0.0.1:1,"],
     "--collector '127.0.0.1:1,': an empty address in the list; give HOST:PORT,HOST:PORT "
     "(e.g. 127.0.0.1:50051,127.0.0.1:50052)"),
    (["--collector", "127.0.0.1:1,,127.0.0.1:2"],
     "--collector '127.0.0.1:1,,127.0.0.1:2': an empty address in the list; give "
     "HOST:PORT,HOST:PORT (e.g. 127.0.0.1:50051,127.0.0.1:50052)"),
    (["--collector", "127.0.0.1:1", "--collector", "127.0.0.1:1"],
     "--collector '127.0.0.1:1,127.0.0.1:1': 127.0.0.1:1 is given twice; give each collector "
     "once"),
    # every address passes the loopback rule of a single one, not only the first
    (["--collector", "127.0.0.1:1,10.0.0.5:50051"],
     "--collector '10.0.0.5:50051': 10.0.0.5 is not a loopback address; this build talks to "
     "127.0.0.0/8, ::1 and localhost only (pass --allow-non-loopback for a real deployment, "
     "with TLS: the --tls-* flags)"),
    (["--collector", "127.0.0.1:1", "--collector", "collector.example:50051"],
     "--collector 'collector.example:50051': collector.example is not a loopback address; "
     "this build talks to 127.0.0.0/8, ::1 and localhost only (pass --allow-non-loopback for a "
     "real deployment, with TLS: the --tls-* flags)"),
    (["--collector", "127.0.0.1:1,10.0.0.5:50051", "--allow-non-loopback"],
     "--collector 10.0.0.5:50051: alerts would cross the network in plain text; give "
     "--tls-cert, --tls-key and --tls-ca"),
    (["--collector", "127.0.0.1:1,dns:///x:2"],
     "--collector 'dns:///x:2': a URI, not an address; expected HOST:PORT (e.g. "
     "127.0.0.1:50051 or [::1]:50051)"),
    (["--collector", "127.0.0.1:1,127.0.0.1"],
     "--collector '127.0.0.1': no port; expected HOST:PORT (e.g. 127.0.0.1:50051 or "
     "[::1]:50051)"),
])
def test_a_bad_address_anywhere_in_the_list_is_one_line_naming_it(argv, message):
    with pytest.raises(UsageError) as info:
        agent_cmd.channel_config(agent_options(*argv))
    assert str(info.value) == message


def test_non_loopback_replicas_are_taken_with_allow_non_loopback_and_tls(tmp_path):
    from driftwarden.ops.certs import init_certs

    bundle = init_certs(tmp_path / "certs", [NODE], collector_names=["collector.example"])
    pair = bundle.agent(NODE)
    config_ = agent_cmd.channel_config(agent_options(
        "--collector", "dw-0.collector.example:50051,dw-1.collector.example:50051",
        "--allow-non-loopback", "--tls-ca", str(bundle.ca_cert), "--tls-cert", str(pair.cert),
        "--tls-key", str(pair.key)))
    assert config_.addresses == ("dw-0.collector.example:50051", "dw-1.collector.example:50051")


def test_a_channel_config_refuses_an_address_given_twice():
    with pytest.raises(UsageError, match="one is given twice"):
        ChannelConfig(address="127.0.0.1:1", failover=("127.0.0.1:1",), node=NODE)
    with pytest.raises(UsageError, match="a collector address is empty"):
        ChannelConfig(address="127.0.0.1:1", failover=("",), node=NODE)
    with pytest.raises(UsageError, match=r"^keepalive_seconds must be > 0, got 0$"):
        ChannelConfig(address="127.0.0.1:1", node=NODE, keepalive_seconds=0)


# -- failover ----------------------------------------------------------------------------------


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "spool"


def batch_ids(collector: FakeCollector) -> list[str]:
    return collector.alert_ids()


def test_a_stopped_collector_fails_over_to_the_next_which_gets_every_unacked_alert(
        spool_dir, caplog):
    caplog.set_level(logging.INFO, logger="driftwarden.agent.channel")
    first = [make_alert(n) for n in range(5)]
    later = [make_alert(n) for n in range(5, 9)]
    a = FakeCollector(ack=False).start()
    b = FakeCollector().start()
    try:
        cfg = config(a.address, failover=(b.address,))
        with CollectorChannel(cfg, spool_dir) as channel:
            registry = MetricsRegistry()
            agent_cmd.register_metrics(registry, _NoProbes(), agent_cmd.AlertCounter(channel),
                                       channel)
            for alert in first:
                channel.emit(alert)
            assert a.wait_for(lambda: len(a.alert_ids()) == 5)
            assert channel.collector == a.address
            assert _connected_gauge(registry) == {a.address: 1.0, b.address: 0.0}
            a.stop()  # five alerts in flight, none acknowledged
            for alert in later:
                channel.emit(alert)
            assert channel.wait_idle(15)
            stats = channel.stats
            gauge = _connected_gauge(registry)
            failovers = registry.sample("driftwarden_agent_collector_failovers_total")
        assert (stats.collector, stats.failovers, stats.acked, stats.spool_depth) == (
            b.address, 1, 9, 0)
        assert gauge == {a.address: 0.0, b.address: 1.0}
        assert failovers == 1
        # the new collector got hello and a heartbeat first, then the replay in spool order
        [stream] = b.streams
        assert stream.bodies()[:2] == ["hello", "heartbeat"]
        assert b.alert_ids() == [x.id for x in first + later]
        assert a.alert_ids() == [x.id for x in first]
        assert a.invalid() == b.invalid() == []
    finally:
        a.stop()
        b.stop()
    assert spooled_ids(spool_dir) == []
    lines = [r.getMessage() for r in caplog.records]
    [outage] = [line for line in lines if "alerts stay in the spool" in line]
    assert re.fullmatch(rf"collector {a.address}: UNAVAILABLE: .*; alerts stay in the spool "
                        rf"\(\d+ pending\) and the agent keeps redialing; trying "
                        rf"{b.address} next", outage), outage
    [back] = [line for line in lines if "connected again" in line]
    assert re.fullmatch(rf"collector {b.address}: connected again after [0-9.]+ s \(collector "
                        rf"2 of 2\); \d+ alerts still spooled", back), back


def test_an_unreachable_first_address_is_skipped_for_the_reachable_one(spool_dir):
    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    alerts = [make_alert(n) for n in range(3)]
    with FakeCollector() as b:
        with CollectorChannel(config(nobody, failover=(b.address,)), spool_dir) as channel:
            for alert in alerts:
                channel.emit(alert)
            assert channel.wait_idle(15)
            stats = channel.stats
        assert (stats.collector, stats.failovers, stats.streams) == (b.address, 1, 2)
        assert stats.last_error is not None and stats.last_error.startswith("UNAVAILABLE")
        assert b.alert_ids() == [x.id for x in alerts]
    assert spooled_ids(spool_dir) == []


def test_with_every_collector_down_the_agent_alternates_them_with_a_growing_backoff(
        spool_dir, caplog):
    caplog.set_level(logging.DEBUG, logger="driftwarden.agent.channel")
    a, b = (f"127.0.0.1:{free_port()}" for _ in range(2))
    cfg = config(a, failover=(b,), backoff_initial=0.02, backoff_max=0.16)
    with CollectorChannel(cfg, spool_dir) as channel:
        channel.emit(make_alert(1))
        assert wait_until(lambda: channel.stats.failures_in_row >= 6)
        stats = channel.stats
    assert stats.collector is None and stats.spool_depth == 1
    assert stats.backoff_seconds == 0.16  # doubled per failure up to the maximum
    tried = [r.getMessage().split(" ", 2)[1].rstrip(":") for r in caplog.records
             if r.getMessage().startswith("collector 127.0.0.1:")
             and ("still unavailable" in r.getMessage()
                  or "alerts stay in the spool" in r.getMessage())]
    assert tried[:6] == [a, b, a, b, a, b]
    # one warning for the outage, not one per try
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert spooled_ids(spool_dir) == ["1".rjust(24, "0")]


def test_the_agent_stays_on_the_collector_that_works(spool_dir):
    """After failing over to B, A coming back does not pull the agent away from B."""
    a = FakeCollector().start()
    b = FakeCollector().start()
    try:
        with CollectorChannel(config(a.address, failover=(b.address,)), spool_dir) as channel:
            channel.emit(make_alert(1))
            assert channel.wait_idle(10)
            a.stop()
            assert wait_until(lambda: channel.collector == b.address)
            a.start()  # the same port
            channel.emit(make_alert(2))
            assert channel.wait_idle(10)
            assert channel.collector == b.address
            assert channel.stats.failovers == 1
        assert (a.alert_ids(), b.alert_ids()) == ([make_alert(1).id], [make_alert(2).id])
    finally:
        a.stop()
        b.stop()


class _NoProbes:
    def counters(self) -> dict[str, dict[str, int]]:
        return {}


def _connected_gauge(registry: MetricsRegistry) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["address"]: s.value
            for f in text_string_to_metric_families(registry.render())
            if f.name == "driftwarden_agent_collector_address_connected" for s in f.samples}


# -- doctor --collector ------------------------------------------------------------------------


class HealthOnly:
    """A gRPC server on 127.0.0.1 with only the health service, reporting `status` for the
    agents' service (what `doctor --collector` asks a collector)."""

    def __init__(self, status: int) -> None:
        from concurrent import futures

        import grpc
        from grpc_health.v1 import health, health_pb2_grpc

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        servicer = health.HealthServicer()
        servicer.set(doctor.AGENT_SERVICE, status)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> HealthOnly:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop(None).wait()


def doctor_rows(*argv: str) -> list[tuple[str, bool, str, str]]:
    args = build_parser().parse_args(["doctor", "--no-load-tests", *argv])
    collectors, tls = doctor._collector_flags(args)
    env = doctor.DoctorEnv(collectors=collectors, collector_tls=tls)
    return [(c.name, c.required, c.status, c.detail) for c in doctor.check_collectors(env)]


def test_doctor_says_which_collector_an_agent_would_stream_to():
    from grpc_health.v1 import health_pb2

    nobody = f"127.0.0.1:{free_port()}"
    with HealthOnly(health_pb2.HealthCheckResponse.SERVING) as live, \
            HealthOnly(health_pb2.HealthCheckResponse.NOT_SERVING) as draining:
        rows = doctor_rows("--collector", f"{nobody},{draining.address}",
                           "--collector", live.address)
        only_live = doctor_rows("--collector", live.address)
    refused = rows[0][3]
    assert refused.startswith("does not answer (UNAVAILABLE: ")
    assert rows == [
        (f"collector {nobody}", False, "warn", refused),
        (f"collector {draining.address}", False, "warn",
         "answers NOT_SERVING: it takes no agents now"),
        (f"collector {live.address}", False, "ok", "answers SERVING (plaintext)"),
        ("collector", True, "warn", f"an agent started now streams to {live.address} (3 of 3); "
                                    f"not answering: {nobody}, {draining.address}"),
    ]
    assert only_live == [
        (f"collector {live.address}", False, "ok", "answers SERVING (plaintext)"),
        ("collector", True, "ok", f"an agent started now streams to {live.address}"),
    ]


def test_doctor_fails_when_no_collector_answers_and_checks_addresses_as_the_agent():
    a, b = (f"127.0.0.1:{free_port()}" for _ in range(2))
    rows = doctor_rows("--collector", f"{a},{b}")
    assert rows[-1] == ("collector", True, "fail", "none of the 2 collector address(es) "
                        "answers; the agent would keep its alerts in the spool and redial")
    assert doctor.exit_code(doctor.check_collectors(doctor.DoctorEnv(collectors=(a, b)))) == 1
    with pytest.raises(UsageError, match=r"10\.0\.0\.5 is not a loopback address"):
        doctor_rows("--collector", f"{a},10.0.0.5:50051")
    with pytest.raises(UsageError, match=r"^--tls-ca only make"):
        doctor_rows("--tls-ca", "ca.crt")
