"""Fixtures for tests that run a real CollectorServer on 127.0.0.1 with a SQLite file in the
test's tmp dir, and gRPC channels closed after the test. Registered for every test module by
tests/conftest.py (`pytest_plugins`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from driftwarden.collector.server import CollectorConfig, CollectorServer


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., CollectorServer]]:
    """make_server(**CollectorConfig overrides) -> a started server, stopped after the test."""
    servers: list[CollectorServer] = []

    def make(**overrides) -> CollectorServer:
        settings = {"db_path": tmp_path / "collector.db", "listen": "127.0.0.1:0",
                    "stop_grace": 0.5, "poll_seconds": 0.05, **overrides}
        server = CollectorServer(CollectorConfig(**settings)).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop(0.5)


@pytest.fixture
def channels() -> Iterator[Callable[..., grpc.Channel]]:
    """channels(server or address, options=(), credentials=None) -> an open channel."""
    opened: list[grpc.Channel] = []

    def open_channel(target: str | CollectorServer, options=(),
                     credentials: grpc.ChannelCredentials | None = None) -> grpc.Channel:
        address = target.address if isinstance(target, CollectorServer) else target
        channel = (grpc.secure_channel(address, credentials, options=list(options))
                   if credentials is not None
                   else grpc.insecure_channel(address, options=list(options)))
        opened.append(channel)
        return channel

    yield open_channel
    for channel in opened:
        channel.close()
