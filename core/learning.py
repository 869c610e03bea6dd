"""When learning ends: the policy, the progress it reads and the automatic step.

One rule for an agent's own baselines (driftwarden.models.profile) and for the collector's
fleet baselines, which end learning over every node's windows: both step the same state
machine (:func:`next_mode`). Learning ends (learn -> monitor) when the baseline is stable:
past the warm-up, with at least `min_windows` clean windows, and no new item for
`stable_seconds`; or after `learn_for` seconds. A baseline still growing past `max_items` is
flagged unstable instead of learning forever.
"""

from __future__ import annotations

from dataclasses import dataclass

from driftwarden.core.errors import UsageError
from driftwarden.core.modes import Mode

MAX_WINDOWS = 2000  # training windows kept per image (oldest dropped first)


@dataclass(frozen=True)
class LearningPolicy:
    """When learning ends. All durations in seconds; documented defaults."""

    warmup_seconds: float = 60.0  # nothing ends learning before this
    stable_seconds: float = 120.0  # no new item for this long => stable
    min_windows: int = 20  # clean windows needed (the forest needs data)
    learn_for: float | None = None  # end learning after this long, stable or not
    max_items: int = 10_000  # more items than this while learning => unstable

    def __post_init__(self) -> None:
        if self.warmup_seconds < 0 or self.stable_seconds <= 0:
            raise UsageError("warm-up must be >= 0 and the stable period > 0 seconds")
        if self.min_windows < 1 or self.max_items < 1:
            raise UsageError("min windows and max items must be >= 1")
        if self.learn_for is not None and self.learn_for <= 0:
            raise UsageError(f"--learn-for must be > 0 seconds, got {self.learn_for}")


@dataclass
class LearningProgress:
    started_at: float  # wall clock (time.time()): survives restarts
    last_new_item_at: float
    windows_learned: int = 0
    windows_tainted: int = 0
    items_seen: int = 0
    unstable: bool = False
    ended_at: float | None = None
    end_reason: str | None = None


@dataclass(frozen=True)
class Transition:
    mode: Mode
    reason: str


def next_mode(mode: Mode, progress: LearningProgress, policy: LearningPolicy,
              now: float) -> Transition | None:
    """The state machine's automatic step (operators change modes explicitly)."""
    if mode is not Mode.LEARN:
        return None
    age = now - progress.started_at
    if policy.learn_for is not None and age >= policy.learn_for:
        return Transition(Mode.MONITOR, f"learned for {policy.learn_for:g} s (--learn-for)")
    if progress.unstable:
        return None  # keeps learning, flagged; an operator decides
    if age < policy.warmup_seconds or progress.windows_learned < policy.min_windows:
        return None
    quiet = now - progress.last_new_item_at
    if quiet >= policy.stable_seconds:
        return Transition(
            Mode.MONITOR,
            f"stable: no new behaviour for {quiet:.0f} s after {progress.windows_learned} "
            "clean windows",
        )
    return None


def is_stable(progress: LearningProgress, policy: LearningPolicy, now: float) -> bool:
    """Whether a learning baseline's items have been quiet for the stable period."""
    return not progress.unstable and now - progress.last_new_item_at >= policy.stable_seconds


__all__ = [
    "MAX_WINDOWS",
    "LearningPolicy",
    "LearningProgress",
    "Transition",
    "is_stable",
    "next_mode",
]
