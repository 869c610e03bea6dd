"""Alert -> subscriber latency across collector replicas on one PostgreSQL database.

Two in-process collectors (replicas A and B) share a database of a PostgreSQL server that the
bench starts (tests/support/postgres.py: Debian's initdb and pg_ctl). A synthetic agent streams
to A and sends one alert at a time; a subscriber on A and one on B (each in a thread with its
own gRPC channel) note when each alert arrives. Reported: the time from the agent's send to
each subscriber (p50/p90/p99/max over the trials), i.e. A's own path (ingest, store, publish)
and B's (the same, then the NOTIFY and B's read of the store). Every alert must reach both
subscribers exactly once, in order, or the run fails.

    python -m bench.replica_latency [--trials 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(trials: int) -> dict[str, list[float]]:
    import grpc
    from driftwarden.collector.policy import parse_policy
    from driftwarden.collector.server import CollectorConfig, CollectorServer
    from driftwarden.proto.v1 import alerts_pb2, alerts_pb2_grpc

    from tests.support.fake_agent import FakeAgent, hello, make_alert
    from tests.support.postgres import running_postgres

    with running_postgres() as pg, pg.database() as url:
        replicas = [CollectorServer(CollectorConfig(
            db_path=None, store_url=url, listen="127.0.0.1:0", stop_grace=0.5,
            policy=parse_policy("version: 1\n"))).start() for _ in range(2)]
        channels = [grpc.insecure_channel(r.address) for r in replicas]
        arrivals: dict[str, dict[str, float]] = {"A": {}, "B": {}}
        orders: dict[str, list[str]] = {"A": [], "B": []}
        cond = threading.Condition()
        calls = []

        def read(name: str, call) -> None:
            try:
                for event in call:
                    if event.WhichOneof("event") == "alert":
                        with cond:
                            arrivals[name].setdefault(event.alert.id, time.monotonic())
                            orders[name].append(event.alert.id)
                            cond.notify_all()
            except grpc.RpcError:
                pass

        try:
            for name, channel in zip("AB", channels, strict=True):
                call = alerts_pb2_grpc.AlertsStub(channel).Subscribe(
                    alerts_pb2.SubscribeRequest())
                call.initial_metadata()
                calls.append(call)
                threading.Thread(target=read, args=(name, call), daemon=True).start()
            agent = FakeAgent(channels[0])
            agent.send(hello=hello("node-a"))
            sent: dict[str, float] = {}
            ids = []
            for i in range(trials + 5):  # 5 warm-up alerts
                alert = make_alert(f"latency-{i}", when=time.time(), mode="monitor")
                ids.append(alert.id)
                sent[alert.id] = time.monotonic()
                agent.send_alerts([alert])
                agent.recv_kind("ack")
                with cond:
                    if not cond.wait_for(lambda a=alert.id: all(a in arrivals[n] for n in "AB"),
                                         10):
                        raise RuntimeError(f"alert {i} did not reach both subscribers")
                time.sleep(0.01)
            agent.close()
            for name in "AB":
                if orders[name] != ids:
                    raise RuntimeError(f"subscriber on {name}: not every alert once in order")
            return {name: [(arrivals[name][a] - sent[a]) * 1000 for a in ids[5:]]
                    for name in "AB"}
        finally:
            for call in calls:
                call.cancel()
            for channel in channels:
                channel.close()
            for replica in replicas:
                replica.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.replica_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=200)
    args = p.parse_args(argv)
    result = run(args.trials)
    print("| agent on A -> subscriber on | trials | p50 ms | p90 ms | p99 ms | max ms | mean ms |")
    print("|---|---|---|---|---|---|---|")
    for name, label in (("A", "A (the same replica)"), ("B", "B (the other replica)")):
        values = result[name]
        print(f"| {label} | {len(values)} | {_percentile(values, 0.5):.1f} | "
              f"{_percentile(values, 0.9):.1f} | {_percentile(values, 0.99):.1f} | "
              f"{max(values):.1f} | {statistics.mean(values):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
