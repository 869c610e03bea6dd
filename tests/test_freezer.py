"""agent/freezer.py on a cgroup-like tree of plain files (the kernel's side, the freezing itself,
is in tests/test_cri_live.py): which freezer is used, the paths it finds, its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from driftwarden.agent.freezer import (
    CgroupFreezer,
    CgroupPaths,
    cgroup_path_of_spec,
    cgroup_paths_of_process,
    find_freezer_root,
)
from driftwarden.core.errors import RuntimeActionError

CID = "107a5e7c980f7add458bd03e485382115c0fd19ad6d5dcbb1eafccf9a62d0145"
POD = "/kubepods/besteffort/pod4f0ab913-49bd-4781-bd74-62f4d49f3374"
PATH = f"{POD}/{CID}"


def test_cgroup_paths_of_process() -> None:
    hybrid = (f"9:name=systemd:{PATH}\n8:pids:{PATH}\n6:freezer:{PATH}\n1:cpu,cpuacct:{PATH}\n"
              f"0::{PATH}\n")
    assert cgroup_paths_of_process(hybrid) == CgroupPaths(PATH, PATH)
    assert cgroup_paths_of_process(f"0::{PATH}\n") == CgroupPaths(PATH, None)  # pure v2
    assert cgroup_paths_of_process(f"4:cpu,freezer:{PATH}\n") == CgroupPaths(None, PATH)
    # outside the reader's cgroup namespace: not usable from here
    assert cgroup_paths_of_process("0::/../../kubepods/x\n") == CgroupPaths(None, None)
    assert cgroup_paths_of_process("") == CgroupPaths()


@pytest.mark.parametrize(("spec", "path"), [
    (PATH, PATH),
    (f"{PATH}/", PATH),
    ("kubepods-besteffort-pod4f0ab913_49bd.slice:cri-containerd:" + CID,
     "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod4f0ab913_49bd.slice/"
     f"cri-containerd-{CID}.scope"),
    (f"system.slice:docker:{CID}", f"/system.slice/docker-{CID}.scope"),
    (f":crio:{CID}", f"/system.slice/crio-{CID}.scope"),
    (f"-.slice:crio:{CID}", f"/crio-{CID}.scope"),
    ("", None),
    ("relative/path", None),
    ("a:b", None),
    (f"not-a-slice:crio:{CID}", None),
])
def test_cgroup_path_of_spec(spec: str, path: str | None) -> None:
    assert cgroup_path_of_spec(spec) == path


def test_find_freezer_root() -> None:
    mountinfo = (
        "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n"
        "35 25 0:31 / /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer\n")
    assert find_freezer_root(mountinfo) == Path("/sys/fs/cgroup/freezer")
    assert find_freezer_root(mountinfo.splitlines()[0]) is None


class Tree:
    """A v2 and a v1 freezer hierarchy with one container, as plain files."""

    def __init__(self, base: Path, *, v2: bool = True, v1: bool = True) -> None:
        self.v2_root, self.v1_root = base / "unified", base / "freezer"
        self.v2, self.v1 = self.v2_root / PATH.lstrip("/"), self.v1_root / PATH.lstrip("/")
        if v2:
            self.v2.mkdir(parents=True)
            (self.v2 / "cgroup.freeze").write_text("0\n")
            (self.v2 / "cgroup.events").write_text("populated 1\nfrozen 1\n")
        if v1:
            self.v1.mkdir(parents=True)
            (self.v1 / "freezer.state").write_text("THAWED\n")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


PATHS = CgroupPaths(PATH, PATH)


def test_the_v2_freezer_is_used_where_there_is_one(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    freezer = CgroupFreezer(tree.v2_root, tree.v1_root)
    assert not freezer.frozen(PATHS)
    freezer.freeze(PATHS)
    assert (tree.v2 / "cgroup.freeze").read_text() == "1"
    assert (tree.v1 / "freezer.state").read_text() == "THAWED\n"  # untouched
    assert freezer.frozen(PATHS)
    freezer.thaw(PATHS)
    assert (tree.v2 / "cgroup.freeze").read_text() == "0"
    assert not freezer.frozen(PATHS)


def test_a_v1_pause_counts_and_is_thawed(tmp_path: Path) -> None:
    """runc on a hybrid host (`docker pause`) freezes through the v1 controller."""
    tree = Tree(tmp_path)
    (tree.v1 / "freezer.state").write_text("FROZEN\n")
    freezer = CgroupFreezer(tree.v2_root, tree.v1_root)
    assert freezer.frozen(PATHS)
    freezer.thaw(PATHS)
    assert (tree.v1 / "freezer.state").read_text() == "THAWED"
    assert (tree.v2 / "cgroup.freeze").read_text() == "0\n"  # was not frozen: not written


def test_the_v1_freezer_without_a_v2_one(tmp_path: Path) -> None:
    tree = Tree(tmp_path, v2=False)
    clock = Clock()
    freezer = CgroupFreezer(tree.v2_root, tree.v1_root, timeout=1.0, clock=clock,
                            sleep=clock.sleep)
    (tree.v1 / "freezer.state").write_text("FROZEN")  # the kernel would be this quick
    freezer.freeze(PATHS)
    assert (tree.v1 / "freezer.state").read_text() == "FROZEN"
    assert freezer.frozen(PATHS)


def test_a_freeze_that_does_not_finish_is_undone(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    (tree.v2 / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    clock = Clock()
    freezer = CgroupFreezer(tree.v2_root, tree.v1_root, timeout=2.0, clock=clock,
                            sleep=clock.sleep)
    with pytest.raises(RuntimeActionError, match=r"did not freeze within 2 s .*thawed it again"):
        freezer.freeze(PATHS)
    assert (tree.v2 / "cgroup.freeze").read_text() == "0"
    assert clock.now >= 2.0


def test_no_freezer_is_a_clear_error(tmp_path: Path) -> None:
    freezer = CgroupFreezer(tmp_path / "unified", None)
    with pytest.raises(RuntimeActionError) as raised:
        freezer.freeze(PATHS)
    assert str(raised.value) == (
        f"no cgroup freezer for this container; tried {tmp_path}/unified{PATH}/cgroup.freeze, "
        f"(no v1 freezer mount){PATH}/freezer.state: the cgroup v2 freezer needs Linux 5.2+, "
        "the v1 one the freezer controller mounted (or the container is not running)")
    with pytest.raises(RuntimeActionError, match=r"its cgroup path is not known"):
        freezer.thaw(CgroupPaths())
    assert not freezer.frozen(PATHS)


def test_a_write_the_kernel_refuses_says_what_to_do(tmp_path: Path) -> None:
    tree = Tree(tmp_path)
    (tree.v2 / "cgroup.freeze").unlink()
    (tree.v2 / "cgroup.freeze").mkdir()  # a write to it fails with EISDIR
    freezer = CgroupFreezer(tree.v2_root, tree.v1_root)
    with pytest.raises(RuntimeActionError, match=r"^cannot write '1' to .*cgroup.freeze: Is a "
                       r"directory \(the agent needs root and /sys/fs/cgroup mounted read-write"):
        freezer.freeze(PATHS)
