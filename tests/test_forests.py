"""Isolation forests fitted apart from where they are scored: the arrays score exactly as
scikit-learn does, the child process fits what the parent would, the agent's fitter thread
keeps its bookkeeping, and a detector whose forests come from the child reaches the same
verdicts as one that fits them itself."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from driftwarden.agent.alerts import ListAlertSink
from driftwarden.agent.detect import Detector
from driftwarden.agent.forests import PENDING, RETRY_SECONDS, ChildForests, InlineForests
from driftwarden.core.errors import ForestFitError, ModelStateError
from driftwarden.core.modes import Mode
from driftwarden.models.features import FEATURES
from driftwarden.models.forest import Forest, WindowModel
from driftwarden.models.forest_child import FitJob, fit_in_child
from driftwarden.models.items import ItemSet
from driftwarden.models.profile import ProfileStore
from sklearn.ensemble import IsolationForest

from tests.test_detect_replay import IMAGE_ID, _attacks, _capture, _normal, _replay, _verdicts

ARRAYS = ("feature", "threshold", "left", "right", "leaf_depth", "roots")


def _counts(rng: np.random.Generator, rows: int, columns: int, lam: float) -> np.ndarray:
    return np.log1p(rng.poisson(lam, size=(rows, columns)).astype(float))


@pytest.mark.parametrize(("rows", "columns", "max_features", "seed"), [
    (500, len(FEATURES), 1.0, 7),  # the agent's shape: more rows than max_samples (256)
    (30, 5, 1.0, 3),
    (300, 8, 0.5, 11),  # trees on a feature subset: columns mapped through it
    (2, 3, 1.0, 7),
    (1, 4, 1.0, 7),  # one sample: depths and denominator 0, every row scores -0.5
])
def test_arrays_score_exactly_like_scikit_learn(rows, columns, max_features, seed):
    rng = np.random.default_rng(seed)
    train = _counts(rng, rows, columns, 3)
    fitted = IsolationForest(n_estimators=100, random_state=seed, n_jobs=1,
                             max_features=max_features).fit(train)
    forest = Forest.from_sklearn(fitted)
    fresh = np.vstack([train, _counts(rng, 1000, columns, 5), np.full((1, columns), 40.0)])
    assert np.array_equal(forest.score_samples(fresh), fitted.score_samples(fresh))


def test_wire_round_trip_and_malformed_arrays():
    rng = np.random.default_rng(1)
    forest = Forest.fit(_counts(rng, 100, 6, 3), seed=7, n_estimators=20, contamination="auto")
    again = Forest.from_wire(forest.to_wire())
    assert all(np.array_equal(getattr(again, n), getattr(forest, n)) for n in ARRAYS)
    assert (again.steps, again.denominator) == (forest.steps, forest.denominator)

    wire = forest.to_wire()
    with pytest.raises(ModelStateError, match="differ in length"):
        Forest.from_wire({**wire, "threshold": b"\0" * 8})
    with pytest.raises(ModelStateError, match="malformed"):
        Forest.from_wire({k: v for k, v in wire.items() if k != "left"})
    with pytest.raises(ModelStateError, match="malformed"):
        Forest.from_wire({**wire, "leaf_depth": b"\0" * 7})  # not whole float64s
    right = np.frombuffer(wire["right"], dtype="<i4").copy()
    right[0] = len(right)  # one past the last node
    with pytest.raises(ModelStateError, match="right points outside the trees"):
        Forest.from_wire({**wire, "right": right.tobytes()})


def test_window_model_refuses_a_forest_for_other_features():
    rng = np.random.default_rng(2)
    vectors = rng.poisson(3, size=(40, len(FEATURES))).astype(float)
    wide = Forest.fit(_counts(rng, 40, len(FEATURES) + 3, 3), seed=7, n_estimators=50,
                      contamination="auto")
    narrow = WindowModel(feature_names=FEATURES[:4])
    with pytest.raises(ModelStateError, match="fitted for other features"):
        narrow.fit(vectors[:, :4], forest=wide)


def test_the_child_fits_what_this_process_would():
    rng = np.random.default_rng(3)
    inputs = [WindowModel().inputs(rng.poisson(lam, size=(60, len(FEATURES))).astype(float))
              for lam in (2, 5)]
    jobs = [FitJob(inputs[0]), FitJob(inputs[1], seed=11, n_estimators=30),
            FitJob(np.zeros((0, 3)))]  # nothing to fit on: that job alone fails
    answers = fit_in_child(jobs)
    assert [type(a) for a in answers] == [Forest, Forest, ForestFitError]
    assert "ValueError" in str(answers[2])
    for job, forest in zip(jobs[:2], answers[:2], strict=True):
        here = Forest.fit(job.inputs, seed=job.seed, n_estimators=job.n_estimators,
                          contamination="auto")
        assert all(np.array_equal(getattr(forest, n), getattr(here, n)) for n in ARRAYS)
        assert len(forest.roots) == job.n_estimators


def test_the_parent_never_imports_scikit_learn():
    code = ("import sys, numpy as np\n"
            "from driftwarden.agent.forests import ChildForests\n"
            "from driftwarden.models.forest_child import FitJob, fit_in_child\n"
            "[f] = fit_in_child([FitJob(np.random.default_rng(0).random((30, 4)))])\n"
            "print(type(f).__name__, sorted(m for m in sys.modules\n"
            "      if m.split('.')[0] in ('sklearn', 'scipy', 'joblib')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "Forest []"


def test_a_cancelled_child_is_killed():
    cancelled = threading.Event()
    big = [FitJob(np.random.default_rng(4).random((256, 30)), n_estimators=3000)] * 4
    threading.Timer(1.0, cancelled.set).start()
    started = time.monotonic()
    with pytest.raises(ForestFitError, match="stopped"):
        fit_in_child(big, cancelled=cancelled)
    assert time.monotonic() - started < 20  # not the minutes the fits would take


class _FakeFit:
    """fit_in_child's stand-in: fits in this process, or fails as told."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self.fail_child = False

    def __call__(self, jobs, *, cancelled=None):
        self.calls.append(len(jobs))
        if self.fail_child:
            raise ForestFitError("the forest-fitting child exited with 1: boom")
        return [Forest.fit(j.inputs, seed=j.seed, n_estimators=10, contamination="auto")
                for j in jobs]


def _wait(forests: ChildForests, key, vectors, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while (answer := forests.model(key, vectors)) is PENDING:
        assert time.monotonic() < deadline, "no answer from the fitter"
        time.sleep(0.02)
    return answer


def test_child_forests_bookkeeping():
    vectors = np.random.default_rng(5).poisson(3, size=(25, len(FEATURES))).tolist()
    fit, now = _FakeFit(), [0.0]
    with ChildForests(fit=fit, clock=lambda: now[0]) as forests:
        assert forests.model(("img", 1), vectors[:5]) is None  # too few windows: no model
        assert forests.model(("img", 2), vectors) is PENDING
        model = _wait(forests, ("img", 2), vectors)
        assert isinstance(model, WindowModel) and model.fitted and model.n_windows == 25
        assert forests.stats["fitted"] == 1

        fit.fail_child = True
        assert forests.model(("img", 3), vectors) is PENDING
        deadline = time.monotonic() + 10
        while forests.stats["child_failures"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        fit.fail_child = False
        calls = len(fit.calls)
        assert forests.model(("img", 3), vectors) is PENDING  # waits for its retry
        time.sleep(0.2)
        assert len(fit.calls) == calls
        now[0] += RETRY_SECONDS
        model = _wait(forests, ("img", 3), vectors)
        assert model.fitted and len(fit.calls) == calls + 1
    assert forests.stats == {"fitted": 2, "children": 3, "child_failures": 1, "job_failures": 0}


def _replay_with(capture, store, forests) -> ListAlertSink:
    def fitted_then_flushed(detector: Detector) -> None:
        if isinstance(forests, ChildForests):  # the windows wait for the child's forest
            deadline = time.monotonic() + 60
            while forests.stats["fitted"] == 0:
                assert time.monotonic() < deadline, "the child fitted no forest"
                time.sleep(0.05)
            detector.flush()

    return _replay(capture, store, forests=forests, before_close=fitted_then_flushed)[1]


def test_forests_from_the_child_give_the_same_verdicts(tmp_path):
    store = ProfileStore(tmp_path / "state", ItemSet)
    _replay_with(_capture(tmp_path / "learn.dwcap", _normal(0, 30)), store, InlineForests())
    profile = store.load(IMAGE_ID)
    profile.set_mode(Mode.MONITOR, reason="test", who="test", now=1e9)
    store.save(profile)
    attack = _capture(tmp_path / "attack.dwcap", _attacks(100))

    inline = _replay_with(attack, store, InlineForests())
    with ChildForests() as forests:
        child = _replay_with(attack, store, forests)
    assert forests.stats["fitted"] == 1
    assert _verdicts(child) == _verdicts(inline)
    assert ("anomaly", "feature-out-of-range") in {
        (a.kind.value, a.reasons[0].code) for a in child.alerts}
