// The host model's cuBLAS (see cuda_runtime.h): the GEMMs the backend calls, column-major as
// cuBLAS's, computed on the host in the call (products summed in the element type with fma, k in
// order; bf16 operands widened to float; float operands rounded to TF32 when the handle's math
// mode allows TF32). Arguments are checked as cuBLAS does (CUBLAS_STATUS_INVALID_VALUE for
// negative sizes or short leading dimensions, CUBLAS_STATUS_NOT_INITIALIZED for a null handle,
// CUBLAS_STATUS_NOT_SUPPORTED for type combinations the model lacks); an operand that does not lie
// inside a device block stops the program with a message, as the GPU would fault. C is not read
// when beta is 0 (so NaN left in it does not spread), as cuBLAS.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda_bf16.h"
#include "cuda_runtime.h"
#include "host_model.hpp"

enum cublasStatus_t {
  CUBLAS_STATUS_SUCCESS = 0,
  CUBLAS_STATUS_NOT_INITIALIZED = 1,
  CUBLAS_STATUS_ALLOC_FAILED = 3,
  CUBLAS_STATUS_INVALID_VALUE = 7,
  CUBLAS_STATUS_ARCH_MISMATCH = 8,
  CUBLAS_STATUS_MAPPING_ERROR = 11,
  CUBLAS_STATUS_EXECUTION_FAILED = 13,
  CUBLAS_STATUS_INTERNAL_ERROR = 14,
  CUBLAS_STATUS_NOT_SUPPORTED = 15,
};
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1, CUBLAS_OP_C = 2 };
enum cublasMath_t {
  CUBLAS_DEFAULT_MATH = 0,
  CUBLAS_TENSOR_OP_MATH = 1,
  CUBLAS_PEDANTIC_MATH = 2,
  CUBLAS_TF32_TENSOR_OP_MATH = 3,
};
enum cudaDataType { CUDA_R_32F = 0, CUDA_R_64F = 1, CUDA_R_16F = 2, CUDA_R_16BF = 14 };
using cudaDataType_t = cudaDataType;
enum cublasComputeType_t {
  CUBLAS_COMPUTE_32F = 68,
  CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
  CUBLAS_COMPUTE_64F = 70,
};
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1, CUBLAS_GEMM_DEFAULT_TENSOR_OP = 99 };

struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasMath_t math = CUBLAS_DEFAULT_MATH;
};
using cublasHandle_t = cublasContext*;

inline cublasStatus_t cublasCreate(cublasHandle_t* h) {
  if (h == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *h = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasDestroy(cublasHandle_t h) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete h;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetStream(cublasHandle_t h, cudaStream_t s) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->stream = s;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasSetMathMode(cublasHandle_t h, cublasMath_t m) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  h->math = m;
  return CUBLAS_STATUS_SUCCESS;
}
inline cublasStatus_t cublasGetMathMode(cublasHandle_t h, cublasMath_t* m) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  *m = h->math;
  return CUBLAS_STATUS_SUCCESS;
}

namespace host_model::blas {

/// An operand as the arithmetic reads it: bf16 widened to float, float and double as they are.
template <class E>
auto widen(E v) {
  if constexpr (std::is_same_v<E, __nv_bfloat16>)
    return __bfloat162float(v);
  else
    return v;
}

/// The device extent of a column-major rows x cols operand with leading dimension ld.
template <class E>
void check_operand(const char* name, const E* p, int rows, int cols, long long ld) {
  if (rows == 0 || cols == 0) return;
  const std::size_t bytes = (static_cast<std::size_t>(cols - 1) * static_cast<std::size_t>(ld) + rows) * sizeof(E);
  if (!Runtime::instance().on_device(p, bytes)) {
    std::fprintf(stderr, "host model: cuBLAS operand %s (%d x %d, ld %lld) is not inside a device block\n", name, rows,
                 cols, ld);
    fail("cuBLAS read or wrote outside device memory");
  }
}

/// C (m x n, ldc) = alpha op(A) op(B) + beta C, one GEMM; TA, TB the stored types, T the
/// arithmetic's (and C's).
template <class T, class TA, class TB>
cublasStatus_t gemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, T alpha,
                    const TA* a, int lda, const TB* b, int ldb, T beta, T* c, int ldc, bool tf32, int batch = 1,
                    long long sa = 0, long long sb = 0, long long sc = 0) {
  if (h == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (m < 0 || n < 0 || k < 0 || batch < 0) return CUBLAS_STATUS_INVALID_VALUE;
  const int ar = ta == CUBLAS_OP_N ? m : k, ac = ta == CUBLAS_OP_N ? k : m;
  const int br = tb == CUBLAS_OP_N ? k : n, bc = tb == CUBLAS_OP_N ? n : k;
  if (lda < std::max(1, ar) || ldb < std::max(1, br) || ldc < std::max(1, m)) return CUBLAS_STATUS_INVALID_VALUE;
  if (Runtime::instance().check_stream(h->stream) != cudaSuccess) return CUBLAS_STATUS_EXECUTION_FAILED;
  const auto operand = [tf32](T v) -> T {
    if constexpr (std::is_same_v<T, float>)
      return tf32 ? round_tf32(v) : v;
    else
      return v;
  };
  for (int q = 0; q < batch; ++q) {
    const TA* aq = a + q * sa;
    const TB* bq = b + q * sb;
    T* cq = c + q * sc;
    if (k > 0) {
      check_operand("A", aq, ar, ac, lda);
      check_operand("B", bq, br, bc, ldb);
    }
    check_operand("C", cq, m, n, ldc);
    for (int j = 0; j < n; ++j)
      for (int i = 0; i < m; ++i) {
        T s = 0;
        for (int p = 0; p < k; ++p) {
          const T av = operand(static_cast<T>(widen(ta == CUBLAS_OP_N ? aq[i + static_cast<long long>(p) * lda]
                                                                      : aq[p + static_cast<long long>(i) * lda])));
          const T bv = operand(static_cast<T>(widen(tb == CUBLAS_OP_N ? bq[p + static_cast<long long>(j) * ldb]
                                                                      : bq[j + static_cast<long long>(p) * ldb])));
          s = std::fma(av, bv, s);
        }
        T& out = cq[i + static_cast<long long>(j) * ldc];
        out = beta == T(0) ? alpha * s : alpha * s + beta * out;
      }
  }
  return CUBLAS_STATUS_SUCCESS;
}

inline bool tf32_allowed(cublasHandle_t h) { return h != nullptr && h->math == CUBLAS_TF32_TENSOR_OP_MATH; }

}  // namespace host_model::blas

inline cublasStatus_t cublasSgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const float* alpha, const float* a, int lda, const float* b, int ldb,
                                  const float* beta, float* c, int ldc) {
  return host_model::blas::gemm(h, ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc,
                                host_model::blas::tf32_allowed(h));
}
inline cublasStatus_t cublasDgemm(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const double* alpha, const double* a, int lda, const double* b, int ldb,
                                  const double* beta, double* c, int ldc) {
  return host_model::blas::gemm(h, ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc, false);
}
inline cublasStatus_t cublasSgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                int n, int k, const float* alpha, const float* a, int lda,
                                                long long sa, const float* b, int ldb, long long sb,
                                                const float* beta, float* c, int ldc, long long sc, int batch) {
  return host_model::blas::gemm(h, ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc,
                                host_model::blas::tf32_allowed(h), batch, sa, sb, sc);
}
inline cublasStatus_t cublasDgemmStridedBatched(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m,
                                                int n, int k, const double* alpha, const double* a, int lda,
                                                long long sa, const double* b, int ldb, long long sb,
                                                const double* beta, double* c, int ldc, long long sc, int batch) {
  return host_model::blas::gemm(h, ta, tb, m, n, k, *alpha, a, lda, b, ldb, *beta, c, ldc, false, batch, sa, sb, sc);
}
/// The combinations the model has: bf16 A and B with a float C, and float A, B, C; fp32 compute.
inline cublasStatus_t cublasGemmEx(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void* alpha, const void* a, cudaDataType at, int lda, const void* b,
                                   cudaDataType bt, int ldb, const void* beta, void* c, cudaDataType ct, int ldc,
                                   cublasComputeType_t compute, cublasGemmAlgo_t) {
  if (ct != CUDA_R_32F || (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_FAST_TF32))
    return CUBLAS_STATUS_NOT_SUPPORTED;
  const float al = *static_cast<const float*>(alpha), be = *static_cast<const float*>(beta);
  if (at == CUDA_R_16BF && bt == CUDA_R_16BF)
    return host_model::blas::gemm(h, ta, tb, m, n, k, al, static_cast<const __nv_bfloat16*>(a), lda,
                                  static_cast<const __nv_bfloat16*>(b), ldb, be, static_cast<float*>(c), ldc, false);
  if (at == CUDA_R_32F && bt == CUDA_R_32F)
    return host_model::blas::gemm(h, ta, tb, m, n, k, al, static_cast<const float*>(a), lda,
                                  static_cast<const float*>(b), ldb, be, static_cast<float*>(c), ldc,
                                  compute == CUBLAS_COMPUTE_32F_FAST_TF32 || host_model::blas::tf32_allowed(h));
  return CUBLAS_STATUS_NOT_SUPPORTED;
}
