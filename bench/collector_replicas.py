"""Collector stores and replicas: alerts/s through the collector and alert -> subscriber latency
for SQLite (1 replica), PostgreSQL (1 replica) and PostgreSQL (2 replicas), in one run.

    python -m bench.collector_replicas [--quick] [--out FILE]

Every configuration runs real `driftwarden collector` processes (``--db FILE``, or ``--store
URL`` on a PostgreSQL server the bench starts with Debian's initdb and pg_ctl, as the tests do:
tests/support/postgres.py), 8 synthetic agents and 2 subscribers, each a spawned process
speaking the real gRPC API (bench/collector_e2e.py part 3); the subscribers ask for batched
delivery (``max_batch`` 500, as ``alerts --follow`` does). With 2 replicas, agents and
subscribers alternate between them: subscriber 0 and agents 0, 2, 4, 6 on replica A,
subscriber 1 and agents 1, 3, 5, 7 on B, so half of what a subscriber gets crossed replicas
(NOTIFY, then a read of the store). Every row has a fresh store (a new SQLite file, a new
PostgreSQL database) and must account for every alert: acked once, stored once, delivered once
to each subscriber (or reported dropped by the collector's overflow notices, which the table
shows).

Two rows per configuration:

- throughput: unpaced; batches of 100 alerts, at most 8 batches awaiting an ack per agent.
  acked alerts/s = alerts / time to the last ack; delivered = the slower subscriber's alerts /
  time to its last alert; alert -> subscriber here is mostly queueing (load, not latency);
- latency: paced at a fixed total rate, one alert a batch (what an agent sends when alerts are
  rare): ms from the agent's send to each subscriber's receipt, p50/p99 over every alert and
  subscriber (one CLOCK_MONOTONIC for all processes). The exec -> agent part (the kernel, the
  agent's detection and spool) is bench/collector_e2e.py part 1.

The PostgreSQL server runs with the harness's settings (fsync off, synchronous_commit off), the
SQLite store with its own (WAL, synchronous=NORMAL): neither waits for a disk flush per commit.
All processes share this host's cores: on a small host the numbers are those of a crowded one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.collector_e2e import (
    DROPPED,
    BenchConfig,
    ThroughputResult,
    ThroughputSpec,
    _count_alerts,
    _f,
    _loadavg,
    _table,
    drive_throughput,
    percentile,
)
from bench.common import BenchError, run_bench

AGENTS = 8
SUBSCRIBERS = 2
SUBSCRIBER_BATCH = 500  # SubscribeRequest.max_batch: what a subscriber that keeps up asks for


@dataclass(frozen=True)
class Setup:
    """One configuration: the store and how many collector replicas share it."""

    store: str  # "SQLite" or "PostgreSQL"
    replicas: int

    @property
    def label(self) -> str:
        return f"{self.store} ({self.replicas} replica{'s' if self.replicas > 1 else ''})"


SETUPS = (Setup("SQLite", 1), Setup("PostgreSQL", 1), Setup("PostgreSQL", 2))


@dataclass(frozen=True)
class ReplicaBenchConfig:
    throughput_alerts: int = 16_000  # unpaced row, over all agents
    latency_rate: float = 400.0  # alerts/s over all agents, paced row
    latency_seconds: float = 10.0
    command: str = "python -m bench.collector_replicas"

    def __post_init__(self) -> None:
        if self.throughput_alerts < AGENTS or not self.latency_rate > 0:
            raise ValueError("throughput_alerts must be >= the agents, latency_rate > 0")
        if self.latency_rate * self.latency_seconds < AGENTS:
            raise ValueError("the latency row needs at least one alert per agent")

    def specs(self) -> tuple[tuple[str, ThroughputSpec, BenchConfig], ...]:
        """(row, spec, the part-3 settings it runs with)."""
        return (
            ("throughput", ThroughputSpec(AGENTS, SUBSCRIBERS, self.throughput_alerts),
             BenchConfig(batch=100, window=8, subscriber_batch=SUBSCRIBER_BATCH)),
            ("latency", ThroughputSpec(AGENTS, SUBSCRIBERS,
                                       int(self.latency_rate * self.latency_seconds),
                                       rate=self.latency_rate),
             BenchConfig(batch=1, window=8, subscriber_batch=SUBSCRIBER_BATCH)),
        )


QUICK = ReplicaBenchConfig(throughput_alerts=8_000, latency_rate=400.0, latency_seconds=5.0,
                           command="python -m bench.collector_replicas --quick")
TINY = ReplicaBenchConfig(throughput_alerts=400, latency_rate=200.0, latency_seconds=1.0,
                          command="tests/test_bench_replicas_smoke.py (tiny)")


@dataclass
class Row:
    setup: Setup
    kind: str  # throughput | latency
    result: ThroughputResult


@dataclass
class ReplicaBenchResult:
    config: ReplicaBenchConfig
    host: dict[str, str]
    rows: list[Row] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0


@contextlib.contextmanager
def _stores(setup: Setup, tmp: Path, pg: Any, label: str,
            ) -> Iterator[tuple[str | Path, Callable[[], int]]]:
    """A fresh store for one row: (what CollectorProcess takes, a count of its alerts)."""
    if setup.store == "SQLite":
        db = tmp / f"{label}.db"
        yield db, lambda: _count_alerts(db)
        return
    with pg.database() as url:
        def count() -> int:
            import psycopg

            with psycopg.connect(url) as conn:
                return int(conn.execute("SELECT count(*) FROM alerts").fetchone()[0])

        yield url, count


def run_benchmark(config: ReplicaBenchConfig, log: Callable[[str], None] | None = None, *,
                  postgres: Any = None) -> ReplicaBenchResult:
    """Every row of SETUPS x config.specs(); `postgres`: a running PostgresServer to use
    (tests/support/postgres.py; None: one of the bench's own, stopped at the end)."""
    from bench.probe_overhead import host_info
    from tests.support.collector_proc import CollectorProcess
    from tests.support.postgres import PostgresUnavailable, running_postgres

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    result = ReplicaBenchResult(config, host_info(), started=time.time())
    server = running_postgres() if postgres is None else contextlib.nullcontext(postgres)
    try:
        with (server as pg, tempfile.TemporaryDirectory(
                prefix="dw-bench-replicas-") as tmp_text):
            tmp = Path(tmp_text)
            for setup in SETUPS:
                for kind, spec, part3 in config.specs():
                    label = f"{setup.store.lower()}-{setup.replicas}-{kind}"
                    with _stores(setup, tmp, pg, label) as (store, count), \
                            contextlib.ExitStack() as running:
                        collectors = []
                        for i in range(setup.replicas):
                            collector = CollectorProcess(store, tmp / f"{label}-{i}.log")
                            collector.start()
                            running.callback(collector.stop)
                            collectors.append(collector)
                        row = drive_throughput(part3, spec, collectors,
                                               f"{setup.label} {kind}", log, count)
                    result.rows.append(Row(setup, kind, row))
    except PostgresUnavailable as exc:
        raise BenchError(f"cannot run PostgreSQL here: {exc}") from None
    result.host["load average (1/5/15 min) at end"] = _loadavg()
    result.finished = time.time()
    return result


def render_report(result: ReplicaBenchResult) -> str:
    cfg = result.config
    out = ["# driftwarden collector: stores and replicas", "",
           f"Command: `{cfg.command}`; {AGENTS} synthetic agents and {SUBSCRIBERS} subscribers "
           f"per row; {result.finished - result.started:.0f} s in all. Method: the docstring "
           "of bench/collector_replicas.py.", "", "## Host", "",
           _table(("", ""), sorted(result.host.items())), ""]
    rows: list[list[object]] = []
    problems: list[str] = []
    for row in result.rows:
        r = row.result
        offered = "as acked" if r.rate is None else f"{r.rate:,.0f}"
        delivered = r.delivered_rate
        rows.append([
            row.setup.label, row.kind, r.alerts, f"{r.batch}", offered,
            f"{r.acked_rate:,.0f}", "-" if delivered is None else f"{delivered:,.0f}",
            _f(percentile(r.latencies_ms, 50)), _f(percentile(r.latencies_ms, 99)),
            f"{sum(r.dropped)}", f"{100 * r.collector_cpu_s / r.seconds_acked:.0f}%"
            if r.seconds_acked > 0 else "-",
            ("yes" if r.accounted else "NO") + (", nothing dropped" if r.complete else "")])
        problems += [f"{row.setup.label} {row.kind}: {p}" for p in r.problems()
                     if not p.endswith(DROPPED)]
    out += ["## Alerts/s and alert -> subscriber latency", "",
            _table(("store", "row", "alerts", "alerts a batch", "offered alerts/s",
                    "acked alerts/s", "delivered alerts/s (slower subscriber)",
                    "alert -> subscriber p50 ms", "p99 ms", "dropped for subscribers",
                    "collector CPU (all replicas, % of one core)",
                    "every alert accounted for"), rows)]
    if problems:
        out += ["", *(f"- {p}" for p in problems)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.collector_replicas", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="fewer alerts: 8,000 unpaced and 5 s paced a row (~3 min)")
    p.add_argument("--throughput-alerts", type=int, default=None,
                   help="alerts of each unpaced row (default 16,000; 8,000 with --quick)")
    p.add_argument("--latency-rate", type=float, default=None,
                   help="alerts/s of each paced row, over all agents (default 400)")
    p.add_argument("--out", help="also write the markdown report to this file")
    args = p.parse_args(argv)
    base = QUICK if args.quick else ReplicaBenchConfig()
    changes: dict[str, object] = {
        "command": " ".join(["python -m bench.collector_replicas",
                             *map(shlex.quote, sys.argv[1:] if argv is None else argv)])}
    if args.throughput_alerts is not None:
        changes["throughput_alerts"] = args.throughput_alerts
    if args.latency_rate is not None:
        changes["latency_rate"] = args.latency_rate
    try:
        config = dataclasses.replace(base, **changes)
    except ValueError as exc:
        p.error(str(exc))
    code, _ = run_bench(lambda: run_benchmark(config), render_report, out=args.out,
                        cleaned_up="collectors, workers and the PostgreSQL server stopped")
    return code


if __name__ == "__main__":
    sys.exit(main())
