// Build-only check: the whole library first, then the CUDA backend. The backend's kernels must
// not pick up the library's own ops (mixmoe::exp, mixmoe::sqrt, ...) for the math functions they
// call, whatever the order of the includes.
#include <mixmoe/mixmoe.hpp>

#include <mixmoe/backend/cuda/cuda.cuh>

namespace {
[[maybe_unused]] mixmoe::Var<float, mixmoe::Cuda> check(const mixmoe::Var<float, mixmoe::Cuda>& x) {
  return mixmoe::softmax(mixmoe::rms_norm(x, mixmoe::Var<float, mixmoe::Cuda>(), 1e-6), -1);
}
}  // namespace
