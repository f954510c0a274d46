// Real FFT along the last axis on the GPU (cuFFT), for the Fourier features of the routers:
// the same transforms and the same backward as ops/fft.hpp (see its header for the adjoint):
//
//   rfft_rows(x (R, N)) -> y (R, F, 2)                  F = N/2 + 1, unnormalised, Y_k = sum x_n e^{-2 pi i k n/N}
//   rfft_magnitude(x (R, N), eps) -> (m (R, F), spectrum (R, F, 2))    m = sqrt(re^2 + im^2 + eps)
//   rfft_magnitude_backward(g (R, F), spectrum, m, N) -> gx (R, N)
//
// Plans are made once per (precision, direction, N, R) and cached for the process; every plan
// runs on current_stream().
#pragma once

#include <cufft.h>

#include <map>
#include <mutex>
#include <tuple>

#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"

namespace mixmoe::cuda {

inline void check_cufft(cufftResult r, const char* call, const char* file, int line) {
  if (r == CUFFT_SUCCESS) return;
  std::ostringstream os;
  os << "[cuda] " << call << " failed at " << file << ":" << line << ": cufftResult " << static_cast<int>(r);
  throw Error(os.str());
}

}  // namespace mixmoe::cuda

#define MIXMOE_CUFFT_CHECK(call) ::mixmoe::cuda::check_cufft((call), #call, __FILE__, __LINE__)

namespace mixmoe::cuda {

enum class FftDirection { r2c, c2r };

/// The process-wide cache of batched 1-D cuFFT plans.
class FftPlanCache {
 public:
  static FftPlanCache& instance() {
    static FftPlanCache c;
    return c;
  }
  /// A plan of `rows` transforms of length n, bound to current_stream().
  template <class T>
  cufftHandle get(FftDirection dir, index_t n, index_t rows) {
    constexpr bool dbl = std::is_same_v<T, double>;
    const auto key = std::make_tuple(dbl, dir == FftDirection::r2c, n, rows);
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = plans_.find(key);
    if (it == plans_.end()) {
      cufftHandle h = 0;
      int len = static_cast<int>(n);
      const cufftType type = dir == FftDirection::r2c ? (dbl ? CUFFT_D2Z : CUFFT_R2C) : (dbl ? CUFFT_Z2D : CUFFT_C2R);
      MIXMOE_CUFFT_CHECK(cufftPlanMany(&h, 1, &len, nullptr, 1, 0, nullptr, 1, 0, type, static_cast<int>(rows)));
      it = plans_.emplace(key, h).first;
    }
    MIXMOE_CUFFT_CHECK(cufftSetStream(it->second, current_stream()));
    return it->second;
  }
  FftPlanCache(const FftPlanCache&) = delete;
  FftPlanCache& operator=(const FftPlanCache&) = delete;
  // Plans are left to the driver at exit, like the allocator's blocks (the context may be gone).
  ~FftPlanCache() = default;

 private:
  FftPlanCache() = default;
  std::mutex mutex_;
  std::map<std::tuple<bool, bool, index_t, index_t>, cufftHandle> plans_;
};

namespace kernels {

template <class T>
__global__ void magnitude(const T* spec, T* m, index_t n, T eps) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    m[i] = ::sqrt(spec[2 * i] * spec[2 * i] + spec[2 * i + 1] * spec[2 * i + 1] + eps);
}

/// z (R, F, 2) = the spectrum the c2r adjoint needs for upstream g (R, F) of the magnitude:
/// (g / m) (re, im), interior bins halved, DC and Nyquist imaginary parts zero.
template <class T>
__global__ void magnitude_adjoint_spectrum(const T* g, const T* spec, const T* m, T* z, index_t rows, index_t f,
                                           index_t n) {
  const index_t total = rows * f;
  const index_t last_interior = (n % 2 == 0) ? f - 2 : f - 1;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t k = i % f;
    const T w = m[i] > T(0) ? g[i] / m[i] : T(0);
    T re = w * spec[2 * i], im = w * spec[2 * i + 1];
    if (k >= 1 && k <= last_interior) {
      re *= T(0.5);
      im *= T(0.5);
    } else {
      im = T(0);
    }
    z[2 * i] = re;
    z[2 * i + 1] = im;
  }
}

}  // namespace kernels

/// y (R, F, 2) = rfft of each row of x (R, N); both contiguous device buffers.
template <Scalar T>
void rfft_rows(const T* x, T* y, index_t rows, index_t n) {
  if (rows == 0) return;
  const cufftHandle plan = FftPlanCache::instance().get<T>(FftDirection::r2c, n, rows);
  if constexpr (std::is_same_v<T, float>)
    MIXMOE_CUFFT_CHECK(cufftExecR2C(plan, const_cast<float*>(x), reinterpret_cast<cufftComplex*>(y)));
  else
    MIXMOE_CUFFT_CHECK(cufftExecD2Z(plan, const_cast<double*>(x), reinterpret_cast<cufftDoubleComplex*>(y)));
}

/// |rfft| of the rows of x (..., N): the magnitude (..., F) and the spectrum (R, F, 2) that the
/// backward needs.
template <Scalar T>
std::pair<Tensor<T, Cuda>, Tensor<T, Cuda>> rfft_magnitude(const Tensor<T, Cuda>& x, double eps = 0.0) {
  MIXMOE_CHECK(x.dim() >= 1 && x.size(-1) > 0, "cuda::rfft_magnitude", "needs a non-empty last axis, got ", x.shape());
  const index_t n = x.size(-1), f = n / 2 + 1, rows = x.numel() / n;
  const Tensor<T, Cuda> xc = x.contiguous();
  auto spec = Tensor<T, Cuda>::empty({rows, f, 2});
  auto mag = Tensor<T, Cuda>::empty(x.shape().with(-1, f));
  rfft_rows(xc.data(), spec.data(), rows, n);
  if (rows > 0) {
    kernels::magnitude<<<blocks_for(rows * f), 256, 0, current_stream()>>>(spec.data(), mag.data(), rows * f,
                                                                            static_cast<T>(eps));
    MIXMOE_CUDA_CHECK_LAUNCH("magnitude");
  }
  return {mag, spec};
}

/// dL/dx (shape xshape, last axis N) from dL/dm (..., F), with the forward's spectrum and magnitude.
template <Scalar T>
Tensor<T, Cuda> rfft_magnitude_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& spec,
                                        const Tensor<T, Cuda>& mag, const Shape& xshape) {
  const index_t n = xshape[xshape.rank() - 1], f = n / 2 + 1, rows = xshape.numel() / n;
  auto z = Tensor<T, Cuda>::empty({rows, f, 2});
  auto gx = Tensor<T, Cuda>::empty(xshape);
  if (rows == 0) return gx;
  const Tensor<T, Cuda> gc = g.contiguous();
  kernels::magnitude_adjoint_spectrum<<<blocks_for(rows * f), 256, 0, current_stream()>>>(
      gc.data(), spec.data(), mag.data(), z.data(), rows, f, n);
  MIXMOE_CUDA_CHECK_LAUNCH("magnitude_adjoint_spectrum");
  const cufftHandle plan = FftPlanCache::instance().get<T>(FftDirection::c2r, n, rows);
  if constexpr (std::is_same_v<T, float>)
    MIXMOE_CUFFT_CHECK(cufftExecC2R(plan, reinterpret_cast<cufftComplex*>(z.data()), gx.data()));
  else
    MIXMOE_CUFFT_CHECK(cufftExecZ2D(plan, reinterpret_cast<cufftDoubleComplex*>(z.data()), gx.data()));
  return gx;
}

}  // namespace mixmoe::cuda
