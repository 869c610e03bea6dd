#!/usr/bin/env bash
# Regenerate the Python code for proto/driftwarden/v1/*.proto (package driftwarden.v1).
#
#   scripts/gen-proto.sh            # into proto/ (the committed files)
#   scripts/gen-proto.sh OUT_DIR    # into OUT_DIR/driftwarden/v1/ (tests/test_proto.py compares)
#
# The output depends on the grpcio-tools version (its protoc and the runtime version checks it
# writes), so use the venv's pinned one: PYTHON defaults to .venv/bin/python.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${1:-$ROOT/proto}"

if ! "$PYTHON" -c "import grpc_tools.protoc" 2>/dev/null; then
  echo "gen-proto.sh: grpc_tools not importable by $PYTHON; run scripts/setup-host.sh (or set PYTHON)" >&2
  exit 1
fi

mkdir -p "$OUT/driftwarden/v1"
OUT="$(cd "$OUT" && pwd)"
# Remove what an earlier run generated, so a deleted .proto leaves no stale module behind.
rm -f "$OUT"/driftwarden/v1/*_pb2.py "$OUT"/driftwarden/v1/*_pb2.pyi "$OUT"/driftwarden/v1/*_pb2_grpc.py

cd "$ROOT/proto"
"$PYTHON" -m grpc_tools.protoc -I. \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  driftwarden/v1/*.proto
echo "gen-proto.sh: generated $(ls "$OUT"/driftwarden/v1/*_pb2*.py* | wc -l) files in $OUT/driftwarden/v1"
