"""Fairness under floods (issue 12.3), userspace: the kernel's over-budget counts become flood
episodes (one sensor-flood alert each), tainted windows, bounded metrics series and the trace
summary's per-container lines; the budget settings and their flag. The kernel side is in
tests/test_flood_live.py."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest
from driftwarden.agent.alerts import ListAlertSink
from driftwarden.agent.command import add_parsers, options_from_args
from driftwarden.agent.detect import Detector, DetectorConfig
from driftwarden.agent.flood import (
    OTHER_SERIES,
    TAINT_REASON,
    FloodWatch,
    ReadWhenMoved,
    container_rows,
    flood_reason,
    format_container_rows,
)
from driftwarden.core.alerts import AlertKind, Severity
from driftwarden.core.errors import UsageError
from driftwarden.core.records import ContainerView, TraceRecord
from driftwarden.models.features import Window
from driftwarden.models.items import ItemSet
from driftwarden.models.profile import ProfileStore
from driftwarden.probes._layout import AT_FDCWD, EventKind, FileOp, Flag
from driftwarden.probes.events import FileEvent, Header
from driftwarden.probes.loader import (
    DEFAULT_BUDGETS,
    UNLIMITED,
    Budget,
    BudgetUsage,
    ProbeConfig,
    parse_budget,
)

from tests.test_alerts import FakeClock
from tests.test_detect_replay import CG, VIEW

OTHER_CG = 5151
OTHER = ContainerView(state="container", cgroup_id=OTHER_CG, id="d" * 64, name="builder",
                      image="ci/build:3", image_id="sha256:" + "b" * 64, started_at=-1000.0)
SECOND = 1_000_000_000
APPEND = 0o2101


@dataclass
class FakeUsage:
    """What ProbeSet.budget_usage would read: (cgroup, kind) -> (over budget, dropped)."""

    counts: dict = field(default_factory=dict)
    evicted: int = 0

    def read(self) -> BudgetUsage:
        return BudgetUsage(dict(self.counts), self.evicted)


def views(cgid: int) -> ContainerView:
    return {CG: VIEW, OTHER_CG: OTHER}.get(cgid) or ContainerView(state="unknown",
                                                                  cgroup_id=cgid)


def watch(usage: FakeUsage, clock: FakeClock, **kw) -> FloodWatch:
    return FloodWatch(usage.read, views, clock=clock, **{"quiet_seconds": 2.0, **kw})


# -- episodes ----------------------------------------------------------------------------------


def test_an_episode_starts_at_the_first_growth_and_ends_after_a_quiet_period():
    usage, clock = FakeUsage(), FakeClock(1000.0)
    flood = watch(usage, clock)
    assert flood.poll(1000.5) == []
    usage.counts = {(CG, "write"): (900, 0), (CG, "connect"): (0, 0)}
    [episode] = flood.poll(1001.0)
    assert (episode.cgroup_id, episode.view, episode.started, episode.last) == (
        CG, VIEW, 1000.5, 1001.0)
    assert dict(episode.over) == {"write": 900}
    usage.counts = {(CG, "write"): (1500, 0), (CG, "connect"): (40, 0)}
    assert flood.poll(1002.0) == []  # the same episode: no second alert
    assert dict(episode.over) == {"write": 1500, "connect": 40}
    assert flood.poll(1003.5) == [] and CG in flood.episodes  # quiet for 1.5 s only
    assert flood.poll(1004.0) == [] and CG not in flood.episodes  # 2 s quiet: over
    usage.counts[(CG, "write")] = (1600, 0)
    [again] = flood.poll(1005.0)  # a new episode: a new alert
    assert again is not episode and dict(again.over) == {"write": 100}
    assert again.started == 1004.0
    assert flood.stats["episodes"] == 2


def test_a_count_that_fell_was_evicted_and_made_again_so_all_of_it_is_new():
    usage, clock = FakeUsage({(CG, "write"): (700, 0)}), FakeClock(1000.0)
    flood = watch(usage, clock)
    [episode] = flood.poll(1001.0)
    usage.counts, usage.evicted = {(CG, "write"): (30, 0)}, 1
    flood.poll(1002.0)
    assert episode.over["write"] == 730
    assert flood.evicted == 1


def test_drops_alone_are_counted_for_the_container_but_are_no_flood():
    usage, clock = FakeUsage({(OTHER_CG, "write"): (0, 12)}), FakeClock(1000.0)
    flood = watch(usage, clock)
    assert flood.poll(1001.0) == []
    assert flood.episodes == {}
    assert flood.series() == {("builder", "ci/build:3", "write", "over_budget"): 0,
                              ("builder", "ci/build:3", "write", "dropped"): 12}
    assert not flood.flooded(OTHER.id, 1000.0, 1001.0)


def test_an_episode_is_alerted_once_its_container_is_described_or_after_a_while():
    pending = ContainerView(state="pending", cgroup_id=CG, id=VIEW.id)
    known = {CG: pending, 77: ContainerView(state="unknown", cgroup_id=77)}
    usage, clock = FakeUsage({(CG, "write"): (10, 0), (77, "write"): (5, 0)}), FakeClock(1000.0)
    flood = FloodWatch(usage.read, known.__getitem__, clock=clock)
    assert flood.poll(1000.5) == []  # both still being looked up
    known[CG] = VIEW
    [described] = flood.poll(1001.0)  # no growth, but now it has a name
    assert (described.view, described.over["write"]) == (VIEW, 10)
    assert flood.poll(1002.9) == []
    [unknown] = flood.poll(1003.0)  # 3 s: alerted as what is known
    assert unknown.cgroup_id == 77 and unknown.view.state == "unknown"
    assert flood.poll(1004.0) == []


def test_the_map_is_read_again_only_when_the_kernel_totals_moved_or_it_is_old():
    usage, clock = FakeUsage({(CG, "write"): (0, 0)}), FakeClock(0.0)
    reads, totals = [], [0]

    def read():
        reads.append(clock.t)
        return usage.read()

    reader = ReadWhenMoved(read, lambda: totals[0], max_age=5.0, clock=clock)
    first = reader()
    clock.t = 1.0
    assert reader() is first  # nothing held back or lost since: the last read stands
    usage.counts = {(CG, "write"): (7, 1)}
    totals[0] = 8
    assert reader().counts == {(CG, "write"): (7, 1)}
    clock.t = 5.9
    reader()
    clock.t = 6.1  # 5 s after the last full read: read again (evictions move no total)
    reader()
    assert reads == [0.0, 1.0, 6.1]
    assert reader.skipped == 2


def test_the_alert_reason_carries_the_counts_per_kind():
    usage, clock = FakeUsage({(CG, "write"): (200_000, 3), (CG, "exec"): (5, 0)}), FakeClock()
    [episode] = watch(usage, clock).poll(1001.0)
    reason = flood_reason(episode)
    assert reason.code == "sensor-flood"
    assert dict(reason.details) == {
        "over_budget_exec": 5, "over_budget_connect": 0, "over_budget_write": 200_000,
        "over_budget_chdir": 0, "over_budget_fork": 0, "dropped_exec": 0, "dropped_connect": 0,
        "dropped_write": 3, "dropped_chdir": 0, "dropped_fork": 0, "seconds": 1.0,
        "cgroup_id": CG}
    assert reason.text == (
        "sent more events than its budget: 5 exec, 200000 write held back in 1.0 s (counted "
        "in the kernel, not reported); its windows are not learned while the flood lasts; 3 "
        "more lost, the ring buffer being full")


# -- windows -----------------------------------------------------------------------------------


def _window(container_id: str, start: float, tainted: tuple[str, ...] = ()) -> Window:
    return Window(container_id=container_id, image_id=None, start=start, end=start + 1.0,
                  vector=(0.0,), events=1, tainted=bool(tainted), taint_reasons=tainted)


def test_windows_overlapping_a_flood_span_of_their_container_are_tainted():
    usage, clock = FakeUsage(), FakeClock(1000.0)
    flood = watch(usage, clock)
    flood.poll(1001.2)
    usage.counts = {(CG, "write"): (10, 0)}
    flood.poll(1001.7)  # the excess happened in (1001.2, 1001.7]
    out = flood.taint([_window(VIEW.id, 1000.0), _window(VIEW.id, 1001.0),
                       _window(VIEW.id, 1002.0), _window(OTHER.id, 1001.0),
                       _window(VIEW.id, 1001.0, ("kernel dropped events",))])
    assert [(w.start, w.tainted, w.taint_reasons) for w in out] == [
        (1000.0, False, ()), (1001.0, True, (TAINT_REASON,)), (1002.0, False, ()),
        (1001.0, False, ()), (1001.0, True, ("kernel dropped events", TAINT_REASON))]
    assert flood.stats["windows_tainted"] == 2


def _write(t: float, path: str = "/data/app.log") -> TraceRecord:
    header = Header(kind=EventKind.FILE, ts_ns=int(t * SECOND), cgroup_id=CG, pid=700, tgid=700,
                    ppid=1, uid=0, gid=0, comm="app", flags=Flag(0), suppressed=0)
    event = FileEvent(header=header, op=FileOp.OPEN, path=path, path2=None, dirfd=AT_FDCWD,
                      dirfd2=0, open_flags=APPEND, mode=0o644, retval=3)
    return TraceRecord(event=event, kind="write", container=VIEW, ppid=1, path=path)


def test_the_detector_alerts_once_per_episode_and_learns_no_flooded_window(tmp_path):
    usage, clock, sink = FakeUsage(), FakeClock(1000.0), ListAlertSink()
    flood = watch(usage, clock, poll_seconds=0.25)
    detector = Detector(DetectorConfig(window_seconds=1.0, event_time_windows=True),
                        ProfileStore(tmp_path, ItemSet), sink, layers_of=lambda _c, _t: None,
                        clock=clock, flood=flood)

    def at(t: float) -> None:
        clock.t = t
        detector.write(_write(t))
        detector.flush()

    at(1000.1)
    usage.counts = {(CG, "write"): (500, 0)}
    at(1000.5)  # the first growth: an episode, its alert
    [alert] = sink.alerts
    assert (alert.kind, alert.severity, alert.process, alert.time) == (
        AlertKind.ANOMALY, Severity.MEDIUM, None, 1000.5)
    assert alert.container["id"] == VIEW.id and alert.baseline_mode == "learn"
    assert [r.code for r in alert.reasons] == ["sensor-flood"]
    assert dict(alert.reasons[0].details)["over_budget_write"] == 500
    for t in (1001.2, 1002.5, 1003.5):  # no growth; 3 s after the last one the episode ends
        at(t)
    assert len(sink.alerts) == 1 and flood.episodes == {}
    usage.counts = {(CG, "write"): (800, 0)}
    at(1004.5)  # a second episode: a second alert, with what it held back
    assert len(sink.alerts) == 2 and sink.alerts[1].id != alert.id
    assert dict(sink.alerts[1].reasons[0].details)["over_budget_write"] == 300
    at(1005.5)
    progress = detector.profiles[VIEW.image_id].progress
    # tainted: [1000, 1001) and, the second flood being in (1003.5, 1004.5], [1003, 1005)
    assert (progress.windows_learned, progress.windows_tainted) == (2, 3)
    assert detector.stats["alerts_anomaly"] == 2


def test_a_window_is_not_handed_over_before_the_counts_of_its_time_were_read(tmp_path):
    usage, clock, sink = FakeUsage(), FakeClock(1000.0), ListAlertSink()
    flood = watch(usage, clock, poll_seconds=3600.0)  # never due by time
    detector = Detector(DetectorConfig(window_seconds=1.0, event_time_windows=True),
                        ProfileStore(tmp_path, ItemSet), sink, layers_of=lambda _c, _t: None,
                        clock=clock, flood=flood)
    clock.t = 1000.1
    detector.write(_write(1000.1))
    detector.flush()
    usage.counts = {(CG, "write"): (50, 0)}  # held back at 1000.9
    clock.t = 1001.1
    detector.write(_write(1001.1))
    detector.flush()  # [1000, 1001) closes after the last read: read again first
    assert [r.code for a in sink.alerts for r in a.reasons] == ["sensor-flood"]
    assert detector.profiles[VIEW.image_id].progress.windows_tainted == 1


# -- metrics series and the trace summary --------------------------------------------------------


def test_series_are_bounded_and_only_grow():
    usage, clock = FakeUsage(), FakeClock(1000.0)
    flood = watch(usage, clock, max_series=1)
    usage.counts = {(CG, "write"): (10, 0), (OTHER_CG, "connect"): (3, 1), (77, "exec"): (2, 0)}
    flood.poll(1001.0)
    assert flood.series() == {
        ("web", "shop/web:1", "write", "over_budget"): 10,
        ("web", "shop/web:1", "write", "dropped"): 0,
        (*OTHER_SERIES, "connect", "over_budget"): 3, (*OTHER_SERIES, "connect", "dropped"): 1,
        (*OTHER_SERIES, "exec", "over_budget"): 2, (*OTHER_SERIES, "exec", "dropped"): 0}
    usage.counts[(CG, "write")] = (25, 0)
    flood.poll(1002.0)
    assert flood.series()[("web", "shop/web:1", "write", "over_budget")] == 25


def test_the_trace_summary_lists_the_containers_that_lost_most():
    usage = BudgetUsage({(CG, "write"): (100, 0), (OTHER_CG, "write"): (5000, 2),
                         (OTHER_CG, "exec"): (1, 0), (77, "connect"): (0, 0)}, 2)
    rows = container_rows(usage, views)
    assert rows == [
        {"container": "builder", "image": "ci/build:3", "cgroup_id": OTHER_CG,
         "over_budget": {"exec": 1, "write": 5000}, "dropped": {"exec": 0, "write": 2}},
        {"container": "web", "image": "shop/web:1", "cgroup_id": CG,
         "over_budget": {"write": 100}, "dropped": {"write": 0}}]
    assert container_rows(usage, views, top=1) == rows[:1]
    assert format_container_rows(rows, 2) == [
        "  held back by budget / lost (ring buffer full), per container:",
        "    builder                  ci/build:3               exec 1/0, write 5000/2",
        "    web                      shop/web:1               write 100/0",
        "    (2 container counts evicted from the kernel's map)"]
    assert format_container_rows([]) == []


# -- settings ------------------------------------------------------------------------------------


def test_budgets_are_defines_with_defaults_per_kind():
    flags = [f for f in ProbeConfig(budgets=parse_budget("write=100")).cflags()
             if "BUDGET" in f]
    assert flags == ["-DDW_BUDGET_EXEC_RATE=1000", "-DDW_BUDGET_EXEC_BURST=2000",
                     "-DDW_BUDGET_CONNECT_RATE=2000", "-DDW_BUDGET_CONNECT_BURST=4000",
                     "-DDW_BUDGET_FILE_RATE=100", "-DDW_BUDGET_FILE_BURST=200",
                     "-DDW_BUDGET_CHDIR_RATE=2000", "-DDW_BUDGET_CHDIR_BURST=4000",
                     "-DDW_BUDGET_FORK_RATE=5000", "-DDW_BUDGET_FORK_BURST=10000",
                     "-DDW_BUDGET_ENTRIES=16384"]
    assert ProbeConfig().budget("write") == DEFAULT_BUDGETS["write"] == Budget(5000, 10000)
    assert parse_budget("connect=50/7") == (("connect", Budget(50, 7)),)
    assert parse_budget("exec=off") == (("exec", UNLIMITED),)
    assert dict(parse_budget("off")) == {"exec": UNLIMITED, "connect": UNLIMITED,
                                         "write": UNLIMITED, "chdir": UNLIMITED,
                                         "fork": UNLIMITED}
    assert parse_budget("chdir=500") == (("chdir", Budget(500, 1000)),)
    assert "-DDW_BUDGET_FILE_RATE=0" in ProbeConfig(budgets=parse_budget("off")).cflags()


@pytest.mark.parametrize(("text", "message"), [
    ("exit=10", "KIND one of exec,connect,write,chdir,fork"),
    ("write", "KIND=RATE"),
    ("write=fast", "whole numbers"),
    ("write=0", "use write=off"),
    ("write=10/0", "burst must be >= 1"),
    ("write=-5", "rate must be 0"),
])
def test_bad_budgets_say_what_to_give(text, message):
    with pytest.raises(UsageError, match=message):
        parse_budget(text)


def test_the_budget_flag_of_agent_and_trace():
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    args = parser.parse_args(["agent", "--state-dir", "/tmp/s", "--budget", "write=300/600",
                              "--budget", "exec=off"])
    assert options_from_args(args).budgets == (("write", Budget(300, 600)), ("exec", UNLIMITED))
    assert options_from_args(parser.parse_args(["agent", "--state-dir", "/s"])).budgets == ()
    trace = parser.parse_args(["trace", "--budget", "off"])
    assert trace.budget == [parse_budget("off")]
    with pytest.raises(SystemExit):
        parser.parse_args(["trace", "--budget", "write=lots"])


def test_an_idle_node_is_read_less_often_until_a_count_grows():
    usage, clock = FakeUsage(), FakeClock(1000.0)
    flood = watch(usage, clock, poll_seconds=0.25, idle_poll_seconds=1.0, idle_after=10.0)
    assert flood.due(1000.25) is True
    flood.poll(1009.9)
    assert flood.due(1010.15) is False and flood.due(1010.9) is True  # nothing grew for 10 s
    flood.poll(1010.9)
    usage.counts = {(CG, "write"): (10, 0)}
    [episode] = flood.poll(1011.9)  # a flood that starts now is seen at the next idle poll
    assert episode.started == 1010.9
    assert flood.due(1012.15) is True  # an episode is open: every 0.25 s again
    assert flood.poll(1012.15) == []
    flood.poll(1014.0)  # quiet for 2 s: the episode is over, the growth is 2.1 s old
    assert flood.episodes == {} and flood.due(1014.25) is True
    flood.poll(1021.9)  # 10 s since the growth: idle again
    assert flood.due(1022.15) is False and flood.due(1022.9) is True
