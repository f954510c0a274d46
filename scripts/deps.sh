# The Debian 12 packages mixmoe needs, by purpose, and the function that installs
# the missing ones. Sourced by scripts/demo.sh and scripts/test.sh; this is the
# only list: add a package here, under the purpose that needs it.
#
# Not listed: git (it fetched the sources already) and pkg-config (the CMake
# files find every dependency without it).

# The library: compiler, build tool, and the libraries the headers use.
MIXMOE_DEPS_BUILD=(
  g++             # C++20; also brings the ASan/UBSan runtimes of the asan preset
  make            # CMake's default generator
  cmake           # 3.25 in Debian 12; CMakePresets.json needs 3.21 or newer
  libeigen3-dev   # Eigen 3.4
  libfftw3-dev    # FFTW 3, float and double
  libopenblas-dev # CBLAS GEMM (MIXMOE_USE_BLAS=ON, the default)
  libsentencepiece-dev # the tokenizer (data/tokenizer.hpp) and its trainer
  nlohmann-json3-dev   # JSON: safetensors headers, configs, corpus manifests
)

# The examples (examples/), demo included.
MIXMOE_DEPS_EXAMPLES=(
  libcli11-dev # command-line options of the example programs
)

# The tests (tests/).
MIXMOE_DEPS_TESTS=(
  catch2  # Catch2 v2, <catch2/catch.hpp>
  gettext # msgfmt: the .mo reader's tests compile their own catalogs
)

# The benchmarks (benchmarks/): none beyond the library's yet (they time
# themselves). The release build compiles them, so the tests install these too.
MIXMOE_DEPS_BENCHMARKS=()

# mixmoe_ensure_packages PKG...: installs those of the packages that are missing;
# runs `apt-get update` only then. Installing needs root.
mixmoe_ensure_packages() {
  local missing=() pkg
  for pkg in "$@"; do
    if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true) != "install ok installed" ]]; then
      missing+=("$pkg")
    fi
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    echo "packages: the $# Debian packages needed are installed"
    return 0
  fi
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: missing Debian packages: ${missing[*]}" >&2
    echo "error: run this script as root, or install them first with:" >&2
    echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    return 1
  fi
  echo "packages: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}
