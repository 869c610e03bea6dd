#!/usr/bin/env bash
# `make run`: a collector (SQLite under STATE), an agent (learning) streaming to it, and the live
# alert view in the foreground. Ctrl-C stops all three; the data stays for the next run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
STATE="${DRIFTWARDEN_STATE:-/var/lib/driftwarden}"
PORT="${DRIFTWARDEN_PORT:-50051}"
ADDR="127.0.0.1:$PORT"
mkdir -p "$STATE/agent"

pids=()
cleanup() {
  trap - EXIT INT TERM
  # the agent first (its last alerts and heartbeat reach the collector), then the collector
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[$i]}" 2>/dev/null || true
    wait "${pids[$i]}" 2>/dev/null || true
  done
  echo "driftwarden: stopped; data kept in $STATE (alerts: $STATE/collector.db, baselines: $STATE/agent)"
}
trap cleanup EXIT INT TERM

"$PY" -m driftwarden collector --listen "$ADDR" --db "$STATE/collector.db" \
  --metrics 127.0.0.1:9464 >>"$STATE/collector.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  grep -q "listening on" "$STATE/collector.log" 2>/dev/null && break
  kill -0 "${pids[0]}" 2>/dev/null || { cat "$STATE/collector.log" >&2; exit 1; }
  sleep 0.1
done

"$PY" -m driftwarden agent --state-dir "$STATE/agent" --collector "$ADDR" \
  --metrics 127.0.0.1:9465 "$@" >>"$STATE/agent.log" 2>&1 &
pids+=($!)

cat <<MSG
driftwarden: collector on $ADDR (alerts in $STATE/collector.db, log $STATE/collector.log)
driftwarden: agent learning every container (baselines in $STATE/agent, log $STATE/agent.log)
driftwarden: metrics at http://127.0.0.1:9464/metrics (collector) and :9465 (agent)
driftwarden: live alerts below; Ctrl-C stops everything. In another shell, try:
  docker run --rm --network none <image> sh -c 'cp /bin/busybox /tmp/ls; /tmp/ls /'
  $PY -m driftwarden agents --collector $ADDR
MSG
"$PY" -m driftwarden alerts --collector "$ADDR" --follow --actions || true
