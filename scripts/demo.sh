#!/usr/bin/env bash
# The main job: builds the demo example in release mode and runs it.
# Installs the missing Debian packages first (as root). A second run reuses
# build/demo and rebuilds only what changed. Arguments are passed to the demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

# ---- the demo: the one place that names it ------------------------------------
DEMO_TARGET=custom_router                          # CMake target of the example (a mixed-MoE LM on real text)
DEMO_BINARY=build/demo/examples/custom_router/custom_router  # where the build puts it
DEMO_ARGS=()                                       # its arguments, before the user's
# --------------------------------------------------------------------------------

mixmoe_ensure_packages "${MIXMOE_DEPS_BUILD[@]}" "${MIXMOE_DEPS_EXAMPLES[@]}"

start=$SECONDS
echo "==== demo: configure and build ${DEMO_TARGET}"
cmake --preset demo
cmake --build --preset demo --target "$DEMO_TARGET" --parallel "$(nproc)"
build_seconds=$((SECONDS - start))

echo
echo "==== demo: run ${DEMO_BINARY}${DEMO_ARGS[*]:+ ${DEMO_ARGS[*]}}${*:+ $*}"
start=$SECONDS
"$DEMO_BINARY" "${DEMO_ARGS[@]}" "$@"
echo
echo "demo finished: build ${build_seconds}s, run $((SECONDS - start))s"
