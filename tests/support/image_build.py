"""Build deploy/Dockerfile for real on a host that reaches no container registry.

Two inputs come from the host instead of a registry:

- **The base image** the Dockerfile names (`FROM debian:bookworm-slim`): a minimal Debian root
  made with `debootstrap --variant=minbase` from the Debian archive apt already uses (read at
  run time from /etc/apt/sources.list.d/debian.sources; its name is never written anywhere in
  the repository), slimmed as the official `-slim` images are (no docs, man pages or locales,
  and dpkg told to skip them in later installs), its apt sources set to the official ones, and
  imported with `docker import` under the Dockerfile's name. Made once per host (about a
  minute): an existing image of that name, ours or a real one, is reused.
- **Python wheels**: the build's pip cannot reach PyPI through this host's TLS setup, so the
  project's dependencies are downloaded once per host (per dependency list) by the host's own
  pip, served on 127.0.0.1 while the build runs, and handed to the build with the Dockerfile's
  `PIP_NO_INDEX`/`PIP_FIND_LINKS` arguments; the Debian archive is handed over with
  `DEBIAN_MIRROR`. The build runs with the host's network (`docker build --network host`) so
  it reaches both.

Public API: base_image(), debian_mirror(), wheelhouse(), serve_directory(), build_image(),
image_size().
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "deploy" / "Dockerfile"
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
APT_SOURCES_LIST = Path("/etc/apt/sources.list")
# Kept across test runs on one host: the base image takes a minute, the wheels ~200 MB.
CACHE_ROOT = Path(os.environ.get("DRIFTWARDEN_TEST_CACHE", "/var/cache/driftwarden-tests"))
BASE_LABEL = "org.driftwarden.test.base"  # marks a base image made here (debootstrap)
IMAGE_LABEL = "org.driftwarden.test.image"  # marks the images tests/test_image.py builds
SUITE = "bookworm"
BUILD_TIMEOUT = 1500.0  # a cold build: ~300 MB of Debian packages and the wheels

# The official image's apt sources (what debian:bookworm-slim ships): the base image must not
# keep this host's archive in its sources.
OFFICIAL_SOURCES = f"""\
Types: deb
URIs: http://deb.debian.org/debian
Suites: {SUITE} {SUITE}-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: {SUITE}-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# As the official -slim images (debuerreotype's slimify): later installs skip these too.
DPKG_SLIM = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/info/*
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
"""
APT_CLEAN = """\
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Acquire::Languages "none";
"""
# The CRI stubs are installed apart, with --no-deps (pyproject.toml's comment says why).
CRI_API = "container-runtime-interface-api==2.0.1"


class ImageBuildError(RuntimeError):
    """A step of making the base image or building deploy/Dockerfile failed; the message says
    which step and what to do."""


# ---- the Debian archive -----------------------------------------------------------------------


def debian_mirror(sources: Path = APT_SOURCES, sources_list: Path = APT_SOURCES_LIST) -> str:
    """The Debian archive apt uses on this host (the `URIs:` of the deb822 stanza for the main
    suite, else the first `deb URI SUITE` line of sources.list), e.g. http://HOST/debian."""
    if sources.is_file():
        for stanza in re.split(r"\n\s*\n", sources.read_text()):
            fields = dict(re.findall(r"^([A-Za-z-]+):\s*(.*)$", stanza, re.MULTILINE))
            suites = fields.get("Suites", "").split()
            if "deb" in fields.get("Types", "").split() and SUITE in suites:
                return fields["URIs"].split()[0].rstrip("/")
    if sources_list.is_file():
        for line in sources_list.read_text().splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1].rstrip("/")
    raise ImageBuildError(f"no Debian {SUITE} archive in {sources} or {sources_list}: "
                          "the host's apt must be set up (apt-get update works)")


def mirror_prefix(mirror: str) -> str | None:
    """What the Dockerfile's DEBIAN_MIRROR takes: the archive's URL without its `/debian`
    (the Dockerfile puts it in place of http://deb.debian.org, which serves debian/ and
    debian-security/). None when the archive is not laid out that way."""
    return mirror.removesuffix("/debian") if mirror.endswith("/debian") else None


# ---- the base image ----------------------------------------------------------------------------


def dockerfile_base(dockerfile: Path = DOCKERFILE) -> str:
    """The image the Dockerfile's (first) FROM names."""
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words and words[0].upper() == "FROM":
            return words[1]
    raise ImageBuildError(f"{dockerfile} has no FROM line")


def _image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True,
                          check=False).returncode == 0


@contextmanager
def _host_lock(name: str) -> Iterator[None]:
    """One maker at a time on this host (two pytest processes, two CI jobs)."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def base_image(name: str | None = None, *, log=print) -> tuple[str, bool]:
    """The Dockerfile's base image, made with debootstrap if this host has none of that name.
    Returns (name, made_now)."""
    name = name or dockerfile_base()
    if _image_exists(name):
        return name, False
    with _host_lock(f"base-{name}"):
        if _image_exists(name):
            return name, False
        if shutil.which("debootstrap") is None:
            raise ImageBuildError("debootstrap is not installed: apt-get install debootstrap "
                                  "(`make setup` does)")
        mirror = debian_mirror()
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="dw-debootstrap-", dir="/var/tmp") as tmp:
            root = Path(tmp) / "root"
            done = subprocess.run(
                ["debootstrap", "--variant=minbase", SUITE, str(root), mirror],
                capture_output=True, text=True, timeout=900, check=False)
            if done.returncode != 0:
                raise ImageBuildError(
                    f"debootstrap --variant=minbase {SUITE} from the host's Debian archive "
                    f"failed ({done.returncode}):\n{(done.stdout + done.stderr)[-2000:]}")
            _slim(root)
            _docker_import(root, name)
        log(f"[image] base image {name}: debootstrap minbase {SUITE} + docker import in "
            f"{time.monotonic() - started:.0f} s")
        return name, True


def _slim(root: Path) -> None:
    """What the official -slim image does to a minbase root, and the official apt sources."""
    for sub in ("usr/share/doc", "usr/share/info", "usr/share/man", "usr/share/groff",
                "usr/share/linda", "usr/share/lintian", "usr/share/locale"):
        path = root / sub
        if not path.is_dir():
            continue
        for entry in path.iterdir():
            if sub == "usr/share/doc" and (entry / "copyright").exists():
                for inner in entry.iterdir():
                    if inner.name != "copyright":
                        _remove(inner)
            else:
                _remove(entry)
    (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(DPKG_SLIM)
    (root / "etc/apt/apt.conf.d/docker-clean").write_text(APT_CLEAN)
    for cache in (root / "var/cache/apt", root / "var/lib/apt/lists"):
        for entry in cache.rglob("*"):
            if entry.is_file() and entry.name != "lock":
                entry.unlink()
    # the host's archive must not stay in the image: the official sources instead
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(OFFICIAL_SOURCES)
    # the host's own files that debootstrap copied in (the runtime provides its own)
    for host_file in ("etc/resolv.conf", "etc/hostname"):
        (root / host_file).unlink(missing_ok=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _docker_import(root: Path, name: str) -> None:
    tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."],
                           stdout=subprocess.PIPE)
    imported = subprocess.run(
        ["docker", "import",
         "--change", 'CMD ["bash"]',
         "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
         "--change", f"LABEL {BASE_LABEL}=debootstrap-minbase-{SUITE}",
         "-", name],
        stdin=tar.stdout, capture_output=True, text=True, timeout=600, check=False)
    assert tar.stdout is not None
    tar.stdout.close()
    if tar.wait() != 0 or imported.returncode != 0:
        raise ImageBuildError(f"tar | docker import {name} failed: {imported.stderr.strip()}")


# ---- the wheels ---------------------------------------------------------------------------------


def requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """What the image's pip installs: the project's dependencies and build requirements."""
    data = tomllib.loads(pyproject.read_text())
    return [*data["project"]["dependencies"], *data["build-system"]["requires"]]


def wheelhouse(*, log=print) -> Path:
    """A directory of wheels for requirements() and the CRI stubs (for the image's Python,
    which is this host's: Debian 12's 3.11), downloaded once per dependency list."""
    wanted = requirements()
    key = hashlib.sha256("\n".join([*wanted, CRI_API, sys.version]).encode()).hexdigest()[:12]
    target = CACHE_ROOT / f"wheels-{key}"
    if (target / ".complete").exists():
        return target
    with _host_lock(f"wheels-{key}"):
        if (target / ".complete").exists():
            return target
        started = time.monotonic()
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--dest", str(partial)]
        for extra, what in (([], wanted), (["--no-deps"], [CRI_API])):
            done = subprocess.run([*pip, *extra, *what], capture_output=True, text=True,
                                  timeout=900, check=False)
            if done.returncode != 0:
                raise ImageBuildError(f"pip download of the image's wheels failed:\n"
                                      f"{done.stderr[-2000:]}")
        (partial / ".complete").touch()
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
        log(f"[image] wheels for the image: {len(list(target.glob('*.whl')))} in "
            f"{time.monotonic() - started:.0f} s")
        return target


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


# A fixed port when it is free: the Dockerfile's PIP_FIND_LINKS is part of its layer's cache
# key, so the same URL on every run lets Docker reuse the installed dependencies.
PREFERRED_PORT = 47613


@contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """`directory` over HTTP on 127.0.0.1 for the block; yields its URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", PREFERRED_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="wheel-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ---- the build ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    tag: str
    seconds: float
    size_bytes: int
    log_tail: str


def build_image(tag: str, *, log=print) -> BuiltImage:
    """`docker build -f deploy/Dockerfile -t TAG .` from the repository root, with the base
    image, the wheels and the Debian archive this host has."""
    base_image(log=log)
    wheels = wheelhouse(log=log)
    prefix = mirror_prefix(debian_mirror())
    started = time.monotonic()
    with serve_directory(wheels) as url:
        command = ["docker", "build", "--network", "host", "-f", str(DOCKERFILE), "-t", tag,
                   "--label", f"{IMAGE_LABEL}=1",
                   "--build-arg", "PIP_NO_INDEX=1", "--build-arg", f"PIP_FIND_LINKS={url}"]
        if prefix:
            command += ["--build-arg", f"DEBIAN_MIRROR={prefix}"]
        done = subprocess.run([*command, str(REPO_ROOT)], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT, check=False,
                              env={**os.environ, "DOCKER_BUILDKIT": "0"})
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise ImageBuildError(f"docker build -f deploy/Dockerfile failed after {seconds:.0f} s:"
                              f"\n{output[-4000:]}")
    # Untagged now: the image this tag named before (a build of older code) and the build's
    # intermediate stages. Only those, with our labels (a stage inherits the base's).
    for label in (IMAGE_LABEL, BASE_LABEL):
        subprocess.run(["docker", "image", "prune", "--force", "--filter", f"label={label}"],
                       capture_output=True, timeout=300, check=False)
    return BuiltImage(tag, seconds, image_size(tag), output[-2000:])


def image_size(tag: str) -> int:
    done = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", tag],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip())


__all__ = [
    "BASE_LABEL",
    "CRI_API",
    "BuiltImage",
    "ImageBuildError",
    "base_image",
    "build_image",
    "debian_mirror",
    "dockerfile_base",
    "image_size",
    "mirror_prefix",
    "requirements",
    "serve_directory",
    "wheelhouse",
]
