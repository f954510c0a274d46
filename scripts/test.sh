#!/usr/bin/env bash
# Builds mixmoe and runs every test in CI's two configurations (CMakePresets.json):
#   release  optimised, warnings as errors
#   asan     AddressSanitizer + UndefinedBehaviorSanitizer, -Og
# then builds and runs the programs of the documentation (scripts/check-docs.sh).
# All run every time; the exit status is non-zero when any fails.
# Installs the missing Debian packages first (as root). A second run reuses
# build/release and build/asan and rebuilds only what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

mixmoe_ensure_packages "${MIXMOE_DEPS_BUILD[@]}" "${MIXMOE_DEPS_EXAMPLES[@]}" "${MIXMOE_DEPS_TESTS[@]}" \
  "${MIXMOE_DEPS_BENCHMARKS[@]}"

jobs=$(nproc)
presets=(release asan)
declare -A result build_seconds test_seconds
tests_passed=0 tests_failed=0 tests_skipped=0 # CTest tests over both presets, plus the docs check
skipped_names=() # tests that did not run (the GPU tests on a machine without a GPU)

# run_preset NAME: configure, build and test one preset; records result and times.
run_preset() {
  local preset=$1 start
  echo
  echo "==== ${preset}: configure and build (${jobs} jobs)"
  start=$SECONDS
  if ! { cmake --preset "$preset" && cmake --build --preset "$preset" --parallel "$jobs"; }; then
    build_seconds[$preset]=$((SECONDS - start))
    test_seconds[$preset]=0
    result[$preset]="FAILED to build"
    tests_failed=$((tests_failed + 1))
    return
  fi
  build_seconds[$preset]=$((SECONDS - start))
  echo
  echo "==== ${preset}: test"
  start=$SECONDS
  local log="build/${preset}/ctest-last.log" counts failed total skipped
  if ctest --preset "$preset" --output-on-failure -j2 2>&1 | tee "$log"; then
    result[$preset]="passed"
  else
    result[$preset]="FAILED tests"
  fi
  test_seconds[$preset]=$((SECONDS - start))
  # "100% tests passed, 0 tests failed out of 21"
  counts=$(sed -n 's/.*tests passed, \([0-9]*\) tests\{0,1\} failed out of \([0-9]*\).*/\1 \2/p' "$log" | tail -1)
  if [[ -n $counts ]]; then
    read -r failed total <<<"$counts"
    # CTest counts a skipped test (exit code 77: a GPU test without a GPU) among the passed ones.
    skipped=$(grep -c '(Skipped)$' "$log" || true)
    tests_passed=$((tests_passed + total - failed - skipped))
    tests_failed=$((tests_failed + failed))
    tests_skipped=$((tests_skipped + skipped))
    while read -r name; do skipped_names+=("${preset}/${name}"); done < <(sed -n 's/^[[:space:]]*[0-9]* - \(.*\) (Skipped)$/\1/p' "$log")
  elif [[ ${result[$preset]} != passed ]]; then
    tests_failed=$((tests_failed + 1))
  fi
}

for preset in "${presets[@]}"; do
  run_preset "$preset"
done

echo
echo "==== docs: build and run the programs of README.md and docs/"
start=$SECONDS
if bash scripts/check-docs.sh; then
  docs_result=passed
  tests_passed=$((tests_passed + 1))
else
  docs_result=FAILED
  tests_failed=$((tests_failed + 1))
fi
docs_seconds=$((SECONDS - start))

echo
echo "==== summary"
status=0
for preset in "${presets[@]}"; do
  printf '  %-8s %-16s build %4ds  test %4ds\n' "$preset" "${result[$preset]}" "${build_seconds[$preset]}" \
    "${test_seconds[$preset]}"
  [[ ${result[$preset]} == passed ]] || status=1
done
printf '  %-8s %-16s build+run %4ds\n' docs "$docs_result" "$docs_seconds"
[[ $docs_result == passed ]] || status=1
printf '  total %ds\n' "$SECONDS"
[[ $status -eq 0 ]] || echo "FAILED: see the log above" >&2
echo "tests: ${tests_passed} passed, ${tests_failed} failed, ${tests_skipped} skipped${skipped_names[*]:+ (did not run: ${skipped_names[*]})}"
exit "$status"
