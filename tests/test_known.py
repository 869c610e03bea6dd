"""agent.known.KnownFilter: what goes into the kernel's map `known`, and what comes back, against
a map kept in a dict (the real map: tests/test_known_live.py)."""

from __future__ import annotations

from driftwarden.agent.known import KnownFilter
from driftwarden.core.records import ContainerView, TraceRecord
from driftwarden.probes._layout import EventKind, FileOp, Flag
from driftwarden.probes.events import ConnectEvent, ExecEvent, Family, FileEvent, Header, SockType

CGROUP = 4242


class FakeMap:
    """The map as a dict, bounded like the kernel's."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: dict[tuple[int, int, int], list[int]] = {}
        self.removed: list[tuple[int, int, int]] = []
        self.reads = 0
        self.hits_ever = 0

    def install(self, entries) -> int:
        done = 0
        for cgroup_id, kind, key, ts_ns in entries:
            if len(self.entries) >= self.size:
                continue
            self.entries[(cgroup_id, kind, key)] = [0, ts_ns]
            done += 1
        return done

    def read(self):
        self.reads += 1
        return {key: (hits, last) for key, (hits, last) in self.entries.items()}

    def total(self) -> int:
        """The kernel's `known` counters: every hit of every entry, also of entries gone."""
        return self.hits_ever

    def remove(self, keys) -> None:
        for key in keys:
            self.removed.append(key)
            self.entries.pop(key, None)

    def hit(self, key, n: int, at_ns: int) -> None:
        self.entries[key][0] += n
        self.entries[key][1] = at_ns
        self.hits_ever += n


def _header(kind: EventKind, ts_ns: int = 1000) -> Header:
    return Header(kind, ts_ns, CGROUP, 7, 7, 1, 0, 0, "app", Flag(0), 0)


def _write(path: str, key: int) -> TraceRecord:
    event = FileEvent(_header(EventKind.FILE), FileOp.OPEN, path, None, -100, -100, 0o2101,
                      0o644, 0x7FFFFFFF, known_key=key)
    return _record(event, "write")


def _connect(key: int) -> TraceRecord:
    event = ConnectEvent(_header(EventKind.CONNECT), Family.INET, 2, "127.0.0.1", 80,
                         SockType.TCP, 0, 3, key)
    return _record(event, "connect")


def _record(event, kind: str) -> TraceRecord:
    view = ContainerView(state="container", cgroup_id=CGROUP, id="c1", image="app:1",
                         image_id="sha256:a", cgroup_path="/docker/c1")
    return TraceRecord(event=event, kind=kind, container=view, ppid=1)


def _filter(fake: FakeMap, capacity: int = 8, clock=lambda: 100.0) -> KnownFilter:
    return KnownFilter(fake.install, fake.read, fake.remove, capacity=capacity,
                       idle_seconds=60, poll_seconds=1.0, clock=clock)


def test_offers_go_in_at_flush_and_hits_come_back_as_their_exemplar():
    fake = FakeMap(16)
    known = _filter(fake)
    write, connect = _write("/data/app.log", 11), _connect(22)
    assert known.offer(write, "sha256:a", "c1") is True
    assert known.offer(connect, "sha256:a", "c1") is True
    assert known.offer(write, "sha256:a", "c1") is False  # already offered
    assert fake.entries == {}
    known.flush()
    assert set(fake.entries) == {(CGROUP, 3, 11), (CGROUP, 2, 22)}
    assert fake.entries[(CGROUP, 3, 11)] == [0, 1000]  # the judged event is not a hit
    assert known.poll(101.0) == []
    fake.hit((CGROUP, 3, 11), 3, 5000)
    assert known.poll(102.0) == [(write, 3, 5000)]
    fake.hit((CGROUP, 3, 11), 1, 6000)
    fake.hit((CGROUP, 2, 22), 2, 6500)
    assert sorted(known.poll(103.0), key=lambda x: x[1]) == [(write, 1, 6000),
                                                             (connect, 2, 6500)]
    assert known.stats["hits"] == 6 and known.stats["installed"] == 2
    assert dict(known.hits_by_container) == {"c1": 6}


def test_what_the_kernel_cannot_filter_is_never_offered():
    known = _filter(FakeMap(16))
    assert known.offer(_write("relative.log", 0), "sha256:a", "c1") is False
    view = ContainerView(state="container", cgroup_id=CGROUP, id="c1", image_id="sha256:a")
    execution = ExecEvent(_header(EventKind.EXEC), "/bin/true", ("true",), 0, -100, False,
                          False, 99)
    assert known.offer(TraceRecord(event=execution, kind="exec", container=view, ppid=1),
                       "sha256:a", "c1") is False
    assert len(known) == 0


def test_a_full_map_refuses_and_counts():
    fake = FakeMap(1)  # the kernel's map is smaller than the filter thinks
    known = _filter(fake, capacity=2)
    for key in (1, 2, 3):
        known.offer(_write(f"/f{key}", key), "sha256:a", "c1")
    assert known.stats["refused_full"] == 1  # over the capacity: never offered
    known.flush()
    assert known.stats["refused_full"] == 2 and known.stats["installed"] == 1
    known.poll(101.0)  # what the map refused is not kept
    assert len(known) == 1 and list(fake.entries) == [(CGROUP, 3, 1)]


def test_idle_identities_and_learning_images_are_taken_out():
    now = [100.0]
    fake = FakeMap(16)
    known = _filter(fake, clock=lambda: now[0])
    known.offer(_write("/a", 1), "sha256:a", "c1")
    known.offer(_write("/b", 2), "sha256:a", "c1")
    other = _write("/c", 3)
    known.flush()
    known.offer(other, "sha256:b", "c2")
    known.flush()
    fake.hit((CGROUP, 3, 2), 1, 10)
    now[0] = 130.0
    known.poll(130.0)
    now[0] = 170.0
    known.poll(170.0)  # /a: idle since 100; /b hit at 130
    assert known.stats["evicted_idle"] == 2 and (CGROUP, 3, 1) in fake.removed
    assert set(fake.entries) == {(CGROUP, 3, 2)}
    assert known.images() == ["sha256:a"]
    assert known.forget_image("sha256:a") == 1
    assert fake.entries == {} and len(known) == 0 and known.images() == []


def test_entries_of_a_gone_cgroup_are_taken_out_after_their_last_hits_count():
    """A restarted or removed container's cgroup is gone (a restart is a new cgroup): its
    entries leave the map at the next check, counted, once its last hits are read; a cgroup
    that is there, or whose entries were hit since the last read, is not asked about."""
    now = [100.0]
    fake = FakeMap(16)
    there = {CGROUP: True}
    asked: list[tuple[int, str | None]] = []

    def alive(cgroup_id: int, path: str | None) -> bool:
        asked.append((cgroup_id, path))
        return there[cgroup_id]

    known = KnownFilter(fake.install, fake.read, fake.remove, capacity=8, idle_seconds=600,
                        poll_seconds=1.0, alive=alive, gone_check_seconds=5.0,
                        clock=lambda: now[0])
    write, connect = _write("/data/app.log", 11), _connect(22)
    known.offer(write, "sha256:a", "c1")
    known.offer(connect, "sha256:a", "c1")
    known.flush()
    assert known.poll(101.0) == [] and asked == [(CGROUP, "/docker/c1")]  # one ask a cgroup
    fake.hit((CGROUP, 3, 11), 2, 5000)
    there[CGROUP] = False
    assert known.poll(103.0) == [(write, 2, 5000)]  # not a check yet
    assert len(known) == 2 and len(asked) == 1
    fake.hit((CGROUP, 3, 11), 1, 6000)  # its last event, before it went
    assert known.poll(107.0) == [(write, 1, 6000)]  # counted; the connect's entry goes
    assert known.stats["gone"] == 1 and list(fake.entries) == [(CGROUP, 3, 11)]
    assert known.poll(113.0) == []
    assert known.stats["gone"] == 2 and fake.entries == {} and len(known) == 0
    assert known.images() == [] and known.stats["hits"] == 3


def test_cgroup_alive_compares_the_directory_inode(tmp_path):
    from driftwarden.agent.known import cgroup_alive

    (tmp_path / "docker" / "c1").mkdir(parents=True)
    inode = (tmp_path / "docker" / "c1").stat().st_ino
    alive = cgroup_alive(tmp_path)
    assert alive(inode, "/docker/c1") is True
    assert alive(inode + 1, "/docker/c1") is False  # restarted: a new directory, same path
    assert alive(inode, "/docker/c2") is False
    assert alive(inode, None) is True  # no path: cannot tell


def test_a_canonicalised_identity_is_offered_when_it_comes_again(tmp_path):
    """A write whose path the baseline holds as a pattern (/var/log/app.N.log) is not offered
    when first judged known (a family of names mostly never repeats: it would fill the map);
    the same exact identity coming again is, and its kernel key goes in at the flush."""
    from driftwarden.agent.alerts import ListAlertSink
    from driftwarden.agent.detect import Detector, DetectorConfig
    from driftwarden.core.modes import Mode
    from driftwarden.models.items import ItemSet
    from driftwarden.models.profile import LearningPolicy, ProfileStore

    def write(path: str, key: int, t: float) -> TraceRecord:
        event = FileEvent(_header(EventKind.FILE, int(t * 1e9)), FileOp.OPEN, path, None, -100,
                          -100, 0o2101, 0o644, 0x7FFFFFFF, known_key=key)
        return _record(event, "write")._replace(path=path)

    fake = FakeMap(16)
    known = _filter(fake)
    detector = Detector(DetectorConfig(window_seconds=1.0, policy=LearningPolicy()),
                        ProfileStore(tmp_path, ItemSet), ListAlertSink(),
                        layers_of=lambda _c, _t: None, clock=lambda: 100.0, known=known)
    for day in range(101, 104):  # learned: the pattern
        detector.write(write(f"/var/log/app.{day}.log", day, 1.0))
    [profile] = detector.profiles.values()
    profile.set_mode(Mode.MONITOR, reason="test", who="test", now=100.0)
    detector.write(write("/var/log/app.104.log", 104, 2.0))
    detector.write(write("/data/plain.log", 7, 2.0))  # not learned: novel, never offered
    detector.flush()
    assert fake.entries == {}
    detector.write(write("/var/log/app.104.log", 104, 3.0))  # the same identity again
    detector.flush()
    assert list(fake.entries) == [(CGROUP, int(EventKind.FILE), 104)]
    assert detector.stats["known_again"] == 1


def test_the_map_is_read_only_when_the_kernels_total_moved_or_entries_went_in():
    fake = FakeMap(16)
    known = KnownFilter(fake.install, fake.read, fake.remove, capacity=8, idle_seconds=60,
                        poll_seconds=1.0, moved=fake.total, max_read_age=10.0,
                        clock=lambda: 100.0)
    write, connect = _write("/data/app.log", 11), _connect(22)
    known.offer(write, "sha256:a", "c1")
    known.flush()
    assert known.poll(101.0) == [] and fake.reads == 1  # what went in is read back once
    assert known.poll(102.0) == [] and known.poll(103.0) == [] and fake.reads == 1
    assert known.stats["reads_skipped"] == 2
    fake.hit((CGROUP, 3, 11), 2, 5000)
    assert known.poll(104.0) == [(write, 2, 5000)] and fake.reads == 2
    known.offer(connect, "sha256:a", "c1")
    known.flush()  # the total did not move, but a new entry's fate is read
    assert known.poll(105.0) == [] and fake.reads == 3 and len(known) == 2
    fake.entries.pop((CGROUP, 2, 22))  # taken out behind the filter's back: no total moves
    assert known.poll(114.0) == [] and fake.reads == 3 and len(known) == 2
    assert known.poll(115.0) == [] and fake.reads == 4 and len(known) == 1  # max_read_age
    # idle eviction still happens: at the reads max_read_age forces
    assert known.poll(160.0) == [] and fake.reads == 5 and len(known) == 1  # hit at 104
    assert known.poll(170.0) == [] and fake.reads == 6 and len(known) == 0
    assert known.stats["evicted_idle"] == 1 and known.stats["hits"] == 2
