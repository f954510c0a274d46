#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (Debian or Ubuntu with CUDA installed, no network):
# checks the tools and libraries the build needs (installs nothing), configures a CUDA build for
# the GPU's architecture, builds every GPU test (test_cuda*) and bench_gpu with all cores, runs
# `ctest -L gpu`, then bench_gpu, and writes everything into one directory:
#
#   scripts/gpu-check.sh [OUT_DIR] [--arch SM] [--build-dir DIR] [--jobs N] [--deps DIR]
#                        [--no-bench] [--sanitize] [--archive FILE]
#
#   OUT_DIR      where the results go (default build/gpu-check): environment.txt (tools, GPU,
#                commit), nvidia-smi.txt, configure.log, build.log, ctest.log, bench.txt (the
#                table), bench.json, summary.txt (each phase's result and seconds)
#   --arch SM    CMAKE_CUDA_ARCHITECTURES (90 for H100/H200, 80 for A100); default: the first
#                GPU's compute capability from nvidia-smi, else 90
#   --build-dir  the CMake build directory (default build/gpu-check-build; reused by a second run)
#   --jobs N     parallel compile jobs (default: all cores)
#   --deps DIR   libraries unpacked by scripts/gpu-bundle.sh on another Debian machine (DIR/root/usr),
#                for a GPU machine without them: put on CMAKE_PREFIX_PATH, the include checks and
#                LD_LIBRARY_PATH (linking and running)
#   --no-bench   leave out bench_gpu (build and run the GPU tests only)
#   --sanitize   then run GPU tests under compute-sanitizer (racecheck on the families with shared
#                memory, memcheck on every family, synccheck on rows), 240 s in all, 120 s a run:
#                sanitizer.log; found errors fail the run
#   --archive F  at the end, whatever happened, pack OUT_DIR into the .tar.gz F (one file to copy
#                back from a machine that returns few files)
#
# Time limits keep the whole run within about 9 minutes on 16 cores: the GPU tests 180 s in all
# (150 s each), the benchmark 200 s (the sanitizer 240 s more). A target that fails to compile does not stop the others: they
# are built and run, and the failure is reported (ctest shows that test as not run). Without a GPU
# it still configures and builds everything, says that no GPU is present and exits with 77; a
# missing tool or library exits with 2 before building.
# Exit status: 0 when the build, every GPU test, the benchmark and the sanitizer runs asked for
# succeeded, 1 otherwise.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out=build/gpu-check build=build/gpu-check-build arch="" jobs=$(nproc) deps="" bench=1 sanitize=0 archive=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --no-bench) bench=0; shift ;;
    --sanitize) sanitize=1; shift ;;
    --archive) archive=${2:?--archive needs a file name}; shift 2 ;;
    --arch) arch=${2:?--arch needs a value}; shift 2 ;;
    --build-dir) build=${2:?--build-dir needs a value}; shift 2 ;;
    --jobs) jobs=${2:?--jobs needs a value}; shift 2 ;;
    --deps) deps=${2:?--deps needs a value}; shift 2 ;;
    -h|--help) sed -n '2,34p' "$0"; exit 0 ;;
    -*) echo "gpu-check: unknown option $1 (--help)" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
summary=$out/summary.txt
: > "$summary"
t_start=$SECONDS
if [[ -n $archive ]]; then
  case $archive in /*) ;; *) archive=$PWD/$archive ;; esac
  trap 'tar czf "$archive" -C "$(dirname "$out")" "$(basename "$out")" && echo "gpu-check: results packed into $archive"' EXIT
fi

note() { echo "$*" | tee -a "$summary"; }
phase_start() { phase_t0=$SECONDS; echo; echo "==== $1"; }
phase_end() { note "$(printf '%-10s %-40s %5d s' "$1" "$2" $((SECONDS - phase_t0)))"; }

# ---- 1. tools and libraries ------------------------------------------------------------------
phase_start "tools and libraries"
missing=()
dep_dirs=()  # include and library roots of --deps
if [[ -n $deps ]]; then
  [[ -d $deps/root/usr ]] || { note "gpu-check: --deps $deps has no root/usr (made by scripts/gpu-bundle.sh?)"; exit 2; }
  dep_root=$(cd "$deps/root/usr" && pwd)
  dep_dirs=("$dep_root")
  export CMAKE_PREFIX_PATH=$dep_root${CMAKE_PREFIX_PATH:+:$CMAKE_PREFIX_PATH}
  for l in "$dep_root"/lib/*-linux-gnu "$dep_root/lib"; do
    [[ -d $l ]] && export LD_LIBRARY_PATH=$l${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  done
  note "using the libraries of $dep_root"
fi
if ! command -v nvcc > /dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then export PATH=/usr/local/cuda/bin:$PATH; fi
command -v cmake > /dev/null || missing+=("cmake (Debian package cmake)")
cxx=${CXX:-$(command -v c++ || command -v g++ || true)}
[[ -n $cxx ]] || missing+=("a C++20 compiler (Debian package g++)")
command -v nvcc > /dev/null || missing+=("nvcc (the CUDA toolkit; not on PATH nor in /usr/local/cuda/bin)")
# have_header FILE: under the usual include directories (multiarch too) or $CPATH.
have_header() {
  local d
  for d in /usr/include /usr/local/include /usr/include/*-linux-gnu $(tr : " " <<< "${CPATH:-}") \
    ${dep_dirs[@]/%//include}; do
    [[ -e $d/$1 ]] && return 0
  done
  return 1
}
# have_lib NAME: libNAME.so known to the dynamic linker or in a usual library directory.
have_lib() {
  ldconfig -p 2> /dev/null | grep -q "lib$1\.so" && return 0
  local d
  for d in "${dep_dirs[@]}"; do
    compgen -G "$d/lib/*-linux-gnu/lib$1.so*" > /dev/null || compgen -G "$d/lib/lib$1.so*" > /dev/null && return 0
  done
  compgen -G "/usr/lib/*/lib$1.so*" > /dev/null || compgen -G "/usr/lib/lib$1.so*" > /dev/null ||
    compgen -G "/usr/local/lib/lib$1.so*" > /dev/null
}
have_header eigen3/Eigen/Core || missing+=("Eigen 3.4 (Debian package libeigen3-dev)")
{ have_header fftw3.h && have_lib fftw3 && have_lib fftw3f; } || missing+=("FFTW 3, float and double (libfftw3-dev)")
{ have_header sentencepiece_processor.h && have_lib sentencepiece && have_lib sentencepiece_train; } ||
  missing+=("SentencePiece (libsentencepiece-dev)")
have_header nlohmann/json.hpp || missing+=("nlohmann JSON (nlohmann-json3-dev)")
have_header catch2/catch.hpp || missing+=("Catch2 v2, for the tests (catch2 2.x)")
blas=ON
if ! { { have_header cblas.h || have_header openblas-pthread/cblas.h || have_header openblas/cblas.h; } && have_lib openblas; }; then
  blas=OFF
  note "note: OpenBLAS not found (libopenblas-dev): the CPU GEMM uses Eigen's (-DMIXMOE_USE_BLAS=OFF)"
fi
if [[ ${#missing[@]} -gt 0 ]]; then
  note "gpu-check: missing (nothing is installed by this script):"
  for m in "${missing[@]}"; do note "  - $m"; done
  exit 2
fi

gpus=0
if command -v nvidia-smi > /dev/null && nvidia-smi > "$out/nvidia-smi.txt" 2>&1; then
  gpus=$(nvidia-smi -L 2> /dev/null | grep -c '^GPU ' || true)
  nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version,clocks.max.sm,power.limit \
    --format=csv >> "$out/nvidia-smi.txt" 2>&1 || true
else
  echo "nvidia-smi missing or failing: no usable GPU driver" >> "$out/nvidia-smi.txt"
fi
if [[ -z $arch ]]; then
  cap=$( ( [[ $gpus -gt 0 ]] && nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2> /dev/null | head -1) || true)
  if [[ $cap =~ ^([0-9]+)\.([0-9]+) ]]; then
    arch=${BASH_REMATCH[1]}${BASH_REMATCH[2]}
  else
    arch=90
    note "note: no compute capability from nvidia-smi: building for sm_90 (pass --arch to change)"
  fi
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2> /dev/null || echo unknown)"
  echo "uncommitted changes: $(git status --short 2> /dev/null | wc -l)"
  echo "host: $(uname -srm), $(nproc) cores"
  echo "cmake: $(cmake --version | head -1)"
  echo "c++: $cxx: $("$cxx" --version | head -1)"
  echo "nvcc: $(nvcc --version | tail -2 | tr '\n' ' ')"
  echo "gpus: $gpus; CMAKE_CUDA_ARCHITECTURES=$arch; MIXMOE_USE_BLAS=$blas; jobs $jobs; deps ${deps:-system}"
} > "$out/environment.txt"
cat "$out/environment.txt"
phase_end deps "ok ($gpus GPU(s), sm_$arch)"

# ---- 2. configure and build ------------------------------------------------------------------
phase_start "configure ($build)"
# Ninja when present (it builds several targets in parallel); a build directory keeps its generator.
generator=()
if [[ ! -f $build/CMakeCache.txt ]] && command -v ninja > /dev/null; then generator=(-G Ninja); fi
if ! cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release -DMIXMOE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" \
  -DMIXMOE_BUILD_TESTS=ON -DMIXMOE_BUILD_BENCHMARKS=ON -DMIXMOE_BUILD_EXAMPLES=OFF -DMIXMOE_USE_BLAS=$blas \
  > "$out/configure.log" 2>&1; then
  tail -30 "$out/configure.log"
  phase_end configure "FAILED (configure.log)"
  exit 1
fi
phase_end configure ok

phase_start "build the GPU tests and bench_gpu ($jobs jobs)"
targets=()
for f in tests/cuda/test_cuda*.cu; do targets+=("$(basename "$f" .cu)"); done
[[ $bench -eq 1 ]] && targets+=(bench_gpu)
echo "targets: ${targets[*]}"
# Every target is built even when another fails to compile: the others are still run. With Ninja,
# one invocation builds them all in parallel (-k 0 keeps going). CMake's top-level Makefile builds
# the targets named in one invocation one after the other (.NOTPARALLEL), each only a few files
# wide, so the Makefile case asks CMake's inner makefile (CMakeFiles/Makefile2) for all of them at
# once: one make, one dependency graph (the targets share the parity cases' CPU objects), all jobs.
built=() unbuilt=()
if grep -q '^CMAKE_GENERATOR:INTERNAL=Ninja' "$build/CMakeCache.txt"; then
  cmake --build "$build" --parallel "$jobs" --target "${targets[@]}" -- -k 0 > "$out/build.log" 2>&1
  build_rc=$?
  for t in "${targets[@]}"; do
    if ninja -C "$build" -n "$t" 2> /dev/null | grep -q "no work to do"; then built+=("$t"); else unbuilt+=("$t"); fi
  done
else
  make_goals=()
  for t in "${targets[@]}"; do
    if [[ $t == bench_gpu ]]; then make_goals+=("benchmarks/CMakeFiles/$t.dir/all"); else make_goals+=("tests/cuda/CMakeFiles/$t.dir/all"); fi
  done
  { make -C "$build" cmake_check_build_system && make -C "$build" -f CMakeFiles/Makefile2 -j "$jobs" -k "${make_goals[@]}"; } \
    > "$out/build.log" 2>&1
  build_rc=$?
  for t in "${targets[@]}"; do
    if grep -q "Built target $t\$" "$out/build.log"; then built+=("$t"); else unbuilt+=("$t"); fi
  done
fi
if [[ $build_rc -ne 0 ]]; then
  grep -E "error" "$out/build.log" | head -40
  phase_end build "FAILED: ${unbuilt[*]:-?} (build.log); built: ${built[*]:-none}"
else
  phase_end build "ok: ${built[*]}"
fi

# ---- 3. GPU tests ----------------------------------------------------------------------------
phase_start "ctest -L gpu"
( cd "$build" && timeout 180 ctest -L gpu --output-on-failure --timeout 150 ) > "$out/ctest.log" 2>&1
ctest_rc=$?
tail -25 "$out/ctest.log"
if [[ $ctest_rc -eq 124 ]]; then
  phase_end ctest "FAILED: over 180 s (ctest.log)"
else
  phase_end ctest "$( [[ $ctest_rc -eq 0 ]] && echo ok || echo "FAILED (ctest.log)" ): $(grep -E 'tests passed|tests failed' "$out/ctest.log" | tail -1)"
fi

# ---- 4. benchmark ----------------------------------------------------------------------------
phase_start "bench_gpu"
if [[ $bench -eq 0 ]]; then
  echo "bench_gpu left out (--no-bench)" | tee "$out/bench.txt"
  bench_rc=0
elif [[ " ${built[*]} " == *" bench_gpu "* ]]; then
  timeout 200 "$build/benchmarks/bench_gpu" --json "$out/bench.json" 2>&1 | tee "$out/bench.txt"
  bench_rc=${PIPESTATUS[0]}
else
  echo "bench_gpu was not built (build.log)" | tee "$out/bench.txt"
  bench_rc=1
fi
case $bench_rc in
  0) phase_end bench "$( [[ $bench -eq 1 ]] && echo "ok (bench.txt, bench.json)" || echo "left out (--no-bench)")" ;;
  77) phase_end bench "skipped: no GPU" ;;
  124) phase_end bench "FAILED: over 200 s (bench.json has the parts done)" ;;
  *) phase_end bench "FAILED, exit $bench_rc (bench.txt)" ;;
esac

# ---- 5. compute-sanitizer (--sanitize) -------------------------------------------------------
sanitize_rc=0
if [[ $sanitize -eq 1 ]]; then
  phase_start "compute-sanitizer"
  san=$(command -v compute-sanitizer || true)
  [[ -z $san && -x /usr/local/cuda/bin/compute-sanitizer ]] && san=/usr/local/cuda/bin/compute-sanitizer
  if [[ $gpus -eq 0 ]]; then
    phase_end sanitize "skipped: no GPU"
  elif [[ -z $san ]]; then
    sanitize_rc=1
    phase_end sanitize "FAILED: compute-sanitizer not found"
  else
    # Most valuable first: races in the kernels with shared memory, then out-of-bounds accesses.
    runs=("racecheck test_cuda_attention" "racecheck test_cuda_rows" "racecheck test_cuda_moe"
      "memcheck test_cuda_index" "memcheck test_cuda_moe" "memcheck test_cuda_attention" "memcheck test_cuda_rows"
      "memcheck test_cuda_elementwise" "synccheck test_cuda_rows" "memcheck test_cuda_training")
    : > "$out/sanitizer.log"
    deadline=$((SECONDS + 240))
    clean=() found=() failed=() timed_out=() not_run=()
    for r in "${runs[@]}"; do
      read -r tool t <<< "$r"
      left=$((deadline - SECONDS))
      exe=$build/tests/cuda/$t
      if [[ $left -lt 20 || ! -x $exe ]]; then not_run+=("$tool:$t"); continue; fi
      echo "==== compute-sanitizer --tool $tool $t" | tee -a "$out/sanitizer.log"
      t0=$SECONDS
      timeout $((left < 120 ? left : 120)) "$san" --tool "$tool" --error-exitcode 99 --print-limit 20 "$exe" \
        >> "$out/sanitizer.log" 2>&1
      rc=$?
      echo "---- $tool $t: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/sanitizer.log"
      case $rc in
        0) clean+=("$tool:$t") ;;
        99) found+=("$tool:$t") ;;
        124) timed_out+=("$tool:$t") ;;
        *) failed+=("$tool:$t(exit $rc)") ;;
      esac
    done
    [[ ${#found[@]} -gt 0 || ${#failed[@]} -gt 0 ]] && sanitize_rc=1
    note "sanitizer clean: ${clean[*]:-none}"
    note "sanitizer ERRORS: ${found[*]:-none}; test failures under it: ${failed[*]:-none}"
    note "sanitizer out of time: ${timed_out[*]:-none}; not run: ${not_run[*]:-none}"
    phase_end sanitize "$( [[ $sanitize_rc -eq 0 ]] && echo ok || echo FAILED ) (sanitizer.log)"
  fi
fi

echo
note "$(printf '%-10s %-40s %5d s' total "" $((SECONDS - t_start)))"
note "results in $out"
if [[ $gpus -eq 0 ]]; then
  if [[ $build_rc -ne 0 ]]; then
    note "gpu-check: NO GPU present, and the build FAILED for: ${unbuilt[*]} (build.log)"
    exit 1
  fi
  note "gpu-check: NO GPU present: everything was built (${built[*]}), nothing ran on a GPU (the GPU tests report skipped)"
  exit 77
fi
[[ $build_rc -eq 0 && $ctest_rc -eq 0 && $bench_rc -eq 0 && $sanitize_rc -eq 0 ]] && exit 0
exit 1
