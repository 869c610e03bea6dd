"""core.lifecycle.Service: started once, stopped once, whatever the order and the threads."""

from __future__ import annotations

import logging
import threading
import time

import pytest
from driftwarden.core.lifecycle import Service, ServiceState, join_or_warn, start_daemon_thread


class Recorder(Service):
    """Records every hook call; `fail_start` makes _start raise after it made something."""

    STOP_TIMEOUT = 7.0

    def __init__(self, *, fail_start: bool = False, stop_seconds: float = 0.0) -> None:
        super().__init__()
        self.calls: list[tuple[str, float | None]] = []
        self.fail_start = fail_start
        self.stop_seconds = stop_seconds
        self.made = False

    def _start(self) -> None:
        self.calls.append(("start", None))
        self.made = True
        if self.fail_start:
            raise OSError("address in use")

    def _stop(self, timeout: float | None) -> None:
        self.calls.append(("stop", timeout))
        time.sleep(self.stop_seconds)
        self.made = False


def test_start_is_idempotent_and_returns_the_service() -> None:
    service = Recorder()
    assert service.state is ServiceState.NEW
    assert service.start() is service
    assert service.start() is service
    assert service.calls == [("start", None)]
    assert service.state is ServiceState.STARTED


def test_stop_runs_the_hook_once_with_the_default_timeout_or_the_callers() -> None:
    service = Recorder().start()
    service.stop()
    service.stop(1.5)
    service.close()
    assert service.calls == [("start", None), ("stop", 7.0)]
    assert service.state is ServiceState.STOPPED

    other = Recorder().start()
    other.stop(1.5)
    assert other.calls == [("start", None), ("stop", 1.5)]


def test_close_is_stop() -> None:
    service = Recorder().start()
    service.close()
    service.stop()
    assert service.calls == [("start", None), ("stop", 7.0)]


def test_stop_without_start_still_releases_what_init_took() -> None:
    service = Recorder()
    service.stop()
    service.stop()
    assert service.calls == [("stop", 7.0)]
    assert service.state is ServiceState.STOPPED


def test_a_stopped_service_is_not_started_again() -> None:
    service = Recorder()
    service.stop()
    with pytest.raises(RuntimeError, match=r"^Recorder is stopped; make a new one to start "
                                           r"again$"):
        service.start()
    assert service.calls == [("stop", 7.0)]


def test_a_failed_start_cleans_up_at_once_and_a_later_stop_does_nothing() -> None:
    service = Recorder(fail_start=True)
    with pytest.raises(OSError, match="address in use"):
        service.start()
    assert service.calls == [("start", None), ("stop", 0.0)]
    assert service.made is False
    assert service.state is ServiceState.STOPPED
    service.stop()
    assert service.calls == [("start", None), ("stop", 0.0)]
    with pytest.raises(RuntimeError, match="is stopped"):
        service.start()


def test_a_failed_start_whose_cleanup_fails_reports_the_start_error(caplog) -> None:
    class Broken(Recorder):
        def _stop(self, timeout: float | None) -> None:
            raise ValueError("cleanup broke")

    service = Broken(fail_start=True)
    with caplog.at_level(logging.WARNING, logger="driftwarden.core.lifecycle"), \
            pytest.raises(OSError, match="address in use"):
        service.start()
    assert [r.getMessage() for r in caplog.records] == [
        "cleaning up Broken after its failed start failed too"]


def test_concurrent_stops_run_the_hook_once_and_each_returns_after_it_ended() -> None:
    service = Recorder(stop_seconds=0.2).start()
    go = threading.Barrier(8)
    returned_while_made: list[bool] = []

    def stop() -> None:
        go.wait()
        service.stop()
        returned_while_made.append(service.made)

    threads = [threading.Thread(target=stop) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert service.calls == [("start", None), ("stop", 7.0)]
    assert returned_while_made == [False] * 8


def test_context_manager_starts_and_stops_even_on_error() -> None:
    with Recorder() as service:
        assert service.calls == [("start", None)]
    assert service.calls == [("start", None), ("stop", 7.0)]

    with pytest.raises(KeyError), Recorder() as failing:
        raise KeyError("inside")
    assert failing.calls == [("start", None), ("stop", 7.0)]


def test_a_failed_enter_leaves_nothing_behind() -> None:
    service = Recorder(fail_start=True)
    with pytest.raises(OSError), service:
        pytest.fail("the body must not run")
    assert service.calls == [("start", None), ("stop", 0.0)]
    assert service.made is False


def test_a_stop_inside_stop_on_the_same_thread_returns() -> None:
    class Reentrant(Recorder):
        def _stop(self, timeout: float | None) -> None:
            super()._stop(timeout)
            self.stop()  # e.g. a part that closes its owner

    service = Reentrant().start()
    service.stop()
    assert service.calls == [("start", None), ("stop", 7.0)]


def test_daemon_thread_and_bounded_join(caplog) -> None:
    release = threading.Event()
    seen: list[tuple[int, str]] = []
    thread = start_daemon_thread(lambda n, word: (seen.append((n, word)), release.wait(10)),
                                 "driftwarden-test", 3, word="x")
    assert (thread.daemon, thread.name) == (True, "driftwarden-test")
    with caplog.at_level(logging.WARNING, logger="driftwarden.core.lifecycle"):
        assert join_or_warn(thread, 0.05, "test worker") is False
    assert [r.getMessage() for r in caplog.records] == ["test worker did not stop within 0.1s"]
    release.set()
    assert join_or_warn(thread, 5, "test worker") is True
    assert seen == [(3, "x")]
    assert join_or_warn(None, 0, "nothing") is True
