#!/usr/bin/env bash
# `make run`: a collector (SQLite under STATE), an agent (learning) streaming to it, the web console,
# and the live alert view in the foreground, plus a small demo image to try drift on. Ctrl-C stops all;
# the data stays for the next run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
STATE="${DRIFTWARDEN_STATE:-/var/lib/driftwarden}"
PORT="${DRIFTWARDEN_PORT:-50051}"
ADDR="127.0.0.1:$PORT"
AGENT_READY_SECONDS=180  # bcc compiles the probes first: seconds on a busy 2-core host
mkdir -p "$STATE/agent"

say() { printf 'driftwarden: %s\n' "$*"; }

# collector_health ADDR PID SECONDS: exit 0 once the collector's gRPC health check answers
# SERVING; 2 when process PID (0: none to watch) has exited; 1 after SECONDS (one try at 0).
collector_health() {
  "$PY" - "$@" <<'PY'
import sys, time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

addr, pid, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + seconds
# a loopback address: never through an HTTP proxy from the environment
with grpc.insecure_channel(addr, options=[("grpc.enable_http_proxy", 0)]) as channel:
    check = health_pb2_grpc.HealthStub(channel).Check
    while True:
        try:
            reply = check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                sys.exit(0)
        except grpc.RpcError:
            pass
        if pid:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                state = "gone"
            if state in ("Z", "X", "gone"):
                sys.exit(2)
        if time.monotonic() >= deadline:
            sys.exit(1)
        time.sleep(0.1)
PY
}

# demo_image: a FROM scratch image of the host's static busybox (no registry needed), built
# once per busybox version and reused; prints its tag.
demo_image() {
  local busybox=/bin/busybox tag ctx applet
  if [ ! -x "$busybox" ]; then
    echo "run-local.sh: $busybox missing; install busybox-static (make setup does)" >&2
    return 1
  fi
  tag="driftwarden-demo:$(sha256sum "$busybox" | cut -c1-12)"
  if ! docker image inspect "$tag" >/dev/null 2>&1; then
    say "building the demo image $tag (FROM scratch + $busybox)" >&2
    ctx="$(mktemp -d)"
    mkdir -p "$ctx/rootfs/bin" "$ctx/rootfs/etc" "$ctx/rootfs/root" "$ctx/rootfs/tmp"
    chmod 1777 "$ctx/rootfs/tmp"
    cp "$busybox" "$ctx/rootfs/bin/busybox"
    for applet in $("$busybox" --list); do
      [ "$applet" = busybox ] || ln -s busybox "$ctx/rootfs/bin/$applet"
    done
    echo "root:x:0:0:root:/root:/bin/sh" >"$ctx/rootfs/etc/passwd"
    echo "root:x:0:" >"$ctx/rootfs/etc/group"
    printf 'FROM scratch\nCOPY rootfs/ /\nCMD ["/bin/sh"]\n' >"$ctx/Dockerfile"
    if ! docker build -q -t "$tag" "$ctx" >"$ctx/build.log" 2>&1; then
      cat "$ctx/build.log" >&2
      rm -rf "$ctx"
      echo "run-local.sh: building the demo image failed (log above)" >&2
      return 1
    fi
    rm -rf "$ctx"
    if ! docker run --rm --network none "$tag" true; then
      docker rmi "$tag" >/dev/null 2>&1 || true
      echo "run-local.sh: the demo image does not run: is $busybox static (busybox-static)?" >&2
      return 1
    fi
  fi
  echo "$tag"
}

# new_lines FILE OFFSET: what this run appended to FILE
new_lines() { tail -c "+$(($2 + 1))" "$1" 2>/dev/null || true; }

pids=()
cleanup() {
  trap - EXIT INT TERM
  # the agent first (its last alerts and heartbeat reach the collector), then the collector
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  [ "${#pids[@]}" -eq 0 ] ||
    say "stopped; data kept in $STATE (alerts: $STATE/collector.db, baselines: $STATE/agent)"
}
trap cleanup EXIT INT TERM

if collector_health "$ADDR" 0 0 2>/dev/null; then
  echo "run-local.sh: a collector already answers on $ADDR (another \`make run\`?);" \
       "stop it first (Ctrl-C where it runs)" >&2
  exit 1
fi
DEMO="$(demo_image)"

# ARGS: the learning settings go to the collector (it ends learning for the fleet), the rest
# to the agent
collector_args=() agent_args=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --learn-for|--learn-warmup|--learn-stable-for|--learn-min-windows|--consensus)
      [ "$#" -ge 2 ] || { echo "run-local.sh: $1 needs a value" >&2; exit 2; }
      collector_args+=("$1" "$2"); shift 2 ;;
    --learn-for=*|--learn-warmup=*|--learn-stable-for=*|--learn-min-windows=*|--consensus=*)
      collector_args+=("$1"); shift ;;
    *) agent_args+=("$1"); shift ;;
  esac
done

collector_log_start="$(stat -c %s "$STATE/collector.log" 2>/dev/null || echo 0)"
"$PY" -m driftwarden collector --listen "$ADDR" --db "$STATE/collector.db" \
  --metrics 127.0.0.1:9464 ${collector_args[@]+"${collector_args[@]}"} \
  >>"$STATE/collector.log" 2>&1 &
pids+=($!)
status=0
collector_health "$ADDR" "${pids[0]}" 30 || status=$?
if [ "$status" -ne 0 ]; then
  new_lines "$STATE/collector.log" "$collector_log_start" >&2
  [ "$status" -eq 2 ] && echo "run-local.sh: the collector exited (its log is above)" >&2 \
    || echo "run-local.sh: the collector did not answer its health check on $ADDR in 30 s" >&2
  exit 1
fi

agent_log_start="$(stat -c %s "$STATE/agent.log" 2>/dev/null || echo 0)"
"$PY" -m driftwarden agent --state-dir "$STATE/agent" --collector "$ADDR" \
  --metrics 127.0.0.1:9465 ${agent_args[@]+"${agent_args[@]}"} >>"$STATE/agent.log" 2>&1 &
pids+=($!)
say "collector on $ADDR (alerts in $STATE/collector.db, log $STATE/collector.log)"
say "agent loading its probes (log $STATE/agent.log) ..."
for ((waited = 0; ; waited++)); do
  new_lines "$STATE/agent.log" "$agent_log_start" | grep -q "agent running" && break
  if ! kill -0 "${pids[1]}" 2>/dev/null; then
    new_lines "$STATE/agent.log" "$agent_log_start" >&2
    echo "run-local.sh: the agent exited (its log is above)" >&2
    exit 1
  fi
  if [ "$waited" -ge $((AGENT_READY_SECONDS * 5)) ]; then
    new_lines "$STATE/agent.log" "$agent_log_start" >&2
    echo "run-local.sh: the agent was not running after ${AGENT_READY_SECONDS} s (log above)" >&2
    exit 1
  fi
  sleep 0.2
done

# the web console: loopback only; the collector here runs without a token, so the console checks
# logins against a token file of its own (made once, kept with the data)
CONSOLE_PORT="${DRIFTWARDEN_CONSOLE_PORT:-8080}"
TOKEN_FILE="$STATE/console.token"
[ -s "$TOKEN_FILE" ] || (umask 077 && "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))' >"$TOKEN_FILE")
console_log_start="$(stat -c %s "$STATE/console.log" 2>/dev/null || echo 0)"
"$PY" -m driftwarden console --collector "$ADDR" --listen "127.0.0.1:$CONSOLE_PORT" \
  --token-file "$TOKEN_FILE" >>"$STATE/console.log" 2>&1 &
pids+=($!)
for ((waited = 0; ; waited++)); do
  new_lines "$STATE/console.log" "$console_log_start" | grep -q "driftwarden console at" && break
  if ! kill -0 "${pids[2]}" 2>/dev/null || [ "$waited" -ge 150 ]; then
    new_lines "$STATE/console.log" "$console_log_start" >&2
    echo "run-local.sh: the console did not start (log above; DRIFTWARDEN_CONSOLE_PORT=N picks another port)" >&2
    exit 1
  fi
  sleep 0.2
done

cat <<MSG
driftwarden: console at http://127.0.0.1:$CONSOLE_PORT/ (log in with the token in $TOKEN_FILE)
driftwarden: agent learning every container (baselines in $STATE/agent)
driftwarden: metrics at http://127.0.0.1:9464/metrics (collector) and :9465 (agent)
driftwarden: live alerts below; Ctrl-C stops everything. In another shell, try drift: start a
  container of the demo image, then drop a binary into it and run it (a DRIFT alert follows):
  docker run -d --rm --name dw-demo --network none $DEMO sleep 600
  docker exec dw-demo sh -c 'cp /bin/busybox /tmp/ls && /tmp/ls /'
  docker rm -f dw-demo
  $PY -m driftwarden agents --collector $ADDR
MSG
"$PY" -m driftwarden alerts --collector "$ADDR" --follow --actions || true
