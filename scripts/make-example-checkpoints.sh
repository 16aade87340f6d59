#!/usr/bin/env bash
# Writes the example checkpoints README.md's examples use (random values, nothing downloaded):
#   scripts/make-example-checkpoints.sh [MODELS [HF_CACHE]]
# MODELS (default /tmp/docs-models) gets opt-tiny, opt-sharded and broken; HF_CACHE (default
# /tmp/docs-hf) a Hugging Face hub cache holding acme/tiny-lm. Serve them with
#   companion serve --model-root MODELS --hf-cache HF_CACHE
# Needs the .venv that scripts/setup.sh makes (safetensors, torch); PYTHON overrides it.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
case "${1:-}" in -h|--help) sed -n '2,7s/^# \{0,1\}//p' "$0"; exit 0 ;; esac
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
if [ ! -x "$PYTHON" ]; then
  echo "make-example-checkpoints: $PYTHON not found: run scripts/setup.sh first (or set PYTHON)" >&2
  exit 1
fi
exec "$PYTHON" "$REPO/scripts/lib/make_example_checkpoints.py" "${1:-/tmp/docs-models}" "${2:-/tmp/docs-hf}"
