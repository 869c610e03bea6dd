"""driftwarden.ops.tables (the one table engine: column sets, rows, widths, plain and rich
rendering) and driftwarden.ops.format (texts). Rich output goes to consoles on StringIO."""

from __future__ import annotations

import io
import re

import pytest
from driftwarden.core import wire
from driftwarden.core.alerts import Alert, AlertKind, AlertReason, Severity
from driftwarden.ops import tables as table
from driftwarden.ops.format import action_outcome_line, format_age, notice_text
from driftwarden.proto.v1 import actions_pb2, agent_pb2, alerts_pb2, common_pb2
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


def action(status: str, *, message: str = "", who: str = "policy:quarantine-protect-drift",
           finished: bool = True) -> actions_pb2.Action:
    msg = actions_pb2.Action(
        action_id="act-1", type=actions_pb2.ACTION_TYPE_QUARANTINE,
        status=wire.ACTION_STATUS.to_proto(status), message=message, container_id="ab" * 32,
        container_name="web-1", node="node-a", requested_by=who,
        requested_at=wire.to_timestamp(T0 + 6))
    if finished:
        msg.finished_at.CopyFrom(wire.to_timestamp(T0 + 7))
    return msg


NOTICE = alerts_pb2.StreamNotice(dropped=12, text="slow reader", time=wire.to_timestamp(T0 + 70))
AGENT = agent_pb2.Agent(node="node-a", agent_version="0.5.0", mode=common_pb2.MODE_LEARN,
                        connected=True, last_heartbeat=wire.to_timestamp(T0 - 4),
                        counters=[common_pb2.KindCounters(kind="exec", dropped=3),
                                  common_pb2.KindCounters(kind="file", dropped=11)],
                        containers_watched=12, spool_depth=0)


def by_name(columns: table.ColumnSet, row: table.Row) -> dict[str, str]:
    return dict(zip(columns.names, (c.plain for c in row), strict=True))


def styles(columns: table.ColumnSet, row: table.Row) -> dict[str, str]:
    return {name: str(c.style) for name, c in zip(columns.names, row, strict=True) if c.style}


def render(renderable, width: int) -> list[str]:
    """`renderable` as text lines (no colours), trailing spaces dropped."""
    console = Console(file=io.StringIO(), width=width, color_system=None)
    console.print(renderable)
    return [line.rstrip() for line in console.file.getvalue().splitlines()]


# -- texts ---------------------------------------------------------------------------------------


def test_format_age() -> None:
    assert [format_age(s) for s in (-3, 0, 59.9, 60, 3599, 3600, 86399, 86400 * 3)] == [
        "0s ago", "0s ago", "59s ago", "1m ago", "59m ago", "1h ago", "23h ago", "3d ago"]


def test_notice_and_outcome_texts_are_cleaned() -> None:
    assert notice_text(alerts_pb2.StreamNotice(dropped=1, text="a\nb")) == "1 alert dropped (a?b)"
    response = actions_pb2.ActionResponse(status=actions_pb2.ACTION_STATUS_FAILED,
                                          message="no\x1b[2Jway", container_id="c" * 64,
                                          node="n\r1")
    assert action_outcome_line("kill", "web\x07", response) == (
        "kill web? (cccccccccccc) on n?1: failed: no?[2Jway")


# -- rows ----------------------------------------------------------------------------------------


def test_alert_row_cells_and_severity_style() -> None:
    row = table.alert_row(A1)
    assert by_name(table.ALERTS, row) == {
        "TIME": "2023-11-14T22:13:25Z", "KIND": "drift", "SEV": "high", "CONTAINER": "web-1",
        "IMAGE": "nginx:1.25", "NODE": "node-a", "COUNT": "1",
        "REASON": "ran /tmp/x, which the image does not contain (added at run time)"}
    assert styles(table.ALERTS, row) == {"SEV": "bold red"}
    row = table.alert_row(A2)  # no name, no image: the id's first 12, "-"
    assert by_name(table.ALERTS, row) == {
        "TIME": "2023-11-14T22:14:25Z", "KIND": "novel", "SEV": "medium",
        "CONTAINER": "000000000000", "IMAGE": "-", "NODE": "node-b", "COUNT": "7",
        "REASON": "connected to 127.0.0.1:4444, never seen for this image"}
    assert styles(table.ALERTS, row) == {"SEV": "yellow"}


@pytest.mark.parametrize(("severity", "style"), [
    (Severity.LOW, "cyan"), (Severity.MEDIUM, "yellow"), (Severity.HIGH, "bold red"),
    (Severity.CRITICAL, "bold white on red")])
def test_every_severity_has_a_style(severity: Severity, style: str) -> None:
    msg = _alert(3, T0, AlertKind.ANOMALY, severity, "db", "pg:16", "n", "x")
    assert styles(table.ALERTS, table.alert_row(msg)) == {"SEV": style}


def test_cells_never_carry_control_characters() -> None:
    evil = _alert(9, T0, AlertKind.DRIFT, Severity.CRITICAL, "x\x1b[2Jy", "img\nz", "n\t1",
                  "bad\rreason\u202e")
    cells = by_name(table.ALERTS, table.alert_row(evil))
    assert [cells[n] for n in ("CONTAINER", "IMAGE", "NODE", "REASON")] == [
        "x?[2Jy", "img?z", "n?1", "bad?reason?"]
    row = table.action_row(action("failed", message="no\x07bell", who="operator:al\x1bice"))
    assert by_name(table.ALERTS, row)["REASON"] == "quarantine failed: no?bell (by operator al?ice)"
    # the plain renderer cleans whatever it is given, too
    assert table.plain_line(table.ALERTS, table.layout(table.ALERTS, None),
                            ["t", "k", "s", "c\x1b", "", "", "", "r\n"]).split() == [
        "t", "k", "s", "c?", "-", "-", "-", "r?"]


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
    row = table.action_row(action(status, message=message, who=who))
    assert by_name(table.ALERTS, row) == {
        "TIME": "2023-11-14T22:13:27Z", "KIND": "action", "SEV": "", "CONTAINER": "web-1",
        "IMAGE": "", "NODE": "node-a", "COUNT": "", "REASON": reason}
    assert styles(table.ALERTS, row) == {"KIND": "magenta"}
    reason_cell = row[table.ALERTS.names.index("REASON")]
    status_span = [span for span in reason_cell.spans if str(span.style) == style]
    assert [reason_cell.plain[s.start:s.end] for s in status_span] == [status]


def test_action_row_time_is_the_request_while_pending() -> None:
    row = table.action_row(action("pending", finished=False))
    assert by_name(table.ALERTS, row)["TIME"] == "2023-11-14T22:13:26Z"


def test_notice_and_info_rows() -> None:
    row = table.notice_row(NOTICE)
    assert by_name(table.ALERTS, row) == {
        "TIME": "2023-11-14T22:14:30Z", "KIND": "notice", "SEV": "", "CONTAINER": "",
        "IMAGE": "", "NODE": "", "COUNT": "", "REASON": "12 alerts dropped (slow reader)"}
    assert styles(table.ALERTS, row) == {"KIND": "bold red", "REASON": "bold red"}
    row = table.info_row(T0 + 1000.7, "lost the collector at 127.0.0.1:1; reconnecting...")
    assert by_name(table.ALERTS, row) == {
        "TIME": "2023-11-14T22:30:00Z", "KIND": "", "SEV": "", "CONTAINER": "", "IMAGE": "",
        "NODE": "", "COUNT": "", "REASON": "lost the collector at 127.0.0.1:1; reconnecting..."}
    assert styles(table.ALERTS, row) == {"REASON": "dim italic"}


def test_agent_row_cells_and_styles() -> None:
    row = table.agent_row(AGENT, float(T0))
    assert by_name(table.AGENTS, row) == {
        "NODE": "node-a", "CONNECTED": "yes", "VERSION": "0.5.0", "MODE": "learn",
        "CONTAINERS": "12", "BASELINES": "0", "SPOOL": "0", "DROPPED": "14",
        "LAST HEARTBEAT": "4s ago"}
    assert styles(table.AGENTS, row) == {"CONNECTED": "green", "DROPPED": "yellow"}
    gone = agent_pb2.Agent(node="node-c", spool_depth=3)
    assert by_name(table.AGENTS, table.agent_row(gone, float(T0))) == {
        "NODE": "node-c", "CONNECTED": "no", "VERSION": "-", "MODE": "-", "CONTAINERS": "0",
        "BASELINES": "0", "SPOOL": "3", "DROPPED": "0", "LAST HEARTBEAT": "never"}
    assert styles(table.AGENTS, table.agent_row(gone, float(T0))) == {"CONNECTED": "red",
                                                                      "SPOOL": "yellow"}


def test_a_column_set_has_one_last_column_that_takes_the_rest() -> None:
    with pytest.raises(ValueError, match=r"the last column, and only it, takes the rest"):
        table.ColumnSet((table.Column("A", 1, None), table.Column("B", 1, 5)))
    with pytest.raises(ValueError, match=r"the last column, and only it"):
        table.ColumnSet((table.Column("A", 1, 2), table.Column("B", 1, 5)))
    with pytest.raises(ValueError, match=r"shrink/hide name columns \['B'\]"):
        table.ColumnSet((table.Column("A", 1, 2), table.Column("B", 1, None)), hide=("B",))
    with pytest.raises(ValueError, match=r"no column \['X'\]"):
        table.ALERTS.row({"X": Text("x")})


# -- widths --------------------------------------------------------------------------------------


ROWS = [table.alert_row(A1), table.alert_row(A2)]


def test_plain_widths_are_the_widest_cells_and_a_stream_gets_the_usual_widths() -> None:
    assert table.layout(table.ALERTS, ROWS) == {
        "TIME": 20, "KIND": 5, "SEV": 6, "CONTAINER": 12, "IMAGE": 10, "NODE": 6, "COUNT": 5,
        "REASON": 64}
    assert table.layout(table.ALERTS, None) == {
        "TIME": 20, "KIND": 7, "SEV": 8, "CONTAINER": 18, "IMAGE": 24, "NODE": 12, "COUNT": 5,
        "REASON": 6}


@pytest.mark.parametrize(("width", "fill", "widths"), [
    (140, False, {"TIME": 20, "KIND": 7, "SEV": 8, "CONTAINER": 12, "IMAGE": 10, "NODE": 6,
                  "COUNT": 5, "REASON": 58}),
    (200, False, {"TIME": 20, "KIND": 7, "SEV": 8, "CONTAINER": 12, "IMAGE": 10, "NODE": 6,
                  "COUNT": 5, "REASON": 64}),  # as long as the longest reason
    (200, True, {"TIME": 20, "KIND": 7, "SEV": 8, "CONTAINER": 12, "IMAGE": 10, "NODE": 6,
                 "COUNT": 5, "REASON": 118}),  # the rest of the line
    (100, True, {"TIME": 20, "KIND": 7, "SEV": 8, "CONTAINER": 12, "IMAGE": 10, "NODE": 6,
                 "COUNT": 5, "REASON": 18}),
    (80, False, {"TIME": 20, "KIND": 7, "SEV": 8, "CONTAINER": 10,
                 "REASON": 27}),  # CONTAINER shrunk, then COUNT, NODE and IMAGE hidden
    (60, True, {"TIME": 20, "KIND": 7, "SEV": 8, "REASON": 19}),  # CONTAINER too
    (40, True, {"TIME": 20, "SEV": 8, "REASON": 8}),  # KIND too; the reason keeps what is left
])
def test_terminal_widths(width: int, fill: bool, widths: dict[str, int]) -> None:
    got = table.layout(table.ALERTS, ROWS, width, fill=fill)
    assert got == widths
    assert list(got) == [name for name in table.ALERTS.names if name in widths]  # in order
    if fill:
        assert sum(got.values()) + table.GAP * (len(got) - 1) == width


def test_terminal_columns_shrink_before_hiding() -> None:
    long = _alert(5, T0, AlertKind.ANOMALY, Severity.LOW, "a-very-long-container-name",
                  "registry.example:5000/team/some-image:1.2.3", "node-with-long-name", "r" * 80)
    rows = [table.alert_row(long)]
    assert table.layout(table.ALERTS, rows, 140, fill=True) == {  # the caps
        "TIME": 20, "KIND": 7, "SEV": 8, "CONTAINER": 18, "IMAGE": 24, "NODE": 12, "COUNT": 5,
        "REASON": 32}
    assert table.layout(table.ALERTS, rows, 110, fill=True) == {  # IMAGE shrunk
        "TIME": 20, "KIND": 7, "SEV": 8, "CONTAINER": 18, "IMAGE": 10, "NODE": 12, "COUNT": 5,
        "REASON": 16}
    assert table.layout(table.ALERTS, rows, 100, fill=True) == {  # IMAGE, CONTAINER, NODE too
        "TIME": 20, "KIND": 7, "SEV": 8, "CONTAINER": 10, "IMAGE": 10, "NODE": 10, "COUNT": 5,
        "REASON": 16}


def test_terminal_widths_of_no_rows_are_the_headers() -> None:
    assert table.layout(table.ALERTS, [], 100, fill=True) == {
        "TIME": 20, "KIND": 7, "SEV": 8, "CONTAINER": 9, "IMAGE": 5, "NODE": 4, "COUNT": 5,
        "REASON": 28}


# -- plain ---------------------------------------------------------------------------------------


def test_plain_lines_are_aligned_never_cut_and_every_field_is_there() -> None:
    rows = [*ROWS, table.action_row(action("done")), table.notice_row(NOTICE)]
    assert table.plain_lines(table.ALERTS, rows) == [
        "TIME                  KIND    SEV     CONTAINER     IMAGE       NODE    COUNT  REASON",
        "2023-11-14T22:13:25Z  drift   high    web-1         nginx:1.25  node-a      1  ran "
        "/tmp/x, which the image does not contain (added at run time)",
        "2023-11-14T22:14:25Z  novel   medium  000000000000  -           node-b      7  "
        "connected to 127.0.0.1:4444, never seen for this image",
        "2023-11-14T22:13:27Z  action  -       web-1         -           node-a      -  "
        "quarantine done (policy rule quarantine-protect-drift)",
        "2023-11-14T22:14:30Z  notice  -       -             -           -           -  12 "
        "alerts dropped (slow reader)"]


def test_a_plain_cell_wider_than_its_column_pushes_the_line() -> None:
    widths = table.layout(table.ALERTS, None)  # a stream: the usual widths
    long = _alert(6, T0, AlertKind.DRIFT, Severity.LOW, "c" * 30, "img", "n", "why " * 80)
    line = table.plain_row(table.ALERTS, widths, table.alert_row(long))
    assert line == ("2023-11-14T22:13:20Z  drift    low       " + "c" * 30 + "  img" + " " * 23
                    + "n" + " " * 13 + "    1  " + "why " * 80)  # the text as it came
    assert line.split(maxsplit=7)[3] == "c" * 30


def test_plain_agents_table() -> None:
    rows = [table.agent_row(AGENT, float(T0)), table.agent_row(agent_pb2.Agent(node="b"),
                                                               float(T0))]
    assert table.plain_lines(table.AGENTS, rows) == [
        "NODE    CONNECTED  VERSION  MODE   CONTAINERS  BASELINES  SPOOL  DROPPED  LAST HEARTBEAT",
        "node-a  yes        0.5.0    learn          12          0      0       14  4s ago",
        "b       no         -        -               0          0      0        0  never"]


# -- rich ----------------------------------------------------------------------------------------


def test_rich_table_lines() -> None:
    rows = [*ROWS, table.action_row(action("done")), table.notice_row(NOTICE)]
    widths = table.layout(table.ALERTS, rows, 100)
    assert render(table.rich_table(table.ALERTS, rows, widths), 100) == [
        "TIME                  KIND     SEV       CONTAINER     IMAGE       NODE    COUNT  REASON",
        "─" * 100,
        "2023-11-14T22:13:25Z  drift    high      web-1         nginx:1.25  node-a      1  ran "
        "/tmp/x, which…",
        "2023-11-14T22:14:25Z  novel    medium    000000000000  -           node-b      7  "
        "connected to 127.…",
        "2023-11-14T22:13:27Z  action             web-1                     node-a         "
        "quarantine done (…",
        "2023-11-14T22:14:30Z  notice                                                      12 "
        "alerts dropped…"]


def test_rich_table_hides_columns_on_a_narrow_terminal() -> None:
    assert render(table.rich_table(table.ALERTS, ROWS, table.layout(table.ALERTS, ROWS, 60)),
                  60) == ["TIME                  KIND     SEV       REASON",
                          "─" * 60,
                          "2023-11-14T22:13:25Z  drift    high      ran /tmp/x, which …",
                          "2023-11-14T22:14:25Z  novel    medium    connected to 127.0…"]


def test_rich_agents_table_lines_and_styles() -> None:
    rows = [table.agent_row(AGENT, float(T0))]
    got = table.rich_table(table.AGENTS, rows, table.layout(table.AGENTS, rows, 80))
    assert render(got, 80) == [  # BASELINES is the first to go on a narrow terminal
        "NODE    CONNECTED  VERSION  MODE     CONTAINERS  SPOOL  DROPPED  LAST HEARTBEAT",
        "─" * 79,
        "node-a  yes        0.5.0    learn            12      0       14  4s ago"]
    assert [[str(c.style) for c in col.cells] for col in got.columns][1] == ["green"]


@pytest.mark.parametrize("columns", [table.ALERTS, table.AGENTS])
def test_one_engine_plain_and_rich_show_the_same_columns_in_the_same_order(
        columns: table.ColumnSet) -> None:
    rows = ROWS if columns is table.ALERTS else [table.agent_row(AGENT, float(T0))]
    plain_header = table.plain_lines(columns, rows)[0]
    rich_header = render(table.rich_table(columns, rows, table.layout(columns, rows, 300)),
                         300)[0]
    names = list(columns.names)
    assert re.split(r"\s{2,}", plain_header) == names
    assert re.split(r"\s{2,}", rich_header) == names
    for row in rows:  # and the same cells
        plain = re.split(r"\s{2,}", table.plain_row(columns, table.layout(columns, rows), row))
        assert [c.plain or "-" for c in row] == plain


def _colour_output(env: dict[str, str]) -> str:
    out = io.StringIO()
    console = table.terminal_console(out, env)
    console.print(table.rich_table(table.ALERTS, ROWS, table.layout(table.ALERTS, ROWS, 100)))
    return out.getvalue()


def test_colours_and_no_color(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    coloured = _colour_output({})
    assert "\x1b[1;31mhigh" in coloured  # bold red
    assert "\x1b[33mmedium" in coloured  # yellow
    bare = _colour_output({"NO_COLOR": "1"})
    assert "\x1b[1mhigh" in bare  # bold stays
    assert re.findall(r"\x1b\[[0-9;]*(?:3[0-7]|4[0-7])m", bare) == []  # no colour at all
    assert _colour_output({"NO_COLOR": ""}) == coloured  # empty means unset


def test_texts_are_not_markup(monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")
    tricky = _alert(4, T0, AlertKind.DRIFT, Severity.LOW, "[bold]x[/bold]", ":smile:", "n",
                    "[red]not red[/red]")
    rows = [table.alert_row(tricky)]
    out = io.StringIO()
    table.terminal_console(out, {"NO_COLOR": "1"}).print(
        table.rich_table(table.ALERTS, rows, table.layout(table.ALERTS, rows, 100)))
    assert "[bold]x[/bold]  :smile:  n         1  [red]not red[/red]" in _ANSI.sub(
        "", out.getvalue())
