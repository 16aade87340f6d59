#!/usr/bin/env bash
# GPU benchmark (not a test): load throughput of Companion vs safetensors.torch.load_file on a
# Llama-3-8B-shaped checkpoint (16 GB bf16), cold and warm, with the machine's ceilings (pinned
# H2D, raw O_DIRECT disk reads, page-cache reads), and each rank of a TP=2 shard (warm) against the
# whole model's time. Prints a table; load_bench.json to $OUT when set. Dropping the page cache
# needs root (else it falls back to posix_fadvise on the file).
#   scripts/gpu-load-bench.sh [--work DIR] [--device 0] [--backend cuda-vmm] [--reps 2]
#                             [--skip-cold] [--skip-safetensors] [--skip-server] [--skip-tp]
set -euo pipefail
cd "$(dirname "$0")/.."
export COMPANION_BUILD_DIR=${COMPANION_BUILD_DIR:-$PWD/build}
PY=${PYTHON:-python3}
PYTHONUNBUFFERED=1 "$PY" bench/run_load_bench.py "$@"
