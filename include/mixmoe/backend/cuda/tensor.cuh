// Tensor<T, Cuda>: device memory from the caching allocator and the element kernels the
// Tensor class needs (fill, copies between strided views, type conversion, host<->device
// copies), plus seeded random numbers generated on the device.
//
// Include this header (it includes core/tensor.hpp) in a CUDA translation unit, or link
// mixmoe::cuda, to use Tensor<T, Cuda>:
//
//   auto x = Tensor<float, Cuda>::randn({B, C}, gen);   // drawn on the host: same values as on Cpu
//   auto h = to_device<Cpu>(x);                         // a host copy
//   auto r = cuda::randn<float>({B, C}, seed);          // drawn on the device (Philox)
//
// The host buffer of a copy between host and device may be reused when the call returns; kernels
// are asynchronous on cuda::current_stream(). An upload of up to 16 MiB does not wait for the
// device: it goes through a pinned staging block (cuda::PinnedStaging) and lands in stream order,
// so a tensor uploaded on one thread's stream must be synchronised there before another stream
// reads it. A larger upload, and every download, waits.
#pragma once

#include <cstdint>

#include "mixmoe/backend/cuda/allocator.cuh"
#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/core/tensor.hpp"

namespace mixmoe::cuda {

/// Shape and strides of a view, by value, for a kernel's parameters.
struct ViewDesc {
  int rank = 0;
  index_t shape[kMaxDims] = {};
  index_t strides[kMaxDims] = {};
};

inline ViewDesc view_desc(const Shape& shape, const Shape& strides) {
  ViewDesc v;
  v.rank = shape.rank();
  for (int i = 0; i < v.rank; ++i) {
    v.shape[i] = shape[i];
    v.strides[i] = strides[i];
  }
  return v;
}

/// Offset of the i-th element (row-major order) of a view.
__device__ inline index_t view_offset(const ViewDesc& v, index_t i) {
  index_t off = 0;
  for (int a = v.rank - 1; a >= 0; --a) {
    const index_t e = v.shape[a];
    off += (i % e) * v.strides[a];
    i /= e;
  }
  return off;
}

namespace kernels {

template <class T>
__global__ void fill(T* p, index_t n, T value) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    p[i] = value;
}

template <class T>
__global__ void fill_strided(T* p, const __grid_constant__ ViewDesc v, index_t n, T value) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    p[view_offset(v, i)] = value;
}

template <class T>
__global__ void copy_views(const T* src, const __grid_constant__ ViewDesc sv, T* dst,
                           const __grid_constant__ ViewDesc dv, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    dst[view_offset(dv, i)] = src[view_offset(sv, i)];
}

template <class T, class U>
__global__ void convert(const T* src, U* dst, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    dst[i] = static_cast<U>(src[i]);
}

}  // namespace kernels

// ---- counter-based random numbers (Philox-4x32, 10 rounds) -------------------------------------
// Element i of a draw with (seed, offset) is a pure function of (seed, offset + i): the result
// does not depend on the launch configuration, and a later draw continues with a new offset.

struct Philox4x32 {
  static constexpr std::uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  static constexpr std::uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;

  /// Four random words of counter (c0..c3) under key (k0, k1).
  __host__ __device__ static void block(std::uint32_t c[4], std::uint32_t k0, std::uint32_t k1) {
    for (int r = 0; r < 10; ++r) {
      const std::uint64_t p0 = static_cast<std::uint64_t>(kMul0) * c[0];
      const std::uint64_t p1 = static_cast<std::uint64_t>(kMul1) * c[2];
      const std::uint32_t hi0 = static_cast<std::uint32_t>(p0 >> 32), lo0 = static_cast<std::uint32_t>(p0);
      const std::uint32_t hi1 = static_cast<std::uint32_t>(p1 >> 32), lo1 = static_cast<std::uint32_t>(p1);
      const std::uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
      c[0] = n0;
      c[1] = lo1;
      c[2] = n2;
      c[3] = lo0;
      k0 += kWeyl0;
      k1 += kWeyl1;
    }
  }

  /// The four words of block `index` of stream `seed`.
  __host__ __device__ static void words(std::uint64_t seed, std::uint64_t index, std::uint32_t out[4]) {
    out[0] = static_cast<std::uint32_t>(index);
    out[1] = static_cast<std::uint32_t>(index >> 32);
    out[2] = 0;
    out[3] = 0;
    block(out, static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
  }
};

/// Uniform in (0, 1] from a 32-bit word (never 0, so log() is safe).
__host__ __device__ inline float unit_float(std::uint32_t w) {
  return (static_cast<float>(w >> 8) + 1.0f) * (1.0f / 16777216.0f);
}

namespace kernels {

// Element i uses the words of block (offset + i) / 2: two elements per block, the Box-Muller
// pair (cos, sin) of words (0, 1) or (2, 3).
template <class T>
__global__ void random_normal(T* p, index_t n, std::uint64_t seed, std::uint64_t offset, double mean, double stddev) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const std::uint64_t e = offset + static_cast<std::uint64_t>(i);
    std::uint32_t w[4];
    Philox4x32::words(seed, e / 2, w);
    const float u1 = unit_float(w[0]), u2 = unit_float(w[1]);
    const float r = sqrtf(-2.0f * logf(u1));
    const float z = (e % 2 == 0) ? r * cospif(2.0f * u2) : r * sinpif(2.0f * u2);
    p[i] = static_cast<T>(mean + stddev * static_cast<double>(z));
  }
}

template <class T>
__global__ void random_uniform(T* p, index_t n, std::uint64_t seed, std::uint64_t offset, double lo, double hi) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x) {
    const std::uint64_t e = offset + static_cast<std::uint64_t>(i);
    std::uint32_t w[4];
    Philox4x32::words(seed, e / 4, w);
    const float u = unit_float(w[e % 4]) - (1.0f / 16777216.0f);  // [0, 1)
    p[i] = static_cast<T>(lo + (hi - lo) * static_cast<double>(u));
  }
}

}  // namespace kernels

}  // namespace mixmoe::cuda

namespace mixmoe::detail {

template <>
struct DeviceBackend<Cuda> {
  static constexpr bool available = true;

  static void* allocate(std::size_t bytes) { return cuda::CachingDeviceAllocator::instance().allocate(bytes); }
  static void deallocate(void* p, std::size_t bytes) noexcept {
    cuda::CachingDeviceAllocator::instance().deallocate(p, bytes);
  }

  template <class T>
  static void fill(T* p, index_t n, T value) {
    if (n == 0) return;
    cuda::kernels::fill<<<cuda::blocks_for(n), 256, 0, cuda::current_stream()>>>(p, n, value);
    MIXMOE_CUDA_CHECK_LAUNCH("fill");
  }

  template <class T>
  static void fill_strided(T* p, const Shape& strides, const Shape& shape, T value) {
    const index_t n = shape.numel();
    if (n == 0) return;
    cuda::kernels::fill_strided<<<cuda::blocks_for(n), 256, 0, cuda::current_stream()>>>(
        p, cuda::view_desc(shape, strides), n, value);
    MIXMOE_CUDA_CHECK_LAUNCH("fill_strided");
  }

  /// dst view (dst_strides) = src view (src_strides), both of `shape`, both on the device.
  template <class T>
  static void copy(const T* src, const Shape& src_strides, T* dst, const Shape& dst_strides, const Shape& shape) {
    const index_t n = shape.numel();
    if (n == 0) return;
    const Shape contig = contiguous_strides(shape);
    if (src_strides_match(src_strides, contig, shape) && src_strides_match(dst_strides, contig, shape)) {
      MIXMOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, static_cast<std::size_t>(n) * sizeof(T), cudaMemcpyDeviceToDevice,
                                        cuda::current_stream()));
      return;
    }
    cuda::kernels::copy_views<<<cuda::blocks_for(n), 256, 0, cuda::current_stream()>>>(
        src, cuda::view_desc(shape, src_strides), dst, cuda::view_desc(shape, dst_strides), n);
    MIXMOE_CUDA_CHECK_LAUNCH("copy_views");
  }

  template <class T, class U>
  static void convert(const T* src, U* dst, index_t n) {
    cuda::kernels::convert<<<cuda::blocks_for(n), 256, 0, cuda::current_stream()>>>(src, dst, n);
    MIXMOE_CUDA_CHECK_LAUNCH("convert");
  }

  static void upload(void* dst, const void* src, std::size_t bytes) {
    if (bytes == 0) return;
    // Through a pinned staging block, without waiting; a large one waits (allocator.cuh).
    if (cuda::PinnedStaging::instance().upload(dst, src, bytes, cuda::current_stream())) return;
    MIXMOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cuda::current_stream()));
    cuda::synchronize();  // the caller may reuse its host buffer at once
  }
  static void download(void* dst, const void* src, std::size_t bytes) {
    MIXMOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cuda::current_stream()));
    cuda::synchronize();
  }

 private:
  static bool src_strides_match(const Shape& strides, const Shape& contig, const Shape& shape) {
    for (int i = 0; i < shape.rank(); ++i)
      if (shape[i] != 1 && strides[i] != contig[i]) return false;
    return true;
  }
};

}  // namespace mixmoe::detail

namespace mixmoe::cuda {

/// Normal(mean, stddev) drawn on the device: element i is a function of (seed, offset + i) only.
template <Scalar T>
Tensor<T, Cuda> randn(const Shape& shape, std::uint64_t seed, std::uint64_t offset = 0, double mean = 0.0,
                      double stddev = 1.0) {
  auto t = Tensor<T, Cuda>::empty(shape);
  if (t.numel() == 0) return t;
  kernels::random_normal<<<blocks_for(t.numel()), 256, 0, current_stream()>>>(t.data(), t.numel(), seed, offset, mean,
                                                                              stddev);
  MIXMOE_CUDA_CHECK_LAUNCH("random_normal");
  return t;
}

/// Uniform in [lo, hi) drawn on the device (as randn).
template <Scalar T>
Tensor<T, Cuda> uniform(const Shape& shape, std::uint64_t seed, std::uint64_t offset = 0, double lo = 0.0,
                        double hi = 1.0) {
  auto t = Tensor<T, Cuda>::empty(shape);
  if (t.numel() == 0) return t;
  kernels::random_uniform<<<blocks_for(t.numel()), 256, 0, current_stream()>>>(t.data(), t.numel(), seed, offset, lo,
                                                                               hi);
  MIXMOE_CUDA_CHECK_LAUNCH("random_uniform");
  return t;
}

}  // namespace mixmoe::cuda
