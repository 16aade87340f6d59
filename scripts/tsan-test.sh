#!/usr/bin/env bash
# Developer command (not in CI: it would double CI's time on 2 cores): the unit and integration
# tests under ThreadSanitizer, in build-tsan/. Any race report fails the run.
#   scripts/tsan-test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tsan
export TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1"
status=0
(cd build-tsan && ctest --output-on-failure -j 2) || status=1
COMPANION_BUILD_DIR=build-tsan .venv/bin/python -m pytest -q -p no:cacheprovider tests/integration "$@" || status=1
exit $status
