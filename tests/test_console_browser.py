"""The console in a real browser (Debian's Chromium through Playwright) against real
in-process collectors on 127.0.0.1 and a fake agent (real gRPC, no probes): the live alert
list across a collector outage, and keyboard use of the login and navigation."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.browser import VIEWPORT, chromium, console_server, log_in
from tests.support.fake_agent import FakeAgent, hello, make_alert

TOKEN = "browser-test-token"


def send_alert(channels, server, key: str) -> str:
    """One alert from a fake agent on node-b; its id once the collector acknowledged it."""
    agent = FakeAgent(channels(server))
    agent.send(hello=hello("node-b"))
    alert = make_alert(key, when=time.time(), node="node-b", name=f"web-{key}", mode="monitor")
    agent.send_alerts([alert])
    assert list(agent.recv_kind("ack").alert_ids) == [alert.id]
    agent.close()
    return alert.id


def test_the_live_list_shows_an_outage_and_goes_on_after_it(make_server, channels,
                                                             tmp_path: Path) -> None:
    first = make_server(operator_token=TOKEN)
    with console_server(first.address) as console, chromium() as browser:
        page = browser.new_page(viewport=VIEWPORT)
        log_in(page, console.url, TOKEN)
        page.goto(f"{console.url}/alerts")
        page.wait_for_selector("#live-status[data-state=live]")
        before = send_alert(channels, first, "before")
        page.locator(f"#alerts tr[data-alert-id='{before}']").wait_for()
        first.stop(0.5)
        page.wait_for_selector("#live-status[data-state=unavailable]")
        assert page.locator("#live-status").text_content() == "collector unavailable"
        # the rows already shown stay: an outage is not an empty fleet
        assert page.locator("#alerts tbody tr").count() == 1
        page.screenshot(path=str(tmp_path / "alerts-outage.png"))
        second = make_server(operator_token=TOKEN, listen=first.address)
        after = send_alert(channels, second, "after")
        page.locator(f"#alerts tr[data-alert-id='{after}']").wait_for(timeout=30_000)
        page.wait_for_selector("#live-status[data-state=live]")
        ids = [r.get_attribute("data-alert-id") for r in page.locator("#alerts tbody tr").all()]
        assert ids == [after, before]  # newest first, each once
        page.screenshot(path=str(tmp_path / "alerts-after-outage.png"))


def test_login_and_navigation_work_with_the_keyboard(make_server, tmp_path: Path) -> None:
    server = make_server(operator_token=TOKEN)
    with console_server(server.address) as console, chromium() as browser:
        page = browser.new_page(viewport=VIEWPORT)
        page.goto(f"{console.url}/alerts")  # not logged in: to the login page, then back
        assert page.url == f"{console.url}/login?next=%2Falerts"
        page.screenshot(path=str(tmp_path / "login.png"))
        page.keyboard.type(TOKEN)  # the token field has the focus
        page.keyboard.press("Enter")
        page.wait_for_selector("#alerts")
        assert page.url == f"{console.url}/alerts"
        # Tab reaches the skip link, then the main navigation, in order
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.textContent") == "Skip to content"
        names = []
        for _ in range(4):
            page.keyboard.press("Tab")
            names.append(page.evaluate("document.activeElement.textContent"))
        assert names == ["Overview", "Alerts", "Baselines", "Audit"]
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert page.url == f"{console.url}/audit"
        page.screenshot(path=str(tmp_path / "audit.png"))
