"""A container runtime that goes away and comes back, for real: a containerd of this module's own
(tests/support/containerd.py; restarting the session's would disturb nothing, but an instance of
its own starts in well under a second and keeps this test's pods apart), stopped as a node's
runtime upgrade stops it (its containers keep running under their shims) and started again on
the same socket, root and state, while `driftwarden trace` and `driftwarden agent --metrics`
run.

- Nothing of a running container's attribution is lost: its events carry its full metadata
  before, during (from the cache) and after the outage; detection goes on (a drift during the
  outage is a DRIFT alert with its pod and image); a container made right after containerd is
  back is asked about, not given up on, and described; the agent counts no container without
  metadata.
- An unreachable runtime is a `doctor` failure with its fix (given with --runtime-endpoint), the
  per-runtime gauge `driftwarden_agent_container_metadata_unavailable{runtime}` says 1 while it
  is away and 0 once it is back, and a `trace` started meanwhile goes on with cgroup-only
  attribution: its events are printed, with a metadata_error that names the runtime.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import running_containerd
from tests.support.agent_proc import AgentProcess
from tests.support.containerd import CriContainer, CriPod, TestContainerd
from tests.support.scenario import image_id, wait_until
from tests.support.trace_proc import tracing

pytestmark = pytest.mark.integration

PY = sys.executable
DOCKER = "unix:///var/run/docker.sock"
# a write to a new file every 0.2 s, and a drop-and-execute of a new file whenever /tmp/go
# appears (made from the host through /proc/PID/root: no runtime is needed to trigger it)
TICKER = ["/bin/sh", "-c",
          "mkdir -p /tmp; i=0; while true; do i=$((i+1)); echo $i > /tmp/tick-$i; "
          "if [ -e /tmp/go ]; then rm /tmp/go; cp /bin/busybox /tmp/run-$i; /tmp/run-$i; "
          "fi; usleep 200000; done"]
# made right after containerd is back: it writes, drops and runs a binary, then sleeps
AFTER = ["/bin/sh", "-c", "mkdir -p /tmp && echo hi > /tmp/after && cp /bin/busybox /tmp/true "
         "&& /tmp/true && exec sleep 600"]


@pytest.fixture(scope="module")
def own_containerd(docker_ok, kernel_ok) -> Iterator[TestContainerd]:
    with running_containerd() as instance:
        yield instance


@contextlib.contextmanager
def running_at_exit(containerd: TestContainerd) -> Iterator[None]:
    """containerd runs again when the block ends, however it ends (its pods are removed
    through it)."""
    try:
        yield
    finally:
        if containerd.process is None or containerd.process.poll() is not None:
            containerd.start_daemon()


def events_of(lines: IO[str], container_id: str) -> list[dict]:
    lines.flush()
    with open(lines.name, encoding="utf-8") as text:
        events = [json.loads(line) for line in text if line.endswith("\n")]
    return [e for e in events if (e["container"] or {}).get("id") == container_id]


def metrics_url(agent: AgentProcess) -> str:
    found = re.search(r"metrics at (http://\S+)", agent.log())
    assert found, agent.log()
    return found.group(1)


def gauge(url: str, name: str) -> dict[str, float]:
    """{runtime: value} of one labelled metric of the agent."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        text = answer.read().decode()
    return {runtime: float(value) for runtime, value in
            re.findall(rf'^{name}{{runtime="([^"]+)"}} (\S+)$', text, re.MULTILINE)}


def doctor(endpoint: str) -> tuple[int, dict[str, dict]]:
    result = subprocess.run([PY, "-m", "driftwarden", "doctor", "--no-load-tests", "--json",
                             "--runtime-endpoint", endpoint], capture_output=True, text=True,
                            timeout=120, cwd="/")
    return result.returncode, {row["name"]: row for row in json.loads(result.stdout)}


def expected_container(pod: CriPod, container: CriContainer, image: str) -> dict:
    labels = {"io.kubernetes.pod.name": pod.name, "io.kubernetes.pod.namespace": pod.namespace,
              "io.kubernetes.pod.uid": pod.uid, "io.kubernetes.container.name": container.name}
    return {"id": container.id, "name": container.name, "image": image,
            "image_id": image_id(image), "image_digest": None, "runtime": "containerd",
            "pod": pod.name, "namespace": pod.namespace, "pod_uid": pod.uid, "workload": None,
            "labels": labels, "attribution": "container", "metadata_error": None}


def event_time(event: dict) -> float:
    return datetime.fromisoformat(event["time"]).timestamp()


def test_containerd_restart_loses_no_attribution_and_an_outage_is_said(
        own_containerd: TestContainerd, bb_image: str, tmp_path: Path) -> None:
    containerd = own_containerd
    endpoint = containerd.endpoint
    unreachable = f"containerd unreachable at {endpoint}: No such file or directory"
    agent = AgentProcess(tmp_path / "state", tmp_path / "alerts.jsonl",
                         ["--runtime-endpoint", endpoint, "--docker-host", DOCKER,
                          "--metrics", "127.0.0.1:0", "--window", "1"])

    def drifts(container_id: str, exe_prefix: str, count: int = 1) -> list[dict]:
        """The container's first `count` DRIFT alerts about a binary under `exe_prefix`."""
        try:
            found = agent.wait_for_alerts(
                lambda a: a["kind"] == "drift" and a["container"]["id"] == container_id
                and a["process"]["exe"].startswith(exe_prefix), timeout=30,
                what=f"{count} drift(s) of {exe_prefix}* in {container_id[:12]}")
            if len(found) < count:
                found = wait_until(lambda: len(f := [
                    a for a in agent.alerts() if a["kind"] == "drift"
                    and a["container"]["id"] == container_id
                    and a["process"]["exe"].startswith(exe_prefix)]) >= count and f, 30,
                    f"{count} drifts")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{agent.log()[-12000:]}") from None
        return found[:count]

    with containerd.pod(f"outage-{random.randrange(1 << 30):x}", namespace="ops") as pod, \
            open(tmp_path / "trace.jsonl", "w", encoding="utf-8") as lines, \
            running_at_exit(containerd):
        ticker = pod.run(bb_image, TICKER, name="ticker")
        trigger = Path(f"/proc/{ticker.pid}/root/tmp/go")
        with tracing(["--runtime-endpoint", endpoint, "--docker-host", DOCKER], lines), agent:
            url = metrics_url(agent)
            unavailable = "driftwarden_agent_container_metadata_unavailable"
            wait_until(lambda: len(events_of(lines, ticker.id)) >= 3, 30, "the ticker's events")
            # a drift before the outage: the agent has described the ticker
            trigger.write_text("")
            drifts(ticker.id, "/tmp/run-")
            before = gauge(url, unavailable)

            went = time.time()
            containerd.stop_daemon()
            # the agent's event watcher finds containerd gone before any container needs asking
            during = wait_until(lambda: (g := gauge(url, unavailable))["containerd"] and g, 10,
                                "the gauge to say containerd is away")
            code, rows = doctor(endpoint)
            trigger.write_text("")  # the ticker drops and runs another binary
            in_outage = drifts(ticker.id, "/tmp/run-", 2)[1]
            # a trace started now: every container is new to it, and containerd cannot say
            with open(tmp_path / "late.jsonl", "w", encoding="utf-8") as late, \
                    tracing(["--runtime-endpoint", endpoint], late):
                late_events = wait_until(lambda: events_of(late, ticker.id), 30,
                                         "the late trace's events of the ticker")

            containerd.start_daemon()
            back = time.time()
            # made at once: the agent may not have seen containerd come back yet
            after = pod.run(bb_image, AFTER, name="after")
            wait_until(lambda: any(e["kind"] == "exec" and e["exec"]["argv"][0] == "/tmp/true"
                                   for e in events_of(lines, after.id)), 30,
                       "the new container's events")
            [after_drift] = drifts(after.id, "/tmp/true")
            recovered = wait_until(lambda: not any((g := gauge(url, unavailable)).values()) and g,
                                   20, "the gauge to say containerd is back")
            wait_until(lambda: any(event_time(e) > back + 1
                                   for e in events_of(lines, ticker.id)), 10,
                       "the ticker's events after the restart")
            without = gauge(url, "driftwarden_agent_containers_without_metadata_total")
        ticked = events_of(lines, ticker.id)
        made_after = events_of(lines, after.id)
    print(f"outage {back - went:.1f} s; ticker events {len(ticked)}, new container's "
          f"{len(made_after)}")

    # doctor: the runtime given with --runtime-endpoint does not answer: a failure, its fix
    row = rows["runtime containerd"]
    assert (code, row["required"], row["status"], row["detail"]) == (1, True, "fail",
                                                                     unreachable)
    assert row["fix"] == ("start containerd, or give the socket it listens on with "
                          "--runtime-endpoint unix:///path; without it its containers keep "
                          "cgroup ids but lose names, images and detection")
    # the gauge, per runtime
    assert before == {"containerd": 0, "cri-o": 0, "docker": 0, "podman": 0}
    assert during == {"containerd": 1, "cri-o": 0, "docker": 0, "podman": 0}
    assert recovered == before
    # the running container: its metadata before, during and after the outage
    full = expected_container(pod, ticker, bb_image)
    assert [e["container"] for e in ticked if e["container"] != full] == []
    phases = [sum(1 for e in ticked if lo <= event_time(e) < hi)
              for lo, hi in ((0, went), (went, back), (back, float("inf")))]
    assert all(phases), phases
    assert in_outage["reasons"][0]["code"] == "exec-added-binary"
    assert {key: in_outage["container"][key] for key in ("name", "pod", "namespace", "image")} \
        == {"name": "ticker", "pod": pod.name, "namespace": "ops", "image": bb_image}
    # the container made right after the restart: described from its first event
    assert made_after and all(e["container"] == expected_container(pod, after, bb_image)
                              for e in made_after), made_after[:3]
    assert (after_drift["container"]["name"], after_drift["container"]["pod"]) == ("after",
                                                                                    pod.name)
    # and the agent gave up on none of its containers
    assert without["containerd"] == 0, without
    # the trace started during the outage: cgroup-only attribution, the runtime named
    assert {(e["container"]["attribution"], e["container"]["name"], e["container"]["image"],
             e["container"]["runtime"], e["container"]["pod_uid"],
             e["container"]["metadata_error"]) for e in late_events} == {
        ("container", None, None, "containerd", pod.uid, unreachable)}
