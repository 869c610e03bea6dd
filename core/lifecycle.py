"""Lifecycles: how a long-running command ends on a signal, and the one start/stop shape of
everything that runs beside it (threads, servers, open files).

:class:`Service` is started once and stopped once: new -> started -> stopped, or new -> stopped
(a stop before any start still releases what ``__init__`` took), or new -> stopped by a failed
start (which cleans up after itself). A stopped service is not started again: make a new one.
"""

from __future__ import annotations

import enum
import gc
import logging
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, ClassVar, Self

log = logging.getLogger(__name__)


def stop_on_signals() -> threading.Event:
    """An event set by Ctrl-C or SIGTERM, so a long-running command ends cleanly (drain, summary,
    save) instead of dying mid-write."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda _signum, _frame: stop.set())
    return stop


class ServiceState(enum.StrEnum):
    NEW = "new"
    STARTED = "started"  # start() succeeded
    STOPPED = "stopped"  # stop() was called (it may still run in another thread), or start failed


class Service:
    """Started once, stopped once; a context manager (enter = ``start()``, exit = ``stop()``).

    Subclasses call ``super().__init__()`` and write two hooks:

    - ``_start()``: run by the first ``start()``. If it raises, ``_stop(0.0)`` cleans up what it
      made (nothing is waited for), the service is stopped and the error goes on.
    - ``_stop(timeout)``: run by the first ``stop()`` (or ``close()``), whether or not the
      service was started, so it must cope with what exists: nothing, a half-made start, or
      resources that ``__init__`` took. ``timeout`` bounds the waits for what runs (threads,
      in-flight calls): the caller's, else :attr:`STOP_TIMEOUT` (None: no bound).

    Thread-safe: start and stop hold one lock, so a ``stop()`` that comes while another (or a
    ``start()``) runs waits for it and then returns; ``_stop`` runs once.
    """

    STOP_TIMEOUT: ClassVar[float | None] = None

    def __init__(self) -> None:
        self._lifecycle_lock = threading.RLock()  # re-entrant: _stop may end up in stop()
        self._lifecycle_state = ServiceState.NEW

    @property
    def state(self) -> ServiceState:
        return self._lifecycle_state

    def start(self) -> Self:
        with self._lifecycle_lock:
            if self._lifecycle_state is ServiceState.STOPPED:
                raise self._restart_refused()
            if self._lifecycle_state is ServiceState.STARTED:
                return self
            try:
                self._start()
            except BaseException:
                self._lifecycle_state = ServiceState.STOPPED
                try:
                    self._stop(0.0)
                except Exception:  # the start's error is the one to report
                    log.warning("cleaning up %s after its failed start failed too",
                                type(self).__name__, exc_info=True)
                raise
            self._lifecycle_state = ServiceState.STARTED
        return self

    def stop(self, timeout: float | None = None) -> None:
        with self._lifecycle_lock:
            if self._lifecycle_state is ServiceState.STOPPED:
                return
            self._lifecycle_state = ServiceState.STOPPED
            self._stop(self.STOP_TIMEOUT if timeout is None else timeout)

    def close(self) -> None:
        """``stop()`` with the default timeout, for what callers close rather than stop."""
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _start(self) -> None:
        """Nothing by default: a service whose ``__init__`` opened it only needs stopping."""

    def _stop(self, timeout: float | None) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define _stop")

    def _restart_refused(self) -> Exception:
        """What ``start()`` raises once stopped."""
        return RuntimeError(f"{type(self).__name__} is stopped; make a new one to start again")


def settle_heap() -> None:
    """Once a long-running process has started (its imports, compiled probes, servers): one
    full collection, then every object left is frozen out of later ones. A full collection
    of what NumPy, scikit-learn, gRPC and bcc leave behind took 43 ms, a pause in the middle
    of an alert's path every few seconds; frozen, the later ones walk only new objects."""
    gc.collect()
    gc.freeze()


LATENCY_SWITCH_INTERVAL = 0.0005  # s; Python's default is 0.005


def shorten_switch_interval(interval: float = LATENCY_SWITCH_INTERVAL) -> None:
    """A thread that wakes up (an alert to send, a message read from a stream) waits for the
    interpreter lock until the running thread gives it up: at the latest after the switch
    interval, again after each blocking call of its own. With the default 5 ms, a pipeline
    thread busy with a new fleet baseline held the agent's sender 4-34 ms, and a collector
    thread merging increments held an alert batch's reader as long. Half a millisecond bounds
    each such wait; the switches only happen when threads contend (measured: bench/COLLECTOR.md,
    the exec -> subscriber tail)."""
    sys.setswitchinterval(interval)


def start_daemon_thread(target: Callable[..., Any], name: str, *args: Any,
                        **kwargs: Any) -> threading.Thread:
    """``target(*args, **kwargs)`` on a started daemon thread (it never holds up the process's
    exit: stop() joins it with a bound)."""
    thread = threading.Thread(target=target, name=name, args=args, kwargs=kwargs, daemon=True)
    thread.start()
    return thread


def join_or_warn(thread: threading.Thread | None, timeout: float | None, what: str) -> bool:
    """Join `thread` for at most `timeout` seconds (None: until it ends); when it is still
    running then, warn naming `what` and go on (a daemon thread stuck in a call that has its own
    timeout). True when it ended, or there was none."""
    if thread is None:
        return True
    thread.join(timeout)
    if thread.is_alive():
        log.warning("%s did not stop within %.1fs", what, timeout)
        return False
    return True


def serve_accepts(sock: socket.socket, stopping: threading.Event,
                  handle: Callable[[socket.socket], None]) -> None:
    """Accept connections on `sock` until `stopping` is set or the socket is shut down (a
    blocking socket: ``shutdown()`` wakes the accept; one with a timeout looks at `stopping`
    that often); each one goes to ``handle`` and is closed after."""
    while not stopping.is_set():
        try:
            conn, _ = sock.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with conn:
            handle(conn)


__all__ = ["Service", "ServiceState", "join_or_warn", "serve_accepts", "start_daemon_thread",
           "stop_on_signals"]
