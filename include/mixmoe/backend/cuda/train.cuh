// The train part of DeviceOps<Cuda> (backend/cuda/cuda.cuh): optimizer steps, gradient clipping and
// gradient health checks (train/optimizer.hpp, train/clip.hpp), on device tensors.
//
//   train_adamw_step(w, g, m, v, n, ...)     one fused element kernel per parameter tensor: the moments
//                                            and the weight updated in place, the CPU loop's formula in
//                                            T (nvcc contracts a*b + c into FMAs, so the last bit may
//                                            differ); the bias corrections come from the host
//   train_sgd_step(w, g, vel, n, lr, wd, mu) SGD with optional momentum (vel null: none)
//   train_sum_squares(xs, ns)                sum over every listed tensor of x^2, in double
//   train_sum_scaled_squares(xs, ns, amax)   sum of (x / amax)^2 (the overflow-safe second pass)
//   train_abs_max(xs, ns)                    max |x| (only for finite tensors: fmax drops NaN)
//   train_all_finite(xs, ns)                 no NaN and no inf in any listed tensor
//   train_scale(x, n, s)                     x = T(double(x) * s), as the CPU's clipping
//   train_clip_norm(xs, ns, max_norm, out)   grad_norm and clip_grad_norm without a host value: the
//                                            norm and the scale applied written to out[0], out[1]
//                                            (device memory); nothing waits
//
// Reductions over a list of tensors: each tensor's kernel gives each of its blocks (256 threads, a
// grid-stride loop) one partial in double, written to its own slot of a partials buffer; one last
// one-block kernel adds (or takes the max of) the partials in a fixed order. No atomics: the result
// does not depend on scheduling, only on the tensor sizes. The result is ONE double (or flag) read
// back to the host per call: the API returns host values (GradNorm, bool), so this is the one
// device->host synchronisation of a clipping step or a finiteness check. train_clip_norm keeps
// the result on the device: the overflow-safe passes run behind a device-side test (for double
// gradients only: float squares cannot overflow a double sum) and the clipping kernels read the
// scale from device memory.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "mixmoe/backend/cuda/ops.cuh"
#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"
#include "mixmoe/core/device_fn.hpp"

namespace mixmoe::cuda {

namespace kernels {

/// AdamW (decoupled weight decay): the CPU's loop body, element by element (with FMAs).
template <class T>
__global__ void train_adamw(T* w, const T* g, T* m, T* v, index_t n, T b1, T b2, T eps, T step_size, T inv_sqrt_bc2,
                            T decay) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const T gi = g[i];
    const T mi = b1 * m[i] + (T(1) - b1) * gi;
    const T vi = b2 * v[i] + (T(1) - b2) * gi * gi;
    m[i] = mi;
    v[i] = vi;
    w[i] = w[i] * decay - step_size * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
  }
}

/// SGD; with momentum (vel not null): v = mu v + g + wd w, w -= lr v; else w -= lr (g + wd w).
template <class T>
__global__ void train_sgd(T* w, const T* g, T* vel, index_t n, T lr, T wd, T mu) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    if (vel) {
      const T vi = mu * vel[i] + g[i] + wd * w[i];
      vel[i] = vi;
      w[i] -= lr * vi;
    } else {
      w[i] -= lr * (g[i] + wd * w[i]);
    }
  }
}

enum TrainReduce : int { kTrainSumSquares = 0, kTrainScaledSumSquares = 1, kTrainAbsMax = 2 };

/// Whether a sum of squares needs the overflow-safe passes: +inf (NaN stays NaN, finite is right).
__device__ inline bool train_sum_overflowed(double sum) { return std::isinf(sum); }

/// partial[blockIdx.x] = this block's share of the reduction of x (n elements); blockDim == 256.
/// With `gate` (device memory: the first pass's sum), the scaled and max passes run only when
/// that sum overflowed, and the scaled pass reads amax from amax_at when it is not null.
template <class T, int Mode>
__global__ void train_reduce_partials(const T* x, index_t n, double amax, double* partial, const double* gate = nullptr,
                                      const double* amax_at = nullptr) {
  if (gate != nullptr && !train_sum_overflowed(*gate)) return;
  const double scale_by = Mode == kTrainScaledSumSquares && amax_at != nullptr ? *amax_at : amax;
  (void)scale_by;  // read by the scaled mode only
  double acc = 0;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    double v = static_cast<double>(x[i]);
    if constexpr (Mode == kTrainAbsMax) {
      acc = fmax(acc, fabs(v));
    } else {
      if constexpr (Mode == kTrainScaledSumSquares) v = v / scale_by;
      acc += v * v;
    }
  }
  if constexpr (Mode == kTrainAbsMax)
    acc = block_max(acc);
  else
    acc = block_sum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

/// *out = the sum (or max) of partial[0..n); one block of 256 threads; with `gate`, only when the
/// sum at *gate overflowed (as train_reduce_partials).
template <int Mode>
__global__ void train_reduce_final(const double* partial, index_t n, double* out, const double* gate = nullptr) {
  if (gate != nullptr && !train_sum_overflowed(*gate)) return;
  double acc = 0;
  for (index_t i = threadIdx.x; i < n; i += blockDim.x) acc = Mode == kTrainAbsMax ? fmax(acc, partial[i]) : acc + partial[i];
  acc = Mode == kTrainAbsMax ? block_max(acc) : block_sum(acc);
  if (threadIdx.x == 0) *out = acc;
}

/// *flag = 1 when some element of x is NaN or inf (every writer writes the same value).
template <class T>
__global__ void train_find_nonfinite(const T* x, index_t n, int* flag) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    if (!isfinite(static_cast<double>(x[i]))) *flag = 1;
}

/// x = T(double(x) * s).
template <class T>
__global__ void train_scale(T* x, index_t n, double s) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    x[i] = static_cast<T>(static_cast<double>(x[i]) * s);
}

/// train_scale with the scale in device memory; nothing to do when it is 1 (not clipped).
template <class T>
__global__ void train_scale_at(T* x, index_t n, const double* s) {
  const double scale = *s;
  if (scale == 1.0) return;
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    x[i] = static_cast<T>(static_cast<double>(x[i]) * scale);
}

/// The norm from the passes' results r = {sum, amax, scaled sum} (the host's grad_norm), and the
/// clipping scale (clip_grad_norm's): out = {norm, scale}. One thread.
template <int = 0>
__global__ void train_clip_finish(const double* r, double max_norm, double* out) {
  const double sum = r[0];
  double norm = std::sqrt(sum);
  if (train_sum_overflowed(sum)) norm = std::isinf(r[1]) ? r[1] : r[1] * std::sqrt(r[2]);
  out[0] = norm;
  out[1] = max_norm > 0 && std::isfinite(norm) && norm > max_norm ? max_norm / norm : 1.0;
}

}  // namespace kernels

/// The train part of DeviceOps<Cuda> (backend/cuda/cuda.cuh).
struct TrainOps {
  /// One AdamW update of a parameter tensor (w, its gradient g, moments m and v; n elements each,
  /// contiguous). step_size = lr / (1 - beta1^t), inv_sqrt_bc2 = 1 / sqrt(1 - beta2^t), decay =
  /// 1 - lr * weight_decay: computed on the host in double, as the CPU does.
  template <class T>
  static void train_adamw_step(T* w, const T* g, T* m, T* v, index_t n, T b1, T b2, T eps, T step_size,
                               T inv_sqrt_bc2, T decay) {
    if (n == 0) return;
    kernels::train_adamw<<<blocks_for(n), 256, 0, current_stream()>>>(w, g, m, v, n, b1, b2, eps, step_size,
                                                                       inv_sqrt_bc2, decay);
    MIXMOE_CUDA_CHECK_LAUNCH("train_adamw");
  }

  /// One SGD update; vel is null without momentum.
  template <class T>
  static void train_sgd_step(T* w, const T* g, T* vel, index_t n, T lr, T wd, T mu) {
    if (n == 0) return;
    kernels::train_sgd<<<blocks_for(n), 256, 0, current_stream()>>>(w, g, vel, n, lr, wd, mu);
    MIXMOE_CUDA_CHECK_LAUNCH("train_sgd");
  }

  template <class T>
  static double train_sum_squares(const std::vector<const T*>& xs, const std::vector<index_t>& ns) {
    return train_reduce<T, kernels::kTrainSumSquares>(xs, ns, 1.0);
  }

  template <class T>
  static double train_sum_scaled_squares(const std::vector<const T*>& xs, const std::vector<index_t>& ns,
                                         double amax) {
    return train_reduce<T, kernels::kTrainScaledSumSquares>(xs, ns, amax);
  }

  template <class T>
  static double train_abs_max(const std::vector<const T*>& xs, const std::vector<index_t>& ns) {
    return train_reduce<T, kernels::kTrainAbsMax>(xs, ns, 1.0);
  }

  /// Whether every element of every listed tensor is finite; one int read back.
  template <class T>
  static bool train_all_finite(const std::vector<const T*>& xs, const std::vector<index_t>& ns) {
    auto flag = Tensor<std::int32_t, Cuda>::zeros({1});
    for (std::size_t t = 0; t < xs.size(); ++t) {
      if (ns[t] == 0) continue;
      kernels::train_find_nonfinite<<<blocks_for(ns[t]), 256, 0, current_stream()>>>(xs[t], ns[t], flag.data());
      MIXMOE_CUDA_CHECK_LAUNCH("train_find_nonfinite");
    }
    return flag.item() == 0;  // the one synchronisation
  }

  /// grad_norm and clip_grad_norm over the listed tensors without waiting: out[0] = the norm
  /// before clipping (inf or NaN as grad_norm's), out[1] = the scale the tensors were multiplied
  /// by (1: not clipped; max_norm <= 0 never clips); out is device memory.
  template <class T>
  static void train_clip_norm(const std::vector<T*>& xs, const std::vector<index_t>& ns, double max_norm,
                              double* out) {
    MIXMOE_CHECK(xs.size() == ns.size(), "cuda::train_clip_norm", xs.size(), " pointers for ", ns.size(), " sizes");
    // sum, amax, scaled sum. amax starts at inf: float gradients skip the passes below, and for
    // them an overflowed sum means a true inf among them (the norm is inf, as grad_norm's).
    auto r = Tensor<double, Cuda>::from({0.0, std::numeric_limits<double>::infinity(), 0.0}, {3});
    const std::vector<const T*> cxs(xs.begin(), xs.end());
    train_reduce_into<T, kernels::kTrainSumSquares>(cxs, ns, r.data(), nullptr, nullptr);
    if constexpr (sizeof(T) > sizeof(float)) {
      // Squares of float gradients (below 2^256) cannot overflow a double sum; doubles can.
      train_reduce_into<T, kernels::kTrainAbsMax>(cxs, ns, r.data() + 1, r.data(), nullptr);
      train_reduce_into<T, kernels::kTrainScaledSumSquares>(cxs, ns, r.data() + 2, r.data(), r.data() + 1);
    }
    kernels::train_clip_finish<<<1, 1, 0, current_stream()>>>(r.data(), max_norm, out);
    MIXMOE_CUDA_CHECK_LAUNCH("train_clip_finish");
    for (std::size_t t = 0; t < xs.size(); ++t) {
      if (ns[t] == 0) continue;
      kernels::train_scale_at<<<blocks_for(ns[t]), 256, 0, current_stream()>>>(xs[t], ns[t], out + 1);
      MIXMOE_CUDA_CHECK_LAUNCH("train_scale_at");
    }
  }

  /// x = T(double(x) * s), n contiguous elements.
  template <class T>
  static void train_scale(T* x, index_t n, double s) {
    if (n == 0) return;
    kernels::train_scale<<<blocks_for(n), 256, 0, current_stream()>>>(x, n, s);
    MIXMOE_CUDA_CHECK_LAUNCH("train_scale");
  }

 private:
  /// Blocks per tensor in a reduction: enough to fill the GPU for large tensors, few partials.
  static unsigned train_reduce_blocks(index_t n) {
    return static_cast<unsigned>(std::min<index_t>((n + 255) / 256, 1024));
  }

  template <class T, int Mode>
  static double train_reduce(const std::vector<const T*>& xs, const std::vector<index_t>& ns, double amax) {
    MIXMOE_CHECK(xs.size() == ns.size(), "cuda::train_reduce", xs.size(), " pointers for ", ns.size(), " sizes");
    auto out = Tensor<double, Cuda>::zeros({1});
    if (!train_reduce_into<T, Mode>(xs, ns, out.data(), nullptr, nullptr, amax)) return 0.0;
    return out.item();  // the one synchronisation: the caller wants a host double
  }

  /// The reduction's kernels, the result written to *out (device memory; left as it is when there
  /// is nothing to reduce: returns false). gate and amax_at as in train_reduce_partials.
  template <class T, int Mode>
  static bool train_reduce_into(const std::vector<const T*>& xs, const std::vector<index_t>& ns, double* out,
                                const double* gate, const double* amax_at, double amax = 1.0) {
    index_t total = 0;
    for (index_t n : ns)
      if (n > 0) total += train_reduce_blocks(n);
    if (total == 0) return false;
    auto partial = Tensor<double, Cuda>::empty({total});
    index_t at = 0;
    for (std::size_t t = 0; t < xs.size(); ++t) {
      if (ns[t] == 0) continue;
      const unsigned blocks = train_reduce_blocks(ns[t]);
      kernels::train_reduce_partials<T, Mode><<<blocks, kernels::kRowThreads, 0, current_stream()>>>(
          xs[t], ns[t], amax, partial.data() + at, gate, amax_at);
      MIXMOE_CUDA_CHECK_LAUNCH("train_reduce_partials");
      at += blocks;
    }
    kernels::train_reduce_final<Mode><<<1, kernels::kRowThreads, 0, current_stream()>>>(partial.data(), total, out,
                                                                                         gate);
    MIXMOE_CUDA_CHECK_LAUNCH("train_reduce_final");
    return true;
  }
};

}  // namespace mixmoe::cuda
