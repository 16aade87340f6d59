#!/usr/bin/env bash
# Installs what Companion needs on Debian 12 (as root, or with sudo) and builds it.
#   scripts/setup.sh            Release build in build/
#   scripts/setup.sh --asan     also an AddressSanitizer + UBSan build in build-asan/
#   scripts/setup.sh --fuzz     also the libFuzzer targets (clang, ASan + UBSan) in build-fuzz/
# The options combine (--asan --fuzz).
# Safe to run again: installs only what is missing, rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libflatbuffers-dev flatbuffers-compiler nlohmann-json3-dev libcli11-dev
  libgtest-dev libgmock-dev libbenchmark-dev libcurl4-openssl-dev
  python3 python3-venv python3-pip python3-numpy python3-pytest python3-torch
  etcd-server etcd-client clang-format clang libclang-rt-14-dev openssl
)

asan=0 fuzz=0 vllm=0
for arg in "$@"; do
  case "$arg" in
    --asan) asan=1 ;;
    --fuzz) fuzz=1 ;;
    --vllm) vllm=1 ;;
    *) echo "setup: unknown option $arg (options: --asan, --fuzz, --vllm)" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Tests write reference checkpoints with the safetensors library; CPU torch comes from Debian.
if ! .venv/bin/python -c "import safetensors, numpy, torch, pytest" 2>/dev/null; then
  echo "setup: creating .venv"
  /usr/bin/python3 -m venv --system-site-packages .venv
  .venv/bin/python -m pip install -q --disable-pip-version-check safetensors
fi

# ccache, where installed, makes rebuilds in other checkouts of the tree cheap.
launcher=()
if command -v ccache >/dev/null; then
  export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
fi

build() {  # build DIR [cmake args...]
  local dir=$1; shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" \
    -DCOMPANION_PYTHON="$PWD/.venv/bin/python" "$@" >/dev/null
  cmake --build "$dir" -j "$(nproc)"
}

build build
if ((asan)); then
  build build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCOMPANION_SANITIZE=address,undefined
fi
if ((fuzz)); then
  # libFuzzer comes with clang; this tree holds only the parsers' libraries and tests/fuzz.
  build build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
    -DCMAKE_CXX_COMPILER=clang++ -DCOMPANION_FUZZ=ON
fi
if ((vllm)); then
  scripts/setup-vllm.sh >/dev/null
fi
