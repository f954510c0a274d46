#!/usr/bin/env bash
# Packs the Debian 12 packages the build needs beyond a compiler, CMake and CUDA into one folder,
# for a GPU machine that has CUDA but no network and no package manager access:
#
#   bash scripts/gpu-bundle.sh [DIR]        (default DIR: .gpu-deps; needs apt-get, not root)
#   ...copy DIR next to the sources on the GPU machine, then:
#   bash scripts/gpu-check.sh --deps DIR
#
# DIR/root/usr holds the unpacked packages (Eigen, FFTW, SentencePiece and its protobuf-lite,
# nlohmann-json, Catch2); gpu-check.sh puts it on CMAKE_PREFIX_PATH and the library path. OpenBLAS
# is left out (the GPU build uses Eigen's GEMM for the CPU side: MIXMOE_USE_BLAS=OFF), which keeps
# the folder small (about 20 MB). The packages are downloaded, never installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=${1:-.gpu-deps}

packages=(
  libeigen3-dev
  libfftw3-dev libfftw3-single3 libfftw3-double3
  libsentencepiece-dev libsentencepiece0 libprotobuf-lite32
  nlohmann-json3-dev
  catch2
)

rm -rf "$dir"
mkdir -p "$dir/debs" "$dir/root"
dir=$(cd "$dir" && pwd)
# A private package list, so that neither root nor the system's lists are needed.
state=$(mktemp -d)
trap 'rm -rf "$state"' EXIT
mkdir -p "$state/lists/partial" "$state/archives/partial"
apt_opts=(-o "Dir::State::Lists=$state/lists" -o "Dir::Cache::Archives=$state/archives" -o Debug::NoLocking=1)
echo "gpu-bundle: apt-get update (private lists)"
apt-get "${apt_opts[@]}" update -qq
(cd "$dir/debs" && apt-get "${apt_opts[@]}" download "${packages[@]}")
for deb in "$dir"/debs/*.deb; do dpkg-deb -x "$deb" "$dir/root"; done
rm -rf "$dir/debs"
# What a build does not read: static archives, documentation, FFTW's long-double and quad forms.
find "$dir/root" \( -name '*.a' -o -name 'libfftw3[lq]*' \) -delete
rm -rf "$dir/root/usr/share/doc" "$dir/root/usr/share/man"
echo "gpu-bundle: ${#packages[@]} packages unpacked into $dir/root ($(du -sh "$dir" | cut -f1))"
