"""Offline, content-addressed test images (no registry is reachable: everything is FROM scratch).

Each builder assembles its build context in a temp dir, hashes the whole context (paths, modes,
bytes: recipe and inputs alike) and tags the image ``<prefix>:<12 hex digits>``. An existing tag
is a cache hit, so a rebuild happens only when an input or the recipe changes. A per-tag thread
lock plus an flock on a file make concurrent callers (threads, pytest-xdist workers) build once.

Public API: busybox_image(), host_binaries_image(), debian_image(), storm_image(), storm_binary(),
workload_image() (on the busybox image or another base), ImageBuildError.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import docker
from docker.errors import APIError, BuildError, ContainerError, DockerException, ImageNotFound

from .containers import TEST_LABEL, docker_client

REPO_ROOT = Path(__file__).resolve().parents[2]
STORM_SOURCE = REPO_ROOT / "bench" / "storm.c"
CACHE_DIR = Path(tempfile.gettempdir()) / "driftwarden-test-cache"

BUSYBOX_PREFIX = "dw-bb"
HOST_PREFIX = "dw-host"
DEBIAN_PREFIX = "dw-deb"
STORM_PREFIX = "dw-storm"

HOST_BUSYBOX = Path("/bin/busybox")
# Real dynamically linked binaries: exec events show /bin/cat itself, unlike busybox applets.
HOST_TOOLS = (
    "dash", "bash", "cat", "cp", "mv", "rm", "ln", "chmod", "mkdir", "touch", "truncate", "ls",
    "sleep", "true", "env", "mkfifo", "mknod", "rmdir", "head", "echo", "id",
)  # fmt: skip
# debian_image(): a userland for application scripts: HOST_TOOLS plus what shell services run
DEBIAN_TOOLS = (
    *HOST_TOOLS, "date", "mktemp", "wc", "tail", "sort", "seq", "gzip", "sed", "grep",
    "sha256sum", "cut", "tr", "timeout", "basename", "dirname", "stat",
)  # fmt: skip
HTTPD_PATH = "/usr/sbin/httpd"  # debian_image's one server binary: busybox, run as httpd
DYNAMIC_LOADER = Path("/lib64/ld-linux-x86-64.so.2")
GCC_FLAGS = ("-O2", "-static", "-pthread", "-Wall", "-Wextra")

_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"
_GROUP = "root:x:0:\n"

_locks_guard = threading.Lock()
_locks: dict[str, threading.Lock] = {}  # one per tag: threads of one process build once


class ImageBuildError(RuntimeError):
    """A builder step failed; the message names the step and what to do about it."""

    def __init__(self, step: str, detail: str, hint: str) -> None:
        super().__init__(f"{step} failed: {detail.strip()}\n  what to do: {hint}")
        self.step = step


# ---- public builders -------------------------------------------------------------------------


def busybox_image() -> str:
    """FROM scratch + static busybox with its applets installed as /bin symlinks."""

    def populate(ctx: Path) -> None:
        root = _base_rootfs(ctx)
        _copy_file(_require_file(HOST_BUSYBOX, "busybox-static"), root / "bin/busybox")
        _write_dockerfile(
            ctx,
            "COPY rootfs/ /",
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]',
            'CMD ["/bin/sh"]',
        )

    return _ensure_image(BUSYBOX_PREFIX, populate, ["/bin/sh", "-c", "echo ok"])


def host_binaries_image() -> str:
    """Real host dash/bash/coreutils plus the shared libraries they load, paths preserved."""

    def populate(ctx: Path) -> None:
        _host_tools_rootfs(ctx, HOST_TOOLS)
        _write_dockerfile(ctx, "COPY rootfs/ /", 'CMD ["/bin/sh"]')

    return _ensure_image(HOST_PREFIX, populate, ["/bin/cat", "/etc/passwd"], expect="root:")


def debian_image() -> str:
    """Like host_binaries_image() with DEBIAN_TOOLS (dash, bash, coreutils, gzip, sed, grep),
    plus busybox as HTTPD_PATH: the one static server binary, for web services whose CGI
    scripts then run only the real Debian programs."""

    def populate(ctx: Path) -> None:
        root = _host_tools_rootfs(ctx, DEBIAN_TOOLS)
        _copy_file(_require_file(HOST_BUSYBOX, "busybox-static"), root / HTTPD_PATH.lstrip("/"))
        _write_dockerfile(ctx, "COPY rootfs/ /", 'CMD ["/bin/sh"]')

    return _ensure_image(DEBIAN_PREFIX, populate, ["/bin/cat", "/etc/passwd"], expect="root:")


def storm_image() -> str:
    """The busybox image plus /bin/dwstorm (bench/storm.c, static)."""
    base = busybox_image()
    binary = storm_binary()

    def populate(ctx: Path) -> None:
        _copy_file(binary, ctx / "dwstorm")
        _write_dockerfile(ctx, "COPY dwstorm /bin/dwstorm", base=base)

    smoke = ["/bin/dwstorm", "open", "1", "/tmp/smoke"]
    return _ensure_image(STORM_PREFIX, populate, smoke, expect='"count":1')


def workload_image(name: str, files: dict[str, tuple[str, int]], *,
                   base: str | None = None, cmd: list[str] | None = None) -> str:
    """`base` (default: the busybox image) plus `files` ({path in image: (text, mode)}): an
    application image, whose default command is `cmd` when given (else the base's). The base
    must have /bin/ls (the smoke test lists the first file).

    Each workload gets its own image (so its own baseline); the tag is ``dw-app-<name>:<hash>``.
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ValueError(f"workload image name {name!r}: use lower-case letters, digits, -")
    base = busybox_image() if base is None else base

    def populate(ctx: Path) -> None:
        for path, (text, mode) in sorted(files.items()):
            dest = ctx / "app" / path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
            dest.chmod(mode)
        lines = ["COPY app/ /", *([f"CMD {json.dumps(cmd)}"] if cmd else [])]
        _write_dockerfile(ctx, *lines, base=base)

    first = sorted(files)[0]
    return _ensure_image(f"dw-app-{name}", populate, ["/bin/ls", first], expect=first)


def storm_binary() -> Path:
    """bench/storm.c compiled with ``gcc -O2 -static`` on the host (cached by source hash).

    Static, so it also runs in any container (e.g. copied in with put_file) or on the host.
    """
    source = _require_file(STORM_SOURCE, "the driftwarden checkout")
    digest = hashlib.sha256(source.read_bytes() + " ".join(GCC_FLAGS).encode()).hexdigest()
    out = CACHE_DIR / f"dwstorm-{digest[:12]}"
    if out.exists():
        return out
    with _exclusive(out.name):
        if not out.exists():
            _compile_storm(source, out)
    return out


# ---- context assembly ------------------------------------------------------------------------


def _base_rootfs(ctx: Path) -> Path:
    """rootfs/ with the dirs and files every test image has."""
    root = ctx / "rootfs"
    for d in ("bin", "data", "var/log", "etc", "root", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "tmp").chmod(0o1777)  # the sticky bit survives the build-context tar
    (root / "etc/passwd").write_text(_PASSWD)
    (root / "etc/group").write_text(_GROUP)
    return root


def _host_tools_rootfs(ctx: Path, tools: tuple[str, ...]) -> Path:
    """rootfs/ with the host's `tools` in /bin, /bin/sh -> dash, and the libraries they load."""
    root = _base_rootfs(ctx)
    binaries = [_host_tool(name) for name in tools]
    for name, src in zip(tools, binaries, strict=True):
        _copy_file(src, root / "bin" / name)
    (root / "bin/sh").symlink_to("dash")  # as on Debian: /bin/sh is dash
    for lib in _shared_libraries(binaries):
        _copy_file(lib, root / lib.relative_to("/"))
    return root


def _write_dockerfile(ctx: Path, *lines: str, base: str = "scratch") -> None:
    (ctx / "Dockerfile").write_text("\n".join((f"FROM {base}", *lines)) + "\n")


def _copy_file(src: Path, dest: Path) -> None:
    """Copy content (following symlinks, e.g. the loader) and keep it executable."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(0o755)


def _require_file(path: Path, package: str) -> Path:
    if not path.exists():
        raise ImageBuildError(
            f"locate {path}", "file not found", f"install {package} (`make setup` does)"
        )
    return path


def _host_tool(name: str) -> Path:
    path = Path("/bin") / name
    if path.exists():
        return path
    found = shutil.which(name)
    if found is None:
        raise ImageBuildError(
            f"locate host binary {name!r}",
            "not in /bin nor on PATH",
            "apt-get install -y dash bash coreutils",
        )
    return Path(found)


_LDD_PATH = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")


def _shared_libraries(binaries: list[Path]) -> list[Path]:
    """Every library ldd says the binaries load, plus the dynamic loader, as absolute paths."""
    try:
        proc = subprocess.run(
            ["ldd", *map(str, binaries)], capture_output=True, text=True, check=False
        )
    except FileNotFoundError as exc:
        raise ImageBuildError("run ldd", str(exc), "apt-get install -y libc-bin") from exc
    missing = [ln.strip() for ln in proc.stdout.splitlines() if "not found" in ln]
    if missing:
        raise ImageBuildError(
            "resolve shared libraries", "; ".join(missing), "install the packages providing them"
        )
    libs = {Path(m.group(1)) for ln in proc.stdout.splitlines() if (m := _LDD_PATH.match(ln))}
    if DYNAMIC_LOADER.exists():
        libs.add(DYNAMIC_LOADER)
    if not libs:
        raise ImageBuildError("parse ldd output", proc.stdout + proc.stderr, "check ldd works")
    return sorted(libs)


def _compile_storm(source: Path, out: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise ImageBuildError("compile bench/storm.c", "gcc not found", "apt-get install -y gcc")
    probe = subprocess.run([gcc, "-print-file-name=libc.a"], capture_output=True, text=True)
    if not os.path.isabs(probe.stdout.strip()):
        # gcc echoes the bare name back when it has no static glibc to link against.
        raise ImageBuildError(
            "compile bench/storm.c",
            "static glibc (libc.a) not found",
            "install Debian's libc6-dev, which ships libc.a (apt-get install -y libc6-dev)",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    proc = subprocess.run(
        [gcc, *GCC_FLAGS, "-o", str(tmp), str(source)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise ImageBuildError(
            "compile bench/storm.c", proc.stderr[-2000:], "fix the compiler errors shown above"
        )
    os.replace(tmp, out)  # atomic: other processes never see a half-written binary


# ---- hashing, locking, building --------------------------------------------------------------


def context_digest(ctx: Path) -> str:
    """12 hex digits over every path, file type/mode and content (or link target) in ctx."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(ctx):
        dirnames.sort()
        for name in sorted([*dirnames, *filenames]):
            path = Path(dirpath, name)
            st = path.lstat()
            h.update(f"{path.relative_to(ctx)}\0{st.st_mode:o}\0".encode())
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode())
            elif stat.S_ISREG(st.st_mode):
                h.update(path.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:12]


@contextmanager
def _exclusive(key: str) -> Iterator[None]:
    """Mutual exclusion for key across threads (lock) and processes (flock)."""
    with _locks_guard:
        lock = _locks.setdefault(key, threading.Lock())
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with lock, open(CACHE_DIR / f"{key.replace(':', '_')}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _image_exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
    except ImageNotFound:
        return False
    return True


def _ensure_image(
    prefix: str, populate: Callable[[Path], None], smoke: list[str], expect: str = "ok"
) -> str:
    """Assemble the context, return the tag at once if built, else build and smoke-test it."""
    client = docker_client()
    try:
        with tempfile.TemporaryDirectory(prefix=f"{prefix}-ctx-") as tmp:
            ctx = Path(tmp)
            populate(ctx)
            tag = f"{prefix}:{context_digest(ctx)}"
            if _image_exists(client, tag):
                return tag
            with _exclusive(tag):
                if not _image_exists(client, tag):  # another worker may have built it
                    _build(client, ctx, tag)
                    _smoke_test(client, tag, smoke, expect)
            return tag
    finally:
        client.close()


def _build(client: docker.DockerClient, ctx: Path, tag: str) -> None:
    try:
        client.images.build(
            path=str(ctx),
            tag=tag,
            rm=True,
            forcerm=True,
            pull=False,  # nothing can be pulled here; FROM is scratch or a local dw-* image
            network_mode="none",
            labels={TEST_LABEL: "1"},
        )
    except BuildError as exc:
        log = "".join(str(e.get("stream") or e.get("error") or "") for e in exc.build_log)
        raise ImageBuildError(
            f"docker build {tag}",
            f"{exc.msg}\n{log[-2000:]}",
            "read the build log above; the context was assembled from host files",
        ) from exc
    except (APIError, DockerException) as exc:
        raise ImageBuildError(
            f"docker build {tag}", str(exc), "check that dockerd is healthy (docker info)"
        ) from exc


def _smoke_test(client: docker.DockerClient, tag: str, cmd: list[str], expect: str) -> None:
    """Run the fresh image once; untag it on failure so a broken image is never a cache hit."""
    try:
        out = client.containers.run(
            tag, cmd, network_mode="none", remove=True, labels={TEST_LABEL: "1"}
        )
        text = out.decode("utf-8", "replace")
        problem = None if expect in text else f"output lacks {expect!r}: {text!r}"
    except (ContainerError, APIError) as exc:
        problem = str(exc)
    if problem is None:
        return
    with suppress(APIError):
        client.images.remove(tag, force=True)
    raise ImageBuildError(
        f"smoke test of {tag} ({' '.join(cmd)})",
        problem,
        "a file or library is missing from the image; check the builder's inputs",
    )
