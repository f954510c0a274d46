// The first ops of the CPU backend on the GPU, forward and backward, on device tensors:
// the same definitions as ops/elementwise.hpp, ops/softmax.hpp, ops/norm.hpp and ops/unary.hpp.
//
//   add / mul (a (..., C), b (..., C) or b (C))     forward; backward: the upstream gradient
//                                                   summed down to b's shape (sum_rows) and multiplied
//   softmax_last (x (R, C))                          y = exp(x - max) / sum;  dx = y (g - sum(g y))
//   rms_norm (x (R, C), w (C), eps)                  y = x rstd w, rstd = 1/sqrt(mean(x^2) + eps);
//                                                   dx = rstd (dy - xhat mean(dy xhat)), dy = g w, dw = sum_R g xhat
//   silu (x)                                         y = x sigmoid(x); dx = g s (1 + x (1 - s))
//
// Row statistics (max, sums, mean squares) are accumulated in double inside a block, as the CPU
// computes them; the parameter gradient of rms_norm is a column sum in double. They are not yet
// wired into Var (the autograd graph): that is the next step of the backend (docs/cuda.md).
#pragma once

#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"

namespace mixmoe::cuda {

namespace kernels {

inline constexpr int kRowThreads = 256;

/// Sum of v over the block (kRowThreads threads); every thread gets the result.
__device__ inline double block_sum(double v) {
  __shared__ double partial[kRowThreads / 32];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  double s = 0;
  for (int w = 0; w < kRowThreads / 32; ++w) s += partial[w];
  return s;
}

__device__ inline double block_max(double v) {
  __shared__ double partial[kRowThreads / 32];
  for (int o = 16; o > 0; o /= 2) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  double m = partial[0];
  for (int w = 1; w < kRowThreads / 32; ++w) m = fmax(m, partial[w]);
  return m;
}

template <class T, bool Mul>
__global__ void binary_rows(const T* a, const T* b, T* out, index_t n, index_t b_period) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const T bv = b[b_period == n ? i : i % b_period];
    out[i] = Mul ? a[i] * bv : a[i] + bv;
  }
}

/// out (C) (+)= sum over rows of x (R, C) [times y (R, C) when y is given], in double.
template <class T>
__global__ void column_sums(const T* x, const T* y, T* out, index_t rows, index_t c, bool accumulate) {
  for (index_t j = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; j < c;
       j += static_cast<index_t>(gridDim.x) * blockDim.x) {
    double s = 0;
    for (index_t r = 0; r < rows; ++r)
      s += y ? static_cast<double>(x[r * c + j]) * static_cast<double>(y[r * c + j]) : static_cast<double>(x[r * c + j]);
    out[j] = accumulate ? static_cast<T>(static_cast<double>(out[j]) + s) : static_cast<T>(s);
  }
}

/// dst (+)= src, n elements.
template <class T>
__global__ void add_into(T* dst, const T* src, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    dst[i] += src[i];
}

template <class T>
__global__ void softmax_rows(const T* x, T* y, index_t c) {
  const T* xr = x + blockIdx.x * c;
  T* yr = y + blockIdx.x * c;
  double m = -INFINITY;
  for (index_t j = threadIdx.x; j < c; j += blockDim.x) m = fmax(m, static_cast<double>(xr[j]));
  m = block_max(m);
  double s = 0;
  for (index_t j = threadIdx.x; j < c; j += blockDim.x) s += ::exp(static_cast<double>(xr[j]) - m);
  s = block_sum(s);
  for (index_t j = threadIdx.x; j < c; j += blockDim.x) yr[j] = static_cast<T>(::exp(static_cast<double>(xr[j]) - m) / s);
}

template <class T>
__global__ void softmax_backward_rows(const T* g, const T* y, T* dx, index_t c) {
  const index_t o = blockIdx.x * c;
  double d = 0;
  for (index_t j = threadIdx.x; j < c; j += blockDim.x) d += static_cast<double>(g[o + j]) * static_cast<double>(y[o + j]);
  d = block_sum(d);
  for (index_t j = threadIdx.x; j < c; j += blockDim.x)
    dx[o + j] = static_cast<T>(static_cast<double>(y[o + j]) * (static_cast<double>(g[o + j]) - d));
}

template <class T>
__global__ void rms_norm_rows(const T* x, const T* w, T* y, double* rstd, index_t c, double eps) {
  const index_t o = blockIdx.x * c;
  double ss = 0;
  for (index_t j = threadIdx.x; j < c; j += blockDim.x) ss += static_cast<double>(x[o + j]) * static_cast<double>(x[o + j]);
  ss = block_sum(ss);
  const double rs = 1.0 / ::sqrt(ss / static_cast<double>(c) + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = rs;
  for (index_t j = threadIdx.x; j < c; j += blockDim.x) {
    const double v = static_cast<double>(x[o + j]) * rs;
    y[o + j] = static_cast<T>(w ? v * static_cast<double>(w[j]) : v);
  }
}

/// dx of rms_norm, and xhat (R, C) for the weight's column sums when xhat is not null.
template <class T>
__global__ void rms_norm_backward_rows(const T* g, const T* x, const T* w, const double* rstd, T* dx, T* xhat,
                                       index_t c) {
  const index_t o = blockIdx.x * c;
  const double rs = rstd[blockIdx.x];
  double dot = 0;
  for (index_t j = threadIdx.x; j < c; j += blockDim.x) {
    const double dy = static_cast<double>(g[o + j]) * (w ? static_cast<double>(w[j]) : 1.0);
    dot += dy * static_cast<double>(x[o + j]) * rs;
  }
  dot = block_sum(dot) / static_cast<double>(c);
  for (index_t j = threadIdx.x; j < c; j += blockDim.x) {
    const double xh = static_cast<double>(x[o + j]) * rs;
    const double dy = static_cast<double>(g[o + j]) * (w ? static_cast<double>(w[j]) : 1.0);
    dx[o + j] = static_cast<T>(rs * (dy - xh * dot));
    if (xhat) xhat[o + j] = static_cast<T>(xh);
  }
}

template <class T>
__global__ void silu_fwd(const T* x, T* y, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const double v = static_cast<double>(x[i]);
    y[i] = static_cast<T>(v / (1.0 + ::exp(-v)));
  }
}

template <class T>
__global__ void silu_bwd(const T* g, const T* x, T* dx, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const double v = static_cast<double>(x[i]), s = 1.0 / (1.0 + ::exp(-v));
    dx[i] = static_cast<T>(static_cast<double>(g[i]) * s * (1.0 + v * (1.0 - s)));
  }
}

}  // namespace kernels

namespace detail {

/// Checks that b is a's shape or a's last axes (a bias row) and returns b's element count.
template <class T>
index_t trailing_period(const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, const char* op) {
  const int lead = a.dim() - b.dim();
  bool ok = lead >= 0;
  for (int i = 0; ok && i < b.dim(); ++i) ok = b.size(i) == a.size(lead + i);
  MIXMOE_CHECK(ok, op, "b ", b.shape(), " must be a's shape ", a.shape(), " or its last axes (other broadcasts are not on the GPU yet)");
  return b.numel();
}

template <class T, bool Mul>
Tensor<T, Cuda> binary(const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, const char* op) {
  const index_t period = trailing_period(a, b, op);
  const Tensor<T, Cuda> ca = a.contiguous(), cb = b.contiguous();
  auto out = Tensor<T, Cuda>::empty(a.shape());
  if (out.numel() == 0) return out;
  kernels::binary_rows<T, Mul><<<blocks_for(out.numel()), 256, 0, current_stream()>>>(ca.data(), cb.data(), out.data(),
                                                                                         out.numel(), period);
  MIXMOE_CUDA_CHECK_LAUNCH(op);
  return out;
}

}  // namespace detail

/// a + b, b of a's shape or a's trailing shape.
template <Scalar T>
Tensor<T, Cuda> add(const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b) {
  return detail::binary<T, false>(a, b, "cuda::add");
}
/// a * b, b of a's shape or a's trailing shape.
template <Scalar T>
Tensor<T, Cuda> mul(const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b) {
  return detail::binary<T, true>(a, b, "cuda::mul");
}

/// sum over the leading rows of x (..., C) [times y], down to (C): the backward of a broadcast b.
template <Scalar T>
Tensor<T, Cuda> sum_rows(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& y = {}) {
  MIXMOE_CHECK(x.dim() >= 1, "cuda::sum_rows", "needs a last axis, got ", x.shape());
  if (y.defined()) MIXMOE_CHECK(y.shape() == x.shape(), "cuda::sum_rows", "shapes ", x.shape(), " and ", y.shape());
  const index_t c = x.size(-1), rows = c ? x.numel() / c : 0;
  const Tensor<T, Cuda> cx = x.contiguous();
  const Tensor<T, Cuda> cy = y.defined() ? y.contiguous() : Tensor<T, Cuda>();
  auto out = Tensor<T, Cuda>::empty({c});
  if (c == 0) return out;
  kernels::column_sums<<<blocks_for(c), 256, 0, current_stream()>>>(cx.data(), cy.defined() ? cy.data() : nullptr,
                                                                     out.data(), rows, c, false);
  MIXMOE_CUDA_CHECK_LAUNCH("column_sums");
  return out;
}

namespace detail {
template <class T>
index_t rows_of(const Tensor<T, Cuda>& x, const char* op) {
  MIXMOE_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, "needs a non-empty last axis, got ", x.shape());
  const index_t rows = x.numel() / x.size(-1);
  MIXMOE_CHECK(rows <= 0x7fffffff, op, rows, " rows exceed the grid");
  return rows;
}
}  // namespace detail

/// Softmax over the last axis.
template <Scalar T>
Tensor<T, Cuda> softmax_last(const Tensor<T, Cuda>& x) {
  const index_t rows = detail::rows_of(x, "cuda::softmax_last"), c = x.size(-1);
  const Tensor<T, Cuda> cx = x.contiguous();
  auto y = Tensor<T, Cuda>::empty(x.shape());
  if (rows == 0) return y;
  kernels::softmax_rows<<<static_cast<unsigned>(rows), kernels::kRowThreads, 0, current_stream()>>>(cx.data(), y.data(), c);
  MIXMOE_CUDA_CHECK_LAUNCH("softmax_rows");
  return y;
}

/// dL/dx of softmax_last from its output y and dL/dy.
template <Scalar T>
Tensor<T, Cuda> softmax_last_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& y) {
  MIXMOE_CHECK(g.shape() == y.shape(), "cuda::softmax_last_backward", "shapes ", g.shape(), " and ", y.shape());
  const index_t rows = detail::rows_of(y, "cuda::softmax_last_backward"), c = y.size(-1);
  const Tensor<T, Cuda> cg = g.contiguous(), cy = y.contiguous();
  auto dx = Tensor<T, Cuda>::empty(y.shape());
  if (rows == 0) return dx;
  kernels::softmax_backward_rows<<<static_cast<unsigned>(rows), kernels::kRowThreads, 0, current_stream()>>>(
      cg.data(), cy.data(), dx.data(), c);
  MIXMOE_CUDA_CHECK_LAUNCH("softmax_backward_rows");
  return dx;
}

/// RMSNorm forward: y and the per-row rstd (R, double) the backward needs. w may be undefined (1).
template <Scalar T>
std::pair<Tensor<T, Cuda>, Tensor<double, Cuda>> rms_norm(const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w,
                                                         double eps = 1e-6) {
  const index_t rows = detail::rows_of(x, "cuda::rms_norm"), c = x.size(-1);
  if (w.defined())
    MIXMOE_CHECK(w.dim() == 1 && w.size(0) == c, "cuda::rms_norm", "weight ", w.shape(), " for x ", x.shape());
  const Tensor<T, Cuda> cx = x.contiguous();
  auto y = Tensor<T, Cuda>::empty(x.shape());
  auto rstd = Tensor<double, Cuda>::empty({rows});
  if (rows == 0) return {y, rstd};
  kernels::rms_norm_rows<<<static_cast<unsigned>(rows), kernels::kRowThreads, 0, current_stream()>>>(
      cx.data(), w.defined() ? w.data() : nullptr, y.data(), rstd.data(), c, eps);
  MIXMOE_CUDA_CHECK_LAUNCH("rms_norm_rows");
  return {y, rstd};
}

/// RMSNorm backward: (dx, dw); dw is undefined when w is.
template <Scalar T>
std::pair<Tensor<T, Cuda>, Tensor<T, Cuda>> rms_norm_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& x,
                                                              const Tensor<T, Cuda>& w,
                                                              const Tensor<double, Cuda>& rstd) {
  const index_t rows = detail::rows_of(x, "cuda::rms_norm_backward"), c = x.size(-1);
  MIXMOE_CHECK(g.shape() == x.shape(), "cuda::rms_norm_backward", "shapes ", g.shape(), " and ", x.shape());
  const Tensor<T, Cuda> cg = g.contiguous(), cx = x.contiguous();
  auto dx = Tensor<T, Cuda>::empty(x.shape());
  Tensor<T, Cuda> xhat = w.defined() ? Tensor<T, Cuda>::empty(x.shape()) : Tensor<T, Cuda>();
  if (rows == 0) return {dx, w.defined() ? Tensor<T, Cuda>::zeros({c}) : Tensor<T, Cuda>()};
  kernels::rms_norm_backward_rows<<<static_cast<unsigned>(rows), kernels::kRowThreads, 0, current_stream()>>>(
      cg.data(), cx.data(), w.defined() ? w.data() : nullptr, rstd.data(), dx.data(),
      xhat.defined() ? xhat.data() : nullptr, c);
  MIXMOE_CUDA_CHECK_LAUNCH("rms_norm_backward_rows");
  if (!w.defined()) return {dx, Tensor<T, Cuda>()};
  return {dx, sum_rows(cg, xhat)};
}

/// SiLU, x sigmoid(x).
template <Scalar T>
Tensor<T, Cuda> silu(const Tensor<T, Cuda>& x) {
  const Tensor<T, Cuda> cx = x.contiguous();
  auto y = Tensor<T, Cuda>::empty(x.shape());
  if (y.numel() == 0) return y;
  kernels::silu_fwd<<<blocks_for(y.numel()), 256, 0, current_stream()>>>(cx.data(), y.data(), y.numel());
  MIXMOE_CUDA_CHECK_LAUNCH("silu_fwd");
  return y;
}

/// dL/dx of silu.
template <Scalar T>
Tensor<T, Cuda> silu_backward(const Tensor<T, Cuda>& g, const Tensor<T, Cuda>& x) {
  MIXMOE_CHECK(g.shape() == x.shape(), "cuda::silu_backward", "shapes ", g.shape(), " and ", x.shape());
  const Tensor<T, Cuda> cg = g.contiguous(), cx = x.contiguous();
  auto dx = Tensor<T, Cuda>::empty(x.shape());
  if (dx.numel() == 0) return dx;
  kernels::silu_bwd<<<blocks_for(dx.numel()), 256, 0, current_stream()>>>(cg.data(), cx.data(), dx.data(), dx.numel());
  MIXMOE_CUDA_CHECK_LAUNCH("silu_bwd");
  return dx;
}

}  // namespace mixmoe::cuda
