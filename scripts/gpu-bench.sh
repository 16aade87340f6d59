#!/usr/bin/env bash
# GPU benchmarks (not tests): attach latency of Companion vs torch.multiprocessing CUDA IPC, for
# OPT-125m- and Llama-3-8B-shaped checkpoints. Prints a table; JSON to $OUT when set.
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPANION_BUILD_DIR=${COMPANION_BUILD_DIR:-$PWD/build}
PY=${PYTHON:-python3}
PYTHONUNBUFFERED=1 "$PY" bench/run_attach_bench.py "$@"
