"""Metrics through prometheus-client: a real HTTP scrape on loopback, parsed with the client's own
parser (exact names, types, help, labels and values), callbacks, histograms, the loopback rule."""

from __future__ import annotations

import gzip
import http.client
import logging
import time

import prometheus_client
import pytest
from driftwarden.core.metrics import LATENCY_BUCKETS, MetricsRegistry, MetricsServer
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def families(text: str) -> dict[str, tuple[str, str, Samples]]:
    """name -> (type, help, {(sample name, sorted labels): value}); prometheus-client's
    ``*_created`` series (a counter's or histogram's start time) are checked apart."""
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.endswith("_created"):
            continue
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}
        out[family.name] = (family.type, family.documentation, samples)
    return out


def created(text: str) -> dict[str, float]:
    return {s.name + str(sorted(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            if family.name.endswith("_created") for s in family.samples}


def small_registry() -> MetricsRegistry:
    registry = MetricsRegistry()
    events = registry.counter("driftwarden_events", "Events seen, by kind.", ("kind",))
    events.labels("write").inc(3)
    events.labels(kind="exec").inc()
    events.labels("exec").inc(2)
    alerts = registry.counter("driftwarden_alerts_total", "Alerts sent.")
    alerts.inc()
    depth = registry.gauge("driftwarden_spool_depth", "Alerts waiting for the collector.")
    depth.set(7)
    depth.dec(2)
    registry.gauge_callback("driftwarden_containers", "Containers watched.", lambda: 4)
    registry.gauge_callback("driftwarden_baseline_items", "Baseline items per image and kind.",
                            lambda: {("nginx:1.25", "exec"): 12, ("nginx:1.25", "connect"): 0.5},
                            labelnames=("image", "kind"))
    registry.counter_callback("driftwarden_ringbuf_drops", "Ring-buffer reserve failures.",
                              lambda: {"exec": 0, "file": 9}, labelnames=("kind",))
    latency = registry.histogram("driftwarden_latency_seconds", "Kernel -> agent.",
                                 buckets=(0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.002, 0.003, 0.05, 2.0):
        latency.observe(seconds)
    return registry


EXPECTED = {
    "driftwarden_alerts": ("counter", "Alerts sent.", {("driftwarden_alerts_total", ()): 1.0}),
    "driftwarden_baseline_items": ("gauge", "Baseline items per image and kind.", {
        ("driftwarden_baseline_items", (("image", "nginx:1.25"), ("kind", "connect"))): 0.5,
        ("driftwarden_baseline_items", (("image", "nginx:1.25"), ("kind", "exec"))): 12.0}),
    "driftwarden_containers": ("gauge", "Containers watched.",
                               {("driftwarden_containers", ()): 4.0}),
    "driftwarden_events": ("counter", "Events seen, by kind.", {
        ("driftwarden_events_total", (("kind", "exec"),)): 3.0,
        ("driftwarden_events_total", (("kind", "write"),)): 3.0}),
    "driftwarden_latency_seconds": ("histogram", "Kernel -> agent.", {
        ("driftwarden_latency_seconds_bucket", (("le", "0.001"),)): 1.0,
        ("driftwarden_latency_seconds_bucket", (("le", "0.01"),)): 3.0,
        ("driftwarden_latency_seconds_bucket", (("le", "0.1"),)): 4.0,
        ("driftwarden_latency_seconds_bucket", (("le", "+Inf"),)): 5.0,
        ("driftwarden_latency_seconds_count", ()): 5.0,
        ("driftwarden_latency_seconds_sum", ()): 2.0555}),
    "driftwarden_ringbuf_drops": ("counter", "Ring-buffer reserve failures.", {
        ("driftwarden_ringbuf_drops_total", (("kind", "exec"),)): 0.0,
        ("driftwarden_ringbuf_drops_total", (("kind", "file"),)): 9.0}),
    "driftwarden_spool_depth": ("gauge", "Alerts waiting for the collector.",
                                {("driftwarden_spool_depth", ()): 5.0}),
}


def get(port: int, path: str, host: str = "127.0.0.1",
        headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_http_scrape_parses_to_exact_families() -> None:
    registry = small_registry()
    started = time.time()
    with MetricsServer(registry) as server:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        status, headers, body = get(server.port, "/metrics")
        assert status == 200
        assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = body.decode()
        got = families(text)
        # the sum is a float sum: compare it apart, approximately
        (_, _, latency) = got["driftwarden_latency_seconds"]
        sum_key = ("driftwarden_latency_seconds_sum", ())
        assert latency.pop(sum_key) == pytest.approx(2.0555)
        expected = {name: (t, h, dict(s)) for name, (t, h, s) in EXPECTED.items()}
        del expected["driftwarden_latency_seconds"][2][sum_key]
        assert got == expected
        # counters and histograms made by the code that counts carry their start time
        starts = created(text)
        assert sorted(starts) == [
            "driftwarden_alerts_created[]",
            "driftwarden_events_created[('kind', 'exec')]",
            "driftwarden_events_created[('kind', 'write')]",
            "driftwarden_latency_seconds_created[]"]
        assert all(started - 60 <= value <= time.time() for value in starts.values())
        assert get(server.port, "/metrics?x=1")[0] == 200
        registry.gauge("driftwarden_late", "added after start").set(1)
        assert families(get(server.port, "/metrics")[2].decode())["driftwarden_late"] == (
            "gauge", "added after start", {("driftwarden_late", ()): 1.0})
        assert get(server.port, "/")[::2] == (404, b"not found: metrics are at /metrics\n")
        assert get(server.port, "/metrics/x")[0] == 404


def test_openmetrics_and_gzip_when_the_scraper_asks() -> None:
    with MetricsServer(small_registry()) as server:
        status, headers, body = get(server.port, "/metrics", headers={
            "Accept": "application/openmetrics-text; version=1.0.0",
            "Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    assert headers["Content-Encoding"] == "gzip"
    text = gzip.decompress(body).decode()
    assert text.endswith("# EOF\n")
    parsed = {f.name: f for f in openmetrics_families(text)}
    assert parsed["driftwarden_events"].type == "counter"
    assert {(s.name, s.labels.get("kind"), s.value) for s in parsed["driftwarden_events"].samples
            if s.name.endswith("_total")} == {("driftwarden_events_total", "exec", 3.0),
                                              ("driftwarden_events_total", "write", 3.0)}
    assert parsed["driftwarden_latency_seconds"].type == "histogram"


def test_render_is_the_text_exposition_and_sample_reads_one_value() -> None:
    registry = small_registry()
    assert families(registry.render())["driftwarden_containers"] == EXPECTED[
        "driftwarden_containers"]
    assert registry.sample("driftwarden_events_total", {"kind": "exec"}) == 3.0
    assert registry.sample("driftwarden_latency_seconds_bucket", {"le": "0.01"}) == 3.0
    assert registry.sample("driftwarden_ringbuf_drops_total", {"kind": "file"}) == 9.0
    assert registry.sample("driftwarden_events_total", {"kind": "connect"}) is None


def test_default_latency_buckets_resolve_the_benches_milliseconds() -> None:
    registry = MetricsRegistry()
    latency = registry.histogram("hop_seconds", "a hop")
    latency.observe(0.0015)
    latency.observe(0.0075)
    latency.observe(600)
    buckets = {float(s.labels["le"]): s.value for f in text_string_to_metric_families(
        registry.render()) for s in f.samples if s.name == "hop_seconds_bucket"}
    assert sorted(buckets) == [*LATENCY_BUCKETS, float("inf")]
    assert (buckets[0.001], buckets[0.002], buckets[0.005], buckets[0.01]) == (0, 1, 1, 2)
    assert (buckets[300.0], buckets[float("inf")]) == (2, 3)


def test_registries_are_per_process_objects_not_the_global_default() -> None:
    one, two = MetricsRegistry(), MetricsRegistry()
    one.counter("driftwarden_same", "h").inc(2)
    two.counter("driftwarden_same", "h").inc(5)  # no clash: separate registries
    assert one.sample("driftwarden_same_total") == 2.0
    assert two.sample("driftwarden_same_total") == 5.0
    assert prometheus_client.REGISTRY.get_sample_value("driftwarden_same_total") is None


def test_unlabeled_metrics_start_at_zero_and_labeled_ones_empty() -> None:
    registry = MetricsRegistry()
    assert families(registry.render()) == {}
    registry.counter("c", "h")
    registry.gauge("g", "h", ("x",))  # labeled: no sample until one is set
    registry.histogram("l_seconds", "h", buckets=(1.0,))
    assert families(registry.render()) == {
        "c": ("counter", "h", {("c_total", ()): 0.0}),
        "g": ("gauge", "h", {}),
        "l_seconds": ("histogram", "h", {("l_seconds_bucket", (("le", "1.0"),)): 0.0,
                                         ("l_seconds_bucket", (("le", "+Inf"),)): 0.0,
                                         ("l_seconds_count", ()): 0.0,
                                         ("l_seconds_sum", ()): 0.0})}


def test_escaping_of_label_values_and_help() -> None:
    registry = MetricsRegistry()
    help_text = 'Writes by path: a \\ and a\nnewline, "quoted".'
    value = 'C:\\dir\\"x"\nnext'
    registry.counter("writes", help_text, ("path",)).labels(value).inc()
    text = registry.render()
    assert '# HELP writes_total Writes by path: a \\\\ and a\\nnewline, "quoted".\n' in text
    assert 'writes_total{path="C:\\\\dir\\\\\\"x\\"\\nnext"} 1.0\n' in text
    assert families(text)["writes"] == ("counter", help_text,
                                        {("writes_total", (("path", value),)): 1.0})


def test_failing_or_misshapen_callbacks_are_left_out(caplog) -> None:
    registry = MetricsRegistry()
    registry.gauge_callback("ok", "fine", lambda: 1)
    registry.gauge_callback("boom", "raises", lambda: 1 / 0)
    registry.gauge_callback("shape", "labels but a number", lambda: 3, labelnames=("k",))
    registry.gauge_callback("flat", "a mapping without labels", lambda: {"a": 1})
    registry.gauge_callback("arity", "wrong label count", lambda: {("a", "b"): 1},
                            labelnames=("k",))
    registry.counter_callback("text", "not a number", lambda: "7")
    with caplog.at_level(logging.WARNING, logger="driftwarden.core.metrics"):
        assert families(registry.render()) == {"ok": ("gauge", "fine", {("ok", ()): 1.0})}
    assert sorted(r.getMessage() for r in caplog.records) == [
        "arity left out of this scrape: expected 1 label values ['k'], got 2: ('a', 'b')",
        "boom left out of this scrape: division by zero",
        "flat left out of this scrape: it has no labels, so its callback must return a number, "
        "not a mapping",
        "shape left out of this scrape: it has labels ['k'], so its callback must return a "
        "mapping of label values to numbers",
        "text left out of this scrape: a value must be a number, got str '7'"]


def test_counter_and_label_misuse_is_refused() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("events", "h", ("kind",))
    with pytest.raises(ValueError, match="only be incremented by non-negative"):
        counter.labels("exec").inc(-1)
    with pytest.raises(ValueError, match="missing label values"):
        counter.inc()
    with pytest.raises(ValueError, match="Incorrect label count"):
        counter.labels("exec", "extra")
    with pytest.raises(ValueError, match="Incorrect label names"):
        counter.labels(knd="exec")
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.counter("events_total", "again")
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.counter_callback("events", "again", lambda: 1)
    with pytest.raises(ValueError, match="metric name '2bad' is invalid"):
        registry.gauge("2bad", "h")
    with pytest.raises(ValueError, match="metric name 'a-b' is invalid"):
        registry.gauge_callback("a-b", "h", lambda: 1)
    with pytest.raises(ValueError, match="label name '__x' is invalid"):
        registry.gauge("g", "h", ("__x",))
    with pytest.raises(ValueError, match="label name 'a-b' is invalid"):
        registry.histogram("l", "h", ("a-b",))
    with pytest.raises(ValueError, match="repeat"):
        registry.gauge("g", "h", ("a", "a"))
    with pytest.raises(TypeError, match="not a string"):
        registry.gauge("g", "h", "kind")
    # the refused inc(-1) left its child at 0
    assert families(registry.render()) == {
        "events": ("counter", "h", {("events_total", (("kind", "exec"),)): 0.0})}


def test_http_ipv6_loopback() -> None:
    with MetricsServer(small_registry(), host="::1") as server:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        status, _, body = get(server.port, "/metrics", host="::1")
        assert status == 200
        assert families(body.decode())["driftwarden_spool_depth"] == EXPECTED[
            "driftwarden_spool_depth"]


def test_localhost_means_ipv4_loopback_and_close_is_idempotent() -> None:
    server = MetricsServer(MetricsRegistry(), host="localhost")
    assert server.host == "127.0.0.1"
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port
    with server:
        port = server.port
        assert get(port, "/metrics")[0] == 200
    server.close()
    with pytest.raises(ConnectionRefusedError):
        get(port, "/metrics")


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "10.0.0.1", "example.com", ""])
def test_non_loopback_host_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="is not a loopback address; by the project's network"):
        MetricsServer(MetricsRegistry(), host=host)
