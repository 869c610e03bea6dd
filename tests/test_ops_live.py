"""driftwarden.ops.live: the live view of `alerts --follow` (rows, counts, states, frames laid
out by the one table engine) and its display thread. Rendering goes to rich consoles on
StringIO that say they are terminals."""

from __future__ import annotations

import io
import threading

import pytest
from driftwarden.core.alerts import AlertKind, Severity
from driftwarden.ops import live
from driftwarden.ops.tables import ALERTS, terminal_console
from driftwarden.proto.v1 import alerts_pb2
from rich.console import Console

from tests.support.terminal import FakeTerminal, screen
from tests.test_ops_tables import A1, A2, NOTICE, T0, _alert, by_name, render
from tests.test_ops_tables import action as _action

A1_AGAIN = _alert(1, T0 + 5, AlertKind.DRIFT, Severity.HIGH, "web-1", "nginx:1.25", "node-a",
                  "ran /tmp/x, which the image does not contain (added at run time)", count=4)


@pytest.fixture
def terminal_size(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("LINES", "10")


# -- the live view -------------------------------------------------------------------------------


def test_live_view_update_replaces_the_row_and_moves_it_to_the_bottom() -> None:
    view = live.LiveAlertView("127.0.0.1:1")
    view.add_alert(A1)
    view.add_alert(A2)
    view.add_alert(A1_AGAIN)
    assert [(by_name(ALERTS, r)["CONTAINER"], by_name(ALERTS, r)["COUNT"])
            for r in view.rows()] == [("000000000000", "7"), ("web-1", "4")]
    assert view.status().plain == ("connecting to 127.0.0.1:1... | 3 alerts, 0 actions | "
                                   "Ctrl-C quits")


def test_live_view_is_bounded() -> None:
    view = live.LiveAlertView("c:1", capacity=3)
    for n in range(10):
        view.add_info(T0 + n, f"line {n}")
    assert [by_name(ALERTS, r)["REASON"] for r in view.rows()] == ["line 7", "line 8",
                                                                  "line 9"]
    assert [by_name(ALERTS, r)["REASON"] for r in view.rows(2)] == ["line 8", "line 9"]
    assert view.rows(0) == []


def test_live_view_counts_and_states() -> None:
    view = live.LiveAlertView("c:1")
    before = view.version
    view.add_action(_action("skipped"))
    view.add_notice(NOTICE)
    view.add_notice(alerts_pb2.StreamNotice(dropped=1))
    view.add_alert(A1)
    view.add_info(T0, "lost the collector at c:1; reconnecting...", "reconnecting")
    assert view.version == before + 5
    assert view.status().plain == ("lost the collector at c:1; reconnecting... | 1 alert, "
                                   "1 action | 13 dropped by the collector (slow reader) | "
                                   "Ctrl-C quits")  # the info's words
    view.set_state("reconnecting")
    assert view.status().plain.startswith("lost c:1; reconnecting... | ")  # the state's
    view.set_state("following")
    assert view.status().plain.startswith("following c:1 | ")
    view.set_state("ended")
    assert view.status().plain == ("c:1 ended the stream | 1 alert, 1 action | 13 dropped by "
                                   "the collector (slow reader)")
    view.set_state("stopped")
    assert view.status().plain.startswith("stopped | 1 alert")
    with pytest.raises(ValueError, match="unknown live view state 'gone'"):
        view.set_state("gone")


def test_live_view_render_fits_the_height() -> None:
    view = live.LiveAlertView("c:1")
    for n in range(30):
        view.add_alert(_alert(100 + n, T0 + n, AlertKind.DRIFT, Severity.LOW, f"c{n}", "img",
                              "n", f"reason {n}"))
    lines = render(view.render(80, 12), 80)
    assert len(lines) == 12 - 1  # one line spare: a full frame must not scroll the terminal
    assert lines[0].split() == ["TIME", "KIND", "SEV", "CONTAINER", "IMAGE", "REASON"]
    assert lines[2:-1] == [f"2023-11-14T22:13:{20 + n}Z  drift    low       c{n}        img    "
                           f"reason {n}" for n in range(22, 30)]  # the newest 8
    assert lines[-1] == "connecting to c:1... | 30 alerts, 0 actions | Ctrl-C quits"
    assert lines[1] == "─" * 80
    assert len(render(view.render(80, 3), 80)) == 4  # always at least one row


# -- the live display ----------------------------------------------------------------------------


def test_live_display_draws_and_ends_with_the_last_frame(terminal_size) -> None:
    out = FakeTerminal()
    view = live.LiveAlertView("c:1")
    display = live.LiveDisplay(terminal_console(out, {}), view)
    view.set_state("following")
    display.start()
    view.add_alert(A1)
    assert out.wait_for("web-1")
    view.add_alert(A2)
    view.set_state("ended")
    display.stop()
    display.stop()  # idempotent
    raw = out.getvalue()
    assert raw.startswith("\x1b[?25l")  # cursor hidden while live
    assert raw.endswith("\x1b[?25h")  # and back
    assert screen(out) == [
        "TIME                  KIND     SEV       CONTAINER     IMAGE       NODE    COUNT  "
        "REASON",
        "─" * 100,
        "2023-11-14T22:13:25Z  drift    high      web-1         nginx:1.25  node-a      1  "
        "ran /tmp/x, which…",
        "2023-11-14T22:14:25Z  novel    medium    000000000000  -           node-b      7  "
        "connected to 127.…",
        "c:1 ended the stream | 2 alerts, 0 actions"]


def test_live_display_does_not_redraw_an_unchanged_view(terminal_size) -> None:
    out = FakeTerminal()
    view = live.LiveAlertView("c:1")
    display = live.LiveDisplay(terminal_console(out, {}), view, refresh_per_second=200)
    display.start()
    assert out.wait_for("connecting to c:1")
    threading.Event().wait(0.1)  # 20 refresh periods with nothing new
    display.stop()
    assert display.frames == 1


def test_a_stalled_terminal_never_holds_up_the_reader(terminal_size) -> None:
    gate = threading.Event()
    out = FakeTerminal(gate)
    view = live.LiveAlertView("c:1")
    display = live.LiveDisplay(terminal_console(out, {}), view)
    display.start()  # returns although the terminal takes nothing
    try:
        assert out.first_write.wait(10)  # the display thread is stuck in a write

        def read_stream() -> None:
            for n in range(5000):
                view.add_alert(_alert(1000 + n, T0 + n, AlertKind.DRIFT, Severity.LOW, f"c{n}",
                                      "img", "n", "r"))

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        reader.join(60)
        assert not reader.is_alive()
        assert len(view.rows()) == 1000  # bounded
        assert view.status().plain.startswith("connecting to c:1... | 5000 alerts")
    finally:
        gate.set()
        display.stop()
    assert screen(out)[-2].split()[3] == "c4999"


def test_live_display_rejects_a_bad_rate() -> None:
    with pytest.raises(ValueError, match="refresh_per_second must be above 0, got 0"):
        live.LiveDisplay(Console(file=io.StringIO()), live.LiveAlertView("c:1"),
                          refresh_per_second=0)


# -- the reason at any width ---------------------------------------------------------------------


REAL_REASON = ("ran /tmp/true, which the image does not contain (added at run time); written by "
               "pid 15417 (/bin/busybox) in this container 0.002 s earlier")
REAL = _alert(50, T0 + 90, AlertKind.DRIFT, Severity.HIGH, "dwtest-shop-web-aac6f83a",
              "registry.example:5000/team/dw-bb:947704673a0b", "ip-10-0-12-34.eu-west-1.internal",
              REAL_REASON, count=12345)


@pytest.mark.parametrize("width", [80, 120, 160, 240])
def test_the_live_view_shows_the_reason_at_every_width(monkeypatch, width: int) -> None:
    """What a terminal `width` columns wide shows at the end: the header names REASON, and
    every row shows the start of its reason (the rest of the line is the reason's)."""
    monkeypatch.setenv("COLUMNS", str(width))
    monkeypatch.setenv("LINES", "20")
    out = FakeTerminal()
    view = live.LiveAlertView("c:1")
    display = live.LiveDisplay(terminal_console(out, {}), view)
    display.start()
    for add in (lambda: view.add_alert(A1), lambda: view.add_alert(REAL),
                lambda: view.add_action(_action("done")), lambda: view.add_notice(NOTICE),
                lambda: view.add_alert(A2),
                lambda: view.add_info(T0 + 100, "lost the collector at c:1; reconnecting...")):
        add()
    view.set_state("stopped")
    display.stop()
    frame = screen(out)
    header, rows = frame[0], frame[2:-1]
    assert header.split()[-1] == "REASON"
    start = header.index("REASON")
    reason_width = width - start
    assert reason_width >= 16
    reasons = [A1.reasons[0].text, REAL_REASON, "quarantine done (policy rule quarantine-protect-"
               "drift)", "12 alerts dropped (slow reader)", A2.reasons[0].text,
               "lost the collector at c:1; reconnecting..."]
    assert len(rows) == len(reasons)
    for line, reason in zip(rows, reasons, strict=True):
        shown = line[start:]
        if len(reason) <= reason_width:
            assert shown == reason
        else:  # cut to the width that is left, the cut marked
            assert shown == reason[:reason_width - 1] + "…"
    assert max(len(line) for line in frame) <= width
