"""The detector's judged-known records (Detector._known_again): a connect or write whose exact
identity was judged known (no novel item, no drift) in its container, by the same baseline
object and layers, skips items, novelty and drift and is only counted, as the kernel's map
``known`` does for its identities. Verdicts, windows and provenance must be what judging
every record gives: the same records through a detector that never remembers a judgement are
the reference."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from driftwarden.agent.alerts import ListAlertSink
from driftwarden.agent.detect import Detector, DetectorConfig
from driftwarden.agent.pipeline import ReplayAttribution, ReplayProcReader, TracePipeline
from driftwarden.core.modes import Mode
from driftwarden.core.records import TraceRecord
from driftwarden.models.drift import Layers
from driftwarden.models.items import ItemSet, WriteItem
from driftwarden.models.profile import LearningPolicy, ProfileStore
from driftwarden.probes._layout import FileOp
from driftwarden.probes.capture import ReplayCapture

from tests.test_decode import connect_record, exec_record, file_record
from tests.test_detect_replay import (
    CG,
    IMAGE_ID,
    SECOND,
    _attacks,
    _capture,
    _normal,
    _verdicts,
)


class _Kept:
    def __init__(self) -> None:
        self.records: list[TraceRecord] = []

    def write(self, record: TraceRecord) -> None:
        self.records.append(record)

    def flush(self) -> None:
        pass


class _NeverRemembered(OrderedDict):
    """A judgement cache that keeps nothing: every record is judged in full."""

    def __setitem__(self, key, value) -> None:
        pass


def _records(path: Path, raws: list[bytes]) -> list[TraceRecord]:
    """The records the real pipeline makes of `raws` (a capture replayed)."""
    source = ReplayCapture(_capture(path, raws), batch_size=256)
    kept = _Kept()
    TracePipeline(source, proc=ReplayProcReader(source.facts),
                  attribution=ReplayAttribution(source.facts), sinks=[kept],
                  pending_timeout=0).run(poll_interval=0)
    return kept.records


def _detector(state: Path, *, remember: bool = True, layers=lambda: None
              ) -> tuple[Detector, ListAlertSink]:
    sink = ListAlertSink()
    config = DetectorConfig(window_seconds=1.0, policy=LearningPolicy(), event_time_windows=True)
    detector = Detector(config, ProfileStore(state, ItemSet), sink,
                        layers_of=lambda _c, _t: layers(), clock=lambda: 1e9)
    if not remember:
        detector._judged_known = _NeverRemembered()
    return detector, sink


def _feed(detector: Detector, records: list[TraceRecord]) -> None:
    for i, record in enumerate(records):
        detector.write(record)
        if i % 50 == 0:
            detector.flush()
    detector.flush()


def _hdr(tgid: int, t: float) -> dict:
    return {"cgroup_id": CG, "tgid": tgid, "pid": tgid, "ppid": 900, "ts_ns": int(t * SECOND)}


def _extra(t0: float) -> list[bytes]:
    """Failed writes (no items: never remembered), a known address by another program, and a
    repeated known append after them."""
    return [
        *(file_record(int(FileOp.OPEN), "/var/log/app.log", open_flags=0o2101, mode=0o644,
                      retval=-13, **_hdr(1001, t0 + i / 10)) for i in range(3)),
        exec_record("/usr/bin/psql", ["psql"], **_hdr(3000, t0 + 0.4)),
        connect_record(family=2, addr=bytes([127, 0, 0, 1]), port=5432, **_hdr(3000, t0 + 0.5)),
        connect_record(family=2, addr=bytes([127, 0, 0, 1]), port=5432, **_hdr(3000, t0 + 0.6)),
        *(file_record(int(FileOp.OPEN), "/var/log/app.log", open_flags=0o2101, mode=0o644,
                      **_hdr(1002, t0 + 0.7 + i / 10)) for i in range(3)),
    ]


def test_remembered_judgements_give_the_verdicts_windows_and_stats_of_full_judging(tmp_path):
    learn = _records(tmp_path / "learn.dwcap", _normal(0, 30))
    attack = _records(tmp_path / "attack.dwcap", _attacks(100) + _extra(104))
    results = []
    for remember in (True, False):
        detector, sink = _detector(tmp_path / f"state-{remember}", remember=remember)
        _feed(detector, learn)
        profile = detector.profiles[IMAGE_ID]
        learned_again = detector.stats["known_again"]
        profile.set_mode(Mode.MONITOR, reason="test", who="test", now=1e9)
        _feed(detector, attack)
        detector.close()
        stats = dict(detector.stats)
        monitored_again = stats.pop("known_again", 0) - learned_again
        results.append((learned_again, monitored_again, _verdicts(sink), profile.windows,
                        list(profile.items), stats, detector.windows.stats,
                        [(key, record.event.header, program)
                         for key, (record, program) in detector._writers.items()]))
    remembered, judged = results
    # 300 log appends and 300 connects while learning: the first learns, the second is judged
    # known, the other 298 are counted from the judgement; the 300 temp files are new names
    assert remembered[0] == 2 * 298 and judged[0] == 0
    # monitoring: the 20 appends and 20 connects of the normal tail, 19 of its 20 temp names
    # (the learning replay's first 20, each judged known there but the first, which was new),
    # the 3 appends after the failed writes; psql's connect to the known address is another
    # program's: judged (NOVEL), and so is its repeat (novel again in monitor mode)
    assert remembered[1] == 20 + 20 + 19 + 3 and judged[1] == 0
    assert remembered[2:] == judged[2:]
    novel = [reasons for _, kind, _, _, reasons in remembered[2] if kind == "novel"]
    # both of psql's connects: NOVEL
    assert sum("/usr/bin/psql" in reasons and "5432" in reasons for reasons in novel) == 2


def test_other_layers_are_judged_again(tmp_path):
    """chmod +x of a file the image ships: known; the same chmod once the container's layers
    are another object (a container of the image without that file) is drift."""
    upper, with_tool, without = tmp_path / "upper", tmp_path / "lower-a", tmp_path / "lower-b"
    for root in (upper, with_tool, without):
        (root / "opt").mkdir(parents=True)
    (with_tool / "opt/tool").write_bytes(b"#!/bin/sh\n")
    layers = [Layers(upper=upper, lowers=(with_tool,))]
    records = _records(tmp_path / "chmod.dwcap", [
        file_record(int(FileOp.CHMOD), "/opt/tool", mode=0o755, **_hdr(1000, 1 + i / 10))
        for i in range(4)])
    detector, sink = _detector(tmp_path / "s", layers=lambda: layers[0])
    chmods = [r for r in records if r.kind == "write"]
    _feed(detector, chmods[:3])  # learned, judged known, then counted from the judgement
    assert detector.stats["known_again"] == 1
    assert [a for a in sink.alerts if a.kind.value == "drift"] == []
    layers[0] = Layers(upper=upper, lowers=(without,))
    _feed(detector, chmods[3:])
    assert detector.stats["known_again"] == 1
    [drift] = [a for a in sink.alerts if a.kind.value == "drift"]
    assert drift.reasons[0].code == "chmod-x-new-file"
    assert dict(drift.reasons[0].details)["path"] == "/opt/tool"


def test_a_forgotten_baseline_judges_afresh(tmp_path):
    records = [r for r in _records(tmp_path / "n.dwcap", _normal(0, 1)) if r.kind == "write"]
    appends = [r for r in records if r.path == "/var/log/app.log"]
    detector, _ = _detector(tmp_path / "s")
    _feed(detector, appends[:3])
    assert detector.stats["known_again"] == 1
    detector.forget(IMAGE_ID)
    _feed(detector, appends[3:5])  # a new baseline: learned, then judged known
    assert detector.stats["known_again"] == 1
    assert WriteItem("/var/log/app.log", "create") in detector.profiles[IMAGE_ID].items
    _feed(detector, appends[5:7])
    assert detector.stats["known_again"] == 3


def test_provenance_names_the_latest_write_of_a_remembered_identity(tmp_path):
    """Three creates of /tmp/dropper, the third counted from the second's judgement, then its
    exec: the drift names the third writer, as judging every record does."""
    for name in ("upper/tmp/dropper", "lower/bin/busybox"):  # added at run time; the image's
        (tmp_path / name).parent.mkdir(parents=True)
        (tmp_path / name).write_bytes(b"\x7fELF")
    layers = Layers(upper=tmp_path / "upper", lowers=(tmp_path / "lower",))
    raws = [file_record(int(FileOp.OPEN), "/tmp/dropper", open_flags=0o1101, mode=0o755,
                        **_hdr(tgid, 1 + i / 10)) for i, tgid in enumerate((1000, 1001, 1002))]
    raws.append(exec_record("/tmp/dropper", ["dropper"], **_hdr(2002, 2)))
    records = _records(tmp_path / "d.dwcap", raws)
    found = []
    for remember in (True, False):
        detector, sink = _detector(tmp_path / f"s-{remember}", remember=remember,
                                   layers=lambda: layers)
        _feed(detector, records)
        assert detector.stats.get("known_again", 0) == (1 if remember else 0)
        [drift] = [a for a in sink.alerts if a.kind.value == "drift"]
        found.append(dict(drift.reasons[0].details))
    assert found[0] == found[1]
    assert found[0]["written_by_pid"] == 1002
