"""Drift verdicts from the container's own layers: fixture trees, then a real container."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from driftwarden.models.drift import (
    DriftKind,
    Layers,
    classify_exec,
    classify_write,
    in_binary_dir,
    layers_from_graphdriver,
    layers_from_mountinfo,
    normalize_container_path,
)

MOUNTINFO = (
    "79 52 0:39 / / rw,relatime master:2 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/"
    "l/JIU2:/var/lib/docker/overlay2/l/ZXJ7,upperdir=/var/lib/docker/overlay2/012e/diff,"
    "workdir=/var/lib/docker/overlay2/012e/work\n"
    "80 79 0:42 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw\n"
)


def test_layers_from_mountinfo():
    layers = layers_from_mountinfo(MOUNTINFO)
    assert layers == Layers(upper=Path("/var/lib/docker/overlay2/012e/diff"),
                            lowers=(Path("/var/lib/docker/overlay2/l/JIU2"),
                                    Path("/var/lib/docker/overlay2/l/ZXJ7")))


def test_mountinfo_escapes_and_non_overlay_root():
    escaped = MOUNTINFO.replace("012e/diff", "my\\040dir/diff")
    assert layers_from_mountinfo(escaped).upper == Path("/var/lib/docker/overlay2/my dir/diff")
    ext4 = "22 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
    assert layers_from_mountinfo(ext4) is None
    assert layers_from_mountinfo("") is None


def test_layers_from_graphdriver():
    data = {"Name": "overlay2", "Data": {"UpperDir": "/u", "LowerDir": "/l1:/l2",
                                          "MergedDir": "/m", "WorkDir": "/w"}}
    assert layers_from_graphdriver(data) == Layers(Path("/u"), (Path("/l1"), Path("/l2")))
    assert layers_from_graphdriver({"Name": "btrfs", "Data": {}}) is None


@pytest.fixture
def layers(tmp_path) -> Layers:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in ("bin", "usr/bin", "app"):
        (lower / d).mkdir(parents=True)
    (upper / "tmp").mkdir(parents=True)
    (upper / "bin").mkdir(parents=True)
    (lower / "bin/busybox").write_bytes(b"elf")
    (lower / "usr/bin/python3").write_bytes(b"elf")
    (lower / "app/run.sh").write_bytes(b"#!/bin/sh")
    (upper / "tmp/dropped").write_bytes(b"elf")  # added at run time
    (upper / "bin/busybox").write_bytes(b"patched")  # copied up: modified
    return Layers(upper=upper, lowers=(lower,))


def test_exec_of_an_added_binary(layers):
    verdict = classify_exec("/tmp/dropped", None, layers)
    assert verdict.kind is DriftKind.EXEC_ADDED and verdict.path == "/tmp/dropped"
    assert verdict.reason == ("ran /tmp/dropped, which the image does not contain "
                              "(added at run time)")


def test_exec_of_a_modified_binary_uses_the_real_exe(layers):
    verdict = classify_exec("/bin/sh", "/bin/busybox", layers)
    assert verdict.kind is DriftKind.EXEC_MODIFIED and verdict.path == "/bin/busybox"


def test_exec_in_a_container_removed_with_its_upper_layer(layers):
    """`docker run --rm`: the upper layer is deleted before a loaded agent looks; a file the
    container was seen writing at run time is judged by the image's layers alone."""
    import shutil

    written = {"/tmp/dropped", "/bin/busybox", "/data/tool"}.__contains__
    shutil.rmtree(layers.upper)
    added = classify_exec("/tmp/dropped", None, layers, written=written)
    assert (added.kind, added.path) == (DriftKind.EXEC_ADDED, "/tmp/dropped")
    modified = classify_exec("/bin/sh", "/bin/busybox", layers, written=written)
    assert (modified.kind, modified.path) == (DriftKind.EXEC_MODIFIED, "/bin/busybox")
    assert classify_exec("/tmp/other", None, layers, written=written) is None  # not seen written
    assert classify_exec("/tmp/dropped", None, layers) is None  # nothing to tell
    layers.upper.mkdir()
    # the upper layer is there and lacks it: written elsewhere (a volume), not drift
    assert classify_exec("/data/tool", None, layers, written=written) is None


def test_exec_of_a_shipped_binary_is_not_drift(layers):
    assert classify_exec("/usr/bin/python3", "/usr/bin/python3", layers) is None
    assert classify_exec("/app/../usr/bin/python3", None, layers) is None


def test_fileless_and_deleted_execs_need_no_layers():
    memfd = classify_exec("/proc/self/fd/3", "/memfd:payload (deleted)", None)
    assert memfd.kind is DriftKind.EXEC_MEMFD
    deleted = classify_exec("/tmp/x", "/tmp/x (deleted)", None)
    assert deleted.kind is DriftKind.EXEC_DELETED and deleted.path == "/tmp/x"


def test_exec_without_layers_or_with_relative_path_is_not_judged(layers):
    assert classify_exec("/tmp/dropped", None, None) is None
    assert classify_exec("dropped", None, layers) is None


@pytest.mark.parametrize(("path", "op", "kind"), [
    ("/bin/evil", "create", DriftKind.WRITE_BINARY_DIR),
    ("/usr/lib/x86_64-linux-gnu/libc.so.6", "truncate", DriftKind.WRITE_BINARY_DIR),
    ("/usr/local/bin/tool", "rename-to", DriftKind.WRITE_BINARY_DIR),
    ("/bin/busybox", "chmod+x", DriftKind.WRITE_BINARY_DIR),
    ("/tmp/dropped", "chmod+x", DriftKind.CHMOD_X_NEW_FILE),
    ("/tmp/dropped", "setuid", DriftKind.SETUID_NEW_FILE),
    ("/app/run.sh", "chmod+x", None),  # shipped by the image
    ("/tmp/log.txt", "append", None),
    ("/bin/old", "rename-from", None),  # moving a file away does not add one
    ("/binaries/x", "create", None),  # not a prefix match on the name
    ("rel/path", "chmod+x", None),  # unresolved: reported elsewhere
])
def test_write_verdicts(layers, path, op, kind):
    verdict = classify_write(path, op, layers)
    assert (verdict.kind if verdict else None) is kind


def test_paths_cannot_climb_out_of_the_container():
    assert normalize_container_path("/../../etc/passwd") == "/etc/passwd"
    assert normalize_container_path("//bin//sh") == "/bin/sh"
    assert in_binary_dir("/usr/bin/../../bin/x") == "/bin"
    assert in_binary_dir("/usr/share/doc") is None


@pytest.mark.integration
def test_real_container_drop_and_modify(docker_ok, host_image):
    """Docker's layers for a running container of real binaries: a copied binary is added, a
    patched one is modified, an untouched one is not drift."""
    from tests.support.containers import run_container

    with run_container(host_image, ["/bin/sleep", "3600"]) as c:
        code, out = c.exec(["/bin/sh", "-c",
                            "mkdir -p /tmp/drop && cp /bin/true /tmp/drop/true && "
                            "/tmp/drop/true && echo '#' >> /bin/cat && echo x > /data/new"])
        assert code == 0, out
        mountinfo = Path(f"/proc/{c.pid}/mountinfo").read_text()
        layers = layers_from_mountinfo(mountinfo)
        assert layers is not None and layers.upper.is_dir()
        assert all(lower.is_dir() for lower in layers.lowers)
        graph = c.container.attrs["GraphDriver"]
        assert layers_from_graphdriver(graph).upper == layers.upper

        added = classify_exec("/tmp/drop/true", "/tmp/drop/true", layers)
        assert added.kind is DriftKind.EXEC_ADDED
        modified = classify_exec("/bin/cat", "/bin/cat", layers)
        assert modified.kind is DriftKind.EXEC_MODIFIED
        assert os.path.exists(layers.upper / "bin/cat")
        assert classify_exec("/bin/ls", "/bin/ls", layers) is None
        assert classify_write("/data/new", "chmod+x", layers).kind is DriftKind.CHMOD_X_NEW_FILE
        assert classify_write("/bin/cat", "append", layers).kind is DriftKind.WRITE_BINARY_DIR


def test_realpath_follows_symlinks_through_the_layers(tmp_path):
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    (lower / "usr/bin").mkdir(parents=True)
    (lower / "usr/bin/busybox").write_bytes(b"elf")
    (lower / "bin").symlink_to("usr/bin")  # merged-usr: /bin -> usr/bin (relative)
    (lower / "usr/bin/sh").symlink_to("/usr/bin/busybox")
    (upper / "usr/bin").mkdir(parents=True)
    (upper / "usr/bin/nc").symlink_to("busybox")  # added in the upper layer
    (lower / "loop").symlink_to("loop")
    layers = Layers(upper=upper, lowers=(lower,))
    assert layers.realpath("/bin/sh") == "/usr/bin/busybox"
    assert layers.realpath("/bin/nc") == "/usr/bin/busybox"
    assert layers.realpath("/usr/bin/busybox") == "/usr/bin/busybox"
    assert layers.realpath("/not/there") == "/not/there"
    assert layers.realpath("/loop") == "/loop"  # a loop stops, it does not hang
