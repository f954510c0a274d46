// The rows part of DeviceOps<Cuda> (backend/cuda/cuda.cuh): the device side of ops/softmax.hpp,
// ops/norm.hpp, ops/cross_entropy.hpp, ops/reduce.hpp and ops/topk.hpp.
//
// An axis op views its contiguous input as (outer, n, inner) around the axis: a "line" is the n
// elements x[o, :, i], inner apart (contiguous for the last axis, inner = 1).
//
//   rows_softmax(x, y, outer, n, inner, log)        softmax or log_softmax along n, as the CPU:
//                                                   e = exp(x - max) in T (flushed below the smallest
//                                                   normal), s = sum e in double, y = e * T(1 / s) or
//                                                   (x - max) - T(log s)
//   rows_softmax_backward(g, y, gx, ...)            softmax: gx = y (g - T(sum g y)); log: gx = g - exp(y) T(sum g)
//   rows_norm(x, w, b, y, mean, rstd, R, C, eps, centre)
//                                                   layer_norm (centre) or rms_norm of R rows of C; mean and
//                                                   rstd (R, double) saved; y = T(xhat) [* w] [+ b] in T
//   rows_norm_backward(g, x, w, mean, rstd, gx, R, C)
//                                                   gx = rstd (dy - mean(dy) - xhat mean(dy xhat)), dy = g w
//   rows_norm_param_grads(g, x, mean, rstd, dw, db, R, C)
//                                                   dw = sum_R g xhat, db = sum_R g (either may be null)
//   rows_cross_entropy(x, t, stats, losses, out_rows, R, V, ignore, eps)
//                                                   per row: stats (max, log sum exp(x - max)) and the loss
//                                                   (0 for an ignored row, NaN for a target out of range)
//   rows_cross_entropy_reduce(losses, t, R, ignore, mean, out, count)
//                                                   out = sum (or mean over the rows not ignored) of the
//                                                   losses; count = rows not ignored (for the backward)
//   rows_cross_entropy_backward(x, t, stats, g, count, gx, R, V, ignore, eps, mode)
//                                                   gx = scale (softmax(x) - q), scale = g[r] (mode 0, none),
//                                                   g[0] (1, sum), g[0] / count (2, mean); read on the device
//   rows_sum_all(x, n, scale, out)                  out[0] = T(sum x in double) * scale
//   rows_fill_scaled(out, n, g, scale)              out[i] = g[0] * scale (the backward of rows_sum_all)
//   rows_reduce_axis(x, out, outer, n, inner, scale)
//                                                   out[o, i] = (sum_j x[o, j, i]) * scale, summed in T in
//                                                   the order j = 0, 1, ... as the CPU does
//   rows_expand_axis(g, out, outer, n, inner, scale)
//                                                   out[o, j, i] = scale * g[o, i]
//   rows_topk(x, values, indices, outer, n, inner, k)
//                                                   the k largest of each line, descending; NaN above every
//                                                   number, ties by the lower index (the CPU's order)
//   rows_topk_backward(g, indices, gx, outer, n, inner, k)
//                                                   gx[o, indices[o, j, i], i] += g[o, j, i] (gx zeroed)
//
// Launch shapes. Row kernels: one 256-thread block per row or line (ops.cuh's block_sum/block_max),
// a grid-stride loop over rows with at most kMaxRowBlocks blocks. Top-k: one thread per line with
// a k-pass selection when the line is short (n <= kTopkThreadMax), else one 256-thread block per
// line doing the same passes with a block-wide arg-best. Element kernels: grid-stride loops.
//
// Determinism: every output is written by one thread or one block; no atomics. The norms'
// parameter gradients are summed in double over a fixed split of the rows (chunks depend on R only),
// then the chunks in order; rows_sum_all likewise (parts depend on n only).
#pragma once

#include <algorithm>

#include "mixmoe/backend/cuda/ops.cuh"
#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"
#include "mixmoe/core/device_fn.hpp"

namespace mixmoe::cuda {

namespace rows_kernels {

using kernels::block_max;
using kernels::block_sum;
using kernels::kRowThreads;

/// Most blocks of a row kernel (rows beyond are taken by the grid-stride loop): 65535, or the
/// macro MIXMOE_CUDA_MAX_ROW_BLOCKS where it is defined (the CPU model of CUDA's tests lower it,
/// so that their grid-stride loops run at small sizes).
#ifndef MIXMOE_CUDA_MAX_ROW_BLOCKS
#define MIXMOE_CUDA_MAX_ROW_BLOCKS 65535
#endif
inline constexpr index_t kMaxRowBlocks = MIXMOE_CUDA_MAX_ROW_BLOCKS;
static_assert(kMaxRowBlocks >= 1 && kMaxRowBlocks <= 0x7fffffff, "MIXMOE_CUDA_MAX_ROW_BLOCKS: 1 to 2^31 - 1 blocks");
/// Most blocks of the one-thread-per-line top-k kernel (a grid-stride loop over lines).
inline constexpr index_t kMaxTopkThreadBlocks = kMaxGridStrideBlocks < 1024 ? kMaxGridStrideBlocks : 1024;
/// Longest line the one-thread-per-line top-k kernel takes; longer lines get a block each.
inline constexpr index_t kTopkThreadMax = 128;

inline unsigned row_blocks(index_t rows) { return static_cast<unsigned>(rows < kMaxRowBlocks ? rows : kMaxRowBlocks); }

// ---- softmax -------------------------------------------------------------------------------

template <class T>
__global__ void softmax_lines(const T* x, T* y, index_t lines, index_t n, index_t inner, bool log) {
  for (index_t line = blockIdx.x; line < lines; line += gridDim.x) {
    const index_t base = (line / inner) * n * inner + line % inner;
    double m = -INFINITY;
    for (index_t j = threadIdx.x; j < n; j += blockDim.x) m = ::fmax(m, static_cast<double>(x[base + j * inner]));
    const T mt = static_cast<T>(block_max(m));
    double s = 0;
    for (index_t j = threadIdx.x; j < n; j += blockDim.x)
      s += static_cast<double>(mixmoe::detail::fn::Exp{}(static_cast<T>(x[base + j * inner] - mt)));
    s = block_sum(s);
    if (log) {
      const T ls = static_cast<T>(::log(s));
      for (index_t j = threadIdx.x; j < n; j += blockDim.x) {
        const T d = x[base + j * inner] - mt;
        y[base + j * inner] = d - ls;
      }
    } else {
      const T inv = static_cast<T>(1.0 / s);
      for (index_t j = threadIdx.x; j < n; j += blockDim.x) {
        const T e = mixmoe::detail::fn::Exp{}(static_cast<T>(x[base + j * inner] - mt));
        y[base + j * inner] = e * inv;
      }
    }
  }
}

template <class T>
__global__ void softmax_lines_backward(const T* g, const T* y, T* gx, index_t lines, index_t n, index_t inner,
                                       bool log) {
  for (index_t line = blockIdx.x; line < lines; line += gridDim.x) {
    const index_t base = (line / inner) * n * inner + line % inner;
    double s = 0;
    for (index_t j = threadIdx.x; j < n; j += blockDim.x) {
      const index_t at = base + j * inner;
      s += log ? static_cast<double>(g[at]) : static_cast<double>(g[at]) * static_cast<double>(y[at]);
    }
    const T st = static_cast<T>(block_sum(s));
    for (index_t j = threadIdx.x; j < n; j += blockDim.x) {
      const index_t at = base + j * inner;
      if (log) {
        const T e = mixmoe::detail::fn::Exp{}(y[at]);
        gx[at] = g[at] - e * st;
      } else {
        const T d = g[at] - st;
        gx[at] = y[at] * d;
      }
    }
  }
}

// ---- norms -----------------------------------------------------------------------------------

template <class T>
__global__ void norm_rows(const T* x, const T* w, const T* b, T* y, double* mean, double* rstd, index_t rows, index_t c,
                          double eps, bool centre) {
  for (index_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * c;
    T* yr = y + r * c;
    double mu = 0;
    if (centre) {
      double s = 0;
      for (index_t j = threadIdx.x; j < c; j += blockDim.x) s += static_cast<double>(xr[j]);
      mu = block_sum(s) / static_cast<double>(c);
    }
    double ss = 0;
    for (index_t j = threadIdx.x; j < c; j += blockDim.x) {
      const double d = static_cast<double>(xr[j]) - mu;
      ss += d * d;
    }
    const double rs = 1.0 / ::sqrt(block_sum(ss) / static_cast<double>(c) + eps);
    if (threadIdx.x == 0) {
      if (centre) mean[r] = mu;
      rstd[r] = rs;
    }
    for (index_t j = threadIdx.x; j < c; j += blockDim.x) {
      T v = static_cast<T>((static_cast<double>(xr[j]) - mu) * rs);  // xhat, rounded to T as on the CPU
      if (w) v = v * w[j];
      if (b) v = v + b[j];
      yr[j] = v;
    }
  }
}

/// gx of a norm; mean null for rms_norm, w null for weight 1.
template <class T>
__global__ void norm_rows_backward(const T* g, const T* x, const T* w, const double* mean, const double* rstd, T* gx,
                                   index_t rows, index_t c) {
  for (index_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const index_t o = r * c;
    const double mu = mean ? mean[r] : 0.0, rs = rstd[r];
    double s1 = 0, s2 = 0;  // sum dy, sum dy xhat
    for (index_t j = threadIdx.x; j < c; j += blockDim.x) {
      const double xh = (static_cast<double>(x[o + j]) - mu) * rs;
      const double dy = w ? static_cast<double>(g[o + j]) * static_cast<double>(w[j]) : static_cast<double>(g[o + j]);
      s1 += dy;
      s2 += dy * xh;
    }
    const double m1 = mean ? block_sum(s1) / static_cast<double>(c) : 0.0;
    const double m2 = block_sum(s2) / static_cast<double>(c);
    for (index_t j = threadIdx.x; j < c; j += blockDim.x) {
      const double xh = (static_cast<double>(x[o + j]) - mu) * rs;
      const double dy = w ? static_cast<double>(g[o + j]) * static_cast<double>(w[j]) : static_cast<double>(g[o + j]);
      gx[o + j] = static_cast<T>(rs * (dy - m1 - xh * m2));
    }
  }
}

/// Partial column sums over rows [R chunk / chunks, R (chunk + 1) / chunks) of chunk blockIdx.y:
/// pw[chunk, j] = sum g xhat, pb[chunk, j] = sum g (either may be null).
template <class T>
__global__ void norm_param_partials(const T* g, const T* x, const double* mean, const double* rstd, double* pw,
                                    double* pb, index_t rows, index_t c, index_t chunks) {
  const index_t chunk = blockIdx.y;
  const index_t r0 = rows * chunk / chunks, r1 = rows * (chunk + 1) / chunks;
  for (index_t j = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; j < c;
       j += static_cast<index_t>(gridDim.x) * blockDim.x) {
    double sw = 0, sb = 0;
    for (index_t r = r0; r < r1; ++r) {
      const double gv = static_cast<double>(g[r * c + j]);
      if (pw) {
        const double mu = mean ? mean[r] : 0.0;
        sw += gv * ((static_cast<double>(x[r * c + j]) - mu) * rstd[r]);
      }
      sb += gv;
    }
    if (pw) pw[chunk * c + j] = sw;
    if (pb) pb[chunk * c + j] = sb;
  }
}

/// out[j] = T(sum over chunks in order of p[chunk, j]).
template <class T>
__global__ void sum_chunks(const double* p, T* out, index_t chunks, index_t c) {
  for (index_t j = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; j < c;
       j += static_cast<index_t>(gridDim.x) * blockDim.x) {
    double s = 0;
    for (index_t k = 0; k < chunks; ++k) s += p[k * c + j];
    out[j] = static_cast<T>(s);
  }
}

// ---- cross-entropy ---------------------------------------------------------------------------

template <class T>
__global__ void cross_entropy_rows(const T* x, const Index* targets, double* stats, double* losses, T* out_rows,
                                   index_t rows, index_t v, Index ignore, double eps) {
  for (index_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * v;
    double m = -INFINITY;
    for (index_t j = threadIdx.x; j < v; j += blockDim.x) m = ::fmax(m, static_cast<double>(xr[j]));
    const T mx = static_cast<T>(block_max(m));
    double s = 0, shifted = 0;  // sum exp(x - max) (each term in T, as on the CPU), sum (x - max)
    for (index_t j = threadIdx.x; j < v; j += blockDim.x) {
      const T d = xr[j] - mx;
      s += static_cast<double>(std::exp(d));
      shifted += static_cast<double>(xr[j]) - static_cast<double>(mx);
    }
    s = block_sum(s);
    if (eps > 0) shifted = block_sum(shifted);  // eps is the same for the whole block
    if (threadIdx.x == 0) {
      const double log_s = ::log(s);
      stats[2 * r] = static_cast<double>(mx);
      stats[2 * r + 1] = log_s;
      const Index t = targets[r];
      double loss = 0;
      if (t == ignore) {
        loss = 0;
      } else if (t < 0 || t >= v) {
        loss = NAN;  // the CPU throws; the device marks the loss instead of synchronising to check
      } else {
        loss = (1.0 - eps) * (static_cast<double>(mx) - static_cast<double>(xr[t]) + log_s);
        if (eps > 0) loss += eps * (log_s - shifted / static_cast<double>(v));
      }
      losses[r] = loss;
      if (out_rows) out_rows[r] = static_cast<T>(loss);
    }
  }
}

/// One block of kRowThreads: out[0] = sum (or mean over the rows not ignored) of the losses.
template <class T>
__global__ void cross_entropy_reduce(const double* losses, const Index* targets, index_t rows, Index ignore, bool mean,
                                     T* out, double* count) {
  double s = 0, cnt = 0;
  for (index_t r = threadIdx.x; r < rows; r += blockDim.x) {
    s += losses[r];
    if (targets[r] != ignore) cnt += 1;
  }
  s = block_sum(s);
  cnt = block_sum(cnt);
  if (threadIdx.x == 0) {
    count[0] = cnt;
    out[0] = static_cast<T>(mean ? (cnt > 0 ? s / cnt : 0.0) : s);
  }
}

template <class T>
__global__ void cross_entropy_backward_rows(const T* x, const Index* targets, const double* stats, const T* g,
                                            const double* count, T* gx, index_t rows, index_t v, Index ignore,
                                            double eps, int mode) {
  for (index_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * v;
    T* gr = gx + r * v;
    double scale = 0;
    if (mode == 0) scale = static_cast<double>(g[r]);
    if (mode == 1) scale = static_cast<double>(g[0]);
    if (mode == 2 && count[0] > 0) scale = static_cast<double>(g[0]) / count[0];
    const Index t = targets[r];
    if (t == ignore || scale == 0.0) {
      for (index_t j = threadIdx.x; j < v; j += blockDim.x) gr[j] = T(0);
      continue;
    }
    if (t < 0 || t >= v) {  // a NaN loss in the forward: NaN gradients, never an out-of-range write
      for (index_t j = threadIdx.x; j < v; j += blockDim.x) gr[j] = static_cast<T>(NAN);
      continue;
    }
    const T mx = static_cast<T>(stats[2 * r]), log_s = static_cast<T>(stats[2 * r + 1]);
    const T ts = static_cast<T>(scale);
    const T smooth = static_cast<T>(scale * eps / static_cast<double>(v));
    const T hit = static_cast<T>(scale * (1.0 - eps));
    for (index_t j = threadIdx.x; j < v; j += blockDim.x) {
      const T d = (xr[j] - mx) - log_s;
      T val = std::exp(d) * ts;
      if (eps > 0) val = val - smooth;
      if (j == t) val = val - hit;
      gr[j] = val;
    }
  }
}

// ---- reductions ------------------------------------------------------------------------------

/// part[blockIdx.x] = sum in double of this block's grid-stride share of x (kRowThreads threads).
template <class T>
__global__ void sum_parts(const T* x, index_t n, double* part) {
  double s = 0;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    s += static_cast<double>(x[i]);
  s = block_sum(s);
  if (threadIdx.x == 0) part[blockIdx.x] = s;
}

/// One block of kRowThreads: out[0] = T(sum of the parts) * scale.
template <class T>
__global__ void sum_parts_finish(const double* part, index_t parts, T scale, T* out) {
  double s = 0;
  for (index_t i = threadIdx.x; i < parts; i += blockDim.x) s += part[i];
  s = block_sum(s);
  if (threadIdx.x == 0) out[0] = static_cast<T>(s) * scale;
}

template <class T>
__global__ void fill_scaled(T* out, index_t n, const T* g, T scale) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    out[i] = g[0] * scale;
}

template <class T>
__global__ void reduce_lines(const T* x, T* out, index_t outer, index_t n, index_t inner, T scale) {
  const index_t total = outer * inner;
  for (index_t q = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; q < total;
       q += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t o = q / inner, i = q % inner;
    T acc = T(0);
    for (index_t j = 0; j < n; ++j) acc += x[(o * n + j) * inner + i];
    out[q] = acc * scale;
  }
}

template <class T>
__global__ void expand_lines(const T* g, T* out, index_t outer, index_t n, index_t inner, T scale) {
  const index_t total = outer * n * inner;
  for (index_t q = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; q < total;
       q += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t o = q / (n * inner), i = q % inner;
    out[q] = scale * g[o * inner + i];
  }
}

// ---- top-k -----------------------------------------------------------------------------------

/// The CPU's order: (pv, pi) comes before (qv, qi) when pv is NaN and qv is not, or both are
/// numbers and pv > qv, or the values tie (equal, or both NaN) and pi < qi. A strict total order.
template <class T>
__device__ inline bool topk_before(T pv, Index pi, T qv, Index qi) {
  const bool pn = pv != pv, qn = qv != qv;  // NaN
  if (pn != qn) return pn;
  if (!pn && pv != qv) return pv > qv;
  return pi < qi;
}

/// One thread per line. Pass p picks the first entry (in topk_before order) among those after
/// the entry pass p - 1 picked: the order is strict and total, so the passes list the k first.
template <class T>
__global__ void topk_lines_thread(const T* x, T* values, Index* indices, index_t lines, index_t n, index_t inner,
                                  index_t k) {
  for (index_t line = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; line < lines;
       line += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t o = line / inner, i = line % inner;
    const T* src = x + o * n * inner + i;
    T pv = T(0);
    Index pi = -1;  // -1: no previous pick
    for (index_t p = 0; p < k; ++p) {
      T bv = T(0);
      Index bi = -1;
      for (index_t j = 0; j < n; ++j) {
        const T v = src[j * inner];
        const Index ji = static_cast<Index>(j);
        if (pi >= 0 && !topk_before(pv, pi, v, ji)) continue;  // already picked
        if (bi < 0 || topk_before(v, ji, bv, bi)) {
          bv = v;
          bi = ji;
        }
      }
      const index_t at = (o * k + p) * inner + i;
      values[at] = bv;
      indices[at] = bi;
      pv = bv;
      pi = bi;
    }
  }
}

/// One block of kRowThreads per line: the same passes, each thread scanning a strided share of
/// the line, then a shared-memory tree for the block's first candidate.
template <class T>
__global__ void topk_lines_block(const T* x, T* values, Index* indices, index_t lines, index_t n, index_t inner,
                                 index_t k) {
  __shared__ T sv[kRowThreads];
  __shared__ Index si[kRowThreads];
  const int tid = static_cast<int>(threadIdx.x);
  for (index_t line = blockIdx.x; line < lines; line += gridDim.x) {
    const index_t o = line / inner, i = line % inner;
    const T* src = x + o * n * inner + i;
    T pv = T(0);
    Index pi = -1;
    for (index_t p = 0; p < k; ++p) {
      T bv = T(0);
      Index bi = -1;
      for (index_t j = tid; j < n; j += blockDim.x) {
        const T v = src[j * inner];
        const Index ji = static_cast<Index>(j);
        if (pi >= 0 && !topk_before(pv, pi, v, ji)) continue;
        if (bi < 0 || topk_before(v, ji, bv, bi)) {
          bv = v;
          bi = ji;
        }
      }
      sv[tid] = bv;
      si[tid] = bi;
      __syncthreads();
      for (int half = kRowThreads / 2; half > 0; half /= 2) {
        if (tid < half) {
          const int q = tid + half;
          if (si[q] >= 0 && (si[tid] < 0 || topk_before(sv[q], si[q], sv[tid], si[tid]))) {
            sv[tid] = sv[q];
            si[tid] = si[q];
          }
        }
        __syncthreads();
      }
      pv = sv[0];
      pi = si[0];
      if (tid == 0) {
        const index_t at = (o * k + p) * inner + i;
        values[at] = pv;
        indices[at] = pi;
      }
      __syncthreads();  // sv, si are rewritten by the next pass
    }
  }
}

/// gx[o, idx[o, j, i], i] += g[o, j, i]: the k indices of a line are distinct, so no two threads
/// write one element (no atomics needed).
template <class T>
__global__ void topk_scatter(const T* g, const Index* idx, T* gx, index_t outer, index_t n, index_t inner, index_t k) {
  const index_t total = outer * k * inner;
  for (index_t q = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; q < total;
       q += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t o = q / (k * inner), i = q % inner;
    gx[(o * n + idx[q]) * inner + i] += g[q];
  }
}

}  // namespace rows_kernels

/// The rows part of DeviceOps<Cuda> (backend/cuda/cuda.cuh); see the table at the top.
struct RowOps {
  template <class T>
  static void rows_softmax(const T* x, T* y, index_t outer, index_t n, index_t inner, bool log) {
    const index_t lines = outer * inner;
    if (lines == 0 || n == 0) return;
    rows_kernels::softmax_lines<<<rows_kernels::row_blocks(lines), rows_kernels::kRowThreads, 0, current_stream()>>>(
        x, y, lines, n, inner, log);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_softmax");
  }

  template <class T>
  static void rows_softmax_backward(const T* g, const T* y, T* gx, index_t outer, index_t n, index_t inner, bool log) {
    const index_t lines = outer * inner;
    if (lines == 0 || n == 0) return;
    rows_kernels::
        softmax_lines_backward<<<rows_kernels::row_blocks(lines), rows_kernels::kRowThreads, 0, current_stream()>>>(
            g, y, gx, lines, n, inner, log);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_softmax_backward");
  }

  template <class T>
  static void rows_norm(const T* x, const T* w, const T* b, T* y, double* mean, double* rstd, index_t rows, index_t c,
                        double eps, bool centre) {
    if (rows == 0 || c == 0) return;
    rows_kernels::norm_rows<<<rows_kernels::row_blocks(rows), rows_kernels::kRowThreads, 0, current_stream()>>>(
        x, w, b, y, mean, rstd, rows, c, eps, centre);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_norm");
  }

  template <class T>
  static void rows_norm_backward(const T* g, const T* x, const T* w, const double* mean, const double* rstd, T* gx,
                                 index_t rows, index_t c) {
    if (rows == 0 || c == 0) return;
    rows_kernels::
        norm_rows_backward<<<rows_kernels::row_blocks(rows), rows_kernels::kRowThreads, 0, current_stream()>>>(
            g, x, w, mean, rstd, gx, rows, c);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_norm_backward");
  }

  /// dw = sum_R g xhat and db = sum_R g, each (C) (null: not wanted); zeros when rows == 0.
  template <class T>
  static void rows_norm_param_grads(const T* g, const T* x, const double* mean, const double* rstd, T* dw, T* db,
                                    index_t rows, index_t c) {
    if (c == 0 || (!dw && !db)) return;
    // chunks of at least 32 rows, at most 256 chunks: a function of rows alone (deterministic)
    const index_t chunks = std::clamp<index_t>(rows / 32, 1, 256);
    const Tensor<double, Cuda> pw = dw ? Tensor<double, Cuda>::empty({chunks, c}) : Tensor<double, Cuda>();
    const Tensor<double, Cuda> pb = db ? Tensor<double, Cuda>::empty({chunks, c}) : Tensor<double, Cuda>();
    const unsigned col_blocks = blocks_for(c) < 65535u ? blocks_for(c) : 65535u;
    rows_kernels::norm_param_partials<<<dim3(col_blocks, static_cast<unsigned>(chunks)), 256, 0, current_stream()>>>(
        g, x, mean, rstd, dw ? pw.data() : nullptr, db ? pb.data() : nullptr, rows, c, chunks);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_norm_param_grads");
    if (dw) {
      rows_kernels::sum_chunks<<<blocks_for(c), 256, 0, current_stream()>>>(pw.data(), dw, chunks, c);
      MIXMOE_CUDA_CHECK_LAUNCH("rows_norm_param_grads (sum_chunks)");
    }
    if (db) {
      rows_kernels::sum_chunks<<<blocks_for(c), 256, 0, current_stream()>>>(pb.data(), db, chunks, c);
      MIXMOE_CUDA_CHECK_LAUNCH("rows_norm_param_grads (sum_chunks)");
    }
  }

  template <class T>
  static void rows_cross_entropy(const T* x, const Index* targets, double* stats, double* losses, T* out_rows,
                                 index_t rows, index_t v, Index ignore, double eps) {
    if (rows == 0 || v == 0) return;
    rows_kernels::
        cross_entropy_rows<<<rows_kernels::row_blocks(rows), rows_kernels::kRowThreads, 0, current_stream()>>>(
            x, targets, stats, losses, out_rows, rows, v, ignore, eps);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_cross_entropy");
  }

  /// Runs for rows == 0 too (out = 0, count = 0).
  template <class T>
  static void rows_cross_entropy_reduce(const double* losses, const Index* targets, index_t rows, Index ignore,
                                        bool mean, T* out, double* count) {
    rows_kernels::cross_entropy_reduce<<<1, rows_kernels::kRowThreads, 0, current_stream()>>>(losses, targets, rows,
                                                                                              ignore, mean, out, count);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_cross_entropy_reduce");
  }

  template <class T>
  static void rows_cross_entropy_backward(const T* x, const Index* targets, const double* stats, const T* g,
                                          const double* count, T* gx, index_t rows, index_t v, Index ignore, double eps,
                                          int mode) {
    if (rows == 0 || v == 0) return;
    rows_kernels::
        cross_entropy_backward_rows<<<rows_kernels::row_blocks(rows), rows_kernels::kRowThreads, 0, current_stream()>>>(
            x, targets, stats, g, count, gx, rows, v, ignore, eps, mode);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_cross_entropy_backward");
  }

  /// out[0] = T(sum of x in double) * scale; 0 * scale for n == 0.
  template <class T>
  static void rows_sum_all(const T* x, index_t n, T scale, T* out) {
    // parts of at least 4096 elements, at most 1024: a function of n alone (deterministic)
    const index_t parts = std::clamp<index_t>((n + 4095) / 4096, 1, 1024);
    const Tensor<double, Cuda> part = Tensor<double, Cuda>::empty({parts});
    rows_kernels::sum_parts<<<static_cast<unsigned>(parts), rows_kernels::kRowThreads, 0, current_stream()>>>(
        x, n, part.data());
    MIXMOE_CUDA_CHECK_LAUNCH("rows_sum_all");
    rows_kernels::sum_parts_finish<<<1, rows_kernels::kRowThreads, 0, current_stream()>>>(part.data(), parts, scale,
                                                                                          out);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_sum_all (finish)");
  }

  template <class T>
  static void rows_fill_scaled(T* out, index_t n, const T* g, T scale) {
    if (n == 0) return;
    rows_kernels::fill_scaled<<<blocks_for(n), 256, 0, current_stream()>>>(out, n, g, scale);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_fill_scaled");
  }

  template <class T>
  static void rows_reduce_axis(const T* x, T* out, index_t outer, index_t n, index_t inner, T scale) {
    const index_t total = outer * inner;
    if (total == 0) return;
    rows_kernels::reduce_lines<<<blocks_for(total), 256, 0, current_stream()>>>(x, out, outer, n, inner, scale);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_reduce_axis");
  }

  template <class T>
  static void rows_expand_axis(const T* g, T* out, index_t outer, index_t n, index_t inner, T scale) {
    const index_t total = outer * n * inner;
    if (total == 0) return;
    rows_kernels::expand_lines<<<blocks_for(total), 256, 0, current_stream()>>>(g, out, outer, n, inner, scale);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_expand_axis");
  }

  template <class T>
  static void rows_topk(const T* x, T* values, Index* indices, index_t outer, index_t n, index_t inner, index_t k) {
    const index_t lines = outer * inner;
    if (lines == 0 || k == 0) return;
    if (n <= rows_kernels::kTopkThreadMax) {
      const index_t b = (lines + 255) / 256;
      const unsigned blocks =
          static_cast<unsigned>(b < rows_kernels::kMaxTopkThreadBlocks ? b : rows_kernels::kMaxTopkThreadBlocks);
      rows_kernels::topk_lines_thread<<<blocks, 256, 0, current_stream()>>>(x, values, indices, lines, n, inner, k);
    } else {
      rows_kernels::
          topk_lines_block<<<rows_kernels::row_blocks(lines), rows_kernels::kRowThreads, 0, current_stream()>>>(
              x, values, indices, lines, n, inner, k);
    }
    MIXMOE_CUDA_CHECK_LAUNCH("rows_topk");
  }

  /// gx (zeroed by the caller) gets each value's gradient at the position it came from.
  template <class T>
  static void rows_topk_backward(const T* g, const Index* indices, T* gx, index_t outer, index_t n, index_t inner,
                                 index_t k) {
    const index_t total = outer * k * inner;
    if (total == 0) return;
    rows_kernels::topk_scatter<<<blocks_for(total), 256, 0, current_stream()>>>(g, indices, gx, outer, n, inner, k);
    MIXMOE_CUDA_CHECK_LAUNCH("rows_topk_backward");
  }
};

}  // namespace mixmoe::cuda
