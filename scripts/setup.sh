#!/usr/bin/env bash
# Installs what Companion needs on Debian 12 (as root, or with sudo) and builds it.
#   scripts/setup.sh            Release build in build/
#   scripts/setup.sh --asan     also an AddressSanitizer + UBSan build in build-asan/
#   scripts/setup.sh --tsan     also a ThreadSanitizer build in build-tsan/ (scripts/tsan-test.sh)
#   scripts/setup.sh --fuzz     also the libFuzzer targets (clang, ASan + UBSan) in build-fuzz/
#   scripts/setup.sh --vllm     also the vLLM / torch 2 / transformers venv (scripts/setup-vllm.sh)
# The options combine (--asan --fuzz). Each step is announced on one line; apt's, pip's and
# CMake's configure output goes to build/setup.log, named (with its last lines) when a step fails.
# Safe to run again: installs only what is missing, rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  libflatbuffers-dev flatbuffers-compiler nlohmann-json3-dev libcli11-dev
  libgtest-dev libgmock-dev libbenchmark-dev libcurl4-openssl-dev libsystemd-dev
  python3 python3-venv python3-pip python3-numpy python3-pytest python3-torch
  python3-setuptools python3-wheel  # scripts/build-wheel.sh builds offline (--no-build-isolation)
  etcd-server etcd-client clang-format clang libclang-rt-14-dev openssl
  systemd  # systemd-analyze, which verifies packaging/systemd/companion@.service
  libmicrohttpd-dev curl python3-prometheus-client  # serve --metrics; its tests parse the scrape
)

asan=0 tsan=0 fuzz=0 vllm=0
for arg in "$@"; do
  case "$arg" in
    --asan) asan=1 ;;
    --tsan) tsan=1 ;;
    --fuzz) fuzz=1 ;;
    --vllm) vllm=1 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "setup: unknown option $arg (options: --asan, --tsan, --fuzz, --vllm, --help)" >&2; exit 2 ;;
  esac
done

mkdir -p build
LOG=$PWD/build/setup.log
: >"$LOG"
step() { echo "setup: $*"; }
# logged CMD...: runs CMD with its output in the log; when it fails, says so, shows the last
# lines CMD wrote and where the rest is, and stops.
logged() {
  echo "+ $*" >>"$LOG"
  local first=$(($(wc -l <"$LOG") + 1))
  if ! "$@" >>"$LOG" 2>&1; then
    echo "setup: failed: $*" >&2
    tail -n "+$first" "$LOG" | tail -n 15 | sed 's/^/  | /' >&2
    echo "setup: the whole output is in $LOG" >&2
    exit 1
  fi
}

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  step "apt-get update (package lists; output in $LOG)"
  logged $SUDO apt-get update
  step "apt-get install: ${#missing[@]} packages, a few minutes the first time: ${missing[*]}"
  logged $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${missing[@]}"
else
  step "Debian packages: all ${#PACKAGES[@]} installed"
fi

# Tests write reference checkpoints with the safetensors library; CPU torch comes from Debian.
if ! .venv/bin/python -c "import safetensors, numpy, torch, pytest" 2>/dev/null; then
  step "creating .venv (Debian's Python, numpy, torch and pytest) and pip-installing safetensors"
  logged /usr/bin/python3 -m venv --system-site-packages .venv
  logged .venv/bin/python -m pip install --disable-pip-version-check safetensors
else
  step ".venv: ready"
fi

# ccache, where installed, makes rebuilds in other checkouts of the tree cheap.
launcher=()
if command -v ccache >/dev/null; then
  export CCACHE_BASEDIR="$PWD" CCACHE_NOHASHDIR=1
  launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_C_COMPILER_LAUNCHER=ccache)
fi

build() {  # build DIR [cmake args...]: configure quietly, then compile with ninja's progress
  local dir=$1; shift
  step "configuring $dir/ (cmake)"
  logged cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "${launcher[@]}" \
    -DCOMPANION_PYTHON="$PWD/.venv/bin/python" "$@"
  step "building $dir/ ($(nproc) jobs)"
  cmake --build "$dir" -j "$(nproc)"
}

build build
if ((tsan)); then
  build build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCOMPANION_SANITIZE=thread
fi
if ((asan)); then
  build build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCOMPANION_SANITIZE=address,undefined
fi
if ((fuzz)); then
  # libFuzzer comes with clang; this tree holds only the parsers' libraries and tests/fuzz.
  build build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
    -DCMAKE_CXX_COMPILER=clang++ -DCOMPANION_FUZZ=ON
fi
if ((vllm)); then
  step "the vLLM venv (torch 2, transformers; scripts/setup-vllm.sh)"
  scripts/setup-vllm.sh >/dev/null
fi
step "done"
