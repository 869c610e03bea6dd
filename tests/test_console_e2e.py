"""The console end to end, in a real browser: Debian's Chromium (headless, through Playwright)
on `driftwarden console` (served in this process), a real `driftwarden collector` process
(with an operator token) and a real `driftwarden agent --collector` process watching real
containers, all over 127.0.0.1. One collector, agent and console serve the whole module; each
test uses containers of its own. A screenshot of every page is saved under the test's tmp dir.

- a drift appears in the open alerts page without a reload, within 2 s of reaching the
  collector, with its container, image and reason;
- quarantine from an alert cuts the container's network (seen from inside it), release
  restores it, and the audit page shows both;
- a mode change made in the console reaches the agent: its next alert carries the new mode;
- an alert whose argv and path hold HTML and script is shown as text, nothing injected;
- a change without the CSRF token or without a session is refused; a wrong token cannot log
  in.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from driftwarden.core.dial import dial
from driftwarden.proto.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    alerts_pb2,
    baselines_pb2,
    baselines_pb2_grpc,
    common_pb2,
)

from tests.support.agent_proc import AgentProcess
from tests.support.browser import VIEWPORT, chromium, console_server, log_in
from tests.support.collector_proc import CollectorProcess
from tests.support.containers import RunningContainer, run_container
from tests.support.e2e import Subscription, Subscriptions, wait_until
from tests.support.images import workload_image
from tests.support.scenario import image_id
from tests.test_e2e_response import CONNECT, CONNECT_DENIED, CONNECTED, SERVE, SLEEPER

pytestmark = pytest.mark.integration

NODE = "console-node"
TOKEN = "console-e2e-operator-token"
LIVE_WITHIN_MS = 2000  # the bound from the collector to the open page
HOSTILE_DIR = "/tmp/<img src=x onerror=window.__pwned=1>"
HOSTILE_ARG = "<script>window.__pwned=2</script>"


@dataclass
class Stack:
    collector: CollectorProcess
    agent: AgentProcess
    channel: grpc.Channel
    url: str
    browser: object

    def logs(self) -> str:
        return (f"--- collector ---\n{self.collector.log()}\n"
                f"--- agent ---\n{self.agent.log()}")


@pytest.fixture(scope="module")
def stack(kernel_ok, docker_ok, tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("console-e2e")
    token_file = tmp / "operator.token"
    token_file.write_text(TOKEN + "\n")
    collector = CollectorProcess(tmp / "collector.db", tmp / "collector.log",
                                 ["--token-file", str(token_file)])
    collector.start()
    agent = AgentProcess(tmp / "agent-state", tmp / "alerts.jsonl",
                         extra=["--collector", collector.address, "--node", NODE,
                                "--window", "1", "--heartbeat", "1"])
    channel = dial(collector.address, token=TOKEN)
    try:
        with agent, console_server(collector.address) as console, chromium() as browser:
            stack = Stack(collector, agent, channel, console.url, browser)
            wait_until(lambda: [(a.node, a.connected) for a in agent_pb2_grpc.AgentsStub(
                channel).List(agent_pb2.ListAgentsRequest(), timeout=5).agents]
                == [(NODE, True)], "the agent to connect", stack, timeout=60)
            yield stack
    finally:
        channel.close()
        collector.stop()


@pytest.fixture
def page(stack: Stack, tmp_path: Path):
    """A logged-in page at 1280x800 (its own browser context: its own cookies)."""
    context = stack.browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    log_in(page, stack.url, TOKEN)
    assert page.url == f"{stack.url}/overview"
    yield page
    context.close()


def shot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)


def drift(c: RunningContainer, directory: str, *args: str) -> str:
    """Copy busybox to `directory`/true (never in the image) and run it with `args`: a DRIFT
    alert in every mode. Returns the path."""
    code, out = c.exec(["sh", "-c", 'd="$1"; shift; mkdir -p "$d" && cp /bin/busybox "$d/true" '
                        '&& "$d/true" "$@"', "sh", directory, *args])
    assert code == 0, out
    return f"{directory}/true"


def subscribe(subs: Subscriptions, c: RunningContainer) -> Subscription:
    return subs.open(alerts_pb2.SubscribeRequest(
        filter=alerts_pb2.AlertFilter(containers=[c.id]), include_actions=True))


def is_drift(c: RunningContainer, path: str):
    return lambda a: (a.kind == common_pb2.ALERT_KIND_DRIFT and a.container.id == c.id
                      and a.process.exe == path)


def open_live_alerts(page, stack: Stack, c: RunningContainer) -> None:
    page.goto(f"{stack.url}/alerts?container={c.id}")
    page.wait_for_selector("#live-status[data-state=live]")


def live_row(page, alert: common_pb2.Alert):
    """The alert's row, once the page shows it (bounded by LIVE_WITHIN_MS)."""
    row = page.locator(f"#alerts tbody tr[data-alert-id='{alert.id}']")
    row.wait_for(timeout=LIVE_WITHIN_MS)
    return row


def wait_listening(c: RunningContainer, stack: Stack) -> None:
    wait_until(lambda: c.exec(CONNECT) == CONNECTED, f"the listener in {c.name}", stack,
               timeout=10, interval=0.1)


# -- tests ---------------------------------------------------------------------------------------


def test_a_drift_appears_in_the_open_alerts_page_without_a_reload(stack, page, bb_image,
                                                                  tmp_path) -> None:
    with Subscriptions(stack.channel) as subs, run_container(bb_image, SLEEPER) as c:
        sub = subscribe(subs, c)
        open_live_alerts(page, stack, c)
        shot(page, tmp_path, "alerts-before")
        loads = page.evaluate("performance.getEntriesByType('navigation').length")
        path = drift(c, "/tmp/live")
        [alert] = sub.wait_for(is_drift(c, path), "the drift", stack)
        row = live_row(page, alert)  # no reload: the same document
        assert page.evaluate("performance.getEntriesByType('navigation').length") == loads
        cells = row.locator("td").all_text_contents()
        assert cells[1:3] == ["drift", "high"]
        assert cells[4] == c.name
        assert cells[5] == bb_image
        assert cells[6] == NODE
        assert cells[8] == alert.reasons[0].text and path in cells[8]
        shot(page, tmp_path, "alerts-live")
        row.get_by_role("link", name="Details").click()
        page.wait_for_selector("#reasons")
        assert page.locator("#process .exe").text_content() == path
        assert page.locator("#alert-summary").get_by_text(c.name).count() == 1
        shot(page, tmp_path, "alert-detail")


def test_quarantine_and_release_from_an_alert(stack, page, bb_image, tmp_path) -> None:
    with Subscriptions(stack.channel) as subs, run_container(bb_image, SERVE) as c:
        sub = subscribe(subs, c)
        wait_listening(c, stack)
        [alert] = sub.wait_for(is_drift(c, drift(c, "/tmp/q")), "the drift", stack)
        for action, word, expect in (("quarantine", "Quarantine", CONNECT_DENIED),
                                     ("release", "Release", CONNECTED)):
            page.goto(f"{stack.url}/alerts/{alert.id}")
            page.get_by_role("link", name=word, exact=True).click()
            # the confirmation names the container, its node and its image
            assert page.locator("#confirm-container").text_content() == c.name
            assert page.locator("#confirm-node").text_content() == NODE
            assert page.locator("#confirm-image").text_content() == bb_image
            page.get_by_label("Reason (for the audit log)").fill(f"console e2e {action}")
            shot(page, tmp_path, f"confirm-{action}")
            with page.expect_navigation(timeout=45_000):  # the agent's result: up to 10 s
                page.get_by_role("button", name=word).click()
            assert page.locator("#result").count() == 1, page.content()
            assert page.locator("#result-status").text_content() == "done"
            shot(page, tmp_path, f"result-{action}")
            assert c.exec(CONNECT) == expect  # from inside the container
        page.goto(f"{stack.url}/audit")
        page.get_by_role("searchbox", name="Search").fill(c.name)
        page.get_by_role("searchbox", name="Search").press("Enter")
        page.wait_for_load_state()
        rows = [r.locator("td").all_text_contents() for r in page.locator("tr.action-row").all()]
        # newest first: (action, status, container, node, by, reason)
        assert [(r[2], r[3], r[4], r[5], r[6], r[7]) for r in rows] == [
            ("release", "done", c.name, NODE, "operator:console", "console e2e release"),
            ("quarantine", "done", c.name, NODE, "operator:console", "console e2e quarantine")]
        shot(page, tmp_path, "audit")


def test_html_and_script_in_argv_and_path_are_shown_as_text(stack, page, bb_image,
                                                            tmp_path) -> None:
    with Subscriptions(stack.channel) as subs, run_container(bb_image, SLEEPER) as c:
        sub = subscribe(subs, c)
        open_live_alerts(page, stack, c)
        path = drift(c, HOSTILE_DIR, HOSTILE_ARG)
        [alert] = sub.wait_for(is_drift(c, path), "the hostile drift", stack)
        assert list(alert.process.argv) == [path, HOSTILE_ARG]
        row = live_row(page, alert)  # added by the script, with textContent
        assert HOSTILE_DIR in row.locator("td.reason").text_content()
        assert page.locator("#alerts img").count() == 0
        shot(page, tmp_path, "hostile-live")
        for url in (f"{stack.url}/alerts/{alert.id}", f"{stack.url}/alerts?container={c.id}"):
            page.goto(url)  # rendered by the server's templates
            page.wait_for_load_state()
            assert page.locator("main img").count() == 0
            assert page.locator("script").count() == (1 if "?" in url else 0)
            assert page.evaluate("window.__pwned") is None
        page.goto(f"{stack.url}/alerts/{alert.id}")
        assert page.locator("#process .exe").text_content() == path
        assert page.locator("#process ol.argv li").all_text_contents() == [path, HOSTILE_ARG]
        events = json.loads(page.locator("#events").text_content())
        assert events[0]["exec"]["argv"] == [path, HOSTILE_ARG]
        shot(page, tmp_path, "hostile-detail")
        assert page.evaluate("window.__pwned") is None


def test_a_mode_change_in_the_console_reaches_the_agent(stack, page, bb_image,
                                                        tmp_path) -> None:
    image = workload_image("console-mode", {"/app/run.sh": ("#!/bin/sh\nexec sleep 600\n",
                                                            0o755)})
    key = image_id(image)
    other = image_id(bb_image)  # the image to diff against (its container: a baseline)
    stub = baselines_pb2_grpc.BaselinesStub(stack.channel)

    def known(image: str = key) -> baselines_pb2.BaselineSummary | None:
        try:
            return stub.Get(baselines_pb2.GetBaselineRequest(image=image),
                            timeout=5).baseline.summary
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            return None

    with (Subscriptions(stack.channel) as subs, run_container(image, SLEEPER) as c,
          run_container(bb_image, SLEEPER)):
        sub = subscribe(subs, c)
        [first] = sub.wait_for(is_drift(c, drift(c, "/tmp/m1")), "the first drift", stack)
        before = wait_until(known, f"the collector to hold a baseline for {key}", stack)
        wait_until(lambda: known(other), f"a baseline for {other}", stack)
        assert before.mode == common_pb2.MODE_LEARN  # a new image learns first
        target = "monitor"
        assert first.baseline_mode == before.mode
        page.goto(f"{stack.url}/baseline?image={key}")
        shot(page, tmp_path, "baseline-before")
        page.get_by_label("Mode", exact=True).select_option(target)
        page.get_by_label("Reason (required)").fill("console e2e: ready")
        page.get_by_role("button", name="Change mode").click()
        page.wait_for_selector("#mode-changed")
        assert page.locator("#mode-changed").text_content() == f"Mode changed to {target}."
        last = page.locator("#history tbody tr").last.locator("td").all_text_contents()
        assert last[2:] == [target, "operator", "console e2e: ready"]
        shot(page, tmp_path, "baseline-after")
        after = known()
        fleet_file = stack.agent.state_dir / "fleet.json"

        def held() -> dict:
            return json.loads(fleet_file.read_text())["baselines"] if fleet_file.exists() else {}

        wait_until(lambda: held().get(key, {}).get("version", 0) >= after.version,
                   f"the agent to hold version {after.version}", stack)
        [second] = sub.wait_for(is_drift(c, drift(c, "/tmp/m2")), "the next drift", stack)
        assert second.baseline_mode == getattr(common_pb2, f"MODE_{target.upper()}")

        # monitor: something new is a NOVEL alert, and its behaviour can be accepted
        assert c.exec(["cat", "/etc/hostname"])[0] == 0
        novel = sub.wait_for(lambda a: a.kind == common_pb2.ALERT_KIND_NOVEL and any(
            d.key == "item_key" and json.loads(d.value_json) == ["/bin/busybox", "cat"]
            for r in a.reasons for d in r.details), "the novel cat", stack)[0]
        page.goto(f"{stack.url}/alerts/{novel.id}")
        page.get_by_label("Reason (required)").fill("cat is fine")
        page.get_by_role("button", name="Add to the baseline").click()
        page.wait_for_selector("#added")
        assert page.locator("#added li").all_text_contents() == ["exec /bin/busybox as cat"]
        shot(page, tmp_path, "accepted")
        items = stub.Get(baselines_pb2.GetBaselineRequest(image=key), timeout=5).baseline.items
        assert ("exec", ["/bin/busybox", "cat"]) in [(i.kind, list(i.key)) for i in items]

    # export: the collector's baseline file, as a download
    exported = page.request.get(f"{stack.url}/baseline/export?image={key}")
    assert exported.status == 200
    assert exported.headers["content-type"] == "application/octet-stream"
    assert exported.body() == stub.Export(baselines_pb2.ExportBaselineRequest(image=key),
                                          timeout=5).file
    # diff against the busybox image's baseline, as the collector computes it
    diff = stub.Diff(baselines_pb2.DiffBaselinesRequest(a=key, b=other), timeout=5)
    page.goto(f"{stack.url}/baseline?image={key}")
    page.get_by_label("Other image").select_option(other)
    page.get_by_role("button", name="Diff").click()
    page.wait_for_selector("#only-a")
    shot(page, tmp_path, "baseline-diff")
    assert page.locator("#only-a li").count() == max(len(diff.only_in_a), 1)
    assert page.locator("#only-b li").count() == max(len(diff.only_in_b), 1)


def test_changes_without_csrf_or_session_are_refused_and_a_wrong_token_cannot_log_in(
        stack, page, tmp_path) -> None:
    change = ("(async () => { const r = await fetch('/baseline/mode', {method: 'POST', "
              "body: new URLSearchParams({image: 'x', mode: 'protect', reason: 'r'%s})}); "
              "return [r.status, await r.text()]; })()")
    status, text = page.evaluate(change % "")
    assert status == 403 and "missing or wrong CSRF token" in text
    status, _ = page.evaluate(change % ", csrf: 'made-up'")
    assert status == 403
    # the page's own token gets through to the collector (which has no image "x")
    csrf = page.locator("form.logout input[name=csrf]").get_attribute("value")
    status, text = page.evaluate(change % f", csrf: '{csrf}'")
    assert status == 404
    # another context: no session cookie
    other = stack.browser.new_context(viewport=VIEWPORT)
    try:
        fresh = other.new_page()
        fresh.goto(f"{stack.url}/login")
        status, text = fresh.evaluate(change % f", csrf: '{csrf}'")
        assert status == 403 and "not logged in" in text
        log_in(fresh, stack.url, "not-the-token")
        assert fresh.url.startswith(f"{stack.url}/login")
        assert "wrong token" in fresh.locator("#login-error").text_content()
        shot(fresh, tmp_path, "login-refused")
        fresh.goto(f"{stack.url}/alerts")
        assert fresh.url.startswith(f"{stack.url}/login")
        assert [c["name"] for c in other.cookies() if c["name"] == "dw_session"] == []
    finally:
        other.close()
    # the session cookie is out of the page's reach (HttpOnly) and same-site only
    [cookie] = [c for c in page.context.cookies() if c["name"] == "dw_session"]
    assert (cookie["httpOnly"], cookie["sameSite"]) == (True, "Strict")
    assert "dw_session" not in page.evaluate("document.cookie")
    page.goto(f"{stack.url}/overview")
    agents = page.locator("#agents tbody tr").all()
    assert [r.locator("td").all_text_contents()[:2] for r in agents] == [[NODE, "yes"]]
    shot(page, tmp_path, "overview")
    page.goto(f"{stack.url}/baselines")
    shot(page, tmp_path, "baselines")
