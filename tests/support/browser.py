"""A real browser for the console's tests: Debian's Chromium (headless) driven by Playwright
(never `playwright install`: it would download a browser), and a console server run in this
process for a collector address."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from driftwarden.ops.console.gateway import ConsoleSettings
from driftwarden.ops.console.server import ConsoleServer

CHROMIUM = Path("/usr/bin/chromium")
VIEWPORT = {"width": 1280, "height": 800}
REQUIRE_ENV = "DRIFTWARDEN_REQUIRE_INTEGRATION"


def require_chromium() -> None:
    """Skip without Chromium, or fail when integration is required (CI)."""
    if CHROMIUM.is_file():
        return
    reason = f"{CHROMIUM} is missing: apt-get install chromium (make setup does)"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
    pytest.skip(reason)


@contextmanager
def chromium() -> Iterator[object]:
    """A headless Chromium browser (Playwright's sync API), closed afterwards."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--no-sandbox", "--disable-gpu",
                                          "--no-proxy-server"])  # loopback only
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def console_server(collector: str, *, required_token: str | None = None
                   ) -> Iterator[ConsoleServer]:
    """`driftwarden console` for the collector at `collector`, on a free loopback port."""
    settings = ConsoleSettings(collector=collector, target=collector,
                               required_token=required_token, listen_port=0)
    with ConsoleServer(settings) as server:
        yield server


def log_in(page, url: str, token: str) -> None:
    """Log in through the form, with the keyboard (as a person would)."""
    page.goto(f"{url}/login")
    page.get_by_label("Operator token").fill(token)
    page.get_by_label("Operator token").press("Enter")
    page.wait_for_load_state()


__all__ = ["CHROMIUM", "VIEWPORT", "chromium", "console_server", "log_in", "require_chromium"]
