#!/usr/bin/env bash
# GPU benchmarks (not tests), one run on one card, each printing its table:
#  1. attach latency of Companion (C++ client) vs torch.multiprocessing CUDA IPC for OPT-125m- and
#     Llama-3-8B-shaped checkpoints and 100k / 1M-tensor raw MoE tables (bench/run_attach_bench.py);
#  2. Python attach (get_model_parameters, tensors(), state_dict) of the same 16 GB Llama-3-8B
#     checkpoint and of a 100k-tensor table (bench/python_attach_bench.py);
#  3. 64 client processes attaching the Llama-3-8B model at one instant, C++ and Python, with the
#     request / map phases apart (bench/concurrent_attach_bench.py);
#  4. memory: kill -9 of a server with the Llama-3-8B model loaded, a new server serving it to a
#     new client (restart without reload, with its keeper), against a fresh server loading it;
#     and the host tier's offload and wake against a warm load (bench/run_memory_bench.py).
# JSON to $OUT when set.
#   scripts/gpu-bench.sh [--work DIR] [--device 0] [--backend cuda-vmm] [--clients 64]
#                        [--skip-memory]
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPANION_BUILD_DIR=${COMPANION_BUILD_DIR:-$PWD/build}
PY=${PYTHON:-python3}
work="" device=0 backend=cuda-vmm clients=64 skip_memory=0
while (($#)); do
  case $1 in
    --work) work=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --backend) backend=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --skip-memory) skip_memory=1; shift ;;
    *) echo "gpu-bench: unknown option $1" >&2; exit 2 ;;
  esac
done
work=${work:-$(mktemp -d -t companion-gpu-bench-XXXXXX)}
out=${OUT:-$work/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
"$PY" bench/run_attach_bench.py --work "$work" --device "$device" --backend "$backend" --out "$out"
"$PY" bench/python_attach_bench.py --device "$device" --llama "$work/models/llama-3-8b" \
  --tables 291,100000 --before-ref none --json "$out/python_attach_bench.json"
"$PY" bench/concurrent_attach_bench.py --device "$device" --backend "$backend" \
  --clients "$clients" --work "$work" --out "$out"
if ((!skip_memory)); then
  "$PY" bench/run_memory_bench.py --backend "$backend" --device "$device" --work "$work" \
    --out "$out"
fi
