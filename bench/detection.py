"""Detection cost: isolation-forest scoring throughput, and the agent's CPU per event with
detection on compared with trace only, in one run.

    python -m bench.detection [--events 200000] [--temp-names K] [--out FILE] [--profile N]

No kernel needed: a synthetic capture (three containers of two images running a realistic mix:
appends to rotated logs, temp files, loopback connects, busybox execs) is written with the
real capture writer and replayed through the real pipeline: with no sink (what `trace
--summary-only` does per event), with the Detector on a new baseline (it learns: items,
baseline, drift checks, windows), and with the Detector on the learned baseline of a first
replay (monitor mode: the steady state). Each is measured with process CPU time; the ratios
are what detection adds. The heap is settled first (core.lifecycle.settle_heap), as the agent
does once started.

Every temp file has a new name unless `--temp-names K` makes them cycle through K names: new
names never repeat exactly, so no cache of judged records helps with them (their pattern,
/tmp/tmp.*, is learned all the same).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from driftwarden.agent.alerts import ListAlertSink
from driftwarden.agent.detect import Detector, DetectorConfig
from driftwarden.agent.pipeline import (
    SNAPSHOT_FACT,
    ReplayAttribution,
    ReplayProcReader,
    TracePipeline,
)
from driftwarden.agent.procfs import ProcessSnapshot
from driftwarden.core.lifecycle import settle_heap
from driftwarden.core.modes import Mode
from driftwarden.core.records import ContainerView
from driftwarden.models.features import FEATURES
from driftwarden.models.forest import WindowModel
from driftwarden.models.forest_child import FitJob, fit_in_child
from driftwarden.models.items import ItemSet
from driftwarden.models.profile import LearningPolicy, ProfileStore
from driftwarden.probes._layout import FileOp, Limits
from driftwarden.probes.capture import CaptureWriter, ReplayCapture

CONTAINERS = [
    (501, "a" * 64, "shop/web:1.2", "sha256:" + "1" * 64),
    (502, "b" * 64, "shop/web:1.2", "sha256:" + "1" * 64),
    (503, "c" * 64, "shop/worker:3", "sha256:" + "2" * 64),
]
_SHELL, _WORKER = 900, 1000  # container i's shell is tgid 900 + i, its workers 1000 + 100 i + k


def _records(n: int, temp_names: int = 0) -> list[bytes]:
    from tests.test_decode import connect_record, exec_record, file_record

    out = []
    for i in range(n):
        c = i % len(CONTAINERS)
        cg, _cid, _image, _iid = CONTAINERS[c]
        # each container's own processes (a host tgid is in one container only): 50 workers
        # under a shell, all running before the recording started (start_ns 0)
        tgid = _WORKER + 100 * c + (i % 50)
        hdr = {"cgroup_id": cg, "tgid": tgid, "pid": tgid, "ppid": _SHELL + c,
               "ts_ns": i * 10_000}
        r = i % 10
        if r < 5:
            out.append(file_record(int(FileOp.OPEN), f"/var/log/app/access.log.{i % 7}",
                                   open_flags=0o2101, mode=0o644, **hdr))
        elif r < 7:
            name = i % temp_names if temp_names else i
            out.append(file_record(int(FileOp.OPEN), f"/tmp/tmp.k{name:07d}x",
                                   open_flags=0o1101, mode=0o600, **hdr))
        elif r < 9:
            out.append(connect_record(family=2, addr=bytes([127, 0, 0, 1]), port=5432,
                                      sock_type=1, **hdr))
        else:
            out.append(exec_record("/proc/self/exe", ["wget", "-q", "http://127.0.0.1/x"],
                                   **hdr))
    return out


def _write_capture(path: Path, n: int, temp_names: int = 0) -> None:
    writer = CaptureWriter(path, Limits(), 0)
    for cg, cid, image, iid in CONTAINERS:
        view = ContainerView(state="container", cgroup_id=cg, id=cid, name=f"c{cg}",
                             image=image, image_id=iid, runtime="docker")
        writer.fact(("attr", cg), view.to_dict(), 0)
    # the processes were running when the recording started: the start-up snapshot names them
    running = []
    for c, (cg, *_) in enumerate(CONTAINERS):
        running.append(ProcessSnapshot(tgid=_SHELL + c, ppid=1, start_ticks=10,
                                       exe="/bin/busybox", argv=("sh",), cwd="/", cgroup_id=cg))
        running += [ProcessSnapshot(tgid=tgid, ppid=_SHELL + c, start_ticks=20,
                                    exe="/bin/busybox", argv=("httpd",), cwd="/", cgroup_id=cg)
                    for tgid in range(_WORKER + 100 * c, _WORKER + 100 * c + 50)]
    writer.fact(SNAPSHOT_FACT, [p.to_dict() for p in running], -1)
    for raw in _records(n, temp_names):
        writer.record(raw)
    writer.close({})


def _learned_baseline(path: Path, state_dir: Path) -> Path:
    """The baselines one replay of the capture learns, switched to monitor with a container
    start seen: the steady state the agent runs in once learning has ended."""
    _replay(path, True, state_dir)
    store = ProfileStore(state_dir, ItemSet)
    for profile in store.list():
        profile.set_mode(Mode.MONITOR, reason="bench: learned", who="bench", now=time.time())
        profile.starts_seen = True
        store.save(profile)
    return state_dir


def _replay(path: Path, detect: bool, state_dir: Path, baseline: Path | None = None
            ) -> tuple[float, int, dict]:
    """One replay; with `baseline`, the detector starts from a copy of those baselines."""
    if baseline is not None:
        shutil.copytree(baseline, state_dir)
    source = ReplayCapture(path, batch_size=1024)
    pipeline = TracePipeline(source, proc=ReplayProcReader(source.facts),
                             attribution=ReplayAttribution(source.facts), sinks=[],
                             pending_timeout=0)
    stats: dict = {}
    if detect:
        detector = Detector(DetectorConfig(window_seconds=1.0, policy=LearningPolicy()),
                            ProfileStore(state_dir, ItemSet), ListAlertSink(),
                            layers_of=lambda _c, _t: None)
        pipeline.sinks.append(detector)
    started = time.process_time()
    summary = pipeline.run(poll_interval=0)
    if detect:
        detector.close()
        stats = dict(detector.stats)
        stats["items"] = {p.image_name: len(p.items) for p in detector.profiles.values()}
    cpu = time.process_time() - started
    return cpu, sum(summary.decoded.get(k, 0) for k in ("exec", "connect", "file")), stats


# the pipeline's stages in a profile: (file, function) -> cumulative time per event
_STAGES = [("decode.py", "decode_batch"), ("pipeline.py", "_enrich_file"),
           ("pipeline.py", "_enrich_connect"), ("pipeline.py", "_enrich_exec"),
           ("detect.py", "write"), ("items.py", "extract_items"),
           ("canonical.py", "canonical_path"), ("items.py", "connect_item"),
           ("features.py", "add"), ("detect.py", "_drift"),
           ("profile.py", "observe"), ("detect.py", "_remember_writes"),
           ("detect.py", "_remember_parent"), ("detect.py", "_known_again")]


def _cumulative(stats: pstats.Stats, where: str, name: str) -> float:
    return sum(v[3] for k, v in stats.stats.items() if k[0].endswith(where) and k[2] == name)


def _profile(path: Path, state_dir: Path, top: int, baseline: Path | None) -> list[str]:
    """One replay with detection under cProfile, as markdown table rows: the stages'
    cumulative time per event, then the functions with the most own time (share of the
    profiled run's total). The profiler inflates every call (about 2.6x here): compare the
    rows with each other, not with the unprofiled figures."""
    if baseline is not None:
        shutil.copytree(baseline, state_dir)
    profiler = cProfile.Profile()
    profiler.enable()
    _, events, _ = _replay(path, True, state_dir)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    rows = [f"| `{name}` | {_cumulative(stats, where, name) / events * 1e6:.1f} us |"
            for where, name in _STAGES]
    rows += ["", f"Profiled total: {total / events * 1e6:.1f} us per event, "
             f"{stats.total_calls / events:.0f} calls per event. The functions with the most "
             "own time:", "", "| function | own time | calls/event | cumulative |",
             "|---|---|---|---|"]
    ranked = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    for (filename, line, name), (_cc, calls, own, cumulative, _callers) in ranked:
        where = Path(filename).name if filename != "~" else "builtin"
        rows.append(f"| `{where}:{line} {name}` | {own / total * 100:.1f}% | "
                    f"{calls / events:.2f} | {cumulative / total * 100:.1f}% |")
    return rows


def _scoring() -> dict[str, float]:
    rng = np.random.RandomState(0)
    train = np.zeros((500, len(FEATURES)))
    train[:, 0] = rng.poisson(3, 500)
    train[:, 4] = rng.poisson(5, 500)
    train[:, 10] = rng.poisson(10, 500)
    WindowModel().fit(train)  # the first fit imports scikit-learn: not timed
    t = time.perf_counter()
    model = WindowModel().fit(train)
    fit_s = time.perf_counter() - t
    t = time.perf_counter()
    fit_in_child([FitJob(model.inputs(train))])  # as the agent fits: start, imports, fit
    child_s = time.perf_counter() - t
    batch = np.tile(train, (3, 1))[:1024]
    t = time.perf_counter()
    for _ in range(20):
        model.score(batch)
    batched = 20 * 1024 / (time.perf_counter() - t)
    t = time.perf_counter()
    for row in batch[:50]:
        model.score(row.reshape(1, -1))
    single = 50 / (time.perf_counter() - t)
    return {"fit_s": fit_s, "child_fit_s": child_s, "rows_per_s_batched": batched,
            "rows_per_s_single": single}


_PIPELINES = ("trace only", "with detection, learning", "with detection, learned baseline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.detection", description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--temp-names", type=int, default=0, metavar="K",
                        help="temp files cycle through K names (default 0: every one new)")
    parser.add_argument("--out", default=None, help="also write the markdown report here")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile one replay with detection on the learned baseline "
                        "(cProfile) and report the N functions with the most own time")
    args = parser.parse_args(argv)
    if args.temp_names < 0:
        parser.error(f"--temp-names must be >= 0, got {args.temp_names}")
    with tempfile.TemporaryDirectory() as tmp:
        capture = Path(tmp) / "synthetic.dwcap"
        _write_capture(capture, args.events, args.temp_names)
        learned = _learned_baseline(capture, Path(tmp) / "learned")
        settle_heap()  # as the agent does once started: later collections walk new objects
        runs: dict[str, list] = {name: [] for name in _PIPELINES}
        for i in range(6):  # alternate, medians
            for name in _PIPELINES[:: 1 if i % 2 else -1]:
                runs[name].append(_replay(
                    capture, name != "trace only", Path(tmp) / f"state{i}-{len(runs[name])}"
                    f"-{_PIPELINES.index(name)}", learned if "learned" in name else None))
        profile = (_profile(capture, Path(tmp) / "profiled", args.profile, learned)
                   if args.profile else [])
    scoring = _scoring()
    med = {name: float(np.median([c for c, _, _ in r])) for name, r in runs.items()}
    events = runs["trace only"][0][1]
    command = f"python -m bench.detection --events {args.events}"
    if args.temp_names:
        command += f" --temp-names {args.temp_names}"
    if args.profile:
        command += f" --profile {args.profile}"
    lines = [
        "# Detection cost",
        "",
        f"Command: `{command}`; one run, 6 alternating replays each, medians of process CPU "
        "time. Temp files: " + (f"{args.temp_names} names, cycled" if args.temp_names else
                                "a new name each (never repeated)") + ".",
        "",
        "| pipeline | CPU per event | events/s per core | detection adds | records judged "
        "again from a known identity |",
        "|---|---|---|---|---|",
    ]
    for name in _PIPELINES:
        per = med[name] / events
        stats = runs[name][-1][2]
        added = (f"{(med[name] - med['trace only']) / events * 1e6:.1f} us "
                 f"({med[name] / med['trace only']:.2f}x)" if name != "trace only" else "")
        again = (f"{stats.get('known_again', 0) / events:.0%}" if name != "trace only" else "")
        lines.append(f"| {name} | {per * 1e6:.1f} us | {1 / per:,.0f} | {added} | {again} |")
    lines += [
        "",
        f"Baselines learned: {runs[_PIPELINES[1]][-1][2].get('items')}.",
        "",
        "| isolation forest (500 training windows, 21 features) | value |",
        "|---|---|",
        f"| fit (100 trees), in this process | {scoring['fit_s'] * 1000:.0f} ms |",
        f"| fit in a child process, as the agent fits (start, imports, fit) | "
        f"{scoring['child_fit_s'] * 1000:.0f} ms |",
        f"| scoring, batches of 1024 | {scoring['rows_per_s_batched']:,.0f} rows/s |",
        f"| scoring, one row at a time | {scoring['rows_per_s_single']:,.0f} rows/s |",
        "",
    ]
    if profile:
        lines += [
            f"Where the time goes (`--profile {args.profile}`: one replay with detection on the "
            "learned baseline under cProfile; per stage, cumulative time per event averaged "
            "over all events):",
            "",
            "| stage | profiled time per event |",
            "|---|---|",
            *profile,
            "",
        ]
    report = "\n".join(lines)
    print(report)
    if args.out:
        Path(args.out).write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
