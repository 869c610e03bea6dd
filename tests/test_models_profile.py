"""Profiles: learning state machine, tainting, persistence, export/import, corrupt files."""

from __future__ import annotations

import msgpack
import pytest
from driftwarden.core.errors import BaselineError, UsageError
from driftwarden.core.modes import Mode
from driftwarden.models.profile import (
    LearningPolicy,
    Profile,
    ProfileStore,
    baseline_filename,
    next_mode,
)

IMAGE = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
T0 = 1_700_000_000.0


class Items:
    """The ItemSet interface the profile relies on, over plain string items."""

    def __init__(self, keys=()):
        self._items = set(keys)

    def add(self, item) -> bool:
        if item in self._items:
            return False
        self._items.add(item)
        return True

    def __contains__(self, item) -> bool:
        return item in self._items

    def covers(self, item) -> bool:  # "dir/*" takes in "dir/<anything>"
        return any(k.endswith("/*") and item.startswith(k[:-1]) for k in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def to_msgpack_obj(self):
        return sorted(self._items)

    @classmethod
    def from_msgpack_obj(cls, obj):
        return cls(obj)


POLICY = LearningPolicy(warmup_seconds=60, stable_seconds=120, min_windows=3, max_items=5)


def profile(**kw) -> Profile:
    return Profile(image_id=IMAGE, image_name="web:1.0", items=Items(), created_at=T0,
                   updated_at=T0, **kw)


def learn_windows(p: Profile, n: int, now: float) -> None:
    for _ in range(n):
        p.learn_window((1.0, 2.0), tainted=False, now=now)


def test_new_items_are_learned_and_returned_as_novel():
    p = profile()
    assert p.observe(["exec:/bin/sh", "exec:/bin/ls"], T0 + 1, POLICY) == [
        "exec:/bin/sh", "exec:/bin/ls"]
    assert p.observe(["exec:/bin/sh"], T0 + 2, POLICY) == []
    assert len(p.items) == 2 and p.progress.last_new_item_at == T0 + 1
    assert p.version == 2  # one change: two items in one event


def test_monitor_mode_reports_novelty_without_learning_it():
    p = profile()
    p.set_mode(Mode.MONITOR, reason="test", who="op", now=T0)
    assert p.observe(["exec:/tmp/x"], T0 + 1, POLICY) == ["exec:/tmp/x"]
    assert "exec:/tmp/x" not in p.items


def test_stable_after_warmup_min_windows_and_quiet_period():
    p = profile()
    p.observe(["a"], T0 + 10, POLICY)
    learn_windows(p, 3, T0 + 20)
    assert p.step(T0 + 59, POLICY) is None  # still warming up
    assert p.step(T0 + 129, POLICY) is None  # quiet for 119 s only
    transition = p.step(T0 + 130, POLICY)
    assert transition is not None and transition.mode is Mode.MONITOR
    assert "no new behaviour for 120 s after 3 clean windows" in transition.reason
    assert p.mode is Mode.MONITOR and p.progress.ended_at == T0 + 130
    assert p.history[-1] == {"at": T0 + 130, "from": "learn", "to": "monitor",
                             "reason": transition.reason, "by": "agent"}


def test_not_stable_without_enough_clean_windows():
    p = profile()
    learn_windows(p, 2, T0 + 1)
    p.learn_window((9.0, 9.0), tainted=True, now=T0 + 2)
    assert p.step(T0 + 1000, POLICY) is None
    assert p.progress.windows_learned == 2 and p.progress.windows_tainted == 1
    assert len(p.windows) == 2  # the tainted window was not learned


def test_a_new_item_restarts_the_quiet_period():
    p = profile()
    learn_windows(p, 3, T0)
    p.observe(["late"], T0 + 100, POLICY)
    assert p.step(T0 + 200, POLICY) is None
    assert p.step(T0 + 220, POLICY).mode is Mode.MONITOR


def test_learn_for_ends_learning_even_when_unstable():
    policy = LearningPolicy(warmup_seconds=60, stable_seconds=120, min_windows=3, max_items=2,
                            learn_for=30)
    p = profile()
    p.observe(["a", "b", "c"], T0 + 1, policy)
    assert p.progress.unstable
    transition = p.step(T0 + 30, policy)
    assert transition.mode is Mode.MONITOR and "--learn-for" in transition.reason


def test_growing_past_max_items_is_flagged_unstable_and_keeps_learning():
    p = profile()
    p.observe([f"i{n}" for n in range(6)], T0 + 1, POLICY)
    learn_windows(p, 3, T0 + 2)
    assert p.progress.unstable
    assert p.step(T0 + 10_000, POLICY) is None
    assert p.mode is Mode.LEARN


def test_relearning_restarts_the_clock():
    p = profile()
    p.set_mode("monitor", reason="op", who="alice", now=T0 + 5)
    p.set_mode("learn", reason="new version", who="alice", now=T0 + 500)
    assert p.progress.started_at == T0 + 500 and p.progress.end_reason is None
    assert [h["to"] for h in p.history] == ["monitor", "learn"]


def test_unknown_mode_is_a_usage_error():
    with pytest.raises(UsageError, match="unknown mode 'paranoid': choose learn, monitor or"):
        profile().set_mode("paranoid", reason="x", who="op", now=T0)


def test_next_mode_is_none_outside_learning():
    p = profile()
    assert next_mode(Mode.PROTECT, p.progress, POLICY, T0 + 10_000) is None


def test_policy_validation():
    with pytest.raises(UsageError, match="--learn-for must be > 0 seconds, got 0"):
        LearningPolicy(learn_for=0)
    with pytest.raises(UsageError):
        LearningPolicy(min_windows=0)


def test_store_round_trip_keeps_everything(tmp_path):
    store = ProfileStore(tmp_path, Items)
    p = profile()
    p.observe(["exec:/bin/sh"], T0 + 1, POLICY)
    learn_windows(p, 3, T0 + 2)
    p.set_mode(Mode.PROTECT, reason="op", who="alice", now=T0 + 3)
    path = store.save(p)
    assert path.name == "sha256-" + "ab" * 32 + ".msgpack"
    loaded = store.load(IMAGE)
    assert loaded.to_obj() == p.to_obj()
    assert loaded.mode is Mode.PROTECT and loaded.version == p.version
    assert [q.image_id for q in store.list()] == [IMAGE]
    assert not list(tmp_path.glob("baselines/.*tmp*"))  # no temp file left behind


def test_missing_baseline_is_none(tmp_path):
    assert ProfileStore(tmp_path, Items).load(IMAGE) is None


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong-shape", "wrong-format"])
def test_corrupt_baseline_is_kept_aside_and_the_image_relearns(tmp_path, damage, caplog):
    store = ProfileStore(tmp_path, Items)
    path = store.save(profile())
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\xc1\xc1 not msgpack")
    elif damage == "wrong-shape":
        path.write_bytes(msgpack.packb([1, 2, 3]))
    else:
        obj = msgpack.unpackb(data)
        obj["format"] = 99
        path.write_bytes(msgpack.packb(obj))
    damaged = path.read_bytes()
    assert store.load(IMAGE) is None
    kept = list(path.parent.glob(path.name + ".corrupt-*"))
    assert len(kept) == 1 and kept[0].read_bytes() == damaged
    assert not path.exists()
    assert "unusable" in caplog.text and "the image relearns" in caplog.text


def test_export_then_import_on_a_fresh_state_dir_starts_in_monitor(tmp_path):
    source = ProfileStore(tmp_path / "ci", Items)
    p = profile()
    p.observe(["exec:/bin/sh", "write:/var/log/*.log:append"], T0 + 1, POLICY)
    source.save(p)
    exported = source.export(IMAGE, tmp_path / "web.baseline")
    target = ProfileStore(tmp_path / "node", Items)
    imported = target.import_file(exported, image_id=IMAGE, now=T0 + 50)
    assert imported.mode is Mode.MONITOR
    assert imported.history[-1]["by"] == "import"
    reloaded = target.load(IMAGE)
    assert reloaded.items.to_msgpack_obj() == ["exec:/bin/sh", "write:/var/log/*.log:append"]


def test_import_for_another_image_is_refused_unless_forced(tmp_path):
    source = ProfileStore(tmp_path / "a", Items)
    source.save(profile())
    exported = source.export(IMAGE, tmp_path / "x.baseline")
    target = ProfileStore(tmp_path / "b", Items)
    with pytest.raises(UsageError, match=r"is a baseline of image sha256:abab.*pass --force"):
        target.import_file(exported, image_id=OTHER)
    assert target.load(OTHER) is None  # nothing stored
    forced = target.import_file(exported, image_id=OTHER, force=True)
    assert forced.image_id == OTHER and target.load(OTHER) is not None


def test_import_of_a_corrupt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.baseline"
    bad.write_bytes(b"\x00\x01")
    with pytest.raises(BaselineError, match=r"bad.baseline is corrupt or truncated"):
        ProfileStore(tmp_path, Items).import_file(bad)


def test_export_of_an_unknown_image(tmp_path):
    with pytest.raises(UsageError, match="no baseline for image sha256:cdcd"):
        ProfileStore(tmp_path, Items).export(OTHER, tmp_path / "x")


def test_baseline_filename_never_escapes_the_directory():
    assert baseline_filename(IMAGE) == "sha256-" + "ab" * 32 + ".msgpack"
    name = baseline_filename("../../etc/passwd")
    assert "/" not in name and name.startswith("id-") and name.endswith(".msgpack")


def test_profile_with_the_real_item_set_round_trips(tmp_path):
    from driftwarden.models.items import ConnectItem, ExecItem, ItemSet, WriteItem

    store = ProfileStore(tmp_path, ItemSet)
    p = Profile(image_id=IMAGE, image_name="web:1.0", items=ItemSet(), created_at=T0)
    items = [ExecItem("/bin/busybox", "httpd"),
             ConnectItem("inet", "loopback", "127.0.0.1", 5432, "tcp", "/bin/busybox"),
             WriteItem("/var/log/app-*.log", "append")]
    assert p.observe(items, T0 + 1, POLICY) == items
    assert p.observe(items, T0 + 2, POLICY) == []
    store.save(p)
    loaded = store.load(IMAGE)
    assert all(item in loaded.items for item in items) and len(loaded.items) == 3
    assert loaded.observe([ExecItem("/tmp/x", "x")], T0 + 3, POLICY) == [ExecItem("/tmp/x", "x")]
