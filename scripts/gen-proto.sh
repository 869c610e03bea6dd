#!/usr/bin/env bash
# Regenerate the Python code for proto/v1/*.proto (protobuf package driftwarden.v1, Python package
# driftwarden.proto.v1: the import name is the place on disk, as everywhere in the project).
#
#   scripts/gen-proto.sh            # into proto/v1/ (the committed files)
#   scripts/gen-proto.sh OUT_DIR    # into OUT_DIR/ (tests/test_proto.py compares)
#
# protoc sees proto/ as driftwarden/proto/, so the generated modules import each other as
# driftwarden.proto.v1.*_pb2. The output depends on the grpcio-tools version (its protoc and the
# runtime version checks it writes), so use the venv's pinned one: PYTHON defaults to
# .venv/bin/python.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
OUT="${1:-$ROOT/proto/v1}"

if ! "$PYTHON" -c "import grpc_tools.protoc" 2>/dev/null; then
  echo "gen-proto.sh: grpc_tools not importable by $PYTHON; run scripts/setup-host.sh (or set PYTHON)" >&2
  exit 1
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
# Remove what an earlier run generated, so a deleted .proto leaves no stale module behind.
rm -f "$OUT"/*_pb2.py "$OUT"/*_pb2.pyi "$OUT"/*_pb2_grpc.py

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
cd "$ROOT"
"$PYTHON" -m grpc_tools.protoc -Idriftwarden/proto=proto \
  --python_out="$STAGE" --pyi_out="$STAGE" --grpc_python_out="$STAGE" \
  proto/v1/*.proto
mv "$STAGE"/driftwarden/proto/v1/*_pb2*.py* "$OUT"/
echo "gen-proto.sh: generated $(ls "$OUT"/*_pb2*.py* | wc -l) files in $OUT"
