// The whole CUDA backend: Tensor<T, Cuda>, its kernels, and the DeviceOps<Cuda> that autograd
// (Var<T, Cuda>) and the ops of ops/ call on the device. Include this header from a CUDA
// translation unit (CMake target mixmoe::cuda) to run model code on the GPU.
//
// DeviceOps<Cuda> is put together from one part per family of ops, each in its own header
// (elementwise, rows, index, attention, moe, train); docs/cuda.md lists what runs on the GPU.
// An op without a device path fails to compile for Cuda (detail::require_host) instead of
// reading device memory on the host.
#pragma once

#include "mixmoe/backend/cuda/attention.cuh"
#include "mixmoe/backend/cuda/blas.cuh"
#include "mixmoe/backend/cuda/elementwise.cuh"
#include "mixmoe/backend/cuda/fft.cuh"
#include "mixmoe/backend/cuda/grouped_gemm_kernels.cuh"
#include "mixmoe/backend/cuda/index.cuh"
#include "mixmoe/backend/cuda/moe.cuh"
#include "mixmoe/backend/cuda/ops.cuh"
#include "mixmoe/backend/cuda/rows.cuh"
#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"
#include "mixmoe/backend/cuda/train.cuh"

namespace mixmoe::detail {

// The parts' function names are distinct: a name in two bases would be ambiguous here.
template <>
struct DeviceOps<Cuda> : cuda::ElementwiseOps,
                         cuda::RowOps,
                         cuda::IndexOps,
                         cuda::AttentionOps,
                         cuda::MoEOps,
                         cuda::TrainOps {
  static constexpr bool available = true;

  template <class T>
  static void gemm(bool ta, bool tb, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b,
                   index_t ldb, T beta, T* c, index_t ldc) {
    cuda::gemm<T>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  /// c (fp32) = op(a) op(b) + beta c with bf16 operands (mixmoe::bf16 has __nv_bfloat16's layout):
  /// cuBLAS on the tensor cores, fp32 accumulation.
  static void gemm_bf16(bool ta, bool tb, index_t m, index_t n, index_t k, const bf16* a, index_t lda, const bf16* b,
                        index_t ldb, float beta, float* c, index_t ldc) {
    cuda::gemm_bf16(ta, tb, m, n, k, 1.0f, reinterpret_cast<const __nv_bfloat16*>(a), lda,
                    reinterpret_cast<const __nv_bfloat16*>(b), ldb, beta, c, ldc);
  }

  /// dst += src (n elements, both contiguous).
  template <class T>
  static void add_into(T* dst, const T* src, index_t n) {
    if (n == 0) return;
    cuda::kernels::add_into<<<cuda::blocks_for(n), 256, 0, cuda::current_stream()>>>(dst, src, n);
    MIXMOE_CUDA_CHECK_LAUNCH("add_into");
  }

  /// out (C) += the column sums of x (R, C).
  template <class T>
  static void add_column_sums(T* out, const T* x, index_t rows, index_t c) {
    if (c == 0) return;
    cuda::kernels::column_sums<<<cuda::blocks_for(c), 256, 0, cuda::current_stream()>>>(x, static_cast<const T*>(nullptr),
                                                                                         out, rows, c, true);
    MIXMOE_CUDA_CHECK_LAUNCH("column_sums");
  }
};

}  // namespace mixmoe::detail
