// Row-major GEMM on the GPU through cuBLAS, with the interface of backend/cpu/gemm.hpp:
// C (m x n, ldc) = alpha * op(A) * op(B) + beta * C, op(A) m x k, op(B) k x n.
//
// cuBLAS is column-major; a row-major C is a column-major C^T, so C^T = op(B)^T op(A)^T is one
// cuBLAS call with the operands swapped and no copy. Precisions: float and double; bf16
// operands with fp32 accumulation and an fp32 C (gemm_bf16). Float GEMMs use TF32 tensor cores only
// when set_allow_tf32(true) says so.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <atomic>
#include <sstream>

#include "mixmoe/backend/cuda/runtime.cuh"
#include "mixmoe/backend/cuda/tensor.cuh"

namespace mixmoe::cuda {

inline const char* cublas_status_name(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
    case CUBLAS_STATUS_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    case CUBLAS_STATUS_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "cuBLAS error";
  }
}

inline void check_cublas(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  std::ostringstream os;
  os << "[cuda] " << call << " failed at " << file << ":" << line << ": " << cublas_status_name(s);
  throw Error(os.str());
}

}  // namespace mixmoe::cuda

#define MIXMOE_CUBLAS_CHECK(call) ::mixmoe::cuda::check_cublas((call), #call, __FILE__, __LINE__)

namespace mixmoe::cuda {

namespace detail {
inline std::atomic<bool>& allow_tf32_flag() {
  static std::atomic<bool> on{false};
  return on;
}
}  // namespace detail

/// Whether float GEMMs may round their operands to TF32 (10 mantissa bits) and run on the tensor
/// cores: cuBLAS's (every thread's handle takes CUBLAS_TF32_TENSOR_OP_MATH at its next use) and the
/// MoE experts' grouped GEMMs. Off by default: float GEMMs then multiply in full fp32. The sums stay
/// fp32 either way; double GEMMs are not affected.
inline bool allow_tf32() { return detail::allow_tf32_flag().load(std::memory_order_relaxed); }

/// Allows (or forbids) TF32 for the float GEMMs of the whole process (see allow_tf32).
inline void set_allow_tf32(bool on) { detail::allow_tf32_flag().store(on, std::memory_order_relaxed); }

/// This host thread's cuBLAS handle (created on first use), bound to current_stream(), in the math
/// mode that allow_tf32() asks for (set it there, not on the handle).
inline cublasHandle_t cublas_handle() {
  struct Holder {
    cublasHandle_t h = nullptr;
    bool tf32 = false;
    ~Holder() {
      if (h) (void)cublasDestroy(h);
    }
  };
  thread_local Holder holder;
  if (!holder.h) MIXMOE_CUBLAS_CHECK(cublasCreate(&holder.h));
  MIXMOE_CUBLAS_CHECK(cublasSetStream(holder.h, current_stream()));
  if (const bool tf32 = allow_tf32(); tf32 != holder.tf32) {
    MIXMOE_CUBLAS_CHECK(cublasSetMathMode(holder.h, tf32 ? CUBLAS_TF32_TENSOR_OP_MATH : CUBLAS_DEFAULT_MATH));
    holder.tf32 = tf32;
  }
  return holder.h;
}

namespace detail {
inline int to_int(index_t v, const char* what) {
  MIXMOE_CHECK(v >= 0 && v <= 0x7fffffff, "cuda::gemm", what, " = ", v, " does not fit cuBLAS's int");
  return static_cast<int>(v);
}
inline cublasOperation_t op_of(bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }
/// An operand's leading dimension for cuBLAS, which wants at least 1 even for a matrix with no
/// elements (K = 0: lda = K); such an operand is not read, and C becomes beta C.
inline index_t ld_of(index_t ld) { return ld < 1 ? 1 : ld; }
}  // namespace detail

/// Row-major GEMM of device pointers (float or double), on current_stream().
template <class T>
void gemm(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda, const T* b,
          index_t ldb, T beta, T* c, index_t ldc) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "cuda::gemm: float or double");
  if (m == 0 || n == 0) return;
  using detail::to_int;
  const int im = to_int(m, "m"), in = to_int(n, "n"), ik = to_int(k, "k");
  const int la = to_int(detail::ld_of(lda), "lda"), lb = to_int(detail::ld_of(ldb), "ldb"), lc = to_int(ldc, "ldc");
  if constexpr (std::is_same_v<T, float>)
    MIXMOE_CUBLAS_CHECK(cublasSgemm(cublas_handle(), detail::op_of(trans_b), detail::op_of(trans_a), in, im, ik, &alpha,
                                    b, lb, a, la, &beta, c, lc));
  else
    MIXMOE_CUBLAS_CHECK(cublasDgemm(cublas_handle(), detail::op_of(trans_b), detail::op_of(trans_a), in, im, ik, &alpha,
                                    b, lb, a, la, &beta, c, lc));
}

/// `batch` row-major GEMMs whose operands are `stride_*` elements apart.
template <class T>
void gemm_strided_batched(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, T alpha, const T* a, index_t lda,
                          index_t stride_a, const T* b, index_t ldb, index_t stride_b, T beta, T* c, index_t ldc,
                          index_t stride_c, index_t batch) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "cuda::gemm_strided_batched: float or double");
  if (m == 0 || n == 0 || batch == 0) return;
  using detail::to_int;
  const int im = to_int(m, "m"), in = to_int(n, "n"), ik = to_int(k, "k"), nb = to_int(batch, "batch");
  const int la = to_int(detail::ld_of(lda), "lda"), lb = to_int(detail::ld_of(ldb), "ldb"), lc = to_int(ldc, "ldc");
  if constexpr (std::is_same_v<T, float>)
    MIXMOE_CUBLAS_CHECK(cublasSgemmStridedBatched(cublas_handle(), detail::op_of(trans_b), detail::op_of(trans_a), in,
                                                  im, ik, &alpha, b, lb, stride_b, a, la, stride_a, &beta, c, lc,
                                                  stride_c, nb));
  else
    MIXMOE_CUBLAS_CHECK(cublasDgemmStridedBatched(cublas_handle(), detail::op_of(trans_b), detail::op_of(trans_a), in,
                                                  im, ik, &alpha, b, lb, stride_b, a, la, stride_a, &beta, c, lc,
                                                  stride_c, nb));
}

/// Row-major GEMM with bf16 A and B, fp32 accumulation and an fp32 C.
inline void gemm_bf16(bool trans_a, bool trans_b, index_t m, index_t n, index_t k, float alpha, const __nv_bfloat16* a,
                      index_t lda, const __nv_bfloat16* b, index_t ldb, float beta, float* c, index_t ldc) {
  if (m == 0 || n == 0) return;
  using detail::to_int;
  MIXMOE_CUBLAS_CHECK(cublasGemmEx(cublas_handle(), detail::op_of(trans_b), detail::op_of(trans_a), to_int(n, "n"),
                                   to_int(m, "m"), to_int(k, "k"), &alpha, b, CUDA_R_16BF,
                                   to_int(detail::ld_of(ldb), "ldb"), a, CUDA_R_16BF, to_int(detail::ld_of(lda), "lda"),
                                   &beta, c, CUDA_R_32F, to_int(ldc, "ldc"),
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

namespace kernels {
// Templates, so that the header can be included by several translation units.
template <int = 0>
__global__ void to_bf16(const float* x, __nv_bfloat16* y, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}
template <int = 0>
__global__ void from_bf16(const __nv_bfloat16* x, float* y, index_t n) {
  for (index_t i = blockIdx.x * static_cast<index_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<index_t>(gridDim.x) * blockDim.x)
    y[i] = __bfloat162float(x[i]);
}
}  // namespace kernels

/// y (n) = x rounded to bf16 (nearest even), on the current stream; nothing for n == 0.
inline void convert_to_bf16(const float* x, __nv_bfloat16* y, index_t n) {
  if (n <= 0) return;
  kernels::to_bf16<><<<blocks_for(n), 256, 0, current_stream()>>>(x, y, n);
  MIXMOE_CUDA_CHECK_LAUNCH("to_bf16");
}

/// A device buffer of bf16 values (storage for bf16 operands; round to nearest even).
class Bf16Buffer {
 public:
  Bf16Buffer() = default;
  explicit Bf16Buffer(const Tensor<float, Cuda>& x) : shape_(x.shape()) {
    const Tensor<float, Cuda> c = x.contiguous();
    n_ = c.numel();
    bytes_ = static_cast<std::size_t>(n_) * sizeof(__nv_bfloat16);
    p_ = static_cast<__nv_bfloat16*>(CachingDeviceAllocator::instance().allocate(bytes_ ? bytes_ : 1));
    convert_to_bf16(c.data(), p_, n_);
  }
  ~Bf16Buffer() {
    if (p_) CachingDeviceAllocator::instance().deallocate(p_, bytes_ ? bytes_ : 1);
  }
  Bf16Buffer(const Bf16Buffer&) = delete;
  Bf16Buffer& operator=(const Bf16Buffer&) = delete;

  [[nodiscard]] const __nv_bfloat16* data() const { return p_; }
  [[nodiscard]] const Shape& shape() const { return shape_; }
  /// The values widened back to fp32.
  [[nodiscard]] Tensor<float, Cuda> to_float() const {
    auto t = Tensor<float, Cuda>::empty(shape_);
    if (n_ > 0) {
      kernels::from_bf16<><<<blocks_for(n_), 256, 0, current_stream()>>>(p_, t.data(), n_);
      MIXMOE_CUDA_CHECK_LAUNCH("from_bf16");
    }
    return t;
  }

 private:
  Shape shape_;
  index_t n_ = 0;
  std::size_t bytes_ = 0;
  __nv_bfloat16* p_ = nullptr;
};

/// a (M, K) @ b (K, N) -> (M, N), or with either operand transposed, on the device.
template <Scalar T>
Tensor<T, Cuda> matmul(const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, bool trans_a = false, bool trans_b = false) {
  MIXMOE_CHECK(a.dim() == 2 && b.dim() == 2, "cuda::matmul", "needs 2-D operands, got ", a.shape(), " and ", b.shape());
  const Tensor<T, Cuda> ca = a.contiguous(), cb = b.contiguous();
  const index_t m = trans_a ? a.size(1) : a.size(0), k = trans_a ? a.size(0) : a.size(1);
  const index_t kb = trans_b ? b.size(1) : b.size(0), n = trans_b ? b.size(0) : b.size(1);
  MIXMOE_CHECK(k == kb, "cuda::matmul", "inner extents differ: ", a.shape(), (trans_a ? "^T" : ""), " @ ", b.shape(),
               (trans_b ? "^T" : ""));
  auto c = Tensor<T, Cuda>::empty({m, n});
  gemm<T>(trans_a, trans_b, m, n, k, T(1), ca.data(), ca.size(1), cb.data(), cb.size(1), T(0), c.data(), n);
  return c;
}

/// a (M, K) @ b (K, N) with both operands rounded to bf16, fp32 accumulation, fp32 result.
inline Tensor<float, Cuda> matmul_bf16(const Bf16Buffer& a, const Bf16Buffer& b) {
  MIXMOE_CHECK(a.shape().rank() == 2 && b.shape().rank() == 2 && a.shape()[1] == b.shape()[0], "cuda::matmul_bf16",
               "shapes ", a.shape(), " @ ", b.shape());
  const index_t m = a.shape()[0], k = a.shape()[1], n = b.shape()[1];
  auto c = Tensor<float, Cuda>::empty({m, n});
  gemm_bf16(false, false, m, n, k, 1.0f, a.data(), k, b.data(), n, 0.0f, c.data(), n);
  return c;
}

}  // namespace mixmoe::cuda
