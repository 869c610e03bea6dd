"""WindowModel on synthetic windows: threshold, attack detection, explanations, determinism."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from driftwarden.core.errors import DriftwardenError, ModelStateError, NotEnoughWindowsError
from driftwarden.models.features import FEATURES, INDEX
from driftwarden.models.forest import RISK_FEATURES, Reason, WindowModel

ATTACK = {"shells_spawned": 3, "execs_from_writable": 2, "connects_public": 1, "novel_exec": 2}


def normal_windows(rs: np.random.RandomState, n: int) -> np.ndarray:
    """A worker: ~3 execs, ~5 connects, ~10 file creations per window, nothing else."""
    x = np.zeros((n, len(FEATURES)))
    x[:, INDEX["execs"]] = rs.poisson(3, n)
    x[:, INDEX["connects"]] = rs.poisson(5, n)
    x[:, INDEX["writes_create"]] = rs.poisson(10, n)
    return x


@pytest.fixture(scope="module")
def train() -> np.ndarray:
    return normal_windows(np.random.RandomState(0), 200)


@pytest.fixture(scope="module")
def model(train) -> WindowModel:
    return WindowModel().fit(train)


def attack_window(train: np.ndarray) -> np.ndarray:
    x = train[0].copy()
    for name, value in ATTACK.items():
        x[INDEX[name]] = value
    return x


def test_every_training_window_is_normal(model, train):
    scores = model.score(train)
    assert scores.shape == (200,)
    assert not model.is_anomalous(scores).any()
    assert model.threshold == pytest.approx(scores.min() - model.margin)
    np.testing.assert_array_equal(scores, model.training_scores)


def test_fresh_normal_windows_rarely_alert(model):
    held_out = normal_windows(np.random.RandomState(1), 500)
    alerts = held_out[model.is_anomalous(model.score(held_out))]
    assert len(alerts) <= 5  # <= 1%: and only windows outside what was learned
    for window in alerts:
        assert model.explain(window, top=1)[0].outside


def test_attack_window_is_anomalous_and_explained(model, train):
    attack = attack_window(train)
    [score] = model.score(attack)
    assert model.is_anomalous([score])[0]
    assert not model.is_anomalous(model.score(train[0]))[0]  # same window without the attack
    reasons = model.explain(attack, top=len(ATTACK))
    assert {r.feature for r in reasons} == set(ATTACK)
    assert all(isinstance(r, Reason) and r.outside for r in reasons)
    # by how far out (log1p units): 3 shells first, the 1 public connect last
    assert reasons[0].feature == "shells_spawned" and reasons[-1].feature == "connects_public"
    first = reasons[0]
    assert (first.value, first.baseline_min, first.baseline_max, first.baseline_median) == (
        3.0, 0.0, 0.0, 0.0)
    assert first.by_how_much == 3.0
    assert first.text.startswith("shells_spawned = 3, learned range 0..0")
    # the top 3 are the 3 features furthest out
    assert [r.feature for r in model.explain(attack)] == [r.feature for r in reasons[:3]]
    # after the out-of-range features come the in-range ones, flagged as inside
    more = model.explain(attack, top=len(ATTACK) + 1)
    assert len(more) == len(ATTACK) + 1 and not more[-1].outside
    assert more[-1].by_how_much == 0.0 and "median" in more[-1].text


def test_explain_below_the_range(model, train):
    quiet = train[0].copy()
    quiet[INDEX["writes_create"]] = 0  # fewer writes than ever learned
    lo = train[:, INDEX["writes_create"]].min()
    assert lo > 0
    [reason] = model.explain(quiet, top=1)
    assert reason.feature == "writes_create" and reason.outside
    # a volume feature is judged by its share of the window's activity, in percentage points
    assert reason.text.startswith("writes_create = 0, 0% of this window's activity, learned ")
    learned_low = float(reason.text.split("learned ")[1].split("%")[0])
    assert learned_low > 0 and reason.by_how_much == pytest.approx(-learned_low, abs=0.5)


def test_explain_an_ordinary_window_has_no_out_of_range_reason(model, train):
    assert not any(r.outside for r in model.explain(train[5], top=len(FEATURES)))


def test_nearest_window(model, train):
    assert model.nearest_window(train[17]) == (int(np.argmin(np.abs(
        np.log1p(train) - np.log1p(train[17])).sum(axis=1))), 0.0)
    index, distance = model.nearest_window(attack_window(train))
    assert distance > 0
    assert model.training_vector(index) == tuple(float(v) for v in train[index])


def test_refit_is_bit_identical(train):
    probe = np.vstack([train, attack_window(train), normal_windows(np.random.RandomState(3), 50)])
    a = WindowModel().fit(train).score(probe)
    b = WindowModel().fit(train).score(probe)
    assert a.tobytes() == b.tobytes()
    c = WindowModel().fit(train, seed=8).score(probe)
    assert a.tobytes() != c.tobytes()  # the seed is what makes it reproducible


def test_state_round_trip_through_msgpack_gives_identical_scores(model, train):
    state = model.to_state()
    assert state["vectors"] == train.tolist() and state["features"] == list(FEATURES)
    blob = msgpack.packb(state)
    restored = WindowModel.from_state(msgpack.unpackb(blob))
    probe = np.vstack([train, attack_window(train)])
    assert restored.score(probe).tobytes() == model.score(probe).tobytes()
    assert restored.threshold == model.threshold
    assert restored.to_state() == state


def test_state_keeps_parameters(train):
    m = WindowModel(min_windows=50, margin=0.1, range_weight=0.5).fit(
        train, seed=11, n_estimators=20, contamination=0.05)
    restored = WindowModel.from_state(m.to_state())
    assert (restored.seed, restored.n_estimators, restored.contamination) == (11, 20, 0.05)
    assert (restored.min_windows, restored.margin, restored.range_weight) == (50, 0.1, 0.5)
    assert restored.score(train).tobytes() == m.score(train).tobytes()


@pytest.mark.parametrize("damage", [
    lambda s: s.pop("vectors"),
    lambda s: s.update(version=99),
    lambda s: s.update(features=["b", "a"]),
    lambda s: s.update(vectors=[[1.0, 2.0]] * 30),
    lambda s: s.update(vectors=s["vectors"][:3]),
    lambda s: s.update(seed="x"),
])
def test_bad_state_is_a_clear_error(model, damage):
    state = model.to_state()
    damage(state)
    with pytest.raises(ModelStateError):
        WindowModel.from_state(state)


def test_batch_scores_match_one_at_a_time(model):
    batch = normal_windows(np.random.RandomState(2), 1024)
    batch[::100, INDEX["shells_spawned"]] = 3  # some anomalous rows too
    batch[::100, INDEX["execs_from_writable"]] = 1
    scores = model.score(batch)
    assert scores.shape == (1024,)
    for i in range(0, 1024, 64):  # one row costs ~8 ms: check a sample
        single = model.score(batch[i])
        assert single.shape == (1,)
        assert single[0] == pytest.approx(scores[i], abs=1e-12)
    assert model.is_anomalous(scores)[::100].all()


def test_not_enough_windows(train):
    with pytest.raises(NotEnoughWindowsError) as info:
        WindowModel().fit(train[:19])
    assert isinstance(info.value, DriftwardenError)
    assert "19" in str(info.value)
    with pytest.raises(NotEnoughWindowsError):
        WindowModel().fit([])
    WindowModel(min_windows=5).fit(train[:5])
    with pytest.raises(NotEnoughWindowsError):
        WindowModel().score(train)  # not fitted


def test_identical_idle_windows_fit_and_anything_else_is_anomalous():
    idle = np.zeros((30, len(FEATURES)))
    m = WindowModel().fit(idle)
    assert not m.is_anomalous(m.score(idle)).any()
    busy = np.zeros(len(FEATURES))
    busy[INDEX["execs"]] = 5
    assert m.is_anomalous(m.score(busy))[0]


def test_longer_vectors_use_the_known_prefix_and_shorter_are_refused(model, train):
    wider = np.hstack([train[:4], np.full((4, 3), 9.0)])  # features appended later
    assert model.score(wider).tobytes() == model.score(train[:4]).tobytes()
    with pytest.raises(ValueError):
        model.score(train[:4, :5])
    with pytest.raises(ValueError):
        model.score([[np.nan] * len(FEATURES)])


def test_bad_parameters():
    with pytest.raises(ValueError):
        WindowModel(min_windows=1)
    with pytest.raises(ValueError):
        WindowModel(margin=-1)


def test_a_faster_or_slower_rate_of_the_same_mix_is_normal(model, train):
    # volume features enter as shares: the learned mix at 4x or 1/2 the rate scores as learned
    typical = np.median(train, axis=0)
    volume = [i for i, name in enumerate(FEATURES) if name not in RISK_FEATURES]
    for factor in (4.0, 0.5):
        scaled = typical.copy()
        scaled[volume] = np.round(typical[volume] * factor)
        assert not model.is_anomalous(model.score(scaled))[0], factor


def test_failed_connects_never_seen_are_not_penalised(model, train):
    # a backend that is down: the same connects, now failing
    typical = np.median(train, axis=0)
    down = typical.copy()
    down[INDEX["failed_connects"]] = typical[INDEX["connects"]]
    assert model.range_excess(down)[0][INDEX["failed_connects"]] == 0.0
