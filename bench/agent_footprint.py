"""The agent's footprint on a busy node: RSS and CPU with many containers of many images learned.

    python -m bench.agent_footprint [--images 20] [--per-image 10] [--out bench/FOOTPRINT.md]

Builds IMAGES small images (the test busybox image, each with its own label, so each has its
own image id and baseline), starts the agent (`driftwarden agent`, learning locally for
--learn-for seconds), then IMAGES x PER_IMAGE loopback-only containers. Each container runs a
small workload for --active seconds (an append to a log, a connect to its own loopback, an
exec, every 2 s), then sleeps: learning ends while they are active, and the node is idle after.
Measured from the agent process (psutil): RSS at its peak and at the end, CPU share of one core
while the workloads run after learning, and while everything is idle. Everything started is
removed at the end, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import BenchError, run_bench

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "FOOTPRINT.md"
WORKLOAD = ("mkdir -p /data; i=0; while [ $i -lt {loops} ]; do echo tick >> /data/app.log; "
            "nc -w1 127.0.0.1 8080 </dev/null; i=$((i+1)); sleep 2; done; exec sleep 3600")
READY = "agent running"


@dataclass(frozen=True)
class FootprintConfig:
    images: int = 20
    per_image: int = 10
    learn_for: float = 40.0
    active: float = 90.0  # seconds each container's workload runs
    idle_seconds: float = 60.0
    command: str = "python -m bench.agent_footprint"


@dataclass
class FootprintResult:
    config: FootprintConfig
    started: float
    finished: float
    containers: int
    start_seconds: float  # to start every container
    rss_peak_mb: float
    rss_end_mb: float
    cpu_active: float  # share of one core, workloads running, learning over
    cpu_idle: float  # share of one core, every container asleep
    samples: list[tuple[float, float]] = field(default_factory=list)  # (t, rss MB)
    agent_stats: str = ""


def _images(client, count: int) -> list[str]:
    from tests.support.images import busybox_image

    base = busybox_image()
    tags = []
    for i in range(count):
        tag = f"dw-footprint:{i}"
        dockerfile = f"FROM {base}\nLABEL driftwarden.bench.variant={i}\n"
        client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
        tags.append(tag)
    return tags


def _cpu(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def run(config: FootprintConfig, log) -> FootprintResult:
    import psutil

    from tests.support.containers import TEST_LABEL, check_network, docker_client, unique_name

    check_network("none", {})
    client = docker_client()
    started = time.time()
    state = Path(tempfile.mkdtemp(prefix="dw-footprint-"))
    agent = None
    containers = []
    samples: list[tuple[float, float]] = []
    try:
        tags = _images(client, config.images)
        log(f"[bench] {len(tags)} images built")
        agent_log = open(state / "agent.log", "wb")  # noqa: SIM115 - handed to the child
        agent = psutil.Popen(
            [sys.executable, "-m", "driftwarden", "agent", "--state-dir", str(state / "s"),
             "--alerts-out", "/dev/null", "--learn-for", f"{config.learn_for:g}"],
            cwd=REPO_ROOT, stdout=agent_log, stderr=agent_log, start_new_session=True)
        agent_log.close()
        deadline = time.monotonic() + 90
        while READY not in (state / "agent.log").read_text(errors="replace"):
            if agent.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"agent did not start: {(state / 'agent.log').read_text()[-500:]}")
            time.sleep(0.2)

        def sample() -> None:
            samples.append((time.monotonic(), agent.memory_info().rss / 2**20))

        t0 = time.monotonic()
        loops = int(config.active / 2)
        for i in range(config.images * config.per_image):
            c = client.containers.run(
                tags[i % len(tags)], ["/bin/sh", "-c", WORKLOAD.format(loops=loops)],
                name=unique_name("footprint"), labels={TEST_LABEL: "1"}, network_mode="none",
                detach=True)
            containers.append(c)
            if i % 20 == 0:
                sample()
        start_seconds = time.monotonic() - t0
        log(f"[bench] {len(containers)} containers started in {start_seconds:.0f} s")
        # learning ends learn_for after each image's first event; then measure while active
        until_learned = t0 + config.learn_for + 10
        while time.monotonic() < until_learned:
            sample()
            time.sleep(2)
        cpu0, w0 = _cpu(agent), time.monotonic()
        active_end = t0 + config.active - 5
        while time.monotonic() < active_end:
            sample()
            time.sleep(2)
        cpu_active = (_cpu(agent) - cpu0) / max(time.monotonic() - w0, 1e-9)
        # every workload is asleep once its loops ended
        time.sleep(max(0.0, t0 + start_seconds + config.active + 10 - time.monotonic()))
        cpu0, w0 = _cpu(agent), time.monotonic()
        while time.monotonic() - w0 < config.idle_seconds:
            sample()
            time.sleep(2)
        cpu_idle = (_cpu(agent) - cpu0) / (time.monotonic() - w0)
        rss_end = agent.memory_info().rss / 2**20
        agent.send_signal(2)
        with contextlib.suppress(psutil.TimeoutExpired):
            agent.wait(60)
        stats = [ln for ln in (state / "agent.log").read_text(errors="replace").splitlines()
                 if "agent stopped" in ln or "kernel baseline filter" in ln]
        return FootprintResult(config, started, time.time(), len(containers), start_seconds,
                               max(rss for _, rss in samples), rss_end, cpu_active, cpu_idle,
                               samples, " | ".join(stats))
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
        for c in containers:
            with contextlib.suppress(Exception):
                c.remove(force=True, v=True)
        client.close()


def render(result: FootprintResult) -> str:
    cfg = result.config
    rows = [
        ("containers", f"{result.containers} ({cfg.images} images x {cfg.per_image})"),
        ("time to start them", f"{result.start_seconds:.0f} s"),
        ("agent RSS, peak", f"{result.rss_peak_mb:.0f} MB (target < 150 MB)"),
        ("agent RSS, end", f"{result.rss_end_mb:.0f} MB"),
        ("agent CPU, workloads running after learning",
         f"{100 * result.cpu_active:.1f}% of a core"),
        ("agent CPU, every container idle", f"{100 * result.cpu_idle:.2f}% of a core "
         "(target < 1%)"),
        ("agent's exit lines", result.agent_stats or "-"),
    ]
    rss = [r for _, r in result.samples]
    out = [
        "# driftwarden agent footprint\n",
        f"Command: `{cfg.command}`  \nRun took {(result.finished - result.started) / 60:.1f} "
        f"min on {os.cpu_count()} cores, "
        f"{dt.datetime.fromtimestamp(result.started, dt.UTC):%Y-%m-%d %H:%M UTC}.\n",
        f"Each container: `{WORKLOAD.format(loops=int(cfg.active / 2))}` (an append, a "
        f"connect, the execs of nc and sleep every 2 s for {cfg.active:.0f} s, then asleep). "
        f"The agent learns locally (`--learn-for {cfg.learn_for:g}`), then monitors.\n",
        "| item | value |", "|---|---|",
        *(f"| {a} | {b} |" for a, b in rows),
        "",
        f"RSS samples (MB, every ~2 s): median {statistics.median(rss):.0f}, "
        f"min {min(rss):.0f}, max {max(rss):.0f}.",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.agent_footprint", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=20)
    p.add_argument("--per-image", type=int, default=10)
    p.add_argument("--learn-for", type=float, default=40.0)
    p.add_argument("--active", type=float, default=90.0)
    p.add_argument("--idle-seconds", type=float, default=60.0)
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("needs root (BPF programs and Docker)")
    if min(args.images, args.per_image) < 1 or args.active <= args.learn_for + 20:
        p.error("--images and --per-image must be >= 1, --active > --learn-for + 20")
    config = FootprintConfig(args.images, args.per_image, args.learn_for, args.active,
                             args.idle_seconds, " ".join(
                                 ["python -m bench.agent_footprint",
                                  *map(shlex.quote, sys.argv[1:])]))
    code, _ = run_bench(lambda: run(config, lambda m: print(m, file=sys.stderr, flush=True)),
                        render, out=args.out, cleaned_up="agent stopped, containers removed")
    return code


if __name__ == "__main__":
    sys.exit(main())
