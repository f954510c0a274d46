// The host model's cuFFT (see cuda_runtime.h): one-dimensional batched real transforms (R2C, C2R,
// D2Z, Z2D) in the basic data layout, computed on the host in the call as direct DFTs summed in
// double (exact twiddles from a table of the n-th roots of unity), unnormalised as cuFFT's. As
// cuFFT documents, an out-of-place C2R transform overwrites its input: the model fills it with
// NaN, so code that reads the spectrum after the inverse transform shows it. cufftPlanMany takes
// rank 1 with null embeddings; anything else is CUFFT_NOT_SUPPORTED (the backend asks for nothing
// else). A plan executed as another transform type is CUFFT_INVALID_TYPE; data outside device
// memory, or not aligned to its complex type, stops the program with a message.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <mutex>
#include <numbers>
#include <vector>

#include "cuda_runtime.h"
#include "host_model.hpp"

enum cufftResult {
  CUFFT_SUCCESS = 0,
  CUFFT_INVALID_PLAN = 1,
  CUFFT_ALLOC_FAILED = 2,
  CUFFT_INVALID_TYPE = 3,
  CUFFT_INVALID_VALUE = 4,
  CUFFT_INTERNAL_ERROR = 5,
  CUFFT_EXEC_FAILED = 6,
  CUFFT_SETUP_FAILED = 7,
  CUFFT_INVALID_SIZE = 8,
  CUFFT_NOT_SUPPORTED = 16,
};
enum cufftType { CUFFT_R2C = 0x2a, CUFFT_C2R = 0x2c, CUFFT_C2C = 0x29, CUFFT_D2Z = 0x6a, CUFFT_Z2D = 0x6c, CUFFT_Z2Z = 0x69 };
using cufftHandle = int;
using cufftReal = float;
using cufftDoubleReal = double;
using cufftComplex = float2;
using cufftDoubleComplex = double2;

namespace host_model::fft {

struct Plan {
  int n = 0, batch = 0;
  cufftType type = CUFFT_R2C;
  cudaStream_t stream = nullptr;
};

class Plans {
 public:
  static Plans& instance() {
    static Plans* p = new Plans;
    return *p;
  }
  cufftResult make(cufftHandle* h, int n, cufftType type, int batch) {
    std::lock_guard<std::mutex> lock(mutex_);
    *h = next_++;
    plans_[*h] = Plan{n, batch, type, nullptr};
    return CUFFT_SUCCESS;
  }
  cufftResult destroy(cufftHandle h) {
    std::lock_guard<std::mutex> lock(mutex_);
    return plans_.erase(h) == 1 ? CUFFT_SUCCESS : CUFFT_INVALID_PLAN;
  }
  cufftResult set_stream(cufftHandle h, cudaStream_t s) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = plans_.find(h);
    if (it == plans_.end()) return CUFFT_INVALID_PLAN;
    it->second.stream = s;
    return CUFFT_SUCCESS;
  }
  /// The plan h, when it is one of `type`.
  cufftResult get(cufftHandle h, cufftType type, Plan& out) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = plans_.find(h);
    if (it == plans_.end()) return CUFFT_INVALID_PLAN;
    if (it->second.type != type) return CUFFT_INVALID_TYPE;
    out = it->second;
    return CUFFT_SUCCESS;
  }

 private:
  std::mutex mutex_;
  std::map<cufftHandle, Plan> plans_;
  cufftHandle next_ = 1;
};

inline void check_data(const char* what, const void* p, std::size_t bytes, std::size_t align) {
  if (!Runtime::instance().on_device(p, bytes)) {
    std::fprintf(stderr, "host model: cuFFT %s (%zu bytes) is not inside a device block\n", what, bytes);
    fail("cuFFT read or wrote outside device memory");
  }
  if (reinterpret_cast<std::uintptr_t>(p) % align != 0) {
    std::fprintf(stderr, "host model: cuFFT %s is not aligned to %zu bytes\n", what, align);
    fail("cuFFT data not aligned to its complex type");
  }
}

/// cos and sin of 2 pi j / n, j < n.
inline void roots(int n, std::vector<double>& c, std::vector<double>& s) {
  c.resize(n);
  s.resize(n);
  for (int j = 0; j < n; ++j) {
    const double a = 2 * std::numbers::pi * j / n;
    c[j] = std::cos(a);
    s[j] = std::sin(a);
  }
}

/// What an execution needs: the plan of type `type`, its sizes (n reals, f = n / 2 + 1 complex
/// values a row) and the roots of unity; the real and complex data are checked.
struct Exec {
  Plan p;
  int n = 0, f = 0;
  std::vector<double> c, s;
  template <class R, class C>
  cufftResult begin(cufftHandle h, cufftType type, const R* real, const C* complex) {
    if (const cufftResult r = Plans::instance().get(h, type, p); r != CUFFT_SUCCESS) return r;
    if (Runtime::instance().check_stream(p.stream) != cudaSuccess) return CUFFT_EXEC_FAILED;
    n = p.n;
    f = n / 2 + 1;
    check_data("real data", real, sizeof(R) * n * p.batch, alignof(C));
    check_data("complex data", complex, sizeof(C) * f * p.batch, alignof(C));
    roots(n, c, s);
    return CUFFT_SUCCESS;
  }
};

/// y[b, f] = sum_j x[b, j] e^{-2 pi i f j / n}, f <= n / 2.
template <class R, class C>
cufftResult r2c(cufftHandle h, cufftType type, const R* x, C* y) {
  Exec e;
  if (const cufftResult r = e.begin(h, type, x, y); r != CUFFT_SUCCESS) return r;
  std::vector<C> out(static_cast<std::size_t>(e.f) * e.p.batch);
  for (int b = 0; b < e.p.batch; ++b)
    for (int q = 0; q < e.f; ++q) {
      double re = 0, im = 0;
      for (int j = 0; j < e.n; ++j) {
        const int t = static_cast<int>((static_cast<long long>(q) * j) % e.n);
        const double v = x[static_cast<long long>(b) * e.n + j];
        re += v * e.c[t];
        im -= v * e.s[t];
      }
      out[static_cast<std::size_t>(b) * e.f + q] = C{static_cast<R>(re), static_cast<R>(im)};
    }
  std::copy(out.begin(), out.end(), y);
  return CUFFT_SUCCESS;
}

/// x[b, j] = sum over the Hermitian spectrum of z[b] of z e^{+2 pi i f j / n}; the imaginary
/// parts of the zero and (even n) Nyquist terms are ignored. z is overwritten (NaN).
template <class C, class R>
cufftResult c2r(cufftHandle h, cufftType type, C* z, R* x) {
  Exec e;
  if (const cufftResult r = e.begin(h, type, x, z); r != CUFFT_SUCCESS) return r;
  std::vector<R> out(static_cast<std::size_t>(e.n) * e.p.batch);
  for (int b = 0; b < e.p.batch; ++b)
    for (int j = 0; j < e.n; ++j) {
      double v = 0;
      for (int q = 0; q < e.f; ++q) {
        const C zq = z[static_cast<long long>(b) * e.f + q];
        const int t = static_cast<int>((static_cast<long long>(q) * j) % e.n);
        const bool edge = q == 0 || (e.n % 2 == 0 && q == e.n / 2);
        const double term = static_cast<double>(zq.x) * e.c[t] - (edge ? 0.0 : static_cast<double>(zq.y) * e.s[t]);
        v += edge ? term : 2 * term;
      }
      out[static_cast<std::size_t>(b) * e.n + j] = static_cast<R>(v);
    }
  const R nan = std::numeric_limits<R>::quiet_NaN();
  std::fill(z, z + static_cast<long long>(e.f) * e.p.batch, C{nan, nan});
  std::copy(out.begin(), out.end(), x);
  return CUFFT_SUCCESS;
}

}  // namespace host_model::fft

inline cufftResult cufftPlanMany(cufftHandle* plan, int rank, int* n, int* inembed, int, int, int* onembed, int, int,
                                 cufftType type, int batch) {
  if (plan == nullptr || n == nullptr) return CUFFT_INVALID_VALUE;
  if (rank != 1 || inembed != nullptr || onembed != nullptr) return CUFFT_NOT_SUPPORTED;
  if (type != CUFFT_R2C && type != CUFFT_C2R && type != CUFFT_D2Z && type != CUFFT_Z2D) return CUFFT_NOT_SUPPORTED;
  if (n[0] < 1 || batch < 1) return CUFFT_INVALID_SIZE;
  return host_model::fft::Plans::instance().make(plan, n[0], type, batch);
}
inline cufftResult cufftSetStream(cufftHandle plan, cudaStream_t s) {
  return host_model::fft::Plans::instance().set_stream(plan, s);
}
inline cufftResult cufftDestroy(cufftHandle plan) { return host_model::fft::Plans::instance().destroy(plan); }
inline cufftResult cufftExecR2C(cufftHandle plan, cufftReal* x, cufftComplex* y) {
  return host_model::fft::r2c(plan, CUFFT_R2C, x, y);
}
inline cufftResult cufftExecD2Z(cufftHandle plan, cufftDoubleReal* x, cufftDoubleComplex* y) {
  return host_model::fft::r2c(plan, CUFFT_D2Z, x, y);
}
inline cufftResult cufftExecC2R(cufftHandle plan, cufftComplex* z, cufftReal* x) {
  return host_model::fft::c2r(plan, CUFFT_C2R, z, x);
}
inline cufftResult cufftExecZ2D(cufftHandle plan, cufftDoubleComplex* z, cufftDoubleReal* x) {
  return host_model::fft::c2r(plan, CUFFT_Z2D, z, x);
}
