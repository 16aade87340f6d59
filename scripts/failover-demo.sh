#!/usr/bin/env bash
# Two Companion instances on one device, announced in a real etcd; an engine maps a model from
# the instance that holds it, that instance is killed with SIGKILL, and the engine's next request
# fails over to the other instance while the weights it already mapped stay valid. Then the dead
# instance's etcd record lapses with its lease.
#   COMPANION_DEMO_DEVICE=0 scripts/failover-demo.sh   runs it on GPU 0 instead of host memory
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
BIN=$PWD/build/src/cli/companion
DEVICE=${COMPANION_DEMO_DEVICE:-host}
TTL=3
WORK=$(mktemp -d /tmp/companion-failover.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

step "Starting etcd on loopback"
PORT=$(free_port)
PEER=$(free_port)
etcd --name demo --data-dir "$WORK/etcd" --log-level warn \
  --listen-client-urls "http://127.0.0.1:$PORT" --advertise-client-urls "http://127.0.0.1:$PORT" \
  --listen-peer-urls "http://127.0.0.1:$PEER" --initial-advertise-peer-urls "http://127.0.0.1:$PEER" \
  --initial-cluster "demo=http://127.0.0.1:$PEER" >"$WORK/etcd.log" 2>&1 &
PIDS+=($!)
REGISTRY="etcd://127.0.0.1:$PORT"
ETCDCTL=(env ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$PORT")
for _ in $(seq 100); do "${ETCDCTL[@]}" endpoint health >/dev/null 2>&1 && break; sleep 0.1; done
echo "etcd at $REGISTRY"

step "Writing an example checkpoint (OPT-125m shapes, fp16)"
.venv/bin/python scripts/lib/write_example_checkpoint.py "$WORK/models/opt-125m"

step "Two instances for device '$DEVICE', each announced under a $TTL s lease"
for n in 1 2; do
  "$BIN" serve --device "$DEVICE" --model-root "$WORK/models" --runtime-dir "$WORK/run" \
    --registry "$REGISTRY" --registry-ttl "$TTL" >"$WORK/server$n.out" 2>"$WORK/server$n.log" &
  PIDS+=($!)
  disown  # killed on purpose below: no job-control noise
  for _ in $(seq 100); do grep -q "companion serving" "$WORK/server$n.out" 2>/dev/null && break; sleep 0.1; done
  cat "$WORK/server$n.out"
done
echo "-- keys in etcd"
"${ETCDCTL[@]}" get --prefix /services/ --keys-only | grep .
"$BIN" health --all --device "$DEVICE" --registry "$REGISTRY"

step "Loading the model on one instance (clients will be sent where it is)"
"$BIN" load --device "$DEVICE" --registry "$REGISTRY" "$WORK/models/opt-125m"
HOLDER=$("$BIN" health --all --json --device "$DEVICE" --registry "$REGISTRY" |
  .venv/bin/python -c 'import json,sys; print(next(e["health"]["server"]["pid"] for e in json.load(sys.stdin) if e["health"]["models_loaded"]))')
echo "instance with pid $HOLDER holds it"

step "An engine maps it, then asks again every 0.5 s; the holder is killed with SIGKILL"
PYTHONPATH=$PWD/python COMPANION_LIBRARY=$PWD/build/src/capi/libcompanion.so \
  .venv/bin/python scripts/lib/failover_engine.py --registry "$REGISTRY" --device "$DEVICE" \
  --model "$WORK/models/opt-125m" --rounds 10 &
ENGINE=$!
sleep 2.2
echo "** kill -9 $HOLDER"
kill -9 "$HOLDER"
wait "$ENGINE"
echo "engine finished: every round read the same bytes (the slow round loaded the model on the"
echo "surviving instance; the mapping taken from the dead one stayed valid throughout)"

step "The dead instance's record lapses with its lease (TTL $TTL s)"
for i in $(seq 60); do
  n=$("${ETCDCTL[@]}" get --prefix /services/ --keys-only | grep -c . || true)
  [ "$n" -le 1 ] && break
  sleep 0.1
done
"${ETCDCTL[@]}" get --prefix /services/ --keys-only | grep .
"$BIN" health --all --device "$DEVICE" --registry "$REGISTRY"
