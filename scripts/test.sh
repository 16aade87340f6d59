#!/usr/bin/env bash
# Runs every test: unit and integration tests on the Release build, then again under
# AddressSanitizer + UndefinedBehaviorSanitizer, then the Python package's tests, then the engine
# tests (real vLLM and transformers, in the venv scripts/setup-vllm.sh keeps in a cache directory),
# then each fuzz target for 60 s (scripts/fuzz.sh). GPU tests skip themselves without a GPU
# (scripts/gpu-test.sh runs them on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --asan --vllm
VLLM_VENV=$(scripts/setup-vllm.sh)

export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
status=0
for dir in build build-asan; do
  echo "== tests in $dir"
  (cd "$dir" && ctest --output-on-failure -j 2) || status=1
  COMPANION_BUILD_DIR="$dir" .venv/bin/python -m pytest -q -p no:cacheprovider tests/integration || status=1
done
# The Python package loads libcompanion.so into the interpreter: the Release build's (an ASan
# build of the library would need the sanitizer runtime preloaded into Python).
echo "== Python package tests"
COMPANION_BUILD_DIR=build .venv/bin/python -m pytest -q -p no:cacheprovider tests/python || status=1
# Real engines: vLLM's CPU build with the host backend, transformers on torch 2.
echo "== engine tests ($VLLM_VENV)"
engine_tests=(tests/vllm)
[ -d tests/torch2 ] && engine_tests+=(tests/torch2)
COMPANION_BUILD_DIR=build "$VLLM_VENV/bin/python" -m pytest -q -p no:cacheprovider "${engine_tests[@]}" || status=1
# Coverage-guided fuzzing of the parsers under ASan + UBSan, a bounded time per target.
echo "== fuzzing"
scripts/fuzz.sh --time 60 || status=1
exit $status
