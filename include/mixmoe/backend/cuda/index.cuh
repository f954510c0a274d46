// The index part of DeviceOps<Cuda> (backend/cuda/cuda.cuh): the device side of ops/index.hpp
// (index_select, gather, scatter_add and their index-range check), ops/embedding.hpp, the
// backwards of ops/shape_ops.hpp (slice, concat) and ops/dropout.hpp.
//
//   index_first_out_of_range(p, n, extent)     the first position i (row-major) with p[i] outside
//                                              [0, extent), or -1; reads one value back (a sync)
//   index_check_deferred(p, n, extent, message) the same check, enqueued: a bad index is reported
//                                              by the next synchronisation (runtime.cuh)
//   index_select_rows(x, outer, n, inner, index, m, out)
//                                              out[o, j, :] = x[o, index[j], :]
//   index_select_rows_backward(g, outer, n, inner, index, m, gx)
//                                              gx[o, index[j], :] += g[o, j, :]      (atomicAdd)
//   index_gather_axis(out, so, x, sx, index, ishape, axis, extent)
//                                              out[p . so] = x[p . sx, axis coordinate -> index[p]]
//                                              for every position p of the contiguous index
//   index_scatter_add_axis(dst, sd, src, ss, index, ishape, axis, extent)
//                                              dst[p . sd, axis coordinate -> index[p]] += src[p . ss]
//                                              (atomicAdd)
//   index_add_strided(dst, sd, src, ss, shape) dst view += src view (the views of `shape` under
//                                              strides sd and ss; dst's elements distinct)
//   index_dropout(x, out, mask, n, p, keep_scale, seed)
//                                              mask[i] = keep_scale if u_i >= p else 0, out = x mask,
//                                              u_i uniform in [0, 1) from Philox (seed, i)
//
// Every kernel is a grid-stride loop with one element per iteration, launched with 256-thread
// blocks (blocks_for). The kernels that take an index stay in bounds whatever its value: an index
// outside [0, extent) reads as NaN (forward) and its gradient is dropped (backward and scatter).
// A checked or deferred check reports it; a trusted one (in range by construction) never sees one.
// Repeated indices make the scatters (the backwards of index_select, gather and embedding, the
// forward of scatter_add) add into one element from several threads: they use atomicAdd, so the
// order of a repeated index's terms, and so the last bits of a float sum, may differ between runs
// and from the CPU (which adds them in index order).
#pragma once

#include <cstdint>
#include <limits>
#include <optional>

#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"
#include "mixmoe/core/device_fn.hpp"

namespace mixmoe::cuda {

namespace kernels {

/// What a read at an out-of-range index gives: NaN (integers: 0).
template <class T>
__device__ inline T index_poison() {
  if constexpr (std::numeric_limits<T>::has_quiet_NaN)
    return std::numeric_limits<T>::quiet_NaN();
  else
    return T(0);
}

/// *first = min(*first, i) over the positions i whose index is outside [0, extent).
/// With `skip` set, the value *skip is allowed too (cross-entropy's ignore_index).
template <class I>
__global__ void index_first_out_of_range(const I* p, index_t n, index_t extent, long long* first, bool has_skip = false,
                                         index_t skip = 0) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t v = p[i];
    if ((v < 0 || v >= extent) && !(has_skip && v == skip)) atomicMin(first, static_cast<long long>(i));
  }
}

/// out (outer, m, inner) = x (outer, n, inner) at rows index (m); total = outer * m * inner.
template <class T>
__global__ void index_select_rows(const T* x, index_t n, index_t inner, const Index* index, index_t m, T* out,
                                  index_t total) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t k = i % inner, r = i / inner;
    const index_t j = r % m, o = r / m;
    const index_t id = index[j];
    out[i] = id >= 0 && id < n ? x[(o * n + id) * inner + k] : index_poison<T>();
  }
}

/// gx (outer, n, inner) at rows index (m) += g (outer, m, inner). atomicAdd: a repeated index
/// sends several g elements to one gx element.
template <class T>
__global__ void index_select_rows_backward(const T* g, index_t n, index_t inner, const Index* index, index_t m, T* gx,
                                           index_t total) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t k = i % inner, r = i / inner;
    const index_t j = r % m, o = r / m;
    const index_t id = index[j];
    if (id >= 0 && id < n) atomicAdd(gx + (o * n + id) * inner + k, g[i]);
  }
}

/// out[off(ov, i)] = x[off(xv, i) + index[i] * x_axis_stride] for the n positions i of the index.
/// xv has the index's shape and x's strides with 0 on the axis; x's axis has `extent` entries.
template <class T>
__global__ void index_gather_axis(T* out, const __grid_constant__ ViewDesc ov, const T* x,
                                  const __grid_constant__ ViewDesc xv, index_t x_axis_stride, const Index* index,
                                  index_t n, index_t extent) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t id = index[i];
    out[view_offset(ov, i)] = id >= 0 && id < extent ? x[view_offset(xv, i) + id * x_axis_stride] : index_poison<T>();
  }
}

/// dst[off(dv, i) + index[i] * dst_axis_stride] += src[off(sv, i)]. atomicAdd: positions with the
/// same index along the axis (and the same coordinates off it) add into one element.
template <class T>
__global__ void index_scatter_add_axis(T* dst, const __grid_constant__ ViewDesc dv, index_t dst_axis_stride,
                                       const T* src, const __grid_constant__ ViewDesc sv, const Index* index, index_t n,
                                       index_t extent) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const index_t id = index[i];
    if (id >= 0 && id < extent) atomicAdd(dst + view_offset(dv, i) + id * dst_axis_stride, src[view_offset(sv, i)]);
  }
}

/// dst view += src view (n elements); no two i share a dst element, so no atomics.
template <class T>
__global__ void index_add_strided(T* dst, const __grid_constant__ ViewDesc dv, const T* src,
                                  const __grid_constant__ ViewDesc sv, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    dst[view_offset(dv, i)] += src[view_offset(sv, i)];
}

/// Inverted dropout's mask and output. Group q (elements 4q .. 4q+3) uses the four words of Philox
/// block q of stream `seed`; u = word / 2^32 in [0, 1); element i is kept when u >= p.
template <class T>
__global__ void index_dropout(const T* x, T* out, T* mask, index_t n, double p, T keep_scale, std::uint64_t seed) {
  const index_t groups = (n + 3) / 4;
  for (index_t q = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; q < groups;
       q += static_cast<index_t>(gridDim.x) * blockDim.x) {
    std::uint32_t w[4];
    Philox4x32::words(seed, static_cast<std::uint64_t>(q), w);
    for (int k = 0; k < 4; ++k) {
      const index_t i = 4 * q + k;
      if (i >= n) break;
      const double u = static_cast<double>(w[k]) * (1.0 / 4294967296.0);
      const T m = u >= p ? keep_scale : T(0);
      mask[i] = m;
      out[i] = x[i] * m;
    }
  }
}

}  // namespace kernels

/// The index part of DeviceOps<Cuda>. Pointers are device pointers; index_t sizes.
struct IndexOps {
  /// The first (row-major) position of n indices whose value is outside [0, extent), or -1.
  /// This reads one value back to the host, a synchronisation of the stream: it is the price of
  /// the library's promise that a bad index fails with an error naming its value and position
  /// (as on the CPU) instead of reading or writing out of bounds in a later kernel.
  static index_t index_first_out_of_range(const Index* p, index_t n, index_t extent) {
    if (n == 0) return -1;
    const std::int64_t at = first_out_of_range(p, n, extent).item();  // the one synchronisation of the check
    return at == std::numeric_limits<std::int64_t>::max() ? -1 : static_cast<index_t>(at);
  }

  /// The same check without waiting: the first bad position is found and recorded on the device,
  /// and the next synchronisation of this stream throws mixmoe::Error(message(position, value))
  /// (runtime.cuh). The kernels that read the indices meanwhile stay in bounds (see the top).
  /// `allowed` (cross-entropy's ignore_index), when given, passes too.
  static void index_check_deferred(const Index* p, index_t n, index_t extent, detail::DeferredChecks::Message message,
                                   std::optional<index_t> allowed = std::nullopt) {
    if (n == 0) return;
    static_assert(sizeof(Index) == sizeof(std::int32_t));
    const auto first = first_out_of_range(p, n, extent, allowed);
    // `first` goes back to the cache when this returns; the stream order keeps it until the commit ran
    detail::DeferredChecks::instance().enqueue(reinterpret_cast<const long long*>(first.data()), n, p,
                                               std::move(message));
  }

  template <class T>
  static void index_select_rows(const T* x, index_t outer, index_t n, index_t inner, const Index* index, index_t m,
                                T* out) {
    const index_t total = outer * m * inner;
    if (total == 0) return;
    kernels::index_select_rows<<<blocks_for(total), 256, 0, current_stream()>>>(x, n, inner, index, m, out, total);
    MIXMOE_CUDA_CHECK_LAUNCH("index_select_rows");
  }

  template <class T>
  static void index_select_rows_backward(const T* g, index_t outer, index_t n, index_t inner, const Index* index,
                                         index_t m, T* gx) {
    const index_t total = outer * m * inner;
    if (total == 0) return;
    kernels::index_select_rows_backward<<<blocks_for(total), 256, 0, current_stream()>>>(g, n, inner, index, m, gx,
                                                                                         total);
    MIXMOE_CUDA_CHECK_LAUNCH("index_select_rows_backward");
  }

  /// For every position p of the contiguous index (shape ishape): out[p . out_strides] =
  /// x[p . x_strides with p's coordinate on `axis` replaced by index[p]].
  template <class T>
  static void index_gather_axis(T* out, const Shape& out_strides, const T* x, const Shape& x_strides,
                                const Index* index, const Shape& ishape, int axis, index_t extent) {
    const index_t n = ishape.numel();
    if (n == 0) return;
    kernels::index_gather_axis<<<blocks_for(n), 256, 0, current_stream()>>>(
        out, view_desc(ishape, out_strides), x, index_off_axis_view(ishape, x_strides, axis), x_strides[axis], index, n,
        extent);
    MIXMOE_CUDA_CHECK_LAUNCH("index_gather_axis");
  }

  /// For every position p of the contiguous index (shape ishape): dst[p . dst_strides with p's
  /// coordinate on `axis` replaced by index[p]] += src[p . src_strides].
  template <class T>
  static void index_scatter_add_axis(T* dst, const Shape& dst_strides, const T* src, const Shape& src_strides,
                                     const Index* index, const Shape& ishape, int axis, index_t extent) {
    const index_t n = ishape.numel();
    if (n == 0) return;
    kernels::index_scatter_add_axis<<<blocks_for(n), 256, 0, current_stream()>>>(
        dst, index_off_axis_view(ishape, dst_strides, axis), dst_strides[axis], src, view_desc(ishape, src_strides),
        index, n, extent);
    MIXMOE_CUDA_CHECK_LAUNCH("index_scatter_add_axis");
  }

  /// The view (dst, dst_strides) of `shape` += the view (src, src_strides) of `shape`.
  template <class T>
  static void index_add_strided(T* dst, const Shape& dst_strides, const T* src, const Shape& src_strides,
                                const Shape& shape) {
    const index_t n = shape.numel();
    if (n == 0) return;
    kernels::index_add_strided<<<blocks_for(n), 256, 0, current_stream()>>>(dst, view_desc(shape, dst_strides), src,
                                                                            view_desc(shape, src_strides), n);
    MIXMOE_CUDA_CHECK_LAUNCH("index_add_strided");
  }

  /// Dropout's mask (0 or keep_scale) and output x * mask over n contiguous elements, the mask a
  /// function of (seed, i) only.
  template <class T>
  static void index_dropout(const T* x, T* out, T* mask, index_t n, double p, T keep_scale, std::uint64_t seed) {
    if (n == 0) return;
    const index_t groups = (n + 3) / 4;
    kernels::index_dropout<<<blocks_for(groups), 256, 0, current_stream()>>>(x, out, mask, n, p, keep_scale, seed);
    MIXMOE_CUDA_CHECK_LAUNCH("index_dropout");
  }

 private:
  /// A one-element device tensor holding the first position of n indices outside [0, extent)
  /// (`allowed` passing too), or int64 max when there is none; nothing waits.
  static Tensor<std::int64_t, Cuda> first_out_of_range(const Index* p, index_t n, index_t extent,
                                                       std::optional<index_t> allowed = std::nullopt) {
    auto first = Tensor<std::int64_t, Cuda>::full(Shape{1}, std::numeric_limits<std::int64_t>::max());
    static_assert(sizeof(std::int64_t) == sizeof(long long));
    kernels::index_first_out_of_range<<<blocks_for(n), 256, 0, current_stream()>>>(
        p, n, extent, reinterpret_cast<long long*>(first.data()), allowed.has_value(), allowed.value_or(0));
    MIXMOE_CUDA_CHECK_LAUNCH("index_first_out_of_range");
    return first;
  }

  /// ishape with `strides`, the stride of `axis` set to 0 (the kernel adds index * stride).
  static ViewDesc index_off_axis_view(const Shape& ishape, const Shape& strides, int axis) {
    ViewDesc v = view_desc(ishape, strides);
    v.strides[axis] = 0;
    return v;
  }
};

}  // namespace mixmoe::cuda
