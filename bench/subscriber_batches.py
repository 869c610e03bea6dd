"""Live subscriber delivery with and without batches (``SubscribeRequest.max_batch``).

An in-process collector (SQLite store) publishes prebuilt alerts through its store tail at a
paced rate, as its ingest does after each commit (ingest itself, ~2,500-3,800 alerts/s per
collector process, is measured by bench/collector_e2e.py; this measures only the path from the
tail to a subscriber). One subscriber in a process of its own reads the real gRPC stream as
fast as it can and counts the alerts it gets and the ones the collector's overflow notices
report dropped. Every alert is accounted for (received or reported dropped) or the run fails.

    python -m bench.subscriber_batches [--rate 10000] [--seconds 5] [--batches 1,500]
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _subscriber(address: str, max_batch: int, expected: int, results: Any) -> None:
    import grpc
    from driftwarden.core.wire import MAX_MESSAGE_BYTES
    from driftwarden.proto.v1 import alerts_pb2, alerts_pb2_grpc

    got = dropped = events = 0
    first = last = None
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    with grpc.insecure_channel(address, options=options) as channel:
        call = alerts_pb2_grpc.AlertsStub(channel).Subscribe(alerts_pb2.SubscribeRequest(
            include_notices=True, max_batch=max_batch), timeout=120)
        call.initial_metadata()
        results.put(("ready", None))
        for event in call:
            events += 1
            kind = event.WhichOneof("event")
            if kind == "notice":
                dropped += event.notice.dropped
            else:
                got += 1 if kind == "alert" else len(event.batch.alerts)
                first = first or time.monotonic()
                last = time.monotonic()
            if got + dropped >= expected:
                break
        call.cancel()
    results.put(("done", {"received": got, "dropped": dropped, "events": events,
                          "seconds": (last - first) if first and last else 0.0}))


def run(rate: float, seconds: float, max_batch: int) -> dict[str, Any]:
    from driftwarden.collector.policy import parse_policy
    from driftwarden.collector.server import CollectorConfig, CollectorServer
    from driftwarden.collector.tail import published_alert
    from driftwarden.core import wire

    from tests.support.fake_agent import make_alert

    total = int(rate * seconds)
    alerts = []
    for i in range(total):
        msg = make_alert(f"bench-{i}", node="node-a")
        alerts.append((msg, wire.alert_dict_from_proto(msg)))
    with tempfile.TemporaryDirectory() as tmp:
        server = CollectorServer(CollectorConfig(
            db_path=Path(tmp) / "c.db", listen="127.0.0.1:0",
            policy=parse_policy("version: 1\n"))).start()
        try:
            ctx = multiprocessing.get_context("spawn")
            results = ctx.Queue()
            proc = ctx.Process(target=_subscriber, args=(server.address, max_batch, total,
                                                         results), daemon=True)
            proc.start()
            assert results.get(timeout=60)[0] == "ready"
            tail = server.service.tail
            step = 0.002  # publish every 2 ms, as commits of small batches would
            per_step = max(1, int(rate * step))
            start = time.monotonic()
            for n, index in enumerate(range(0, total, per_step)):
                target = start + n * step
                delay = target - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                chunk = alerts[index:index + per_step]
                tail.stored([published_alert(index + k + 1, doc, msg, time.monotonic())
                             for k, (msg, doc) in enumerate(chunk)])
            offered = total / (time.monotonic() - start)
            _, result = results.get(timeout=120)
            proc.join(10)
        finally:
            server.stop(0.5)
    return {"max_batch": max_batch, "alerts": total, "offered": offered, **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.subscriber_batches", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=10_000.0, help="alerts/s offered")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--batches", default="1,500", help="max_batch values to run, comma-separated")
    args = p.parse_args(argv)
    print("| max_batch | alerts | offered alerts/s | received | dropped (notices) | events | "
          "received alerts/s |")
    print("|---|---|---|---|---|---|---|")
    failed = False
    for max_batch in (int(b) for b in args.batches.split(",")):
        r = run(args.rate, args.seconds, max_batch)
        failed |= r["received"] + r["dropped"] != r["alerts"]
        rate = r["received"] / r["seconds"] if r["seconds"] else 0.0
        print(f"| {r['max_batch']} | {r['alerts']} | {r['offered']:,.0f} | {r['received']} | "
              f"{r['dropped']} | {r['events']} | {rate:,.0f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
