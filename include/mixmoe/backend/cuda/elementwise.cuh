// Element-wise kernels with a function object (core/device_fn.hpp), the broadcasting form of
// the binary ops, and the broadcast backward's reduction (sum_to): the device side of
// ops/elementwise.hpp and ops/unary.hpp.
//
//   map(out, n, f, a)                      out[i] = f(a[i])                       (contiguous)
//   map(out, n, f, a, b)                   out[i] = f(a[i], b[i])                 (contiguous)
//   map_broadcast(out, shape, a, sa, b, sb, f)
//                                          out (shape, contiguous) = f(a, b) read through strides
//                                          sa, sb aligned to shape (0 on broadcast axes)
//   sum_to(out, g, gshape, so)             out = g (gshape, contiguous) summed over the axes where
//                                          so (out's strides aligned to gshape) is 0 and gshape > 1
//
// sum_to gives every output element to one thread, which adds its inputs in row-major order
// in double: no atomics, so the result does not depend on the launch.
#pragma once

#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"
#include "mixmoe/core/device_fn.hpp"

namespace mixmoe::cuda {

namespace kernels {

template <class T, class F>
__global__ void map1(T* out, const T* a, index_t n, F f) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    out[i] = f(a[i]);
}

template <class T, class F>
__global__ void map2(T* out, const T* a, const T* b, index_t n, F f) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    out[i] = f(a[i], b[i]);
}

template <class T, class F>
__global__ void map_broadcast2(T* out, index_t n, const T* a, const __grid_constant__ ViewDesc va, const T* b,
                               const __grid_constant__ ViewDesc vb, F f) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    out[i] = f(a[view_offset(va, i)], b[view_offset(vb, i)]);
}

template <class T>
__global__ void sum_to(const T* g, const __grid_constant__ ViewDesc kept, const __grid_constant__ ViewDesc reduced,
                       index_t n_out, index_t n_reduced, T* out) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n_out;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const T* base = g + view_offset(kept, i);
    double s = 0;
    for (index_t j = 0; j < n_reduced; ++j) s += static_cast<double>(base[view_offset(reduced, j)]);
    out[i] = static_cast<T>(s);
  }
}

}  // namespace kernels

/// The element-wise part of DeviceOps<Cuda> (backend/cuda/cuda.cuh).
struct ElementwiseOps {
  template <class T, class F>
  static void map(T* out, index_t n, F f, const T* a) {
    if (n == 0) return;
    kernels::map1<<<blocks_for(n), 256, 0, current_stream()>>>(out, a, n, f);
    MIXMOE_CUDA_CHECK_LAUNCH("map");
  }

  template <class T, class F>
  static void map(T* out, index_t n, F f, const T* a, const T* b) {
    if (n == 0) return;
    kernels::map2<<<blocks_for(n), 256, 0, current_stream()>>>(out, a, b, n, f);
    MIXMOE_CUDA_CHECK_LAUNCH("map");
  }

  template <class T, class F>
  static void map_broadcast(T* out, const Shape& shape, const T* a, const Shape& sa, const T* b, const Shape& sb, F f) {
    const index_t n = shape.numel();
    if (n == 0) return;
    kernels::map_broadcast2<<<blocks_for(n), 256, 0, current_stream()>>>(out, n, a, view_desc(shape, sa), b,
                                                                         view_desc(shape, sb), f);
    MIXMOE_CUDA_CHECK_LAUNCH("map_broadcast");
  }

  template <class T>
  static void sum_to(T* out, const T* g, const Shape& gshape, const Shape& out_strides) {
    const Shape gstrides = contiguous_strides(gshape);
    Shape kept_shape = gshape, reduced_shape = gshape;
    for (int ax = 0; ax < gshape.rank(); ++ax) {
      const bool reduced = out_strides[ax] == 0 && gshape[ax] > 1;
      (reduced ? kept_shape : reduced_shape)[ax] = 1;
    }
    const index_t n_out = kept_shape.numel(), n_reduced = reduced_shape.numel();
    if (n_out == 0) return;
    kernels::sum_to<<<blocks_for(n_out), 256, 0, current_stream()>>>(
        g, view_desc(kept_shape, gstrides), view_desc(reduced_shape, gstrides), n_out, n_reduced, out);
    MIXMOE_CUDA_CHECK_LAUNCH("sum_to");
  }
};

}  // namespace mixmoe::cuda
