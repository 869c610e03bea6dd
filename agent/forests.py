"""The detector's isolation forests: fitted once per image and baseline generation, either at
once in this process (tools, tests, benches) or by a thread that hands the fitting to a
short-lived child process (the agent: scikit-learn is never imported into it, and the
detector's thread never waits for a fit).

Both answer `model(key, vectors)` with a fitted WindowModel, None when there are too few
windows to fit one, or PENDING while the child works; the detector keeps an image's windows
until its model is ready.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

from driftwarden.core.errors import ForestFitError, ModelError, NotEnoughWindowsError
from driftwarden.core.lifecycle import Service
from driftwarden.models.forest import WindowModel
from driftwarden.models.forest_child import FitJob, fit_in_child

log = logging.getLogger(__name__)

PENDING = object()  # the model is being fitted: ask again later
RETRY_SECONDS = 30.0  # after a child failed, before its jobs are tried again
MAX_ANSWERS = 256  # fitted models not yet collected (a detector collects each on its next tick)

Vectors = Sequence[Sequence[float]]


class InlineForests:
    """Fits in the caller's thread and process (imports scikit-learn)."""

    def model(self, key: Hashable, vectors: Vectors) -> WindowModel | None:
        try:
            return WindowModel().fit(vectors)
        except NotEnoughWindowsError:
            return None


class ChildForests(Service):
    """Fits in a child process, from a thread of its own. Requests that come while a child runs
    go to the next child together. `fit` is replaceable for tests of the bookkeeping."""

    STOP_TIMEOUT = 5.0

    def __init__(self, *, fit: Callable[..., list] = fit_in_child,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._fit = fit
        self._clock = clock
        self._lock = threading.Condition()
        self._queued: OrderedDict[Hashable, tuple[WindowModel, Vectors]] = OrderedDict()
        self._answers: OrderedDict[Hashable, WindowModel] = OrderedDict()
        self._failed: dict[Hashable, float] = {}  # key -> when its fit failed
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"fitted": 0, "children": 0, "child_failures": 0, "job_failures": 0}

    def model(self, key: Hashable, vectors: Vectors) -> WindowModel | object | None:
        with self._lock:
            answer = self._answers.pop(key, None)
            if answer is not None:
                return answer
            if key in self._queued:
                return PENDING
            failed = self._failed.get(key)
            if failed is not None and self._clock() - failed < RETRY_SECONDS:
                return PENDING
            model = WindowModel()
            if len(vectors) < model.min_windows:  # as fit() would refuse: no model
                return None
            self._failed.pop(key, None)
            self._queued[key] = (model, [tuple(v) for v in vectors])
            self._lock.notify()
            return PENDING

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="forest-fitter", daemon=True)
        self._thread.start()

    def _stop(self, timeout: float | None) -> None:
        with self._lock:
            self._stopping.set()
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queued and not self._stopping.is_set():
                    self._lock.wait()
                if self._stopping.is_set():
                    return
                batch = list(self._queued.items())
            jobs = [FitJob(model.inputs(vectors)) for _, (model, vectors) in batch]
            self.stats["children"] += 1
            started = time.monotonic()
            try:
                forests = self._fit(jobs, cancelled=self._stopping)
            except ForestFitError as e:  # the child itself: every job waits for the retry
                if self._stopping.is_set():
                    return
                log.error("fitting %d isolation forest(s) failed, retrying in %.0f s: %s",
                          len(jobs), RETRY_SECONDS, e)
                self.stats["child_failures"] += 1
                forests = [None] * len(jobs)
            fitted: list[tuple[Hashable, WindowModel]] = []
            failed: list[Hashable] = []
            for (key, (model, vectors)), forest in zip(batch, forests, strict=True):
                try:
                    if isinstance(forest, ForestFitError):
                        raise forest
                    if forest is not None:
                        fitted.append((key, model.fit(vectors, forest=forest)))
                        continue
                except ModelError as e:
                    log.error("fitting the isolation forest of %s failed, retrying in %.0f s: "
                              "%s", key, RETRY_SECONDS, e)
                    self.stats["job_failures"] += 1
                failed.append(key)
            if fitted:
                log.info("%d isolation forest(s) fitted in a child process in %.1f s",
                         len(fitted), time.monotonic() - started)
            with self._lock:
                now = self._clock()
                for key, _ in batch:
                    self._queued.pop(key, None)
                for key, model in fitted:
                    self._answers[key] = model
                    self.stats["fitted"] += 1
                while len(self._answers) > MAX_ANSWERS:  # never collected: its detector moved on
                    self._answers.popitem(last=False)
                for key in failed:
                    self._failed[key] = now
