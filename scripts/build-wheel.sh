#!/usr/bin/env bash
# Builds the Python package as a wheel carrying libcompanion.so, offline, into dist/:
#   scripts/build-wheel.sh [--build-dir DIR] [--out DIR]
# DIR defaults to $COMPANION_BUILD_DIR, else build/ (what scripts/setup.sh configures); its
# library target is brought up to date first (ninja: nothing to do when it is). The wheel is
# tagged py3-none-<platform>: any Python 3, this machine's architecture. `pip install` it with no
# COMPANION_LIBRARY to set.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${COMPANION_BUILD_DIR:-build}
out=dist
while [ $# -gt 0 ]; do
  case $1 in
    --build-dir) build=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--build-dir DIR] [--out DIR]" >&2; exit 2 ;;
  esac
done
if [ ! -f "$build/CMakeCache.txt" ]; then
  echo "build-wheel: $build/ is not a CMake build directory: run scripts/setup.sh first" >&2
  exit 1
fi
cmake --build "$build" --target companion_capi >/dev/null
python=.venv/bin/python
[ -x "$python" ] || python=python3
# A clean copy of python/: no build/ or egg-info of an earlier build, no library a developer
# copied beside the sources (the wheel carries the build's, in companion/_native/).
source=$(mktemp -d)
trap 'rm -rf "$source"' EXIT
cp -r python/. "$source"
rm -rf "$source/build" "$source"/*.egg-info "$source"/companion/libcompanion.so*
find "$source" -name __pycache__ -prune -exec rm -rf {} +
mkdir -p "$out"
COMPANION_BUILD_DIR=$(realpath "$build") "$python" -m pip wheel --quiet --disable-pip-version-check \
  --no-build-isolation --no-deps --no-index --wheel-dir "$out" "$source"
ls "$out"/companion-*.whl
