"""Prometheus text exposition: exact output, escaping, callbacks, and the loopback-only server."""

from __future__ import annotations

import http.client
import logging

import pytest
from driftwarden.core.metrics import CONTENT_TYPE, MetricsRegistry, MetricsServer, format_value


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
    return registry


EXPECTED = """\
# HELP driftwarden_alerts_total Alerts sent.
# TYPE driftwarden_alerts_total counter
driftwarden_alerts_total 1
# HELP driftwarden_baseline_items Baseline items per image and kind.
# TYPE driftwarden_baseline_items gauge
driftwarden_baseline_items{image="nginx:1.25",kind="connect"} 0.5
driftwarden_baseline_items{image="nginx:1.25",kind="exec"} 12
# HELP driftwarden_containers Containers watched.
# TYPE driftwarden_containers gauge
driftwarden_containers 4
# HELP driftwarden_events_total Events seen, by kind.
# TYPE driftwarden_events_total counter
driftwarden_events_total{kind="exec"} 3
driftwarden_events_total{kind="write"} 3
# HELP driftwarden_ringbuf_drops_total Ring-buffer reserve failures.
# TYPE driftwarden_ringbuf_drops_total counter
driftwarden_ringbuf_drops_total{kind="exec"} 0
driftwarden_ringbuf_drops_total{kind="file"} 9
# HELP driftwarden_spool_depth Alerts waiting for the collector.
# TYPE driftwarden_spool_depth gauge
driftwarden_spool_depth 5
"""


def test_render_exact_text() -> None:
    registry = small_registry()
    assert registry.render() == EXPECTED
    assert registry.render() == EXPECTED  # stable


def test_empty_registry_and_unlabeled_metrics_start_at_zero() -> None:
    registry = MetricsRegistry()
    assert registry.render() == ""
    registry.counter("c", "h")
    registry.gauge("g", "h", ("x",))  # labeled: no sample until one is set
    assert registry.render() == ("# HELP c_total h\n# TYPE c_total counter\nc_total 0\n"
                                 "# HELP g h\n# TYPE g gauge\n")


def test_escaping_of_label_values_and_help() -> None:
    registry = MetricsRegistry()
    paths = registry.counter("writes", 'Writes by path: a \\ and a\nnewline, "quoted".',
                             ("path",))
    paths.labels('C:\\dir\\"x"\nnext').inc()
    assert registry.render() == (
        '# HELP writes_total Writes by path: a \\\\ and a\\nnewline, "quoted".\n'
        "# TYPE writes_total counter\n"
        'writes_total{path="C:\\\\dir\\\\\\"x\\"\\nnext"} 1\n')


@pytest.mark.parametrize(("value", "text"), [
    (3, "3"), (True, "1"), (0.25, "0.25"), (1e-07, "1e-07"), (2.0, "2.0"),
    (float("inf"), "+Inf"), (float("-inf"), "-Inf"), (float("nan"), "NaN"),
])
def test_value_format(value, text: str) -> None:
    assert format_value(value) == text


def test_failing_or_misshapen_callbacks_are_left_out(caplog) -> None:
    registry = MetricsRegistry()
    registry.gauge_callback("ok", "fine", lambda: 1)
    registry.gauge_callback("boom", "raises", lambda: 1 / 0)
    registry.gauge_callback("shape", "labels but a number", lambda: 3, labelnames=("k",))
    registry.gauge_callback("arity", "wrong label count", lambda: {("a", "b"): 1},
                            labelnames=("k",))
    registry.gauge_callback("text", "not a number", lambda: "7")
    with caplog.at_level(logging.WARNING, logger="driftwarden.core.metrics"):
        assert registry.render() == "# HELP ok fine\n# TYPE ok gauge\nok 1\n"
    assert sorted(r.getMessage().split()[1] for r in caplog.records) == [
        "arity", "boom", "shape", "text"]


def test_counter_and_label_misuse_is_refused() -> None:
    registry = MetricsRegistry()
    counter = registry.counter("events", "h", ("kind",))
    with pytest.raises(ValueError, match="can only go up"):
        counter.labels("exec").inc(-1)
    with pytest.raises(ValueError, match=r"has labels \['kind'\]: use .labels"):
        counter.inc()
    with pytest.raises(ValueError, match="expected 1 label values"):
        counter.labels("exec", "extra")
    with pytest.raises(ValueError, match=r"labels are \['kind'\], got \['knd'\]"):
        counter.labels(knd="exec")
    with pytest.raises(TypeError, match="must be a number"):
        counter.labels("exec").inc("1")
    with pytest.raises(ValueError, match="events_total is registered twice"):
        registry.counter("events_total", "again")
    with pytest.raises(ValueError, match="metric name '2bad' is invalid"):
        registry.gauge("2bad", "h")
    with pytest.raises(ValueError, match="label name '__x' is invalid"):
        registry.gauge("g", "h", ("__x",))
    with pytest.raises(ValueError, match="repeat"):
        registry.gauge("g", "h", ("a", "a"))
    with pytest.raises(TypeError, match="not a string"):
        registry.gauge("g", "h", "kind")
    assert counter.value("exec") == 0
    assert registry.render() == "# HELP events_total h\n# TYPE events_total counter\n"


def get(port: int, path: str, host: str = "127.0.0.1") -> tuple[int, str | None, str]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response.read().decode()
    finally:
        conn.close()


def test_http_get_metrics_over_loopback() -> None:
    registry = small_registry()
    with MetricsServer(registry) as server:
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        assert get(server.port, "/metrics") == (200, CONTENT_TYPE, EXPECTED)
        assert get(server.port, "/metrics?x=1")[0] == 200
        registry.gauge("late", "added after start").set(1)
        assert get(server.port, "/metrics")[2].endswith("# TYPE late gauge\nlate 1\n")
        status, _, body = get(server.port, "/")
        assert (status, body) == (404, "not found: metrics are at /metrics\n")
        assert get(server.port, "/metrics/x")[0] == 404


def test_http_ipv6_loopback() -> None:
    with MetricsServer(small_registry(), host="::1") as server:
        assert server.url == f"http://[::1]:{server.port}/metrics"
        assert get(server.port, "/metrics", host="::1") == (200, CONTENT_TYPE, EXPECTED)


def test_localhost_means_ipv4_loopback() -> None:
    server = MetricsServer(MetricsRegistry(), host="localhost")
    assert server.host == "127.0.0.1"
    with pytest.raises(RuntimeError, match="not started"):
        _ = server.port


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.1", "10.0.0.1", "example.com", ""])
def test_non_loopback_host_is_refused(host: str) -> None:
    with pytest.raises(ValueError, match="is not a loopback address; by the project's network"):
        MetricsServer(MetricsRegistry(), host=host)
