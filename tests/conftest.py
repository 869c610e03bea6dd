"""Shared fixtures. Integration tests need root, bcc, tracefs and Docker: under CI
(DRIFTWARDEN_REQUIRE_INTEGRATION=1, set by `make test`) a missing prerequisite FAILS the test;
elsewhere it skips with the reason."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

pytest_plugins = ["tests.support.collector_fixtures"]

REQUIRED = os.environ.get("DRIFTWARDEN_REQUIRE_INTEGRATION") == "1"


def missing_prerequisite(reason: str) -> None:
    if REQUIRED:
        pytest.fail(f"integration prerequisite missing under CI: {reason}", pytrace=False)
    pytest.skip(reason)


def _kernel_prerequisites() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc (python3-bpfcc) is not importable"
    # the loader accepts either place tracefs is mounted
    if not any(os.path.isdir(f"{d}/events/syscalls")
               for d in ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")):
        return "tracefs is not mounted"
    return None


def _docker_prerequisite() -> str | None:
    try:
        from tests.support.containers import docker_client

        docker_client().ping()
    except Exception as exc:
        return f"Docker is not reachable: {exc}"
    return None


@pytest.fixture(scope="session")
def kernel_ok() -> None:
    reason = _kernel_prerequisites()
    if reason:
        missing_prerequisite(reason)


@pytest.fixture(scope="session")
def docker_ok() -> None:
    reason = _docker_prerequisite()
    if reason:
        missing_prerequisite(reason)


@pytest.fixture(scope="session")
def gcc_ok() -> None:
    """A C compiler with libc and Linux UAPI headers (tests/test_layout.py)."""
    if shutil.which("gcc") is None:
        missing_prerequisite("gcc is not installed (apt-get install gcc libc6-dev linux-libc-dev,"
                             " or `make setup`)")


@pytest.fixture(scope="session")
def bb_image(docker_ok) -> str:
    from tests.support.images import busybox_image

    return busybox_image()


@pytest.fixture(scope="session")
def host_image(docker_ok) -> str:
    from tests.support.images import host_binaries_image

    return host_binaries_image()


@pytest.fixture(scope="session")
def containerd(docker_ok) -> Iterator:
    """A second containerd with its CRI plugin, beside Docker's: started once per session,
    stopped (pods, cgroup folders, files removed) at its end (tests/support/containerd.py)."""
    with running_containerd() as instance:
        yield instance


@contextlib.contextmanager
def running_containerd() -> Iterator:
    """A TestContainerd of its own for the block (a missing prerequisite fails or skips)."""
    from tests.support.containerd import ContainerdError, TestContainerd

    if os.geteuid() != 0:
        missing_prerequisite("a containerd of its own needs root")
    instance = TestContainerd()
    try:
        instance.start()
    except ContainerdError as exc:
        missing_prerequisite(str(exc))
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator:
    """A PostgreSQL server of the session's own on 127.0.0.1 (tests/support/postgres.py),
    stopped and removed at its end; ``postgres.database()`` gives a test a fresh database."""
    with running_test_postgres() as server:
        yield server


@contextlib.contextmanager
def running_test_postgres() -> Iterator:
    """A PostgresServer of its own for the block (a missing prerequisite fails or skips):
    for a test that stops and starts it (the session's server is shared)."""
    from tests.support.postgres import PostgresServer, PostgresUnavailable

    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError as exc:
        missing_prerequisite(f"psycopg is not installed ({exc}): pip install -e .")
    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        missing_prerequisite(str(exc))
    try:
        server.start()
    except PostgresUnavailable as exc:
        server.stop()
        missing_prerequisite(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path) -> Iterator[Callable]:
    """The collector's store on each backend: ``open_store(**options)`` opens (again: the same
    file or database) this test's SQLite file, or a fresh database on the `postgres` server."""
    if request.param == "sqlite":
        from driftwarden.collector.store import AlertStore

        yield lambda **options: AlertStore.open(tmp_path / "collector.db", **options)
        return
    from driftwarden.collector.store_pg import PostgresStore

    with request.getfixturevalue("postgres").database() as url:
        yield lambda **options: PostgresStore.open(url, **options)


@pytest.fixture(scope="session")
def storm_image(docker_ok) -> str:
    from tests.support.images import storm_image as build

    return build()


@dataclass
class LiveTrace:
    """The real probes + pipeline running in a thread; tests wait for records to show up."""

    records: list = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pipeline: object = None
    probes: object = None

    def write(self, record) -> None:
        with self.lock:
            self.records.append(record)

    def flush(self) -> None:
        pass

    def snapshot(self) -> list:
        with self.lock:
            return list(self.records)

    def for_cgroup(self, cgroup_id: int) -> list:
        return [r for r in self.snapshot() if r.event.header.cgroup_id == cgroup_id]

    def wait_for(self, predicate: Callable[[list], bool], cgroup_id: int,
                 timeout: float = 10.0) -> list:
        """Records of one container once `predicate(records)` holds (or fail after timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.for_cgroup(cgroup_id)
            if predicate(records):
                return records
            if time.monotonic() > deadline:
                summary = "\n".join(_brief(r) for r in records)
                pytest.fail(f"timed out waiting for events; cgroup {cgroup_id} has:\n{summary}")
            time.sleep(0.05)

    def settle(self, cgroup_id: int, quiet: float = 0.5, timeout: float = 10.0) -> list:
        """Records of a container once nothing new arrived for `quiet` seconds."""
        deadline = time.monotonic() + timeout
        count, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = len(self.for_cgroup(cgroup_id))
            if n != count:
                count, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
            time.sleep(0.05)
        return self.for_cgroup(cgroup_id)


def _brief(record) -> str:
    from driftwarden.agent.output import format_line

    return format_line(record, 0)


@contextlib.contextmanager
def start_live_trace(config, *, include_host: bool = False) -> Iterator[LiveTrace]:
    from driftwarden.agent.attribution_view import LiveAttribution
    from driftwarden.agent.pipeline import TraceFilter, TracePipeline
    from driftwarden.agent.procfs import LiveProcReader
    from driftwarden.probes.capture import LiveCapture
    from driftwarden.probes.loader import ProbeSet, find_cgroup2_root

    live = LiveTrace()
    stop = threading.Event()
    with (
        LiveAttribution(str(find_cgroup2_root()), "unix:///var/run/docker.sock") as attribution,
        ProbeSet(config) as probes,
    ):
        live.probes = probes
        pipeline = TracePipeline(
            LiveCapture(probes),
            proc=LiveProcReader(),
            attribution=attribution,
            sinks=[live],
            trace_filter=TraceFilter(include_host=include_host, show_runtime_setup=True),
            pending_timeout=3.0,
        )
        live.pipeline = pipeline
        thread = threading.Thread(
            target=pipeline.run, kwargs={"should_stop": stop.is_set, "poll_interval": 0.02},
            name="live-trace", daemon=True,
        )
        thread.start()
        try:
            yield live
        finally:
            stop.set()
            thread.join(timeout=10)


@pytest.fixture(scope="session")
def live_trace(kernel_ok, docker_ok) -> Iterator[LiveTrace]:
    """One probe load for the whole session (bcc compiles take seconds)."""
    from driftwarden.probes.loader import ProbeConfig

    with start_live_trace(ProbeConfig()) as live:
        yield live
