// A kernel launched with the triple-chevron syntax, as in the backend's sources: translate.cmake
// rewrites this file for the host model like them, and test_model.cpp checks what its launches do,
// the checks of pointer arguments included.
#include <cuda_runtime.h>

namespace launch_check {

__global__ void scale(float* out, const float* in, float factor, int n) {
  const int i = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (i < n) out[i] = (in != nullptr ? in[i] : 1.0f) * factor;
}

/// out[i] = in[i] * factor (in null: factor), for i < n; at least one block, even for n = 0.
void scale_launch(float* out, const float* in, float factor, int n, cudaStream_t stream) {
  scale<<<n / 32 + 1, 32, 0, stream>>>(out, in, factor,
                                       n);
}

}  // namespace launch_check
