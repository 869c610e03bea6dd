"""The console's web server: uvicorn serving :class:`driftwarden.ops.console.app.Console` on a
thread of its own, with explicit start and stop (port 0 picks a free port; :attr:`url` says
which)."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn
from driftwarden.core.lifecycle import Service, join_or_warn
from driftwarden.core.netaddr import host_port
from driftwarden.ops.console.app import Console
from driftwarden.ops.console.gateway import ConsoleSettings

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0
GRACEFUL_SECONDS = 2.0  # open live streams get this long to end at stop


class ConsoleServer(Service):
    STOP_TIMEOUT = 10.0

    def __init__(self, settings: ConsoleSettings) -> None:
        super().__init__()
        self.settings = settings
        self.console = Console(settings)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = settings.listen_port

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.https else "http"
        return f"{scheme}://{host_port(self.settings.listen_host, self.port)}"

    def _start(self) -> None:
        config = uvicorn.Config(
            self.console.app, host=self.settings.listen_host, port=self.settings.listen_port,
            log_config=None, log_level="warning", lifespan="off", access_log=False,
            proxy_headers=False, server_header=False, timeout_graceful_shutdown=GRACEFUL_SECONDS,
            ssl_certfile=self.settings.web_cert, ssl_keyfile=self.settings.web_key)
        self._server = uvicorn.Server(config)
        failed: list[BaseException] = []

        def serve() -> None:
            try:
                self._server.run()
            except BaseException as exc:
                failed.append(exc)

        self._thread = threading.Thread(target=serve, name="console-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self._server.started:
            if time.monotonic() > deadline:
                raise OSError(f"the console did not start listening in {START_TIMEOUT:.0f} s")
            time.sleep(0.05)
            if not self._thread.is_alive():
                raise OSError(f"the console could not listen on "
                              f"{host_port(self.settings.listen_host, self.settings.listen_port)}"
                              f"{': ' + str(failed[0]) if failed else ''} (is the port taken?)")
        sockets = [s for server in self._server.servers for s in server.sockets]
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("console listening on %s", self.url)

    def _stop(self, timeout: float | None) -> None:
        self.console.close()
        if self._server is not None:
            self._server.should_exit = True
        join_or_warn(self._thread, timeout, "the console's web server")


__all__ = ["ConsoleServer"]
