"""The anomaly model of one image: an isolation forest over its learned feature windows.

Input space
    Feature vectors (driftwarden.models.features.FEATURES order, counts per window) are
    transformed with log1p before anything else. Counts are heavy-tailed (a worker does 3 execs
    in one window and 300 in a busy one); in log space a doubling is the same distance wherever
    it happens, and random split points of the forest are not wasted on the long tail.

Score
    `score()` returns, per row, sklearn's `IsolationForest.score_samples` (higher = more normal,
    roughly -1..-0.3) minus a range penalty: `range_weight` times how far (in log1p units) the
    row lies outside the training min..max of each feature, summed over features. The penalty is
    needed because an isolation forest never splits on a feature that was constant during
    training (it cannot): a web server that never spawned a shell learns shells_spawned = 0
    always, and the forest alone would score a window with 3 shells exactly like one with none.
    Training windows are inside their own range, so their penalty is 0.

Threshold
    `threshold = min(training scores) - margin` (margin default 0.05 score units) and a row is
    anomalous when its score is below it. Every training window is therefore normal by
    construction: training windows are behaviour that was accepted while learning (tainted
    windows are not learned from), and an operator replaying the learned workload must see no
    alert. A low quantile of the training scores would instead flag that fraction of the learned
    windows forever. The margin absorbs ordinary jitter just outside the learned extremes.
    Measured on the synthetic workload of tests/test_models_forest.py (200 training windows,
    2000 fresh windows from the same distribution): margin 0 -> 12 false alerts, 0.02 -> 8,
    0.05 -> 1, while the 4-feature attack window scores ~1.1 below the threshold.
    `range_weight` 0.3 (score units per log1p unit outside the range) makes a feature the image
    never used alert when it jumps to 2 or more (1 shell in an otherwise ordinary window: 18% of
    windows alert; 2 shells: 92%; 3: 100%); a single never-seen item is the novelty check's job.
    `margin` and `range_weight` are configurable and stored with the state.
    `contamination` is passed to sklearn for completeness but does not affect the threshold
    (score_samples does not use it).

Determinism and persistence
    The forest is fitted with a fixed `random_state` (`seed`), so fitting the same windows gives
    bit-identical scores. `to_state()` returns plain data (feature names, training vectors,
    parameters: msgpack-able, no pickle); `from_state()` re-fits from it, so the stored baseline is
    data and the model is derived.

Fitting and scoring apart
    scikit-learn fits the forest (`Forest.fit`); the fitted trees are then kept as NumPy arrays
    and scored by walking them (`Forest.score_samples`), with the same float32 inputs, leaf
    path lengths and summation order as `IsolationForest.score_samples`, so the scores are the
    same bit for bit (tests/test_models_forest_arrays.py). Importing scikit-learn costs a
    process about 118 MB (it brings SciPy); the agent fits in a short-lived child process
    (`driftwarden.models.forest_child`) and never imports it. The arrays cross as plain bytes
    (`Forest.to_wire`), never pickled.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from driftwarden.core.errors import ModelStateError, NotEnoughWindowsError
from driftwarden.models.features import FEATURES

# Features that measure *what* a container does: any rise above the learned maximum is
# suspicious in itself (more shells, more distinct destinations), so they are penalised outside
# their range. The others measure *how much*: they enter the forest as shares of the window's
# activity, so a busier or quieter period with the same mix scores like the learned windows.
RISK_FEATURES = frozenset({
    "distinct_executables", "shells_spawned", "execs_from_writable", "distinct_destinations",
    "connects_public", "writes_chmod_x", "writes_setuid", "distinct_write_dirs", "novel_exec",
    "novel_connect", "novel_write", "execs_failed",
})
SHARE_SCALE = 100.0  # shares enter as log1p(percent of the window's activity)
# Caused by the peer, not the container (a backend that is down): never penalised.
ENVIRONMENTAL_FEATURES = frozenset({"failed_connects"})

STATE_VERSION = 1

# Forest's arrays and their dtypes on the wire (Forest.to_wire)
_NODE_ARRAYS = {"feature": "<i4", "threshold": "<f8", "left": "<i4", "right": "<i4",
                "leaf_depth": "<f8"}


@dataclass(frozen=True, eq=False)
class Forest:
    """A fitted isolation forest as flat arrays: every tree's nodes one after another, tree t's
    root at `roots[t]`, children as indexes into the same arrays (28 bytes a node).

    A node splits on column `feature` at `threshold` (a row goes `left` when its float32 value is
    <= the threshold); a leaf points to itself, so every row may walk `steps` times. A row that
    ends at a node is credited `leaf_depth` (its depth plus the average path length of the
    training samples left there, minus 1: scikit-learn's terms). The score is
    -2 ** (-sum of the credits / denominator).
    """

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    leaf_depth: np.ndarray
    roots: np.ndarray
    steps: int
    denominator: float

    @classmethod
    def fit(cls, z: np.ndarray, *, seed: int, n_estimators: int,
            contamination: float | str) -> Forest:
        """Fits scikit-learn's IsolationForest on `z` (the model's input space). scikit-learn
        is imported here only: the agent calls this in a child process."""
        from sklearn.ensemble import IsolationForest

        forest = IsolationForest(n_estimators=n_estimators, contamination=contamination,
                                 random_state=seed, n_jobs=1)
        forest.fit(z)
        return cls.from_sklearn(forest)

    @classmethod
    def from_sklearn(cls, forest: Any) -> Forest:
        """The arrays of a fitted `sklearn.ensemble.IsolationForest` (its private per-tree path
        lengths included: tests/test_forests.py checks the scores still match)."""
        trees = forest.estimators_
        sizes = [tree.tree_.node_count for tree in trees]
        roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
        # scikit-learn indexes the columns through a tree's feature subset only when it drew one
        subsets = forest._max_features != forest.n_features_in_
        parts: dict[str, list[np.ndarray]] = {name: [] for name in _NODE_ARRAYS}
        for i, (tree, columns) in enumerate(zip(trees, forest.estimators_features_,
                                                strict=True)):
            t = tree.tree_
            is_leaf = t.children_left < 0
            own = np.arange(t.node_count) + roots[i]
            split_on = np.where(is_leaf, 0, t.feature)
            parts["feature"].append(np.asarray(columns)[split_on] if subsets else split_on)
            parts["threshold"].append(t.threshold)
            parts["left"].append(np.where(is_leaf, own, t.children_left + roots[i]))
            parts["right"].append(np.where(is_leaf, own, t.children_right + roots[i]))
            parts["leaf_depth"].append(forest._decision_path_lengths[i]
                                       + forest._average_path_length_per_tree[i] - 1.0)
        arrays = {name: np.concatenate(parts[name]).astype(dtype)
                  for name, dtype in _NODE_ARRAYS.items()}
        return cls(**arrays, roots=roots, steps=max(int(tree.tree_.max_depth) for tree in trees),
                   denominator=float(len(trees) * _average_path_length(forest._max_samples)))

    def score_samples(self, z: np.ndarray) -> np.ndarray:
        """`IsolationForest.score_samples` of the rows of `z`: higher is more normal."""
        x = np.asarray(z, dtype=np.float32)  # scikit-learn's trees split float32 inputs
        # every (row, tree) walks at once; a row's value of a column is values[row_start + col]
        row_start = (np.arange(len(x)) * x.shape[1])[:, None]
        node = np.broadcast_to(self.roots, (len(x), len(self.roots))).copy()
        values = x.ravel()
        feature, threshold, left, right = self.feature, self.threshold, self.left, self.right
        for _ in range(self.steps):
            go_left = values.take(row_start + feature.take(node)) <= threshold.take(node)
            node = np.where(go_left, left.take(node), right.take(node))
        credits = self.leaf_depth.take(node)
        depths = np.zeros(len(x))
        for column in credits.T:  # tree by tree, as scikit-learn adds them: the same bits
            depths += column
        # one training sample: depth and denominator are 0, and scikit-learn takes 1 for their
        # quotient
        ratio = depths / self.denominator if self.denominator != 0 else np.ones(len(x))
        return -(2 ** (-ratio))

    def to_wire(self) -> dict[str, Any]:
        """Plain data for msgpack: each array as little-endian bytes."""
        wire: dict[str, Any] = {name: getattr(self, name).astype(dtype).tobytes()
                                for name, dtype in _NODE_ARRAYS.items()}
        wire.update(roots=self.roots.astype("<i4").tobytes(), steps=self.steps,
                    denominator=self.denominator)
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Forest:
        try:
            arrays = {name: np.frombuffer(wire[name], dtype=dtype)
                      for name, dtype in _NODE_ARRAYS.items()}
            roots = np.frombuffer(wire["roots"], dtype="<i4")
            nodes = len(arrays["feature"])
            if nodes == 0 or len(roots) == 0:
                raise ModelStateError("forest arrays are empty")
            if any(len(a) != nodes for a in arrays.values()):
                raise ModelStateError("forest arrays differ in length")
            if arrays["feature"].min() < 0:
                raise ModelStateError("forest array feature has a negative column")
            for name, values in (("left", arrays["left"]), ("right", arrays["right"]),
                                 ("roots", roots)):
                if values.min() < 0 or values.max() >= nodes:
                    raise ModelStateError(f"forest array {name} points outside the trees")
            return cls(**arrays, roots=roots, steps=int(wire["steps"]),
                       denominator=float(wire["denominator"]))
        except ModelStateError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ModelStateError(f"forest arrays are malformed: {e!r}") from e


def _average_path_length(n: int) -> float:
    """The average path length of an unsuccessful search in a binary search tree of n nodes
    (the isolation forest paper's c(n)), for one n, as scikit-learn computes it."""
    if n <= 1:
        return 0.0
    if n == 2:
        return 1.0
    return float(2.0 * (np.log(n - 1.0) + np.euler_gamma) - 2.0 * (n - 1.0) / n)


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a window looks different: one feature against its learned range."""

    feature: str
    value: float
    baseline_min: float
    baseline_max: float
    baseline_median: float
    by_how_much: float  # value - max above the range, value - min (negative) below, else 0
    outside: bool
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"feature": self.feature, "value": self.value, "baseline_min": self.baseline_min,
                "baseline_max": self.baseline_max, "baseline_median": self.baseline_median,
                "by_how_much": self.by_how_much, "outside": self.outside, "text": self.text}


def _num(x: float) -> str:
    return f"{x:g}" if float(x).is_integer() else f"{x:.2f}"


class WindowModel:
    """Isolation forest + range check over one image's training windows (see module doc)."""

    def __init__(self, *, feature_names: Sequence[str] = FEATURES, min_windows: int = 20,
                 margin: float = 0.05, range_weight: float = 0.3) -> None:
        if min_windows < 2:
            raise ValueError("min_windows must be >= 2")
        if margin < 0 or range_weight < 0:
            raise ValueError("margin and range_weight must be >= 0")
        self.feature_names: tuple[str, ...] = tuple(feature_names)
        self._risk_mask = np.array([name in RISK_FEATURES for name in self.feature_names])
        self.min_windows = min_windows
        self.margin = float(margin)
        self.range_weight = float(range_weight)
        self.seed = 7
        self.n_estimators = 100
        self.contamination: float | str = "auto"
        self._forest: Forest | None = None
        self._raw: np.ndarray | None = None  # training vectors as given
        self._z: np.ndarray | None = None  # log1p of them
        self.threshold: float = math.nan
        self.training_scores: np.ndarray | None = None

    @property
    def fitted(self) -> bool:
        return self._forest is not None

    @property
    def n_windows(self) -> int:
        return 0 if self._raw is None else len(self._raw)

    # -- input ------------------------------------------------------------------------------

    def _matrix(self, vectors: Any) -> np.ndarray:
        """A float 2-D array with this model's columns. Longer rows (features appended since the
        model was trained) are cut to the known prefix; FEATURES is append-only."""
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim == 1:
            x = x.reshape(1, -1)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D array of windows, got {x.ndim}-D")
        n = len(self.feature_names)
        if x.shape[1] < n:
            raise ValueError(f"windows have {x.shape[1]} features, the model needs {n}")
        if x.shape[1] > n:
            x = x[:, :n]
        if not np.isfinite(x).all():
            raise ValueError("windows contain NaN or infinite values")
        return x

    def _log(self, x: np.ndarray) -> np.ndarray:
        """The model's input space: log1p counts for risk features, log1p(percent share of the
        window's activity) for volume features (see RISK_FEATURES)."""
        x = np.maximum(x, 0.0)
        risk = self._risk_mask
        z = np.log1p(x)
        volume = x[:, ~risk]
        total = np.maximum(volume.sum(axis=1, keepdims=True), 1.0)
        z[:, ~risk] = np.log1p(SHARE_SCALE * volume / total)
        return z

    # -- fitting ----------------------------------------------------------------------------

    def inputs(self, vectors: Sequence[Sequence[float]]) -> np.ndarray:
        """The training windows in the forest's input space: what `Forest.fit` is given."""
        return self._training(vectors)[1]

    def _training(self, vectors: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
        """The training windows as given and in the input space."""
        x = self._matrix(vectors) if len(vectors) else np.zeros((0, len(self.feature_names)))
        if len(x) < self.min_windows:
            raise NotEnoughWindowsError(
                f"{len(x)} training windows, need at least {self.min_windows}: keep learning")
        return x, self._log(x)

    def fit(self, vectors: Sequence[Sequence[float]], *, seed: int = 7, n_estimators: int = 100,
            contamination: float | str = "auto", forest: Forest | None = None) -> WindowModel:
        """Fits on `vectors`; with `forest`, takes that one instead of fitting (it must have been
        fitted elsewhere on `inputs(vectors)` with the same seed and parameters)."""
        x, z = self._training(vectors)
        if forest is None:
            forest = Forest.fit(z, seed=seed, n_estimators=n_estimators,
                                contamination=contamination)
        elif forest.feature.max() >= z.shape[1]:
            raise ModelStateError(f"the forest splits on column {forest.feature.max()}, the "
                                  f"windows have {z.shape[1]}: it was fitted for other features")
        self._forest = forest
        self.seed, self.n_estimators, self.contamination = seed, n_estimators, contamination
        self._raw, self._z = x, z
        self._lo, self._hi = z.min(axis=0), z.max(axis=0)
        # penalised above the range: risk features, and activity of a kind the image never had
        environmental = np.array([n in ENVIRONMENTAL_FEATURES for n in self.feature_names])
        self._penalised = self._risk_mask | ((self._hi == 0) & ~environmental)
        self._raw_min, self._raw_max = x.min(axis=0), x.max(axis=0)
        self._raw_median = np.median(x, axis=0)
        self._z_median = np.median(z, axis=0)
        self.training_scores = forest.score_samples(z)  # penalty is 0 inside the range
        self.threshold = float(self.training_scores.min()) - self.margin
        return self

    def _need_fit(self) -> Forest:
        if self._forest is None:
            raise NotEnoughWindowsError("the model is not fitted yet: keep learning")
        return self._forest

    # -- scoring ----------------------------------------------------------------------------

    def range_excess(self, vectors: Any) -> np.ndarray:
        """Per row and feature, how far (log1p units) a penalised feature (a risk feature, or a
        kind of activity never seen in training) lies above its training maximum; else 0."""
        self._need_fit()
        z = self._log(self._matrix(vectors))
        return np.maximum(z - self._hi, 0.0) * self._penalised

    def score(self, vectors: Any) -> np.ndarray:
        """Scores of many windows at once (one row each); higher is more normal. Score in
        batches: NumPy's per-call overhead makes one row cost nearly as much as hundreds."""
        forest = self._need_fit()
        z = self._log(self._matrix(vectors))
        excess = np.maximum(z - self._hi, 0.0) * self._penalised
        return forest.score_samples(z) - self.range_weight * excess.sum(axis=1)

    def is_anomalous(self, scores: Any) -> np.ndarray:
        self._need_fit()
        return np.asarray(scores, dtype=np.float64) < self.threshold

    # -- explaining -------------------------------------------------------------------------

    def explain(self, vector: Sequence[float], top: int = 3) -> list[Reason]:
        """The features that make this window different, most different first: features outside
        the training min..max (by how far out, in log1p units), then features inside the range by
        their distance from the training median (relative to the range width)."""
        self._need_fit()
        x = self._matrix(vector)[0]
        z = self._log(x.reshape(1, -1))[0]
        risk = self._risk_mask
        above = np.maximum(z - self._hi, 0.0)
        below = np.maximum(self._lo - z, 0.0)
        out = above + below
        width = np.maximum(self._hi - self._lo, 1e-9)
        inside = np.abs(z - self._z_median) / width
        # outside first by excess; then inside by relative distance; ties keep FEATURES order
        order = sorted(range(len(x)),
                       key=lambda i: (0 if out[i] > 0 else 1, -out[i] if out[i] > 0
                                      else -inside[i], i))
        reasons = []
        for i in order[:max(top, 0)]:
            if out[i] == 0 and inside[i] == 0:
                break  # nothing left that differs from the usual
            value, lo, hi = float(x[i]), float(self._raw_min[i]), float(self._raw_max[i])
            med = float(self._raw_median[i])
            name = self.feature_names[i]
            text = f"{name} = {_num(value)}, learned range {_num(lo)}..{_num(hi)}"
            if not risk[i]:  # a volume feature is judged by its share of the window's activity
                share, share_lo, share_hi = (float(np.expm1(v)) for v in
                                             (z[i], self._lo[i], self._hi[i]))
                text = (f"{name} = {_num(value)}, {share:.0f}% of this window's activity, "
                        f"learned {share_lo:.0f}%..{share_hi:.0f}%")
                if out[i] > 0:
                    text += " (never seen)" if self._hi[i] == 0 else ""
                    reasons.append(Reason(feature=name, value=value, baseline_min=lo,
                                          baseline_max=hi, baseline_median=med,
                                          by_how_much=share - (share_hi if above[i] > 0
                                                               else share_lo),
                                          outside=True, text=text))
                    continue
            if above[i] > 0:
                by = value - hi
                text += f" ({_num(by)} above the maximum)"
            elif below[i] > 0:
                by = value - lo
                text += f" ({_num(-by)} below the minimum)"
            else:
                by = 0.0
                text += f", median {_num(med)}"
            reasons.append(Reason(feature=name, value=value, baseline_min=lo, baseline_max=hi,
                                  baseline_median=med, by_how_much=by, outside=bool(out[i] > 0),
                                  text=text))
        return reasons

    def nearest_window(self, vector: Sequence[float]) -> tuple[int, float]:
        """The training window closest to this one (Euclidean distance in log1p space)."""
        self._need_fit()
        z = self._log(self._matrix(vector))[0]
        d = np.sqrt(((self._z - z) ** 2).sum(axis=1))
        i = int(np.argmin(d))
        return i, float(d[i])

    def training_vector(self, index: int) -> tuple[float, ...]:
        self._need_fit()
        return tuple(float(v) for v in self._raw[index])

    # -- persistence ------------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Plain data (msgpack-able): the training windows and every parameter."""
        self._need_fit()
        return {
            "version": STATE_VERSION,
            "features": list(self.feature_names),
            "vectors": self._raw.tolist(),
            "seed": self.seed,
            "n_estimators": self.n_estimators,
            "contamination": self.contamination,
            "min_windows": self.min_windows,
            "margin": self.margin,
            "range_weight": self.range_weight,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> WindowModel:
        """Re-fit from `to_state()` data with the stored seed: identical scores."""
        try:
            if state.get("version") != STATE_VERSION:
                raise ModelStateError(
                    f"model state version {state.get('version')!r} is not {STATE_VERSION}")
            names = tuple(str(n) for n in state["features"])
            if names != FEATURES[:len(names)]:
                raise ModelStateError("model state features are not a prefix of FEATURES")
            model = cls(feature_names=names, min_windows=int(state["min_windows"]),
                        margin=float(state["margin"]),
                        range_weight=float(state["range_weight"]))
            contamination = state["contamination"]
            if not isinstance(contamination, str):
                contamination = float(contamination)
            vectors = state["vectors"]
            if any(len(v) != len(names) for v in vectors):
                raise ModelStateError("model state vectors do not match its feature list")
            return model.fit(vectors, seed=int(state["seed"]),
                             n_estimators=int(state["n_estimators"]),
                             contamination=contamination)
        except ModelStateError:
            raise
        except NotEnoughWindowsError as e:
            raise ModelStateError(f"model state is unusable: {e}") from e
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelStateError(f"model state is malformed: {e!r}") from e
