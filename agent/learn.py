"""`driftwarden learn IMAGE [--for S] [--out FILE] -- CMD ...`: a baseline learned in CI.

Starts one container of IMAGE with Docker (its own command; no network but its own loopback,
or the host's with ``--network host``) under an in-process learning agent: the probes, the
pipeline and the detector of `driftwarden agent`, with a temporary state dir, watching only that
container (a label of its own, as ``agent --only-label`` selects). CMD runs on this host while
the image learns (its test suite, a load script; ``$DRIFTWARDEN_LEARN_CONTAINER`` names the
container). CMD's exit ends learning, unless ``--for`` is longer: learning then goes on until
``--for`` seconds after the container started. The baseline file (the format `baseline export`
writes) goes to ``--out`` (default ``./<image>.baseline``), in mode monitor, its start seen
(the container was watched from its first event): `baseline push FILE --collector` stores it
for the image's digest, `baseline import FILE` for one host.

A CMD that fails fails `learn` with its exit code, and nothing is written; so does a container
that showed nothing. Drift seen while learning is never learned; it is reported on stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from driftwarden.core.errors import (
    ContainerNotFoundError,
    DriftwardenError,
    RuntimeActionError,
    UsageError,
)
from driftwarden.core.modes import Mode

log = logging.getLogger(__name__)

LEARN_LABEL = "driftwarden.learn"  # the learning container's label: its run's token
CONTAINER_ENV = "DRIFTWARDEN_LEARN_CONTAINER"  # CMD's environment: the container's id
NETWORKS = ("none", "host")
_SETTLE_SECONDS = 0.5  # after learning ends: the last events reach the detector
_SEED_TIMEOUT = 30.0  # the pipeline's start-up snapshot, before the container starts


@dataclass(frozen=True)
class LearnOptions:
    image: str
    command: tuple[str, ...]
    learn_for: float | None = None  # seconds after the container started, at least
    out: str | None = None  # None: ./<image>.baseline
    network: str = "none"
    window: float = 10.0
    docker_host: str | None = None
    startup_grace: float = 10.0  # the container's first seconds stay out of the windows

    def __post_init__(self) -> None:
        if not self.command:
            raise UsageError("give the command that exercises the image after --: "
                             "driftwarden learn IMAGE -- CMD ...")
        if self.network not in NETWORKS:
            raise UsageError(f"--network must be one of {', '.join(NETWORKS)}, got "
                             f"{self.network!r}")
        if self.learn_for is not None and not self.learn_for > 0:
            raise UsageError(f"--for must be > 0 seconds, got {self.learn_for}")
        if not self.window > 0:
            raise UsageError(f"--window must be > 0 seconds, got {self.window}")
        if not self.startup_grace >= 0:
            raise UsageError(f"--startup-grace must be >= 0 seconds, got {self.startup_grace}")

    @property
    def out_path(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path(f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.image)}.baseline")


def run_learn(options: LearnOptions, stop: threading.Event, *, stderr: TextIO) -> int:
    """Learn IMAGE while CMD runs (module docstring); CMD's exit code when it fails."""
    from driftwarden.agent.runtimes.docker import DEFAULT_DOCKER_URL, DockerEngine

    program = shutil.which(options.command[0])
    if program is None:
        raise UsageError(f"command not found: {options.command[0]!r} (CMD, after --, runs on "
                         "this host: give a program on PATH or its path)")
    out = options.out_path
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: no directory {out.parent}")
    url = options.docker_host or DEFAULT_DOCKER_URL
    engine = DockerEngine(url)
    try:
        try:
            engine.ping()
            engine.call("inspect image", lambda api: api.inspect_image(options.image))
        except ContainerNotFoundError:
            raise UsageError(f"no image {options.image!r} in Docker at {url}: build it or "
                             f"`docker pull {options.image}` first") from None
        except RuntimeActionError as exc:
            raise RuntimeActionError(f"Docker is not reachable ({exc}): start dockerd, or "
                                     "give --docker-host URL") from None
        with tempfile.TemporaryDirectory(prefix="driftwarden-learn-") as state_dir:
            return _learn(options, engine, Path(state_dir), out, stop, stderr)
    finally:
        engine.close()


def _learn(options: LearnOptions, engine: Any, state_dir: Path, out: Path,
           stop: threading.Event, stderr: TextIO) -> int:
    from driftwarden.agent.alerts import ListAlertSink
    from driftwarden.agent.attribution_view import LiveAttribution
    from driftwarden.agent.detect import Detector, DetectorConfig, LayersCache, LockedSink
    from driftwarden.agent.pipeline import TraceFilter, TracePipeline
    from driftwarden.agent.procfs import LiveProcReader
    from driftwarden.agent.runtimes.registry import GraphDrivers, resolve_endpoints
    from driftwarden.models.items import ItemSet
    from driftwarden.models.profile import LearningPolicy, ProfileStore
    from driftwarden.probes.capture import LiveCapture
    from driftwarden.probes.loader import ProbeConfig, ProbeSet, find_cgroup2_root

    token = uuid.uuid4().hex
    endpoints = resolve_endpoints((), engine.base_url)  # the node's runtimes: no false alarm
    store = ProfileStore(state_dir, ItemSet)
    alerts = ListAlertSink()
    # learning ends here, when CMD and --for say so: never by the stability rule
    policy = LearningPolicy(warmup_seconds=float("inf"))
    done = threading.Event()
    with contextlib.ExitStack() as stack:
        attribution = stack.enter_context(LiveAttribution(str(find_cgroup2_root()), endpoints))
        probes = stack.enter_context(ProbeSet(ProbeConfig()))
        source = LiveCapture(probes)
        graph_driver = GraphDrivers(endpoints, known=attribution.attributor.graph_driver)
        stack.callback(graph_driver.close)
        detector = Detector(
            DetectorConfig(window_seconds=options.window, policy=policy,
                           initial_mode=Mode.LEARN, startup_seconds=options.startup_grace),
            store, alerts, layers_of=LayersCache(graph_driver_of=graph_driver).get,
            clock_offset_ns=source.clock_offset_ns,
            drops=lambda: sum(k["dropped"] for k in probes.counters().values()))
        lock = threading.Lock()
        pipeline = TracePipeline(source, proc=LiveProcReader(cgroup_root=find_cgroup2_root()),
                                 attribution=attribution, sinks=[LockedSink(detector, lock)],
                                 trace_filter=TraceFilter(labels=((LEARN_LABEL, token),)))
        failure: list[BaseException] = []
        runner = threading.Thread(target=_run_pipeline, args=(pipeline, done, failure),
                                  name="driftwarden-learn", daemon=True)
        runner.start()
        stack.callback(_stop_pipeline, runner, done)
        if not _wait(lambda: pipeline.snapshot is not None or failure or not runner.is_alive(),
                     _SEED_TIMEOUT, stop):
            raise DriftwardenError("the probes did not start; see `driftwarden doctor`")
        container_id = stack.enter_context(_container(engine, options, token))
        started = time.monotonic()
        stderr.write(f"driftwarden: learning {options.image} in container {container_id[:12]} "
                     f"while `{' '.join(options.command)}` runs\n")
        stderr.flush()
        code = _run_command(options.command, container_id, stop)
        if code != 0:
            stderr.write(f"driftwarden: learn: `{' '.join(options.command)}` failed (exit code "
                         f"{code}); no baseline written\n")
            return code
        if options.learn_for is not None:
            _wait(lambda: False, started + options.learn_for - time.monotonic(), stop)
        if stop.is_set():
            raise DriftwardenError("stopped before learning ended; no baseline written")
        time.sleep(_SETTLE_SECONDS)
        learned_for = time.monotonic() - started
        _stop_pipeline(runner, done)
        if failure:
            raise DriftwardenError(f"the learning agent failed: {failure[0]}")
        with lock:
            detector.close()
            profile = next(iter(detector.profiles.values()), None)
            if profile is None:
                raise DriftwardenError(
                    f"container {container_id[:12]} of {options.image} showed nothing while "
                    "learning (did its command start?); no baseline written")
            now = time.time()
            profile.saw_start(container=container_id, now=now)
            profile.set_mode(Mode.MONITOR, reason=f"learned by `driftwarden learn` for "
                             f"{learned_for:.0f} s while `{' '.join(options.command)}` ran",
                             who="driftwarden learn", now=now)
            store.save(profile)
            store.export(profile.image_id, out)
    for alert in alerts.alerts:
        stderr.write(f"driftwarden: learn: {alert.kind.value} while learning (never learned): "
                     f"{'; '.join(r.text for r in alert.reasons)}\n")
    stderr.write(f"driftwarden: learned {profile.image_name} ({profile.image_id}) for "
                 f"{learned_for:.1f} s: {len(profile.items)} items, {len(profile.windows)} "
                 f"windows; wrote {out}\n")
    return 0


def _run_pipeline(pipeline: Any, done: threading.Event, failure: list) -> None:
    try:
        pipeline.run(should_stop=done.is_set, poll_interval=0.02)
    except BaseException as exc:  # reported by the main thread
        failure.append(exc)
        log.exception("the learning pipeline failed")


def _stop_pipeline(runner: threading.Thread, done: threading.Event) -> None:
    done.set()
    runner.join(30)


def _wait(predicate: Any, seconds: float, stop: threading.Event) -> bool:
    """Until `predicate()` holds (True) or `seconds` passed or a stop signal (False)."""
    deadline = time.monotonic() + max(seconds, 0.0)
    while not predicate():
        if stop.is_set() or time.monotonic() >= deadline:
            return bool(predicate())
        stop.wait(0.05)
    return True


@contextlib.contextmanager
def _container(engine: Any, options: LearnOptions, token: str):
    """A started container of the image (its own command), force-removed afterwards."""
    def create(api: Any) -> str:
        config = api.create_host_config(network_mode=options.network)
        return api.create_container(options.image, labels={LEARN_LABEL: token},
                                    host_config=config)["Id"]

    try:
        container_id = engine.call("create container", create)
    except RuntimeActionError as exc:
        raise DriftwardenError(f"cannot create a container of {options.image}: {exc}") from None
    try:
        try:
            engine.call("start container", lambda api: api.start(container_id))
        except RuntimeActionError as exc:
            raise DriftwardenError(f"cannot start a container of {options.image}: {exc}") \
                from None
        yield container_id
    finally:
        with contextlib.suppress(RuntimeActionError):
            engine.call("remove container",
                        lambda api: api.remove_container(container_id, force=True, v=True))


def _run_command(command: tuple[str, ...], container_id: str, stop: threading.Event) -> int:
    """CMD's exit code (128 + N for a signal N; a stop signal here ends it too)."""
    env = {**os.environ, CONTAINER_ENV: container_id}
    try:
        proc = subprocess.Popen(list(command), env=env)
    except OSError as exc:
        raise UsageError(f"cannot run {command[0]!r}: {exc.strerror or exc}") from None
    while proc.poll() is None:
        if stop.wait(0.1):
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    code = proc.returncode
    return 128 - code if code < 0 else code


__all__ = ["CONTAINER_ENV", "LEARN_LABEL", "LearnOptions", "run_learn"]
