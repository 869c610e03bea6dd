#!/usr/bin/env bash
# Idempotent host setup for driftwarden on a Debian 12 host (docs/host-setup.md explains each step).
# Installs the Debian packages the agent, the tests and the benchmarks use (PKGS names each and
# who needs it), links kernel headers when the running kernel has none, mounts tracefs/debugfs,
# starts dockerd if none is running, and builds the .venv. Prints nothing when all is in place.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
STAMP_DIR="$ROOT/.setup"
mkdir -p "$STAMP_DIR"

say() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup-host.sh: must run as root (it installs packages and mounts tracefs); re-run with sudo" >&2
  exit 1
fi

# 1. Debian packages, each named for who needs it (nothing is assumed from the image) --------
PKGS=(
  # the agent, the collector and `make run`
  python3              # the interpreter .venv is made from (Debian 12: 3.11)
  python3-venv         # step 5's .venv
  python3-bpfcc        # bcc: probes/_compile.py compiles and loads the probes; `driftwarden doctor`
  libbpf1              # libbpf.so.1: probes/_libbpf.py, how the agent reads the probes' maps and ring buffer
  openssl              # core/certs.py (`driftwarden certs`), scripts/k8s-secrets.sh, tests/test_certs.py
  docker.io            # dockerd + docker CLI: the runtime `make run` watches and the tests' containers
  make                 # the Makefile
  mount util-linux     # mount, mountpoint (step 3); setpriv (tests/test_cli_trace.py)
  # the tests
  busybox-static       # /bin/busybox: the userland of the test images (tests/support/images.py)
  bash dash coreutils  # host binaries copied into the dw-host test image (tests/support/images.py)
  libc-bin             # ldd: their libraries for that image (tests/support/images.py)
  gcc                  # tests/test_layout.py (probes/dw_event.h vs probes/_layout.py); bench/storm.c
  libc6-dev            # stdio.h for tests/test_layout.py; libc.a for the static dwstorm (bench/storm.c)
  linux-libc-dev       # <linux/types.h>, which probes/dw_event.h includes (tests/test_layout.py)
  python3-dev          # Python headers, for pip when a dependency has no wheel for this host
  containerd           # tests/support/containerd.py: a second containerd with its CRI plugin (docker.io pulls it in too)
  containernetworking-plugins  # /usr/lib/cni: that containerd's CNI bin_dir (tests/support/containerd.py)
  podman               # tests/support/podman.py: rootful podman and its Docker-compatible API socket
  debootstrap          # tests/support/image_build.py: the Debian base image deploy/Dockerfile builds FROM
  postgresql           # initdb, pg_ctl: the PostgreSQL server tests/support/postgres.py runs for the store tests
  chromium             # tests/test_console*.py: the headless browser Playwright drives (never `playwright install`)
  # the benchmarks (make bench)
  bpftrace             # bench/probe_overhead.py's floor tool
  bpfcc-tools          # execsnoop-/opensnoop-/tcpconnect-bpfcc: bench/probe_overhead.py's naive tools
  git                  # bench/*.py record `git describe` with their results
)
apt_updated=0
apt_install() {  # install those of the named packages that are missing; silent when none is
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" -eq 0 ]; then apt-get update -qq; apt_updated=1; fi
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
apt_install "${PKGS[@]}"

# 2. Kernel headers for bcc -------------------------------------------------
# Debian's own kernels have a linux-headers-$(uname -r) package that makes the build link; any
# other kernel (a cloud or VM image's) gets the newest Debian headers for this architecture
# linked in: the probes never read kernel structs, so another kernel's headers work.
KDIR="/lib/modules/$(uname -r)"
if [ ! -e "$KDIR/build" ]; then
  exact="linux-headers-$(uname -r)"
  [ "$apt_updated" -eq 1 ] || { apt-get update -qq; apt_updated=1; }
  if apt-cache show "$exact" >/dev/null 2>&1; then
    apt_install "$exact"
  fi
fi
if [ ! -e "$KDIR/build" ]; then
  arch="$(dpkg --print-architecture)"
  apt_install "linux-headers-$arch"
  hdr_arch="$(ls -d /usr/src/linux-headers-*-"$arch" 2>/dev/null | sort -V | tail -1)"
  hdr_common="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)"
  if [ -z "$hdr_arch" ] || [ -z "$hdr_common" ]; then
    echo "setup-host.sh: no kernel headers under /usr/src; install linux-headers-$arch" >&2
    exit 1
  fi
  say "linking $KDIR/build -> $hdr_arch (the probes read no kernel structs: any headers do; see docs/host-setup.md)"
  mkdir -p "$KDIR"
  ln -sfn "$hdr_arch" "$KDIR/build"
  ln -sfn "$hdr_common" "$KDIR/source"
fi

# 3. tracefs / debugfs -------------------------------------------------------
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
mountpoint -q /sys/kernel/debug || mount -t debugfs nodev /sys/kernel/debug || true

# 4. dockerd ----------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  DOCKERD="$(command -v dockerd || true)"
  [ -n "$DOCKERD" ] || { echo "setup-host.sh: dockerd not found; install docker.io" >&2; exit 1; }
  say "starting dockerd (--bridge=none --iptables=false)"
  setsid "$DOCKERD" --bridge=none --iptables=false --ip6tables=false \
      >/var/log/driftwarden-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || { echo "setup-host.sh: dockerd did not come up; see /var/log/driftwarden-dockerd.log" >&2; exit 1; }
fi

# 5. venv -------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV from /usr/bin/python3 with system site packages (bcc lives there)"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
req_hash="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP_DIR/pip.hash" 2>/dev/null)" != "$req_hash" ]; then
  say "pip install -e .[dev]"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e "$ROOT[dev]"
  echo "$req_hash" > "$STAMP_DIR/pip.hash"
fi
# The CRI stubs (module cri_api.v1) for agent/runtimes/cri.py: generated runtime.v1 code from PyPI,
# never copied here. Its metadata pins protobuf 6, its code works with the project's protobuf 7:
# --no-deps keeps pip from downgrading protobuf (see the comment in pyproject.toml).
CRI_API="container-runtime-interface-api==2.0.1"
if [ "$("$VENV/bin/pip" show container-runtime-interface-api 2>/dev/null | sed -n 's/^Version: //p')" != "${CRI_API#*==}" ]; then
  say "pip install --no-deps $CRI_API"
  "$VENV/bin/pip" install -q --no-deps "$CRI_API"
fi
# Helm's template engine for tests/test_helm.py: Helm v4's Go library in a wheel (no helm binary,
# no cluster). helm-sdkpy, the other such wheel, needs Python 3.12; Debian 12 has 3.11.
HELM_SDK="helm-python-sdk==0.2.2"
if [ "$("$VENV/bin/pip" show helm-python-sdk 2>/dev/null | sed -n 's/^Version: //p')" != "${HELM_SDK#*==}" ]; then
  say "pip install $HELM_SDK"
  "$VENV/bin/pip" install -q "$HELM_SDK"
fi
"$VENV/bin/python" -c "import bcc" || { echo "setup-host.sh: bcc not importable from $VENV; check python3-bpfcc" >&2; exit 1; }
"$VENV/bin/python" -c "import cri_api.v1.api_pb2_grpc" || { echo "setup-host.sh: the CRI stubs (cri_api.v1) do not import from $VENV" >&2; exit 1; }
