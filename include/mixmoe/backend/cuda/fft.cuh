// Real FFT along the last axis on the GPU (cuFFT), for the Fourier features of the routers:
// the same transforms and the same backward as ops/fft.hpp (see its header for the adjoint):
//
//   rfft_rows(x (R, N)) -> y (R, F, 2)                  F = N/2 + 1, unnormalised, Y_k = sum x_n e^{-2 pi i k n/N}
//   rfft_magnitude(x (R, N), eps) -> (m (R, F), spectrum (R, F, 2))    m = sqrt(re^2 + im^2 + eps)
//   rfft_magnitude_backward(g (R, F), spectrum, m, N) -> gx (R, N)
//
// Plans are made once per (stream, precision, direction, N, R) and cached (the 64 last used, and
// until their stream is retired: cuda::retire_stream, or the end of its thread);
// every transform runs on current_stream(). N = 1 needs no plan (a strided copy), and an input
// that is not aligned to its complex type (a view at an odd offset) is first copied.
#pragma once

#include <cufft.h>

#include <cstdint>
#include <limits>
#include <list>
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

/// The process-wide cache of batched 1-D cuFFT plans. A plan belongs to one stream (its work area
/// is used in that stream's order), and it is executed under the cache's lock, so host threads on
/// their own streams never share a plan nor rebind one's stream while another executes it.
class FftPlanCache {
 public:
  /// Plans kept; the least recently used beyond this is destroyed (after the device is idle).
  static constexpr std::size_t kMaxPlans = 64;

  static FftPlanCache& instance() {
    static FftPlanCache* c = new FftPlanCache;  // never destroyed: plans are left to the driver at exit
    return *c;
  }
  FftPlanCache(const FftPlanCache&) = delete;
  FftPlanCache& operator=(const FftPlanCache&) = delete;

  /// y (rows, n/2 + 1, 2) = the unnormalised r2c transforms of the rows of x (rows, n), n >= 2;
  /// y aligned to the complex type, x aligned to T.
  template <class T>
  void r2c(const T* x, T* y, index_t n, index_t rows) {
    const cudaStream_t s = current_stream();
    const unsigned long long sid = current_stream_id();
    std::lock_guard<std::mutex> lock(mutex_);
    const cufftHandle h = plan_locked<T>(FftDirection::r2c, n, rows, s, sid);
    if constexpr (std::is_same_v<T, float>)
      MIXMOE_CUFFT_CHECK(cufftExecR2C(h, const_cast<float*>(x), reinterpret_cast<cufftComplex*>(y)));
    else
      MIXMOE_CUFFT_CHECK(cufftExecD2Z(h, const_cast<double*>(x), reinterpret_cast<cufftDoubleComplex*>(y)));
  }

  /// x (rows, n) = the unnormalised c2r transforms of z (rows, n/2 + 1, 2), n >= 2; z is overwritten.
  template <class T>
  void c2r(T* z, T* x, index_t n, index_t rows) {
    const cudaStream_t s = current_stream();
    const unsigned long long sid = current_stream_id();
    std::lock_guard<std::mutex> lock(mutex_);
    const cufftHandle h = plan_locked<T>(FftDirection::c2r, n, rows, s, sid);
    if constexpr (std::is_same_v<T, float>)
      MIXMOE_CUFFT_CHECK(cufftExecC2R(h, reinterpret_cast<cufftComplex*>(z), x));
    else
      MIXMOE_CUFFT_CHECK(cufftExecZ2D(h, reinterpret_cast<cufftDoubleComplex*>(z), x));
  }

  /// Plans held now.
  [[nodiscard]] std::size_t size() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return plans_.size();
  }

 private:
  using Key = std::tuple<unsigned long long, bool, bool, index_t, index_t>;  // stream, double, r2c, n, rows
  struct Entry {
    cufftHandle handle;
    std::list<Key>::iterator used;  // its place in recent_
  };
  FftPlanCache() {
    detail::add_retire_hook([](unsigned long long id) noexcept { instance().retire(id); });
  }

  /// The stream `id`, synchronised, goes away: its plans are destroyed.
  void retire(unsigned long long id) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = plans_.begin(); it != plans_.end();) {
      if (std::get<0>(it->first) != id) {
        ++it;
        continue;
      }
      it = erase_locked(it);
    }
  }

  template <class T>
  cufftHandle plan_locked(FftDirection dir, index_t n, index_t rows, cudaStream_t s, unsigned long long sid) {
    constexpr bool dbl = std::is_same_v<T, double>;
    constexpr auto int_max = static_cast<index_t>(std::numeric_limits<int>::max());
    MIXMOE_CHECK(n >= 2 && n <= int_max && rows >= 1 && rows <= int_max, "cuda::fft",
                 "a cuFFT plan needs 2 <= N and 1 <= rows, both at most 2^31 - 1; got N = ", n, ", rows = ", rows);
    const Key key{sid, dbl, dir == FftDirection::r2c, n, rows};
    auto it = plans_.find(key);
    if (it != plans_.end()) {
      recent_.splice(recent_.begin(), recent_, it->second.used);  // most recently used first
    } else {
      if (plans_.size() >= kMaxPlans) evict_locked();
      cufftHandle h = 0;
      int len = static_cast<int>(n);
      const cufftType type = dir == FftDirection::r2c ? (dbl ? CUFFT_D2Z : CUFFT_R2C) : (dbl ? CUFFT_Z2D : CUFFT_C2R);
      MIXMOE_CUFFT_CHECK(cufftPlanMany(&h, 1, &len, nullptr, 1, 0, nullptr, 1, 0, type, static_cast<int>(rows)));
      try {
        recent_.push_front(key);
        it = plans_.emplace(key, Entry{h, recent_.begin()}).first;
      } catch (...) {
        if (!recent_.empty() && recent_.front() == key) recent_.pop_front();
        (void)cufftDestroy(h);
        throw;
      }
    }
    MIXMOE_CUFFT_CHECK(cufftSetStream(it->second.handle, s));
    return it->second.handle;
  }

  /// Destroys the least recently used plan. Its work area may still be read by a transform queued
  /// on any stream, so the device must be idle first: a rare wait (only past kMaxPlans shapes).
  void evict_locked() {
    MIXMOE_CUDA_CHECK(cudaDeviceSynchronize());
    erase_locked(plans_.find(recent_.back()));
  }

  /// Destroys a plan no transform still uses and forgets it; returns the next entry.
  std::map<Key, Entry>::iterator erase_locked(std::map<Key, Entry>::iterator it) noexcept {
    (void)cufftDestroy(it->second.handle);
    recent_.erase(it->second.used);
    return plans_.erase(it);
  }

  mutable std::mutex mutex_;
  std::map<Key, Entry> plans_;
  std::list<Key> recent_;  // most recently used first
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

/// y (R, F, 2) = rfft of each row of x (R, N); both contiguous device buffers, y freshly allocated
/// (aligned to the complex type; x may be any view's start).
template <Scalar T>
void rfft_rows(const T* x, T* y, index_t rows, index_t n) {
  if (rows == 0 || n == 0) return;
  if (n == 1) {  // Y_0 = (x_0, 0): a strided copy, without a length-1 cuFFT plan
    ::mixmoe::detail::DeviceBackend<Cuda>::fill(y, 2 * rows, T(0));
    ::mixmoe::detail::DeviceBackend<Cuda>::copy(x, Shape{1}, y, Shape{2}, Shape{rows});
    return;
  }
  constexpr std::uintptr_t complex_align = 2 * sizeof(T);
  MIXMOE_CHECK(reinterpret_cast<std::uintptr_t>(y) % complex_align == 0, "cuda::rfft_rows",
               "the output must be aligned to ", complex_align, " bytes");
  if (reinterpret_cast<std::uintptr_t>(x) % complex_align != 0) {
    // cuFFT reads real input as pairs: copy a view at an odd offset into an aligned block.
    auto aligned = Tensor<T, Cuda>::empty({rows, n});
    MIXMOE_CUDA_CHECK(cudaMemcpyAsync(aligned.data(), x, static_cast<std::size_t>(rows * n) * sizeof(T),
                                      cudaMemcpyDeviceToDevice, current_stream()));
    FftPlanCache::instance().r2c(aligned.data(), y, n, rows);  // the block is reused only after, in stream order
    return;
  }
  FftPlanCache::instance().r2c(x, y, n, rows);
}

/// x (R, N) = the unnormalised c2r of z (R, F, 2), z overwritten; both freshly allocated.
template <Scalar T>
void c2r_rows(T* z, T* x, index_t rows, index_t n) {
  if (rows == 0 || n == 0) return;
  if (n == 1) {  // x_0 = Re Z_0
    ::mixmoe::detail::DeviceBackend<Cuda>::copy(static_cast<const T*>(z), Shape{2}, x, Shape{1}, Shape{rows});
    return;
  }
  FftPlanCache::instance().c2r(z, x, n, rows);
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
  c2r_rows(z.data(), gx.data(), rows, n);
  return gx;
}

}  // namespace mixmoe::cuda
