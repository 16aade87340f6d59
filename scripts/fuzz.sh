#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers (libFuzzer, ASan + UBSan), two targets at a time.
#   scripts/fuzz.sh [--time SECONDS] [--merge] [--no-build] [TARGET...]
# Runs each target (default: all, see tests/fuzz/CMakeLists.txt) for SECONDS (default 60) from
# its seed corpus tests/fuzz/corpus/<target>/, which stays read-only: new inputs go to
# build-fuzz/fuzz-work/<target>/corpus/. --merge adds those that bring new coverage to the seed
# corpus (for a developer to review and commit). Exits non-zero on any crash, leak, timeout,
# out-of-memory or sanitizer report; the input that caused it is left in
# build-fuzz/fuzz-work/<target>/artifacts/ and named in the table.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60 merge=0 build=1 targets=()
while (($#)); do
  case "$1" in
    --time) seconds=$2; shift 2 ;;
    --merge) merge=1; shift ;;
    --no-build) build=0; shift ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    -*) echo "fuzz: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
all=(frame_reader message_decoder safetensors_header index_json registry_record shard_rules
     tensor_table keeper_decoders)
((${#targets[@]})) || targets=("${all[@]}")
for t in "${targets[@]}"; do
  [[ " ${all[*]} " == *" $t "* ]] || { echo "fuzz: unknown target $t (${all[*]})" >&2; exit 2; }
done

((build)) && scripts/setup.sh --fuzz
work=build-fuzz/fuzz-work
parallel=2  # two targets at a time: one per core on the CI machine

# An input that runs longer than -timeout seconds, or a process above -rss_limit_mb, is a finding.
fuzz_one() {  # fuzz_one TARGET: runs it, output in $work/TARGET/log
  local t=$1 dir=$work/$1
  rm -rf "$dir"
  mkdir -p "$dir/corpus" "$dir/artifacts"
  local args=(-max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=2048
              -print_final_stats=1 -artifact_prefix="$dir/artifacts/")
  [[ -f tests/fuzz/corpus/$t.dict ]] && args+=(-dict="tests/fuzz/corpus/$t.dict")
  # New units are written to the first corpus directory only: the scratch one.
  # libFuzzer stops itself at -max_total_time; the outer timeout only bounds a run that cannot.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    timeout --signal=KILL $((seconds + 120)) \
    build-fuzz/tests/fuzz/fuzz_"$t" "${args[@]}" "$dir/corpus" "tests/fuzz/corpus/$t" \
    >"$dir/log" 2>&1
}

declare -A pid_of=() status_of=()
running=()
# Interrupted: stop the targets still running (each runs in a subshell of this script).
trap 'for p in "${running[@]}"; do pkill -P "$p"; done 2>/dev/null; exit 130' INT TERM
for t in "${targets[@]}"; do
  while ((${#running[@]} >= parallel)); do
    wait -n "${running[@]}" || true
    still=()
    for p in "${running[@]}"; do kill -0 "$p" 2>/dev/null && still+=("$p"); done
    running=("${still[@]}")
  done
  echo "fuzz: $t for ${seconds}s"
  fuzz_one "$t" &
  pid_of[$t]=$!
  running+=("$!")
done
for t in "${targets[@]}"; do
  if wait "${pid_of[$t]}"; then status_of[$t]=0; else status_of[$t]=$?; fi
done

failed=0
printf '\n%-20s %12s %10s %10s  %s\n' target runs coverage new-units findings
for t in "${targets[@]}"; do
  log=$work/$t/log
  runs=$(grep -o 'stat::number_of_executed_units: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' ||
         true)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || true)
  units=$(find "$work/$t/corpus" -type f | wc -l)
  findings=$(find "$work/$t/artifacts" -type f -printf '%f ' 2>/dev/null || true)
  if [[ ${status_of[$t]} != 0 || -n $findings ]]; then
    failed=1
    findings="exit ${status_of[$t]}: ${findings:-no artifact} (log: $log)"
  else
    findings=none
  fi
  printf '%-20s %12s %10s %10s  %s\n' "$t" "${runs:-?}" "${cov:-?}" "$units" "$findings"
done

if ((merge)); then
  for t in "${targets[@]}"; do
    before=$(find "tests/fuzz/corpus/$t" -type f | wc -l)
    build-fuzz/tests/fuzz/fuzz_"$t" -merge=1 "tests/fuzz/corpus/$t" "$work/$t/corpus" \
      >"$work/$t/merge.log" 2>&1
    echo "fuzz: $t: $(($(find "tests/fuzz/corpus/$t" -type f | wc -l) - before)) inputs merged into tests/fuzz/corpus/$t"
  done
fi
exit $failed
