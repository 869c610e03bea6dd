"""The one HOST:PORT parser (core/netaddr.py) through every flag that takes an address: the
agent's --collector and --metrics, the operator's --collector and $DRIFTWARDEN_COLLECTOR, the
collector's --listen and --metrics. Each flag takes the same forms and says the same things in
the same words; what differs is named in the table (default port, port 0, --allow-non-loopback).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from driftwarden.agent.command import AgentOptions, channel_config
from driftwarden.agent.command import parse_metrics_address as agent_metrics_address
from driftwarden.collector.server import CollectorConfig
from driftwarden.core.errors import UsageError
from driftwarden.core.netaddr import host_port, is_loopback, loopback_host, parse_host_port
from driftwarden.core.tls import TlsFiles
from driftwarden.ops.client import add_client_flags, operator_target

ALLOW_HINT = ("pass --allow-non-loopback for a real deployment, with TLS: the --tls-* flags")


def split_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)


def operator_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_client_flags(parser)
    return parser.parse_args(list(argv))


@dataclass(frozen=True)
class Flag:
    """An address flag as a user meets it: how its command reads the text, and its rules."""

    name: str  # what errors call it
    read: Callable[..., tuple[str, int]]  # (text, allow_non_loopback, tmp_path) -> (host, port)
    default_port: int | None = None
    listen: bool = False  # port 0 allowed
    example: int = 50051
    allow_flag: bool = True  # the command has --allow-non-loopback

    def expected_malformed(self, text: str, problem: str) -> str:
        forms = f"HOST:PORT (e.g. 127.0.0.1:{self.example} or [::1]:{self.example}"
        if self.default_port is not None:
            forms += f"; a HOST alone means port {self.default_port}"
        if self.listen:
            forms += "; port 0 picks a free port"
        return f"{self.name} {text!r}: {problem}; expected {forms})"

    def expected_not_loopback(self, text: str, host: str) -> str:
        verb = "listens on" if self.listen else "talks to"
        if not self.allow_flag:
            return (f"{self.name} {text!r}: {host} is not a loopback address; it {verb} "
                    f"127.0.0.0/8, ::1 and localhost only (put a proxy in front to expose it)")
        return (f"{self.name} {text!r}: {host} is not a loopback address; this build {verb} "
                f"127.0.0.0/8, ::1 and localhost only ({ALLOW_HINT})")


def _pem_files(tmp_path: Path) -> Path:
    pem = tmp_path / "x.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    return pem


def agent_collector(text: str, allow: bool, tmp_path: Path) -> tuple[str, int]:
    pem = str(_pem_files(tmp_path))  # beyond loopback the agent needs TLS files
    tls = {"tls_ca": pem, "tls_cert": pem, "tls_key": pem} if allow else {}
    config = channel_config(AgentOptions(state_dir=str(tmp_path), collector=text, node="node-1",
                                         allow_non_loopback=allow, **tls))
    return split_target(config.address)


def operator_collector(text: str, allow: bool, tmp_path: Path) -> tuple[str, int]:
    flags = ["--allow-non-loopback"] if allow else []
    return split_target(operator_target(operator_args("--collector", text, *flags)))


def operator_environment(text: str, allow: bool, tmp_path: Path) -> tuple[str, int]:
    flags = ["--allow-non-loopback"] if allow else []
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DRIFTWARDEN_COLLECTOR", text)
        return split_target(operator_target(operator_args(*flags)))


def collector_listen(text: str, allow: bool, tmp_path: Path) -> tuple[str, int]:
    pem = _pem_files(tmp_path)  # beyond loopback the collector needs TLS files
    tls = TlsFiles(ca=pem, cert=pem, key=pem, ca_flag="--tls-client-ca") if allow else None
    return CollectorConfig(db_path=tmp_path / "c.db", listen=text, allow_non_loopback=allow,
                           tls=tls).listen_address


def collector_metrics(text: str, allow: bool, tmp_path: Path) -> tuple[str, int]:
    config = CollectorConfig(db_path=tmp_path / "c.db", metrics_listen=text,
                             allow_non_loopback=allow)
    assert config.metrics_address is not None
    return config.metrics_address


def agent_metrics(text: str, allow: bool, tmp_path: Path) -> tuple[str, int]:
    return agent_metrics_address(text)  # the agent has no way to allow more


FLAGS = {
    "agent --collector": Flag("--collector", agent_collector),
    "operator --collector": Flag("--collector", operator_collector, default_port=50051),
    "operator $DRIFTWARDEN_COLLECTOR": Flag("$DRIFTWARDEN_COLLECTOR", operator_environment,
                                            default_port=50051),
    "collector --listen": Flag("--listen", collector_listen, listen=True),
    "collector --metrics": Flag("--metrics", collector_metrics, listen=True, example=9464,
                                allow_flag=False),
    "agent --metrics": Flag("--metrics", agent_metrics, listen=True, example=9464,
                            allow_flag=False),
}
ALL = tuple(FLAGS)
CONNECTING = ("agent --collector", "operator --collector", "operator $DRIFTWARDEN_COLLECTOR")
WITH_DEFAULT_PORT = ("operator --collector", "operator $DRIFTWARDEN_COLLECTOR")
LISTENING = ("collector --listen", "collector --metrics", "agent --metrics")
METRICS = ("collector --metrics", "agent --metrics")
ALLOWING = ("agent --collector", "operator --collector", "operator $DRIFTWARDEN_COLLECTOR",
            "collector --listen")

# (text, the flags that take it, what they make of it; metrics make localhost 127.0.0.1)
ACCEPTED = [
    ("127.0.0.1:50051", ALL, ("127.0.0.1", 50051)),
    (" 127.0.0.1:50051 ", ALL, ("127.0.0.1", 50051)),
    ("127.9.8.7:1", ALL, ("127.9.8.7", 1)),
    ("[::1]:50051", ALL, ("::1", 50051)),
    ("localhost:7", ALL, ("localhost", 7)),
    ("LocalHost:65535", ALL, ("LocalHost", 65535)),
    ("127.0.0.1:0", LISTENING, ("127.0.0.1", 0)),
    ("localhost", WITH_DEFAULT_PORT, ("localhost", 50051)),
    ("::1", WITH_DEFAULT_PORT, ("::1", 50051)),
    ("[::1]", WITH_DEFAULT_PORT, ("::1", 50051)),
]
# (text, flags, problem) -> Flag.expected_malformed
MALFORMED = [
    ("", ("collector --listen", "collector --metrics", "agent --metrics"), "empty"),
    ("unix:///run/c.sock", ALL, "a URI, not an address"),
    ("dns:///localhost:50051", ALL, "a URI, not an address"),
    ("http://127.0.0.1:50051", ALL, "a URI, not an address"),
    ("::1:50051", ALL, "an IPv6 address with a port goes in brackets ([::1]:PORT)"),
    ("[::1]50051", ALL, "unbalanced brackets"),
    ("[::1", ALL, "unbalanced brackets"),
    ("[127.0.0.1]:1", ALL, "'127.0.0.1' in brackets is not an IPv6 address"),
    (":50051", ALL, "no host"),
    ("50051", ALL, "a port alone, no host"),
    ("my host:1", ALL, "'my host' is neither an IP address nor a host name"),
    ("127.0.0.256:1", ALL, "'127.0.0.256' is neither an IP address nor a host name"),
    ("127.0.0.1", tuple(f for f in ALL if f not in WITH_DEFAULT_PORT), "no port"),
    ("[::1]", tuple(f for f in ALL if f not in WITH_DEFAULT_PORT), "no port"),
    ("127.0.0.1:", ALL, "port '' is not {lowest}-65535"),
    ("127.0.0.1:http", ALL, "port 'http' is not {lowest}-65535"),
    ("127.0.0.1:65536", ALL, "port '65536' is not {lowest}-65535"),
    ("127.0.0.1:-1", ALL, "port '-1' is not {lowest}-65535"),
    ("127.0.0.1:0", CONNECTING, "port '0' is not 1-65535"),
]
NOT_LOOPBACK = [("10.1.2.3:50051", "10.1.2.3"), ("0.0.0.0:9464", "0.0.0.0"),
                ("[::]:50051", "::"), ("[fd00::1]:50051", "fd00::1"),
                ("collector.example:443", "collector.example")]


def _cases(rows) -> list:
    return [pytest.param(flag, text, *rest, id=f"{flag}: {text!r}")
            for text, flags, *rest in rows for flag in flags]


@pytest.mark.parametrize(("flag", "text", "expected"), _cases(ACCEPTED))
def test_accepted_forms(flag: str, text: str, expected: tuple[str, int], tmp_path: Path) -> None:
    if flag in METRICS and expected[0].lower() == "localhost":
        expected = ("127.0.0.1", expected[1])  # a listener binds one known family
    assert FLAGS[flag].read(text, False, tmp_path) == expected


@pytest.mark.parametrize(("flag", "text", "problem"), _cases(MALFORMED))
def test_malformed_addresses_name_the_flag_and_the_forms(flag: str, text: str, problem: str,
                                                         tmp_path: Path) -> None:
    spec = FLAGS[flag]
    with pytest.raises(UsageError) as info:
        spec.read(text, False, tmp_path)
    problem = problem.format(lowest=0 if spec.listen else 1)
    assert str(info.value) == spec.expected_malformed(text, problem)


@pytest.mark.parametrize(("flag", "text", "host"),
                         _cases([(text, ALL, host) for text, host in NOT_LOOPBACK]))
def test_the_loopback_rule(flag: str, text: str, host: str, tmp_path: Path) -> None:
    spec = FLAGS[flag]
    with pytest.raises(UsageError) as info:
        spec.read(text, False, tmp_path)
    assert str(info.value) == spec.expected_not_loopback(text, host)
    if flag in ALLOWING:  # --allow-non-loopback lets the same text through, as written
        assert spec.read(text, True, tmp_path) == (host, int(text.rpartition(":")[2]))


@pytest.mark.parametrize("flag", METRICS)
def test_metrics_stay_on_loopback_whatever_the_collector_allows(flag: str, tmp_path) -> None:
    with pytest.raises(UsageError) as info:
        FLAGS[flag].read("10.0.0.1:9464", True, tmp_path)
    assert str(info.value) == FLAGS[flag].expected_not_loopback("10.0.0.1:9464", "10.0.0.1")


def test_the_example_port_and_flag_text_are_the_callers() -> None:
    with pytest.raises(UsageError) as info:
        parse_host_port("x", flag="--peer", example_port=7000)
    assert str(info.value) == ("--peer 'x': no port; expected HOST:PORT (e.g. 127.0.0.1:7000 or "
                               "[::1]:7000)")
    assert parse_host_port("[fe80::1%eth0]:5", flag="--peer", allow_non_loopback=True) == (
        "fe80::1%eth0", 5)


def test_loopback_and_targets() -> None:
    assert [is_loopback(h) for h in ("localhost", "LOCALHOST", "127.0.0.1", "127.255.0.9",
                                     "::1", "0.0.0.0", "::", "10.0.0.1", "localhost.example",
                                     "")] == [True] * 5 + [False] * 5
    assert host_port("::1", 50051) == "[::1]:50051"
    assert host_port("127.0.0.1", 1) == "127.0.0.1:1"
    assert loopback_host("localhost") == "127.0.0.1"
    assert loopback_host("::1") == "::1"
    with pytest.raises(ValueError, match="not a loopback address"):
        loopback_host("0.0.0.0")
