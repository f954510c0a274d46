#!/usr/bin/env bash
# Runs the benchmarks (not part of the tests): GEMM against OpenBLAS, an FFN layer
# MoE-vs-dense, and LM training against PyTorch. Installs what they need (as root):
# the build packages of scripts/deps.sh plus the PyTorch peer (python3-torch) and
# matplotlib for the plots. Results print to stdout; the LM comparison also writes
# docs/results/lm_comparison.json and docs/img/lm_comparison.png.
# Usage: bash scripts/bench.sh [--quick]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/deps.sh

quick=0
[[ ${1:-} == --quick ]] && quick=1

mixmoe_ensure_packages "${MIXMOE_DEPS_BUILD[@]}" python3-torch python3-matplotlib

cmake --preset release >/dev/null
cmake --build --preset release --parallel "$(nproc)" --target bench_gemm bench_moe_layer bench_lm

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), load $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "==== GEMM: mixmoe, Eigen and OpenBLAS"
if [[ $quick == 1 ]]; then build/release/benchmarks/bench_gemm --quick; else build/release/benchmarks/bench_gemm; fi
echo
echo "==== one FFN layer: MoE against dense at the same active FLOPs"
MIXMOE_NUM_THREADS=2 build/release/benchmarks/bench_moe_layer --reps $((quick ? 3 : 10))
echo
echo "==== LM training: mixmoe against PyTorch eager"
if [[ $quick == 1 ]]; then
  /usr/bin/python3 benchmarks/run_lm_comparison.py --bench build/release/benchmarks/bench_lm --repeats 1 --steps 3 --warmup 1
else
  /usr/bin/python3 benchmarks/run_lm_comparison.py --bench build/release/benchmarks/bench_lm
fi
