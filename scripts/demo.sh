#!/usr/bin/env bash
# The main job, end to end: a server on the default (embedded) registry, a model loaded once,
# two client processes attaching it zero-copy, results shown, the server stopped cleanly.
#   COMPANION_DEMO_DEVICE=0 scripts/demo.sh   runs it on GPU 0 instead of host memory
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BIN=$PWD/build/src/cli/companion
DEVICE=${COMPANION_DEMO_DEVICE:-host}
WORK=$(mktemp -d /tmp/companion-demo.XXXXXX)
SERVER_PID=""
cleanup() {
  [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Writing an example checkpoint (OPT-125m shapes, fp16)"
.venv/bin/python scripts/lib/write_example_checkpoint.py "$WORK/models/opt-125m"

step "Starting the server for device '$DEVICE' (embedded registry: ${COMPANION_RUNTIME_DIR:-default})"
"$BIN" serve --device "$DEVICE" --model-root "$WORK/models" >"$WORK/server.out" 2>"$WORK/server.log" &
SERVER_PID=$!
for _ in $(seq 100); do grep -q "companion serving" "$WORK/server.out" 2>/dev/null && break; sleep 0.1; done
cat "$WORK/server.out"
"$BIN" health --device "$DEVICE"

step "Loading the model once"
"$BIN" load --device "$DEVICE" "$WORK/models/opt-125m"

step "Two client processes attach it at the same time, zero-copy"
VERIFY=--verify
[ "$DEVICE" = host ] || VERIFY=""
"$BIN" attach --device "$DEVICE" "$WORK/models/opt-125m" $VERIFY --hold 1 --show 5 >"$WORK/client1.out" &
C1=$!
"$BIN" attach --device "$DEVICE" "$WORK/models/opt-125m" $VERIFY --hold 1 --show 5 >"$WORK/client2.out" &
C2=$!
wait $C1 $C2
echo "-- client 1"; cat "$WORK/client1.out"
echo "-- client 2"; cat "$WORK/client2.out"

step "What the server holds"
"$BIN" ls --device "$DEVICE"

step "Stopping the server"
kill -TERM "$SERVER_PID"
wait "$SERVER_PID"
SERVER_PID=""
tail -n 3 "$WORK/server.log"
echo "server stopped cleanly; its registry record is gone"
