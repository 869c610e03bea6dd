"""driftwarden.ops.tables: row cells, column layout, rich tables, the live view and its
display thread. Rendering goes to rich consoles on StringIO (no terminal needed)."""

from __future__ import annotations

import io
import re
import threading

import pytest
from driftwarden.core import wire
from driftwarden.core.alerts import Alert, AlertKind, AlertReason, Severity
from driftwarden.ops import tables as table
from driftwarden.proto.v1 import actions_pb2, alerts_pb2, common_pb2
from rich.console import Console
from rich.text import Text

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _alert(n: int, when: float, kind: AlertKind, severity: Severity, name: str | None,
           image: str | None, node: str, text: str, count: int = 1) -> common_pb2.Alert:
    return wire.alert_to_proto(Alert(
        id=f"{n:024x}", time=when, kind=kind, severity=severity, score=1.0,
        reasons=(AlertReason("code", text),),
        container={"id": f"{n:064x}", "name": name, "image": image, "image_id": None,
                   "pod": None, "namespace": None},
        process=None, events=(), baseline_version=3, count=count), node)


A1 = _alert(1, T0 + 5, AlertKind.DRIFT, Severity.HIGH, "web-1", "nginx:1.25", "node-a",
            "ran /tmp/x, which the image does not contain (added at run time)")
A2 = _alert(2, T0 + 65, AlertKind.NOVEL, Severity.MEDIUM, None, None, "node-b",
            "connected to 127.0.0.1:4444, never seen for this image", count=7)
A1_AGAIN = _alert(1, T0 + 5, AlertKind.DRIFT, Severity.HIGH, "web-1", "nginx:1.25", "node-a",
                  "ran /tmp/x, which the image does not contain (added at run time)", count=4)


def _action(status: str, *, message: str = "", who: str = "policy:quarantine-protect-drift",
            finished: bool = True) -> actions_pb2.Action:
    action = actions_pb2.Action(
        action_id="act-1", type=actions_pb2.ACTION_TYPE_QUARANTINE,
        status=wire.ACTION_STATUS.to_proto(status), message=message, container_id="ab" * 32,
        container_name="web-1", node="node-a", requested_by=who,
        requested_at=wire.to_timestamp(T0 + 6))
    if finished:
        action.finished_at.CopyFrom(wire.to_timestamp(T0 + 7))
    return action


NOTICE = alerts_pb2.StreamNotice(dropped=12, text="slow reader", time=wire.to_timestamp(T0 + 70))


def plain(row: list[Text]) -> list[str]:
    return [cell.plain for cell in row]


def render(renderable, width: int) -> list[str]:
    """`renderable` as text lines (no colours), trailing spaces dropped."""
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return [line.rstrip() for line in console.file.getvalue().splitlines()]


def last_frame(raw: str) -> list[str]:
    """The last frame a rich Live wrote: what follows its last erase-line code, uncoloured."""
    return [line.rstrip() for line in _ANSI.sub("", raw.split("\x1b[2K")[-1]).splitlines()]


@pytest.fixture
def terminal_size(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    monkeypatch.setenv("LINES", "10")


# -- cells ---------------------------------------------------------------------------------------


def test_alert_row_cells_and_severity_style() -> None:
    row = table.alert_row(A1)
    assert plain(row) == ["2023-11-14T22:13:25Z", "high", "drift", "node-a", "web-1",
                          "nginx:1.25", "ran /tmp/x, which the image does not contain (added at "
                          "run time)", "1"]
    assert [str(cell.style) for cell in row] == ["", "bold red", "", "", "", "", "", ""]
    row = table.alert_row(A2)  # no name, no image: the id's first 12, "-"
    assert plain(row) == ["2023-11-14T22:14:25Z", "medium", "novel", "node-b", "000000000000",
                          "-", "connected to 127.0.0.1:4444, never seen for this image", "7"]
    assert str(row[1].style) == "yellow"


@pytest.mark.parametrize(("severity", "style"), [
    (Severity.LOW, "cyan"), (Severity.MEDIUM, "yellow"), (Severity.HIGH, "bold red"),
    (Severity.CRITICAL, "bold white on red")])
def test_every_severity_has_a_style(severity: Severity, style: str) -> None:
    msg = _alert(3, T0, AlertKind.ANOMALY, severity, "db", "pg:16", "n", "x")
    assert str(table.alert_row(msg)[1].style) == style


def test_cells_never_carry_control_characters() -> None:
    evil = _alert(9, T0, AlertKind.DRIFT, Severity.CRITICAL, "x\x1b[2Jy", "img\nz", "n\t1",
                  "bad\rreason")
    assert plain(table.alert_row(evil))[3:7] == ["n?1", "x?[2Jy", "img?z", "bad?reason"]
    action = _action("failed", message="no\x07bell", who="operator:al\x1bice")
    assert plain(table.action_row(action))[6] == ("quarantine failed: no?bell (by operator "
                                                  "al?ice)")


@pytest.mark.parametrize(("status", "message", "who", "reason", "style"), [
    ("done", "", "policy:quarantine-protect-drift",
     "quarantine done (policy rule quarantine-protect-drift)", "green"),
    ("skipped", "dry run: would quarantine", "policy:r1",
     "quarantine skipped: dry run: would quarantine (policy rule r1)", "yellow"),
    ("failed", "agent for node node-a is not connected", "operator:alice",
     "quarantine failed: agent for node node-a is not connected (by operator alice)", "bold red"),
    ("pending", "", "", "quarantine pending", "dim"),
])
def test_action_row(status: str, message: str, who: str, reason: str, style: str) -> None:
    row = table.action_row(_action(status, message=message, who=who))
    assert plain(row) == ["2023-11-14T22:13:27Z", "", "action", "node-a", "web-1", "-", reason,
                          ""]
    assert str(row[2].style) == "magenta"
    status_span = [span for span in row[6].spans if str(span.style) == style]
    assert [row[6].plain[s.start:s.end] for s in status_span] == [status]


def test_action_row_time_is_the_request_while_pending() -> None:
    assert plain(table.action_row(_action("pending", finished=False)))[0] == (
        "2023-11-14T22:13:26Z")


def test_notice_and_info_rows() -> None:
    row = table.notice_row(NOTICE)
    assert plain(row) == ["2023-11-14T22:14:30Z", "", "notice", "", "", "",
                          "12 alerts dropped (slow reader)", ""]
    assert (str(row[2].style), str(row[6].style)) == ("bold red", "bold red")
    row = table.info_row(T0 + 1000.7, "lost the collector at 127.0.0.1:1; reconnecting...")
    assert plain(row) == ["2023-11-14T22:30:00Z", "", "", "", "", "",
                          "lost the collector at 127.0.0.1:1; reconnecting...", ""]
    assert str(row[6].style) == "dim italic"


# -- layout --------------------------------------------------------------------------------------


ROWS = [table.alert_row(A1), table.alert_row(A2)]


@pytest.mark.parametrize(("width", "fill", "widths"), [
    (140, False, {"TIME": 20, "SEV": 8, "KIND": 7, "NODE": 6, "CONTAINER": 12, "IMAGE": 10,
                  "REASON": 58, "COUNT": 5}),
    (200, False, {"TIME": 20, "SEV": 8, "KIND": 7, "NODE": 6, "CONTAINER": 12, "IMAGE": 10,
                  "REASON": 64, "COUNT": 5}),  # as long as the longest reason
    (200, True, {"TIME": 20, "SEV": 8, "KIND": 7, "NODE": 6, "CONTAINER": 12, "IMAGE": 10,
                 "REASON": 118, "COUNT": 5}),  # the rest of the line
    (100, True, {"TIME": 20, "SEV": 8, "KIND": 7, "NODE": 6, "CONTAINER": 12, "IMAGE": 10,
                 "REASON": 18, "COUNT": 5}),
    (80, False, {"TIME": 20, "SEV": 8, "KIND": 7, "CONTAINER": 10,
                 "REASON": 27}),  # CONTAINER shrunk, then COUNT and NODE hidden
    (60, True, {"TIME": 20, "SEV": 8, "KIND": 7, "CONTAINER": 10, "REASON": 7}),  # IMAGE too
])
def test_column_widths(width: int, fill: bool, widths: dict[str, int]) -> None:
    got = table.column_widths(width, ROWS, fill=fill)
    assert got == widths
    assert list(got) == [c.name for c in table.COLUMNS if c.name in widths]  # in order
    if fill:
        assert sum(got.values()) + table.GAP * (len(got) - 1) == width


def test_column_widths_shrink_before_hiding() -> None:
    long = _alert(5, T0, AlertKind.ANOMALY, Severity.LOW, "a-very-long-container-name",
                  "registry.example:5000/team/some-image:1.2.3", "node-with-long-name", "r" * 80)
    rows = [table.alert_row(long)]
    assert table.column_widths(140, rows, fill=True) == {  # the caps
        "TIME": 20, "SEV": 8, "KIND": 7, "NODE": 12, "CONTAINER": 18, "IMAGE": 24,
        "REASON": 32, "COUNT": 5}
    assert table.column_widths(110, rows, fill=True) == {  # IMAGE shrunk
        "TIME": 20, "SEV": 8, "KIND": 7, "NODE": 12, "CONTAINER": 18, "IMAGE": 10,
        "REASON": 16, "COUNT": 5}
    assert table.column_widths(100, rows, fill=True) == {  # IMAGE, CONTAINER, NODE shrunk
        "TIME": 20, "SEV": 8, "KIND": 7, "NODE": 10, "CONTAINER": 10, "IMAGE": 10,
        "REASON": 16, "COUNT": 5}


def test_column_widths_of_no_rows_are_the_headers() -> None:
    assert table.column_widths(100, [], fill=True) == {
        "TIME": 20, "SEV": 8, "KIND": 7, "NODE": 4, "CONTAINER": 9, "IMAGE": 5, "REASON": 28,
        "COUNT": 5}


# -- tables --------------------------------------------------------------------------------------


def test_alerts_table_lines() -> None:
    rows = [*ROWS, table.action_row(_action("done")), table.notice_row(NOTICE)]
    assert render(table.alerts_table(rows, table.column_widths(100, rows)), 100) == [
        "TIME                  SEV       KIND     NODE    CONTAINER     IMAGE       REASON"
        "              COUNT",
        "─" * 100,
        "2023-11-14T22:13:25Z  high      drift    node-a  web-1         nginx:1.25  ran /tmp/x, "
        "which…      1",
        "2023-11-14T22:14:25Z  medium    novel    node-b  000000000000  -           connected to "
        "127.…      7",
        "2023-11-14T22:13:27Z            action   node-a  web-1         -           quarantine "
        "done (…",
        "2023-11-14T22:14:30Z            notice                                     12 alerts "
        "dropped…"]


def test_alerts_table_hides_columns_on_a_narrow_terminal() -> None:
    assert render(table.alerts_table(ROWS, table.column_widths(60, ROWS)), 60) == [
        "TIME                  SEV       KIND     CONTAINER   REASON",
        "─" * 60,
        "2023-11-14T22:13:25Z  high      drift    web-1       ran /t…",
        "2023-11-14T22:14:25Z  medium    novel    000000000…  connec…"]


def test_agents_table_lines_and_styles() -> None:
    columns = [("NODE", False), ("CONNECTED", False), ("SPOOL", True), ("DROPPED", True)]
    rows = [["node-a", "yes", "0", "14"], ["node-b", "no", "1234", "0"]]
    got = table.agents_table(columns, rows)
    assert render(got, 80) == ["NODE    CONNECTED  SPOOL  DROPPED", "─" * 33,
                               "node-a  yes            0       14",
                               "node-b  no          1234        0"]
    cells = [[str(cell.style) for cell in col.cells] for col in got.columns]
    assert cells == [["", ""], ["green", "red"], ["", "yellow"], ["yellow", ""]]


def _colour_output(env: dict[str, str]) -> str:
    out = io.StringIO()
    console = table.terminal_console(out, env)
    console.print(table.alerts_table(ROWS, table.column_widths(100, ROWS)))
    return out.getvalue()


def test_colours_and_no_color(terminal_size) -> None:
    coloured = _colour_output({})
    assert "\x1b[1;31mhigh" in coloured  # bold red
    assert "\x1b[33mmedium" in coloured  # yellow
    bare = _colour_output({"NO_COLOR": "1"})
    assert "\x1b[1mhigh" in bare  # bold stays
    assert re.findall(r"\x1b\[[0-9;]*(?:3[0-7]|4[0-7])m", bare) == []  # no colour at all
    assert _colour_output({"NO_COLOR": ""}) == coloured  # empty means unset


def test_texts_are_not_markup(terminal_size) -> None:
    tricky = _alert(4, T0, AlertKind.DRIFT, Severity.LOW, "[bold]x[/bold]", ":smile:", "n",
                    "[red]not red[/red]")
    rows = [table.alert_row(tricky)]
    out = io.StringIO()
    table.terminal_console(out, {"NO_COLOR": "1"}).print(
        table.alerts_table(rows, table.column_widths(100, rows)))
    assert "[bold]x[/bold]  :smile:  [red]not red[/red]" in _ANSI.sub("", out.getvalue())


# -- the live view -------------------------------------------------------------------------------


def test_live_view_update_replaces_the_row_and_moves_it_to_the_bottom() -> None:
    view = table.LiveAlertView("127.0.0.1:1")
    view.add_alert(A1)
    view.add_alert(A2)
    view.add_alert(A1_AGAIN)
    assert [(r[4].plain, r[7].plain) for r in view.rows()] == [("000000000000", "7"),
                                                              ("web-1", "4")]
    assert view.status().plain == ("connecting to 127.0.0.1:1... | 3 alerts, 0 actions | "
                                   "Ctrl-C quits")


def test_live_view_is_bounded() -> None:
    view = table.LiveAlertView("c:1", capacity=3)
    for n in range(10):
        view.add_info(T0 + n, f"line {n}")
    assert [r[6].plain for r in view.rows()] == ["line 7", "line 8", "line 9"]
    assert [r[6].plain for r in view.rows(2)] == ["line 8", "line 9"]
    assert view.rows(0) == []


def test_live_view_counts_and_states() -> None:
    view = table.LiveAlertView("c:1")
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
    view = table.LiveAlertView("c:1")
    for n in range(30):
        view.add_alert(_alert(100 + n, T0 + n, AlertKind.DRIFT, Severity.LOW, f"c{n}", "img",
                              "n", f"reason {n}"))
    lines = render(view.render(80, 12), 80)
    assert len(lines) == 12 - 1  # one line spare: a full frame must not scroll the terminal
    assert lines[0].split() == ["TIME", "SEV", "KIND", "CONTAINER", "IMAGE", "REASON"]
    assert lines[2:-1] == [f"2023-11-14T22:13:{20 + n}Z  low       drift    c{n}        img    "
                           f"reason {n}" for n in range(22, 30)]  # the newest 8
    assert lines[-1] == "connecting to c:1... | 30 alerts, 0 actions | Ctrl-C quits"
    assert lines[1] == "─" * 80
    assert len(render(view.render(80, 3), 80)) == 4  # always at least one row


# -- the live display ----------------------------------------------------------------------------


class _Terminal(io.StringIO):
    """A StringIO rich takes for a terminal; `gate` (when given) holds every write until set,
    like a terminal that stopped reading (Ctrl-S, a stuck ssh session)."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.first_write = threading.Event()
        self._changed = threading.Condition()

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.first_write.set()
        if self.gate is not None:
            self.gate.wait()
        with self._changed:
            written = super().write(text)
            self._changed.notify_all()
        return written

    def wait_for(self, text: str, timeout: float = 10.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: text in self.getvalue(), timeout)


def test_live_display_draws_and_ends_with_the_last_frame(terminal_size) -> None:
    out = _Terminal()
    view = table.LiveAlertView("c:1")
    display = table.LiveDisplay(table.terminal_console(out, {}), view)
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
    assert last_frame(raw) == [
        "TIME                  SEV       KIND     NODE    CONTAINER     IMAGE       REASON"
        "              COUNT",
        "─" * 100,
        "2023-11-14T22:13:25Z  high      drift    node-a  web-1         nginx:1.25  ran /tmp/x, "
        "which…      1",
        "2023-11-14T22:14:25Z  medium    novel    node-b  000000000000  -           connected to "
        "127.…      7",
        "c:1 ended the stream | 2 alerts, 0 actions"]


def test_live_display_does_not_redraw_an_unchanged_view(terminal_size) -> None:
    out = _Terminal()
    view = table.LiveAlertView("c:1")
    display = table.LiveDisplay(table.terminal_console(out, {}), view, refresh_per_second=200)
    display.start()
    assert out.wait_for("connecting to c:1")
    threading.Event().wait(0.1)  # 20 refresh periods with nothing new
    display.stop()
    assert display.frames == 1


def test_a_stalled_terminal_never_holds_up_the_reader(terminal_size) -> None:
    gate = threading.Event()
    out = _Terminal(gate)
    view = table.LiveAlertView("c:1")
    display = table.LiveDisplay(table.terminal_console(out, {}), view)
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
    assert last_frame(out.getvalue())[-2].split()[4] == "c4999"


def test_live_display_rejects_a_bad_rate() -> None:
    with pytest.raises(ValueError, match="refresh_per_second must be above 0, got 0"):
        table.LiveDisplay(Console(file=io.StringIO()), table.LiveAlertView("c:1"),
                          refresh_per_second=0)
