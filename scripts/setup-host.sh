#!/usr/bin/env bash
# Idempotent host setup for driftwarden on a Debian 12 host (see README "Set-up").
# Installs packages, links kernel headers when the running kernel has none, mounts
# tracefs/debugfs, starts dockerd if none is running, and builds the .venv.
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

# 1. Debian packages ---------------------------------------------------------
PKGS=(python3-bpfcc bpfcc-tools linux-headers-amd64 docker.io busybox-static bpftrace python3-venv python3-dev make iproute2)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  say "packages present"
fi

# 2. Kernel headers for bcc -------------------------------------------------
KDIR="/lib/modules/$(uname -r)"
if [ ! -e "$KDIR/build" ]; then
  hdr_arch="$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)"
  hdr_common="$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)"
  if [ -z "$hdr_arch" ] || [ -z "$hdr_common" ]; then
    echo "setup-host.sh: no kernel headers under /usr/src; install linux-headers-amd64" >&2
    exit 1
  fi
  say "linking $KDIR/build -> $hdr_arch (probes never read kernel structs, see HOST.md)"
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
else
  say "docker daemon already running"
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
else
  say "venv up to date"
fi
"$VENV/bin/python" -c "import bcc" || { echo "setup-host.sh: bcc not importable from $VENV; check python3-bpfcc" >&2; exit 1; }
say "done"
